//! The admin Unix socket (`--admin-socket`) and `ringlb ctl`: each command
//! with its effect on real traffic, the socket's permissions and
//! lifecycle, and errors as one line with exit 1.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A path in the temp dir for a socket or file, removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(tag: &str) -> TempPath {
        let path = std::env::temp_dir().join(format!("ringlb-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        TempPath(path)
    }

    fn str(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes its name and a newline, then echoes until the client ends: a
/// connection shows where it landed and keeps carrying bytes after.
fn tagged(name: &'static str) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        if stream.write_all(format!("{name}\n").as_bytes()).is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stream.shutdown(Shutdown::Write);
    })
}

/// A connection through ringlb and the name of the backend it reached.
fn open(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).expect("connect to ringlb");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while !name.ends_with(b"\n") {
        match s.read(&mut byte) {
            Ok(1) => name.push(byte[0]),
            other => panic!("no backend name: {other:?} after {name:?}"),
        }
    }
    let name = String::from_utf8_lossy(&name).trim().to_string();
    (s, name)
}

/// A connection that reached backend `want` (round robin: a few tries).
fn open_on(addr: SocketAddr, want: &str) -> TcpStream {
    for _ in 0..20 {
        let (s, name) = open(addr);
        if name == want {
            return s;
        }
    }
    panic!("no connection reached {want}");
}

/// The connection still carries bytes both ways.
fn still_echoes(s: &mut TcpStream) -> bool {
    let sent = b"still here";
    if s.write_all(sent).is_err() {
        return false;
    }
    let mut got = [0u8; 10];
    s.read_exact(&mut got).is_ok() && &got == sent
}

fn ctl(socket: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["ctl", "--socket", socket])
        .args(args)
        .output()
        .expect("run ringlb ctl")
}

/// Runs a ctl command that must succeed; its stdout.
fn ctl_ok(socket: &str, args: &[&str]) -> String {
    let out = ctl(socket, args);
    assert!(
        out.status.success(),
        "ringlb ctl {args:?}: {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a ctl command that must fail with `code` and one line on stderr;
/// that line.
fn ctl_err(socket: &str, args: &[&str], code: i32) -> String {
    let out = ctl(socket, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "ringlb ctl {args:?}: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line, got: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout for an error");
    stderr.trim().to_string()
}

/// ringlb with two tagged backends a and b, and an admin socket.
struct Setup {
    ringlb: Ringlb,
    socket: TempPath,
    a: Backend,
    b: Backend,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let a = Backend::start(tagged("a"));
        let b = Backend::start(tagged("b"));
        let socket = TempPath::new(tag);
        let ringlb = Ringlb::start(&[
            "--backend",
            &a.addr_str(),
            "--backend",
            &b.addr_str(),
            "--admin-socket",
            socket.str(),
            "--check-interval",
            "200ms",
        ]);
        wait_socket(&ringlb, &socket.0);
        Setup {
            ringlb,
            socket,
            a,
            b,
        }
    }

    fn target(&self, backend: &Backend) -> String {
        format!("default/{}", backend.addr)
    }

    /// The names reached by `n` new connections.
    fn reached(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| open(self.ringlb.addr).1).collect()
    }
}

fn wait_socket(ringlb: &Ringlb, path: &Path) {
    assert!(
        ringlb
            .wait_log("admin socket on", Duration::from_secs(10))
            .is_some()
            && path.exists(),
        "no admin socket; logs:\n{}",
        ringlb.logs()
    );
}

#[test]
fn the_socket_is_private_replaces_a_stale_one_and_is_removed_at_exit() {
    let socket = TempPath::new("private");
    // A socket file left by a ringlb that died: nothing listens on it.
    drop(std::os::unix::net::UnixListener::bind(&socket.0).expect("stale socket"));
    let backend = Backend::start(tagged("a"));
    let mut ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--admin-socket",
        socket.str(),
    ]);
    wait_socket(&ringlb, &socket.0);
    let meta = std::fs::symlink_metadata(&socket.0).expect("socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // SAFETY: plain libc call with no arguments.
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    assert!(ctl_ok(socket.str(), &["show"]).contains("frontend default"));
    ringlb.signal(libc::SIGTERM);
    assert!(ringlb.wait_exit(Duration::from_secs(20)).is_some());
    assert!(!socket.0.exists(), "socket file left behind at exit");
}

#[test]
fn a_second_ringlb_refuses_a_live_socket() {
    let s = Setup::new("live");
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--backend", &s.a.addr_str()])
        .args(["--admin-socket", s.socket.str()])
        .output()
        .expect("run a second ringlb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another ringlb is serving on it"),
        "{stderr}"
    );
    // Refused before it listened: it never took a client of its own.
    assert!(!stderr.contains("listening on"), "{stderr}");
    // The first one still owns its socket and answers on it.
    assert!(ctl_ok(s.socket.str(), &["show"]).contains("frontend default"));
}

#[test]
fn drain_stops_new_connections_and_keeps_established_ones() {
    let s = Setup::new("drain");
    let mut established = open_on(s.ringlb.addr, "a");
    let out = ctl_ok(s.socket.str(), &["drain", &s.target(&s.a)]);
    assert!(out.contains("ready -> drain"), "{out}");
    assert!(
        s.reached(8).iter().all(|n| n == "b"),
        "a drained backend got new connections"
    );
    assert!(
        still_echoes(&mut established),
        "drain cut an established one"
    );
    let show = ctl_ok(s.socket.str(), &["show", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&show).expect("show --json is JSON");
    let backends = &json["frontends"][0]["backends"];
    assert_eq!(backends[0]["admin"], "drain");
    assert_eq!(backends[0]["active"], 1);
    assert_eq!(backends[1]["admin"], "ready");
}

#[test]
fn disable_kill_resets_established_connections_and_enable_brings_traffic_back() {
    let s = Setup::new("disable");
    let mut established = open_on(s.ringlb.addr, "a");
    let out = ctl_ok(s.socket.str(), &["disable", &s.target(&s.a), "--kill"]);
    assert!(out.contains("ready -> maint"), "{out}");
    // A reset, never a clean end: the client must not take it for the end.
    let mut rest = Vec::new();
    let ended = established.read_to_end(&mut rest);
    assert_eq!(
        ended.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "disable --kill must reset its connections"
    );
    assert!(s.reached(8).iter().all(|n| n == "b"));
    assert!(ctl_ok(s.socket.str(), &["show"]).contains("maint"));
    let out = ctl_ok(s.socket.str(), &["enable", &s.target(&s.a)]);
    assert!(out.contains("maint -> ready"), "{out}");
    assert!(
        eventually(Duration::from_secs(10), || s
            .reached(4)
            .contains(&"a".into())),
        "traffic did not return to an enabled backend"
    );
}

#[test]
fn disable_without_kill_lets_established_connections_finish() {
    let s = Setup::new("maint");
    let mut established = open_on(s.ringlb.addr, "a");
    ctl_ok(s.socket.str(), &["disable", &s.target(&s.a)]);
    assert!(s.reached(6).iter().all(|n| n == "b"));
    assert!(still_echoes(&mut established));
}

#[test]
fn each_change_is_logged_with_the_peers_uid_and_pid() {
    let s = Setup::new("audit");
    let child = Command::new(BIN)
        .args(["ctl", "--socket", s.socket.str(), "drain", &s.target(&s.b)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run ringlb ctl");
    let pid = child.id();
    let out = child.wait_with_output().expect("ctl ends");
    assert!(out.status.success());
    // SAFETY: plain libc call with no arguments.
    let uid = unsafe { libc::geteuid() };
    let expected = format!("uid {uid} pid {pid}: default/{}: ready -> drain", s.b.addr);
    assert!(
        s.ringlb
            .wait_log(&expected, Duration::from_secs(10))
            .is_some(),
        "no '{expected}' in logs:\n{}",
        s.ringlb.logs()
    );
}

#[test]
fn show_lists_health_with_its_reason_admin_state_and_counters() {
    let a = Backend::start(tagged("a"));
    let dead = refused_addr();
    let socket = TempPath::new("show");
    let ringlb = Ringlb::start(&[
        "--backend",
        &a.addr_str(),
        "--backend",
        &dead.to_string(),
        "--admin-socket",
        socket.str(),
        "--check-interval",
        "100ms",
    ]);
    wait_socket(&ringlb, &socket.0);
    assert!(
        ringlb
            .wait_log(&format!("backend {dead} is DOWN"), Duration::from_secs(20))
            .is_some(),
        "{}",
        ringlb.logs()
    );
    let (held, _) = open(ringlb.addr);
    let table = ctl_ok(socket.str(), &["show"]);
    let header = table.lines().nth(1).unwrap_or_default();
    for column in [
        "BACKEND",
        "HEALTH",
        "ADMIN",
        "WEIGHT",
        "ACTIVE",
        "TOTAL",
        "CONN-FAILS",
        "CHECK-FAILS",
        "LAST-CHECK",
        "REASON",
    ] {
        assert!(header.contains(column), "no {column} in: {header}");
    }
    let row = |addr: String| {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(&addr))
            .unwrap_or_else(|| panic!("no row for {addr} in:\n{table}"))
            .to_string()
    };
    let dead_row = row(dead.to_string());
    assert!(dead_row.contains(" down "), "{dead_row}");
    assert!(dead_row.contains("failed checks in a row"), "{dead_row}");
    let up_row = row(a.addr_str());
    assert!(
        up_row.contains(" up ") && up_row.contains(" ready "),
        "{up_row}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ctl_ok(socket.str(), &["show", "--json"])).expect("JSON");
    let f = &json["frontends"][0];
    assert_eq!(f["name"], "default");
    assert_eq!(
        f["listen"],
        ringlb.addr.to_string(),
        "the bound address, not port 0"
    );
    assert_eq!(f["mode"], "active-active");
    assert_eq!(f["active"], 1);
    let up = &f["backends"][0];
    assert_eq!(
        (up["health"].as_str(), up["weight"].as_u64()),
        (Some("up"), Some(1))
    );
    assert_eq!(
        (up["active"].as_u64(), up["connections"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(up["last_check"]["ok"], true);
    let down = &f["backends"][1];
    assert_eq!(down["health"], "down");
    assert!(down["checks_failed"].as_u64() >= Some(1));
    assert_eq!(down["last_check"]["ok"], false);
    assert!(down["changed_at"].as_f64().is_some());
    held.shutdown(Shutdown::Both).ok();
}

#[test]
fn errors_are_one_line_with_exit_1_and_usage_errors_exit_2() {
    let s = Setup::new("errors");
    let sock = s.socket.str();
    let line = ctl_err(sock, &["drain", "nosuch/x"], 1);
    assert!(line.contains("no frontend 'nosuch'"), "{line}");
    let line = ctl_err(sock, &["enable", "default/10.9.9.9:1"], 1);
    assert!(line.contains("no backend '10.9.9.9:1'"), "{line}");
    let line = ctl_err(sock, &["disable", "default"], 1);
    assert!(line.contains("FRONTEND/BACKEND"), "{line}");
    let line = ctl_err(sock, &["reload"], 1);
    assert!(line.contains("no config file to reload"), "{line}");
    let missing = TempPath::new("missing");
    let line = ctl_err(missing.str(), &["show"], 1);
    assert!(line.contains("no admin socket at"), "{line}");
    ctl_err(sock, &["frobnicate"], 2);
    ctl_err(sock, &["drain"], 2);
    // Nothing changed on the way.
    assert!(s.reached(4).contains(&"a".to_string()));
}

#[test]
fn the_socket_refuses_other_users() {
    let s = Setup::new("perm");
    // SAFETY: plain libc call with no arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run ringlb ctl as another user");
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["ctl", "--socket", s.socket.str(), "disable"])
        .arg(s.target(&s.a))
        .output()
        .expect("run setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        s.reached(4).contains(&"a".to_string()),
        "the change went through"
    );
}

/// A `[[frontend]]` named web with these backends.
fn web(listen: &str, backends: &[String]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[[frontend]]\nname = \"web\"\nlisten = \"{listen}\"\ncheck-interval = \"200ms\"\n\
         backends = [{}]\n",
        list.join(", ")
    )
}

#[test]
fn admin_state_survives_a_reload_and_ctl_reload_reports_the_outcome() {
    let (a, b, c) = (
        Backend::start(tagged("a")),
        Backend::start(tagged("b")),
        Backend::start(tagged("c")),
    );
    let socket = TempPath::new("reload");
    let file = TempPath::new("reload.toml");
    let config = |backends: &[&Backend], listen: &str| {
        let addrs: Vec<String> = backends.iter().map(|b| b.addr_str()).collect();
        format!(
            "admin-socket = \"{}\"\n{}",
            socket.str(),
            web(listen, &addrs)
        )
    };
    std::fs::write(&file.0, config(&[&a, &b], "127.0.0.1:0")).expect("write config");
    let ringlb = Ringlb::start_raw(&["--config", file.str()]);
    wait_socket(&ringlb, &socket.0);
    // Port 0 as written keeps the port ringlb picked, reload after reload.
    let listen = "127.0.0.1:0";
    let a_target = format!("web/{}", a.addr);
    ctl_ok(socket.str(), &["disable", &a_target]);
    std::fs::write(&file.0, config(&[&a, &b, &c], listen)).expect("write config");
    let out = ctl_ok(socket.str(), &["reload"]);
    assert!(
        out.contains("applied") && out.contains("backends added"),
        "{out}"
    );
    let reached: Vec<String> = (0..9).map(|_| open(ringlb.addr).1).collect();
    assert!(!reached.contains(&"a".to_string()), "{reached:?}");
    assert!(reached.contains(&"c".to_string()), "{reached:?}");
    let json: serde_json::Value =
        serde_json::from_str(&ctl_ok(socket.str(), &["show", "--json"])).expect("JSON");
    assert_eq!(json["frontends"][0]["backends"][0]["admin"], "maint");
    // A bad file: one line, exit 1, nothing changes.
    std::fs::write(&file.0, "[[frontend]]\nlisten = \"nonsense\"\n").expect("write config");
    let line = ctl_err(socket.str(), &["reload"], 1);
    assert!(line.contains("reload failed"), "{line}");
    let reached: Vec<String> = (0..6).map(|_| open(ringlb.addr).1).collect();
    assert!(reached.iter().all(|n| n == "b" || n == "c"), "{reached:?}");
}

#[test]
fn a_backend_in_maintenance_is_not_checked_until_enabled() {
    let mut s = Setup::new("checks");
    ctl_ok(s.socket.str(), &["disable", &s.target(&s.a)]);
    // Worked on: it stops answering, and nobody is told it is down.
    s.a.kill();
    let before = ctl_json(&s.socket)["frontends"][0]["backends"][0]["checks_failed"].clone();
    // Fall 3: while b's checks run five rounds, a's would have marked it
    // down. Counted on b's checks, not the clock, so a loaded machine
    // cannot make it pass by checking less.
    let mut rounds = std::collections::HashSet::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            let b = &ctl_json(&s.socket)["frontends"][0]["backends"][1];
            rounds.insert(b["last_check"]["at"].to_string());
            rounds.len() > 5
        }),
        "b's checks did not run"
    );
    let down = format!("backend {} is DOWN", s.a.addr);
    assert_eq!(
        s.ringlb.count_logs(&down),
        0,
        "a backend in maintenance was checked and marked down:\n{}",
        s.ringlb.logs()
    );
    let after = ctl_json(&s.socket)["frontends"][0]["backends"][0].clone();
    assert_eq!(
        after["checks_failed"], before,
        "checks counted in maintenance"
    );
    assert_eq!(
        (after["health"].as_str(), after["state"].as_str()),
        (Some("up"), Some("maint"))
    );
    // Back to ready: checks resume and see what is true now.
    ctl_ok(s.socket.str(), &["enable", &s.target(&s.a)]);
    assert!(
        s.ringlb.wait_log(&down, Duration::from_secs(20)).is_some(),
        "checks did not resume after enable:\n{}",
        s.ringlb.logs()
    );
    assert!(s.reached(4).iter().all(|n| n == "b"));
}

fn ctl_json(socket: &TempPath) -> serde_json::Value {
    serde_json::from_str(&ctl_ok(socket.str(), &["show", "--json"])).expect("show --json is JSON")
}

#[test]
fn while_draining_show_still_answers_and_a_reload_is_refused() {
    let a = Backend::start(tagged("a"));
    let socket = TempPath::new("draining");
    let file = TempPath::new("draining.toml");
    let text = format!(
        "admin-socket = \"{}\"\n{}",
        socket.str(),
        web("127.0.0.1:0", &[a.addr_str()])
    );
    std::fs::write(&file.0, text).expect("write config");
    let ringlb = Ringlb::start_raw(&["--config", file.str()]);
    wait_socket(&ringlb, &socket.0);
    // An open connection keeps ringlb draining instead of exiting.
    let (mut held, _) = open(ringlb.addr);
    // `ctl ready`, the exit-code form of /ready (issue 14): 0, then 1.
    assert!(ctl_ok(socket.str(), &["ready"]).contains("ready"));
    ringlb.signal(libc::SIGTERM);
    assert!(
        ringlb
            .wait_log("SIGTERM: draining", Duration::from_secs(10))
            .is_some()
    );
    let line = ctl_err(socket.str(), &["ready"], 1);
    assert!(line.contains("not ready"), "{line}");
    let line = ctl_err(socket.str(), &["reload"], 1);
    assert!(line.contains("draining"), "{line}");
    assert!(ctl_ok(socket.str(), &["show"]).contains("frontend web"));
    assert!(still_echoes(&mut held));
}

#[test]
fn an_empty_admin_socket_key_is_refused_with_its_line() {
    let file = TempPath::new("empty.toml");
    let text = format!(
        "admin-socket = \"\"\n{}",
        web("127.0.0.1:0", &["127.0.0.1:1".into()])
    );
    std::fs::write(&file.0, text).expect("write config");
    let out = Command::new(BIN)
        .args(["--config", file.str(), "--check"])
        .output()
        .expect("run ringlb --check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(":1: admin-socket: give a path"), "{stderr}");
}

#[test]
fn idle_clients_are_bounded_and_cut_at_their_deadline() {
    let s = Setup::new("idle");
    // Eight clients that connect and never send: the most served at once.
    let idle: Vec<std::os::unix::net::UnixStream> = (0..8)
        .map(|_| std::os::unix::net::UnixStream::connect(&s.socket.0).expect("connect"))
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || {
            let out = ctl(s.socket.str(), &["show"]);
            String::from_utf8_lossy(&out.stderr).contains("busy")
        }),
        "a ninth client was not told the socket is busy"
    );
    // Each idle one is told why and cut after the request deadline.
    for mut client in idle {
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut answer = String::new();
        client
            .read_to_string(&mut answer)
            .expect("an answer, then the end");
        assert!(
            answer.starts_with("error: no request line within"),
            "{answer}"
        );
    }
    assert!(ctl_ok(s.socket.str(), &["show"]).contains("frontend default"));
}
