//! The failover watcher: active health checks that mark backends down and
//! up, HAProxy style (`inter`, `timeout check`, `rise`, `fall`).
//!
//! Each backend has its own watcher thread, so a backend that hangs for the
//! whole timeout never delays the checks of the others, and no check ever
//! runs on a worker. A watcher is the only writer of its backend's `up`
//! flag; workers read it on every new connection. Workers also report
//! connect failures seen on live traffic, which count as failed checks and
//! wake the watcher at once: a dead backend is marked down as soon as
//! traffic hits it, not at the next interval.
//!
//! Promotion needs nothing more: in active-passive mode the pool sends new
//! connections to the first backend that is up, so marking the active one
//! down is the failover, and marking it up again is the fail-back.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::CheckConfig;
use crate::pool::{Backend, ConnectFailure};
use crate::server::Frontend;

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
    /// Seen on live traffic rather than by a check.
    Traffic(ConnectFailure),
    Other(String),
}

impl Failure {
    fn from_io(e: &std::io::Error) -> Failure {
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
            Failure::Traffic(ConnectFailure::Refused) => {
                f.write_str("connection refused on live traffic")
            }
            Failure::Traffic(ConnectFailure::TimedOut) => {
                f.write_str("connect timed out on live traffic")
            }
            Failure::Traffic(ConnectFailure::Other | ConnectFailure::Local) => {
                f.write_str("connect failed on live traffic")
            }
            Failure::Other(e) => f.write_str(e),
        }
    }
}

/// One health check: connect within the timeout, then optionally send the
/// payload and wait for a reply that starts with the expected bytes, all
/// within the same timeout.
pub fn probe(addr: SocketAddr, check: &CheckConfig) -> Result<(), Failure> {
    let deadline = Instant::now() + check.timeout;
    let stream =
        TcpStream::connect_timeout(&addr, check.timeout).map_err(|e| Failure::from_io(&e))?;
    // Checks end with a reset, as HAProxy's do: thousands of checks must
    // not leave thousands of TIME_WAIT sockets behind.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    let remaining = |failure: Failure| {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(failure)
        } else {
            Ok(left)
        }
    };
    if let Some(payload) = &check.send {
        let _ = stream.set_write_timeout(Some(remaining(Failure::NoReply)?));
        (&stream)
            .write_all(payload)
            .map_err(|e| Failure::from_io(&e))?;
    }
    if let Some(expect) = &check.expect {
        let mut got = Vec::with_capacity(expect.len());
        let mut buf = [0u8; 512];
        while got.len() < expect.len() {
            let _ = stream.set_read_timeout(Some(remaining(Failure::NoReply)?));
            match (&stream).read(&mut buf) {
                Ok(0) => return Err(Failure::Closed),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Failure::NoReply);
                }
                Err(e) => return Err(Failure::from_io(&e)),
            }
            let compared = got.len().min(expect.len());
            if got[..compared] != expect[..compared] {
                return Err(Failure::Mismatch { got });
            }
        }
    }
    Ok(())
}

/// Consecutive results, as HAProxy counts them for `rise` and `fall`.
#[derive(Default)]
struct Streak {
    good: u32,
    bad: u32,
}

struct Watch {
    frontend: Arc<Frontend>,
    index: usize,
    streak: Streak,
}

impl Watch {
    fn backend(&self) -> &Backend {
        &self.frontend.pool.backends[self.index]
    }

    fn check(&self) -> &CheckConfig {
        &self.frontend.config.check
    }

    fn record(&mut self, result: Result<(), Failure>, took: Duration) {
        match result {
            Ok(()) => {
                self.streak.bad = 0;
                self.streak.good = self.streak.good.saturating_add(1);
                let backend = self.backend();
                if !backend.is_up() && self.streak.good >= self.check().rise {
                    backend.set_up(true);
                    backend.stats.went_up.fetch_add(1, Relaxed);
                    log::info!(
                        "backend {} is UP (frontend {}): {} good checks in a row, check took {:.1}ms",
                        backend.name,
                        self.frontend.config.name,
                        self.streak.good,
                        took.as_secs_f64() * 1000.0
                    );
                }
            }
            Err(failure) => {
                self.streak.good = 0;
                self.streak.bad = self.streak.bad.saturating_add(1);
                let backend = self.backend();
                backend.stats.checks_failed.fetch_add(1, Relaxed);
                if backend.is_up() && self.streak.bad >= self.check().fall {
                    backend.set_up(false);
                    backend.stats.went_down.fetch_add(1, Relaxed);
                    let how = match failure {
                        Failure::Traffic(_) => "seen on live traffic".to_string(),
                        _ => format!("check took {:.1}ms", took.as_secs_f64() * 1000.0),
                    };
                    log::warn!(
                        "backend {} is DOWN (frontend {}): {failure}, {} failures in a row, {how}",
                        backend.name,
                        self.frontend.config.name,
                        self.streak.bad,
                    );
                    self.warn_if_none_left();
                } else {
                    log::debug!("check of backend {} failed: {failure}", backend.name);
                }
            }
        }
    }

    fn warn_if_none_left(&self) {
        let pool = &self.frontend.pool;
        if !pool.backends.iter().any(Backend::is_up) {
            log::error!(
                "frontend {} has no backend up: new connections are closed until one comes back",
                self.frontend.config.name
            );
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let interval = self.check().interval;
        let mut next_check = Instant::now();
        while !stop.load(Relaxed) {
            let (failures, kind) = self.backend().take_passive_failures();
            for _ in 0..failures {
                self.record(Err(Failure::Traffic(kind)), Duration::ZERO);
            }
            if Instant::now() >= next_check {
                let started = Instant::now();
                let result = probe(self.backend().addr, self.check());
                self.record(result, started.elapsed());
                next_check = (started + interval).max(Instant::now());
            }
            std::thread::park_timeout(next_check.saturating_duration_since(Instant::now()));
        }
    }
}

/// The watcher threads of every backend of every frontend.
pub struct Watchers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Watchers {
    pub fn spawn(frontends: &[Arc<Frontend>]) -> Watchers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for frontend in frontends {
            for index in 0..frontend.pool.backends.len() {
                let watch = Watch {
                    frontend: Arc::clone(frontend),
                    index,
                    streak: Streak::default(),
                };
                let stop = Arc::clone(&stop);
                let spawned = std::thread::Builder::new()
                    .name(format!("ringlb-check-{index}"))
                    .stack_size(128 * 1024)
                    .spawn(move || watch.run(&stop));
                match spawned {
                    Ok(handle) => {
                        frontend.pool.backends[index].set_watcher(handle.thread().clone());
                        threads.push(handle);
                    }
                    Err(e) => log::error!(
                        "cannot start the health checks of backend {}: {e}; it stays up",
                        frontend.pool.backends[index].name
                    ),
                }
            }
        }
        Watchers { stop, threads }
    }

    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        for thread in &self.threads {
            thread.thread().unpark();
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
