//! Stages of a session around the connect that move bytes of their own:
//! reading the client's TLS ClientHello to route by its server name (SNI
//! passthrough), and the preamble: what the chosen backend gets before the
//! relay starts, in this order: a PROXY header (`send-proxy`), then the
//! client's bytes already read (the ClientHello, or what came with the
//! client's own PROXY header).
//!
//! The bytes live in a [`Pending`], boxed and held by the session's stage
//! until the session is freed, so a receive or send the kernel still runs
//! never points into memory that moved (the slab moves sessions) or went.

use std::sync::atomic::Ordering::Relaxed;

use io_uring::{opcode, types};

use super::{Connecting, Session, Stage, Worker};
use crate::hello::{self, MAX_HELLO, Parsed, Refusal};
use crate::model::FrontendSnapshot;
use crate::proxy;
use crate::relay::{End, LocalFailure, Phase, UPSTREAM};
use crate::uring::{Op, token};

/// Most hellos fit here (a post-quantum one is under 2 KiB); a larger one
/// doubles it, up to [`MAX_HELLO`].
const FIRST_READ: usize = 4096;

/// Bytes read from the client before the backend is chosen, then sent to
/// it.
pub struct Pending {
    buf: Vec<u8>,
    sent: usize,
}

impl Pending {
    pub fn new() -> Box<Pending> {
        Box::new(Pending {
            buf: Vec::with_capacity(FIRST_READ),
            sent: 0,
        })
    }

    /// Starts with bytes already read (after a client's PROXY header).
    pub fn with(bytes: &[u8]) -> Box<Pending> {
        let mut buf = Vec::with_capacity(FIRST_READ.max(bytes.len()));
        buf.extend_from_slice(bytes);
        Box::new(Pending { buf, sent: 0 })
    }
}

/// The route of the access log: only for frontends that route or
/// terminate TLS, and once the hello or handshake chose one.
pub fn route_name(session: &Session) -> Option<&str> {
    let snap = &session.view.snap;
    let tls = &snap.config.tls;
    if !(tls.routes_by_name() || tls.server.is_some())
        || matches!(
            session.stage,
            Stage::Header(_) | Stage::Hello(_) | Stage::Handshake
        )
    {
        return None;
    }
    snap.routes.get(session.route).map(|r| r.name.as_str())
}

/// The route a server name chooses in `snap` (0: the frontend's own
/// backends).
pub fn route_for(snap: &FrontendSnapshot, name: Option<&str>) -> usize {
    if !snap.config.tls.routes_by_name() {
        return 0;
    }
    name.and_then(|n| snap.router.route(n)).unwrap_or(0)
}

impl Worker {
    /// The hello stage begins: bytes that came with a PROXY header may hold
    /// the whole hello already.
    pub(super) fn start_hello(&mut self, key: usize) -> std::io::Result<()> {
        match &self.sessions[key].stage {
            Stage::Hello(pending) if !pending.buf.is_empty() => self.judge_hello(key),
            _ => self.read_hello(key),
        }
    }

    /// Receives more of the ClientHello. Never more than [`MAX_HELLO`]
    /// in all: the parser refuses a hello that needs more.
    pub(super) fn read_hello(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let Stage::Hello(pending) = &mut session.stage else {
            return Ok(());
        };
        let buf = &mut pending.buf;
        if buf.len() == buf.capacity() {
            // Only between receives: none is in flight on the old memory.
            let more = buf.capacity().clamp(1, MAX_HELLO - buf.len());
            buf.reserve_exact(more);
        }
        let room = (buf.capacity() - buf.len()).min(MAX_HELLO - buf.len());
        let spare = buf.spare_capacity_mut();
        let entry = opcode::Recv::new(
            types::Fd(session.conn.client),
            spare.as_mut_ptr().cast(),
            room as u32,
        )
        .build()
        .user_data(token(Op::Hello, key));
        session.conn.submit(&mut self.io, entry)
    }

    pub(super) fn on_hello(&mut self, key: usize, res: i32) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        session.conn.inflight -= 1;
        if session.conn.phase == Phase::Closing {
            self.free_if_finished(key);
            return Ok(());
        }
        session.conn.last_active = self.now;
        let Stage::Hello(pending) = &mut session.stage else {
            return Ok(());
        };
        if res <= 0 {
            // The client ended (or reset) its stream before its hello was
            // whole: nothing went to a backend.
            return self.refuse_hello(key, Refusal::Closed);
        }
        let buf = &mut pending.buf;
        let len = buf.len() + res as usize;
        // SAFETY: the receive that just completed wrote `res` bytes into the
        // spare capacity it was given (at most `capacity - len` bytes), so
        // the first `len` bytes are initialised.
        unsafe { buf.set_len(len.min(buf.capacity())) };
        self.judge_hello(key)
    }

    /// Reads more, refuses, or routes by what the hello buffer holds now.
    fn judge_hello(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let Stage::Hello(pending) = &session.stage else {
            return Ok(());
        };
        let (route, server_name) = match hello::parse(&pending.buf) {
            Parsed::Incomplete => return self.read_hello(key),
            Parsed::Refused(reason) => return self.refuse_hello(key, reason),
            Parsed::Complete(h) => {
                let snap = &session.view.snap;
                if h.server_name.is_none() {
                    snap.shared.stats.hello_no_sni.fetch_add(1, Relaxed);
                }
                let name = h.server_name.as_ref().map(|n| n.as_str());
                (route_for(snap, name), name.map(Box::<str>::from))
            }
        };
        self.routed(key, route, server_name)
    }

    /// The hello chose a route: connect to one of its backends, with the
    /// hello's bytes to send first.
    fn routed(
        &mut self,
        key: usize,
        route: usize,
        server_name: Option<Box<str>>,
    ) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let Stage::Hello(pending) =
            std::mem::replace(&mut session.stage, Stage::Connect(Connecting::default()))
        else {
            return Ok(());
        };
        if let Some(r) = session.view.snap.routes.get(route) {
            r.stats.connections.fetch_add(1, Relaxed);
        }
        log::debug!(
            "conn {key}: ClientHello for {} -> route {route}",
            server_name.as_deref().unwrap_or("(no SNI)")
        );
        session.conn.dirs[UPSTREAM].bytes += pending.buf.len() as u64;
        session.route = route;
        session.server_name = server_name;
        session.stage = Stage::Connect(Connecting {
            preamble: Some(pending),
            ..Connecting::default()
        });
        self.connect_next(key)
    }

    /// Resets the client (a clean end would tell it the server closed) and
    /// counts why.
    pub(super) fn refuse_hello(&mut self, key: usize, reason: Refusal) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        if session.conn.phase == Phase::Closing {
            return Ok(());
        }
        let stats = &session.view.snap.shared.stats;
        if let Some(counter) = Refusal::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| stats.hello_refused.get(i))
        {
            counter.fetch_add(1, Relaxed);
        }
        log::debug!("conn {key}: ClientHello refused: {}", reason.label());
        session.conn.close(key, End::HelloRefused, &mut self.io)?;
        self.free_if_finished(key);
        Ok(())
    }

    /// The backend accepted: send it what goes before the client's stream
    /// (a PROXY header, then the client's bytes already read), or start
    /// relaying at once.
    pub(super) fn start_preamble(&mut self, key: usize, index: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let early = match &mut session.stage {
            Stage::Connect(connecting) => connecting.preamble.take(),
            _ => None,
        };
        let header = session.view.send_proxy[index].map(|version| {
            match (session.conn.client_addr, session.dest) {
                (Some(client), Some(dest)) => proxy::header(version, client, dest),
                // The client left before its address could be read: a
                // header that says so rather than a made-up address.
                _ => proxy::check_header(version),
            }
        });
        let pending = match (header, early) {
            (None, None) => return self.preamble_sent(key),
            (None, Some(early)) => early,
            (Some(header), None) => Pending::with(&header),
            (Some(mut header), Some(early)) => {
                header.extend_from_slice(&early.buf);
                Pending::with(&header)
            }
        };
        self.sessions[key].stage = Stage::Preamble(pending);
        self.send_preamble(key)
    }

    /// Sends the rest of the preamble to the backend just connected.
    fn send_preamble(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let Stage::Preamble(pending) = &session.stage else {
            return Ok(());
        };
        let rest = &pending.buf[pending.sent..];
        let entry = opcode::Send::new(
            types::Fd(session.conn.backend),
            rest.as_ptr(),
            rest.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(token(Op::Preamble, key));
        session.conn.submit(&mut self.io, entry)
    }

    pub(super) fn on_preamble(&mut self, key: usize, res: i32) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let conn = &mut session.conn;
        conn.inflight -= 1;
        if conn.phase == Phase::Closing {
            self.free_if_finished(key);
            return Ok(());
        }
        conn.last_active = self.now;
        let Stage::Preamble(pending) = &mut session.stage else {
            return Ok(());
        };
        if res <= 0 {
            let errno = -res;
            if matches!(errno, libc::ECONNRESET | libc::EPIPE | libc::ENOTCONN) {
                // The backend went away right after accepting: as in the relay.
                conn.close(key, End::BackendReset, &mut self.io)?;
            } else {
                // A send of nothing would repeat forever: a local failure too.
                conn.fail(key, LocalFailure::Relay, errno, &mut self.io)?;
            }
            self.free_if_finished(key);
            return Ok(());
        }
        pending.sent += res as usize;
        if pending.sent < pending.buf.len() {
            return self.send_preamble(key);
        }
        // The send completed: nothing points into the buffer any more.
        self.preamble_sent(key)
    }

    /// The backend has its preamble (or needs none): the relay starts, the
    /// TLS one on a terminating frontend.
    fn preamble_sent(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        if session.tls.is_some() {
            return self.tls_connected(key);
        }
        session.stage = Stage::Relay;
        session.conn.start_relay(key, &mut self.io)
    }
}
