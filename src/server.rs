//! Starting and stopping ringlb: listeners bound up front (so a busy port
//! is reported before anything runs), one worker thread per core, the
//! failover watcher, and the drain/stop controls the signal handler uses.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
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
        }
    }
}

impl std::error::Error for StartError {}

pub struct Server {
    pub frontends: Vec<Arc<Frontend>>,
    /// The addresses really bound (a port 0 in the config becomes a real one).
    pub local_addrs: Vec<SocketAddr>,
    control: Arc<Control>,
    /// One eventfd per worker: writing to it wakes the worker's ring.
    wake_fds: Vec<OwnedFd>,
    workers: Vec<JoinHandle<std::io::Result<()>>>,
    health: Option<Scheduler>,
}

impl Server {
    pub fn start(config: &Config) -> Result<Server, StartError> {
        raise_fd_limit();
        let mut targets = Targets::default();
        let frontends: Vec<Arc<Frontend>> = config
            .frontends
            .iter()
            .map(|c| {
                Arc::new(Frontend {
                    config: c.clone(),
                    pool: Pool::new(c, &mut targets),
                    stats: FrontendStats::default(),
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
            wake_fds: Vec::new(),
            workers: Vec::new(),
            health: None,
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        for (id, worker_sockets) in sockets.into_iter().enumerate() {
            let wake = eventfd().map_err(StartError::Worker)?;
            let wake_fd = wake.as_raw_fd();
            server.wake_fds.push(wake);
            let frontends = server.frontends.clone();
            let control = Arc::clone(&server.control);
            let ready = ready_tx.clone();
            let buffers = config.buffers;
            let handle = std::thread::Builder::new()
                .name(format!("ringlb-worker-{id}"))
                .spawn(move || {
                    // The ring is made on the thread that uses it: the
                    // single-issuer flag ties it to this thread.
                    match Worker::new(id, &frontends, worker_sockets, control, wake_fd, buffers) {
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
                Ok(Err(e)) => {
                    server.stop();
                    let _ = server.join();
                    return Err(StartError::Worker(e));
                }
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
        for fd in &self.wake_fds {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a local u64 to an eventfd we own.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
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

fn bind(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    // Each worker has its own listener on the same port and the kernel
    // spreads connections over them: no shared accept queue, no lock.
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it: no setsockopt per client connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket)
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
/// cap ringlb near 500 connections, so take what the hard limit allows.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the pointer is to a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
