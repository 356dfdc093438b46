//! The admin HTTP server under hostile clients: idle floods, slowloris,
//! requests with many headers, more clients than it takes at once, and
//! names that try to forge a metric.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A whole HTTP response, read to the end of stream.
struct Response {
    status: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Panics unless the body is exactly as long as announced.
    fn assert_complete(&self) {
        let announced: usize = self
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Content-Length in {:?}", self.headers));
        assert_eq!(
            self.body.len(),
            announced,
            "body truncated: {} of {announced} bytes",
            self.body.len()
        );
    }
}

/// Sends `request` as is and reads the response to the end of stream; a
/// reset or a timeout is an error, not a short body.
fn exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(request).map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("after {} bytes: {e}", raw.len()))?;
    let text = String::from_utf8(raw).map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of head in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

const GET_METRICS: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";

/// One sample of a Prometheus text page.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: u64,
}

/// Parses a page in the Prometheus text format strictly: every sample line
/// must belong to a family declared by a `# TYPE` line, and label values
/// must be quoted with only `\\`, `\"` and `\n` escaped.
fn parse_exposition(page: &str) -> Result<Vec<Sample>, String> {
    let mut families = Vec::new();
    let mut samples = Vec::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap_or("");
            families.push(name.to_string());
        } else if !line.starts_with('#') {
            let sample = parse_sample(line).map_err(|e| format!("{e} in line {line:?}"))?;
            if !families.contains(&sample.name) {
                return Err(format!("a series of no declared family: {line:?}"));
            }
            samples.push(sample);
        }
    }
    Ok(samples)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let end = line.find(|c: char| !is_name(c)).unwrap_or(line.len());
    let (name, mut rest) = line.split_at(end);
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        while let Some(eq) = rest.find("=\"") {
            let label = &rest[..eq];
            if label.is_empty() || !label.chars().all(is_name) {
                return Err(format!("bad label name {label:?}"));
            }
            let (value, after) = unquote(&rest[eq + 2..])?;
            labels.push((label.to_string(), value));
            rest = after.strip_prefix(',').unwrap_or(after);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
        }
    }
    // Gauges such as a check's duration in seconds are fractions; the
    // tests here read counters, so the whole part is enough.
    let value = rest
        .strip_prefix(' ')
        .and_then(|v| {
            v.parse()
                .ok()
                .or_else(|| v.parse::<f64>().ok().map(|f| f as u64))
        })
        .ok_or("no value")?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// A label value up to its closing quote, and what follows it.
fn unquote(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                other => return Err(format!("bad escape {other:?}")),
            },
            c => value.push(c),
        }
    }
    Err("unterminated label value".into())
}

fn sample_value(samples: &[Sample], name: &str) -> Option<u64> {
    samples.iter().find(|s| s.name == name).map(|s| s.value)
}

#[test]
fn a_scrape_is_quick_and_whole_while_2000_idle_and_10_slowloris_clients_hold_connections() {
    raise_fd_limit();
    // ringlb inherits the limit and takes an eighth of it for the admin
    // server: 2,011 clients at once need 16,088 fds.
    let nofile = fd_limit();
    assert!(
        nofile >= 16_088,
        "this test needs RLIMIT_NOFILE >= 16088, have {nofile}"
    );
    let backend = Backend::start(echo());
    let ringlb = Ringlb::start(&["--backend", &backend.addr_str(), "--stats", "127.0.0.1:0"]);
    let stats = ringlb.stats_addr();
    let idle = open_idle(stats, 2000, Duration::from_secs(30));
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let slowloris: Vec<_> = (0..10)
        .map(|_| {
            let (stop, started) = (Arc::clone(&stop), started_tx.clone());
            std::thread::spawn(move || slowloris(stats, &stop, &started))
        })
        .collect();
    for _ in 0..10 {
        started_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("every slowloris client connected");
    }

    let started = Instant::now();
    let scrape = exchange(stats, GET_METRICS, Duration::from_secs(10));
    let took = started.elapsed();
    let response = scrape.unwrap_or_else(|e| panic!("scrape failed after {took:?}: {e}"));
    assert!(took < Duration::from_secs(2), "the scrape took {took:?}");
    assert!(
        response.status.starts_with("HTTP/1.1 200"),
        "{}",
        response.status
    );
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    response.assert_complete();
    let samples = parse_exposition(&response.body).expect("a well-formed page");
    assert!(samples.iter().any(|s| s.name == "ringlb_backend_up"));
    // The scrape was served after every other client had been taken (the
    // kernel's queue is first in, first out), not instead of them.
    let taken = sample_value(&samples, "ringlb_admin_connections_total").unwrap_or(0);
    assert!(taken >= 2011, "only {taken} admin connections taken");

    // Each slowloris client is cut off at the request deadline (5 s).
    stop.store(true, SeqCst);
    for client in slowloris {
        let lasted = client.join().expect("slowloris thread");
        assert!(
            lasted < Duration::from_secs(20),
            "a slowloris client held its connection for {lasted:?}"
        );
    }
    drop(idle);
}

fn fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the pointer is to a valid rlimit struct for the call.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_cur
}

/// `n` connections that send nothing. A server that takes them one at a
/// time leaves the rest to the kernel's queue and then to SYN retries:
/// opening them all must not take more than `bound`.
fn open_idle(addr: SocketAddr, n: usize, bound: Duration) -> Vec<TcpStream> {
    let deadline = Instant::now() + bound;
    (0..n)
        .map(|i| {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{i} of {n} idle clients connected in {bound:?}"
            );
            TcpStream::connect_timeout(&addr, left)
                .unwrap_or_else(|e| panic!("idle client {i} could not connect: {e}"))
        })
        .collect()
}

/// Sends a request head one byte every 500 ms until ringlb cuts it off or
/// the test ends (then it gives up after 30 s); returns how long it lasted.
fn slowloris(
    addr: SocketAddr,
    stop: &AtomicBool,
    started: &std::sync::mpsc::Sender<()>,
) -> Duration {
    let mut s = TcpStream::connect(addr).expect("slowloris connect");
    let begun = Instant::now();
    let head = b"GET /metrics HTTP/1.1\r\nX-Slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    for (i, byte) in head.enumerate() {
        if s.write_all(&[*byte]).is_err() || begun.elapsed() > Duration::from_secs(30) {
            break;
        }
        if i == 0 {
            let _ = started.send(());
        }
        std::thread::sleep(Duration::from_millis(500));
        // Past the deadline only a write that fails says the server gave
        // up; a read says it too, sooner, without waiting for the next one.
        if stop.load(SeqCst) && closed_by_peer(&s) {
            break;
        }
    }
    begun.elapsed()
}

/// True when the peer has ended or reset the connection.
fn closed_by_peer(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut byte = [0u8; 1];
    let closed = match (&*s).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    closed
}

/// A config of `n` frontends on addresses of their own (127.2.x.y), each
/// with one refused backend checked once an hour: a page of many series
/// and little traffic.
fn many_frontends(n: usize, dir: &std::path::Path) -> std::path::PathBuf {
    let backend = refused_addr();
    let mut text = String::from("workers = 1\n");
    for i in 0..n {
        text.push_str(&format!(
            "\n[[frontend]]\nname = \"frontend-with-a-long-descriptive-name-{i:03}\"\n\
             listen = \"127.2.{}.{}:0\"\nbackends = [\"{backend}\"]\ncheck-interval = \"1h\"\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let path = dir.join("many.toml");
    std::fs::write(&path, text).expect("write the config");
    path
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ringlb-admin-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn a_large_page_arrives_whole_when_the_request_has_many_headers_or_a_second_request() {
    let dir = temp_dir("large");
    let config = many_frontends(300, &dir);
    let ringlb = Ringlb::start_raw(&[
        "--config",
        config.to_str().expect("utf-8 path"),
        "--stats",
        "127.0.0.1:0",
    ]);
    let stats = ringlb.stats_addr();
    let mut many_headers = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..60 {
        many_headers.extend(format!("X-Padding-{i}: {}\r\n", "v".repeat(100)).as_bytes());
    }
    many_headers.extend(b"\r\n");
    let pipelined = [GET_METRICS, GET_METRICS].concat();
    let with_body = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n"
        .iter()
        .copied()
        .chain(std::iter::repeat_n(b'x', 20_000))
        .collect::<Vec<u8>>();
    for (what, request) in [("many headers", &many_headers), ("pipelined", &pipelined)] {
        let response = exchange(stats, request, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            response.status.starts_with("HTTP/1.1 200"),
            "{what}: {}",
            response.status
        );
        response.assert_complete();
        assert!(
            response.body.len() > 200_000,
            "{what}: {} bytes",
            response.body.len()
        );
        let samples = parse_exposition(&response.body).expect("a well-formed page");
        let last = "frontend-with-a-long-descriptive-name-299";
        assert!(
            samples
                .iter()
                .any(|s| s.name == "ringlb_backend_up" && s.labels[0].1 == last),
            "{what}: no ringlb_backend_up for {last}"
        );
    }
    // An unread request body must not cut the (short) answer either.
    let response = exchange(stats, &with_body, Duration::from_secs(20)).expect("POST answered");
    assert!(
        response.status.starts_with("HTTP/1.1 405"),
        "{}",
        response.status
    );
    assert_eq!(response.header("allow"), Some("GET, HEAD"));
    response.assert_complete();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn routes_methods_and_head() {
    let backend = Backend::start(echo());
    let ringlb = Ringlb::start(&["--backend", &backend.addr_str(), "--stats", "127.0.0.1:0"]);
    let stats = ringlb.stats_addr();
    let get = |request: &[u8]| exchange(stats, request, Duration::from_secs(10)).expect("answer");
    let metrics = get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        metrics.status.starts_with("HTTP/1.1 200"),
        "{}",
        metrics.status
    );
    assert!(metrics.body.contains("ringlb_frontend_connections_total"));
    // `/` is the status page (tests/pages.rs checks what it shows).
    let root = get(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(root.status.starts_with("HTTP/1.1 200"), "{}", root.status);
    assert!(root.body.contains("<html"), "{}", root.body);
    // The page loads nothing from elsewhere, and says so to the browser.
    assert_eq!(root.header("x-content-type-options"), Some("nosniff"));
    assert!(
        root.header("content-security-policy")
            .is_some_and(|csp| csp.contains("default-src 'none'")),
        "no content security policy"
    );
    let head = get(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.status.starts_with("HTTP/1.1 200"), "{}", head.status);
    assert!(head.body.is_empty(), "a body after HEAD: {}", head.body);
    assert!(head.header("content-length").is_some_and(|l| l != "0"));
    let missing = get(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        missing.status.starts_with("HTTP/1.1 404"),
        "{}",
        missing.status
    );
    missing.assert_complete();
    let delete = get(b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        delete.status.starts_with("HTTP/1.1 405"),
        "{}",
        delete.status
    );
    let junk = get(b"NOT HTTP AT ALL\r\n\r\n");
    assert!(junk.status.starts_with("HTTP/1.1 400"), "{}", junk.status);
    // One request per connection, said so in the response.
    assert_eq!(root.header("connection"), Some("close"));
}

/// ringlb started by the test under an fd limit, so that the admin
/// server's connection cap (an eighth of the fd limit) is small.
struct Limited {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Limited {
    fn start(nofile: u64, args: &[&str]) -> Limited {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: setrlimit is async-signal-safe and touches no memory of
        // the parent; the rlimit struct lives on this closure's stack.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn ringlb");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Limited { child, logs }
    }

    fn wait_log(&self, pattern: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(pattern))
                .cloned();
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    fn stats_addr(&self) -> SocketAddr {
        let line = self
            .wait_log("metrics on http://", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no stats endpoint; logs:\n{}", self.logs()));
        line.split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("stats address in log")
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn beyond_its_connection_cap_the_admin_server_makes_clients_wait_and_never_closes_them() {
    let backend = Backend::start(echo());
    // 256 fds: a cap of 32 admin connections.
    let ringlb = Limited::start(
        256,
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &backend.addr_str(),
            "--workers",
            "1",
            "--stats",
            "127.0.0.1:0",
        ],
    );
    let stats = ringlb.stats_addr();
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(stats).expect("the kernel takes the handshake"))
        .collect();
    ringlb
        .wait_log(
            "admin server at its limit of 32 connections",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("the cap was not reached; logs:\n{}", ringlb.logs()));
    // The ones beyond the cap wait, unaccepted: none is closed at once.
    for (i, s) in idle.iter().enumerate() {
        assert!(!closed_by_peer(s), "idle client {i} was closed at once");
    }
    // The scrape queues behind the idle clients and is served once the
    // first of them reach the request deadline (5 s): late, but whole.
    let started = Instant::now();
    let response = exchange(stats, GET_METRICS, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("scrape after {:?}: {e}", started.elapsed()));
    assert!(
        response.status.starts_with("HTTP/1.1 200"),
        "{}",
        response.status
    );
    response.assert_complete();
    let samples = parse_exposition(&response.body).expect("a well-formed page");
    assert_eq!(
        sample_value(&samples, "ringlb_admin_connection_limit"),
        Some(32)
    );
    assert!(sample_value(&samples, "ringlb_admin_limit_reached_total").unwrap_or(0) >= 1);
    assert!(sample_value(&samples, "ringlb_admin_timeouts_total").unwrap_or(0) >= 1);
    assert!(sample_value(&samples, "ringlb_admin_connections_active").unwrap_or(99) <= 32);
}

#[test]
fn a_hostile_frontend_name_cannot_forge_a_series() {
    let backend = Backend::start(echo());
    let dir = temp_dir("hostile");
    let config = dir.join("hostile.toml");
    let hostile = "we\"b\nx\\\"} 1\nringlb_forged 1";
    let toml_name = hostile
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    std::fs::write(
        &config,
        format!(
            "[[frontend]]\nname = \"{toml_name}\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
            backend.addr_str()
        ),
    )
    .expect("write the config");
    let mut ringlb = Limited::start(
        4096,
        &[
            "--config",
            config.to_str().expect("utf-8 path"),
            "--stats",
            "127.0.0.1:0",
        ],
    );
    // Refusing such a name when the config is read is as safe as escaping
    // it; either way no forged series may ever be served.
    let mut exited = None;
    let settled = eventually(Duration::from_secs(10), || {
        exited = exited.or_else(|| ringlb.child.try_wait().ok().flatten());
        exited.is_some()
            || ringlb
                .wait_log("metrics on http://", Duration::ZERO)
                .is_some()
    });
    assert!(
        settled,
        "neither served nor refused; logs:\n{}",
        ringlb.logs()
    );
    if let Some(status) = exited {
        let logs = ringlb.logs();
        assert!(!status.success(), "exited 0; logs:\n{logs}");
        assert!(
            logs.to_lowercase().contains("name"),
            "refused, but why? {logs}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let response =
        exchange(ringlb.stats_addr(), GET_METRICS, Duration::from_secs(10)).expect("scrape");
    let samples = parse_exposition(&response.body)
        .unwrap_or_else(|e| panic!("{e}; page:\n{}", response.body));
    assert!(samples.iter().all(|s| s.name != "ringlb_forged"));
    let frontends: Vec<&str> = samples
        .iter()
        .filter(|s| s.name == "ringlb_frontend_connections_total")
        .map(|s| s.labels[0].1.as_str())
        .collect();
    assert_eq!(frontends, [hostile]);
    let _ = std::fs::remove_dir_all(&dir);
}
