//! `ringlb`: parses the command line, starts the server, and turns signals
//! into drain (first SIGTERM/SIGINT), stop (second, or drain timeout).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ringlb::cli::{self, Action};
use ringlb::config::Config;
use ringlb::server::Server;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
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
                let names: Vec<&str> = config.frontends.iter().map(|f| f.name.as_str()).collect();
                println!(
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
        Action::Run { config, stats } => run(&config, stats),
    }
}

/// How long workers get to close their connections after a stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

fn run(config: &Config, stats: Option<SocketAddr>) -> ExitCode {
    // Blocked before any thread starts, so every thread inherits the mask
    // and the signals wait here for sigtimedwait instead of killing us.
    let signals = Signals::block();
    let server = match Server::start(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("ringlb: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(addr) = stats {
        match ringlb::admin::serve(addr, server.frontends.clone()) {
            Ok(bound) => log::info!("metrics on http://{bound}/metrics"),
            Err(e) => {
                eprintln!("ringlb: cannot serve stats on {addr}: {e}");
                server.stop();
                let _ = server.join();
                return ExitCode::from(1);
            }
        }
    }
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
                return ExitCode::from(1);
            }
        }
        match signals.wait(Duration::from_millis(200)) {
            Some(libc::SIGHUP) => log::warn!(
                "SIGHUP: in-place reload is not supported; start a new ringlb with the new config \
                 (it shares the port), then send SIGTERM to this one to drain it"
            ),
            Some(_) if drain_deadline.is_none() => {
                log::info!(
                    "draining: no new connections, {} open ones get up to {:?} to finish",
                    server.active_connections(),
                    config.drain_timeout
                );
                server.drain();
                drain_deadline = Some(Instant::now() + config.drain_timeout);
            }
            Some(_) if !stopping => {
                log::warn!(
                    "second signal: closing {} connections now",
                    server.active_connections()
                );
                server.stop();
                stopping = true;
            }
            Some(signal) => {
                // Already stopping and asked again: the operator wants out
                // now, not after the workers' grace period.
                log::error!("signal {signal} while stopping: exiting now");
                return ExitCode::from(1);
            }
            _ => {}
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
            eprintln!("ringlb: worker failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, taken synchronously by the main thread.
struct Signals(libc::sigset_t);

impl Signals {
    fn block() -> Signals {
        // SAFETY: the set is initialised by sigemptyset before use; the
        // calls only change this thread's signal mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
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
