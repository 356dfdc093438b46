//! What an operator reads of queues and checks, against the real binary:
//! `ringlb ctl show` (table and JSON), `/stats`, the metrics and the
//! status page rendered by headless Chromium report a backend's maxconn
//! slots and the frontend's queue as they change, the check's kind, where
//! it goes and the step it failed in; and `--timeout-queue` resets a
//! queued client when it passes.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{BIN, Backend, Handler, Ringlb, eventually};

const WAIT: Duration = Duration::from_secs(20);

/// A directory of this test's own, removed on drop (even on panic).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ringlb-opsview-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A backend that holds each client connection (one that sends a byte;
/// health checks send none) until the test hands out a permit, then
/// answers "done" and closes.
#[derive(Clone, Default)]
struct Hold {
    permits: Arc<(Mutex<usize>, Condvar)>,
    served: Arc<AtomicUsize>,
}

impl Hold {
    fn handler(&self) -> Handler {
        let hold = self.clone();
        Arc::new(move |mut stream: TcpStream| {
            let mut byte = [0u8; 1];
            if !matches!(stream.read(&mut byte), Ok(1)) {
                return;
            }
            hold.served.fetch_add(1, SeqCst);
            hold.wait();
            let _ = stream.write_all(b"done");
            let _ = stream.shutdown(Shutdown::Both);
        })
    }

    fn wait(&self) {
        let (lock, ready) = &*self.permits;
        let mut permits = lock.lock().unwrap();
        while *permits == 0 {
            permits = ready.wait(permits).unwrap();
        }
        *permits -= 1;
    }

    fn release(&self, n: usize) {
        let (lock, ready) = &*self.permits;
        *lock.lock().unwrap() += n;
        ready.notify_all();
    }

    fn served(&self) -> usize {
        self.served.load(SeqCst)
    }
}

/// A client on its own thread: one byte, then what comes back until the
/// end: `Ok(text)` on a clean end, `Err(kind)` on a reset.
fn client(addr: SocketAddr) -> JoinHandle<Result<String, ErrorKind>> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).map_err(|e| e.kind())?;
        s.set_read_timeout(Some(WAIT * 3)).map_err(|e| e.kind())?;
        s.write_all(b"x").map_err(|e| e.kind())?;
        let mut got = String::new();
        s.read_to_string(&mut got).map_err(|e| e.kind())?;
        Ok(got)
    })
}

fn ctl(socket: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run ringlb ctl");
    assert!(
        out.status.success(),
        "ringlb ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn stats(ringlb: &Ringlb) -> serde_json::Value {
    let (status, body) = ringlb.scrape("/stats");
    assert!(status.contains(" 200 "), "{status}: {body}");
    json(&body)
}

/// The first frontend, and its first backend, of a stats document.
fn first(doc: &serde_json::Value) -> (&serde_json::Value, &serde_json::Value) {
    let f = &doc["frontends"][0];
    (f, &f["backends"][0])
}

/// What the queue test reads from one document: queued, queue max, slots
/// used, maxconn.
fn queue_state(doc: &serde_json::Value) -> (u64, u64, u64, u64) {
    let (f, b) = first(doc);
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(u64::MAX);
    (
        n(&f["queued"]),
        n(&f["queued_max"]),
        n(&b["slots"]),
        n(&b["maxconn"]),
    )
}

#[test]
fn ctl_show_and_stats_report_slots_and_the_queue_at_maxconn() {
    let dir = TempDir::new("queue");
    let hold = Hold::default();
    let backend = Backend::start(hold.handler());
    let socket = dir.path("ctl.sock");
    let config = format!(
        "workers = 1\nadmin-socket = \"{}\"\n[[frontend]]\nname = \"web\"\n\
         listen = \"127.0.0.1:0\"\ncheck-interval = \"1h\"\ntimeout-queue = \"60s\"\n\
         backends = [ {{ address = \"{}\", name = \"app\", maxconn = 1 }} ]\n",
        socket.display(),
        backend.addr
    );
    let path = dir.path("ringlb.toml");
    std::fs::write(&path, config).expect("write config");
    let ringlb = Ringlb::start_raw(&[
        "--config",
        path.to_str().expect("utf-8 path"),
        "--stats",
        "127.0.0.1:0",
    ]);
    let clients: Vec<_> = (0..3).map(|_| client(ringlb.addr)).collect();
    let busy = eventually(WAIT, || queue_state(&stats(&ringlb)) == (2, 2, 1, 1));
    assert!(
        busy,
        "/stats never showed 2 queued, 1 of 1 slot: {:#}",
        stats(&ringlb)
    );
    assert!(
        eventually(WAIT, || hold.served() == 1),
        "the one with the slot never reached the backend"
    );
    // The same data through the admin socket, as JSON and as the table.
    let shown = json(&ctl(&socket, &["show", "--json"]));
    assert_eq!(queue_state(&shown), (2, 2, 1, 1), "{shown:#}");
    assert_eq!(first(&shown).0["timeout_queue_ms"], 60000.0, "{shown:#}");
    let table = ctl(&socket, &["show"]);
    let heading = table.lines().next().unwrap_or_default();
    assert!(
        heading.contains("queue 2 now, 2 at most, 2 in all, 0 timed out after 60000ms"),
        "{table}"
    );
    let header = table.lines().nth(1).unwrap_or_default();
    assert!(
        header.contains("SLOTS") && header.contains("CHECK"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with("app "))
        .unwrap_or_else(|| panic!("no row for app:\n{table}"));
    assert!(row.contains(" 1/1 "), "slots used/maxconn: {row}");
    assert!(row.contains(" tcp "), "the check kind: {row}");
    assert_eq!(
        ringlb.metric("ringlb_frontend_queued_max{frontend=\"web\"}"),
        Some(2)
    );

    assert_eq!(hold.served(), 1, "only maxconn reached the backend");
    hold.release(3);
    for c in clients {
        assert_eq!(c.join().expect("client thread"), Ok("done".to_string()));
    }
    let idle = eventually(WAIT, || queue_state(&stats(&ringlb)) == (0, 2, 0, 1));
    assert!(idle, "the queue did not empty: {:#}", stats(&ringlb));
    let shown = json(&ctl(&socket, &["show", "--json"]));
    let (f, _) = first(&shown);
    assert_eq!((&f["queued"], &f["queued_total"]), (&0.into(), &2.into()));
    // Two connections waited (at least until the first was released).
    let avg = f["queue_wait_avg_ms"].as_f64().unwrap_or(0.0);
    let max = f["queue_wait_max_ms"].as_f64().unwrap_or(0.0);
    assert!(avg > 0.0 && max >= avg, "{shown:#}");
    let table = ctl(&socket, &["show"]);
    assert!(table.contains("queue 0 now, 2 at most"), "{table}");
    assert!(table.contains(" 0/1 "), "{table}");
    let (_, metrics) = ringlb.scrape("/metrics");
    let waited = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ringlb_frontend_queue_wait_seconds_total{frontend=\"web\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(waited.is_some_and(|s| s > 0.0), "{metrics}");
}

/// An agent that answers every probe with `reply`.
fn agent(reply: &'static str) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        let _ = stream.write_all(reply.as_bytes());
        let _ = stream.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    })
}

/// A Redis stand-in: `+PONG` to a PING, or `-ERR` and a close when sick.
fn redis(healthy: bool) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        let mut buf = [0u8; 64];
        let _ = stream.set_read_timeout(Some(WAIT));
        if !matches!(stream.read(&mut buf), Ok(n) if n > 0) {
            return;
        }
        let reply: &[u8] = if healthy {
            b"+PONG\r\n"
        } else {
            b"-ERR not ready\r\n"
        };
        let _ = stream.write_all(reply);
        let _ = stream.shutdown(Shutdown::Both);
    })
}

fn chromium(dir: &TempDir, args: &[&str]) -> String {
    let profile = format!("--user-data-dir={}", dir.path("chromium").display());
    let out = Command::new("timeout")
        .arg("120")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            &profile,
        ])
        .args(args)
        .output()
        .expect("run chromium (apt-get install chromium; .ci/run installs it)");
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rendered row of `backend`: from its `<tr` to its `</tr>`.
fn rendered_row<'a>(dom: &'a str, backend: &str) -> &'a str {
    let start = dom
        .find(&format!("data-backend=\"{backend}\""))
        .unwrap_or_else(|| panic!("no row for {backend}:\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest.find("</tr>").unwrap_or(rest.len())]
}

#[test]
fn the_status_page_shows_the_check_kind_target_failing_step_and_agent_weight() {
    let dir = TempDir::new("page");
    let good = Backend::start(redis(true));
    let sick = Backend::start(redis(false));
    let agent = Backend::start(agent("up 50%\n"));
    // "bad" takes traffic at an address of its own, and is checked on the
    // sick server's port (a sidecar).
    let bad_addr = common::refused_addr();
    let config = format!(
        "[[frontend]]\nname = \"cache\"\nlisten = \"127.0.0.1:0\"\ncheck = \"redis\"\n\
         check-interval = \"200ms\"\ncheck-timeout = \"2s\"\nrise = 1\nfall = 1\n\
         agent-interval = \"200ms\"\n\
         backends = [ {{ address = \"{}\", name = \"good\", agent-port = {} }}, \
         {{ address = \"{bad_addr}\", name = \"bad\", check-port = {}, maxconn = 7, \
         backup = true }} ]\n",
        good.addr,
        agent.addr.port(),
        sick.addr.port()
    );
    let path = dir.path("ringlb.toml");
    std::fs::write(&path, config).expect("write config");
    let ringlb = Ringlb::start_raw(&[
        "--config",
        path.to_str().expect("utf-8 path"),
        "--stats",
        "127.0.0.1:0",
    ]);
    let settled = eventually(WAIT, || {
        let doc = stats(&ringlb);
        let b = &doc["frontends"][0]["backends"];
        b[0]["weight_percent"] == 50
            && b[0]["last_check"]["ok"] == true
            && b[1]["last_check"]["ok"] == false
    });
    assert!(settled, "checks never settled: {:#}", stats(&ringlb));
    let url = format!("http://{}/", ringlb.stats_addr());
    let dom = chromium(&dir, &["--virtual-time-budget=3000", "--dump-dom", &url]);
    let sick_port = sick.addr.port();
    let bad = rendered_row(&dom, "bad");
    for shown in [
        format!("<td class=\"check\">redis on 127.0.0.1:{sick_port}</td>"),
        "failed in redis check (expect \"+PONG\"): ".to_string(),
        "-ERR not ready".to_string(),
        "<td class=\"n slots\">0 / 7</td>".to_string(),
        "<td class=\"n\">1 backup</td>".to_string(),
    ] {
        assert!(bad.contains(&shown), "bad's row lacks {shown:?}:\n{bad}");
    }
    let good_row = rendered_row(&dom, "good");
    for shown in [
        "<td class=\"check\">redis</td>",
        "<td class=\"n\">1 at 50%</td>",
        "<td class=\"reason last-check\">ok (",
        "<td class=\"n slots\">-</td>",
    ] {
        assert!(
            good_row.contains(shown),
            "good's row lacks {shown:?}:\n{good_row}"
        );
    }
    assert!(
        dom.contains("<p class=\"queue\">Queue: 0 waiting now"),
        "no queue line for a frontend with a maxconn:\n{dom}"
    );
    assert!(dom.contains("Slots used / maxconn"), "{dom}");
}

#[test]
fn timeout_queue_on_the_command_line_resets_a_queued_client() {
    let hold = Hold::default();
    let backend = Backend::start(hold.handler());
    let ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--workers",
        "1",
        "--backend-maxconn",
        "1",
        "--timeout-queue",
        "500ms",
        // The default wait would be this: a reset long before it is the
        // flag's doing.
        "--connect-timeout",
        "60s",
        "--check-interval",
        "1h",
        "--stats",
        "127.0.0.1:0",
    ]);
    let holder = client(ringlb.addr);
    assert!(eventually(WAIT, || hold.served() == 1), "{}", ringlb.logs());
    let started = Instant::now();
    let queued = client(ringlb.addr);
    let outcome = queued.join().expect("client thread");
    let took = started.elapsed();
    assert_eq!(
        outcome,
        Err(ErrorKind::ConnectionReset),
        "{}",
        ringlb.logs()
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(30),
        "reset after {took:?}"
    );
    assert_eq!(hold.served(), 1, "the queued client reached the backend");
    let doc = stats(&ringlb);
    let (f, b) = first(&doc);
    assert_eq!(
        (&f["queue_timeouts"], &f["timeout_queue_ms"], &b["maxconn"]),
        (&1.into(), &500.0.into(), &1.into()),
        "{doc:#}"
    );
    hold.release(1);
    assert_eq!(holder.join().expect("client thread"), Ok("done".into()));
}

#[test]
fn timeout_queue_without_a_backend_maxconn_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"])
        .args(["--timeout-queue", "1s"])
        .output()
        .expect("run ringlb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--backend-maxconn"), "{stderr}");
}
