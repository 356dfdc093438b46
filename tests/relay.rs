//! The relay over real sockets: bytes exact in both directions, half-close
//! passed on, resets passed on, idle connections closed, many at once.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;

fn echo_proxy(extra: &[&str]) -> (Backend, Ringlb) {
    let backend = Backend::start(echo());
    let addr = backend.addr_str();
    let mut args = vec!["--backend", addr.as_str()];
    if !extra.contains(&"--workers") {
        args.extend(["--workers", "2"]);
    }
    args.extend_from_slice(extra);
    let ringlb = Ringlb::start(&args);
    (backend, ringlb)
}

/// Sends a payload through an echo backend and reads it back while it is
/// being sent; the end of the client's stream must come back as the end of
/// the echo.
fn round_trip(ringlb: &Ringlb, len: u64, seed: u64) {
    let stream = ringlb.connect();
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let digest = send_payload(&mut writer, seed, len).expect("send");
        writer.shutdown(Shutdown::Write).expect("half-close");
        digest
    });
    let received = read_digest(&mut &stream).expect("read echo");
    let sent = sender.join().unwrap();
    assert_eq!(received, sent, "payload of {len} bytes came back different");
}

#[test]
fn payloads_from_zero_bytes_to_64_mib_are_relayed_exactly() {
    let (_backend, ringlb) = echo_proxy(&[]);
    let sizes = [
        0,
        1,
        100,
        16 * 1024 - 1,
        16 * 1024,
        16 * 1024 + 1,
        1 << 20,
        (3 << 20) + 7,
        64 << 20,
    ];
    for (i, &len) in sizes.iter().enumerate() {
        round_trip(&ringlb, len, 1000 + i as u64);
    }
}

#[test]
fn bulk_download_and_upload_are_exact_with_half_close() {
    // Download: the backend streams 64 MiB and ends; the client sends nothing.
    let download = Backend::start(Arc::new(|mut s: TcpStream| {
        let _ = send_payload(&mut s, 7, 64 << 20);
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.read_to_end(&mut Vec::new());
    }));
    let addr = download.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr]);
    let mut s = ringlb.connect();
    let got = read_digest(&mut s).unwrap();
    let mut expected = Digest::default();
    let mut payload = Payload::new(7);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..64 {
        payload.fill(&mut buf);
        expected.update(&buf);
    }
    assert_eq!(got, expected);

    // Upload: the client sends 64 MiB and half-closes; the backend sees the
    // end, and only then answers with what it received.
    let upload = Backend::start(Arc::new(|mut s: TcpStream| {
        // Health checks connect too and end with a reset: ignore those.
        let Ok(digest) = read_digest(&mut s) else {
            return;
        };
        let _ = s.write_all(format!("{} {}", digest.len, digest.hash).as_bytes());
    }));
    let addr = upload.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr]);
    let mut s = ringlb.connect();
    let sent = send_payload(&mut s, 9, 64 << 20).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, format!("{} {}", sent.len, sent.hash));
}

#[test]
fn a_paused_bulk_upload_does_not_stall_other_connections() {
    // One worker: every connection shares its event loop.
    let (_backend, ringlb) = echo_proxy(&["--workers", "1"]);
    let mut bulk = ringlb.connect();
    let mut reader = bulk.try_clone().unwrap();
    let drain = std::thread::spawn(move || read_digest(&mut reader));
    // Full buffers switch the upload to splicing; then the client pauses.
    send_payload(&mut bulk, 3, 4 << 20).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let mut other = ringlb.connect();
    other
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    other.write_all(b"still there?").unwrap();
    let mut answer = [0u8; 12];
    other
        .read_exact(&mut answer)
        .expect("served while the other client pauses");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    bulk.shutdown(Shutdown::Write).unwrap();
    assert_eq!(drain.join().unwrap().unwrap().len, 4 << 20);
}

#[test]
fn backend_half_close_lets_the_client_keep_sending() {
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&received);
    let backend = Backend::start(Arc::new(move |mut s: TcpStream| {
        let _ = s.write_all(b"bye");
        let _ = s.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        sink.lock().unwrap().extend_from_slice(&rest);
    }));
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr]);
    let mut s = ringlb.connect();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(
        got, b"bye",
        "the backend's end of stream reached the client"
    );
    s.write_all(b"late words").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(eventually(Duration::from_secs(5), || received
        .lock()
        .unwrap()
        .as_slice()
        == b"late words"));
}

#[test]
fn a_thousand_concurrent_connections() {
    raise_fd_limit();
    let (_backend, ringlb) = echo_proxy(&[]);
    let streams: Vec<TcpStream> = (0..1000).map(|_| ringlb.connect()).collect();
    for (i, mut s) in streams.iter().enumerate() {
        s.write_all(format!("hello {i:04}\n").as_bytes()).unwrap();
    }
    for (i, mut s) in streams.iter().enumerate() {
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, format!("hello {i:04}\n").as_bytes());
    }
    for s in &streams {
        s.shutdown(Shutdown::Write).unwrap();
    }
    for mut s in streams {
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
    }
}

#[test]
fn a_backend_reset_mid_stream_resets_the_client() {
    let backend = Backend::start(Arc::new(|mut s: TcpStream| {
        let mut ack = [0u8; 3];
        if s.write_all(&[b'x'; 1000]).is_err() || s.read_exact(&mut ack).is_err() {
            return; // a health check
        }
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    }));
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr]);
    let mut s = ringlb.connect();
    let mut first = [0u8; 1000];
    s.read_exact(&mut first).unwrap();
    s.write_all(b"ack").unwrap();
    let started = Instant::now();
    let err = s
        .read(&mut [0u8; 16])
        .expect_err("the reset must be passed on, not a clean end");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        ringlb
            .wait_log("backend reset", Duration::from_secs(2))
            .is_some(),
        "{}",
        ringlb.logs()
    );
}

/// The kernel reports a peer's reset once: when ringlb's send to the
/// backend is what sees it, the receive on that socket then finds a plain
/// end of stream. The client must still get a reset, never a clean end.
/// (The client can't tell on its own: its writing thread takes the one
/// report of ringlb's reset, and its read then sees 0 either way; so
/// ringlb's own line for each connection says how it ended it.)
#[test]
fn a_backend_reset_seen_by_a_send_still_resets_the_client() {
    let backend = Backend::start(Arc::new(|mut s: TcpStream| {
        let mut some = [0u8; 64 * 1024];
        if s.read_exact(&mut some).is_err() {
            return; // a health check
        }
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    }));
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr, "--workers", "1"]);
    const CLIENTS: usize = 40;
    for _ in 0..CLIENTS {
        let mut s = ringlb.connect();
        let mut writer = s.try_clone().expect("clone");
        let upload = std::thread::spawn(move || {
            let chunk = vec![7u8; 64 * 1024];
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && writer.write_all(&chunk).is_ok() {}
        });
        let _ = s.read(&mut [0u8; 16]);
        drop(s);
        upload.join().expect("upload thread");
    }
    let ended = |what: &str| {
        ringlb
            .logs()
            .lines()
            .filter(|l| l.contains(&format!("-> {addr}:")) && l.ends_with(what))
            .count()
    };
    assert!(
        ringlb
            .wait_log_count(&format!("-> {addr}:"), CLIENTS, Duration::from_secs(20))
            .is_some(),
        "{}",
        ringlb.logs()
    );
    assert_eq!(
        (ended("backend reset"), ended("closed by both sides")),
        (CLIENTS, 0),
        "a backend's reset ended clients cleanly; logs:\n{}",
        ringlb.logs()
    );
}

#[test]
fn bytes_sent_before_a_backend_reset_still_reach_a_slow_client() {
    // The backend sends 2 MiB, waits until ringlb's kernel has acknowledged
    // all of it, then resets. The client reads only later. Every byte the
    // backend delivered must reach the client before the reset does.
    const LEN: u64 = 2 << 20;
    let reset = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&reset);
    let backend = Backend::start(Arc::new(move |mut s: TcpStream| {
        let mut req = [0u8; 3];
        if s.read_exact(&mut req).is_err() || &req != b"req" {
            return; // a health check
        }
        let _ = send_payload(&mut s, 11, LEN);
        while unacked(&s) > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
        flag.store(true, SeqCst);
    }));
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr]);
    let mut s = ringlb.connect();
    s.write_all(b"req").unwrap();
    assert!(eventually(Duration::from_secs(10), || reset.load(SeqCst)));
    std::thread::sleep(Duration::from_millis(300));
    let mut got = Digest::default();
    let mut buf = vec![0u8; 1 << 16];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Err(e) => break Err(e.kind()),
            Ok(n) => got.update(&buf[..n]),
        }
    };
    let mut expected = Digest::default();
    let mut payload = Payload::new(11);
    let mut chunk = vec![0u8; 256 * 1024];
    for _ in 0..LEN / chunk.len() as u64 {
        payload.fill(&mut chunk);
        expected.update(&chunk);
    }
    assert_eq!(got.len, LEN, "bytes lost when the reset was passed on");
    assert_eq!(got, expected);
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "then the reset itself is passed on"
    );
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

#[test]
fn a_client_reset_resets_the_backend() {
    let outcome = Arc::new(std::sync::Mutex::new(None));
    let seen = Arc::clone(&outcome);
    let backend = Backend::start(Arc::new(move |mut s: TcpStream| {
        let mut buf = [0u8; 64];
        if !matches!(s.read(&mut buf), Ok(2)) || &buf[..2] != b"hi" {
            return; // a health check
        }
        let _ = s.write_all(b"ok");
        let result = s.read(&mut buf);
        *seen.lock().unwrap() = Some(result.map_err(|e| e.kind()));
    }));
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr]);
    let mut s = ringlb.connect();
    s.write_all(b"hi").unwrap();
    let mut ok = [0u8; 2];
    s.read_exact(&mut ok).unwrap();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    assert!(eventually(Duration::from_secs(5), || outcome
        .lock()
        .unwrap()
        .is_some()));
    assert_eq!(
        *outcome.lock().unwrap(),
        Some(Err(ErrorKind::ConnectionReset))
    );
}

#[test]
fn a_vanished_client_closes_the_backend_side() {
    let ended = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ended);
    let backend = Backend::start(Arc::new(move |mut s: TcpStream| {
        let _ = s.read_to_end(&mut Vec::new());
        // Keep writing until the proxy gives up on the gone client.
        while s.write_all(&[0u8; 4096]).is_ok() {}
        flag.store(true, SeqCst);
    }));
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr]);
    let s = ringlb.connect();
    drop(s);
    assert!(
        eventually(Duration::from_secs(5), || ended.load(SeqCst)),
        "{}",
        ringlb.logs()
    );
}

#[test]
fn idle_connections_are_closed_and_busy_ones_kept() {
    let (_backend, ringlb) = echo_proxy(&["--idle-timeout", "400ms"]);
    let mut busy = ringlb.connect();
    let mut idle = ringlb.connect();
    idle.write_all(b"x").unwrap();
    idle.read_exact(&mut [0u8; 1]).unwrap();
    let started = Instant::now();
    for _ in 0..12 {
        busy.write_all(b"y").unwrap();
        busy.read_exact(&mut [0u8; 1]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        idle.read(&mut [0u8; 1]).unwrap(),
        0,
        "the idle connection was closed"
    );
    let closed_after = started.elapsed();
    assert!(
        closed_after >= Duration::from_millis(350),
        "closed too early: {closed_after:?}"
    );
    busy.write_all(b"z").unwrap();
    busy.read_exact(&mut [0u8; 1])
        .expect("the busy connection is still open after 1.2 s");
    assert_eq!(ringlb.count_logs("idle timeout"), 1, "{}", ringlb.logs());
}

#[test]
fn a_hung_backend_is_cut_by_the_idle_timeout() {
    let backend = Backend::start(Arc::new(|s: TcpStream| {
        std::thread::sleep(Duration::from_secs(10));
        drop(s);
    }));
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr, "--idle-timeout", "300ms"]);
    let mut s = ringlb.connect();
    s.write_all(b"anyone?").unwrap();
    let started = Instant::now();
    assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn sigterm_drains_open_connections_then_exits() {
    let (_backend, mut ringlb) = echo_proxy(&[]);
    let mut open = ringlb.connect();
    open.write_all(b"a").unwrap();
    open.read_exact(&mut [0u8; 1]).unwrap();
    ringlb.signal(libc::SIGTERM);
    assert!(
        ringlb
            .wait_log("draining", Duration::from_secs(2))
            .is_some()
    );
    // New connections are no longer accepted...
    assert!(eventually(Duration::from_secs(2), || TcpStream::connect(
        ringlb.addr
    )
    .is_err()));
    // ...while the open one still works until it ends.
    open.write_all(b"b").unwrap();
    open.read_exact(&mut [0u8; 1]).unwrap();
    open.shutdown(Shutdown::Write).unwrap();
    assert_eq!(open.read(&mut [0u8; 1]).unwrap(), 0);
    let status =
        wait_exit(&mut ringlb, Duration::from_secs(5)).expect("ringlb exits after the drain");
    assert!(status.success());
}

fn wait_exit(ringlb: &mut Ringlb, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = ringlb.child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A backend for the buffer-exhaustion test. A client that sends `S` and an
/// id gets a stream of 1,000-byte messages, one every 200 us (each arrives
/// alone, so ringlb copies it through a ring buffer), until a write has
/// been blocked for 300 ms: the client does not read, so ringlb's send to
/// it is stuck holding that buffer. The digest of what was written is kept
/// under the id. A client that sends `E` gets an echo.
fn stalling_backend(written: Arc<std::sync::Mutex<Vec<(u8, Digest)>>>) -> Backend {
    Backend::start(Arc::new(move |mut s: TcpStream| {
        let mut hello = [0u8; 2];
        if s.read_exact(&mut hello).is_err() {
            return; // a health check
        }
        if hello[0] == b'E' {
            let _ = s.write_all(&hello[1..]);
            return echo()(s);
        }
        s.set_write_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut payload = Payload::new(u64::from(hello[1]));
        let mut digest = Digest::default();
        let mut chunk = [0u8; 1000];
        let mut sent = chunk.len();
        loop {
            if sent == chunk.len() {
                payload.fill(&mut chunk);
                sent = 0;
                std::thread::sleep(Duration::from_micros(200));
            }
            match s.write(&chunk[sent..]) {
                Ok(n) => {
                    digest.update(&chunk[sent..sent + n]);
                    sent += n;
                }
                Err(_) => break,
            }
        }
        written.lock().unwrap().push((hello[1], digest));
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.read_to_end(&mut Vec::new());
    }))
}

#[test]
fn exhausted_buffers_fall_back_to_splice_and_lose_nothing() {
    // One worker with two receive buffers, and streams of small messages
    // (copied through ring buffers) to clients that do not read: each send
    // that cannot complete holds its buffer. Streams are added until a
    // receive finds both buffers held and moves its direction to splice.
    // Those streams must still deliver every byte once their clients read,
    // and a new client must be served meanwhile.
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = stalling_backend(Arc::clone(&written));
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&[
        "--backend",
        &addr,
        "--workers",
        "1",
        "--buffers",
        "2",
        "--stats",
        "127.0.0.1:0",
    ]);
    let series = "ringlb_frontend_buffers_exhausted_total{frontend=\"default\"}";
    let exhausted = || ringlb.metric(series).expect("the exhaustion counter");
    let mut stalled = Vec::new();
    for id in 1..=24u8 {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&ringlb.addr.into()).unwrap();
        let mut s = TcpStream::from(socket);
        s.write_all(&[b'S', id]).unwrap();
        stalled.push((s, id));
        if id % 4 == 0 {
            assert!(
                eventually(Duration::from_secs(10), || written.lock().unwrap().len()
                    == stalled.len()),
                "the stalled streams never filled up; logs:\n{}",
                ringlb.logs()
            );
            if exhausted() > 0 {
                break;
            }
        }
    }
    assert!(
        exhausted() > 0,
        "24 stalled streams never held both buffers"
    );

    let mut c = ringlb.connect();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"E!").unwrap();
    let mut reader = c.try_clone().unwrap();
    let back = std::thread::spawn(move || read_digest(&mut reader));
    send_payload(&mut c, 5, 1 << 20).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut expected = Digest::default();
    expected.update(b"!");
    let mut buf = vec![0u8; 1 << 20];
    Payload::new(5).fill(&mut buf);
    expected.update(&buf);
    assert_eq!(
        back.join().unwrap().expect("echo while buffers are short"),
        expected
    );

    for (mut s, id) in stalled {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let got = read_digest(&mut s).expect("the stalled stream completes");
        let want = written
            .lock()
            .unwrap()
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, d)| *d)
            .unwrap();
        assert!(want.len > 0);
        assert_eq!(got, want, "stream {id}: every byte, once, in order");
    }
}
