//! Terminated TLS connections at their edges, over real sockets against
//! the real binary: half-closed ones honour `timeout-client-fin` and
//! `timeout-server-fin` (ended for the same reason as a plain relay), an
//! idle one the idle timeout, with a plain backend and with `backend-tls`;
//! and `tls-min-version`, the alias of the tls table's `min-version`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// A temp dir with a CA and certificates it signed (the openssl CLI).
struct Pki(PathBuf);

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("ringlb-tlsedge-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let pki = Pki(dir);
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ringlb edge test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        pki.issue("www", "www.foobar.com");
        pki.issue("inner", "inner.local");
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(&self.0)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `file`.pem and `file`.key: a leaf certificate for `dns`.
    fn issue(&self, file: &str, dns: &str) {
        let ext = format!("{file}.ext");
        std::fs::write(
            self.0.join(&ext),
            format!("subjectAltName=DNS:{dns}\nbasicConstraints=CA:FALSE\n"),
        )
        .expect("extensions");
        let (key, csr, pem) = (
            format!("{file}.key"),
            format!("{file}.csr"),
            format!("{file}.pem"),
        );
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={dns}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().to_string()
    }

    fn dir(&self) -> &Path {
        &self.0
    }
}

/// How a test's backend is reached.
#[derive(Clone, Copy, Debug)]
enum Hop {
    Plain,
    /// `backend-tls = true`: ringlb re-encrypts to a rustls server.
    Tls,
}

/// ringlb with one terminating frontend `https` in front of `backend`
/// (access log on, checks rare: a check is no connection under test).
fn start(pki: &Pki, backend: &Backend, hop: Hop, tls_extra: &str, extra: &str) -> Ringlb {
    let backend_tls = match hop {
        Hop::Plain => String::new(),
        Hop::Tls => format!(
            "backend-tls = true\nbackend-ca = \"{}\"\nbackend-server-name = \"inner.local\"\n",
            pki.path("ca.pem")
        ),
    };
    let config = format!(
        "workers = 1\nstats = \"127.0.0.1:0\"\n[[frontend]]\nname = \"https\"\n\
         listen = \"127.0.0.1:0\"\nbackends = [\"{}\"]\nlog = true\n\
         check-interval = \"1h\"\n{backend_tls}{extra}\n\
         tls = {{ cert = \"{}\", key = \"{}\"{tls_extra} }}\n",
        backend.addr,
        pki.path("www.pem"),
        pki.path("www.key"),
    );
    let path = pki.dir().join("ringlb.toml");
    std::fs::write(&path, config).expect("write config");
    Ringlb::start_raw(&["--config", path.to_str().expect("utf-8")])
}

fn roots(pki: &Pki) -> rustls::RootCertStore {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(pki.path("ca.pem")).expect("ca") {
        roots.add(cert.expect("ca cert")).expect("add ca");
    }
    roots
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A rustls client of ringlb, handshaken (www.foobar.com).
fn client(pki: &Pki, ringlb: &Ringlb) -> TlsClient {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots(pki))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("www.foobar.com").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let sock = ringlb.connect();
    sock.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("handshake");
    }
    tls
}

/// What a backend does with one connection, whichever hop it is behind.
type Script = Arc<dyn Fn(&mut dyn Stream) + Send + Sync>;

/// A backend stream, plain or TLS: reads, writes, and ends its own half.
trait Stream: Read + Write {
    fn end(&mut self);
}

impl Stream for TcpStream {
    fn end(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Stream for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn end(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

/// A backend that runs `script` on each connection, plain or TLS
/// (certificate `inner.local`).
fn backend(pki: &Pki, hop: Hop, script: Script) -> Backend {
    match hop {
        Hop::Plain => Backend::start(Arc::new(move |mut s: TcpStream| script(&mut s))),
        Hop::Tls => {
            use rustls::pki_types::pem::PemObject;
            let chain: Vec<_> =
                rustls::pki_types::CertificateDer::pem_file_iter(pki.path("inner.pem"))
                    .expect("cert")
                    .map(|c| c.expect("cert"))
                    .collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path("inner.key"))
                .expect("key");
            let config = Arc::new(
                rustls::ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_no_client_auth()
                    .with_single_cert(chain, key)
                    .expect("server config"),
            );
            Backend::start(Arc::new(move |s: TcpStream| {
                let Ok(conn) = rustls::ServerConnection::new(Arc::clone(&config)) else {
                    return;
                };
                script(&mut rustls::StreamOwned::new(conn, s));
            }))
        }
    }
}

/// Reads until the peer's end (FIN or close_notify) or an error; the
/// bytes read.
fn read_all(s: &mut dyn Stream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Waits, silent and open, until `stop` (or a minute: every load is
/// bounded).
fn hold(stop: &AtomicBool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !stop.load(SeqCst) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The client's end, as a TLS client sees it: close_notify, a FIN
/// without close_notify (rustls: UnexpectedEof) or a reset.
fn read_to_end(tls: &mut TlsClient) -> Result<Vec<u8>, ErrorKind> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(got);
            }
            Err(e) => return Err(e.kind()),
        }
    }
}

fn access_line(ringlb: &Ringlb) -> String {
    ringlb
        .wait_log("frontend=https", WAIT)
        .unwrap_or_else(|| panic!("no access line; logs:\n{}", ringlb.logs()))
}

/// `timeout-server-fin`: the TLS client sends its request, then
/// close_notify and a FIN; the backend never answers nor closes. The
/// connection ends once it idled that long, as a plain one does.
fn server_fin(hop: Hop) {
    let pki = Pki::new(&format!("sfin-{hop:?}"));
    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::clone(&stop);
    let backend = backend(
        &pki,
        hop,
        Arc::new(move |s| {
            if !read_all(s).is_empty() {
                hold(&held);
            }
        }),
    );
    let ringlb = start(
        &pki,
        &backend,
        hop,
        "",
        "idle-timeout = \"5m\"\ntimeout-server-fin = \"1s\"",
    );
    let mut tls = client(&pki, &ringlb);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    tls.conn.send_close_notify();
    tls.flush().expect("flush");
    tls.sock.shutdown(Shutdown::Write).expect("FIN");
    let started = Instant::now();
    let got = read_to_end(&mut tls);
    let waited = started.elapsed();
    stop.store(true, SeqCst);
    assert_eq!(
        got,
        Ok(Vec::new()),
        "{hop:?}: not ended by server-fin; logs:\n{}",
        ringlb.logs()
    );
    let line = access_line(&ringlb);
    assert!(
        waited >= Duration::from_millis(900),
        "{hop:?}: after {waited:?}: {line}; logs:\n{}",
        ringlb.logs()
    );
    assert!(line.contains("end=server-fin-timeout"), "{hop:?}: {line}");
    assert!(line.contains("bytes_up=27 "), "{hop:?}: {line}");
    assert!(
        ringlb.wait_log("server-fin timeout", WAIT).is_some(),
        "{hop:?}: {}",
        ringlb.logs()
    );
}

/// `timeout-client-fin`: the backend answers and ends its stream (FIN, or
/// close_notify and FIN); the client reads it all and keeps its own half
/// open, idle. The connection ends once it idled that long.
fn client_fin(hop: Hop) {
    let pki = Pki::new(&format!("cfin-{hop:?}"));
    let backend = backend(
        &pki,
        hop,
        Arc::new(|s| {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(b"bye\n");
            s.end();
            // Until ringlb closes its side.
            read_all(s);
        }),
    );
    let ringlb = start(
        &pki,
        &backend,
        hop,
        "",
        "idle-timeout = \"5m\"\ntimeout-client-fin = \"1s\"",
    );
    let mut tls = client(&pki, &ringlb);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    tls.flush().expect("flush");
    let mut answer = String::new();
    tls.read_to_string(&mut answer)
        .expect("the answer, then close_notify");
    assert_eq!(answer, "bye\n");
    let answered = Instant::now();
    // The client's half stays open, idle, until ringlb gives up on it.
    let line = access_line(&ringlb);
    let waited = answered.elapsed();
    assert!(line.contains("end=client-fin-timeout"), "{hop:?}: {line}");
    assert!(
        waited >= Duration::from_millis(900),
        "{hop:?}: after {waited:?}"
    );
    assert!(
        ringlb.wait_log("client-fin timeout", WAIT).is_some(),
        "{hop:?}: {}",
        ringlb.logs()
    );
}

#[test]
fn a_terminated_client_half_closed_before_a_silent_backend_ends_at_server_fin() {
    server_fin(Hop::Plain);
}

#[test]
fn a_reencrypted_connection_half_closed_by_the_client_ends_at_server_fin() {
    server_fin(Hop::Tls);
}

#[test]
fn a_terminated_client_idling_after_the_backends_end_ends_at_client_fin() {
    client_fin(Hop::Plain);
}

#[test]
fn a_reencrypted_connection_ended_by_the_backend_ends_at_client_fin() {
    client_fin(Hop::Tls);
}

/// Neither side half-closed, both silent: the idle timeout ends a
/// terminated connection as it ends a plain one.
#[test]
fn an_idle_terminated_connection_ends_at_the_idle_timeout() {
    let pki = Pki::new("idle");
    let stop = Arc::new(AtomicBool::new(false));
    let held = Arc::clone(&stop);
    let backend = backend(&pki, Hop::Plain, Arc::new(move |_| hold(&held)));
    let ringlb = start(
        &pki,
        &backend,
        Hop::Plain,
        "",
        "idle-timeout = \"1s\"\ntimeout-client-fin = \"1h\"\ntimeout-server-fin = \"1h\"",
    );
    let mut tls = client(&pki, &ringlb);
    tls.write_all(b"hello").expect("send");
    tls.flush().expect("flush");
    let started = Instant::now();
    let got = read_to_end(&mut tls);
    stop.store(true, SeqCst);
    assert_eq!(got, Ok(Vec::new()), "logs:\n{}", ringlb.logs());
    assert!(started.elapsed() >= Duration::from_millis(900));
    let line = access_line(&ringlb);
    assert!(line.contains("end=idle-timeout"), "{line}");
}

/// `tls-min-version` is the tls table's `min-version` under the issue's
/// name: with "1.3", a TLS 1.2 client is refused and counted.
#[test]
fn tls_min_version_is_read_as_min_version() {
    let pki = Pki::new("minver");
    let backend = backend(
        &pki,
        Hop::Plain,
        Arc::new(|s| {
            let _ = s.write_all(b"hi");
            s.end();
        }),
    );
    let ringlb = start(
        &pki,
        &backend,
        Hop::Plain,
        ", tls-min-version = \"1.3\"",
        "",
    );
    let tls12 = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots(&pki))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("www.foobar.com").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(tls12), name).expect("client");
    let mut old = rustls::StreamOwned::new(conn, ringlb.connect());
    let mut buf = Vec::new();
    assert!(old.read_to_end(&mut buf).is_err(), "TLS 1.2 was accepted");
    let series = r#"ringlb_tls_handshake_failures_total{frontend="https",reason="negotiation"}"#;
    assert!(
        eventually(WAIT, || ringlb.metric(series) == Some(1)),
        "{series} = {:?}",
        ringlb.metric(series)
    );
    let mut tls13 = client(&pki, &ringlb);
    let mut answer = String::new();
    tls13.read_to_string(&mut answer).expect("TLS 1.3 served");
    assert_eq!(answer, "hi");
    assert_eq!(
        tls13.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

/// A client that sends its request, close_notify and its FIN at once,
/// while ringlb's handshake with a `backend-tls` backend is still under
/// way: the request must reach the backend whole, then the end. (The end
/// once overtook the request: the backend saw a close_notify in the
/// middle of its handshake, answered DecodeError, and the client a reset.)
#[test]
fn a_request_ended_at_once_reaches_a_tls_backend_before_its_end() {
    let pki = Pki::new("early-end");
    let backend = backend(
        &pki,
        Hop::Tls,
        Arc::new(|s| {
            let got = read_all(s);
            if !got.is_empty() {
                let _ = write!(s, "got {} bytes", got.len());
                s.end();
            }
        }),
    );
    let ringlb = start(&pki, &backend, Hop::Tls, "", "");
    for round in 0..5 {
        let mut tls = client(&pki, &ringlb);
        tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("request");
        tls.conn.send_close_notify();
        tls.flush().expect("flush");
        tls.sock.shutdown(Shutdown::Write).expect("FIN");
        let mut answer = String::new();
        let got = tls.read_to_string(&mut answer);
        assert!(
            got.is_ok() && answer == "got 27 bytes",
            "round {round}: {got:?} {answer:?}; logs:\n{}",
            ringlb.logs()
        );
    }
}
