//! The admin HTTP server (today: Prometheus metrics) on its own thread, so
//! a slow or hostile client never touches a worker.
//!
//! hyper serves HTTP/1.1 on a current-thread tokio runtime. What keeps it
//! bounded:
//! - at most [`Limits::max_connections`] at once; the slot is taken before
//!   `accept`, so at the cap new clients wait in the kernel's queue instead
//!   of being accepted and closed;
//! - a request's head must arrive within [`Limits::head`], and a whole
//!   connection (request, response, lingering close) ends by
//!   [`Limits::connection`]: a slow sender or reader frees its slot then;
//! - one request per connection (`Connection: close`): an idle keep-alive
//!   connection would hold a slot for nothing, and a scrape every few
//!   seconds does not need one.
//!
//! The pages ([`route`]), all read-only (GET and HEAD):
//! - `/metrics`: Prometheus text;
//! - `/stats`: the same data as `ringlb ctl show`, as JSON ([`view`]);
//! - `/ready`: 200 while ringlb takes new connections, 503 from the first
//!   drain or stop on, for keepalived, cloud balancers and Kubernetes;
//! - `/`: the status page for a person (`assets/status.html`), with the
//!   data of `/stats` inlined so it shows at once, then refreshed by the
//!   page every 2 s.
//!
//! What they read goes in [`State`].

use std::convert::Infallible;
use std::future::poll_fn;
use std::net::{Shutdown, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::logging::RateLimit;
use crate::metrics;
use crate::model::{Global, Published, ReloadStats, Snapshot};
use crate::view;

/// The admin server's own counters, for the metrics page.
pub struct AdminStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    pub limit: AtomicU64,
    /// Times a connection had to wait in the kernel's queue for a slot.
    pub limit_reached: AtomicU64,
    /// Connections cut for a request head or a connection past its deadline.
    pub timeouts: AtomicU64,
}

/// One admin server per process, so its counters are process-wide.
pub static STATS: AdminStats = AdminStats {
    accepted: AtomicU64::new(0),
    active: AtomicU64::new(0),
    limit: AtomicU64::new(0),
    limit_reached: AtomicU64::new(0),
    timeouts: AtomicU64::new(0),
};

/// What the pages read; shared by every connection: the snapshot in
/// force (replaced by each reload) and the control plane's counters.
pub struct State {
    pub published: Arc<Published>,
    /// `None` only for a server tested alone.
    pub global: Option<Arc<Global>>,
    pub reloads: Arc<ReloadStats>,
    /// False once ringlb drains or stops (see `Server::accepting`).
    pub accepting: Arc<AtomicBool>,
}

impl State {
    /// An empty state, for tests of the server alone.
    pub fn empty() -> State {
        State {
            published: Arc::new(Published::new(Arc::new(Snapshot {
                generation: 0,
                frontends: Vec::new(),
            }))),
            global: None,
            reloads: Arc::new(ReloadStats::default()),
            accepting: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// The bounds of the admin server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// From accept to the end of the request head. Prometheus sends its
    /// request at once; a client still typing after this is not a scraper.
    pub head: Duration,
    /// From accept to close, whatever happens: longer than Prometheus'
    /// default scrape timeout (10 s), so only a stuck reader hits it.
    pub connection: Duration,
    /// After the response, how long to drain what the client still sends
    /// (see [`linger`]).
    pub linger: Duration,
}

impl Limits {
    /// The production bounds, with the connection cap taken from the fd
    /// limit in force now (after the server raised it).
    pub fn for_this_process() -> Limits {
        Limits {
            max_connections: max_connections(fd_limit()),
            head: Duration::from_secs(5),
            connection: Duration::from_secs(30),
            linger: Duration::from_secs(2),
        }
    }
}

/// The admin server's share of the fd limit `nofile`: an eighth, at most
/// 4096 and at least 4. Whoever budgets ringlb's fds counts it: the data
/// path must not run out because of admin clients, nor the other way round.
pub fn max_connections(nofile: u64) -> usize {
    (nofile / 8).clamp(4, 4096) as usize
}

fn fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: the pointer is to a valid rlimit struct for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// Binds now (so a busy port is a start-up error), serves in the background.
pub fn serve(addr: SocketAddr, state: State) -> std::io::Result<SocketAddr> {
    serve_with(addr, state, Limits::for_this_process())
}

/// [`serve`] with explicit state and bounds.
pub fn serve_with(addr: SocketAddr, state: State, limits: Limits) -> std::io::Result<SocketAddr> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let listener = {
        // The tokio listener registers with the runtime it is made in.
        let _context = runtime.enter();
        TcpListener::from_std(bind(addr)?)?
    };
    let bound = listener.local_addr()?;
    STATS.limit.store(limits.max_connections as u64, Relaxed);
    std::thread::Builder::new()
        .name("ringlb-admin".into())
        .spawn(move || runtime.block_on(accept_loop(listener, Arc::new(state), limits)))?;
    log::info!(
        "admin server on {bound}: up to {} connections at once (more wait in the kernel's \
         queue), {:?} to send a request, {:?} per connection",
        limits.max_connections,
        limits.head,
        limits.connection
    );
    Ok(bound)
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    // Clients beyond the connection cap wait here: a deep queue keeps
    // their handshakes from being dropped while they wait.
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let http = Arc::new(http_builder(&limits));
    let mut full = RateLimit::new(Duration::from_secs(10));
    let mut failing = RateLimit::new(Duration::from_secs(10));
    loop {
        let Some(slot) = take_slot(&slots, &mut full, limits.max_connections).await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let (state, http) = (Arc::clone(&state), Arc::clone(&http));
                tokio::spawn(connection(stream, state, http, limits, Slot::new(slot)));
            }
            Err(e) => accept_failed(&e, &mut failing).await,
        }
    }
}

/// A free slot, waiting for one at the cap. `None` only if the semaphore
/// was closed, which nothing does.
async fn take_slot(
    slots: &Arc<Semaphore>,
    full: &mut RateLimit,
    cap: usize,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = Arc::clone(slots).try_acquire_owned() {
        return Some(slot);
    }
    STATS.limit_reached.fetch_add(1, Relaxed);
    if let Some(held_back) = full.allow(std::time::Instant::now()) {
        log::warn!(
            "admin server at its limit of {cap} connections: new ones wait in the kernel's \
             queue{}",
            full.suffix(held_back)
        );
    }
    Arc::clone(slots).acquire_owned().await.ok()
}

/// Out of fds or memory, accept fails until something is freed: pause
/// rather than spin. Other errors concern one client that is already gone.
async fn accept_failed(e: &std::io::Error, failing: &mut RateLimit) {
    let exhausted = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if let Some(held_back) = failing.allow(std::time::Instant::now()) {
        log::warn!(
            "admin server: accept failed: {e}{}",
            failing.suffix(held_back)
        );
    }
    if exhausted {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn http_builder(limits: &Limits) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head)
        .keep_alive(false)
        // A client that sends its request and then shuts down its side
        // (`nc -N`) still gets the whole response.
        .half_close(true)
        // The read buffer bounds a request head; hyper's default (~400 KB)
        // times the connection cap would be a lot of memory for junk.
        .max_buf_size(16 * 1024);
    http
}

/// A connection's hold on the cap, released however the connection ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit) -> Slot {
        STATS.accepted.fetch_add(1, Relaxed);
        STATS.active.fetch_add(1, Relaxed);
        Slot { _permit: permit }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        STATS.active.fetch_sub(1, Relaxed);
    }
}

/// How one connection ended.
enum Outcome {
    /// The response went out; drain and close.
    Answered,
    /// The head was too slow, or the whole connection: cut it.
    TimedOut,
    /// A malformed request (hyper wrote its 400 if it could) or a client
    /// that went away.
    Failed,
}

async fn connection(
    stream: TcpStream,
    state: Arc<State>,
    http: Arc<http1::Builder>,
    limits: Limits,
    _slot: Slot,
) {
    let deadline = Instant::now() + limits.connection;
    let _ = stream.set_nodelay(true);
    let service =
        service_fn(move |request| std::future::ready(Ok::<_, Infallible>(route(&state, &request))));
    let mut conn = http.serve_connection(TokioIo::new(stream), service);
    let mut expired = pin!(tokio::time::sleep_until(deadline));
    // Polled by hand rather than with `timeout` so that the socket can be
    // taken back from hyper whatever happened, to close it the right way.
    let outcome = poll_fn(|cx| match Pin::new(&mut conn).poll_without_shutdown(cx) {
        Poll::Ready(Ok(())) => Poll::Ready(Outcome::Answered),
        Poll::Ready(Err(e)) if e.is_timeout() => Poll::Ready(Outcome::TimedOut),
        Poll::Ready(Err(_)) => Poll::Ready(Outcome::Failed),
        Poll::Pending => expired.as_mut().poll(cx).map(|()| Outcome::TimedOut),
    })
    .await;
    let stream = conn.into_parts().io.into_inner();
    match outcome {
        Outcome::Answered | Outcome::Failed => {
            linger(stream, deadline.min(Instant::now() + limits.linger)).await;
        }
        Outcome::TimedOut => {
            STATS.timeouts.fetch_add(1, Relaxed);
            reset(stream);
        }
    }
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const HTML: &str = "text/html; charset=utf-8";
/// The status page; its script renders the JSON and readiness that replace
/// [`STATS_MARK`] and [`READY_MARK`], then fetches `/stats` and `/ready`
/// every 2 s.
const STATUS_PAGE: &str = include_str!("../assets/status.html");
const STATS_MARK: &str = "/*STATS*/null";
const READY_MARK: &str = "/*READY*/null";

type Page = fn(&State) -> Response<Full<Bytes>>;

/// The pages. A path that exists but not for this method is 405.
fn route(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let page: Page = match request.uri().path() {
        "/metrics" => |state| {
            text(
                StatusCode::OK,
                PROMETHEUS_TEXT,
                metrics::render(
                    &state.published.load(),
                    state.global.as_deref(),
                    &state.reloads,
                ),
            )
        },
        "/stats" => |state| text(StatusCode::OK, JSON, stats_json(state)),
        "/ready" => ready,
        "/" => |state| text(StatusCode::OK, HTML, status_page(state)),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                PLAIN,
                "not found; try /, /stats, /ready or /metrics\n".into(),
            );
        }
    };
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD: nothing changes over HTTP\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    page(state)
}

fn stats_json(state: &State) -> String {
    view::to_json(&view::show(&state.published.load()))
}

/// Load balancers and probes read the status; people read the body.
fn ready(state: &State) -> Response<Full<Bytes>> {
    if state.accepting.load(Relaxed) {
        text(StatusCode::OK, PLAIN, "ready\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            "not ready: leaving or draining\n".into(),
        )
    }
}

/// The page with the data inlined, so it shows without waiting for a
/// fetch (and without script, a reader still gets the JSON in the source).
/// Every `<` is escaped so no string in the data can end or disturb the
/// script element (see [`inline_page`]).
fn status_page(state: &State) -> String {
    inline_page(&stats_json(state), state.accepting.load(Relaxed))
}

/// The page with its first data inlined. Inside a <script>, any `<` in the
/// data (a backend's reply quoted in a check's failure reason) could start
/// `</script>` or `<!--`, which ends the script or changes how the parser
/// reads the rest: JSON lets every `<` be written as \u003c. The marker the
/// data could also contain is filled in first.
fn inline_page(json: &str, ready: bool) -> String {
    let data = json.replace('<', "\\u003c");
    STATUS_PAGE
        .replacen(READY_MARK, if ready { "true" } else { "false" }, 1)
        .replacen(STATS_MARK, &data, 1)
}

/// hyper sets Content-Length from the body, and leaves the body out for
/// HEAD.
fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    // Every page is the state of now: a cached copy would lie.
    headers.insert(
        CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    // The status page loads nothing from elsewhere; say so, and keep a
    // browser from guessing another type for the metrics or JSON.
    headers.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        hyper::header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
        ),
    );
    response
}

/// Closes after the response without losing its tail: closing a socket
/// with unread input (a request body, a pipelined request) makes the kernel
/// send a reset, which discards what it has not yet delivered of the
/// response. So: end our side, then read and drop what the client sends
/// until it closes too (as HTTP/1.1 clients do on `Connection: close`), or
/// `until`.
async fn linger(stream: TcpStream, until: Instant) {
    if socket2::SockRef::from(&stream)
        .shutdown(Shutdown::Write)
        .is_err()
    {
        return;
    }
    let mut sink = [0u8; 4096];
    while let Ok(Ok(())) = tokio::time::timeout_at(until, stream.readable()).await {
        match stream.try_read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Ends a connection with a reset: the client sees an error, not an end of
/// stream that could pass for a complete answer.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_hostile_check_reply_cannot_break_the_status_page() {
        // Found by review: a backend answering a check with this blanked
        // the page (`<!--<script` kept the page's own </script> from
        // closing it) and took the readiness marker.
        let reason = r#"reply did not match (got "<!--<script>/*READY*/null</script>")"#;
        let json = format!(r#"[{{"reason":"{}"}}]"#, reason.replace('"', "\\\""));
        let page = inline_page(&json, true);
        let inlined = page
            .lines()
            .find(|l| l.starts_with("const initial = "))
            .unwrap_or("");
        assert!(
            !inlined.contains('<'),
            "a `<` in the inlined data: {inlined}"
        );
        assert!(inlined.contains(r"\u003c!--\u003cscript>"), "{inlined}");
        // The page's own elements still close where they should.
        assert_eq!(
            page.matches("</script>").count(),
            STATUS_PAGE.matches("</script>").count()
        );
        assert!(page.contains("const initialReady = true;"));
    }

    use super::*;
    use std::io::{Read, Write};

    /// The connection deadline is what frees a slot from a client that is
    /// slow after its request head (a reader of a page larger than the
    /// socket buffers); with a head deadline longer than it, a slow head
    /// shows the same cut without a page of megabytes.
    #[test]
    fn a_connection_past_its_deadline_is_reset() {
        let limits = Limits {
            max_connections: 4,
            head: Duration::from_secs(60),
            connection: Duration::from_millis(500),
            linger: Duration::from_secs(1),
        };
        let state = State::empty();
        let addr = serve_with(SocketAddr::from(([127, 0, 0, 1], 0)), state, limits)
            .expect("bind on loopback");
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .expect("send");
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let error = client
            .read_to_end(&mut rest)
            .expect_err("a reset, not an end");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
        assert!(rest.is_empty());
        assert!(started.elapsed() < Duration::from_secs(15));
    }
}
