//! Hostile probes of the stages before the relay (PROXY header, ClientHello
//! for SNI routing, TLS handshake, the queue) and of the TLS relay: clients
//! that reset mid-stage or while queued, a flood of half ClientHellos, fd
//! exhaustion under a TLS-terminating and an SNI frontend, a backend that
//! resets after the replayed hello. After each, the gauges (active
//! connections, queued, backend slots and active counts) must come back to
//! zero, the per-source places must be given back, and no client may ever
//! see a clean end where ringlb could not carry its stream: served
//! exactly, waiting, or reset.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use ringlb::hello::build;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

const WAIT: Duration = Duration::from_secs(30);
const NAME: &str = "www.foobar.com";

/// A temp dir with a self-signed certificate for [`NAME`]; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("ringlb-probe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().to_string()
    }

    /// `cert = ..., key = ...` for a frontend's `tls` table.
    fn certificate(&self) -> String {
        let out = Command::new("openssl")
            .current_dir(&self.0)
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", &format!("/CN={NAME}")])
            .args(["-addext", &format!("subjectAltName=DNS:{NAME}")])
            .args(["-keyout", "www.key", "-out", "www.pem"])
            .stdin(Stdio::null())
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!(
            "cert = \"{}\", key = \"{}\"",
            self.path("www.pem"),
            self.path("www.key")
        )
    }

    /// The arguments that start ringlb on `config`, with a stats endpoint.
    fn args(&self, config: &str) -> Vec<String> {
        let path = self.path("ringlb.toml");
        std::fs::write(&path, config).expect("write config");
        vec![
            "--config".into(),
            path,
            "--stats".into(),
            "127.0.0.1:0".into(),
        ]
    }

    fn start(&self, config: &str) -> Ringlb {
        let args = self.args(config);
        Ringlb::start_raw(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One backend as a `backends` list entry, with a maxconn if given.
fn backend(addr: SocketAddr, maxconn: Option<u32>) -> String {
    match maxconn {
        Some(n) => format!("{{ address = \"{addr}\", name = \"app\", maxconn = {n} }}"),
        None => format!("{{ address = \"{addr}\", name = \"app\" }}"),
    }
}

/// An SNI (passthrough) frontend "f": one route for [`NAME`] over
/// `backends`, no backends of its own.
fn sni_config(backends: &str, extra: &str) -> String {
    format!(
        "workers = 1\n[[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:0\"\n\
         check-interval = \"1h\"\nlog = true\n{extra}\n\
         [[frontend.route]]\nname = \"www\"\nsni = [\"{NAME}\"]\nbackends = [ {backends} ]\n"
    )
}

/// A TLS-terminating frontend "f" over `backends`.
fn tls_config(dir: &TempDir, backends: &str, extra: &str) -> String {
    tls_config_with(dir, backends, "", extra)
}

/// As [`tls_config`], with more keys (`, key = value`) in its `tls` table.
fn tls_config_with(dir: &TempDir, backends: &str, tls: &str, extra: &str) -> String {
    format!(
        "workers = 1\n[[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:0\"\n\
         check-interval = \"1h\"\nlog = true\nbackends = [ {backends} ]\n\
         tls = {{ {}{tls} }}\n{extra}\n",
        dir.certificate()
    )
}

// ---- Metrics ----

/// The sum of every series of `family` (all label sets); `None` if the
/// scrape fails.
fn sum(body: &str, family: &str) -> u64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn scrape(ringlb: &Ringlb) -> String {
    ringlb.scrape("/metrics").1
}

fn family(ringlb: &Ringlb, family: &str) -> u64 {
    sum(&scrape(ringlb), family)
}

fn wait_family(ringlb: &Ringlb, name: &str, value: u64) {
    let ok = eventually(WAIT, || family(ringlb, name) == value);
    assert!(
        ok,
        "{name} is {}, not {value}; logs:\n{}",
        family(ringlb, name),
        ringlb.logs()
    );
}

/// Everything a connection holds is given back: the connection counts,
/// the queue, the backends' slots and active counts.
fn settled(ringlb: &Ringlb) {
    const GAUGES: [&str; 5] = [
        "ringlb_connections_active",
        "ringlb_frontend_connections_active",
        "ringlb_frontend_queued",
        "ringlb_backend_maxconn_slots_used",
        "ringlb_backend_connections_active",
    ];
    let mut body = String::new();
    let ok = eventually(WAIT, || {
        body = scrape(ringlb);
        GAUGES.iter().all(|g| sum(&body, g) == 0)
    });
    assert!(
        ok,
        "gauges not back to 0:\n{}\nlogs:\n{}",
        body.lines()
            .filter(|l| GAUGES.iter().any(|g| l.starts_with(g)))
            .collect::<Vec<_>>()
            .join("\n"),
        ringlb.logs()
    );
}

/// Per-source places not given back would refuse later clients.
fn no_source_refused(ringlb: &Ringlb) {
    let body = scrape(ringlb);
    let refused = body
        .lines()
        .filter(|l| l.starts_with("ringlb_frontend_refused_total") && l.contains("source-"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum::<u64>();
    assert_eq!(refused, 0, "a per-source place was not given back");
}

// ---- Clients ----

fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(stream);
}

/// Reads to the end: the bytes on a clean end, the error kind otherwise.
fn read_end(stream: &mut impl Read) -> Result<Vec<u8>, ErrorKind> {
    let mut got = Vec::new();
    stream.read_to_end(&mut got).map_err(|e| e.kind())?;
    Ok(got)
}

/// Reads exactly `len` bytes and digests them.
fn read_digest_of(r: &mut impl Read, len: u64) -> std::io::Result<Digest> {
    let mut digest = Digest::default();
    let mut buf = vec![0u8; 64 * 1024];
    while digest.len < len {
        let want = buf.len().min((len - digest.len) as usize);
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        digest.update(&buf[..n]);
    }
    Ok(digest)
}

/// How one client's exchange ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every byte came back, exactly.
    Served,
    Reset,
    /// Anything else: a clean end too early, wrong bytes, a timeout.
    Broken(String),
}

fn outcome(result: std::io::Result<bool>) -> Outcome {
    match result {
        Ok(true) => Outcome::Served,
        Ok(false) => Outcome::Broken("the echo differs".into()),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Outcome::Reset,
        Err(e) => Outcome::Broken(e.to_string()),
    }
}

/// Sends a ClientHello for [`NAME`] and `len` payload bytes, and checks
/// that the echo backend returns both exactly.
fn sni_echo(stream: &mut TcpStream, seed: u64, len: u64) -> std::io::Result<bool> {
    let hello = build::client_hello(Some(NAME), 0);
    stream.write_all(&hello)?;
    let sent = send_payload(stream, seed, len)?;
    let mut back = vec![0u8; hello.len()];
    stream.read_exact(&mut back)?;
    Ok(back == hello && read_digest_of(stream, len)? == sent)
}

/// Below a receive buffer (16 KiB): the relay copies and takes no pipe,
/// whose fds would blur the tests that run out of fds.
const SNI_LEN: u64 = 8 * 1024;

fn sni_client(addr: SocketAddr, seed: u64) -> Outcome {
    let run = || {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(WAIT))?;
        sni_echo(&mut s, seed, SNI_LEN)
    };
    outcome(run())
}

/// Accepts any server certificate: these tests are about the connection,
/// not about trust.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_no_client_auth();
        Arc::new(config)
    });
    Arc::clone(config)
}

fn tls_conn() -> rustls::ClientConnection {
    let name = ServerName::try_from(NAME).expect("name");
    rustls::ClientConnection::new(client_config(), name).expect("client")
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS client whose handshake with ringlb is complete.
fn handshake(addr: SocketAddr) -> std::io::Result<Tls> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(WAIT))?;
    handshake_on(sock)
}

fn handshake_on(mut sock: TcpStream) -> std::io::Result<Tls> {
    let mut conn = tls_conn();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}

/// Sends `len` payload bytes over TLS and checks the echo, exactly.
fn tls_echo(tls: &mut Tls, seed: u64, len: u64) -> std::io::Result<bool> {
    let sent = send_payload(tls, seed, len)?;
    tls.flush()?;
    Ok(read_digest_of(tls, len)? == sent)
}

fn tls_client(addr: SocketAddr, seed: u64) -> Outcome {
    outcome(handshake(addr).and_then(|mut tls| tls_echo(&mut tls, seed, 32 * 1024)))
}

// ---- Out of fds ----

/// Sets a running process's soft RLIMIT_NOFILE (as `prlimit --pid PID
/// --nofile=N:`); the hard limit stays, so it can be raised again.
fn set_soft_nofile(pid: u32, nofile: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid structs, on our own child's pid.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let limit = libc::rlimit {
        rlim_cur: nofile.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Every new fd fails with EMFILE from now on, whatever ringlb closes
/// meanwhile: a soft limit at the lowest free fd would let an fd closed
/// later (a stats connection's lingering close) serve one waiting client,
/// whose backend socket, closed in turn, serves the next.
fn out_of_fds(pid: u32) {
    set_soft_nofile(pid, 3);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(f)
        .expect("spawn")
}

// ---- Clients that vanish mid-stage ----

/// Waits until ringlb has accepted `n` clients of frontend "f" (they sit
/// in a stage, so the reset that follows lands mid-stage).
fn wait_active(ringlb: &Ringlb, n: u64) {
    wait_family(ringlb, "ringlb_frontend_connections_active", n);
}

#[test]
fn clients_resetting_mid_hello_give_everything_back() {
    let dir = TempDir::new("midhello");
    let echo = Backend::start(echo());
    let ringlb = dir.start(&sni_config(
        &backend(echo.addr, Some(1)),
        "max-conn-per-source = 1",
    ));
    let hello = build::client_hello(Some(NAME), 0);
    for round in 1..=4 {
        let mut c = ringlb.connect();
        c.write_all(&hello[..hello.len() / 2])
            .expect("half a hello");
        wait_active(&ringlb, 1);
        reset(c);
        let closed = r#"ringlb_frontend_client_hello_refused_total{frontend="f",reason="closed"}"#;
        wait_family(&ringlb, closed, round);
        settled(&ringlb);
    }
    assert_eq!(sni_client(ringlb.addr, 1), Outcome::Served);
    settled(&ringlb);
    no_source_refused(&ringlb);
}

#[test]
fn clients_resetting_mid_proxy_header_give_everything_back() {
    let dir = TempDir::new("midheader");
    let echo = Backend::start(echo());
    let config = format!(
        "workers = 1\n[[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:0\"\n\
         check-interval = \"1h\"\naccept-proxy = true\naccept-proxy-from = [\"127.0.0.0/8\"]\nmax-conn-per-source = 1\n\
         backends = [ {} ]\n",
        backend(echo.addr, Some(1))
    );
    let ringlb = dir.start(&config);
    let header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 80\r\n";
    for round in 1..=4 {
        let mut c = ringlb.connect();
        c.write_all(&header[..20]).expect("part of a header");
        wait_active(&ringlb, 1);
        reset(c);
        let truncated = r#"ringlb_frontend_proxy_refused_total{frontend="f",reason="truncated"}"#;
        wait_family(&ringlb, truncated, round);
        settled(&ringlb);
    }
    // The carried client (one place per source) is served afterwards.
    let mut c = ringlb.connect();
    c.write_all(header).expect("header");
    c.write_all(b"ping").expect("ping");
    let mut back = [0u8; 4];
    c.read_exact(&mut back).expect("echo");
    assert_eq!(&back, b"ping");
    drop(c);
    settled(&ringlb);
    no_source_refused(&ringlb);
}

#[test]
fn clients_resetting_mid_handshake_give_everything_back() {
    let dir = TempDir::new("midhandshake");
    let echo = Backend::start(echo());
    let config = tls_config(
        &dir,
        &backend(echo.addr, Some(1)),
        "max-conn-per-source = 1",
    );
    let ringlb = dir.start(&config);
    let closed = r#"ringlb_tls_handshake_failures_total{frontend="f",reason="closed"}"#;
    // Half a ClientHello, then a reset.
    let hello = build::client_hello(Some(NAME), 0);
    let mut c = ringlb.connect();
    c.write_all(&hello[..hello.len() / 2])
        .expect("half a hello");
    wait_active(&ringlb, 1);
    reset(c);
    wait_family(&ringlb, closed, 1);
    settled(&ringlb);
    // A whole ClientHello, the server's first flight read, then a reset.
    for round in 2..=4 {
        let mut c = ringlb.connect();
        let mut conn = tls_conn();
        conn.write_tls(&mut c).expect("ClientHello");
        let mut some = [0u8; 64];
        let n = c.read(&mut some).expect("the server's flight");
        assert!(n > 0, "ringlb ended the handshake");
        reset(c);
        wait_family(&ringlb, closed, round);
        settled(&ringlb);
    }
    assert_eq!(tls_client(ringlb.addr, 1), Outcome::Served);
    settled(&ringlb);
    no_source_refused(&ringlb);
}

// ---- The queue ----

#[derive(Clone, Copy, Debug)]
enum Mode {
    Sni,
    Tls,
}

/// A frontend in `mode` over one echo backend with maxconn 1.
fn queued_frontend(dir: &TempDir, mode: Mode, addr: SocketAddr, extra: &str) -> Ringlb {
    let backends = backend(addr, Some(1));
    let config = match mode {
        Mode::Sni => sni_config(&backends, extra),
        Mode::Tls => tls_config(dir, &backends, extra),
    };
    dir.start(&config)
}

/// A client that holds the backend's only slot, relaying, until dropped.
struct Holder(#[allow(dead_code, reason = "held for its connection")] Box<dyn std::any::Any>);

fn hold(mode: Mode, addr: SocketAddr) -> Holder {
    match mode {
        Mode::Sni => {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(WAIT)).unwrap();
            assert!(sni_echo(&mut s, 7, 16).expect("served"));
            Holder(Box::new(s))
        }
        Mode::Tls => {
            let mut tls = handshake(addr).expect("handshake");
            assert!(tls_echo(&mut tls, 7, 16).expect("served"));
            Holder(Box::new(tls))
        }
    }
}

/// A client past its hello or handshake, so queued: its socket.
fn queue_one(mode: Mode, addr: SocketAddr) -> TcpStream {
    match mode {
        Mode::Sni => {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(&build::client_hello(Some(NAME), 0))
                .expect("hello");
            s
        }
        Mode::Tls => handshake(addr).expect("handshake").sock,
    }
}

fn queued_clients_that_reset_give_their_place_back(mode: Mode) {
    let dir = TempDir::new(&format!("queuereset-{mode:?}"));
    let echo = Backend::start(echo());
    let ringlb = queued_frontend(&dir, mode, echo.addr, "timeout-queue = \"60s\"");
    let holder = hold(mode, ringlb.addr);
    let queued: Vec<TcpStream> = (0..5).map(|_| queue_one(mode, ringlb.addr)).collect();
    wait_family(&ringlb, "ringlb_frontend_queued", 5);
    for c in queued {
        reset(c);
    }
    // Well before the queue timeout: only the holder is left.
    wait_family(&ringlb, "ringlb_frontend_queued", 0);
    wait_active(&ringlb, 1);
    assert_eq!(family(&ringlb, "ringlb_backend_maxconn_slots_used"), 1);
    drop(holder);
    settled(&ringlb);
    let served = match mode {
        Mode::Sni => sni_client(ringlb.addr, 2),
        Mode::Tls => tls_client(ringlb.addr, 2),
    };
    assert_eq!(served, Outcome::Served, "{}", ringlb.logs());
    settled(&ringlb);
    // Only the holder and the last client reached the backend.
    assert_eq!(family(&ringlb, "ringlb_backend_connections_total"), 2);
    assert_eq!(family(&ringlb, "ringlb_frontend_queue_timeouts_total"), 0);
}

#[test]
fn sni_clients_that_reset_while_queued_give_their_place_back() {
    queued_clients_that_reset_give_their_place_back(Mode::Sni);
}

#[test]
fn tls_clients_that_reset_while_queued_give_their_place_back() {
    queued_clients_that_reset_give_their_place_back(Mode::Tls);
}

/// A terminated client sends its request and half-closes while queued: it
/// still wants the answer. (Found here: the watch on the queued client
/// saw its end of stream and nothing unread in the socket, since the TLS
/// receive had taken the request already, and reset it as gone.)
#[test]
fn a_tls_client_that_half_closes_while_queued_is_still_served() {
    let dir = TempDir::new("queuefin");
    let echo = Backend::start(echo());
    let ringlb = queued_frontend(&dir, Mode::Tls, echo.addr, "timeout-queue = \"60s\"");
    let holder = hold(Mode::Tls, ringlb.addr);
    let mut tls = handshake(ringlb.addr).expect("handshake");
    wait_family(&ringlb, "ringlb_frontend_queued", 1);
    tls.write_all(b"request").expect("request");
    tls.flush().expect("flush");
    tls.sock.shutdown(Shutdown::Write).expect("half-close");
    // Nothing to wait on for "still queued": the reset came within a
    // millisecond of the end of stream, so half a second is ample.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        assert_eq!(
            family(&ringlb, "ringlb_frontend_queued"),
            1,
            "the half-closed client left the queue; logs:\n{}",
            ringlb.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(holder);
    let answer = read_end(&mut tls);
    assert_eq!(answer, Ok(b"request".to_vec()), "{}", ringlb.logs());
    settled(&ringlb);
}

#[test]
fn a_tls_client_timed_out_in_the_queue_is_reset_and_gives_everything_back() {
    let dir = TempDir::new("queuetimeout");
    let echo = Backend::start(echo());
    let ringlb = queued_frontend(&dir, Mode::Tls, echo.addr, "timeout-queue = \"500ms\"");
    let holder = hold(Mode::Tls, ringlb.addr);
    let mut tls = handshake(ringlb.addr).expect("handshake");
    tls.write_all(b"request").expect("request");
    tls.flush().expect("flush");
    assert_eq!(read_end(&mut tls.sock), Err(ErrorKind::ConnectionReset));
    wait_family(&ringlb, "ringlb_frontend_queue_timeouts_total", 1);
    wait_active(&ringlb, 1);
    drop(holder);
    settled(&ringlb);
}

// ---- The TLS relay ----

/// A corrupt record after the handshake: ringlb cannot carry the stream
/// on, so both peers are reset; a clean end to the client would pass the
/// part it got off as the whole. (Found here: the client got a FIN.)
#[test]
fn a_corrupt_record_after_the_handshake_resets_both_sides() {
    let dir = TempDir::new("corrupt");
    let (ends, ended) = mpsc::channel();
    let ends = std::sync::Mutex::new(ends);
    let echo = Backend::start(Arc::new(move |mut s: TcpStream| {
        let mut buf = [0u8; 4096];
        let end = loop {
            match s.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = s.write_all(&buf[..n]) {
                        break Err(e.kind());
                    }
                }
                Err(e) => break Err(e.kind()),
            }
        };
        let _ = ends.lock().map(|tx| tx.send(end));
    }));
    let ringlb = dir.start(&tls_config(&dir, &backend(echo.addr, None), ""));
    let mut tls = handshake(ringlb.addr).expect("handshake");
    assert!(tls_echo(&mut tls, 3, 1024).expect("served"));
    // An application-data record whose contents fail to decrypt.
    let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    record.extend((0..0x40u8).map(|i| i.wrapping_mul(37)));
    tls.sock.write_all(&record).expect("send");
    assert_eq!(
        read_end(&mut tls.sock),
        Err(ErrorKind::ConnectionReset),
        "{}",
        ringlb.logs()
    );
    let backend_end = ended.recv_timeout(WAIT).expect("the backend's end");
    assert_eq!(backend_end, Err(ErrorKind::ConnectionReset));
    settled(&ringlb);
}

// ---- Floods ----

/// 2,000 clients each send half a ClientHello and idle, before an SNI
/// frontend (its hello stage) or a TLS-terminating one (its handshake).
/// ringlb's memory stays bounded, another client is served meanwhile, and
/// every one of them is reset at the stage's timeout and counted; the
/// gauges go back to zero.
fn half_hello_flood(mode: Mode, per_client_kib: u64) {
    const FLOOD: u64 = 2000;
    raise_fd_limit();
    let dir = TempDir::new(&format!("flood-{mode:?}"));
    let echo = Backend::start(echo());
    let backends = backend(echo.addr, None);
    let (config, late) = match mode {
        Mode::Sni => (
            sni_config(&backends, "timeout-client-hello = \"8s\""),
            r#"ringlb_frontend_client_hello_refused_total{frontend="f",reason="timeout"}"#,
        ),
        Mode::Tls => (
            tls_config_with(&dir, &backends, ", handshake-timeout = \"8s\"", ""),
            r#"ringlb_tls_handshake_failures_total{frontend="f",reason="timeout"}"#,
        ),
    };
    let ringlb = dir.start(&config);
    let pid = ringlb.child.id();
    let client = |seed| match mode {
        Mode::Sni => sni_client(ringlb.addr, seed),
        Mode::Tls => tls_client(ringlb.addr, seed),
    };
    assert_eq!(client(1), Outcome::Served);
    settled(&ringlb);
    let before = rss_kib(pid);
    let hello = build::client_hello(Some(NAME), 0);
    let started = Instant::now();
    let flood: Vec<TcpStream> = (0..FLOOD)
        .map(|_| {
            let mut c = TcpStream::connect(ringlb.addr).expect("connect");
            c.write_all(&hello[..hello.len() / 2])
                .expect("half a hello");
            c
        })
        .collect();
    wait_active(&ringlb, FLOOD);
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "the flood took {:?}, past the timeout: the test proves nothing",
        started.elapsed()
    );
    let grown = rss_kib(pid).saturating_sub(before);
    eprintln!("{mode:?}: {FLOOD} half hellos: ringlb grew by {grown} KiB");
    assert!(grown < FLOOD * per_client_kib, "grew by {grown} KiB");
    assert_eq!(client(2), Outcome::Served);
    for (i, mut c) in flood.into_iter().enumerate() {
        c.set_read_timeout(Some(WAIT)).unwrap();
        assert_eq!(
            read_end(&mut c),
            Err(ErrorKind::ConnectionReset),
            "client {i}"
        );
    }
    wait_family(&ringlb, late, FLOOD);
    settled(&ringlb);
    assert_eq!(family(&ringlb, "ringlb_backend_connections_total"), 2);
}

/// About 4.5 KiB each were measured (a hello buffer, a slab entry).
#[test]
fn a_flood_of_half_hellos_is_bounded_served_around_and_reset_at_the_timeout() {
    half_hello_flood(Mode::Sni, 12);
}

/// About 24 KiB each were measured (receive buffers, rustls state).
#[test]
fn a_flood_of_half_handshakes_is_bounded_served_around_and_reset_at_the_timeout() {
    half_hello_flood(Mode::Tls, 64);
}

// ---- Out of fds ----

/// Clients connected now, in threads: each runs `client` once `go` says.
fn clients_in_threads(
    addr: SocketAddr,
    n: u64,
    first_seed: u64,
    client: fn(TcpStream, u64) -> Outcome,
) -> (Vec<JoinHandle<Outcome>>, Vec<mpsc::Sender<()>>) {
    let mut threads = Vec::new();
    let mut gos = Vec::new();
    for i in 0..n {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let (go, wait) = mpsc::channel::<()>();
        gos.push(go);
        threads.push(spawn(move || {
            let _ = wait.recv();
            client(sock, first_seed + i)
        }));
    }
    (threads, gos)
}

fn tls_on(sock: TcpStream, seed: u64) -> Outcome {
    outcome(handshake_on(sock).and_then(|mut tls| tls_echo(&mut tls, seed, 32 * 1024)))
}

fn sni_on(mut sock: TcpStream, seed: u64) -> Outcome {
    outcome(sni_echo(&mut sock, seed, SNI_LEN))
}

fn go(gos: Vec<mpsc::Sender<()>>) {
    for g in gos {
        let _ = g.send(());
    }
}

/// Out of fds with a TLS-terminating frontend: clients whose handshake
/// completes cannot get a backend socket and wait (the connect timeout is
/// long); clients that come meanwhile wait in the accept queue. Once fds
/// are back every one is served, byte for byte, and the gauges settle.
#[test]
fn out_of_fds_a_tls_frontend_holds_its_clients_and_recovers() {
    raise_fd_limit();
    let dir = TempDir::new("fdtls");
    let echo = Backend::start(echo());
    // A frontend maxconn below the accept queue's length keeps the worker
    // on accept4(2), which sees the fd limit as it is now (a multishot
    // accept keeps the one it was armed with).
    let extra = "connect-timeout = \"30s\"\nmaxconn = 100";
    let config = tls_config(&dir, &backend(echo.addr, Some(100)), extra);
    let ringlb = dir.start(&config);
    let pid = ringlb.child.id();
    assert_eq!(tls_client(ringlb.addr, 1), Outcome::Served);
    settled(&ringlb);
    let (mut threads, gos) = clients_in_threads(ringlb.addr, 8, 10, tls_on);
    wait_active(&ringlb, 8);
    out_of_fds(pid);
    // No scrape from here on: the stats server needs fds too.
    let (late, late_gos) = clients_in_threads(ringlb.addr, 4, 20, tls_on);
    threads.extend(late);
    go(gos);
    go(late_gos);
    let waiting = "waits for an fd for its backend socket";
    let waited = ringlb.wait_log_count(waiting, 8, WAIT).is_some()
        && ringlb.wait_log("accept on", WAIT).is_some();
    set_soft_nofile(pid, 20_000);
    assert!(waited, "not out of fds; logs:\n{}", ringlb.logs());
    for (i, t) in threads.into_iter().enumerate() {
        let got = t.join().expect("client thread");
        assert_eq!(got, Outcome::Served, "client {i}; logs:\n{}", ringlb.logs());
    }
    settled(&ringlb);
    assert_eq!(
        family(&ringlb, "ringlb_frontend_local_errors_total"),
        0,
        "{}",
        ringlb.logs()
    );
    assert_eq!(tls_client(ringlb.addr, 2), Outcome::Served);
    settled(&ringlb);
}

/// Out of fds with an SNI frontend, past the connect timeout: routed
/// clients that get no backend socket in time are reset (after their
/// hello was read: never a clean end), and counted as local errors;
/// clients that came meanwhile wait in the accept queue and are served
/// exactly once fds are back. A later client is served and the gauges
/// settle.
#[test]
fn out_of_fds_an_sni_frontend_resets_past_the_connect_timeout_and_recovers() {
    raise_fd_limit();
    let dir = TempDir::new("fdsni");
    let echo = Backend::start(echo());
    let extra = "connect-timeout = \"1s\"\nmaxconn = 100";
    let config = sni_config(&backend(echo.addr, Some(100)), extra);
    let ringlb = dir.start(&config);
    let pid = ringlb.child.id();
    assert_eq!(sni_client(ringlb.addr, 1), Outcome::Served);
    settled(&ringlb);
    let (early, gos) = clients_in_threads(ringlb.addr, 6, 10, sni_on);
    wait_active(&ringlb, 6);
    out_of_fds(pid);
    let (late, late_gos) = clients_in_threads(ringlb.addr, 3, 20, sni_on);
    go(gos);
    go(late_gos);
    // The fds come back only once every early client has its outcome.
    let outcomes: Vec<Outcome> = early
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    let waited = ringlb.wait_log("accept on", WAIT).is_some();
    set_soft_nofile(pid, 20_000);
    assert!(waited, "accept never failed; logs:\n{}", ringlb.logs());
    for (i, got) in outcomes.iter().enumerate() {
        assert_eq!(got, &Outcome::Reset, "client {i}; logs:\n{}", ringlb.logs());
    }
    for (i, t) in late.into_iter().enumerate() {
        let got = t.join().expect("client thread");
        assert_eq!(
            got,
            Outcome::Served,
            "late client {i}; logs:\n{}",
            ringlb.logs()
        );
    }
    assert!(ringlb.count_logs("cannot create a backend socket") > 0);
    settled(&ringlb);
    assert_eq!(family(&ringlb, "ringlb_frontend_local_errors_total"), 6);
    assert_eq!(sni_client(ringlb.addr, 2), Outcome::Served);
    settled(&ringlb);
}

/// Serves one client in `mode` and keeps its connection open: the
/// outcome, and what holds the connection.
fn served_and_held(mode: Mode, addr: SocketAddr, seed: u64) -> (Outcome, Option<Holder>) {
    let run = || -> std::io::Result<(bool, Holder)> {
        match mode {
            Mode::Sni => {
                let mut s = TcpStream::connect(addr)?;
                s.set_read_timeout(Some(WAIT))?;
                Ok((sni_echo(&mut s, seed, SNI_LEN)?, Holder(Box::new(s))))
            }
            Mode::Tls => {
                let mut tls = handshake(addr)?;
                Ok((tls_echo(&mut tls, seed, 1024)?, Holder(Box::new(tls))))
            }
        }
    };
    match run() {
        Ok((exact, holder)) => (outcome(Ok(exact)), Some(holder)),
        Err(e) => (outcome(Err(e)), None),
    }
}

/// Started with `prlimit --nofile=128`: the clients past the connection
/// limit that RLIMIT_NOFILE sets wait in the kernel's accept queue (their
/// hello or handshake unanswered), none is reset or closed; as the served
/// ones leave, every waiting one is served exactly; the gauges settle.
fn at_the_fd_derived_limit(mode: Mode) {
    raise_fd_limit();
    let dir = TempDir::new(&format!("nofile-{mode:?}"));
    let echo = Backend::start(echo());
    let backends = backend(echo.addr, Some(1000));
    let config = match mode {
        Mode::Sni => sni_config(&backends, ""),
        Mode::Tls => tls_config(&dir, &backends, ""),
    };
    let args = dir.args(&config);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ringlb = Ringlb::start_command(ringlb_with_nofile(128, &args));
    let limit = ringlb.metric("ringlb_connection_limit ").expect("limit");
    assert!((10..64).contains(&limit), "limit {limit}");
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let addr = ringlb.addr;
    let threads: Vec<JoinHandle<Outcome>> = (0..limit + 20)
        .map(|seed| {
            let (served, gate) = (Arc::clone(&served), Arc::clone(&gate));
            spawn(move || {
                let (got, holder) = served_and_held(mode, addr, seed);
                served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (open, opened) = &*gate;
                let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
                while !*open {
                    open = opened.wait(open).unwrap_or_else(|e| e.into_inner());
                }
                drop(holder);
                got
            })
        })
        .collect();
    let at_limit = || served.load(std::sync::atomic::Ordering::SeqCst) == limit;
    assert!(eventually(WAIT, at_limit), "{}", ringlb.logs());
    assert!(
        ringlb.wait_log("at the connection limit", WAIT).is_some(),
        "{}",
        ringlb.logs()
    );
    assert_eq!(family(&ringlb, "ringlb_connections_active"), limit);
    // The rest wait: none was answered, reset or closed.
    assert!(at_limit(), "a client past the limit got an answer");
    {
        let (open, opened) = &*gate;
        *open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        opened.notify_all();
    }
    for (i, t) in threads.into_iter().enumerate() {
        let got = t.join().expect("client thread");
        assert_eq!(got, Outcome::Served, "client {i}; logs:\n{}", ringlb.logs());
    }
    settled(&ringlb);
    assert_eq!(
        family(&ringlb, "ringlb_backend_connections_total"),
        limit + 20
    );
    assert_eq!(ringlb.count_logs("backend socket"), 0, "{}", ringlb.logs());
    assert_eq!(ringlb.count_logs("accept on"), 0, "{}", ringlb.logs());
}

#[test]
fn at_the_fd_derived_limit_sni_clients_wait_and_are_all_served() {
    at_the_fd_derived_limit(Mode::Sni);
}

#[test]
fn at_the_fd_derived_limit_tls_clients_wait_and_are_all_served() {
    at_the_fd_derived_limit(Mode::Tls);
}

// ---- Backends that refuse the replayed hello ----

/// A route's backend (maxconn 1) that resets each connection once the
/// replayed hello arrives, and one that refuses connects: every client is
/// reset, and the slot comes back each time (a lost slot would queue the
/// next client).
#[test]
fn backends_refusing_after_the_replayed_hello_give_their_slot_back() {
    let dir = TempDir::new("refusing");
    let resetting = Backend::start(Arc::new(|mut s: TcpStream| {
        let mut buf = [0u8; 4096];
        if s.read(&mut buf).is_ok_and(|n| n > 0) {
            reset(s);
        }
    }));
    for (label, addr) in [("resets", resetting.addr), ("refuses", refused_addr())] {
        let ringlb = dir.start(&sni_config(
            &backend(addr, Some(1)),
            "timeout-queue = \"60s\"\nretries = 1",
        ));
        for round in 0..4 {
            let mut c = ringlb.connect();
            c.write_all(&build::client_hello(Some(NAME), 0))
                .expect("hello");
            let end = read_end(&mut c);
            assert_eq!(
                end,
                Err(ErrorKind::ConnectionReset),
                "{label} round {round}"
            );
            settled(&ringlb);
        }
    }
}

// ---- A reload while queued ----

/// Writes its name and a newline, then echoes.
fn named_echo(name: &'static str) -> Handler {
    Arc::new(move |mut s: TcpStream| {
        if s.write_all(format!("{name}\n").as_bytes()).is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            if s.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    })
}

/// Sends a hello for `name` and reads the backend's name line.
fn routed_to(stream: &mut TcpStream, name: &str) -> std::io::Result<String> {
    stream.write_all(&build::client_hello(Some(name), 0))?;
    name_line(stream)
}

/// A queued client keeps the route its server name chose when a reload
/// reorders the routes. (Found here: the queue kept the route's index,
/// which named another route in the new snapshot, so the client went to
/// the backends of a name it never asked for.)
#[test]
fn a_reload_that_reorders_routes_keeps_queued_clients_on_their_route() {
    let dir = TempDir::new("reorder");
    let www = Backend::start(named_echo("www"));
    let api = Backend::start(named_echo("api"));
    let routes = |first: (&str, SocketAddr, u32), second: (&str, SocketAddr, u32)| {
        let route = |(name, addr, maxconn): (&str, SocketAddr, u32)| {
            format!(
                "[[frontend.route]]\nname = \"{name}\"\nsni = [\"{name}.foobar.com\"]\n\
                 backends = [ {{ address = \"{addr}\", name = \"{name}\", maxconn = {maxconn} }} ]\n"
            )
        };
        format!(
            "workers = 1\n[[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:0\"\n\
             check-interval = \"1h\"\ntimeout-queue = \"60s\"\n{}{}",
            route(first),
            route(second)
        )
    };
    let ringlb = dir.start(&routes(("www", www.addr, 1), ("api", api.addr, 100)));
    let mut holder = ringlb.connect();
    assert_eq!(
        routed_to(&mut holder, "www.foobar.com").expect("www"),
        "www"
    );
    let mut queued = ringlb.connect();
    queued
        .write_all(&build::client_hello(Some("www.foobar.com"), 0))
        .expect("hello");
    wait_family(&ringlb, "ringlb_frontend_queued", 1);
    std::fs::write(
        dir.path("ringlb.toml"),
        routes(("api", api.addr, 100), ("www", www.addr, 1)),
    )
    .expect("rewrite the config");
    ringlb.signal(libc::SIGHUP);
    let line = ringlb.wait_log("reload 1 ", WAIT);
    assert!(
        line.as_deref().is_some_and(|l| l.contains("applied")),
        "{line:?}; logs:\n{}",
        ringlb.logs()
    );
    drop(holder);
    assert_eq!(name_line(&mut queued).expect("served"), "www");
    drop(queued);
    settled(&ringlb);
}

/// Reads the backend's name line.
fn name_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

/// Two routes, each over one backend with maxconn 1, both full: a client
/// queued for one route does not hold back a client of the other route
/// queued behind it once that route has room. (Found here: the queue was
/// served strictly in order per frontend and stopped at its first full
/// client, so the second one waited for a slot of a backend it would
/// never use, up to timeout-queue.)
#[test]
fn a_client_queued_for_a_full_route_does_not_hold_back_another_route() {
    let dir = TempDir::new("hol");
    let www = Backend::start(named_echo("www"));
    let api = Backend::start(named_echo("api"));
    let route = |name: &str, addr: SocketAddr| {
        format!(
            "[[frontend.route]]\nname = \"{name}\"\nsni = [\"{name}.foobar.com\"]\n\
             backends = [ {{ address = \"{addr}\", name = \"{name}\", maxconn = 1 }} ]\n"
        )
    };
    let config = format!(
        "workers = 1\n[[frontend]]\nname = \"f\"\nlisten = \"127.0.0.1:0\"\n\
         check-interval = \"1h\"\ntimeout-queue = \"60s\"\n{}{}",
        route("www", www.addr),
        route("api", api.addr)
    );
    let ringlb = dir.start(&config);
    let mut hold_www = ringlb.connect();
    assert_eq!(
        routed_to(&mut hold_www, "www.foobar.com").expect("www"),
        "www"
    );
    let mut hold_api = ringlb.connect();
    assert_eq!(
        routed_to(&mut hold_api, "api.foobar.com").expect("api"),
        "api"
    );
    let mut first = ringlb.connect();
    first
        .write_all(&build::client_hello(Some("www.foobar.com"), 0))
        .expect("hello");
    wait_family(&ringlb, "ringlb_frontend_queued", 1);
    let mut second = ringlb.connect();
    second
        .write_all(&build::client_hello(Some("api.foobar.com"), 0))
        .expect("hello");
    wait_family(&ringlb, "ringlb_frontend_queued", 2);
    drop(hold_api);
    assert_eq!(
        name_line(&mut second).map_err(|e| e.kind()),
        Ok("api".to_string()),
        "{}",
        ringlb.logs()
    );
    assert_eq!(family(&ringlb, "ringlb_frontend_queued"), 1);
    drop(hold_www);
    assert_eq!(name_line(&mut first).expect("www"), "www");
    drop((first, second));
    settled(&ringlb);
    assert_eq!(family(&ringlb, "ringlb_frontend_queue_timeouts_total"), 0);
}
