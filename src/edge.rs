//! The admission decision at the edge: a frontend's source ACL and its
//! per-source limits, taken once per client before any backend is touched.
//!
//! [`Policy::admit_source`] is the one entry point: the worker calls it at
//! accept (with the peer address), and a stage that learns the real
//! client address later (a PROXY header from a trusted upstream) calls it
//! then instead. It counts its own refusals, so whoever calls it never
//! forgets to.
//!
//! The per-source table is shared by every worker and kept in the
//! frontend's [`Sources`] (which outlives reloads, so the counts of open
//! connections stay right across them). It is sharded behind mutexes,
//! touched only when a limit is set, and bounded: an entry lives while its
//! source has connections open or its rate bucket refills (at most a
//! second); past a soft cap, entries without open connections are swept
//! out. Entries with open connections are never evicted, and there are
//! never more of them than open connections (which the connection limit
//! bounds).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::acl::{self, Acl};

/// A frontend's edge settings (part of its config; compared on reload).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeConfig {
    /// `allow`, `deny`, `allow-file`, `deny-file`; `None` without any.
    pub acl: Option<Arc<Acl>>,
    /// Most connections open at once from one source, all workers together.
    pub max_conn_per_source: Option<u32>,
    /// Most new connections per second from one source (a token bucket
    /// that holds one second's worth).
    pub max_rate_per_source: Option<u32>,
    /// HAProxy's `timeout client-fin`: how long a connection whose backend
    /// ended its stream (the FIN passed on to the client) may idle.
    pub client_fin_timeout: Option<Duration>,
    /// HAProxy's `timeout server-fin`: how long a connection whose client
    /// ended its stream (the FIN passed on to the backend) may idle.
    pub server_fin_timeout: Option<Duration>,
}

/// Why a client was turned away; each is a `reason` label of
/// `ringlb_frontend_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Acl = 0,
    /// At `max-conn-per-source`.
    SourceLimit = 1,
    /// Over `max-rate-per-source`.
    SourceRate = 2,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::Acl, Refusal::SourceLimit, Refusal::SourceRate];

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Acl => "acl",
            Refusal::SourceLimit => "source-limit",
            Refusal::SourceRate => "source-rate",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Acl => "not allowed by the source ACL",
            Refusal::SourceLimit => "at max-conn-per-source",
            Refusal::SourceRate => "over max-rate-per-source",
        }
    }
}

const SHARDS: usize = 64;
/// Entries kept per shard for rate history before idle ones are evicted:
/// 16,384 sources per frontend, about 1.5 MiB.
const SHARD_SOFT_CAP: usize = 256;

/// One source's state.
#[derive(Clone, Copy, Debug)]
struct Entry {
    conns: u32,
    /// Tokens left in the rate bucket, as of `refilled`.
    tokens: f64,
    refilled: Instant,
    /// The rate the bucket was last checked at (0: no rate limit).
    rate: u32,
}

impl Entry {
    fn new(now: Instant, rate: u32) -> Entry {
        Entry {
            conns: 0,
            tokens: f64::from(rate),
            refilled: now,
            rate,
        }
    }

    fn refill(&mut self, now: Instant, rate: u32) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(rate));
        self.refilled = now;
        self.rate = rate;
    }

    /// Nothing to remember: no connection open and a bucket that would be
    /// full again (it refills within a second).
    fn idle(&self, now: Instant) -> bool {
        self.conns == 0
            && (self.rate == 0
                || now.saturating_duration_since(self.refilled) >= Duration::from_secs(1))
    }
}

/// A frontend's state at the edge that outlives snapshots: the per-source
/// table and the refusal counters.
pub struct Sources {
    shards: Box<[Mutex<Shard>]>,
    /// Keyed per process: a client cannot pick addresses that all land
    /// in one shard.
    hasher: std::collections::hash_map::RandomState,
    refused: [AtomicU64; 3],
}

struct Shard {
    map: HashMap<IpAddr, Entry>,
    /// The size at which the next sweep runs: twice what the last one
    /// left, so sweeping a shard full of open connections stays amortised
    /// constant time per new source.
    sweep_at: usize,
}

impl Default for Sources {
    fn default() -> Sources {
        Sources {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        sweep_at: SHARD_SOFT_CAP,
                    })
                })
                .collect(),
            hasher: Default::default(),
            refused: Default::default(),
        }
    }
}

impl Sources {
    pub fn refused(&self, refusal: Refusal) -> u64 {
        self.refused[refusal as usize].load(Relaxed)
    }

    fn count(&self, refusal: Refusal) -> Refusal {
        self.refused[refusal as usize].fetch_add(1, Relaxed);
        refusal
    }

    fn shard(&self, key: IpAddr) -> MutexGuard<'_, Shard> {
        let index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        match self.shards[index].lock() {
            Ok(guard) => guard,
            // The lock is held for a few map operations that cannot leave
            // an entry half written: the map is sound.
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sources tracked now, all shards (for tests and the status).
    pub fn tracked(&self) -> usize {
        (0..SHARDS)
            .map(|i| self.shards[i].lock().map_or(0, |s| s.map.len()))
            .sum()
    }

    /// Counts a new connection from `key` if the limits allow it.
    fn claim(
        &self,
        key: IpAddr,
        max_conn: Option<u32>,
        rate: Option<u32>,
        now: Instant,
    ) -> Result<(), Refusal> {
        let mut shard = self.shard(key);
        if shard.map.len() >= shard.sweep_at && !shard.map.contains_key(&key) {
            shard.sweep(now);
        }
        let entry = shard
            .map
            .entry(key)
            .or_insert_with(|| Entry::new(now, rate.unwrap_or(0)));
        if max_conn.is_some_and(|max| entry.conns >= max) {
            return Err(Refusal::SourceLimit);
        }
        match rate {
            Some(rate) => {
                entry.refill(now, rate);
                if entry.tokens < 1.0 {
                    return Err(Refusal::SourceRate);
                }
                entry.tokens -= 1.0;
            }
            None => entry.rate = 0,
        }
        entry.conns += 1;
        Ok(())
    }

    fn release(&self, key: IpAddr) {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if let Some(entry) = shard.map.get_mut(&key) {
            entry.conns = entry.conns.saturating_sub(1);
            if entry.idle(now) {
                shard.map.remove(&key);
            }
        }
    }
}

impl Shard {
    /// Makes room: idle entries go; if a flood of new sources left none
    /// idle, every entry without an open connection goes too (its rate
    /// history is lost, which only forgives).
    fn sweep(&mut self, now: Instant) {
        let before = self.map.len();
        self.map.retain(|_, e| !e.idle(now));
        if self.map.len() == before {
            self.map.retain(|_, e| e.conns > 0);
        }
        self.sweep_at = (2 * self.map.len()).max(SHARD_SOFT_CAP);
    }
}

/// The key a source is counted under: an IPv4 address, or an IPv6 /64 (a
/// host usually has a whole /64; counting each address would let one host
/// take 2^64 budgets).
fn source_key(ip: IpAddr) -> IpAddr {
    match acl::canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::MAX >> 64))),
        v4 => v4,
    }
}

/// One admitted connection's place in the per-source table; dropping it
/// (whatever ends the connection) gives the place back.
#[must_use]
#[derive(Default)]
pub struct SourceGuard(Option<(Arc<Sources>, IpAddr)>);

impl Drop for SourceGuard {
    fn drop(&mut self) {
        if let Some((sources, key)) = self.0.take() {
            sources.release(key);
        }
    }
}

/// A frontend snapshot's admission rules, with its shared table.
pub struct Policy {
    acl: Option<Arc<Acl>>,
    max_conn: Option<u32>,
    max_rate: Option<u32>,
    sources: Arc<Sources>,
}

impl Policy {
    pub fn new(config: &EdgeConfig, sources: &Arc<Sources>) -> Policy {
        Policy {
            acl: config.acl.clone(),
            max_conn: config.max_conn_per_source,
            max_rate: config.max_rate_per_source,
            sources: Arc::clone(sources),
        }
    }

    /// Whether any rule applies: without one, the client address need not
    /// even be read.
    pub fn is_active(&self) -> bool {
        self.acl.is_some() || self.limited()
    }

    fn limited(&self) -> bool {
        self.max_conn.is_some() || self.max_rate.is_some()
    }

    /// Admits `ip` (deny wins, then the allow list, then the per-source
    /// limits) or says why not; a refusal is counted. The guard holds the
    /// source's place until the connection ends.
    pub fn admit_source(&self, ip: IpAddr, now: Instant) -> Result<SourceGuard, Refusal> {
        if self.acl.as_ref().is_some_and(|acl| !acl.allows(ip)) {
            return Err(self.sources.count(Refusal::Acl));
        }
        if !self.limited() {
            return Ok(SourceGuard(None));
        }
        let key = source_key(ip);
        match self.sources.claim(key, self.max_conn, self.max_rate, now) {
            Ok(()) => Ok(SourceGuard(Some((Arc::clone(&self.sources), key)))),
            Err(refusal) => Err(self.sources.count(refusal)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{Cidr, PrefixSet};

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn policy(conn: Option<u32>, rate: Option<u32>) -> Policy {
        let config = EdgeConfig {
            max_conn_per_source: conn,
            max_rate_per_source: rate,
            ..EdgeConfig::default()
        };
        Policy::new(&config, &Arc::new(Sources::default()))
    }

    #[test]
    fn the_connection_limit_counts_open_connections_per_source() {
        let p = policy(Some(2), None);
        let now = Instant::now();
        let a = p.admit_source(ip("127.0.0.2"), now).expect("first");
        let b = p.admit_source(ip("::ffff:127.0.0.2"), now).expect("second");
        assert_eq!(
            p.admit_source(ip("127.0.0.2"), now).err(),
            Some(Refusal::SourceLimit)
        );
        let _other = p
            .admit_source(ip("127.0.0.3"), now)
            .expect("another source");
        drop(a);
        let _c = p.admit_source(ip("127.0.0.2"), now).expect("room again");
        drop(b);
        assert_eq!(p.sources.refused(Refusal::SourceLimit), 1);
        // One IPv6 host (a /64) is one source.
        let _v6 = p.admit_source(ip("2001:db8::1"), now).expect("v6");
        let _v6b = p.admit_source(ip("2001:db8::2"), now).expect("v6 same /64");
        assert!(p.admit_source(ip("2001:db8::3"), now).is_err());
        assert!(p.admit_source(ip("2001:db8:0:1::1"), now).is_ok());
    }

    #[test]
    fn the_rate_limit_refills_over_a_second() {
        let p = policy(None, Some(5));
        let t0 = Instant::now();
        let guards: Vec<_> = (0..5)
            .map(|_| p.admit_source(ip("10.0.0.1"), t0).expect("within the rate"))
            .collect();
        assert_eq!(
            p.admit_source(ip("10.0.0.1"), t0).err(),
            Some(Refusal::SourceRate)
        );
        drop(guards);
        // The entry outlives its connections while the bucket refills.
        assert_eq!(p.sources.tracked(), 1);
        assert!(p.admit_source(ip("10.0.0.1"), t0).is_err());
        let later = t0 + Duration::from_millis(400);
        let _two = (
            p.admit_source(ip("10.0.0.1"), later).expect("refilled"),
            p.admit_source(ip("10.0.0.1"), later).expect("refilled"),
        );
        assert!(p.admit_source(ip("10.0.0.1"), later).is_err());
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_of_sources() {
        let p = policy(None, Some(1));
        let now = Instant::now();
        for i in 0..100_000u32 {
            let guard = p.admit_source(IpAddr::from(i.to_be_bytes()), now);
            drop(guard);
        }
        let tracked = p.sources.tracked();
        assert!(tracked <= SHARDS * SHARD_SOFT_CAP, "{tracked}");
        // Entries with open connections are kept whatever the cap.
        let q = policy(Some(1), None);
        let held: Vec<_> = (0..20_000u32)
            .map(|i| q.admit_source(IpAddr::from(i.to_be_bytes()), now))
            .collect();
        assert!(held.iter().all(Result::is_ok));
        assert_eq!(q.sources.tracked(), 20_000);
        assert!(
            q.admit_source(IpAddr::from(7u32.to_be_bytes()), now)
                .is_err()
        );
        drop(held);
        assert_eq!(q.sources.tracked(), 0);
    }

    #[test]
    fn no_limit_tracks_nothing_and_the_acl_refuses_first() {
        let acl = Acl {
            allow: None,
            deny: PrefixSet::new(&[Cidr::parse("127.0.0.3").expect("cidr")]),
        };
        let config = EdgeConfig {
            acl: Some(Arc::new(acl)),
            ..EdgeConfig::default()
        };
        let p = Policy::new(&config, &Arc::new(Sources::default()));
        let now = Instant::now();
        let _g = p.admit_source(ip("127.0.0.2"), now).expect("allowed");
        assert_eq!(p.sources.tracked(), 0);
        assert_eq!(
            p.admit_source(ip("127.0.0.3"), now).err(),
            Some(Refusal::Acl)
        );
        assert_eq!(p.sources.refused(Refusal::Acl), 1);
        assert!(!policy(None, None).is_active());
    }
}
