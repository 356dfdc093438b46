//! The relay: one client connection paired with one backend connection,
//! bytes moved both ways until both sides are done.
//!
//! Each direction runs on its own, in one of two modes chosen by traffic,
//! as HAProxy's `splice-auto` does:
//! - **copy** (small messages): an io_uring receive into a buffer the kernel
//!   picks from the worker's buffer ring when data arrives, then an io_uring
//!   send. No syscall of our own; an idle connection holds no buffer.
//! - **splice** (bulk): once a receive fills a whole buffer, the direction
//!   waits for readiness with a poll and moves bytes with non-blocking
//!   splice(2) through a pipe, never through user memory. design.md, fact 2:
//!   never IORING_OP_SPLICE on sockets (it parks a kernel thread per op).
//!   A readiness round that moves less than a buffer goes back to copying.
//!
//! End of stream on one side is passed on as `shutdown(SHUT_WR)` on the
//! other once every byte before it is delivered; a reset on one side is
//! passed on as a reset (close with zero linger) on the other.
//!
//! A local failure never becomes a clean end of stream: a direction that
//! cannot get a pipe keeps copying through ring buffers, and a connection
//! that cannot go on is reset on both sides, so neither peer mistakes a
//! prefix for the whole stream.

use std::os::fd::RawFd;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types};

use crate::uring::{self, Io, Op, Pipe, token};

/// Whether data is probably waiting when a read is armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    Maybe,
    Unlikely,
}

/// Client to backend, and backend to client.
pub const UPSTREAM: usize = 0;
pub const DOWNSTREAM: usize = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Relaying,
    /// Cancels are out; the connection is freed when nothing is in flight.
    Closing,
}

/// How a connection ended, for the log line and the reset decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides finished their streams.
    Done,
    ClientReset,
    BackendReset,
    IdleTimeout,
    /// The backend ended its stream and the client then idled past
    /// `timeout-client-fin`.
    ClientFinTimeout,
    /// The client ended its stream and the backend then idled past
    /// `timeout-server-fin`.
    ServerFinTimeout,
    /// Every backend was down or refused.
    NoBackend,
    /// Its backend was marked down and the frontend says `on-down shutdown`.
    BackendDown,
    /// The balancer is stopping.
    Stopped,
    /// The operator closed its backend's connections (a backend removed
    /// by a reload under `on-down = "shutdown"`).
    BackendClosed,
    /// Its frontend was removed by a reload and the drain timeout passed.
    FrontendRemoved,
    /// A local failure (out of fds, of memory); `Conn::local` says which.
    LocalError,
    /// accept-proxy: no valid PROXY header from a trusted peer in time.
    ProxyHeader,
    /// The client a PROXY header named is refused by the source ACL or a
    /// per-source limit.
    Refused,
    /// The client's TLS ClientHello was malformed, too large, late, or
    /// cut short: nothing was sent to a backend.
    HelloRefused,
    /// Every usable backend stayed at its maxconn for `timeout-queue`.
    QueueTimeout,
    /// The client left while its connection waited in the queue.
    ClientAborted,
    /// The TLS handshake with the client failed (after its alert) or did
    /// not complete in time (reset).
    HandshakeFailed,
}

/// What failed locally, for the worker's rate-limited log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalFailure {
    /// socket(2) for the backend side.
    BackendSocket,
    /// connect(2) failed for a local reason (ports, memory).
    Connect,
    /// An io_uring operation or splice(2) of the relay failed for a reason
    /// that is not the peer's.
    Relay,
    /// A direction had neither a receive buffer nor a pipe until the idle
    /// timeout.
    Starved,
    /// A connect outlived its timeout: the kernel never reported it.
    Stuck,
}

impl LocalFailure {
    pub const ALL: [LocalFailure; 5] = [
        LocalFailure::BackendSocket,
        LocalFailure::Connect,
        LocalFailure::Relay,
        LocalFailure::Starved,
        LocalFailure::Stuck,
    ];
}

/// Something a relay step did that the worker counts or logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    None,
    /// A receive found every ring buffer held.
    BuffersExhausted,
    /// No pipe could be made (the errno): the direction keeps copying.
    PipeFallback(i32),
}

impl End {
    pub fn describe(self) -> &'static str {
        match self {
            End::Done => "closed by both sides",
            End::ClientReset => "client reset",
            End::BackendReset => "backend reset",
            End::IdleTimeout => "idle timeout",
            End::ClientFinTimeout => "client-fin timeout (half-closed by the backend, idle)",
            End::ServerFinTimeout => "server-fin timeout (half-closed by the client, idle)",
            End::NoBackend => "no backend available",
            End::BackendDown => "backend marked down",
            End::Stopped => "balancer stopping",
            End::BackendClosed => "backend closed by the operator",
            End::FrontendRemoved => "frontend removed, drain timeout passed",
            End::LocalError => "local error",
            End::ProxyHeader => "refused: no valid PROXY header",
            End::Refused => "refused by the source ACL or a per-source limit",
            End::HelloRefused => "ClientHello refused",
            End::QueueTimeout => "queue timeout, every backend at its maxconn",
            End::ClientAborted => "client left while queued",
            End::HandshakeFailed => "TLS handshake failed",
        }
    }
}

/// Bytes received into a ring buffer and not yet fully sent.
#[derive(Clone, Copy, Debug)]
struct Held {
    bid: u16,
    sent: usize,
    len: usize,
}

#[derive(Debug, Default)]
pub struct Direction {
    held: Option<Held>,
    /// Present while the direction is in splice mode.
    pipe: Option<Pipe>,
    /// Bytes sitting in the pipe.
    in_pipe: usize,
    /// The last receive filled a whole buffer: the next read splices.
    bulk: bool,
    /// The source ended its stream.
    eof: bool,
    /// The end of stream was passed on: nothing more will move.
    done: bool,
    /// The source ended with a reset: once the pipe is flushed, the reset is
    /// passed on instead of an end of stream.
    source_reset: bool,
    /// A send to this direction's sink failed with the peer's reset. The
    /// kernel reports a reset once: the other direction, reading the same
    /// socket, may then see a plain end of stream, which must still be
    /// passed on as a reset, never as a clean end.
    sink_reset: bool,
    /// The last attempt to make a pipe failed: the direction copies, and
    /// tries a pipe again only after the worker's next tick, so a lasting
    /// shortage costs one failed pipe2(2) per tick, not one per buffer.
    no_pipe: bool,
    /// Neither a ring buffer nor a pipe was to be had: nothing is armed on
    /// this direction until the tick retries it.
    parked: bool,
    /// Bytes received from the source.
    pub bytes: u64,
    /// Of those, the bytes already added to the shared counters.
    pub counted: u64,
}

/// The sockets and relay state of one connection. What the connection is
/// routed by (its frontend snapshot, its backend, the backends it tried)
/// is the worker's business and lives next to it in the session.
pub struct Conn {
    pub client: RawFd,
    /// -1 until a backend socket exists.
    pub backend: RawFd,
    pub phase: Phase,
    pub dirs: [Direction; 2],
    /// Operations submitted and not yet completed. The fds and buffers they
    /// use stay alive until this is zero (design.md: cancelling is not
    /// completing).
    pub inflight: u32,
    pub last_active: Instant,
    pub started: Instant,
    pub end: Option<End>,
    /// Looked up at accept only when debug logging is on: by the time the
    /// connection is logged the peer may be gone.
    pub client_addr: Option<std::net::SocketAddr>,
    /// The socket that gets the reset passed on, once the bytes already
    /// queued to it are delivered (or the deadline passes).
    reset_to: Option<(RawFd, Instant)>,
    /// A stop cut the reset's flush short.
    flush_cut: bool,
    /// Why the connection ended with `End::LocalError`, and the errno.
    pub local: Option<(LocalFailure, i32)>,
}

/// IORING_RECVSEND_POLL_FIRST (the crate keeps its `sys` module private).
const RECVSEND_POLL_FIRST: u16 = 1;
/// How long a reset waits for the bytes already queued to the other peer.
const RESET_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Large enough that one splice moves what the pipe holds.
const SPLICE_LEN: usize = 1 << 20;
/// Most bytes one direction moves per turn before it yields to the event
/// loop: a bulk stream that never runs dry must not starve the other
/// connections of its worker (or its own other direction).
const SPLICE_BUDGET: usize = 1 << 20;

impl Conn {
    pub fn new(client: RawFd, now: Instant) -> Conn {
        Conn {
            client,
            backend: -1,
            phase: Phase::Connecting,
            dirs: [Direction::default(), Direction::default()],
            inflight: 0,
            last_active: now,
            started: now,
            end: None,
            client_addr: None,
            reset_to: None,
            flush_cut: false,
            local: None,
        }
    }

    fn source(&self, dir: usize) -> RawFd {
        if dir == UPSTREAM {
            self.client
        } else {
            self.backend
        }
    }

    fn sink(&self, dir: usize) -> RawFd {
        if dir == UPSTREAM {
            self.backend
        } else {
            self.client
        }
    }

    /// A failure reading a direction's source is that side's reset; a
    /// failure writing its sink is the other side's.
    fn reset_of_source(dir: usize) -> End {
        if dir == UPSTREAM {
            End::ClientReset
        } else {
            End::BackendReset
        }
    }

    fn reset_of_sink(dir: usize) -> End {
        Self::reset_of_source(1 - dir)
    }

    /// A direction's source failed with `errno`: a peer's reset is passed
    /// on, anything else is a local failure.
    fn source_failed(
        &mut self,
        key: usize,
        dir: usize,
        errno: i32,
        io: &mut Io,
    ) -> std::io::Result<()> {
        if peer_error(errno) {
            return self.close(key, Self::reset_of_source(dir), io);
        }
        self.fail(key, LocalFailure::Relay, errno, io)
    }

    /// Ends the connection for a local reason: both peers get a reset.
    pub fn fail(
        &mut self,
        key: usize,
        what: LocalFailure,
        errno: i32,
        io: &mut Io,
    ) -> std::io::Result<()> {
        if self.phase != Phase::Closing {
            self.local = Some((what, errno));
        }
        self.close(key, End::LocalError, io)
    }

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Closing && self.inflight == 0
    }

    pub fn submit(&mut self, io: &mut Io, entry: squeue::Entry) -> std::io::Result<()> {
        io.push(&entry)?;
        self.inflight += 1;
        Ok(())
    }

    /// Submits an operation and the timeout linked to it.
    pub fn submit_linked(
        &mut self,
        io: &mut Io,
        first: squeue::Entry,
        second: squeue::Entry,
    ) -> std::io::Result<()> {
        io.push_linked(&first, &second)?;
        self.inflight += 2;
        Ok(())
    }

    /// Waits, while the connection is queued, for the client to leave (a
    /// reset, or its end of stream). Data it sends meanwhile does not end
    /// the wait: it stays in the socket for the backend.
    pub fn watch_client(&mut self, key: usize, io: &mut Io) -> std::io::Result<()> {
        let entry = opcode::PollAdd::new(
            types::Fd(self.client),
            (libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) as u32,
        )
        .build()
        .user_data(token(Op::Watch, key));
        self.submit(io, entry)
    }

    /// Ends the watch of [`watch_client`](Conn::watch_client): the
    /// connection leaves the queue.
    pub fn unwatch_client(&mut self, key: usize, io: &mut Io) -> std::io::Result<()> {
        let cancel =
            opcode::AsyncCancel2::new(types::CancelBuilder::user_data(token(Op::Watch, key)))
                .build()
                .user_data(token(Op::Cancel, key));
        self.submit(io, cancel)
    }

    /// The backend answered the connect: start moving bytes both ways. The
    /// client may have sent already; the backend has not answered yet.
    pub fn start_relay(&mut self, key: usize, io: &mut Io) -> std::io::Result<()> {
        self.phase = Phase::Relaying;
        self.arm_read(key, UPSTREAM, Ready::Maybe, io)?;
        self.arm_read(key, DOWNSTREAM, Ready::Unlikely, io)
    }

    /// Waits for data on a direction's source. `Ready::Unlikely` (the
    /// source was just drained, as after each message of a request/response
    /// exchange) skips the receive attempt that would fail and arms the
    /// poll at once (IORING_RECVSEND_POLL_FIRST).
    pub fn arm_read(
        &mut self,
        key: usize,
        dir: usize,
        ready: Ready,
        io: &mut Io,
    ) -> std::io::Result<()> {
        log::trace!(
            "conn {key}: dir {dir} waits for data (bulk: {})",
            self.dirs[dir].bulk
        );
        let fd = types::Fd(self.source(dir));
        let entry = if self.dirs[dir].bulk {
            opcode::PollAdd::new(fd, libc::POLLIN as u32)
                .build()
                .user_data(token(Op::poll_in(dir), key))
        } else {
            let poll_first = if ready == Ready::Unlikely {
                RECVSEND_POLL_FIRST
            } else {
                0
            };
            opcode::Recv::new(fd, std::ptr::null_mut(), io.bufs.size() as u32)
                .ioprio(poll_first)
                .buf_group(uring::BUFFER_GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(token(Op::recv(dir), key))
        };
        self.submit(io, entry)
    }

    fn send_held(&mut self, key: usize, dir: usize, io: &mut Io) -> std::io::Result<()> {
        let Some(held) = self.dirs[dir].held else {
            return Ok(());
        };
        // SAFETY: held.sent < held.len <= buffer size, inside buffer `bid`,
        // which stays out of the ring until this send completes.
        let ptr = unsafe { io.bufs.ptr(held.bid).add(held.sent) };
        let entry = opcode::Send::new(
            types::Fd(self.sink(dir)),
            ptr,
            (held.len - held.sent) as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(token(Op::send(dir), key));
        self.submit(io, entry)
    }

    /// Handles a receive's completion.
    pub fn on_recv(
        &mut self,
        key: usize,
        dir: usize,
        res: i32,
        flags: u32,
        io: &mut Io,
    ) -> std::io::Result<Event> {
        self.inflight -= 1;
        // A receive from the buffer ring consumes a buffer even when it
        // returns no data (end of stream): whatever is not kept goes back.
        let bid = cqueue::buffer_select(flags);
        let keep = match bid {
            Some(bid) if res > 0 && self.phase != Phase::Closing => Some(bid),
            Some(bid) => {
                io.bufs.give_back(bid);
                None
            }
            None => None,
        };
        if self.phase == Phase::Closing {
            return Ok(Event::None);
        }
        match (res, keep) {
            (n, Some(bid)) => {
                let len = n as usize;
                let d = &mut self.dirs[dir];
                d.bytes += len as u64;
                d.bulk = len == io.bufs.size() && !d.no_pipe;
                d.held = Some(Held { bid, sent: 0, len });
                self.send_held(key, dir, io)?;
            }
            (0, None) => {
                self.dirs[dir].eof = true;
                self.finish_direction(key, dir, io)?;
            }
            (n, None) if n == -libc::ENOBUFS => {
                // Every ring buffer is held (by sends to slow peers): splice
                // needs none, so this direction moves on without waiting
                // for a buffer that may not come back soon. Without a pipe
                // either, it waits for the tick rather than spin.
                let d = &mut self.dirs[dir];
                if d.no_pipe {
                    d.parked = true;
                } else {
                    d.bulk = true;
                    self.arm_read(key, dir, Ready::Maybe, io)?;
                }
                return Ok(Event::BuffersExhausted);
            }
            (n, _) => self.source_failed(key, dir, -n, io)?,
        }
        Ok(Event::None)
    }

    pub fn on_send(
        &mut self,
        key: usize,
        dir: usize,
        res: i32,
        io: &mut Io,
    ) -> std::io::Result<()> {
        self.inflight -= 1;
        let Some(mut held) = self.dirs[dir].held.take() else {
            return Ok(());
        };
        if self.phase == Phase::Closing || res < 0 {
            io.bufs.give_back(held.bid);
            if self.phase != Phase::Closing {
                return self.sink_failed(key, dir, -res, io);
            }
            return Ok(());
        }
        held.sent += res as usize;
        if held.sent < held.len {
            self.dirs[dir].held = Some(held);
            return self.send_held(key, dir, io);
        }
        io.bufs.give_back(held.bid);
        // A message that did not fill the buffer was all there was.
        let ready = if self.dirs[dir].bulk {
            Ready::Maybe
        } else {
            Ready::Unlikely
        };
        self.arm_read(key, dir, ready, io)
    }

    /// A poll completed: the source has data (or ended), or the sink has
    /// room again. A negative result is the poll's own failure (socket
    /// errors come back as POLLERR in a positive mask): a local one.
    pub fn on_poll(
        &mut self,
        key: usize,
        dir: usize,
        res: i32,
        io: &mut Io,
    ) -> std::io::Result<Event> {
        self.inflight -= 1;
        if self.phase == Phase::Closing {
            return Ok(Event::None);
        }
        if res < 0 {
            self.fail(key, LocalFailure::Relay, -res, io)?;
            return Ok(Event::None);
        }
        let pipe = match self.dirs[dir].pipe {
            Some(pipe) => pipe,
            None => match io.pipes.take() {
                Ok(pipe) => {
                    self.dirs[dir].no_pipe = false;
                    *self.dirs[dir].pipe.insert(pipe)
                }
                Err(e) => {
                    // Out of fds or pipe memory: the pipe was an
                    // optimisation, the ring buffers still carry the bytes.
                    let d = &mut self.dirs[dir];
                    d.bulk = false;
                    d.no_pipe = true;
                    self.arm_read(key, dir, Ready::Maybe, io)?;
                    return Ok(Event::PipeFallback(e.raw_os_error().unwrap_or(0)));
                }
            },
        };
        self.pump(key, dir, pipe, io)?;
        Ok(Event::None)
    }

    /// Moves what can move without blocking, then waits for the side that
    /// blocked: readable source or writable sink.
    fn pump(&mut self, key: usize, dir: usize, pipe: Pipe, io: &mut Io) -> std::io::Result<()> {
        let (source, sink) = (self.source(dir), self.sink(dir));
        let mut moved = 0;
        loop {
            let d = &mut self.dirs[dir];
            if moved >= SPLICE_BUDGET {
                // Take another turn after the rest of the batch: a poll on
                // a ready socket completes at once.
                return if d.in_pipe > 0 {
                    self.wait_writable(key, dir, io)
                } else {
                    self.arm_read(key, dir, Ready::Maybe, io)
                };
            }
            let mut dry = false;
            if !d.eof {
                match uring::splice(source, pipe.write, SPLICE_LEN) {
                    Ok(0) => d.eof = true,
                    Ok(n) => {
                        d.in_pipe += n;
                        d.bytes += n as u64;
                        moved += n;
                    }
                    Err(e) => match errno(&e) {
                        libc::EAGAIN => dry = true,
                        // Deliver what the pipe holds, then pass the reset on.
                        e if peer_error(e) => {
                            d.eof = true;
                            d.source_reset = true;
                        }
                        e => return self.fail(key, LocalFailure::Relay, e, io),
                    },
                }
            }
            if d.in_pipe > 0 {
                match uring::splice(pipe.read, sink, d.in_pipe) {
                    Ok(n) if n > 0 => d.in_pipe -= n,
                    Ok(_) => return self.wait_writable(key, dir, io),
                    Err(e) if errno(&e) == libc::EAGAIN => {
                        return self.wait_writable(key, dir, io);
                    }
                    Err(e) => return self.sink_failed(key, dir, errno(&e), io),
                }
                continue;
            }
            if d.eof {
                if d.source_reset {
                    return self.close(key, Self::reset_of_source(dir), io);
                }
                return self.finish_direction(key, dir, io);
            }
            if dry {
                if moved < io.bufs.size() {
                    // Small traffic again: copying is cheaper than splicing.
                    d.bulk = false;
                    if let Some(pipe) = d.pipe.take() {
                        io.pipes.give_back(pipe, true);
                    }
                }
                return self.arm_read(key, dir, Ready::Unlikely, io);
            }
        }
    }

    fn wait_writable(&mut self, key: usize, dir: usize, io: &mut Io) -> std::io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(self.sink(dir)), libc::POLLOUT as u32)
            .build()
            .user_data(token(Op::poll_out(dir), key));
        self.submit(io, entry)
    }

    /// The source ended and every byte before the end was delivered: pass
    /// the end on, and close once both directions are done.
    fn finish_direction(&mut self, key: usize, dir: usize, io: &mut Io) -> std::io::Result<()> {
        // This end of stream may come from a peer that reset: a send saw
        // the reset first, or will when its completion comes. The socket's
        // state tells only while ringlb has not ended its own side of it
        // (after our FIN, a clean close leaves it CLOSE too).
        let other = &self.dirs[1 - dir];
        if other.sink_reset || (!other.done && uring::was_reset(self.source(dir))) {
            return self.close(key, Self::reset_of_source(dir), io);
        }
        self.dirs[dir].done = true;
        // Empty now (every byte was delivered) and never used again: a
        // half-closed connection must not keep a pipe another one needs.
        // Splices are plain non-blocking calls, so nothing is in flight on it.
        if let Some(pipe) = self.dirs[dir].pipe.take() {
            io.pipes.give_back(pipe, self.dirs[dir].in_pipe == 0);
        }
        uring::shutdown_write(self.sink(dir));
        if self.dirs[1 - dir].done {
            return self.close(key, End::Done, io);
        }
        Ok(())
    }

    /// Writing to a direction's sink failed. If that peer reset, the other
    /// direction reads from the same socket and drains what the peer sent
    /// before its reset; the kernel reports the reset only once (to this
    /// send), so `sink_reset` makes that direction's end a reset too. Only
    /// if it has already ended does the connection close here. Any other failure is
    /// local, and nothing would ever tell the peers: reset both.
    fn sink_failed(
        &mut self,
        key: usize,
        dir: usize,
        errno: i32,
        io: &mut Io,
    ) -> std::io::Result<()> {
        if !peer_error(errno) {
            return self.fail(key, LocalFailure::Relay, errno, io);
        }
        self.dirs[dir].done = true;
        self.dirs[dir].sink_reset = true;
        if self.dirs[1 - dir].done {
            return self.close(key, Self::reset_of_sink(dir), io);
        }
        Ok(())
    }

    /// Starts closing: resets are passed on, every operation still in
    /// flight on either socket is cancelled, and the worker frees the
    /// connection when the last completion arrives.
    pub fn close(&mut self, key: usize, end: End, io: &mut Io) -> std::io::Result<()> {
        if self.phase == Phase::Closing {
            if end == End::Stopped {
                // A stop does not wait for a reset's flush: reset now.
                self.flush_cut = true;
            }
            return Ok(());
        }
        self.phase = Phase::Closing;
        self.end = Some(end);
        let flush_until = || Instant::now() + RESET_FLUSH_LIMIT;
        match end {
            End::ClientReset if self.backend >= 0 => {
                self.reset_to = Some((self.backend, flush_until()))
            }
            End::BackendReset => self.reset_to = Some((self.client, flush_until())),
            // Cut off at once, with a reset each peer sees: the operator
            // asked for it, or ringlb cannot carry the stream on (no
            // backend to take it is one such case). A clean end here would
            // pass a prefix (or nothing) off as the whole stream.
            End::BackendDown
            | End::BackendClosed
            | End::FrontendRemoved
            | End::LocalError
            | End::Stopped
            | End::HelloRefused
            | End::NoBackend
            | End::QueueTimeout
            | End::ClientAborted
            | End::ProxyHeader
            | End::Refused => {
                self.reset_both();
            }
            // A peer that stopped reading leaves bytes on their way to it:
            // ending with a FIN would pass the part it got off as the whole
            // stream. Idle with nothing undelivered is a clean end.
            End::IdleTimeout | End::ClientFinTimeout | End::ServerFinTimeout
                if self.undelivered() =>
            {
                self.reset_both()
            }
            _ => {}
        }
        if let Some((fd, _)) = self.reset_to {
            log_flush(key, end, fd);
        }
        if self.inflight > 0 {
            for fd in [self.client, self.backend] {
                if fd >= 0 {
                    let cancel =
                        opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                            .build()
                            .user_data(token(Op::Cancel, key));
                    self.submit(io, cancel)?;
                }
            }
        }
        Ok(())
    }

    /// A reset is about to be passed on while the other peer has not yet
    /// received every byte queued to it: the connection waits (the worker
    /// looks again each tick), up to a limit, and never past a stop.
    pub fn flushing(&self, now: Instant) -> bool {
        let Some((fd, deadline)) = self.reset_to else {
            return false;
        };
        !self.flush_cut && now < deadline && uring::unsent_bytes(fd) > 0
    }

    /// A direction is short of a pipe (and maybe parked for want of
    /// buffers too): the tick lets it try again.
    pub fn wants_pipe(&self) -> bool {
        self.phase == Phase::Relaying && self.dirs.iter().any(|d| d.no_pipe)
    }

    /// The tick's retry: the next full buffer may splice again, and a
    /// parked direction tries a pipe now (no buffer was free for it).
    pub fn retry_pipe(&mut self, key: usize, io: &mut Io) -> std::io::Result<()> {
        for dir in [UPSTREAM, DOWNSTREAM] {
            let d = &mut self.dirs[dir];
            d.no_pipe = false;
            if std::mem::take(&mut d.parked) {
                d.bulk = true;
                self.arm_read(key, dir, Ready::Maybe, io)?;
            }
        }
        Ok(())
    }

    /// Bytes received up and down since the last call, for the shared
    /// counters.
    pub fn take_uncounted(&mut self) -> [u64; 2] {
        self.dirs.each_mut().map(|d| {
            let new = d.bytes - d.counted;
            d.counted = d.bytes;
            new
        })
    }

    /// Makes both closes send a reset.
    fn reset_both(&self) {
        uring::set_linger_zero(self.client);
        if self.backend >= 0 {
            uring::set_linger_zero(self.backend);
        }
    }

    /// Bytes ringlb took from one peer and has not delivered to the other:
    /// in a held buffer, in a pipe, or still queued on a socket.
    fn undelivered(&self) -> bool {
        self.dirs.iter().any(|d| d.held.is_some() || d.in_pipe > 0)
            || uring::unsent_bytes(self.client) > 0
            || (self.backend >= 0 && uring::unsent_bytes(self.backend) > 0)
    }

    /// The direction's end of stream was passed on to its sink: the
    /// connection is half-closed that way.
    pub fn ended(&self, dir: usize) -> bool {
        self.dirs[dir].done
    }

    /// A direction is parked: idle only because ringlb has nothing to
    /// carry its bytes with.
    pub fn starved(&self) -> bool {
        self.dirs.iter().any(|d| d.parked)
    }

    /// Closes the fds and gives back the pipes; only once nothing is in
    /// flight.
    pub fn release(&mut self, io: &mut Io) {
        debug_assert_eq!(self.inflight, 0);
        if let Some((fd, _)) = self.reset_to {
            uring::set_linger_zero(fd);
        }
        for d in &mut self.dirs {
            if let Some(held) = d.held.take() {
                io.bufs.give_back(held.bid);
            }
            if let Some(pipe) = d.pipe.take() {
                io.pipes.give_back(pipe, d.in_pipe == 0);
            }
        }
        uring::close(self.client);
        if self.backend >= 0 {
            uring::close(self.backend);
        }
    }
}

/// Says when a reset waits for queued bytes (debug only: the ioctl is not
/// worth it otherwise).
fn log_flush(key: usize, end: End, fd: RawFd) {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    let queued = uring::unsent_bytes(fd);
    if queued > 0 {
        log::debug!(
            "conn {key}: {}; passing the reset on once {queued} queued bytes are delivered \
             (at most {RESET_FLUSH_LIMIT:?})",
            end.describe()
        );
    }
}

/// Errors that mean the peer is gone (reset, unreachable, timed out), as
/// opposed to a local failure (memory, fds, a cancelled operation).
fn peer_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNRESET
            | libc::EPIPE
            | libc::ENOTCONN
            | libc::ETIMEDOUT
            | libc::ECONNABORTED
            | libc::ECONNREFUSED
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ENETDOWN
            | libc::EHOSTDOWN
    )
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}
