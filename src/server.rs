//! Starting and stopping ringlb: listeners bound up front (so a busy port
//! is reported before anything runs), one worker thread per core, the
//! failover watcher, and the drain/stop controls the signal handler uses.
//! Also the global connection limit, derived from the fd limit.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::mpsc;
use std::thread::JoinHandle;

use socket2::{Domain, Socket, Type};

use crate::config::{Config, FrontendConfig};
use crate::health::{Scheduler, Targets};
use crate::metrics::FrontendStats;
use crate::pool::Pool;
use crate::worker::Worker;

/// A frontend at run time: its settings, its pool, its counters; shared
/// by every worker and the control plane.
pub struct Frontend {
    pub config: FrontendConfig,
    pub pool: Pool,
    pub stats: FrontendStats,
    /// Workers that stopped accepting on this frontend at its maxconn.
    pub waiting: Waiting,
    /// What every frontend shares: the global limit and the workers' wake
    /// fds (so the metrics, which see only frontends, reach it too).
    pub global: Arc<Global>,
}

/// Workers (bit `id % 64`) that stopped accepting at a limit and wait for
/// a connection to end. A superset is harmless: a woken worker that finds
/// no room goes back to waiting.
#[derive(Default)]
pub struct Waiting(AtomicU64);

impl Waiting {
    fn bit(worker: usize) -> u64 {
        1 << (worker % 64)
    }

    /// Sequentially consistent with `take`: a worker that marks itself and
    /// then finds no room, and a worker that frees room and then takes the
    /// marks, cannot both miss each other.
    pub fn mark(&self, worker: usize) {
        self.0.fetch_or(Self::bit(worker), SeqCst);
    }

    /// The marked workers, cleared; one plain load when none waits (the
    /// common case, on every connection's end).
    pub fn take(&self) -> u64 {
        if self.0.load(SeqCst) == 0 {
            return 0;
        }
        self.0.swap(0, SeqCst)
    }

    pub fn includes(bits: u64, worker: usize) -> bool {
        bits & Self::bit(worker) != 0
    }
}

/// Shared by every worker: the connection ceiling and its counters, and
/// the eventfds that wake each worker's ring.
pub struct Global {
    /// Most client connections at once, all frontends together.
    pub limit: u64,
    /// Room under `limit` a multishot accept needs: every listener's accept
    /// queue taken whole at once (frontends x workers x queue length).
    pub multishot_room: u64,
    /// The same under a frontend's maxconn: its listeners, one per worker.
    pub frontend_multishot_room: u64,
    /// RLIMIT_NOFILE (soft, after raising it to the hard limit).
    pub nofile: u64,
    /// Splice pipes the budget allows, all workers together: more would
    /// take fds promised to connections.
    pub pipes: u64,
    /// Fds the budget leaves the stats server (listener and connections).
    pub stats_fds: u64,
    /// Client connections open, all frontends together (plus, for an
    /// instant, the one a worker is accepting).
    pub active: AtomicU64,
    /// Times a worker stopped accepting because `active` reached `limit`.
    pub limit_reached: AtomicU64,
    /// Completions the kernel dropped (io_uring's cq_overflow), all workers.
    pub cq_dropped: AtomicU64,
    /// Times a worker found its completion queue overflowed into kernel
    /// memory: a sign the queue is too small for the load.
    pub cq_overflowed: AtomicU64,
    /// Workers waiting for room under `limit`.
    pub waiting: Waiting,
    /// One eventfd per worker: writing to it wakes the worker's ring. Owned
    /// here, and the workers hold this `Arc`, so a worker's fd stays open
    /// as long as the worker runs, whatever happens to the `Server`.
    wake_fds: Vec<OwnedFd>,
}

impl Global {
    pub fn wake_fd(&self, worker: usize) -> RawFd {
        self.wake_fds[worker].as_raw_fd()
    }

    pub fn workers(&self) -> usize {
        self.wake_fds.len()
    }

    pub fn wake(&self, worker: usize) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64 to an eventfd this struct
        // owns; a full counter (EAGAIN) already means "wake up".
        unsafe { libc::write(self.wake_fd(worker), (&one as *const u64).cast(), 8) };
    }

    /// Wakes the workers in `bits` except `me`.
    pub fn wake_others(&self, bits: u64, me: usize) {
        for worker in 0..self.workers() {
            if worker != me && Waiting::includes(bits, worker) {
                self.wake(worker);
            }
        }
    }
}

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

/// Flags the control plane raises; workers read them when woken.
#[derive(Default)]
pub struct Control {
    pub draining: AtomicBool,
    pub stopping: AtomicBool,
}

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

pub struct Server {
    pub frontends: Vec<Arc<Frontend>>,
    /// The addresses really bound (a port 0 in the config becomes a real one).
    pub local_addrs: Vec<SocketAddr>,
    control: Arc<Control>,
    pub global: Arc<Global>,
    workers: Vec<JoinHandle<std::io::Result<()>>>,
    health: Option<Scheduler>,
}

impl Server {
    pub fn start(config: &Config) -> Result<Server, StartError> {
        let nofile = raise_fd_limit();
        let mut targets = Targets::default();
        let backends = config
            .frontends
            .iter()
            .map(|f| f.backends.len())
            .sum::<usize>();
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
        let queue = accept_queue_len();
        let global = Arc::new(Global {
            limit: budget.connections,
            multishot_room: config.frontends.len() as u64 * config.workers as u64 * queue,
            frontend_multishot_room: config.workers as u64 * queue,
            nofile,
            pipes: budget.pipes,
            stats_fds: budget.stats,
            active: AtomicU64::new(0),
            limit_reached: AtomicU64::new(0),
            cq_dropped: AtomicU64::new(0),
            cq_overflowed: AtomicU64::new(0),
            waiting: Waiting::default(),
            wake_fds,
        });
        let frontends: Vec<Arc<Frontend>> = config
            .frontends
            .iter()
            .map(|c| {
                Arc::new(Frontend {
                    config: c.clone(),
                    pool: Pool::new(c, &mut targets),
                    stats: FrontendStats::default(),
                    waiting: Waiting::default(),
                    global: Arc::clone(&global),
                })
            })
            .collect();
        let mut local_addrs = Vec::new();
        // sockets[worker][frontend]
        let mut sockets: Vec<Vec<Socket>> = (0..config.workers).map(|_| Vec::new()).collect();
        for frontend in &frontends {
            let mut addr = frontend.config.listen;
            for per_worker in sockets.iter_mut() {
                let socket = bind(addr).map_err(|source| StartError::Listen {
                    frontend: frontend.config.name.clone(),
                    addr,
                    source,
                })?;
                // With port 0 the first bind picks the port; the other
                // workers join it.
                addr = socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .unwrap_or(addr);
                per_worker.push(socket);
            }
            local_addrs.push(addr);
        }
        let control = Arc::new(Control::default());
        let mut server = Server {
            frontends,
            local_addrs,
            control,
            global,
            workers: Vec::new(),
            health: None,
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        for (id, worker_sockets) in sockets.into_iter().enumerate() {
            let frontends = server.frontends.clone();
            let control = Arc::clone(&server.control);
            let global = Arc::clone(&server.global);
            let ready = ready_tx.clone();
            let buffers = config.buffers;
            let handle = std::thread::Builder::new()
                .name(format!("ringlb-worker-{id}"))
                .spawn(move || {
                    // The ring is made on the thread that uses it: the
                    // single-issuer flag ties it to this thread.
                    match Worker::new(id, &frontends, worker_sockets, control, global, buffers) {
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
            server.workers.push(handle);
        }
        drop(ready_tx);
        for _ in 0..server.workers.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                // Dropping the server stops and joins the workers started.
                Ok(Err(e)) => return Err(StartError::Worker(e)),
                Err(_) => break,
            }
        }
        match Scheduler::start(&server.frontends) {
            Ok(scheduler) => server.health = Some(scheduler),
            Err(e) => {
                // Never run with a backend nobody checks.
                server.stop();
                let _ = server.join();
                return Err(StartError::Health(e));
            }
        }
        log::info!(
            "connection limit {} (from RLIMIT_NOFILE {nofile}: 2 sockets per connection, {} fds \
             for splice pipes, {} for listeners, workers, checks, the stats server and a \
             reserve); beyond it new clients wait in the kernel's accept queue",
            budget.connections,
            2 * budget.pipes,
            budget.fixed
        );
        for (frontend, addr) in server.frontends.iter().zip(&server.local_addrs) {
            let backends: Vec<&str> = frontend
                .pool
                .backends
                .iter()
                .map(|b| b.name.as_str())
                .collect();
            log::info!(
                "frontend {} listening on {addr} ({}, {} workers): {}",
                frontend.config.name,
                frontend.config.mode,
                config.workers,
                backends.join(", ")
            );
        }
        Ok(server)
    }

    fn wake_workers(&self) {
        for worker in 0..self.workers.len() {
            self.global.wake(worker);
        }
    }

    /// Stops accepting; open connections carry on until they end.
    pub fn drain(&self) {
        self.control.draining.store(true, Relaxed);
        self.wake_workers();
    }

    /// Stops accepting and closes every connection.
    pub fn stop(&self) {
        self.control.draining.store(true, Relaxed);
        self.control.stopping.store(true, Relaxed);
        self.wake_workers();
    }

    pub fn active_connections(&self) -> u64 {
        self.frontends
            .iter()
            .map(|f| f.stats.active.load(Relaxed))
            .sum()
    }

    pub fn workers_running(&self) -> bool {
        self.workers.iter().any(|w| !w.is_finished())
    }

    pub fn any_worker_stopped(&self) -> bool {
        self.workers.iter().any(|w| w.is_finished())
    }

    /// Ends every health check now, abandoning probes in flight: a stop
    /// never waits for a check's timeout.
    pub fn stop_health(&mut self) {
        if let Some(mut scheduler) = self.health.take() {
            scheduler.stop();
        }
    }

    /// Waits for the workers (after `drain` or `stop`), then stops the
    /// health checks. The first worker error, if any, is returned.
    pub fn join(mut self) -> std::io::Result<()> {
        self.stop_health();
        self.join_all()
    }

    fn join_all(&mut self) -> std::io::Result<()> {
        let mut result = Ok(());
        for worker in self.workers.drain(..) {
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
        if self.workers.is_empty() && self.health.is_none() {
            return;
        }
        self.stop();
        self.stop_health();
        // Whoever returned early reports why (start returns the worker's
        // error); a second line here would only repeat it.
        let _ = self.join_all();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<Socket> {
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
