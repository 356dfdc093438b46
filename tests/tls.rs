//! TLS termination over real sockets, against the real binary: curl and
//! openssl as clients (TLS 1.2 and 1.3, ALPN, resumption, client
//! certificates), a rustls client for byte-exact bulk transfers, an
//! a rustls TLS backend behind `backend-tls`, certificate reload on SIGHUP.
//! Certificates are made by each test with the openssl CLI.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A temp dir with a CA and certificates made by the openssl CLI.
struct Pki(PathBuf);

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
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

const CA_CONFIG: &str = "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\n\
    serial = serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\n\
    copy_extensions = copy\n[p]\ncommonName = supplied\n";

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("ringlb-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("ca.cnf"), CA_CONFIG).expect("ca config");
        std::fs::write(dir.join("index.txt"), "").expect("index");
        std::fs::write(dir.join("serial"), "1000\n").expect("serial");
        let pki = Pki(dir);
        pki.self_signed("ca", "ringlb test CA");
        pki
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().to_string()
    }

    fn self_signed(&self, file: &str, cn: &str) {
        openssl(
            &self.0,
            &[
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
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{file}.key"),
                "-out",
                &format!("{file}.pem"),
            ],
        );
    }

    /// A certificate signed by the CA; `dns` its subjectAltName (none for
    /// a client), `dates` (start, end) as YYYYMMDDHHMMSSZ or valid now.
    fn issue(&self, file: &str, cn: &str, dns: Option<&str>, dates: Option<(&str, &str)>) {
        self.issue_key(
            file,
            cn,
            dns,
            dates,
            &["ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
        );
    }

    /// As `issue`, with the key made by `-newkey KEY...`.
    fn issue_key(
        &self,
        file: &str,
        cn: &str,
        dns: Option<&str>,
        dates: Option<(&str, &str)>,
        key: &[&str],
    ) {
        let mut req = vec!["req".to_string(), "-new".into(), "-newkey".into()];
        req.extend(key.iter().map(|k| k.to_string()));
        req.extend([
            "-nodes".into(),
            "-subj".into(),
            format!("/CN={cn}"),
            "-keyout".into(),
            format!("{file}.key"),
            "-out".into(),
            format!("{file}.csr"),
        ]);
        // An extension in each, so each is an X.509 v3 certificate (webpki
        // refuses v1).
        match dns {
            Some(dns) => req.extend(["-addext".into(), format!("subjectAltName=DNS:{dns}")]),
            None => req.extend(["-addext".into(), "extendedKeyUsage=clientAuth".into()]),
        }
        openssl(&self.0, &req.iter().map(String::as_str).collect::<Vec<_>>());
        let (start, end) = dates.unwrap_or(("", ""));
        let mut ca = vec![
            "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-in",
        ];
        let csr = format!("{file}.csr");
        let pem = format!("{file}.pem");
        ca.extend([csr.as_str(), "-out", pem.as_str()]);
        if dates.is_some() {
            ca.extend(["-startdate", start, "-enddate", end]);
        } else {
            ca.extend(["-days", "2"]);
        }
        openssl(&self.0, &ca);
    }
}

/// Answers one HTTP request with `backend:NAME` and closes.
fn http(name: &'static str) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let body = format!("backend:{name}");
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    })
}

/// Reads everything, then answers with the digest of what it read.
fn digester() -> Handler {
    Arc::new(|mut stream: TcpStream| {
        if let Ok(d) = read_digest(&mut stream) {
            let _ = write!(stream, "{} {}", d.hash, d.len);
        }
    })
}

/// Reads a 2-byte request, then sends `len` payload bytes from seed `len`
/// and ends its stream (reading first: a close with unread bytes resets).
fn source(len: u64) -> Handler {
    Arc::new(move |mut stream: TcpStream| {
        let mut request = [0u8; 2];
        if stream.read_exact(&mut request).is_ok() && send_payload(&mut stream, len, len).is_ok() {
            let _ = stream.shutdown(Shutdown::Write);
            let _ = stream.read_to_end(&mut Vec::new());
        }
    })
}

fn start(pki: &Pki, config: &str) -> Ringlb {
    let path = pki.0.join("ringlb.toml");
    std::fs::write(&path, config).expect("write config");
    Ringlb::start_raw(&[
        "--config",
        path.to_str().expect("utf-8"),
        "--stats",
        "127.0.0.1:0",
    ])
}

/// One terminating frontend in front of `backend`; `tls` is the inside of
/// its `tls = { ... }`, `extra` more frontend keys.
fn config(backend: SocketAddr, tls: &str, extra: &str) -> String {
    format!(
        "workers = 1\n[[frontend]]\nname = \"https\"\nlisten = \"127.0.0.1:0\"\n\
         backends = [\"{backend}\"]\nlog = true\ntls = {{ {tls} }}\n{extra}\n"
    )
}

fn curl(ringlb: &Ringlb, pki: &Pki, args: &[&str]) -> Output {
    let port = ringlb.addr.port();
    Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert", &pki.path("ca.pem")])
        .args(["--resolve", &format!("www.foobar.com:{port}:127.0.0.1")])
        .args(["--resolve", &format!("api.foobar.com:{port}:127.0.0.1")])
        .args(args)
        .output()
        .expect("curl")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

fn s_client(ringlb: &Ringlb, args: &[&str]) -> String {
    // The input arrives after the handshake's tickets: a TLS 1.3 session
    // is saved only once its ticket came.
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &ringlb.addr.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    let mut stdin = child.stdin.take().expect("stdin");
    std::thread::sleep(Duration::from_millis(500));
    let _ = stdin.write_all(b"GET / HTTP/1.0\r\n\r\n");
    drop(stdin);
    let out = wait_output(child);
    text(&out)
}

fn wait_output(child: Child) -> Output {
    child.wait_with_output().expect("wait")
}

fn www(pki: &Pki) -> String {
    pki.issue("www", "www.foobar.com", Some("www.foobar.com"), None);
    format!(
        "cert = \"{}\", key = \"{}\"",
        pki.path("www.pem"),
        pki.path("www.key")
    )
}

fn metric(ringlb: &Ringlb, series: &str) -> u64 {
    ringlb.metric(series).unwrap_or(0)
}

fn wait_metric(ringlb: &Ringlb, series: &str, value: u64) {
    assert!(
        eventually(Duration::from_secs(10), || metric(ringlb, series) == value),
        "{series} = {}, not {value}",
        metric(ringlb, series)
    );
}

#[test]
fn curl_gets_through_with_tls_1_2_and_1_3_and_the_handshakes_are_counted() {
    let pki = Pki::new("curl");
    let backend = Backend::start(http("plain"));
    let ringlb = start(&pki, &config(backend.addr, &www(&pki), ""));
    let port = ringlb.addr.port();
    let url = format!("https://www.foobar.com:{port}/");
    for version in [&["--tlsv1.3"][..], &["--tlsv1.2", "--tls-max", "1.2"]] {
        let mut args = version.to_vec();
        args.push(&url);
        let out = curl(&ringlb, &pki, &args);
        assert_eq!(text(&out), "backend:plain", "{version:?}");
    }
    wait_metric(
        &ringlb,
        r#"ringlb_tls_handshakes_total{frontend="https"}"#,
        2,
    );
    wait_metric(
        &ringlb,
        r#"ringlb_tls_handshakes_by_version_total{frontend="https",version="1.2"}"#,
        1,
    );
    wait_metric(
        &ringlb,
        r#"ringlb_tls_handshakes_by_version_total{frontend="https",version="1.3"}"#,
        1,
    );
    let line = ringlb
        .wait_log("frontend=https backend=127.0.0.1", Duration::from_secs(10))
        .expect("access line");
    assert!(line.contains("end=done"), "{line}");
    assert!(line.contains("route=default sni=www.foobar.com"), "{line}");
}

#[test]
fn several_certificates_are_chosen_by_name_with_the_first_as_default() {
    let pki = Pki::new("sni");
    let backend = Backend::start(http("plain"));
    let default = www(&pki);
    pki.issue("api", "api.foobar.com", Some("*.foobar.com"), None);
    let tls = format!(
        "{default}, certs = [{{ cert = \"{}\", key = \"{}\" }}]",
        pki.path("api.pem"),
        pki.path("api.key")
    );
    let ringlb = start(&pki, &config(backend.addr, &tls, ""));
    for (name, subject) in [
        ("www.foobar.com", "CN = www.foobar.com"),
        ("api.foobar.com", "CN = api.foobar.com"),
        ("other.example", "CN = www.foobar.com"),
    ] {
        let out = s_client(&ringlb, &["-servername", name, "-brief"]);
        assert!(out.contains("CONNECTION ESTABLISHED"), "{name}:\n{out}");
        let peer = out.lines().find(|l| l.starts_with("Peer certificate:"));
        assert!(peer.is_some_and(|l| l.contains(subject)), "{name}:\n{out}");
    }
}

#[test]
fn alpn_is_negotiated_and_min_version_refuses_older_clients() {
    let pki = Pki::new("alpn");
    let backend = Backend::start(http("plain"));
    let tls = format!(
        "{}, alpn = [\"h2\", \"http/1.1\"], min-version = \"1.3\"",
        www(&pki)
    );
    let ringlb = start(&pki, &config(backend.addr, &tls, ""));
    let out = s_client(
        &ringlb,
        &["-servername", "www.foobar.com", "-alpn", "http/1.1,h2"],
    );
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    let port = ringlb.addr.port();
    let url = format!("https://www.foobar.com:{port}/");
    let out = curl(&ringlb, &pki, &["--tlsv1.2", "--tls-max", "1.2", &url]);
    assert!(
        !out.status.success(),
        "TLS 1.2 was accepted: {}",
        text(&out)
    );
    wait_metric(
        &ringlb,
        r#"ringlb_tls_handshake_failures_total{frontend="https",reason="negotiation"}"#,
        1,
    );
}

/// Whether a second `s_client` with `version` resumes the first one's
/// session.
fn resumes(ringlb: &Ringlb, pki: &Pki, version: &str) -> bool {
    let session = pki.path("session.pem");
    let _ = std::fs::remove_file(&session);
    let name = ["-servername", "www.foobar.com", version];
    let first = s_client(ringlb, &[&name[..], &["-sess_out", &session]].concat());
    assert!(first.contains("New, TLSv1."), "{first}");
    if !Path::new(&session).exists() {
        return false;
    }
    let second = s_client(ringlb, &[&name[..], &["-sess_in", &session]].concat());
    assert!(second.contains(", TLSv1."), "{version}: {second}");
    second.contains("Reused, TLSv1.")
}

#[test]
fn sessions_resume_with_tickets_and_with_session_ids() {
    let pki = Pki::new("resume");
    let backend = Backend::start(http("plain"));
    let ringlb = start(&pki, &config(backend.addr, &www(&pki), ""));
    for (n, version) in ["-tls1_3", "-tls1_2"].iter().enumerate() {
        assert!(resumes(&ringlb, &pki, version), "{version} did not resume");
        wait_metric(
            &ringlb,
            r#"ringlb_tls_resumed_total{frontend="https"}"#,
            n as u64 + 1,
        );
    }
}

/// HAProxy's `no-tls-tickets` and `tune.ssl.cachesize 0`: without tickets
/// the session cache still resumes; without both nothing does.
#[test]
fn resumption_can_be_turned_off() {
    let pki = Pki::new("noresume");
    let backend = Backend::start(http("plain"));
    let no_tickets = format!("{}, tickets = false", www(&pki));
    let ringlb = start(&pki, &config(backend.addr, &no_tickets, ""));
    for version in ["-tls1_3", "-tls1_2"] {
        assert!(resumes(&ringlb, &pki, version), "cache only, {version}");
    }
    drop(ringlb);
    let neither = format!("{no_tickets}, session-cache = 0");
    let ringlb = start(&pki, &config(backend.addr, &neither, ""));
    for version in ["-tls1_3", "-tls1_2"] {
        assert!(!resumes(&ringlb, &pki, version), "neither, {version}");
    }
    assert_eq!(
        metric(&ringlb, r#"ringlb_tls_resumed_total{frontend="https"}"#),
        0
    );
}

#[test]
fn client_certificates_are_verified_when_a_client_ca_is_set() {
    let pki = Pki::new("mtls");
    let backend = Backend::start(http("plain"));
    pki.issue("client", "client", None, None);
    pki.issue(
        "expired",
        "old client",
        None,
        Some(("20200101000000Z", "20200102000000Z")),
    );
    pki.self_signed("stranger", "stranger");
    let tls = format!("{}, client-ca = \"{}\"", www(&pki), pki.path("ca.pem"));
    let ringlb = start(&pki, &config(backend.addr, &tls, ""));
    let port = ringlb.addr.port();
    let url = format!("https://www.foobar.com:{port}/");
    let ok = curl(
        &ringlb,
        &pki,
        &[
            "--cert",
            &pki.path("client.pem"),
            "--key",
            &pki.path("client.key"),
            &url,
        ],
    );
    assert_eq!(text(&ok), "backend:plain");
    for who in ["expired", "stranger"] {
        let out = curl(
            &ringlb,
            &pki,
            &[
                "--cert",
                &pki.path(&format!("{who}.pem")),
                "--key",
                &pki.path(&format!("{who}.key")),
                &url,
            ],
        );
        assert!(!out.status.success(), "{who} was let in: {}", text(&out));
    }
    let out = curl(&ringlb, &pki, &["--tlsv1.2", "--tls-max", "1.2", &url]);
    assert!(
        !out.status.success(),
        "no certificate was let in: {}",
        text(&out)
    );
    wait_metric(
        &ringlb,
        r#"ringlb_tls_handshake_failures_total{frontend="https",reason="client-cert"}"#,
        3,
    );
    // Health checks connect too: count what ringlb relayed.
    let relayed = format!(
        r#"ringlb_backend_connections_total{{frontend="https",backend="{}"}}"#,
        backend.addr
    );
    assert_eq!(metric(&ringlb, &relayed), 1);
}

#[test]
fn an_expired_certificate_is_served_with_a_warning_and_clients_refuse_it() {
    let pki = Pki::new("expired");
    let backend = Backend::start(http("plain"));
    pki.issue(
        "old",
        "www.foobar.com",
        Some("www.foobar.com"),
        Some(("20200101000000Z", "20200102000000Z")),
    );
    let tls = format!(
        "cert = \"{}\", key = \"{}\"",
        pki.path("old.pem"),
        pki.path("old.key")
    );
    let ringlb = start(&pki, &config(backend.addr, &tls, ""));
    let warning = ringlb
        .wait_log("has expired", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no warning; logs:\n{}", ringlb.logs()));
    assert!(warning.contains("old.pem"), "{warning}");
    let url = format!("https://www.foobar.com:{}/", ringlb.addr.port());
    let out = curl(&ringlb, &pki, &[&url]);
    assert!(text(&out).contains("expired"), "{}", text(&out));
}

#[test]
fn a_silent_client_is_reset_at_the_handshake_timeout() {
    let pki = Pki::new("late");
    let backend = Backend::start(http("plain"));
    let tls = format!("{}, handshake-timeout = \"400ms\"", www(&pki));
    let ringlb = start(&pki, &config(backend.addr, &tls, ""));
    let started = Instant::now();
    let mut c = ringlb.connect();
    let mut buf = Vec::new();
    let end = c.read_to_end(&mut buf).map_err(|e| e.kind());
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset));
    assert!(started.elapsed() >= Duration::from_millis(350));
    wait_metric(
        &ringlb,
        r#"ringlb_tls_handshake_failures_total{frontend="https",reason="timeout"}"#,
        1,
    );
}

/// A rustls client that trusts the test CA.
fn tls_client(
    pki: &Pki,
    ringlb: &Ringlb,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(pki.path("ca.pem")).expect("ca");
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("ca cert")).expect("add ca");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("www.foobar.com").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let sock = ringlb.connect();
    rustls::StreamOwned::new(conn, sock)
}

/// accept-proxy before the handshake, send-proxy after it: the header
/// the upstream sent (with the ClientHello in its segment) is taken off,
/// the handshake completes, and the backend gets the carried client's
/// header in plaintext before the decrypted bytes.
#[test]
fn a_proxy_header_before_the_handshake_is_read_and_sent_on_in_plaintext() {
    let pki = Pki::new("proxy");
    let backend = Backend::start(Arc::new(|mut s: TcpStream| {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"ping") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(&got);
    }));
    let extra = "accept-proxy = true\naccept-proxy-from = [\"127.0.0.1\"]\n\
                 send-proxy = \"v1\"\ncheck-send-proxy = false";
    let ringlb = start(&pki, &config(backend.addr, &www(&pki), extra));
    let mut tls = tls_client(&pki, &ringlb);
    // The header first; the ClientHello rustls writes next may share its
    // segment or not: both must work.
    tls.sock
        .write_all(b"PROXY TCP4 203.0.113.5 198.51.100.1 7777 443\r\n")
        .expect("header");
    tls.write_all(b"ping").expect("send");
    tls.flush().expect("flush");
    let mut got = [0u8; 64];
    let want = b"PROXY TCP4 203.0.113.5 198.51.100.1 7777 443\r\nping";
    let mut filled = 0;
    while filled < want.len() {
        match tls.read(&mut got[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) => panic!("read: {e} after {filled} bytes"),
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&got[..filled]),
        String::from_utf8_lossy(want)
    );
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let _ = tls.sock.shutdown(Shutdown::Write);
    let line = ringlb
        .wait_log("frontend=https", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no access line; logs:\n{}", ringlb.logs()));
    assert!(line.contains("client=203.0.113.5:7777"), "{line}");
}

#[test]
fn bulk_bytes_cross_the_tls_side_exactly_both_ways() {
    let pki = Pki::new("bulk");
    let digests = Backend::start(digester());
    let ringlb = start(&pki, &config(digests.addr, &www(&pki), ""));
    for len in [0u64, 1, 16 * 1024 + 1, 8 << 20] {
        let mut tls = tls_client(&pki, &ringlb);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("handshake");
        }
        let sent = send_payload(&mut tls, len, len).expect("send");
        tls.conn.send_close_notify();
        tls.flush().expect("flush");
        let mut answer = String::new();
        tls.read_to_string(&mut answer).expect("the digest");
        assert_eq!(
            answer,
            format!("{} {}", sent.hash, sent.len),
            "upload of {len}"
        );
    }
    drop(digests);
    let len = 12 << 20;
    let backend = Backend::start(source(len));
    let ringlb = start(&pki, &config(backend.addr, &www(&pki), ""));
    let mut tls = tls_client(&pki, &ringlb);
    tls.write_all(b"go").expect("send");
    let got = read_digest(&mut tls).expect("download");
    let mut expected = Digest::default();
    let mut payload = vec![0u8; len as usize];
    Payload::new(len).fill(&mut payload);
    expected.update(&payload);
    assert_eq!(got, expected);
}

/// A TLS backend (rustls) with the certificate `cert` of the PKI: answers
/// one HTTP request with `backend:tls-inner` over TLS.
fn tls_backend(pki: &Pki, cert: &str) -> Backend {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> =
        rustls::pki_types::CertificateDer::pem_file_iter(pki.path(&format!("{cert}.pem")))
            .expect("cert")
            .map(|c| c.expect("cert"))
            .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path(&format!("{cert}.key")))
        .expect("key");
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config"),
    );
    Backend::start(Arc::new(move |stream: TcpStream| {
        let Ok(conn) = rustls::ServerConnection::new(Arc::clone(&config)) else {
            return;
        };
        let mut tls = rustls::StreamOwned::new(conn, stream);
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // Health checks connect and leave: a failed handshake ends here.
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match tls.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let body = "backend:tls-inner";
        let _ = write!(
            tls,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tls.conn.send_close_notify();
        let _ = tls.flush();
    }))
}

/// A rustls client that buffers its request before the handshake, so that
/// the request leaves in the same write (and segment) as its Finished.
fn request_with_finished(pki: &Pki, ringlb: &Ringlb) -> String {
    let tls = tls_client(pki, ringlb);
    let (mut conn, mut sock) = (tls.conn, tls.sock);
    conn.writer()
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("buffer the request");
    loop {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("tls out");
        }
        if !out.is_empty() {
            sock.write_all(&out).expect("send");
        }
        if !conn.is_handshaking() {
            break;
        }
        conn.read_tls(&mut sock).expect("tls in");
        conn.process_new_packets().expect("handshake");
    }
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer);
    answer
}

#[test]
fn backend_tls_re_encrypts_and_checks_the_backend_certificate() {
    let pki = Pki::new("reencrypt");
    pki.issue("inner", "inner.local", Some("inner.local"), None);
    let inner = tls_backend(&pki, "inner");
    let front = www(&pki);
    let ca = pki.path("ca.pem");
    let good =
        format!("backend-tls = true\nbackend-ca = \"{ca}\"\nbackend-server-name = \"inner.local\"");
    let ringlb = start(&pki, &config(inner.addr, &front, &good));
    let url = format!("https://www.foobar.com:{}/", ringlb.addr.port());
    let out = curl(&ringlb, &pki, &[&url]);
    assert!(
        text(&out).contains("backend:tls-inner"),
        "{}\nlogs:\n{}",
        text(&out),
        ringlb.logs()
    );
    // A request sent with the client's Finished, in one segment: it must
    // reach the backend through its TLS session, never before it.
    for _ in 0..5 {
        let answer = request_with_finished(&pki, &ringlb);
        assert!(answer.ends_with("backend:tls-inner"), "{answer}");
    }
    drop(ringlb);
    // The backend's certificate is not for this name: nothing goes through.
    let wrong =
        format!("backend-tls = true\nbackend-ca = \"{ca}\"\nbackend-server-name = \"other.local\"");
    let ringlb = start(&pki, &config(inner.addr, &front, &wrong));
    let out = curl(&ringlb, &pki, &[&url]);
    assert!(!text(&out).contains("backend:tls-inner"), "{}", text(&out));
    assert!(!out.status.success());
}

#[test]
fn certificates_are_re_read_on_reload_and_a_bad_file_keeps_the_old_ones() {
    let pki = Pki::new("reload");
    let backend = Backend::start(http("plain"));
    let tls = www(&pki);
    let ringlb = start(&pki, &config(backend.addr, &tls, ""));
    let serial = |ringlb: &Ringlb| {
        let out = s_client(ringlb, &["-servername", "www.foobar.com", "-showcerts"]);
        let pem_start = out
            .find("-----BEGIN CERTIFICATE-----")
            .expect("a certificate");
        let pem_end = out.find("-----END CERTIFICATE-----").expect("its end") + 25;
        let mut child = Command::new("openssl")
            .args(["x509", "-noout", "-serial"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl x509");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&out.as_bytes()[pem_start..pem_end])
            .expect("pem");
        text(&wait_output(child)).trim().to_string()
    };
    let first = serial(&ringlb);
    // A new certificate in the same files, then SIGHUP.
    pki.issue("www", "www.foobar.com", Some("www.foobar.com"), None);
    ringlb.signal(libc::SIGHUP);
    ringlb
        .wait_log("reload 1 applied", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no reload; logs:\n{}", ringlb.logs()));
    let second = serial(&ringlb);
    assert_ne!(first, second, "still the old certificate");
    // A broken key: the reload fails and the last good certificate serves.
    std::fs::write(pki.0.join("www.key"), "not a key").expect("break the key");
    ringlb.signal(libc::SIGHUP);
    let failed = ringlb
        .wait_log("reload 2 failed", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no reload outcome; logs:\n{}", ringlb.logs()));
    assert!(failed.contains("www.key"), "{failed}");
    assert_eq!(serial(&ringlb), second);
    let url = format!("https://www.foobar.com:{}/", ringlb.addr.port());
    assert_eq!(text(&curl(&ringlb, &pki, &[&url])), "backend:plain");
}

#[test]
fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let pki = Pki::new("halfclose");
    let backend = Backend::start(http("plain"));
    let ringlb = start(&pki, &config(backend.addr, &www(&pki), ""));
    let mut tls = tls_client(&pki, &ringlb);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    tls.conn.send_close_notify();
    tls.flush().expect("flush");
    let _ = tls.sock.shutdown(Shutdown::Write);
    let mut answer = String::new();
    tls.read_to_string(&mut answer).expect("answer");
    assert!(answer.ends_with("backend:plain"), "{answer}");
}

/// CPU time of this thread, for costs measured on a shared machine.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Moves every pending TLS byte from one side to the other; the CPU time
/// spent in the server's calls is added to `server_cpu`.
fn shuttle(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
    server_cpu: &mut Duration,
) {
    let mut buf = Vec::new();
    while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("client write");
        }
        let t = thread_cpu();
        let mut data = &buf[..];
        while !data.is_empty() {
            server.read_tls(&mut data).expect("server read");
        }
        server.process_new_packets().expect("server process");
        let mut out = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut out).expect("server write");
        }
        *server_cpu += thread_cpu() - t;
        let mut data = &out[..];
        while !data.is_empty() {
            client.read_tls(&mut data).expect("client read");
        }
        client.process_new_packets().expect("client process");
        if out.is_empty() && buf.is_empty() {
            break;
        }
    }
}

/// What one handshake costs the server (ringlb's side): run with
/// `cargo test --release --test tls handshake_cost -- --ignored --nocapture`.
/// Server CPU time only (the thread's clock), so waiting for the CPU does
/// not count (cache contention from other work still does); TLS 1.3 with
/// X25519, aws-lc-rs, in memory (no sockets, no syscalls).
#[test]
#[ignore = "a measurement, not a check: run it by name"]
fn handshake_cost() {
    let pki = Pki::new("cost");
    pki.issue_key("rsa", "rsa.test", Some("rsa.test"), None, &["rsa:2048"]);
    pki.issue("ec", "ec.test", Some("ec.test"), None);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // The client offers X25519 only, as OpenSSL 3.0 (wrk, curl, HAProxy's
    // peers here) does; rustls' own default would be X25519MLKEM768.
    let x25519 = Arc::new(rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    use rustls::pki_types::pem::PemObject;
    for (kind, name, cert, key) in [
        ("ECDSA P-256", "ec.test", "ec.pem", "ec.key"),
        ("RSA 2048", "rsa.test", "rsa.pem", "rsa.key"),
    ] {
        let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(pki.path(cert))
            .expect("cert")
            .map(|c| c.expect("cert"))
            .collect();
        let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path(key)).expect("key");
        // Signing alone, as `openssl speed` measures it.
        let signing = provider
            .key_provider
            .load_private_key(key_der.clone_key())
            .expect("signing key");
        let schemes = [
            rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
            rustls::SignatureScheme::RSA_PSS_SHA256,
        ];
        let signer = signing.choose_scheme(&schemes).expect("a scheme");
        let n = 300;
        signer.sign(b"warm-up").expect("sign");
        let t = thread_cpu();
        for i in 0..n {
            signer
                .sign(format!("message {i}").as_bytes())
                .expect("sign");
        }
        let sign_us = (thread_cpu() - t).as_secs_f64() * 1e6 / f64::from(n);
        let server_config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(chain.clone(), key_der)
                .expect("server config"),
        );
        let mut roots = rustls::RootCertStore::empty();
        let ca = "ca.pem";
        for c in rustls::pki_types::CertificateDer::pem_file_iter(pki.path(ca)).expect("ca") {
            roots.add(c.expect("ca")).expect("add");
        }
        let client_config = || {
            Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::clone(&x25519))
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth(),
            )
        };
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
        let (mut full, mut resumed) = (Duration::ZERO, Duration::ZERO);
        let rounds = 200;
        for _ in 0..rounds {
            // A fresh client each time: a full handshake; then the same
            // client config again: resumed with the ticket it got.
            let fresh = client_config();
            for (cost, kind) in [
                (&mut full, rustls::HandshakeKind::Full),
                (&mut resumed, rustls::HandshakeKind::Resumed),
            ] {
                let mut client =
                    rustls::ClientConnection::new(Arc::clone(&fresh), server_name.clone())
                        .expect("client");
                let mut server =
                    rustls::ServerConnection::new(Arc::clone(&server_config)).expect("server");
                shuttle(&mut client, &mut server, cost);
                assert!(!server.is_handshaking());
                assert_eq!(server.handshake_kind(), Some(kind));
            }
        }
        println!(
            "{kind}: signing {sign_us:.0} us; server CPU per full TLS 1.3 handshake {:.0} us, \
             per resumed one {:.0} us",
            full.as_secs_f64() * 1e6 / f64::from(rounds),
            resumed.as_secs_f64() * 1e6 / f64::from(rounds)
        );
    }
}
