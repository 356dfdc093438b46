//! The command line: flags for one frontend, or a config file for many.
//! Both end in the same [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use std::sync::Arc;

use crate::acl::{Acl, Cidr, PrefixSet};
use crate::edge::EdgeConfig;

use crate::check::{HttpExpect, HttpRequest, Pattern, Script};

use crate::config::{
    self, BackendConfig, Balance, BalanceConfig, CheckConfig, Config, ConfigError, ConfigSource,
    FrontendConfig, Mode, OnDown,
};
use crate::proxy::{self, ProxyConfig, Version};

/// A config message about keys, worded for the flags that set them.
fn flags(message: &str) -> String {
    message
        .replace("accept-proxy-from", "--accept-proxy-from")
        .replace("accept-proxy = true", "--accept-proxy")
        .replace(
            "[\"0.0.0.0/0\", \"::/0\"]",
            "--accept-proxy-from 0.0.0.0/0 --accept-proxy-from ::/0",
        )
        .replace("timeout-proxy-header", "--timeout-proxy-header")
        .replace("set send-proxy", "set --send-proxy")
}

const AFTER_HELP: &str = "\
Durations are written 500ms, 2s, 5m, 1h; a bare number is milliseconds.
Examples:
  ringlb --listen 0.0.0.0:80 --backend 10.0.0.1:8080 --backend 10.0.0.2:8080
  ringlb --listen 0.0.0.0:5432 --mode active-passive --backend db1:5432 --backend db2:5432
  ringlb --config /etc/ringlb.toml
  ringlb demo
Signals: SIGTERM or SIGUSR1 leaves: /ready says 503 at once, ringlb keeps
serving for --leave-delay (time for keepalived or BGP to move the address),
then drains (stop accepting, let connections finish, up to --drain-timeout);
SIGINT drains at once; a second signal skips ahead (leave, drain, stop). SIGHUP and
SIGUSR2 are logged and ignored (reserved for reload); SIGQUIT logs a status
line per frontend. `ringlb ctl` drives a ringlb started with --admin-socket
(show, drain, disable, enable, reload). Logs: RUST_LOG=debug adds one line per connection; a
stalled stderr never slows traffic (lines are dropped and counted instead).";

#[derive(Parser, Debug)]
#[command(name = "ringlb", version, about = "A layer-4 TCP load balancer on io_uring", after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Address to accept clients on, e.g. 0.0.0.0:80 (port 0 picks a free port)
    #[arg(long, value_name = "ADDR", value_parser = config::parse_address, conflicts_with = "config")]
    listen: Option<SocketAddr>,

    /// Backend address; repeat for each backend. Order is priority in active-passive mode
    #[arg(long = "backend", value_name = "ADDR", value_parser = parse_backend, conflicts_with = "config")]
    backends: Vec<BackendConfig>,

    /// active-active: round robin over backends that are up; active-passive: all to the first that is up [default: active-active]
    #[arg(long, value_enum, conflicts_with = "config")]
    mode: Option<Mode>,

    /// How to choose a backend (HAProxy's balance); active-active is roundrobin, active-passive is first [default: roundrobin]
    #[arg(long, value_enum, value_name = "ALGORITHM", conflicts_with = "config")]
    balance: Option<Balance>,

    /// A backend that comes back up ramps from 1/20 of its share to all of it over this time (HAProxy's slowstart)
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration, conflicts_with = "config")]
    slowstart: Option<Duration>,

    /// Worker threads, each with its own io_uring and listener [default: number of cores]
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// Receive buffers per worker, 16 KiB each, a power of two up to 32768; only messages in flight hold one [default: 1024]
    #[arg(long, value_name = "N")]
    buffers: Option<u32>,

    /// Time allowed to connect to a backend before trying the next
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = config::parse_duration, conflicts_with = "config")]
    connect_timeout: Duration,

    /// Close connections that move no byte for this long
    #[arg(long, value_name = "DUR", default_value = "5m", value_parser = config::parse_duration, conflicts_with = "config")]
    idle_timeout: Duration,

    /// Time between health checks of each backend (HAProxy's inter)
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = config::parse_duration, conflicts_with = "config")]
    check_interval: Duration,

    /// Time a health check may take [default: the interval, at most 1s]
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration, conflicts_with = "config")]
    check_timeout: Option<Duration>,

    /// Good checks in a row that mark a down backend up
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_RISE, conflicts_with = "config")]
    rise: u32,

    /// Failed checks (or failed connects on live traffic) in a row that mark a backend down
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_FALL, conflicts_with = "config")]
    fall: u32,

    /// Bytes a check sends after connecting (escapes: \r \n \t \0 \\ \xHH)
    #[arg(long, value_name = "STRING", value_parser = parse_bytes, conflicts_with = "config")]
    check_send: Option<Bytes>,

    /// Bytes the check's reply must contain (read until seen, closed or timed out); catches a backend that accepts but hangs
    #[arg(long, value_name = "STRING", value_parser = parse_bytes, conflicts_with = "config")]
    check_expect: Option<Bytes>,

    /// A regular expression the check's reply must match (HAProxy's expect rstring)
    #[arg(long, value_name = "REGEX", value_parser = parse_pattern, conflicts_with = "config")]
    check_expect_regex: Option<Pattern>,

    /// An HTTP check instead: "GET /path" passes on 2xx/3xx (HAProxy's httpchk)
    #[arg(long, value_name = "REQUEST", value_parser = HttpRequest::parse, conflicts_with_all = ["config", "check_send", "check_expect", "check_expect_regex"])]
    check_http: Option<HttpRequest>,

    /// Check this port instead of each backend's traffic port (a sidecar)
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..), conflicts_with = "config")]
    check_port: Option<u16>,

    /// Interval while a backend's state is changing (HAProxy's fastinter) [default: the interval]
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration, conflicts_with = "config")]
    fastinter: Option<Duration>,

    /// Interval while a backend is down (HAProxy's downinter) [default: the interval]
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration, conflicts_with = "config")]
    downinter: Option<Duration>,

    /// Active-passive: keep traffic on the promoted backend when the active one comes back
    #[arg(long, conflicts_with = "config")]
    no_failback: bool,

    /// What to do with established connections of a backend marked down
    #[arg(long, value_enum, value_name = "ACTION", default_value_t = OnDown::Keep, conflicts_with = "config")]
    on_down: OnDown,

    /// Send a PROXY protocol header of this version to backends before the client's bytes (health checks send one too: v2 LOCAL, v1 UNKNOWN)
    #[arg(long, value_enum, value_name = "VERSION", conflicts_with = "config")]
    send_proxy: Option<Version>,

    /// Read a PROXY protocol header (v1 or v2) from each client first; needs --accept-proxy-from
    #[arg(long, conflicts_with = "config")]
    accept_proxy: bool,

    /// A peer (address or CIDR prefix) allowed to send PROXY headers; repeat for each; others are reset
    #[arg(long, value_name = "CIDR", value_parser = crate::acl::Cidr::parse, conflicts_with = "config")]
    accept_proxy_from: Vec<proxy::Cidr>,

    /// Time a client gets to send its whole PROXY header [default: 3s]
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration, conflicts_with = "config")]
    timeout_proxy_header: Option<Duration>,

    /// Most client connections at once; more wait in the accept queue [default: no limit]
    #[arg(long, value_name = "N", conflicts_with = "config")]
    maxconn: Option<u32>,

    /// Accept only clients in this CIDR (or address); repeat for each. Anything else is reset
    #[arg(long = "allow", value_name = "CIDR", value_parser = Cidr::parse, conflicts_with = "config")]
    allow: Vec<Cidr>,

    /// Reset clients in this CIDR (or address); repeat for each. Deny wins over allow
    #[arg(long = "deny", value_name = "CIDR", value_parser = Cidr::parse, conflicts_with = "config")]
    deny: Vec<Cidr>,

    /// Most connections open at once from one client address (an IPv6 /64); more are reset [default: no limit]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "config")]
    max_conn_per_source: Option<u32>,

    /// Most new connections per second from one client address (an IPv6 /64); more are reset [default: no limit]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "config")]
    max_rate_per_source: Option<u32>,

    /// Close a connection the backend has ended (half-closed) once it idles this long [default: the idle timeout]
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration, conflicts_with = "config")]
    timeout_client_fin: Option<Duration>,

    /// Close a connection the client has ended (half-closed) once it idles this long [default: the idle timeout]
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration, conflicts_with = "config")]
    timeout_server_fin: Option<Duration>,
    /// Most connections at once to each backend (HAProxy's default-server maxconn); more wait in the frontend's queue [default: no limit]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "config")]
    backend_maxconn: Option<u32>,

    /// Time a connection may wait in the queue for a backend at its maxconn, then it is reset [default: the connect timeout]
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration, conflicts_with = "config", requires = "backend_maxconn")]
    timeout_queue: Option<Duration>,

    /// Connect attempts after the first for one connection, on other backends or the same one
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_RETRIES, conflicts_with = "config")]
    retries: u32,

    /// On SIGTERM, time open connections get to finish before they are closed [default: 30s]
    #[arg(long, value_name = "DUR", value_parser = config::parse_duration)]
    drain_timeout: Option<Duration>,

    /// On SIGTERM or `ringlb ctl leave`, time ringlb reports not ready (/ready 503) while still serving, before it drains; 0 for none [default: 2s]
    #[arg(long, value_name = "DUR", value_parser = config::parse_delay)]
    leave_delay: Option<Duration>,

    /// Serve Prometheus metrics over HTTP on this address, e.g. 127.0.0.1:9090
    #[arg(long, value_name = "ADDR", value_parser = config::parse_address)]
    stats: Option<SocketAddr>,

    /// Serve `ringlb ctl` on this Unix socket (created mode 0600), e.g. /run/ringlb.sock
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,

    /// Once listening, switch to this user (given by name or number); needs ringlb started as root
    #[arg(long, value_name = "USER")]
    user: Option<String>,

    /// With --user: switch to this group [default: the user's primary group]
    #[arg(long, value_name = "GROUP", requires = "user")]
    group: Option<String>,

    /// Run from a TOML config file (several frontends); see examples/foobar.toml
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// With --config: validate the file, print the result and exit
    #[arg(long, requires = "config")]
    check: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start two built-in backends with ringlb in front, send traffic and show round robin and failover
    Demo,
    /// Write the man page or shell completions from this command line (for packagers)
    #[command(hide = true, subcommand)]
    Generate(crate::generate::Target),
    /// Control a running ringlb over its admin socket (--admin-socket)
    Ctl(CtlArgs),
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// The admin socket of the ringlb to control
    #[arg(long, value_name = "PATH", default_value = crate::ctl::DEFAULT_SOCKET)]
    socket: PathBuf,

    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Frontends and backends: health and why, admin state, connections, failures, checks
    Show {
        /// JSON for machines (the same data as the HTTP /stats)
        #[arg(long)]
        json: bool,
    },
    /// No new connections to FRONTEND/BACKEND; established ones continue
    Drain {
        /// FRONTEND/BACKEND, the backend by name or address
        #[arg(value_name = "FRONTEND/BACKEND")]
        target: String,
    },
    /// Maintenance: no new connections, checks suspended
    Disable {
        /// FRONTEND/BACKEND, the backend by name or address
        #[arg(value_name = "FRONTEND/BACKEND")]
        target: String,
        /// Also reset its established connections
        #[arg(long)]
        kill: bool,
    },
    /// Back to ready: traffic resumes when it is also up
    Enable {
        /// FRONTEND/BACKEND, the backend by name or address
        #[arg(value_name = "FRONTEND/BACKEND")]
        target: String,
    },
    /// Re-read the config file and apply the difference; prints what changed
    Reload,
    /// Exit 0 while ringlb accepts new connections, 1 once it leaves or drains (as HTTP /ready)
    Ready,
    /// As SIGTERM: report not ready, serve on for the leave delay, then drain and exit
    Leave,
}

impl CtlCommand {
    /// The request line of the admin socket's protocol.
    fn request(&self) -> String {
        match self {
            CtlCommand::Show { json: false } => "show".into(),
            CtlCommand::Show { json: true } => "show json".into(),
            CtlCommand::Drain { target } => format!("drain {target}"),
            CtlCommand::Disable {
                target,
                kill: false,
            } => format!("disable {target}"),
            CtlCommand::Disable { target, kill: true } => format!("disable {target} kill"),
            CtlCommand::Enable { target } => format!("enable {target}"),
            CtlCommand::Reload => "reload".into(),
            CtlCommand::Ready => "ready".into(),
            CtlCommand::Leave => "leave".into(),
        }
    }
}

/// What the command line asks for.
// Built once per process and moved once: its size costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    Run {
        /// Boxed: far larger than the other actions.
        config: Box<Config>,
        /// `None` when started from flags alone: nothing to reload.
        source: Option<ConfigSource>,
    },
    Check(PathBuf),
    Demo,
    Generate(crate::generate::Target),
    /// `ringlb ctl`: one request to a running ringlb's admin socket.
    Ctl {
        socket: PathBuf,
        request: String,
    },
}

/// A byte string flag. A newtype, because clap reads a bare `Vec<u8>` as a
/// list of numbers.
#[derive(Clone, Debug)]
struct Bytes(Vec<u8>);

fn parse_bytes(text: &str) -> Result<Bytes, String> {
    config::parse_escapes(text).map(Bytes)
}

/// `--allow` and `--deny` as a frontend's ACL; `None` without either.
fn acl_of(allow: &[Cidr], deny: &[Cidr]) -> Option<Arc<Acl>> {
    if allow.is_empty() && deny.is_empty() {
        return None;
    }
    Some(Arc::new(Acl {
        allow: (!allow.is_empty()).then(|| PrefixSet::new(allow)),
        deny: PrefixSet::new(deny),
    }))
}

fn parse_pattern(text: &str) -> Result<Pattern, String> {
    Pattern::new(text)
}

fn parse_backend(text: &str) -> Result<BackendConfig, String> {
    config::check_name(text)?;
    let backend =
        config::parse_address(text).map(|addr| BackendConfig::new(addr, text.to_string()))?;
    config::check_backend(&backend)?;
    Ok(backend)
}

impl Cli {
    /// Turns the flags into an action, or the exit code and one-line reason
    /// they cannot be: 2 for a wrong flag, 1 for a bad config file.
    pub fn into_action(self) -> Result<Action, (i32, String)> {
        match self.command {
            Some(Command::Demo) => return Ok(Action::Demo),
            Some(Command::Generate(target)) => return Ok(Action::Generate(target)),
            Some(Command::Ctl(ctl)) => {
                return Ok(Action::Ctl {
                    request: ctl.command.request(),
                    socket: ctl.socket,
                });
            }
            None => {}
        }
        let stats = self.stats;
        if let Some(path) = self.config {
            if self.check {
                return Ok(Action::Check(path));
            }
            let source = ConfigSource {
                path,
                workers: self.workers,
                buffers: self.buffers,
                drain_timeout: self.drain_timeout,
                leave_delay: self.leave_delay,
                stats,
                admin_socket: self.admin_socket,
                user: self.user,
                group: self.group,
            };
            let config = source.load().map_err(|e| match e {
                // A flag out of range is a usage error; the file's are 1.
                ConfigError::Invalid {
                    line: None,
                    origin,
                    message,
                } if origin == "command line" => (2, message),
                e => (1, e.to_string()),
            })?;
            return Ok(Action::Run {
                config: Box::new(config),
                source: Some(source),
            });
        }
        let Some(listen) = self.listen else {
            let hint = "nothing to do: give --listen ADDR and --backend ADDR, or --config FILE, or try 'ringlb demo'";
            return Err((2, hint.into()));
        };
        if self.backends.is_empty() {
            return Err((2, "no backend: give at least one --backend ADDR".into()));
        }
        let algorithm = match (self.balance, self.mode) {
            (Some(b), Some(m)) if b.mode() != m => {
                return Err((
                    2,
                    format!(
                        "--balance {b} contradicts --mode {m} (active-passive is --balance first); keep one of them"
                    ),
                ));
            }
            (Some(b), _) => b,
            (None, m) => Balance::for_mode(m.unwrap_or(Mode::ActiveActive)),
        };
        let from = (!self.accept_proxy_from.is_empty()).then_some(self.accept_proxy_from);
        let proxy = ProxyConfig {
            send: self.send_proxy,
            accept: proxy::accept(self.accept_proxy, from, self.timeout_proxy_header)
                .map_err(|e| (2, flags(&e)))?,
        };
        let mut check = CheckConfig {
            interval: self.check_interval,
            timeout: self
                .check_timeout
                .unwrap_or_else(|| CheckConfig::default_timeout(self.check_interval)),
            rise: self.rise,
            fall: self.fall,
            script: match self.check_http {
                Some(request) => Script::http(
                    request,
                    HttpExpect {
                        statuses: Vec::new(),
                        body: None,
                    },
                ),
                None => Script::flat(
                    self.check_send.map(|b| b.0),
                    self.check_expect.map(|b| b.0),
                    self.check_expect_regex,
                ),
            },
            fastinter: self.fastinter,
            downinter: self.downinter,
            port: self.check_port,
            ..CheckConfig::new(self.check_interval)
        };
        check.proxy = config::default_check_send_proxy(proxy.send, &check, &self.backends);
        let frontend = FrontendConfig {
            name: "default".into(),
            listen,
            mode: algorithm.mode(),
            balance: BalanceConfig {
                algorithm,
                allbackups: false,
                slowstart: self.slowstart,
            },
            backends: self
                .backends
                .into_iter()
                .map(|b| BackendConfig {
                    maxconn: self.backend_maxconn,
                    ..b
                })
                .collect(),
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            check,
            failback: !self.no_failback,
            on_down: self.on_down,
            maxconn: self.maxconn,
            timeout_queue: self.timeout_queue,
            retries: self.retries,
            access_log: crate::config::AccessLog::Off,
            proxy,
            edge: EdgeConfig {
                acl: acl_of(&self.allow, &self.deny),
                max_conn_per_source: self.max_conn_per_source,
                max_rate_per_source: self.max_rate_per_source,
                client_fin_timeout: self.timeout_client_fin,
                server_fin_timeout: self.timeout_server_fin,
            },
            tls: Default::default(),
        };
        let config = Config {
            workers: self.workers.unwrap_or_else(config::default_workers),
            buffers: self.buffers.unwrap_or(config::DEFAULT_BUFFERS),
            drain_timeout: self.drain_timeout.unwrap_or(config::DEFAULT_DRAIN_TIMEOUT),
            leave_delay: self.leave_delay.unwrap_or(config::DEFAULT_LEAVE_DELAY),
            stats,
            admin_socket: self.admin_socket,
            user: self.user,
            group: self.group,
            frontends: vec![frontend],
        };
        config.validate().map_err(|e| (2, e))?;
        Ok(Action::Run {
            config: Box::new(config),
            source: None,
        })
    }
}

fn parse_args() -> Result<Action, (i32, String)> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return Err((0, String::new()));
            }
            return Err((2, first_line(&e.render().to_string())));
        }
    };
    cli.into_action()
}

/// Parses the process arguments. `Err` carries the exit code and what to
/// print: help and version go to stdout with 0, mistakes to stderr as one
/// line with 2, made [`crate::config::printable`] (it quotes the flags'
/// values, and those of the files they name, which may hold any byte).
pub fn parse() -> Result<Action, (i32, String)> {
    parse_args().map_err(|(code, message)| {
        let message = crate::config::printable(&message).into_owned();
        (code, message)
    })
}

/// clap's messages end with usage and a tip; the first paragraph names
/// the problem (sometimes over two lines), which is all a log needs.
fn first_line(rendered: &str) -> String {
    let paragraph = rendered
        .split("\n\n")
        .map(|p| {
            p.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .find(|p| !p.is_empty())
        .unwrap_or_else(|| "invalid arguments".into());
    format!(
        "{} (see ringlb --help)",
        paragraph.trim_start_matches("error: ")
    )
}
