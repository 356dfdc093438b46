//! Configuration: what a frontend is, how it is read from a TOML file, and
//! the checks that turn a bad file into one line that names the problem.
//!
//! The command line (`cli.rs`) builds the same [`Config`] for a single
//! frontend, so every setting has one meaning whichever way it arrives.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use std::sync::Arc;
use toml::Spanned;

use crate::acl::{self, Acl, Cidr, PrefixSet};
use crate::check::{HttpExpect, HttpRequest, Kind, Matcher, Pattern, Script, Step};
pub use crate::edge::EdgeConfig;
use crate::proxy::{self, ProxyConfig, Version};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// HAProxy's `tcp-request inspect-delay` is commonly set to 5s for SNI.
pub const DEFAULT_CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a leaving ringlb keeps serving while reporting not ready: long
/// enough for keepalived with a 1 s advert and a 1 s check to move the
/// address (see `Config::leave_delay`); a few seconds more on a stop.
pub const DEFAULT_LEAVE_DELAY: Duration = Duration::from_secs(2);
/// HAProxy's default `retries`: a connection makes at most 4 connect
/// attempts, so a client waits at most 4 connect timeouts (plus the short
/// delays before trying a backend again) before it is reset.
pub const DEFAULT_RETRIES: u32 = 3;
/// Receive buffers per worker (16 KiB each: 16 MiB). Only messages in
/// flight hold one, so this bounds memory, not connections.
pub const DEFAULT_BUFFERS: u32 = 1024;
/// io_uring's limit for a provided-buffer ring.
pub const MAX_BUFFERS: u32 = 32768;
const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);
/// The size of one receive buffer (worker.rs's `BUFFER_SIZE`), for the
/// memory the `buffers` setting commits at start.
pub const BUFFER_BYTES: u64 = 16 * 1024;
/// The largest config file read: 80,000 frontends take 7 MiB, and a path
/// such as /dev/zero must end in an error, not in all of memory.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024 * 1024;
/// Frontend and backend names end up in log lines and metric labels: only
/// characters that need no escaping in either, and that an address written
/// as a name (`[::1]:80`, `db1.example.com:5432`, `[fe80::1%2]:80`) needs.
const NAME_PUNCTUATION: &str = "-_.:[]@/%";
const MAX_NAME_BYTES: usize = 255;

/// How a frontend spreads its connections over its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Round robin over every backend that is up.
    ActiveActive,
    /// Everything to the first backend that is up, in the order given.
    ActivePassive,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::ActiveActive => "active-active",
            Mode::ActivePassive => "active-passive",
        })
    }
}

/// How a frontend chooses a backend for each new connection: HAProxy's
/// `balance` algorithms of the same names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Smooth weighted round robin, exact over each cycle across workers.
    Roundrobin,
    /// Fewest active connections relative to weight; ties take turns.
    Leastconn,
    /// A consistent hash (Maglev) of the client's IP address.
    Source,
    /// The first usable backend in the order given (active-passive).
    First,
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::Roundrobin => "roundrobin",
            Balance::Leastconn => "leastconn",
            Balance::Source => "source",
            Balance::First => "first",
        })
    }
}

impl Balance {
    /// `mode` as the shorthand it is: which algorithm it stands for.
    pub fn for_mode(mode: Mode) -> Balance {
        match mode {
            Mode::ActiveActive => Balance::Roundrobin,
            Mode::ActivePassive => Balance::First,
        }
    }

    /// The `mode` an algorithm falls under: only `first` sends everything
    /// to one backend.
    pub fn mode(self) -> Mode {
        match self {
            Balance::First => Mode::ActivePassive,
            _ => Mode::ActiveActive,
        }
    }
}

/// The balancing settings of one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceConfig {
    pub algorithm: Balance,
    /// With no non-backup backend usable, spread over every usable backup
    /// (HAProxy's `option allbackups`) instead of the first one only.
    pub allbackups: bool,
    /// A backend that comes back up ramps from 1/20 of its weight to all
    /// of it over this time (HAProxy's `slowstart`).
    pub slowstart: Option<Duration>,
}

impl BalanceConfig {
    pub fn new(algorithm: Balance) -> BalanceConfig {
        BalanceConfig {
            algorithm,
            allbackups: false,
            slowstart: None,
        }
    }
}

/// What happens to established connections when their backend is marked
/// down (HAProxy's `on-marked-down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnDown {
    /// Leave them alone: a backend that fails its checks may still finish
    /// the work it has.
    Keep,
    /// Close them, so clients reconnect to a backend that is up.
    Shutdown,
}

/// The access log of a frontend: one line per connection, at its end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessLog {
    #[default]
    Off,
    /// `key=value` fields, for people and grep.
    Text,
    /// One JSON object, for log shippers.
    Json,
}

/// `log-format` as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum LogFormat {
    Text,
    Json,
}

/// The failover watcher's settings for one frontend.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CheckConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// What the check does once connected: nothing (a connect check),
    /// send/expect steps, or a ready-made kind. A send/expect check
    /// catches a backend that completes handshakes but no longer answers
    /// (a stopped process).
    pub script: Script,
    /// The interval while the state is changing: up after a failed check,
    /// or down after a good one (HAProxy's `fastinter`).
    pub fastinter: Option<Duration>,
    /// The interval while down (HAProxy's `downinter`).
    pub downinter: Option<Duration>,
    /// Check this port or address instead of the one traffic goes to; a
    /// backend's own `check-port` / `check-address` wins.
    pub port: Option<u16>,
    pub address: Option<IpAddr>,
    /// An agent check (HAProxy's `agent-check`) runs for every backend
    /// with a port for it, here or in its table.
    pub agent_port: Option<u16>,
    pub agent_address: Option<IpAddr>,
    /// Default: the check interval.
    pub agent_interval: Option<Duration>,
    pub agent_send: Option<Vec<u8>>,
    /// `check-send-proxy`: each check starts with a PROXY header of this
    /// version that carries no client (v2 LOCAL, v1 UNKNOWN).
    pub proxy: Option<Version>,
}

impl CheckConfig {
    /// HAProxy's rule of thumb: a check may take as long as the interval,
    /// but waiting more than a second only delays failover.
    pub fn default_timeout(interval: Duration) -> Duration {
        interval.min(Duration::from_secs(1))
    }

    /// A connect check every `interval`, every other setting at its default.
    pub fn new(interval: Duration) -> CheckConfig {
        CheckConfig {
            interval,
            timeout: CheckConfig::default_timeout(interval),
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            script: Script::connect(),
            fastinter: None,
            downinter: None,
            port: None,
            address: None,
            agent_port: None,
            agent_address: None,
            agent_interval: None,
            agent_send: None,
            proxy: None,
        }
    }

    /// Where `backend`'s checks go: its check address and port, else the
    /// frontend's, else its traffic address.
    pub fn target(&self, backend: &BackendConfig) -> SocketAddr {
        let ip = backend
            .check_address
            .or(self.address)
            .unwrap_or(backend.addr.ip());
        let port = backend
            .check_port
            .or(self.port)
            .unwrap_or(backend.addr.port());
        SocketAddr::new(ip, port)
    }

    /// Where `backend`'s agent answers, if it has one.
    pub fn agent_target(&self, backend: &BackendConfig) -> Option<SocketAddr> {
        let port = backend.agent_port.or(self.agent_port)?;
        let ip = backend
            .agent_address
            .or(self.agent_address)
            .or(backend.check_address)
            .or(self.address)
            .unwrap_or(backend.addr.ip());
        Some(SocketAddr::new(ip, port))
    }
}

/// HAProxy's default and ceiling for `weight`.
pub const DEFAULT_WEIGHT: u32 = 1;
pub const MAX_WEIGHT: u32 = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    /// As the user wrote it (a host name stays a host name in the logs),
    /// or the table's `name`.
    pub name: String,
    /// Share of new connections relative to the others, 0 to 256; 0 takes
    /// none (HAProxy's `weight`).
    pub weight: u32,
    /// Takes traffic only when no non-backup backend is usable.
    pub backup: bool,
    /// Most connections at once to this backend; more wait in a queue.
    pub maxconn: Option<u32>,
    /// Check another port than the one traffic goes to (a sidecar).
    pub check_port: Option<u16>,
    /// Check another address than the one traffic goes to.
    pub check_address: Option<IpAddr>,
    /// Its agent's port and address (HAProxy's `agent-port`, `agent-addr`).
    pub agent_port: Option<u16>,
    pub agent_address: Option<IpAddr>,
    /// This backend's `send-proxy`, over the frontend's.
    pub send_proxy: Option<Version>,
}

impl BackendConfig {
    /// A backend given as a bare address: every setting at its default.
    pub fn new(addr: SocketAddr, name: String) -> BackendConfig {
        BackendConfig {
            addr,
            name,
            weight: DEFAULT_WEIGHT,
            backup: false,
            maxconn: None,
            check_port: None,
            check_address: None,
            agent_port: None,
            agent_address: None,
            send_proxy: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Always the one `balance` falls under (active-passive for `first`).
    pub mode: Mode,
    pub balance: BalanceConfig,
    /// In priority order: in active-passive mode the first is the active one.
    pub backends: Vec<BackendConfig>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub check: CheckConfig,
    /// Active-passive: return to the active backend once it is up again.
    pub failback: bool,
    pub on_down: OnDown,
    /// Most client connections at once on this frontend; more wait in the
    /// kernel's accept queue until one ends, so backends are never swamped.
    pub maxconn: Option<u32>,
    /// How long a connection waits for a slot when every usable backend is
    /// at its maxconn (HAProxy's `timeout queue`); the connect timeout when
    /// unset.
    pub timeout_queue: Option<Duration>,
    /// Connect attempts after the first, across backends and on the same
    /// one (HAProxy's `retries`).
    pub retries: u32,
    /// `log = true`, in the format of `log-format`.
    pub access_log: AccessLog,
    /// `send-proxy`, `accept-proxy` and their settings.
    pub proxy: ProxyConfig,
    /// Source ACL, per-source limits, half-closed timeouts.
    pub edge: EdgeConfig,
    /// SNI routes and TLS settings: none by default (plain TCP).
    pub tls: TlsSettings,
}

impl FrontendConfig {
    /// The frontend's own backends: those of its routes follow them in
    /// `backends`.
    pub fn own_backends(&self) -> std::ops::Range<usize> {
        0..self
            .tls
            .routes
            .first()
            .map_or(self.backends.len(), |r| r.backends.start)
    }
}

/// What a frontend does with TLS: route by the ClientHello's server name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// `[[frontend.route]]` tables, in the file's order.
    pub routes: Vec<RouteConfig>,
    /// How long a client has to send its whole ClientHello.
    pub client_hello_timeout: Duration,
    /// `tls = { ... }`: TLS is terminated here.
    pub server: Option<crate::tls::TlsServer>,
    /// `backend-tls = true`: the backend side is TLS again.
    pub backend: Option<crate::tls::TlsClient>,
}

impl Default for TlsSettings {
    fn default() -> TlsSettings {
        TlsSettings {
            routes: Vec::new(),
            client_hello_timeout: DEFAULT_CLIENT_HELLO_TIMEOUT,
            server: None,
            backend: None,
        }
    }
}

impl TlsSettings {
    /// Whether connections start by reading a ClientHello themselves (SNI
    /// passthrough; a terminating frontend has rustls read it).
    pub fn reads_hello(&self) -> bool {
        !self.routes.is_empty() && self.server.is_none()
    }

    /// Whether routes choose backends (by the hello's or the handshake's
    /// server name).
    pub fn routes_by_name(&self) -> bool {
        !self.routes.is_empty()
    }
}

/// Default time for a whole TLS handshake (HAProxy has none of its own;
/// its `timeout client` applies).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// rustls allocates a session cache whole when the config is built.
const MAX_SESSION_CACHE: usize = 1_000_000;

/// A `[[frontend.route]]`: the connections whose server name matches go to
/// its own backends, with its own balance mode (its backends are checked
/// with the frontend's check settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteConfig {
    pub name: String,
    /// Host names and `*.domain` wildcards, lower case.
    pub sni: Vec<String>,
    pub mode: Mode,
    pub failback: bool,
    /// Its backends' place in the frontend's `backends`; each is named
    /// `ROUTE/ADDRESS` there, so its metrics and state are its own.
    pub backends: std::ops::Range<usize>,
}

impl FrontendConfig {
    /// The PROXY header backend `index` gets, if any.
    pub fn send_proxy(&self, index: usize) -> Option<Version> {
        self.backends
            .get(index)
            .and_then(|b| b.send_proxy)
            .or(self.proxy.send)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub workers: usize,
    /// Size of each worker's receive-buffer ring. When every buffer is held
    /// by a send to a slow peer, receives move to splice, which needs none.
    pub buffers: u32,
    pub drain_timeout: Duration,
    /// On SIGTERM or `ringlb ctl leave`: how long ringlb reports not ready
    /// (`/ready` 503, `ringlb ctl ready` 1) while still accepting, before
    /// it drains. It must exceed the time the routing layer in front needs
    /// to move traffic away (VRRP: 3 adverts plus the check interval; BGP:
    /// the withdrawal's propagation), or clients meet a closed port.
    pub leave_delay: Duration,
    /// Where the admin HTTP server (metrics) listens, if anywhere.
    pub stats: Option<SocketAddr>,
    /// The Unix socket `ringlb ctl` talks to, if any.
    pub admin_socket: Option<PathBuf>,
    /// Who ringlb runs as once everything is bound (privdrop.rs).
    pub user: Option<String>,
    pub group: Option<String>,
    pub frontends: Vec<FrontendConfig>,
}

/// `text` with every control character (and the Unicode ones that move or
/// reorder what a terminal shows) escaped as `\n`, `\u{1b}`: messages
/// quote values from config files, list files and flags, and a newline
/// in a value would forge a second log line, an escape sequence repaint
/// the operator's terminal. Used where such messages leave the process.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    };
    if !text.contains(unsafe_char) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// Why a configuration was refused. Each variant renders as one line that
/// names the file, the line and the key where there is one, with the
/// user's text in it made [`printable`].
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    TooLarge {
        path: PathBuf,
    },
    Parse {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    Invalid {
        origin: String,
        line: Option<usize>,
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Rendered whole, then escaped once: every message is covered,
        // whichever check quoted what.
        f.write_str(&printable(&self.render()))
    }
}

impl ConfigError {
    fn render(&self) -> String {
        match self {
            ConfigError::Read { path, source } => {
                format!("cannot read config file {}: {source}", path.display())
            }
            ConfigError::TooLarge { path } => format!(
                "config file {} is larger than {} MiB: refused (is it the right file?)",
                path.display(),
                MAX_CONFIG_BYTES >> 20
            ),
            ConfigError::Parse {
                origin,
                line,
                column,
                message,
            } => format!("{origin}:{line}:{column}: {message}"),
            ConfigError::Invalid {
                origin,
                line: Some(line),
                message,
            } => format!("{origin}:{line}: {message}"),
            ConfigError::Invalid {
                origin,
                line: None,
                message,
            } => format!("{origin}: {message}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses `500ms`, `2s`, `5m`, `1h`, `1d`, `100us`; a bare number is
/// milliseconds, as in HAProxy. Zero is refused: every timeout here must
/// be able to fire.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    if number.is_empty() {
        return Err(format!(
            "invalid duration '{text}': expected a number and a unit, e.g. 500ms, 2s, 5m"
        ));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration '{text}': number too large"))?;
    let duration = match unit {
        "" | "ms" => Duration::from_millis(n),
        "us" => Duration::from_micros(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => {
            return Err(format!(
                "invalid duration '{text}': unknown unit '{unit}' (use us, ms, s, m, h or d)"
            ));
        }
    };
    if duration.is_zero() {
        return Err(format!("invalid duration '{text}': must be more than zero"));
    }
    // Deadlines are computed as now + duration; a year is far beyond any
    // sensible timeout and far from overflowing.
    if duration > MAX_DURATION {
        return Err(format!("invalid duration '{text}': at most 365d"));
    }
    Ok(duration)
}

/// A duration that may be zero ("0", "0s"): a leave delay of none.
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    let digits = text
        .trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic());
    if !digits.is_empty() && digits.bytes().all(|b| b == b'0') {
        // The unit must still be one ringlb knows ("0x" is a typo).
        return parse_duration(&text.trim().replacen('0', "1", 1)).map(|_| Duration::ZERO);
    }
    parse_duration(text)
}

/// Understands `\n`, `\r`, `\t`, `\0`, `\\` and `\xHH`, so binary health
/// check payloads fit on a command line.
pub fn parse_escapes(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let value = std::str::from_utf8(&hex)
                    .ok()
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        format!("invalid escape in '{text}': \\x needs two hex digits")
                    })?;
                out.push(value);
            }
            Some(other) => {
                return Err(format!(
                    "invalid escape '\\{}' in '{text}' (use \\n, \\r, \\t, \\0, \\\\ or \\xHH)",
                    other as char
                ));
            }
            None => return Err(format!("invalid escape in '{text}': trailing backslash")),
        }
    }
    Ok(out)
}

/// Whether [`parse_address`] may ask the resolver: off only in the fuzz
/// harness and its corpus replay, where arbitrary input must not turn
/// into DNS queries.
static RESOLVE_NAMES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

pub fn resolve_names(on: bool) {
    RESOLVE_NAMES.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Resolves `host:port` or `ip:port` (IPv6 as `[::1]:80`) to the first
/// address the resolver gives.
pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !text.contains(':') {
        return Err(format!(
            "invalid address '{text}': expected HOST:PORT, e.g. 127.0.0.1:8080"
        ));
    }
    if !RESOLVE_NAMES.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(format!(
            "invalid address '{text}': host names are not resolved here"
        ));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("invalid address '{text}': the name resolves to no address")),
        Err(e) => Err(format!("invalid address '{text}': {e}")),
    }
}

/// The file as written: every setting optional so that the defaults live
/// in one place ([`RawFrontend::resolve`]) and unknown keys are refused,
/// because a misspelt `idle_timout` must not silently become the default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    workers: Option<Spanned<usize>>,
    buffers: Option<Spanned<u32>>,
    drain_timeout: Option<Spanned<String>>,
    leave_delay: Option<Spanned<String>>,
    stats: Option<Spanned<String>>,
    admin_socket: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    #[serde(default)]
    frontend: Vec<Spanned<RawFrontend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFrontend {
    name: Option<Spanned<String>>,
    listen: Spanned<String>,
    mode: Option<Spanned<Mode>>,
    balance: Option<Spanned<Balance>>,
    allbackups: Option<bool>,
    slowstart: Option<Spanned<String>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    check_interval: Option<Spanned<String>>,
    check_timeout: Option<Spanned<String>>,
    rise: Option<u32>,
    fall: Option<u32>,
    check_send: Option<Spanned<String>>,
    check_expect: Option<Spanned<String>>,
    check_expect_regex: Option<Spanned<String>>,
    check: Option<Spanned<RawCheck>>,
    check_http: Option<Spanned<String>>,
    check_http_host: Option<Spanned<String>>,
    check_http_status: Option<Spanned<Vec<u16>>>,
    check_http_expect: Option<Spanned<String>>,
    check_port: Option<Spanned<u16>>,
    check_address: Option<Spanned<String>>,
    fastinter: Option<Spanned<String>>,
    downinter: Option<Spanned<String>>,
    agent_port: Option<Spanned<u16>>,
    agent_address: Option<Spanned<String>>,
    agent_interval: Option<Spanned<String>>,
    agent_send: Option<Spanned<String>>,
    failback: Option<bool>,
    on_down: Option<OnDown>,
    maxconn: Option<u32>,
    timeout_queue: Option<Spanned<String>>,
    retries: Option<u32>,
    log: Option<bool>,
    log_format: Option<Spanned<LogFormat>>,
    timeout_client_hello: Option<Spanned<String>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    tls: Option<Spanned<RawTls>>,
    backend_tls: Option<Spanned<bool>>,
    backend_ca: Option<Spanned<String>>,
    backend_server_name: Option<Spanned<String>>,
    send_proxy: Option<Version>,
    check_send_proxy: Option<Spanned<bool>>,
    accept_proxy: Option<Spanned<bool>>,
    accept_proxy_from: Option<Spanned<Vec<String>>>,
    timeout_proxy_header: Option<Spanned<String>>,
    allow: Option<Spanned<Vec<Spanned<String>>>>,
    deny: Option<Spanned<Vec<Spanned<String>>>>,
    allow_file: Option<Spanned<String>>,
    deny_file: Option<Spanned<String>>,
    max_conn_per_source: Option<Spanned<u32>>,
    max_rate_per_source: Option<Spanned<u32>>,
    timeout_client_fin: Option<Spanned<String>>,
    timeout_server_fin: Option<Spanned<String>>,
}

/// `tls = { cert = "...", key = "...", ... }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
    /// More certificates, chosen by the names they hold.
    #[serde(default)]
    certs: Vec<RawCert>,
    /// `min-version = "1.2" | "1.3"`, also spelled `tls-min-version` (the
    /// name the TLS issue and HAProxy-minded operators reach for); giving
    /// both is an error, not a silent pick.
    #[serde(alias = "tls-min-version")]
    min_version: Option<String>,
    #[serde(default)]
    alpn: Vec<String>,
    client_ca: Option<String>,
    handshake_timeout: Option<String>,
    tickets: Option<bool>,
    session_cache: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    cert: String,
    key: String,
}

/// A backend as written: `"10.0.0.11:8080"` or a table with settings.
enum RawBackend {
    Address(String),
    Table(RawBackendTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBackendTable {
    address: String,
    name: Option<String>,
    weight: Option<u32>,
    backup: Option<bool>,
    maxconn: Option<u32>,
    check_port: Option<u16>,
    check_address: Option<String>,
    agent_port: Option<u16>,
    agent_address: Option<String>,
    send_proxy: Option<Version>,
}

/// By hand rather than `untagged`: serde's untagged error ("did not match
/// any variant") would hide which key of the table is wrong.
impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address such as \"10.0.0.11:8080\" or a table with address = ...")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Address(v.to_string()))
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                map: M,
            ) -> Result<RawBackend, M::Error> {
                let de = serde::de::value::MapAccessDeserializer::new(map);
                RawBackendTable::deserialize(de).map(RawBackend::Table)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `check = "redis"` or `check = [ { send = "..." }, { expect = "..." } ]`.
enum RawCheck {
    Kind(String),
    Steps(Vec<Spanned<RawStep>>),
}

/// One step of a written check: exactly one of send, expect, expect-regex.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawStep {
    send: Option<String>,
    expect: Option<String>,
    expect_regex: Option<String>,
    timeout: Option<String>,
}

/// By hand, as [`RawBackend`]: a string or a list, each with its own error.
impl<'de> Deserialize<'de> for RawCheck {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawCheck;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a kind such as \"redis\" or a list of steps such as [ { send = \"PING\\r\\n\" }, { expect = \"+PONG\" } ]",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawCheck, E> {
                Ok(RawCheck::Kind(v.to_string()))
            }
            fn visit_seq<S: serde::de::SeqAccess<'de>>(
                self,
                mut seq: S,
            ) -> Result<RawCheck, S::Error> {
                let mut steps = Vec::new();
                while let Some(step) = seq.next_element::<Spanned<RawStep>>()? {
                    steps.push(step);
                }
                Ok(RawCheck::Steps(steps))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl RawStep {
    fn resolve(&self, check_timeout: Duration) -> Result<Step, String> {
        let timeout = self
            .timeout
            .as_deref()
            .map(|t| parse_duration(t).map_err(|e| format!("timeout: {e}")))
            .transpose()?;
        if let Some(t) = timeout
            && t > check_timeout
        {
            return Err(format!(
                "timeout {t:?} is longer than the check's timeout ({check_timeout:?}): the check would end first"
            ));
        }
        let step = match (&self.send, &self.expect, &self.expect_regex) {
            (Some(send), None, None) => {
                if timeout.is_some() {
                    return Err("timeout is for expect steps (a send takes the check's)".into());
                }
                return parse_escapes(send)
                    .map(Step::Send)
                    .map_err(|e| format!("send: {e}"));
            }
            (None, Some(expect), None) => {
                Matcher::Contains(parse_escapes(expect).map_err(|e| format!("expect: {e}"))?)
            }
            (None, None, Some(regex)) => {
                Matcher::Regex(Pattern::new(regex).map_err(|e| format!("expect-regex: {e}"))?)
            }
            _ => return Err("each step takes exactly one of send, expect or expect-regex".into()),
        };
        Ok(Step::Expect {
            matcher: step,
            timeout,
        })
    }
}

impl RawBackend {
    fn resolve(&self) -> Result<BackendConfig, String> {
        let table = match self {
            RawBackend::Address(text) => {
                // Before resolving: a name that cannot be a label is
                // refused as such, not as a failed lookup.
                check_name(text)?;
                return Ok(BackendConfig::new(parse_address(text)?, text.clone()));
            }
            RawBackend::Table(table) => table,
        };
        let name = table.name.as_ref().unwrap_or(&table.address);
        check_name(name)?;
        let addr = parse_address(&table.address)?;
        let ip = |key: &str, a: &Option<String>| {
            a.as_ref()
                .map(|a| {
                    a.parse::<IpAddr>()
                        .map_err(|_| format!("{key}: '{a}' is not an IP address"))
                })
                .transpose()
        };
        let check_address = ip("check-address", &table.check_address)?;
        Ok(BackendConfig {
            addr,
            name: name.clone(),
            weight: table.weight.unwrap_or(DEFAULT_WEIGHT),
            backup: table.backup.unwrap_or(false),
            maxconn: table.maxconn,
            check_port: table.check_port,
            check_address,
            agent_port: table.agent_port,
            agent_address: ip("agent-address", &table.agent_address)?,
            send_proxy: table.send_proxy,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRoute {
    name: Option<Spanned<String>>,
    #[serde(default)]
    sni: Vec<Spanned<String>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    mode: Option<Mode>,
    failback: Option<bool>,
}

/// Turns byte offsets from the TOML parser into the line a user sees.
struct Source<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    }

    fn invalid<T>(&self, at: &Spanned<T>, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            line: Some(self.line_col(at.span().start).0),
            message,
        }
    }

    /// A fault of one frontend, at the line of the key it is about.
    fn fault(&self, frontend: &Spanned<RawFrontend>, fault: Fault) -> ConfigError {
        let raw = frontend.get_ref();
        let span = match fault.at {
            At::Name => raw.name.as_ref().map(Spanned::span),
            At::Listen => Some(raw.listen.span()),
            At::Backend(k) => raw.backends.get(k).map(Spanned::span),
            At::Frontend => None,
        };
        let start = span.unwrap_or_else(|| frontend.span()).start;
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            line: Some(self.line_col(start).0),
            message: fault.message,
        }
    }

    fn duration(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<Duration>, ConfigError> {
        value
            .as_ref()
            .map(|v| {
                parse_duration(v.get_ref()).map_err(|e| self.invalid(v, format!("{key}: {e}")))
            })
            .transpose()
    }

    /// A CIDR list from `key = [...]` and `key-file = "PATH"` (relative to
    /// the config file's directory); `None` when neither is given.
    fn cidrs(
        &self,
        inline: &Option<Spanned<Vec<Spanned<String>>>>,
        file: &Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<Vec<Cidr>>, ConfigError> {
        if inline.is_none() && file.is_none() {
            return Ok(None);
        }
        let mut cidrs = Vec::new();
        if let Some(list) = inline {
            if list.get_ref().is_empty() {
                let message = format!(
                    "{key}: an empty list would refuse every client; remove the key, or list                      the clients"
                );
                return Err(self.invalid(list, message));
            }
            for entry in list.get_ref() {
                let cidr = Cidr::parse(entry.get_ref())
                    .map_err(|e| self.invalid(entry, format!("{key}: {e}")))?;
                cidrs.push(cidr);
            }
        }
        if let Some(path) = file {
            let base = Path::new(self.origin).parent().unwrap_or(Path::new(""));
            let listed = acl::read_list(&base.join(path.get_ref()))
                .map_err(|e| self.invalid(path, format!("{key}-file: {e}")))?;
            cidrs.extend(listed);
        }
        Ok(Some(cidrs))
    }

    fn bytes(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, ConfigError> {
        value
            .as_ref()
            .map(|v| parse_escapes(v.get_ref()).map_err(|e| self.invalid(v, format!("{key}: {e}"))))
            .transpose()
    }
}

impl RawFrontend {
    fn resolve(&self, index: usize, src: &Source<'_>) -> Result<FrontendConfig, ConfigError> {
        let listen = parse_address(self.listen.get_ref())
            .map_err(|e| src.invalid(&self.listen, format!("listen: {e}")))?;
        let mut backends = self
            .backends
            .iter()
            .map(|b| {
                b.get_ref()
                    .resolve()
                    .map_err(|e| src.invalid(b, format!("backends: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let routes = self.routes(&mut backends, src)?;
        let balance = BalanceConfig {
            algorithm: self.algorithm(src)?,
            allbackups: self.allbackups.unwrap_or(false),
            slowstart: src.duration(&self.slowstart, "slowstart")?,
        };
        let proxy = self.proxy(src)?;
        let mut check = self.check_agent(self.check_config(src)?, &backends, src)?;
        check.proxy = self.check_send_proxy(&proxy, &check, &backends, src)?;
        Ok(FrontendConfig {
            name: self
                .name
                .as_ref()
                .map_or_else(|| format!("frontend{index}"), |n| n.get_ref().clone()),
            listen,
            mode: balance.algorithm.mode(),
            balance,
            backends,
            connect_timeout: src
                .duration(&self.connect_timeout, "connect-timeout")?
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            idle_timeout: src
                .duration(&self.idle_timeout, "idle-timeout")?
                .unwrap_or(DEFAULT_IDLE_TIMEOUT),
            check,
            failback: self.failback.unwrap_or(true),
            on_down: self.on_down.unwrap_or(OnDown::Keep),
            maxconn: self.maxconn,
            timeout_queue: src.duration(&self.timeout_queue, "timeout-queue")?,
            retries: self.retries.unwrap_or(DEFAULT_RETRIES),
            access_log: self.access_log(src)?,
            proxy,
            edge: self.edge(src)?,
            tls: TlsSettings {
                routes,
                client_hello_timeout: src
                    .duration(&self.timeout_client_hello, "timeout-client-hello")?
                    .unwrap_or(DEFAULT_CLIENT_HELLO_TIMEOUT),
                server: self.tls_server(index, src)?,
                backend: self.tls_client(src)?,
            },
        })
    }

    /// Loads the certificates of `tls = { ... }`: a file that cannot be
    /// used fails the config (and so a reload, which keeps the old ones).
    fn tls_server(
        &self,
        index: usize,
        src: &Source<'_>,
    ) -> Result<Option<crate::tls::TlsServer>, ConfigError> {
        let Some(spanned) = &self.tls else {
            return Ok(None);
        };
        let raw = spanned.get_ref();
        let fail = |message: String| src.invalid(spanned, format!("tls: {message}"));
        let mut certs = Vec::new();
        match (&raw.cert, &raw.key) {
            (Some(cert), Some(key)) => certs.push((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => {}
            _ => return Err(fail("give both cert and key".into())),
        }
        certs.extend(
            raw.certs
                .iter()
                .map(|c| (PathBuf::from(&c.cert), PathBuf::from(&c.key))),
        );
        if certs.is_empty() {
            return Err(fail("give cert and key (the default certificate)".into()));
        }
        let min_version = match raw.min_version.as_deref() {
            None | Some("1.2") => crate::tls::Version::Tls12,
            Some("1.3") => crate::tls::Version::Tls13,
            Some(other) => {
                return Err(fail(format!(
                    "min-version: '{other}': TLS 1.2 and 1.3 are supported (\"1.2\" or \"1.3\")"
                )));
            }
        };
        if raw.alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
            return Err(fail("alpn: each protocol is 1 to 255 bytes".into()));
        }
        let handshake_timeout = raw
            .handshake_timeout
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| fail(format!("handshake-timeout: {e}")))?
            .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
        // rustls sizes the cache up front.
        let session_cache = raw
            .session_cache
            .unwrap_or(crate::tls::DEFAULT_SESSION_CACHE);
        if session_cache > MAX_SESSION_CACHE {
            return Err(fail(format!(
                "session-cache: {session_cache}: at most {MAX_SESSION_CACHE} sessions (0 keeps none)"
            )));
        }
        let options = crate::tls::ServerOptions {
            certs,
            min_version,
            alpn: raw.alpn.clone(),
            client_ca: raw.client_ca.as_ref().map(PathBuf::from),
            handshake_timeout,
            tickets: raw.tickets.unwrap_or(true),
            session_cache,
        };
        let name = self
            .name
            .as_ref()
            .map_or_else(|| format!("frontend{index}"), |n| n.get_ref().clone());
        crate::tls::server(&name, &options).map(Some).map_err(fail)
    }

    /// `backend-tls = true`, with `backend-ca` and `backend-server-name`.
    fn tls_client(&self, src: &Source<'_>) -> Result<Option<crate::tls::TlsClient>, ConfigError> {
        let on = self.backend_tls.as_ref().is_some_and(|b| *b.get_ref());
        if !on {
            for (key, value) in [
                ("backend-ca", &self.backend_ca),
                ("backend-server-name", &self.backend_server_name),
            ] {
                if let Some(v) = value {
                    return Err(src.invalid(v, format!("{key}: add backend-tls = true")));
                }
            }
            return Ok(None);
        }
        let Some(name) = &self.backend_server_name else {
            let at = self.backend_tls.as_ref().map(Spanned::span);
            return Err(ConfigError::Invalid {
                origin: src.origin.to_string(),
                line: at.map(|s| src.line_col(s.start).0),
                message: "backend-tls: give backend-server-name, the name the backends' \
                          certificates are checked for"
                    .into(),
            });
        };
        let ca = self.backend_ca.as_ref().map(|c| PathBuf::from(c.get_ref()));
        crate::tls::client(ca.as_deref(), name.get_ref())
            .map(Some)
            .map_err(|e| src.invalid(name, e))
    }

    /// The `[[frontend.route]]` tables; their backends are appended to
    /// `backends`.
    fn routes(
        &self,
        backends: &mut Vec<BackendConfig>,
        src: &Source<'_>,
    ) -> Result<Vec<RouteConfig>, ConfigError> {
        // A route without its own mode balances as its frontend does.
        let inherited = self.algorithm(src)?.mode();
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut patterns: HashMap<String, String> = HashMap::new();
        let mut routes = Vec::with_capacity(self.route.len());
        for (i, spanned) in self.route.iter().enumerate() {
            let raw = spanned.get_ref();
            let name = raw
                .name
                .as_ref()
                .map_or_else(|| format!("route{}", i + 1), |n| n.get_ref().clone());
            let at_name = |message: String| match &raw.name {
                Some(n) => src.invalid(n, message),
                None => src.invalid(spanned, message),
            };
            check_name(&name).map_err(|e| at_name(format!("route name: {e}")))?;
            if name == DEFAULT_ROUTE || name.contains('/') {
                return Err(at_name(format!(
                    "route name: '{name}' is reserved (the frontend's own backends), or has a /"
                )));
            }
            if names.insert(name.clone(), ()).is_some() {
                return Err(at_name(format!("two routes are named {name}")));
            }
            if raw.sni.is_empty() {
                return Err(src.invalid(spanned, format!("route {name}: give sni = [...]")));
            }
            let mut sni = Vec::with_capacity(raw.sni.len());
            for pattern in &raw.sni {
                let lower = pattern.get_ref().to_ascii_lowercase();
                crate::hello::check_pattern(&lower)
                    .map_err(|e| src.invalid(pattern, format!("route {name}: sni: {e}")))?;
                if let Some(other) = patterns.insert(lower.clone(), name.clone()) {
                    return Err(src.invalid(
                        pattern,
                        format!("route {name}: sni: {lower} is also in route {other}"),
                    ));
                }
                sni.push(lower);
            }
            if raw.backends.is_empty() {
                return Err(src.invalid(spanned, format!("route {name}: no backend")));
            }
            let start = backends.len();
            for b in &raw.backends {
                let backend = b
                    .get_ref()
                    .resolve()
                    .map(|backend| BackendConfig {
                        name: format!("{name}/{}", backend.name),
                        ..backend
                    })
                    .map_err(|e| src.invalid(b, format!("route {name}: backends: {e}")))?;
                backends.push(backend);
            }
            check_backends(&backends[start..]).map_err(|fault| {
                let at = match fault.at {
                    At::Backend(k) => raw.backends.get(k).map_or(spanned.span(), |b| b.span()),
                    _ => spanned.span(),
                };
                ConfigError::Invalid {
                    origin: src.origin.to_string(),
                    line: Some(src.line_col(at.start).0),
                    message: format!("route {name}: {}", fault.message),
                }
            })?;
            routes.push(RouteConfig {
                name,
                sni,
                mode: raw.mode.unwrap_or(inherited),
                failback: raw.failback.or(self.failback).unwrap_or(true),
                backends: start..backends.len(),
            });
        }
        Ok(routes)
    }

    fn edge(&self, src: &Source<'_>) -> Result<EdgeConfig, ConfigError> {
        let positive = |value: &Option<Spanned<u32>>, key: &str| match value {
            Some(v) if *v.get_ref() == 0 => {
                Err(src.invalid(v, format!("{key} must be at least 1")))
            }
            v => Ok(v.as_ref().map(|v| *v.get_ref())),
        };
        Ok(EdgeConfig {
            acl: self.acl(src)?.map(Arc::new),
            max_conn_per_source: positive(&self.max_conn_per_source, "max-conn-per-source")?,
            max_rate_per_source: positive(&self.max_rate_per_source, "max-rate-per-source")?,
            client_fin_timeout: src.duration(&self.timeout_client_fin, "timeout-client-fin")?,
            server_fin_timeout: src.duration(&self.timeout_server_fin, "timeout-server-fin")?,
        })
    }

    /// The inline lists and the list files together; `None` without any.
    fn acl(&self, src: &Source<'_>) -> Result<Option<Acl>, ConfigError> {
        let allow = src.cidrs(&self.allow, &self.allow_file, "allow")?;
        let deny = src.cidrs(&self.deny, &self.deny_file, "deny")?;
        if allow.is_none() && deny.is_none() {
            return Ok(None);
        }
        Ok(Some(Acl {
            allow: allow.map(|a| PrefixSet::new(&a)),
            deny: PrefixSet::new(&deny.unwrap_or_default()),
        }))
    }

    /// The PROXY protocol keys, each fault at its own line.
    fn proxy(&self, src: &Source<'_>) -> Result<ProxyConfig, ConfigError> {
        let from = self
            .accept_proxy_from
            .as_ref()
            .map(|list| {
                proxy::parse_from(list.get_ref(), "accept-proxy-from")
                    .map_err(|e| src.invalid(list, e))
            })
            .transpose()?;
        let timeout = src.duration(&self.timeout_proxy_header, "timeout-proxy-header")?;
        let on = self.accept_proxy.as_ref().is_some_and(|a| *a.get_ref());
        let accept = proxy::accept(on, from, timeout).map_err(|e| {
            // At the key that is there: the switch, or the list without it.
            let at = self.accept_proxy.as_ref().map(Spanned::span);
            let at = at.or(self.accept_proxy_from.as_ref().map(Spanned::span));
            let at = at.or(self.timeout_proxy_header.as_ref().map(Spanned::span));
            ConfigError::Invalid {
                origin: src.origin.to_string(),
                line: at.map(|span| src.line_col(span.start).0),
                message: e,
            }
        })?;
        Ok(ProxyConfig {
            send: self.send_proxy,
            accept,
        })
    }

    fn check_send_proxy(
        &self,
        proxy: &ProxyConfig,
        check: &CheckConfig,
        backends: &[BackendConfig],
        src: &Source<'_>,
    ) -> Result<Option<Version>, ConfigError> {
        let Some(on) = &self.check_send_proxy else {
            return Ok(default_check_send_proxy(proxy.send, check, backends));
        };
        check_send_proxy(*on.get_ref(), proxy.send, backends).map_err(|e| src.invalid(on, e))
    }

    /// `balance` wins; `mode` alone is its shorthand (active-active is
    /// roundrobin, active-passive is first). Both given must agree: an
    /// active-passive frontend that balances is a contradiction, not a
    /// choice to guess at.
    fn algorithm(&self, src: &Source<'_>) -> Result<Balance, ConfigError> {
        match (&self.balance, &self.mode) {
            (None, None) => Ok(Balance::Roundrobin),
            (None, Some(mode)) => Ok(Balance::for_mode(*mode.get_ref())),
            (Some(balance), None) => Ok(*balance.get_ref()),
            (Some(balance), Some(mode)) => {
                let (b, m) = (*balance.get_ref(), *mode.get_ref());
                if b.mode() == m {
                    return Ok(b);
                }
                Err(src.invalid(
                    balance,
                    format!(
                        "balance = \"{b}\" contradicts mode = \"{m}\" (active-passive is \
                         balance = \"first\"); keep one of them"
                    ),
                ))
            }
        }
    }

    fn check_config(&self, src: &Source<'_>) -> Result<CheckConfig, ConfigError> {
        let interval = src
            .duration(&self.check_interval, "check-interval")?
            .unwrap_or(DEFAULT_CHECK_INTERVAL);
        let timeout = src
            .duration(&self.check_timeout, "check-timeout")?
            .unwrap_or_else(|| CheckConfig::default_timeout(interval));
        let ip = |value: &Option<Spanned<String>>, key: &str| {
            value
                .as_ref()
                .map(|v| {
                    v.get_ref().parse::<IpAddr>().map_err(|_| {
                        src.invalid(v, format!("{key}: '{}' is not an IP address", v.get_ref()))
                    })
                })
                .transpose()
        };
        let port = |value: &Option<Spanned<u16>>, key: &str| match value {
            Some(p) if *p.get_ref() == 0 => Err(src.invalid(p, format!("{key}: 0 is no port"))),
            other => Ok(other.as_ref().map(|p| *p.get_ref())),
        };
        let agent_port = port(&self.agent_port, "agent-port")?;
        Ok(CheckConfig {
            interval,
            timeout,
            rise: self.rise.unwrap_or(DEFAULT_RISE),
            fall: self.fall.unwrap_or(DEFAULT_FALL),
            script: self.script(src, timeout)?,
            fastinter: src.duration(&self.fastinter, "fastinter")?,
            downinter: src.duration(&self.downinter, "downinter")?,
            port: port(&self.check_port, "check-port")?,
            address: ip(&self.check_address, "check-address")?,
            agent_port,
            agent_address: ip(&self.agent_address, "agent-address")?,
            agent_interval: src.duration(&self.agent_interval, "agent-interval")?,
            agent_send: src.bytes(&self.agent_send, "agent-send")?,
            proxy: None,
        })
    }

    /// Agent settings with no agent port anywhere would do nothing, which
    /// the operator who wrote them surely did not mean.
    fn check_agent(
        &self,
        check: CheckConfig,
        backends: &[BackendConfig],
        src: &Source<'_>,
    ) -> Result<CheckConfig, ConfigError> {
        if check.agent_port.is_some() || backends.iter().any(|b| b.agent_port.is_some()) {
            return Ok(check);
        }
        let agent_only = [
            (&self.agent_interval, "agent-interval"),
            (&self.agent_send, "agent-send"),
            (&self.agent_address, "agent-address"),
        ];
        for (value, key) in agent_only {
            if let Some(v) = value {
                return Err(src.invalid(
                    v,
                    format!("{key}: no agent-port in this frontend or its backends"),
                ));
            }
        }
        Ok(check)
    }

    /// One way of saying what a check does: `check`, `check-http`, or the
    /// check-send / check-expect / check-expect-regex keys.
    fn script(&self, src: &Source<'_>, timeout: Duration) -> Result<Script, ConfigError> {
        let flat = [
            &self.check_send,
            &self.check_expect,
            &self.check_expect_regex,
        ];
        let flat_at = flat.iter().find_map(|k| k.as_ref().map(Spanned::span));
        let ways = [
            self.check.as_ref().map(Spanned::span),
            self.check_http.as_ref().map(Spanned::span),
            flat_at,
        ];
        if ways.iter().flatten().count() > 1 {
            let second = ways.iter().flatten().nth(1).cloned().unwrap_or_default();
            return Err(ConfigError::Invalid {
                origin: src.origin.to_string(),
                line: Some(src.line_col(second.start).0),
                message: "give one of check, check-http, or check-send/check-expect/check-expect-regex: they all say what a check does".into(),
            });
        }
        let script = match (&self.check, &self.check_http) {
            (Some(check), _) => self.written_check(check, src, timeout)?,
            (None, Some(line)) => {
                let request = HttpRequest::parse(line.get_ref())
                    .map_err(|e| src.invalid(line, format!("check-http: {e}")))?;
                self.http_script(request, src)?
            }
            (None, None) => Script::flat(
                src.bytes(&self.check_send, "check-send")?,
                src.bytes(&self.check_expect, "check-expect")?,
                self.check_expect_regex
                    .as_ref()
                    .map(|r| {
                        Pattern::new(r.get_ref())
                            .map_err(|e| src.invalid(r, format!("check-expect-regex: {e}")))
                    })
                    .transpose()?,
            ),
        };
        if script.kind != Kind::Http {
            let http_only = [
                self.check_http_host.as_ref().map(Spanned::span),
                self.check_http_status.as_ref().map(Spanned::span),
                self.check_http_expect.as_ref().map(Spanned::span),
            ];
            if let Some(at) = http_only.into_iter().flatten().next() {
                return Err(ConfigError::Invalid {
                    origin: src.origin.to_string(),
                    line: Some(src.line_col(at.start).0),
                    message: "check-http-host, check-http-status and check-http-expect go with check-http (or check = \"http\")".into(),
                });
            }
        }
        Ok(script)
    }

    fn written_check(
        &self,
        check: &Spanned<RawCheck>,
        src: &Source<'_>,
        timeout: Duration,
    ) -> Result<Script, ConfigError> {
        match check.get_ref() {
            RawCheck::Kind(name) if name == "http" => {
                let request = HttpRequest::parse("GET /").map_err(|e| src.invalid(check, e))?;
                self.http_script(request, src)
            }
            RawCheck::Kind(name) => {
                Kind::from_name(name)
                    .map(Script::ready_made)
                    .ok_or_else(|| {
                        src.invalid(
                            check,
                            format!(
                                "check: unknown kind '{name}' (use {}, or a list of steps)",
                                Kind::READY_MADE.join(", ")
                            ),
                        )
                    })
            }
            RawCheck::Steps(steps) if steps.is_empty() => Err(src.invalid(
                check,
                "check: the list of steps is empty (leave check out for a connect check)".into(),
            )),
            RawCheck::Steps(steps) => Ok(Script {
                kind: Kind::Steps,
                steps: steps
                    .iter()
                    .enumerate()
                    .map(|(i, step)| {
                        step.get_ref()
                            .resolve(timeout)
                            .map_err(|e| src.invalid(step, format!("check: step {}: {e}", i + 1)))
                    })
                    .collect::<Result<_, _>>()?,
            }),
        }
    }

    fn http_script(
        &self,
        mut request: HttpRequest,
        src: &Source<'_>,
    ) -> Result<Script, ConfigError> {
        if let Some(host) = &self.check_http_host {
            crate::check::check_host(host.get_ref())
                .map_err(|e| src.invalid(host, format!("check-http-host: {e}")))?;
            request.host = Some(host.get_ref().clone());
        }
        let statuses = match &self.check_http_status {
            Some(list) => {
                if list.get_ref().is_empty()
                    || list.get_ref().iter().any(|s| !(100..=599).contains(s))
                {
                    return Err(src.invalid(
                        list,
                        "check-http-status: give HTTP statuses from 100 to 599, e.g. [200, 204]"
                            .into(),
                    ));
                }
                list.get_ref().clone()
            }
            None => Vec::new(),
        };
        let body = src.bytes(&self.check_http_expect, "check-http-expect")?;
        Ok(Script::http(request, HttpExpect { statuses, body }))
    }

    /// A format without `log = true` would log nothing, which the operator
    /// who wrote it surely did not mean.
    fn access_log(&self, src: &Source<'_>) -> Result<AccessLog, ConfigError> {
        let on = self.log.unwrap_or(false);
        match &self.log_format {
            None if on => Ok(AccessLog::Text),
            None => Ok(AccessLog::Off),
            Some(format) if !on => Err(src.invalid(
                format,
                "log-format: the access log is off; add log = true to this frontend".into(),
            )),
            Some(format) => Ok(match format.get_ref() {
                LogFormat::Text => AccessLog::Text,
                LogFormat::Json => AccessLog::Json,
            }),
        }
    }
}

/// The header version checks send with `check-send-proxy`: the one every
/// backend of the frontend gets. Checks are per frontend, so backends that
/// get different headers (or none) cannot all be checked with one.
pub fn check_send_proxy(
    on: bool,
    send: Option<Version>,
    backends: &[BackendConfig],
) -> Result<Option<Version>, String> {
    if !on {
        return Ok(None);
    }
    let mut version = None;
    for backend in backends {
        let Some(theirs) = backend.send_proxy.or(send) else {
            return Err(format!(
                "check-send-proxy: backend {} gets no PROXY header (set send-proxy), so its \
                 checks must not send one",
                backend.name
            ));
        };
        if version.is_some_and(|v| v != theirs) {
            return Err(
                "check-send-proxy: the backends get different send-proxy versions; checks \
                 send one version per frontend"
                    .into(),
            );
        }
        version = Some(theirs);
    }
    Ok(version)
}

/// Without `check-send-proxy`, HAProxy's default: checks send the header
/// when the traffic does and goes to the same port (a backend that
/// requires the header would drop a check without it, and nginx logs a
/// "broken header" error for each); a check to another port or address
/// (`check-port`/`check-address`, the backend's or the frontend's: another
/// service, a sidecar) sends none.
pub fn default_check_send_proxy(
    send: Option<Version>,
    check: &CheckConfig,
    backends: &[BackendConfig],
) -> Option<Version> {
    let elsewhere = backends.iter().any(|b| check.target(b) != b.addr);
    if elsewhere {
        return None;
    }
    check_send_proxy(true, send, backends).ok().flatten()
}

fn check_workers(workers: usize) -> Result<(), String> {
    if workers == 0 || workers > 1024 {
        return Err(format!("workers must be between 1 and 1024, not {workers}"));
    }
    Ok(())
}

fn check_buffers(buffers: u32) -> Result<(), String> {
    if !buffers.is_power_of_two() || buffers > MAX_BUFFERS {
        return Err(format!(
            "buffers must be a power of two between 1 and {MAX_BUFFERS}, not {buffers}"
        ));
    }
    Ok(())
}

pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = read_capped(path)?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// `origin` names the file in error messages. Every check runs once,
    /// in time linear in the size of the file.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let src = Source { origin, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| src.line_col(s.start));
            ConfigError::Parse {
                origin: origin.to_string(),
                line,
                column,
                message: e.message().trim().replace('\n', " "),
            }
        })?;
        if let Some(workers) = &raw.workers {
            check_workers(*workers.get_ref()).map_err(|m| src.invalid(workers, m))?;
        }
        if let Some(buffers) = &raw.buffers {
            check_buffers(*buffers.get_ref()).map_err(|m| src.invalid(buffers, m))?;
        }
        let mut frontends = Vec::with_capacity(raw.frontend.len());
        for (index, spanned) in raw.frontend.iter().enumerate() {
            let frontend = spanned.get_ref().resolve(index, &src)?;
            check_frontend(&frontend).map_err(|fault| src.fault(spanned, fault))?;
            frontends.push(frontend);
        }
        if frontends.is_empty() {
            return Err(ConfigError::Invalid {
                origin: origin.to_string(),
                line: None,
                message: NO_FRONTEND.into(),
            });
        }
        check_across(&frontends, &Host::system())
            .map_err(|(index, fault)| src.fault(&raw.frontend[index], fault))?;
        let config = Config {
            workers: raw
                .workers
                .as_ref()
                .map_or_else(default_workers, |w| *w.get_ref()),
            buffers: raw
                .buffers
                .as_ref()
                .map_or(DEFAULT_BUFFERS, |b| *b.get_ref()),
            drain_timeout: src
                .duration(&raw.drain_timeout, "drain-timeout")?
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            leave_delay: raw
                .leave_delay
                .as_ref()
                .map(|v| {
                    parse_delay(v.get_ref())
                        .map_err(|e| src.invalid(v, format!("leave-delay: {e}")))
                })
                .transpose()?
                .unwrap_or(DEFAULT_LEAVE_DELAY),
            stats: raw
                .stats
                .as_ref()
                .map(|a| {
                    parse_address(a.get_ref()).map_err(|e| src.invalid(a, format!("stats: {e}")))
                })
                .transpose()?,
            admin_socket: raw
                .admin_socket
                .as_ref()
                .map(|p| match p.get_ref().as_str() {
                    "" => Err(src.invalid(p, "admin-socket: give a path".into())),
                    path => Ok(PathBuf::from(path)),
                })
                .transpose()?,
            user: raw.user.as_ref().map(|u| u.get_ref().clone()),
            group: raw.group.as_ref().map(|g| g.get_ref().clone()),
            frontends,
        };
        if let Err(message) = config.identity() {
            let at = raw.group.as_ref().or(raw.user.as_ref());
            return Err(match at {
                Some(at) => src.invalid(at, message),
                None => ConfigError::Invalid {
                    origin: origin.to_string(),
                    line: None,
                    message,
                },
            });
        }
        if let (Err(message), Some(at)) = (config.check_stats(), &raw.stats) {
            return Err(src.invalid(at, message));
        }
        Ok(config)
    }

    /// Every check, for a config built in code (the command line's). A
    /// file's config was checked by [`Config::from_toml`] with its lines.
    pub fn validate(&self) -> Result<(), String> {
        if self.frontends.is_empty() {
            return Err(NO_FRONTEND.into());
        }
        self.check_settings()?;
        let named =
            |f: &FrontendConfig, fault: Fault| format!("frontend {}: {}", f.name, fault.message);
        for frontend in &self.frontends {
            check_frontend(frontend).map_err(|fault| named(frontend, fault))?;
        }
        check_across(&self.frontends, &Host::system())
            .map_err(|(index, fault)| named(&self.frontends[index], fault))
    }

    /// The global settings alone: what a flag may change after the file
    /// was read and checked.
    pub fn check_settings(&self) -> Result<(), String> {
        check_workers(self.workers)?;
        check_buffers(self.buffers)?;
        self.identity()?;
        self.check_stats()
    }

    /// The stats server must not share a port with a frontend's listener:
    /// one of them would fail to bind, or take the other's clients.
    pub fn check_stats(&self) -> Result<(), String> {
        let Some(stats) = self.stats.filter(|a| a.port() != 0) else {
            return Ok(());
        };
        let host = Host::system();
        let mut listens = Listens {
            host: &host,
            exact: HashMap::new(),
            ports: HashMap::new(),
        };
        for (i, f) in self.frontends.iter().enumerate() {
            if f.listen.port() == stats.port() {
                listens.add(canonical(f.listen), i);
            }
        }
        match listens.overlap(canonical(stats)) {
            Some(j) => Err(format!(
                "stats: {stats} overlaps the listener of frontend {} ({}); use another port",
                self.frontends[j].name, self.frontends[j].listen
            )),
            None => Ok(()),
        }
    }

    /// The user and group to switch to, looked up now (a missing user is
    /// a config error, found before anything is bound).
    pub fn identity(&self) -> Result<Option<crate::privdrop::Identity>, String> {
        crate::privdrop::Identity::resolve(self.user.as_deref(), self.group.as_deref())
            .map_err(|e| printable(&e).into_owned())
    }

    /// Bytes of receive buffers the workers allocate at start.
    pub fn buffer_bytes(&self) -> u64 {
        self.workers as u64 * u64::from(self.buffers) * BUFFER_BYTES
    }

    /// What the buffer settings commit, for the start log.
    pub fn memory_note(&self) -> String {
        format!(
            "receive buffers: {} workers x {} buffers x {} KiB = {} committed at start",
            self.workers,
            self.buffers,
            BUFFER_BYTES / 1024,
            human_bytes(self.buffer_bytes())
        )
    }

    /// Settings that are allowed but probably a mistake.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let cores = default_workers();
        if self.workers > cores {
            warnings.push(format!(
                "{} workers on {cores} cores: workers sharing a core serve less, not more \
                 (set workers or --workers to at most {cores})",
                self.workers
            ));
        }
        let memory = physical_memory();
        if memory > 0 && self.buffer_bytes() > memory / 2 {
            warnings.push(format!(
                "the receive buffers take {} of this host's {} of memory: lower buffers or workers",
                human_bytes(self.buffer_bytes()),
                human_bytes(memory)
            ));
        }
        warnings
    }
}

/// Where a running ringlb's config comes from, so a reload reads it the
/// same way: the file, and the flags that override its global settings
/// (they keep overriding it on every reload).
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub workers: Option<usize>,
    pub buffers: Option<u32>,
    pub drain_timeout: Option<Duration>,
    pub leave_delay: Option<Duration>,
    pub stats: Option<SocketAddr>,
    pub admin_socket: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::from_file(&self.path)?;
        if let Some(workers) = self.workers {
            config.workers = workers;
        }
        if let Some(buffers) = self.buffers {
            config.buffers = buffers;
        }
        if let Some(drain_timeout) = self.drain_timeout {
            config.drain_timeout = drain_timeout;
        }
        if let Some(leave_delay) = self.leave_delay {
            config.leave_delay = leave_delay;
        }
        if self.stats.is_some() {
            config.stats = self.stats;
        }
        if self.admin_socket.is_some() {
            config.admin_socket.clone_from(&self.admin_socket);
        }
        if self.user.is_some() {
            config.user.clone_from(&self.user);
        }
        if self.group.is_some() {
            config.group.clone_from(&self.group);
        }
        // The file was checked as it was read; only the flags are new.
        config
            .check_settings()
            .map_err(|message| ConfigError::Invalid {
                origin: "command line".into(),
                line: None,
                message,
            })?;
        Ok(config)
    }

    /// An error about a frontend's listen address found after the file
    /// was read (it cannot be bound), at the line of its `listen` key.
    pub fn listen_error(&self, frontend: usize, message: String) -> ConfigError {
        let origin = self.path.display().to_string();
        let line = read_capped(&self.path).ok().and_then(|text| {
            let raw: RawConfig = toml::from_str(&text).ok()?;
            let start = raw.frontend.get(frontend)?.get_ref().listen.span().start;
            let src = Source {
                origin: &origin,
                text: &text,
            };
            Some(src.line_col(start).0)
        });
        ConfigError::Invalid {
            origin,
            line,
            message,
        }
    }
}

/// The route label of connections served by the frontend's own backends.
pub const DEFAULT_ROUTE: &str = "default";

const NO_FRONTEND: &str = "no frontend: add a [[frontend]] table with listen and backends";

/// Reads at most [`MAX_CONFIG_BYTES`]: a device or a runaway generator
/// must not fill memory.
fn read_capped(path: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    // open(2) of a FIFO blocks until a writer comes, maybe forever; and a
    // config must be there to read again on reload.
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path).map_err(read_error)?.file_type();
    if kind.is_fifo() || kind.is_socket() {
        return Err(read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a pipe or socket, not a file (give a regular file)",
        )));
    }
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    String::from_utf8(bytes).map_err(|_| {
        read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })
}

fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= 10 * 1024 * MIB {
        format!("{} GiB", bytes / (1024 * MIB))
    } else {
        format!("{} MiB", bytes.div_ceil(MIB))
    }
}

/// Installed memory, 0 when unknown.
fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system values.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    u64::try_from(pages)
        .unwrap_or(0)
        .saturating_mul(u64::try_from(page).unwrap_or(0))
}

/// Which key of a frontend a fault is about, so a file's error names its line.
#[derive(Debug, PartialEq, Eq)]
enum At {
    Frontend,
    Name,
    Listen,
    Backend(usize),
}

#[derive(Debug)]
struct Fault {
    at: At,
    message: String,
}

impl Fault {
    fn new(at: At, message: String) -> Fault {
        Fault { at, message }
    }
}

/// A name is safe in a log line and a metric label as it is.
pub fn check_name(name: &str) -> Result<(), String> {
    let safe = |c: char| c.is_ascii_alphanumeric() || NAME_PUNCTUATION.contains(c);
    if name.is_empty() || name.len() > MAX_NAME_BYTES || !name.chars().all(safe) {
        return Err(format!(
            "invalid name {name:?}: use 1 to {MAX_NAME_BYTES} letters, digits or {NAME_PUNCTUATION}"
        ));
    }
    Ok(())
}

/// The checks of one frontend on its own.
fn check_frontend(f: &FrontendConfig) -> Result<(), Fault> {
    check_name(&f.name).map_err(|e| Fault::new(At::Name, format!("name: {e}")))?;
    if f.backends.is_empty() {
        return Err(Fault::new(
            At::Frontend,
            "no backend: give at least one backend address".into(),
        ));
    }
    if f.check.rise == 0 || f.check.fall == 0 {
        return Err(Fault::new(
            At::Frontend,
            "rise and fall must be at least 1".into(),
        ));
    }
    if f.maxconn == Some(0) {
        return Err(Fault::new(
            At::Frontend,
            "maxconn must be at least 1".into(),
        ));
    }
    // A route's backends may share addresses with another route's: each
    // route is checked on its own (in `routes`, with its lines).
    check_backends(&f.backends[f.own_backends()])
}

/// Names, ports, and no backend twice: a duplicate would get twice the
/// traffic and two series under one name in the metrics.
fn check_backends(backends: &[BackendConfig]) -> Result<(), Fault> {
    let mut names = HashMap::with_capacity(backends.len());
    let mut addrs = HashMap::with_capacity(backends.len());
    for (k, backend) in backends.iter().enumerate() {
        let fault = |message: String| Fault::new(At::Backend(k), message);
        check_backend(backend).map_err(|e| fault(format!("backends: {e}")))?;
        if let Some(first) = names.insert(backend.name.as_str(), k) {
            return Err(fault(format!(
                "backends: {} is listed twice (backends {} and {})",
                backend.name,
                first + 1,
                k + 1
            )));
        }
        if let Some(first) = addrs.insert(canonical(backend.addr), k) {
            return Err(fault(format!(
                "backends: {} is the same address as {} ({})",
                backend.name, backends[first].name, backend.addr
            )));
        }
    }
    Ok(())
}

/// A backend's own checks, shared with the `--backend` flag.
pub fn check_backend(backend: &BackendConfig) -> Result<(), String> {
    check_name(&backend.name)?;
    if backend.addr.port() == 0 {
        return Err(format!(
            "'{}': port 0 is no port a backend can listen on",
            backend.name
        ));
    }
    if backend.weight > MAX_WEIGHT {
        return Err(format!(
            "'{}': weight must be between 0 and {MAX_WEIGHT}, not {}",
            backend.name, backend.weight
        ));
    }
    if backend.maxconn == Some(0) {
        return Err(format!("'{}': maxconn must be at least 1", backend.name));
    }
    if backend.check_port == Some(0) {
        return Err(format!("'{}': check-port 0 is no port", backend.name));
    }
    if backend.agent_port == Some(0) {
        return Err(format!("'{}': agent-port 0 is no port", backend.name));
    }
    Ok(())
}

/// The same endpoint written one way: an IPv4-mapped IPv6 address is the
/// IPv4 address on a dual-stack host.
fn canonical(addr: SocketAddr) -> (IpAddr, u16) {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    (ip, addr.port())
}

/// What the checks across frontends need to know about this host.
struct Host {
    /// An IPv6 wildcard listener also takes IPv4 clients. ringlb's listeners
    /// leave IPV6_V6ONLY to the system default, `net.ipv6.bindv6only`.
    dual_stack: bool,
    /// This host's addresses, read only when a wildcard listener shares a
    /// port with a backend.
    addrs: OnceCell<Vec<IpAddr>>,
}

impl Host {
    fn system() -> Host {
        let v6only =
            std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1");
        Host {
            dual_stack: !v6only,
            addrs: OnceCell::new(),
        }
    }

    /// Whether a connect to `ip` reaches this host.
    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback()
            || ip.is_unspecified()
            || self.addrs.get_or_init(host_addresses).contains(&ip)
    }
}

/// The listen addresses seen so far, indexed so that each check is a few
/// hash lookups: the checks are linear in the number of frontends.
struct Listens<'h> {
    host: &'h Host,
    exact: HashMap<(IpAddr, u16), usize>,
    ports: HashMap<u16, PortUse>,
}

/// The frontends on one port: the first wildcard and the first specific
/// address of each family are enough to find any overlap.
#[derive(Default)]
struct PortUse {
    any_v4: Option<usize>,
    any_v6: Option<usize>,
    some_v4: Option<usize>,
    some_v6: Option<usize>,
}

impl Listens<'_> {
    /// An earlier frontend whose listener would take clients of `ip:port`.
    fn overlap(&self, (ip, port): (IpAddr, u16)) -> Option<usize> {
        if let Some(&j) = self.exact.get(&(ip, port)) {
            return Some(j);
        }
        let used = self.ports.get(&port)?;
        let dual = self.host.dual_stack;
        match ip {
            IpAddr::V4(v4) => used
                .any_v4
                .or(used.any_v6.filter(|_| dual))
                .or(used.some_v4.filter(|_| v4.is_unspecified())),
            IpAddr::V6(v6) if v6.is_unspecified() => used
                .any_v6
                .or(used.some_v6)
                .or(used.some_v4.filter(|_| dual)),
            IpAddr::V6(_) => used.any_v6,
        }
    }

    fn add(&mut self, (ip, port): (IpAddr, u16), index: usize) {
        self.exact.insert((ip, port), index);
        let used = self.ports.entry(port).or_default();
        let (any, some) = match ip {
            IpAddr::V4(_) => (&mut used.any_v4, &mut used.some_v4),
            IpAddr::V6(_) => (&mut used.any_v6, &mut used.some_v6),
        };
        if ip.is_unspecified() {
            any.get_or_insert(index);
        }
        some.get_or_insert(index);
    }

    /// The frontend whose listener a connect to `backend` would reach.
    fn own(&self, backend: SocketAddr) -> Option<usize> {
        let (mut ip, port) = canonical(backend);
        // A connect to the unspecified address goes to this host.
        if ip.is_unspecified() {
            ip = match ip {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
        }
        if let Some(&j) = self.exact.get(&(ip, port)) {
            return Some(j);
        }
        let used = self.ports.get(&port)?;
        let wildcard = match ip {
            IpAddr::V4(_) => used.any_v4.or(used.any_v6.filter(|_| self.host.dual_stack)),
            IpAddr::V6(_) => used.any_v6,
        }?;
        self.host.is_local(ip).then_some(wildcard)
    }
}

/// The checks that span frontends: unique names, listeners that do not
/// overlap, and no backend that is ringlb itself (a loop that would eat
/// every fd). `Err` carries the index of the frontend at fault.
fn check_across(frontends: &[FrontendConfig], host: &Host) -> Result<(), (usize, Fault)> {
    let mut names = HashMap::with_capacity(frontends.len());
    let mut listens = Listens {
        host,
        exact: HashMap::with_capacity(frontends.len()),
        ports: HashMap::new(),
    };
    for (i, f) in frontends.iter().enumerate() {
        if let Some(j) = names.insert(f.name.as_str(), i) {
            let message = format!(
                "two frontends are named {} (frontends {} and {})",
                f.name,
                j + 1,
                i + 1
            );
            return Err((i, Fault::new(At::Name, message)));
        }
        // Port 0 picks a free port at start: never one in use.
        if f.listen.port() == 0 {
            continue;
        }
        let listen = canonical(f.listen);
        if let Some(j) = listens.overlap(listen) {
            return Err((i, Fault::new(At::Listen, overlap_message(&frontends[j], f))));
        }
        listens.add(listen, i);
    }
    for (i, f) in frontends.iter().enumerate() {
        for (k, backend) in f.backends.iter().enumerate() {
            if let Some(j) = listens.own(backend.addr) {
                let message = format!(
                    "backends: {} is ringlb's own listener (frontend {} listens on {}): \
                     its connections would loop back into ringlb",
                    backend.name, frontends[j].name, frontends[j].listen
                );
                return Err((i, Fault::new(At::Backend(k), message)));
            }
        }
    }
    Ok(())
}

fn overlap_message(first: &FrontendConfig, second: &FrontendConfig) -> String {
    if first.listen == second.listen {
        return format!(
            "listen: frontends {} and {} both listen on {}",
            first.name, second.name, second.listen
        );
    }
    format!(
        "listen: frontends {} ({}) and {} ({}) overlap: clients of port {} could reach \
         either, so neither frontend gets all of its clients; use different ports",
        first.name,
        first.listen,
        second.name,
        second.listen,
        second.listen.port()
    )
}

/// This host's interface addresses (getifaddrs); empty if they cannot be read.
fn host_addresses() -> Vec<IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list and freeifaddrs frees it, once;
    // each entry is read only in between. An entry's ifa_addr is null or
    // points to a sockaddr of the family in its sa_family field.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return Vec::new();
        }
        let mut addrs = Vec::new();
        let mut entry = list;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*addr.cast::<libc::sockaddr_in>();
                        addrs.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*addr.cast::<libc::sockaddr_in6>();
                        addrs.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
        addrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_haproxy_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0s").unwrap_err().contains("more than zero"));
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .contains("unknown unit 'x'")
        );
        assert!(parse_duration("fast").unwrap_err().contains("'fast'"));
    }

    #[test]
    fn escapes_cover_binary_payloads() {
        assert_eq!(parse_escapes(r"PING\r\n"), Ok(b"PING\r\n".to_vec()));
        assert_eq!(parse_escapes(r"\x00\xff\\"), Ok(vec![0, 255, b'\\']));
        assert!(parse_escapes(r"\xZ1").is_err());
        assert!(parse_escapes(r"\q").unwrap_err().contains("\\q"));
        assert!(parse_escapes("end\\").is_err());
    }

    #[test]
    fn a_full_file_resolves_with_defaults() {
        let text = r#"
            workers = 2
            buffers = 4096
            [[frontend]]
            name = "web"
            listen = "127.0.0.1:8080"
            backends = ["127.0.0.1:9001", "127.0.0.1:9002"]
            [[frontend]]
            name = "db"
            listen = "127.0.0.1:5432"
            mode = "active-passive"
            backends = ["127.0.0.1:6001", "127.0.0.1:6002"]
            check-interval = "500ms"
            check-send = "PING\r\n"
            check-expect = "+PONG"
            failback = false
            on-down = "shutdown"
        "#;
        let config = Config::from_toml(text, "test.toml").expect("valid config");
        assert_eq!(config.workers, 2);
        assert_eq!(config.buffers, 4096);
        let web = &config.frontends[0];
        assert_eq!(web.mode, Mode::ActiveActive);
        assert_eq!(web.check.interval, DEFAULT_CHECK_INTERVAL);
        assert_eq!(web.check.timeout, Duration::from_secs(1));
        let db = &config.frontends[1];
        assert_eq!(db.mode, Mode::ActivePassive);
        assert_eq!(db.check.timeout, Duration::from_millis(500));
        assert_eq!(
            db.check.script,
            Script::flat(Some(b"PING\r\n".to_vec()), Some(b"+PONG".to_vec()), None)
        );
        assert!(!db.failback);
        assert_eq!(db.on_down, OnDown::Shutdown);
    }

    #[test]
    fn routes_append_their_backends_and_faults_name_the_line() {
        let head = "[[frontend]]\nname = \"tls\"\nlisten = \"127.0.0.1:443\"\n\
                    backends = [\"127.0.0.1:9001\"]\ntimeout-client-hello = \"2s\"\n";
        let route = |name: &str, sni: &str, backends: &str| {
            format!(
                "[[frontend.route]]\nname = \"{name}\"\nsni = [{sni}]\nbackends = [{backends}]\n"
            )
        };
        let text = format!(
            "{head}{}{}",
            route(
                "www",
                "\"WWW.foobar.com\"",
                "\"127.0.0.1:9001\", \"127.0.0.1:9002\""
            ),
            route("wild", "\"*.foobar.com\"", "\"127.0.0.1:9001\"")
        );
        let config = Config::from_toml(&text, "f.toml").expect("valid");
        let f = &config.frontends[0];
        assert_eq!(f.own_backends(), 0..1);
        assert_eq!(f.tls.client_hello_timeout, Duration::from_secs(2));
        let names: Vec<&str> = f.backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "127.0.0.1:9001",
                "www/127.0.0.1:9001",
                "www/127.0.0.1:9002",
                "wild/127.0.0.1:9001"
            ]
        );
        assert_eq!(f.tls.routes[0].sni, ["www.foobar.com"]);
        assert_eq!(f.tls.routes[1].backends, 3..4);
        for (bad, line, words) in [
            (
                route("a", "\"x.com\"", "\"127.0.0.1:1\"")
                    + &route("b", "\"X.com\"", "\"127.0.0.1:1\""),
                12,
                "also in route a",
            ),
            (
                route("a", "\"x*.com\"", "\"127.0.0.1:1\""),
                8,
                "not a host name",
            ),
            (route("a", "\"x.com\"", ""), 6, "no backend"),
            (
                route("default", "\"x.com\"", "\"127.0.0.1:1\""),
                7,
                "reserved",
            ),
            (
                route("a", "\"x.com\"", "\"127.0.0.1:1\", \"127.0.0.1:1\""),
                9,
                "listed twice",
            ),
        ] {
            let err = Config::from_toml(&format!("{head}{bad}"), "f.toml")
                .expect_err(words)
                .to_string();
            assert!(err.starts_with(&format!("f.toml:{line}:")), "{err}");
            assert!(err.contains(words), "{err}");
        }
    }

    #[test]
    fn printable_escapes_only_what_moves_the_terminal() {
        assert_eq!(printable("plain 'text' \\n é"), "plain 'text' \\n é");
        assert_eq!(
            printable("a\nb\r\t\x1b[31m\x07\x7f"),
            "a\\nb\\r\\t\\u{1b}[31m\\u{7}\\u{7f}"
        );
        assert_eq!(printable("x\u{202e}y\u{2028}"), "x\\u{202e}y\\u{2028}");
        assert!(matches!(printable("ok"), std::borrow::Cow::Borrowed(_)));
    }

    /// A value with a newline and an escape, wherever it is quoted, gives
    /// one line that names its key and shows the value escaped.
    #[test]
    fn errors_quoting_a_value_stay_on_one_line() {
        let evil = r#"1\nERROR forged line\u001b[31m"#;
        let head = "[[frontend]]\nlisten = \"127.0.0.1:80\"\nbackends = [\"127.0.0.1:81\"]\n";
        for (keys, key) in [
            (
                format!("timeout-client-fin = \"{evil}\""),
                "timeout-client-fin",
            ),
            (format!("idle-timeout = \"{evil}\""), "idle-timeout"),
            (format!("name = \"{evil}\""), "name"),
            (format!("check-send = \"\\\\q{evil}\""), "check-send"),
            (format!("allow = [\"{evil}\"]"), "allow"),
            (
                format!("accept-proxy = true\naccept-proxy-from = [\"{evil}\"]"),
                "accept-proxy-from",
            ),
            (format!("tls = {{ cert = \"{evil}\", key = \"k\" }}"), "tls"),
            (format!("balance = \"{evil}\""), "f.toml:4:"),
        ] {
            let err = Config::from_toml(&format!("{head}{keys}\n"), "f.toml")
                .expect_err(key)
                .to_string();
            assert!(!err.contains(|c: char| c.is_control()), "{key}: {err:?}");
            assert!(err.contains(key), "{key}: {err}");
            assert!(err.contains("\\u{1b}[31m"), "{key}: {err}");
        }
        let backends =
            format!("[[frontend]]\nlisten = \"127.0.0.1:80\"\nbackends = [\"{evil}\"]\n");
        let err = Config::from_toml(&backends, "f\nforged.toml").expect_err("backends");
        assert_eq!(
            err.to_string(),
            "f\\nforged.toml:3: backends: invalid name \"1\\nERROR forged line\\u{1b}[31m\": \
             use 1 to 255 letters, digits or -_.:[]@/%"
        );
    }

    #[test]
    fn tls_min_version_is_an_alias_of_min_version() {
        let tls = |inner: &str| -> Result<RawTls, String> {
            toml::from_str::<RawTls>(&format!("cert = \"c\"\nkey = \"k\"\n{inner}"))
                .map_err(|e| e.to_string())
        };
        for key in ["min-version", "tls-min-version"] {
            let raw = tls(&format!("{key} = \"1.3\"")).expect(key);
            assert_eq!(raw.min_version.as_deref(), Some("1.3"), "{key}");
        }
        let both = tls("min-version = \"1.2\"\ntls-min-version = \"1.3\"");
        assert!(
            both.is_err_and(|e| e.contains("duplicate")),
            "one key, two names"
        );
    }

    #[test]
    fn balance_and_mode_resolve_and_must_agree() {
        let resolve = |keys: &str| {
            let text = format!(
                "[[frontend]]\nlisten = \"127.0.0.1:80\"\n{keys}\nbackends = [\"127.0.0.1:81\"]\n"
            );
            Config::from_toml(&text, "f.toml").map(|c| c.frontends[0].clone())
        };
        let f = resolve("").expect("defaults");
        assert_eq!(
            (f.balance.algorithm, f.mode),
            (Balance::Roundrobin, Mode::ActiveActive)
        );
        assert!(!f.balance.allbackups && f.balance.slowstart.is_none());
        let f = resolve("mode = \"active-passive\"").expect("shorthand");
        assert_eq!(f.balance.algorithm, Balance::First);
        let f = resolve("balance = \"first\"").expect("first");
        assert_eq!(f.mode, Mode::ActivePassive);
        let f = resolve("balance = \"leastconn\"\nmode = \"active-active\"").expect("agree");
        assert_eq!(f.balance.algorithm, Balance::Leastconn);
        let f = resolve("balance = \"source\"\nallbackups = true\nslowstart = \"30s\"")
            .expect("source");
        assert_eq!(f.balance.algorithm, Balance::Source);
        assert!(f.balance.allbackups);
        assert_eq!(f.balance.slowstart, Some(Duration::from_secs(30)));

        let err = resolve("mode = \"active-passive\"\nbalance = \"roundrobin\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("f.toml:4:") && err.contains("contradicts"),
            "{err}"
        );
        let err = resolve("balance = \"random\"").unwrap_err().to_string();
        assert!(
            err.starts_with("f.toml:3:") && err.contains("leastconn"),
            "{err}"
        );
        let err = resolve("slowstart = \"soon\"").unwrap_err().to_string();
        assert!(
            err.starts_with("f.toml:3:") && err.contains("slowstart"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_line() {
        let text = "[[frontend]]\nlisten = \"127.0.0.1:80\"\nbackends = [\"nowhere\"]\n";
        let err = Config::from_toml(text, "f.toml").unwrap_err().to_string();
        assert!(err.starts_with("f.toml:3:"), "{err}");
        assert!(err.contains("nowhere"), "{err}");

        let text = "[[frontend]]\nlisten = \"127.0.0.1:80\"\nidle-timout = \"5s\"\n";
        let err = Config::from_toml(text, "f.toml").unwrap_err().to_string();
        assert!(err.starts_with("f.toml:3:"), "{err}");
        assert!(err.contains("idle-timout"), "{err}");

        let text = "[[frontend]]\nlisten = \"127.0.0.1:80\"\n";
        let err = Config::from_toml(text, "f.toml").unwrap_err().to_string();
        assert!(err.contains("no backend"), "{err}");
    }

    #[test]
    fn backends_are_addresses_or_tables() {
        let text = r#"
[[frontend]]
listen = "127.0.0.1:80"
backends = [
    "127.0.0.1:8001",
    { address = "127.0.0.1:8002", name = "app2", weight = 3, backup = true, maxconn = 500, check-port = 8008, check-address = "127.0.0.9" },
]
"#;
        let config = Config::from_toml(text, "f.toml").expect("config");
        let [plain, table] = &config.frontends[0].backends[..] else {
            panic!("two backends expected");
        };
        assert_eq!(
            plain,
            &BackendConfig::new(
                "127.0.0.1:8001".parse().expect("a"),
                "127.0.0.1:8001".into()
            )
        );
        assert_eq!(table.name, "app2");
        assert_eq!(table.addr, "127.0.0.1:8002".parse().expect("a"));
        assert_eq!(
            (table.weight, table.backup, table.maxconn),
            (3, true, Some(500))
        );
        assert_eq!(table.check_port, Some(8008));
        assert_eq!(table.check_address, Some("127.0.0.9".parse().expect("ip")));
    }

    #[test]
    fn timeout_queue_and_retries_have_haproxys_names_and_defaults() {
        let text = "[[frontend]]\nlisten = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"]\n";
        let plain = &Config::from_toml(text, "f.toml").expect("config").frontends[0];
        assert_eq!(
            (plain.timeout_queue, plain.retries),
            (None, DEFAULT_RETRIES)
        );
        let set = format!("{text}timeout-queue = \"5s\"\nretries = 0\n");
        let set = &Config::from_toml(&set, "f.toml").expect("config").frontends[0];
        assert_eq!(
            (set.timeout_queue, set.retries),
            (Some(Duration::from_secs(5)), 0)
        );
        let bad = format!("{text}timeout-queue = \"soon\"\n");
        let err = Config::from_toml(&bad, "f.toml")
            .expect_err("refused")
            .to_string();
        assert!(err.contains("timeout-queue") && err.contains(":4"), "{err}");
    }

    #[test]
    fn a_bad_backend_table_names_its_line_and_key() {
        let with = |table: &str| {
            let text = format!(
                "[[frontend]]\nlisten = \"127.0.0.1:80\"\nbackends = [\n  \"127.0.0.1:8001\",\n  {table},\n]\n"
            );
            Config::from_toml(&text, "f.toml").unwrap_err().to_string()
        };
        let err = with(r#"{ address = "127.0.0.1:8002", wieght = 3 }"#);
        assert!(err.starts_with("f.toml:5:"), "{err}");
        assert!(err.contains("wieght"), "{err}");
        let err = with(r#"{ address = "127.0.0.1:8002", weight = 257 }"#);
        assert!(
            err.starts_with("f.toml:5:") && err.contains("weight must be between 0 and 256"),
            "{err}"
        );
        let err = with(r#"{ address = "127.0.0.1:8002", maxconn = 0 }"#);
        assert!(err.contains("maxconn must be at least 1"), "{err}");
        let err = with(r#"{ address = "127.0.0.1:8002", check-address = "db1" }"#);
        assert!(
            err.contains("check-address: 'db1' is not an IP address"),
            "{err}"
        );
        let err = with(r#"{ name = "x" }"#);
        assert!(err.contains("address"), "{err}");
        let err = with(r#"{ address = "127.0.0.1:8001", name = "other" }"#);
        assert!(err.contains("same address"), "{err}");
        let err = with("42");
        assert!(err.contains("an address such as"), "{err}");
    }

    #[test]
    fn check_keys_parse_and_faults_name_their_line() {
        let with = |keys: &str| {
            let text = format!(
                "[[frontend]]\nlisten = \"127.0.0.1:80\"\nbackends = [{{ address = \"127.0.0.1:8001\", agent-port = 9 }}]\n{keys}\n"
            );
            Config::from_toml(&text, "f.toml").map(|c| c.frontends[0].check.clone())
        };
        let err = |keys: &str| with(keys).map(|_| ()).unwrap_err().to_string();
        let check = with(
            "check = \"redis-master\"\ncheck-port = 6380\nfastinter = \"100ms\"\nagent-send = \"hi\\n\"",
        )
        .expect("config");
        assert_eq!(check.script, Script::ready_made(Kind::RedisMaster));
        assert_eq!(check.port, Some(6380));
        assert_eq!(check.fastinter, Some(Duration::from_millis(100)));
        assert_eq!(check.agent_send.as_deref(), Some(&b"hi\n"[..]));
        let http =
            with("check-http = \"GET /primary\"\ncheck-http-status = [200, 204]").expect("config");
        assert_eq!(http.script.kind, Kind::Http);
        let e = err("check = \"nosuch\"");
        assert!(
            e.starts_with("f.toml:4:") && e.contains("redis-master"),
            "{e}"
        );
        let e = err("check = [\n { send = \"a\", expect = \"b\" },\n]");
        assert!(
            e.starts_with("f.toml:5:") && e.contains("exactly one"),
            "{e}"
        );
        let e = err("check-timeout = \"500ms\"\ncheck = [ { expect = \"b\", timeout = \"2s\" } ]");
        assert!(e.contains("longer than the check's timeout"), "{e}");
        let e = err("check = \"redis\"\ncheck-send = \"x\"");
        assert!(
            e.starts_with("f.toml:5:") && e.contains("give one of"),
            "{e}"
        );
        let e = err("check-http-status = [200]");
        assert!(
            e.starts_with("f.toml:4:") && e.contains("go with check-http"),
            "{e}"
        );
        let e = err("tls = { cert = \"c.pem\", key = \"k.pem\", session-cache = 2000000 }");
        assert!(
            e.starts_with("f.toml:4:") && e.contains("session-cache: 2000000: at most"),
            "{e}"
        );
        let e = err("check-http = \"GET /\"\ncheck-http-status = [99]");
        assert!(e.starts_with("f.toml:5:"), "{e}");
        let e = err("check-expect-regex = \"(\"");
        assert!(
            e.starts_with("f.toml:4:") && e.contains("invalid regular expression"),
            "{e}"
        );
        let text = "[[frontend]]\nlisten = \"127.0.0.1:80\"\nbackends = [\"127.0.0.1:8001\"]\nagent-send = \"x\"\n";
        let e = Config::from_toml(text, "f.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("f.toml:4:") && e.contains("no agent-port"),
            "{e}"
        );
    }

    fn frontend(name: &str, listen: &str, backends: &[&str]) -> FrontendConfig {
        FrontendConfig {
            name: name.into(),
            listen: listen.parse().expect("listen"),
            mode: Mode::ActiveActive,
            balance: BalanceConfig::new(Balance::Roundrobin),
            backends: backends
                .iter()
                .map(|b| BackendConfig::new(b.parse().expect("backend"), (*b).into()))
                .collect(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            check: CheckConfig {
                timeout: DEFAULT_CHECK_INTERVAL,
                rise: 1,
                fall: 1,
                ..CheckConfig::new(DEFAULT_CHECK_INTERVAL)
            },
            failback: true,
            on_down: OnDown::Keep,
            maxconn: None,
            timeout_queue: None,
            retries: crate::config::DEFAULT_RETRIES,
            access_log: AccessLog::Off,
            proxy: ProxyConfig::default(),
            edge: EdgeConfig::default(),
            tls: TlsSettings::default(),
        }
    }

    fn host(dual_stack: bool, addrs: &[&str]) -> Host {
        Host {
            dual_stack,
            addrs: OnceCell::from(
                addrs
                    .iter()
                    .map(|a| a.parse().expect("ip"))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// The index of the frontend at fault, and where.
    fn across(listens: &[(&str, &[&str])], host: &Host) -> Option<(usize, At)> {
        let frontends: Vec<FrontendConfig> = listens
            .iter()
            .enumerate()
            .map(|(i, (listen, backends))| frontend(&format!("f{i}"), listen, backends))
            .collect();
        check_across(&frontends, host)
            .err()
            .map(|(i, fault)| (i, fault.at))
    }

    #[test]
    fn overlapping_listeners_are_found_in_either_order() {
        let dual = host(true, &[]);
        let v6only = host(false, &[]);
        let b: &[&str] = &["10.9.9.9:1"];
        for (a, z, overlap_dual, overlap_v6only) in [
            ("0.0.0.0:80", "127.0.0.1:80", true, true),
            ("[::]:80", "[::1]:80", true, true),
            ("[::]:80", "0.0.0.0:80", true, false),
            ("[::]:80", "127.0.0.1:80", true, false),
            ("[::ffff:127.0.0.1]:80", "127.0.0.1:80", true, true),
            ("127.0.0.1:80", "127.0.0.2:80", false, false),
            ("0.0.0.0:80", "0.0.0.0:81", false, false),
            ("[::1]:80", "127.0.0.1:80", false, false),
            ("0.0.0.0:0", "127.0.0.1:0", false, false),
        ] {
            for (first, second) in [(a, z), (z, a)] {
                let found = across(&[(first, b), (second, b)], &dual);
                let expected = overlap_dual.then_some((1, At::Listen));
                assert_eq!(found, expected, "{first} then {second}, dual stack");
                let found = across(&[(first, b), (second, b)], &v6only);
                let expected = overlap_v6only.then_some((1, At::Listen));
                assert_eq!(found, expected, "{first} then {second}, v6only");
            }
        }
    }

    #[test]
    fn a_backend_that_is_a_listener_of_ringlb_is_found() {
        let h = host(true, &["192.0.2.7", "2001:db8::7"]);
        for (listen, backend, loops) in [
            ("127.0.0.1:80", "127.0.0.1:80", true),
            ("0.0.0.0:80", "127.0.0.1:80", true),
            ("0.0.0.0:80", "127.0.0.5:80", true),
            ("0.0.0.0:80", "192.0.2.7:80", true),
            ("0.0.0.0:80", "192.0.2.8:80", false),
            ("0.0.0.0:80", "127.0.0.1:81", false),
            ("127.0.0.1:80", "0.0.0.0:80", true),
            ("127.0.0.1:80", "127.0.0.2:80", false),
            ("[::]:80", "[2001:db8::7]:80", true),
            ("[::]:80", "127.0.0.1:80", true),
            ("[::]:80", "[::ffff:192.0.2.7]:80", true),
            ("192.0.2.7:80", "192.0.2.7:80", true),
        ] {
            let found = across(
                &[("127.0.0.9:7000", &[backend]), (listen, &["10.9.9.9:1"])],
                &h,
            );
            let expected = loops.then_some((0, At::Backend(0)));
            assert_eq!(found, expected, "listen {listen}, backend {backend}");
        }
        let v6only = host(false, &[]);
        assert_eq!(across(&[("[::]:80", &["127.0.0.1:80"])], &v6only), None);
    }

    #[test]
    fn host_addresses_include_loopback() {
        assert!(host_addresses().contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn names_are_a_safe_charset() {
        for good in [
            "web",
            "db-1_a.b",
            "[::1]:80",
            "db1.example.com:5432",
            "a@b/c",
            "[fe80::1%2]:80",
        ] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in ["", "we\"b\nx", "a b", "a{b}", "a\\b", "é", &"x".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backend_faults_name_the_backend() {
        let f = frontend(
            "f",
            "127.0.0.1:80",
            &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:1"],
        );
        assert_eq!(check_frontend(&f).map_err(|e| e.at), Err(At::Backend(2)));
        let f = frontend(
            "f",
            "127.0.0.1:80",
            &["127.0.0.1:1", "[::ffff:127.0.0.1]:1"],
        );
        assert_eq!(check_frontend(&f).map_err(|e| e.at), Err(At::Backend(1)));
        let f = frontend("f", "127.0.0.1:80", &["127.0.0.1:1", "127.0.0.1:0"]);
        assert_eq!(check_frontend(&f).map_err(|e| e.at), Err(At::Backend(1)));
        let f = frontend("a\"b", "127.0.0.1:80", &["127.0.0.1:1"]);
        assert_eq!(check_frontend(&f).map_err(|e| e.at), Err(At::Name));
    }

    #[test]
    fn edge_keys_resolve_and_zero_or_empty_is_refused() {
        let base = "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"10.0.0.1:1\"]\n";
        let text = format!(
            "{base}allow = [\"10.0.0.0/8\", \"::ffff:192.0.2.1\"]\nmax-conn-per-source = 10\n\
             max-rate-per-source = 5\ntimeout-client-fin = \"2s\"\ntimeout-server-fin = \"3s\"\n"
        );
        let config = Config::from_toml(&text, "f.toml").expect("valid");
        let edge = &config.frontends[0].edge;
        let acl = edge.acl.as_ref().expect("an acl");
        assert!(acl.allows("192.0.2.1".parse().expect("ip")));
        assert!(!acl.allows("192.0.2.2".parse().expect("ip")));
        assert_eq!(edge.max_conn_per_source, Some(10));
        assert_eq!(edge.max_rate_per_source, Some(5));
        assert_eq!(edge.client_fin_timeout, Some(Duration::from_secs(2)));
        assert_eq!(edge.server_fin_timeout, Some(Duration::from_secs(3)));
        for (extra, needle) in [
            (
                "max-conn-per-source = 0\n",
                "max-conn-per-source must be at least 1",
            ),
            (
                "max-rate-per-source = 0\n",
                "max-rate-per-source must be at least 1",
            ),
            ("allow = []\n", "allow: an empty list"),
            ("deny = [\"10.0.0.1/8\"]\n", "10.0.0.0/8"),
            (
                "deny-file = \"/nonexistent/deny.txt\"\n",
                "deny-file: cannot read",
            ),
        ] {
            let err = Config::from_toml(&format!("{base}{extra}"), "f.toml")
                .expect_err(extra)
                .to_string();
            assert!(
                err.starts_with("f.toml:4: ") && err.contains(needle),
                "{err}"
            );
        }
        let none = Config::from_toml(base, "f.toml").expect("valid");
        assert_eq!(none.frontends[0].edge, EdgeConfig::default());
    }

    #[test]
    fn the_line_named_is_the_key_at_fault() {
        let text = "[[frontend]]\nname = \"a\"\nlisten = \"0.0.0.0:7001\"\nbackends = [\"10.0.0.1:1\"]\n\
                    [[frontend]]\nname = \"b\"\nlisten = \"127.0.0.1:7001\"\nbackends = [\"10.0.0.1:1\"]\n";
        let err = Config::from_toml(text, "f.toml").unwrap_err().to_string();
        assert!(err.starts_with("f.toml:7: "), "{err}");
        assert!(
            err.contains("frontends a (0.0.0.0:7001) and b (127.0.0.1:7001)"),
            "{err}"
        );
        let text = "[[frontend]]\nname = \"a\"\nlisten = \"127.0.0.1:7001\"\nbackends = [\n\"10.0.0.1:1\",\n\"10.0.0.1:1\",\n]\n";
        let err = Config::from_toml(text, "f.toml").unwrap_err().to_string();
        assert!(err.starts_with("f.toml:6: "), "{err}");
        let text = "[[frontend]]\nlisten = \"127.0.0.1:7001\"\nname = \"x y\"\nbackends = [\"10.0.0.1:1\"]\n";
        let err = Config::from_toml(text, "f.toml").unwrap_err().to_string();
        assert!(err.starts_with("f.toml:3: "), "{err}");
    }
}
