//! examples/redis.toml and examples/postgres.toml, as written (addresses
//! and ports aside), in front of real redis-server and PostgreSQL
//! processes: writes follow the master or primary through a promotion,
//! no write reaches a replica after the switch, and redis-benchmark and
//! pgbench run through ringlb without an error.
//!
//! The servers are Debian's packages (.ci/run installs them); a test
//! whose binaries are missing says so and returns, except under CI.

mod common;
#[path = "common/db.rs"]
mod db;

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use db::*;

/// Scheduling slack on top of a switch's own bound: the machine running
/// the tests is shared, and checks, servers and clients all wait for CPU.
const SLACK: Duration = Duration::from_secs(3);

// ---- What a writing client saw --------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Acknowledged by the server.
    Written,
    /// Refused because the server is a replica (Redis READONLY,
    /// PostgreSQL SQLSTATE 25006).
    ReadOnly,
    /// Any other error reply.
    Failed,
    /// No connection, or it ended: the client reconnects.
    Dropped,
}

/// One write (or attempt to connect) as a client saw it: when it ended,
/// which server (by port; 0 when none was reached) and how.
#[derive(Clone, Debug)]
struct Event {
    at: Instant,
    /// The write's number (its key or row); 0 for a failed connect.
    seq: u64,
    node: u16,
    outcome: Outcome,
    detail: String,
}

/// A client writing in a loop through ringlb, as an application with one
/// pooled connection does: it keeps its connection while it works, and
/// opens a new one (through ringlb again) only when the old one ends.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Event>>>,
    events: Arc<std::sync::Mutex<Vec<Event>>>,
}

/// A database session a writer drives: connect, say which server it
/// reached, write one row or key.
trait Session: Sized {
    fn open(addr: SocketAddr) -> std::io::Result<Self>;
    fn node(&mut self) -> std::io::Result<u16>;
    fn write(&mut self, seq: u64, node: u16) -> std::io::Result<(Outcome, String)>;
}

impl Session for Resp {
    fn open(addr: SocketAddr) -> std::io::Result<Self> {
        Resp::connect(addr)
    }

    fn node(&mut self) -> std::io::Result<u16> {
        self.server_port()
    }

    fn write(&mut self, seq: u64, node: u16) -> std::io::Result<(Outcome, String)> {
        let reply = self.call(&["SET", &format!("w:{seq}"), &node.to_string()])?;
        Ok(match reply {
            Reply::Status(s) if s == "OK" => (Outcome::Written, s),
            Reply::Error(e) if e.starts_with("READONLY") => (Outcome::ReadOnly, e),
            other => (Outcome::Failed, format!("{other:?}")),
        })
    }
}

impl Session for PgConn {
    fn open(addr: SocketAddr) -> std::io::Result<Self> {
        PgConn::connect(addr)
    }

    fn node(&mut self) -> std::io::Result<u16> {
        self.server_port()
    }

    fn write(&mut self, seq: u64, node: u16) -> std::io::Result<(Outcome, String)> {
        let sql = format!("insert into w (seq, node) values ({seq}, {node})");
        Ok(match self.query(&sql)? {
            Ok(_) => (Outcome::Written, String::new()),
            Err(e) if e.code == "25006" => (Outcome::ReadOnly, e.to_string()),
            Err(e) => (Outcome::Failed, e.to_string()),
        })
    }
}

impl Writer {
    fn start<S: Session + 'static>(addr: SocketAddr) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (flag, log) = (Arc::clone(&stop), Arc::clone(&events));
        let thread = std::thread::spawn(move || {
            let record = |seq, node, outcome, detail: String| {
                let event = Event {
                    at: Instant::now(),
                    seq,
                    node,
                    outcome,
                    detail,
                };
                log.lock().unwrap().push(event);
            };
            let mut seq = 0u64;
            while !flag.load(SeqCst) {
                let session = S::open(addr).and_then(|mut s| Ok((s.node()?, s)));
                let (node, mut session) = match session {
                    Ok(pair) => pair,
                    Err(e) => {
                        record(0, 0, Outcome::Dropped, e.to_string());
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                while !flag.load(SeqCst) {
                    seq += 1;
                    match session.write(seq, node) {
                        Ok((outcome, detail)) => record(seq, node, outcome, detail),
                        Err(e) => {
                            record(seq, node, Outcome::Dropped, e.to_string());
                            break;
                        }
                    }
                    // About a hundred writes a second: dense enough to
                    // time a switch, light on a shared machine.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            log.lock().unwrap().clone()
        });
        Writer {
            stop,
            thread: Some(thread),
            events,
        }
    }

    fn count(&self, node: u16, outcome: Outcome) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.node == node && e.outcome == outcome)
            .count()
    }

    /// The time of the first write acknowledged by `node`.
    fn first_written_on(&self, node: u16) -> Option<Instant> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.node == node && e.outcome == Outcome::Written)
            .map(|e| e.at)
    }

    fn finish(mut self) -> Vec<Event> {
        self.stop.store(true, SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Outcomes by (node, outcome), for assertion messages.
fn tally(events: &[Event]) -> BTreeMap<(u16, Outcome), usize> {
    let mut counts = BTreeMap::new();
    for e in events {
        *counts.entry((e.node, e.outcome)).or_insert(0) += 1;
    }
    counts
}

/// The events before `from`, and those from it on.
fn split(events: &[Event], from: Instant) -> (&[Event], &[Event]) {
    events.split_at(events.partition_point(|e| e.at < from))
}

/// Checks what a writer saw across a switch from `old` to `new`:
/// everything before `switch_started` was written on `old`; writes
/// reached `new` within `bound` of `switch_started`; from the first one
/// there on, every write was acknowledged by `new`, none refused, none
/// cut. Returns the number of writes acknowledged by `new`.
fn check_switch(
    events: &[Event],
    old: u16,
    new: u16,
    switch_started: Instant,
    bound: Duration,
) -> usize {
    let (before, after) = split(events, switch_started);
    assert!(
        before.len() >= 20
            && before
                .iter()
                .all(|e| e.node == old && e.outcome == Outcome::Written),
        "before the switch every write lands on {old}: {:?}",
        tally(before)
    );
    let followed = after
        .iter()
        .position(|e| e.node == new && e.outcome == Outcome::Written);
    let Some(followed) = followed else {
        panic!(
            "no write reached {new} after the switch: {:?}",
            tally(after)
        );
    };
    let (during, settled) = after.split_at(followed);
    let took = settled[0].at - switch_started;
    let mut samples: BTreeMap<Outcome, &str> = BTreeMap::new();
    for e in during {
        samples.entry(e.outcome).or_insert(&e.detail);
    }
    eprintln!(
        "writes followed {old} -> {new} in {took:?} (bound {bound:?} + slack {SLACK:?}); \
         during the switch: {:?}, e.g. {samples:?}",
        tally(during)
    );
    assert!(
        took <= bound + SLACK,
        "writes followed after {took:?}; bound {bound:?} + {SLACK:?}"
    );
    let strays: Vec<&Event> = settled
        .iter()
        .filter(|e| e.node != new || e.outcome != Outcome::Written)
        .collect();
    assert!(
        strays.is_empty(),
        "after the switch every write is acknowledged by {new}; {} were not, first: {:?}; all: {:?}",
        strays.len(),
        strays.first(),
        tally(settled)
    );
    settled.len()
}

// ---- Redis ------------------------------------------------------------------

/// Two redis-server processes, a master and its replica, and ringlb running
/// examples/redis.toml in front of them with its stats endpoint.
struct RedisSetup {
    master: Redis,
    replica: Redis,
    lb: FromExample,
    _scratch: Scratch,
}

fn redis_setup() -> Option<RedisSetup> {
    if !require("Redis test", &Redis::binaries_missing()) {
        return None;
    }
    let scratch = Scratch::new("redis");
    let ports = free_ports(2);
    let master = Redis::start(&scratch, "redis1", ports[0], None);
    let replica = Redis::start(&scratch, "redis2", ports[1], Some(ports[0]));
    let text = example_with(
        "redis.toml",
        &[
            listen("0.0.0.0:6379"),
            listen("0.0.0.0:6380"),
            quoted("10.0.0.31:6379", &master.addr().to_string()),
            quoted("10.0.0.32:6379", &replica.addr().to_string()),
        ],
    );
    let lb = FromExample::start(&with_stats(&text));
    Some(RedisSetup {
        master,
        replica,
        lb,
        _scratch: scratch,
    })
}

/// `listen = "ADDR"` to a free loopback port.
fn listen(addr: &str) -> (String, String) {
    (
        format!("listen = \"{addr}\""),
        "listen = \"127.0.0.1:0\"".to_string(),
    )
}

fn quoted(from: &str, to: &str) -> (String, String) {
    (format!("\"{from}\""), format!("\"{to}\""))
}

/// The config with a stats endpoint on a free port, for the tests to read
/// each backend's state per frontend.
fn with_stats(text: &str) -> String {
    format!("stats = \"127.0.0.1:0\"\n{text}")
}

/// Whether `backend` is up in `frontend`, per ringlb's metrics.
fn up(lb: &FromExample, frontend: &str, backend: &str) -> Option<bool> {
    let series = format!("ringlb_backend_up{{frontend=\"{frontend}\",backend=\"{backend}\"}}");
    lb.ringlb.metric(&series).map(|v| v == 1)
}

fn wait_up(lb: &FromExample, frontend: &str, backend: &str, want: bool, within: Duration) {
    assert!(
        eventually(within, || up(lb, frontend, backend) == Some(want)),
        "{backend} in {frontend} is not {} within {within:?}; logs:\n{}",
        if want { "up" } else { "down" },
        lb.ringlb.logs()
    );
}

/// The servers (by port) that `n` new connections to `addr` reached.
fn redis_nodes(addr: SocketAddr, n: usize) -> BTreeMap<u16, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let port = Resp::connect(addr)
            .and_then(|mut c| c.server_port())
            .expect("a read through ringlb");
        *seen.entry(port).or_insert(0) += 1;
    }
    seen
}

/// The master is promoted away: writes follow `role:master` within the
/// check bound, none reaches the demoted master after that, and reads
/// are served by both nodes before and after.
#[test]
fn redis_writes_follow_the_master_through_a_promotion() {
    let Some(setup) = redis_setup() else { return };
    let (master, replica, lb) = (&setup.master, &setup.replica, &setup.lb);
    let bound = lb.switch_bound("redis-write");
    // Backends start up: the replica takes no writes once it has failed
    // its `fall` master checks, and only active-passive's order protects
    // the writes before that.
    wait_up(lb, "redis-write", "redis2", false, bound + SLACK);
    assert_eq!(
        up(lb, "redis-write", "redis1"),
        Some(true),
        "{}",
        lb.ringlb.logs()
    );

    let write = lb.addr("redis-write");
    let read = lb.addr("redis-read");
    let writer = Writer::start::<Resp>(write);
    must("50 writes on the master", Duration::from_secs(20), || {
        writer.count(master.port, Outcome::Written) >= 50
    });
    let reads = redis_nodes(read, 10);
    let both: BTreeSet<u16> = [master.port, replica.port].into();
    assert_eq!(
        reads.keys().copied().collect::<BTreeSet<_>>(),
        both,
        "reads reach both nodes: {reads:?}"
    );

    let switch = Instant::now();
    master.switchover_to(replica);
    must(
        "writes follow the promoted replica",
        bound + SLACK + Duration::from_secs(5),
        || writer.first_written_on(replica.port).is_some(),
    );
    // Keep writing past a few more checks of the demoted master: it must
    // stay out of the write frontend.
    let followed = Instant::now();
    must("writes after the switch", Duration::from_secs(20), || {
        followed.elapsed() > bound && writer.count(replica.port, Outcome::Written) >= 100
    });
    let events = writer.finish();
    let written = check_switch(&events, master.port, replica.port, switch, bound);
    assert!(written >= 100, "{written}");

    // Every acknowledged write is on the new master, with the port of the
    // node that acknowledged it: none was lost in the switchover.
    let mut direct = Resp::connect(replica.addr()).expect("connect to the new master");
    for e in events.iter().filter(|e| e.outcome == Outcome::Written) {
        let key = format!("w:{}", e.seq);
        let value = direct.call(&["GET", &key]).map(|r| r.text());
        assert_eq!(value.ok(), Some(e.node.to_string()), "{key}");
    }
    assert!(
        master.info("replication").contains("role:slave"),
        "the old master is a replica now"
    );
    assert_eq!(
        up(lb, "redis-write", "redis1"),
        Some(false),
        "{}",
        lb.ringlb.logs()
    );
    let reads = redis_nodes(read, 10);
    assert_eq!(reads.len(), 2, "both nodes still serve reads: {reads:?}");
}

/// redis-benchmark's SETs and GETs through the write frontend: every one
/// answered without an error, and all of them by the master.
#[test]
fn redis_benchmark_through_ringlb_has_no_error() {
    let Some(setup) = redis_setup() else { return };
    let (master, lb) = (&setup.master, &setup.lb);
    let bound = lb.switch_bound("redis-write");
    wait_up(lb, "redis-write", "redis2", false, bound + SLACK);
    let write = lb.addr("redis-write");
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &write.port().to_string()])
        // It stops at the first error reply, exiting non-zero.
        .args(["-t", "set,get", "-n", "20000", "-q"])
        .output()
        .expect("run redis-benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // -q rewrites its progress line in place with \r: the results are the
    // last part of each line.
    let results: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.rsplit('\r').next())
        .filter(|l| l.contains("requests per second"))
        .collect();
    eprintln!("redis-benchmark through ringlb: {results:?}");
    assert!(
        out.status.success() && results.len() == 2,
        "redis-benchmark: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert!(
        !stdout.to_lowercase().contains("error") && !stderr.to_lowercase().contains("error"),
        "errors seen by redis-benchmark:\nstdout: {stdout}\nstderr: {stderr}"
    );
    let calls = |command: &str| -> u64 {
        master
            .info("commandstats")
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        calls("set") >= 20_000 && calls("get") >= 20_000,
        "the master served the benchmark: set {} get {}",
        calls("set"),
        calls("get")
    );
}

/// A new connection through the read frontend that reached `node`
/// (round robin: one of the next few does).
fn redis_session_on(addr: SocketAddr, node: u16) -> Resp {
    for _ in 0..20 {
        let mut session = Resp::connect(addr).expect("connect through ringlb");
        if session.server_port().expect("which node") == node {
            return session;
        }
    }
    panic!("twenty connections, none reached {node}");
}

/// A replica that hangs (SIGSTOP: its kernel still completes handshakes
/// and takes requests; nothing answers them) fails the PING check and
/// leaves the read frontend; the sessions it held are reset, not ended as
/// if the server had closed them; reads then all reach the master; once
/// it runs again it comes back after `rise` good checks.
#[test]
fn redis_reads_leave_a_hung_replica_and_its_sessions_are_reset() {
    let Some(setup) = redis_setup() else { return };
    let (master, lb) = (&setup.master, &setup.lb);
    let replica = setup.replica.port;
    let bound = lb.switch_bound("redis-read");
    let read = lb.addr("redis-read");
    let mut held = redis_session_on(read, replica);

    setup.replica.proc.freeze(true);
    let frozen = Instant::now();
    wait_up(lb, "redis-read", "redis2", false, bound + SLACK);
    eprintln!("hung replica marked down after {:?}", frozen.elapsed());
    let reply = held.call(&["GET", "k"]);
    assert!(
        matches!(&reply, Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)),
        "a session on a node marked down is reset: {reply:?}"
    );
    let reads = redis_nodes(read, 20);
    assert_eq!(
        reads.keys().copied().collect::<Vec<_>>(),
        [master.port],
        "reads avoid the hung replica: {reads:?}"
    );

    setup.replica.proc.freeze(false);
    wait_up(lb, "redis-read", "redis2", true, bound + SLACK);
    let reads = redis_nodes(read, 10);
    assert_eq!(reads.len(), 2, "the replica serves reads again: {reads:?}");
}

/// The `n`th check written out in a comment of `text` (the lines from
/// `#   check = [` to `#   ]`), uncommented.
fn commented_check(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("#   check = ["))
        .map(|(i, _)| i)
        .nth(n)
        .unwrap_or_else(|| panic!("no commented check #{n}"));
    let end = start
        + lines[start..]
            .iter()
            .position(|l| *l == "#   ]")
            .expect("the commented check's end");
    lines[start..=end]
        .iter()
        .map(|l| l.strip_prefix("#   ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// With `requirepass`, the ready-made checks get -NOAUTH and take every
/// node out; the steps examples/redis.toml gives for that case (AUTH,
/// then the check), used exactly as written there, find the master, and a
/// client that authenticates writes through ringlb to it.
#[test]
fn redis_with_a_password_follows_the_master_with_the_documented_steps() {
    if !require("Redis test", &Redis::binaries_missing()) {
        return;
    }
    const PASSWORD: &str = "s3cret-pw";
    let scratch = Scratch::new("redis-auth");
    let ports = free_ports(2);
    let master = Redis::start_with(&scratch, "redis1", ports[0], None, Some(PASSWORD));
    let replica = Redis::start_with(
        &scratch,
        "redis2",
        ports[1],
        Some(master.port),
        Some(PASSWORD),
    );
    let addresses = [
        listen("0.0.0.0:6379"),
        listen("0.0.0.0:6380"),
        quoted("10.0.0.31:6379", &master.addr().to_string()),
        quoted("10.0.0.32:6379", &replica.addr().to_string()),
    ];
    let as_written = example_with("redis.toml", &addresses);
    let steps = |n| commented_check(&as_written, n).replace("secret", PASSWORD);
    let authenticated = as_written
        .replacen(
            "\ncheck = \"redis-master\"\n",
            &format!("\n{}\n", steps(0)),
            1,
        )
        .replacen("\ncheck = \"redis\"\n", &format!("\n{}\n", steps(1)), 1);
    assert_ne!(authenticated, as_written);
    let lb = FromExample::start(&with_stats(&authenticated));
    let bound = lb.switch_bound("redis-write");
    wait_up(&lb, "redis-write", "redis2", false, bound + SLACK);
    for (frontend, backend, want) in [
        ("redis-write", "redis1", true),
        ("redis-read", "redis1", true),
        ("redis-read", "redis2", true),
    ] {
        assert_eq!(
            up(&lb, frontend, backend),
            Some(want),
            "{frontend} {backend}"
        );
        let failed = format!(
            "ringlb_backend_checks_failed_total{{frontend=\"{frontend}\",backend=\"{backend}\"}}"
        );
        assert_eq!(lb.ringlb.metric(&failed), Some(0), "{}", lb.ringlb.logs());
    }
    let mut client =
        Resp::connect_auth(lb.addr("redis-write"), Some(PASSWORD)).expect("AUTH through ringlb");
    assert_eq!(client.server_port().ok(), Some(master.port));
    assert_eq!(
        client.call(&["SET", "k", "v"]).ok(),
        Some(Reply::Status("OK".into()))
    );

    // The ready-made checks, as the file has them, cannot authenticate.
    let plain = FromExample::start(&with_stats(&as_written));
    for backend in ["redis1", "redis2"] {
        wait_up(&plain, "redis-write", backend, false, bound + SLACK);
        wait_up(&plain, "redis-read", backend, false, bound + SLACK);
    }
}

// ---- PostgreSQL -------------------------------------------------------------

/// A primary, its streaming replica, a sidecar for each, and ringlb
/// running examples/postgres.toml in front of them.
struct PgSetup {
    primary: Pg,
    replica: Pg,
    sidecars: [Sidecar; 2],
    lb: FromExample,
    scratch: Scratch,
}

fn pg_setup() -> Option<PgSetup> {
    if !require("PostgreSQL test", &pg_missing()) {
        return None;
    }
    let scratch = Scratch::new("pg");
    let ports = free_ports(2);
    let primary = Pg::primary(&scratch, "pg1", ports[0]);
    let replica = Pg::replica_of(&scratch, "pg2", ports[1], &primary);
    let sidecars = [
        Sidecar::start(&scratch, &primary),
        Sidecar::start(&scratch, &replica),
    ];
    let backend = |name: &str, example: &str, node: &Pg, sidecar: &Sidecar| {
        (
            format!("{{ address = \"{example}\", name = \"{name}\", check-port = 8008"),
            format!(
                "{{ address = \"{}\", name = \"{name}\", check-port = {}",
                node.addr(),
                sidecar.port
            ),
        )
    };
    let text = example_with(
        "postgres.toml",
        &[
            listen("0.0.0.0:5432"),
            listen("0.0.0.0:5433"),
            backend("pg1", "10.0.0.21:5432", &primary, &sidecars[0]),
            backend("pg2", "10.0.0.22:5432", &replica, &sidecars[1]),
        ],
    );
    let lb = FromExample::start(&with_stats(&text));
    Some(PgSetup {
        primary,
        replica,
        sidecars,
        lb,
        scratch,
    })
}

/// The sidecar's answers for one node: (/primary, /replica, /health).
fn roles(sidecar: &Sidecar) -> (u16, u16, u16) {
    (
        sidecar.status("/primary"),
        sidecar.status("/replica"),
        sidecar.status("/health"),
    )
}

/// Switchover: the primary is stopped, the replica promoted, the old
/// primary started again as a replica of the new one. Writes follow the
/// sidecars' GET /primary within the check bound; after that none reaches
/// a replica (the rejoined old primary included), and every acknowledged
/// write is on the new primary.
#[test]
fn postgres_writes_follow_the_primary_through_a_switchover() {
    let Some(mut setup) = pg_setup() else { return };
    assert_eq!(roles(&setup.sidecars[0]), (200, 503, 200));
    assert_eq!(roles(&setup.sidecars[1]), (503, 200, 200));
    setup
        .primary
        .query("create table w (seq bigint primary key, node int not null)");
    let lb = &setup.lb;
    let bound = lb.switch_bound("pg-write");
    wait_up(lb, "pg-write", "pg2", false, bound + SLACK);
    let (old, new) = (setup.primary.port, setup.replica.port);

    let writer = Writer::start::<PgConn>(lb.addr("pg-write"));
    must("30 writes on the primary", Duration::from_secs(20), || {
        writer.count(old, Outcome::Written) >= 30
    });

    let switch = Instant::now();
    setup.primary.stop();
    setup.replica.promote();
    let promoted = Instant::now();
    setup.primary.rejoin_as_replica_of(&setup.replica);
    setup.primary.wait_streaming();
    let seen = (roles(&setup.sidecars[0]), roles(&setup.sidecars[1]));
    assert_eq!(
        seen,
        ((503, 200, 200), (200, 503, 200)),
        "the sidecars see the switch: pg1 on {} ({}), pg2 on {}; pg1's sidecar:\n{}\npg1:\n{}",
        setup.primary.port,
        setup.sidecars[0].port,
        setup.replica.port,
        setup.sidecars[0].proc.log_text(),
        setup.primary.log_text()
    );
    must(
        "writes follow the promoted replica",
        bound + SLACK + Duration::from_secs(5),
        || writer.first_written_on(new).is_some(),
    );
    let followed = writer.first_written_on(new).unwrap_or(promoted);
    eprintln!(
        "stopped the primary, promoted the replica in {:?}, first write on it {:?} after",
        promoted - switch,
        followed.saturating_duration_since(promoted)
    );
    // Past a few more checks of the rejoined old primary, a replica now.
    let rejoined = Instant::now();
    must("writes after the switch", Duration::from_secs(30), || {
        rejoined.elapsed() > bound && writer.count(new, Outcome::Written) >= 100
    });
    let events = writer.finish();
    // The bound counts from the promotion: before it, no node was primary.
    let (_, from_promotion) = split(&events, promoted);
    let written_new = check_switch(&events, old, new, switch, bound + (promoted - switch));
    assert!(!from_promotion.is_empty());

    // Nothing acknowledged was lost, and every write after the switch is
    // on the new primary (and from there replicated to the old one).
    let count = |node: u16| {
        setup
            .replica
            .query(&format!("select count(*) from w where node = {node}"))
    };
    let acknowledged = |node: u16| {
        events
            .iter()
            .filter(|e| e.node == node && e.outcome == Outcome::Written)
            .count()
            .to_string()
    };
    assert_eq!(count(old), [acknowledged(old)]);
    assert_eq!(count(new), [acknowledged(new)]);
    assert_eq!(acknowledged(new), written_new.to_string());
    assert_eq!(
        up(lb, "pg-write", "pg1"),
        Some(false),
        "{}",
        lb.ringlb.logs()
    );
    drop(setup.scratch);
}

/// pgbench's TPC-B through the write frontend without a failed
/// transaction; SELECTs through the read frontend from both nodes, spread
/// by leastconn.
#[test]
fn pgbench_through_ringlb_and_reads_from_both_nodes() {
    let Some(setup) = pg_setup() else { return };
    let lb = &setup.lb;
    let bound = lb.switch_bound("pg-write");
    wait_up(lb, "pg-write", "pg2", false, bound + SLACK);
    let write = lb.addr("pg-write").port().to_string();
    let pgbench = |args: &[&str]| {
        let out = setup
            .primary
            .tool("pgbench")
            .args(["-h", "127.0.0.1", "-p", &write, "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .expect("run pgbench");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "pgbench {args:?}: {}\n{text}\nringlb:\n{}\npg1:\n{}",
            out.status,
            lb.ringlb.logs(),
            setup.primary.log_text()
        );
        text
    };
    pgbench(&["-i", "-q"]);
    let report = pgbench(&["-c", "4", "-T", "5"]);
    eprintln!("pgbench through ringlb:\n{report}");
    let processed = report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| {
            n.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        });
    assert!(processed.is_some_and(|n| n > 0), "{report}");
    assert!(
        report.contains("number of failed transactions: 0 ") && !report.contains("aborted"),
        "{report}"
    );

    // The replica has the data; reads through ringlb reach both nodes.
    must(
        "pgbench's tables replicated",
        Duration::from_secs(20),
        || {
            setup.replica.in_recovery() == Some(true)
                && PgConn::connect(setup.replica.addr())
                    .and_then(|mut c| c.query("select count(*) from pgbench_accounts"))
                    .is_ok_and(|r| r.is_ok_and(|rows| rows == [[Some("100000".to_string())]]))
        },
    );
    let read = lb.addr("pg-read");
    let mut sessions: Vec<(u16, PgConn)> = Vec::new();
    for _ in 0..4 {
        let mut session = PgConn::connect(read).expect("a read session");
        let node = session.server_port().expect("which node");
        let rows = session
            .query("select count(*) from pgbench_accounts")
            .expect("a read")
            .expect("a SELECT works on either node");
        assert_eq!(rows, [[Some("100000".to_string())]]);
        sessions.push((node, session));
    }
    let on =
        |sessions: &[(u16, PgConn)], node: u16| sessions.iter().filter(|s| s.0 == node).count();
    let (p1, p2) = (setup.primary.port, setup.replica.port);
    assert_eq!(
        (on(&sessions, p1), on(&sessions, p2)),
        (2, 2),
        "four held sessions spread over both nodes"
    );
    // leastconn: end both sessions on pg1; the next two new ones go there,
    // where round robin would have sent one to each.
    sessions.retain(|s| s.0 != p1);
    let active = |backend: &str| {
        lb.ringlb.metric(&format!(
            "ringlb_backend_connections_active{{frontend=\"pg-read\",backend=\"{backend}\"}}"
        ))
    };
    must(
        "ringlb sees pg1's sessions end",
        Duration::from_secs(10),
        || active("pg1") == Some(0),
    );
    for _ in 0..2 {
        let mut session = PgConn::connect(read).expect("a read session");
        let node = session.server_port().expect("which node");
        sessions.push((node, session));
    }
    assert_eq!(
        (on(&sessions, p1), on(&sessions, p2)),
        (2, 2),
        "leastconn sends new sessions to the node with fewer"
    );
}

/// examples/pg-sidecar.py answers by role, over each authentication a
/// server may ask for (trust, password, md5, SCRAM-SHA-256), and with 503
/// when it cannot ask: a wrong password, no password, the server down.
#[test]
fn pg_sidecar_answers_by_role_with_each_authentication() {
    if !require("PostgreSQL test", &pg_missing()) {
        return;
    }
    let scratch = Scratch::new("sidecar");
    let mut pg = Pg::primary(&scratch, "pg", free_ports(1)[0]);
    for sql in [
        "create role scram login password 'sekret'",
        "set password_encryption = 'md5'; create role md5 login password 'md5pass'",
        "create role plain login password 'plainpass'",
    ] {
        pg.query(sql);
    }
    let hba = "host all scram 127.0.0.1/32 scram-sha-256\n\
               host all md5 127.0.0.1/32 md5\n\
               host all plain 127.0.0.1/32 password\n\
               host all all 127.0.0.1/32 trust\n";
    std::fs::write(pg.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    assert_eq!(pg.query("select pg_reload_conf()"), ["t"]);
    must(
        "the new pg_hba.conf in force",
        Duration::from_secs(20),
        || PgConn::connect_as(pg.addr(), "scram").is_err(),
    );
    let cases = [
        ("postgres", None, 200),
        ("scram", Some("sekret"), 200),
        ("md5", Some("md5pass"), 200),
        ("plain", Some("plainpass"), 200),
        ("scram", Some("wrong"), 503),
        ("md5", None, 503),
    ];
    let sidecars: Vec<Sidecar> = cases
        .iter()
        .map(|(user, password, _)| Sidecar::start_as(&scratch, &pg, user, *password))
        .collect();
    for ((user, password, status), sidecar) in cases.iter().zip(&sidecars) {
        let expected = if *status == 200 {
            (200, 503, 200)
        } else {
            (503, 503, 503)
        };
        assert_eq!(
            roles(sidecar),
            expected,
            "as {user} with password {password:?}; the sidecar's log:\n{}",
            sidecar.proc.log_text()
        );
    }
    assert_eq!(sidecars[0].status("/nowhere"), 404);
    pg.stop();
    assert_eq!(roles(&sidecars[0]), (503, 503, 503));
    assert!(
        sidecars[0].proc.log_text().contains("node is unreachable"),
        "{}",
        sidecars[0].proc.log_text()
    );
}

/// Both examples pass `ringlb --check` as written.
#[test]
fn the_database_examples_pass_check() {
    for example in ["redis.toml", "postgres.toml"] {
        let path = format!("{}/examples/{example}", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(BIN)
            .args(["--config", &path, "--check"])
            .output()
            .expect("run ringlb --check");
        assert!(
            out.status.success(),
            "examples/{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
