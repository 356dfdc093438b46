//! Operating ringlb: a log reader that stalls, the signals an operator
//! sends, and the notes it logs at start about careless settings. Each test
//! drives the real binary over loopback.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::{BIN, Backend, Ringlb, echo, eventually};

/// A ringlb whose stderr pipe the test holds but stops reading; killed on drop.
struct Stalled {
    child: Child,
    addr: SocketAddr,
    stats: SocketAddr,
    /// Held, never read past the start lines: the pipe fills up.
    _stderr: BufReader<ChildStderr>,
}

impl Stalled {
    fn start(backend: &Backend) -> Stalled {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--backend", &backend.addr_str()])
            .args(["--workers", "1", "--stats", "127.0.0.1:0"])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringlb");
        let stderr = child.stderr.take().expect("stderr");
        // The smallest pipe (a page): a few dozen lines fill it.
        // SAFETY: fcntl on the pipe's read end, which we own.
        unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        let mut stalled = Stalled {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stats: SocketAddr::from(([127, 0, 0, 1], 0)),
            _stderr: BufReader::new(stderr),
        };
        stalled.read_start_lines();
        stalled
    }

    /// Reads stderr up to the listen and stats lines, then never again.
    fn read_start_lines(&mut self) {
        let mut addr = None;
        let mut stats = None;
        let mut line = String::new();
        while addr.is_none() || stats.is_none() {
            line.clear();
            let n = self._stderr.read_line(&mut line).expect("read stderr");
            assert!(n > 0, "ringlb ended before it was listening");
            if let Some(rest) = line.split("listening on ").nth(1) {
                addr = rest.split(' ').next().and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.split("metrics on http://").nth(1) {
                stats = rest.split('/').next().and_then(|a| a.parse().ok());
            }
        }
        self.addr = addr.expect("listen address");
        self.stats = stats.expect("stats address");
    }

    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One echo round trip on a new connection, each step bounded.
fn round_trip(addr: SocketAddr, i: usize) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {i}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let message = format!("request {i:06}");
    s.write_all(message.as_bytes())
        .map_err(|e| format!("send {i}: {e}"))?;
    let mut back = vec![0u8; message.len()];
    s.read_exact(&mut back)
        .map_err(|e| format!("request {i} got no answer within 10 s: {e}"))?;
    if back != message.as_bytes() {
        return Err(format!("request {i}: wrong echo"));
    }
    Ok(())
}

/// GET /metrics; the value of `series`.
fn metric(stats: SocketAddr, series: &str) -> Option<u64> {
    let mut s = TcpStream::connect(stats).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Issue 9 point 3: with RUST_LOG=debug a line per connection goes to a
/// stderr nobody reads. Before, the worker blocked in write(2) once the pipe
/// was full and every client hung; now lines are dropped and counted, and
/// the stop at the end is not held by the full pipe either.
#[test]
fn a_stalled_log_reader_never_stalls_traffic() {
    let backend = Backend::start(echo());
    let mut ringlb = Stalled::start(&backend);
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // A few clients at once: the queue behind the pipe holds thousands of
    // lines, and one client alone takes long to fill it on a busy machine.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (done, stop, addr) = (Arc::clone(&done), Arc::clone(&stop), ringlb.addr);
            std::thread::spawn(move || {
                while !stop.load(SeqCst) {
                    let i = done.fetch_add(1, SeqCst);
                    if let Err(e) = round_trip(addr, i) {
                        stop.store(true, SeqCst);
                        return Err(e);
                    }
                }
                Ok(())
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut dropped = 0;
    while !stop.load(SeqCst) && (dropped == 0 || done.load(SeqCst) < 500) {
        assert!(
            Instant::now() < deadline,
            "{} requests in 120 s and {dropped} log lines dropped",
            done.load(SeqCst)
        );
        std::thread::sleep(Duration::from_millis(200));
        // Absent counts as none dropped: the deadline then says so.
        dropped = metric(ringlb.stats, "ringlb_log_lines_dropped_total").unwrap_or(0);
    }
    stop.store(true, SeqCst);
    for client in clients {
        if let Err(e) = client.join().expect("client thread") {
            panic!("traffic stalled behind the log: {e}");
        }
    }
    // The stalled pipe must not hold the stop either.
    // SAFETY: plain libc call on our own child's pid.
    unsafe { libc::kill(ringlb.child.id() as i32, libc::SIGTERM) };
    let status = ringlb
        .wait_exit(Duration::from_secs(20))
        .expect("ringlb exits on SIGTERM while its stderr is full");
    assert!(status.success(), "{status:?}");
}

fn echo_proxy() -> (Backend, Ringlb) {
    let backend = Backend::start(echo());
    let ringlb = Ringlb::start(&["--backend", &backend.addr_str(), "--workers", "1"]);
    (backend, ringlb)
}

fn echo_once(s: &mut TcpStream, byte: u8) {
    s.write_all(&[byte]).expect("send");
    let mut back = [0u8; 1];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(back[0], byte);
}

fn wait_exit(ringlb: &mut Ringlb, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = ringlb.child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Issue 9 point 8: SIGUSR1 is HAProxy's soft stop. Before, it killed
/// ringlb at once with every connection.
#[test]
fn sigusr1_drains_like_sigterm() {
    drains_on(libc::SIGUSR1, "SIGUSR1");
}

/// SIGPWR is how LXC asks a container to shut down cleanly (found by
/// review: it killed ringlb with no drain and no log line).
#[test]
fn sigpwr_drains_like_sigterm() {
    drains_on(libc::SIGPWR, "SIGPWR");
}

fn drains_on(signal: i32, name: &str) {
    let (_backend, mut ringlb) = echo_proxy();
    let mut open = ringlb.connect();
    echo_once(&mut open, b'a');
    ringlb.signal(signal);
    let line = ringlb.wait_log(name, Duration::from_secs(10));
    assert!(
        line.as_deref().is_some_and(|l| l.contains("draining")),
        "no drain line naming {name}; logs:\n{}",
        ringlb.logs()
    );
    assert!(
        eventually(Duration::from_secs(10), || TcpStream::connect(ringlb.addr)
            .is_err()),
        "still accepting after {name}"
    );
    // The open connection carries on until it ends by itself.
    echo_once(&mut open, b'b');
    open.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(open.read(&mut [0u8; 1]).expect("end of stream"), 0);
    let status = wait_exit(&mut ringlb, Duration::from_secs(20)).expect("exits after the drain");
    assert!(status.success(), "{status:?}; logs:\n{}", ringlb.logs());
}

/// Issue 9 point 8: SIGUSR2 (reserved for reload), SIGHUP and SIGQUIT are
/// logged by name and ringlb keeps serving. Before, SIGUSR2 and SIGQUIT
/// killed it.
#[test]
fn reload_and_status_signals_do_not_stop_it() {
    let (_backend, mut ringlb) = echo_proxy();
    let mut held = ringlb.connect();
    echo_once(&mut held, b'x');
    for (signal, name, says) in [
        (libc::SIGUSR2, "SIGUSR2", "reload"),
        (libc::SIGHUP, "SIGHUP", "reload"),
        (libc::SIGQUIT, "SIGQUIT", "connections open"),
        // Found by review: these killed it silently.
        (libc::SIGALRM, "SIGALRM", "ignored"),
        (libc::SIGPROF, "SIGPROF", "ignored"),
    ] {
        ringlb.signal(signal);
        let line = ringlb.wait_log(&format!("{name}:"), Duration::from_secs(10));
        assert!(
            line.as_deref().is_some_and(|l| l.contains(says)),
            "no line naming {name} with {says:?}; logs:\n{}",
            ringlb.logs()
        );
        assert!(
            ringlb.child.try_wait().expect("wait").is_none(),
            "{name} ended ringlb; logs:\n{}",
            ringlb.logs()
        );
        echo_once(&mut held, b'y');
        let mut fresh = ringlb.connect();
        echo_once(&mut fresh, b'z');
    }
    let status_line = ringlb
        .wait_log("SIGQUIT: frontend default", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no status line per frontend; logs:\n{}", ringlb.logs()));
    assert!(status_line.contains("1 of 1 backends up"), "{status_line}");
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Issue 9 point 11: more workers than cores is allowed but warned about,
/// and the memory the buffers commit is logged. Before, both were silent.
#[test]
fn start_logs_buffer_memory_and_warns_of_more_workers_than_cores() {
    let backend = Backend::start(echo());
    let workers = (cores() + 1).to_string();
    let ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--workers",
        &workers,
        "--buffers",
        "64",
    ]);
    let expected = format!("receive buffers: {workers} workers x 64 buffers x 16 KiB = ");
    let memory = ringlb.wait_log(&expected, Duration::from_secs(10));
    assert!(
        memory.is_some(),
        "no memory line {expected:?}; logs:\n{}",
        ringlb.logs()
    );
    let warning = ringlb
        .wait_log(
            &format!("{workers} workers on {} cores", cores()),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("no workers warning; logs:\n{}", ringlb.logs()));
    assert!(warning.contains("WARN"), "{warning}");
    // The default (one worker per core) is not warned about.
    let quiet = Ringlb::start(&["--backend", &backend.addr_str(), "--buffers", "64"]);
    quiet
        .wait_log("receive buffers:", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no memory line; logs:\n{}", quiet.logs()));
    assert_eq!(quiet.count_logs("cores:"), 0, "{}", quiet.logs());
}
