//! The read-only HTTP pages (`/stats`, `/ready`, the status page in a real
//! browser) and the access log, against the real binary on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{BIN, Backend, Ringlb, echo, eventually, refused_addr};

/// A directory of this test's own, removed on drop (even on panic).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ringlb-pages-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// ringlb on a config file, with the stats server on a free port.
fn start(dir: &TempDir, config: &str) -> Ringlb {
    let path = dir.path("ringlb.toml");
    std::fs::write(&path, config).expect("write config");
    let path = path.to_string_lossy().into_owned();
    Ringlb::start_raw(&["--config", &path, "--stats", "127.0.0.1:0"])
}

/// Where a frontend listens, from its start line.
fn frontend_addr(ringlb: &Ringlb, name: &str) -> SocketAddr {
    let line = ringlb
        .wait_log(
            &format!("frontend {name} listening on "),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("no frontend {name}; logs:\n{}", ringlb.logs()));
    line.split("listening on ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.parse().ok())
        .expect("frontend address")
}

/// A raw exchange with the stats server: status line, headers (lower
/// case), body.
fn http(ringlb: &Ringlb, request: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(ringlb.stats_addr()).expect("connect to stats");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.into(), headers.to_lowercase(), body.into())
}

fn stats(ringlb: &Ringlb) -> serde_json::Value {
    let (status, body) = ringlb.scrape("/stats");
    assert!(status.contains(" 200 "), "{status}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/stats is not JSON ({e}): {body}"))
}

/// The state of each backend of `frontend` in `/stats`, by name.
fn states(stats: &serde_json::Value, frontend: &str) -> Vec<(String, String)> {
    stats["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["name"] == frontend)
        .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("").to_string(),
                b["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn ctl(socket: &Path, args: &[&str]) {
    let out = Command::new(BIN)
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run ringlb ctl");
    assert!(
        out.status.success(),
        "ringlb ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One up, one down (refused), one drained by the operator, one in
/// maintenance: what the status page must tell apart.
struct Mixed {
    ringlb: Ringlb,
    up: String,
    down: String,
    drained: String,
    maint: String,
    _backends: [Backend; 3],
    _dir: TempDir,
}

fn mixed(tag: &str) -> Mixed {
    let dir = TempDir::new(tag);
    let backends = [echo(), echo(), echo()].map(Backend::start);
    let [up, drained, maint] = [0, 1, 2].map(|i| backends[i].addr_str());
    let down = refused_addr().to_string();
    let socket = dir.path("admin.sock");
    let config = format!(
        "admin-socket = {socket:?}\n[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
         check-interval = \"200ms\"\nbackends = [{up:?}, {down:?}, {drained:?}, {maint:?}]\n"
    );
    let ringlb = start(&dir, &config);
    ctl(&socket, &["drain", &format!("web/{drained}")]);
    ctl(&socket, &["disable", &format!("web/{maint}")]);
    let want = vec![
        (up.clone(), "up".to_string()),
        (down.clone(), "down".to_string()),
        (drained.clone(), "drain".to_string()),
        (maint.clone(), "maint".to_string()),
    ];
    let mut last = Vec::new();
    let settled = eventually(Duration::from_secs(20), || {
        last = states(&stats(&ringlb), "web");
        last == want
    });
    assert!(settled, "states in /stats: {last:?}, wanted {want:?}");
    Mixed {
        ringlb,
        up,
        down,
        drained,
        maint,
        _backends: backends,
        _dir: dir,
    }
}

#[test]
fn stats_is_json_with_each_backends_state_and_counters() {
    let m = mixed("stats");
    let (status, headers, body) = http(&m.ringlb, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers.contains("content-type: application/json"),
        "{headers}"
    );
    let parsed: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let web = &parsed["frontends"][0];
    assert_eq!(web["name"], "web");
    let down = &web["backends"][1];
    assert_eq!(down["name"], m.down.as_str());
    assert_eq!(down["health"], "down");
    assert_eq!(down["admin"], "ready");
    assert!(
        down["reason"]
            .as_str()
            .is_some_and(|r| r.contains("refused")),
        "{down}"
    );
    assert!(down["changed_at"].as_f64().is_some(), "{down}");
    assert_eq!(down["last_check"]["ok"], false, "{down}");
    assert_eq!(web["backends"][2]["health"], "up");
    assert_eq!(web["backends"][2]["admin"], "drain");
    // Counters move with traffic: one echo through the only usable one.
    let mut client = TcpStream::connect(frontend_addr(&m.ringlb, "web")).expect("connect");
    client.write_all(b"ping").expect("send");
    let mut echoed = [0u8; 4];
    client.read_exact(&mut echoed).expect("echo");
    drop(client);
    let counted = eventually(Duration::from_secs(10), || {
        let up = &stats(&m.ringlb)["frontends"][0]["backends"][0];
        up["name"] == m.up.as_str() && up["connections"] == 1 && up["bytes_to_backend"] == 4
    });
    assert!(counted, "{}", stats(&m.ringlb));
    // Nothing changes over HTTP.
    let (status, _, _) = http(
        &m.ringlb,
        "POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(status.contains(" 405 "), "{status}");
    let _ = (&m.drained, &m.maint);
}

#[test]
fn ready_is_200_then_503_while_draining() {
    let dir = TempDir::new("ready");
    let backend = Backend::start(echo());
    let config = format!(
        "drain-timeout = \"60s\"\n[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
         backends = [{:?}]\n",
        backend.addr_str()
    );
    let mut ringlb = start(&dir, &config);
    let (status, headers, body) = http(&ringlb, "GET /ready HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(body, "ready\n");
    assert!(headers.contains("cache-control: no-store"), "{headers}");
    // An open connection keeps a draining ringlb alive.
    let mut client = TcpStream::connect(frontend_addr(&ringlb, "web")).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    client.write_all(b"hi").expect("send");
    let mut echoed = [0u8; 2];
    client.read_exact(&mut echoed).expect("echo");
    ringlb.signal(libc::SIGTERM);
    ringlb
        .wait_log("draining", Duration::from_secs(10))
        .expect("drain logged");
    let mut last = String::new();
    let unready = eventually(Duration::from_secs(10), || {
        let (status, _, body) = http(&ringlb, "GET /ready HTTP/1.1\r\nHost: x\r\n\r\n");
        last = format!("{status} {body}");
        status.contains(" 503 ")
    });
    assert!(unready, "/ready while draining: {last}");
    // Still draining, not gone: the open connection still works, and HEAD
    // (what some probes send) says the same.
    let (status, _, body) = http(&ringlb, "HEAD /ready HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status.contains(" 503 "), "{status}");
    assert!(body.is_empty());
    client.write_all(b"yo").expect("send while draining");
    client.read_exact(&mut echoed).expect("echo while draining");
    assert_eq!(&echoed, b"yo");
    drop(client);
    assert!(
        ringlb.wait_exit(Duration::from_secs(20)).is_some(),
        "ringlb did not exit once its last connection ended"
    );
}

/// The rows of the rendered page, as (backend, class) from each
/// `<tr class=... data-backend=...>` that the page's script built.
fn rendered_rows(dom: &str) -> Vec<(String, String)> {
    dom.split("<tr ")
        .skip(1)
        .filter_map(|tag| {
            let tag = tag.split('>').next()?;
            let attr = |name: &str| {
                let rest = tag.split(&format!("{name}=\"")).nth(1)?;
                Some(rest.split('"').next()?.to_string())
            };
            Some((attr("data-backend")?, attr("class")?))
        })
        .collect()
}

fn chromium(args: &[&str]) -> std::process::Output {
    let profile = TempDir::new("chromium-profile");
    let profile = format!("--user-data-dir={}", profile.0.display());
    let mut command = Command::new("timeout");
    command
        .arg("120")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            &profile,
        ])
        .args(args);
    let out = command
        .output()
        .expect("run chromium (apt-get install chromium; .ci/run installs it)");
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What a person sees: the page rendered by headless Chromium, after its
/// script ran. `RINGLB_SCREENSHOT=docs/status-page.png` also saves a
/// screenshot (how the README's picture is made).
#[test]
fn status_page_in_chromium_shows_up_down_drained_and_maint() {
    let m = mixed("chromium");
    let url = format!("http://{}/", m.ringlb.stats_addr());
    let dom = chromium(&["--virtual-time-budget=3000", "--dump-dom", &url]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    let rows = rendered_rows(&dom);
    let want = vec![
        (m.up.clone(), "up".to_string()),
        (m.down.clone(), "down".to_string()),
        (m.drained.clone(), "drain".to_string()),
        (m.maint.clone(), "maint".to_string()),
    ];
    assert_eq!(rows, want, "rows of the rendered page:\n{dom}");
    for shown in [
        "accepting connections",
        "<td class=\"state\">up</td>",
        "<td class=\"state\">down</td>",
        "<td class=\"state\">drain</td>",
        "<td class=\"state\">maint</td>",
        "connection refused",
    ] {
        assert!(
            dom.contains(shown),
            "the page does not show {shown:?}:\n{dom}"
        );
    }
    assert!(dom.contains("<h2>web<small>"), "no table for web:\n{dom}");
    if let Ok(path) = std::env::var("RINGLB_SCREENSHOT") {
        let shot = format!("--screenshot={path}");
        chromium(&["--window-size=1280,420", &shot, &url]);
    }
}

#[test]
fn access_log_writes_tcplog_fields_as_text_or_json_and_only_when_asked() {
    let dir = TempDir::new("access");
    let backend = Backend::start(echo());
    let b = backend.addr_str();
    let refused = refused_addr().to_string();
    let config = format!(
        "workers = 1\n\
         [[frontend]]\nname = \"quiet\"\nlisten = \"127.0.0.1:0\"\nbackends = [{b:?}]\n\
         [[frontend]]\nname = \"text\"\nlisten = \"127.0.0.1:0\"\nbackends = [{b:?}]\nlog = true\n\
         [[frontend]]\nname = \"json\"\nlisten = \"127.0.0.1:0\"\nbackends = [{b:?}]\nlog = true\n\
         log-format = \"json\"\n\
         [[frontend]]\nname = \"nobody\"\nlisten = \"127.0.0.1:0\"\nbackends = [{refused:?}]\n\
         log = true\n"
    );
    let ringlb = start(&dir, &config);
    let exchange = |frontend: &str| {
        let mut c = TcpStream::connect(frontend_addr(&ringlb, frontend)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let port = c.local_addr().expect("local").port();
        c.write_all(b"hello").expect("send");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut echoed = Vec::new();
        let _ = c.read_to_end(&mut echoed);
        (port, echoed)
    };
    let (quiet_port, echoed) = exchange("quiet");
    assert_eq!(echoed, b"hello");
    // The debug line says the quiet one ended; its access line would be
    // written just before it.
    ringlb
        .wait_log(
            &format!("quiet 127.0.0.1:{quiet_port} -> "),
            Duration::from_secs(10),
        )
        .expect("the quiet connection ended");

    let (port, _) = exchange("text");
    let line = ringlb
        .wait_log("frontend=text", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no access line; logs:\n{}", ringlb.logs()));
    assert!(line.contains(" INFO  ringlb::access] "), "{line}");
    let fields = line.split("] ").nth(1).unwrap_or("");
    for field in [
        format!("client=127.0.0.1:{port} "),
        "frontend=text ".into(),
        format!("backend={b} "),
        "bytes_up=5 ".into(),
        "bytes_down=5 ".into(),
    ] {
        assert!(fields.contains(&field), "{field:?} missing: {line}");
    }
    assert!(fields.ends_with(" end=done"), "{line}");
    let number = |key: &str| {
        fields
            .split(' ')
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (connect, duration) = (number("connect_ms="), number("duration_ms="));
    assert!(
        connect.is_some() && duration.is_some() && connect <= duration,
        "{line}"
    );

    let (port, _) = exchange("json");
    let line = ringlb
        .wait_log("\"frontend\":\"json\"", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no JSON access line; logs:\n{}", ringlb.logs()));
    let object = line.split("] ").nth(1).unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(object).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["client"], format!("127.0.0.1:{port}"), "{line}");
    assert_eq!(v["backend"], b.as_str(), "{line}");
    assert_eq!(v["bytes_up"], 5, "{line}");
    assert_eq!(v["bytes_down"], 5, "{line}");
    assert_eq!(v["end"], "done", "{line}");
    assert!(v["connect_ms"].as_u64().is_some() && v["duration_ms"].as_u64().is_some());

    // No backend: the client is reset, and the line says why, with no
    // backend and no connect time.
    let (port, echoed) = exchange("nobody");
    assert!(echoed.is_empty());
    let line = ringlb
        .wait_log("frontend=nobody", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no access line; logs:\n{}", ringlb.logs()));
    assert!(
        line.contains(&format!(
            "client=127.0.0.1:{port} frontend=nobody backend=- connect_ms=- "
        )),
        "{line}"
    );
    assert!(line.ends_with(" end=no-backend"), "{line}");

    assert_eq!(ringlb.count_logs("frontend=quiet"), 0, "{}", ringlb.logs());
    assert_eq!(ringlb.count_logs("ringlb::access"), 3, "{}", ringlb.logs());
}

#[test]
fn a_log_format_without_log_is_refused_with_its_line() {
    let dir = TempDir::new("format");
    let path = dir.path("ringlb.toml");
    std::fs::write(
        &path,
        "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:9\"]\n\
         log-format = \"json\"\n",
    )
    .expect("write config");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run ringlb");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ringlb.toml:4") && stderr.contains("add log = true"),
        "{stderr}"
    );
}
