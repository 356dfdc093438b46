//! Backend slots, the queue in front of them, and connect retries.
//!
//! A backend with `maxconn` takes at most that many connections at once,
//! counted across workers from the moment one is assigned to it (its
//! connect counts) to its end. When every usable backend of a frontend is
//! full, a new connection waits in its worker's queue for that frontend
//! (HAProxy's backend queue), first come first served (per route: a route
//! whose backends are full holds back none of another's), up to
//! `timeout-queue`. A slot given back on any worker wakes the workers that
//! have connections queued on that frontend ([`Waiting`] bits and their
//! eventfds, as for the global limit).
//!
//! `retries` bounds the connect attempts of one connection: a failed
//! connect moves on to a backend not yet tried at once (HAProxy's
//! `redispatch`); once every candidate was tried, the round starts again
//! after a short delay (200 ms, doubling up to 1 s), so a single backend
//! that refuses while it restarts is tried again rather than costing the
//! client its connection.
//!
//! [`Waiting`]: crate::model::Waiting

use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::model::{FrontendShared, FrontendSnapshot, Slot, Tried};

/// The delay before the first retry round; doubled each round up to
/// [`RETRY_DELAY_MAX`]. Short, since a refused connect costs the backend
/// nothing; growing, so a backend that stays away is not hammered. With
/// the default 3 retries a single backend gets 1.4 s to come back.
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// HAProxy's fixed turn-around between retries on the same server.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(1);

/// How long to wait before retry round `round` (1 for the first).
pub fn retry_delay(round: u32) -> Duration {
    let factor = 1u32 << round.saturating_sub(1).min(10);
    (RETRY_DELAY * factor).min(RETRY_DELAY_MAX)
}

/// What choosing a backend for a connection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// This backend, with a slot taken when `slot`.
    Backend { index: usize, slot: bool },
    /// Backends not yet tried are usable, but all at their maxconn.
    Full,
    /// No usable backend is left to try.
    Exhausted,
}

/// Chooses a backend not in `tried` and takes a slot on it. A selector
/// skips full backends, but another worker may take the last slot between
/// its look and the claim: the pick then goes on past that backend.
/// `limited` (some backend of the frontend has a maxconn) tells whether a
/// failed pick may mean "full" rather than "none usable": a frontend
/// without limits never looks.
pub fn pick(
    snap: &FrontendSnapshot,
    route: usize,
    tried: &Tried,
    client: Option<IpAddr>,
    limited: bool,
) -> Pick {
    let Some(index) = snap.select_in(route, tried, client) else {
        return none_left(snap, route, tried, limited);
    };
    match snap.backends[index].take_slot() {
        Slot::Unlimited => Pick::Backend { index, slot: false },
        Slot::Taken => Pick::Backend { index, slot: true },
        Slot::Full => pick_past_full(snap, route, tried, client, index),
    }
}

/// The rare path: a claim lost a race with another worker.
fn pick_past_full(
    snap: &FrontendSnapshot,
    route: usize,
    tried: &Tried,
    client: Option<IpAddr>,
    full: usize,
) -> Pick {
    let first = route_range(snap, route).start;
    let mut past = tried.clone();
    past.insert(full - first);
    while let Some(index) = snap.select_in(route, &past, client) {
        match snap.backends[index].take_slot() {
            Slot::Unlimited => return Pick::Backend { index, slot: false },
            Slot::Taken => return Pick::Backend { index, slot: true },
            Slot::Full => past.insert(index - first),
        }
    }
    Pick::Full
}

/// Where a route's backends sit in the snapshot's set (`tried` counts
/// from its start).
fn route_range(snap: &FrontendSnapshot, route: usize) -> std::ops::Range<usize> {
    snap.routes
        .get(route)
        .map_or(0..snap.backends.len(), |r| r.backends.clone())
}

fn none_left(snap: &FrontendSnapshot, route: usize, tried: &Tried, limited: bool) -> Pick {
    let range = route_range(snap, route);
    let full = limited
        && snap.backends.get(range).is_some_and(|set| {
            set.iter()
                .enumerate()
                .any(|(i, b)| !tried.contains(i) && b.usable() && !b.has_room())
        });
    if full { Pick::Full } else { Pick::Exhausted }
}

/// One worker's queued connections (slab keys), per frontend, in arrival
/// order. Keyed by the frontend's shared state, which outlives reloads:
/// a reload that keeps the frontend keeps its queue.
#[derive(Default)]
pub struct Queues {
    lines: Vec<(Arc<FrontendShared>, VecDeque<usize>)>,
}

impl Queues {
    pub fn push(&mut self, frontend: &Arc<FrontendShared>, key: usize) {
        match self
            .lines
            .iter_mut()
            .find(|(f, _)| Arc::ptr_eq(f, frontend))
        {
            Some((_, keys)) => keys.push_back(key),
            None => self
                .lines
                .push((Arc::clone(frontend), VecDeque::from([key]))),
        }
    }

    /// Takes `key` out wherever it waits (it left the queue another way:
    /// closed, timed out, its client gone).
    pub fn remove(&mut self, frontend: &FrontendShared, key: usize) {
        let Some(line) = self
            .lines
            .iter()
            .position(|(f, _)| std::ptr::eq(Arc::as_ptr(f), frontend))
        else {
            return;
        };
        let keys = &mut self.lines[line].1;
        if let Some(at) = keys.iter().position(|k| *k == key) {
            keys.remove(at);
        }
        if keys.is_empty() {
            self.lines.swap_remove(line);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The frontends with connections queued here.
    pub fn frontends(&self) -> Vec<Arc<FrontendShared>> {
        self.lines.iter().map(|(f, _)| Arc::clone(f)).collect()
    }

    /// Every queued key, for a stop or a reload to go through.
    pub fn keys(&self) -> Vec<usize> {
        self.lines
            .iter()
            .flat_map(|(_, k)| k.iter().copied())
            .collect()
    }

    /// A frontend's queued keys, oldest first.
    pub fn line_of(&self, frontend: &FrontendShared) -> Vec<usize> {
        self.line(frontend)
            .map(|keys| keys.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn front(&self, frontend: &FrontendShared) -> Option<usize> {
        self.line(frontend).and_then(|keys| keys.front().copied())
    }

    pub fn pop_front(&mut self, frontend: &FrontendShared) {
        if let Some(key) = self.front(frontend) {
            self.remove(frontend, key);
        }
    }

    fn line(&self, frontend: &FrontendShared) -> Option<&VecDeque<usize>> {
        self.lines
            .iter()
            .find(|(f, _)| std::ptr::eq(Arc::as_ptr(f), frontend))
            .map(|(_, keys)| keys)
    }
}

/// Bytes the client sent that wait in its socket: a client that ended its
/// stream after sending a request still wants the answer, one that sent
/// nothing has left.
pub fn unread_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given; the fd is the
    // connection's open client socket.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 { n.max(0) as usize } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::{BackendShared, Health};

    fn frontend(n: usize, maxconn: Option<u32>) -> FrontendSnapshot {
        let backends: Vec<String> = (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 9000 + i))
            .collect();
        let text = format!(
            "[[frontend]]\nlisten = \"127.0.0.1:1\"\nbackends = [{}]\n",
            backends.join(",")
        );
        let config = Config::from_toml(&text, "t").expect("config").frontends[0].clone();
        let shared = Arc::new(FrontendShared::new(&config.name));
        let backends = config
            .backends
            .iter()
            .map(|b| {
                let backend =
                    BackendShared::new(&config.name, &b.name, b.addr, Arc::new(Health::new(3)));
                backend.set_maxconn(maxconn);
                Arc::new(backend)
            })
            .collect();
        FrontendSnapshot::new(config, shared, backends)
    }

    #[test]
    fn full_backends_are_skipped_then_the_pick_says_full() {
        let f = frontend(2, Some(2));
        let none = Tried::default();
        let mut picks = Vec::new();
        for _ in 0..4 {
            match pick(&f, 0, &none, None, true) {
                Pick::Backend { index, slot: true } => picks.push(index),
                other => panic!("{other:?}"),
            }
        }
        picks.sort();
        assert_eq!(picks, [0, 0, 1, 1]);
        assert_eq!(pick(&f, 0, &none, None, true), Pick::Full);
        f.backends[1].give_slot();
        assert_eq!(
            pick(&f, 0, &none, None, true),
            Pick::Backend {
                index: 1,
                slot: true
            }
        );
        // Full and down: nothing to wait for.
        f.backends[0].health.set_up(false);
        f.backends[1].health.set_up(false);
        assert_eq!(pick(&f, 0, &none, None, true), Pick::Exhausted);
    }

    #[test]
    fn a_lost_race_for_the_last_slot_moves_on() {
        let f = frontend(2, Some(1));
        // Backend 0 looks free to the selector but its slot is gone.
        assert_eq!(f.backends[0].take_slot(), Slot::Taken);
        assert_eq!(
            pick_past_full(&f, 0, &Tried::default(), None, 0),
            Pick::Backend {
                index: 1,
                slot: true
            }
        );
        assert_eq!(
            pick_past_full(&f, 0, &Tried::default(), None, 0),
            Pick::Full
        );
    }

    #[test]
    fn without_maxconn_nothing_is_counted() {
        let f = frontend(1, None);
        for _ in 0..10 {
            assert_eq!(
                pick(&f, 0, &Tried::default(), None, false),
                Pick::Backend {
                    index: 0,
                    slot: false
                }
            );
        }
        assert_eq!(
            f.backends[0]
                .stats
                .slots
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn retry_delays_grow_to_a_second() {
        let ms = |r| retry_delay(r).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(40)],
            [200, 400, 800, 1000, 1000]
        );
    }

    #[test]
    fn queues_keep_arrival_order_per_frontend() {
        let a = Arc::new(FrontendShared::new("a"));
        let b = Arc::new(FrontendShared::new("b"));
        let mut q = Queues::default();
        q.push(&a, 1);
        q.push(&b, 2);
        q.push(&a, 3);
        q.push(&a, 4);
        q.remove(&a, 3);
        assert_eq!(q.front(&a), Some(1));
        q.pop_front(&a);
        assert_eq!(q.front(&a), Some(4));
        q.pop_front(&a);
        assert_eq!(q.front(&a), None);
        assert_eq!(q.frontends().len(), 1);
        q.remove(&b, 2);
        assert!(q.is_empty());
    }
}
