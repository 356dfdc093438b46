//! What a health check does once connected, and how it judges the reply.
//!
//! Every kind of check is a script of steps (HAProxy's `tcp-check`): send
//! bytes, then expect a reply that contains a string, matches a regular
//! expression, or is a valid answer of a protocol (HTTP, PostgreSQL,
//! MySQL, TLS). The ready-made kinds (`check = "redis"`, ...) are scripts
//! built here, so one loop runs them all and every failure names the step
//! it happened in.
//!
//! Agent checks (HAProxy's `agent-check`) are a separate, simpler exchange:
//! read one line and apply its words ([`AgentReply`]).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crate::model::{AdminState, ConnectFailure};

/// The most of a reply a check reads (HAProxy's default check buffer):
/// a backend that streams without end cannot grow a check's memory.
pub const MAX_REPLY: usize = 16 * 1024;
/// An agent's reply is one short line.
const MAX_AGENT_LINE: usize = 1024;
/// How much of a reply a failure quotes: enough to see what came back,
/// short enough for a log line.
const QUOTED: usize = 80;

/// A regular expression as written, compiled once when the config is read.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: String,
    regex: regex::bytes::Regex,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Pattern, String> {
        regex::bytes::RegexBuilder::new(source)
            // A pattern that compiles to megabytes is a mistake, and each
            // check would pay for it.
            .size_limit(1 << 20)
            .build()
            .map(|regex| Pattern {
                source: source.to_string(),
                regex,
            })
            .map_err(|e| {
                let text = e.to_string();
                let detail: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect();
                format!(
                    "invalid regular expression {source:?}: {}",
                    detail.join(" ")
                )
            })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl Hash for Pattern {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.source.hash(state);
    }
}

/// Which kind of check a script is, for its name in the status and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Connect, then the optional check-send / check-expect(-regex).
    Tcp,
    /// `check = [ ... ]`: the steps as written.
    Steps,
    Redis,
    RedisMaster,
    Postgres,
    Mysql,
    Tls,
    Http,
}

impl Kind {
    pub const READY_MADE: [&'static str; 7] = [
        "tcp",
        "redis",
        "redis-master",
        "postgres",
        "mysql",
        "tls",
        "http",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Steps => "steps",
            Kind::Redis => "redis",
            Kind::RedisMaster => "redis-master",
            Kind::Postgres => "postgres",
            Kind::Mysql => "mysql",
            Kind::Tls => "tls",
            Kind::Http => "http",
        }
    }

    /// A ready-made kind by the name `check = "..."` gives it.
    pub fn from_name(name: &str) -> Option<Kind> {
        Some(match name {
            "tcp" => Kind::Tcp,
            "redis" => Kind::Redis,
            "redis-master" => Kind::RedisMaster,
            "postgres" => Kind::Postgres,
            "mysql" => Kind::Mysql,
            "tls" => Kind::Tls,
            "http" => Kind::Http,
            _ => return None,
        })
    }
}

/// An HTTP check's request line and Host header.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    /// "HTTP/1.1" unless written otherwise.
    pub version: String,
    /// `check-http-host`; the checked address when absent.
    pub host: Option<String>,
}

impl HttpRequest {
    /// `GET /path`, `HEAD /x` or `GET /x HTTP/1.0`.
    pub fn parse(text: &str) -> Result<HttpRequest, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (method, path, version) = match words[..] {
            [method, path] => (method, path, "HTTP/1.1"),
            [method, path, version] => (method, path, version),
            _ => {
                return Err(format!(
                    "'{text}': expected METHOD /PATH [HTTP/1.x], e.g. \"GET /health\""
                ));
            }
        };
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("'{text}': the method must be upper-case letters"));
        }
        if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control()) {
            return Err(format!("'{text}': the path must start with /"));
        }
        if version != "HTTP/1.1" && version != "HTTP/1.0" {
            return Err(format!(
                "'{text}': the version must be HTTP/1.1 or HTTP/1.0"
            ));
        }
        Ok(HttpRequest {
            method: method.into(),
            path: path.into(),
            version: version.into(),
            host: None,
        })
    }

    fn render(&self, target: SocketAddr) -> Vec<u8> {
        let host = self.host.clone().unwrap_or_else(|| target.to_string());
        format!(
            "{} {} {}\r\nHost: {host}\r\nUser-Agent: ringlb-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.method, self.path, self.version
        )
        .into_bytes()
    }
}

/// A Host header value: no byte that could end the header or the request.
pub fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!(
            "'{host}' is no host name (no spaces or control characters)"
        ));
    }
    Ok(())
}

/// What makes an HTTP reply a pass.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpExpect {
    /// Empty: any 2xx or 3xx.
    pub statuses: Vec<u16>,
    /// The body must contain these bytes.
    pub body: Option<Vec<u8>>,
}

/// What an expect step waits for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Matcher {
    /// The reply contains these bytes (HAProxy's `expect string`).
    Contains(Vec<u8>),
    /// The reply matches (HAProxy's `expect rstring`).
    Regex(Pattern),
    Http(HttpExpect),
    /// 'S' or 'N' to an SSLRequest, or an 'R' or 'E' message.
    Postgres,
    /// A protocol 10 server greeting; an error packet is a failure.
    Mysql,
    /// A handshake record that starts with a ServerHello.
    Tls,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    Send(Vec<u8>),
    /// The HTTP request, rendered with the checked address as its Host.
    Http(HttpRequest),
    /// A TLS ClientHello, made at each send: a random drawn when the
    /// config is read would make every reload see a changed check.
    ClientHello,
    Expect {
        matcher: Matcher,
        /// Its own deadline, inside the check's timeout.
        timeout: Option<Duration>,
    },
}

fn quote(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(QUOTED)];
    let more = if bytes.len() > QUOTED { "..." } else { "" };
    format!("{:?}{more}", String::from_utf8_lossy(shown))
}

impl Step {
    pub fn expect(matcher: Matcher) -> Step {
        Step::Expect {
            matcher,
            timeout: None,
        }
    }

    fn describe(&self) -> String {
        match self {
            Step::Send(bytes) => format!("send {}", quote(bytes)),
            Step::Http(r) => format!("{} {}", r.method, r.path),
            Step::ClientHello => "send a TLS ClientHello".into(),
            Step::Expect { matcher, .. } => match matcher {
                Matcher::Contains(b) => format!("expect {}", quote(b)),
                Matcher::Regex(p) => format!("expect-regex {:?}", p.as_str()),
                Matcher::Http(h) if h.statuses.is_empty() => "expect status 2xx/3xx".into(),
                Matcher::Http(h) => format!("expect status {:?}", h.statuses),
                Matcher::Postgres => "expect a PostgreSQL reply".into(),
                Matcher::Mysql => "expect a MySQL greeting".into(),
                Matcher::Tls => "expect a TLS ServerHello".into(),
            },
        }
    }
}

/// A check: its kind and the steps that run after the connect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Script {
    pub kind: Kind,
    pub steps: Vec<Step>,
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl Script {
    /// Connect only.
    pub fn connect() -> Script {
        Script {
            kind: Kind::Tcp,
            steps: Vec::new(),
        }
    }

    /// `check-send`, `check-expect`, `check-expect-regex` (each optional).
    pub fn flat(send: Option<Vec<u8>>, expect: Option<Vec<u8>>, regex: Option<Pattern>) -> Script {
        let mut steps = Vec::new();
        steps.extend(send.map(Step::Send));
        steps.extend(expect.map(|e| Step::expect(Matcher::Contains(e))));
        steps.extend(regex.map(|r| Step::expect(Matcher::Regex(r))));
        Script {
            kind: Kind::Tcp,
            steps,
        }
    }

    pub fn http(request: HttpRequest, expect: HttpExpect) -> Script {
        Script {
            kind: Kind::Http,
            steps: vec![Step::Http(request), Step::expect(Matcher::Http(expect))],
        }
    }

    /// A ready-made kind; `Http` with its defaults (GET /, 2xx/3xx).
    pub fn ready_made(kind: Kind) -> Script {
        let steps = match kind {
            Kind::Tcp | Kind::Steps => Vec::new(),
            Kind::Redis => vec![
                Step::Send(b"PING\r\n".to_vec()),
                Step::expect(Matcher::Contains(b"+PONG".to_vec())),
            ],
            Kind::RedisMaster => vec![
                Step::Send(b"INFO replication\r\n".to_vec()),
                Step::expect(Matcher::Contains(b"role:master".to_vec())),
            ],
            Kind::Postgres => vec![
                Step::Send(SSL_REQUEST.to_vec()),
                Step::expect(Matcher::Postgres),
            ],
            Kind::Mysql => vec![Step::expect(Matcher::Mysql)],
            Kind::Tls => vec![Step::ClientHello, Step::expect(Matcher::Tls)],
            Kind::Http => {
                let request = HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    version: "HTTP/1.1".into(),
                    host: None,
                };
                return Script::http(
                    request,
                    HttpExpect {
                        statuses: Vec::new(),
                        body: None,
                    },
                );
            }
        };
        Script { kind, steps }
    }

    /// The check in a few words, for the status: "tcp", "redis-master",
    /// "http GET /primary", "3 steps".
    pub fn describe(&self) -> String {
        match (self.kind, self.steps.first()) {
            (Kind::Tcp, None) => "tcp".into(),
            (Kind::Tcp, Some(_)) => "tcp send/expect".into(),
            (Kind::Steps, _) => format!("{} steps", self.steps.len()),
            (Kind::Http, Some(Step::Http(r))) => format!("http {} {}", r.method, r.path),
            (kind, _) => kind.name().into(),
        }
    }

    /// How a failure in step `index` is named: "step 2 (expect \"+PONG\")"
    /// for a written list, "redis-master check (expect ...)" for a
    /// ready-made kind.
    fn label(&self, index: usize) -> String {
        let step = self.steps[index].describe();
        match self.kind {
            Kind::Steps => format!("step {} ({step})", index + 1),
            Kind::Tcp => step,
            kind => format!("{} check ({step})", kind.name()),
        }
    }

    /// Runs the steps on a connected stream, all before `deadline`.
    pub async fn run(
        &self,
        stream: &mut TcpStream,
        target: SocketAddr,
        deadline: Instant,
    ) -> Result<(), Failure> {
        // What arrived since the last send: the expects after a send all
        // judge its reply.
        let mut got = Vec::new();
        for (index, step) in self.steps.iter().enumerate() {
            let outcome = match step {
                Step::Send(bytes) => send(stream, bytes, deadline).await,
                Step::Http(request) => send(stream, &request.render(target), deadline).await,
                Step::ClientHello => send(stream, &client_hello(), deadline).await,
                Step::Expect { matcher, timeout } => {
                    let until = timeout.map_or(deadline, |t| (Instant::now() + t).min(deadline));
                    expect(stream, &mut got, matcher, until).await
                }
            };
            if !matches!(step, Step::Expect { .. }) {
                got.clear();
            }
            outcome.map_err(|failure| Failure::Step {
                label: self.label(index),
                failure: Box::new(failure),
            })?;
        }
        Ok(())
    }
}

async fn send(stream: &mut TcpStream, bytes: &[u8], deadline: Instant) -> Result<(), Failure> {
    match timeout_at(deadline, stream.write_all(bytes)).await {
        Ok(written) => written.map_err(|e| Failure::from_io(&e)),
        Err(_) => Err(Failure::NoReply { got: Vec::new() }),
    }
}

async fn expect(
    stream: &mut TcpStream,
    got: &mut Vec<u8>,
    matcher: &Matcher,
    until: Instant,
) -> Result<(), Failure> {
    let mut buf = [0u8; 4096];
    loop {
        match matcher.judge(got) {
            Verdict::Pass => return Ok(()),
            Verdict::Fail(failure) => return Err(failure),
            Verdict::More => {}
        }
        let room = MAX_REPLY.saturating_sub(got.len()).min(buf.len());
        if room == 0 {
            return Err(Failure::Invalid(format!(
                "no match in the first {} KiB (got {})",
                MAX_REPLY / 1024,
                quote(got)
            )));
        }
        match timeout_at(until, stream.read(&mut buf[..room])).await {
            Err(_) => return Err(Failure::NoReply { got: got.clone() }),
            Ok(Ok(0)) => return Err(matcher.on_close(got)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(Failure::from_io(&e)),
        }
    }
}

enum Verdict {
    Pass,
    /// Not yet: read on.
    More,
    Fail(Failure),
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

impl Matcher {
    fn judge(&self, got: &[u8]) -> Verdict {
        match self {
            Matcher::Contains(needle) if contains(got, needle) => Verdict::Pass,
            Matcher::Regex(p) if p.regex.is_match(got) => Verdict::Pass,
            Matcher::Contains(_) | Matcher::Regex(_) => Verdict::More,
            Matcher::Http(expect) => judge_http(expect, got),
            Matcher::Postgres => judge_postgres(got),
            Matcher::Mysql => judge_mysql(got),
            Matcher::Tls => judge_tls(got),
        }
    }

    /// The peer closed before the reply passed.
    fn on_close(&self, got: &[u8]) -> Failure {
        match self {
            Matcher::Http(HttpExpect {
                body: Some(body), ..
            }) if !got.is_empty() => {
                Failure::Invalid(format!("the body did not contain {}", quote(body)))
            }
            _ => Failure::Closed { got: got.to_vec() },
        }
    }
}

fn judge_http(expect: &HttpExpect, got: &[u8]) -> Verdict {
    let Some(end) = got.windows(2).position(|w| w == b"\r\n") else {
        if got.len() >= 5 && !got.starts_with(b"HTTP/") {
            return Verdict::Fail(Failure::Invalid(format!(
                "not an HTTP reply (got {})",
                quote(got)
            )));
        }
        return Verdict::More;
    };
    let line = String::from_utf8_lossy(&got[..end]);
    let mut words = line.splitn(3, ' ');
    let version = words.next().unwrap_or("");
    let status = words.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
        return Verdict::Fail(Failure::Invalid(format!(
            "not an HTTP reply (got {})",
            quote(got)
        )));
    };
    let wanted = if expect.statuses.is_empty() {
        (200..400).contains(&status)
    } else {
        expect.statuses.contains(&status)
    };
    if !wanted {
        let want = if expect.statuses.is_empty() {
            "2xx/3xx".to_string()
        } else {
            format!("{:?}", expect.statuses)
        };
        return Verdict::Fail(Failure::Invalid(format!(
            "status {} (want {want})",
            line.trim_start_matches(version).trim()
        )));
    }
    let Some(body) = &expect.body else {
        return Verdict::Pass;
    };
    match got.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(head) if contains(&got[head + 4..], body) => Verdict::Pass,
        _ => Verdict::More,
    }
}

fn judge_postgres(got: &[u8]) -> Verdict {
    match got.first() {
        None => Verdict::More,
        Some(b'S' | b'N') => Verdict::Pass,
        Some(b'R' | b'E') if got.len() < 5 => Verdict::More,
        Some(b'R' | b'E') => {
            let len = u32::from_be_bytes([got[1], got[2], got[3], got[4]]);
            if (4..=MAX_REPLY as u32).contains(&len) {
                Verdict::Pass
            } else {
                Verdict::Fail(Failure::Invalid(format!(
                    "not a PostgreSQL reply (got {})",
                    quote(got)
                )))
            }
        }
        Some(_) => Verdict::Fail(Failure::Invalid(format!(
            "not a PostgreSQL reply (got {})",
            quote(got)
        ))),
    }
}

fn judge_mysql(got: &[u8]) -> Verdict {
    if got.len() < 5 {
        return Verdict::More;
    }
    let len = usize::from(got[0]) | usize::from(got[1]) << 8 | usize::from(got[2]) << 16;
    let payload = &got[4..];
    let complete = payload.len() >= len;
    match payload[0] {
        10 if payload[1..].contains(&0) => Verdict::Pass,
        10 if !complete => Verdict::More,
        0xff if !complete => Verdict::More,
        0xff => {
            let code = payload
                .get(1..3)
                .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]));
            let mut message = payload.get(3..len).unwrap_or(&[]);
            if message.first() == Some(&b'#') {
                message = message.get(6..).unwrap_or(&[]);
            }
            Verdict::Fail(Failure::Invalid(format!(
                "MySQL refused: error {code}: {}",
                String::from_utf8_lossy(message)
            )))
        }
        _ => Verdict::Fail(Failure::Invalid(format!(
            "not a MySQL greeting (got {})",
            quote(got)
        ))),
    }
}

fn judge_tls(got: &[u8]) -> Verdict {
    match got {
        [] | [0x16 | 0x15, ..] if got.len() < 7 => Verdict::More,
        [0x16, 3, _, _, _, 2, ..] => Verdict::Pass,
        [0x15, 3, _, _, _, level, desc, ..] => Verdict::Fail(Failure::Invalid(format!(
            "TLS alert {desc} (level {level}) instead of a ServerHello"
        ))),
        _ => Verdict::Fail(Failure::Invalid(format!(
            "not a TLS ServerHello (got {})",
            quote(got)
        ))),
    }
}

/// A TLS ClientHello that any TLS 1.2 or 1.3 server answers with a
/// ServerHello (or, for 1.3, a HelloRetryRequest, which is one): common
/// cipher suites and groups, and an empty key share so that no key needs
/// to be made. The random need not be secret: no session follows.
fn client_hello() -> Vec<u8> {
    let seed = std::collections::hash_map::RandomState::new();
    let mut random = Vec::with_capacity(64);
    for i in 0u64..8 {
        use std::hash::BuildHasher;
        random.extend_from_slice(&seed.hash_one(i).to_le_bytes());
    }
    let with_len16 = |bytes: &[u8]| {
        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    };
    let extension = |kind: u16, data: &[u8]| {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend(with_len16(data));
        out
    };
    let suites: [u16; 15] = [
        0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc009, 0xc013,
        0xc00a, 0xc014, 0x009c, 0x002f,
    ];
    let groups: [u16; 3] = [0x001d, 0x0017, 0x0018];
    let signatures: [u16; 9] = [
        0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601, 0x0201,
    ];
    let be = |list: &[u16]| {
        list.iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<u8>>()
    };
    let mut extensions = Vec::new();
    extensions.extend(extension(0x000a, &with_len16(&be(&groups))));
    extensions.extend(extension(0x000b, &[1, 0]));
    extensions.extend(extension(0x000d, &with_len16(&be(&signatures))));
    extensions.extend(extension(0x002b, &[4, 0x03, 0x04, 0x03, 0x03]));
    extensions.extend(extension(0x0033, &[0, 0]));
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&random[..32]);
    body.push(32);
    body.extend_from_slice(&random[32..64]);
    body.extend(with_len16(&be(&suites)));
    body.extend([1, 0]);
    body.extend(with_len16(&extensions));
    let mut handshake = vec![1];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(with_len16(&handshake));
    record
}

/// Why a check failed, as the operator reads it in the DOWN line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    Refused,
    /// The connect timed out.
    TimedOut,
    /// Connected, but no (complete) reply within the timeout: a hung
    /// process, or one that answered something else.
    NoReply {
        got: Vec<u8>,
    },
    /// The backend closed before its reply passed.
    Closed {
        got: Vec<u8>,
    },
    Reset,
    /// A reply that can never pass (a wrong status, an error packet).
    Invalid(String),
    /// The check could not run for a reason on this host (out of local
    /// ports, fds or memory): it says nothing about the backend and is not
    /// counted, as live connects failing the same way are not.
    Local(String),
    Other(String),
    /// A failure in one step of the script, named.
    Step {
        label: String,
        failure: Box<Failure>,
    },
}

impl Failure {
    pub fn from_io(e: &std::io::Error) -> Failure {
        if let Some(errno) = e.raw_os_error()
            && ConnectFailure::from_errno(errno) == ConnectFailure::Local
        {
            return Failure::Local(e.to_string());
        }
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Failure::Refused,
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::TimedOut,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => Failure::Reset,
            _ => Failure::Other(e.to_string()),
        }
    }

    /// The step it failed in, if it got past the connect.
    pub fn step(&self) -> Option<&str> {
        match self {
            Failure::Step { label, .. } => Some(label),
            _ => None,
        }
    }

    /// Without the step: what went wrong.
    pub fn cause(&self) -> &Failure {
        match self {
            Failure::Step { failure, .. } => failure.cause(),
            other => other,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused => f.write_str("connection refused"),
            Failure::TimedOut => f.write_str("connect timed out"),
            Failure::NoReply { got } if got.is_empty() => {
                f.write_str("no reply within the timeout")
            }
            Failure::NoReply { got } => write!(f, "timed out (got {})", quote(got)),
            Failure::Closed { got } if got.is_empty() => f.write_str("closed before replying"),
            Failure::Closed { got } => write!(f, "closed before a match (got {})", quote(got)),
            Failure::Reset => f.write_str("connection reset"),
            Failure::Invalid(e) | Failure::Other(e) => f.write_str(e),
            Failure::Local(e) => write!(f, "check could not run here: {e}"),
            Failure::Step { label, failure } => write!(f, "{label}: {failure}"),
        }
    }
}

/// What an agent's line says, word by word (HAProxy's `agent-check`).
/// Words it does not say leave that part of the state as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentReply {
    /// `ready`, `drain` or `maint`.
    pub admin: Option<AdminState>,
    /// `up` (true), or `down`, `fail`, `stopped` (false, with the word).
    pub up: Option<(bool, String)>,
    /// `NN%`: the share of the configured weight.
    pub weight_percent: Option<u32>,
    /// The text after a `#`, given with `down` as the reason.
    pub description: String,
    /// Words it did not understand (`maxconn:N` among them: not supported).
    pub ignored: Vec<String>,
}

/// The highest `NN%` taken: 256 times the weight, HAProxy's ceiling.
pub const MAX_AGENT_PERCENT: u32 = 25_600;

impl AgentReply {
    /// Words separated by spaces, tabs or commas, in any order; a `#`
    /// starts the description. Case does not matter.
    pub fn parse(line: &str) -> AgentReply {
        let (words, description) = line.split_once('#').unwrap_or((line, ""));
        let mut reply = AgentReply {
            description: description.trim().to_string(),
            ..AgentReply::default()
        };
        for word in words.split([' ', '\t', ',']).filter(|w| !w.is_empty()) {
            let lower = word.to_ascii_lowercase();
            match lower.as_str() {
                "ready" => reply.admin = Some(AdminState::Ready),
                "drain" => reply.admin = Some(AdminState::Drain),
                "maint" => reply.admin = Some(AdminState::Maint),
                "up" => reply.up = Some((true, lower)),
                "down" | "fail" | "failed" | "stopped" => reply.up = Some((false, lower)),
                _ => match lower.strip_suffix('%').map(str::parse::<u32>) {
                    Some(Ok(percent)) => {
                        reply.weight_percent = Some(percent.min(MAX_AGENT_PERCENT))
                    }
                    _ => reply.ignored.push(word.to_string()),
                },
            }
        }
        reply
    }
}

/// Asks an agent: connect, send `send` if any, read one line. `Err` when
/// it cannot be reached or says nothing in time (which changes nothing).
pub async fn ask_agent(
    stream: &mut TcpStream,
    send: Option<&[u8]>,
    deadline: Instant,
) -> Result<String, Failure> {
    if let Some(bytes) = send {
        self::send(stream, bytes, deadline).await?;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        if let Some(end) = got.iter().position(|b| *b == b'\r' || *b == b'\n') {
            got.truncate(end);
            break;
        }
        if got.len() >= MAX_AGENT_LINE {
            break;
        }
        match timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(Failure::NoReply { got }),
            Ok(Ok(0)) if got.is_empty() => return Err(Failure::Closed { got }),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(Failure::from_io(&e)),
        }
    }
    Ok(String::from_utf8_lossy(&got).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(m: &Matcher, got: &[u8]) -> &'static str {
        match m.judge(got) {
            Verdict::Pass => "pass",
            Verdict::More => "more",
            Verdict::Fail(_) => "fail",
        }
    }

    #[test]
    fn contains_and_regex_match_anywhere_in_the_reply() {
        let m = Matcher::Contains(b"role:master".to_vec());
        assert_eq!(verdict(&m, b"# Replication\r\nrole:master\r\n"), "pass");
        assert_eq!(verdict(&m, b"# Replication\r\nrole:sla"), "more");
        let r = Matcher::Regex(Pattern::new("role:(master|slave)").expect("regex"));
        assert_eq!(verdict(&r, b"x\r\nrole:slave\r\n"), "pass");
        assert_eq!(verdict(&r, b"x\r\nrole:replica"), "more");
        assert!(Pattern::new("role:(").unwrap_err().contains("role:("));
    }

    #[test]
    fn http_replies_are_judged_by_status_and_body() {
        let any = Matcher::Http(HttpExpect {
            statuses: vec![],
            body: None,
        });
        assert_eq!(verdict(&any, b"HTTP/1.1 200 OK\r\n"), "pass");
        assert_eq!(verdict(&any, b"HTTP/1.1 302 Found\r\n"), "pass");
        assert_eq!(
            verdict(&any, b"HTTP/1.1 503 Service Unavailable\r\n"),
            "fail"
        );
        assert_eq!(verdict(&any, b"HTTP/1.1 20"), "more");
        assert_eq!(verdict(&any, b"SSH-2.0-OpenSSH\r\n"), "fail");
        let listed = Matcher::Http(HttpExpect {
            statuses: vec![204],
            body: Some(b"primary".to_vec()),
        });
        assert_eq!(verdict(&listed, b"HTTP/1.1 200 OK\r\n\r\nprimary"), "fail");
        assert_eq!(
            verdict(&listed, b"HTTP/1.1 204 OK\r\nA: b\r\n\r\nrole: prim"),
            "more"
        );
        assert_eq!(
            verdict(&listed, b"HTTP/1.1 204 OK\r\n\r\nrole: primary"),
            "pass"
        );
        assert!(HttpRequest::parse("GET /x HTTP/1.0").is_ok());
        assert!(HttpRequest::parse("get /x").is_err());
        assert!(HttpRequest::parse("GET x").is_err());
    }

    #[test]
    fn protocol_replies_are_recognised() {
        assert_eq!(verdict(&Matcher::Postgres, b"N"), "pass");
        assert_eq!(verdict(&Matcher::Postgres, b"E\0\0\0\x10"), "pass");
        assert_eq!(verdict(&Matcher::Postgres, b"HTTP/1.1"), "fail");
        let mut greeting = vec![20, 0, 0, 0, 10];
        greeting.extend_from_slice(b"8.0.36\0rest");
        assert_eq!(verdict(&Matcher::Mysql, &greeting), "pass");
        let error = b"\x17\0\0\0\xff\x10\x04Too many connections";
        match Matcher::Mysql.judge(error) {
            Verdict::Fail(f) => assert!(f.to_string().contains("1040: Too many"), "{f}"),
            _ => panic!("an error packet is a failure"),
        }
        assert_eq!(
            verdict(&Matcher::Tls, b"\x16\x03\x03\x00\x40\x02\0"),
            "pass"
        );
        assert_eq!(
            verdict(&Matcher::Tls, b"\x15\x03\x03\x00\x02\x02\x28"),
            "fail"
        );
        assert_eq!(Script::ready_made(Kind::Tls), Script::ready_made(Kind::Tls));
        let hello = client_hello();
        assert_eq!(hello[0], 0x16);
        assert_eq!(
            usize::from(u16::from_be_bytes([hello[3], hello[4]])),
            hello.len() - 5
        );
    }

    #[test]
    fn agent_words_come_in_any_order_and_combination() {
        let r = AgentReply::parse("drain,50% up");
        assert_eq!(r.admin, Some(AdminState::Drain));
        assert_eq!(r.weight_percent, Some(50));
        assert_eq!(r.up, Some((true, "up".into())));
        let r = AgentReply::parse("DOWN # disk full");
        assert_eq!(r.up, Some((false, "down".into())));
        assert_eq!(r.description, "disk full");
        assert_eq!(r.admin, None);
        let r = AgentReply::parse("maint\tmaxconn:30 75%");
        assert_eq!(r.admin, Some(AdminState::Maint));
        assert_eq!(r.ignored, ["maxconn:30"]);
        assert_eq!(AgentReply::parse("").up, None);
    }
}
