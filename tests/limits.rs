//! At the limits: the connection ceiling derived from the fd limit, a
//! frontend's maxconn, accept errors, and draining a paused listener.
//! Clients beyond a limit wait in the kernel's accept queue and are served
//! later; ringlb never accepts one only to close it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A client that sent its number and waits for the echo.
struct Client {
    stream: Option<TcpStream>,
    id: u32,
    got: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Served,
}

impl Client {
    fn connect(ringlb: &Ringlb, id: u32) -> Client {
        let mut stream =
            TcpStream::connect(ringlb.addr).expect("the kernel completes the handshake");
        stream.write_all(&id.to_be_bytes()).expect("send");
        stream.set_nonblocking(true).expect("non-blocking");
        Client {
            stream: Some(stream),
            id,
            got: Vec::new(),
        }
    }

    /// Reads what arrived without waiting. Panics if ringlb ended the
    /// connection: a client is either served or still waiting.
    fn poll(&mut self) -> State {
        let Some(stream) = self.stream.as_mut() else {
            return State::Served;
        };
        let mut buf = [0u8; 16];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => panic!("client {} was closed before it was served", self.id),
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("client {} got an error: {e}", self.id),
            }
        }
        if self.got.len() < 4 {
            return State::Waiting;
        }
        assert_eq!(self.got, self.id.to_be_bytes(), "client {}'s echo", self.id);
        State::Served
    }

    fn close(&mut self) {
        self.stream = None;
    }
}

/// Polls every client until `done` holds for the number served, closing
/// each served one at once when `close_served`.
fn serve(
    clients: &mut [Client],
    close_served: bool,
    timeout: Duration,
    done: impl Fn(usize) -> bool,
) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let mut served = 0;
        for client in clients.iter_mut() {
            if client.poll() == State::Served {
                served += 1;
                if close_served {
                    client.close();
                }
            }
        }
        if done(served) || Instant::now() > deadline {
            return served;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The limit and the line that states it, from the start log.
fn limit_from_log(ringlb: &Ringlb) -> Option<(usize, String)> {
    let line = ringlb.wait_log("connection limit ", Duration::from_secs(5))?;
    let limit = line
        .split("connection limit ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())?;
    Some((limit, line))
}

const CLIENTS: u32 = 1000;

#[test]
fn at_the_fd_derived_limit_clients_wait_in_the_queue_and_none_is_closed() {
    raise_fd_limit();
    let backend = Backend::start(echo());
    let addr = backend.addr_str();
    let ringlb = Ringlb::start_command(ringlb_with_nofile(
        256,
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &addr,
            "--workers",
            "2",
            "--stats",
            "127.0.0.1:0",
        ],
    ));
    let stated = limit_from_log(&ringlb);
    let started = Instant::now();
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|id| Client::connect(&ringlb, id))
        .collect();
    // Polling panics if ringlb closes a client: checked before anything
    // else, since that is the failure this test is about.
    let expected = stated
        .as_ref()
        .map_or(CLIENTS as usize, |(limit, _)| *limit);
    let served = serve(&mut clients, false, Duration::from_secs(30), |n| {
        n >= expected
    });
    let (limit, line) = stated
        .unwrap_or_else(|| panic!("no connection limit in the start log:\n{}", ringlb.logs()));
    assert!(line.contains("(from RLIMIT_NOFILE 256"), "{line}");
    assert!((20..128).contains(&limit), "{line}");
    assert_eq!(served, limit, "{}", ringlb.logs());
    assert!(
        ringlb
            .wait_log("at the connection limit", Duration::from_secs(10))
            .is_some(),
        "{}",
        ringlb.logs()
    );
    // The workers stopped at the limit: nobody else is taken, nobody closed.
    assert_eq!(serve(&mut clients, false, Duration::ZERO, |_| true), limit);
    let accepted = "ringlb_frontend_connections_total{frontend=\"default\"}";
    assert_eq!(ringlb.metric(accepted), Some(limit as u64));
    assert_eq!(
        ringlb.metric("ringlb_connection_limit "),
        Some(limit as u64)
    );
    assert_eq!(
        ringlb.metric("ringlb_connections_active "),
        Some(limit as u64)
    );
    assert!(
        ringlb
            .metric("ringlb_connection_limit_reached_total ")
            .is_some_and(|n| n >= 1)
    );

    // As served clients leave, the waiting ones are taken, until all are.
    let served = serve(&mut clients, true, Duration::from_secs(90), |n| {
        n == CLIENTS as usize
    });
    assert_eq!(served, CLIENTS as usize, "{}", ringlb.logs());
    assert_eq!(ringlb.metric(accepted), Some(u64::from(CLIENTS)));

    // Few lines about the limit (one per worker per 10 s), and no fd ran out.
    let periods = started.elapsed().as_secs() as usize / 10 + 1;
    let lines = ringlb.count_logs("at the connection limit");
    assert!(
        lines <= 2 * periods,
        "{lines} lines in {periods} periods:\n{}",
        ringlb.logs()
    );
    assert_eq!(ringlb.count_logs("accept on"), 0, "{}", ringlb.logs());
    assert_eq!(ringlb.count_logs("backend socket"), 0, "{}", ringlb.logs());
}

#[test]
fn maxconn_holds_clients_in_the_queue_and_serves_them_as_others_close() {
    let backend = Backend::start(echo());
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&[
        "--backend",
        &addr,
        "--maxconn",
        "5",
        "--workers",
        "2",
        "--stats",
        "127.0.0.1:0",
    ]);
    let mut clients: Vec<Client> = (0..10).map(|id| Client::connect(&ringlb, id)).collect();
    assert_eq!(
        serve(&mut clients, false, Duration::from_secs(20), |n| n >= 5),
        5
    );
    assert!(
        ringlb
            .wait_log("maxconn (5)", Duration::from_secs(10))
            .is_some(),
        "{}",
        ringlb.logs()
    );
    // The other five are connected (the kernel did the handshake) but wait:
    // no byte relayed, and not closed.
    assert_eq!(serve(&mut clients, false, Duration::ZERO, |_| true), 5);
    let accepted = "ringlb_frontend_connections_total{frontend=\"default\"}";
    assert_eq!(ringlb.metric(accepted), Some(5));
    assert_eq!(
        ringlb.metric("ringlb_frontend_connections_active{frontend=\"default\"}"),
        Some(5)
    );
    assert!(
        ringlb
            .metric("ringlb_frontend_maxconn_reached_total{frontend=\"default\"}")
            .is_some_and(|n| n >= 1)
    );
    // The completion queue's counters are there (and nothing overflowed).
    assert_eq!(
        ringlb.metric("ringlb_completion_queue_dropped_total "),
        Some(0)
    );
    assert_eq!(
        ringlb.metric("ringlb_completion_queue_overflowed_total "),
        Some(0)
    );
    // The first five leave; the other five are served.
    for client in clients.iter_mut().filter(|c| c.got.len() == 4) {
        client.close();
    }
    assert_eq!(
        serve(&mut clients, false, Duration::from_secs(20), |n| n == 10),
        10
    );
    assert_eq!(ringlb.metric(accepted), Some(10));
}

#[test]
fn a_limit_too_low_for_any_connection_is_refused_at_start() {
    let mut child =
        ringlb_with_nofile(16, &["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run ringlb");
    let mut status = None;
    eventually(Duration::from_secs(10), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{stderr}");
    assert!(stderr.contains("RLIMIT_NOFILE is 16"), "{stderr}");
    assert!(stderr.contains("ulimit -n"), "{stderr}");
}

/// Sets a running process's soft RLIMIT_NOFILE, as `prlimit --pid PID
/// --nofile=N:` does; the hard limit stays, so it can be raised again
/// without CAP_SYS_RESOURCE.
fn set_soft_nofile(pid: u32, nofile: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid structs, on our own child's pid.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let limit = libc::rlimit {
        rlim_cur: nofile.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The lowest fd number free in process `pid`: with RLIMIT_NOFILE set to
/// it, the next fd the process opens fails with EMFILE.
fn lowest_free_fd(pid: u32) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|fd| !open.contains(fd)).unwrap_or(0)
}

#[test]
fn a_draining_worker_serves_the_clients_queued_on_a_listener_paused_by_an_accept_error() {
    let backend = Backend::start(echo());
    let addr = backend.addr_str();
    // maxconn keeps the worker on accept4(2), which reads the fd limit as it
    // is now (a multishot accept keeps the one from when it was armed).
    let mut ringlb = Ringlb::start(&[
        "--backend",
        &addr,
        "--workers",
        "1",
        "--maxconn",
        "100",
        "--stats",
        "127.0.0.1:0",
    ]);
    let pid = ringlb.child.id();
    let mut first = vec![Client::connect(&ringlb, 0)];
    assert_eq!(
        serve(&mut first, false, Duration::from_secs(10), |n| n == 1),
        1
    );
    // The stats endpoint works before its fds run out.
    let _ = ringlb.stats_addr();

    // Out of fds: accepting fails and the listener pauses. All along, the
    // queued clients wait: none is served, none is closed (poll panics).
    set_soft_nofile(pid, lowest_free_fd(pid));
    let mut queued: Vec<Client> = (1..4).map(|id| Client::connect(&ringlb, id)).collect();
    let mut waiting_until = |what: &str, condition: &dyn Fn() -> bool| {
        let met = eventually(Duration::from_secs(10), || {
            assert_eq!(serve(&mut queued, false, Duration::ZERO, |_| true), 0);
            condition()
        });
        assert!(met, "{what}:\n{}", ringlb.logs());
    };
    waiting_until("the accept failed", &|| ringlb.count_logs("accept on") > 0);
    ringlb.signal(libc::SIGTERM);
    waiting_until("draining", &|| ringlb.count_logs("draining") > 0);
    // Still paused while draining: it tries again, and fails again.
    let drained_at = ringlb.count_logs("");
    waiting_until("another try", &|| {
        ringlb
            .logs()
            .lines()
            .skip(drained_at)
            .any(|l| l.contains("failed again"))
    });

    // Fds again: the draining worker takes and serves its queue.
    set_soft_nofile(pid, 4096);
    assert_eq!(
        serve(&mut queued, true, Duration::from_secs(20), |n| n == 3),
        3,
        "{}",
        ringlb.logs()
    );
    first[0].close();
    let mut status = None;
    eventually(Duration::from_secs(20), || {
        status = ringlb.child.try_wait().ok().flatten();
        status.is_some()
    });
    assert!(
        status.is_some_and(|s| s.success()),
        "ringlb did not finish draining ({status:?}):\n{}",
        ringlb.logs()
    );
    // The worker's teardown confirmed with the kernel that its buffers
    // were free before freeing them.
    assert_eq!(ringlb.count_logs("leaking"), 0, "{}", ringlb.logs());
}

/// A burst of clients queued while a worker cannot run (descheduled: CPU
/// quota, SIGSTOP, a long batch) must not take it past the connection limit
/// into EMFILE and resets. (Found by review: a multishot accept armed 1,024
/// connections below the limit took the whole 3,000-deep queue at once.
/// Now a multishot accept runs only while every listener's full queue fits
/// under the limit.)
#[test]
fn a_burst_queued_under_a_multishot_accept_stays_within_the_limit() {
    raise_fd_limit();
    let backend = Backend::start(Arc::new(|mut s: TcpStream| {
        let _ = s.read(&mut [0u8; 1]);
    }));
    let mut ringlb = Ringlb::start_command(ringlb_with_nofile(
        4096,
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
    ));
    let limit = ringlb.metric("ringlb_connection_limit ").expect("limit");
    ringlb.signal(libc::SIGSTOP);
    let clients: Vec<TcpStream> = (0..limit as usize + 1500)
        .map(|_| TcpStream::connect(ringlb.addr).expect("queued by the kernel"))
        .collect();
    ringlb.signal(libc::SIGCONT);
    // Connect timeout (2 s) for the clients that found no fd, and a margin.
    std::thread::sleep(Duration::from_secs(4));
    let active = ringlb.metric("ringlb_connections_active ").expect("active");
    let local = ringlb
        .metric("ringlb_frontend_local_errors_total{frontend=\"default\"} ")
        .expect("local errors");
    let mut closed = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    for mut c in clients {
        c.set_nonblocking(true).unwrap();
        match c.read(&mut [0u8; 1]) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            _ => closed += 1,
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let _ = ringlb.child.kill();
    assert!(
        local == 0 && closed == 0 && active <= limit,
        "limit {limit}: {active} active, {local} local errors, {closed} clients closed or reset; \
         logs:\n{}",
        ringlb.logs()
    );
}
