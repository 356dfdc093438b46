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

// ---- One scheduler that tells the truth (issue 9, points 5, 6, 7). ----

/// A uid no other test run uses, for runs under RLIMIT_NPROC (which root
/// ignores and which counts every thread of the user, machine-wide).
fn scratch_uid() -> String {
    (40_000 + std::process::id() % 20_000).to_string()
}

/// Runs nothing but RLIMIT_NPROC-limited tests at a time: they share
/// `scratch_uid`'s thread count.
static AS_USER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `prlimit --nproc=N setpriv ... ringlb ARGS`: ringlb as an unprivileged
/// user that may have at most `nproc` threads.
fn limited(nproc: usize, args: &[&str]) -> Command {
    let uid = scratch_uid();
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--nproc={nproc}"))
        .args([
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
        ])
        .arg(BIN)
        .args(args);
    command
}

/// Writes a config file readable by any user; removed on drop.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(tag: &str, text: &str) -> ConfigFile {
        let path =
            std::env::temp_dir().join(format!("ringlb-health-{tag}-{}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write the config file");
        ConfigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `n` loopback ports free right now (bound, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn frontend(name: &str, listen: &str, backends: &[String], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[[frontend]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

fn backend_up(ringlb: &Ringlb, frontend: &str, backend: &str) -> Option<u64> {
    ringlb.metric(&format!(
        "ringlb_backend_up{{frontend=\"{frontend}\",backend=\"{backend}\"}}"
    ))
}

#[test]
fn isolated_live_refusals_do_not_mark_a_healthy_backend_down() {
    let ns = Netns::new("nth");
    ns.run(|| {
        let a = Backend::start(named("a"));
        let b = Backend::start(named("b"));
        let port = a.addr.port().to_string();
        // One SYN in 25 to `a` is refused with a reset.
        ns.iptables(&[
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &port,
            "--syn",
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            "25",
            "--packet",
            "0",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]);
        let backends = [a.addr_str(), b.addr_str()];
        // Checks are rare here: live traffic alone must not condemn `a`.
        let ringlb = Ringlb::start(&args(
            &backends,
            &[
                "--check-interval",
                "5s",
                "--check-timeout",
                "1s",
                "--fall",
                "3",
                "--stats",
                "127.0.0.1:0",
            ],
        ));
        let mut failed = Vec::new();
        for i in 0..300 {
            if let Err(e) = which(ringlb.addr) {
                failed.push((i, e.to_string()));
            }
        }
        let refused = ns.matched("REJECT");
        assert_eq!(
            ringlb.count_logs("is DOWN"),
            0,
            "{refused} isolated refusals marked a healthy backend down:\n{}",
            ringlb.logs()
        );
        assert!(refused >= 4, "the rule refused {refused} connects");
        assert!(
            failed.is_empty(),
            "refused connects are retried on b: {failed:?}"
        );
        assert_eq!(backend_up(&ringlb, "default", &backends[0]), Some(1));
        assert!(
            a.accepted.load(SeqCst) >= 100,
            "a kept its share of the traffic"
        );
    });
}

#[test]
fn a_backend_that_refuses_every_connect_is_marked_down_by_traffic_at_once() {
    let dead = refused_addr().to_string();
    let b = Backend::start(named("b"));
    let backends = [dead.clone(), b.addr_str()];
    // No check will have failed `fall` times: traffic alone marks it down.
    let ringlb = Ringlb::start(&args(
        &backends,
        &["--check-interval", "10s", "--fall", "3"],
    ));
    for _ in 0..50 {
        assert_eq!(which(ringlb.addr).expect("retried on b"), "b");
        if ringlb.count_logs("is DOWN") > 0 {
            break;
        }
    }
    let line = ringlb.wait_log(&format!("backend {dead} is DOWN"), Duration::from_secs(2));
    assert!(
        line.as_deref().is_some_and(|l| l
            .contains("3 connect failures in a row on live traffic (last: connection refused)")),
        "{}",
        ringlb.logs()
    );
}

#[test]
fn thousands_of_backends_cost_one_health_thread() {
    // 200 frontends x 50 backends: 10,000 backend entries, 50 targets.
    // Held together so that no backend is one of the listen ports.
    let mut listen = free_ports(250);
    let dead: Vec<String> = listen
        .split_off(200)
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let mut text = String::from("workers = 1\n");
    for (i, port) in listen.iter().enumerate() {
        text += &frontend(
            &format!("f{i}"),
            &format!("127.0.0.1:{port}"),
            &dead,
            "check-interval = \"300ms\"\nfall = 2",
        );
    }
    let config = ConfigFile::new("threads", &text);
    let ringlb = Ringlb::start_raw(&["--config", config.path()]);
    let all_down = ringlb.wait_log_count("is DOWN", 50, Duration::from_secs(20));
    assert!(all_down.is_some(), "{}", ringlb.logs());
    let threads = ringlb.threads().expect("thread count");
    // main, one worker, ringlb-health, plus room for a logger or admin.
    assert!(threads <= 1 + 5, "{threads} threads for 10,000 backends");
    // One state per target: each went down once, named with its frontends.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ringlb.count_logs("is DOWN"), 50);
    assert!(
        all_down.is_some_and(|l| l.contains("(frontends f0, f1, f2 and 197 more)")),
        "{}",
        ringlb
            .logs()
            .lines()
            .take(300)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn blackholed_primaries_are_all_marked_down_in_time_under_a_thread_limit() {
    let _one_at_a_time = AS_USER.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new("hole");
    ns.iptables(&[
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "20000:20049",
        "-j",
        "DROP",
    ]);
    ns.run(|| {
        let backup = Backend::start(named("b"));
        let mut text = String::from("workers = 1\n");
        for i in 0..50 {
            let primary = format!("127.0.0.1:{}", 20000 + i);
            text += &frontend(
                &format!("db{i}"),
                &format!("127.0.0.1:{}", 30000 + i),
                &[primary, backup.addr_str()],
                "mode = \"active-passive\"\ncheck-interval = \"500ms\"\ncheck-timeout = \"500ms\"\nfall = 2",
            );
        }
        let config = ConfigFile::new("hole", &text);
        // A few threads at most: a thread per backend cannot start here.
        let mut ringlb = Ringlb::spawn(limited(8, &["--config", config.path()]));
        ringlb.wait_listening(Duration::from_secs(10)).unwrap();
        let started = Instant::now();
        // First check within min(interval, 1 s), fall x interval + timeout,
        // plus a generous margin for a loaded machine.
        let bound = Duration::from_millis(500 + 2 * 500 + 500) + Duration::from_secs(3);
        let all = eventually(bound, || {
            (0..50).all(|i| {
                ringlb.count_logs(&format!("backend 127.0.0.1:{} is DOWN", 20000 + i)) == 1
            })
        });
        assert!(
            all,
            "after {:?}: {} of 50 primaries down\n{}",
            started.elapsed(),
            ringlb.count_logs("is DOWN"),
            ringlb.logs()
        );
        assert!(
            ringlb.logs().contains("no reply") || ringlb.logs().contains("timed out"),
            "{}",
            ringlb.logs()
        );
        assert_eq!(which("127.0.0.1:30049".parse().unwrap()).unwrap(), "b");
    });
}

#[test]
fn the_same_address_in_two_frontends_is_checked_once() {
    let mut shared = Backend::start_tracked(named("s"));
    let ports = free_ports(2);
    let backends = [shared.addr_str()];
    let check = "check-interval = \"200ms\"\nfall = 2\nrise = 2";
    let text = frontend("f1", &format!("127.0.0.1:{}", ports[0]), &backends, check)
        + &frontend("f2", &format!("127.0.0.1:{}", ports[1]), &backends, check);
    let config = ConfigFile::new("shared", &text);
    let ringlb = Ringlb::start_raw(&["--config", config.path()]);
    // Checks are connects: the backend's accept count is the check count.
    assert!(eventually(Duration::from_secs(3), || shared
        .accepted
        .load(SeqCst)
        >= 1));
    let before = shared.accepted.load(SeqCst);
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let checks = shared.accepted.load(SeqCst) - before;
    let intervals = window.elapsed().as_secs_f64() / 0.2;
    // One probe: about `intervals` checks (each interval +/-10%); two
    // independent probes would make twice as many.
    assert!(
        (checks as f64) < intervals * 1.4 + 1.0 && checks as f64 > intervals * 0.5,
        "{checks} checks in {intervals:.1} intervals"
    );
    // One state: a single DOWN line for both frontends.
    shared.kill();
    let line = ringlb.wait_log("is DOWN", Duration::from_secs(3));
    assert!(
        line.is_some_and(|l| l.contains("(frontends f1, f2)")),
        "{}",
        ringlb.logs()
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(ringlb.count_logs("is DOWN"), 1, "{}", ringlb.logs());
}

/// The names of the process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ringlb_refuses_to_start_when_the_health_thread_cannot_be_created() {
    let _one_at_a_time = AS_USER.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backend::start(named("b"));
    let backend = b.addr_str();
    let run = ["--backend", &backend, "--workers", "1"];
    let mut refused_for_health = false;
    // From too few threads for anything up to enough: each run either
    // starts with its health thread or exits with a clear error, and one
    // thread short of enough is the health thread's failure.
    for nproc in 1..=8 {
        let mut full = vec!["--listen", "127.0.0.1:0"];
        full.extend_from_slice(&run);
        let mut ringlb = Ringlb::spawn(limited(nproc, &full));
        match ringlb.wait_listening(Duration::from_secs(10)) {
            Ok(()) => {
                let names = thread_names(ringlb.child.id());
                assert!(
                    names.iter().any(|n| n == "ringlb-health"),
                    "nproc {nproc}: running without its health thread: {names:?}\n{}",
                    ringlb.logs()
                );
                assert!(
                    refused_for_health,
                    "started before the health thread ever failed"
                );
                return;
            }
            Err(why) => {
                let status = ringlb.wait_exit(Duration::from_secs(5));
                assert!(
                    status.is_some_and(|s| !s.success()),
                    "nproc {nproc}: {status:?} {why}"
                );
                let logs = ringlb.logs();
                assert!(logs.contains("ringlb: cannot"), "nproc {nproc}: {logs}");
                refused_for_health |= logs.contains("cannot start health checks: ");
            }
        }
    }
    panic!("ringlb never started even with 8 threads");
}

/// ringlb in `ns` with a blackholed backend (its SYNs dropped) checked
/// every 20 s with a 20 s timeout, once the first probe is in flight.
fn probing_a_blackhole(ns: &Netns, extra: &[&str]) -> Ringlb {
    let mut all = vec![
        "--check-interval",
        "20s",
        "--check-timeout",
        "20s",
        "--workers",
        "1",
    ];
    all.extend_from_slice(extra);
    all.extend(["--backend", "127.0.0.1:20000"]);
    let ringlb = Ringlb::start(&all);
    // The first check comes within a second; its SYN hits the DROP rule.
    assert!(
        eventually(Duration::from_secs(5), || ns.matched("DROP") >= 1),
        "no probe in flight\n{}",
        ringlb.logs()
    );
    ringlb
}

#[test]
fn sigterm_does_not_wait_for_a_probe_in_flight() {
    let ns = Netns::new("term");
    ns.iptables(&["-A", "INPUT", "-p", "tcp", "--dport", "20000", "-j", "DROP"]);
    ns.run(|| {
        let mut ringlb = probing_a_blackhole(&ns, &[]);
        let asked = Instant::now();
        ringlb.signal(libc::SIGTERM);
        let status = ringlb.wait_exit(Duration::from_secs(5));
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?} after {:?}\n{}",
            asked.elapsed(),
            ringlb.logs()
        );
    });
}

#[test]
fn a_second_signal_stops_at_once_with_a_connection_open() {
    let ns = Netns::new("second");
    ns.iptables(&["-A", "INPUT", "-p", "tcp", "--dport", "20000", "-j", "DROP"]);
    ns.run(|| {
        let live = Backend::start(echo());
        let backend = live.addr_str();
        // The live backend first: the client's connection goes there while
        // the blackholed one is being probed.
        let mut ringlb =
            probing_a_blackhole(&ns, &["--mode", "active-passive", "--backend", &backend]);
        let mut client = ringlb.connect();
        client.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).expect("echoed through ringlb");
        ringlb.signal(libc::SIGTERM);
        assert!(
            ringlb
                .wait_log("draining", Duration::from_secs(5))
                .is_some()
        );
        let asked = Instant::now();
        ringlb.signal(libc::SIGTERM);
        let status = ringlb.wait_exit(Duration::from_secs(5));
        assert!(
            status.is_some(),
            "still running {:?} after the second signal\n{}",
            asked.elapsed(),
            ringlb.logs()
        );
        drop(client);
    });
}

/// A check that cannot run for a reason on ringlb's own host (here: out of
/// local ports toward the backend) says nothing about the backend: it must
/// not mark it down, as live connects failing the same way do not. Found by
/// review: EADDRNOTAVAIL counted as a failed check and failed a healthy
/// backend over (for good, with `failback = false`).
#[test]
fn checks_that_cannot_run_locally_do_not_mark_a_backend_down() {
    let ns = Netns::new("ports");
    let status = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sysctl", "-q", "-w"])
        .arg("net.ipv4.ip_local_port_range=40000 40003")
        .status()
        .expect("sysctl in the namespace");
    assert!(status.success(), "cannot narrow the local port range");
    ns.run(|| {
        // Fixed ports outside the narrowed range: bind(0) would take ports
        // from it, and only connects must compete for them.
        let hold = Backend::start_at(
            "127.0.0.1:9990".parse().unwrap(),
            Arc::new(|mut s: TcpStream| {
                let _ = s.read(&mut [0u8; 1]);
            }),
            false,
        );
        let backends = [hold.addr_str()];
        let ringlb = Ringlb::start_raw(&[
            "--listen",
            "127.0.0.1:7020",
            "--backend",
            &backends[0],
            "--check-interval",
            "300ms",
            "--fall",
            "2",
            "--stats",
            "127.0.0.1:7021",
        ]);
        // Four clients, four connections to the backend: every local port
        // toward it is taken, so the checks' connects fail here.
        let clients: Vec<TcpStream> = (0..4).map(|_| ringlb.connect()).collect();
        assert!(
            eventually(Duration::from_secs(5), || hold.accepted.load(SeqCst) >= 4),
            "the clients reached the backend"
        );
        let warned = ringlb.wait_log("could not run here", Duration::from_secs(5));
        assert!(warned.is_some(), "no warning; logs:\n{}", ringlb.logs());
        // Several intervals with every check failing locally.
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            ringlb.count_logs("is DOWN"),
            0,
            "a local failure marked the backend down:\n{}",
            ringlb.logs()
        );
        assert_eq!(backend_up(&ringlb, "default", &backends[0]), Some(1));
        drop(clients);
    });
}
