//! Integrity at the limits, over real sockets: a local failure (no fd for a
//! pipe or a backend socket) never becomes a clean end of stream, bytes are
//! counted as they move, and a stop never waits on a reset's flush.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The digest of `len` payload bytes from `seed`, as `send_payload` makes
/// them.
fn payload_digest(seed: u64, len: u64) -> Digest {
    send_payload(&mut std::io::sink(), seed, len).expect("writing to a sink cannot fail")
}

/// Bytes of each bulk transfer.
const BULK: u64 = 20 << 20;

/// What one side of a transfer saw: a clean end (with the digest of what it
/// got, for the side that received the bulk), or an error.
type Outcome = Result<Option<Digest>, ErrorKind>;

/// How a transfer starts: its kind and the seed of its payload.
fn header(kind: u8, seed: u64) -> [u8; 9] {
    let mut h = [kind; 9];
    h[1..].copy_from_slice(&seed.to_le_bytes());
    h
}

/// The backend side of the bulk test: `D` + seed streams BULK bytes to the
/// client, `U` + seed reads the client's bytes to their end and answers
/// with their digest. Each outcome is kept under its seed; `started` holds
/// the seeds whose handler runs, so the test can wait for exactly those.
fn bulk_backend(
    outcomes: Arc<Mutex<HashMap<u64, Outcome>>>,
    started: Arc<Mutex<Vec<u64>>>,
) -> Backend {
    Backend::start(Arc::new(move |mut s: TcpStream| {
        let mut h = [0u8; 9];
        if s.read_exact(&mut h).is_err() {
            return; // a health check
        }
        let seed = u64::from_le_bytes(h[1..].try_into().unwrap());
        started.lock().unwrap().push(seed);
        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
        let outcome = if h[0] == b'D' {
            download_side(&mut s, seed)
        } else {
            upload_side(&mut s)
        };
        outcomes.lock().unwrap().insert(seed, outcome);
    }))
}

fn download_side(s: &mut TcpStream, seed: u64) -> Outcome {
    send_payload(s, seed, BULK).map_err(|e| e.kind())?;
    s.shutdown(Shutdown::Write).map_err(|e| e.kind())?;
    // The client ends its side once it has read everything: a clean end
    // here, or the reset ringlb passes on.
    read_digest(s).map_err(|e| e.kind())?;
    Ok(None)
}

fn upload_side(s: &mut TcpStream) -> Outcome {
    let got = read_digest(s).map_err(|e| e.kind())?;
    s.write_all(format!("{} {}", got.len, got.hash).as_bytes())
        .map_err(|e| e.kind())?;
    let _ = s.shutdown(Shutdown::Write);
    Ok(Some(got))
}

/// The client side: a download yields the digest of what arrived before a
/// clean end; an upload yields the backend's answer's digest as text.
fn client(addr: std::net::SocketAddr, kind: u8, seed: u64) -> Result<String, ErrorKind> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.kind())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.kind())?;
    s.set_write_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.kind())?;
    s.write_all(&header(kind, seed)).map_err(|e| e.kind())?;
    if kind == b'D' {
        let got = read_digest(&mut s).map_err(|e| e.kind())?;
        let _ = s.shutdown(Shutdown::Write);
        return Ok(format!("{} {}", got.len, got.hash));
    }
    send_payload(&mut s, seed, BULK).map_err(|e| e.kind())?;
    s.shutdown(Shutdown::Write).map_err(|e| e.kind())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(|e| e.kind())?;
    Ok(answer)
}

/// Issue 9, point 1. ringlb runs with one worker under RLIMIT_NOFILE 112
/// (soft and hard). 20 downloads and 20 uploads of 20 MiB run at once; each
/// is bulk, so each direction that carries it wants a splice pipe (two fds).
///
/// Why 112: the sockets of all 40 connections (80 fds) plus ringlb's own
/// (stdio, listener, ring, eventfd, stats: about 10) fit, but their pipes
/// (another 80) do not: about a dozen pipes can exist at once. A global
/// connection cap derived from RLIMIT_NOFILE (2 sockets per connection and
/// HAProxy's share of a pipe per 4, with reserves: about 32 connections at
/// 112) leaves the remaining clients in the kernel's accept queue, and the
/// admitted ones still want about three times the pipes there are fds for.
/// The worker's share of the budget's pipes (a tenth of the fds left) runs
/// out first, and pipe2(2) itself may fail with EMFILE: both end in the
/// same fallback. The test checks that the pipe path really was taken (the
/// fallback counter), so it fails loudly rather than pass vacuously should
/// a future budget leave room for every pipe.
///
/// Required: every transfer is either complete and byte-exact, or ends in
/// an error that both peers see; never a clean end after a prefix.
#[test]
fn bulk_transfers_under_a_low_fd_limit_are_exact_or_reset_on_both_sides() {
    let outcomes = Arc::new(Mutex::new(HashMap::new()));
    let started = Arc::new(Mutex::new(Vec::new()));
    let backend = bulk_backend(Arc::clone(&outcomes), Arc::clone(&started));
    let ringlb = Ringlb::start_command(ringlb_with_nofile(
        112,
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &backend.addr_str(),
            "--workers",
            "1",
            "--stats",
            "127.0.0.1:0",
            "--check-interval",
            "1h",
        ],
    ));
    let addr = ringlb.addr;
    let transfers: Vec<(u8, u64)> = (0..40u64)
        .map(|i| (if i % 2 == 0 { b'D' } else { b'U' }, 100 + i))
        .collect();
    let clients: Vec<_> = transfers
        .iter()
        .map(|&(kind, seed)| std::thread::spawn(move || client(addr, kind, seed)))
        .collect();
    let seen: Vec<Result<String, ErrorKind>> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    // The backend's handlers end just after their clients do: wait for
    // every one that started (a client that got a whole answer had one).
    assert!(
        eventually(Duration::from_secs(30), || {
            let done = outcomes.lock().unwrap();
            started
                .lock()
                .unwrap()
                .iter()
                .all(|seed| done.contains_key(seed))
        }),
        "backend handlers did not finish"
    );
    let outcomes = outcomes.lock().unwrap();
    let mut complete = 0;
    for (&(kind, seed), client_saw) in transfers.iter().zip(&seen) {
        let full = payload_digest(seed, BULK);
        let full_text = format!("{} {}", full.len, full.hash);
        let backend_saw = outcomes.get(&seed);
        let what = format!(
            "{} {seed}: client saw {client_saw:?}, backend saw {backend_saw:?}",
            kind as char
        );
        match client_saw {
            Ok(text) => {
                assert_eq!(text, &full_text, "a clean end short of the stream: {what}");
                if kind == b'U' {
                    assert_eq!(backend_saw, Some(&Ok(Some(full))), "{what}");
                } else {
                    assert_eq!(backend_saw, Some(&Ok(None)), "{what}");
                }
                complete += 1;
            }
            Err(_) => match backend_saw {
                // Reset before any backend was reached.
                None => {}
                Some(Ok(Some(got))) => panic!(
                    "the backend saw a clean end after {} of {BULK} bytes while the client \
                     saw an error: {what}",
                    got.len
                ),
                Some(Ok(None)) => panic!("only the client saw an error: {what}"),
                Some(Err(_)) => {}
            },
        }
    }
    // For a reader of --nocapture: which local failures reset a transfer.
    let logs = ringlb.logs();
    for line in logs.lines().filter(|l| l.contains(" reset")) {
        if line.contains("WARN") || line.contains("ERROR") {
            eprintln!("{line}");
        }
    }
    let fallbacks = ringlb
        .metric("ringlb_frontend_pipe_fallbacks_total{frontend=\"default\"}")
        .expect("the pipe fallback counter");
    let local_errors = ringlb.metric("ringlb_frontend_local_errors_total{frontend=\"default\"}");
    eprintln!(
        "{complete} of 40 transfers complete, {fallbacks} pipe fallbacks, {local_errors:?} \
         connections reset for a local failure"
    );
    assert!(
        fallbacks > 0,
        "no direction ever lacked a pipe: the test did not exercise the limit; logs:\n{}",
        ringlb.logs()
    );
    assert!(
        complete >= 20,
        "copying should carry what pipes cannot: only {complete} of 40 complete; logs:\n{}",
        ringlb.logs()
    );
    assert!(
        ringlb
            .wait_log("cannot get a splice pipe", Duration::from_secs(1))
            .is_some(),
        "the fallback is logged"
    );
}

/// The lowest fd number a process does not use: the next one it gets.
fn lowest_free_fd(pid: u32) -> usize {
    let used: Vec<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list ringlb's fds")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap_or(0)
}

/// Sets the soft RLIMIT_NOFILE of another process (ours to change: same
/// user), keeping its hard limit.
fn set_soft_nofile(pid: u32, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls with valid rlimit structs; a null new limit
    // only reads the current one.
    unsafe {
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old),
            0
        );
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()),
            0,
            "prlimit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// What a client of a connection made while ringlb has exactly one fd left
/// sees: ringlb can accept it, but has no fd for its backend socket.
fn connect_with_one_fd_left(ringlb: &Ringlb) -> Result<usize, ErrorKind> {
    let pid = ringlb.child.id();
    let next = lowest_free_fd(pid) as u64;
    set_soft_nofile(pid, next + 1);
    let seen = (|| {
        let mut s = TcpStream::connect(ringlb.addr).map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.kind())?;
        s.write_all(b"hello").map_err(|e| e.kind())?;
        s.read(&mut [0u8; 16]).map_err(|e| e.kind())
    })();
    set_soft_nofile(pid, 4096);
    seen
}

/// Issue 9, point 1: a backend socket that cannot be created (EMFILE) must
/// reset the client, not end its stream cleanly with 0 bytes. ringlb first
/// retries on its tick for the connect timeout (fds come back as other
/// connections end); this one never gets an fd. The fd limit is lowered on
/// the running process (prlimit --pid) to one above its lowest free fd, so
/// a connection-count cap computed at start cannot keep the accept from
/// taking that last fd.
#[test]
fn no_fd_for_a_backend_socket_resets_the_client() {
    let backend = Backend::start(echo());
    let ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--workers",
        "1",
        "--check-interval",
        "1h",
        "--connect-timeout",
        "500ms",
        "--stats",
        "127.0.0.1:0",
    ]);
    // The start-up health check's socket is gone once the backend has seen
    // it; an fd opened by something else meanwhile only lets the
    // connection through (an echo), and the attempt is made again.
    assert!(eventually(Duration::from_secs(5), || backend
        .accepted
        .load(SeqCst)
        >= 1));
    let mut attempts = Vec::new();
    for _ in 0..5 {
        let seen = connect_with_one_fd_left(&ringlb);
        attempts.push(seen);
        if !matches!(seen, Ok(n) if n > 0) && seen != Err(ErrorKind::WouldBlock) {
            break;
        }
    }
    let last = *attempts.last().unwrap();
    assert_eq!(
        last,
        Err(ErrorKind::ConnectionReset),
        "attempts {attempts:?}; a clean end (Ok(0)) passes a local failure off as the \
         backend's answer; logs:\n{}",
        ringlb.logs()
    );
    assert!(
        ringlb
            .wait_log("cannot create a backend socket", Duration::from_secs(5))
            .is_some(),
        "{}",
        ringlb.logs()
    );
    assert!(eventually(Duration::from_secs(5), || ringlb.metric(
        "ringlb_frontend_local_errors_total{frontend=\"default\"}"
    ) == Some(1)));
}

/// Issue 9, point 10: the byte counters grow while a transfer runs, not
/// only when its connection closes.
#[test]
fn byte_counters_grow_while_a_transfer_runs() {
    const UP: u64 = 64 << 10;
    const DOWN: u64 = 1 << 20;
    let release = Arc::new(AtomicBool::new(false));
    let go = Arc::clone(&release);
    let backend = Backend::start(Arc::new(move |mut s: TcpStream| {
        let mut up = vec![0u8; 2 + UP as usize];
        if s.read_exact(&mut up).is_err() {
            return; // a health check
        }
        let _ = send_payload(&mut s, 21, DOWN);
        // Hold the connection open until the test has read the counters.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !go.load(SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = send_payload(&mut s, 22, DOWN);
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.read_to_end(&mut Vec::new());
    }));
    let name = backend.addr_str();
    let ringlb = Ringlb::start(&["--backend", &name, "--stats", "127.0.0.1:0"]);
    let sent =
        format!("ringlb_backend_bytes_sent_total{{frontend=\"default\",backend=\"{name}\"}}");
    let received =
        format!("ringlb_backend_bytes_received_total{{frontend=\"default\",backend=\"{name}\"}}");
    let mut s = ringlb.connect();
    s.write_all(b"go").unwrap();
    send_payload(&mut s, 20, UP).unwrap();
    let mut first = vec![0u8; DOWN as usize];
    s.read_exact(&mut first).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            ringlb.metric(&sent) == Some(2 + UP) && ringlb.metric(&received) >= Some(DOWN)
        }),
        "while the connection is open: sent {:?}, received {:?}",
        ringlb.metric(&sent),
        ringlb.metric(&received)
    );
    release.store(true, SeqCst);
    let rest = read_digest(&mut s).unwrap();
    assert_eq!(rest, payload_digest(22, DOWN));
    s.shutdown(Shutdown::Write).unwrap();
    // Counted once: the bytes flushed on ticks are not added again at close.
    assert!(
        eventually(Duration::from_secs(10), || ringlb.metric(&received)
            == Some(2 * DOWN)),
        "received {:?}",
        ringlb.metric(&received)
    );
    assert_eq!(ringlb.metric(&sent), Some(2 + UP));
}

fn wait_exit(ringlb: &mut Ringlb, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = ringlb.child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Issue 9, point 7: a backend resets while its client reads nothing, so
/// ringlb holds the reset back until the bytes queued to the client are
/// delivered (up to 5 s). A stop must not wait for that: ringlb resets the
/// client at once and exits 0, instead of lingering (or exiting 1 with
/// "workers did not stop").
#[test]
fn a_stop_cuts_a_pending_reset_flush_short() {
    const LEN: u64 = 256 << 10;
    let backend = Backend::start(Arc::new(|mut s: TcpStream| {
        let mut req = [0u8; 3];
        if s.read_exact(&mut req).is_err() {
            return; // a health check
        }
        let _ = send_payload(&mut s, 31, LEN);
        // Reset only once ringlb's kernel has every byte.
        let deadline = Instant::now() + Duration::from_secs(10);
        while unacked(&s) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    }));
    let mut ringlb = Ringlb::start(&["--backend", &backend.addr_str(), "--workers", "1"]);
    // A small receive buffer: most of the bytes stay queued in ringlb.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&ringlb.addr.into()).unwrap();
    let mut s = TcpStream::from(socket);
    s.write_all(b"req").unwrap();
    ringlb
        .wait_log("passing the reset on once", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the reset never waited on queued bytes:\n{}", ringlb.logs()));
    ringlb.signal(libc::SIGTERM);
    assert!(
        ringlb
            .wait_log("draining", Duration::from_secs(5))
            .is_some()
    );
    let stopped = Instant::now();
    ringlb.signal(libc::SIGTERM);
    let status = wait_exit(&mut ringlb, Duration::from_secs(10)).expect("ringlb exits");
    let took = stopped.elapsed();
    assert!(status.success(), "{status:?}; logs:\n{}", ringlb.logs());
    assert!(
        took < Duration::from_millis(2500),
        "the stop waited {took:?} for a reset's flush (the flush limit is 5 s)"
    );
    // The client gets what was queued, then the reset: never a clean end.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e.kind()),
        }
    };
    assert_eq!(end, Err(ErrorKind::ConnectionReset));
}

/// Bytes a socket sent that its peer has not acknowledged yet.
fn unacked(s: &TcpStream) -> i32 {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer.
    unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::TIOCOUTQ,
            &mut queued,
        )
    };
    queued
}

/// A stop cuts transfers in the middle: each peer must see a reset, never a
/// clean end that passes the bytes so far off as the whole stream.
#[test]
fn a_stop_resets_a_transfer_in_flight() {
    let backend = Backend::start(Arc::new(|mut s: TcpStream| {
        let mut req = [0u8; 3];
        if s.read_exact(&mut req).is_err() {
            return; // a health check
        }
        // An endless stream, until ringlb goes away (bounded all the same).
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && s.write_all(&[7u8; 1024]).is_ok() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }));
    let mut ringlb = Ringlb::start(&["--backend", &backend.addr_str(), "--workers", "1"]);
    let mut s = ringlb.connect();
    s.write_all(b"req").unwrap();
    s.read_exact(&mut [0u8; 4096]).unwrap();
    ringlb.signal(libc::SIGTERM);
    assert!(
        ringlb
            .wait_log("draining", Duration::from_secs(5))
            .is_some()
    );
    ringlb.signal(libc::SIGTERM);
    let status = wait_exit(&mut ringlb, Duration::from_secs(10)).expect("ringlb exits");
    assert!(status.success(), "{status:?}");
    let mut buf = [0u8; 64 << 10];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e.kind()),
        }
    };
    assert_eq!(end, Err(ErrorKind::ConnectionReset), "a clean end at stop");
}

/// A client that stops reading for longer than the idle timeout while a
/// download is under way must not be handed a clean end of stream after a
/// prefix: either every byte arrives or the client sees an error. (Found
/// by review: a send blocked on a stalled reader counts as idle, and the
/// idle close used to send a FIN with bytes still undelivered.)
#[test]
fn an_idle_timeout_with_bytes_still_to_deliver_is_not_a_clean_end() {
    const LEN: usize = 32 << 20;
    let backend = Backend::start(Arc::new(|mut s: TcpStream| {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..LEN / chunk.len() {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.read(&mut [0u8; 1]);
    }));
    let ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--workers",
        "1",
        "--idle-timeout",
        "1s",
    ]);
    let mut client = ringlb.connect();
    // The client stalls (a paused consumer, a full disk, a GC pause).
    std::thread::sleep(Duration::from_secs(3));
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let outcome = loop {
        match client.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => got += n,
            Err(e) => break Err(e.kind()),
        }
    };
    assert!(
        got == LEN || outcome.is_err(),
        "clean end of stream after {got} of {LEN} bytes: a truncated download that looks complete"
    );
}
