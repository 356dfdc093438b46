//! Reload (SIGHUP, SIGUSR2): the config file is re-read and the difference
//! applied while ringlb serves; a bad file changes nothing.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;

/// A config file in the temp dir, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(tag: &str, text: &str) -> ConfigFile {
        let path =
            std::env::temp_dir().join(format!("ringlb-reload-{tag}-{}.toml", std::process::id()));
        let file = ConfigFile(path);
        file.write(text);
        file
    }

    /// Replaced in one step (write then rename), as an operator's tools
    /// do: a reload never reads half a file.
    fn write(&self, text: &str) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.0).expect("rename config");
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A `[[frontend]]` table. `extra` is added as is (more keys).
fn frontend(name: &str, listen: &str, backends: &[&str], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[[frontend]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

fn start(file: &ConfigFile, extra: &[&str]) -> Ringlb {
    let mut args = vec!["--config", file.path()];
    args.extend_from_slice(extra);
    Ringlb::start_raw(&args)
}

/// Sends SIGHUP and waits for reload `n`'s outcome line.
fn reload(ringlb: &Ringlb, n: usize) -> String {
    ringlb.signal(libc::SIGHUP);
    let applied = format!("reload {n} applied");
    let failed = format!("reload {n} failed");
    let mut line = None;
    assert!(
        eventually(Duration::from_secs(20), || {
            line = ringlb
                .wait_log(&applied, Duration::ZERO)
                .or_else(|| ringlb.wait_log(&failed, Duration::ZERO));
            line.is_some()
        }),
        "no outcome for reload {n}; logs:\n{}",
        ringlb.logs()
    );
    line.unwrap_or_default()
}

/// The address a frontend listens on, from its (n-th) listening line.
fn listening(ringlb: &Ringlb, name: &str, n: usize) -> SocketAddr {
    let pattern = format!("frontend {name} listening on ");
    let line = ringlb
        .wait_log_count(&pattern, n, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{name} not listening; logs:\n{}", ringlb.logs()));
    line.split(&pattern)
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.parse().ok())
        .expect("listen address in log")
}

/// An echo backend that counts the connections that carried data: health
/// checks connect too, and must not count as traffic.
fn counting_echo() -> (Handler, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    let handler: Handler = Arc::new(move |mut stream: TcpStream| {
        let mut buf = vec![0u8; 64 * 1024];
        let mut counted = false;
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !std::mem::replace(&mut counted, true) {
                        seen.fetch_add(1, SeqCst);
                    }
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stream.shutdown(Shutdown::Write);
    });
    (handler, count)
}

/// An echo backend and its count of connections that carried data.
fn echo_backend() -> (Backend, Arc<AtomicUsize>) {
    let (handler, count) = counting_echo();
    (Backend::start(handler), count)
}

/// One short echo exchange on a new connection, byte-checked.
fn exchange(addr: SocketAddr, seed: u64) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut sent = [0u8; 64];
    Payload::new(seed).fill(&mut sent);
    s.write_all(&sent).map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut got = Vec::with_capacity(64);
    s.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != sent {
        return Err(format!("{} bytes back, not the 64 sent", got.len()));
    }
    Ok(())
}

/// Clients opening new connections in a loop until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|c| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    let mut seed = c as u64 * 1_000_003;
                    while !stop.load(SeqCst) {
                        seed += 1;
                        match exchange(addr, seed) {
                            Ok(()) => {
                                ok.fetch_add(1, SeqCst);
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
            started: Instant::now(),
        }
    }

    fn done(&self) -> u64 {
        self.ok.load(SeqCst)
    }

    /// Waits until `n` more connections have completed.
    fn wait_more(&self, n: u64) {
        let target = self.done() + n;
        assert!(
            eventually(Duration::from_secs(60), || self.done() >= target),
            "the load stalled at {} connections",
            self.done()
        );
    }

    fn finish(mut self) -> (u64, f64, Vec<String>) {
        self.stop.store(true, SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let done = self.done();
        let rate = done as f64 / self.started.elapsed().as_secs_f64();
        let failures = self.failures.lock().unwrap().clone();
        (done, rate, failures)
    }
}

/// A long echo transfer: the payload goes up in chunks (the caller says
/// when to send the second half), and what comes back is checked.
struct Transfer {
    stream: TcpStream,
    reader: std::thread::JoinHandle<std::io::Result<Digest>>,
    payload: Payload,
    sent: Digest,
}

const HALF: usize = 4 << 20;

impl Transfer {
    fn start(addr: SocketAddr, seed: u64) -> Transfer {
        let stream = TcpStream::connect(addr).expect("connect for the transfer");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut read_side = stream.try_clone().expect("clone");
        let reader = std::thread::spawn(move || read_digest(&mut read_side));
        let mut transfer = Transfer {
            stream,
            reader,
            payload: Payload::new(seed),
            sent: Digest::default(),
        };
        transfer.send(HALF);
        transfer
    }

    fn send(&mut self, len: usize) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            self.payload.fill(&mut buf[..n]);
            self.sent.update(&buf[..n]);
            self.stream.write_all(&buf[..n]).expect("send the transfer");
            left -= n;
        }
    }

    /// Sends the second half, ends the stream, checks every byte came back.
    fn finish(mut self) {
        self.send(HALF);
        self.stream
            .shutdown(Shutdown::Write)
            .expect("end the transfer");
        let got = self
            .reader
            .join()
            .expect("reader thread")
            .expect("the transfer's echo");
        assert_eq!(got, self.sent, "the transfer came back altered");
    }
}

/// Issue 10's test: a client opening new connections (each byte-checked)
/// through 20 reloads that add and remove backends and a frontend: none
/// fails; added backends get traffic, removed ones stop getting it; an
/// established connection on a removed backend completes byte-exact.
#[test]
fn twenty_reloads_under_load_lose_no_connection() {
    raise_fd_limit();
    let fixed = [Backend::start(echo()), Backend::start(echo())];
    let toggled = [echo_backend(), echo_backend()];
    let (bulk_old, bulk_count) = echo_backend();
    let config = |step: usize| {
        let mut main: Vec<String> = fixed.iter().map(|b| b.addr_str()).collect();
        // Each toggled backend is in on alternate steps, out of phase.
        for (k, (b, _)) in toggled.iter().enumerate() {
            if (step + k) % 2 == 1 {
                main.push(b.addr_str());
            }
        }
        let main: Vec<&str> = main.iter().map(String::as_str).collect();
        let mut text = String::from("workers = 2\n");
        text += &frontend("main", "127.0.0.1:0", &main, "");
        // The bulk frontend's only backend is replaced at step 5, with a
        // transfer on it.
        let bulk = if step < 5 {
            bulk_old.addr_str()
        } else {
            fixed[0].addr_str()
        };
        text += &frontend("bulk", "127.0.0.1:0", &[&bulk], "");
        if step % 4 == 2 {
            text += &frontend("extra", "127.0.0.1:0", &[&fixed[1].addr_str()], "");
        }
        text
    };
    let file = ConfigFile::new("load", &config(0));
    let ringlb = start(&file, &[]);
    let main = listening(&ringlb, "main", 1);
    let bulk = listening(&ringlb, "bulk", 1);
    let load = Load::start(main, 8);
    load.wait_more(500);
    let mut transfer = None;
    let mut extras = 0;
    for step in 1..=20 {
        if step == 5 {
            let t = Transfer::start(bulk, 99);
            assert!(eventually(Duration::from_secs(10), || bulk_count
                .load(SeqCst)
                == 1));
            transfer = Some(t);
        }
        file.write(&config(step));
        let line = reload(&ringlb, step);
        assert!(line.contains("applied"), "reload {step}: {line}");
        let counts: Vec<usize> = toggled.iter().map(|(_, c)| c.load(SeqCst)).collect();
        load.wait_more(400);
        for (k, (_, count)) in toggled.iter().enumerate() {
            let now = count.load(SeqCst);
            if (step + k) % 2 == 1 {
                // Added: it gets its share.
                assert!(
                    eventually(Duration::from_secs(20), || count.load(SeqCst)
                        > counts[k] + 20),
                    "step {step}: backend {k} added but got no traffic"
                );
            } else {
                // Removed: at most the connects already under way when the
                // reload was acknowledged (one per client).
                assert!(
                    now <= counts[k] + 8,
                    "step {step}: backend {k} removed but got {} new connections",
                    now - counts[k]
                );
            }
        }
        if step % 4 == 2 {
            extras += 1;
            let extra = listening(&ringlb, "extra", extras);
            exchange(extra, step as u64).expect("the added frontend serves");
        } else if step % 4 == 3 {
            let extra = listening(&ringlb, "extra", extras);
            assert!(
                eventually(Duration::from_secs(10), || TcpStream::connect(extra)
                    .is_err()),
                "the removed frontend still accepts"
            );
        }
        if step == 8
            && let Some(t) = transfer.take()
        {
            t.finish();
        }
    }
    let (done, rate, failures) = load.finish();
    println!(
        "{done} connections, {rate:.0} per second, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert!(
        rate >= 2000.0,
        "the load reached only {rate:.0} new connections per second"
    );
    assert_eq!(bulk_count.load(SeqCst), 1);
}

/// Whether the ringlb process has a listening TCP socket on `port`: its
/// socket inodes (from /proc/PID/fd) against the LISTEN lines of
/// /proc/net/tcp.
fn listens_on(ringlb: &Ringlb, port: u16) -> bool {
    let pid = ringlb.child.id();
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields
            .get(1)
            .and_then(|a| a.split(':').nth(1))
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        fields.get(3) == Some(&"0A")
            && local_port == Some(port)
            && fields.get(9).is_some_and(|i| inodes.iter().any(|n| n == i))
    })
}

/// The line number (from 1) where `needle` starts in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text.find(needle).expect("needle in text");
    text[..at].matches('\n').count() + 1
}

/// Bad files change nothing: a syntax error, an invalid backend address, a
/// listen port another process holds. Each is logged with the file and
/// line and counted; the old config keeps serving; a new frontend listed
/// before the failing one was not left half bound.
#[test]
fn a_bad_reload_keeps_the_old_config_serving() {
    let backend = Backend::start(echo());
    let b = backend.addr_str();
    let good = frontend("main", "127.0.0.1:0", &[&b], "");
    let file = ConfigFile::new("bad", &good);
    let ringlb = start(&file, &["--stats", "127.0.0.1:0"]);
    let main = listening(&ringlb, "main", 1);
    exchange(main, 1).expect("serves before");

    let broken = format!("{good}\n[[frontend]\nlisten = \"127.0.0.1:0\"\n");
    file.write(&broken);
    let line = reload(&ringlb, 1);
    assert!(line.contains("failed"), "{line}");
    let at = line_of(&broken, "[[frontend]\n");
    assert!(line.contains(&format!("{}:{at}:", file.path())), "{line}");
    exchange(main, 2).expect("serves after a syntax error");

    file.write(&format!(
        "{good}{}",
        frontend("two", "127.0.0.1:0", &["nonsense:port"], "")
    ));
    let line = reload(&ringlb, 2);
    assert!(line.contains("failed"), "{line}");
    assert!(line.contains(&format!("{}:", file.path())), "{line}");
    exchange(main, 3).expect("serves after an invalid address");

    let taken = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let taken_addr = taken.local_addr().unwrap().to_string();
    let free = TcpListener::bind("127.0.0.1:0").expect("find a free port");
    let free_addr = free.local_addr().unwrap();
    drop(free);
    let busy = format!(
        "{good}{}{}",
        frontend("fresh", &free_addr.to_string(), &[&b], ""),
        frontend("busy", &taken_addr, &[&b], "")
    );
    file.write(&busy);
    let line = reload(&ringlb, 3);
    assert!(line.contains("failed"), "{line}");
    assert!(line.contains("cannot listen on"), "{line}");
    let at = line_of(&busy, &format!("listen = \"{taken_addr}\""));
    assert!(line.contains(&format!("{}:{at}:", file.path())), "{line}");
    // Another test may take the freed port meanwhile: ask whether ringlb
    // itself listens there, not whether anyone does.
    assert!(
        listens_on(&ringlb, main.port()),
        "the check sees ringlb's own"
    );
    assert!(
        !listens_on(&ringlb, free_addr.port()),
        "a failed reload left a listener bound"
    );
    exchange(main, 4).expect("serves after a busy port");

    assert_eq!(ringlb.metric("ringlb_reload_failures_total"), Some(3));
    assert_eq!(ringlb.metric("ringlb_reloads_total"), Some(0));
    assert_eq!(
        ringlb.metric("ringlb_last_reload_timestamp_seconds"),
        Some(0)
    );
    file.write(&good);
    assert!(reload(&ringlb, 4).contains("applied"));
    assert_eq!(ringlb.metric("ringlb_reloads_total"), Some(1));
    assert!(ringlb.metric("ringlb_last_reload_timestamp_seconds") > Some(1_700_000_000));
    drop(taken);
}

/// A reload that changes something else keeps an unchanged backend's
/// health (down stays down, with no new DOWN line) and its counters.
#[test]
fn unchanged_backends_keep_health_and_counters() {
    let up = Backend::start(echo());
    let dead = refused_addr().to_string();
    let (added, added_count) = echo_backend();
    let keys = "check-interval = \"200ms\"\nfall = 1\nrise = 1\n";
    let before = frontend("main", "127.0.0.1:0", &[&up.addr_str(), &dead], keys);
    let file = ConfigFile::new("keep", &before);
    let ringlb = start(&file, &["--stats", "127.0.0.1:0"]);
    let main = listening(&ringlb, "main", 1);
    ringlb
        .wait_log(&format!("backend {dead} is DOWN"), Duration::from_secs(10))
        .expect("the dead backend is marked down");
    for seed in 0..10 {
        exchange(main, seed).expect("served");
    }
    let series =
        |b: &str| format!("ringlb_backend_connections_total{{frontend=\"main\",backend=\"{b}\"}}");
    let served = ringlb.metric(&series(&up.addr_str())).expect("counter");
    assert!(served >= 10);

    let after = frontend(
        "main",
        "127.0.0.1:0",
        &[&up.addr_str(), &dead, &added.addr_str()],
        keys,
    );
    file.write(&after);
    assert!(reload(&ringlb, 1).contains("applied"));
    let down = format!("ringlb_backend_up{{frontend=\"main\",backend=\"{dead}\"}}");
    assert_eq!(
        ringlb.metric(&down),
        Some(0),
        "the down backend came back up"
    );
    assert!(ringlb.metric(&series(&up.addr_str())) >= Some(served));
    let marked =
        format!("ringlb_backend_marked_down_total{{frontend=\"main\",backend=\"{dead}\"}}");
    assert_eq!(ringlb.metric(&marked), Some(1));
    for seed in 10..40 {
        exchange(main, seed).expect("served after the reload");
    }
    assert!(
        added_count.load(SeqCst) > 0,
        "the added backend got nothing"
    );
    assert_eq!(ringlb.count_logs(&format!("backend {dead} is DOWN")), 1);
}

/// Settings that only a restart changes are reported, and the rest of the
/// reload still applies.
#[test]
fn workers_and_buffers_changes_need_a_restart() {
    let a = Backend::start(named("a"));
    let b = Backend::start(named("b"));
    let file = ConfigFile::new(
        "restart",
        &format!(
            "workers = 1\nbuffers = 64\n{}",
            frontend("main", "127.0.0.1:0", &[&a.addr_str()], "")
        ),
    );
    let ringlb = start(&file, &[]);
    let main = listening(&ringlb, "main", 1);
    file.write(&format!(
        "workers = 2\nbuffers = 128\n{}",
        frontend("main", "127.0.0.1:0", &[&b.addr_str()], "")
    ));
    assert!(reload(&ringlb, 1).contains("applied"));
    let logs = ringlb.logs();
    assert!(logs.contains("workers: 1 -> 2 needs a restart"), "{logs}");
    assert!(
        logs.contains("buffers: 64 -> 128 needs a restart"),
        "{logs}"
    );
    assert_eq!(which(main).expect("served"), "b");
}

/// Started from flags alone, there is no file to read again: say so.
#[test]
fn sighup_without_a_config_file_says_so() {
    let a = Backend::start(echo());
    let ringlb = Ringlb::start(&["--backend", &a.addr_str()]);
    ringlb.signal(libc::SIGHUP);
    ringlb
        .wait_log("no config file to reload", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no line; logs:\n{}", ringlb.logs()));
    exchange(ringlb.addr, 1).expect("still serving");
}

/// A removed frontend stops accepting; its open connection goes on to the
/// end, and one left open past the drain timeout is reset, never ended as
/// if complete.
#[test]
fn a_removed_frontend_drains_its_connections() {
    let a = Backend::start(echo());
    let keep = frontend("keep", "127.0.0.1:0", &[&a.addr_str()], "");
    let gone = frontend("gone", "127.0.0.1:0", &[&a.addr_str()], "");
    let file = ConfigFile::new("remove", &format!("drain-timeout = \"3s\"\n{keep}{gone}"));
    let ringlb = start(&file, &[]);
    let addr = listening(&ringlb, "gone", 1);
    let mut open = TcpStream::connect(addr).expect("connect");
    open.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut idle = TcpStream::connect(addr).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 5];
    for s in [&mut open, &mut idle] {
        s.write_all(b"hello").unwrap();
        s.read_exact(&mut buf).expect("echo before");
    }
    file.write(&format!("drain-timeout = \"3s\"\n{keep}"));
    assert!(reload(&ringlb, 1).contains("applied"));
    assert!(
        eventually(Duration::from_secs(10), || TcpStream::connect(addr)
            .is_err()),
        "the removed frontend still accepts"
    );
    open.write_all(b"again")
        .expect("the open connection goes on");
    open.read_exact(&mut buf).expect("echo after the removal");
    assert_eq!(&buf, b"again");
    open.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).expect("a clean end");
    assert!(rest.is_empty());
    let err = idle
        .read(&mut buf)
        .expect_err("reset after the drain timeout");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

/// A backend removed from a frontend with `on-down = "shutdown"` has its
/// connections reset; without it they go on (see the load test).
#[test]
fn a_removed_backend_under_on_down_shutdown_is_reset() {
    let a = Backend::start(echo());
    let (b, b_count) = echo_backend();
    let keys = "on-down = \"shutdown\"\n";
    let file = ConfigFile::new(
        "shutdown",
        &frontend("main", "127.0.0.1:0", &[&a.addr_str()], keys),
    );
    let ringlb = start(&file, &[]);
    let main = listening(&ringlb, "main", 1);
    let mut s = TcpStream::connect(main).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 5];
    s.write_all(b"hello").unwrap();
    s.read_exact(&mut buf).expect("echo");
    file.write(&frontend("main", "127.0.0.1:0", &[&b.addr_str()], keys));
    assert!(reload(&ringlb, 1).contains("applied"));
    let err = s.read(&mut buf).expect_err("reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    exchange(main, 1).expect("new connections go to the new backend");
    assert_eq!(b_count.load(SeqCst), 1);
}

/// SIGUSR2 (HAProxy's reload signal) reloads too.
#[test]
fn sigusr2_reloads() {
    let a = Backend::start(named("a"));
    let b = Backend::start(named("b"));
    let file = ConfigFile::new(
        "usr2",
        &frontend("main", "127.0.0.1:0", &[&a.addr_str()], ""),
    );
    let ringlb = start(&file, &[]);
    let main = listening(&ringlb, "main", 1);
    assert_eq!(which(main).expect("served"), "a");
    file.write(&frontend("main", "127.0.0.1:0", &[&b.addr_str()], ""));
    ringlb.signal(libc::SIGUSR2);
    ringlb
        .wait_log("reload 1 applied", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no reload; logs:\n{}", ringlb.logs()));
    assert_eq!(which(main).expect("served"), "b");
}

/// A frontend whose listen address and mode change: the new address
/// serves in the new mode, the old one stops accepting, and a connection
/// open on the old address goes on.
#[test]
fn a_changed_frontend_moves_its_listener_and_mode() {
    let (a, _) = echo_backend();
    let first = Backend::start(named("first"));
    let second = Backend::start(named("second"));
    let backends = [first.addr_str(), second.addr_str()];
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let old_port = TcpListener::bind("127.0.0.1:0").expect("free port");
    let old_addr = old_port.local_addr().unwrap();
    drop(old_port);
    let file = ConfigFile::new(
        "move",
        &format!(
            "{}{}",
            frontend("main", &old_addr.to_string(), &backends, ""),
            frontend("echo", "127.0.0.1:0", &[&a.addr_str()], "")
        ),
    );
    let ringlb = start(&file, &[]);
    let main = listening(&ringlb, "main", 1);
    assert_eq!(main, old_addr);
    let mut seen: Vec<String> = (0..4).map(|_| which(main).expect("served")).collect();
    seen.sort();
    assert_eq!(seen, ["first", "first", "second", "second"]);
    let mut open = TcpStream::connect(main).expect("connect");
    open.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut name = [0u8; 5];
    open.read_exact(&mut name).expect("a name before the move");

    file.write(&format!(
        "{}{}",
        frontend(
            "main",
            "127.0.0.1:0",
            &backends,
            "mode = \"active-passive\""
        ),
        frontend("echo", "127.0.0.1:0", &[&a.addr_str()], "")
    ));
    assert!(reload(&ringlb, 1).contains("applied"));
    let moved = listening(&ringlb, "main", 2);
    assert_ne!(moved, old_addr);
    assert!(
        eventually(Duration::from_secs(10), || TcpStream::connect(old_addr)
            .is_err()),
        "the old address still accepts"
    );
    for _ in 0..4 {
        assert_eq!(which(moved).expect("served"), "first");
    }
    open.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest)
        .expect("the connection on the old address ends cleanly");
}
