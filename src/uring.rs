//! io_uring plumbing for one worker: the ring, the tokens that tie a
//! completion back to its connection, the provided-buffer ring the relay
//! receives into, and a pool of pipes for splicing.
//!
//! Every `unsafe` block of the data path that is not a plain libc call on an
//! fd we own lives here.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;

use io_uring::{IoUring, squeue, types};

/// What an operation was for; packed into the low byte of its user data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Accept = 1,
    AcceptPause,
    /// Readiness of a listener accepted from with accept4(2) near a limit.
    AcceptPoll,
    Wake,
    Tick,
    Connect,
    ConnectTimeout,
    /// Receive for a direction (0 = client to backend, 1 = backend to client).
    Recv0,
    Recv1,
    Send0,
    Send1,
    PollIn0,
    PollIn1,
    PollOut0,
    PollOut1,
    /// A connection's cancel request.
    Cancel,
    /// A queued connection's watch for its client leaving.
    Watch,
    /// A worker-level request whose completion needs no handling.
    Ignore,
    /// A receive of a client's PROXY header (accept-proxy).
    Header,
    /// Receive of a TLS ClientHello (SNI routing).
    Hello,
    /// Send of bytes that go to the backend before the relay: a PROXY
    /// header, then the client's bytes read with its own header or the
    /// replayed ClientHello.
    Preamble,
    /// TLS relay: receive and send on the client (0) or backend (1) side.
    TlsRecv0,
    TlsRecv1,
    TlsSend0,
    TlsSend1,
}

impl Op {
    const ALL: [Op; 25] = [
        Op::Accept,
        Op::AcceptPause,
        Op::AcceptPoll,
        Op::Wake,
        Op::Tick,
        Op::Connect,
        Op::ConnectTimeout,
        Op::Recv0,
        Op::Recv1,
        Op::Send0,
        Op::Send1,
        Op::PollIn0,
        Op::PollIn1,
        Op::PollOut0,
        Op::PollOut1,
        Op::Cancel,
        Op::Watch,
        Op::Ignore,
        Op::Header,
        Op::Hello,
        Op::Preamble,
        Op::TlsRecv0,
        Op::TlsRecv1,
        Op::TlsSend0,
        Op::TlsSend1,
    ];

    pub fn recv(dir: usize) -> Op {
        [Op::Recv0, Op::Recv1][dir]
    }
    pub fn send(dir: usize) -> Op {
        [Op::Send0, Op::Send1][dir]
    }
    pub fn poll_in(dir: usize) -> Op {
        [Op::PollIn0, Op::PollIn1][dir]
    }
    pub fn poll_out(dir: usize) -> Op {
        [Op::PollOut0, Op::PollOut1][dir]
    }
}

/// An operation and the slot (connection or listener) it belongs to.
pub fn token(op: Op, slot: usize) -> u64 {
    (slot as u64) << 8 | op as u64
}

pub fn untoken(user_data: u64) -> Option<(Op, usize)> {
    let index = ((user_data & 0xff) as usize).checked_sub(1)?;
    let op = *Op::ALL.get(index)?;
    Some((op, (user_data >> 8) as usize))
}

/// Why the worker could not start its ring; rendered for the operator.
pub fn setup_error(e: io::Error) -> io::Error {
    let hint = match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (needs Linux 6.1 or later)",
        Some(libc::EPERM) => {
            "io_uring is disabled here (sysctl kernel.io_uring_disabled, or a seccomp filter in a container)"
        }
        Some(libc::ENOMEM) => "not enough locked memory for the ring (raise ulimit -l)",
        _ => "io_uring setup failed",
    };
    io::Error::new(e.kind(), format!("{hint}: {e}"))
}

/// io_uring's ceiling for a completion queue (IORING_MAX_CQ_ENTRIES).
pub const MAX_CQ_ENTRIES: u32 = 2 * 32768;

/// Completions one connection can have outstanding at once: a connect and
/// its linked timeout, or one operation per direction (receive, send or
/// poll), and while it closes a cancel per socket next to the two
/// operations they cancel.
pub const COMPLETIONS_PER_CONNECTION: u64 = 4;

/// Completion queue size for a worker that may hold up to `connections`
/// (the global limit: a worker can end up with all of them). At least twice
/// the submission queue (design.md), at most io_uring's maximum; a power of
/// two, as the kernel rounds to one anyway.
pub fn cq_entries(connections: u64, sq_entries: u32) -> u32 {
    let wanted = connections.saturating_mul(COMPLETIONS_PER_CONNECTION);
    let floor = 2 * u64::from(sq_entries);
    let size = wanted.clamp(floor, u64::from(MAX_CQ_ENTRIES));
    // Below MAX_CQ_ENTRIES, a power of two itself: the cast cannot truncate.
    size.next_power_of_two() as u32
}

/// Builds a ring with the flags design.md measured as fastest for one
/// thread that owns its ring; falls back to a plain ring on older kernels.
pub fn new_ring(sq_entries: u32, cq_entries: u32) -> io::Result<IoUring> {
    let fast = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .setup_cqsize(cq_entries)
        .setup_clamp()
        .build(sq_entries);
    match fast {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_clamp()
            .build(sq_entries)
            .map_err(setup_error),
        Err(e) => Err(setup_error(e)),
    }
}

/// What a worker reports when the kernel dropped one of its completions
/// (EBADR from io_uring_enter). The kernel keeps reporting it on every
/// later wait, and an operation whose completion is lost leaves its
/// connection waiting forever, so the worker cannot go on.
pub fn dropped_completion_error(worker: usize, cq_entries: u32) -> io::Error {
    io::Error::other(format!(
        "worker {worker}: the kernel dropped an io_uring completion (EBADR): the completion queue \
         ({cq_entries} entries) overflowed and the kernel could not allocate memory to hold the \
         overflow. The worker's connections can no longer be tracked, so ringlb stops. This \
         points to memory pressure (check the kernel log and the cgroup's memory limit); \
         ringlb_completion_queue_overflowed_total counts the overflows that came before"
    ))
}

/// A worker's ring and what its operations point into.
///
/// Teardown order matters: the kernel writes received bytes into `bufs`
/// and reads the buffer ring's entries, and dropping the ring does not end
/// its operations synchronously (the kernel tears a ring down in the
/// background). So `Drop` first cancels every operation synchronously,
/// then closes the ring, and frees the buffers only if the cancel
/// succeeded; otherwise it leaks them, which is safe.
pub struct Io {
    pub ring: ManuallyDrop<IoUring>,
    pub bufs: BufRing,
    pub pipes: PipePool,
    /// Completions reaped early because the completion queue was full when
    /// submitting; the worker handles them with the next batch.
    pub backlog: Vec<(u64, i32, u32)>,
}

/// How long teardown waits for an operation the kernel is running (an
/// io-wq worker mid-syscall) to acknowledge its cancel.
const TEARDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Io {
    pub fn new(ring: IoUring, buffers: u16, buffer_size: usize, pipes: PipePool) -> io::Result<Io> {
        let bufs = BufRing::new(&ring, buffers, buffer_size)?;
        Ok(Io {
            ring: ManuallyDrop::new(ring),
            bufs,
            pipes,
            backlog: Vec::new(),
        })
    }

    /// Cancels every operation in flight and waits until none can still
    /// touch our memory. `true` when the kernel confirmed it.
    fn cancel_everything(&mut self) -> bool {
        let timeout = types::Timespec::from(TEARDOWN_WAIT);
        let cancelled = self
            .ring
            .submitter()
            .register_sync_cancel(Some(timeout), types::CancelBuilder::any());
        cancelled.is_ok()
            && self
                .ring
                .submitter()
                .unregister_buf_ring(BUFFER_GROUP)
                .is_ok()
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        let quiet = self.cancel_everything();
        // SAFETY: the ring is dropped once, here, and not used after.
        unsafe { ManuallyDrop::drop(&mut self.ring) };
        if quiet {
            // SAFETY: the synchronous cancel returned only once no request
            // of this ring was left to run, and the buffer ring was
            // unregistered: the kernel holds no pointer into the memory.
            unsafe { self.bufs.free() };
        } else {
            log::warn!(
                "could not confirm that the kernel finished with a worker's receive buffers; \
                 leaking them ({} bytes) rather than freeing memory it may still write",
                self.bufs.memory_layout.size()
            );
        }
    }
}

impl Io {
    /// Queues an entry, flushing the submission queue to the kernel when it
    /// is full instead of failing.
    pub fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer, address and timespec an entry points to
            // is owned by the worker (the buffer ring), by the session's
            // view of its snapshot (connect timeout, backend addresses), or
            // boxed in the session's stage (a PROXY header read or sent: a
            // heap allocation the slab does not move when it moves the
            // session), and outlives the operation: none is freed while the
            // operation is in flight, which the connection's in-flight count
            // guarantees (a session leaves the slab only at zero), and Io's
            // Drop cancels whatever is left before the worker's sessions go.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.flush()?;
        }
    }

    /// Queues two linked entries in the same submission: a link ends at a
    /// submission boundary, and a connect cut off from its timeout could
    /// hang for the kernel's SYN retries (minutes).
    pub fn push_linked(&mut self, first: &squeue::Entry, second: &squeue::Entry) -> io::Result<()> {
        loop {
            let free = {
                let sq = self.ring.submission();
                sq.capacity() - sq.len()
            };
            if free >= 2 {
                break;
            }
            self.flush()?;
        }
        self.push(first)?;
        self.push(second)
    }

    /// Hands the queued entries to the kernel.
    fn flush(&mut self) -> io::Result<()> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // Older kernels: the completion queue is full. Make room,
                // keep the completions for the worker, then submit again.
                let reaped = self
                    .ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags()));
                self.backlog.extend(reaped);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Buffer group id of the worker's one buffer ring.
pub const BUFFER_GROUP: u16 = 0;

/// Kernel-selected receive buffers (a provided-buffer ring): a receive
/// takes a buffer only when data arrives, so an idle connection holds no
/// buffer at all, which keeps memory per connection low.
///
/// The memory is freed only by its owner, [`Io`], once the kernel is done
/// with it: a `BufRing` has no `Drop`, so on its own it leaks.
pub struct BufRing {
    entries: *mut types::BufRingEntry,
    count: u16,
    size: usize,
    memory: *mut u8,
    tail: u16,
    entries_layout: std::alloc::Layout,
    memory_layout: std::alloc::Layout,
}

impl BufRing {
    /// `count` must be a power of two (a kernel rule).
    fn new(ring: &IoUring, count: u16, size: usize) -> io::Result<BufRing> {
        if count == 0 || !count.is_power_of_two() || size == 0 {
            return Err(io::Error::other(format!(
                "{count} receive buffers of {size} bytes: the count must be a power of two"
            )));
        }
        let entries_layout = std::alloc::Layout::from_size_align(count as usize * 16, 4096)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let memory_layout = std::alloc::Layout::from_size_align(count as usize * size, 4096)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: both layouts have a non-zero size (count and size are not
        // zero); the pointers are checked for null before use.
        let (entries, memory) = unsafe {
            (
                std::alloc::alloc_zeroed(entries_layout) as *mut types::BufRingEntry,
                std::alloc::alloc(memory_layout),
            )
        };
        let mut bufs = BufRing {
            entries,
            count,
            size,
            memory,
            tail: 0,
            entries_layout,
            memory_layout,
        };
        if entries.is_null() || memory.is_null() {
            // SAFETY: nothing was registered; free() skips a null pointer.
            unsafe { bufs.free() };
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "cannot allocate receive buffers",
            ));
        }
        // SAFETY: the entry array is page aligned and `count` entries long;
        // it stays allocated until Io's Drop has unregistered it.
        let registered = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, BUFFER_GROUP, 0)
        };
        if let Err(e) = registered {
            // SAFETY: the kernel refused the ring, so it holds no pointer
            // into either allocation.
            unsafe { bufs.free() };
            return Err(e);
        }
        for bid in 0..count {
            bufs.put(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Memory of buffer `bid`, valid while the buffer is out of the ring.
    /// `bid` comes from a completion of this ring, so it is below `count`;
    /// the check makes a broken invariant a panic, not a wild pointer.
    pub fn ptr(&self, bid: u16) -> *const u8 {
        assert!(bid < self.count, "buffer id {bid} out of {}", self.count);
        // SAFETY: bid < count, so the offset stays inside the allocation of
        // count * size bytes.
        unsafe { self.memory.add(bid as usize * self.size) }
    }

    fn put(&mut self, bid: u16) {
        let addr = self.ptr(bid) as u64;
        let slot = self.tail & (self.count - 1);
        // SAFETY: slot < count; the kernel reads entries only up to the tail
        // we publish, and this one is beyond it until `publish`.
        let entry = unsafe { &mut *self.entries.add(slot as usize) };
        entry.set_addr(addr);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's reserved field;
        // the kernel reads it with acquire ordering, so a release store makes
        // the entries written before it visible.
        unsafe {
            let tail =
                types::BufRingEntry::tail(self.entries) as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }

    /// Gives a buffer back once its bytes have been sent.
    pub fn give_back(&mut self, bid: u16) {
        self.put(bid);
        self.publish();
    }

    /// Frees both allocations and nulls the pointers, so a second call does
    /// nothing.
    ///
    /// # Safety
    /// The kernel must hold no pointer into them: the buffer ring was never
    /// registered, or it was unregistered and no request that could still
    /// pick a buffer or write into one remains.
    unsafe fn free(&mut self) {
        // SAFETY: non-null pointers came from alloc with these layouts and
        // are freed once (nulled right after); the caller vouches that the
        // kernel is done with them.
        unsafe {
            if !self.entries.is_null() {
                std::alloc::dealloc(self.entries as *mut u8, self.entries_layout);
            }
            if !self.memory.is_null() {
                std::alloc::dealloc(self.memory, self.memory_layout);
            }
        }
        self.entries = std::ptr::null_mut();
        self.memory = std::ptr::null_mut();
    }
}

/// A pipe for splicing, always returned to the pool empty.
#[derive(Clone, Copy, Debug)]
pub struct Pipe {
    pub read: RawFd,
    pub write: RawFd,
}

/// Pipes cost two fds and a syscall to make: a worker keeps the empty ones
/// for the next bulk transfer. It never has more than `max_open` at once
/// (its part of the fd budget's pipes), so bulk transfers cannot take the
/// fds promised to connections: beyond it a direction keeps copying.
pub struct PipePool {
    free: Vec<Pipe>,
    keep: usize,
    size: usize,
    /// Pipes this pool made and has not closed (in use or kept).
    open: usize,
    max_open: usize,
}

impl PipePool {
    pub fn new(keep: usize, max_open: usize, size: usize) -> PipePool {
        PipePool {
            free: Vec::new(),
            keep: keep.min(max_open),
            size,
            open: 0,
            max_open,
        }
    }

    pub fn max_open(&self) -> usize {
        self.max_open
    }

    /// A pipe, or an error: the kernel's (out of fds or pipe memory), or
    /// [`PIPE_BUDGET_SPENT`] when this worker's share is all in use.
    pub fn take(&mut self) -> io::Result<Pipe> {
        if let Some(pipe) = self.free.pop() {
            return Ok(pipe);
        }
        if self.open >= self.max_open {
            return Err(io::Error::from_raw_os_error(PIPE_BUDGET_SPENT));
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fds[1] is the pipe we just made. A failure leaves the
        // default size, which still works.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, self.size as libc::c_int) };
        self.open += 1;
        Ok(Pipe {
            read: fds[0],
            write: fds[1],
        })
    }

    /// Closes the pipes kept for reuse, for their fds to serve something
    /// more needed; returns how many.
    pub fn release_idle(&mut self) -> usize {
        let count = self.free.len();
        for pipe in self.free.drain(..) {
            self.open -= 1;
            close(pipe.read);
            close(pipe.write);
        }
        count
    }

    /// `empty` says whether the pipe holds no bytes; a pipe with leftovers
    /// is closed, never reused.
    pub fn give_back(&mut self, pipe: Pipe, empty: bool) {
        if empty && self.free.len() < self.keep {
            self.free.push(pipe);
        } else {
            self.open -= 1;
            close(pipe.read);
            close(pipe.write);
        }
    }
}

/// The "errno" [`PipePool::take`] reports when its budget is spent: no
/// kernel error has this number (errnos are below 4096).
pub const PIPE_BUDGET_SPENT: i32 = 1 << 20;

impl Drop for PipePool {
    fn drop(&mut self) {
        self.release_idle();
    }
}

pub fn close(fd: RawFd) {
    // SAFETY: callers close only fds they own, once, with no operation in
    // flight on them.
    unsafe { libc::close(fd) };
}

/// Non-blocking splice(2); returns bytes moved, 0 at end of stream.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds owned by the connection; null offsets
    // are required for pipes and sockets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub fn shutdown_write(fd: RawFd) {
    // SAFETY: plain syscall on a socket the connection owns; an error
    // (already reset) leaves nothing to do.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Whether a TCP socket whose receive just ended was reset rather than
/// closed: the kernel reports a reset once, to whichever call sees it
/// first (perhaps a send), and a receive after that finds a plain end of
/// stream. A reset leaves the socket CLOSE; a peer's FIN leaves it
/// CLOSE_WAIT (or TIME_WAIT, CLOSING, LAST_ACK after our own FIN).
pub fn was_reset(fd: RawFd) -> bool {
    const TCP_CLOSE: u8 = 7;
    // tcpi_state is the first byte of struct tcp_info; the kernel copies
    // at most the length given.
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: the pointer and length describe a writable 8-byte buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    rc == 0 && len >= 1 && info[0] == TCP_CLOSE
}

/// Bytes queued on a socket and not yet acknowledged by its peer.
pub fn unsent_bytes(fd: RawFd) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (same number as TIOCOUTQ) writes one int through the
    // pointer; an error leaves 0, which ends the wait.
    unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    queued.max(0) as usize
}

/// Makes the next close send a reset instead of a FIN, so a reset on one
/// side is passed on as a reset, not as a clean end.
pub fn set_linger_zero(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the pointer and length describe a valid linger struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

pub fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: the pointer and length describe a valid int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// A non-blocking TCP socket of the backend's address family.
pub fn tcp_socket(ipv6: bool) -> io::Result<RawFd> {
    let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall; the fd is owned by the caller.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipe_pool_never_opens_more_than_its_share() {
        let mut pool = PipePool::new(1, 2, 4096);
        let a = pool.take().expect("first pipe");
        let b = pool.take().expect("second pipe");
        let spent = pool.take().expect_err("a third is beyond the share");
        assert_eq!(spent.raw_os_error(), Some(PIPE_BUDGET_SPENT));
        // Kept for reuse, it still counts; closed (with leftovers), it does not.
        pool.give_back(a, true);
        assert!(pool.take().is_ok_and(|p| p.read == a.read));
        pool.give_back(b, false);
        let c = pool.take().expect("room again once one is closed");
        pool.give_back(c, true);
        pool.give_back(a, true);
        assert_eq!(pool.release_idle(), 1, "keeps at most `keep`");
        assert!(pool.take().is_ok());
    }

    #[test]
    fn tokens_round_trip() {
        for op in Op::ALL {
            assert_eq!(untoken(token(op, 123_456)), Some((op, 123_456)));
        }
        assert_eq!(untoken(0), None);
        assert_eq!(untoken(0xff), None);
    }

    #[test]
    fn the_completion_queue_grows_with_the_limit_up_to_the_kernel_maximum() {
        // A small limit still gets twice the submission queue.
        assert_eq!(cq_entries(10, 1024), 2048);
        // 3,000 connections, 4 completions each: 12,000, rounded up.
        assert_eq!(cq_entries(3_000, 1024), 16_384);
        assert_eq!(cq_entries(8_000, 1024), 32_768);
        assert_eq!(cq_entries(400_000, 1024), MAX_CQ_ENTRIES);
        assert_eq!(cq_entries(u64::MAX, 1024), MAX_CQ_ENTRIES);
    }

    #[test]
    fn a_dropped_completion_is_explained_not_just_numbered() {
        let message = dropped_completion_error(3, 65536).to_string();
        for part in ["worker 3", "EBADR", "65536 entries", "stops", "memory"] {
            assert!(message.contains(part), "{part}: {message}");
        }
        assert!(!message.contains("os error 53"), "{message}");
    }

    #[test]
    fn a_ring_sized_for_the_limit_can_be_built() {
        let ring = new_ring(1024, cq_entries(1 << 20, 1024)).expect("io_uring");
        assert_eq!(ring.params().cq_entries(), MAX_CQ_ENTRIES);
    }
}
