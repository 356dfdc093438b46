//! The PROXY protocol over real sockets: what backends receive with
//! send-proxy (exact bytes, and as nginx understands them), health checks
//! with check-send-proxy, and accept-proxy: carried addresses, early bytes
//! kept, every refusal a reset that is counted.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const WAIT: Duration = Duration::from_secs(20);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ringlb-proxy-{tag}-{}", std::process::id()));
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

/// ringlb from a config file written into `dir`.
fn start_config(dir: &TempDir, name: &str, toml: &str) -> Ringlb {
    let path = dir.path(name);
    std::fs::write(&path, toml).expect("write config");
    Ringlb::start_raw(&["--config", path.to_str().expect("utf-8 path")])
}

/// A backend that reports, per connection, every byte it received before
/// the connection ended (health checks that send nothing are left out).
fn capture() -> (Backend, Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let backend = Backend::start(Arc::new(move |mut s: TcpStream| {
        let _ = s.set_read_timeout(Some(WAIT));
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(b"bye");
        if !got.is_empty() {
            let _ = tx.lock().expect("sender").send(got);
        }
    }));
    (backend, rx)
}

/// A client socket bound to `ip` (any of 127.0.0.0/8 works on loopback).
fn client_from(ip: &str, to: SocketAddr) -> TcpStream {
    let ip: IpAddr = ip.parse().expect("ip");
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    socket
        .bind(&SocketAddr::new(ip, 0).into())
        .expect("bind the client");
    socket.connect(&to.into()).expect("connect to ringlb");
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Sends `bytes`, ends the stream, and reads the answer to its end.
fn exchange(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(bytes)?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(answer)
}

fn v2_tcp4(client: SocketAddr, server: SocketAddr, command: u8) -> Vec<u8> {
    let (IpAddr::V4(c), IpAddr::V4(s)) = (client.ip(), server.ip()) else {
        panic!("IPv4 addresses expected");
    };
    let mut out = SIGNATURE.to_vec();
    out.extend_from_slice(&[command, 0x11, 0, 12]);
    out.extend_from_slice(&c.octets());
    out.extend_from_slice(&s.octets());
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&server.port().to_be_bytes());
    out
}

fn received(rx: &Receiver<Vec<u8>>) -> Vec<u8> {
    rx.recv_timeout(WAIT).expect("the backend received bytes")
}

#[test]
fn send_proxy_puts_the_client_address_before_the_first_client_byte() {
    for version in ["v1", "v2"] {
        let (backend, rx) = capture();
        let addr = backend.addr_str();
        let ringlb = Ringlb::start(&["--backend", &addr, "--send-proxy", version]);
        let mut client = client_from("127.0.0.2", ringlb.addr);
        let me = client.local_addr().expect("client address");
        let answer = exchange(&mut client, b"hello").expect("relayed");
        assert_eq!(answer, b"bye");
        let mut expected = match version {
            "v1" => format!(
                "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\n",
                me.port(),
                ringlb.addr.port()
            )
            .into_bytes(),
            _ => v2_tcp4(me, ringlb.addr, 0x21),
        };
        expected.extend_from_slice(b"hello");
        assert_eq!(received(&rx), expected, "{version}");
    }
}

#[test]
fn ipv6_clients_are_sent_as_tcp6_and_mapped_ipv4_clients_as_tcp4() {
    let (backend, rx) = capture();
    let addr = backend.addr_str();
    let ringlb = Ringlb::start_raw(&[
        "--listen",
        "[::1]:0",
        "--backend",
        &addr,
        "--send-proxy",
        "v1",
    ]);
    let mut client = client_from("::1", ringlb.addr);
    let me = client.local_addr().expect("client address");
    exchange(&mut client, b"six").expect("relayed");
    let expected = format!(
        "PROXY TCP6 ::1 ::1 {} {}\r\nsix",
        me.port(),
        ringlb.addr.port()
    );
    assert_eq!(String::from_utf8_lossy(&received(&rx)), expected);

    // A dual-stack listener sees an IPv4 client as ::ffff:127.0.0.2.
    let dual = Ringlb::start_raw(&[
        "--listen",
        "[::]:0",
        "--backend",
        &addr,
        "--send-proxy",
        "v2",
    ]);
    let port = dual.addr.port();
    let mut client = client_from("127.0.0.2", SocketAddr::from(([127, 0, 0, 1], port)));
    let me = client.local_addr().expect("client address");
    exchange(&mut client, b"four").expect("relayed");
    let mut expected = v2_tcp4(me, SocketAddr::from(([127, 0, 0, 1], port)), 0x21);
    expected.extend_from_slice(b"four");
    assert_eq!(received(&rx), expected);
}

#[test]
fn a_backend_table_sets_its_own_send_proxy() {
    let (with, with_rx) = capture();
    let (without, without_rx) = capture();
    let dir = TempDir::new("table");
    let ringlb = start_config(
        &dir,
        "ringlb.toml",
        &format!(
            "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\n  {{ address = \"{}\", send-proxy = \"v2\" }},\n  \"{}\",\n]\n",
            with.addr, without.addr
        ),
    );
    for _ in 0..2 {
        let mut client = ringlb.connect();
        exchange(&mut client, b"hi").expect("relayed");
    }
    let got = received(&with_rx);
    assert!(
        got.starts_with(SIGNATURE) && got.ends_with(b"hi"),
        "{got:?}"
    );
    assert_eq!(received(&without_rx), b"hi");
}

#[test]
fn checks_send_a_header_without_a_client_unless_told_not_to() {
    // As HAProxy: with send-proxy, checks to the traffic port send one too.
    let (backend, rx) = capture();
    let addr = backend.addr_str();
    let _ringlb = Ringlb::start(&[
        "--backend",
        &addr,
        "--send-proxy",
        "v1",
        "--check-interval",
        "200ms",
    ]);
    assert_eq!(received(&rx), b"PROXY UNKNOWN\r\n");

    let dir = TempDir::new("checks");
    let config = |backend: &Backend, extra: &str| {
        format!(
            "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\ncheck-interval = \"200ms\"\n{extra}\n",
            backend.addr
        )
    };
    let (backend, rx) = capture();
    let v2 = config(&backend, "send-proxy = \"v2\"\ncheck-send-proxy = true");
    let _ringlb = start_config(&dir, "v2.toml", &v2);
    assert_eq!(received(&rx), [SIGNATURE, &[0x20, 0, 0, 0]].concat());

    let (backend, rx) = capture();
    let off = config(&backend, "send-proxy = \"v2\"\ncheck-send-proxy = false");
    let _ringlb = start_config(&dir, "off.toml", &off);
    assert!(
        eventually(WAIT, || backend
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2),
        "checks ran"
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "check-send-proxy = false: checks send nothing"
    );
}

/// nginx with `listen ... proxy_protocol`, logging `$proxy_protocol_addr`;
/// stopped by its PID.
struct Nginx {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Nginx {
    fn start(dir: &TempDir) -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let port = refused_addr().port();
        let d = dir.0.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr';\n\
               server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n    access_log {d}/access.log pp;\n\
                 location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.path("nginx.conf"), conf).expect("nginx.conf");
        let child = Command::new(bin)
            .args(["-p", &d.to_string(), "-e", &format!("{d}/error.log")])
            .args(["-c", &format!("{d}/nginx.conf")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            child,
            port,
            log: dir.path("access.log"),
        };
        let up = eventually(WAIT, || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
                || matches!(nginx.child.try_wait(), Ok(Some(_)))
        });
        let error_log = std::fs::read_to_string(dir.path("error.log")).unwrap_or_default();
        assert!(
            up && matches!(nginx.child.try_wait(), Ok(None)),
            "nginx did not start: {error_log}"
        );
        Some(nginx)
    }

    fn log_line(&self, client_port: u16) -> Option<String> {
        let mut found = None;
        eventually(WAIT, || {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            found = log
                .lines()
                .find(|l| l.split(' ').nth(1) == Some(&client_port.to_string()))
                .map(str::to_string);
            found.is_some()
        });
        found
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nginx_behind_send_proxy_logs_the_real_client() {
    let dir = TempDir::new("nginx");
    let Some(nginx) = Nginx::start(&dir) else {
        eprintln!("SKIPPED: nginx is not installed (.ci/run installs it)");
        return;
    };
    let backend = format!("127.0.0.1:{}", nginx.port);
    for version in ["v1", "v2"] {
        let ringlb = Ringlb::start(&["--backend", &backend, "--send-proxy", version]);
        let mut client = client_from("127.0.0.2", ringlb.addr);
        let me = client.local_addr().expect("client address");
        let answer = exchange(&mut client, b"GET / HTTP/1.0\r\n\r\n").expect("relayed");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{version}: {answer}");
        let line = nginx.log_line(me.port());
        assert_eq!(
            line.as_deref(),
            Some(format!("127.0.0.2 {} 127.0.0.1", me.port()).as_str()),
            "{version}: nginx's log:\n{}",
            std::fs::read_to_string(&nginx.log).unwrap_or_default()
        );
    }
}

fn accepting(dir: &TempDir, extra: &str, backend: &Backend) -> Ringlb {
    start_config(
        dir,
        "accept.toml",
        &format!(
            "stats = \"127.0.0.1:0\"\n[[frontend]]\nname = \"edge\"\nlisten = \"127.0.0.1:0\"\n\
             backends = [\"{}\"]\naccept-proxy = true\nlog = true\n{extra}\n",
            backend.addr
        ),
    )
}

#[test]
fn accept_proxy_takes_the_carried_client_and_keeps_the_bytes_after_the_header() {
    let dir = TempDir::new("accept");
    let (backend, rx) = capture();
    let ringlb = accepting(
        &dir,
        // Checks without a header: they are not what this test captures.
        "accept-proxy-from = [\"127.0.0.0/8\"]\nsend-proxy = \"v1\"\ncheck-send-proxy = false",
        &backend,
    );
    // Header and payload in one write: the payload must not be lost.
    let mut client = client_from("127.0.0.1", ringlb.addr);
    let sent = b"PROXY TCP4 203.0.113.7 198.51.100.1 5555 443\r\nhello";
    assert_eq!(exchange(&mut client, sent).expect("relayed"), b"bye");
    assert_eq!(
        String::from_utf8_lossy(&received(&rx)),
        "PROXY TCP4 203.0.113.7 198.51.100.1 5555 443\r\nhello",
        "the carried addresses are sent on, the early bytes follow"
    );
    let line = ringlb
        .wait_log("frontend=edge", WAIT)
        .expect("an access log line");
    assert!(line.contains("client=203.0.113.7:5555"), "{line}");
    assert!(
        line.contains("bytes_up=5 ") && line.contains("end=done"),
        "{line}"
    );

    // A v2 header with TLVs, one byte per segment.
    let mut header = SIGNATURE.to_vec();
    let addrs = [198, 51, 100, 9, 192, 0, 2, 1, 0x30, 0x39, 0x01, 0xbb];
    let tlvs = [0x01, 0, 2, b'h', b'2', 0xea, 0, 3, 1, 2, 3];
    header.extend_from_slice(&[0x21, 0x11, 0, (addrs.len() + tlvs.len()) as u8]);
    header.extend_from_slice(&addrs);
    header.extend_from_slice(&tlvs);
    header.extend_from_slice(b"split");
    let mut client = client_from("127.0.0.1", ringlb.addr);
    for byte in &header {
        client.write_all(&[*byte]).expect("a byte");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(exchange(&mut client, b"!").expect("relayed"), b"bye");
    assert_eq!(
        String::from_utf8_lossy(&received(&rx)),
        "PROXY TCP4 198.51.100.9 192.0.2.1 12345 443\r\nsplit!"
    );

    // LOCAL (an upstream's health check) keeps the peer's own address.
    let mut client = client_from("127.0.0.3", ringlb.addr);
    let me = client.local_addr().expect("client address");
    let local = [SIGNATURE, &[0x20, 0, 0, 0], b"local"].concat();
    exchange(&mut client, &local).expect("relayed");
    assert_eq!(
        String::from_utf8_lossy(&received(&rx)),
        format!(
            "PROXY TCP4 127.0.0.3 127.0.0.1 {} {}\r\nlocal",
            me.port(),
            ringlb.addr.port()
        )
    );
    let refused = "ringlb_frontend_proxy_refused_total{frontend=\"edge\",reason=\"malformed\"}";
    assert_eq!(ringlb.metric(refused), Some(0));
}

/// Reads until the stream ends: `Err` is how a reset shows.
fn read_end(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    stream.read_to_end(&mut got).map(|_| got)
}

#[test]
fn bad_late_or_untrusted_headers_are_reset_and_counted_by_reason() {
    let dir = TempDir::new("refuse");
    let (backend, rx) = capture();
    let ringlb = accepting(
        &dir,
        "accept-proxy-from = [\"127.0.0.1\", \"::1\"]\ntimeout-proxy-header = \"300ms\"",
        &backend,
    );
    let mut oversized_v2 = SIGNATURE.to_vec();
    oversized_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let cases: [(&str, Vec<u8>, bool); 5] = [
        ("malformed", b"GET / HTTP/1.0\r\n\r\n".to_vec(), false),
        (
            "oversized",
            format!("PROXY TCP4 {}", "9".repeat(200)).into_bytes(),
            false,
        ),
        ("oversized", oversized_v2, false),
        ("version", [SIGNATURE, &[0x11, 0x11, 0, 0]].concat(), false),
        ("truncated", b"PROXY TCP4 1.2.".to_vec(), true),
    ];
    for (reason, bytes, end) in &cases {
        let mut client = client_from("127.0.0.1", ringlb.addr);
        client.write_all(bytes).expect("send");
        if *end {
            client.shutdown(Shutdown::Write).expect("half-close");
        }
        let got = read_end(&mut client);
        assert!(
            matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{reason}: {got:?}"
        );
    }
    // Late: part of a header, then nothing until the deadline.
    let mut client = client_from("127.0.0.1", ringlb.addr);
    client.write_all(b"PROXY TCP4").expect("send");
    let started = Instant::now();
    let got = read_end(&mut client);
    assert!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "timeout: {got:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Untrusted: a valid header from a peer not in accept-proxy-from.
    let mut client = client_from("127.0.0.2", ringlb.addr);
    // Reset at accept: the reset may reach the client before its write,
    // which then reports it (and the read after it sees only the end).
    let wrote = client.write_all(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nsneaky");
    let got = read_end(&mut client);
    let reset = |e: &std::io::Error| e.kind() == ErrorKind::ConnectionReset;
    assert!(
        matches!(&got, Err(e) if reset(e))
            || (matches!(&wrote, Err(e) if reset(e)) && matches!(&got, Ok(b) if b.is_empty())),
        "untrusted: {wrote:?} {got:?}"
    );
    for (reason, count) in [
        ("malformed", 1),
        ("oversized", 2),
        ("version", 1),
        ("truncated", 1),
        ("timeout", 1),
        ("untrusted", 1),
    ] {
        let series =
            format!("ringlb_frontend_proxy_refused_total{{frontend=\"edge\",reason=\"{reason}\"}}");
        assert!(
            eventually(WAIT, || ringlb.metric(&series) == Some(count)),
            "{series} = {:?}",
            ringlb.metric(&series)
        );
    }
    assert!(ringlb.wait_log("end=proxy-header", WAIT).is_some());
    assert!(
        ringlb
            .wait_log(
                "reset a connection from 127.0.0.2: it is not in accept-proxy-from",
                WAIT
            )
            .is_some(),
        "{}",
        ringlb.logs()
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "no refused byte reached the backend"
    );
}

#[test]
fn chained_balancers_pass_the_original_client_on() {
    let dir = TempDir::new("chain");
    let echo = Backend::start(echo());
    let inner = start_config(
        &dir,
        "inner.toml",
        &format!(
            "stats = \"127.0.0.1:0\"\n[[frontend]]\nname = \"inner\"\nlisten = \"127.0.0.1:0\"\n\
             backends = [\"{}\"]\naccept-proxy = true\naccept-proxy-from = [\"127.0.0.1\"]\nlog = true\n",
            echo.addr
        ),
    );
    let inner_addr = inner.addr.to_string();
    let outer = Ringlb::start(&[
        "--backend",
        &inner_addr,
        "--send-proxy",
        "v2",
        "--check-interval",
        "200ms",
    ]);
    let mut client = client_from("127.0.0.2", outer.addr);
    let me = client.local_addr().expect("client address");
    assert_eq!(exchange(&mut client, b"ping").expect("relayed"), b"ping");
    let line = inner
        .wait_log(&format!("client=127.0.0.2:{}", me.port()), WAIT)
        .unwrap_or_else(|| panic!("the inner balancer's access log:\n{}", inner.logs()));
    assert!(line.contains("bytes_up=4 bytes_down=4"), "{line}");
    // The outer balancer's checks (v2 LOCAL) are no refusals.
    assert!(inner.wait_log("frontend=inner", WAIT).is_some());
    let series = "ringlb_frontend_proxy_refused_total{frontend=\"inner\",reason=\"malformed\"}";
    assert_eq!(inner.metric(series), Some(0));
}

#[test]
fn accept_proxy_settings_are_checked() {
    let dir = TempDir::new("config");
    let check = |toml: &str| {
        let path = dir.path("check.toml");
        std::fs::write(&path, toml).expect("write");
        let out = Command::new(BIN)
            .args(["--config", path.to_str().expect("path"), "--check"])
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let head = "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:9\"]\n";
    let (code, err) = check(&format!("{head}accept-proxy = true\n"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(":4:") && err.contains("needs accept-proxy-from"),
        "{err}"
    );
    let (_, err) = check(&format!(
        "{head}accept-proxy = true\naccept-proxy-from = [\"10.0.0.1/8\"]\n"
    ));
    assert!(
        err.contains(":5:") && err.contains("write 10.0.0.0/8"),
        "{err}"
    );
    let (_, err) = check(&format!("{head}send-proxy = \"v3\"\n"));
    assert!(err.contains(":4:") && err.contains("v3"), "{err}");
    let (_, err) = check(&format!("{head}check-send-proxy = true\n"));
    assert!(err.contains("gets no PROXY header"), "{err}");
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
            "--accept-proxy",
        ])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--accept-proxy-from 0.0.0.0/0"), "{err}");
}

#[test]
fn the_source_acl_judges_the_carried_client_not_the_upstream() {
    let dir = TempDir::new("acl");
    let (backend, rx) = capture();
    // The upstream (127.0.0.1) is not in the allow list: only the clients
    // its headers name are.
    let ringlb = accepting(
        &dir,
        "accept-proxy-from = [\"127.0.0.1\"]\nallow = [\"198.51.100.0/24\"]",
        &backend,
    );
    let mut client = client_from("127.0.0.1", ringlb.addr);
    let allowed = b"PROXY TCP4 198.51.100.7 127.0.0.1 1000 80\r\nok";
    assert_eq!(exchange(&mut client, allowed).expect("served"), b"bye");
    assert_eq!(received(&rx), b"ok");
    let mut client = client_from("127.0.0.1", ringlb.addr);
    client
        .write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 1001 80\r\nno")
        .expect("send");
    let got = read_end(&mut client);
    assert!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{got:?}"
    );
    let series = "ringlb_frontend_refused_total{frontend=\"edge\",reason=\"acl\"}";
    assert_eq!(ringlb.metric(series), Some(1));
    let line = ringlb
        .wait_log("end=refused", WAIT)
        .unwrap_or_else(|| panic!("{}", ringlb.logs()));
    assert!(line.contains("client=203.0.113.9:1001"), "{line}");
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "nothing of the refused client reached the backend"
    );
}

/// accept-proxy before SNI routing, send-proxy after it: the carried
/// client's header goes first, then the exact ClientHello, whether the
/// hello came in the header's own segment or after it, in pieces.
#[test]
fn the_carried_header_goes_first_then_the_hello_that_routed() {
    let dir = TempDir::new("sni");
    let (default, default_rx) = capture();
    let (www, www_rx) = capture();
    let ringlb = start_config(
        &dir,
        "sni.toml",
        &format!(
            "[[frontend]]\nname = \"edge\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n\
             accept-proxy = true\naccept-proxy-from = [\"127.0.0.1\"]\nsend-proxy = \"v1\"\n\
             check-send-proxy = false\nlog = true\n\
             [[frontend.route]]\nname = \"www\"\nsni = [\"www.foobar.com\"]\n\
             backends = [\"{}\"]\n",
            default.addr, www.addr
        ),
    );
    let header = b"PROXY TCP4 203.0.113.9 198.51.100.1 4444 443\r\n".to_vec();
    let hello = ringlb::hello::build::client_hello(Some("www.foobar.com"), 0);
    let expected = [header.clone(), hello.clone()].concat();

    let mut client = client_from("127.0.0.1", ringlb.addr);
    assert_eq!(exchange(&mut client, &expected).expect("relayed"), b"bye");
    assert_eq!(received(&www_rx), expected, "one segment");

    let mut client = client_from("127.0.0.1", ringlb.addr);
    client.write_all(&header).expect("header");
    for piece in hello.chunks(50) {
        std::thread::sleep(Duration::from_millis(2));
        client.write_all(piece).expect("a piece of the hello");
    }
    assert_eq!(exchange(&mut client, b"").expect("relayed"), b"bye");
    assert_eq!(received(&www_rx), expected, "in pieces");
    assert!(default_rx.try_recv().is_err(), "routed by the hello's name");
    let line = ringlb
        .wait_log("route=www", WAIT)
        .unwrap_or_else(|| panic!("no access line; logs:\n{}", ringlb.logs()));
    assert!(line.contains("client=203.0.113.9:4444"), "{line}");
}

/// CRC-32C bit by bit (reflected, polynomial 0x82F63B78): written apart
/// from ringlb's, so the two cannot agree by sharing a mistake.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `header` (a v2 one) with a PP2_TYPE_CRC32C TLV appended and filled in.
fn with_crc32c(mut header: Vec<u8>) -> Vec<u8> {
    header.extend_from_slice(&[0x03, 0, 4, 0, 0, 0, 0]);
    let len = u16::try_from(header.len() - 16).expect("a short header");
    header[14..16].copy_from_slice(&len.to_be_bytes());
    let crc = crc32c(&header);
    let at = header.len() - 4;
    header[at..].copy_from_slice(&crc.to_be_bytes());
    header
}

/// The spec's PP2_TYPE_CRC32C: a header whose checksum matches is served;
/// one changed after its checksum was made (here its client port, as a
/// forger would) is reset, counted as a bad checksum, and nothing of it
/// reaches the backend.
#[test]
fn a_v2_header_failing_its_crc32c_is_reset_and_a_matching_one_is_served() {
    let dir = TempDir::new("crc");
    let (backend, rx) = capture();
    let ringlb = accepting(
        &dir,
        "accept-proxy-from = [\"127.0.0.1\"]\nsend-proxy = \"v1\"\ncheck-send-proxy = false",
        &backend,
    );
    let carried = v2_tcp4(
        "203.0.113.7:5555".parse().expect("client"),
        "198.51.100.1:443".parse().expect("server"),
        0x21,
    );
    let good = with_crc32c(carried);
    let mut client = client_from("127.0.0.1", ringlb.addr);
    let sent = [&good[..], b"hello"].concat();
    assert_eq!(exchange(&mut client, &sent).expect("relayed"), b"bye");
    assert_eq!(
        String::from_utf8_lossy(&received(&rx)),
        "PROXY TCP4 203.0.113.7 198.51.100.1 5555 443\r\nhello"
    );

    let mut forged = good.clone();
    forged[25] ^= 1;
    let mut client = client_from("127.0.0.1", ringlb.addr);
    client.write_all(&forged).expect("send");
    client.write_all(b"sneaky").expect("send");
    let got = read_end(&mut client);
    assert!(
        matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "a forged header: {got:?}; logs:\n{}",
        ringlb.logs()
    );
    let series = "ringlb_frontend_proxy_refused_total{frontend=\"edge\",reason=\"bad-checksum\"}";
    assert!(
        eventually(WAIT, || ringlb.metric(series) == Some(1)),
        "{series} = {:?}",
        ringlb.metric(series)
    );
    let malformed = "ringlb_frontend_proxy_refused_total{frontend=\"edge\",reason=\"malformed\"}";
    assert_eq!(ringlb.metric(malformed), Some(0));
    assert!(
        ringlb
            .wait_log("its PROXY header fails its CRC32C checksum", WAIT)
            .is_some(),
        "{}",
        ringlb.logs()
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "no byte of the forged connection reached the backend"
    );
}

/// HAProxy in front, sending `send-proxy-v2` with `proxy-v2-options
/// crc32c`: a real sender's checksum is accepted and its client carried.
#[test]
fn haproxy_sending_v2_with_crc32c_is_accepted() {
    let dir = TempDir::new("haproxy");
    let (backend, rx) = capture();
    let ringlb = accepting(
        &dir,
        "accept-proxy-from = [\"127.0.0.1\"]\nsend-proxy = \"v1\"\ncheck-send-proxy = false",
        &backend,
    );
    let Some(haproxy) = HaproxyFront::start(&dir, ringlb.addr) else {
        eprintln!("SKIPPED: haproxy is not installed (.ci/run installs it)");
        return;
    };
    let mut client = client_from("127.0.0.2", haproxy.addr);
    let me = client.local_addr().expect("client address");
    assert_eq!(exchange(&mut client, b"hello").expect("relayed"), b"bye");
    // The probe that saw HAProxy up went through too: skip its header.
    let ours = std::iter::from_fn(|| Some(received(&rx)))
        .find(|got| got.ends_with(b"hello"))
        .unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&ours),
        format!(
            "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\nhello",
            me.port(),
            haproxy.addr.port()
        )
    );
    let series = "ringlb_frontend_proxy_refused_total{frontend=\"edge\",reason=\"bad-checksum\"}";
    assert_eq!(ringlb.metric(series), Some(0));
}

/// HAProxy 2.6 (`mode tcp`) relaying to one server with a v2 header and
/// its CRC32C; stopped on drop.
struct HaproxyFront {
    child: Child,
    addr: SocketAddr,
}

impl HaproxyFront {
    fn start(dir: &TempDir, server: SocketAddr) -> Option<HaproxyFront> {
        let bin = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let addr = SocketAddr::new([127, 0, 0, 1].into(), refused_addr().port());
        let conf = format!(
            "global\n  maxconn 64\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\nlisten front\n  bind {addr}\n  \
             server ringlb {server} send-proxy-v2 proxy-v2-options crc32c\n"
        );
        let path = dir.path("haproxy.cfg");
        std::fs::write(&path, conf).expect("haproxy.cfg");
        let log = std::fs::File::create(dir.path("haproxy.log")).expect("haproxy.log");
        let child = Command::new(bin)
            .args(["-db", "-f", path.to_str().expect("utf-8 path")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        let mut front = HaproxyFront { child, addr };
        let up = eventually(WAIT, || {
            TcpStream::connect(addr).is_ok() || matches!(front.child.try_wait(), Ok(Some(_)))
        });
        assert!(
            up && matches!(front.child.try_wait(), Ok(None)),
            "haproxy did not start: {}",
            std::fs::read_to_string(dir.path("haproxy.log")).unwrap_or_default()
        );
        Some(front)
    }
}

impl Drop for HaproxyFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
