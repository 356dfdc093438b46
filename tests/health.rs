//! The failover watcher against real backends that die, hang, come back
//! and flap.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;

const FAST_CHECKS: [&str; 8] = [
    "--check-interval",
    "200ms",
    "--check-timeout",
    "200ms",
    "--fall",
    "2",
    "--rise",
    "2",
];
const PING: [&str; 4] = ["--check-send", "PING\\r\\n", "--check-expect", "PONG"];

/// Sends a line on a new connection and returns the first answer.
fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"who?\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn args<'a>(backends: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = Vec::new();
    for b in backends {
        args.extend(["--backend", b.as_str()]);
    }
    args.extend_from_slice(extra);
    args
}

/// Backend `a` (its health switchable) and backend `b` (always healthy),
/// both answering PING, behind ringlb with fast send/expect checks.
struct Pair {
    healthy: Arc<AtomicBool>,
    backends: [String; 2],
    ringlb: Ringlb,
    _servers: [Backend; 2],
}

fn pair(extra: &[&str]) -> Pair {
    let healthy = Arc::new(AtomicBool::new(true));
    let a = Backend::start(pinger("a", Arc::clone(&healthy)));
    let b = Backend::start(pinger("b", Arc::new(AtomicBool::new(true))));
    let backends = [a.addr_str(), b.addr_str()];
    let mut all = FAST_CHECKS.to_vec();
    all.extend(PING);
    all.extend_from_slice(extra);
    let ringlb = Ringlb::start(&args(&backends, &all));
    Pair {
        healthy,
        backends,
        ringlb,
        _servers: [a, b],
    }
}

#[test]
fn a_killed_backend_is_marked_down_in_time_and_avoided() {
    let mut a = Backend::start_tracked(named("a"));
    let b = Backend::start(named("b"));
    let backends = [a.addr_str(), b.addr_str()];
    let ringlb = Ringlb::start(&args(&backends, &FAST_CHECKS));
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    a.kill();
    let line = ringlb.wait_log(
        &format!("backend {} is DOWN", backends[0]),
        Duration::from_secs(3),
    );
    let detected = killed.elapsed();
    assert!(
        line.is_some_and(|l| l.contains("refused")),
        "{}",
        ringlb.logs()
    );
    // fall x interval + timeout, plus scheduling slack.
    assert!(
        detected < Duration::from_millis(600 + 300),
        "marked down after {detected:?}"
    );
    for _ in 0..40 {
        assert_eq!(
            which(ringlb.addr).expect("no client failure after detection"),
            "b"
        );
    }
}

#[test]
fn a_hung_backend_is_caught_by_send_expect_and_recovers_after_rise() {
    let pair = pair(&[]);
    let (healthy, backends, ringlb) = (&pair.healthy, &pair.backends, &pair.ringlb);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ringlb.count_logs("is DOWN"),
        0,
        "healthy backends pass: {}",
        ringlb.logs()
    );

    let hung = Instant::now();
    healthy.store(false, SeqCst);
    let down = ringlb.wait_log(
        &format!("backend {} is DOWN", backends[0]),
        Duration::from_secs(3),
    );
    assert!(
        down.is_some_and(|l| l.contains("no reply")),
        "{}",
        ringlb.logs()
    );
    assert!(
        hung.elapsed() < Duration::from_millis(600 + 400),
        "{:?}",
        hung.elapsed()
    );
    for _ in 0..10 {
        assert_eq!(ask(ringlb.addr).unwrap(), "b");
    }

    let back = Instant::now();
    healthy.store(true, SeqCst);
    assert!(
        ringlb
            .wait_log(
                &format!("backend {} is UP", backends[0]),
                Duration::from_secs(3)
            )
            .is_some()
    );
    // rise 2 at 200 ms: at least one interval after the first good check.
    assert!(
        back.elapsed() >= Duration::from_millis(150),
        "{:?}",
        back.elapsed()
    );
    let answers: Vec<String> = (0..10).map(|_| ask(ringlb.addr).unwrap()).collect();
    assert_eq!(
        answers.iter().filter(|a| *a == "a").count(),
        5,
        "{answers:?}"
    );
}

/// A backend in its own process that answers PING with PONG, so it can be
/// frozen with SIGSTOP: its kernel still completes handshakes (design.md,
/// fact 7), only a check that waits for a reply sees it hang.
/// Kills the child even when an assertion fails first.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SAFETY: plain libc call on our own child's pid; a stopped child
        // must be continued to die.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGCONT) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python_pinger() -> (Reaped, SocketAddr) {
    let script = r#"
import socket, threading, sys
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(64)
print(l.getsockname()[1], flush=True)
def serve(c):
    while True:
        d = c.recv(512)
        if not d: return
        c.sendall(b"PONG\r\n" if d.startswith(b"PING") else b"py")
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the stoppable backend");
    let mut port = String::new();
    let mut out = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        port.push(byte[0] as char);
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], port.trim().parse().expect("port")));
    (Reaped(child), addr)
}

#[test]
fn a_sigstopped_backend_is_marked_down_and_up_again_after_sigcont() {
    let (child, addr) = python_pinger();
    let b = Backend::start(pinger("b", Arc::new(AtomicBool::new(true))));
    let backends = [addr.to_string(), b.addr_str()];
    let mut extra = FAST_CHECKS.to_vec();
    extra.extend(PING);
    extra.extend(["--mode", "active-passive"]);
    let ringlb = Ringlb::start(&args(&backends, &extra));
    assert!(eventually(Duration::from_secs(2), || ask(ringlb.addr)
        .is_ok_and(|a| a == "py")));
    let pid = child.0.id() as i32;
    // SAFETY: plain libc call on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let down = ringlb.wait_log(&format!("backend {addr} is DOWN"), Duration::from_secs(3));
    assert!(
        down.is_some_and(|l| l.contains("no reply")),
        "{}",
        ringlb.logs()
    );
    assert_eq!(
        ask(ringlb.addr).unwrap(),
        "b",
        "the passive backend took over"
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        ringlb
            .wait_log(&format!("backend {addr} is UP"), Duration::from_secs(3))
            .is_some()
    );
    assert_eq!(
        ask(ringlb.addr).unwrap(),
        "py",
        "fail-back to the active backend"
    );
}

fn failover_and_return(failback: bool) -> Vec<String> {
    let mut extra = vec!["--mode", "active-passive"];
    if !failback {
        extra.push("--no-failback");
    }
    let pair = pair(&extra);
    let (healthy, ringlb) = (&pair.healthy, &pair.ringlb);
    let mut seen = vec![ask(ringlb.addr).unwrap()];
    healthy.store(false, SeqCst);
    assert!(ringlb.wait_log("is DOWN", Duration::from_secs(3)).is_some());
    seen.push(ask(ringlb.addr).unwrap());
    healthy.store(true, SeqCst);
    assert!(ringlb.wait_log("is UP", Duration::from_secs(3)).is_some());
    seen.push(ask(ringlb.addr).unwrap());
    seen
}

#[test]
fn fail_back_returns_traffic_to_the_active_backend() {
    assert_eq!(failover_and_return(true), ["a", "b", "a"]);
}

#[test]
fn without_fail_back_the_promoted_backend_keeps_traffic() {
    assert_eq!(failover_and_return(false), ["a", "b", "b"]);
}

#[test]
fn a_flapping_backend_keeps_a_consistent_state() {
    let healthy = Arc::new(AtomicBool::new(true));
    let a = Backend::start(pinger("a", Arc::clone(&healthy)));
    let backends = [a.addr_str()];
    let mut extra = vec![
        "--check-interval",
        "100ms",
        "--check-timeout",
        "100ms",
        "--fall",
        "2",
        "--rise",
        "2",
    ];
    extra.extend(PING);
    let ringlb = Ringlb::start(&args(&backends, &extra));
    for flip in 0..6 {
        healthy.store(flip % 2 == 1, SeqCst);
        std::thread::sleep(Duration::from_secs(1));
    }
    // Ends healthy: it must be up and serving.
    assert!(
        eventually(Duration::from_secs(2), || ask(ringlb.addr)
            .is_ok_and(|a| a == "a")),
        "{}",
        ringlb.logs()
    );
    let transitions: Vec<bool> = ringlb
        .logs()
        .lines()
        .filter(|l| l.contains(&format!("backend {}", backends[0])))
        .filter_map(|l| {
            if l.contains("is DOWN") {
                Some(false)
            } else if l.contains("is UP") {
                Some(true)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        transitions.len(),
        6,
        "three downs and three ups: {transitions:?}\n{}",
        ringlb.logs()
    );
    for pair in transitions.windows(2) {
        assert_ne!(pair[0], pair[1], "transitions alternate: {transitions:?}");
    }
}

fn established_connection_after_down(on_down: &str) -> std::io::Result<usize> {
    let healthy = Arc::new(AtomicBool::new(true));
    let a = Backend::start(pinger("a", Arc::clone(&healthy)));
    let backends = [a.addr_str()];
    let mut extra = FAST_CHECKS.to_vec();
    extra.extend(PING);
    extra.extend(["--on-down", on_down]);
    let ringlb = Ringlb::start(&args(&backends, &extra));
    let mut s = TcpStream::connect(ringlb.addr)?;
    s.write_all(b"hi")?;
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf)?, 1, "answered by a");
    healthy.store(false, SeqCst);
    assert!(ringlb.wait_log("is DOWN", Duration::from_secs(3)).is_some());
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.read(&mut buf)
}

#[test]
fn on_down_shutdown_closes_established_connections() {
    let outcome = established_connection_after_down("shutdown");
    assert!(
        matches!(&outcome, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "closed with a reset: {outcome:?}"
    );
}

#[test]
fn on_down_keep_leaves_established_connections_open() {
    let outcome = established_connection_after_down("keep");
    assert!(
        matches!(&outcome, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
        "still open (the read timed out): {outcome:?}"
    );
}
