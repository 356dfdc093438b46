//! The failover watcher: active health checks that mark backends down and
//! up, HAProxy style (`inter`, `timeout check`, `rise`, `fall`).
//!
//! One scheduler thread ("ringlb-health") runs every check as a
//! non-blocking probe on its own current-thread tokio runtime, whose timer
//! is a hierarchical wheel: ten thousand checks cost one thread, and a
//! backend that hangs for the whole timeout never delays the others. No
//! check ever runs on a worker.
//!
//! A check target is an (address, check settings) pair: every frontend
//! that lists the same address with the same check shares one [`Health`]
//! and one probe. The scheduler is the only writer of `up`; workers read
//! it on every new connection and report the outcome of their connects:
//! a success clears the live-failure streak, a failure extends it, and
//! `fall` failures in a row wake the scheduler at once, so a dead backend
//! is marked down as soon as traffic hits it, not at the next interval.
//!
//! Promotion needs nothing more: in active-passive mode the pool sends new
//! connections to the first backend that is up, so marking the active one
//! down is the failover, and marking it up again is the fail-back.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::config::CheckConfig;
use crate::model::{AdminState, BackendShared, ConnectFailure, Health, Snapshot};

/// Why a check failed, as the operator reads it in the DOWN line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Refused,
    TimedOut,
    /// Connected, but no (complete) reply within the timeout: a hung process.
    NoReply,
    Mismatch {
        got: Vec<u8>,
    },
    /// Connected, but the backend closed before replying.
    Closed,
    Reset,
    /// The check could not run for a reason on this host (out of local
    /// ports, fds or memory): it says nothing about the backend and is not
    /// counted, as live connects failing the same way are not.
    Local(String),
    Other(String),
}

impl Failure {
    fn from_io(e: &std::io::Error) -> Failure {
        if let Some(errno) = e.raw_os_error()
            && ConnectFailure::from_errno(errno) == ConnectFailure::Local
        {
            return Failure::Local(e.to_string());
        }
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Failure::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::TimedOut,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => Failure::Reset,
            _ => Failure::Other(e.to_string()),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused => f.write_str("connection refused"),
            Failure::TimedOut => f.write_str("connect timed out"),
            Failure::NoReply => f.write_str("no reply within the timeout"),
            Failure::Mismatch { got } => {
                write!(
                    f,
                    "reply did not match (got {:?})",
                    String::from_utf8_lossy(got)
                )
            }
            Failure::Closed => f.write_str("closed before replying"),
            Failure::Reset => f.write_str("connection reset"),
            Failure::Local(e) => write!(f, "check could not run here: {e}"),
            Failure::Other(e) => f.write_str(e),
        }
    }
}

/// What makes two backends one check target: same address, same check.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetKey {
    addr: SocketAddr,
    interval: Duration,
    timeout: Duration,
    rise: u32,
    fall: u32,
    send: Option<Vec<u8>>,
    expect: Option<Vec<u8>>,
    proxy: Option<crate::proxy::Version>,
}

impl TargetKey {
    pub fn new(addr: SocketAddr, check: &CheckConfig) -> TargetKey {
        TargetKey {
            addr,
            interval: check.interval,
            timeout: check.timeout,
            rise: check.rise,
            fall: check.fall,
            send: check.send.clone(),
            expect: check.expect.clone(),
            proxy: check.proxy,
        }
    }

    fn check(&self) -> CheckConfig {
        CheckConfig {
            interval: self.interval,
            timeout: self.timeout,
            rise: self.rise,
            fall: self.fall,
            send: self.send.clone(),
            expect: self.expect.clone(),
            proxy: self.proxy,
        }
    }
}

/// The health states handed out while a snapshot is built, so that the
/// same target in two frontends gets the same `Arc`, and a target the
/// previous snapshot had keeps its state.
#[derive(Default)]
pub struct Targets {
    known: HashMap<TargetKey, Arc<Health>>,
    /// Whether each address was up: a backend whose check settings changed
    /// is a new target, and starts from what its address last showed.
    up: HashMap<SocketAddr, bool>,
}

impl Targets {
    /// The targets of a snapshot in force, to build the next one from.
    pub fn of(snapshot: &Snapshot) -> Targets {
        let mut targets = Targets::default();
        for frontend in &snapshot.frontends {
            for backend in &frontend.backends {
                let key = TargetKey::new(backend.addr, &frontend.config.check);
                targets.up.insert(backend.addr, backend.health.is_up());
                targets.known.insert(key, Arc::clone(&backend.health));
            }
        }
        targets
    }

    pub fn health(&mut self, addr: SocketAddr, check: &CheckConfig) -> Arc<Health> {
        let key = TargetKey::new(addr, check);
        let was_up = self.up.get(&addr).copied();
        Arc::clone(self.known.entry(key).or_insert_with(|| {
            let health = Health::new(check.fall);
            if let Some(up) = was_up {
                health.set_up(up);
            }
            Arc::new(health)
        }))
    }
}

/// One health check: connect within the timeout, then optionally send the
/// payload and wait for a reply that starts with the expected bytes, all
/// within the same timeout. Dropping the future abandons the probe at once.
pub async fn probe(addr: SocketAddr, check: &CheckConfig) -> Result<(), Failure> {
    let deadline = Instant::now() + check.timeout;
    let stream = match timeout_at(deadline, connect(addr)).await {
        Ok(connected) => connected.map_err(|e| Failure::from_io(&e))?,
        Err(_) => return Err(Failure::TimedOut),
    };
    timeout_at(deadline, exchange(stream, check))
        .await
        .unwrap_or(Err(Failure::NoReply))
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Checks end with a reset, as HAProxy's do: thousands of checks must
    // not leave thousands of TIME_WAIT sockets behind. A zero linger never
    // blocks the close (tokio deprecates only the blocking, non-zero kind).
    socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO))?;
    socket.connect(addr).await
}

async fn exchange(mut stream: TcpStream, check: &CheckConfig) -> Result<(), Failure> {
    // check-send-proxy: a backend that requires the header drops a
    // connection without one, so the check would fail on a healthy backend.
    if let Some(version) = check.proxy {
        let header = crate::proxy::check_header(version);
        stream
            .write_all(&header)
            .await
            .map_err(|e| Failure::from_io(&e))?;
    }
    if let Some(payload) = &check.send {
        stream
            .write_all(payload)
            .await
            .map_err(|e| Failure::from_io(&e))?;
    }
    let Some(expect) = &check.expect else {
        return Ok(());
    };
    let mut got = Vec::with_capacity(expect.len());
    let mut buf = [0u8; 512];
    while got.len() < expect.len() {
        match stream.read(&mut buf).await {
            Ok(0) => return Err(Failure::Closed),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(Failure::from_io(&e)),
        }
        let compared = got.len().min(expect.len());
        if got[..compared] != expect[..compared] {
            return Err(Failure::Mismatch { got });
        }
    }
    Ok(())
}

/// The first check of each target comes at a random point of the first
/// interval (at most a second in), and each later one after the interval
/// +/-10%, so that thousands of checks never fire in the same millisecond
/// (HAProxy's spread-checks) while every backend is known within a second.
struct Jitter(u64);

impl Jitter {
    fn new(key: &TargetKey) -> Jitter {
        Jitter(RandomState::new().hash_one(key) | 1)
    }

    /// A fraction in [0, 1) (xorshift).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn first(&mut self, interval: Duration) -> Duration {
        interval.min(Duration::from_secs(1)).mul_f64(self.next())
    }

    fn interval(&mut self, interval: Duration) -> Duration {
        interval.mul_f64(0.9 + 0.2 * self.next())
    }
}

/// The backends (of any frontend) that share a target, and the snapshot
/// they are in: replaced by each reload while the target's task and its
/// rise/fall counts carry on.
struct Users {
    backends: Vec<Arc<BackendShared>>,
    snapshot: Arc<Snapshot>,
}

/// One target as the scheduler runs it.
struct Target {
    key: TargetKey,
    check: CheckConfig,
    health: Arc<Health>,
    /// Written by the control plane on reload, read here: a lock the data
    /// path never sees.
    users: Arc<Mutex<Users>>,
    /// Consecutive check results, as HAProxy counts them for rise and fall.
    good: u32,
    bad: u32,
    local_warning: crate::logging::RateLimit,
}

impl Target {
    fn with_users<T>(&self, f: impl FnOnce(&Users) -> T) -> Option<T> {
        self.users.lock().ok().map(|users| f(&users))
    }

    /// The backend's name as the user wrote it (in the first frontend that
    /// lists it).
    fn name(&self) -> String {
        self.with_users(|u| u.backends.first().map(|b| b.name.clone()))
            .flatten()
            .unwrap_or_else(|| self.key.addr.to_string())
    }

    /// "frontend web", or "frontends web, db, api and 197 more".
    fn frontends(&self) -> String {
        let mut names: Vec<String> = self
            .with_users(|u| u.backends.iter().map(|b| b.frontend.clone()).collect())
            .unwrap_or_default();
        names.dedup();
        let shown = names.len().min(3);
        let more = match names.len() - shown {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        let label = if names.len() == 1 {
            "frontend"
        } else {
            "frontends"
        };
        format!("{label} {}{more}", names[..shown].join(", "))
    }

    /// Every backend on this target is in maintenance: HAProxy suspends
    /// the checks of a server in maintenance, and so does ringlb, so that
    /// work on a backend is neither marked down nor logged as failing.
    fn suspended(&self) -> bool {
        self.with_users(|u| {
            !u.backends.is_empty() && u.backends.iter().all(|b| b.admin() == AdminState::Maint)
        })
        .unwrap_or(false)
    }

    fn record_check(&mut self, result: Result<(), Failure>, took: Duration) {
        let text = result.as_ref().map_err(|f| f.to_string()).cloned();
        self.health.update_status(|s| {
            s.last_check = Some(text);
            s.last_check_took = took;
            s.checked_at = Some(std::time::SystemTime::now());
        });
        let ms = took.as_secs_f64() * 1000.0;
        match result {
            Ok(()) => {
                // A check is a successful connect too: the live failures
                // before it were not in a row with the ones after it.
                self.health.report_live_success();
                self.bad = 0;
                self.good = self.good.saturating_add(1);
                if !self.health.is_up() && self.good >= self.check.rise {
                    let reason = format!("{} good checks in a row, last took {ms:.1}ms", self.good);
                    self.mark(true, reason);
                }
            }
            Err(Failure::Local(e)) => {
                // Neither a success nor a failure: the streaks stay.
                if let Some(held_back) = self.local_warning.allow(std::time::Instant::now()) {
                    log::warn!(
                        "check of backend {} could not run here ({e}); not counted against it \
                         (local ports, fds or memory exhausted?){}",
                        self.name(),
                        self.local_warning.suffix(held_back)
                    );
                }
            }
            Err(failure) => {
                self.good = 0;
                self.bad = self.bad.saturating_add(1);
                self.count(|s| &s.checks_failed);
                if self.health.is_up() && self.bad >= self.check.fall {
                    let reason = format!(
                        "{} failed checks in a row (last: {failure}, took {ms:.1}ms)",
                        self.bad
                    );
                    self.mark(false, reason);
                } else {
                    log::debug!("check of backend {} failed: {failure}", self.name());
                }
            }
        }
    }

    /// Woken by a worker: the live streak reached `fall` (or did, before a
    /// success cleared it again).
    fn record_live(&mut self) {
        let streak = self.health.live_failures.load(Relaxed);
        if streak < self.health.fall {
            return;
        }
        self.health.live_failures.store(0, Relaxed);
        if !self.health.is_up() {
            return;
        }
        let last = ConnectFailure::from_u8(self.health.last_live_failure.load(Relaxed));
        // Coming back will take `rise` good checks, as after failed checks.
        self.good = 0;
        let reason = format!(
            "{streak} connect failures in a row on live traffic (last: {})",
            last.describe()
        );
        self.mark(false, reason);
    }

    fn mark(&mut self, up: bool, reason: String) {
        self.health.set_up(up);
        self.health.update_status(|s| {
            s.changed_at = Some(SystemTime::now());
            s.reason.clone_from(&reason);
        });
        if up {
            self.count(|s| &s.went_up);
            log::info!(
                "backend {} is UP ({}): {reason}",
                self.name(),
                self.frontends()
            );
        } else {
            self.count(|s| &s.went_down);
            log::warn!(
                "backend {} is DOWN ({}): {reason}",
                self.name(),
                self.frontends()
            );
            self.warn_if_none_left();
        }
    }

    fn count(&self, counter: impl Fn(&crate::model::BackendStats) -> &AtomicU64) {
        self.with_users(|u| {
            for backend in &u.backends {
                counter(&backend.stats).fetch_add(1, Relaxed);
            }
        });
    }

    fn warn_if_none_left(&self) {
        self.with_users(|u| {
            let mut warned: Vec<&str> = Vec::new();
            for backend in &u.backends {
                let name = backend.frontend.as_str();
                let Some(frontend) = u.snapshot.frontend(name) else {
                    continue;
                };
                if warned.contains(&name) || frontend.backends.iter().any(|b| b.is_up()) {
                    continue;
                }
                warned.push(name);
                log::error!(
                    "frontend {name} has no backend up: new connections are closed until one comes back"
                );
            }
        });
    }

    /// Checks on a jittered interval and reacts to live failures at once,
    /// even while a probe is in flight.
    async fn run(mut self) {
        let mut jitter = Jitter::new(&self.key);
        let health = Arc::clone(&self.health);
        let check = self.check.clone();
        let addr = self.key.addr;
        let mut next = Instant::now() + jitter.first(check.interval);
        self.health
            .update_status(|s| s.changed_at = Some(SystemTime::now()));
        loop {
            let started = {
                let due = sleep_until(next);
                tokio::pin!(due);
                loop {
                    tokio::select! {
                        _ = &mut due => break Instant::now(),
                        _ = health.wake.notified() => self.record_live(),
                    }
                }
            };
            if self.suspended() {
                next = started + jitter.interval(check.interval);
                continue;
            }
            let probe = probe(addr, &check);
            tokio::pin!(probe);
            let result = loop {
                tokio::select! {
                    result = &mut probe => break result,
                    _ = health.wake.notified() => self.record_live(),
                }
            };
            self.record_check(result, started.elapsed());
            next = (started + jitter.interval(check.interval)).max(Instant::now());
        }
    }
}

/// Orders for the scheduler thread. Targets are keyed by (address, check),
/// so a reload adds and removes targets while the ones that stay keep
/// their state (their task, rise/fall counts and `Health`).
enum Command {
    /// The complete set of targets for a new snapshot.
    Set(Vec<Target>),
}

/// Why the health checks could not start; ringlb refuses to run then.
#[derive(Debug)]
pub struct StartError(pub std::io::Error);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot start health checks: {}", self.0)
    }
}

/// The one health scheduler thread. Dropping it stops every check at once:
/// probes in flight are abandoned, never waited for.
pub struct Scheduler {
    commands: Option<mpsc::UnboundedSender<Command>>,
    thread: Option<JoinHandle<()>>,
}

/// How long a stop waits for the scheduler thread to notice; it only has
/// to drop its tasks, and a process about to exit need not wait longer.
const STOP_WAIT: Duration = Duration::from_millis(500);

impl Scheduler {
    /// Starts the thread and its runtime, with no target yet.
    pub fn start() -> Result<Scheduler, StartError> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ringlb-health".into())
            .spawn(move || run_thread(receiver, ready_tx))
            .map_err(StartError)?;
        let scheduler = Scheduler {
            commands: Some(commands),
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(scheduler),
            Ok(Err(e)) => Err(StartError(e)),
            Err(_) => Err(StartError(std::io::Error::other(
                "the health thread ended at start",
            ))),
        }
    }

    /// Checks exactly the targets of this snapshot, grouped by the
    /// `Health` they share: new ones start, removed ones stop, the others
    /// carry on with their new set of backends.
    pub fn watch(&mut self, snapshot: &Arc<Snapshot>) -> Result<(), StartError> {
        self.send(Command::Set(group(snapshot)))
    }

    fn send(&mut self, command: Command) -> Result<(), StartError> {
        self.commands
            .as_ref()
            .and_then(|c| c.send(command).ok())
            .ok_or_else(|| StartError(std::io::Error::other("the health thread has stopped")))
    }

    /// Ends every check now. Waits briefly for the thread to drop its
    /// tasks; a stuck one is left behind rather than holding up the stop.
    pub fn stop(&mut self) {
        self.commands = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + STOP_WAIT;
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A target's running task and the users it reads.
struct Running {
    task: tokio::task::JoinHandle<()>,
    health: Arc<Health>,
    users: Arc<Mutex<Users>>,
}

fn run_thread(
    mut commands: mpsc::UnboundedReceiver<Command>,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    runtime.block_on(async move {
        let mut running: HashMap<TargetKey, Running> = HashMap::new();
        while let Some(Command::Set(targets)) = commands.recv().await {
            apply_targets(&mut running, targets);
        }
    });
    // Dropping the runtime here drops every task and its probe: sockets
    // close, nothing is awaited.
}

fn apply_targets(running: &mut HashMap<TargetKey, Running>, targets: Vec<Target>) {
    let mut next = HashMap::with_capacity(targets.len());
    for target in targets {
        let key = target.key.clone();
        match running.remove(&key) {
            // Same target, same state: only its users change.
            Some(kept) if Arc::ptr_eq(&kept.health, &target.health) => {
                let users = target.users.lock().ok().map(|mut u| Users {
                    backends: std::mem::take(&mut u.backends),
                    snapshot: Arc::clone(&u.snapshot),
                });
                if let (Some(users), Ok(mut current)) = (users, kept.users.lock()) {
                    *current = users;
                }
                next.insert(key, kept);
            }
            other => {
                if let Some(old) = other {
                    old.task.abort();
                }
                let health = Arc::clone(&target.health);
                let users = Arc::clone(&target.users);
                let task = tokio::spawn(target.run());
                next.insert(
                    key,
                    Running {
                        task,
                        health,
                        users,
                    },
                );
            }
        }
    }
    for (key, gone) in running.drain() {
        log::debug!("health checks of {} stopped", key.addr);
        gone.task.abort();
    }
    *running = next;
}

/// One target per distinct `Health`, with every backend that shares it.
fn group(snapshot: &Arc<Snapshot>) -> Vec<Target> {
    let mut order: Vec<TargetKey> = Vec::new();
    let mut targets: HashMap<TargetKey, (Arc<Health>, Vec<Arc<BackendShared>>)> = HashMap::new();
    for frontend in &snapshot.frontends {
        for backend in &frontend.backends {
            let key = TargetKey::new(backend.addr, &frontend.config.check);
            let entry = targets.entry(key.clone()).or_insert_with(|| {
                order.push(key);
                (Arc::clone(&backend.health), Vec::new())
            });
            entry.1.push(Arc::clone(backend));
        }
    }
    order
        .into_iter()
        .filter_map(|key| {
            let (health, backends) = targets.remove(&key)?;
            Some(Target {
                check: key.check(),
                key,
                health,
                users: Arc::new(Mutex::new(Users {
                    backends,
                    snapshot: Arc::clone(snapshot),
                })),
                good: 0,
                bad: 0,
                local_warning: crate::logging::RateLimit::new(Duration::from_secs(10)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent_and_spreads_first_checks() {
        let key = TargetKey::new(
            "127.0.0.1:1".parse().expect("addr"),
            &CheckConfig {
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 3,
                send: None,
                expect: None,
                proxy: None,
            },
        );
        let mut jitter = Jitter::new(&key);
        let firsts: Vec<Duration> = (0..1000)
            .map(|_| jitter.first(Duration::from_secs(2)))
            .collect();
        assert!(firsts.iter().all(|d| *d < Duration::from_secs(1)));
        let early = firsts
            .iter()
            .filter(|d| **d < Duration::from_millis(500))
            .count();
        assert!(
            (350..650).contains(&early),
            "{early} of 1000 in the first half"
        );
        for _ in 0..1000 {
            let d = jitter.interval(Duration::from_secs(2));
            assert!(d >= Duration::from_millis(1800) && d <= Duration::from_millis(2200));
        }
    }

    #[test]
    fn live_streak_needs_fall_failures_in_a_row() {
        let health = Health::new(3);
        health.report_live_failure(ConnectFailure::Refused);
        health.report_live_failure(ConnectFailure::Refused);
        health.report_live_success();
        health.report_live_failure(ConnectFailure::Refused);
        assert_eq!(health.live_failures.load(Relaxed), 1);
        health.report_live_failure(ConnectFailure::Refused);
        health.report_live_failure(ConnectFailure::TimedOut);
        assert_eq!(health.live_failures.load(Relaxed), 3);
    }

    #[test]
    fn same_address_and_check_share_one_health() {
        let check = CheckConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            send: None,
            expect: None,
            proxy: None,
        };
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let mut targets = Targets::default();
        let a = targets.health(addr, &check);
        let b = targets.health(addr, &check);
        assert!(Arc::ptr_eq(&a, &b));
        let other = CheckConfig {
            send: Some(b"PING".to_vec()),
            ..check
        };
        assert!(!Arc::ptr_eq(&a, &targets.health(addr, &other)));
    }

    fn on_runtime<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn probes_tell_refused_silent_and_wrong_replies_apart() {
        let check = CheckConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(300),
            rise: 1,
            fall: 1,
            send: Some(b"PING\r\n".to_vec()),
            expect: Some(b"+PONG".to_vec()),
            proxy: None,
        };
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let silent_addr = silent.local_addr().expect("addr");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("addr");
        let wrong = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let wrong_addr = wrong.local_addr().expect("addr");
        let answer = std::thread::spawn(move || {
            use std::io::Write;
            if let Ok((mut s, _)) = wrong.accept() {
                let _ = s.write_all(b"-ERR\r\n");
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        on_runtime(async {
            assert_eq!(probe(closed, &check).await, Err(Failure::Refused));
            let started = Instant::now();
            assert_eq!(probe(silent_addr, &check).await, Err(Failure::NoReply));
            assert!(started.elapsed() < Duration::from_secs(2));
            assert!(matches!(
                probe(wrong_addr, &check).await,
                Err(Failure::Mismatch { .. })
            ));
        });
        let _ = answer.join();
    }

    #[test]
    fn checks_are_suspended_only_when_every_user_is_in_maintenance() {
        use crate::model::{FrontendShared, FrontendSnapshot};
        let text = "[[frontend]]\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:9\"]\n";
        let config = crate::config::Config::from_toml(text, "t")
            .expect("config")
            .frontends[0]
            .clone();
        let health = Arc::new(Health::new(3));
        let backend = |name: &str| {
            Arc::new(BackendShared::new(
                name,
                "b",
                config.backends[0].addr,
                Arc::clone(&health),
            ))
        };
        let (a, b) = (backend("a"), backend("b"));
        let snapshot = Arc::new(Snapshot {
            generation: 1,
            frontends: vec![Arc::new(FrontendSnapshot::new(
                config.clone(),
                Arc::new(FrontendShared::new("a")),
                vec![Arc::clone(&a), Arc::clone(&b)],
            ))],
        });
        let targets = group(&snapshot);
        assert_eq!(targets.len(), 1);
        let target = &targets[0];
        assert!(!target.suspended());
        a.set_admin(AdminState::Maint);
        assert!(!target.suspended(), "b still needs its checks");
        b.set_admin(AdminState::Drain);
        assert!(!target.suspended(), "a draining backend is still checked");
        b.set_admin(AdminState::Maint);
        assert!(target.suspended());
    }
}
