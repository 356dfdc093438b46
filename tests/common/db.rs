//! Real database servers for tests/databases.rs: redis-server and
//! PostgreSQL processes in a scratch directory, small clients for their
//! wire protocols (so a test sees each reply and error exactly), and
//! ringlb started from an example file with its addresses replaced.
//! Every process is stopped by its PID on drop, also when a test panics.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::common::{BIN, Ringlb, eventually};

/// Whether `binary` can be run (found on PATH or given as a path).
pub fn found(binary: &str) -> bool {
    if binary.contains('/') {
        return Path::new(binary).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
}

/// `true` when the test can run; otherwise says why and returns `false`
/// so the test returns early. Under CI (CI=true), whose .ci/run installs
/// these packages, a missing binary fails instead: a skipped test must
/// not pass as a green one there.
pub fn require(what: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "SKIPPED {what}: {} not installed (Debian: apt-get install redis-server \
         redis-tools postgresql postgresql-contrib; .ci/run does it)",
        missing.join(", ")
    );
    assert!(
        std::env::var("CI").map_or(true, |ci| ci != "true"),
        "{message}"
    );
    eprintln!("{message}");
    false
}

/// A directory of the test's own, removed on drop. Under /tmp, whose
/// sticky, world-writable mode lets the `postgres` user reach it.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "rlb-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the scratch directory");
        Scratch { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `n` distinct loopback ports that were free a moment ago: for servers
/// that cannot be told to pick one (Redis, PostgreSQL). The listeners are
/// all held until every port is chosen, so the ports differ; another
/// process may still take one before the server binds it, which shows as
/// a server that does not start, with its log.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a probe port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("probe address").port())
        .collect()
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A server process, stopped on drop: `stop_signal` first (each server's
/// own quickest clean way), SIGKILL if it is still there 10 s later.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    stop_signal: i32,
}

impl Proc {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path, stop_signal: i32) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the server's log");
        let err = file.try_clone().expect("clone the log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            stop_signal,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGSTOP or SIGCONT: a frozen server's kernel still completes
    /// handshakes and takes requests; nothing answers them.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: plain libc call on our own child's pid (reaped only on
        // drop, after the test is done with it).
        unsafe { libc::kill(self.pid(), signal) };
    }

    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` and waits up to `timeout` for the exit; SIGKILL after.
    /// Returns whether it exited before the SIGKILL.
    pub fn stop_with(&mut self, signal: i32, timeout: Duration) -> bool {
        if self.exited() {
            return true;
        }
        // SAFETY: plain libc calls on our own child's pid, not yet reaped
        // (try_wait above saw it running), so the pid is still ours. A
        // process a test froze must be continued to act on the signal.
        unsafe {
            libc::kill(self.pid(), signal);
            libc::kill(self.pid(), libc::SIGCONT);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let signal = self.stop_signal;
        self.stop_with(signal, Duration::from_secs(10));
    }
}

/// Waits for `condition`, panicking with `what` and the log of `proc`.
fn wait_for(proc: &mut Proc, what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    if let Err(log) = wait_ready(proc, what, timeout, condition) {
        panic!("{} exited before {what}; its log:\n{log}", proc.name);
    }
}

/// Waits for `condition`; `Err` with the log if the process exits first,
/// a panic if it neither exits nor gets there in time.
fn wait_ready(
    proc: &mut Proc,
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Ok(());
        }
        if proc.exited() {
            return Err(proc.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{} not {what} within {timeout:?}; its log:\n{}",
            proc.name,
            proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Starts a server on `port` until one start gets its port: a port found
/// free (see [`free_ports`]) may be taken by another test before the
/// server binds it, and then the server is started again on another.
/// `start` spawns on the port given; `ready` waits for it.
fn start_on_free_port(
    port: &mut u16,
    log: &Path,
    mut start: impl FnMut(u16) -> Proc,
    mut ready: impl FnMut(&mut Proc, u16) -> Result<(), String>,
) -> Proc {
    for _ in 0..3 {
        let mut proc = start(*port);
        match ready(&mut proc, *port) {
            Ok(()) => return proc,
            Err(text) if text.contains("Address already in use") => {
                drop(proc);
                let _ = std::fs::remove_file(log);
                *port = free_ports(1)[0];
            }
            Err(text) => panic!("{} did not start; its log:\n{text}", proc.name),
        }
    }
    panic!("three ports in a row were taken before the server bound them");
}

// ---- Redis ----------------------------------------------------------------

/// One RESP reply.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn text(&self) -> String {
        match self {
            Reply::Status(s) | Reply::Error(s) => s.clone(),
            Reply::Int(n) => n.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Bulk(None) | Reply::Array(None) => String::new(),
            Reply::Array(Some(items)) => {
                items.iter().map(Reply::text).collect::<Vec<_>>().join("\n")
            }
        }
    }
}

/// A Redis connection speaking RESP2, one command at a time.
pub struct Resp {
    reader: BufReader<TcpStream>,
}

fn bad(text: String) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, text)
}

impl Resp {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Resp> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(Resp {
            reader: BufReader::new(stream),
        })
    }

    /// Connects, and authenticates first when `password` is given.
    pub fn connect_auth(addr: SocketAddr, password: Option<&str>) -> std::io::Result<Resp> {
        let mut resp = Resp::connect(addr)?;
        if let Some(password) = password {
            match resp.call(&["AUTH", password])? {
                Reply::Status(s) if s == "OK" => {}
                other => return Err(bad(format!("AUTH: {other:?}"))),
            }
        }
        Ok(resp)
    }

    pub fn call(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend(format!("${}\r\n{arg}\r\n", arg.len()).bytes());
        }
        self.reader.get_mut().write_all(&request)?;
        self.read_reply()
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    fn read_reply(&mut self) -> std::io::Result<Reply> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(line.len().min(1));
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| bad(format!("bad RESP length in {line:?}")))
        };
        Ok(match kind {
            "+" => Reply::Status(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(number()?),
            "$" => match usize::try_from(number()?) {
                Err(_) => Reply::Bulk(None),
                Ok(len) => {
                    let mut data = vec![0u8; len + 2];
                    self.reader.read_exact(&mut data)?;
                    data.truncate(len);
                    Reply::Bulk(Some(data))
                }
            },
            "*" => match usize::try_from(number()?) {
                Err(_) => Reply::Array(None),
                Ok(n) => Reply::Array(Some(
                    (0..n)
                        .map(|_| self.read_reply())
                        .collect::<std::io::Result<_>>()?,
                )),
            },
            _ => return Err(bad(format!("not a RESP reply: {line:?}"))),
        })
    }

    /// The port the server at the other end listens on (`CONFIG GET
    /// port`): which node a connection through ringlb reached.
    pub fn server_port(&mut self) -> std::io::Result<u16> {
        match self.call(&["CONFIG", "GET", "port"])? {
            Reply::Array(Some(items)) if items.len() == 2 => items[1]
                .text()
                .parse()
                .map_err(|_| bad(format!("CONFIG GET port: {items:?}"))),
            other => Err(bad(format!("CONFIG GET port: {other:?}"))),
        }
    }
}

/// A redis-server of the test's own: no persistence, loopback only.
pub struct Redis {
    pub port: u16,
    pub proc: Proc,
    password: Option<String>,
}

impl Redis {
    pub fn binaries_missing() -> Vec<String> {
        ["redis-server", "redis-cli", "redis-benchmark"]
            .iter()
            .filter(|b| !found(b))
            .map(|b| b.to_string())
            .collect()
    }

    /// Starts a node on `port` (a replica of `master` when given) and waits
    /// until it answers PING, and for a replica until its link is up.
    pub fn start(scratch: &Scratch, name: &str, port: u16, master: Option<u16>) -> Redis {
        Redis::start_with(scratch, name, port, master, None)
    }

    /// As `start`, with `requirepass` (and `masterauth`) set when given.
    pub fn start_with(
        scratch: &Scratch,
        name: &str,
        port: u16,
        master: Option<u16>,
        password: Option<&str>,
    ) -> Redis {
        let dir = scratch.join(name);
        std::fs::create_dir_all(&dir).expect("redis directory");
        let log = scratch.join(&format!("{name}.log"));
        let spawn = |port: u16| {
            let mut command = Command::new("redis-server");
            command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
            command.args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
            command.args(["--logfile", "", "--dir"]).arg(&dir);
            if let Some(master) = master {
                command.args(["--replicaof", "127.0.0.1", &master.to_string()]);
            }
            if let Some(password) = password {
                command.args(["--requirepass", password, "--masterauth", password]);
            }
            Proc::spawn(name, command, &log, libc::SIGTERM)
        };
        let password = password.map(String::from);
        let answers = |proc: &mut Proc, port: u16| {
            wait_ready(proc, "answering PING", Duration::from_secs(20), || {
                Resp::connect_auth(local(port), password.as_deref())
                    .and_then(|mut c| c.call(&["PING"]))
                    .is_ok_and(|r| r == Reply::Status("PONG".into()))
            })
        };
        let mut port = port;
        let proc = start_on_free_port(&mut port, &log, spawn, answers);
        let mut redis = Redis {
            port,
            proc,
            password,
        };
        if master.is_some() {
            redis.wait_info("master_link_status:up", Duration::from_secs(20));
        }
        redis
    }

    pub fn addr(&self) -> SocketAddr {
        local(self.port)
    }

    /// One command on a new direct connection (not through ringlb).
    pub fn call(&self, args: &[&str]) -> std::io::Result<Reply> {
        Resp::connect_auth(self.addr(), self.password.as_deref())?.call(args)
    }

    pub fn info(&self, section: &str) -> String {
        self.call(&["INFO", section])
            .map(|r| r.text())
            .unwrap_or_default()
    }

    pub fn wait_info(&mut self, needle: &str, timeout: Duration) {
        let (addr, password) = (self.addr(), self.password.clone());
        wait_for(&mut self.proc, needle, timeout, || {
            Resp::connect_auth(addr, password.as_deref())
                .and_then(|mut c| c.call(&["INFO", "replication"]))
                .is_ok_and(|r| r.text().contains(needle))
        });
    }

    /// REPLICAOF NO ONE: this replica becomes a master.
    pub fn promote(&self) {
        let reply = self.call(&["REPLICAOF", "NO", "ONE"]);
        assert!(
            matches!(&reply, Ok(Reply::Status(s)) if s.starts_with("OK")),
            "{reply:?}"
        );
    }

    /// REPLICAOF 127.0.0.1 PORT: this node becomes a replica of `master`.
    pub fn demote(&self, master: u16) {
        let reply = self.call(&["REPLICAOF", "127.0.0.1", &master.to_string()]);
        assert!(
            matches!(&reply, Ok(Reply::Status(s)) if s.starts_with("OK")),
            "{reply:?}"
        );
    }

    /// A switchover from this master to `replica` that loses no
    /// acknowledged write (Redis's replication is asynchronous): writes
    /// paused here, the replica caught up, promoted (REPLICAOF NO ONE),
    /// this node demoted (REPLICAOF), writes let go again: clients still
    /// connected here get READONLY from then on.
    pub fn switchover_to(&self, replica: &Redis) {
        let ok = |reply: std::io::Result<Reply>| {
            assert!(
                matches!(&reply, Ok(Reply::Status(s)) if s.starts_with("OK")),
                "{reply:?}"
            );
        };
        ok(self.call(&["CLIENT", "PAUSE", "20000", "WRITE"]));
        let offset = |node: &Redis, field: &str| -> Option<u64> {
            node.info("replication")
                .lines()
                .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
        };
        let target = offset(self, "master_repl_offset:");
        assert!(
            eventually(Duration::from_secs(15), || {
                target.is_some() && offset(replica, "slave_repl_offset:") == target
            }),
            "the replica did not catch up with {target:?}"
        );
        replica.promote();
        self.demote(replica.port);
        ok(self.call(&["CLIENT", "UNPAUSE"]));
    }

    pub fn dbsize(&self) -> i64 {
        match self.call(&["DBSIZE"]) {
            Ok(Reply::Int(n)) => n,
            other => panic!("DBSIZE on {}: {other:?}", self.port),
        }
    }
}

// ---- PostgreSQL -----------------------------------------------------------

/// The directory of the newest installed PostgreSQL's server binaries
/// (Debian: /usr/lib/postgresql/N/bin; elsewhere: on PATH).
pub fn pg_bindir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let entry = e.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).find(|dir| dir.join("initdb").is_file())
}

/// The user PostgreSQL runs as: `postgres` when the test runs as root
/// (PostgreSQL refuses to run as root), the test's own user otherwise.
#[derive(Clone, Copy)]
pub struct PgUser {
    pub uid: u32,
    pub gid: u32,
}

impl PgUser {
    pub fn find() -> Option<PgUser> {
        // SAFETY: plain libc calls without arguments.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if uid != 0 {
            return Some(PgUser { uid, gid });
        }
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 || fields[0] != "postgres" {
                return None;
            }
            Some(PgUser {
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
            })
        })
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.uid(self.uid).gid(self.gid).env("LC_ALL", "C");
        command
    }

    fn own(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// What the PostgreSQL tests need; the missing ones by name.
pub fn pg_missing() -> Vec<String> {
    let mut missing = Vec::new();
    match pg_bindir() {
        None => missing.push("PostgreSQL's initdb".to_string()),
        Some(bin) => {
            for tool in ["postgres", "pg_basebackup", "pgbench"] {
                if !bin.join(tool).is_file() && !found(tool) {
                    missing.push(tool.to_string());
                }
            }
        }
    }
    if PgUser::find().is_none() {
        missing.push("a `postgres` user to run the server as".to_string());
    }
    if !found("python3") {
        missing.push("python3 (for examples/pg-sidecar.py)".to_string());
    }
    missing
}

/// A PostgreSQL node: a data directory and, while running, its postmaster.
pub struct Pg {
    pub name: String,
    pub port: u16,
    pub data: PathBuf,
    bin: PathBuf,
    user: PgUser,
    log: PathBuf,
    started: bool,
    pub proc: Option<Proc>,
}

impl Pg {
    /// initdb (trust for 127.0.0.1 only: the test's servers listen nowhere
    /// else and have no Unix socket), then start: a primary.
    pub fn primary(scratch: &Scratch, name: &str, port: u16) -> Pg {
        let mut pg = Pg::unstarted(scratch, name, port);
        let out = pg
            .user
            .command(pg.bin.join("initdb"))
            .args(["-D"])
            .arg(&pg.data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("-N")
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let hba = "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";
        std::fs::write(pg.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        pg.start();
        pg
    }

    /// pg_basebackup -R from `primary`, then start: a streaming replica.
    pub fn replica_of(scratch: &Scratch, name: &str, port: u16, primary: &Pg) -> Pg {
        let mut pg = Pg::unstarted(scratch, name, port);
        let out = pg
            .user
            .command(pg.bin.join("pg_basebackup"))
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args(["-U", "postgres", "-D"])
            .arg(&pg.data)
            .args(["-R", "-X", "stream", "-c", "fast", "-N"])
            .output()
            .expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.start();
        pg.wait_streaming();
        pg
    }

    fn unstarted(scratch: &Scratch, name: &str, port: u16) -> Pg {
        let user = PgUser::find().expect("a user to run PostgreSQL as");
        let bin = pg_bindir().expect("PostgreSQL's binaries");
        let home = scratch.join(name);
        std::fs::create_dir_all(&home).expect("node directory");
        user.own(&home);
        Pg {
            name: name.to_string(),
            port,
            data: home.join("data"),
            bin,
            user,
            log: scratch.join(&format!("{name}.log")),
            started: false,
            proc: None,
        }
    }

    /// Starts the postmaster as our child (so it is stopped by PID) and
    /// waits until it runs a query. fsync is off: these are throwaway
    /// servers, and the tests time failovers, not disks.
    /// On the first start, a port taken meanwhile is replaced by another;
    /// a restart keeps its port, which ringlb's config names by then.
    pub fn start(&mut self) {
        let spawn = |port: u16| {
            let mut command = self.user.command(self.bin.join("postgres"));
            command.arg("-D").arg(&self.data);
            for setting in [
                format!("port={port}"),
                "listen_addresses=127.0.0.1".into(),
                "unix_socket_directories=".into(),
                "fsync=off".into(),
                "shared_buffers=16MB".into(),
                "max_connections=50".into(),
                "logging_collector=off".into(),
            ] {
                command.args(["-c", &setting]);
            }
            // SIGQUIT: immediate shutdown, the postmaster ends its children.
            Proc::spawn(&self.name, command, &self.log, libc::SIGQUIT)
        };
        let queries = |proc: &mut Proc, port: u16| {
            wait_ready(proc, "running queries", Duration::from_secs(30), || {
                PgConn::connect(local(port))
                    .and_then(|mut c| c.query("select 1"))
                    .is_ok_and(|r| r.is_ok())
            })
        };
        let mut port = self.port;
        let proc = if self.started {
            let mut proc = spawn(port);
            if let Err(log) = queries(&mut proc, port) {
                panic!("{} did not start again; its log:\n{log}", self.name);
            }
            proc
        } else {
            start_on_free_port(&mut port, &self.log, spawn, queries)
        };
        self.port = port;
        self.started = true;
        self.proc = Some(proc);
    }

    /// A fast shutdown (SIGINT): sessions are ended, the last WAL is sent
    /// to the replicas, a shutdown checkpoint written.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            assert!(
                proc.stop_with(libc::SIGINT, Duration::from_secs(30)),
                "{} did not stop within 30 s; its log:\n{}",
                self.name,
                proc.log_text()
            );
        }
    }

    pub fn addr(&self) -> SocketAddr {
        local(self.port)
    }

    /// One query on a new direct connection; the first column of each row.
    pub fn query(&self, sql: &str) -> Vec<String> {
        let rows = PgConn::connect(self.addr())
            .and_then(|mut c| c.query(sql))
            .unwrap_or_else(|e| panic!("{} on {}: {e}", sql, self.name));
        rows.unwrap_or_else(|e| panic!("{} on {}: {e}", sql, self.name))
            .into_iter()
            .map(|row| row.into_iter().next().flatten().unwrap_or_default())
            .collect()
    }

    pub fn in_recovery(&self) -> Option<bool> {
        let rows = PgConn::connect(self.addr())
            .and_then(|mut c| c.query("select pg_is_in_recovery()"))
            .ok()?
            .ok()?;
        Some(rows.first()?.first()?.as_deref()? == "t")
    }

    pub fn wait_streaming(&mut self) {
        let addr = self.addr();
        let mut proc = self.proc.take().expect("a running node");
        wait_for(&mut proc, "streaming", Duration::from_secs(30), || {
            PgConn::connect(addr)
                .and_then(|mut c| c.query("select status from pg_stat_wal_receiver"))
                .is_ok_and(|r| {
                    r.is_ok_and(|rows| {
                        rows.first()
                            .is_some_and(|row| row.first() == Some(&Some("streaming".into())))
                    })
                })
        });
        self.proc = Some(proc);
    }

    /// pg_promote(): ends recovery, waits for it (up to 30 s).
    pub fn promote(&self) {
        assert_eq!(self.query("select pg_promote(true, 30)"), ["t"]);
    }

    /// After a clean stop, starts again as a replica of `primary`: a clean
    /// shutdown ends this node's WAL where the replica it came from had it,
    /// so it can follow the new timeline without pg_rewind.
    pub fn rejoin_as_replica_of(&mut self, primary: &Pg) {
        assert!(self.proc.is_none(), "stop {} first", self.name);
        let signal = self.data.join("standby.signal");
        std::fs::write(&signal, "").expect("write standby.signal");
        self.user.own(&signal);
        let mut auto = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.auto.conf"))
            .expect("open postgresql.auto.conf");
        writeln!(
            auto,
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres'",
            primary.port
        )
        .expect("write primary_conninfo");
        self.start();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client program of this installation (pgbench).
    pub fn tool(&self, name: &str) -> Command {
        let local = self.bin.join(name);
        Command::new(if local.is_file() {
            local
        } else {
            PathBuf::from(name)
        })
    }
}

/// A PostgreSQL error reply: its SQLSTATE and message.
#[derive(Debug, Clone)]
pub struct PgError {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

pub type Rows = Vec<Vec<Option<String>>>;

/// A PostgreSQL session over the frontend/backend protocol 3.0, trust
/// authentication only, simple queries: enough to see which server
/// answered and every error exactly.
pub struct PgConn {
    stream: BufReader<TcpStream>,
}

impl PgConn {
    /// Connects as `postgres` to database `postgres`; a server that refuses
    /// the session (starting up, shutting down, too many clients) is an
    /// `Err` carrying its message.
    pub fn connect(addr: SocketAddr) -> std::io::Result<PgConn> {
        PgConn::connect_as(addr, "postgres")
    }

    /// Connects as `user` to database `postgres`.
    pub fn connect_as(addr: SocketAddr, user: &str) -> std::io::Result<PgConn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        let mut conn = PgConn {
            stream: BufReader::new(stream),
        };
        let mut body = 196_608u32.to_be_bytes().to_vec();
        body.extend(format!("user\0{user}\0database\0postgres\0\0").bytes());
        let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        startup.extend(body);
        conn.stream.get_mut().write_all(&startup)?;
        loop {
            let (kind, body) = conn.message()?;
            match kind {
                b'R' if body.get(..4) == Some(&[0, 0, 0, 0]) => {}
                b'R' => return Err(bad("the server asks for a password".into())),
                b'E' => {
                    return Err(std::io::Error::new(
                        ErrorKind::ConnectionRefused,
                        parse_error(&body).to_string(),
                    ));
                }
                b'Z' => return Ok(conn),
                _ => {}
            }
        }
    }

    fn message(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=64 << 20).contains(&len) {
            return Err(bad(format!("message length {len}")));
        }
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body)?;
        Ok((head[0], body))
    }

    /// Runs `sql` (one statement); the rows, or the server's error.
    pub fn query(&mut self, sql: &str) -> std::io::Result<Result<Rows, PgError>> {
        let mut message = vec![b'Q'];
        message.extend(((sql.len() + 5) as u32).to_be_bytes());
        message.extend(sql.as_bytes());
        message.push(0);
        self.stream.get_mut().write_all(&message)?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (kind, body) = self.message()?;
            match kind {
                b'D' => rows.push(parse_row(&body)?),
                b'E' => error = Some(parse_error(&body)),
                b'Z' => return Ok(error.map_or(Ok(rows), Err)),
                _ => {}
            }
        }
    }

    /// The port of the server this session reached, through ringlb or not.
    pub fn server_port(&mut self) -> std::io::Result<u16> {
        match self.query("select inet_server_port()")? {
            Ok(rows) => rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| bad(format!("inet_server_port: {rows:?}"))),
            Err(e) => Err(bad(e.to_string())),
        }
    }
}

fn parse_row(body: &[u8]) -> std::io::Result<Vec<Option<String>>> {
    let short = || bad("short DataRow".into());
    let count = u16::from_be_bytes(
        body.get(..2)
            .ok_or_else(short)?
            .try_into()
            .unwrap_or([0; 2]),
    );
    let mut at = 2;
    let mut row = Vec::new();
    for _ in 0..count {
        let len = i32::from_be_bytes(
            body.get(at..at + 4)
                .ok_or_else(short)?
                .try_into()
                .unwrap_or([0; 4]),
        );
        at += 4;
        match usize::try_from(len) {
            Err(_) => row.push(None),
            Ok(len) => {
                let value = body.get(at..at + len).ok_or_else(short)?;
                row.push(Some(String::from_utf8_lossy(value).into_owned()));
                at += len;
            }
        }
    }
    Ok(row)
}

fn parse_error(body: &[u8]) -> PgError {
    let mut error = PgError {
        code: String::new(),
        message: String::new(),
    };
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => error.code = text,
            b'M' => error.message = text,
            _ => {}
        }
    }
    error
}

/// examples/pg-sidecar.py for one node, on a port it picks itself.
pub struct Sidecar {
    pub port: u16,
    pub proc: Proc,
}

impl Sidecar {
    pub fn start(scratch: &Scratch, node: &Pg) -> Sidecar {
        Sidecar::start_as(scratch, node, "postgres", None)
    }

    /// A sidecar connecting as `user`, with PGPASSWORD set when given.
    pub fn start_as(scratch: &Scratch, node: &Pg, user: &str, password: Option<&str>) -> Sidecar {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/pg-sidecar.py");
        // A log of its own: the port is read from it.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, SeqCst);
        let log = scratch.join(&format!("{}-{user}-sidecar-{n}.log", node.name));
        let mut command = Command::new("python3");
        command
            .arg(script)
            .args(["--listen", "127.0.0.1:0", "--port", &node.port.to_string()])
            .args(["--user", user])
            .env_remove("PGPASSWORD");
        if let Some(password) = password {
            command.env("PGPASSWORD", password);
        }
        let mut proc = Proc::spawn(
            &format!("{}'s sidecar as {user}", node.name),
            command,
            &log,
            libc::SIGTERM,
        );
        let mut port = None;
        wait_for(&mut proc, "listening", Duration::from_secs(20), || {
            port = std::fs::read_to_string(&log).ok().and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("pg-sidecar: listening on "))
                    .and_then(|a| a.rsplit(':').next()?.trim().parse().ok())
            });
            port.is_some()
        });
        Sidecar {
            port: port.unwrap_or_default(),
            proc,
        }
    }

    /// GET `path`: the status code, or 0 when there was no answer.
    pub fn status(&self, path: &str) -> u16 {
        let ask = || -> std::io::Result<u16> {
            let mut s = TcpStream::connect(local(self.port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )?;
            let mut response = String::new();
            s.read_to_string(&mut response)?;
            Ok(response
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or(0))
        };
        ask().unwrap_or(0)
    }
}

// ---- ringlb from an example file ------------------------------------------

/// ringlb running an example config with its addresses replaced.
pub struct FromExample {
    pub ringlb: Ringlb,
    pub frontends: HashMap<String, SocketAddr>,
    pub config: toml::Table,
    _scratch: Scratch,
}

/// The example file's text with each `(from, to)` replaced, every `from`
/// required to be there: an example edited so that the test would no
/// longer exercise it as written fails here, not silently.
pub fn example_with(name: &str, replacements: &[(String, String)]) -> String {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    for (from, to) in replacements {
        assert!(
            text.contains(from.as_str()),
            "examples/{name} no longer contains {from:?}"
        );
        text = text.replace(from.as_str(), to);
    }
    text
}

impl FromExample {
    /// Starts ringlb with `text` as its config and waits until every
    /// frontend listens.
    pub fn start(text: &str) -> FromExample {
        let scratch = Scratch::new("ringlb");
        let path = scratch.join("ringlb.toml");
        std::fs::write(&path, text).expect("write the config");
        let config: toml::Table = text.parse().expect("the config is TOML");
        let names: Vec<String> = config
            .get("frontend")
            .and_then(|f| f.as_array())
            .map(|frontends| {
                frontends
                    .iter()
                    .filter_map(|f| f.get("name")?.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let mut command = Command::new(BIN);
        command.arg("--config").arg(&path);
        let ringlb = Ringlb::start_command(command);
        let mut frontends = HashMap::new();
        for name in names {
            let line = ringlb
                .wait_log(
                    &format!("frontend {name} listening on "),
                    Duration::from_secs(10),
                )
                .unwrap_or_else(|| panic!("frontend {name} not listening: {}", ringlb.logs()));
            let addr = line
                .split("listening on ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no address in {line:?}"));
            frontends.insert(name, addr);
        }
        FromExample {
            ringlb,
            frontends,
            config,
            _scratch: scratch,
        }
    }

    pub fn addr(&self, frontend: &str) -> SocketAddr {
        self.frontends[frontend]
    }

    /// A setting of one frontend, as written in the file.
    fn setting(&self, frontend: &str, key: &str) -> Option<&toml::Value> {
        self.config
            .get("frontend")?
            .as_array()?
            .iter()
            .find(|f| f.get("name").and_then(|n| n.as_str()) == Some(frontend))?
            .get(key)
    }

    /// How long a switch of roles may take to show in this frontend's
    /// routing: the slower of `fall` failed and `rise` good checks, each
    /// `check-interval` apart (+10% jitter), plus the last check's timeout.
    pub fn switch_bound(&self, frontend: &str) -> Duration {
        let duration = |key, default| {
            self.setting(frontend, key)
                .and_then(|v| v.as_str())
                .map(|t| ringlb::config::parse_duration(t).expect("a duration"))
                .unwrap_or(default)
        };
        let count = |key, default| {
            self.setting(frontend, key)
                .and_then(|v| v.as_integer())
                .map_or(default, |n| n as u32)
        };
        let interval = duration("check-interval", Duration::from_secs(2));
        let timeout = duration("check-timeout", interval.min(Duration::from_secs(1)));
        let checks = count("fall", 3).max(count("rise", 2));
        interval.mul_f64(1.1) * checks + timeout
    }
}

/// Waits up to `timeout` for `condition`, then says `what` failed.
pub fn must(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    assert!(
        eventually(timeout, condition),
        "{what} (within {timeout:?})"
    );
}
