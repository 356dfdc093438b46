//! The backends of one frontend and the choice of a backend for a new
//! connection.
//!
//! The pool is the only state the data path shares with the control plane,
//! and it is all atomics: workers read `up` and bump counters, the health
//! scheduler (the one writer of each target's health) flips `up`. No lock
//! is ever taken here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::config::{FrontendConfig, Mode};
use crate::health::{Health, Targets};

/// Why a live connection could not reach a backend; the health scheduler
/// reports it when the failures mark the backend down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectFailure {
    Refused = 1,
    TimedOut = 2,
    Other = 3,
    /// Out of local ports, fds or memory: not the backend's fault, and not
    /// counted against it.
    Local = 4,
}

impl ConnectFailure {
    pub fn from_errno(errno: i32) -> ConnectFailure {
        match errno {
            libc::ECONNREFUSED => ConnectFailure::Refused,
            libc::ECANCELED | libc::ETIMEDOUT | libc::ETIME => ConnectFailure::TimedOut,
            libc::EADDRNOTAVAIL
            | libc::EADDRINUSE
            | libc::ENOBUFS
            | libc::ENOMEM
            | libc::EMFILE
            | libc::ENFILE
            | libc::EAGAIN => ConnectFailure::Local,
            _ => ConnectFailure::Other,
        }
    }

    pub(crate) fn from_u8(v: u8) -> ConnectFailure {
        match v {
            1 => ConnectFailure::Refused,
            2 => ConnectFailure::TimedOut,
            _ => ConnectFailure::Other,
        }
    }
}

/// Counters an operator reads from the stats endpoint and the logs.
#[derive(Default)]
pub struct BackendStats {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub connect_failures: AtomicU64,
    pub bytes_to_backend: AtomicU64,
    pub bytes_from_backend: AtomicU64,
    pub went_down: AtomicU64,
    pub went_up: AtomicU64,
    pub checks_failed: AtomicU64,
}

pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    /// Shared with every backend of any frontend that has the same address
    /// and check settings: one probe, one state.
    pub health: Arc<Health>,
    pub stats: BackendStats,
}

impl Backend {
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    #[cfg(test)]
    fn set_up(&self, up: bool) {
        self.health.set_up(up);
    }

    /// A connect on live traffic succeeded: the failure streak ends.
    pub fn report_connect_success(&self) {
        self.health.report_live_success();
    }

    pub fn report_connect_failure(&self, failure: ConnectFailure) {
        self.stats.connect_failures.fetch_add(1, Relaxed);
        self.health.report_live_failure(failure);
    }
}

/// A set of backend indexes, small enough to live in each connection.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Tried(u64);

impl Tried {
    pub fn with(self, index: usize) -> Tried {
        Tried(self.0 | 1 << index)
    }

    pub fn contains(self, index: usize) -> bool {
        self.0 & (1 << index) != 0
    }
}

pub struct Pool {
    pub frontend: String,
    pub mode: Mode,
    failback: bool,
    pub backends: Vec<Backend>,
    /// Round robin position, shared by every worker: one `fetch_add` per
    /// connection keeps the spread exact across threads.
    next: AtomicUsize,
    /// Active-passive without fail-back: the backend that was promoted and
    /// keeps the traffic after the active one returns.
    promoted: AtomicUsize,
}

impl Pool {
    /// Takes each backend's health from `targets`, so that frontends
    /// sharing an address and a check share its state.
    pub fn new(config: &FrontendConfig, targets: &mut Targets) -> Pool {
        Pool {
            frontend: config.name.clone(),
            mode: config.mode,
            failback: config.failback,
            backends: config
                .backends
                .iter()
                .map(|b| Backend {
                    addr: b.addr,
                    name: b.name.clone(),
                    health: targets.health(b.addr, &config.check),
                    stats: BackendStats::default(),
                })
                .collect(),
            next: AtomicUsize::new(0),
            promoted: AtomicUsize::new(0),
        }
    }

    fn usable(&self, index: usize, tried: Tried) -> bool {
        !tried.contains(index) && self.backends[index].is_up()
    }

    /// The backend for a new connection (or a retry, with the backends
    /// already tried), or `None` when no backend that is up is left.
    pub fn select(&self, tried: Tried) -> Option<usize> {
        match self.mode {
            Mode::ActiveActive => self.select_round_robin(tried),
            Mode::ActivePassive => self.select_by_priority(tried),
        }
    }

    /// Counts only usable backends, so that with one of three down the other
    /// two still share evenly instead of the next one in line taking double.
    /// The up flags are read once: the scheduler flipping one mid-choice must
    /// not leave the turn pointing past the end.
    fn select_round_robin(&self, tried: Tried) -> Option<usize> {
        let usable = (0..self.backends.len())
            .filter(|&i| self.usable(i, tried))
            .fold(0u64, |mask, i| mask | 1 << i);
        if usable == 0 {
            return None;
        }
        let turn = self.next.fetch_add(1, Relaxed) % usable.count_ones() as usize;
        (0..self.backends.len())
            .filter(|&i| usable & (1 << i) != 0)
            .nth(turn)
    }

    fn select_by_priority(&self, tried: Tried) -> Option<usize> {
        if !self.failback {
            let promoted = self.promoted.load(Relaxed);
            if promoted < self.backends.len() && self.usable(promoted, tried) {
                return Some(promoted);
            }
        }
        let chosen = (0..self.backends.len()).find(|&i| self.usable(i, tried))?;
        if !self.failback && tried == Tried::default() {
            self.promoted.store(chosen, Relaxed);
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn pool(mode: &str, failback: bool, n: usize) -> Pool {
        let backends: Vec<String> = (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 9000 + i))
            .collect();
        let text = format!(
            "[[frontend]]\nlisten = \"127.0.0.1:1\"\nmode = \"{mode}\"\nfailback = {failback}\nbackends = [{}]\n",
            backends.join(",")
        );
        Pool::new(
            &Config::from_toml(&text, "t").expect("config").frontends[0],
            &mut Targets::default(),
        )
    }

    #[test]
    fn round_robin_skips_down_backends_evenly() {
        let p = pool("active-active", true, 3);
        let picks: Vec<_> = (0..6)
            .map(|_| p.select(Tried::default()).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        p.backends[1].set_up(false);
        let mut counts = [0; 3];
        for _ in 0..100 {
            counts[p.select(Tried::default()).unwrap()] += 1;
        }
        assert_eq!(counts, [50, 0, 50]);
        assert_eq!(p.select(Tried::default().with(0).with(2)), None);
    }

    #[test]
    fn local_connect_errors_are_not_the_backends_fault() {
        assert_eq!(
            ConnectFailure::from_errno(libc::EADDRNOTAVAIL),
            ConnectFailure::Local
        );
        assert_eq!(
            ConnectFailure::from_errno(libc::EMFILE),
            ConnectFailure::Local
        );
        assert_eq!(
            ConnectFailure::from_errno(libc::ECONNREFUSED),
            ConnectFailure::Refused
        );
        assert_eq!(
            ConnectFailure::from_errno(libc::ECANCELED),
            ConnectFailure::TimedOut
        );
    }

    #[test]
    fn active_passive_fails_over_and_back() {
        let p = pool("active-passive", true, 3);
        assert_eq!(p.select(Tried::default()), Some(0));
        p.backends[0].set_up(false);
        assert_eq!(p.select(Tried::default()), Some(1));
        assert_eq!(p.select(Tried::default().with(1)), Some(2));
        p.backends[0].set_up(true);
        assert_eq!(p.select(Tried::default()), Some(0));
    }

    #[test]
    fn without_failback_the_promoted_backend_keeps_traffic() {
        let p = pool("active-passive", false, 2);
        assert_eq!(p.select(Tried::default()), Some(0));
        p.backends[0].set_up(false);
        assert_eq!(p.select(Tried::default()), Some(1));
        p.backends[0].set_up(true);
        assert_eq!(p.select(Tried::default()), Some(1));
        p.backends[1].set_up(false);
        assert_eq!(p.select(Tried::default()), Some(0));
    }
}
