//! Configuration: what a frontend is, how it is read from a TOML file, and
//! the checks that turn a bad file into one line that names the problem.
//!
//! The command line (`cli.rs`) builds the same [`Config`] for a single
//! frontend, so every setting has one meaning whichever way it arrives.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The most backends one frontend may have: a connection remembers which
/// backends it already tried in a 64-bit mask, so a retry never loops.
pub const MAX_BACKENDS: usize = 64;

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Receive buffers per worker (16 KiB each: 16 MiB). Only messages in
/// flight hold one, so this bounds memory, not connections.
pub const DEFAULT_BUFFERS: u32 = 1024;
/// io_uring's limit for a provided-buffer ring.
pub const MAX_BUFFERS: u32 = 32768;
const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);

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

/// The failover watcher's settings for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Bytes written after connecting; with `expect`, catches a backend
    /// that completes handshakes but no longer answers (a stopped process).
    pub send: Option<Vec<u8>>,
    /// The reply must start with these bytes within the timeout.
    pub expect: Option<Vec<u8>>,
}

impl CheckConfig {
    /// HAProxy's rule of thumb: a check may take as long as the interval,
    /// but waiting more than a second only delays failover.
    pub fn default_timeout(interval: Duration) -> Duration {
        interval.min(Duration::from_secs(1))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    /// As the user wrote it (a host name stays a host name in the logs).
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub mode: Mode,
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub workers: usize,
    /// Size of each worker's receive-buffer ring. When every buffer is held
    /// by a send to a slow peer, receives move to splice, which needs none.
    pub buffers: u32,
    pub drain_timeout: Duration,
    pub frontends: Vec<FrontendConfig>,
}

/// Why a configuration was refused. Each variant renders as one line that
/// names the file, the line and the key where there is one.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        source: std::io::Error,
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
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            ConfigError::Parse {
                origin,
                line,
                column,
                message,
            } => {
                write!(f, "{origin}:{line}:{column}: {message}")
            }
            ConfigError::Invalid {
                origin,
                line: Some(line),
                message,
            } => {
                write!(f, "{origin}:{line}: {message}")
            }
            ConfigError::Invalid {
                origin,
                line: None,
                message,
            } => write!(f, "{origin}: {message}"),
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
    #[serde(default)]
    frontend: Vec<Spanned<RawFrontend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFrontend {
    name: Option<String>,
    listen: Spanned<String>,
    mode: Option<Mode>,
    #[serde(default)]
    backends: Vec<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    check_interval: Option<Spanned<String>>,
    check_timeout: Option<Spanned<String>>,
    rise: Option<u32>,
    fall: Option<u32>,
    check_send: Option<Spanned<String>>,
    check_expect: Option<Spanned<String>>,
    failback: Option<bool>,
    on_down: Option<OnDown>,
    maxconn: Option<u32>,
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
        let backends = self
            .backends
            .iter()
            .map(|b| {
                parse_address(b.get_ref())
                    .map(|addr| BackendConfig {
                        addr,
                        name: b.get_ref().clone(),
                    })
                    .map_err(|e| src.invalid(b, format!("backends: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let interval = src
            .duration(&self.check_interval, "check-interval")?
            .unwrap_or(DEFAULT_CHECK_INTERVAL);
        Ok(FrontendConfig {
            name: self
                .name
                .clone()
                .unwrap_or_else(|| format!("frontend{index}")),
            listen,
            mode: self.mode.unwrap_or(Mode::ActiveActive),
            backends,
            connect_timeout: src
                .duration(&self.connect_timeout, "connect-timeout")?
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            idle_timeout: src
                .duration(&self.idle_timeout, "idle-timeout")?
                .unwrap_or(DEFAULT_IDLE_TIMEOUT),
            check: CheckConfig {
                interval,
                timeout: src
                    .duration(&self.check_timeout, "check-timeout")?
                    .unwrap_or_else(|| CheckConfig::default_timeout(interval)),
                rise: self.rise.unwrap_or(DEFAULT_RISE),
                fall: self.fall.unwrap_or(DEFAULT_FALL),
                send: src.bytes(&self.check_send, "check-send")?,
                expect: src.bytes(&self.check_expect, "check-expect")?,
            },
            failback: self.failback.unwrap_or(true),
            on_down: self.on_down.unwrap_or(OnDown::Keep),
            maxconn: self.maxconn,
        })
    }
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
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// `origin` names the file in error messages.
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
        let mut frontends = Vec::with_capacity(raw.frontend.len());
        for (index, spanned) in raw.frontend.iter().enumerate() {
            let frontend = spanned.get_ref().resolve(index, &src)?;
            validate_frontend(&frontend).map_err(|message| src.invalid(spanned, message))?;
            frontends.push(frontend);
        }
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
            frontends,
        };
        // Checked here too, where the line of the key is known.
        if let Some(workers) = &raw.workers {
            check_workers(*workers.get_ref()).map_err(|m| src.invalid(workers, m))?;
        }
        if let Some(buffers) = &raw.buffers {
            check_buffers(*buffers.get_ref()).map_err(|m| src.invalid(buffers, m))?;
        }
        config.validate().map_err(|message| ConfigError::Invalid {
            origin: origin.to_string(),
            line: None,
            message,
        })?;
        Ok(config)
    }

    /// The checks that span frontends; each frontend was checked on its own
    /// already (with its line) by [`validate_frontend`].
    pub fn validate(&self) -> Result<(), String> {
        if self.frontends.is_empty() {
            return Err("no frontend: add a [[frontend]] table with listen and backends".into());
        }
        check_workers(self.workers)?;
        check_buffers(self.buffers)?;
        for frontend in &self.frontends {
            validate_frontend(frontend).map_err(|e| format!("frontend {}: {e}", frontend.name))?;
        }
        for (i, a) in self.frontends.iter().enumerate() {
            for b in &self.frontends[i + 1..] {
                if a.name == b.name {
                    return Err(format!("two frontends are named {}", a.name));
                }
                if a.listen == b.listen && a.listen.port() != 0 {
                    return Err(format!(
                        "frontends {} and {} both listen on {}",
                        a.name, b.name, a.listen
                    ));
                }
            }
        }
        Ok(())
    }
}

fn validate_frontend(f: &FrontendConfig) -> Result<(), String> {
    if f.backends.is_empty() {
        return Err("no backend: give at least one backend address".into());
    }
    if f.backends.len() > MAX_BACKENDS {
        return Err(format!(
            "{} backends: at most {MAX_BACKENDS} per frontend",
            f.backends.len()
        ));
    }
    if f.check.rise == 0 || f.check.fall == 0 {
        return Err("rise and fall must be at least 1".into());
    }
    if f.maxconn == Some(0) {
        return Err("maxconn must be at least 1".into());
    }
    Ok(())
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
        assert_eq!(db.check.send.as_deref(), Some(&b"PING\r\n"[..]));
        assert!(!db.failback);
        assert_eq!(db.on_down, OnDown::Shutdown);
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
}
