//! The stats endpoint over a real socket: Prometheus text that counts what
//! happened, backend state as health checks see it, and a 404 elsewhere.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn metrics_count_connections_bytes_and_backend_state() {
    // The backend answers with its name only, so the two byte counters
    // differ and cannot be swapped unnoticed.
    let live = Backend::start(named("live"));
    let live_name = live.addr_str();
    let dead_name = refused_addr().to_string();
    let ringlb = Ringlb::start(&[
        "--backend",
        &live_name,
        "--backend",
        &dead_name,
        "--check-interval",
        "100ms",
        "--fall",
        "1",
        "--stats",
        "127.0.0.1:0",
    ]);
    ringlb
        .wait_log(
            &format!("backend {dead_name} is DOWN"),
            Duration::from_secs(5),
        )
        .expect("the refusing backend is marked down");
    for _ in 0..3 {
        let mut s = ringlb.connect();
        s.write_all(&[7u8; 1000]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"live");
    }

    let frontend = |name: &str| format!("{name}{{frontend=\"default\"}}");
    let backend = |name: &str, b: &str| format!("{name}{{frontend=\"default\",backend=\"{b}\"}}");
    // Bytes are added when a connection is freed, just after the client sees
    // its end of stream.
    assert!(eventually(Duration::from_secs(5), || {
        ringlb.metric(&backend("ringlb_backend_bytes_sent_total", &live_name)) == Some(3000)
    }));
    let expect = [
        (frontend("ringlb_frontend_connections_total"), 3),
        (frontend("ringlb_frontend_connections_active"), 0),
        (frontend("ringlb_frontend_buffers_exhausted_total"), 0),
        (backend("ringlb_backend_connections_total", &live_name), 3),
        (backend("ringlb_backend_connections_total", &dead_name), 0),
        (
            backend("ringlb_backend_bytes_received_total", &live_name),
            12,
        ),
        (backend("ringlb_backend_up", &live_name), 1),
        (backend("ringlb_backend_up", &dead_name), 0),
        (backend("ringlb_backend_marked_down_total", &dead_name), 1),
        (backend("ringlb_backend_marked_down_total", &live_name), 0),
    ];
    let (status, body) = ringlb.scrape("/metrics");
    assert!(status.contains("200"), "{status}");
    for (series, value) in expect {
        let line = body
            .lines()
            .find(|l| l.starts_with(&format!("{series} ")))
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"));
        assert_eq!(line, format!("{series} {value}"), "in:\n{body}");
    }
    assert!(body.contains("# TYPE ringlb_backend_up gauge"));
    let (status, _) = ringlb.scrape("/nope");
    assert!(status.contains("404"), "{status}");
}

#[test]
fn stats_endpoint_takes_a_request_in_pieces_and_is_not_held_by_a_slow_client() {
    let backend = Backend::start(echo());
    let ringlb = Ringlb::start(&["--backend", &backend.addr_str(), "--stats", "127.0.0.1:0"]);
    let stats = ringlb.stats_addr();
    let get = |pieces: &[&[u8]]| {
        let mut s = TcpStream::connect(stats).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for piece in pieces {
            s.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response
    };
    let pieces = get(&[b"GET /met", b"rics HTTP/1.1\r\n", b"Host: x\r\n\r\n"]);
    assert!(pieces.starts_with("HTTP/1.1 200"), "{pieces}");
    assert!(pieces.contains("ringlb_frontend_connections_total"));
    // Bare line feeds, as some hand-written clients send (HTTP/0.9's
    // versionless request line is not HTTP/1 and gets a 400).
    let started = Instant::now();
    let bare_lf = get(&[b"GET /metrics HTTP/1.1\nHost: x\n\n"]);
    assert!(bare_lf.starts_with("HTTP/1.1 200"), "{bare_lf}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // A client that connects and sends nothing, then one that trickles a
    // byte at a time: neither may hold the endpoint past its deadline.
    let _silent = TcpStream::connect(stats).unwrap();
    let trickle = std::thread::spawn(move || {
        let mut s = TcpStream::connect(stats).unwrap();
        for _ in 0..40 {
            if s.write_all(b"G").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let after = get(&[b"GET /metrics HTTP/1.1\r\n\r\n"]);
    assert!(after.starts_with("HTTP/1.1 200"), "{after}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "a slow scraper held the endpoint for {:?}",
        started.elapsed()
    );
    trickle.join().unwrap();
}
