//! The per-core event loop: one thread, one io_uring, one SO_REUSEPORT
//! listener per frontend, one slab of connections. Connections never move
//! between workers, so nothing here is shared but the pool's atomics and
//! the control flags.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types};
use slab::Slab;
use socket2::{SockAddr, Socket};

use crate::config::OnDown;
use crate::logging::RateLimit;
use crate::pool::ConnectFailure;
use crate::relay::{Conn, DOWNSTREAM, End, Event, LocalFailure, Phase, UPSTREAM};
use crate::server::{Control, Frontend};
use crate::uring::{self, BufRing, Io, Op, PipePool, token, untoken};

/// Submission queue size; the completion queue is four times larger.
const RING_ENTRIES: u32 = 1024;
/// Size of each receive buffer (their number is the `buffers` setting).
/// 16 KiB is HAProxy's bufsize; a receive that fills one switches its
/// direction to splicing.
const BUFFER_SIZE: usize = 16 * 1024;
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

/// A frontend as one worker sees it.
struct Listener {
    shared: Arc<Frontend>,
    /// `None` once the worker stopped accepting (drain).
    socket: Option<Socket>,
    /// A multishot accept is in flight.
    accepting: bool,
    /// Kept here because the kernel reads it when the connect is submitted;
    /// the vector of listeners never grows, so the address is stable.
    connect_timeout: types::Timespec,
    /// Addresses in the form connect(2) takes, built once.
    backend_addrs: Vec<SockAddr>,
    /// Bytes moved to and from each backend since the last tick: added to
    /// the shared counters once per tick, not once per message.
    bytes: Vec<[u64; 2]>,
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
}

/// One rate limit per kind of warning the data path can repeat.
struct Warnings {
    local: [RateLimit; LocalFailure::ALL.len()],
    pipe: RateLimit,
}

impl Warnings {
    fn new() -> Warnings {
        Warnings {
            local: std::array::from_fn(|_| RateLimit::new(WARN_PERIOD)),
            pipe: RateLimit::new(WARN_PERIOD),
        }
    }
}

pub struct Worker {
    id: usize,
    io: Io,
    conns: Slab<Conn>,
    listeners: Vec<Listener>,
    control: Arc<Control>,
    /// Written by the control plane to wake this loop when a flag changes.
    wake_fd: RawFd,
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
}

impl Worker {
    pub fn new(
        id: usize,
        frontends: &[Arc<Frontend>],
        sockets: Vec<Socket>,
        control: Arc<Control>,
        wake_fd: RawFd,
        buffers: u32,
    ) -> std::io::Result<Worker> {
        let ring = uring::new_ring(RING_ENTRIES)?;
        let count = u16::try_from(buffers)
            .map_err(|_| std::io::Error::other(format!("{buffers} buffers is above the limit")))?;
        let bufs = BufRing::new(&ring, count, BUFFER_SIZE)?;
        let listeners = frontends
            .iter()
            .zip(sockets)
            .map(|(frontend, socket)| Listener {
                connect_timeout: types::Timespec::from(frontend.config.connect_timeout),
                backend_addrs: frontend
                    .config
                    .backends
                    .iter()
                    .map(|b| SockAddr::from(b.addr))
                    .collect(),
                bytes: vec![[0; 2]; frontend.config.backends.len()],
                shared: Arc::clone(frontend),
                socket: Some(socket),
                accepting: false,
            })
            .collect();
        Ok(Worker {
            id,
            io: Io {
                ring,
                bufs,
                pipes: PipePool::new(PIPES_KEPT, PIPE_SIZE),
                backlog: Vec::new(),
            },
            conns: Slab::with_capacity(1024),
            listeners,
            control,
            wake_fd,
            tick: types::Timespec::from(TICK),
            pause: types::Timespec::from(ACCEPT_PAUSE),
            now: Instant::now(),
            draining: false,
            stopping: false,
            warnings: Warnings::new(),
            batch: Vec::with_capacity(RING_ENTRIES as usize * 4),
            sweep: Vec::new(),
        })
    }

    pub fn run(mut self) -> std::io::Result<()> {
        let result = self.event_loop();
        if result.is_err() {
            // Operations may still be in flight (a send reading a ring
            // buffer): never free what the kernel may still touch. The
            // process is going down anyway.
            std::mem::forget(self);
        }
        result
    }

    fn event_loop(&mut self) -> std::io::Result<()> {
        for index in 0..self.listeners.len() {
            self.arm_accept(index)?;
        }
        self.arm_wake()?;
        self.arm_tick()?;
        self.apply_control()?;
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
            for &(user_data, res, flags) in &batch {
                self.dispatch(user_data, res, flags)?;
            }
            batch.clear();
            self.batch = batch;
        }
        log::debug!("worker {} stopped", self.id);
        Ok(())
    }

    fn finished(&self) -> bool {
        (self.draining || self.stopping)
            && self.conns.is_empty()
            && !self.listeners.iter().any(|l| l.accepting)
    }

    fn dispatch(&mut self, user_data: u64, res: i32, flags: u32) -> std::io::Result<()> {
        let Some((op, slot)) = untoken(user_data) else {
            return Ok(());
        };
        match op {
            Op::Accept => self.on_accept(slot, res, flags),
            Op::AcceptPause => self.close_or_rearm(slot),
            Op::Wake => self.on_wake(),
            Op::Tick => self.on_tick(),
            Op::Ignore => Ok(()),
            _ => self.on_conn_event(op, slot, res, flags),
        }
    }

    fn on_conn_event(&mut self, op: Op, key: usize, res: i32, flags: u32) -> std::io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else {
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
        let frontend = conn.frontend;
        let io = &mut self.io;
        match op {
            Op::Connect => return self.on_connect(key, res),
            Op::ConnectTimeout | Op::Cancel => conn.inflight -= 1,
            Op::Recv0 | Op::Recv1 => {
                conn.last_active = self.now;
                let event = conn.on_recv(key, dir_of(op), res, flags, io)?;
                self.note(frontend, event);
            }
            Op::Send0 | Op::Send1 => {
                conn.last_active = self.now;
                conn.on_send(key, dir_of(op), res, io)?;
            }
            _ => {
                conn.last_active = self.now;
                let event = conn.on_poll(key, dir_of(op), res, io)?;
                self.note(frontend, event);
            }
        }
        self.free_if_finished(key);
        Ok(())
    }

    /// Counts (and logs, rate-limited) what a relay step reports.
    fn note(&mut self, frontend: usize, event: Event) {
        let shared = &self.listeners[frontend].shared;
        match event {
            Event::None => {}
            Event::BuffersExhausted => {
                shared.stats.buffers_exhausted.fetch_add(1, Relaxed);
            }
            Event::PipeFallback(errno) => {
                shared.stats.pipe_fallbacks.fetch_add(1, Relaxed);
                let Some(held_back) = self.warnings.pipe.allow(self.now) else {
                    return;
                };
                log::warn!(
                    "worker {}: frontend {}: cannot create a splice pipe ({}); copying through \
                     buffers instead (raise the fd limit, or see fs.pipe-user-pages-*){}",
                    self.id,
                    shared.config.name,
                    std::io::Error::from_raw_os_error(errno),
                    self.warnings.pipe.suffix(held_back)
                );
            }
        }
    }

    fn arm_accept(&mut self, index: usize) -> std::io::Result<()> {
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
        listener.accepting = true;
        self.io.push(&entry)
    }

    fn on_accept(&mut self, index: usize, res: i32, flags: u32) -> std::io::Result<()> {
        if res >= 0 {
            self.admit(index, res)?;
        }
        if cqueue::more(flags) {
            return Ok(());
        }
        self.listeners[index].accepting = false;
        if res >= 0 || res == -libc::ECANCELED || self.draining {
            return self.close_or_rearm(index);
        }
        // Ended by an error (out of fds, memory, or refused by a security
        // policy): pause before re-arming, so a lasting error never spins.
        log::warn!(
            "worker {}: accept on {} failed: {}; retrying in {ACCEPT_PAUSE:?}",
            self.id,
            self.listeners[index].shared.config.name,
            std::io::Error::from_raw_os_error(-res)
        );
        let pause = opcode::Timeout::new(&self.pause)
            .build()
            .user_data(token(Op::AcceptPause, index));
        self.io.push(&pause)
    }

    /// A multishot accept ended: re-arm it, or when draining close the
    /// listener, so the kernel sends new clients to another instance that
    /// shares the port (or refuses them).
    fn close_or_rearm(&mut self, index: usize) -> std::io::Result<()> {
        if !self.draining {
            return self.arm_accept(index);
        }
        self.take_queued_clients(index)?;
        self.listeners[index].socket = None;
        Ok(())
    }

    /// Closing a listener resets the clients waiting in its accept queue
    /// (unless net.ipv4.tcp_migrate_req hands them to another listener on
    /// the port): take them first, and serve them.
    fn take_queued_clients(&mut self, index: usize) -> std::io::Result<()> {
        let Some(socket) = &self.listeners[index].socket else {
            return Ok(());
        };
        if self.stopping || socket.set_nonblocking(true).is_err() {
            return Ok(());
        }
        let listener = socket.as_raw_fd();
        loop {
            // SAFETY: plain syscall on our non-blocking listening socket; the
            // new fd is owned by the connection admit() makes.
            let fd = unsafe {
                libc::accept4(
                    listener,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return Ok(());
            }
            self.admit(index, fd)?;
        }
    }

    /// A new client: count it, enforce maxconn, pick a backend.
    fn admit(&mut self, index: usize, fd: RawFd) -> std::io::Result<()> {
        let frontend = &self.listeners[index].shared;
        // A client accepted while draining (the accept completed before its
        // cancel did) is served like any other: closing it would drop it.
        // Only a hard stop turns it away.
        if self.stopping {
            uring::close(fd);
            return Ok(());
        }
        frontend.stats.accepted.fetch_add(1, Relaxed);
        let active = frontend.stats.active.fetch_add(1, Relaxed);
        if frontend
            .config
            .maxconn
            .is_some_and(|max| active >= u64::from(max))
        {
            frontend.stats.active.fetch_sub(1, Relaxed);
            frontend.stats.rejected_maxconn.fetch_add(1, Relaxed);
            uring::close(fd);
            return Ok(());
        }
        let mut conn = Conn::new(index, fd, self.now);
        if log::log_enabled!(log::Level::Debug) {
            conn.client_addr = peer_addr(fd);
        }
        let key = self.conns.insert(conn);
        self.connect_next(key)
    }

    /// Connects to the next backend this connection has not tried, with the
    /// frontend's connect timeout linked to the connect.
    fn connect_next(&mut self, key: usize) -> std::io::Result<()> {
        let conn = &mut self.conns[key];
        let listener = &self.listeners[conn.frontend];
        let Some(index) = listener.shared.pool.select(conn.tried) else {
            listener.shared.stats.no_backend.fetch_add(1, Relaxed);
            conn.close(key, End::NoBackend, &mut self.io)?;
            self.free_if_finished(key);
            return Ok(());
        };
        let addr = &listener.backend_addrs[index];
        let fd = match backend_socket(addr.is_ipv6(), &mut self.io.pipes) {
            Ok(fd) => fd,
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                conn.local = Some((LocalFailure::BackendSocket, errno));
                if !matches!(
                    errno,
                    libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS
                ) {
                    conn.close(key, End::LocalError, &mut self.io)?;
                    self.free_if_finished(key);
                }
                // Out of fds or memory, which ending connections give back:
                // the client waits and the tick tries again, up to the
                // connect timeout; then it is reset.
                return Ok(());
            }
        };
        conn.local = None;
        conn.tried = conn.tried.with(index);
        uring::set_nodelay(fd);
        conn.backend = fd;
        conn.backend_index = index;
        let connect = opcode::Connect::new(types::Fd(fd), addr.as_ptr().cast(), addr.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(token(Op::Connect, key));
        let timeout = opcode::LinkTimeout::new(&listener.connect_timeout)
            .build()
            .user_data(token(Op::ConnectTimeout, key));
        conn.last_active = self.now;
        conn.submit_linked(&mut self.io, connect, timeout)
    }

    fn on_connect(&mut self, key: usize, res: i32) -> std::io::Result<()> {
        let conn = &mut self.conns[key];
        conn.inflight -= 1;
        if conn.phase == Phase::Closing {
            self.free_if_finished(key);
            return Ok(());
        }
        let backend = &self.listeners[conn.frontend].shared.pool.backends[conn.backend_index];
        if res == 0 {
            backend.report_connect_success();
            conn.connected = true;
            backend.stats.connections.fetch_add(1, Relaxed);
            backend.stats.active.fetch_add(1, Relaxed);
            return conn.start_relay(key, &mut self.io);
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
        backend.report_connect_failure(failure);
        uring::close(conn.backend);
        conn.backend = -1;
        self.connect_next(key)
    }

    fn free_if_finished(&mut self, key: usize) {
        let now = self.now;
        if !self
            .conns
            .get(key)
            .is_some_and(|c| c.is_finished() && !c.flushing(now))
        {
            return;
        }
        let mut conn = self.conns.remove(key);
        let frontend = &self.listeners[conn.frontend].shared;
        frontend.stats.active.fetch_sub(1, Relaxed);
        if conn.connected {
            let stats = &frontend.pool.backends[conn.backend_index].stats;
            stats.active.fetch_sub(1, Relaxed);
            let [up, down] = conn.take_uncounted();
            stats.bytes_to_backend.fetch_add(up, Relaxed);
            stats.bytes_from_backend.fetch_add(down, Relaxed);
        }
        if conn.end == Some(End::LocalError) {
            frontend.stats.local_errors.fetch_add(1, Relaxed);
        }
        if log::log_enabled!(log::Level::Debug) {
            log_connection(frontend, &conn, self.now);
        }
        if let Some((what, errno)) = conn.local {
            self.warn_local(conn.frontend, what, errno);
        }
        conn.release(&mut self.io);
    }

    /// One line per kind and period: when fds or ports run out, every
    /// connection fails the same way.
    fn warn_local(&mut self, frontend: usize, what: LocalFailure, errno: i32) {
        let limit = &mut self.warnings.local[what as usize];
        let Some(held_back) = limit.allow(self.now) else {
            return;
        };
        let suffix = limit.suffix(held_back);
        let err = std::io::Error::from_raw_os_error(errno);
        let prefix = format!(
            "worker {}: frontend {}",
            self.id, self.listeners[frontend].shared.config.name
        );
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
        // SAFETY: reads 8 bytes into a local u64 from the eventfd the
        // control plane keeps open until this worker has stopped.
        unsafe { libc::read(self.wake_fd, (&mut value as *mut u64).cast(), 8) };
        self.apply_control()?;
        if !self.finished() {
            self.arm_wake()?;
        }
        Ok(())
    }

    /// Drain: stop accepting and let connections finish. Stop: close them.
    fn apply_control(&mut self) -> std::io::Result<()> {
        if self.control.draining.load(Relaxed) && !self.draining {
            self.draining = true;
            for index in 0..self.listeners.len() {
                if self.listeners[index].accepting {
                    let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(token(
                        Op::Accept,
                        index,
                    )))
                    .build()
                    .user_data(token(Op::Ignore, 0));
                    self.io.push(&cancel)?;
                } else {
                    self.listeners[index].socket = None;
                }
            }
        }
        if self.control.stopping.load(Relaxed) && !self.stopping {
            self.stopping = true;
            let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
            for key in keys {
                self.conns[key].close(key, End::Stopped, &mut self.io)?;
                self.free_if_finished(key);
            }
        }
        Ok(())
    }

    fn arm_tick(&mut self) -> std::io::Result<()> {
        let entry = opcode::Timeout::new(&self.tick)
            .build()
            .user_data(token(Op::Tick, 0));
        self.io.push(&entry)
    }

    /// Closes connections idle too long, and those on a backend marked down
    /// when the frontend asks for it; adds the bytes moved since the last
    /// tick to the shared counters.
    fn on_tick(&mut self) -> std::io::Result<()> {
        self.apply_control()?;
        let mut sweep = std::mem::take(&mut self.sweep);
        for (key, conn) in self.conns.iter_mut() {
            let listener = &mut self.listeners[conn.frontend];
            if conn.connected {
                let [up, down] = conn.take_uncounted();
                let moved = &mut listener.bytes[conn.backend_index];
                moved[0] += up;
                moved[1] += down;
            }
            if let Some(action) = sweep_action(&listener.shared, conn, self.now) {
                sweep.push((key, action));
            }
        }
        for listener in &mut self.listeners {
            flush_bytes(listener);
        }
        for (key, action) in sweep.drain(..) {
            let (conn, io) = (&mut self.conns[key], &mut self.io);
            match action {
                Sweep::Free => {}
                Sweep::Close(end) => conn.close(key, end, io)?,
                Sweep::Fail(what) => conn.fail(key, what, 0, io)?,
                Sweep::RetryPipe => conn.retry_pipe(key, io)?,
                Sweep::Connect => self.connect_next(key)?,
            }
            self.free_if_finished(key);
        }
        self.sweep = sweep;
        if !self.finished() {
            self.arm_tick()?;
        }
        Ok(())
    }
}

/// What the tick does to one connection, if anything.
fn sweep_action(frontend: &Frontend, conn: &Conn, now: Instant) -> Option<Sweep> {
    if conn.is_finished() {
        // Waiting for queued bytes before passing a reset on.
        return Some(Sweep::Free);
    }
    let idle = now.saturating_duration_since(conn.last_active);
    let config = &frontend.config;
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
        Phase::Relaying
            if config.on_down == OnDown::Shutdown
                && !frontend.pool.backends[conn.backend_index].is_up() =>
        {
            Some(Sweep::Close(End::BackendDown))
        }
        Phase::Relaying if conn.wants_pipe() => Some(Sweep::RetryPipe),
        Phase::Relaying => None,
    }
}

/// Adds one tick's bytes to the backends' shared counters.
fn flush_bytes(listener: &mut Listener) {
    for (backend, moved) in listener
        .shared
        .pool
        .backends
        .iter()
        .zip(&mut listener.bytes)
    {
        if *moved != [0, 0] {
            let [up, down] = std::mem::take(moved);
            backend.stats.bytes_to_backend.fetch_add(up, Relaxed);
            backend.stats.bytes_from_backend.fetch_add(down, Relaxed);
        }
    }
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

fn dir_of(op: Op) -> usize {
    match op {
        Op::Recv1 | Op::Send1 | Op::PollIn1 | Op::PollOut1 => DOWNSTREAM,
        _ => UPSTREAM,
    }
}

fn log_connection(frontend: &Frontend, conn: &Conn, now: Instant) {
    let client = conn
        .client_addr
        .map_or_else(|| "?".to_string(), |a| a.to_string());
    let backend = if conn.connected {
        frontend.pool.backends[conn.backend_index].name.as_str()
    } else {
        "-"
    };
    log::debug!(
        "{} {client} -> {backend}: {} bytes up, {} bytes down, {:.3}s, {}",
        frontend.config.name,
        conn.dirs[UPSTREAM].bytes,
        conn.dirs[DOWNSTREAM].bytes,
        now.saturating_duration_since(conn.started).as_secs_f64(),
        conn.end.map_or("?", End::describe),
    );
}

fn peer_addr(fd: RawFd) -> Option<std::net::SocketAddr> {
    // SAFETY: the fd is the connection's open client socket, borrowed for
    // this call only.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
}
