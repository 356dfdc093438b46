//! The failover watcher: active health checks that mark backends down and
//! up, HAProxy style (`inter`, `fastinter`, `downinter`, `timeout check`,
//! `rise`, `fall`, `agent-check`).
//!
//! One scheduler thread ("ringlb-health") runs every check as a
//! non-blocking probe on its own current-thread tokio runtime, whose timer
//! is a hierarchical wheel: ten thousand checks cost one thread, and a
//! backend that hangs for the whole timeout never delays the others. No
//! check ever runs on a worker.
//!
//! A check target is the address checked (a backend's `check-port` and
//! `check-address` put it elsewhere than its traffic) with the check's
//! settings and its agent's address: every frontend that lists backends
//! with the same target shares one [`Health`] and one probe. The scheduler
//! is the only writer of `up`; workers read it on every new connection and
//! report the outcome of their connects: a success clears the live-failure
//! streak, a failure extends it, and `fall` failures in a row wake the
//! scheduler at once, so a dead backend is marked down as soon as traffic
//! hits it, not at the next interval.
//!
//! An agent (HAProxy's `agent-check`) runs beside the check of its target,
//! on its own interval, in the same task: its `down` holds the backend
//! down whatever the checks say until it says `up`; its `drain`, `maint`
//! and `NN%` set the agent state and weight share that selection reads.
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

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout_at};

pub use crate::check::Failure;
use crate::check::{AgentReply, ask_agent};
use crate::config::{BackendConfig, CheckConfig};
use crate::model::{
    AdminState, AgentStatus, BackendShared, ConnectFailure, FrontendSnapshot, Health, Snapshot,
};

/// What makes two backends one check target: the same address checked,
/// the same check, the same agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TargetKey {
    /// Where the probe connects (the check address, not the traffic's).
    addr: SocketAddr,
    agent: Option<SocketAddr>,
    /// With the addresses and ports taken out: they are resolved above,
    /// so a frontend's and a backend's `check-port 8008` are one target.
    check: CheckConfig,
}

impl TargetKey {
    pub fn new(backend: &BackendConfig, check: &CheckConfig) -> TargetKey {
        TargetKey {
            addr: check.target(backend),
            agent: check.agent_target(backend),
            check: CheckConfig {
                port: None,
                address: None,
                agent_port: None,
                agent_address: None,
                ..check.clone()
            },
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Each backend of a frontend with its settings. The snapshot lists them
/// in config order; matched by name should that ever not hold.
pub fn configured(frontend: &FrontendSnapshot) -> Vec<(&Arc<BackendShared>, &BackendConfig)> {
    let configs = &frontend.config.backends;
    let in_order = configs.len() == frontend.backends.len()
        && configs
            .iter()
            .zip(&frontend.backends)
            .all(|(c, b)| c.name == b.name);
    if in_order {
        return frontend.backends.iter().zip(configs).collect();
    }
    let by_name: HashMap<&str, &BackendConfig> =
        configs.iter().map(|c| (c.name.as_str(), c)).collect();
    frontend
        .backends
        .iter()
        .filter_map(|b| Some((b, *by_name.get(b.name.as_str())?)))
        .collect()
}

/// The health states handed out while a snapshot is built, so that the
/// same target in two frontends gets the same `Arc`, and a target the
/// previous snapshot had keeps its state.
#[derive(Default)]
pub struct Targets {
    known: HashMap<TargetKey, Arc<Health>>,
    /// Whether each checked address was up: a backend whose check settings
    /// changed is a new target, and starts from what its address last
    /// showed.
    up: HashMap<SocketAddr, bool>,
}

impl Targets {
    /// The targets of a snapshot in force, to build the next one from.
    pub fn of(snapshot: &Snapshot) -> Targets {
        let mut targets = Targets::default();
        for frontend in &snapshot.frontends {
            for (backend, config) in configured(frontend) {
                let key = TargetKey::new(config, &frontend.config.check);
                targets.up.insert(key.addr, backend.health.is_up());
                targets.known.insert(key, Arc::clone(&backend.health));
            }
        }
        targets
    }

    pub fn health(&mut self, backend: &BackendConfig, check: &CheckConfig) -> Arc<Health> {
        let key = TargetKey::new(backend, check);
        let was_up = self.up.get(&key.addr).copied();
        Arc::clone(self.known.entry(key).or_insert_with(|| {
            let health = Health::new(check.fall);
            if let Some(up) = was_up {
                health.set_up(up);
            }
            Arc::new(health)
        }))
    }
}

/// One health check: connect within the timeout, then run the check's
/// steps (send, expect, ...) within the same timeout. Dropping the future
/// abandons the probe at once.
pub async fn probe(addr: SocketAddr, check: &CheckConfig) -> Result<(), Failure> {
    let deadline = Instant::now() + check.timeout;
    let mut stream = match timeout_at(deadline, connect(addr)).await {
        Ok(connected) => connected.map_err(|e| Failure::from_io(&e))?,
        Err(_) => return Err(Failure::TimedOut),
    };
    // check-send-proxy: a backend that requires the header drops a
    // connection without one, so the check would fail on a healthy backend.
    if let Some(version) = check.proxy {
        let header = crate::proxy::check_header(version);
        match timeout_at(deadline, stream.write_all(&header)).await {
            Ok(written) => written.map_err(|e| Failure::from_io(&e))?,
            Err(_) => return Err(Failure::NoReply { got: Vec::new() }),
        }
    }
    check.script.run(&mut stream, addr, deadline).await
}

/// One agent check: connect, send `agent-send`, read one line.
async fn ask(addr: SocketAddr, check: &CheckConfig) -> Result<String, Failure> {
    let deadline = Instant::now() + check.timeout;
    let mut stream = match timeout_at(deadline, connect(addr)).await {
        Ok(connected) => connected.map_err(|e| Failure::from_io(&e))?,
        Err(_) => return Err(Failure::TimedOut),
    };
    ask_agent(&mut stream, check.agent_send.as_deref(), deadline).await
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

/// The first check of each target comes at a random point of the first
/// interval (at most a second in), and each later one after the interval
/// +/-10%, so that thousands of checks never fire in the same millisecond
/// (HAProxy's spread-checks) while every backend is known within a second.
struct Jitter(u64);

impl Jitter {
    fn new(seed: impl Hash) -> Jitter {
        Jitter(RandomState::new().hash_one(seed) | 1)
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
    health: Arc<Health>,
    /// Written by the control plane on reload, read here: a lock the data
    /// path never sees.
    users: Arc<Mutex<Users>>,
    /// Consecutive check results, as HAProxy counts them for rise and fall.
    good: u32,
    bad: u32,
    /// What the checks (and live traffic) say on their own; the target is
    /// up when they say so and no agent holds it down.
    checks_up: bool,
    /// An agent's `down`, `fail` or `stopped`, with its reason: holds the
    /// target down until the agent says `up` (HAProxy: only the agent
    /// reverts its own actions).
    agent_down: Option<String>,
    local_warning: crate::logging::RateLimit,
}

impl Target {
    fn new(key: TargetKey, health: Arc<Health>, users: Users) -> Target {
        Target {
            checks_up: health.is_up(),
            key,
            health,
            users: Arc::new(Mutex::new(users)),
            good: 0,
            bad: 0,
            agent_down: None,
            local_warning: crate::logging::RateLimit::new(Duration::from_secs(10)),
        }
    }

    fn check(&self) -> &CheckConfig {
        &self.key.check
    }

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

    /// Every backend on this target is in maintenance, or its agent says
    /// `maint`: HAProxy suspends the checks of a server in maintenance,
    /// and so does ringlb, so that work on a backend is neither marked
    /// down nor logged as failing. An agent keeps being asked.
    fn suspended(&self) -> bool {
        self.health.agent_state() == AdminState::Maint
            || self
                .with_users(|u| {
                    !u.backends.is_empty()
                        && u.backends.iter().all(|b| b.admin() == AdminState::Maint)
                })
                .unwrap_or(false)
    }

    /// HAProxy's `fastinter` while the state is changing (up with a failed
    /// check, or down with a good one), `downinter` while down, else
    /// `inter`.
    fn interval(&self) -> Duration {
        let check = self.check();
        let changing = if self.checks_up {
            self.bad > 0
        } else {
            self.good > 0
        };
        let chosen = if changing {
            check.fastinter
        } else if !self.checks_up {
            check.downinter
        } else {
            None
        };
        chosen.unwrap_or(check.interval)
    }

    fn record_check(&mut self, result: Result<(), Failure>, took: Duration) {
        let text = result.as_ref().map_err(|f| f.to_string()).cloned();
        let step = result
            .as_ref()
            .err()
            .and_then(|f| f.step().map(str::to_string));
        self.health.update_status(|s| {
            s.last_check = Some(text);
            s.last_check_took = took;
            s.checked_at = Some(std::time::SystemTime::now());
            s.checks += 1;
            s.failed_step = step;
        });
        let ms = took.as_secs_f64() * 1000.0;
        match result {
            Ok(()) => {
                // A check is a successful connect too: the live failures
                // before it were not in a row with the ones after it.
                self.health.report_live_success();
                self.bad = 0;
                self.good = self.good.saturating_add(1);
                if !self.checks_up && self.good >= self.check().rise {
                    self.checks_up = true;
                    let reason = format!("{} good checks in a row, last took {ms:.1}ms", self.good);
                    self.settle(reason);
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
                if self.checks_up && self.bad >= self.check().fall {
                    self.checks_up = false;
                    let reason = format!(
                        "{} failed checks in a row (last: {failure}, took {ms:.1}ms)",
                        self.bad
                    );
                    self.settle(reason);
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
        self.checks_up = false;
        let reason = format!(
            "{streak} connect failures in a row on live traffic (last: {})",
            last.describe()
        );
        self.settle(reason);
    }

    /// An agent's answer: its words change what they name and nothing
    /// else; no answer changes nothing (the checks test connectivity).
    fn record_agent(&mut self, reply: Result<String, Failure>) {
        let line = match reply {
            Ok(line) => line,
            Err(failure) => {
                log::debug!("agent of backend {} did not answer: {failure}", self.name());
                let text = failure.to_string();
                self.update_agent_status(Err(text), None);
                return;
            }
        };
        let words = AgentReply::parse(&line);
        if let Some(percent) = words.weight_percent
            && percent != self.health.weight_percent()
        {
            log::info!(
                "backend {} ({}): its agent sets its weight to {percent}%",
                self.name(),
                self.frontends()
            );
            self.health.set_weight_percent(percent);
        }
        if let Some(state) = words.admin
            && state != self.health.agent_state()
        {
            log::info!(
                "backend {} ({}): its agent says {state}",
                self.name(),
                self.frontends()
            );
            self.health.set_agent_state(state);
        }
        match words.up {
            Some((false, word)) => {
                let mut reason = format!("its agent says {word}");
                if !words.description.is_empty() {
                    reason = format!("{reason}: {}", words.description);
                }
                if self.agent_down.is_none() && !self.health.is_up() {
                    log::info!("backend {} ({}): {reason}", self.name(), self.frontends());
                }
                self.agent_down = Some(reason.clone());
                self.settle(reason);
            }
            Some((true, _)) if self.agent_down.take().is_some() => {
                if !self.checks_up {
                    log::info!(
                        "backend {} ({}): its agent says up; still down by its checks",
                        self.name(),
                        self.frontends()
                    );
                }
                self.settle("its agent says up".into());
            }
            _ => {}
        }
        if !words.ignored.is_empty() {
            log::debug!(
                "agent of backend {} said words ringlb does not act on: {}",
                self.name(),
                words.ignored.join(" ")
            );
        }
        self.update_agent_status(Ok(line), words.weight_percent);
    }

    fn update_agent_status(&self, reply: Result<String, String>, percent: Option<u32>) {
        let down = self.agent_down.clone();
        self.health.update_status(|s| {
            let weight_percent = percent.or(s.agent.as_ref().and_then(|a| a.weight_percent));
            s.agent = Some(AgentStatus {
                reply,
                at: SystemTime::now(),
                weight_percent,
                down,
            });
        });
    }

    /// Brings `up` in line with the checks and the agent.
    fn settle(&mut self, reason: String) {
        let up = self.checks_up && self.agent_down.is_none();
        if up != self.health.is_up() {
            self.mark(up, reason);
        }
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

    /// The checks, and the agent's beside them in the same task, so that
    /// aborting the task stops both.
    async fn run(self) {
        let (tx, rx) = mpsc::channel(1);
        match self.key.agent {
            Some(agent) => {
                let asking = ask_agent_forever(agent, self.key.clone(), tx);
                tokio::select! {
                    _ = self.check_forever(rx) => {}
                    _ = asking => {}
                }
            }
            None => {
                drop(tx);
                self.check_forever(rx).await;
            }
        }
    }

    /// Checks on a jittered interval and reacts to live failures and agent
    /// answers at once, even while a probe is in flight.
    async fn check_forever(mut self, mut agent: mpsc::Receiver<Result<String, Failure>>) {
        let mut jitter = Jitter::new(&self.key);
        let health = Arc::clone(&self.health);
        let check = self.check().clone();
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
                        Some(reply) = agent.recv() => self.record_agent(reply),
                    }
                }
            };
            if self.suspended() {
                next = started + jitter.interval(self.interval());
                continue;
            }
            let probe = probe(addr, &check);
            tokio::pin!(probe);
            let result = loop {
                tokio::select! {
                    result = &mut probe => break result,
                    _ = health.wake.notified() => self.record_live(),
                    Some(reply) = agent.recv() => self.record_agent(reply),
                }
            };
            self.record_check(result, started.elapsed());
            next = (started + jitter.interval(self.interval())).max(Instant::now());
        }
    }
}

/// Asks the agent every `agent-interval` (default: the check interval)
/// and hands each answer to the target's check loop, which applies it.
async fn ask_agent_forever(
    agent: SocketAddr,
    key: TargetKey,
    answers: mpsc::Sender<Result<String, Failure>>,
) {
    let check = &key.check;
    let interval = check.agent_interval.unwrap_or(check.interval);
    let mut jitter = Jitter::new((&key, "agent"));
    let mut next = Instant::now() + jitter.first(interval);
    loop {
        sleep_until(next).await;
        let started = Instant::now();
        let answer = ask(agent, check).await;
        if answers.send(answer).await.is_err() {
            return;
        }
        next = (started + jitter.interval(interval)).max(Instant::now());
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

// A key's Pattern holds a regex with an inner cache, but its Hash and Eq
// read only the pattern's source text, which never changes.
#[allow(clippy::mutable_key_type)]
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

// A key's Pattern holds a regex with an inner cache, but its Hash and Eq
// read only the pattern's source text, which never changes.
#[allow(clippy::mutable_key_type)]
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
// A key's Pattern holds a regex with an inner cache, but its Hash and Eq
// read only the pattern's source text, which never changes.
#[allow(clippy::mutable_key_type)]
fn group(snapshot: &Arc<Snapshot>) -> Vec<Target> {
    let mut order: Vec<TargetKey> = Vec::new();
    let mut targets: HashMap<TargetKey, (Arc<Health>, Vec<Arc<BackendShared>>)> = HashMap::new();
    for frontend in &snapshot.frontends {
        for (backend, config) in configured(frontend) {
            let key = TargetKey::new(config, &frontend.config.check);
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
            let users = Users {
                backends,
                snapshot: Arc::clone(snapshot),
            };
            Some(Target::new(key, health, users))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Script;

    fn check_config() -> CheckConfig {
        CheckConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            ..CheckConfig::new(Duration::from_secs(2))
        }
    }

    fn backend(addr: &str) -> BackendConfig {
        BackendConfig::new(addr.parse().expect("addr"), addr.into())
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_spreads_first_checks() {
        let key = TargetKey::new(&backend("127.0.0.1:1"), &check_config());
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
        let check = check_config();
        let b = backend("127.0.0.1:1");
        let mut targets = Targets::default();
        let first = targets.health(&b, &check);
        assert!(Arc::ptr_eq(&first, &targets.health(&b, &check)));
        let other = CheckConfig {
            script: Script::flat(Some(b"PING".to_vec()), None, None),
            ..check.clone()
        };
        assert!(!Arc::ptr_eq(&first, &targets.health(&b, &other)));
        // The traffic address alone does not make the target: the check
        // port does.
        let sidecar = BackendConfig {
            check_port: Some(8008),
            ..b.clone()
        };
        assert!(!Arc::ptr_eq(&first, &targets.health(&sidecar, &check)));
        let frontend_port = CheckConfig {
            port: Some(8008),
            ..check.clone()
        };
        assert!(Arc::ptr_eq(
            &targets.health(&sidecar, &check),
            &targets.health(&b, &frontend_port)
        ));
        assert_eq!(
            TargetKey::new(&sidecar, &check).addr(),
            "127.0.0.1:8008".parse().expect("addr")
        );
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
            timeout: Duration::from_millis(300),
            script: Script::flat(Some(b"PING\r\n".to_vec()), Some(b"+PONG".to_vec()), None),
            ..CheckConfig::new(Duration::from_secs(1))
        };
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let silent_addr = silent.local_addr().expect("addr");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("addr");
        let wrong = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let wrong_addr = wrong.local_addr().expect("addr");
        let answer = std::thread::spawn(move || {
            use std::io::{Read, Write};
            if let Ok((mut s, _)) = wrong.accept() {
                // Read the PING first: closing with it unread would reset.
                let _ = s.read(&mut [0u8; 64]);
                let _ = s.write_all(b"-ERR\r\n");
            }
        });
        on_runtime(async {
            assert_eq!(probe(closed, &check).await, Err(Failure::Refused));
            let started = Instant::now();
            let silence = probe(silent_addr, &check).await.expect_err("silent");
            assert_eq!(silence.cause(), &Failure::NoReply { got: Vec::new() });
            assert_eq!(silence.step(), Some("expect \"+PONG\""));
            assert!(started.elapsed() < Duration::from_secs(2));
            let wrong = probe(wrong_addr, &check).await.expect_err("wrong");
            assert!(
                matches!(wrong.cause(), Failure::Closed { got } if got == b"-ERR\r\n"),
                "{wrong}"
            );
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
                "127.0.0.1:9",
                config.backends[0].addr,
                Arc::clone(&health),
            ))
        };
        let (a, b) = (backend("a"), backend("b"));
        let snapshot = Arc::new(Snapshot {
            generation: 1,
            frontends: vec![
                Arc::new(FrontendSnapshot::new(
                    config.clone(),
                    Arc::new(FrontendShared::new("a")),
                    vec![Arc::clone(&a)],
                )),
                Arc::new(FrontendSnapshot::new(
                    config.clone(),
                    Arc::new(FrontendShared::new("b")),
                    vec![Arc::clone(&b)],
                )),
            ],
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
        b.set_admin(AdminState::Ready);
        health.set_agent_state(AdminState::Maint);
        assert!(target.suspended(), "an agent's maint suspends the checks");
    }

    #[test]
    fn fastinter_while_changing_and_downinter_while_down() {
        let check = CheckConfig {
            fastinter: Some(Duration::from_millis(100)),
            downinter: Some(Duration::from_secs(5)),
            ..check_config()
        };
        let key = TargetKey::new(&backend("127.0.0.1:1"), &check);
        let snapshot = Arc::new(Snapshot {
            generation: 1,
            frontends: Vec::new(),
        });
        let users = Users {
            backends: Vec::new(),
            snapshot,
        };
        let mut target = Target::new(key, Arc::new(Health::new(3)), users);
        assert_eq!(target.interval(), Duration::from_secs(2));
        let failed = || Err(Failure::Refused);
        target.record_check(failed(), Duration::ZERO);
        assert_eq!(target.interval(), Duration::from_millis(100), "going down");
        target.record_check(failed(), Duration::ZERO);
        target.record_check(failed(), Duration::ZERO);
        assert!(!target.health.is_up());
        assert_eq!(target.interval(), Duration::from_secs(5), "down");
        target.record_check(Ok(()), Duration::ZERO);
        assert_eq!(target.interval(), Duration::from_millis(100), "coming up");
        target.record_check(Ok(()), Duration::ZERO);
        assert!(target.health.is_up());
        assert_eq!(target.interval(), Duration::from_secs(2));
    }

    #[test]
    fn an_agents_down_holds_until_it_says_up() {
        let key = TargetKey::new(&backend("127.0.0.1:1"), &check_config());
        let snapshot = Arc::new(Snapshot {
            generation: 1,
            frontends: Vec::new(),
        });
        let users = Users {
            backends: Vec::new(),
            snapshot,
        };
        let mut target = Target::new(key, Arc::new(Health::new(3)), users);
        target.record_agent(Ok("stopped # upgrade".into()));
        assert!(!target.health.is_up());
        assert_eq!(
            target.health.status().reason,
            "its agent says stopped: upgrade"
        );
        for _ in 0..5 {
            target.record_check(Ok(()), Duration::ZERO);
        }
        assert!(!target.health.is_up(), "checks alone do not undo it");
        target.record_agent(Err(Failure::Refused));
        assert!(!target.health.is_up(), "nor does a silent agent");
        target.record_agent(Ok("up 50%".into()));
        assert!(target.health.is_up());
        assert_eq!(target.health.weight_percent(), 50);
        target.record_agent(Ok("drain".into()));
        assert_eq!(target.health.agent_state(), AdminState::Drain);
        assert_eq!(target.health.weight_percent(), 50, "unsaid words stay");
    }
}
