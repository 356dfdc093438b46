//! Starting, changing and stopping ringlb: the worker threads with their
//! command channels, the health scheduler, and the control plane that
//! binds listeners, publishes snapshots and waits for the workers to take
//! them. Starting is a reload from nothing: the same steps bring the first
//! config into force as every later one.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::config::Config;
use crate::health::Scheduler;
use crate::model::{FrontendSnapshot, Global, Published, ReloadStats, Snapshot};
use crate::reload::{self, Plan};
use crate::worker::{Ack, Command, Commands, Worker};

/// Why ringlb could not start.
#[derive(Debug)]
pub enum StartError {
    Listen {
        frontend: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    Worker(std::io::Error),
    Health(crate::health::StartError),
    /// The fd limit is too low for even one connection.
    Limit(FdBudget),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Listen {
                frontend,
                addr,
                source,
            } => {
                write!(f, "cannot listen on {addr} (frontend {frontend}): {source}")
            }
            StartError::Worker(e) => write!(f, "cannot start a worker: {e}"),
            StartError::Health(e) => e.fmt(f),
            StartError::Limit(budget) => write!(
                f,
                "RLIMIT_NOFILE is {}, which leaves no file descriptor for client connections \
                 (ringlb keeps {} for listeners, workers, checks, the stats server and a reserve); \
                 raise it (ulimit -n, or LimitNOFILE= in a systemd unit)",
                budget.nofile, budget.fixed
            ),
        }
    }
}

impl std::error::Error for StartError {}

/// Where the fds go, for the connection limit: fixed costs first (stdio,
/// one listener per frontend and worker, a ring and a wake eventfd per
/// worker, one health probe per backend at a time plus the checker's own,
/// the stats server's listener and connections, a reserve for everything
/// else: config files, logs, /proc reads), then splice pipes (two fds each:
/// at most a tenth of what is left, and no more than the workers keep,
/// since a direction that finds no pipe copies instead), then two sockets
/// per connection. The reserves grow with the limit but stay small when it
/// is small, so a tight `ulimit -n` still leaves room for connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdBudget {
    pub nofile: u64,
    pub fixed: u64,
    /// For the stats server: its listener and connections.
    pub stats: u64,
    /// Splice pipes, all workers together.
    pub pipes: u64,
    pub connections: u64,
}

/// Most fds set aside for everything ringlb does not count.
const RESERVE_FDS_MAX: u64 = 1024;
/// Health checking besides one probe socket per backend (event loop, timers).
const CHECKER_FDS: u64 = 8;
/// Most pipes budgeted per worker (what a worker's pool keeps at most).
pub const PIPES_PER_WORKER: u64 = 256;

impl FdBudget {
    /// `stats`: whether the admin HTTP server runs (its connections are
    /// budgeted only then).
    pub fn new(nofile: u64, frontends: u64, workers: u64, backends: u64, stats: bool) -> FdBudget {
        let stdio = 3;
        let listeners = frontends * workers;
        let per_worker = 2 * workers;
        let checks = backends + CHECKER_FDS;
        // Its listener and its connection cap, which it takes from the
        // same limit (admin::max_connections).
        let stats = if stats {
            1 + crate::admin::max_connections(nofile) as u64
        } else {
            0
        };
        let reserve = (nofile / 64).clamp(8, RESERVE_FDS_MAX);
        let fixed = stdio + listeners + per_worker + checks + stats + reserve;
        let left = nofile.saturating_sub(fixed);
        let pipes = (left / 10).min(PIPES_PER_WORKER * workers);
        FdBudget {
            nofile,
            fixed,
            stats,
            pipes,
            connections: (left - 2 * pipes) / 2,
        }
    }
}

/// How long the control plane waits for every worker to acknowledge a
/// change; a worker that takes longer is named in the log.
const ACK_WAIT: Duration = Duration::from_secs(5);

/// The control plane's end of one worker's channel (its wake eventfd is
/// in [`Global`]).
struct Link {
    commands: mpsc::Sender<(u64, Command)>,
}

/// One frontend's listening sockets (one per worker), as bound.
pub struct Bound {
    pub id: u64,
    pub frontend: String,
    /// As the config gives it (port 0 stays 0: a reload keeps the port).
    pub configured: SocketAddr,
    /// As bound.
    pub local: SocketAddr,
}

/// Everything a change goes through; one change at a time.
pub(crate) struct ControlPlane {
    /// The config in force (with the worker count and buffers the process
    /// really runs with).
    pub config: Config,
    pub snapshot: Arc<Snapshot>,
    pub listeners: Vec<Bound>,
    next_listener: u64,
    links: Vec<Link>,
    pub global: Arc<Global>,
    acks: mpsc::Receiver<Ack>,
    seq: u64,
    health: Option<Scheduler>,
    pub reload_count: u64,
}

pub struct Server {
    published: Arc<Published>,
    reloads: Arc<ReloadStats>,
    /// False from the first leave, drain or stop on: what `/ready` answers.
    accepting: Arc<AtomicBool>,
    /// When a leave (SIGTERM, `ringlb ctl leave`) ends in a drain.
    leave_at: Mutex<Option<Instant>>,
    control: Mutex<ControlPlane>,
    /// Behind a lock so that `Server` can be shared (the admin socket's
    /// thread holds it too) and still be joined from `&self`.
    workers: Mutex<Vec<JoinHandle<std::io::Result<()>>>>,
}

/// What [`Server::leave`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// Not ready from now on; the drain begins after the leave delay.
    Started,
    /// Leaving already: the drain begins in this long.
    Already(Duration),
    /// Draining or stopping already.
    Draining,
}

impl Server {
    pub fn start(config: &Config) -> Result<Server, StartError> {
        let nofile = raise_fd_limit();
        let backends = config
            .frontends
            .iter()
            .map(|f| f.backends.len())
            .sum::<usize>();
        // Budgeted for the config at start: a reload that adds frontends or
        // backends takes their few fds from the reserve.
        let budget = FdBudget::new(
            nofile,
            config.frontends.len() as u64,
            config.workers as u64,
            backends as u64,
            config.stats.is_some(),
        );
        if budget.connections == 0 {
            return Err(StartError::Limit(budget));
        }
        let wake_fds = (0..config.workers)
            .map(|_| eventfd())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(StartError::Worker)?;
        let global = Arc::new(Global::new(
            budget.connections,
            accept_queue_len(),
            nofile,
            budget.pipes,
            budget.stats,
            wake_fds,
        ));
        let empty = Arc::new(Snapshot {
            generation: 0,
            frontends: Vec::new(),
        });
        let (ack_tx, acks) = mpsc::channel();
        let mut control = ControlPlane {
            config: config.clone(),
            snapshot: Arc::clone(&empty),
            listeners: Vec::new(),
            next_listener: 1,
            links: Vec::new(),
            global,
            acks,
            seq: 0,
            health: None,
            reload_count: 0,
        };
        let mut workers = Vec::new();
        let started = start_workers(config, &mut control, &mut workers, ack_tx);
        let mut server = Server {
            published: Arc::new(Published::new(empty)),
            reloads: Arc::new(ReloadStats::default()),
            accepting: Arc::new(AtomicBool::new(true)),
            leave_at: Mutex::new(None),
            control: Mutex::new(control),
            workers: Mutex::new(workers),
        };
        // Dropping the server stops and joins the workers started.
        started.and_then(|()| server.bring_up(config, &budget))?;
        Ok(server)
    }

    /// The health scheduler, then the first config, as a reload from an
    /// empty one.
    fn bring_up(&mut self, config: &Config, budget: &FdBudget) -> Result<(), StartError> {
        let published = Arc::clone(&self.published);
        let control = self
            .control
            .get_mut()
            .map_err(|_| StartError::Worker(std::io::Error::other("control plane poisoned")))?;
        // Never run with a backend nobody checks.
        control.health = Some(Scheduler::start().map_err(StartError::Health)?);
        let plan = Plan::new(&control.snapshot, &control.listeners, config);
        let bound = plan.bind(config.workers).map_err(|e| StartError::Listen {
            frontend: e.frontend,
            addr: e.addr,
            source: e.source,
        })?;
        let applied = control.apply(plan, bound, config);
        published.store(Arc::clone(&control.snapshot));
        applied.map_err(StartError::Health)?;
        log::info!(
            "connection limit {} (from RLIMIT_NOFILE {}: 2 sockets per connection, {} fds \
             for splice pipes, {} for listeners, workers, checks, the stats server and a \
             reserve); beyond it new clients wait in the kernel's accept queue",
            budget.connections,
            budget.nofile,
            2 * budget.pipes,
            budget.fixed
        );
        for frontend in &control.snapshot.frontends {
            log_listening(
                frontend,
                control.local_addr(frontend.name()),
                config.workers,
            );
        }
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ControlPlane> {
        match self.control.lock() {
            Ok(guard) => guard,
            // A panic mid-change leaves the last published state: workers
            // serve it; the next change starts from it.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The snapshot in force, for the read-only endpoints.
    pub fn published(&self) -> Arc<Published> {
        Arc::clone(&self.published)
    }

    /// The process-wide limits and counters.
    pub fn global(&self) -> Arc<Global> {
        Arc::clone(&self.lock().global)
    }

    pub fn reload_stats(&self) -> Arc<ReloadStats> {
        Arc::clone(&self.reloads)
    }

    /// Each frontend in force with the address it listens on.
    pub fn frontends(&self) -> Vec<(Arc<FrontendSnapshot>, SocketAddr)> {
        let control = self.lock();
        control
            .snapshot
            .frontends
            .iter()
            .map(|f| (Arc::clone(f), control.local_addr(f.name())))
            .collect()
    }

    pub fn drain_timeout(&self) -> Duration {
        self.lock().config.drain_timeout
    }

    pub fn leave_delay(&self) -> Duration {
        self.lock().config.leave_delay
    }

    /// Re-reads the config and applies the difference; see [`reload`].
    pub fn reload(
        &self,
        source: &crate::config::ConfigSource,
    ) -> Result<reload::Summary, reload::Error> {
        reload::reload(self, source)
    }

    pub(crate) fn publish(&self, snapshot: &Arc<Snapshot>) {
        self.published.store(Arc::clone(snapshot));
    }

    /// Whether ringlb still takes new connections (no drain or stop yet).
    pub fn accepting(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.accepting)
    }

    /// Reports not ready from now on while still serving, so that the
    /// routing layer in front (keepalived, BGP) moves the address away
    /// before any port closes; the main thread drains once
    /// [`Server::leave_deadline`] has passed. `who` asked, for the log.
    pub fn leave(&self, who: &str) -> Leave {
        let delay = self.lock().config.leave_delay;
        let mut at = self.leave_at.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(deadline) = *at {
            return Leave::Already(deadline.saturating_duration_since(Instant::now()));
        }
        if !self.accepting.swap(false, Relaxed) {
            return Leave::Draining;
        }
        *at = Some(Instant::now() + delay);
        drop(at);
        let line = format!("{who}: leaving: not ready, still serving for {delay:?}, then draining");
        log::info!("{line}");
        crate::notify::stopping(&line);
        Leave::Started
    }

    /// When the leave in progress, if any, ends in a drain (`None` again
    /// once the drain has begun).
    pub fn leave_deadline(&self) -> Option<Instant> {
        *self.leave_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops accepting; open connections carry on until they end.
    pub fn drain(&self) {
        // Before the workers act: a probe must see "not ready" no later
        // than the listeners close.
        self.accepting.store(false, Relaxed);
        // The leave, if any, is over: `ringlb ctl` now says "draining".
        *self.leave_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.lock().send_all(|| Some(Command::Drain));
    }

    /// Stops accepting and closes every connection.
    pub fn stop(&self) {
        self.accepting.store(false, Relaxed);
        *self.leave_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.lock().send_all(|| Some(Command::Stop));
    }

    /// Every client connection open, including those of frontends a
    /// reload removed that are still draining.
    pub fn active_connections(&self) -> u64 {
        self.lock()
            .global
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn workers(&self) -> MutexGuard<'_, Vec<JoinHandle<std::io::Result<()>>>> {
        match self.workers.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn workers_running(&self) -> bool {
        self.workers().iter().any(|w| !w.is_finished())
    }

    pub fn any_worker_stopped(&self) -> bool {
        self.workers().iter().any(|w| w.is_finished())
    }

    /// Ends every health check now, abandoning probes in flight: a stop
    /// never waits for a check's timeout.
    pub fn stop_health(&self) {
        if let Some(mut scheduler) = self.lock().health.take() {
            scheduler.stop();
        }
    }

    /// Waits for the workers (after `drain` or `stop`), then stops the
    /// health checks. The first worker error, if any, is returned.
    pub fn join(&self) -> std::io::Result<()> {
        self.stop_health();
        self.join_all()
    }

    fn join_all(&self) -> std::io::Result<()> {
        let mut result = Ok(());
        let workers: Vec<_> = self.workers().drain(..).collect();
        for worker in workers {
            let outcome = worker
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("worker panicked")));
            if let (Err(e), Ok(())) = (outcome, &result) {
                result = Err(e);
            }
        }
        result
    }
}

/// A server dropped without `join` (an early return in `start`, a panic in
/// the caller) stops its workers rather than leaving them running behind
/// it. After `join` there is nothing left to stop.
impl Drop for Server {
    fn drop(&mut self) {
        if self.workers().is_empty() && self.lock().health.is_none() {
            return;
        }
        self.stop();
        self.stop_health();
        // Whoever returned early reports why (start returns the worker's
        // error); a second line here would only repeat it.
        let _ = self.join_all();
    }
}

/// One thread per worker, each with its channel and eventfd; returns once
/// every ring is up (or the first failure).
fn start_workers(
    config: &Config,
    control: &mut ControlPlane,
    workers: &mut Vec<JoinHandle<std::io::Result<()>>>,
    acks: mpsc::Sender<Ack>,
) -> Result<(), StartError> {
    let (ready_tx, ready_rx) = mpsc::channel();
    for id in 0..config.workers {
        let (commands, receiver) = mpsc::channel();
        let channel = Commands {
            receiver,
            acks: acks.clone(),
        };
        control.links.push(Link { commands });
        let global = Arc::clone(&control.global);
        let ready = ready_tx.clone();
        let buffers = config.buffers;
        let handle = std::thread::Builder::new()
            .name(format!("ringlb-worker-{id}"))
            .spawn(move || {
                // The ring is made on the thread that uses it: the
                // single-issuer flag ties it to this thread.
                match Worker::new(id, channel, global, buffers) {
                    Ok(worker) => {
                        let _ = ready.send(Ok(()));
                        worker.run()
                    }
                    Err(e) => {
                        let message = std::io::Error::new(e.kind(), e.to_string());
                        let _ = ready.send(Err(e));
                        Err(message)
                    }
                }
            })
            .map_err(StartError::Worker)?;
        workers.push(handle);
    }
    drop(ready_tx);
    for _ in 0..workers.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StartError::Worker(e)),
            Err(_) => break,
        }
    }
    Ok(())
}

impl ControlPlane {
    pub fn workers(&self) -> usize {
        self.links.len()
    }

    pub fn local_addr(&self, frontend: &str) -> SocketAddr {
        self.listeners
            .iter()
            .rev()
            .find(|b| b.frontend == frontend)
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |b| b.local)
    }

    pub fn next_listener_id(&mut self) -> u64 {
        self.next_listener += 1;
        self.next_listener
    }

    /// Sends a command to every worker (`make` is called once per worker)
    /// and wakes it. Returns the sequence number of the last one.
    pub fn send_all(&mut self, mut make: impl FnMut() -> Option<Command>) -> u64 {
        let mut commands: Vec<Command> = Vec::with_capacity(self.links.len());
        for _ in 0..self.links.len() {
            match make() {
                Some(command) => commands.push(command),
                None => return self.seq,
            }
        }
        self.send_each(commands)
    }

    /// Sends one command per worker, in worker order, and wakes them.
    pub fn send_each(&mut self, commands: Vec<Command>) -> u64 {
        self.seq += 1;
        for (worker, (link, command)) in self.links.iter().zip(commands).enumerate() {
            // A worker that has stopped is reported by the ack wait.
            let _ = link.commands.send((self.seq, command));
            self.global.wake(worker);
        }
        self.seq
    }

    /// Waits until every worker has acknowledged `seq` (commands are taken
    /// in order, so every one before it too), up to [`ACK_WAIT`]. Returns
    /// the workers that did not.
    pub fn wait_acks(&mut self, seq: u64) -> Vec<usize> {
        let mut done = vec![false; self.links.len()];
        let deadline = Instant::now() + ACK_WAIT;
        while done.iter().any(|d| !d) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok(ack) if ack.seq >= seq => {
                    if let Some(d) = done.get_mut(ack.worker) {
                        *d = true;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let late: Vec<usize> = (0..done.len()).filter(|&w| !done[w]).collect();
        for worker in &late {
            log::error!(
                "worker {worker} did not acknowledge change {seq} within {ACK_WAIT:?}; \
                 it may still serve the previous config"
            );
        }
        late
    }

    /// Brings a plan into force: listeners first (already bound), then the
    /// snapshot, then removals, then the health checks' new target set.
    pub fn apply(
        &mut self,
        plan: Plan,
        bound: Vec<reload::NewListener>,
        config: &Config,
    ) -> Result<(), crate::health::StartError> {
        let Plan {
            snapshot,
            removed_listeners,
            closed_backends,
            ..
        } = plan;
        for listener in bound {
            let id = self.next_listener_id();
            let frontend = listener.frontend.clone();
            let commands = listener
                .sockets
                .into_iter()
                .map(|socket| Command::AddListener {
                    id,
                    frontend: frontend.clone(),
                    socket,
                })
                .collect();
            self.send_each(commands);
            self.listeners.retain(|b| b.frontend != frontend);
            self.listeners.push(Bound {
                id,
                frontend,
                configured: listener.configured,
                local: listener.local,
            });
        }
        let mut last = self.send_all(|| Some(Command::Publish(Arc::clone(&snapshot))));
        for (id, retire) in removed_listeners {
            let grace = config.drain_timeout;
            last = self.send_all(|| {
                Some(Command::RemoveListener {
                    id,
                    retire: retire.as_ref().map(|s| (Arc::clone(s), grace)),
                })
            });
        }
        for backend in closed_backends {
            last = self.send_all(|| Some(Command::CloseBackend(Arc::clone(&backend))));
        }
        self.wait_acks(last);
        self.snapshot = Arc::clone(&snapshot);
        self.listeners
            .retain(|b| snapshot.frontend(&b.frontend).is_some());
        match &mut self.health {
            Some(health) => health.watch(&snapshot),
            None => Ok(()),
        }
    }
}

pub(crate) fn log_listening(frontend: &FrontendSnapshot, addr: SocketAddr, workers: usize) {
    let backends: Vec<&str> = frontend.backends.iter().map(|b| b.name.as_str()).collect();
    log::info!(
        "frontend {} listening on {addr} ({}, {workers} workers): {}",
        frontend.name(),
        frontend.config.mode,
        backends.join(", ")
    );
}

pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    // Each worker has its own listener on the same port and the kernel
    // spreads connections over them: no shared accept queue, no lock.
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it: no setsockopt per client connection.
    socket.set_tcp_nodelay(true)?;
    // Workers accept with non-blocking accept4(2) near a limit, and while
    // draining, to know when the queue is empty.
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG as i32)?;
    Ok(socket)
}

/// The accept queue asked for each listener; the kernel caps it at
/// net.core.somaxconn.
const LISTEN_BACKLOG: u64 = 4096;

/// How many clients one listener's accept queue really holds (plus one:
/// the kernel lets the queue reach backlog + 1).
fn accept_queue_len() -> u64 {
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(LISTEN_BACKLOG);
    LISTEN_BACKLOG.min(somaxconn) + 1
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the new fd is owned by the OwnedFd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Two fds per connection plus pipes: the default soft limit of 1024 would
/// cap ringlb near 400 connections, so take what the hard limit allows.
/// Returns the soft limit in force afterwards.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the pointer is to a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        // Cannot happen for RLIMIT_NOFILE; Linux's default is a safe guess.
        return 1024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: the pointer is to a valid rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // RLIM_INFINITY is refused for NOFILE by Linux; cap anyway so the
    // arithmetic stays sane.
    limit.rlim_cur.min(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_fds_for_everything_but_connections() {
        // One frontend, two workers, one backend, ulimit -n 256.
        let budget = FdBudget::new(256, 1, 2, 1, false);
        // stdio 3, listeners 2, rings + eventfds 4, probe 1 + checker 8,
        // reserve 8.
        assert_eq!(budget.fixed, 26);
        assert_eq!(budget.pipes, 23);
        assert_eq!(budget.connections, 92);
        assert!(budget.fixed + 2 * budget.pipes + 2 * budget.connections <= 256);
        // With the stats server: its listener and its cap of 256 / 8.
        let budget = FdBudget::new(256, 1, 2, 1, true);
        assert_eq!(budget.stats, 33);
        assert_eq!(budget.fixed, 26 + 33);
        assert!(budget.fixed + 2 * budget.pipes + 2 * budget.connections <= 256);
    }

    #[test]
    fn a_tight_or_a_generous_limit_still_makes_sense() {
        assert!(FdBudget::new(64, 1, 1, 2, true).connections >= 10);
        assert_eq!(FdBudget::new(16, 1, 1, 1, false).connections, 0);
        // The default hard limit here: about as many as HAProxy's bench
        // config (maxconn 9644 with 512 pipe fds set aside).
        let here = FdBudget::new(20_000, 1, 2, 2, false);
        assert!(here.connections > 9_000, "{here:?}");
        // The stats server's 2,500 connections come out of the same fds.
        let with_stats = FdBudget::new(20_000, 1, 2, 2, true);
        assert!(with_stats.connections > 8_000, "{with_stats:?}");
        let big = FdBudget::new(1 << 20, 4, 2, 16, true);
        assert!(big.connections > 500_000, "{big:?}");
        assert_eq!(big.pipes, 2 * PIPES_PER_WORKER);
    }
}
