//! `ringlb`: parses the command line, starts the server, and turns signals
//! into leave (first SIGTERM/SIGUSR1/SIGPWR: not ready, still serving for
//! the leave delay), drain (after it, on a second signal, or at once on
//! SIGINT), stop (one more, or the drain timeout). SIGHUP and SIGUSR2 reload the config file, SIGQUIT logs a
//! status line per frontend; every signal taken is logged by name.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use ringlb::cli::{self, Action};
use ringlb::config::{Config, ConfigSource};
use ringlb::server::{Leave, Server};

fn main() -> ExitCode {
    ignore_sigpipe();
    ringlb::logging::init();
    let code = run_action();
    ringlb::logging::flush();
    code
}

/// A peer that closes early must give ringlb EPIPE on that socket, never
/// end the process; Rust's runtime sets this today, but ringlb must not
/// depend on a runtime default that can be changed per binary.
fn ignore_sigpipe() {
    // SAFETY: installs the ignore disposition, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

fn run_action() -> ExitCode {
    let action = match cli::parse() {
        Ok(action) => action,
        Err((code, message)) => {
            if !message.is_empty() {
                eprintln!("ringlb: {message}");
            }
            return ExitCode::from(code as u8);
        }
    };
    match action {
        Action::Check(path) => match Config::from_file(&path) {
            Ok(config) => {
                for warning in config.warnings() {
                    eprintln!("ringlb: warning: {warning}");
                }
                let names: Vec<&str> = config.frontends.iter().map(|f| f.name.as_str()).collect();
                // Not println!: a closed stdout (`| head`) must not panic.
                let _ = writeln!(
                    std::io::stdout(),
                    "{}: OK ({} frontends: {})",
                    path.display(),
                    names.len(),
                    names.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ringlb: {e}");
                ExitCode::from(1)
            }
        },
        Action::Demo => ringlb::demo::run(),
        Action::Generate(target) => ringlb::generate::run(&target),
        Action::Ctl { socket, request } => ringlb::ctl::run(&socket, &request),
        Action::Run { config, source } => run(&config, source.as_ref()),
    }
}

/// How long workers get to close their connections after a stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

fn run(config: &Config, source: Option<&ConfigSource>) -> ExitCode {
    // Blocked before any thread starts, so every thread inherits the mask
    // and the signals wait here for sigtimedwait instead of killing us.
    let signals = Signals::block();
    // Looked up before anything is bound: a missing user fails now.
    let identity = match config.identity() {
        Ok(identity) => identity,
        Err(e) => {
            eprintln!("ringlb: {e}");
            return ExitCode::from(1);
        }
    };
    // Before any listener: a ringlb refused its admin socket (another one
    // serves on it) must not take a client from the other's port.
    let admin_socket = match config.admin_socket.as_deref().map(ringlb::control::bind) {
        None => None,
        Some(Ok(bound)) => Some(bound),
        Some(Err(e)) => {
            eprintln!("ringlb: {e}");
            return ExitCode::from(1);
        }
    };
    let server = match Server::start(config) {
        Ok(server) => Arc::new(server),
        Err(e) => {
            ringlb::logging::flush();
            eprintln!("ringlb: {e}");
            return ExitCode::from(1);
        }
    };
    log_settings(config, source);
    if let Some(addr) = config.stats {
        let state = ringlb::admin::State {
            published: server.published(),
            global: Some(server.global()),
            reloads: server.reload_stats(),
            accepting: server.accepting(),
        };
        match ringlb::admin::serve(addr, state) {
            Ok(bound) => log::info!("metrics on http://{bound}/metrics"),
            Err(e) => {
                ringlb::logging::flush();
                eprintln!("ringlb: cannot serve stats on {addr}: {e}");
                server.stop();
                let _ = server.join();
                return ExitCode::from(1);
            }
        }
    }
    // Removes the socket file when `run` returns; an exit that cannot
    // wait for `run` to return drops it first.
    let mut socket_file = match admin_socket {
        Some(bound) => match bound.serve(Arc::clone(&server), source.cloned()) {
            Ok(socket) => Some(socket),
            Err(e) => {
                ringlb::logging::flush();
                eprintln!("ringlb: {e}");
                server.stop();
                let _ = server.join();
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    // Everything that may need root is bound: give root up before the
    // first client is served.
    if let Some(identity) = &identity {
        match identity.drop_privileges() {
            Ok(()) => log::info!(
                "running as {}: no capabilities left; listeners on ports below 1024 can no \
                 longer be added by a reload",
                identity.describe()
            ),
            Err(e) => {
                ringlb::logging::flush();
                eprintln!(
                    "ringlb: cannot drop privileges to {}: {e}",
                    identity.describe()
                );
                server.stop();
                let _ = server.join();
                return ExitCode::from(1);
            }
        }
    }
    // Ready once everything a client or an operator talks to is bound.
    ringlb::notify::ready(&ringlb::notify::serving_status(&server));
    let mut drain_deadline: Option<Instant> = None;
    let mut stopping = false;
    let mut stop_deadline: Option<Instant> = None;
    while server.workers_running() {
        if stopping {
            let deadline = *stop_deadline.get_or_insert_with(|| Instant::now() + STOP_GRACE);
            if Instant::now() >= deadline {
                // Closing every connection takes milliseconds; a worker
                // still running now is stuck, and a stop must not hang.
                log::error!("workers did not stop within {STOP_GRACE:?}; exiting");
                drop(socket_file.take());
                exit_now(1);
            }
        }
        let signal = signals.wait(tick(server.leave_deadline()));
        // After the wait: `ringlb ctl leave` may have begun a leave in it.
        let leaving = server.leave_deadline();
        match signal.map(|s| (s, signal_name(s), Request::of(s))) {
            Some((_, name, Request::Reload)) if drain_deadline.is_some() => {
                log::warn!("{name}: draining: the reload is ignored");
            }
            Some((_, name, Request::Reload)) if leaving.is_some() => {
                log::warn!("{name}: leaving: the reload is ignored");
            }
            Some((_, name, Request::Reload)) => reload(name, &server, source),
            Some((_, name, Request::Status)) => log_status(name, &server),
            Some((_, name, Request::Ignore)) => {
                log::warn!("{name}: not a signal ringlb acts on; ignored")
            }
            Some((signal, name, Request::Stop)) if drain_deadline.is_none() => {
                // A leave already under way (this signal's second, or one
                // from `ringlb ctl leave`) is not started again: the
                // operator does not want to wait for the delay.
                let left = leaves(signal, &server) && server.leave(name) == Leave::Started;
                if !left {
                    let why = match server.leave_deadline() {
                        Some(_) => format!("{name} while leaving: draining now"),
                        None => format!("{name}: draining"),
                    };
                    drain_deadline = Some(drain(&why, &server));
                }
            }
            Some((_, name, Request::Stop)) if !stopping => {
                log::warn!(
                    "{name}: second signal: closing {} connections now",
                    server.active_connections()
                );
                server.stop();
                stopping = true;
            }
            Some((_, name, Request::Stop)) => {
                // Already stopping and asked again: the operator wants out
                // now, not after the workers' grace period.
                log::error!("{name} while stopping: exiting now");
                drop(socket_file.take());
                exit_now(1);
            }
            None => {}
        }
        let delay_over = server.leave_deadline().is_some_and(|d| Instant::now() >= d);
        if drain_deadline.is_none() && delay_over {
            drain_deadline = Some(drain("leave delay over: draining", &server));
        }
        if !stopping && drain_deadline.is_some_and(|d| Instant::now() >= d) {
            log::warn!(
                "drain timeout: closing {} connections",
                server.active_connections()
            );
            server.stop();
            stopping = true;
        }
        if drain_deadline.is_none() && server.any_worker_stopped() {
            log::error!("a worker stopped unexpectedly; stopping");
            ringlb::notify::stopping("a worker stopped unexpectedly");
            server.stop();
            stopping = true;
            drain_deadline = Some(Instant::now());
        }
    }
    match server.join() {
        Ok(()) => {
            log::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Through the log: stderr may be a stalled pipe, and exit
            // must not wait on it.
            log::error!("worker failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// How long the main thread waits for a signal: short enough to act on
/// the end of a leave delay on time, and on a worker that stopped.
fn tick(leave_deadline: Option<Instant>) -> Duration {
    let most = Duration::from_millis(200);
    leave_deadline.map_or(most, |d| {
        d.saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), most)
    })
}

/// Whether a stop signal leaves first (not ready, then drain after the
/// delay). SIGINT does not: it is a person at a terminal, and no routing
/// layer waits on an interactive ringlb.
fn leaves(signal: i32, server: &Server) -> bool {
    signal != libc::SIGINT && !server.leave_delay().is_zero()
}

/// Stops accepting; returns when the drain times out.
fn drain(why: &str, server: &Server) -> Instant {
    log::info!(
        "{why}: no new connections, {} open ones get up to {:?} to finish",
        server.active_connections(),
        server.drain_timeout()
    );
    ringlb::notify::stopping(why);
    server.drain();
    Instant::now() + server.drain_timeout()
}

/// What the settings cost and where they look careless, after the start
/// succeeded (a failed start prints its one error line alone).
fn log_settings(config: &Config, source: Option<&ConfigSource>) {
    log::info!("{}", config.memory_note());
    for warning in config.warnings() {
        log::warn!("{warning}");
    }
    if let Some(source) = source {
        for warning in ringlb::privdrop::file_warnings(&source.path) {
            log::warn!("{warning}");
        }
    }
}

/// What a signal asks of ringlb.
enum Request {
    /// Drain, then stop (HAProxy's soft stop is SIGUSR1).
    Stop,
    /// Re-read the config file (HAProxy: SIGUSR2, systemd: SIGHUP).
    Reload,
    /// A status line per frontend in the log (HAProxy dumps stats).
    Status,
    /// Would kill the process by default, and means nothing to ringlb.
    Ignore,
}

impl Request {
    fn of(signal: i32) -> Request {
        match signal {
            libc::SIGHUP | libc::SIGUSR2 => Request::Reload,
            libc::SIGQUIT => Request::Status,
            libc::SIGALRM | libc::SIGVTALRM | libc::SIGPROF | libc::SIGIO | libc::SIGSTKFLT => {
                Request::Ignore
            }
            // SIGPWR is how LXC asks a container for a clean shutdown.
            _ => Request::Stop,
        }
    }
}

/// Every signal ringlb takes; any of them left to its default action
/// would end the process with no drain and no log line.
const SIGNALS: [(i32, &str); 12] = [
    (libc::SIGINT, "SIGINT"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGQUIT, "SIGQUIT"),
    (libc::SIGPWR, "SIGPWR"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGVTALRM, "SIGVTALRM"),
    (libc::SIGPROF, "SIGPROF"),
    (libc::SIGIO, "SIGIO"),
    (libc::SIGSTKFLT, "SIGSTKFLT"),
];

/// Leaves at once, without waiting for workers (Server's Drop would join
/// them, and a stuck one would hang the exit the operator asked for).
fn exit_now(code: i32) -> ! {
    ringlb::logging::flush();
    std::process::exit(code)
}

fn signal_name(signal: i32) -> &'static str {
    SIGNALS
        .iter()
        .find(|(number, _)| *number == signal)
        .map_or("signal", |(_, name)| name)
}

/// SIGHUP, SIGUSR2: the outcome is logged (and counted) by the reload.
fn reload(signal: &str, server: &Server, source: Option<&ConfigSource>) {
    match source {
        Some(source) => {
            log::info!("{signal}: reloading {}", source.path.display());
            // systemd (Type=notify-reload, or `systemctl reload` waiting on
            // ExecReload) sees the reload begin and end.
            ringlb::notify::reloading(&format!("{signal}: reloading"));
            let _ = server.reload(source);
            ringlb::notify::ready(&ringlb::notify::serving_status(server));
        }
        None => log::warn!(
            "{signal}: no config file to reload: ringlb was started from flags (use --config FILE \
             to reload in place, or start a new ringlb on the same port and drain this one)"
        ),
    }
}

fn log_status(signal: &str, server: &Server) {
    log::info!(
        "{signal}: status: {} connections open; ringlb keeps running (SIGTERM or SIGUSR1 drains)",
        server.active_connections()
    );
    for (frontend, _) in server.frontends() {
        let backends = &frontend.backends;
        let down: Vec<&str> = backends
            .iter()
            .filter(|b| !b.is_up())
            .map(|b| b.name.as_str())
            .collect();
        let stats = &frontend.shared.stats;
        log::info!(
            "{signal}: frontend {}: {} open, {} accepted, {} of {} backends up{}{}",
            frontend.config.name,
            stats.active.load(Relaxed),
            stats.accepted.load(Relaxed),
            backends.len() - down.len(),
            backends.len(),
            if down.is_empty() { "" } else { "; down: " },
            down.join(", ")
        );
    }
}

/// The signals of [`SIGNALS`], taken synchronously by the main thread.
struct Signals(libc::sigset_t);

impl Signals {
    fn block() -> Signals {
        // SAFETY: the set is initialised by sigemptyset before use; the
        // calls only change this thread's signal mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for (signal, _) in SIGNALS {
                libc::sigaddset(&mut set, signal);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Signals(set)
        }
    }

    fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        // SAFETY: the set and timespec are valid for the call.
        let signal = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        (signal > 0).then_some(signal)
    }
}
