//! TLS termination on the worker's ring: the record layer in user space.
//!
//! Each side of a terminated connection (the client, the backend) receives
//! into its own buffer; a TLS side feeds the bytes to rustls and takes the
//! plaintext out, which goes to the other side: as is to a plain backend,
//! through rustls (encrypted) to a TLS one (`backend-tls`). What a side is
//! to send waits in `queued` while a send runs on `sending`: neither vector
//! is touched (so never moved) while the kernel reads it. There is no
//! kTLS in this kernel (CONFIG_TLS is off) and no splice on a TLS side.
//!
//! Backpressure: a side receives only while the other side has less than
//! [`HIGH_WATER`] bytes waiting to be sent, so a slow reader holds at most
//! that much (plus one receive) per direction.
//!
//! End of stream: a client's close_notify or FIN becomes a FIN to the
//! backend once its bytes are out; a backend's FIN becomes close_notify
//! and a FIN to the client. A TLS error after the handshake resets both
//! (a clean end would pass a prefix off as the whole stream).

use std::io::{BufRead, ErrorKind, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use io_uring::{opcode, types};

use super::{Connecting, Stage, Worker};
use crate::model::FrontendSnapshot;
use crate::relay::{Conn, DOWNSTREAM, End, Phase, UPSTREAM};
use crate::tls::Failure;
use crate::uring::{self, Io, Op, token};

pub const CLIENT: usize = 0;
pub const BACKEND: usize = 1;
/// One TLS record (16 KiB of plaintext) with its overhead.
const RECV_SIZE: usize = 16 * 1024 + 512;
/// Bytes a side may have waiting to be sent before the other side stops
/// receiving.
const HIGH_WATER: usize = 64 * 1024;
// What came after a PROXY header fits one receive buffer (`tls_early`).
const _: () = assert!(crate::proxy::MAX_HEADER <= RECV_SIZE);

#[derive(Default)]
struct Side {
    tls: Option<rustls::Connection>,
    rx: Box<[u8]>,
    recv_armed: bool,
    sending: Vec<u8>,
    sent: usize,
    send_armed: bool,
    queued: Vec<u8>,
    /// The peer ended its stream (FIN or close_notify).
    eof: bool,
    /// The other side ended: pass the end on once this side's bytes are out.
    end_pending: bool,
    close_notify_sent: bool,
    /// The end was passed on (shutdown(SHUT_WR)).
    shut: bool,
}

impl Side {
    fn new(tls: Option<rustls::Connection>) -> Side {
        Side {
            tls,
            rx: vec![0u8; RECV_SIZE].into_boxed_slice(),
            ..Side::default()
        }
    }

    fn backlog(&self) -> usize {
        self.sending.len() - self.sent + self.queued.len()
    }

    /// Moves what rustls has to send (handshake, alerts, records) into
    /// `queued`.
    fn flush_tls(&mut self) {
        if let Some(tls) = &mut self.tls {
            while tls.wants_write() {
                match tls.write_tls(&mut self.queued) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }

    /// Plaintext for this side's peer.
    fn deliver(&mut self, plain: &[u8]) -> std::io::Result<()> {
        match &mut self.tls {
            Some(tls) => {
                tls.writer().write_all(plain)?;
                self.flush_tls();
            }
            None => self.queued.extend_from_slice(plain),
        }
        Ok(())
    }
}

/// A terminated connection's TLS state; boxed in its session, so the
/// buffers operations point into never move.
pub struct TlsState {
    sides: [Side; 2],
    /// The backend accepted: its side may receive and send.
    connected: bool,
}

impl TlsState {
    /// The backend's TLS client (`backend-tls`) is made now, not once the
    /// client's handshake is done: the client's first plaintext may come
    /// with its Finished, and must go through it, never around it.
    pub fn new(
        config: &Arc<rustls::ServerConfig>,
        backend: Option<&crate::tls::TlsClient>,
    ) -> Result<Box<TlsState>, rustls::Error> {
        let mut server = rustls::ServerConnection::new(Arc::clone(config))?;
        // Our own HIGH_WATER bounds what waits; rustls' limit would make a
        // write of plaintext partial for no gain.
        server.set_buffer_limit(None);
        let client = match backend {
            Some(b) => {
                let mut c =
                    rustls::ClientConnection::new(Arc::clone(&b.config), b.server_name.clone())?;
                c.set_buffer_limit(None);
                Some(c.into())
            }
            None => None,
        };
        let mut backend_side = Side::new(client);
        backend_side.flush_tls();
        Ok(Box::new(TlsState {
            sides: [Side::new(Some(server.into())), backend_side],
            connected: false,
        }))
    }

    /// The end of `dir`'s stream (a FIN, or close_notify) was passed on
    /// to its sink: the connection is half-closed that way, and the fin
    /// timeouts apply as to a plain relay.
    pub fn half_closed(&self, dir: usize) -> bool {
        let sink = if dir == UPSTREAM { BACKEND } else { CLIENT };
        self.sides[sink].shut
    }

    fn handshaking(&self) -> bool {
        self.sides[CLIENT]
            .tls
            .as_ref()
            .is_some_and(|t| t.is_handshaking())
    }
}

/// What a step of the TLS relay asks the worker to do next.
enum Next {
    Nothing,
    /// The client handshake just completed: route and connect.
    Handshaken,
    Close(End),
    /// The stream cannot go on (a bad record, a record layer that refused
    /// plaintext): both peers are reset, whichever side was at fault.
    Broken(End),
    /// Failed handshake: counted, the alert sent, then closed.
    Refuse(Failure),
}

fn fd(conn: &Conn, side: usize) -> types::Fd {
    types::Fd(if side == CLIENT {
        conn.client
    } else {
        conn.backend
    })
}

fn reset_of(side: usize) -> End {
    if side == CLIENT {
        End::ClientReset
    } else {
        End::BackendReset
    }
}

impl TlsState {
    fn arm_recv(
        &mut self,
        key: usize,
        side: usize,
        conn: &mut Conn,
        io: &mut Io,
    ) -> std::io::Result<()> {
        let other = &self.sides[1 - side];
        let s = &self.sides[side];
        if conn.phase == Phase::Closing
            || s.recv_armed
            || s.eof
            || (side == BACKEND && !self.connected)
            || other.backlog() >= HIGH_WATER
        {
            return Ok(());
        }
        let s = &mut self.sides[side];
        let entry = opcode::Recv::new(fd(conn, side), s.rx.as_mut_ptr(), s.rx.len() as u32)
            .build()
            .user_data(token(
                if side == CLIENT {
                    Op::TlsRecv0
                } else {
                    Op::TlsRecv1
                },
                key,
            ));
        s.recv_armed = true;
        conn.submit(io, entry)
    }

    fn kick_send(
        &mut self,
        key: usize,
        side: usize,
        conn: &mut Conn,
        io: &mut Io,
    ) -> std::io::Result<()> {
        let s = &mut self.sides[side];
        if conn.phase == Phase::Closing || s.send_armed || (side == BACKEND && !self.connected) {
            return Ok(());
        }
        if s.sent == s.sending.len() {
            // Only with no send in flight: the vectors may move now.
            s.sending.clear();
            s.sent = 0;
            std::mem::swap(&mut s.sending, &mut s.queued);
        }
        if s.sent == s.sending.len() {
            return Ok(());
        }
        let rest = &s.sending[s.sent..];
        let entry = opcode::Send::new(fd(conn, side), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token(
                if side == CLIENT {
                    Op::TlsSend0
                } else {
                    Op::TlsSend1
                },
                key,
            ));
        s.send_armed = true;
        conn.submit(io, entry)
    }

    /// Passes an end of stream on once the side's bytes are out.
    fn maybe_shut(&mut self, side: usize, conn: &Conn) {
        let s = &mut self.sides[side];
        if !s.end_pending || s.shut || (side == BACKEND && !self.connected) {
            return;
        }
        if s.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
            // A backend-tls session still in its handshake holds the
            // client's plaintext until it completes: a close_notify now
            // would overtake that plaintext, and mid-handshake the backend
            // takes it for a broken record (DecodeError) and resets.
            return;
        }
        if s.tls.is_some() && !s.close_notify_sent {
            s.close_notify_sent = true;
            if let Some(tls) = &mut s.tls {
                tls.send_close_notify();
            }
            s.flush_tls();
        }
        if s.backlog() == 0 && !s.send_armed {
            uring::shutdown_write(fd(conn, side).0);
            s.shut = true;
        }
    }

    /// Everything both ways has ended and been passed on.
    fn done(&self) -> bool {
        self.sides.iter().all(|s| s.eof && s.shut)
    }

    /// Feeds received bytes to a side (through rustls if it is TLS) and
    /// hands the plaintext to the other side.
    fn received(&mut self, side: usize, len: usize, conn: &mut Conn) -> Next {
        let [a, b] = &mut self.sides;
        let (source, sink) = if side == CLIENT { (a, b) } else { (b, a) };
        let dir = if side == CLIENT { UPSTREAM } else { DOWNSTREAM };
        let Some(tls) = &mut source.tls else {
            conn.dirs[dir].bytes += len as u64;
            return match sink.deliver(&source.rx[..len]) {
                Ok(()) => Next::Nothing,
                Err(_) => Next::Broken(reset_of(side)),
            };
        };
        let mut data = &source.rx[..len];
        let was_handshaking = tls.is_handshaking();
        while !data.is_empty() {
            if tls.read_tls(&mut data).is_err() {
                return Next::Broken(reset_of(side));
            }
            if let Err(e) = tls.process_new_packets() {
                // The alert rustls prepared goes out before the end.
                source.flush_tls();
                if side == CLIENT && was_handshaking {
                    return Next::Refuse(Failure::of(&e));
                }
                log::debug!("TLS error on side {side}: {e}");
                return Next::Broken(reset_of(side));
            }
            // Plaintext is handed on from rustls' own buffer: no copy
            // through (and no zeroing of) a buffer of ours per record.
            loop {
                let mut reader = tls.reader();
                match reader.fill_buf() {
                    Ok([]) => {
                        source.eof = true;
                        sink.end_pending = true;
                        break;
                    }
                    Ok(chunk) => {
                        let n = chunk.len();
                        conn.dirs[dir].bytes += n as u64;
                        if sink.deliver(chunk).is_err() {
                            return Next::Broken(reset_of(1 - side));
                        }
                        reader.consume(n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        source.eof = true;
                        sink.end_pending = true;
                        break;
                    }
                }
            }
        }
        let handshaken = side == CLIENT && was_handshaking && !tls.is_handshaking();
        source.flush_tls();
        if handshaken {
            return Next::Handshaken;
        }
        Next::Nothing
    }

    /// A receive or send on `side` failed: a client gone mid-handshake
    /// is a failed handshake, anything later the peer's reset.
    fn failed(&self, side: usize) -> Next {
        if side == CLIENT && self.handshaking() {
            Next::Refuse(Failure::Closed)
        } else {
            Next::Close(reset_of(side))
        }
    }

    /// The peer of `side` ended its stream (FIN).
    fn ended(&mut self, side: usize) -> Next {
        let handshaking = self.handshaking();
        let [a, b] = &mut self.sides;
        let (source, sink) = if side == CLIENT { (a, b) } else { (b, a) };
        if let Some(tls) = &mut source.tls {
            // Tells rustls the transport ended: a TLS peer that did not
            // send close_notify first may have been cut short.
            let _ = tls.read_tls(&mut &[][..]);
            let _ = tls.process_new_packets();
        }
        if side == CLIENT && handshaking {
            return Next::Refuse(Failure::Closed);
        }
        source.eof = true;
        sink.end_pending = true;
        Next::Nothing
    }
}

impl Worker {
    /// A terminating frontend's new client: the handshake starts with its
    /// first bytes.
    pub(super) fn start_tls(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let (Some(tls), conn) = (&mut session.tls, &mut session.conn) else {
            return Ok(());
        };
        tls.arm_recv(key, CLIENT, conn, &mut self.io)
    }

    /// The client's bytes that came with its PROXY header: the start of
    /// its handshake, fed in as if just received.
    pub(super) fn tls_early(&mut self, key: usize, bytes: &[u8]) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let (Some(tls), conn) = (&mut session.tls, &mut session.conn) else {
            return Ok(());
        };
        let side = &mut tls.sides[CLIENT];
        // No receive was armed on this side yet: its buffer is free.
        let len = bytes.len().min(side.rx.len());
        side.rx[..len].copy_from_slice(&bytes[..len]);
        let next = tls.received(CLIENT, len, conn);
        self.tls_next(key, next)
    }

    pub(super) fn on_tls_recv(&mut self, key: usize, side: usize, res: i32) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let (Some(tls), conn) = (&mut session.tls, &mut session.conn) else {
            return Ok(());
        };
        conn.inflight -= 1;
        tls.sides[side].recv_armed = false;
        if conn.phase == Phase::Closing {
            self.free_if_finished(key);
            return Ok(());
        }
        conn.last_active = self.now;
        let next = match res {
            0 => tls.ended(side),
            n if n < 0 => tls.failed(side),
            n => tls.received(side, n as usize, conn),
        };
        self.tls_next(key, next)
    }

    pub(super) fn on_tls_send(&mut self, key: usize, side: usize, res: i32) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let (Some(tls), conn) = (&mut session.tls, &mut session.conn) else {
            return Ok(());
        };
        conn.inflight -= 1;
        tls.sides[side].send_armed = false;
        if conn.phase == Phase::Closing {
            self.free_if_finished(key);
            return Ok(());
        }
        conn.last_active = self.now;
        if res < 0 {
            let next = tls.failed(side);
            return self.tls_next(key, next);
        }
        tls.sides[side].sent += res as usize;
        self.tls_next(key, Next::Nothing)
    }

    /// After any step: act on what it asked, then keep both sides moving.
    fn tls_next(&mut self, key: usize, next: Next) -> std::io::Result<()> {
        match next {
            Next::Nothing => {}
            Next::Handshaken => self.handshaken(key)?,
            Next::Close(end) => {
                self.sessions[key].conn.close(key, end, &mut self.io)?;
                self.free_if_finished(key);
                return Ok(());
            }
            Next::Broken(end) => {
                let conn = &mut self.sessions[key].conn;
                // A peer's reset is passed on to the other one only: here
                // both are still there, and a FIN to either would pass the
                // part it got off as the whole stream.
                uring::set_linger_zero(conn.client);
                if conn.backend >= 0 {
                    uring::set_linger_zero(conn.backend);
                }
                conn.close(key, end, &mut self.io)?;
                self.free_if_finished(key);
                return Ok(());
            }
            Next::Refuse(failure) => return self.refuse_handshake(key, failure),
        }
        self.tls_pump(key)
    }

    /// Sends what waits, receives where there is room, passes ends on.
    pub(super) fn tls_pump(&mut self, key: usize) -> std::io::Result<()> {
        let Some(session) = self.sessions.get_mut(key) else {
            return Ok(());
        };
        let (Some(tls), conn) = (&mut session.tls, &mut session.conn) else {
            return Ok(());
        };
        let io = &mut self.io;
        for side in [CLIENT, BACKEND] {
            tls.maybe_shut(side, conn);
            tls.kick_send(key, side, conn, io)?;
            tls.arm_recv(key, side, conn, io)?;
        }
        if tls.done() && conn.phase != Phase::Closing {
            conn.close(key, End::Done, io)?;
            self.free_if_finished(key);
        }
        Ok(())
    }

    /// The client handshake is done: count it, pick the route by the name
    /// it asked for, and connect (plaintext may already wait).
    fn handshaken(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        let snap = Arc::clone(&session.view.snap);
        let Some(tls) = &mut session.tls else {
            return Ok(());
        };
        let Some(rustls::Connection::Server(server)) = &tls.sides[CLIENT].tls else {
            return Ok(());
        };
        count_handshake(&snap, server);
        let name = server.server_name().map(Box::<str>::from);
        let route = super::stages::route_for(&snap, name.as_deref());
        if let Some(r) = snap.routes.get(route) {
            r.stats.connections.fetch_add(1, Relaxed);
        }
        session.route = route;
        session.server_name = name;
        session.stage = Stage::Connect(Connecting::default());
        self.connect_next(key)
    }

    /// The backend accepted a terminated connection: both sides move.
    pub(super) fn tls_connected(&mut self, key: usize) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        session.stage = Stage::Relay;
        session.conn.phase = Phase::Relaying;
        if let Some(tls) = &mut session.tls {
            tls.connected = true;
        }
        self.tls_pump(key)
    }

    /// A failed or late handshake: counted; the alert (if any) goes out
    /// with a plain send, then the connection closes. A late one is reset.
    pub(super) fn refuse_handshake(&mut self, key: usize, failure: Failure) -> std::io::Result<()> {
        let session = &mut self.sessions[key];
        if session.conn.phase == Phase::Closing {
            return Ok(());
        }
        let stats = &session.view.snap.shared.stats.tls;
        if let Some(i) = Failure::ALL.iter().position(|f| *f == failure) {
            stats.failures[i].fetch_add(1, Relaxed);
        }
        log::debug!("conn {key}: TLS handshake failed: {}", failure.label());
        let client = session.conn.client;
        if let Some(tls) = &mut session.tls {
            let side = &mut tls.sides[CLIENT];
            let alert = &side.queued;
            if !alert.is_empty() && !side.send_armed {
                // SAFETY: a non-blocking send(2) from our own vector on the
                // client socket, which is open; no io_uring send is in
                // flight on it. An alert is a few bytes: it fits the socket
                // buffer, and a short send only loses the alert.
                unsafe {
                    libc::send(
                        client,
                        alert.as_ptr().cast(),
                        alert.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
            }
        }
        if failure == Failure::Timeout {
            uring::set_linger_zero(client);
        }
        session
            .conn
            .close(key, End::HandshakeFailed, &mut self.io)?;
        self.free_if_finished(key);
        Ok(())
    }
}

fn count_handshake(snap: &FrontendSnapshot, server: &rustls::ServerConnection) {
    let stats = &snap.shared.stats.tls;
    stats.handshakes.fetch_add(1, Relaxed);
    if server.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        stats.resumed.fetch_add(1, Relaxed);
    }
    match server.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_2) => stats.tls12.fetch_add(1, Relaxed),
        _ => stats.tls13.fetch_add(1, Relaxed),
    };
}
