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

use std::os::fd::RawFd;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types};

use crate::pool::Tried;
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
    /// Every backend was down or refused.
    NoBackend,
    /// Its backend was marked down and the frontend says `on-down shutdown`.
    BackendDown,
    /// The balancer is stopping.
    Stopped,
    /// A local failure (out of fds, of memory).
    LocalError,
}

impl End {
    pub fn describe(self) -> &'static str {
        match self {
            End::Done => "closed by both sides",
            End::ClientReset => "client reset",
            End::BackendReset => "backend reset",
            End::IdleTimeout => "idle timeout",
            End::NoBackend => "no backend available",
            End::BackendDown => "backend marked down",
            End::Stopped => "balancer stopping",
            End::LocalError => "local error",
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
    pub bytes: u64,
}

pub struct Conn {
    pub frontend: usize,
    pub client: RawFd,
    /// -1 until a backend socket exists.
    pub backend: RawFd,
    pub backend_index: usize,
    /// Backends this connection already tried, so a retry never repeats one.
    pub tried: Tried,
    pub phase: Phase,
    pub dirs: [Direction; 2],
    /// Operations submitted and not yet completed. The fds and buffers they
    /// use stay alive until this is zero (design.md: cancelling is not
    /// completing).
    pub inflight: u32,
    pub last_active: Instant,
    pub started: Instant,
    pub end: Option<End>,
    /// The backend accepted: its active count must drop when this ends.
    pub connected: bool,
    /// Looked up at accept only when debug logging is on: by the time the
    /// connection is logged the peer may be gone.
    pub client_addr: Option<std::net::SocketAddr>,
    /// The socket that gets the reset passed on, once the bytes already
    /// queued to it are delivered (or the deadline passes).
    reset_to: Option<(RawFd, Instant)>,
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
    pub fn new(frontend: usize, client: RawFd, now: Instant) -> Conn {
        Conn {
            frontend,
            client,
            backend: -1,
            backend_index: 0,
            tried: Tried::default(),
            phase: Phase::Connecting,
            dirs: [Direction::default(), Direction::default()],
            inflight: 0,
            last_active: now,
            started: now,
            end: None,
            connected: false,
            client_addr: None,
            reset_to: None,
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

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Closing && self.inflight == 0
    }

    fn submit(&mut self, io: &mut Io, entry: squeue::Entry) -> std::io::Result<()> {
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

    /// Handles a receive's completion. `Ok(true)` when every ring buffer was
    /// held and the direction moved to splice, for the worker to count.
    pub fn on_recv(
        &mut self,
        key: usize,
        dir: usize,
        res: i32,
        flags: u32,
        io: &mut Io,
    ) -> std::io::Result<bool> {
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
            return Ok(false);
        }
        match (res, keep) {
            (n, Some(bid)) => {
                let len = n as usize;
                let d = &mut self.dirs[dir];
                d.bytes += len as u64;
                d.bulk = len == io.bufs.size();
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
                // for a buffer that may not come back soon.
                self.dirs[dir].bulk = true;
                self.arm_read(key, dir, Ready::Maybe, io)?;
                return Ok(true);
            }
            _ => self.close(key, Self::reset_of_source(dir), io)?,
        }
        Ok(false)
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
                return self.sink_failed(key, dir, io);
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
    /// room again.
    pub fn on_poll(&mut self, key: usize, dir: usize, io: &mut Io) -> std::io::Result<()> {
        self.inflight -= 1;
        if self.phase == Phase::Closing {
            return Ok(());
        }
        self.pump(key, dir, io)
    }

    /// Moves what can move without blocking, then waits for the side that
    /// blocked: readable source or writable sink.
    fn pump(&mut self, key: usize, dir: usize, io: &mut Io) -> std::io::Result<()> {
        let pipe = match self.dirs[dir].pipe {
            Some(pipe) => pipe,
            None => match io.pipes.take() {
                Ok(pipe) => *self.dirs[dir].pipe.insert(pipe),
                Err(_) => return self.close(key, End::LocalError, io),
            },
        };
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
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => dry = true,
                    Err(_) => {
                        // Deliver what the pipe holds, then pass the reset on.
                        d.eof = true;
                        d.source_reset = true;
                    }
                }
            }
            if d.in_pipe > 0 {
                match uring::splice(pipe.read, sink, d.in_pipe) {
                    Ok(n) if n > 0 => d.in_pipe -= n,
                    Ok(_) => return self.wait_writable(key, dir, io),
                    Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                        return self.wait_writable(key, dir, io);
                    }
                    Err(_) => return self.sink_failed(key, dir, io),
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
        self.dirs[dir].done = true;
        uring::shutdown_write(self.sink(dir));
        if self.dirs[1 - dir].done {
            return self.close(key, End::Done, io);
        }
        Ok(())
    }

    /// Writing to a direction's sink failed: that peer reset. The other
    /// direction reads from the same socket, drains what the peer sent
    /// before its reset and then sees the reset itself; only if it has
    /// already ended does the connection close here.
    fn sink_failed(&mut self, key: usize, dir: usize, io: &mut Io) -> std::io::Result<()> {
        self.dirs[dir].done = true;
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
            End::BackendDown => {
                // Cut off at once: that is what the operator asked for.
                uring::set_linger_zero(self.client);
                if self.backend >= 0 {
                    uring::set_linger_zero(self.backend);
                }
            }
            _ => {}
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
    /// looks again each tick), up to a limit.
    pub fn flushing(&self, now: Instant) -> bool {
        let Some((fd, deadline)) = self.reset_to else {
            return false;
        };
        now < deadline && uring::unsent_bytes(fd) > 0
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
