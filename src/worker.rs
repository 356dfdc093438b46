//! The per-core event loop: one thread, one io_uring, one SO_REUSEPORT
//! listener per frontend, one slab of sessions. Sessions never move
//! between workers.
//!
//! The worker touches the control plane in three ways only: the snapshot
//! it was last given (frontends, backend sets, selectors), the atomics in
//! it (health, admin state, counters), and the [`Command`]s it takes from
//! its channel when its wake eventfd fires, each acknowledged with an
//! [`Ack`] so the control plane knows when a change is in force.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types};
use slab::Slab;
use socket2::{SockAddr, Socket};

use crate::access;
use crate::config::{AccessLog, OnDown};
use crate::edge::{self, Refusal, SourceGuard};
use crate::logging::RateLimit;
use crate::model::{
    BackendShared, ConnectFailure, FrontendShared, FrontendSnapshot, Global, Snapshot, Tried,
    Waiting,
};
use crate::proxy::{self, Parsed, Refusal as HeaderRefusal, Version};
use crate::queue::{self, Pick, Queues};
use crate::relay::{Conn, DOWNSTREAM, End, Event, LocalFailure, Phase, UPSTREAM};
use crate::uring::{self, Io, Op, PipePool, token, untoken};

/// The stages before the relay that read or send bytes of their own (the
/// ClientHello read for SNI routing, and its replay to the backend).
mod stages;
use stages::Pending;
/// TLS termination: the handshake and the record layer on the ring.
mod tls_relay;

/// Submission queue size; the completion queue is sized from the
/// connection limit (`uring::cq_entries`).
const RING_ENTRIES: u32 = 1024;
/// Size of each receive buffer (their number is the `buffers` setting).
/// 16 KiB is HAProxy's bufsize; a receive that fills one switches its
/// direction to splicing.
const BUFFER_SIZE: usize = 16 * 1024;
/// Most idle pipes a worker keeps (fewer under a small fd limit).
const PIPES_KEPT: usize = 256;
/// 1 MiB (the default pipe-max-size): measured with iperf3 through one
/// worker, the same throughput as 256 KiB at 25-40% less CPU, since each
/// splice moves more. A pipe holds kernel memory only while bytes sit in it.
const PIPE_SIZE: usize = 1024 * 1024;
/// How often idle connections and down backends are looked for: the
/// resolution of the idle timeout.
const TICK: Duration = Duration::from_millis(100);
/// design.md: on EMFILE, pause a listener instead of spinning on it.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// A warning that can repeat per connection is written at most this often
/// per worker and kind, with the count held back.
const WARN_PERIOD: Duration = Duration::from_secs(10);
/// Most clients taken with accept4(2) in one turn (HAProxy's
/// tune.maxaccept), so a deep queue does not starve the connections.
const ACCEPT_BATCH: usize = 64;

/// The accept-side operation in flight on a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Armed {
    Multishot,
    /// A poll for readability, then accept4(2).
    Poll,
    /// A timeout after an accept error.
    Pause,
}

/// How a turn of accept4(2) ended.
enum Batch {
    /// The queue is empty.
    Empty,
    /// The turn's budget is spent; more may be queued.
    Full,
    /// A limit is reached; more may be queued.
    Limit,
    /// accept4 failed (out of fds, memory): errno.
    Failed(i32),
}

/// What the control plane asks of a worker.
pub enum Command {
    /// Serve new connections from this snapshot; those already open keep
    /// the one they started with.
    Publish(Arc<Snapshot>),
    /// Accept on this socket (bound by the control plane) for the frontend
    /// of that name, once a published snapshot has it.
    AddListener {
        id: u64,
        frontend: String,
        socket: Socket,
    },
    /// Stop accepting on a listener; serve the clients already queued on
    /// it. With `retire`, the frontend is gone: its connections get the
    /// duration to finish, then they are reset.
    RemoveListener {
        id: u64,
        retire: Option<(Arc<FrontendShared>, Duration)>,
    },
    /// Reset every connection to this backend.
    CloseBackend(Arc<BackendShared>),
    /// Stop accepting; open connections carry on until they end.
    Drain,
    /// Stop accepting and close every connection.
    Stop,
}

/// A command done: `seq` is the control plane's number for it, and
/// `generation` the snapshot the worker serves from now.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub worker: usize,
    pub seq: u64,
    pub generation: u64,
}

/// The worker's end of its command channel.
/// The worker's eventfd (in [`Global`]) is written after each command.
pub struct Commands {
    pub receiver: mpsc::Receiver<(u64, Command)>,
    pub acks: mpsc::Sender<Ack>,
}

/// A frontend snapshot as this worker uses it: what the kernel reads when
/// a connect is submitted (the timeout, the addresses) built once per
/// snapshot, in an `Rc` that each session holds: nothing it points to
/// moves or goes away while the session lives, whatever reloads do, and
/// taking it per accept costs no atomic on a shared cache line.
struct View {
    snap: Arc<FrontendSnapshot>,
    connect_timeout: types::Timespec,
    /// In the form connect(2) takes, one per backend of the snapshot.
    addrs: Vec<SockAddr>,
    /// Bytes moved to and from each backend since the last tick: added to
    /// the shared counters once per tick, not once per message.
    bytes: RefCell<Vec<[u64; 2]>>,
    /// Already in the tick's list of views to flush.
    dirty: Cell<bool>,
    /// The PROXY header each backend gets, if any.
    send_proxy: Vec<Option<Version>>,
    /// Sessions need the client's address and their own (a PROXY header
    /// is read or sent).
    wants_addrs: bool,
    /// Who may connect, and how often.
    edge: edge::Policy,
    /// The selector hashes the client's address (`balance = "source"`).
    needs_client: bool,
    /// Some backend has a maxconn: a pick that finds none may mean "all
    /// full" (queue) rather than "none up". Without, nothing looks.
    limited: bool,
    timeout_queue: Duration,
}

impl View {
    fn new(snap: &Arc<FrontendSnapshot>) -> View {
        View {
            connect_timeout: types::Timespec::from(snap.config.connect_timeout),
            addrs: snap
                .backends
                .iter()
                .map(|b| SockAddr::from(b.addr))
                .collect(),
            bytes: RefCell::new(vec![[0; 2]; snap.backends.len()]),
            dirty: Cell::new(false),
            send_proxy: (0..snap.backends.len())
                .map(|i| snap.config.send_proxy(i))
                .collect(),
            wants_addrs: snap.config.proxy.accept.is_some()
                || (0..snap.backends.len()).any(|i| snap.config.send_proxy(i).is_some()),
            edge: edge::Policy::new(&snap.config.edge, &snap.shared.sources),
            needs_client: snap.needs_client(),
            limited: snap.config.backends.iter().any(|b| b.maxconn.is_some()),
            timeout_queue: snap
                .config
                .timeout_queue
                .unwrap_or(snap.config.connect_timeout),
            snap: Arc::clone(snap),
        }
    }

    fn name(&self) -> &str {
        self.snap.name()
    }

    fn backend(&self, index: usize) -> &BackendShared {
        &self.snap.backends[index]
    }

    /// Adds one tick's bytes to the backends' shared counters.
    fn flush_bytes(&self) {
        self.dirty.set(false);
        let mut bytes = self.bytes.borrow_mut();
        for (backend, moved) in self.snap.backends.iter().zip(bytes.iter_mut()) {
            if *moved != [0, 0] {
                let [up, down] = std::mem::take(moved);
                backend.stats.bytes_to_backend.fetch_add(up, Relaxed);
                backend.stats.bytes_from_backend.fetch_add(down, Relaxed);
            }
        }
    }
}

/// A listening socket of this worker.
struct Listener {
    id: u64,
    frontend: String,
    /// `None` until a snapshot with the frontend is published.
    view: Option<Rc<View>>,
    /// `None` once the worker stopped accepting on it (drain, stop).
    socket: Option<Socket>,
    armed: Option<Armed>,
    /// A cancel of the armed operation is on its way.
    cancelling: bool,
    /// Stopped at a limit: nothing is armed until a connection ends.
    held: bool,
    /// The last turn left clients queued: a multishot accept would take
    /// them all at once, past the limit.
    backlogged: bool,
    /// Removed by the control plane: it drains its queue, then leaves.
    removed: bool,
}

/// The connect stage: what only matters until a backend accepted.
#[derive(Default)]
struct Connecting {
    /// Backends of the session's route already tried (counted from the
    /// route's first backend), so a retry never repeats one.
    tried: Tried,
    /// The client's bytes the backend gets first, once connected (and
    /// after a PROXY header): the ClientHello, or what came with the
    /// client's own PROXY header.
    preamble: Option<Box<Pending>>,
    /// Connects made so far: at most 1 + `retries`.
    attempts: u32,
    /// Rounds started again after every candidate was tried (0: the first).
    round: u32,
    /// Between rounds: the tick connects again from then on.
    retry_at: Option<Instant>,
}

/// Waiting for a slot: every usable backend is at its maxconn.
struct Queued {
    connecting: Connecting,
    since: Instant,
    /// The poll that notices the client leaving is in flight.
    watching: bool,
}

/// accept-proxy: the PROXY header being read. Boxed: a receive writes
/// into it while the slab may move the session.
struct HeaderRead {
    buf: Box<[u8]>,
    filled: usize,
    deadline: Instant,
}

/// Where a session is, for what is not the relay's business. The stages
/// before connect come in this order, each only where configured: the
/// PROXY header, then the ClientHello or the TLS handshake.
enum Stage {
    /// Reading a PROXY header from a trusted upstream.
    Header(HeaderRead),
    /// Reading the client's TLS ClientHello, to route by its server name.
    /// The buffer a receive may be writing into lives here (boxed: the
    /// slab moves sessions) until the session is freed.
    Hello(Box<Pending>),
    /// The TLS handshake with the client (terminating frontends); its
    /// state is the session's `tls`.
    Handshake,
    Connect(Connecting),
    /// The backend accepted; the preamble is being sent to it. Its active
    /// count drops when the session ends, as in the relay.
    Preamble(Box<Pending>),
    /// In this worker's queue for its frontend (see queue.rs).
    Queued(Queued),
    /// The backend accepted: its active count drops when this ends.
    Relay,
}

/// One client connection: the frontend snapshot and backend it started
/// with (never an index into a table a reload may change), its stage, and
/// the sockets with their relay state.
struct Session {
    view: Rc<View>,
    /// Index into `view`'s backends, once one was chosen.
    backend: Option<usize>,
    /// Holds one of that backend's maxconn slots.
    slot: bool,
    /// From accept to the backend's accept, for the access log.
    connected_after: Option<Duration>,
    /// Index into `view.snap.routes` (0: the frontend's own backends).
    route: usize,
    /// The ClientHello's server name, for the access log.
    server_name: Option<Box<str>>,
    /// TLS termination state (buffers the kernel may be using included):
    /// kept until the session is freed.
    tls: Option<Box<tls_relay::TlsState>>,
    stage: Stage,
    conn: Conn,
    /// The address the client connected to, when a PROXY header needs it
    /// (or the one a received header carried).
    dest: Option<SocketAddr>,
    /// Its place in the per-source table, given back when the session is
    /// dropped, however it ends.
    #[allow(dead_code, reason = "held for its Drop")]
    source: SourceGuard,
}

impl Session {
    fn connected(&self) -> bool {
        matches!(self.stage, Stage::Relay | Stage::Preamble(_))
    }

    /// The backend it relays to, if it got that far.
    fn relaying_to(&self) -> Option<&BackendShared> {
        match (self.connected(), self.backend) {
            (true, Some(index)) => Some(self.view.backend(index)),
            _ => None,
        }
    }
}

/// What the tick does to a connection.
#[derive(Clone, Copy, Debug)]
enum Sweep {
    /// Only free it if it is finished (a reset's flush may be over).
    Free,
    Close(End),
    Fail(LocalFailure),
    /// A direction short of a pipe may try one again.
    RetryPipe,
    /// A connection waiting for an fd for its backend socket tries again.
    Connect,
    /// No valid PROXY header in time.
    Refuse(HeaderRefusal),
    /// Its ClientHello did not arrive within `timeout-client-hello`.
    HelloLate,
    /// Its TLS handshake did not complete within `handshake-timeout`.
    HandshakeLate,
}

/// One rate limit per kind of warning the data path can repeat.
struct Warnings {
    local: [RateLimit; LocalFailure::ALL.len()],
    pipe: RateLimit,
    proxy: RateLimit,
    refused: RateLimit,
    queue: RateLimit,
}

impl Warnings {
    fn new() -> Warnings {
        Warnings {
            local: std::array::from_fn(|_| RateLimit::new(WARN_PERIOD)),
            pipe: RateLimit::new(WARN_PERIOD),
            proxy: RateLimit::new(WARN_PERIOD),
            refused: RateLimit::new(WARN_PERIOD),
            queue: RateLimit::new(WARN_PERIOD),
        }
    }
}

pub struct Worker {
    id: usize,
    io: Io,
    sessions: Slab<Session>,
    listeners: Slab<Listener>,
    commands: Commands,
    /// The connection limit, and the wake fds (this worker's is written by
    /// the control plane after a command, and by other workers when a
    /// connection ends while this one waits at a limit).
    global: Arc<Global>,
    wake_fd: RawFd,
    cq_entries: u32,
    /// The kernel's count of dropped completions, as last seen.
    cq_dropped: u32,
    /// A connection of this worker ended while a listener was held.
    resume: bool,
    accept_failures: RateLimit,
    limit_warnings: RateLimit,
    generation: u64,
    /// Frontends removed by a reload: their sessions are reset once the
    /// deadline passes.
    retired: Vec<(Arc<FrontendShared>, Instant)>,
    tick: types::Timespec,
    pause: types::Timespec,
    /// The loop's clock, read once per batch of completions.
    now: Instant,
    draining: bool,
    stopping: bool,
    warnings: Warnings,
    batch: Vec<(u64, i32, u32)>,
    /// Connections the tick acts on.
    sweep: Vec<(usize, Sweep)>,
    /// Views with bytes to flush at this tick.
    dirty: Vec<Rc<View>>,
    /// Connections waiting for a backend slot, per frontend.
    queues: Queues,
    /// A slot may be free for a queued connection: serve the queues once
    /// the batch is done.
    serve_queued: bool,
}

impl Worker {
    pub fn new(
        id: usize,
        commands: Commands,
        global: Arc<Global>,
        buffers: u32,
    ) -> std::io::Result<Worker> {
        let cq_entries = uring::cq_entries(global.limit, RING_ENTRIES);
        let ring = uring::new_ring(RING_ENTRIES, cq_entries)?;
        // The kernel may clamp it: keep what it really gave, for messages.
        let cq_entries = ring.params().cq_entries();
        let count = u16::try_from(buffers)
            .map_err(|_| std::io::Error::other(format!("{buffers} buffers is above the limit")))?;
        let io = Io::new(
            ring,
            count,
            BUFFER_SIZE,
            PipePool::new(PIPES_KEPT, pipe_share(&global), PIPE_SIZE),
        )?;
        Ok(Worker {
            id,
            io,
            sessions: Slab::with_capacity(1024),
            listeners: Slab::new(),
            commands,
            wake_fd: global.wake_fd(id),
            global,
            cq_entries,
            cq_dropped: 0,
            resume: false,
            accept_failures: RateLimit::new(WARN_PERIOD),
            limit_warnings: RateLimit::new(WARN_PERIOD),
            generation: 0,
            retired: Vec::new(),
            tick: types::Timespec::from(TICK),
            pause: types::Timespec::from(ACCEPT_PAUSE),
            now: Instant::now(),
            draining: false,
            stopping: false,
            warnings: Warnings::new(),
            batch: Vec::with_capacity(cq_entries.min(4 * RING_ENTRIES) as usize),
            sweep: Vec::new(),
            dirty: Vec::new(),
            queues: Queues::default(),
            serve_queued: false,
        })
    }

    /// Runs until drained or stopped. On an error, operations may still be
    /// in flight: dropping the worker is safe all the same, as `Io`'s Drop
    /// cancels them before freeing what they use.
    pub fn run(mut self) -> std::io::Result<()> {
        self.event_loop()
    }

    fn event_loop(&mut self) -> std::io::Result<()> {
        self.arm_wake()?;
        self.arm_tick()?;
        self.take_commands()?;
        while !self.finished() {
            let waited = if self.io.backlog.is_empty() {
                self.io.ring.submit_and_wait(1)
            } else {
                self.io.ring.submit()
            };
            match waited {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBADR) => {
                    self.count_overflows();
                    return Err(uring::dropped_completion_error(self.id, self.cq_entries));
                }
                Err(e) => return Err(e),
            }
            self.now = Instant::now();
            let mut batch = std::mem::take(&mut self.batch);
            batch.append(&mut self.io.backlog);
            batch.extend(
                self.io
                    .ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            if batch.len() >= self.cq_entries as usize || self.io.ring.submission().cq_overflow() {
                self.global.cq_overflowed.fetch_add(1, Relaxed);
            }
            for &(user_data, res, flags) in &batch {
                self.dispatch(user_data, res, flags)?;
            }
            batch.clear();
            self.batch = batch;
            if std::mem::take(&mut self.resume) {
                self.resume_held()?;
            }
            if std::mem::take(&mut self.serve_queued) {
                self.serve_queues()?;
            }
        }
        log::debug!("worker {} stopped", self.id);
        Ok(())
    }

    /// Done once draining or stopping with no connection left and every
    /// listener closed (a listener closes only with nothing armed on it).
    fn finished(&self) -> bool {
        (self.draining || self.stopping)
            && self.sessions.is_empty()
            && self.listeners.iter().all(|(_, l)| l.socket.is_none())
    }

    fn dispatch(&mut self, user_data: u64, res: i32, flags: u32) -> std::io::Result<()> {
        let Some((op, slot)) = untoken(user_data) else {
            return Ok(());
        };
        match op {
            Op::Accept => self.on_accept(slot, res, flags),
            Op::AcceptPoll | Op::AcceptPause => self.on_accept_ready(slot),
            Op::Wake => self.on_wake(),
            Op::Tick => self.on_tick(),
            Op::Ignore => Ok(()),
            _ => self.on_conn_event(op, slot, res, flags),
        }
    }

    fn on_conn_event(&mut self, op: Op, key: usize, res: i32, flags: u32) -> std::io::Result<()> {
        let Some(session) = self.sessions.get_mut(key) else {
            log::error!(
                "worker {}: completion {op:?} for unknown connection {key}",
                self.id
            );
            return Ok(());
        };
        log::trace!(
            "worker {} conn {key}: {op:?} res={res} flags={flags:#x}",
            self.id
        );
        let conn = &mut session.conn;
        let io = &mut self.io;
        let event = match op {
            Op::Connect => return self.on_connect(key, res),
            Op::Header => return self.on_header(key, res),
            Op::Hello => return self.on_hello(key, res),
            Op::Preamble => return self.on_preamble(key, res),
            Op::Watch => return self.on_watch(key, res),
            Op::TlsRecv0 => return self.on_tls_recv(key, tls_relay::CLIENT, res),
            Op::TlsRecv1 => return self.on_tls_recv(key, tls_relay::BACKEND, res),
            Op::TlsSend0 => return self.on_tls_send(key, tls_relay::CLIENT, res),
            Op::TlsSend1 => return self.on_tls_send(key, tls_relay::BACKEND, res),
            Op::ConnectTimeout | Op::Cancel => {
                conn.inflight -= 1;
                Event::None
            }
            Op::Recv0 | Op::Recv1 => {
                conn.last_active = self.now;
                conn.on_recv(key, dir_of(op), res, flags, io)?
            }
            Op::Send0 | Op::Send1 => {
                conn.last_active = self.now;
                conn.on_send(key, dir_of(op), res, io)?;
                Event::None
            }
            _ => {
                conn.last_active = self.now;
                conn.on_poll(key, dir_of(op), res, io)?
            }
        };
        if event != Event::None {
            let view = Rc::clone(&session.view);
            self.note(&view, event);
        }
        self.free_if_finished(key);
        Ok(())
    }

    /// Counts (and logs, rate-limited) what a relay step reports.
    fn note(&mut self, view: &View, event: Event) {
        let stats = &view.snap.shared.stats;
        match event {
            Event::None => {}
            Event::BuffersExhausted => {
                stats.buffers_exhausted.fetch_add(1, Relaxed);
            }
            Event::PipeFallback(errno) => {
                stats.pipe_fallbacks.fetch_add(1, Relaxed);
                let Some(held_back) = self.warnings.pipe.allow(self.now) else {
                    return;
                };
                let why = if errno == uring::PIPE_BUDGET_SPENT {
                    format!(
                        "all {} pipes of this worker's fd budget are in use",
                        self.io.pipes.max_open()
                    )
                } else {
                    std::io::Error::from_raw_os_error(errno).to_string()
                };
                log::warn!(
                    "worker {}: frontend {}: cannot get a splice pipe ({why}); copying through \
                     buffers instead (raise the fd limit, or see fs.pipe-user-pages-*){}",
                    self.id,
                    view.name(),
                    self.warnings.pipe.suffix(held_back)
                );
            }
        }
    }

    /// Room for more clients on listener `index` under the global limit and
    /// its frontend's maxconn.
    fn headroom(&self, index: usize) -> u64 {
        let global = &self.global;
        let room = global.limit.saturating_sub(global.active.load(Relaxed));
        let Some(view) = self.listeners.get(index).and_then(|l| l.view.as_ref()) else {
            return 0;
        };
        let frontend = &view.snap;
        match frontend.config.maxconn {
            Some(max) => {
                room.min(u64::from(max).saturating_sub(frontend.shared.stats.active.load(Relaxed)))
            }
            None => room,
        }
    }

    /// Whether a multishot accept may run on listener `index`. It takes
    /// every client queued when it runs, however many, without asking: so
    /// only while every listener's full accept queue still fits under the
    /// global limit (all workers' multishots could fire at once) and every
    /// worker's queue for this frontend under its maxconn. Closer to a
    /// limit, the worker accepts with accept4(2), counting each client
    /// against the limits before taking it.
    fn multishot_fits(&self, index: usize) -> bool {
        let global = &self.global;
        let Some(view) = self.listeners.get(index).and_then(|l| l.view.as_ref()) else {
            return false;
        };
        // Every worker has the same listeners: one queue per listener and
        // worker could be taken at once.
        let workers = global.workers() as u64;
        let all_queues = self.listeners.len() as u64 * workers * global.accept_queue;
        let room = global.limit.saturating_sub(global.active.load(Relaxed));
        if room < all_queues {
            return false;
        }
        let frontend = &view.snap;
        frontend.config.maxconn.is_none_or(|max| {
            let used = frontend.shared.stats.active.load(Relaxed);
            u64::from(max).saturating_sub(used) >= workers * global.accept_queue
        })
    }

    /// Counts a client against both limits before it is accepted; `false`
    /// (and nothing counted) when either is reached. A compare-and-swap, so
    /// workers sharing a limit never take more than it together.
    fn claim(&mut self, view: &View) -> bool {
        let global = &self.global;
        let limit = global.limit;
        if global
            .active
            .fetch_update(SeqCst, Relaxed, |n| (n < limit).then_some(n + 1))
            .is_err()
        {
            return false;
        }
        let shared = &view.snap.shared;
        let Some(max) = view.snap.config.maxconn.map(u64::from) else {
            shared.stats.active.fetch_add(1, SeqCst);
            return true;
        };
        let fits = shared
            .stats
            .active
            .fetch_update(SeqCst, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok();
        if !fits {
            global.active.fetch_sub(1, SeqCst);
            self.wake_waiters(shared);
        }
        fits
    }

    /// Counts a client a multishot accept already took: far from the
    /// limits, no check is needed (see `multishot_fits`).
    fn count_taken(&self, view: &View) {
        self.global.active.fetch_add(1, SeqCst);
        view.snap.shared.stats.active.fetch_add(1, SeqCst);
    }

    /// A connection ended (or a claim went unused): its room goes to
    /// whichever worker waits for it. The frontend is the one the
    /// connection was counted on, whatever reloads did since.
    fn release(&mut self, shared: &FrontendShared) {
        shared.stats.active.fetch_sub(1, SeqCst);
        self.global.active.fetch_sub(1, SeqCst);
        self.wake_waiters(shared);
    }

    fn wake_waiters(&mut self, shared: &FrontendShared) {
        let waiting = self.global.waiting.take() | shared.waiting.take();
        if waiting == 0 {
            return;
        }
        if Waiting::includes(waiting, self.id) {
            self.resume = true;
        }
        self.global.wake_others(waiting, self.id);
    }

    /// Closes a listener whose accepting is over (nothing armed on it);
    /// one the control plane removed leaves the table.
    fn close_listener(&mut self, index: usize) {
        if self.listeners[index].removed {
            self.listeners.remove(index);
        } else {
            self.listeners[index].socket = None;
        }
    }

    /// Takes clients on a listener the way its headroom allows, whenever
    /// nothing is armed on it: far from the limits a multishot accept;
    /// near them accept4(2) one counted client at a time, then a poll for
    /// more; at a limit nothing (held) until a connection ends. Draining
    /// (the worker, or this listener once removed by a reload), it takes
    /// what is queued (within the limits) and closes the listener once the
    /// queue is empty: closing it earlier would reset those clients.
    fn serve_listener(&mut self, index: usize) -> std::io::Result<()> {
        let Some(listener) = self.listeners.get(index) else {
            return Ok(());
        };
        if listener.socket.is_none() || listener.armed.is_some() {
            return Ok(());
        }
        let draining = self.draining || listener.removed;
        if self.stopping || (draining && listener.view.is_none()) {
            self.close_listener(index);
            return Ok(());
        }
        if listener.view.is_none() {
            // Added, but no snapshot has its frontend yet.
            return Ok(());
        }
        let backlogged = listener.backlogged;
        if !draining && !backlogged && self.multishot_fits(index) {
            self.listeners[index].held = false;
            return self.arm_multishot(index);
        }
        let batch = self.accept_batch(index)?;
        if !matches!(batch, Batch::Limit) {
            self.listeners[index].held = false;
        }
        match batch {
            Batch::Empty if draining => {
                self.close_listener(index);
                Ok(())
            }
            Batch::Empty => {
                self.listeners[index].backlogged = false;
                if self.multishot_fits(index) {
                    self.arm_multishot(index)
                } else {
                    self.arm_poll(index)
                }
            }
            Batch::Full => {
                self.listeners[index].backlogged = true;
                self.arm_poll(index)
            }
            Batch::Limit if draining => {
                // Waiting for room would keep the listener open, and the
                // kernel sending it new clients, for the whole drain: close
                // it now (HAProxy unbinds at once too). What is still queued
                // goes to another instance on the port with
                // net.ipv4.tcp_migrate_req=1, or is reset: never left
                // hanging for the drain timeout.
                log::info!(
                    "worker {}: frontend {} at its connection limit while draining: closing \
                     its listener with clients still queued",
                    self.id,
                    self.listeners[index].frontend
                );
                self.close_listener(index);
                Ok(())
            }
            Batch::Limit => {
                self.listeners[index].backlogged = true;
                self.hold(index);
                Ok(())
            }
            Batch::Failed(errno) => self.pause(index, errno),
        }
    }

    /// One turn of accept4(2), each client counted before it is taken.
    fn accept_batch(&mut self, index: usize) -> std::io::Result<Batch> {
        let listener = &self.listeners[index];
        let (Some(fd), Some(view)) = (
            listener.socket.as_ref().map(|s| s.as_raw_fd()),
            listener.view.clone(),
        ) else {
            return Ok(Batch::Empty);
        };
        for _ in 0..ACCEPT_BATCH {
            if !self.claim(&view) {
                return Ok(Batch::Limit);
            }
            // SAFETY: plain syscall on our non-blocking listening socket; the
            // new fd is owned by the connection admit() makes.
            let client = unsafe {
                libc::accept4(
                    fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if client >= 0 {
                self.admit(&view, client)?;
                continue;
            }
            self.release(&view.snap.shared);
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            match errno {
                libc::EAGAIN => return Ok(Batch::Empty),
                // The client gave up while queued, or a signal: next one.
                libc::ECONNABORTED | libc::EINTR | libc::EPROTO => {}
                _ => return Ok(Batch::Failed(errno)),
            }
        }
        Ok(Batch::Full)
    }

    fn arm_multishot(&mut self, index: usize) -> std::io::Result<()> {
        let listener = &mut self.listeners[index];
        let Some(socket) = &listener.socket else {
            return Ok(());
        };
        // Non-blocking: splice(2) honours only the socket's own O_NONBLOCK
        // (not SPLICE_F_NONBLOCK), and a blocking socket would stall the
        // whole worker the moment a client pauses a bulk upload.
        let entry = opcode::AcceptMulti::new(types::Fd(socket.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(token(Op::Accept, index));
        listener.armed = Some(Armed::Multishot);
        self.io.push(&entry)
    }

    fn arm_poll(&mut self, index: usize) -> std::io::Result<()> {
        let listener = &mut self.listeners[index];
        let Some(socket) = &listener.socket else {
            return Ok(());
        };
        let entry = opcode::PollAdd::new(types::Fd(socket.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(token(Op::AcceptPoll, index));
        listener.armed = Some(Armed::Poll);
        self.io.push(&entry)
    }

    /// At a limit: arm nothing and wait for a connection to end, here or
    /// on another worker (which then wakes this one). New clients wait in
    /// the kernel's accept queue meanwhile, never accepted and closed.
    fn hold(&mut self, index: usize) {
        let Some(view) = self.listeners[index].view.clone() else {
            return;
        };
        let frontend = &view.snap;
        // Which limit, as far as one can tell now: the frontend's when it is
        // full (it is the operator's own setting), else the global one.
        let frontend_full = frontend
            .config
            .maxconn
            .is_some_and(|max| frontend.shared.stats.active.load(Relaxed) >= u64::from(max));
        let already = std::mem::replace(&mut self.listeners[index].held, true);
        self.global.waiting.mark(self.id);
        frontend.shared.waiting.mark(self.id);
        // A connection may have ended after the claim failed and before the
        // marks were set, seeing nobody to wake: look once more.
        if self.headroom(index) > 0 {
            self.resume = true;
        }
        if already {
            return;
        }
        let what = if frontend_full {
            frontend.shared.stats.maxconn_reached.fetch_add(1, Relaxed);
            format!(
                "frontend {}'s maxconn ({})",
                frontend.name(),
                frontend.config.maxconn.unwrap_or(0)
            )
        } else {
            self.global.limit_reached.fetch_add(1, Relaxed);
            format!(
                "the connection limit ({}, from RLIMIT_NOFILE {})",
                self.global.limit, self.global.nofile
            )
        };
        if let Some(held_back) = self.limit_warnings.allow(self.now) {
            log::warn!(
                "worker {}: at {what}: new clients wait in the accept queue until connections end{}",
                self.id,
                self.limit_warnings.suffix(held_back)
            );
        }
    }

    /// Takes clients again on every held listener that has room.
    fn resume_held(&mut self) -> std::io::Result<()> {
        let held: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.held)
            .map(|(index, _)| index)
            .collect();
        for index in held {
            if self.headroom(index) > 0 {
                self.serve_listener(index)?;
            }
        }
        Ok(())
    }

    /// Accepting failed (out of fds or memory, or refused by a security
    /// policy): pause before trying again, so a lasting error never spins,
    /// and say so once per period, not once per attempt.
    fn pause(&mut self, index: usize, errno: i32) -> std::io::Result<()> {
        let listener = &self.listeners[index];
        if let Some(view) = &listener.view {
            view.snap.shared.stats.accept_errors.fetch_add(1, Relaxed);
        }
        if let Some(held_back) = self.accept_failures.allow(self.now) {
            log::warn!(
                "worker {}: accept on {} failed: {}; pausing it {ACCEPT_PAUSE:?}, clients wait in \
                 the queue{}",
                self.id,
                listener.frontend,
                std::io::Error::from_raw_os_error(errno),
                self.accept_failures.suffix(held_back)
            );
        } else {
            log::debug!(
                "worker {}: accept on {} failed again: {}",
                self.id,
                listener.frontend,
                std::io::Error::from_raw_os_error(errno)
            );
        }
        let pause = opcode::Timeout::new(&self.pause)
            .build()
            .user_data(token(Op::AcceptPause, index));
        self.listeners[index].armed = Some(Armed::Pause);
        self.io.push(&pause)
    }

    /// Asks the armed multishot accept or poll to end; its completion then
    /// decides what comes next. A pause just runs out.
    fn cancel_accept(&mut self, index: usize) -> std::io::Result<()> {
        let listener = &mut self.listeners[index];
        let op = match listener.armed {
            Some(Armed::Multishot) => Op::Accept,
            Some(Armed::Poll) => Op::AcceptPoll,
            Some(Armed::Pause) | None => return Ok(()),
        };
        if listener.cancelling {
            return Ok(());
        }
        listener.cancelling = true;
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(token(op, index)))
            .build()
            .user_data(token(Op::Ignore, 0));
        self.io.push(&cancel)
    }

    fn on_accept(&mut self, index: usize, res: i32, flags: u32) -> std::io::Result<()> {
        if res >= 0 {
            match self.listeners.get(index).and_then(|l| l.view.clone()) {
                Some(view) => {
                    self.count_taken(&view);
                    self.admit(&view, res)?;
                }
                None => uring::close(res),
            }
        }
        if cqueue::more(flags) {
            if !self.multishot_fits(index) {
                self.cancel_accept(index)?;
            }
            return Ok(());
        }
        if res < 0 && res != -libc::ECANCELED {
            let Some(listener) = self.listeners.get_mut(index) else {
                return Ok(());
            };
            listener.armed = None;
            listener.cancelling = false;
            return self.pause(index, -res);
        }
        self.on_accept_ready(index)
    }

    /// A poll, a pause or a multishot accept ended: go on as the limits and
    /// the drain state say.
    fn on_accept_ready(&mut self, index: usize) -> std::io::Result<()> {
        let Some(listener) = self.listeners.get_mut(index) else {
            return Ok(());
        };
        listener.armed = None;
        listener.cancelling = false;
        self.serve_listener(index)
    }

    /// A new client, already counted against the limits: pick a backend.
    fn admit(&mut self, view: &Rc<View>, fd: RawFd) -> std::io::Result<()> {
        // A client accepted while draining (the accept completed before its
        // cancel did) is served like any other: closing it would drop it.
        // Only a hard stop turns it away.
        if self.stopping {
            uring::close(fd);
            self.release(&view.snap.shared);
            return Ok(());
        }
        let mut conn = Conn::new(fd, self.now);
        // Read now: at the end the client may be gone. A frontend without
        // an access log, rules on sources, a source hash or PROXY headers
        // pays no syscall for it.
        if view.edge.is_active()
            || view.needs_client
            || view.wants_addrs
            || view.snap.config.access_log != AccessLog::Off
            || log::log_enabled!(log::Level::Debug)
        {
            conn.client_addr = peer_addr(fd);
        }
        let dest = if view.wants_addrs {
            local_addr(fd)
        } else {
            None
        };
        let header = match &view.snap.config.proxy.accept {
            None => None,
            Some(accept) => {
                if !conn.client_addr.is_some_and(|a| accept.trusts(a.ip())) {
                    self.refuse_untrusted(view, fd, conn.client_addr);
                    return Ok(());
                }
                Some(HeaderRead {
                    buf: vec![0; proxy::MAX_HEADER].into_boxed_slice(),
                    filled: 0,
                    deadline: self.now + accept.timeout,
                })
            }
        };
        // Behind accept-proxy the peer is the upstream balancer: sources are
        // checked once its header says who the client is.
        let source = match header {
            Some(_) => Ok(SourceGuard::default()),
            None => self.admit_source(view, conn.client_addr),
        };
        let source = match source {
            Ok(guard) => guard,
            Err(refusal) => {
                self.refuse(view, fd, conn.client_addr, refusal);
                return Ok(());
            }
        };
        view.snap.shared.stats.accepted.fetch_add(1, Relaxed);
        let reads_hello = view.snap.config.tls.reads_hello();
        let tls = match &view.snap.config.tls.server {
            Some(server) => match tls_relay::TlsState::new(
                &server.config,
                view.snap.config.tls.backend.as_ref(),
            ) {
                Ok(state) => Some(state),
                Err(e) => {
                    log::warn!("frontend {}: TLS: {e}; the client was reset", view.name());
                    conn.local = Some((LocalFailure::Relay, 0));
                    None
                }
            },
            None => None,
        };
        let terminates = tls.is_some();
        let failed = view.snap.config.tls.server.is_some() && !terminates;
        let key = self.sessions.insert(Session {
            view: Rc::clone(view),
            backend: None,
            slot: false,
            connected_after: None,
            route: 0,
            server_name: None,
            tls,
            stage: match header {
                Some(read) => Stage::Header(read),
                None if terminates => Stage::Handshake,
                None if reads_hello => Stage::Hello(Pending::new()),
                None => Stage::Connect(Connecting::default()),
            },
            conn,
            dest,
            source,
        });
        if failed {
            self.sessions[key]
                .conn
                .close(key, End::LocalError, &mut self.io)?;
            self.free_if_finished(key);
            return Ok(());
        }
        if terminates {
            // Records go out as rustls makes them, often two per response
            // (headers, body): Nagle would hold the second for the client's
            // delayed ACK (40 ms).
            uring::set_nodelay(fd);
        }
        self.begin(key)
    }

    /// Starts the session's first stage, at accept or once its PROXY header
    /// was read: the header, the TLS handshake, the ClientHello, or the
    /// connect.
    fn begin(&mut self, key: usize) -> std::io::Result<()> {
        let session = &self.sessions[key];
        match &session.stage {
            Stage::Header(_) => self.read_header(key),
            Stage::Handshake => self.start_tls(key),
            Stage::Hello(_) => self.start_hello(key),
            _ => {
                // Behind those already waiting, on any worker: a new client
                // must not take the slot a queued one was woken for.
                let view = &session.view;
                if view.limited && view.snap.shared.stats.queued.load(Relaxed) > 0 {
                    return self.enqueue(key);
                }
                self.connect_next(key)
            }
        }
    }

    /// accept-proxy: a peer not in accept-proxy-from could claim to be any
    /// client. Reset before anything is read or allocated for it.
    fn refuse_untrusted(&mut self, view: &View, fd: RawFd, peer: Option<SocketAddr>) {
        view.snap
            .shared
            .stats
            .proxy_refused
            .count(HeaderRefusal::Untrusted);
        let peer = peer.map_or_else(|| "?".into(), |p| p.ip().to_string());
        self.warn_proxy(view.name(), &peer, HeaderRefusal::Untrusted);
        uring::set_linger_zero(fd);
        uring::close(fd);
        self.release(&view.snap.shared);
    }

    /// One line per period for every reason a header was refused: a
    /// misconfigured upstream refuses every connection the same way.
    fn warn_proxy(&mut self, frontend: &str, peer: &str, why: HeaderRefusal) {
        let what = match why {
            HeaderRefusal::Untrusted => "it is not in accept-proxy-from",
            HeaderRefusal::Timeout => "no whole PROXY header within timeout-proxy-header",
            HeaderRefusal::Truncated => "it closed before its PROXY header was complete",
            HeaderRefusal::Malformed => "its PROXY header is malformed (or missing)",
            HeaderRefusal::Oversized => "its PROXY header is too long",
            HeaderRefusal::Version => "its PROXY header has an unknown version",
            HeaderRefusal::Checksum => "its PROXY header fails its CRC32C checksum",
        };
        match self.warnings.proxy.allow(self.now) {
            Some(held_back) => log::warn!(
                "worker {}: frontend {frontend}: reset a connection from {peer}: {what}{}",
                self.id,
                self.warnings.proxy.suffix(held_back)
            ),
            None => log::debug!(
                "worker {}: frontend {frontend}: reset a connection from {peer}: {what}",
                self.id
            ),
        }
    }

    /// Reads more of a PROXY header into the rest of its buffer.
    fn read_header(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let Stage::Header(read) = &mut session.stage else {
            return Ok(());
        };
        let rest = &mut read.buf[read.filled..];
        let entry = opcode::Recv::new(
            types::Fd(session.conn.client),
            rest.as_mut_ptr(),
            rest.len() as u32,
        )
        .build()
        .user_data(token(Op::Header, key));
        session.conn.submit(&mut self.io, entry)
    }

    fn on_header(&mut self, key: usize, res: i32) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let conn = &mut session.conn;
        conn.inflight -= 1;
        let Stage::Header(read) = &mut session.stage else {
            return Ok(());
        };
        if conn.phase == Phase::Closing {
            self.free_if_finished(key);
            return Ok(());
        }
        conn.last_active = self.now;
        let parsed = match res {
            n if n > 0 => {
                read.filled += n as usize;
                proxy::parse(&read.buf[..read.filled])
            }
            0 => Parsed::Invalid(HeaderRefusal::Truncated),
            n if matches!(
                -n,
                libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN | libc::ETIMEDOUT
            ) =>
            {
                Parsed::Invalid(HeaderRefusal::Truncated)
            }
            n => {
                conn.fail(key, LocalFailure::Relay, -n, &mut self.io)?;
                self.free_if_finished(key);
                return Ok(());
            }
        };
        match parsed {
            Parsed::Partial if read.filled < read.buf.len() => self.read_header(key),
            // The parser decides within MAX_HEADER bytes; never spin on a
            // full buffer should that ever change.
            Parsed::Partial => self.refuse_header(key, HeaderRefusal::Oversized),
            Parsed::Invalid(why) => self.refuse_header(key, why),
            Parsed::Done { len, addrs } => self.header_read(key, len, addrs),
        }
    }

    /// A valid header: the address it carries is the client's from here
    /// on (logs, metrics, a header sent on); the bytes after it are the
    /// client's first bytes.
    fn header_read(
        &mut self,
        key: usize,
        len: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
    ) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        if let Some((client, dest)) = addrs {
            session.conn.client_addr = Some(client);
            session.dest = Some(dest);
        }
        let Stage::Header(read) = &session.stage else {
            return Ok(());
        };
        // The receive completed: nothing points into the buffer any more.
        let early = &read.buf[len..read.filled];
        let mut tls_early = Vec::new();
        let next = if session.tls.is_some() {
            tls_early = early.to_vec();
            Stage::Handshake
        } else if session.view.snap.config.tls.reads_hello() {
            Stage::Hello(Pending::with(early))
        } else {
            session.conn.dirs[UPSTREAM].bytes += early.len() as u64;
            Stage::Connect(Connecting {
                preamble: (!early.is_empty()).then(|| Pending::with(early)),
                ..Connecting::default()
            })
        };
        session.stage = next;
        // The source ACL and per-source limits apply to the client the
        // header names (the upstream's own, for LOCAL), not to the upstream.
        let view = Rc::clone(&session.view);
        let client = session.conn.client_addr;
        match self.admit_source(&view, client) {
            Ok(guard) => self.sessions[key].source = guard,
            Err(refusal) => {
                if let (Some(refusal), Some(client)) = (refusal, client) {
                    self.log_refusal(view.name(), client, refusal);
                }
                let conn = &mut self.sessions[key].conn;
                conn.close(key, End::Refused, &mut self.io)?;
                self.free_if_finished(key);
                return Ok(());
            }
        }
        if !tls_early.is_empty() {
            return self.tls_early(key, &tls_early);
        }
        self.begin(key)
    }

    /// Resets a client whose PROXY header is missing, invalid or late.
    fn refuse_header(&mut self, key: usize, why: HeaderRefusal) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let view = Rc::clone(&session.view);
        view.snap.shared.stats.proxy_refused.count(why);
        let peer =
            peer_addr(session.conn.client).map_or_else(|| "?".into(), |p| p.ip().to_string());
        session.conn.close(key, End::ProxyHeader, &mut self.io)?;
        self.warn_proxy(view.name(), &peer, why);
        self.free_if_finished(key);
        Ok(())
    }

    /// The frontend's ACL and per-source limits, at accept. A client whose
    /// address cannot be read is already gone (reset while queued): it is
    /// refused under the ACL only when there is one to satisfy.
    fn admit_source(
        &self,
        view: &View,
        client: Option<std::net::SocketAddr>,
    ) -> Result<SourceGuard, Option<Refusal>> {
        if !view.edge.is_active() {
            return Ok(SourceGuard::default());
        }
        let addr = client.ok_or(None)?;
        view.edge.admit_source(addr.ip(), self.now).map_err(Some)
    }

    /// Turns a client away with a reset, at once (no byte was read, no
    /// backend touched). One debug line per client; at info, one line per
    /// period with the count held back, so a flood cannot flood the log.
    fn refuse(
        &mut self,
        view: &View,
        fd: RawFd,
        client: Option<std::net::SocketAddr>,
        refusal: Option<Refusal>,
    ) {
        uring::set_linger_zero(fd);
        uring::close(fd);
        self.release(&view.snap.shared);
        let (Some(refusal), Some(client)) = (refusal, client) else {
            return;
        };
        self.log_refusal(view.name(), client, refusal);
    }

    fn log_refusal(&mut self, name: &str, client: SocketAddr, refusal: Refusal) {
        log::debug!("{name} {client}: refused, {}", refusal.describe());
        if let Some(held_back) = self.warnings.refused.allow(self.now) {
            log::info!(
                "worker {}: frontend {name}: refused {client} ({}){}",
                self.id,
                refusal.describe(),
                self.warnings.refused.suffix(held_back)
            );
        }
    }

    /// Connects to a backend this connection has not tried in this round,
    /// as the frontend's retries allow; queues it when every usable one is
    /// at its maxconn.
    fn connect_next(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let Stage::Connect(connecting) = &mut session.stage else {
            return Ok(());
        };
        connecting.retry_at = None;
        let view = &session.view;
        if connecting.attempts > view.snap.config.retries {
            return self.no_backend(key);
        }
        let client = session.conn.client_addr.map(|a| a.ip());
        let chosen = queue::pick(
            &view.snap,
            session.route,
            &connecting.tried,
            client,
            view.limited,
        );
        match chosen {
            Pick::Backend { index, slot } => self.connect_to(key, index, slot),
            Pick::Full => self.enqueue(key),
            Pick::Exhausted => self.retry_later(key),
        }
    }

    /// Every candidate of this round was tried: start again after a short
    /// delay while attempts are left and something is still usable (a
    /// single backend that refuses while it restarts gets another chance,
    /// as HAProxy retries the same server).
    fn retry_later(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let Stage::Connect(connecting) = &mut session.stage else {
            return Ok(());
        };
        let snap = &session.view.snap;
        let route = snap.routes.get(session.route).map(|r| r.backends.clone());
        let again = !connecting.tried.is_empty()
            && connecting.attempts <= snap.config.retries
            && snap
                .backends
                .get(route.unwrap_or_default())
                .is_some_and(|set| set.iter().any(|b| b.usable()));
        if !again {
            return self.no_backend(key);
        }
        connecting.round += 1;
        connecting.tried = Tried::default();
        connecting.retry_at = Some(self.now + queue::retry_delay(connecting.round));
        Ok(())
    }

    fn no_backend(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let snap = &session.view.snap;
        snap.shared.stats.no_backend.fetch_add(1, Relaxed);
        if let Some(route) = snap.routes.get(session.route) {
            route.stats.no_backend.fetch_add(1, Relaxed);
        }
        session.conn.close(key, End::NoBackend, &mut self.io)?;
        self.free_if_finished(key);
        Ok(())
    }

    /// Connects to backend `index` (holding one of its slots when `slot`),
    /// with the frontend's connect timeout linked to the connect.
    fn connect_to(&mut self, key: usize, index: usize, slot: bool) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let Stage::Connect(connecting) = &mut session.stage else {
            return Ok(());
        };
        let view = &session.view;
        let conn = &mut session.conn;
        let addr = &view.addrs[index];
        let fd = match backend_socket(addr.is_ipv6(), &mut self.io.pipes) {
            Ok(fd) => fd,
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                let first = conn.local.is_none();
                conn.local = Some((LocalFailure::BackendSocket, errno));
                let wait = matches!(
                    errno,
                    libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS
                );
                if wait && first {
                    // The warning comes only if it times out: say at debug
                    // that it waits, once per connection, not per tick.
                    log::debug!("conn {key}: waits for an fd for its backend socket ({e})");
                }
                if !wait {
                    conn.close(key, End::LocalError, &mut self.io)?;
                }
                // Not connecting: the slot goes to whoever can use it.
                if slot {
                    let view = Rc::clone(view);
                    self.give_slot(&view, index);
                }
                // Out of fds or memory, which ending connections give back:
                // the client waits and the tick tries again, up to the
                // connect timeout; then it is reset.
                self.free_if_finished(key);
                return Ok(());
            }
        };
        conn.local = None;
        let first = view
            .snap
            .routes
            .get(session.route)
            .map_or(0, |r| r.backends.start);
        connecting.tried.insert(index - first);
        view.backend(index).stats.connecting.fetch_add(1, Relaxed);
        if connecting.attempts > 0 {
            view.snap.shared.stats.retries.fetch_add(1, Relaxed);
        }
        connecting.attempts += 1;
        uring::set_nodelay(fd);
        conn.backend = fd;
        session.backend = Some(index);
        session.slot = slot;
        // The address and the timespec live in the view, which this
        // session holds until the connect and its timeout have completed.
        let connect = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(token(Op::Connect, key));
        let timeout = opcode::LinkTimeout::new(&view.connect_timeout)
            .build()
            .user_data(token(Op::ConnectTimeout, key));
        conn.last_active = self.now;
        conn.submit_linked(&mut self.io, connect, timeout)
    }

    fn on_connect(&mut self, key: usize, res: i32) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let conn = &mut session.conn;
        conn.inflight -= 1;
        let Some(index) = session.backend else {
            return Ok(());
        };
        let backend = session.view.backend(index);
        backend.stats.connecting.fetch_sub(1, Relaxed);
        if conn.phase == Phase::Closing {
            self.free_if_finished(key);
            return Ok(());
        }
        if res == 0 {
            backend.report_connect_success();
            backend.stats.connections.fetch_add(1, Relaxed);
            backend.stats.active.fetch_add(1, Relaxed);
            session.connected_after = Some(self.now.saturating_duration_since(conn.started));
            return self.start_preamble(key, index);
        }
        let failure = ConnectFailure::from_errno(-res);
        if failure == ConnectFailure::Local {
            // Out of local ports or memory: the backend is not at fault and
            // another backend would fail the same way.
            uring::close(conn.backend);
            conn.backend = -1;
            conn.fail(key, LocalFailure::Connect, -res, &mut self.io)?;
            self.free_if_finished(key);
            return Ok(());
        }
        log::debug!(
            "connect to backend {} failed ({failure:?}: {}); trying the next",
            backend.name,
            std::io::Error::from_raw_os_error(-res)
        );
        // One client retrying the same backend is no new evidence against
        // it: only a connection's first round counts toward marking it
        // down, so a single client cannot take the only backend out.
        match &session.stage {
            Stage::Connect(c) if c.round > 0 => {
                backend.stats.connect_failures.fetch_add(1, Relaxed);
            }
            _ => backend.report_connect_failure(failure),
        }
        uring::close(conn.backend);
        conn.backend = -1;
        session.backend = None;
        if std::mem::take(&mut session.slot) {
            let view = Rc::clone(&session.view);
            self.give_slot(&view, index);
        }
        self.connect_next(key)
    }

    /// A backend slot is free again: a worker with connections queued on
    /// that frontend serves its queue (this one once its batch is done).
    fn give_slot(&mut self, view: &View, index: usize) {
        view.backend(index).give_slot();
        let waiting = view.snap.shared.queue_waiting.take();
        if waiting == 0 {
            return;
        }
        if Waiting::includes(waiting, self.id) {
            self.serve_queued = true;
        }
        self.global.wake_others(waiting, self.id);
    }

    /// Every usable backend is at its maxconn: the connection waits for a
    /// slot, up to `timeout-queue`.
    fn enqueue(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let Stage::Connect(connecting) = &mut session.stage else {
            return Ok(());
        };
        let stats = &session.view.snap.shared.stats;
        let connecting = std::mem::take(connecting);
        session.stage = Stage::Queued(Queued {
            connecting,
            since: self.now,
            watching: true,
        });
        stats.enter_queue();
        session.conn.watch_client(key, &mut self.io)?;
        let shared = Arc::clone(&session.view.snap.shared);
        if let Some(held_back) = self.warnings.queue.allow(self.now) {
            log::warn!(
                "worker {}: frontend {}: every usable backend is at its maxconn; new connections \
                 wait in the queue up to {:?}{}",
                self.id,
                shared.name,
                session.view.timeout_queue,
                self.warnings.queue.suffix(held_back)
            );
        }
        self.queues.push(&shared, key);
        // Marked before the queue is served again (at the end of this
        // batch): a slot given back in between wakes this worker.
        shared.queue_waiting.mark(self.id);
        self.serve_queued = true;
        Ok(())
    }

    /// Gives the free slots to this worker's queued connections, oldest
    /// first per route; stays marked as waiting while any is left.
    fn serve_queues(&mut self) -> std::io::Result<()> {
        if self.queues.is_empty() {
            return Ok(());
        }
        for shared in self.queues.frontends() {
            shared.queue_waiting.mark(self.id);
            // Routes have backends of their own: one whose backends are
            // all full must not hold back a client of another route queued
            // behind it. In order within a route.
            let mut full: Vec<usize> = Vec::new();
            for key in self.queues.line_of(&shared) {
                let Some(route) = self.sessions.get(key).map(|s| s.route) else {
                    self.queues.remove(&shared, key);
                    continue;
                };
                if !full.contains(&route) && !self.try_place(&shared, key)? {
                    full.push(route);
                }
            }
        }
        Ok(())
    }

    /// Takes the connection at the head of a queue to a backend with room;
    /// `false` when it must wait on.
    fn try_place(&mut self, shared: &FrontendShared, key: usize) -> std::io::Result<bool> {
        let Some(session) = self.sessions.get_mut(key) else {
            self.queues.remove(shared, key);
            return Ok(true);
        };
        let Stage::Queued(queued) = &mut session.stage else {
            self.queues.remove(shared, key);
            return Ok(true);
        };
        if session.conn.phase == Phase::Closing {
            // Freed once its cancels complete; the gauge drops then.
            self.queues.remove(shared, key);
            return Ok(true);
        }
        let view = &session.view;
        let found = queue::pick(
            &view.snap,
            session.route,
            &queued.connecting.tried,
            session.conn.client_addr.map(|a| a.ip()),
            view.limited,
        );
        if found == Pick::Full {
            return Ok(false);
        }
        self.dequeue(shared, key)?;
        match found {
            Pick::Backend { index, slot } => self.connect_to(key, index, slot)?,
            _ => self.retry_later(key)?,
        }
        Ok(true)
    }

    /// Out of the queue and back to connecting.
    fn dequeue(&mut self, shared: &FrontendShared, key: usize) -> std::io::Result<()> {
        self.queues.remove(shared, key);
        let session = &mut self.sessions[key];
        let stage = std::mem::replace(&mut session.stage, Stage::Relay);
        let Stage::Queued(queued) = stage else {
            session.stage = stage;
            return Ok(());
        };
        session.stage = Stage::Connect(queued.connecting);
        let waited = self.now.saturating_duration_since(queued.since);
        session.view.snap.shared.stats.leave_queue(waited);
        if queued.watching {
            session.conn.unwatch_client(key, &mut self.io)?;
        }
        Ok(())
    }

    /// The watch on a queued client completed: it left (a reset, or its
    /// end of stream with nothing sent), or the watch was cancelled.
    fn on_watch(&mut self, key: usize, res: i32) -> std::io::Result<()> {
        let Some(session) = self.sessions.get_mut(key) else {
            return Ok(());
        };
        session.conn.inflight -= 1;
        let queued = match &mut session.stage {
            Stage::Queued(queued) => queued,
            _ => {
                self.free_if_finished(key);
                return Ok(());
            }
        };
        queued.watching = false;
        let conn = &mut session.conn;
        if conn.phase == Phase::Closing || res < 0 {
            self.free_if_finished(key);
            return Ok(());
        }
        // A client that sent its request and then ended its stream still
        // waits for the answer: it stays (unwatched) until its turn. Bytes
        // already read (with a PROXY header, a ClientHello) are its request
        // too, and so is what a terminating frontend's TLS receive already
        // took out of the socket (counted as it was decrypted).
        let reset = res & (libc::POLLERR | libc::POLLHUP) as i32 != 0;
        let sent = queued.connecting.preamble.is_some() || conn.dirs[UPSTREAM].bytes > 0;
        if reset || (!sent && queue::unread_bytes(conn.client) == 0) {
            conn.close(key, End::ClientAborted, &mut self.io)?;
        }
        self.free_if_finished(key);
        Ok(())
    }

    fn free_if_finished(&mut self, key: usize) {
        let now = self.now;
        if !self
            .sessions
            .get(key)
            .is_some_and(|s| s.conn.is_finished() && !s.conn.flushing(now))
        {
            return;
        }
        let mut session = self.sessions.remove(key);
        // The source's place goes back no later than the frontend's count:
        // whoever sees room there finds it in the per-source table too.
        drop(std::mem::take(&mut session.source));
        self.release(&session.view.snap.shared);
        if let (true, Some(index)) = (session.slot, session.backend) {
            let view = Rc::clone(&session.view);
            self.give_slot(&view, index);
        }
        let stats = &session.view.snap.shared.stats;
        if let Stage::Queued(queued) = &session.stage {
            self.queues.remove(&session.view.snap.shared, key);
            stats.leave_queue(self.now.saturating_duration_since(queued.since));
        }
        let [up, down] = session.conn.take_uncounted();
        if let Some(backend) = session.relaying_to() {
            backend.stats.active.fetch_sub(1, Relaxed);
            backend.stats.bytes_to_backend.fetch_add(up, Relaxed);
            backend.stats.bytes_from_backend.fetch_add(down, Relaxed);
        }
        match session.conn.end {
            Some(End::LocalError) => {
                stats.local_errors.fetch_add(1, Relaxed);
            }
            Some(End::QueueTimeout) => {
                stats.queue_timeouts.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        let access_log = session.view.snap.config.access_log;
        if access_log != AccessLog::Off {
            access_entry(&session, self.now).write(access_log);
        }
        if log::log_enabled!(log::Level::Debug) {
            log_connection(&session, self.now);
        }
        if let Some((what, errno)) = session.conn.local {
            self.warn_local(session.view.name(), what, errno);
        }
        session.conn.release(&mut self.io);
    }

    /// One line per kind and period: when fds or ports run out, every
    /// connection fails the same way.
    fn warn_local(&mut self, frontend: &str, what: LocalFailure, errno: i32) {
        let limit = &mut self.warnings.local[what as usize];
        let Some(held_back) = limit.allow(self.now) else {
            return;
        };
        let suffix = limit.suffix(held_back);
        let err = std::io::Error::from_raw_os_error(errno);
        let prefix = format!("worker {}: frontend {frontend}", self.id);
        match what {
            LocalFailure::BackendSocket => log::warn!(
                "{prefix}: cannot create a backend socket ({err}); the client was reset{suffix}"
            ),
            LocalFailure::Connect => log::warn!(
                "{prefix}: cannot connect to backends: {err} (local ports or memory exhausted? \
                 see net.ipv4.ip_local_port_range and net.ipv4.tcp_tw_reuse); backends are not \
                 marked down for it; the client was reset{suffix}"
            ),
            LocalFailure::Relay => {
                log::warn!(
                    "{prefix}: relaying failed locally ({err}); both sides were reset{suffix}"
                )
            }
            LocalFailure::Starved => log::warn!(
                "{prefix}: a connection had neither a receive buffer nor a pipe until its idle \
                 timeout (raise buffers or the fd limit); both sides were reset{suffix}"
            ),
            LocalFailure::Stuck => log::error!(
                "{prefix}: a connect outlived its timeout; the client was reset{suffix}"
            ),
        }
    }

    fn arm_wake(&mut self) -> std::io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(self.wake_fd), libc::POLLIN as u32)
            .build()
            .user_data(token(Op::Wake, 0));
        self.io.push(&entry)
    }

    fn on_wake(&mut self) -> std::io::Result<()> {
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from this worker's eventfd,
        // owned by `self.global`, which lives as long as the worker.
        unsafe { libc::read(self.wake_fd, (&mut value as *mut u64).cast(), 8) };
        self.take_commands()?;
        self.resume_held()?;
        self.serve_queues()?;
        if !self.finished() {
            self.arm_wake()?;
        }
        Ok(())
    }

    /// Applies every command waiting, in order, acknowledging each.
    fn take_commands(&mut self) -> std::io::Result<()> {
        while let Ok((seq, command)) = self.commands.receiver.try_recv() {
            self.apply(command)?;
            let ack = Ack {
                worker: self.id,
                seq,
                generation: self.generation,
            };
            // The control plane may have stopped waiting: nothing to do.
            let _ = self.commands.acks.send(ack);
        }
        Ok(())
    }

    fn apply(&mut self, command: Command) -> std::io::Result<()> {
        match command {
            Command::Publish(snapshot) => self.publish(&snapshot),
            Command::AddListener {
                id,
                frontend,
                socket,
            } => {
                self.listeners.insert(Listener {
                    id,
                    frontend,
                    view: None,
                    socket: Some(socket),
                    armed: None,
                    cancelling: false,
                    held: false,
                    backlogged: false,
                    removed: false,
                });
                Ok(())
            }
            Command::RemoveListener { id, retire } => {
                if let Some((shared, grace)) = retire {
                    self.retired.push((shared, self.now + grace));
                }
                let found = self.listeners.iter().find(|(_, l)| l.id == id);
                match found.map(|(index, _)| index) {
                    Some(index) => self.remove_listener(index),
                    None => Ok(()),
                }
            }
            Command::CloseBackend(backend) => self.close_backend(&backend),
            Command::Drain => self.drain(),
            Command::Stop => self.stop(),
        }
    }

    /// New sessions start from the new snapshot; listeners of frontends it
    /// has start accepting.
    fn publish(&mut self, snapshot: &Arc<Snapshot>) -> std::io::Result<()> {
        self.generation = snapshot.generation;
        let views: HashMap<&str, Rc<View>> = snapshot
            .frontends
            .iter()
            .map(|f| (f.name(), Rc::new(View::new(f))))
            .collect();
        let mut arm = Vec::new();
        for (index, listener) in self.listeners.iter_mut() {
            // A listener whose frontend left the snapshot keeps its view
            // until its removal, which follows.
            if let Some(view) = views.get(listener.frontend.as_str()) {
                listener.view = Some(Rc::clone(view));
                arm.push(index);
            }
        }
        for index in arm {
            self.serve_listener(index)?;
        }
        self.requeue(&views)
    }

    /// Queued connections wait on for their frontend's new backend set
    /// (nothing of the old one is in flight for them); those of a frontend
    /// the snapshot no longer has are reset.
    fn requeue(&mut self, views: &HashMap<&str, Rc<View>>) -> std::io::Result<()> {
        for key in self.queues.keys() {
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            let shared = &session.view.snap.shared;
            let new = views.values().find(|v| Arc::ptr_eq(&v.snap.shared, shared));
            match (new, &mut session.stage) {
                (Some(view), Stage::Queued(queued)) => {
                    // The route's index is the old snapshot's: the new one
                    // may order, match or keep its routes differently.
                    // Route again by the name the client asked for.
                    session.route = stages::route_for(&view.snap, session.server_name.as_deref());
                    session.view = Rc::clone(view);
                    queued.connecting.tried = Tried::default();
                }
                (None, Stage::Queued(_)) => {
                    session
                        .conn
                        .close(key, End::FrontendRemoved, &mut self.io)?;
                    self.free_if_finished(key);
                }
                _ => {}
            }
        }
        // A new snapshot may have room where the old one had none.
        self.serve_queued = true;
        Ok(())
    }

    /// Whatever is armed ends and goes through serve_listener, which then
    /// takes the queued clients and closes it; an idle listener goes now.
    fn remove_listener(&mut self, index: usize) -> std::io::Result<()> {
        self.listeners[index].removed = true;
        self.cancel_accept(index)?;
        self.serve_listener(index)
    }

    /// Resets the sessions on a backend (those still connecting to it too:
    /// the operator wants nothing more sent there).
    fn close_backend(&mut self, backend: &Arc<BackendShared>) -> std::io::Result<()> {
        let keys: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.backend
                    .is_some_and(|i| std::ptr::eq(s.view.backend(i), Arc::as_ptr(backend)))
            })
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            self.sessions[key]
                .conn
                .close(key, End::BackendClosed, &mut self.io)?;
            self.free_if_finished(key);
        }
        Ok(())
    }

    /// Stop taking new clients (once those already queued are served)
    /// and let connections finish.
    fn drain(&mut self) -> std::io::Result<()> {
        if self.draining {
            return Ok(());
        }
        self.draining = true;
        self.end_listeners()
    }

    /// Whatever is armed ends and goes through serve_listener, which now
    /// drains or closes; an idle listener goes now.
    fn end_listeners(&mut self) -> std::io::Result<()> {
        let indexes: Vec<usize> = self.listeners.iter().map(|(index, _)| index).collect();
        for index in indexes {
            self.cancel_accept(index)?;
            self.serve_listener(index)?;
        }
        Ok(())
    }

    /// Stop accepting and close every connection. The flag goes first, so
    /// that closing the listeners takes no queued client only to reset it.
    fn stop(&mut self) -> std::io::Result<()> {
        if self.stopping {
            return Ok(());
        }
        self.stopping = true;
        self.draining = true;
        self.end_listeners()?;
        let keys: Vec<usize> = self.sessions.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.sessions[key]
                .conn
                .close(key, End::Stopped, &mut self.io)?;
            self.free_if_finished(key);
        }
        Ok(())
    }

    fn arm_tick(&mut self) -> std::io::Result<()> {
        let entry = opcode::Timeout::new(&self.tick)
            .build()
            .user_data(token(Op::Tick, 0));
        self.io.push(&entry)
    }

    /// Closes connections idle too long, those on a backend marked down
    /// when the frontend asks for it, and those of a removed frontend past
    /// its drain time; adds the bytes moved since the last tick to the
    /// shared counters.
    fn on_tick(&mut self) -> std::io::Result<()> {
        // The net under the wake-ups between workers (and the way queued
        // connections see a backend come back or a limit raised).
        self.resume_held()?;
        self.serve_queues()?;
        self.count_overflows();
        let now = self.now;
        let mut sweep = std::mem::take(&mut self.sweep);
        let mut dirty = std::mem::take(&mut self.dirty);
        for (key, session) in self.sessions.iter_mut() {
            if let (Stage::Relay, Some(index)) = (&session.stage, session.backend) {
                let [up, down] = session.conn.take_uncounted();
                if up | down != 0 {
                    let view = &session.view;
                    let mut bytes = view.bytes.borrow_mut();
                    bytes[index][0] += up;
                    bytes[index][1] += down;
                    if !view.dirty.replace(true) {
                        dirty.push(Rc::clone(view));
                    }
                }
            }
            if let Some(action) = sweep_action(session, &self.retired, now) {
                sweep.push((key, action));
            }
        }
        for view in dirty.drain(..) {
            view.flush_bytes();
        }
        self.dirty = dirty;
        for (key, action) in sweep.drain(..) {
            let (conn, io) = (&mut self.sessions[key].conn, &mut self.io);
            match action {
                Sweep::Free => {}
                Sweep::Close(end) => conn.close(key, end, io)?,
                Sweep::Fail(what) => conn.fail(key, what, 0, io)?,
                Sweep::RetryPipe => conn.retry_pipe(key, io)?,
                Sweep::Connect => self.connect_next(key)?,
                Sweep::Refuse(why) => self.refuse_header(key, why)?,
                Sweep::HelloLate => self.refuse_hello(key, crate::hello::Refusal::Timeout)?,
                Sweep::HandshakeLate => self.refuse_handshake(key, crate::tls::Failure::Timeout)?,
            }
            self.free_if_finished(key);
        }
        self.sweep = sweep;
        self.retired.retain(|(_, deadline)| *deadline > now);
        if !self.finished() {
            self.arm_tick()?;
        }
        Ok(())
    }
}

impl Worker {
    /// Publishes the completions the kernel dropped since last time.
    fn count_overflows(&mut self) {
        let dropped = self.io.ring.completion().overflow();
        let new = dropped.wrapping_sub(self.cq_dropped);
        if new > 0 {
            self.cq_dropped = dropped;
            self.global.cq_dropped.fetch_add(u64::from(new), Relaxed);
        }
    }
}

/// What the tick does to one connection, if anything.
fn sweep_action(
    session: &Session,
    retired: &[(Arc<FrontendShared>, Instant)],
    now: Instant,
) -> Option<Sweep> {
    let conn = &session.conn;
    if conn.is_finished() {
        // Waiting for queued bytes before passing a reset on.
        return Some(Sweep::Free);
    }
    let shared = &session.view.snap.shared;
    if conn.phase != Phase::Closing
        && retired
            .iter()
            .any(|(r, deadline)| Arc::ptr_eq(r, shared) && now >= *deadline)
    {
        return Some(Sweep::Close(End::FrontendRemoved));
    }
    if let Stage::Header(read) = &session.stage {
        let late = conn.phase != Phase::Closing && now >= read.deadline;
        return late.then_some(Sweep::Refuse(HeaderRefusal::Timeout));
    }
    match &session.stage {
        _ if conn.phase != Phase::Connecting => {}
        Stage::Queued(queued) => {
            let expired = now >= queued.since + session.view.timeout_queue;
            return expired.then_some(Sweep::Close(End::QueueTimeout));
        }
        Stage::Connect(Connecting {
            retry_at: Some(at), ..
        }) => return (now >= *at).then_some(Sweep::Connect),
        _ => {}
    }
    let idle = now.saturating_duration_since(conn.last_active);
    let config = &session.view.snap.config;
    if let Stage::Hello(_) = session.stage {
        // Counted from accept, not from the last byte: a client trickling
        // its hello a byte at a time must not hold the slot forever.
        let late = now.saturating_duration_since(conn.started) >= config.tls.client_hello_timeout;
        return (conn.phase != Phase::Closing && late).then_some(Sweep::HelloLate);
    }
    if let (Stage::Handshake, Some(server)) = (&session.stage, &config.tls.server) {
        let late = now.saturating_duration_since(conn.started) >= server.options.handshake_timeout;
        return (conn.phase != Phase::Closing && late).then_some(Sweep::HandshakeLate);
    }
    match conn.phase {
        // No backend socket yet: out of fds when it was tried.
        Phase::Connecting if conn.backend < 0 && idle > config.connect_timeout => {
            Some(Sweep::Close(End::LocalError))
        }
        Phase::Connecting if conn.backend < 0 => Some(Sweep::Connect),
        // The linked timeout ends every connect; this is the net under it,
        // should the kernel ever not deliver it.
        Phase::Connecting => (idle > config.connect_timeout + Duration::from_secs(1))
            .then_some(Sweep::Fail(LocalFailure::Stuck)),
        Phase::Closing => None,
        // Idle only for want of a buffer or pipe is ringlb's failure, and a
        // clean end would hide it.
        Phase::Relaying if idle >= config.idle_timeout && conn.starved() => {
            Some(Sweep::Fail(LocalFailure::Starved))
        }
        Phase::Relaying if idle >= config.idle_timeout => Some(Sweep::Close(End::IdleTimeout)),
        Phase::Relaying if let Some(end) = fin_timeout(session, config, idle) => {
            Some(Sweep::Close(end))
        }
        Phase::Relaying
            if config.on_down == OnDown::Shutdown
                && session.relaying_to().is_some_and(|b| !b.is_up()) =>
        {
            Some(Sweep::Close(End::BackendDown))
        }
        Phase::Relaying if conn.wants_pipe() => Some(Sweep::RetryPipe),
        Phase::Relaying => None,
    }
}

/// A half-closed connection idle past its fin timeout: the client's once
/// the backend's end reached it, the backend's once the client's did. A
/// terminated TLS connection passes ends on in its own relay, which says
/// when it did.
fn fin_timeout(
    session: &Session,
    config: &crate::config::FrontendConfig,
    idle: Duration,
) -> Option<End> {
    let edge = &config.edge;
    if edge.client_fin_timeout.is_none() && edge.server_fin_timeout.is_none() {
        return None;
    }
    let ended = |dir: usize| match &session.tls {
        Some(tls) => tls.half_closed(dir),
        None => session.conn.ended(dir),
    };
    let past = |limit: Option<Duration>| limit.is_some_and(|l| idle >= l);
    if ended(DOWNSTREAM) && past(edge.client_fin_timeout) {
        return Some(End::ClientFinTimeout);
    }
    (ended(UPSTREAM) && past(edge.server_fin_timeout)).then_some(End::ServerFinTimeout)
}

/// A backend socket; when fds run out, the pipes kept idle for splicing
/// are given up first, since a connection needs its socket more.
fn backend_socket(ipv6: bool, pipes: &mut PipePool) -> std::io::Result<RawFd> {
    match uring::tcp_socket(ipv6) {
        Err(e)
            if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                && pipes.release_idle() > 0 =>
        {
            uring::tcp_socket(ipv6)
        }
        other => other,
    }
}

/// The pipes a worker may have open at once: its part of the fd budget's
/// pipes, so pipes never take the fds promised to connections.
fn pipe_share(global: &Global) -> usize {
    (global.pipes / global.workers().max(1) as u64) as usize
}

fn dir_of(op: Op) -> usize {
    match op {
        Op::Recv1 | Op::Send1 | Op::PollIn1 | Op::PollOut1 => DOWNSTREAM,
        _ => UPSTREAM,
    }
}

fn log_connection(session: &Session, now: Instant) {
    let conn = &session.conn;
    let client = conn
        .client_addr
        .map_or_else(|| "?".to_string(), |a| a.to_string());
    let backend = session.relaying_to().map_or("-", |b| b.name.as_str());
    log::debug!(
        "{} {client} -> {backend}: {} bytes up, {} bytes down, {:.3}s, {}",
        session.view.name(),
        conn.dirs[UPSTREAM].bytes,
        conn.dirs[DOWNSTREAM].bytes,
        now.saturating_duration_since(conn.started).as_secs_f64(),
        conn.end.map_or("?", End::describe),
    );
}

fn access_entry(session: &Session, now: Instant) -> access::Entry<'_> {
    let conn = &session.conn;
    access::Entry {
        client: conn.client_addr,
        frontend: session.view.name(),
        backend: session.relaying_to().map(|b| b.name.as_str()),
        connect_ms: session.connected_after.map(access::ms),
        duration_ms: access::ms(now.saturating_duration_since(conn.started)),
        bytes_up: conn.dirs[UPSTREAM].bytes,
        bytes_down: conn.dirs[DOWNSTREAM].bytes,
        end: access::end_code(conn.end),
        route: stages::route_name(session),
        sni: session.server_name.as_deref(),
    }
}

/// The address a client connected to (ours): the destination of a PROXY
/// header.
fn local_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: the fd is the connection's open client socket, borrowed for
    // this call only.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).local_addr().ok()?.as_socket()
}

fn peer_addr(fd: RawFd) -> Option<std::net::SocketAddr> {
    // SAFETY: the fd is the connection's open client socket, borrowed for
    // this call only.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
}
