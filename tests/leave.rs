//! The graceful leave (issue 14): on SIGTERM or `ringlb ctl leave`, ringlb
//! reports not ready at once (HTTP /ready 503, `ringlb ctl ready` exit 1,
//! sd_notify STOPPING=1) and keeps accepting for `leave-delay`, so that
//! keepalived or a BGP speaker moves the address away before any port
//! closes; only then does it drain. Real sockets, the real binary.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// Long enough that a loaded machine finishes every check of the delay
/// well inside it; the tests end it early with a second signal.
const LONG: &str = "60s";
const WAIT: Duration = Duration::from_secs(20);

/// A path in the temp dir, removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(tag: &str) -> TempPath {
        let path = std::env::temp_dir().join(format!("ringlb-leave-{tag}-{}", std::process::id()));
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

/// An echo backend and ringlb in front of it with a stats server and an
/// admin socket; `extra` are more flags (the leave delay).
struct Setup {
    _backend: Backend,
    ringlb: Ringlb,
    socket: TempPath,
}

impl Setup {
    fn start(tag: &str, extra: &[&str]) -> Setup {
        Setup::start_with(tag, extra, None)
    }

    fn start_with(tag: &str, extra: &[&str], notify: Option<&str>) -> Setup {
        let backend = Backend::start(echo());
        let socket = TempPath::new(tag);
        let mut command = Command::new(BIN);
        command.args(["--listen", "127.0.0.1:0", "--backend", &backend.addr_str()]);
        command.args(["--workers", "1", "--stats", "127.0.0.1:0"]);
        command.args(["--admin-socket", socket.str()]);
        command.args(extra);
        if let Some(notify) = notify {
            command.env("NOTIFY_SOCKET", notify);
        }
        let ringlb = Ringlb::start_command(command);
        ringlb
            .wait_log("admin socket on", WAIT)
            .expect("admin socket served");
        Setup {
            _backend: backend,
            ringlb,
            socket,
        }
    }

    fn ctl(&self, request: &str) -> Output {
        Command::new(BIN)
            .args(["ctl", "--socket", self.socket.str(), request])
            .output()
            .expect("run ringlb ctl")
    }

    /// The /ready status line.
    fn ready(&self) -> String {
        self.ringlb.scrape("/ready").0
    }
}

/// A new connection through ringlb that carries a round trip.
fn echoes(ringlb: &Ringlb) -> bool {
    let Ok(mut s) = TcpStream::connect(ringlb.addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut back = [0u8; 2];
    s.write_all(b"hi").is_ok() && s.read_exact(&mut back).is_ok() && &back == b"hi"
}

/// An open connection through ringlb, checked with a round trip.
fn held(ringlb: &Ringlb) -> TcpStream {
    let mut s = ringlb.connect();
    s.write_all(b"a").expect("send");
    s.read_exact(&mut [0u8; 1]).expect("echo");
    s
}

fn still_works(s: &mut TcpStream) -> bool {
    let mut back = [0u8; 1];
    s.write_all(b"b").is_ok() && s.read_exact(&mut back).is_ok() && &back == b"b"
}

/// Ends the client's side and waits for ringlb's end of stream.
fn finish(mut s: TcpStream) {
    s.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(s.read(&mut [0u8; 1]).expect("end of stream"), 0);
}

/// Every check of the delay: not ready everywhere, still serving.
fn assert_leaving(setup: &Setup) {
    let ready = setup.ready();
    assert!(ready.contains(" 503 "), "/ready while leaving: {ready}");
    let out = setup.ctl("ready");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "ctl ready while leaving: {stderr}"
    );
    assert!(stderr.contains("leaving"), "{stderr}");
    for _ in 0..5 {
        assert!(
            echoes(&setup.ringlb),
            "a new connection during the leave delay was not served:\n{}",
            setup.ringlb.logs()
        );
    }
    assert_eq!(setup.ringlb.count_logs("draining:"), 0, "drained early");
}

/// After the drain began: no new connection is taken, the open one still
/// works until it ends, then ringlb exits 0.
fn assert_drains_then_exits(setup: &mut Setup, mut open: TcpStream) {
    let refused = eventually(WAIT, || TcpStream::connect(setup.ringlb.addr).is_err());
    assert!(refused, "still accepting after the drain began");
    assert!(
        still_works(&mut open),
        "the open connection broke in the drain"
    );
    finish(open);
    let status = setup.ringlb.wait_exit(WAIT).expect("exits after the drain");
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigterm_reports_not_ready_serves_through_the_delay_and_a_second_one_drains_now() {
    let notify = TempPath::new("notify");
    let events = UnixDatagram::bind(&notify.0).expect("bind the notify socket");
    events.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut setup = Setup::start_with("sigterm", &["--leave-delay", LONG], Some(notify.str()));
    let mut buf = [0u8; 4096];
    let n = events.recv(&mut buf).expect("READY=1");
    assert!(buf[..n].starts_with(b"READY=1"));
    assert!(setup.ready().contains(" 200 "));
    let open = held(&setup.ringlb);

    setup.ringlb.signal(libc::SIGTERM);
    let line = setup
        .ringlb
        .wait_log("SIGTERM: leaving: not ready, still serving for 60s", WAIT)
        .expect("the leave is logged");
    assert!(line.contains("then draining"), "{line}");
    let n = events.recv(&mut buf).expect("STOPPING=1 at the leave");
    let stopping = String::from_utf8_lossy(&buf[..n]);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
    assert!(stopping.contains("leaving"), "{stopping}");
    assert_leaving(&setup);
    // A reload now would only be undone by the drain.
    setup.ringlb.signal(libc::SIGHUP);
    setup
        .ringlb
        .wait_log("SIGHUP: leaving: the reload is ignored", WAIT)
        .expect("no reload while leaving");

    let asked = Instant::now();
    setup.ringlb.signal(libc::SIGTERM);
    setup
        .ringlb
        .wait_log("SIGTERM while leaving: draining now", WAIT)
        .expect("a second SIGTERM drains at once");
    // Far from the 60 s delay: the second signal cut it short.
    assert!(asked.elapsed() < Duration::from_secs(30));
    assert_drains_then_exits(&mut setup, open);
}

#[test]
fn the_drain_begins_by_itself_once_the_delay_is_over() {
    let mut setup = Setup::start("delay", &["--leave-delay", "1s"]);
    let open = held(&setup.ringlb);
    let signalled = Instant::now();
    setup.ringlb.signal(libc::SIGTERM);
    setup
        .ringlb
        .wait_log("SIGTERM: leaving", WAIT)
        .expect("the leave is logged");
    setup
        .ringlb
        .wait_log("leave delay over: draining", WAIT)
        .expect("the drain follows the delay");
    // Never before the delay (an upper bound would only measure the load).
    assert!(signalled.elapsed() >= Duration::from_secs(1));
    assert_drains_then_exits(&mut setup, open);
}

#[test]
fn ctl_leave_leaves_as_sigterm_does() {
    let mut setup = Setup::start("ctl", &["--leave-delay", LONG]);
    let open = held(&setup.ringlb);
    assert!(setup.ctl("ready").status.success());

    let out = setup.ctl("leave");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("leaving: not ready, still serving for 60s"),
        "{stdout}"
    );
    let line = setup
        .ringlb
        .wait_log("leaving: not ready", WAIT)
        .expect("the leave is logged");
    assert!(line.contains("admin socket: uid"), "who asked: {line}");
    assert_leaving(&setup);
    // Asked again: said so, and the delay does not restart.
    let again = setup.ctl("leave");
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already leaving"));
    assert_eq!(setup.ringlb.count_logs("leaving: not ready"), 1);

    setup.ringlb.signal(libc::SIGTERM);
    setup
        .ringlb
        .wait_log("SIGTERM while leaving: draining now", WAIT)
        .expect("SIGTERM during a ctl leave drains at once");
    let late = setup.ctl("leave");
    assert_eq!(late.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&late.stderr).contains("draining"));
    assert_drains_then_exits(&mut setup, open);
}

#[test]
fn ctl_leave_ends_in_a_drain_and_an_exit_by_itself() {
    let mut setup = Setup::start("ctl-short", &["--leave-delay", "500ms"]);
    let open = held(&setup.ringlb);
    assert!(setup.ctl("leave").status.success());
    setup
        .ringlb
        .wait_log("leave delay over: draining", WAIT)
        .expect("the drain follows the delay");
    assert_drains_then_exits(&mut setup, open);
}

#[test]
fn sigint_drains_at_once_without_the_delay() {
    let mut setup = Setup::start("sigint", &["--leave-delay", LONG]);
    let open = held(&setup.ringlb);
    setup.ringlb.signal(libc::SIGINT);
    setup
        .ringlb
        .wait_log("SIGINT: draining", WAIT)
        .expect("SIGINT drains");
    assert_eq!(setup.ringlb.count_logs("leaving"), 0);
    assert_drains_then_exits(&mut setup, open);
}

#[test]
fn a_leave_delay_of_zero_drains_on_the_first_sigterm() {
    let mut setup = Setup::start("zero", &["--leave-delay", "0s"]);
    let open = held(&setup.ringlb);
    setup.ringlb.signal(libc::SIGTERM);
    setup
        .ringlb
        .wait_log("SIGTERM: draining", WAIT)
        .expect("SIGTERM drains");
    assert_eq!(setup.ringlb.count_logs("leaving"), 0);
    assert_drains_then_exits(&mut setup, open);
}

/// The harness passes `--leave-delay 0` to every ringlb whose test does
/// not ask for a delay, so the other tests' stops stay as fast as before.
#[test]
fn the_harness_default_is_no_delay() {
    let backend = Backend::start(echo());
    let ringlb = Ringlb::start(&["--backend", &backend.addr_str(), "--workers", "1"]);
    ringlb.signal(libc::SIGTERM);
    ringlb
        .wait_log("SIGTERM: draining", WAIT)
        .expect("drains at once");
    assert_eq!(ringlb.count_logs("leaving"), 0);
}

fn config_file(tag: &str, global: &str, backend: &Backend) -> TempPath {
    let file = TempPath::new(tag);
    let text = format!(
        "workers = 1\n{global}\n[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        backend.addr
    );
    std::fs::write(&file.0, text).expect("write the config");
    file
}

/// The file's key counts, and without one ringlb leaves for 2 s.
#[test]
fn the_config_key_and_the_default() {
    let backend = Backend::start(echo());
    for (global, said) in [
        ("leave-delay = \"1500ms\"", "still serving for 1.5s"),
        // The comment tells the harness not to pass its 0.
        ("# no leave-delay: the default", "still serving for 2s"),
    ] {
        let file = config_file("key.toml", global, &backend);
        let mut ringlb = Ringlb::start_raw(&["--config", file.str()]);
        ringlb.signal(libc::SIGTERM);
        let line = ringlb.wait_log("leaving", WAIT);
        assert!(
            line.as_deref().is_some_and(|l| l.contains(said)),
            "{global}: {line:?}"
        );
        let status = ringlb.wait_exit(WAIT).expect("exits after the delay");
        assert!(status.success());
    }
}

#[test]
fn a_bad_leave_delay_is_refused_with_its_key() {
    let backend = Backend::start(echo());
    for value in ["\"0x\"", "\"-1s\"", "\"soon\""] {
        let file = config_file("bad.toml", &format!("leave-delay = {value}"), &backend);
        let out = Command::new(BIN)
            .args(["--config", file.str(), "--check"])
            .output()
            .expect("run ringlb --check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{value}: {stderr}");
        assert!(stderr.contains("leave-delay"), "{value}: {stderr}");
    }
    let out = Command::new(BIN)
        .args(["--leave-delay", "0x", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run ringlb");
    assert_eq!(out.status.code(), Some(2));
}
