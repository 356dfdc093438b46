//! The runtime model: what the data path and the control plane share.
//!
//! A leaf module: it knows the config types and std's atomics, nothing of
//! workers, health checks or the admin endpoints. Everything here is one
//! of three things:
//!
//! - **shared state with one writer each**, kept across reloads by
//!   identity: [`BackendShared`] (identity: frontend and name; its
//!   [`Health`] written only by the health scheduler, its [`AdminState`]
//!   only by the admin and reload path, its counters by workers) and
//!   [`FrontendShared`] (identity: name; counters);
//! - **immutable snapshots** the control plane builds and publishes:
//!   [`Snapshot`] holds one [`FrontendSnapshot`] per frontend, with its
//!   settings, its backend set and the [`Selector`] built from them. A
//!   connection keeps the frontend snapshot it started with, so a reload
//!   never invalidates it;
//! - control-plane counters ([`ReloadStats`]) and the published snapshot
//!   ([`Published`]) the read-only endpoints render.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst,
};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

use crate::config::FrontendConfig;

/// Bumped by every change that may change who takes new connections or how
/// many (up/down, admin and agent state, weight percent).
static EPOCH: AtomicU64 = AtomicU64::new(1);

/// Tells every selector that a backend's state or weight changed; the
/// next pick of each rebuilds its tier. Called after the change is stored.
pub fn changed() {
    EPOCH.fetch_add(1, std::sync::atomic::Ordering::Release);
}

/// The count [`changed`] bumps, for the selectors to compare.
pub fn epoch() -> u64 {
    EPOCH.load(std::sync::atomic::Ordering::Acquire)
}

/// Milliseconds on a monotonic clock that starts with the process, plus
/// one: 0 stays free to mean "never" (or "since the start").
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

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

    pub fn from_u8(v: u8) -> ConnectFailure {
        match v {
            1 => ConnectFailure::Refused,
            2 => ConnectFailure::TimedOut,
            _ => ConnectFailure::Other,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "connection refused",
            ConnectFailure::TimedOut => "connect timed out",
            ConnectFailure::Other | ConnectFailure::Local => "connect failed",
        }
    }
}

/// What the last check said and when the state last changed: kept for the
/// operator (an admin page reads it), written only by the scheduler.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// `None` until the first check ends; the failure text otherwise.
    pub last_check: Option<Result<(), String>>,
    pub last_check_took: Duration,
    /// When the last check ended.
    pub checked_at: Option<SystemTime>,
    /// When `up` last flipped (or when checking started).
    pub changed_at: Option<SystemTime>,
    /// Why it is in its current state, as the UP/DOWN line said it.
    pub reason: String,
    /// Checks run since checking started.
    pub checks: u64,
    /// The step the last check failed in (`None` if it passed, or failed
    /// at the connect).
    pub failed_step: Option<String>,
    /// What its agent last answered, if it has one.
    pub agent: Option<AgentStatus>,
}

/// An agent check's last outcome, written only by the scheduler.
#[derive(Clone, Debug)]
pub struct AgentStatus {
    /// The agent's line, or why there was none (which changes nothing).
    pub reply: Result<String, String>,
    pub at: SystemTime,
    /// The last `NN%` it gave.
    pub weight_percent: Option<u32>,
    /// Set while its `down`, `fail` or `stopped` holds the backend down.
    pub down: Option<String>,
}

/// The health of one check target (an address with check settings),
/// shared by every backend of any frontend with the same target.
pub struct Health {
    /// Read by every new connection; written only by the scheduler.
    up: AtomicBool,
    /// Connect failures on live traffic since the last successful connect
    /// (live or check). Workers write it; a success costs a read, not a
    /// write, while the streak is already zero.
    pub live_failures: AtomicU32,
    pub last_live_failure: AtomicU8,
    pub fall: u32,
    /// Wakes the target's task when the live streak reaches `fall`.
    pub wake: Notify,
    status: Mutex<Status>,
    /// What an agent check last said of the server's state (HAProxy's
    /// `agent-check`: `ready`, `drain`, `maint`), apart from the operator's
    /// [`AdminState`]; written only by the scheduler.
    agent_state: AtomicU8,
    /// The share of its configured weight the server takes, in percent
    /// (an agent's `NN%` reply); 100 by default. A slow start's ramp is
    /// not kept here: selectors compute it from `up_since`.
    weight_percent: AtomicU32,
    /// When `up` last turned true, on [`now_ms`]'s clock; 0
    /// while it has been up since the start (no slow start then).
    up_since: AtomicU64,
}

impl Health {
    pub fn new(fall: u32) -> Health {
        Health {
            // Up until checks say otherwise, as HAProxy does: traffic
            // flows from the first second.
            up: AtomicBool::new(true),
            live_failures: AtomicU32::new(0),
            last_live_failure: AtomicU8::new(0),
            fall: fall.max(1),
            wake: Notify::new(),
            status: Mutex::new(Status::default()),
            agent_state: AtomicU8::new(AdminState::Ready as u8),
            weight_percent: AtomicU32::new(100),
            up_since: AtomicU64::new(0),
        }
    }

    pub fn agent_state(&self) -> AdminState {
        AdminState::from_u8(self.agent_state.load(Relaxed))
    }

    /// The health scheduler only (an agent's reply).
    pub fn set_agent_state(&self, state: AdminState) {
        if self.agent_state.swap(state as u8, Relaxed) != state as u8 {
            changed();
        }
    }

    pub fn weight_percent(&self) -> u32 {
        self.weight_percent.load(Relaxed)
    }

    /// The health scheduler only (an agent's `NN%`, a slow start).
    pub fn set_weight_percent(&self, percent: u32) {
        if self.weight_percent.swap(percent, Relaxed) != percent {
            changed();
        }
    }

    /// When it last came up (0: up since the start), for slow start.
    pub fn up_since(&self) -> u64 {
        self.up_since.load(Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Only the health scheduler calls this (and the reload path, once,
    /// on a target it has just made and nobody checks yet).
    pub fn set_up(&self, up: bool) {
        if up && !self.up.load(Relaxed) {
            self.up_since.store(now_ms(), Relaxed);
        }
        if self.up.swap(up, Relaxed) != up {
            changed();
        }
    }

    /// Called by a worker for every successful connect: on a healthy
    /// backend the streak is already zero, and a plain load keeps the cache
    /// line shared between workers.
    pub fn report_live_success(&self) {
        if self.live_failures.load(Relaxed) != 0 {
            self.live_failures.store(0, Relaxed);
        }
    }

    /// Called by a worker for a connect the backend refused or let time
    /// out. Never blocks: a notify with no waiter stores a permit, with one
    /// it takes the waiter list's lock for a few instructions.
    pub fn report_live_failure(&self, failure: ConnectFailure) {
        self.last_live_failure.store(failure as u8, Relaxed);
        let streak = self.live_failures.fetch_add(1, Relaxed).saturating_add(1);
        if streak >= self.fall {
            self.wake.notify_one();
        }
    }

    /// A copy of the last check's outcome and the reason for the state.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn update_status(&self, change: impl FnOnce(&mut Status)) {
        if let Ok(mut status) = self.status.lock() {
            change(&mut status);
        }
    }
}

/// What the operator wants of a backend, apart from what checks say
/// (HAProxy's `set server state`). Written only by the admin and reload
/// path; read by workers at pick time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    /// Takes new connections while it is up.
    Ready = 0,
    /// No new connections; established ones continue.
    Drain = 1,
    /// Maintenance: no new connections, and its checks are suspended (as
    /// HAProxy's `disable server`): a backend being worked on is neither
    /// marked down nor logged as failing.
    Maint = 2,
}

impl AdminState {
    pub fn from_u8(v: u8) -> AdminState {
        match v {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        })
    }
}

/// Counters an operator reads from the stats endpoint and the logs.
/// Aligned to their own cache lines: every worker writes them on every
/// connection, and the fields read at pick time (admin state, the health
/// pointer) must not share a line with them.
#[derive(Default)]
#[repr(align(128))]
pub struct BackendStats {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    /// Connects in flight to it. Leastconn counts them with `active`, so a
    /// burst of clients accepted together does not all go to the backend
    /// that was least loaded before any of them connected.
    pub connecting: AtomicU64,
    pub connect_failures: AtomicU64,
    pub bytes_to_backend: AtomicU64,
    pub bytes_from_backend: AtomicU64,
    pub went_down: AtomicU64,
    pub went_up: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Connections holding one of its `maxconn` slots, all workers
    /// together: from the moment one is assigned (connecting counts) to
    /// its end. Only counted while the backend has a maxconn, so a backend
    /// without one pays no atomic for it.
    pub slots: AtomicU64,
}

/// One backend of one frontend, as long as the config keeps it (same
/// frontend, same name, same address and check): its health, admin state
/// and counters survive every reload in between.
pub struct BackendShared {
    pub frontend: String,
    /// As the user wrote it (the address, unless named).
    pub name: String,
    pub addr: SocketAddr,
    /// Unique for the process: remembers a promoted backend across
    /// reloads without holding a reference to it.
    pub id: u64,
    /// Shared with every backend of any frontend that has the same address
    /// and check settings: one probe, one state.
    pub health: Arc<Health>,
    admin: AtomicU8,
    /// Most connections at once (0: no limit). Written only by the reload
    /// path; read at pick time next to `admin`, on a line workers do not
    /// write, so checking for room costs a backend without a limit one
    /// plain load.
    maxconn: AtomicU32,
    pub stats: BackendStats,
}

/// What [`BackendShared::take_slot`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The backend has no maxconn: nothing was counted, nothing to give back.
    Unlimited,
    /// A slot was taken: give it back with [`BackendShared::give_slot`].
    Taken,
    /// At its maxconn: nothing was counted.
    Full,
}

static NEXT_BACKEND_ID: AtomicU64 = AtomicU64::new(1);

impl BackendShared {
    pub fn new(frontend: &str, name: &str, addr: SocketAddr, health: Arc<Health>) -> BackendShared {
        BackendShared {
            frontend: frontend.to_string(),
            name: name.to_string(),
            addr,
            id: NEXT_BACKEND_ID.fetch_add(1, Relaxed),
            health,
            admin: AtomicU8::new(AdminState::Ready as u8),
            maxconn: AtomicU32::new(0),
            stats: BackendStats::default(),
        }
    }

    /// The reload path only: a lower limit takes effect as connections end.
    pub fn set_maxconn(&self, maxconn: Option<u32>) {
        self.maxconn.store(maxconn.unwrap_or(0), Relaxed);
    }

    pub fn maxconn(&self) -> Option<u32> {
        Some(self.maxconn.load(Relaxed)).filter(|m| *m > 0)
    }

    /// Room for one more connection under its maxconn. For selectors, at
    /// pick time: a backend without a limit costs one plain load of a line
    /// that only reloads write. Only a hint: [`take_slot`] decides.
    ///
    /// [`take_slot`]: BackendShared::take_slot
    pub fn has_room(&self) -> bool {
        let max = self.maxconn.load(Relaxed);
        max == 0 || self.stats.slots.load(Relaxed) < u64::from(max)
    }

    /// Counts a connection against the backend's maxconn, if it has one.
    /// A compare-and-swap, so workers never take more than the limit
    /// together; sequentially consistent with the queue's marks (see
    /// [`Waiting::mark`]).
    pub fn take_slot(&self) -> Slot {
        let max = u64::from(self.maxconn.load(Relaxed));
        if max == 0 {
            return Slot::Unlimited;
        }
        match self
            .stats
            .slots
            .fetch_update(SeqCst, Relaxed, |n| (n < max).then_some(n + 1))
        {
            Ok(_) => Slot::Taken,
            Err(_) => Slot::Full,
        }
    }

    /// Gives back a slot [`take_slot`](BackendShared::take_slot) took.
    pub fn give_slot(&self) {
        self.stats.slots.fetch_sub(1, SeqCst);
    }

    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    pub fn admin(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Relaxed))
    }

    /// The admin and reload path only.
    pub fn set_admin(&self, state: AdminState) {
        if self.admin.swap(state as u8, Relaxed) != state as u8 {
            changed();
        }
    }

    /// Takes new connections: ready for the operator and for its agent,
    /// and up.
    pub fn usable(&self) -> bool {
        self.admin.load(Relaxed) == AdminState::Ready as u8
            && self.health.agent_state.load(Relaxed) == AdminState::Ready as u8
            && self.is_up()
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

/// Aligned as [`BackendStats`], for the same reason.
#[derive(Default)]
#[repr(align(128))]
pub struct FrontendStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    /// Times a worker stopped accepting because the frontend was at its
    /// maxconn (new clients then wait in the kernel's accept queue).
    pub maxconn_reached: AtomicU64,
    /// Accepts that failed (out of fds or memory): the listener pauses.
    pub accept_errors: AtomicU64,
    /// Closed because no backend was up or every one failed to connect.
    pub no_backend: AtomicU64,
    /// Receives that found the worker's buffers all held (by sends to slow
    /// peers) and moved to splice: a sign that `buffers` is too small.
    pub buffers_exhausted: AtomicU64,
    /// Directions that could not get a splice pipe (out of fds or pipe
    /// memory) and went on copying through buffers.
    pub pipe_fallbacks: AtomicU64,
    /// Connections reset on both sides because ringlb could not carry them
    /// on (no fd for a backend socket, a local connect or relay error).
    pub local_errors: AtomicU64,
    /// accept-proxy: clients reset for want of a valid PROXY header, by why.
    pub proxy_refused: crate::proxy::Refusals,
    /// ClientHellos refused, by [`crate::hello::Refusal`] (in its order).
    pub hello_refused: [AtomicU64; 4],
    /// ClientHellos read that carried no server name.
    pub hello_no_sni: AtomicU64,
    /// Connections waiting now for a slot on a backend at its maxconn.
    pub queued: AtomicU64,
    /// Connections that ever waited in the queue.
    pub queued_total: AtomicU64,
    /// Queued connections reset when `timeout-queue` passed.
    pub queue_timeouts: AtomicU64,
    /// The most connections queued at once since the frontend appeared
    /// (HAProxy's qmax).
    pub queued_max: AtomicU64,
    /// Microseconds waited in the queue by every connection that left it
    /// (placed, timed out or gone): with `queued_total`, the mean wait.
    pub queue_wait_us: AtomicU64,
    /// The longest wait of a connection that left the queue, microseconds.
    pub queue_wait_max_us: AtomicU64,
    /// Connect attempts after a connection's first (HAProxy's `wretr`).
    pub retries: AtomicU64,
    pub tls: TlsStats,
}

impl FrontendStats {
    /// A connection starts waiting for a backend slot. Only the queue's
    /// path writes these, never a connection that finds room.
    pub fn enter_queue(&self) {
        let now = self.queued.fetch_add(1, Relaxed) + 1;
        self.queued_total.fetch_add(1, Relaxed);
        self.queued_max.fetch_max(now, Relaxed);
    }

    /// A connection leaves the queue after `waited`, however it leaves.
    pub fn leave_queue(&self, waited: Duration) {
        self.queued.fetch_sub(1, Relaxed);
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.queue_wait_us.fetch_add(us, Relaxed);
        self.queue_wait_max_us.fetch_max(us, Relaxed);
    }
}

/// TLS termination counters of a frontend.
#[derive(Default)]
pub struct TlsStats {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Of those, resumed (ticket or session id).
    pub resumed: AtomicU64,
    /// Of those, TLS 1.2 and TLS 1.3.
    pub tls12: AtomicU64,
    pub tls13: AtomicU64,
    /// Failed, by [`crate::tls::Failure`] (in its order).
    pub failures: [AtomicU64; 5],
}

/// Per route of a frontend, kept across reloads by route name.
#[derive(Default)]
pub struct RouteStats {
    /// Connections whose ClientHello chose this route.
    pub connections: AtomicU64,
    /// Of those, refused because the route had no usable backend.
    pub no_backend: AtomicU64,
}

/// A frontend's state that outlives snapshots: kept across reloads while a
/// frontend of that name stays.
pub struct FrontendShared {
    pub name: String,
    pub stats: FrontendStats,
    /// Workers that stopped accepting on this frontend at its maxconn.
    pub waiting: Waiting,
    /// The per-source table and the refusal counters, kept across reloads
    /// (connections in flight hold their place in it).
    pub sources: Arc<crate::edge::Sources>,
    /// Workers with connections queued for a slot on this frontend's
    /// backends: a slot given back on any worker wakes them.
    pub queue_waiting: Waiting,
    /// Active-passive without fail-back: the id of the backend that was
    /// promoted and keeps the traffic after the active one returns (0:
    /// none). An id, not an index, so a reload that reorders backends keeps
    /// the promotion on the right one.
    promoted: AtomicU64,
    /// Route counters by route name (the default route included), taken
    /// by each snapshot that has the route.
    routes: Mutex<std::collections::HashMap<String, Arc<RouteStats>>>,
}

impl FrontendShared {
    pub fn new(name: &str) -> FrontendShared {
        FrontendShared {
            name: name.to_string(),
            stats: FrontendStats::default(),
            waiting: Waiting::default(),
            sources: Arc::default(),
            queue_waiting: Waiting::default(),
            promoted: AtomicU64::new(0),
            routes: Mutex::default(),
        }
    }

    /// The counters of a route (made on first use): the control plane's.
    pub fn route_stats(&self, route: &str) -> Arc<RouteStats> {
        match self.routes.lock() {
            Ok(mut routes) => Arc::clone(routes.entry(route.to_string()).or_default()),
            Err(_) => Arc::default(),
        }
    }

    /// The id of the backend promoted without fail-back (0: none).
    pub fn promoted(&self) -> u64 {
        self.promoted.load(Relaxed)
    }

    pub fn promote(&self, id: u64) {
        if self.promoted.load(Relaxed) != id {
            self.promoted.store(id, Relaxed);
        }
    }
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

/// Shared by every worker for the life of the process: the connection
/// ceiling and its counters, and the eventfds that wake each worker's ring
/// (for a command, or for room under a limit).
pub struct Global {
    /// Most client connections at once, all frontends together.
    pub limit: u64,
    /// How many clients one listener's accept queue holds: what one
    /// multishot accept may take at once.
    pub accept_queue: u64,
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
    pub fn new(
        limit: u64,
        accept_queue: u64,
        nofile: u64,
        pipes: u64,
        stats_fds: u64,
        wake_fds: Vec<OwnedFd>,
    ) -> Global {
        Global {
            limit,
            accept_queue,
            nofile,
            pipes,
            stats_fds,
            active: AtomicU64::new(0),
            limit_reached: AtomicU64::new(0),
            cq_dropped: AtomicU64::new(0),
            cq_overflowed: AtomicU64::new(0),
            waiting: Waiting::default(),
            wake_fds,
        }
    }

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

/// The backends a connection already tried, so a retry never repeats one:
/// one word inline (pools up to 64 never allocate), more words only for
/// larger pools.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tried {
    low: u64,
    high: Vec<u64>,
}

impl Tried {
    pub fn insert(&mut self, index: usize) {
        if index < 64 {
            self.low |= 1 << index;
            return;
        }
        let word = index / 64 - 1;
        if self.high.len() <= word {
            self.high.resize(word + 1, 0);
        }
        self.high[word] |= 1 << (index % 64);
    }

    pub fn contains(&self, index: usize) -> bool {
        if index < 64 {
            return self.low & (1 << index) != 0;
        }
        self.high
            .get(index / 64 - 1)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.low == 0 && self.high.iter().all(|w| *w == 0)
    }
}

/// How a frontend picks a backend for a new connection (or a retry). Built
/// per snapshot from its backend set (the implementations live in
/// `select.rs`); reads health and admin state from the atomics at pick
/// time, so a check's verdict applies at once without a new snapshot.
/// Returns an index into the backends it was given.
pub trait Selector: Send + Sync {
    fn pick(
        &self,
        frontend: &FrontendShared,
        backends: &[Arc<BackendShared>],
        tried: &Tried,
    ) -> Option<usize>;

    /// The same with the client's address, which `source` hashes.
    fn pick_for(
        &self,
        frontend: &FrontendShared,
        backends: &[Arc<BackendShared>],
        tried: &Tried,
        client: Option<std::net::IpAddr>,
    ) -> Option<usize> {
        let _ = client;
        self.pick(frontend, backends, tried)
    }

    /// Whether `pick_for` uses the client's address: a worker reads it at
    /// accept only then.
    fn needs_client(&self) -> bool {
        false
    }
}

/// A group of a frontend's backends with its own selector: the
/// frontend's own backends, or one SNI route's.
pub struct Route {
    /// [`crate::config::DEFAULT_ROUTE`] for the frontend's own backends.
    pub name: String,
    /// Its backends' place in the snapshot's `backends`.
    pub backends: std::ops::Range<usize>,
    pub selector: Box<dyn Selector>,
    pub stats: Arc<RouteStats>,
}

/// One frontend as one snapshot has it: settings for new connections, its
/// backend set, and the selector over them. Immutable.
pub struct FrontendSnapshot {
    pub config: FrontendConfig,
    pub shared: Arc<FrontendShared>,
    pub backends: Vec<Arc<BackendShared>>,
    /// `routes[0]` is the frontend's own backends; `routes[i + 1]` is the
    /// config's route `i`.
    pub routes: Vec<Route>,
    /// Server names to route numbers (`i + 1`, as in `routes`).
    pub router: crate::hello::Router,
}

impl FrontendSnapshot {
    /// The backend for a new connection of the frontend's own backends (or
    /// a retry, with the backends already tried), or `None` when no usable
    /// backend is left.
    pub fn select(&self, tried: &Tried) -> Option<usize> {
        self.select_in(0, tried, None)
    }

    /// The same with the client's address, which `balance = "source"`
    /// hashes.
    pub fn select_for(&self, tried: &Tried, client: Option<std::net::IpAddr>) -> Option<usize> {
        self.select_in(0, tried, client)
    }

    /// The same within one route, with the client's address (which
    /// `balance = "source"` hashes; read it at accept only when
    /// [`Self::needs_client`] says so). `tried` counts from the route's
    /// first backend, the index returned from the frontend's.
    pub fn select_in(
        &self,
        route: usize,
        tried: &Tried,
        client: Option<std::net::IpAddr>,
    ) -> Option<usize> {
        let route = self.routes.get(route)?;
        let backends = self.backends.get(route.backends.clone())?;
        let pick = route
            .selector
            .pick_for(&self.shared, backends, tried, client)?;
        Some(route.backends.start + pick)
    }

    pub fn needs_client(&self) -> bool {
        self.routes.iter().any(|r| r.selector.needs_client())
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// Everything the workers serve new connections from, at one moment.
pub struct Snapshot {
    /// Counts published snapshots; workers acknowledge it.
    pub generation: u64,
    pub frontends: Vec<Arc<FrontendSnapshot>>,
}

impl Snapshot {
    pub fn frontend(&self, name: &str) -> Option<&Arc<FrontendSnapshot>> {
        self.frontends.iter().find(|f| f.config.name == name)
    }

    pub fn active_connections(&self) -> u64 {
        self.frontends
            .iter()
            .map(|f| f.shared.stats.active.load(Relaxed))
            .sum()
    }
}

/// The snapshot in force, for readers off the data path (metrics, status,
/// the admin socket). Workers never read it: they get each snapshot by
/// command. A lock is fine here: readers are scrapers and operators.
pub struct Published(RwLock<Arc<Snapshot>>);

impl Published {
    pub fn new(snapshot: Arc<Snapshot>) -> Published {
        Published(RwLock::new(snapshot))
    }

    pub fn load(&self) -> Arc<Snapshot> {
        match self.0.read() {
            Ok(s) => Arc::clone(&s),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn store(&self, snapshot: Arc<Snapshot>) {
        match self.0.write() {
            Ok(mut s) => *s = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
    }
}

/// Reload counters, for the metrics.
#[derive(Default)]
pub struct ReloadStats {
    pub reloads: AtomicU64,
    pub failures: AtomicU64,
    /// Seconds since the epoch of the last reload that applied (0: none).
    pub last_success: AtomicU64,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Config;

    /// A frontend of `backends` (TOML values: addresses or tables) with
    /// `settings` (TOML lines); every backend starts up, with fall 3.
    pub(crate) fn snapshot(settings: &str, backends: &[String]) -> FrontendSnapshot {
        let text = format!(
            "[[frontend]]\nlisten = \"127.0.0.1:1\"\n{settings}\nbackends = [{}]\n",
            backends.join(",")
        );
        let config = Config::from_toml(&text, "t").expect("config").frontends[0].clone();
        let shared = Arc::new(FrontendShared::new(&config.name));
        let backends = config
            .backends
            .iter()
            .map(|b| {
                Arc::new(BackendShared::new(
                    &config.name,
                    &b.name,
                    b.addr,
                    Arc::new(Health::new(3)),
                ))
            })
            .collect();
        FrontendSnapshot::new(config, shared, backends)
    }

    /// `n` backend addresses as TOML strings, from port 9000 up.
    pub(crate) fn plain(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 9000 + i))
            .collect()
    }

    fn frontend(mode: &str, failback: bool, n: usize) -> FrontendSnapshot {
        snapshot(
            &format!("mode = \"{mode}\"\nfailback = {failback}"),
            &plain(n),
        )
    }

    fn tried(indexes: &[usize]) -> Tried {
        let mut t = Tried::default();
        for i in indexes {
            t.insert(*i);
        }
        t
    }

    #[test]
    fn round_robin_skips_unusable_backends_evenly() {
        let f = frontend("active-active", true, 3);
        let none = Tried::default();
        let picks: Vec<_> = (0..6).map(|_| f.select(&none)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2].map(Some));
        f.backends[1].health.set_up(false);
        let mut counts = [0; 3];
        for _ in 0..100 {
            counts[f.select(&none).expect("a backend")] += 1;
        }
        assert_eq!(counts, [50, 0, 50]);
        assert_eq!(f.select(&tried(&[0, 2])), None);
        f.backends[1].health.set_up(true);
        f.backends[0].set_admin(AdminState::Drain);
        f.backends[2].set_admin(AdminState::Maint);
        assert!((0..10).all(|_| f.select(&none) == Some(1)));
    }

    #[test]
    fn an_agent_that_says_drain_or_maint_takes_a_backend_out() {
        let f = frontend("active-active", true, 2);
        let none = Tried::default();
        f.backends[0].health.set_agent_state(AdminState::Drain);
        assert!(!f.backends[0].usable());
        assert!((0..4).all(|_| f.select(&none) == Some(1)));
        f.backends[0].health.set_agent_state(AdminState::Ready);
        assert!(f.backends[0].usable());
        assert_eq!(f.backends[0].health.weight_percent(), 100);
    }

    #[test]
    fn pools_larger_than_64_have_no_cap() {
        let f = frontend("active-active", true, 200);
        let none = Tried::default();
        let mut seen = vec![0; 200];
        for _ in 0..400 {
            seen[f.select(&none).expect("a backend")] += 1;
        }
        assert!(seen.iter().all(|n| *n == 2), "{seen:?}");
        let all_but_150: Vec<usize> = (0..200).filter(|i| *i != 150).collect();
        assert_eq!(f.select(&tried(&all_but_150)), Some(150));
        assert_eq!(f.select(&tried(&(0..200).collect::<Vec<_>>())), None);
    }

    #[test]
    fn active_passive_fails_over_and_back() {
        let f = frontend("active-passive", true, 3);
        let none = Tried::default();
        assert_eq!(f.select(&none), Some(0));
        f.backends[0].health.set_up(false);
        assert_eq!(f.select(&none), Some(1));
        assert_eq!(f.select(&tried(&[1])), Some(2));
        f.backends[0].health.set_up(true);
        assert_eq!(f.select(&none), Some(0));
    }

    #[test]
    fn without_failback_the_promoted_backend_keeps_traffic() {
        let f = frontend("active-passive", false, 2);
        let none = Tried::default();
        assert_eq!(f.select(&none), Some(0));
        f.backends[0].health.set_up(false);
        assert_eq!(f.select(&none), Some(1));
        f.backends[0].health.set_up(true);
        assert_eq!(f.select(&none), Some(1));
        // A new snapshot with the backends in another order keeps the
        // promotion on the same backend.
        let reordered = FrontendSnapshot::new(
            f.config.clone(),
            Arc::clone(&f.shared),
            vec![Arc::clone(&f.backends[1]), Arc::clone(&f.backends[0])],
        );
        assert_eq!(reordered.select(&none), Some(0));
        f.backends[1].health.set_up(false);
        assert_eq!(f.select(&none), Some(0));
    }

    #[test]
    fn a_full_backend_is_skipped_and_an_overflow_promotes_nothing() {
        let f = frontend("active-passive", false, 2);
        let none = Tried::default();
        f.backends[0].set_maxconn(Some(1));
        assert!(f.backends[0].has_room());
        assert_eq!(f.select(&none), Some(0));
        assert_eq!(f.backends[0].take_slot(), Slot::Taken);
        assert!(!f.backends[0].has_room());
        // Full, not down: the next one takes the overflow...
        assert_eq!(f.select(&none), Some(1));
        // ...and once there is room again the traffic is back on the first.
        f.backends[0].give_slot();
        assert_eq!(f.select(&none), Some(0));
        let rr = frontend("active-active", true, 3);
        rr.backends[1].set_maxconn(Some(1));
        assert_eq!(rr.backends[1].take_slot(), Slot::Taken);
        let picks: Vec<_> = (0..4).map(|_| rr.select(&none)).collect();
        assert!(picks.iter().all(|p| *p != Some(1)), "{picks:?}");
    }

    #[test]
    fn local_connect_errors_are_not_the_backends_fault() {
        assert_eq!(
            ConnectFailure::from_errno(libc::EADDRNOTAVAIL),
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
}
