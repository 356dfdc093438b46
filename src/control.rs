//! The admin Unix socket that `ringlb ctl` talks to: the only way to change
//! a running ringlb's state besides signals and the config file.
//!
//! Who may use it is who may write to it: the socket is created mode 0600
//! (umask set around `bind`, so it is never wider, not even for a moment),
//! owned by the user ringlb runs as. Every change is logged with the
//! peer's uid and pid (SO_PEERCRED).
//!
//! The protocol is one request line, one response, close:
//!
//! ```text
//! request:  show | show json | reload | ready | leave
//!           drain FRONTEND/BACKEND | enable FRONTEND/BACKEND
//!           disable FRONTEND/BACKEND | disable FRONTEND/BACKEND kill
//! response: "ok\n" then the output (maybe empty), or "error: WHY\n"
//! ```
//!
//! BACKEND is the backend's name or its address. It runs on its own thread
//! (a thread per connection, at most [`MAX_CLIENTS`], each with deadlines),
//! never on a worker.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::linux::fs::MetadataExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use crate::config::ConfigSource;
use crate::model::{AdminState, BackendShared, Snapshot};
use crate::server::{Leave, Server};
use crate::view::{self, BackendView, FrontendView};
use crate::worker::Command;

/// Connections served at once; more get "error: busy". An operator's
/// commands come one at a time; this only bounds a runaway script.
const MAX_CLIENTS: usize = 8;
/// A request line must arrive within this (a person types the command on
/// ringlb ctl's command line, not into the socket).
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// A response must be taken within this.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
const MAX_REQUEST: u64 = 4096;

/// Why the socket cannot be served.
#[derive(Debug)]
pub enum Error {
    /// A ringlb answers on that path already.
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    NotASocket(PathBuf),
    Io(PathBuf, std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::InUse(p) => write!(
                f,
                "admin socket {}: another ringlb is serving on it (stop it, or give another path)",
                p.display()
            ),
            Error::NotASocket(p) => write!(
                f,
                "admin socket {}: the path exists and is not a socket; remove it or give another",
                p.display()
            ),
            Error::Io(p, e) => write!(f, "admin socket {}: {e}", p.display()),
        }
    }
}

impl std::error::Error for Error {}

/// The socket file while ringlb serves on it; removed on drop, unless
/// another process has put its own there since.
pub struct Socket {
    path: PathBuf,
    /// (device, inode) of the file this process bound.
    identity: (u64, u64),
}

impl Drop for Socket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.st_dev(), m.st_ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a command reaches: the server, and where a reload reads from.
struct Context {
    server: Arc<Server>,
    source: Option<ConfigSource>,
    clients: AtomicUsize,
}

/// The socket bound, not yet served: bound before ringlb starts its
/// listeners, so that a ringlb refused here never takes a client.
pub struct Bound {
    listener: UnixListener,
    socket: Socket,
}

/// Binds the socket: a live ringlb on the path, or a path that cannot be
/// bound, is a start-up error.
pub fn bind(path: &Path) -> Result<Bound, Error> {
    let io = |e| Error::Io(path.to_path_buf(), e);
    clear_stale(path)?;
    let listener = bind_private(path).map_err(io)?;
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    Ok(Bound {
        listener,
        socket: Socket {
            path: path.to_path_buf(),
            identity: (meta.st_dev(), meta.st_ino()),
        },
    })
}

impl Bound {
    /// Serves the socket on its own thread from now on.
    pub fn serve(self, server: Arc<Server>, source: Option<ConfigSource>) -> Result<Socket, Error> {
        let Bound { listener, socket } = self;
        let context = Arc::new(Context {
            server,
            source,
            clients: AtomicUsize::new(0),
        });
        std::thread::Builder::new()
            .name("ringlb-ctl".into())
            .spawn(move || accept_loop(&listener, &context))
            .map_err(|e| Error::Io(socket.path.clone(), e))?;
        let path = socket.path.display();
        log::info!("admin socket on {path} (mode 0600): ringlb ctl --socket {path} show");
        Ok(socket)
    }
}

/// A socket file left by a ringlb that died is removed; one that a live
/// ringlb answers on is not: two must not steal each other's socket.
fn clear_stale(path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::Io(path.to_path_buf(), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::InUse(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            log::info!("admin socket {}: removing a stale socket", path.display());
            std::fs::remove_file(path).map_err(|e| Error::Io(path.to_path_buf(), e))
        }
        Err(e) => Err(Error::Io(path.to_path_buf(), e)),
    }
}

/// Binds with a umask that leaves the socket 0600 from its creation: a
/// chmod after bind would leave a moment where it is wider.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file-creation mask; no other
    // thread of ringlb creates files while it is narrowed.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the mask we replaced.
    unsafe { libc::umask(previous) };
    bound
}

fn accept_loop(listener: &UnixListener, context: &Arc<Context>) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                log::warn!("admin socket: accept failed: {e}");
                // Out of fds: wait for some to be freed rather than spin.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if context.clients.fetch_add(1, Relaxed) >= MAX_CLIENTS {
            context.clients.fetch_sub(1, Relaxed);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = (&stream).write_all(b"error: busy: too many ringlb ctl at once; retry\n");
            continue;
        }
        let shared = Arc::clone(context);
        let spawned = std::thread::Builder::new()
            .name("ringlb-ctl-client".into())
            .spawn(move || {
                client(stream, &shared);
                shared.clients.fetch_sub(1, Relaxed);
            });
        if let Err(e) = spawned {
            // The slot the closure would have given back.
            context.clients.fetch_sub(1, Relaxed);
            log::warn!("admin socket: cannot start a thread for a client: {e}");
        }
    }
}

/// Who is on the other end of the socket.
#[derive(Clone, Copy, Debug)]
struct Peer {
    uid: u32,
    pid: i32,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} pid {}", self.uid, self.pid)
    }
}

fn peer(stream: &UnixStream) -> Option<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the ucred we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(Peer {
        uid: cred.uid,
        pid: cred.pid,
    })
}

fn client(stream: UnixStream, context: &Context) {
    let _ = stream.set_read_timeout(Some(REQUEST_DEADLINE));
    let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
    let Some(peer) = peer(&stream) else {
        return;
    };
    let mut line = String::new();
    let read = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line);
    let response = match read {
        Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST => {
            Err("request line too long".to_string())
        }
        Ok(_) => handle(line.trim(), peer, context),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(format!("no request line within {REQUEST_DEADLINE:?}"))
        }
        Err(e) => Err(format!("cannot read the request: {e}")),
    };
    let text = match response {
        Ok(body) => format!("ok\n{body}"),
        Err(why) => format!("error: {}\n", why.replace('\n', " ")),
    };
    let _ = (&stream).write_all(text.as_bytes());
}

/// Runs one request; `Err` is the one line saying why it cannot be done.
fn handle(request: &str, peer: Peer, context: &Context) -> Result<String, String> {
    let words: Vec<&str> = request.split_ascii_whitespace().collect();
    match words.as_slice() {
        ["show"] => Ok(table(&shown(context))),
        ["show", "json"] => Ok(view::to_json(&shown(context)) + "\n"),
        ["reload"] => reload(peer, context),
        // For scripts (keepalived's vrrp_script, a BGP speaker's health
        // check): the same answer as HTTP /ready, as an exit code.
        ["ready"] if context.server.accepting().load(Relaxed) => Ok("ready\n".into()),
        ["ready"] => Err(not_ready(context)),
        ["leave"] => leave(peer, context),
        ["drain", target] => set(target, AdminState::Drain, false, peer, context),
        ["enable", target] => set(target, AdminState::Ready, false, peer, context),
        ["disable", target] => set(target, AdminState::Maint, false, peer, context),
        ["disable", target, "kill"] => set(target, AdminState::Maint, true, peer, context),
        [] => Err("empty request; try: show".into()),
        [command, ..] => Err(format!(
            "cannot take '{}': commands are show, show json, drain F/B, disable F/B [kill], \
             enable F/B, reload, ready, leave",
            truncate(command)
        )),
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

/// The view, with the address each frontend really listens on (the
/// config may say port 0).
fn shown(context: &Context) -> Vec<FrontendView> {
    let mut views = view::show(&context.server.published().load());
    let bound = context.server.frontends();
    for f in &mut views {
        if let Some((_, addr)) = bound.iter().find(|(b, _)| b.name() == f.name) {
            f.listen = addr.to_string();
        }
    }
    views
}

/// Why `ready` fails: a leave still serves new connections, a drain not.
fn not_ready(context: &Context) -> String {
    match context.server.leave_deadline() {
        Some(at) if at > std::time::Instant::now() => format!(
            "not ready: leaving, still serving new connections for {:?}, then draining",
            at.saturating_duration_since(std::time::Instant::now())
        ),
        _ => "not ready: draining, no new connections".into(),
    }
}

/// As SIGTERM: not ready at once, draining after the leave delay. The
/// answer comes at once; the process exits once the drain is done.
fn leave(peer: Peer, context: &Context) -> Result<String, String> {
    match context.server.leave(&format!("admin socket: {peer}")) {
        Leave::Started => Ok(format!(
            "leaving: not ready, still serving for {:?}, then draining\n",
            context.server.leave_delay()
        )),
        Leave::Already(left) => Ok(format!("already leaving: draining in {left:?}\n")),
        Leave::Draining => Err("ringlb is draining already".into()),
    }
}

fn reload(peer: Peer, context: &Context) -> Result<String, String> {
    let Some(source) = &context.source else {
        log::warn!("admin socket: {peer} asked for a reload; there is no config file to reload");
        return Err(
            "no config file to reload: ringlb was started from flags, not --config FILE".into(),
        );
    };
    if !context.server.accepting().load(Relaxed) {
        let why = format!("{}: the reload is ignored", not_ready(context));
        log::warn!("admin socket: {peer} asked for a reload; {why}");
        return Err(why);
    }
    log::info!(
        "admin socket: {peer} asked for a reload of {}",
        source.path.display()
    );
    match context.server.reload(source) {
        Ok(summary) => {
            let mut out = format!("{summary}\n");
            for line in &summary.restart_needed {
                let _ = writeln!(out, "warning: {line}");
            }
            Ok(out)
        }
        Err(e) => Err(format!(
            "reload failed, still serving the previous config: {e}"
        )),
    }
}

/// Sets a backend's admin state, under the control plane's lock so that a
/// reload (the other writer) cannot copy the old state into a new backend
/// at the same time. With `kill`, its established connections are reset
/// and every worker has done so before the answer.
fn set(
    target: &str,
    state: AdminState,
    kill: bool,
    peer: Peer,
    context: &Context,
) -> Result<String, String> {
    let mut control = context.server.lock();
    let backend = find(&control.snapshot, target)?;
    let before = backend.admin();
    backend.set_admin(state);
    let label = format!("{}/{}", backend.frontend, backend.name);
    // Asked for what already is: say so, rather than log a change.
    let mut done = if before == state {
        format!("{label}: already {state}")
    } else {
        format!("{label}: {before} -> {state}")
    };
    if kill {
        let open = backend.stats.active.load(Relaxed);
        let seq = control.send_all(|| Some(Command::CloseBackend(Arc::clone(&backend))));
        let late = control.wait_acks(seq);
        let _ = write!(done, "; its {open} established connections reset");
        if !late.is_empty() {
            let _ = write!(done, " (workers {late:?} did not confirm in time)");
        }
    }
    drop(control);
    log::info!("admin socket: {peer}: {done}");
    Ok(format!("{done}\n"))
}

/// The backend FRONTEND/BACKEND names in the snapshot in force: by name,
/// else by address.
fn find(snapshot: &Snapshot, target: &str) -> Result<Arc<BackendShared>, String> {
    // A backend (an address or a name like one) has no `/`; a frontend's
    // name may.
    let Some((frontend, backend)) = target.rsplit_once('/') else {
        return Err(format!(
            "'{}': give FRONTEND/BACKEND (the backend by name or address)",
            truncate(target)
        ));
    };
    let Some(f) = snapshot.frontend(frontend) else {
        let names: Vec<&str> = snapshot.frontends.iter().map(|f| f.name()).collect();
        return Err(format!(
            "no frontend '{}' (frontends: {})",
            truncate(frontend),
            names.join(", ")
        ));
    };
    if let Some(b) = f.backends.iter().find(|b| b.name == backend) {
        return Ok(Arc::clone(b));
    }
    let by_addr: Vec<&Arc<BackendShared>> = match backend.parse::<std::net::SocketAddr>() {
        Ok(addr) => f.backends.iter().filter(|b| b.addr == addr).collect(),
        Err(_) => Vec::new(),
    };
    match by_addr.as_slice() {
        [one] => Ok(Arc::clone(one)),
        [] => {
            let names: Vec<&str> = f.backends.iter().map(|b| b.name.as_str()).collect();
            Err(format!(
                "frontend {}: no backend '{}' (backends: {})",
                f.name(),
                truncate(backend),
                names.join(", ")
            ))
        }
        _ => Err(format!(
            "frontend {}: several backends have address {backend}; give the name",
            f.name()
        )),
    }
}

/// The `ringlb ctl show` table: a heading line per frontend, a row per
/// backend.
pub fn table(frontends: &[FrontendView]) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut out = String::new();
    for f in frontends {
        let _ = write!(
            out,
            "frontend {} on {} ({}): {} active, {} accepted",
            f.name, f.listen, f.mode, f.active, f.accepted
        );
        let queue = f.queue_text().map(|q| format!("; {q}"));
        let _ = writeln!(out, "{}", queue.unwrap_or_default());
        let mut rows = vec![HEADER.map(String::from).to_vec()];
        rows.extend(f.backends.iter().map(|b| row(b, now)));
        let widths: Vec<usize> = (0..HEADER.len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for r in rows {
            let mut line = String::from("  ");
            for (c, cell) in r.iter().enumerate() {
                if c + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    out
}

const HEADER: [&str; 14] = [
    "BACKEND",
    "ADDRESS",
    "HEALTH",
    "ADMIN",
    "WEIGHT",
    "ACTIVE",
    "SLOTS",
    "TOTAL",
    "CONN-FAILS",
    "CHECK",
    "CHECK-FAILS",
    "LAST-CHECK",
    "SINCE",
    "REASON",
];

fn row(b: &BackendView, now: f64) -> Vec<String> {
    let ago = |at: Option<f64>| at.map_or_else(|| "-".into(), |t| format!("{} ago", age(now - t)));
    let checked = b.last_check_text(ago);
    let mut reason = if b.reason.is_empty() {
        "-".to_string()
    } else {
        b.reason.clone()
    };
    if let Some(agent) = &b.agent {
        let said = agent
            .reply
            .as_deref()
            .or(agent.error.as_deref())
            .unwrap_or("");
        reason = format!("{reason}; agent: {said}");
    }
    vec![
        b.name.clone(),
        b.addr.clone(),
        b.health.to_string(),
        b.admin.clone(),
        b.weight_text(),
        b.active.to_string(),
        b.slots_text(),
        b.connections.to_string(),
        b.connect_failures.to_string(),
        b.check_text(),
        b.checks_failed.to_string(),
        checked,
        ago(b.changed_at),
        reason,
    ]
}

/// "4s", "3m12s", "2h5m", "3d4h": short enough for a column.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}
