//! Test harness: the real ringlb binary on loopback, and small backends
//! written here so every fault can be produced on demand.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringlb");

/// Tests open thousands of sockets; the default soft limit is 1024.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A running ringlb process; killed on drop.
pub struct Ringlb {
    pub child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Ringlb {
    /// Starts `ringlb --listen 127.0.0.1:0 ARGS` and waits for its listen line.
    pub fn start(args: &[&str]) -> Ringlb {
        let mut full = vec!["--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Ringlb::start_raw(&full)
    }

    pub fn start_raw(args: &[&str]) -> Ringlb {
        let mut command = Command::new(BIN);
        command.args(args);
        Ringlb::start_command(command)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn count_logs(&self, pattern: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(pattern))
            .count()
    }

    /// The first log line containing `pattern`, waiting up to `timeout`.
    pub fn wait_log(&self, pattern: &str, timeout: Duration) -> Option<String> {
        self.wait_log_count(pattern, 1, timeout)
    }

    /// The `n`th log line containing `pattern`.
    pub fn wait_log_count(&self, pattern: &str, n: usize, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(pattern))
                .nth(n - 1)
                .cloned();
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The stats endpoint's address, from its log line (`--stats ADDR`).
    pub fn stats_addr(&self) -> SocketAddr {
        let line = self
            .wait_log("metrics on http://", Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no stats endpoint; logs:\n{}", self.logs()));
        line.split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("stats address in log")
    }

    /// GET `path` from the stats endpoint: the status line and the body.
    pub fn scrape(&self, path: &str) -> (String, String) {
        let mut s = TcpStream::connect(self.stats_addr()).expect("connect to stats");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .expect("send the request");
        let mut response = String::new();
        s.read_to_string(&mut response).expect("stats response");
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    /// The value of one metric line (`name{labels}`), if present.
    pub fn metric(&self, series: &str) -> Option<u64> {
        let (_, body) = self.scrape("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect to ringlb");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: u64 = fields
            .get(11)
            .and_then(|u| u.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
        // SAFETY: plain libc call.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis(ticks * 1000 / hz.max(1))
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain libc call on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

impl Drop for Ringlb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend on loopback that runs `handler` on a thread per connection.
/// `kill` closes the listener (new connects are refused); a tracked backend
/// also resets every open connection, as a killed process would. Tracking
/// keeps a clone of each socket, so a handler's own close is not a close:
/// only tests that kill with connections open use it.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

pub type Handler = Arc<dyn Fn(TcpStream) + Send + Sync>;

impl Backend {
    pub fn start(handler: Handler) -> Backend {
        Backend::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), handler, false)
    }

    pub fn start_tracked(handler: Handler) -> Backend {
        Backend::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), handler, true)
    }

    pub fn start_at(addr: SocketAddr, handler: Handler, track: bool) -> Backend {
        // A deep accept queue (std's is 128): tests open a thousand
        // connections at once, and an overflowing queue makes the kernel
        // drop handshakes or answer with SYN cookies, which is noise here.
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .expect("backend socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket.bind(&addr.into()).expect("bind backend");
        socket.listen(4096).expect("listen");
        let listener = TcpListener::from(socket);
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (flag, count, streams) = (Arc::clone(&stop), Arc::clone(&accepted), Arc::clone(&open));
        let thread = std::thread::spawn(move || {
            while !flag.load(SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        count.fetch_add(1, SeqCst);
                        if let (true, Ok(copy)) = (track, stream.try_clone()) {
                            streams.lock().unwrap().push(copy);
                        }
                        let handler = Arc::clone(&handler);
                        std::thread::Builder::new()
                            .stack_size(256 * 1024)
                            .spawn(move || handler(stream))
                            .expect("spawn handler");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Backend {
            addr,
            accepted,
            stop,
            open,
            thread: Some(thread),
        }
    }

    pub fn addr_str(&self) -> String {
        self.addr.to_string()
    }

    pub fn kill(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Echoes every byte, and passes the client's end of stream back.
pub fn echo() -> Handler {
    Arc::new(|mut stream: TcpStream| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stream.shutdown(Shutdown::Write);
    })
}

/// Writes its name, ends its stream, and waits for the client to end.
pub fn named(name: &'static str) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        let _ = stream.write_all(name.as_bytes());
        let _ = stream.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    })
}

/// Answers `PING\r\n` with `PONG\r\n` while `healthy`; otherwise reads and
/// stays silent, as a hung process whose kernel still accepts.
pub fn pinger(name: &'static str, healthy: Arc<AtomicBool>) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        let mut buf = [0u8; 512];
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if !healthy.load(SeqCst) {
                        continue;
                    }
                    let reply: &[u8] = if buf[..n].starts_with(b"PING") {
                        b"PONG\r\n"
                    } else {
                        name.as_bytes()
                    };
                    if stream.write_all(reply).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Asks ringlb which backend a new connection reaches (`named` backends).
pub fn which(addr: SocketAddr) -> Result<String, std::io::Error> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut name = String::new();
    s.read_to_string(&mut name)?;
    if name.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a name",
        ));
    }
    Ok(name)
}

/// A loopback address where nothing listens: connects are refused.
pub fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so a payload need not be
/// kept in memory to be checked.
pub struct Payload {
    state: u64,
}

impl Payload {
    pub fn new(seed: u64) -> Payload {
        Payload { state: seed | 1 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let bytes = self.state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// A streaming 64-bit hash (FNV-1a over 8-byte words, with the length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest {
    pub hash: u64,
    pub len: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }
}

impl Digest {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.len += data.len() as u64;
    }
}

/// Writes `len` payload bytes from `seed` to `w`; returns their digest.
pub fn send_payload(w: &mut impl Write, seed: u64, len: u64) -> std::io::Result<Digest> {
    let mut payload = Payload::new(seed);
    let mut digest = Digest::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        payload.fill(&mut buf[..n]);
        digest.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(digest)
}

/// Reads to end of stream; returns the digest of what arrived.
pub fn read_digest(r: &mut impl Read) -> std::io::Result<Digest> {
    let mut digest = Digest::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(digest);
        }
        digest.update(&buf[..n]);
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}

// ---- Added for the health scheduler tests (tests/health.rs). ----

impl Ringlb {
    /// Spawns `command` (ringlb itself, or a wrapper such as prlimit or
    /// setpriv that ends by running it) with the harness's log capture,
    /// without waiting for it to listen: for runs that must fail to start.
    pub fn spawn(mut command: Command) -> Ringlb {
        no_leave_delay_unless_asked(&mut command);
        let mut child = command
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringlb");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Ringlb {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
        }
    }

    /// Waits until ringlb logs its (first) listen line and takes the
    /// address from it; `Err` with the logs if it exits or never listens.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.wait_log("listening on", Duration::ZERO) {
                let addr = line
                    .split("listening on ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|a| a.parse().ok());
                if let Some(addr) = addr {
                    self.addr = addr;
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}; logs:\n{}", self.logs()));
            }
            if Instant::now() > deadline {
                return Err(format!("did not listen; logs:\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process's thread count (`Threads:` in /proc/PID/status).
    pub fn threads(&self) -> Option<usize> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
    }
}

/// A network namespace of the test's own (loopback up, nothing else),
/// deleted on drop, also when the test panics. `run` executes a closure on
/// a thread inside it: sockets it opens and processes it spawns (ringlb,
/// backends) live in the namespace.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("rlb-{tag}-{}", std::process::id());
        // A leftover from a killed run with the same pid would fail `add`.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let netns = Netns { name };
        netns.ip(&["netns", "add", &netns.name]);
        netns.ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        netns
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(args)
            .output()
            .expect("iproute2's ip is installed (see .ci/run)");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `iptables ARGS` inside the namespace.
    pub fn iptables(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "iptables"])
            .args(args)
            .output()
            .expect("ip netns exec iptables");
        assert!(
            out.status.success(),
            "iptables {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Packets matched so far by the INPUT rules whose line contains
    /// `pattern` (e.g. "DROP"), from `iptables -L -v -x`.
    pub fn matched(&self, pattern: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "iptables"])
            .args(["-L", "INPUT", "-v", "-n", "-x"])
            .output()
            .expect("ip netns exec iptables -L");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(pattern))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Runs `f` on a thread that has joined the namespace; a panic in `f`
    /// is the caller's panic (after which drop deletes the namespace).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let joined = scope.spawn(|| {
                let file = std::fs::File::open(&path).expect("namespace file");
                use std::os::fd::AsRawFd;
                // SAFETY: setns on a valid namespace fd; it changes only
                // this thread's network namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            });
            match joined.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `ringlb ARGS` with RLIMIT_NOFILE (soft and hard) at `nofile`, as
/// `prlimit --nofile=N ringlb ARGS` starts it (without needing util-linux).
pub fn ringlb_with_nofile(nofile: u64, args: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(BIN);
    command.args(args);
    let limit = libc::rlimit {
        rlim_cur: nofile,
        rlim_max: nofile,
    };
    // SAFETY: the closure runs in the forked child before exec and makes one
    // setrlimit call (async-signal-safe) on a struct copied into it.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    command
}

impl Ringlb {
    /// Starts a prepared ringlb command (which must include `--listen`) and
    /// waits for its listen line, as `start_raw` does.
    pub fn start_command(command: Command) -> Ringlb {
        let mut ringlb = Ringlb::spawn(command);
        if let Err(e) = ringlb.wait_listening(Duration::from_secs(10)) {
            panic!("ringlb did not start: {e}");
        }
        ringlb
    }
}

// ---- Added for the leave delay (tests/leave.rs). ----

/// ringlb waits 2 s (its default leave delay) between a SIGTERM and its
/// drain; a test that does not ask for a delay gets none, so that every
/// stop stays as fast as before. A test asks with `--leave-delay` or with a
/// `leave-delay` key in its `--config` file (which the flag would override).
pub fn no_leave_delay_unless_asked(command: &mut Command) {
    if command.get_program() != BIN {
        return;
    }
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let subcommand = args
        .first()
        .is_some_and(|a| ["ctl", "demo", "generate"].contains(&a.as_str()));
    let asked = args.iter().any(|a| a.starts_with("--leave-delay"));
    let in_file = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .and_then(|path| std::fs::read_to_string(path).ok())
        .is_some_and(|text| text.contains("leave-delay"));
    if !subcommand && !asked && !in_file && !args.iter().any(|a| a == "--check") {
        command.args(["--leave-delay", "0"]);
    }
}
