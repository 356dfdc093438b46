//! Choosing a backend for each new connection: HAProxy's `balance`
//! algorithms (roundrobin, leastconn, source, first), weights, backups and
//! slow start.
//!
//! A selector is built per snapshot from the frontend's settings and its
//! backend set. What it reads at pick time is shared by every worker:
//!
//! - a **live tier**, rebuilt lazily: the backends that take new
//!   connections now (usable, effective weight above 0; the non-backup ones,
//!   or the backups when none of those is left), their effective weights and
//!   a smooth weighted schedule over them. Whatever changes who is usable or
//!   how much they weigh (a check, the admin, an agent) bumps one process
//!   wide epoch ([`changed`]); the first pick that sees a new epoch rebuilds
//!   the tier while the other workers go on with the old one. A pick in a
//!   steady pool is a few loads and one `fetch_add`, whatever its size;
//! - a shared **turn** counter: one `fetch_add` per pick makes the weighted
//!   schedule exact over each cycle across all workers;
//! - for `source`, a **Maglev table** built once per snapshot from the
//!   backends' names with a fixed hash, so every worker and every ringlb
//!   with the same config sends a client to the same backend.
//!
//! Every pick re-checks the flags of the backend it lands on, so a backend
//! that went down a moment ago is skipped before the tier catches up.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::{Balance, DEFAULT_WEIGHT, FrontendConfig};
use crate::model::{
    self, BackendShared, FrontendShared, FrontendSnapshot, Route, Selector, Tried, now_ms,
};

/// Slow start ramps in this many steps (HAProxy starts near 1/20 too);
/// each step rebuilds the tier once, so a ramp costs 20 rebuilds.
const RAMP_STEPS: u64 = 20;
/// A weighted cycle longer than this is scaled down (weights stay
/// proportional to within one slot each): 4 MiB of schedule at most.
const MAX_CYCLE: u64 = 1 << 20;
/// Schedule slots a pick looks at past an unusable or tried one before it
/// scans the pool.
const PROBE: usize = 16;
/// Up to this many backends leastconn compares them all; past it, it takes
/// the better of two drawn by weight (power of two choices), so a pick
/// costs the same with 10,000 backends as with 100.
pub const LEASTCONN_EXACT_MAX: usize = 64;
/// Past this many backends a rebuild reads thousands of atomics (about a
/// millisecond at 10,000): such a pool rebuilds at most every
/// [`LARGE_POOL_REBUILD_MS`], so backends flapping or agents changing
/// weights cannot make every pick pay for one. Between rebuilds picks check
/// each backend's own flags: one that went down is skipped at once, one
/// that came back waits for the next rebuild.
const LARGE_POOL: usize = 1000;
const LARGE_POOL_REBUILD_MS: u64 = 50;
/// Maglev table entries a `source` pick walks past unusable backends before
/// it scans the pool.
const WALK: usize = 128;

/// The selector a frontend's settings call for.
pub fn selector_for(config: &FrontendConfig, backends: &[Arc<BackendShared>]) -> Box<dyn Selector> {
    let pool = Pool::new(config, backends);
    match config.balance.algorithm {
        Balance::Roundrobin => Box::new(RoundRobin { pool }),
        Balance::Leastconn => Box::new(LeastConn { pool }),
        Balance::Source => Box::new(Source::new(pool, config, backends)),
        Balance::First => Box::new(Priority {
            pool,
            failback: config.failback,
            promoted_at: AtomicUsize::new(0),
        }),
    }
}

impl FrontendSnapshot {
    /// A frontend's snapshot with a selector per route: its own backends
    /// (route 0) and each SNI route's, each balanced over its own set.
    pub fn new(
        config: FrontendConfig,
        shared: Arc<FrontendShared>,
        backends: Vec<Arc<BackendShared>>,
    ) -> FrontendSnapshot {
        let default_route = crate::config::DEFAULT_ROUTE;
        let own = config.own_backends();
        let mut routes = vec![Route {
            name: default_route.to_string(),
            selector: route_selector(&config, own.clone(), None, &backends),
            backends: own,
            stats: shared.route_stats(default_route),
        }];
        routes.extend(config.tls.routes.iter().map(|r| Route {
            name: r.name.clone(),
            selector: route_selector(&config, r.backends.clone(), Some(r), &backends),
            backends: r.backends.clone(),
            stats: shared.route_stats(&r.name),
        }));
        let router = crate::hello::Router::new(
            std::iter::once(&[][..]).chain(config.tls.routes.iter().map(|r| r.sni.as_slice())),
        );
        FrontendSnapshot {
            config,
            shared,
            backends,
            routes,
            router,
        }
    }
}

/// The selector over one route's backends: the frontend's balance, or the
/// route's own `mode` where it sets another one.
fn route_selector(
    config: &FrontendConfig,
    range: std::ops::Range<usize>,
    route: Option<&crate::config::RouteConfig>,
    backends: &[Arc<BackendShared>],
) -> Box<dyn Selector> {
    let members = backends.get(range.clone()).unwrap_or_default();
    if range.start == 0 && range.end == config.backends.len() && route.is_none() {
        return selector_for(config, members);
    }
    let mut scoped = config.clone();
    scoped.backends = config.backends.get(range).unwrap_or_default().to_vec();
    if let Some(route) = route {
        scoped.failback = route.failback;
        if route.mode != config.mode {
            scoped.mode = route.mode;
            scoped.balance = crate::config::BalanceConfig::new(Balance::for_mode(route.mode));
        }
    }
    selector_for(&scoped, members)
}

/// What the config says of one backend, by index into the snapshot's set.
#[derive(Clone, Copy)]
struct Static {
    weight: u32,
    backup: bool,
}

/// The backends taking new connections now, and a schedule over them.
#[derive(PartialEq, Eq)]
struct Tier {
    /// Indexes into the backend set, in the order given.
    members: Vec<u32>,
    /// Effective weights, one per member, reduced by their common divisor.
    weights: Vec<u32>,
    /// Each member as often as its weight, evenly spread (see [`schedule`]).
    slots: Vec<u32>,
    /// Bit i: backend i is a member. Compact, so a pick on a fresh tier
    /// needs no load from the backend's own cache lines.
    has: Vec<u64>,
}

struct Live {
    epoch: u64,
    /// When it was built, on [`now_ms`]'s clock.
    built: u64,
    /// When a ramping backend's next slow-start step is due (0: none ramps).
    ramp_next: u64,
    tier: Arc<Tier>,
}

/// What every selector shares: the static settings, the live tier and the
/// turn counter.
pub struct Pool {
    statics: Vec<Static>,
    allbackups: bool,
    algorithm: Balance,
    /// 0: no slow start.
    slowstart_ms: u64,
    live: ArcSwap<Live>,
    rebuilding: Mutex<()>,
    turn: AtomicU64,
}

impl Pool {
    fn new(config: &FrontendConfig, backends: &[Arc<BackendShared>]) -> Pool {
        // A snapshot built by hand may hold more backends than its config
        // lists: those count as plain backends of the default weight.
        let statics = (0..backends.len())
            .map(|i| {
                config.backends.get(i).map_or(
                    Static {
                        weight: DEFAULT_WEIGHT,
                        backup: false,
                    },
                    |b| Static {
                        weight: b.weight,
                        backup: b.backup,
                    },
                )
            })
            .collect();
        let slowstart_ms = config
            .balance
            .slowstart
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let pool = Pool {
            statics,
            allbackups: config.balance.allbackups,
            algorithm: config.balance.algorithm,
            slowstart_ms,
            live: ArcSwap::from_pointee(Live {
                epoch: 0,
                built: 0,
                ramp_next: 0,
                tier: Arc::new(Tier::empty()),
            }),
            rebuilding: Mutex::new(()),
            turn: AtomicU64::new(0),
        };
        pool.rebuild(backends, model::epoch());
        pool
    }

    /// Starts a pick on the live tier, rebuilt first when the epoch moved
    /// or a slow-start step is due; while another worker rebuilds, on the
    /// current one, checking each backend's own flags.
    fn begin<'a>(&'a self, backends: &'a [Arc<BackendShared>], tried: &'a Tried) -> Pick<'a> {
        let pick = |live, fresh| Pick {
            pool: self,
            live,
            fresh,
            backends,
            tried,
        };
        let live = self.live.load();
        let epoch = model::epoch();
        let stale = live.epoch != epoch || (live.ramp_next != 0 && now_ms() >= live.ramp_next);
        if !stale {
            return pick(live, true);
        }
        if backends.len() > LARGE_POOL && now_ms() < live.built + LARGE_POOL_REBUILD_MS {
            return pick(live, false);
        }
        match self.rebuilding.try_lock() {
            Ok(_guard) => {
                self.rebuild(backends, epoch);
                pick(self.live.load(), true)
            }
            Err(_) => pick(live, false),
        }
    }

    fn rebuild(&self, backends: &[Arc<BackendShared>], epoch: u64) {
        let now = now_ms();
        let (members, weights, ramp_next) = self.effective(backends, now);
        let current = self.live.load();
        // A flip elsewhere that changes nothing here keeps the schedule.
        let tier = if current.tier.members == members && current.tier.weights == weights {
            Arc::clone(&current.tier)
        } else {
            let slots = schedule(&members, &weights);
            let mut has = vec![0u64; backends.len().div_ceil(64)];
            for i in &members {
                has[*i as usize / 64] |= 1 << (i % 64);
            }
            Arc::new(Tier {
                members,
                weights,
                slots,
                has,
            })
        };
        self.live.store(Arc::new(Live {
            epoch,
            built: now,
            ramp_next,
            tier,
        }));
    }

    /// The tier's members and effective weights now, and when a slow start
    /// next changes them. `first` without `allbackups` keeps one backup,
    /// the first usable one.
    fn effective(&self, backends: &[Arc<BackendShared>], now: u64) -> (Vec<u32>, Vec<u32>, u64) {
        let mut ramp_next = 0;
        let mut tiers: [(Vec<u32>, Vec<u64>); 2] = Default::default();
        for (i, (backend, s)) in backends.iter().zip(&self.statics).enumerate() {
            if s.weight == 0 || !backend.usable() {
                continue;
            }
            let percent = u64::from(backend.health.weight_percent());
            let (step, next) = self.ramp(backend.health.up_since(), now);
            if next != 0 && (ramp_next == 0 || next < ramp_next) {
                ramp_next = next;
            }
            let weight = u64::from(s.weight) * percent * step;
            if weight == 0 {
                continue;
            }
            let tier = &mut tiers[usize::from(s.backup)];
            tier.0.push(i as u32);
            tier.1.push(weight);
        }
        let [primaries, mut backups] = tiers;
        let (members, weights) = if !primaries.0.is_empty() {
            primaries
        } else {
            if !self.allbackups || self.algorithm == Balance::First {
                backups.0.truncate(1);
                backups.1.truncate(1);
            }
            backups
        };
        let weights = reduce(weights);
        (members, weights, ramp_next)
    }

    /// The slow-start step (1..=RAMP_STEPS) of a backend up since `since`,
    /// and when its next step is due (0: at full weight).
    fn ramp(&self, since: u64, now: u64) -> (u64, u64) {
        if self.slowstart_ms == 0 || since == 0 {
            return (RAMP_STEPS, 0);
        }
        let elapsed = now.saturating_sub(since);
        if elapsed >= self.slowstart_ms {
            return (RAMP_STEPS, 0);
        }
        let step = 1 + elapsed * RAMP_STEPS / self.slowstart_ms;
        let next = since + (step * self.slowstart_ms).div_ceil(RAMP_STEPS);
        (step.min(RAMP_STEPS), next.max(now + 1))
    }

    fn next_turn(&self) -> u64 {
        self.turn.fetch_add(1, Relaxed)
    }

    /// Usable with a weight above 0, from the backend's own flags.
    fn usable_now(&self, backends: &[Arc<BackendShared>], i: usize) -> bool {
        self.statics.get(i).is_some_and(|s| s.weight > 0)
            && backends.get(i).is_some_and(|b| b.usable())
    }
}

/// One pick in progress: the tier it reads and what the connection
/// already tried.
struct Pick<'a> {
    pool: &'a Pool,
    live: arc_swap::Guard<Arc<Live>>,
    /// The tier reflects every flip so far: membership says who is usable.
    fresh: bool,
    backends: &'a [Arc<BackendShared>],
    tried: &'a Tried,
}

impl Pick<'_> {
    fn tier(&self) -> &Tier {
        &self.live.tier
    }

    /// A backend this connection may go to: usable, a weight above 0, not
    /// tried yet. On a fresh tier its membership says the first two (a
    /// flip since the epoch was read is caught by the next pick).
    fn takes(&self, i: usize) -> bool {
        self.eligible(i) && self.has_room(i)
    }

    /// [`Self::takes`] but for room under the backend's maxconn.
    /// A stale tier (another worker is rebuilding it) may be the backups'
    /// while a primary has come back: its members are then judged by
    /// their own flags, and backups are left to [`Self::scan`], which
    /// takes them only when no primary is usable.
    fn eligible(&self, i: usize) -> bool {
        !self.tried.contains(i)
            && if self.fresh {
                self.tier().has(i)
            } else {
                self.pool.usable_now(self.backends, i)
                    && self.pool.statics.get(i).is_some_and(|s| !s.backup)
            }
    }

    /// Like [`Self::takes`], for backends outside the tier too (backups
    /// when the tier holds the others).
    fn takes_any(&self, i: usize) -> bool {
        self.eligible_any(i) && self.has_room(i)
    }

    fn eligible_any(&self, i: usize) -> bool {
        !self.tried.contains(i) && self.pool.usable_now(self.backends, i)
    }

    /// Under its maxconn (always, without one): a full backend is passed
    /// over, and the queue waits for room when every one is full.
    fn has_room(&self, i: usize) -> bool {
        self.backends.get(i).is_some_and(|b| b.has_room())
    }

    /// The next slot of the weighted schedule that takes the connection,
    /// looking at most [`PROBE`] slots past `turn`.
    fn scheduled(&self, turn: u64) -> Option<usize> {
        let slots = &self.tier().slots;
        let len = slots.len() as u64;
        if len == 0 {
            return None;
        }
        (0..(PROBE as u64).min(len))
            .map(|k| slots[((turn + k) % len) as usize] as usize)
            .find(|&i| self.takes(i))
    }

    /// When the schedule has nothing that takes it (a retry after every
    /// member was tried, flags that flipped since the tier was built): any
    /// non-backup backend that does, from a rotating start, then the
    /// backups (in order, or rotating with `allbackups`). Linear, but only
    /// on that rare path.
    fn scan(&self, turn: u64) -> Option<usize> {
        let statics = &self.pool.statics;
        let n = self.backends.len().min(statics.len());
        if n == 0 {
            return None;
        }
        let start = (turn % n as u64) as usize;
        let rotated = (0..n).map(|k| (start + k) % n);
        let primary = |i: &usize| !statics[*i].backup && self.takes_any(*i);
        if let Some(i) = rotated.clone().find(primary) {
            return Some(i);
        }
        let backup = |i: &usize| statics[*i].backup && self.takes_any(*i);
        if self.pool.allbackups && self.pool.algorithm != Balance::First {
            rotated.clone().find(backup)
        } else {
            (0..n).find(backup)
        }
    }

    /// `first`'s fallback: the first non-backup backend that takes it, then
    /// the first backup.
    fn scan_in_order(&self) -> Option<usize> {
        let statics = &self.pool.statics;
        let n = self.backends.len().min(statics.len());
        (0..n)
            .find(|&i| !statics[i].backup && self.takes_any(i))
            .or_else(|| (0..n).find(|&i| statics[i].backup && self.takes_any(i)))
    }
}

impl Tier {
    fn empty() -> Tier {
        Tier {
            members: Vec::new(),
            weights: Vec::new(),
            slots: Vec::new(),
            has: Vec::new(),
        }
    }

    fn has(&self, i: usize) -> bool {
        self.has
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Weights divided by their common divisor; scaled down (each kept at 1 or
/// more) if their sum would make a cycle longer than [`MAX_CYCLE`].
fn reduce(weights: Vec<u64>) -> Vec<u32> {
    let divisor = weights.iter().fold(0, |g, w| gcd(g, *w)).max(1);
    let mut reduced: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
    let sum: u64 = reduced.iter().sum();
    if sum > MAX_CYCLE {
        for w in &mut reduced {
            *w = (*w * MAX_CYCLE / sum).max(1);
        }
    }
    reduced
        .into_iter()
        .map(|w| u32::try_from(w).unwrap_or(u32::MAX))
        .collect()
}

/// A member's next turn in [`schedule`]: its `k`-th of `weight` falls at
/// (2k+1)/(2 weight) of the cycle.
#[derive(PartialEq, Eq)]
struct Due {
    k: u64,
    weight: u64,
    member: usize,
}

impl Ord for Due {
    /// Earliest first (a max-heap pops the greatest), then the member
    /// given first.
    fn cmp(&self, other: &Due) -> std::cmp::Ordering {
        let mine = (2 * self.k + 1) * other.weight;
        let theirs = (2 * other.k + 1) * self.weight;
        theirs
            .cmp(&mine)
            .then_with(|| other.member.cmp(&self.member))
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Due) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One cycle of smooth weighted round robin: each member as many times as
/// its weight, its turns evenly spread (member i's k-th turn at
/// (2k+1)/(2 w_i) of the cycle, ties to the member given first). For
/// weights 1, 2, 3 this is c b a c b c, the order of nginx's smooth
/// weighted round robin (which differs only in how it breaks ties); built
/// in O(W log n) for a cycle of W slots over n members, where nginx's own
/// loop costs O(n) per slot.
fn schedule(members: &[u32], weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let mut heap: std::collections::BinaryHeap<Due> = weights
        .iter()
        .enumerate()
        .filter(|(_, w)| **w > 0)
        .map(|(member, w)| Due {
            k: 0,
            weight: u64::from(*w),
            member,
        })
        .collect();
    let mut slots = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    while let Some(mut due) = heap.pop() {
        slots.push(members[due.member]);
        due.k += 1;
        if due.k < due.weight {
            heap.push(due);
        }
    }
    slots
}

/// Smooth weighted round robin over the live tier, with one turn counter
/// shared by every worker: one `fetch_add` per connection keeps the spread
/// exact over each cycle across threads.
pub struct RoundRobin {
    pool: Pool,
}

impl Selector for RoundRobin {
    fn pick(
        &self,
        _: &FrontendShared,
        backends: &[Arc<BackendShared>],
        tried: &Tried,
    ) -> Option<usize> {
        let pick = self.pool.begin(backends, tried);
        let turn = self.pool.next_turn();
        pick.scheduled(turn).or_else(|| pick.scan(turn))
    }
}

/// Fewest active connections for the weight (HAProxy's leastconn: the
/// lowest (active + 1) / weight), ties taking turns. Exact up to
/// [`LEASTCONN_EXACT_MAX`] backends in the tier; past it the better of two
/// drawn from the weighted schedule, so the cost stays flat.
pub struct LeastConn {
    pool: Pool,
}

impl LeastConn {
    /// (active + 1) / weight, as a fraction to compare by cross-multiplying;
    /// connects in flight count as active.
    fn load(backends: &[Arc<BackendShared>], i: usize, weight: u32) -> (u64, u64) {
        let stats = &backends[i].stats;
        let active = stats.active.load(Relaxed) + stats.connecting.load(Relaxed);
        (active + 1, u64::from(weight.max(1)))
    }

    fn lighter(a: (u64, u64), b: (u64, u64)) -> bool {
        u128::from(a.0) * u128::from(b.1) < u128::from(b.0) * u128::from(a.1)
    }

    fn exact(pick: &Pick<'_>, turn: u64) -> Option<usize> {
        let tier = pick.tier();
        let m = tier.members.len();
        let start = (turn % m.max(1) as u64) as usize;
        let mut best: Option<(usize, (u64, u64))> = None;
        for k in 0..m {
            let j = (start + k) % m;
            let i = tier.members[j] as usize;
            if !pick.takes(i) {
                continue;
            }
            let load = Self::load(pick.backends, i, tier.weights[j]);
            if best.is_none_or(|(_, b)| Self::lighter(load, b)) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Two candidates drawn by effective weight (two turns of the
    /// schedule), compared by active connections for their configured
    /// weight.
    fn two_choices(pick: &Pick<'_>, turn: u64) -> Option<usize> {
        let first = pick.scheduled(turn)?;
        let second = pick.scheduled(mix(turn)).unwrap_or(first);
        let weight = |i: usize| pick.pool.statics[i].weight;
        let (a, b) = (
            Self::load(pick.backends, first, weight(first)),
            Self::load(pick.backends, second, weight(second)),
        );
        Some(if Self::lighter(b, a) { second } else { first })
    }
}

impl Selector for LeastConn {
    fn pick(
        &self,
        _: &FrontendShared,
        backends: &[Arc<BackendShared>],
        tried: &Tried,
    ) -> Option<usize> {
        let pick = self.pool.begin(backends, tried);
        let turn = self.pool.next_turn();
        let chosen = if pick.tier().members.len() <= LEASTCONN_EXACT_MAX {
            Self::exact(&pick, turn)
        } else {
            Self::two_choices(&pick, turn)
        };
        chosen.or_else(|| pick.scan(turn))
    }
}

/// Active-passive (HAProxy's `first`): everything to the first usable
/// backend in the order given (backups after the others); without
/// fail-back, the promoted one keeps the traffic.
pub struct Priority {
    pool: Pool,
    pub failback: bool,
    /// Where the promoted backend was last seen, so finding it costs one
    /// comparison instead of a scan.
    promoted_at: AtomicUsize,
}

impl Priority {
    fn promoted(
        &self,
        frontend: &FrontendShared,
        backends: &[Arc<BackendShared>],
    ) -> Option<usize> {
        let id = frontend.promoted();
        if id == 0 {
            return None;
        }
        let hint = self.promoted_at.load(Relaxed);
        if backends.get(hint).is_some_and(|b| b.id == id) {
            return Some(hint);
        }
        let found = backends.iter().position(|b| b.id == id)?;
        self.promoted_at.store(found, Relaxed);
        Some(found)
    }
}

impl Selector for Priority {
    fn pick(
        &self,
        frontend: &FrontendShared,
        backends: &[Arc<BackendShared>],
        tried: &Tried,
    ) -> Option<usize> {
        let pick = self.pool.begin(backends, tried);
        let promoted = (!self.failback)
            .then(|| self.promoted(frontend, backends))
            .flatten();
        if let Some(i) = promoted
            && pick.takes_any(i)
        {
            return Some(i);
        }
        let members = || pick.tier().members.iter().map(|i| *i as usize);
        let chosen = members()
            .find(|&i| pick.takes(i))
            .or_else(|| pick.scan_in_order())?;
        // At its maxconn a backend overflows to the next in order
        // (HAProxy's `balance first`): no failover, so nothing is promoted.
        let overflow = promoted.is_some_and(|i| pick.eligible_any(i))
            || members().find(|&i| pick.eligible(i)) != Some(chosen);
        if !self.failback && tried.is_empty() && !overflow {
            frontend.promote(backends[chosen].id);
        }
        Some(chosen)
    }
}

/// A consistent hash of the client's IP address (HAProxy's `balance
/// source` with `hash-type consistent`) over a Maglev table built from the
/// backends' names and weights. A backend that is down or out of the tier
/// loses only its own clients: a lookup landing on it walks on to the next
/// entries of the table, which the other backends' clients never leave.
pub struct Source {
    pool: Pool,
    primaries: Maglev,
    /// Over the backups, with `allbackups`; otherwise the first usable
    /// backup takes every client.
    backups: Option<Maglev>,
}

impl Source {
    fn new(pool: Pool, config: &FrontendConfig, backends: &[Arc<BackendShared>]) -> Source {
        let names = |backup: bool| -> Vec<(usize, &str, u32)> {
            backends
                .iter()
                .enumerate()
                .filter(|(i, _)| pool.statics[*i].backup == backup && pool.statics[*i].weight > 0)
                .map(|(i, b)| (i, b.name.as_str(), pool.statics[i].weight))
                .collect()
        };
        let primaries = Maglev::new(&names(false));
        let backups = config.balance.allbackups.then(|| Maglev::new(&names(true)));
        Source {
            primaries,
            backups,
            pool,
        }
    }
}

impl Selector for Source {
    fn pick(
        &self,
        frontend: &FrontendShared,
        backends: &[Arc<BackendShared>],
        tried: &Tried,
    ) -> Option<usize> {
        self.pick_for(frontend, backends, tried, None)
    }

    fn pick_for(
        &self,
        _: &FrontendShared,
        backends: &[Arc<BackendShared>],
        tried: &Tried,
        client: Option<IpAddr>,
    ) -> Option<usize> {
        let pick = self.pool.begin(backends, tried);
        let Some(client) = client else {
            // No address to hash (it could not be read): take turns.
            let turn = self.pool.next_turn();
            return pick.scheduled(turn).or_else(|| pick.scan(turn));
        };
        let key = hash_ip(client);
        let statics = &self.pool.statics;
        let first = pick.tier().members.first().map(|i| *i as usize);
        let on_backups = first.is_some_and(|i| statics[i].backup);
        let table = match (&self.backups, on_backups) {
            (Some(backups), true) => backups,
            (None, true) => {
                return first.filter(|&i| pick.takes(i)).or_else(|| pick.scan(key));
            }
            (_, false) => &self.primaries,
        };
        table
            .walk(key)
            .find(|&i| pick.takes(i))
            .or_else(|| pick.scan(key))
    }

    fn needs_client(&self) -> bool {
        true
    }
}

/// A Maglev lookup table (Eisenbud et al., NSDI 2016): each backend fills
/// the entries of its own permutation of the table in turn, as often as its
/// weight allows, so each gets a share of entries proportional to its
/// weight and removing one moves only the entries it held.
pub struct Maglev {
    /// Backend indexes; empty when there is no backend to hash to.
    entries: Vec<u32>,
}

/// 65,537 entries (a prime) keep the shares within about 1% of their weight
/// up to a few hundred backends; larger pools get a prime near 100 entries
/// per backend.
const MAGLEV_MIN: usize = 65_537;

impl Maglev {
    /// `backends`: (index, name, weight), weights above 0.
    pub fn new(backends: &[(usize, &str, u32)]) -> Maglev {
        if backends.is_empty() {
            return Maglev {
                entries: Vec::new(),
            };
        }
        let size = table_size(backends.len());
        let m = size as u64;
        let offsets: Vec<(u64, u64)> = backends
            .iter()
            .map(|(_, name, _)| {
                let offset = hash_bytes(0x6d61_676c_6576_6f66, name.as_bytes()) % m;
                let skip = hash_bytes(0x6d61_676c_6576_736b, name.as_bytes()) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let max_weight = backends.iter().map(|b| u64::from(b.2)).max().unwrap_or(1);
        let mut entries = vec![u32::MAX; size];
        let mut next = vec![0u64; backends.len()];
        let mut credit = vec![0u64; backends.len()];
        let mut filled = 0;
        'fill: loop {
            for (b, (index, _, weight)) in backends.iter().enumerate() {
                credit[b] += u64::from(*weight);
                if credit[b] < max_weight {
                    continue;
                }
                credit[b] -= max_weight;
                let (offset, skip) = offsets[b];
                loop {
                    let c = ((offset + next[b] * skip) % m) as usize;
                    next[b] += 1;
                    if entries[c] == u32::MAX {
                        entries[c] = *index as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == size {
                    break 'fill;
                }
            }
        }
        Maglev { entries }
    }

    /// The backends a key's lookup visits: its own entry, then the ones
    /// after it, [`WALK`] entries at most.
    fn walk(&self, key: u64) -> impl Iterator<Item = usize> + '_ {
        let len = self.entries.len();
        let start = if len == 0 {
            0
        } else {
            (key % len as u64) as usize
        };
        (0..WALK.min(len)).map(move |k| self.entries[(start + k) % len] as usize)
    }

    /// The backend a key maps to with every backend usable.
    pub fn lookup(&self, key: u64) -> Option<usize> {
        self.walk(key).next()
    }
}

fn table_size(backends: usize) -> usize {
    let mut size = (backends * 100).max(MAGLEV_MIN);
    while !is_prime(size) {
        size += 1;
    }
    size
}

fn is_prime(n: usize) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// FNV-1a with a seed, then murmur3's finalizer: defined here, so the
/// same name or address hashes the same in every process and every
/// version (std's hashers promise neither).
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix(h)
}

fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A turn scrambled, for a second choice independent of the first.
fn mix(turn: u64) -> u64 {
    fmix(turn ^ 0x9e37_79b9_7f4a_7c15)
}

/// The key of a client address: an IPv4 client seen through an IPv6
/// listener (::ffff:a.b.c.d) hashes as the same IPv4 address.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(0, &v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash_bytes(0, &v4.octets()),
            None => hash_bytes(0, &v6.octets()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{plain, snapshot};
    use crate::model::{AdminState, FrontendSnapshot};

    fn weighted(weights: &[u32]) -> Vec<String> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{ address = \"127.0.0.1:{}\", weight = {w} }}", 9000 + i))
            .collect()
    }

    fn counts(f: &FrontendSnapshot, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; f.backends.len()];
        for _ in 0..picks {
            counts[f.select(&Tried::default()).expect("a backend")] += 1;
        }
        counts
    }

    #[test]
    fn smooth_weighted_order_matches_nginx() {
        assert_eq!(schedule(&[0, 1, 2], &[1, 2, 3]), [2, 1, 0, 2, 1, 2]);
        // nginx gives a a b a c a a for 5, 1, 1: the same spread, the tie
        // at mid-cycle broken the other way.
        assert_eq!(schedule(&[0, 1, 2], &[5, 1, 1]), [0, 0, 0, 1, 2, 0, 0]);
    }

    #[test]
    fn weights_are_exact_over_every_cycle() {
        let f = snapshot("", &weighted(&[1, 2, 3]));
        assert_eq!(counts(&f, 6 * 50), [50, 100, 150]);
        let f = snapshot("balance = \"roundrobin\"", &weighted(&[0, 2, 4]));
        assert_eq!(counts(&f, 3 * 10), [0, 10, 20], "weight 0 takes none");
    }

    #[test]
    fn an_agents_percent_reshapes_the_cycle_at_once() {
        let f = snapshot("", &weighted(&[2, 2]));
        assert_eq!(counts(&f, 40), [20, 20]);
        f.backends[0].health.set_weight_percent(50);
        assert_eq!(counts(&f, 30), [10, 20]);
        f.backends[0].health.set_weight_percent(0);
        assert_eq!(counts(&f, 10), [0, 10]);
        f.backends[0].health.set_weight_percent(100);
        assert_eq!(counts(&f, 40), [20, 20]);
    }

    #[test]
    fn a_retry_never_repeats_and_falls_back_to_a_scan() {
        let f = snapshot("", &weighted(&[50, 1, 1]));
        let mut tried = Tried::default();
        tried.insert(0);
        let next = f.select(&tried).expect("another");
        assert_ne!(next, 0);
        tried.insert(next);
        let last = f.select(&tried).expect("the last");
        assert!(last != 0 && last != next);
        tried.insert(last);
        assert_eq!(f.select(&tried), None);
    }

    #[test]
    fn backups_take_over_only_when_no_primary_is_usable() {
        let backends = vec![
            r#"{ address = "127.0.0.1:9000", backup = true }"#.to_string(),
            r#"{ address = "127.0.0.1:9001" }"#.to_string(),
            r#"{ address = "127.0.0.1:9002", backup = true }"#.to_string(),
            r#"{ address = "127.0.0.1:9003", weight = 0 }"#.to_string(),
        ];
        let f = snapshot("", &backends);
        assert_eq!(counts(&f, 10), [0, 10, 0, 0]);
        f.backends[1].health.set_up(false);
        assert_eq!(counts(&f, 10), [10, 0, 0, 0], "first backup only");
        f.backends[0].set_admin(AdminState::Maint);
        assert_eq!(counts(&f, 10), [0, 0, 10, 0]);
        f.backends[0].set_admin(AdminState::Ready);
        f.backends[1].health.set_up(true);
        assert_eq!(counts(&f, 10), [0, 10, 0, 0]);

        let all = snapshot("allbackups = true", &backends);
        all.backends[1].health.set_up(false);
        assert_eq!(counts(&all, 10), [5, 0, 5, 0], "every backup");
        // A retry after the last primary failed may go to a backup.
        all.backends[1].health.set_up(true);
        let mut tried = Tried::default();
        tried.insert(1);
        assert!(matches!(all.select(&tried), Some(0 | 2)));
    }

    #[test]
    fn first_keeps_order_and_puts_backups_last() {
        let backends = vec![
            r#"{ address = "127.0.0.1:9000", backup = true }"#.to_string(),
            r#"{ address = "127.0.0.1:9001", weight = 0 }"#.to_string(),
            r#"{ address = "127.0.0.1:9002" }"#.to_string(),
            r#"{ address = "127.0.0.1:9003" }"#.to_string(),
        ];
        let f = snapshot("balance = \"first\"", &backends);
        assert_eq!(f.config.mode, crate::config::Mode::ActivePassive);
        assert_eq!(counts(&f, 5), [0, 0, 5, 0]);
        f.backends[2].health.set_up(false);
        assert_eq!(counts(&f, 5), [0, 0, 0, 5]);
        f.backends[3].health.set_up(false);
        assert_eq!(counts(&f, 5), [5, 0, 0, 0]);
    }

    #[test]
    fn leastconn_prefers_the_least_loaded_for_its_weight() {
        let f = snapshot("balance = \"leastconn\"", &weighted(&[1, 1, 2]));
        let none = Tried::default();
        // Idle: ties take turns, the heavier first ((0+1)/2 < (0+1)/1).
        assert_eq!(f.select(&none), Some(2));
        f.backends[2].stats.active.store(2, Relaxed);
        let two: Vec<_> = (0..2).map(|_| f.select(&none).expect("one")).collect();
        assert!(two.contains(&0) && two.contains(&1), "{two:?}");
        f.backends[0].stats.active.store(10, Relaxed);
        f.backends[1].stats.active.store(3, Relaxed);
        f.backends[2].stats.active.store(6, Relaxed);
        // 11/1, 4/1, 7/2: backend 2.
        assert_eq!(f.select(&none), Some(2));
        // Connects in flight count: a burst accepted at once spreads.
        // (6 + 2 + 1)/2 > (3 + 1)/1.
        f.backends[2].stats.connecting.store(2, Relaxed);
        assert_eq!(f.select(&none), Some(1));
        f.backends[2].stats.connecting.store(0, Relaxed);
        f.backends[2].health.set_up(false);
        assert_eq!(f.select(&none), Some(1));
    }

    #[test]
    fn leastconn_past_the_exact_size_still_avoids_the_loaded() {
        let n = LEASTCONN_EXACT_MAX * 4;
        let f = snapshot("balance = \"leastconn\"", &plain(n));
        for b in &f.backends[..n / 2] {
            b.stats.active.store(100, Relaxed);
        }
        let loaded = (0..1000)
            .filter(|_| f.select(&Tried::default()).expect("one") < n / 2)
            .count();
        // Two choices: a loaded pick needs both draws loaded (1 in 4).
        assert!(loaded < 350, "{loaded} of 1000 went to loaded backends");
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn assignments(f: &FrontendSnapshot, clients: u32) -> Vec<usize> {
        (0..clients)
            .map(|i| {
                f.select_for(&Tried::default(), Some(client(i)))
                    .expect("one")
            })
            .collect()
    }

    #[test]
    fn source_is_stable_across_builds_and_moves_only_the_lost_backends_clients() {
        let f = snapshot("balance = \"source\"", &plain(5));
        assert!(f.needs_client());
        let before = assignments(&f, 2000);
        // Another snapshot (another worker, another ringlb) agrees.
        let g = snapshot("balance = \"source\"", &plain(5));
        assert_eq!(assignments(&g, 2000), before);
        f.backends[3].health.set_up(false);
        let after = assignments(&f, 2000);
        for (b, a) in before.iter().zip(&after) {
            if *b != 3 {
                assert_eq!(a, b, "a client of a backend still up moved");
            } else {
                assert_ne!(*a, 3);
            }
        }
        let moved: Vec<_> = after.iter().filter(|a| **a != 3).collect();
        assert_eq!(moved.len(), 2000);
        // Its clients spread over the others, not all to one.
        let mut spread = [0; 5];
        for (b, a) in before.iter().zip(&after) {
            if *b == 3 {
                spread[*a] += 1;
            }
        }
        assert!(spread.iter().filter(|n| **n > 0).count() >= 3, "{spread:?}");
        f.backends[3].health.set_up(true);
        assert_eq!(assignments(&f, 2000), before);
    }

    #[test]
    fn source_hashes_ipv4_mapped_clients_as_ipv4() {
        let v4: IpAddr = "10.1.2.3".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(hash_ip(v4), hash_ip(mapped));
        // Fixed forever: a change here moves every client of every user.
        assert_eq!(hash_bytes(0, b"app1"), hash_bytes(0, b"app1"));
        assert_eq!(hash_bytes(0, b""), fmix(0xcbf2_9ce4_8422_2325));
    }

    #[test]
    fn maglev_fills_by_weight() {
        let table = Maglev::new(&[(0, "a", 1), (1, "b", 3), (2, "c", 2)]);
        let mut counts = [0usize; 3];
        for e in &table.entries {
            counts[*e as usize] += 1;
        }
        let total = table.entries.len() as f64;
        let share = |i: usize| counts[i] as f64 / total;
        assert!((share(0) - 1.0 / 6.0).abs() < 0.01, "{counts:?}");
        assert!((share(1) - 3.0 / 6.0).abs() < 0.01, "{counts:?}");
        assert!((share(2) - 2.0 / 6.0).abs() < 0.01, "{counts:?}");
    }

    #[test]
    fn slow_start_ramps_in_steps_from_a_twentieth() {
        let f = snapshot("slowstart = \"20s\"", &plain(1));
        let pool = Pool::new(&f.config, &f.backends);
        assert_eq!(pool.ramp(0, 5_000), (RAMP_STEPS, 0), "up from the start");
        assert_eq!(pool.ramp(1_000, 1_000), (1, 2_000));
        assert_eq!(pool.ramp(1_000, 11_500), (11, 12_000));
        assert_eq!(pool.ramp(1_000, 21_000), (RAMP_STEPS, 0));
    }

    #[test]
    fn a_backend_back_up_starts_slow() {
        let f = snapshot("slowstart = \"1h\"", &plain(2));
        f.backends[0].health.set_up(false);
        f.backends[0].health.set_up(true);
        // Step 1 of 20 against 20 of 20.
        assert_eq!(counts(&f, 21 * 3), [3, 60]);
    }

    #[test]
    fn a_large_pool_skips_a_backend_down_before_its_rebuild() {
        let f = snapshot("", &plain(LARGE_POOL * 2));
        for round in 0..3 {
            let down = round * 7;
            f.backends[down].health.set_up(false);
            let c = counts(&f, LARGE_POOL * 4);
            assert_eq!(c[down], 0, "round {round}");
            f.backends[down].health.set_up(true);
        }
    }

    #[test]
    fn large_pools_schedule_every_backend() {
        let f = snapshot("", &plain(10_000));
        let c = counts(&f, 20_000);
        assert!(c.iter().all(|n| *n == 2));
    }
}
