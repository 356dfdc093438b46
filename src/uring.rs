//! io_uring plumbing for one worker: the ring, the tokens that tie a
//! completion back to its connection, the provided-buffer ring the relay
//! receives into, and a pool of pipes for splicing.
//!
//! Every `unsafe` block of the data path that is not a plain libc call on an
//! fd we own lives here.

use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, squeue, types};

/// What an operation was for; packed into the low byte of its user data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Accept = 1,
    AcceptPause,
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
    /// A worker-level request whose completion needs no handling.
    Ignore,
}

impl Op {
    const ALL: [Op; 16] = [
        Op::Accept,
        Op::AcceptPause,
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
        Op::Ignore,
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

/// Builds a ring with the flags design.md measured as fastest for one
/// thread that owns its ring; falls back to a plain ring on older kernels.
pub fn new_ring(entries: u32) -> io::Result<IoUring> {
    let fast = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .setup_cqsize(entries * 4)
        .build(entries);
    match fast {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)
            .map_err(setup_error),
        Err(e) => Err(setup_error(e)),
    }
}

/// A worker's ring and what its operations point into. The ring is the
/// first field so that it is dropped (ending every operation) before the
/// buffers are freed.
pub struct Io {
    pub ring: IoUring,
    pub bufs: BufRing,
    pub pipes: PipePool,
    /// Completions reaped early because the completion queue was full when
    /// submitting; the worker handles them with the next batch.
    pub backlog: Vec<(u64, i32, u32)>,
}

impl Io {
    /// Queues an entry, flushing the submission queue to the kernel when it
    /// is full instead of failing.
    pub fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer, address and timespec an entry points to
            // is owned by the worker (buffer ring, frontend settings) and
            // outlives the operation: none is freed while the operation is in
            // flight, which the connection's in-flight count guarantees.
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
    pub fn new(ring: &IoUring, count: u16, size: usize) -> io::Result<BufRing> {
        let entries_layout = std::alloc::Layout::from_size_align(count as usize * 16, 4096)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let memory_layout = std::alloc::Layout::from_size_align(count as usize * size, 4096)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: both layouts have a non-zero size; the pointers are checked
        // for null before use and freed in Drop with the same layouts.
        let (entries, memory) = unsafe {
            (
                std::alloc::alloc_zeroed(entries_layout) as *mut types::BufRingEntry,
                std::alloc::alloc(memory_layout),
            )
        };
        if entries.is_null() || memory.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "cannot allocate receive buffers",
            ));
        }
        let mut bufs = BufRing {
            entries,
            count,
            size,
            memory,
            tail: 0,
            entries_layout,
            memory_layout,
        };
        // SAFETY: the entry array is page aligned, `count` entries long and
        // lives until Drop, which unregisters it first.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, BUFFER_GROUP, 0)
        }?;
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
    pub fn ptr(&self, bid: u16) -> *const u8 {
        // SAFETY: bid < count, so the offset stays inside the allocation.
        unsafe { self.memory.add(bid as usize * self.size) }
    }

    fn put(&mut self, bid: u16) {
        let slot = self.tail & (self.count - 1);
        // SAFETY: slot < count; the kernel reads entries only up to the tail
        // we publish, and this one is beyond it until `publish`.
        let entry = unsafe { &mut *self.entries.add(slot as usize) };
        entry.set_addr(self.ptr(bid) as u64);
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
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the worker drops the ring (which unregisters the buffer
        // ring and ends every operation) before this, see Worker's field
        // order; the layouts are the ones used to allocate.
        unsafe {
            std::alloc::dealloc(self.entries as *mut u8, self.entries_layout);
            std::alloc::dealloc(self.memory, self.memory_layout);
        }
    }
}

/// A pipe for splicing, always returned to the pool empty.
#[derive(Clone, Copy, Debug)]
pub struct Pipe {
    pub read: RawFd,
    pub write: RawFd,
}

/// Pipes cost two fds and a syscall to make: a worker keeps the empty ones
/// for the next bulk transfer.
pub struct PipePool {
    free: Vec<Pipe>,
    keep: usize,
    size: usize,
}

impl PipePool {
    pub fn new(keep: usize, size: usize) -> PipePool {
        PipePool {
            free: Vec::new(),
            keep,
            size,
        }
    }

    pub fn take(&mut self) -> io::Result<Pipe> {
        if let Some(pipe) = self.free.pop() {
            return Ok(pipe);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fds[1] is the pipe we just made. A failure leaves the
        // default size, which still works.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, self.size as libc::c_int) };
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
            close(pipe.read);
            close(pipe.write);
        }
    }
}

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
    fn tokens_round_trip() {
        for op in Op::ALL {
            assert_eq!(untoken(token(op, 123_456)), Some((op, 123_456)));
        }
        assert_eq!(untoken(0), None);
        assert_eq!(untoken(0xff), None);
    }
}
