//! Balancing over real backends: exact round robin, active-passive order,
//! retries that hide refusing and hanging backends from clients.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
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

// ---- Weights, leastconn, source, backups, slow start (issue 11). ----

/// A config file in the temp dir, removed on drop.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(tag: &str, text: &str) -> ConfigFile {
        let path =
            std::env::temp_dir().join(format!("ringlb-balance-{tag}-{}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        ConfigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts ringlb on `text` and waits for every frontend to listen.
fn start_config(file: &ConfigFile) -> Ringlb {
    Ringlb::start_raw(&["--config", file.path()])
}

/// The address a frontend listens on, from its listening line.
fn listening(ringlb: &Ringlb, name: &str) -> SocketAddr {
    let pattern = format!("frontend {name} listening on ");
    let line = ringlb
        .wait_log(&pattern, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{name} not listening; logs:\n{}", ringlb.logs()));
    line.split(&pattern)
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.parse().ok())
        .expect("listen address in log")
}

/// `{ address = ..., name = ..., KEYS }` for each (backend, name, keys).
fn tables(backends: &[(&Backend, &str, &str)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(b, name, keys)| {
            let keys = if keys.is_empty() {
                String::new()
            } else {
                format!(", {keys}")
            };
            format!("{{ address = \"{}\", name = \"{name}\"{keys} }}", b.addr)
        })
        .collect();
    list.join(", ")
}

/// `spread`, from `threads` clients at once, so both workers pick.
fn spread_parallel(addr: SocketAddr, threads: usize, each: usize) -> HashMap<String, usize> {
    let handles: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || spread(addr, each)))
        .collect();
    let mut total = HashMap::new();
    for h in handles {
        for (name, n) in h.join().expect("client thread") {
            *total.entry(name).or_insert(0) += n;
        }
    }
    total
}

#[test]
fn weights_are_exact_over_full_cycles_across_workers() {
    let (a, b, c, z) = (
        Backend::start(named("a")),
        Backend::start(named("b")),
        Backend::start(named("c")),
        Backend::start(named("z")),
    );
    let text = format!(
        "workers = 2\n[[frontend]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\nbackends = [{}]\n",
        tables(&[
            (&a, "a", "weight = 1"),
            (&b, "b", "weight = 2"),
            (&c, "c", "weight = 3"),
            (&z, "z", "weight = 0"),
        ])
    );
    let file = ConfigFile::new("weights", &text);
    let ringlb = start_config(&file);
    let addr = listening(&ringlb, "w");
    // 40 full cycles of 6, from 4 clients at once over 2 workers.
    let counts = spread_parallel(addr, 4, 60);
    assert_eq!(counts.get("a"), Some(&40), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&80), "{counts:?}");
    assert_eq!(counts.get("c"), Some(&120), "{counts:?}");
    assert_eq!(
        counts.get("z"),
        None,
        "weight 0 takes no connection: {counts:?}"
    );
}

/// Connects, reads the backend's name, keeps the connection open.
fn hold(addr: SocketAddr) -> (String, TcpStream) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut name = [0u8; 1];
    s.read_exact(&mut name).expect("a name");
    (String::from_utf8_lossy(&name).into_owned(), s)
}

#[test]
fn leastconn_sends_new_connections_away_from_long_held_ones() {
    let a = Backend::start(named("a"));
    let b = Backend::start(named("b"));
    let text = format!(
        "workers = 2\nstats = \"127.0.0.1:0\"\n[[frontend]]\nname = \"lc\"\nlisten = \"127.0.0.1:0\"\nbalance = \"leastconn\"\nbackends = [{}]\n",
        tables(&[(&a, "a", ""), (&b, "b", "")])
    );
    let file = ConfigFile::new("leastconn", &text);
    let ringlb = start_config(&file);
    let addr = listening(&ringlb, "lc");
    // Long sessions take turns while every one is held: 6 each.
    let sessions: Vec<_> = (0..12).map(|_| hold(addr)).collect();
    let on = |n: &str| sessions.iter().filter(|(name, _)| name == n).count();
    assert_eq!((on("a"), on("b")), (6, 6), "leastconn spreads equal loads");
    // b's end, a's stay.
    let held: Vec<_> = sessions.into_iter().filter(|(n, _)| n == "a").collect();
    let active = |name: &str| {
        ringlb.metric(&format!(
            "ringlb_backend_connections_active{{frontend=\"lc\",backend=\"{name}\"}}"
        ))
    };
    assert!(
        eventually(Duration::from_secs(10), || active("b") == Some(0)),
        "b's sessions never ended: {:?}",
        active("b")
    );
    assert_eq!(active("a"), Some(held.len() as u64));
    // Every short connection goes to b, which never holds more than one.
    let counts = spread(addr, 20);
    assert_eq!(counts.get("b"), Some(&20), "{counts:?}");
    drop(held);
    // With a's sessions over, both take turns again.
    assert!(
        eventually(Duration::from_secs(10), || {
            spread(addr, 10).get("a").copied().unwrap_or(0) >= 3
        }),
        "a never took new connections again"
    );
}

/// The backend a client bound to `source` (port chosen by the kernel)
/// reaches.
fn which_from(addr: SocketAddr, source: std::net::Ipv4Addr) -> String {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("client socket");
    let from = SocketAddr::from((source, 0));
    socket.bind(&from.into()).expect("bind the client's source");
    socket.connect(&addr.into()).expect("connect");
    let mut s = TcpStream::from(socket);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut name = String::new();
    s.read_to_string(&mut name).expect("a name");
    assert!(!name.is_empty(), "closed without a name");
    name
}

/// 127.0.0.2 to 127.0.0.81: eighty clients.
fn clients() -> Vec<std::net::Ipv4Addr> {
    (2..82)
        .map(|i| std::net::Ipv4Addr::new(127, 0, 0, i))
        .collect()
}

/// Where each client lands, asked three times (three source ports, so the
/// kernel's reuseport hash spreads them over the workers): always the same.
fn affinity(addr: SocketAddr) -> Vec<String> {
    clients()
        .into_iter()
        .map(|c| {
            let first = which_from(addr, c);
            for _ in 0..2 {
                assert_eq!(which_from(addr, c), first, "client {c} moved");
            }
            first
        })
        .collect()
}

#[test]
fn source_affinity_holds_across_workers_and_instances_and_a_lost_backend_moves_only_its_clients() {
    let a = Backend::start(named("a"));
    let b = Backend::start(named("b"));
    let mut c = Backend::start(named("c"));
    let d = Backend::start(named("d"));
    let text = format!(
        "workers = 2\n[[frontend]]\nname = \"src\"\nlisten = \"127.0.0.1:0\"\nbalance = \"source\"\n\
         check-interval = \"200ms\"\nfall = 1\nbackends = [{}]\n",
        tables(&[(&a, "a", ""), (&b, "b", ""), (&c, "c", ""), (&d, "d", "")])
    );
    let file = ConfigFile::new("source", &text);
    let ringlb = start_config(&file);
    let addr = listening(&ringlb, "src");
    let before = affinity(addr);
    let used: std::collections::HashSet<_> = before.iter().collect();
    assert_eq!(
        used.len(),
        4,
        "80 clients hash onto every backend: {before:?}"
    );
    // Another ringlb with the same config sends each client to the same
    // backend.
    let other = start_config(&file);
    assert_eq!(affinity(listening(&other, "src")), before);
    drop(other);

    c.kill();
    assert!(
        ringlb
            .wait_log("backend c is DOWN", Duration::from_secs(10))
            .is_some(),
        "c never marked down; logs:\n{}",
        ringlb.logs()
    );
    let after = affinity(addr);
    for ((client, was), is) in clients().iter().zip(&before).zip(&after) {
        if was == "c" {
            assert_ne!(is, "c", "client {client} still on c");
        } else {
            assert_eq!(is, was, "client {client} of {was} moved to {is}");
        }
    }
}

/// Writes `+NAME` and ends its stream while `healthy` (a check expecting
/// "+" passes); otherwise closes at once (the check fails).
fn switchable(name: &'static str, healthy: Arc<AtomicBool>) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        if !healthy.load(SeqCst) {
            return;
        }
        let _ = stream.write_all(format!("+{name}").as_bytes());
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    })
}

struct Switchable {
    backend: Backend,
    healthy: Arc<AtomicBool>,
}

impl Switchable {
    fn start(name: &'static str) -> Switchable {
        let healthy = Arc::new(AtomicBool::new(true));
        Switchable {
            backend: Backend::start(switchable(name, Arc::clone(&healthy))),
            healthy,
        }
    }

    fn set(&self, healthy: bool) {
        self.healthy.store(healthy, SeqCst);
    }
}

/// An unhealthy backend closes at once, so the check timeout only has to
/// be long enough that a loaded machine does not fail a healthy one (the
/// default, the interval, is 100 ms with fall 1).
const CHECKS: &str = "check-interval = \"100ms\"\ncheck-timeout = \"2s\"\ncheck-expect = \"+\"\nrise = 1\nfall = 1\n";

#[test]
fn backups_serve_only_while_every_primary_is_down() {
    let p1 = Switchable::start("p1");
    let p2 = Switchable::start("p2");
    let k1 = Switchable::start("k1");
    let k2 = Switchable::start("k2");
    // Backups listed first: order among the others decides, not position.
    let list = tables(&[
        (&k1.backend, "k1", "backup = true"),
        (&p1.backend, "p1", ""),
        (&k2.backend, "k2", "backup = true"),
        (&p2.backend, "p2", ""),
    ]);
    let frontend = |name: &str, keys: &str| {
        format!(
            "[[frontend]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{keys}\n{CHECKS}backends = [{list}]\n"
        )
    };
    let text = format!(
        "workers = 2\n{}{}",
        frontend("one", ""),
        frontend("all", "allbackups = true")
    );
    let file = ConfigFile::new("backups", &text);
    let ringlb = start_config(&file);
    let (one, all) = (listening(&ringlb, "one"), listening(&ringlb, "all"));
    let expect = |addr, pairs: &[(&str, usize)]| {
        let counts = spread_parallel(addr, 2, 20);
        let want: HashMap<String, usize> = pairs.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        assert_eq!(counts, want);
    };
    expect(one, &[("+p1", 20), ("+p2", 20)]);
    expect(all, &[("+p1", 20), ("+p2", 20)]);

    p1.set(false);
    assert!(
        ringlb
            .wait_log("backend p1 is DOWN", Duration::from_secs(10))
            .is_some()
    );
    expect(one, &[("+p2", 40)]);
    p2.set(false);
    assert!(
        ringlb
            .wait_log("backend p2 is DOWN", Duration::from_secs(10))
            .is_some()
    );
    expect(one, &[("+k1", 40)]);
    expect(all, &[("+k1", 20), ("+k2", 20)]);
    k1.set(false);
    assert!(
        ringlb
            .wait_log("backend k1 is DOWN", Duration::from_secs(10))
            .is_some()
    );
    expect(one, &[("+k2", 40)]);

    p2.set(true);
    assert!(
        ringlb
            .wait_log("backend p2 is UP", Duration::from_secs(10))
            .is_some()
    );
    expect(one, &[("+p2", 40)]);
    expect(all, &[("+p2", 40)]);
}

#[test]
fn slowstart_ramps_a_returning_backend_up_to_its_weight() {
    let a = Switchable::start("a");
    let b = Switchable::start("b");
    let text = format!(
        "workers = 2\n[[frontend]]\nname = \"ss\"\nlisten = \"127.0.0.1:0\"\nslowstart = \"8s\"\n\
         {CHECKS}backends = [{}]\n",
        tables(&[(&a.backend, "a", ""), (&b.backend, "b", "")])
    );
    let file = ConfigFile::new("slowstart", &text);
    let ringlb = start_config(&file);
    let addr = listening(&ringlb, "ss");
    // Up from the start: no ramp.
    let counts = spread(addr, 20);
    assert_eq!((counts.get("+a"), counts.get("+b")), (Some(&10), Some(&10)));
    a.set(false);
    assert!(
        ringlb
            .wait_log("backend a is DOWN", Duration::from_secs(10))
            .is_some()
    );
    a.set(true);
    assert!(
        ringlb
            .wait_log("backend a is UP", Duration::from_secs(10))
            .is_some()
    );
    let up = Instant::now();
    // Its first second: 1/20 to 3/20 of b's share.
    let early = spread(addr, 40);
    let early_a = early.get("+a").copied().unwrap_or(0);
    let took = up.elapsed();
    if took < Duration::from_secs(2) {
        assert!(
            early_a <= 8,
            "a took {early_a} of 40 right after it came back"
        );
    }
    assert!(early_a >= 1, "a took nothing while ramping: {early:?}");
    // Past the ramp (8 s): even again, exactly.
    let mut late = HashMap::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            late = spread(addr, 40);
            late.get("+a") == Some(&20)
        }),
        "a never came back to its full weight: {late:?}"
    );
    // At 5 s a is at 12/20 of b at most: 15 of 40.
    assert!(
        up.elapsed() >= Duration::from_secs(5),
        "no ramp: even too soon"
    );
}

#[test]
fn balance_on_the_command_line_and_its_conflict_with_mode() {
    let a = Backend::start(named("a"));
    let b = Backend::start(named("b"));
    let (a_addr, b_addr) = (a.addr_str(), b.addr_str());
    let ringlb = Ringlb::start(&[
        "--balance",
        "first",
        "--backend",
        &a_addr,
        "--backend",
        &b_addr,
    ]);
    assert_eq!(spread(ringlb.addr, 10).get("a"), Some(&10));
    drop(ringlb);

    let out = std::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--backend", &a_addr])
        .args(["--mode", "active-passive", "--balance", "leastconn"])
        .output()
        .expect("run ringlb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("contradicts"), "{stderr}");
}
