//! `ringlb demo`: a guided minute on loopback. Two tiny built-in backends
//! (app1, app2), ringlb in front with a web frontend (active-active) and a
//! db frontend (active-passive), then traffic while app1 dies and returns:
//! round robin, failover and fail-back, as they happen.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::{BackendConfig, CheckConfig, Config, FrontendConfig, Mode, OnDown};
use crate::server::Server;

/// A backend that answers each line with its own name.
struct DemoBackend {
    name: &'static str,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DemoBackend {
    fn start(name: &'static str, addr: SocketAddr) -> std::io::Result<DemoBackend> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        // Non-blocking so that stopping never waits for a client.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || answer(name, stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(DemoBackend {
            name,
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Closes the listening socket: new connects are refused, as when the
    /// process dies.
    fn kill(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(name: &str, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if (&stream).write_all(format!("{name}\n").as_bytes()).is_err() {
            break;
        }
        line.clear();
    }
}

/// One request through ringlb: which backend answered, or the error.
fn ask(addr: SocketAddr) -> Result<String, String> {
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    (&stream).write_all(b"hello\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| e.to_string())?;
    if reply.is_empty() {
        Err("closed without an answer".into())
    } else {
        Ok(reply.trim().to_string())
    }
}

fn frontend(name: &str, mode: Mode, backends: &[&DemoBackend]) -> FrontendConfig {
    FrontendConfig {
        name: name.into(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        mode,
        balance: crate::config::BalanceConfig::new(crate::config::Balance::for_mode(mode)),
        backends: backends
            .iter()
            .map(|b| BackendConfig::new(b.addr, format!("{} ({})", b.addr, b.name)))
            .collect(),
        connect_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(30),
        check: CheckConfig {
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            ..CheckConfig::new(Duration::from_millis(500))
        },
        failback: true,
        on_down: OnDown::Keep,
        maxconn: None,
        timeout_queue: None,
        retries: crate::config::DEFAULT_RETRIES,
        access_log: crate::config::AccessLog::Off,
        proxy: Default::default(),
        edge: Default::default(),
        tls: Default::default(),
    }
}

struct Tally {
    sent: u32,
    failed: u32,
}

impl Tally {
    fn round(&mut self, label: &str, server: &Server, rounds: u32) {
        println!("\n== {label}");
        for _ in 0..rounds {
            let mut row = String::new();
            for (frontend, addr) in server.frontends() {
                self.sent += 1;
                let answer = ask(addr).unwrap_or_else(|e| {
                    self.failed += 1;
                    format!("FAILED: {e}")
                });
                row.push_str(&format!(
                    "{:<4} ({}) -> {:<6}   ",
                    frontend.config.name, frontend.config.mode, answer
                ));
            }
            println!("{row}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

pub fn run() -> ExitCode {
    match tour() {
        Ok(tally) if tally.failed == 0 => {
            println!(
                "\n{} requests, none failed. Next: ringlb --help, and examples/foobar.toml.",
                tally.sent
            );
            ExitCode::SUCCESS
        }
        Ok(tally) => {
            println!("\n{} requests, {} failed.", tally.sent, tally.failed);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("ringlb demo: {e}");
            ExitCode::from(1)
        }
    }
}

fn tour() -> Result<Tally, String> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut app1 =
        DemoBackend::start("app1", loopback).map_err(|e| format!("cannot start app1: {e}"))?;
    let app2 =
        DemoBackend::start("app2", loopback).map_err(|e| format!("cannot start app2: {e}"))?;
    let config = Config {
        workers: 2,
        buffers: crate::config::DEFAULT_BUFFERS,
        drain_timeout: Duration::from_secs(1),
        leave_delay: Duration::ZERO,
        stats: None,
        admin_socket: None,
        user: None,
        group: None,
        frontends: vec![
            frontend("web", Mode::ActiveActive, &[&app1, &app2]),
            frontend("db", Mode::ActivePassive, &[&app1, &app2]),
        ],
    };
    println!(
        "ringlb demo: backends {} = {}, {} = {}",
        app1.name, app1.addr, app2.name, app2.addr
    );
    println!(
        "health checks every 500ms, fall 2, rise 2; each line is one new connection per frontend"
    );
    let server = Server::start(&config).map_err(|e| e.to_string())?;
    let mut tally = Tally { sent: 0, failed: 0 };
    tally.round(
        "both backends up: web takes turns, db sends all to its active app1",
        &server,
        6,
    );

    app1.kill();
    println!("\n>> app1 killed (its port now refuses connections)");
    tally.round(
        "app1 down: ringlb retries on app2 at once, health checks mark app1 DOWN, db fails over to app2",
        &server,
        6,
    );

    let mut app1 =
        DemoBackend::start("app1", app1.addr).map_err(|e| format!("cannot restart app1: {e}"))?;
    println!("\n>> app1 restarted");
    std::thread::sleep(Duration::from_millis(1200));
    tally.round(
        "app1 back UP after 2 good checks: web takes turns again, db fails back to app1",
        &server,
        6,
    );

    server.stop();
    let _ = server.join();
    app1.kill();
    Ok(tally)
}
