//! Check kinds against real sockets: contains and regex expects, written
//! multi-step checks, checks on a sidecar port, HTTP checks, agents, the
//! ready-made kinds, and the faster intervals while a backend is changing
//! or down. Each backend here is a tiny server written for the test.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// A config file in the temp dir, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(tag: &str, text: &str) -> ConfigFile {
        let path =
            std::env::temp_dir().join(format!("ringlb-checks-{tag}-{}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        ConfigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// ringlb from `text`, with its stats endpoint on a free port.
fn start(tag: &str, text: &str) -> (Ringlb, ConfigFile) {
    let file = ConfigFile::new(tag, text);
    let ringlb = Ringlb::start_raw(&["--config", file.path(), "--stats", "127.0.0.1:0"]);
    (ringlb, file)
}

/// Fast checks: 100 ms apart, two in a row to change state.
const FAST: &str = "check-interval = \"100ms\"\ncheck-timeout = \"300ms\"\nrise = 2\nfall = 2\n";

fn frontend(name: &str, backends: &str, extra: &str) -> String {
    format!(
        "[[frontend]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nbackends = [{backends}]\n{FAST}{extra}\n"
    )
}

fn table(name: &str, addr: SocketAddr, extra: &str) -> String {
    format!("{{ address = \"{addr}\", name = \"{name}\"{extra} }}")
}

fn up(ringlb: &Ringlb, frontend: &str, backend: &str) -> Option<u64> {
    ringlb.metric(&format!(
        "ringlb_backend_up{{frontend=\"{frontend}\",backend=\"{backend}\"}}"
    ))
}

/// Waits until the metric says `backend` of `frontend` is up (1) or down (0)
/// and has been checked at least `checks` times.
fn wait_up(ringlb: &Ringlb, frontend: &str, backend: &str, want: u64) {
    let labels = format!("{{frontend=\"{frontend}\",backend=\"{backend}\"}}");
    let ok = eventually(WAIT, || {
        up(ringlb, frontend, backend) == Some(want)
            && ringlb
                .metric(&format!("ringlb_backend_checks_total{labels}"))
                .is_some_and(|n| n >= 3)
    });
    assert!(
        ok,
        "{frontend}/{backend} never {}; logs:\n{}",
        if want == 1 { "up" } else { "down" },
        ringlb.logs()
    );
}

fn down_line(ringlb: &Ringlb, backend: &str) -> String {
    ringlb
        .wait_log(&format!("backend {backend} is DOWN"), WAIT)
        .unwrap_or_else(|| panic!("{backend} never DOWN; logs:\n{}", ringlb.logs()))
}

/// Reads one CRLF-terminated line (a Redis command); `None` at the end.
fn read_line(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end().to_string()),
    }
}

/// A Redis lookalike: PING gets +PONG, INFO replication tells its role,
/// which the test switches at run time. Its INFO reply starts with the
/// bulk length and comes in two writes, as a real one may.
fn fake_redis(master: Arc<AtomicBool>) -> Handler {
    Arc::new(move |stream: TcpStream| {
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        while let Some(line) = read_line(&mut reader) {
            let reply = if line.starts_with("PING") {
                "+PONG\r\n".to_string()
            } else if line.starts_with("INFO") {
                let role = if master.load(SeqCst) {
                    "master"
                } else {
                    "slave"
                };
                let body = format!("# Replication\r\nrole:{role}\r\nconnected_slaves:0\r\n");
                format!("${}\r\n{body}\r\n", body.len())
            } else {
                "-ERR unknown command\r\n".to_string()
            };
            let (head, tail) = reply.split_at(reply.len() / 2);
            if writer.write_all(head.as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
            if writer.write_all(tail.as_bytes()).is_err() {
                return;
            }
        }
    })
}

/// An HTTP sidecar whose status and body the test sets; it keeps the last
/// request it saw.
#[derive(Clone)]
struct Sidecar {
    answer: Arc<Mutex<(u16, String)>>,
    seen: Arc<Mutex<String>>,
}

impl Sidecar {
    fn new(status: u16, body: &str) -> Sidecar {
        Sidecar {
            answer: Arc::new(Mutex::new((status, body.to_string()))),
            seen: Arc::new(Mutex::new(String::new())),
        }
    }

    fn set(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_string());
    }

    fn handler(&self) -> Handler {
        let sidecar = self.clone();
        Arc::new(move |mut stream: TcpStream| {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            *sidecar.seen.lock().unwrap() = String::from_utf8_lossy(&request).into_owned();
            let (status, body) = sidecar.answer.lock().unwrap().clone();
            let reply = format!(
                "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes());
            let _ = stream.shutdown(Shutdown::Write);
            let _ = stream.read(&mut buf);
        })
    }
}

/// Writes its name, then echoes: a connection that stays open.
fn name_then_echo(name: &'static str) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        if stream.write_all(name.as_bytes()).is_err() {
            return;
        }
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// A connection through ringlb and the name of the backend it reached.
fn open(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).expect("connect to ringlb");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut name = [0u8; 1];
    s.read_exact(&mut name).expect("the backend's name");
    (s, String::from_utf8_lossy(&name).into_owned())
}

fn listening(ringlb: &Ringlb, name: &str) -> SocketAddr {
    let pattern = format!("frontend {name} listening on ");
    let line = ringlb
        .wait_log(&pattern, WAIT)
        .unwrap_or_else(|| panic!("{name} not listening; logs:\n{}", ringlb.logs()));
    line.split(&pattern)
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.parse().ok())
        .expect("listen address in log")
}

/// The /stats entry of one backend.
fn stats(ringlb: &Ringlb, frontend: &str, backend: &str) -> serde_json::Value {
    let (_, body) = ringlb.scrape("/stats");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("stats JSON");
    doc["frontends"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["name"] == frontend))
        .and_then(|f| f["backends"].as_array())
        .and_then(|bs| bs.iter().find(|b| b["name"] == backend))
        .cloned()
        .unwrap_or_else(|| panic!("no {frontend}/{backend} in {body}"))
}

#[test]
fn check_expect_matches_anywhere_in_the_reply_not_only_at_its_start() {
    let master = Arc::new(AtomicBool::new(true));
    let redis = Backend::start(fake_redis(Arc::clone(&master)));
    let addr = redis.addr_str();
    // The reply starts with "$61\r\n# Replication": a prefix match fails.
    let ringlb = Ringlb::start(&[
        "--backend",
        &addr,
        "--stats",
        "127.0.0.1:0",
        "--check-interval",
        "100ms",
        "--rise",
        "2",
        "--fall",
        "2",
        "--check-send",
        "INFO replication\\r\\n",
        "--check-expect",
        "role:master",
    ]);
    wait_up(&ringlb, "default", &addr, 1);
    assert_eq!(ringlb.count_logs("is DOWN"), 0, "{}", ringlb.logs());
    master.store(false, SeqCst);
    let line = down_line(&ringlb, &addr);
    assert!(
        line.contains("expect \"role:master\"") && line.contains("role:slave"),
        "{line}"
    );
}

#[test]
fn check_expect_regex_on_the_command_line() {
    let master = Arc::new(AtomicBool::new(false));
    let redis = Backend::start(fake_redis(Arc::clone(&master)));
    let addr = redis.addr_str();
    let ringlb = Ringlb::start(&[
        "--backend",
        &addr,
        "--stats",
        "127.0.0.1:0",
        "--check-interval",
        "100ms",
        "--fall",
        "2",
        "--check-send",
        "INFO replication\\r\\n",
        "--check-expect-regex",
        "role:(master|slave)\\r\\nconnected_slaves:0",
    ]);
    wait_up(&ringlb, "default", &addr, 1);
    drop(ringlb);
    let ringlb = Ringlb::start(&[
        "--backend",
        &addr,
        "--check-interval",
        "100ms",
        "--fall",
        "2",
        "--check-send",
        "INFO replication\\r\\n",
        "--check-expect-regex",
        "^role:master",
    ]);
    let line = down_line(&ringlb, &addr);
    assert!(line.contains("expect-regex \"^role:master\""), "{line}");
    let out = std::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--backend", &addr])
        .args(["--check-expect-regex", "role:("])
        .output()
        .expect("run ringlb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid regular expression"), "{err}");
}

#[test]
fn a_bad_regex_in_the_file_is_refused_with_its_line() {
    let text = "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:9\"]\ncheck = [\n  { send = \"x\" },\n  { expect-regex = \"a(b\" },\n]\n";
    let file = ConfigFile::new("badregex", text);
    let out = std::process::Command::new(BIN)
        .args(["--config", file.path(), "--check"])
        .output()
        .expect("run ringlb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(":6: check: step 2: expect-regex"), "{err}");
}

#[test]
fn a_multi_step_check_names_the_step_that_failed() {
    let master = Arc::new(AtomicBool::new(true));
    let redis = Backend::start(fake_redis(Arc::clone(&master)));
    let steps = r#"check = [
  { send = "PING\r\n" },
  { expect = "+PONG" },
  { send = "INFO replication\r\n" },
  { expect-regex = "role:(master|slave)", timeout = "200ms" },
  { expect = "role:master" },
]"#;
    let text = frontend("db", &table("r1", redis.addr, ""), steps);
    let (ringlb, _file) = start("steps", &text);
    wait_up(&ringlb, "db", "r1", 1);
    master.store(false, SeqCst);
    let line = down_line(&ringlb, "r1");
    assert!(
        line.contains("step 5 (expect \"role:master\")") && line.contains("role:slave"),
        "{line}"
    );
    let entry = stats(&ringlb, "db", "r1");
    assert_eq!(entry["check"], "5 steps", "{entry}");
    assert!(
        entry["last_check"]["step"]
            .as_str()
            .is_some_and(|s| s.starts_with("step 5")),
        "{entry}"
    );
}

#[test]
fn a_step_with_its_own_timeout_fails_in_time_and_is_named() {
    // Answers PING, never INFO: the INFO step waits its own 200 ms, not
    // the check's 2 s.
    let handler: Handler = Arc::new(|stream: TcpStream| {
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        while let Some(line) = read_line(&mut reader) {
            if line.starts_with("PING") && writer.write_all(b"+PONG\r\n").is_err() {
                return;
            }
        }
    });
    let server = Backend::start(handler);
    let steps = r#"check-interval = "3s"
check-timeout = "2s"
check = [
  { send = "PING\r\n" },
  { expect = "+PONG" },
  { send = "INFO replication\r\n" },
  { expect = "role:master", timeout = "200ms" },
]"#;
    let text = format!(
        "[[frontend]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\nbackends = [{}]\nfall = 1\n{steps}\n",
        table("r1", server.addr, "")
    );
    let (ringlb, _file) = start("steptimeout", &text);
    let line = down_line(&ringlb, "r1");
    assert!(
        line.contains("step 4 (expect \"role:master\"): no reply within the timeout"),
        "{line}"
    );
    let took: f64 = line
        .split("took ")
        .nth(1)
        .and_then(|t| t.split("ms").next())
        .and_then(|t| t.parse().ok())
        .expect("took in the DOWN line");
    assert!(took < 1500.0, "the step's timeout, not the check's: {line}");
}

#[test]
fn check_port_sends_checks_to_a_sidecar_and_makes_its_own_target() {
    let traffic = Backend::start(name_then_echo("t"));
    let healthy = Sidecar::new(200, "ok");
    let failing = Sidecar::new(503, "no");
    let healthy_server = Backend::start(healthy.handler());
    let failing_server = Backend::start(failing.handler());
    let port = |b: &Backend| b.addr.port();
    // The same traffic address in two frontends, checked on two ports.
    let text = frontend(
        "good",
        &table(
            "db",
            traffic.addr,
            &format!(", check-port = {}", port(&healthy_server)),
        ),
        "check-http = \"GET /primary\"",
    ) + &frontend(
        "bad",
        &table("db", traffic.addr, ""),
        &format!(
            "check-http = \"GET /primary\"\ncheck-port = {}",
            port(&failing_server)
        ),
    );
    let (ringlb, _file) = start("sidecar", &text);
    wait_up(&ringlb, "good", "db", 1);
    wait_up(&ringlb, "bad", "db", 0);
    let line = down_line(&ringlb, "db");
    assert!(
        line.contains("frontend bad") && line.contains("status 503"),
        "{line}"
    );
    // The traffic port is fine; only the sidecar's answer counts.
    assert_eq!(open(listening(&ringlb, "good")).1, "t");
    let seen = healthy.seen.lock().unwrap().clone();
    assert!(seen.starts_with("GET /primary HTTP/1.1\r\n"), "{seen}");
    assert!(
        seen.contains(&format!("Host: {}\r\n", healthy_server.addr))
            && seen.contains("Connection: close\r\n"),
        "{seen}"
    );
    let entry = stats(&ringlb, "bad", "db");
    assert_eq!(
        entry["check_addr"],
        failing_server.addr.to_string(),
        "{entry}"
    );
    // And it follows the sidecar both ways.
    failing.set(200, "ok");
    wait_up(&ringlb, "bad", "db", 1);
    healthy.set(500, "x");
    wait_up(&ringlb, "good", "db", 0);
}

#[test]
fn check_http_status_list_body_match_and_host() {
    let sidecar = Sidecar::new(204, "role: primary");
    let server = Backend::start(sidecar.handler());
    let b = |name| table(name, server.addr, "");
    let text = frontend("default-statuses", &b("a"), "check-http = \"GET /health\"")
        + &frontend(
            "only-200",
            &b("b"),
            "check-http = \"GET /health\"\ncheck-http-status = [200]",
        )
        + &frontend(
            "listed",
            &b("c"),
            "check-http = \"HEAD /health HTTP/1.0\"\ncheck-http-status = [200, 204]",
        )
        + &frontend(
            "body",
            &b("d"),
            "check = \"http\"\ncheck-http-expect = \"primary\"\ncheck-http-host = \"db.example\"",
        )
        + &frontend(
            "wrong-body",
            &b("e"),
            "check-http = \"GET /\"\ncheck-http-expect = \"replica\"",
        );
    let (ringlb, _file) = start("httpstatus", &text);
    wait_up(&ringlb, "default-statuses", "a", 1);
    wait_up(&ringlb, "listed", "c", 1);
    wait_up(&ringlb, "body", "d", 1);
    wait_up(&ringlb, "only-200", "b", 0);
    wait_up(&ringlb, "wrong-body", "e", 0);
    let only = down_line(&ringlb, "b");
    assert!(only.contains("status 204 Whatever (want [200])"), "{only}");
    let wrong = down_line(&ringlb, "e");
    assert!(
        wrong.contains("the body did not contain \"replica\""),
        "{wrong}"
    );
    assert!(
        eventually(WAIT, || sidecar
            .seen
            .lock()
            .unwrap()
            .contains("Host: db.example\r\n")),
        "check-http-host is sent"
    );
    sidecar.set(503, "role: primary");
    wait_up(&ringlb, "body", "d", 0);
}

/// An agent whose line the test sets; it answers each connection once,
/// and keeps what the last check sent it (`agent-send`).
fn fake_agent(reply: Arc<Mutex<String>>, heard: Arc<Mutex<String>>) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        let line = format!("{}\n", reply.lock().unwrap());
        let _ = stream.write_all(line.as_bytes());
        let _ = stream.shutdown(Shutdown::Write);
        let mut got = [0u8; 64];
        if let Ok(n @ 1..) = stream.read(&mut got) {
            *heard.lock().unwrap() = String::from_utf8_lossy(&got[..n]).into_owned();
        }
    })
}

struct AgentSetup {
    ringlb: Ringlb,
    reply: Arc<Mutex<String>>,
    heard: Arc<Mutex<String>>,
    socket: PathBuf,
    addr: SocketAddr,
    _file: ConfigFile,
    _servers: Vec<Backend>,
}

/// Backends a (with an agent) and b behind one round-robin frontend.
fn agent_setup(tag: &str, first: &str) -> AgentSetup {
    let reply = Arc::new(Mutex::new(first.to_string()));
    let heard = Arc::new(Mutex::new(String::new()));
    let agent = Backend::start(fake_agent(Arc::clone(&reply), Arc::clone(&heard)));
    let a = Backend::start(name_then_echo("a"));
    let b = Backend::start(name_then_echo("b"));
    let backends = format!(
        "{}, {}",
        table(
            "a",
            a.addr,
            &format!(", agent-port = {}", agent.addr.port())
        ),
        table("b", b.addr, "")
    );
    let socket =
        std::env::temp_dir().join(format!("ringlb-checks-{tag}-{}.sock", std::process::id()));
    let text = format!(
        "admin-socket = \"{}\"\n{}",
        socket.display(),
        frontend(
            "web",
            &backends,
            "agent-interval = \"100ms\"\nagent-send = \"web/a\\n\""
        )
    );
    let (ringlb, file) = start(tag, &text);
    let addr = listening(&ringlb, "web");
    AgentSetup {
        ringlb,
        reply,
        heard,
        socket,
        addr,
        _file: file,
        _servers: vec![agent, a, b],
    }
}

impl Drop for AgentSetup {
    fn drop(&mut self) {
        // A killed ringlb leaves its admin socket behind.
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl AgentSetup {
    fn say(&self, line: &str, log: &str) {
        let before = self.ringlb.count_logs(log);
        *self.reply.lock().unwrap() = line.to_string();
        assert!(
            self.ringlb.wait_log_count(log, before + 1, WAIT).is_some(),
            "no '{log}' after the agent said '{line}'; logs:\n{}",
            self.ringlb.logs()
        );
    }

    fn show(&self) -> String {
        let out = std::process::Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(&self.socket)
            .arg("show")
            .output()
            .expect("ringlb ctl show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn names(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| open(self.addr).1).collect()
    }
}

#[test]
fn an_agents_drain_stops_new_connections_but_keeps_established_ones() {
    let setup = agent_setup("agentdrain", "ready");
    let mut kept = loop {
        let (s, name) = open(setup.addr);
        if name == "a" {
            break s;
        }
    };
    setup.say("drain", "its agent says drain");
    assert!(setup.names(8).iter().all(|n| n == "b"), "drain: only b");
    kept.write_all(b"still here")
        .expect("established survives drain");
    let mut echoed = [0u8; 10];
    kept.read_exact(&mut echoed)
        .expect("echo on the kept connection");
    assert_eq!(&echoed, b"still here");
    assert_eq!(stats(&setup.ringlb, "web", "a")["state"], "drain");
    setup.say("ready", "its agent says ready");
    let names = setup.names(8);
    assert!(names.iter().any(|n| n == "a"), "ready again: {names:?}");
}

#[test]
fn an_agents_weight_shows_in_metrics_and_stats() {
    let setup = agent_setup("agentweight", "up 100%");
    setup.say("50%", "its agent sets its weight to 50%");
    let series = "ringlb_backend_agent_weight_percent{frontend=\"web\",backend=\"a\"}";
    assert!(
        eventually(WAIT, || setup.ringlb.metric(series) == Some(50)),
        "{}",
        setup.ringlb.scrape("/metrics").1
    );
    let entry = stats(&setup.ringlb, "web", "a");
    assert_eq!(entry["weight_percent"], 50, "{entry}");
    assert_eq!(entry["agent"]["reply"], "50%", "{entry}");
    assert_eq!(entry["agent"]["weight_percent"], 50, "{entry}");
    assert_eq!(
        setup.heard.lock().unwrap().as_str(),
        "web/a\n",
        "agent-send"
    );
    let shown = setup.show();
    assert!(shown.contains("agent: 50%"), "{shown}");
}

#[test]
fn an_agent_says_maint_down_up_and_ready() {
    let setup = agent_setup("agentstates", "up ready");
    setup.say("maint", "its agent says maint");
    assert!(setup.names(6).iter().all(|n| n == "b"), "maint: only b");
    assert_eq!(stats(&setup.ringlb, "web", "a")["state"], "maint");
    setup.say("ready", "its agent says ready");
    setup.say("down # disk full", "backend a is DOWN");
    let line = down_line(&setup.ringlb, "a");
    assert!(line.contains("its agent says down: disk full"), "{line}");
    let shown = setup.show();
    assert!(
        shown.contains("its agent says down: disk full; agent: down # disk full"),
        "{shown}"
    );
    assert!(setup.names(6).iter().all(|n| n == "b"), "down: only b");
    setup.say("up", "backend a is UP");
    assert!(
        setup.ringlb.logs().contains("its agent says up"),
        "{}",
        setup.ringlb.logs()
    );
    let names = setup.names(8);
    assert!(names.iter().any(|n| n == "a"), "up again: {names:?}");
}

#[test]
fn an_agent_that_does_not_answer_changes_nothing() {
    let gone = refused_addr();
    let a = Backend::start(name_then_echo("a"));
    let text = frontend(
        "web",
        &table("a", a.addr, &format!(", agent-port = {}", gone.port())),
        "agent-interval = \"100ms\"",
    );
    let (ringlb, _file) = start("agentgone", &text);
    assert!(
        eventually(WAIT, || stats(&ringlb, "web", "a")["agent"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused"))),
        "{}",
        ringlb.logs()
    );
    wait_up(&ringlb, "web", "a", 1);
    assert_eq!(ringlb.count_logs("is DOWN"), 0, "{}", ringlb.logs());
    assert_eq!(open(listening(&ringlb, "web")).1, "a");
}

fn checks(ringlb: &Ringlb, frontend: &str, backend: &str) -> u64 {
    ringlb
        .metric(&format!(
            "ringlb_backend_checks_total{{frontend=\"{frontend}\",backend=\"{backend}\"}}"
        ))
        .unwrap_or(0)
}

/// Two frontends on the same dead backend: one checks every 3 s, the
/// other 3 s apart too but 100 ms while changing or down.
#[test]
fn fastinter_and_downinter_check_faster_while_changing_or_down() {
    let mut server = Backend::start_tracked(name_then_echo("a"));
    let slow = "check-interval = \"3s\"\ncheck-timeout = \"300ms\"\nfall = 3\nrise = 2\n";
    let fast = format!("{slow}fastinter = \"100ms\"\ndowninter = \"100ms\"\n");
    let entry = |name: &str, extra: &str| {
        format!(
            "[[frontend]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nbackends = [{}]\n{extra}\n",
            table(name, server.addr, "")
        )
    };
    let text = entry("slow", slow) + &entry("fast", &fast);
    let (ringlb, _file) = start("fastinter", &text);
    assert!(eventually(WAIT, || checks(&ringlb, "fast", "fast") >= 1
        && checks(&ringlb, "slow", "slow") >= 1));
    server.kill();
    let killed = Instant::now();
    down_line(&ringlb, "fast");
    let detected = killed.elapsed();
    // Without fastinter: three checks 3 s apart, 6 s at least.
    assert!(detected < Duration::from_millis(5500), "{detected:?}");
    assert!(
        ringlb.count_logs("backend slow is DOWN") == 0,
        "slow is still counting: {}",
        ringlb.logs()
    );
    // Down: every 100 ms against every 3 s, measured over 2 s.
    let (fast_before, slow_before) = (
        checks(&ringlb, "fast", "fast"),
        checks(&ringlb, "slow", "slow"),
    );
    std::thread::sleep(Duration::from_secs(2));
    let fast_count = checks(&ringlb, "fast", "fast") - fast_before;
    let slow_count = checks(&ringlb, "slow", "slow") - slow_before;
    assert!(fast_count >= 6, "{fast_count} checks in 2 s while down");
    assert!(slow_count <= 2, "{slow_count} checks in 2 s at 3 s apart");
}

/// A PostgreSQL lookalike: reads the 8-byte SSLRequest and answers `reply`.
fn fake_postgres(reply: &'static [u8]) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        let mut request = [0u8; 8];
        if stream.read_exact(&mut request).is_err() {
            return;
        }
        let answer: &[u8] = if request == [0, 0, 0, 8, 4, 210, 22, 47] {
            reply
        } else {
            b"?"
        };
        let _ = stream.write_all(answer);
        let _ = stream.read(&mut [0u8; 64]);
    })
}

/// A MySQL lookalike: speaks first with `greeting`.
fn fake_mysql(greeting: Vec<u8>) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        let _ = stream.write_all(&greeting);
        let _ = stream.read(&mut [0u8; 64]);
    })
}

fn mysql_packet(payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut packet = len.to_le_bytes()[..3].to_vec();
    packet.push(0);
    packet.extend_from_slice(payload);
    packet
}

#[test]
fn ready_made_postgres_mysql_redis_and_http_checks_pass_and_fail() {
    let pg_up = Backend::start(fake_postgres(b"N"));
    let pg_down = Backend::start(fake_postgres(b"HTTP/1.1 400 Bad Request\r\n"));
    let mut greeting = vec![10];
    greeting.extend_from_slice(b"8.0.36\0");
    greeting.extend_from_slice(&[1, 0, 0, 0, b'a', b'b', 0]);
    let my_up = Backend::start(fake_mysql(mysql_packet(&greeting)));
    let mut error = vec![0xff, 0x10, 0x04];
    error.extend_from_slice(b"#08004Too many connections");
    let my_down = Backend::start(fake_mysql(mysql_packet(&error)));
    let master = Arc::new(AtomicBool::new(true));
    let redis = Backend::start(fake_redis(Arc::clone(&master)));
    let pinger = Backend::start(pinger("p", Arc::new(AtomicBool::new(true))));
    let http = Sidecar::new(200, "");
    let http_server = Backend::start(http.handler());
    let kind = |name: &str, kind: &str, backends: String| {
        frontend(name, &backends, &format!("check = \"{kind}\""))
    };
    let text = kind(
        "pg",
        "postgres",
        format!(
            "{}, {}",
            table("pg-up", pg_up.addr, ""),
            table("pg-down", pg_down.addr, "")
        ),
    ) + &kind(
        "my",
        "mysql",
        format!(
            "{}, {}",
            table("my-up", my_up.addr, ""),
            table("my-down", my_down.addr, "")
        ),
    ) + &kind(
        "redis",
        "redis",
        format!(
            "{}, {}",
            table("redis-up", redis.addr, ""),
            table("redis-down", pinger.addr, "")
        ),
    ) + &kind("master", "redis-master", table("master", redis.addr, ""))
        + &kind("http", "http", table("http", http_server.addr, ""));
    let (ringlb, _file) = start("kinds", &text);
    wait_up(&ringlb, "pg", "pg-up", 1);
    wait_up(&ringlb, "my", "my-up", 1);
    wait_up(&ringlb, "redis", "redis-up", 1);
    wait_up(&ringlb, "master", "master", 1);
    wait_up(&ringlb, "http", "http", 1);
    assert!(down_line(&ringlb, "pg-down").contains("not a PostgreSQL reply"));
    let my = down_line(&ringlb, "my-down");
    assert!(
        my.contains("MySQL refused: error 1040: Too many connections"),
        "{my}"
    );
    // The pinger answers PONG without the + of a Redis status reply.
    let redis_down = down_line(&ringlb, "redis-down");
    assert!(
        redis_down.contains("redis check (expect \"+PONG\")"),
        "{redis_down}"
    );
    master.store(false, SeqCst);
    let line = down_line(&ringlb, "master");
    assert!(line.contains("redis-master check"), "{line}");
    http.set(500, "");
    wait_up(&ringlb, "http", "http", 0);
    assert_eq!(stats(&ringlb, "master", "master")["check"], "redis-master");
}

/// `openssl s_server` with a throwaway certificate; killed on drop.
struct TlsServer {
    child: std::process::Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl TlsServer {
    fn start() -> Option<TlsServer> {
        let dir = std::env::temp_dir().join(format!("ringlb-checks-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        if !made.success() {
            return None;
        }
        let port = refused_addr().port();
        let child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let server = TlsServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        eventually(WAIT, || TcpStream::connect(server.addr).is_ok()).then_some(server)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_tls_check_wants_a_server_hello() {
    let Some(tls) = TlsServer::start() else {
        panic!("openssl s_server could not start (is openssl installed?)");
    };
    let plain = Backend::start(echo());
    let backends = format!(
        "{}, {}",
        table("tls", tls.addr, ""),
        table("plain", plain.addr, "")
    );
    let text = frontend("tls", &backends, "check = \"tls\"");
    let (ringlb, _file) = start("tls", &text);
    wait_up(&ringlb, "tls", "tls", 1);
    let line = down_line(&ringlb, "plain");
    assert!(
        line.contains("tls check") && line.contains("not a TLS ServerHello"),
        "{line}"
    );
}

/// The real redis-server, switched between master and replica with
/// REPLICAOF: the redis-master check follows its role.
#[test]
fn redis_master_follows_a_real_redis_server() {
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("redis-server is not installed: skipped (the fake Redis tests cover the check)");
        return;
    }
    let port = refused_addr().port();
    let mut child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--protected-mode", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(eventually(WAIT, || TcpStream::connect(addr).is_ok()));
    let command = |text: &str| {
        let mut s = TcpStream::connect(addr).expect("redis");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(text.as_bytes()).expect("command");
        let mut reply = [0u8; 64];
        let n = s.read(&mut reply).expect("reply");
        assert!(
            reply[..n].starts_with(b"+OK"),
            "{}",
            String::from_utf8_lossy(&reply[..n])
        );
    };
    let text = frontend("w", &table("redis", addr, ""), "check = \"redis-master\"");
    let (ringlb, _file) = start("realredis", &text);
    wait_up(&ringlb, "w", "redis", 1);
    // A replica of a master that does not exist: role:slave.
    command(&format!(
        "REPLICAOF 127.0.0.1 {}\r\n",
        refused_addr().port()
    ));
    wait_up(&ringlb, "w", "redis", 0);
    command("REPLICAOF NO ONE\r\n");
    wait_up(&ringlb, "w", "redis", 1);
}

/// A reload that changes a check makes a new target; it starts from what
/// its own check address last showed, not from another check of the same
/// traffic address.
#[test]
fn a_changed_check_starts_from_what_its_check_address_showed() {
    let traffic = Backend::start(name_then_echo("t"));
    let healthy = Sidecar::new(200, "ok");
    let failing = Sidecar::new(503, "no");
    let healthy_server = Backend::start(healthy.handler());
    let failing_server = Backend::start(failing.handler());
    let text = |path: &str| {
        frontend(
            "bad",
            &table("db", traffic.addr, ""),
            &format!(
                "check-http = \"GET {path}\"\ncheck-port = {}",
                failing_server.addr.port()
            ),
        ) + &frontend(
            "good",
            &table(
                "db",
                traffic.addr,
                &format!(", check-port = {}", healthy_server.addr.port()),
            ),
            "check-http = \"GET /a\"",
        )
    };
    let (ringlb, file) = start("reloadmemory", &text("/a"));
    wait_up(&ringlb, "bad", "db", 0);
    wait_up(&ringlb, "good", "db", 1);
    std::fs::write(file.path(), text("/b")).expect("rewrite config");
    ringlb.signal(libc::SIGHUP);
    assert!(
        ringlb.wait_log("reload 1 applied", WAIT).is_some(),
        "{}",
        ringlb.logs()
    );
    assert_eq!(up(&ringlb, "bad", "db"), Some(0), "starts down");
    // Its new checks (counted from zero) find it down: no new DOWN line,
    // which starting up would have needed.
    wait_up(&ringlb, "bad", "db", 0);
    assert_eq!(
        ringlb.count_logs("backend db is DOWN (frontend bad)"),
        1,
        "{}",
        ringlb.logs()
    );
    assert!(failing.seen.lock().unwrap().starts_with("GET /b "));
}
