//! Balancing over real backends: exact round robin, active-passive order,
//! retries that hide refusing and hanging backends from clients.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn spread(addr: SocketAddr, connections: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..connections {
        let name = which(addr).expect("every connection reaches a backend");
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

#[test]
fn round_robin_spreads_exactly_across_workers() {
    let a = Backend::start(named("a"));
    let b = Backend::start(named("b"));
    let (a_addr, b_addr) = (a.addr_str(), b.addr_str());
    let ringlb = Ringlb::start(&["--backend", &a_addr, "--backend", &b_addr, "--workers", "2"]);
    let counts = spread(ringlb.addr, 200);
    assert_eq!(counts.get("a"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&100), "{counts:?}");
}

#[test]
fn active_passive_sends_all_to_the_first_then_to_the_second() {
    let mut a = Backend::start(named("a"));
    let b = Backend::start(named("b"));
    let (a_addr, b_addr) = (a.addr_str(), b.addr_str());
    let ringlb = Ringlb::start(&[
        "--mode",
        "active-passive",
        "--backend",
        &a_addr,
        "--backend",
        &b_addr,
    ]);
    assert_eq!(spread(ringlb.addr, 20).get("a"), Some(&20));
    a.kill();
    // No client failure: the first refused connect is retried on b, and a is
    // marked down on the spot by the failures seen on traffic.
    assert_eq!(spread(ringlb.addr, 20).get("b"), Some(&20));
    assert!(
        ringlb
            .wait_log(&format!("backend {a_addr} is DOWN"), Duration::from_secs(3))
            .is_some()
    );
}

#[test]
fn a_refusing_backend_costs_clients_nothing() {
    let dead = refused_addr().to_string();
    let live = Backend::start(named("live"));
    let live_addr = live.addr_str();
    // The dead backend is first, so the very first connections try it.
    let ringlb = Ringlb::start(&[
        "--backend",
        &dead,
        "--backend",
        &live_addr,
        "--check-interval",
        "1h",
    ]);
    let counts = spread(ringlb.addr, 50);
    assert_eq!(counts.get("live"), Some(&50), "{counts:?}");
    assert!(
        ringlb.count_logs("connect to backend") >= 1,
        "the dead backend was tried:\n{}",
        ringlb.logs()
    );
}

/// A backend whose accept queue is full: SYNs are dropped, connects hang.
fn hanging_backend() -> (socket2::Socket, Vec<TcpStream>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let fillers = (0..2)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    (socket, fillers)
}

#[test]
fn a_hanging_connect_times_out_and_is_retried() {
    let (hang, _fillers) = hanging_backend();
    let hang_addr = hang.local_addr().unwrap().as_socket().unwrap().to_string();
    let live = Backend::start(named("live"));
    let live_addr = live.addr_str();
    let ringlb = Ringlb::start(&[
        "--backend",
        &hang_addr,
        "--backend",
        &live_addr,
        "--connect-timeout",
        "200ms",
        "--check-interval",
        "1h",
        "--fall",
        "2",
    ]);
    let started = Instant::now();
    let counts = spread(ringlb.addr, 10);
    assert_eq!(counts.get("live"), Some(&10), "{counts:?}");
    assert!(
        ringlb
            .wait_log(
                &format!("backend {hang_addr} is DOWN"),
                Duration::from_secs(1)
            )
            .is_some()
    );
    // Two timeouts of 200 ms mark it down; after that nobody waits.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn with_every_backend_down_clients_are_closed_at_once_and_served_again_later() {
    let first = refused_addr();
    let second = refused_addr();
    let (first_s, second_s) = (first.to_string(), second.to_string());
    let ringlb = Ringlb::start(&[
        "--backend",
        &first_s,
        "--backend",
        &second_s,
        "--check-interval",
        "100ms",
        "--rise",
        "2",
    ]);
    assert!(
        ringlb
            .wait_log("has no backend up", Duration::from_secs(3))
            .is_some(),
        "{}",
        ringlb.logs()
    );
    for _ in 0..20 {
        let started = Instant::now();
        // A reset, not a clean end: the client must not take "nothing" for
        // a whole (empty) answer.
        let mut s = TcpStream::connect(ringlb.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 1];
        match s.read(&mut buf) {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("no backend, yet a clean end after {n} bytes"),
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "closed at once, not left hanging"
        );
    }
    // Idle while everything is down: no spinning on the closed clients.
    let cpu_before = ringlb.cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let cpu_used = ringlb.cpu_time() - cpu_before;
    assert!(
        cpu_used < Duration::from_millis(150),
        "ringlb used {cpu_used:?} of CPU while idle"
    );
    let _back = Backend::start_at(second, named("back"), false);
    assert!(
        eventually(Duration::from_secs(3), || which(ringlb.addr).is_ok()),
        "{}",
        ringlb.logs()
    );
    assert_eq!(spread(ringlb.addr, 5).get("back"), Some(&5));
}

/// Beyond maxconn a client waits in the kernel's accept queue (connected,
/// nothing relayed) and is served once another leaves; never closed.
#[test]
fn maxconn_holds_connections_beyond_the_limit_until_others_close() {
    let backend = Backend::start(echo());
    let addr = backend.addr_str();
    let ringlb = Ringlb::start(&["--backend", &addr, "--maxconn", "3", "--workers", "1"]);
    let held: Vec<TcpStream> = (0..3).map(|_| ringlb.connect()).collect();
    for mut s in &held {
        std::io::Write::write_all(&mut s, b"x").unwrap();
        std::io::Read::read_exact(&mut s, &mut [0u8; 1]).unwrap();
    }
    let mut extra = ringlb.connect();
    std::io::Write::write_all(&mut extra, b"y").unwrap();
    extra.set_nonblocking(true).unwrap();
    // Until ringlb says it holds clients at maxconn, or ends this one.
    let mut got = Err(std::io::ErrorKind::WouldBlock.into());
    eventually(Duration::from_secs(10), || {
        got = std::io::Read::read(&mut extra, &mut [0u8; 1]);
        ringlb.count_logs("maxconn (3)") > 0
            || !matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    });
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the fourth connection waits, neither served nor closed: {got:?}"
    );
    assert!(ringlb.count_logs("maxconn (3)") > 0, "{}", ringlb.logs());
    extra.set_nonblocking(false).unwrap();
    drop(held);
    let mut echoed = [0u8; 1];
    std::io::Read::read_exact(&mut extra, &mut echoed).expect("served once others left");
    assert_eq!(&echoed, b"y");
}
