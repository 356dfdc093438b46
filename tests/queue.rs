//! Per-backend maxconn, the queue in front of a full backend, and connect
//! retries, over real sockets: a full backend never takes one connection
//! more (across workers too), the rest wait and are served in turn with
//! every byte, a queue timeout is a reset and is counted, a client that
//! leaves the queue frees its place, and a refused connect is retried.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(20);
const PAYLOAD: u64 = 48 * 1024;

/// A backend that echoes until the client's end of stream, then holds the
/// connection open until the test hands out a permit, and counts how many
/// connections it has at once. Health checks (connect, then close without
/// a byte) are not counted: the first check comes within a second of the
/// start whatever the interval.
#[derive(Clone, Default)]
struct Gate {
    permits: Arc<(Mutex<usize>, Condvar)>,
    open: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
}

impl Gate {
    fn handler(&self) -> Handler {
        let gate = self.clone();
        Arc::new(move |mut stream: TcpStream| {
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            gate.served.fetch_add(1, SeqCst);
            let now = gate.open.fetch_add(1, SeqCst) + 1;
            gate.most.fetch_max(now, SeqCst);
            while stream.write_all(&buf[..n]).is_ok() {
                n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
            }
            gate.wait();
            // Counted out before the close ringlb sees, so `most` never
            // shows an overlap that ringlb did not make.
            gate.open.fetch_sub(1, SeqCst);
            let _ = stream.shutdown(Shutdown::Both);
        })
    }

    fn release(&self, n: usize) {
        let (lock, ready) = &*self.permits;
        *lock.lock().unwrap() += n;
        ready.notify_all();
    }

    fn wait(&self) {
        let (lock, ready) = &*self.permits;
        let mut permits = lock.lock().unwrap();
        while *permits == 0 {
            permits = ready.wait(permits).unwrap();
        }
        *permits -= 1;
    }

    fn open(&self) -> usize {
        self.open.load(SeqCst)
    }

    fn most(&self) -> usize {
        self.most.load(SeqCst)
    }

    /// Client connections that reached the backend (checks aside).
    fn served(&self) -> usize {
        self.served.load(SeqCst)
    }
}

/// A client on its own thread: sends `PAYLOAD` seeded bytes, ends its
/// stream, reads the echo to the end and checks it, byte for byte.
fn echo_client(addr: SocketAddr, seed: u64) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(WAIT * 2)).unwrap();
        let sent = send_payload(&mut stream, seed, PAYLOAD).map_err(|e| format!("send: {e}"))?;
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        let got = read_digest(&mut stream).map_err(|e| format!("read: {e}"))?;
        if got != sent {
            return Err(format!(
                "client {seed}: the echo differs from what was sent"
            ));
        }
        Ok(())
    })
}

struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(tag: &str, text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("ringlb-queue-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("ringlb.toml");
        std::fs::write(&path, text).expect("write the config");
        ConfigFile(path)
    }

    fn start(&self) -> Ringlb {
        Ringlb::start_raw(&[
            "--config",
            self.0.to_str().expect("utf-8 path"),
            "--stats",
            "127.0.0.1:0",
        ])
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One frontend "web" over one backend at `addr` with `maxconn`, plus
/// whatever frontend keys `extra` holds.
fn one_backend(
    tag: &str,
    workers: usize,
    addr: SocketAddr,
    maxconn: u32,
    extra: &str,
) -> ConfigFile {
    ConfigFile::new(
        tag,
        &format!(
            "workers = {workers}\n[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
             check-interval = \"1h\"\n{extra}\n\
             backends = [ {{ address = \"{addr}\", name = \"app\", maxconn = {maxconn} }} ]\n"
        ),
    )
}

fn metric(ringlb: &Ringlb, name: &str) -> u64 {
    ringlb
        .metric(&format!("{name}{{frontend=\"web\"}}"))
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

fn wait_metric(ringlb: &Ringlb, name: &str, value: u64) {
    let ok = eventually(WAIT, || metric(ringlb, name) == value);
    assert!(
        ok,
        "{name} stayed {} (wanted {value}); logs:\n{}",
        metric(ringlb, name),
        ringlb.logs()
    );
}

/// Reads until the connection ends: `Err` with the kind for a reset,
/// `Ok(bytes)` for a clean end of stream.
fn read_end(stream: &mut TcpStream) -> Result<Vec<u8>, ErrorKind> {
    let mut got = Vec::new();
    stream.read_to_end(&mut got).map_err(|e| e.kind())?;
    Ok(got)
}

#[test]
fn at_maxconn_the_rest_wait_in_the_queue_and_are_served_in_turn() {
    let gate = Gate::default();
    let backend = Backend::start(gate.handler());
    let config = one_backend("turn", 1, backend.addr, 2, "");
    let ringlb = config.start();
    let clients: Vec<_> = (0..5).map(|seed| echo_client(ringlb.addr, seed)).collect();
    wait_metric(&ringlb, "ringlb_frontend_queued", 3);
    assert!(eventually(WAIT, || gate.open() == 2));
    assert_eq!(gate.served(), 2, "only maxconn reached the backend");
    // Each connection that ends lets exactly one queued one in.
    for (served, queued) in [(3, 2), (4, 1), (5, 0)] {
        gate.release(1);
        assert!(
            eventually(WAIT, || gate.served() == served),
            "the next queued connection was not served; logs:\n{}",
            ringlb.logs()
        );
        wait_metric(&ringlb, "ringlb_frontend_queued", queued);
    }
    gate.release(2);
    for client in clients {
        client.join().expect("client thread").expect("served whole");
    }
    assert_eq!(
        gate.most(),
        2,
        "the backend never had more than its maxconn"
    );
    assert_eq!(metric(&ringlb, "ringlb_frontend_queued_total"), 3);
    assert_eq!(metric(&ringlb, "ringlb_frontend_queue_timeouts_total"), 0);
    let slots = "ringlb_backend_maxconn_slots_used{frontend=\"web\",backend=\"app\"}";
    assert!(eventually(WAIT, || ringlb.metric(slots) == Some(0)));
}

#[test]
fn a_queue_timeout_resets_the_client_and_is_counted() {
    let gate = Gate::default();
    let backend = Backend::start(gate.handler());
    let config = one_backend("timeout", 1, backend.addr, 1, "timeout-queue = \"300ms\"");
    let ringlb = config.start();
    let holder = echo_client(ringlb.addr, 1);
    assert!(eventually(WAIT, || gate.open() == 1));
    let mut waiting = ringlb.connect();
    waiting.write_all(b"hello").expect("send while queued");
    assert_eq!(
        read_end(&mut waiting),
        Err(ErrorKind::ConnectionReset),
        "a queue timeout is a reset, never a clean end"
    );
    wait_metric(&ringlb, "ringlb_frontend_queue_timeouts_total", 1);
    wait_metric(&ringlb, "ringlb_frontend_queued", 0);
    assert_eq!(gate.served(), 1);
    gate.release(1);
    holder.join().expect("client thread").expect("served whole");
}

#[test]
fn a_client_that_leaves_the_queue_frees_its_place() {
    let gate = Gate::default();
    let backend = Backend::start(gate.handler());
    let config = one_backend("leave", 1, backend.addr, 1, "timeout-queue = \"60s\"");
    let ringlb = config.start();
    let holder = echo_client(ringlb.addr, 1);
    assert!(eventually(WAIT, || gate.open() == 1));
    // One leaves with an end of stream, one with a reset; a third stays.
    let fin = ringlb.connect();
    let rst = ringlb.connect();
    wait_metric(&ringlb, "ringlb_frontend_queued", 2);
    let stays = echo_client(ringlb.addr, 2);
    wait_metric(&ringlb, "ringlb_frontend_queued", 3);
    drop(fin);
    socket2::SockRef::from(&rst)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(rst);
    // Well before the 60 s queue timeout.
    wait_metric(&ringlb, "ringlb_frontend_queued", 1);
    gate.release(2);
    stays.join().expect("client thread").expect("served whole");
    holder.join().expect("client thread").expect("served whole");
    assert_eq!(
        gate.served(),
        2,
        "the clients that left never reached the backend"
    );
    assert_eq!(metric(&ringlb, "ringlb_frontend_queue_timeouts_total"), 0);
}

#[test]
fn maxconn_holds_across_workers() {
    let gate = Gate::default();
    let backend = Backend::start(gate.handler());
    let config = one_backend("workers", 2, backend.addr, 3, "timeout-queue = \"60s\"");
    let ringlb = config.start();
    let clients: Vec<_> = (0..12).map(|seed| echo_client(ringlb.addr, seed)).collect();
    wait_metric(&ringlb, "ringlb_frontend_queued", 9);
    assert!(eventually(WAIT, || gate.open() == 3));
    assert_eq!(gate.served(), 3);
    // Let them through one at a time: a slot freed on one worker goes to a
    // client queued on either.
    for served in 4..=12 {
        gate.release(1);
        assert!(
            eventually(WAIT, || gate.served() == served),
            "stuck at {} served; logs:\n{}",
            gate.served(),
            ringlb.logs()
        );
    }
    gate.release(3);
    for client in clients {
        client.join().expect("client thread").expect("served whole");
    }
    assert_eq!(gate.most(), 3, "never more than maxconn at once");
}

#[test]
fn a_single_backend_that_refuses_once_is_retried_until_it_is_back() {
    let addr = refused_addr();
    let ringlb = Ringlb::start(&[
        "--backend",
        &addr.to_string(),
        "--check-interval",
        "1h",
        "--stats",
        "127.0.0.1:0",
    ]);
    let client = echo_client(ringlb.addr, 7);
    let failures = "ringlb_backend_connect_failures_total{frontend=\"default\"";
    let refused = || {
        let (_, body) = ringlb.scrape("/metrics");
        body.lines()
            .filter(|l| l.starts_with(failures))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert!(eventually(WAIT, || refused() >= 1));
    // The backend restarts: back 300 ms after the first refusal.
    std::thread::sleep(Duration::from_millis(300));
    let _backend = Backend::start_at(addr, echo(), false);
    client
        .join()
        .expect("client thread")
        .expect("served once the backend is back");
    let retries = ringlb
        .metric("ringlb_frontend_retries_total{frontend=\"default\"}")
        .expect("retries metric");
    assert!(retries >= 1, "served by a retry: {retries}");
    assert!(
        ringlb.count_logs("is DOWN") == 0,
        "one client's retries do not mark the backend down:\n{}",
        ringlb.logs()
    );
}

#[test]
fn retries_are_bounded_then_the_client_is_reset() {
    let addr = refused_addr();
    let ringlb = Ringlb::start(&[
        "--backend",
        &addr.to_string(),
        "--retries",
        "2",
        "--check-interval",
        "1h",
        "--stats",
        "127.0.0.1:0",
    ]);
    let mut client = ringlb.connect();
    assert_eq!(read_end(&mut client), Err(ErrorKind::ConnectionReset));
    let series = format!("{{frontend=\"default\",backend=\"{addr}\"}}");
    assert_eq!(
        ringlb.metric(&format!("ringlb_backend_connect_failures_total{series}")),
        Some(3),
        "1 attempt + 2 retries"
    );
    assert_eq!(
        ringlb.metric("ringlb_frontend_retries_total{frontend=\"default\"}"),
        Some(2)
    );
    assert_eq!(
        ringlb.metric("ringlb_frontend_no_backend_total{frontend=\"default\"}"),
        Some(1)
    );
}

/// "web" over a gated backend with `maxconn` (when given), then "other"
/// over an echo backend (when given).
fn frontends(web: Option<(SocketAddr, u32)>, other: Option<SocketAddr>) -> String {
    let mut text = String::from("drain-timeout = \"60s\"\n");
    if let Some((backend, maxconn)) = web {
        text.push_str(&format!(
            "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
             check-interval = \"1h\"\ntimeout-queue = \"60s\"\n\
             backends = [ {{ address = \"{backend}\", name = \"app\", maxconn = {maxconn} }} ]\n"
        ));
    }
    if let Some(addr) = other {
        text.push_str(&format!(
            "[[frontend]]\nname = \"other\"\nlisten = \"127.0.0.1:0\"\n\
             check-interval = \"1h\"\nbackends = [\"{addr}\"]\n"
        ));
    }
    text
}

fn reload(ringlb: &Ringlb, config: &ConfigFile, text: &str, n: usize) {
    std::fs::write(&config.0, text).expect("rewrite the config");
    ringlb.signal(libc::SIGHUP);
    let line = ringlb.wait_log(&format!("reload {n} "), WAIT);
    assert!(
        line.as_deref().is_some_and(|l| l.contains("applied")),
        "reload {n}: {line:?}; logs:\n{}",
        ringlb.logs()
    );
}

/// A raw client that sends a byte and waits in the queue.
fn queued_client(ringlb: &Ringlb) -> TcpStream {
    let mut stream = ringlb.connect();
    stream.write_all(b"x").expect("send while queued");
    stream
}

#[test]
fn queued_connections_wait_through_a_drain_and_a_stop_resets_them() {
    let gate = Gate::default();
    let backend = Backend::start(gate.handler());
    let config = ConfigFile::new("drain", &frontends(Some((backend.addr, 1)), None));
    let mut ringlb = config.start();
    let holder = echo_client(ringlb.addr, 1);
    assert!(eventually(WAIT, || gate.open() == 1));
    let waits = echo_client(ringlb.addr, 2);
    wait_metric(&ringlb, "ringlb_frontend_queued", 1);
    let mut cut = queued_client(&ringlb);
    wait_metric(&ringlb, "ringlb_frontend_queued", 2);
    ringlb.signal(libc::SIGTERM);
    assert!(ringlb.wait_log("draining", WAIT).is_some());
    // Draining, the queue keeps its clients and a freed slot still serves
    // the next one.
    gate.release(1);
    assert!(eventually(WAIT, || gate.served() == 2 && gate.open() == 1));
    holder.join().expect("client thread").expect("served whole");
    wait_metric(&ringlb, "ringlb_frontend_queued", 1);
    ringlb.signal(libc::SIGTERM);
    assert_eq!(
        read_end(&mut cut),
        Err(ErrorKind::ConnectionReset),
        "a stop resets a queued connection"
    );
    gate.release(10);
    let _ = waits.join().expect("client thread");
    assert!(
        ringlb.wait_exit(WAIT).is_some(),
        "ringlb exits after the stop"
    );
}

#[test]
fn a_reload_resets_the_queue_of_a_removed_frontend_and_reroutes_a_kept_one() {
    let gate = Gate::default();
    let backend = Backend::start(gate.handler());
    let other = Backend::start(echo());
    let config = ConfigFile::new(
        "reload",
        &frontends(Some((backend.addr, 1)), Some(other.addr)),
    );
    let ringlb = config.start();
    let holder = echo_client(ringlb.addr, 1);
    assert!(eventually(WAIT, || gate.open() == 1));
    // A kept frontend whose backend gets more room: the queued client is
    // served at once, the holder still holding its slot.
    let raised = echo_client(ringlb.addr, 2);
    wait_metric(&ringlb, "ringlb_frontend_queued", 1);
    let raised_config = frontends(Some((backend.addr, 2)), Some(other.addr));
    reload(&ringlb, &config, &raised_config, 1);
    assert!(eventually(WAIT, || gate.served() == 2));
    wait_metric(&ringlb, "ringlb_frontend_queued", 0);
    // Full again: a third client waits, then its frontend goes away.
    let mut dropped = queued_client(&ringlb);
    wait_metric(&ringlb, "ringlb_frontend_queued", 1);
    let only_other = frontends(None, Some(other.addr));
    reload(&ringlb, &config, &only_other, 2);
    assert_eq!(
        read_end(&mut dropped),
        Err(ErrorKind::ConnectionReset),
        "a queued connection of a removed frontend is reset"
    );
    // Connections already at the backend get the drain time.
    gate.release(2);
    holder.join().expect("client thread").expect("served whole");
    raised.join().expect("client thread").expect("served whole");
}
