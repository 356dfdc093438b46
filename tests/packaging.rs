//! ringlb as a packaged daemon: systemd's readiness protocol against a
//! notify socket of the test's own, the unit file through
//! `systemd-analyze`, the default config, the generated man page and
//! completions, and the Grafana dashboard against a real scrape.
//! The .deb itself is installed and removed by packaging/test-deb.sh.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A notify socket the test owns, as systemd's would be, removed on drop.
struct NotifySocket {
    socket: UnixDatagram,
    /// What NOTIFY_SOCKET is set to: a path, or `@name` for an abstract one.
    name: String,
    dir: Option<PathBuf>,
}

impl NotifySocket {
    fn path(tag: &str) -> NotifySocket {
        let dir = std::env::temp_dir().join(format!("ringlb-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            socket,
            name: path.to_string_lossy().into_owned(),
            dir: Some(dir),
        }
    }

    fn abstract_name(tag: &str) -> NotifySocket {
        let name = format!("ringlb-{tag}-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the abstract notify socket");
        NotifySocket {
            socket,
            name: format!("@{name}"),
            dir: None,
        }
    }

    /// The next message, or None after `timeout`.
    fn receive(&self, timeout: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// ringlb with NOTIFY_SOCKET set, not waiting for anything: the test
/// waits on the notify socket, as systemd does. Killed on drop.
struct Daemon(Child);

impl Daemon {
    fn start(notify: &str, args: &[&str]) -> Daemon {
        let child = Command::new(BIN)
            .args(args)
            .env("NOTIFY_SOCKET", notify)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringlb");
        Daemon(child)
    }

    fn signal(&self, signal: i32) {
        // SAFETY: plain libc call on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, signal) };
    }

    /// The exit code and everything it wrote to stderr, once it exited.
    fn wait(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        let code = loop {
            match self.0.try_wait() {
                Ok(Some(status)) => break status.code(),
                _ if Instant::now() > deadline => panic!("ringlb did not exit"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = self.0.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        (code, stderr)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The listen address in READY's status line ("serving default on ADDR").
fn served_addr(ready: &str) -> SocketAddr {
    ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=serving default on "))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listen address in {ready:?}"))
}

fn echo_through(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).expect("ringlb accepts once it said READY=1");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).expect("echo through ringlb");
    assert_eq!(&back, b"ping");
}

/// READY=1 comes once the port accepts and relays, STOPPING=1 on SIGTERM
/// and not before; the drain then ends with exit 0.
fn ready_then_stopping(notify: NotifySocket) {
    let backend = Backend::start(echo());
    let daemon = Daemon::start(
        &notify.name,
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &backend.addr_str(),
            "--stats",
            "127.0.0.1:0",
        ],
    );
    let ready = notify
        .receive(Duration::from_secs(20))
        .expect("READY=1 within 20 s");
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    // Nothing waited for a log line or a port: READY alone says it serves.
    echo_through(served_addr(&ready));
    let early = notify.receive(Duration::from_millis(300));
    assert_eq!(early, None, "nothing more before a stop is asked for");

    daemon.signal(libc::SIGTERM);
    let stopping = notify
        .receive(Duration::from_secs(20))
        .expect("STOPPING=1 after SIGTERM");
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping:?}");
    assert!(stopping.contains("SIGTERM"), "{stopping:?}");
    let (code, stderr) = daemon.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn notify_ready_and_stopping_on_a_path_socket() {
    ready_then_stopping(NotifySocket::path("notify"));
}

#[test]
fn notify_ready_and_stopping_on_an_abstract_socket() {
    ready_then_stopping(NotifySocket::abstract_name("notify-abstract"));
}

#[test]
fn a_failed_start_never_says_ready() {
    let notify = NotifySocket::path("notify-busy");
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_addr = busy.local_addr().unwrap().to_string();
    let daemon = Daemon::start(
        &notify.name,
        &["--listen", &busy_addr, "--backend", "127.0.0.1:9"],
    );
    let (code, stderr) = daemon.wait(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert_eq!(notify.receive(Duration::from_millis(200)), None);
}

#[test]
fn an_unreachable_notify_socket_is_logged_and_ringlb_serves() {
    let backend = Backend::start(echo());
    let gone = std::env::temp_dir().join(format!("ringlb-no-notify-{}", std::process::id()));
    let gone = gone.to_string_lossy().into_owned();
    let command = {
        let mut c = Command::new(BIN);
        c.args(["--listen", "127.0.0.1:0", "--backend", &backend.addr_str()])
            .env("NOTIFY_SOCKET", &gone);
        c
    };
    let ringlb = Ringlb::start_command(command);
    ringlb
        .wait_log("cannot notify the service manager", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no warning; logs:\n{}", ringlb.logs()));
    echo_through(ringlb.addr);
}

fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (install it: .ci/run does)"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The unit with this build's binary in place of /usr/bin/ringlb, which
/// systemd-analyze checks exists.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("packaging/ringlb.service"))
        .expect("packaging/ringlb.service");
    let path = dir.join("ringlb.service");
    std::fs::write(&path, unit.replace("/usr/bin/ringlb", BIN)).expect("write the unit");
    path
}

#[test]
fn the_unit_passes_systemd_analyze() {
    let dir = std::env::temp_dir().join(format!("ringlb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let unit = unit_for_this_build(&dir);
    let unit = unit.to_str().expect("utf-8 path");
    // verify exits 0 on unknown keys and only warns: any output is a fault.
    // The man page is checked once installed (packaging/test-deb.sh).
    let (ok, stdout, stderr) = run("systemd-analyze", &["verify", "--man=no", unit]);
    assert!(
        ok && stdout.is_empty() && stderr.is_empty(),
        "{stdout}{stderr}"
    );
    // Hardening, as systemd scores it: 1.7 ("OK") when this was written.
    let (ok, stdout, stderr) = run(
        "systemd-analyze",
        &["security", "--offline=yes", "--threshold=25", unit],
    );
    assert!(ok, "exposure above 2.5:\n{stdout}{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_unit_keeps_what_ringlb_needs() {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("packaging/ringlb.service"))
        .expect("packaging/ringlb.service");
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_string()
    };
    assert_eq!(value("Type"), "notify");
    assert_eq!(value("User"), "ringlb");
    assert_eq!(value("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(value("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    // systemd must not kill a drain: the default drain plus ringlb's own
    // 5 s stop grace, with margin.
    let stop = value("TimeoutStopSec");
    let stop: u64 = stop.trim_end_matches('s').parse().expect("seconds");
    let drain = ringlb::config::DEFAULT_DRAIN_TIMEOUT.as_secs();
    assert!(stop >= drain + 10, "TimeoutStopSec={stop}s, drain {drain}s");
    // io_uring must stay allowed: a filter may only deny groups that do
    // not hold it.
    let filter = value("SystemCallFilter");
    assert!(filter.starts_with('~'), "an allow list blocks io_uring");
    let families = value("RestrictAddressFamilies");
    for family in ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"] {
        assert!(families.split(' ').any(|f| f == family), "{family}");
    }
}

#[test]
fn the_default_config_passes_check() {
    let config = format!("{ROOT}/packaging/ringlb.toml");
    let (ok, stdout, stderr) = run(BIN, &["--config", &config, "--check"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stderr.is_empty(), "no warning expected: {stderr}");
    assert!(stdout.contains("OK (1 frontends: web)"), "{stdout}");
}

#[test]
fn man_page_and_completions_come_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("ringlb-generate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = dir.to_str().expect("utf-8 path");
    let (ok, _, stderr) = run(BIN, &["generate", "man", out]);
    assert!(ok, "{stderr}");
    let page = std::fs::read_to_string(dir.join("ringlb.1")).expect("ringlb.1");
    assert!(page.contains("\n.TH ringlb 1 "), "{page}");
    for needle in [
        "\\-\\-config",
        "\\-\\-drain\\-timeout",
        ".SH SIGNALS",
        ".SH FILES",
    ] {
        assert!(page.contains(needle), "{needle} missing");
    }
    for (shell, file) in [
        ("bash", "ringlb.bash"),
        ("zsh", "_ringlb"),
        ("fish", "ringlb.fish"),
    ] {
        let (ok, _, stderr) = run(BIN, &["generate", "completions", shell, out]);
        assert!(ok, "{shell}: {stderr}");
        let script = std::fs::read_to_string(dir.join(file)).expect(file);
        assert!(script.contains("drain-timeout"), "{shell}: no flag");
        assert!(
            !script.contains("generate"),
            "{shell}: hidden command offered"
        );
    }
    let (ok, _, stderr) = run(BIN, &["generate", "man", "/nonexistent/dir"]);
    assert!(!ok && stderr.contains("cannot generate"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every `ringlb_*` name in the dashboard's expressions and variables.
fn dashboard_metrics(value: &serde_json::Value, names: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => {
            for (i, _) in s.match_indices("ringlb_") {
                let name: String = s[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.push(name);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_metrics(v, names)),
        serde_json::Value::Object(map) => map
            .iter()
            .filter(|(k, _)| {
                matches!(
                    k.as_str(),
                    "expr" | "query" | "definition" | "panels" | "targets" | "templating" | "list"
                )
            })
            .for_each(|(_, v)| dashboard_metrics(v, names)),
        _ => {}
    }
}

#[test]
fn the_dashboard_shows_only_metrics_ringlb_exports() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("packaging/grafana-ringlb.json"))
        .expect("packaging/grafana-ringlb.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("well-formed JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let targets: usize = panels
        .iter()
        .filter(|p| p["type"] != "row")
        .map(|p| {
            let n = p["targets"].as_array().map_or(0, Vec::len);
            assert!(n > 0, "panel {} has no query", p["title"]);
            n
        })
        .sum();
    assert!(targets >= 20, "{targets} queries");
    let mut used = Vec::new();
    dashboard_metrics(&dashboard, &mut used);
    used.sort();
    used.dedup();

    let backend = Backend::start(echo());
    let ringlb = Ringlb::start(&["--backend", &backend.addr_str(), "--stats", "127.0.0.1:0"]);
    let (_, body) = ringlb.scrape("/metrics");
    let exported: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| !exported.contains(&m.as_str()))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{body}");
    // The operator's first questions: traffic, refusals, backend state, bytes.
    for needed in [
        "ringlb_frontend_connections_total",
        "ringlb_frontend_connections_active",
        "ringlb_frontend_maxconn_reached_total",
        "ringlb_connection_limit",
        "ringlb_frontend_local_errors_total",
        "ringlb_backend_up",
        "ringlb_backend_bytes_sent_total",
        "ringlb_backend_bytes_received_total",
        "ringlb_log_lines_dropped_total",
    ] {
        assert!(
            used.iter().any(|m| m == needed),
            "{needed} not on the dashboard"
        );
    }
}
