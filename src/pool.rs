//! The backends of one frontend and the choice of a backend for a new
//! connection.
//!
//! The pool is the only state the data path shares with the control plane,
//! and it is all atomics: workers read `up` and bump counters, the health
//! watcher (one writer per backend) flips `up`. No lock is ever taken here.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed,
};
use std::thread::Thread;

use crate::config::{FrontendConfig, Mode};

/// Why a live connection could not reach a backend; the watcher reports it
/// when the failures mark the backend down.
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

    fn from_u8(v: u8) -> ConnectFailure {
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
    /// Read by every new connection; written only by this backend's watcher.
    up: AtomicBool,
    /// Connect failures seen on live traffic since the watcher last looked:
    /// the watcher counts each as a failed check, so a dead backend is
    /// marked down as soon as traffic hits it, not at the next interval.
    passive_failures: AtomicU32,
    last_passive_failure: AtomicU8,
    /// The watcher thread, woken when traffic reports a failure.
    watcher: OnceLock<Thread>,
    pub stats: BackendStats,
}

impl Backend {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
    }

    pub fn report_connect_failure(&self, failure: ConnectFailure) {
        self.stats.connect_failures.fetch_add(1, Relaxed);
        self.last_passive_failure.store(failure as u8, Relaxed);
        self.passive_failures.fetch_add(1, Relaxed);
        if let Some(thread) = self.watcher.get() {
            thread.unpark();
        }
    }

    /// The failures reported since the last call, and the kind of the last.
    pub(crate) fn take_passive_failures(&self) -> (u32, ConnectFailure) {
        let count = self.passive_failures.swap(0, Relaxed);
        (
            count,
            ConnectFailure::from_u8(self.last_passive_failure.load(Relaxed)),
        )
    }

    pub(crate) fn set_watcher(&self, thread: Thread) {
        let _ = self.watcher.set(thread);
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
    pub fn new(config: &FrontendConfig) -> Pool {
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
                    // Up until checks say otherwise, as HAProxy does: traffic
                    // flows from the first second.
                    up: AtomicBool::new(true),
                    passive_failures: AtomicU32::new(0),
                    last_passive_failure: AtomicU8::new(0),
                    watcher: OnceLock::new(),
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
    /// The up flags are read once: a watcher flipping one mid-choice must
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
        Pool::new(&Config::from_toml(&text, "t").expect("config").frontends[0])
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
