//! SNI routing without terminating TLS: the ClientHello is read, the
//! connection routed by its server name, and the exact bytes replayed to
//! the backend; bad hellos are reset and counted. Over real sockets,
//! against the real binary, with openssl as a TLS client and server.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ringlb::hello::build;

/// A temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("ringlb-sni-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(dir: &TempDir, config: &str) -> Ringlb {
    let path = dir.file("ringlb.toml");
    std::fs::write(&path, config).expect("write config");
    let stats = "127.0.0.1:0";
    Ringlb::start_raw(&["--config", path.to_str().expect("utf-8"), "--stats", stats])
}

/// Writes its name and a newline, then echoes every byte: the client sees
/// which backend it reached and the bytes that backend received.
fn named_echo(name: &'static str) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        if stream.write_all(format!("{name}\n").as_bytes()).is_err() {
            return;
        }
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
    })
}

struct Routes {
    _default: Backend,
    _www: Backend,
    _wild: Backend,
    ringlb: Ringlb,
    _dir: TempDir,
}

/// A frontend with its own backend and two routes: `www` (an exact name)
/// and `wild` (`*.foobar.com`).
fn routes(tag: &str, extra: &str) -> Routes {
    let dir = TempDir::new(tag);
    let (default, www, wild) = (
        Backend::start(named_echo("default")),
        Backend::start(named_echo("www")),
        Backend::start(named_echo("wild")),
    );
    let config = format!(
        "workers = 1\n\
         [[frontend]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n\
         log = true\n{extra}\n\
         [[frontend.route]]\nname = \"www\"\nsni = [\"www.foobar.com\"]\nbackends = [\"{}\"]\n\
         [[frontend.route]]\nname = \"wild\"\nsni = [\"*.foobar.com\"]\nbackends = [\"{}\"]\n",
        default.addr, www.addr, wild.addr
    );
    let ringlb = start(&dir, &config);
    Routes {
        _default: default,
        _www: www,
        _wild: wild,
        ringlb,
        _dir: dir,
    }
}

/// Sends `hello` (in pieces of `piece` bytes, each its own segment) and
/// returns the backend's name and the bytes it echoed back.
fn exchange(addr: SocketAddr, hello: &[u8], piece: usize) -> (String, Vec<u8>) {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for part in hello.chunks(piece) {
        c.write_all(part).expect("send");
        if piece < hello.len() {
            // Each piece its own segment: the hello arrives in many reads.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while echoed(&got) < hello.len() {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e} after {} bytes", got.len()),
        }
    }
    let newline = got.iter().position(|b| *b == b'\n').expect("a name line");
    let name = String::from_utf8_lossy(&got[..newline]).to_string();
    (name, got[newline + 1..].to_vec())
}

fn echoed(got: &[u8]) -> usize {
    got.iter()
        .position(|b| *b == b'\n')
        .map_or(0, |i| got.len() - i - 1)
}

/// Reads until the connection ends: `Err` kind of a reset, or `Ok(bytes)`.
fn read_end(c: &mut TcpStream) -> Result<Vec<u8>, ErrorKind> {
    let mut got = Vec::new();
    match c.read_to_end(&mut got) {
        Ok(_) => Ok(got),
        Err(e) => Err(e.kind()),
    }
}

#[test]
fn names_route_exact_then_wildcard_then_default_and_bytes_are_replayed_exactly() {
    let r = routes("route", "");
    let addr = r.ringlb.addr;
    for (sni, expected) in [
        (Some("www.foobar.com"), "www"),
        (Some("WWW.FooBar.com"), "www"),
        (Some("img.foobar.com"), "wild"),
        (Some("a.b.foobar.com"), "wild"),
        (Some("foobar.com"), "default"),
        (Some("www.example.org"), "default"),
        (None, "default"),
    ] {
        let hello = build::client_hello(sni, 0);
        let (name, echo) = exchange(addr, &hello, hello.len());
        assert_eq!(name, expected, "{sni:?}");
        assert_eq!(echo, hello, "{sni:?}: the backend got other bytes");
    }
    let metric = |series: &str| r.ringlb.metric(series).unwrap_or(0);
    assert!(eventually(Duration::from_secs(10), || {
        metric(r#"ringlb_route_connections_total{frontend="tls",route="www"}"#) == 2
            && metric(r#"ringlb_route_connections_total{frontend="tls",route="wild"}"#) == 2
            && metric(r#"ringlb_route_connections_total{frontend="tls",route="default"}"#) == 3
            && metric(r#"ringlb_frontend_client_hello_no_sni_total{frontend="tls"}"#) == 1
    }));
    let line = r
        .ringlb
        .wait_log("route=wild sni=a.b.foobar.com", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no access line; logs:\n{}", r.ringlb.logs()));
    assert!(line.contains("backend=wild/127.0.0.1:"), "{line}");
    assert!(
        r.ringlb
            .wait_log("route=default sni=-", Duration::from_secs(10))
            .is_some()
    );
}

#[test]
fn a_hello_split_into_many_segments_and_records_is_still_routed() {
    let r = routes("split", "");
    // A large hello (post-quantum key shares are over 1 KiB), one byte per
    // segment.
    let hello = build::client_hello(Some("www.foobar.com"), 1800);
    let (name, echo) = exchange(r.ringlb.addr, &hello, 1);
    assert_eq!(name, "www");
    assert_eq!(echo, hello);
    // The same message fragmented over several TLS records, in pieces.
    let message = &hello[5..];
    let fragmented = build::records(message, 500);
    let (name, echo) = exchange(r.ringlb.addr, &fragmented, 333);
    assert_eq!(name, "www");
    assert_eq!(echo, fragmented);
}

/// A refused hello: the client sees a reset, the backend never a
/// connection, and the metric counts it under `reason`.
fn assert_refused(r: &Routes, reason: &str, n: u64, send: impl FnOnce(&mut TcpStream)) {
    let mut c = TcpStream::connect(r.ringlb.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    send(&mut c);
    let end = read_end(&mut c);
    assert_eq!(end, Err(ErrorKind::ConnectionReset), "{reason}");
    let series = format!(
        r#"ringlb_frontend_client_hello_refused_total{{frontend="tls",reason="{reason}"}}"#
    );
    assert!(
        eventually(Duration::from_secs(10), || r.ringlb.metric(&series)
            == Some(n)),
        "{series}: {:?}",
        r.ringlb.metric(&series)
    );
}

#[test]
fn malformed_oversized_and_cut_short_hellos_are_reset_and_counted() {
    let r = routes("bad", "");
    assert_refused(&r, "malformed", 1, |c| {
        c.write_all(b"GET / HTTP/1.1\r\nHost: www.foobar.com\r\n\r\n")
            .expect("send");
    });
    assert_refused(&r, "malformed", 2, |c| {
        let mut hello = build::client_hello(Some("www.foobar.com"), 0);
        hello[9] = 2; // a ServerHello
        c.write_all(&hello).expect("send");
    });
    assert_refused(&r, "malformed", 3, |c| {
        c.write_all(&build::client_hello(Some("bad\"name"), 0))
            .expect("send");
    });
    assert_refused(&r, "oversized", 1, |c| {
        // Refused from its header on: the rest need not be sent.
        let hello = build::client_hello(Some("www.foobar.com"), 20_000);
        c.write_all(&hello[..64]).expect("send");
    });
    assert_refused(&r, "closed", 1, |c| {
        let hello = build::client_hello(Some("www.foobar.com"), 0);
        c.write_all(&hello[..20]).expect("send");
        c.shutdown(std::net::Shutdown::Write).expect("half-close");
    });
    // Nothing reached a backend (health checks do connect: count routes).
    for route in ["default", "www", "wild"] {
        let series = format!(r#"ringlb_route_connections_total{{frontend="tls",route="{route}"}}"#);
        assert_eq!(r.ringlb.metric(&series), Some(0), "{route}");
    }
    let line = r
        .ringlb
        .wait_log("end=bad-hello", Duration::from_secs(10))
        .expect("access line");
    assert!(line.contains("backend=-"), "{line}");
}

#[test]
fn a_late_hello_is_reset_after_the_timeout() {
    let r = routes("late", "timeout-client-hello = \"500ms\"");
    let started = Instant::now();
    assert_refused(&r, "timeout", 1, |c| {
        let hello = build::client_hello(Some("www.foobar.com"), 0);
        c.write_all(&hello[..30]).expect("send");
    });
    assert!(started.elapsed() >= Duration::from_millis(450));
    // A client that says nothing at all is timed out the same way.
    assert_refused(&r, "timeout", 2, |_| {});
}

#[test]
fn without_own_backends_an_unmatched_name_is_refused() {
    let dir = TempDir::new("noown");
    let www = Backend::start(named_echo("www"));
    let config = format!(
        "workers = 1\n[[frontend]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\n\
         [[frontend.route]]\nname = \"www\"\nsni = [\"www.foobar.com\"]\nbackends = [\"{}\"]\n",
        www.addr
    );
    let ringlb = start(&dir, &config);
    let hello = build::client_hello(Some("www.foobar.com"), 0);
    let (name, _) = exchange(ringlb.addr, &hello, hello.len());
    assert_eq!(name, "www");
    for sni in [Some("other.example"), None] {
        let mut c = ringlb.connect();
        c.write_all(&build::client_hello(sni, 0)).expect("send");
        assert_eq!(read_end(&mut c), Err(ErrorKind::ConnectionReset), "{sni:?}");
    }
    let series = r#"ringlb_route_no_backend_total{frontend="tls",route="default"}"#;
    assert!(eventually(Duration::from_secs(10), || ringlb
        .metric(series)
        == Some(2)));
}

/// An `openssl s_server` with its own certificate for `name`; killed on
/// drop.
struct TlsServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={name}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

fn tls_server(dir: &Path, name: &str) -> TlsServer {
    let (cert, key) = certificate(dir, name);
    // A free port, taken back just before s_server binds it.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        eventually(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()),
        "s_server did not listen"
    );
    TlsServer { child, addr }
}

/// `openssl s_client -servername NAME`: the subject of the certificate the
/// server presented, once the handshake completed.
fn s_client(addr: SocketAddr, name: &str) -> String {
    let output = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(addr.to_string())
        .args(["-servername", name, "-brief"])
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("CONNECTION ESTABLISHED"),
        "no handshake for {name}:\n{text}"
    );
    text.lines()
        .find(|l| l.starts_with("Peer certificate:"))
        .unwrap_or("")
        .to_string()
}

#[test]
fn openssl_handshakes_complete_end_to_end_with_the_routed_backend() {
    let dir = TempDir::new("openssl");
    let www = tls_server(&dir.0, "www.foobar.com");
    let api = tls_server(&dir.0, "api.foobar.com");
    let config = format!(
        "workers = 1\n[[frontend]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\n\
         [[frontend.route]]\nname = \"www\"\nsni = [\"www.foobar.com\"]\nbackends = [\"{}\"]\n\
         [[frontend.route]]\nname = \"api\"\nsni = [\"*.foobar.com\"]\nbackends = [\"{}\"]\n",
        www.addr, api.addr
    );
    let ringlb = start(&dir, &config);
    let subject = s_client(ringlb.addr, "www.foobar.com");
    assert!(subject.contains("CN = www.foobar.com"), "{subject}");
    let subject = s_client(ringlb.addr, "api.foobar.com");
    assert!(subject.contains("CN = api.foobar.com"), "{subject}");
}
