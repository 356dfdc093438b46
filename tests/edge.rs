//! The edge: source ACLs and per-source limits, checked at accept before
//! any backend is touched, and half-closed timeouts. Clients bind to
//! different loopback addresses (127.0.0.2, 127.0.0.3, ...) before they
//! connect, so one test plays several sources.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use common::*;

/// A file in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("ringlb-edge-{}-{name}", std::process::id()));
        let file = TempFile(path);
        file.write(text);
        file
    }

    /// In one step (write, then rename), so a reload never reads half.
    fn write(&self, text: &str) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write temp file");
        std::fs::rename(&tmp, &self.0).expect("rename temp file");
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A TCP connection from `source` (bound before connecting).
fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let source: IpAddr = source.parse().expect("source address");
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(10))?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(stream)
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Served,
    Reset,
    /// Ended with a FIN before the echo.
    Closed,
}

/// Sends a line and waits for its echo: served, reset, or closed; a
/// timeout fails the test. Tests of refusals expect a reset.
fn exchange(source: &str, to: SocketAddr) -> Outcome {
    let reset =
        |e: &std::io::Error| matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe);
    // A reset can come so fast that the connect itself reports it.
    let mut stream = match connect_from(source, to) {
        Ok(stream) => stream,
        Err(e) if reset(&e) => return Outcome::Reset,
        Err(e) => panic!("{source}: connect failed: {e}"),
    };
    if let Err(e) = stream.write_all(b"hello\n") {
        assert!(reset(&e), "{source}: write failed with {e}");
        return Outcome::Reset;
    }
    let mut got = [0u8; 6];
    match stream.read_exact(&mut got) {
        Ok(()) => {
            assert_eq!(&got, b"hello\n", "{source}: echo");
            Outcome::Served
        }
        Err(e) if reset(&e) => Outcome::Reset,
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Outcome::Closed,
        Err(e) => panic!("{source}: neither served nor reset: {e}"),
    }
}

/// An echo backend that counts the connections that carried a byte (health
/// checks connect without sending, and are not clients).
fn counting_echo() -> (Backend, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    let handler: Handler = Arc::new(move |mut stream: TcpStream| {
        let mut buf = [0u8; 4096];
        let mut counted = false;
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            if !std::mem::replace(&mut counted, true) {
                seen.fetch_add(1, SeqCst);
            }
            if stream.write_all(&buf[..n]).is_err() {
                return;
            }
        }
        let _ = stream.shutdown(Shutdown::Write);
    });
    (Backend::start(handler), count)
}

fn refused(ringlb: &Ringlb, frontend: &str, reason: &str) -> u64 {
    let series =
        format!("ringlb_frontend_refused_total{{frontend=\"{frontend}\",reason=\"{reason}\"}}");
    ringlb.metric(&series).unwrap_or_else(|| {
        panic!("no {series}; logs:\n{}", ringlb.logs());
    })
}

#[test]
fn denied_and_unlisted_clients_are_reset_before_any_backend() {
    let (backend, clients) = counting_echo();
    let ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--stats",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--allow",
        "127.0.0.0/30",
        "--allow",
        "127.0.0.9",
        "--deny",
        "127.0.0.3",
    ]);
    assert_eq!(exchange("127.0.0.2", ringlb.addr), Outcome::Served);
    assert_eq!(exchange("127.0.0.9", ringlb.addr), Outcome::Served);
    assert_eq!(clients.load(SeqCst), 2);
    // Denied (deny wins over the allow list), and not on the allow list.
    assert_eq!(exchange("127.0.0.3", ringlb.addr), Outcome::Reset);
    assert_eq!(exchange("127.0.0.4", ringlb.addr), Outcome::Reset);
    assert_eq!(exchange("127.0.0.10", ringlb.addr), Outcome::Reset);
    assert_eq!(refused(&ringlb, "default", "acl"), 3);
    assert_eq!(refused(&ringlb, "default", "source-limit"), 0);
    // Served again: a refusal held nothing.
    assert_eq!(exchange("127.0.0.1", ringlb.addr), Outcome::Served);
    assert_eq!(
        clients.load(SeqCst),
        3,
        "a refused client reached the backend"
    );
    let accepted = ringlb
        .metric("ringlb_frontend_connections_total{frontend=\"default\"}")
        .expect("connections metric");
    assert_eq!(
        accepted, 3,
        "refused clients are not counted as connections"
    );
    // Ended as the clients closed (which ringlb sees a moment later).
    assert!(eventually(Duration::from_secs(20), || active(&ringlb) == 0));
    // One debug line per refusal; at info, the first and then a summary
    // per period.
    assert_eq!(
        ringlb.count_logs("refused, not allowed by the source ACL"),
        3
    );
    assert_eq!(
        ringlb.count_logs("frontend default: refused 127.0.0.3"),
        1,
        "{}",
        ringlb.logs()
    );
    assert_eq!(ringlb.count_logs("frontend default: refused "), 1);
}

#[test]
fn ipv6_and_ipv4_mapped_clients_match_their_rules() {
    let (backend, clients) = counting_echo();
    // A dual-stack listener: IPv4 clients arrive as ::ffff:a.b.c.d.
    if std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1") {
        eprintln!("skipped: net.ipv6.bindv6only=1, no dual-stack listener");
        return;
    }
    let ringlb = Ringlb::start_raw(&[
        "--listen",
        "[::]:0",
        "--backend",
        &backend.addr_str(),
        "--stats",
        "127.0.0.1:0",
        "--deny",
        "127.0.0.3",
        "--deny",
        "::1",
    ]);
    let port = ringlb.addr.port();
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    assert_eq!(exchange("127.0.0.2", v4), Outcome::Served);
    assert_eq!(exchange("127.0.0.3", v4), Outcome::Reset);
    assert_eq!(exchange("::1", v6), Outcome::Reset);
    assert_eq!(refused(&ringlb, "default", "acl"), 2);
    assert_eq!(clients.load(SeqCst), 1);
    assert!(
        ringlb.count_logs("::ffff:127.0.0.3") > 0,
        "the refusal names the client as the listener saw it: {}",
        ringlb.logs()
    );

    // An allow list of IPv6 only lets no IPv4 client in.
    let ringlb = Ringlb::start_raw(&[
        "--listen",
        "[::1]:0",
        "--backend",
        &backend.addr_str(),
        "--allow",
        "::1/128",
    ]);
    assert_eq!(exchange("::1", ringlb.addr), Outcome::Served);
    let ringlb = Ringlb::start_raw(&[
        "--listen",
        "[::1]:0",
        "--backend",
        &backend.addr_str(),
        "--allow",
        "2001:db8::/32",
    ]);
    assert_eq!(exchange("::1", ringlb.addr), Outcome::Reset);
}

fn config(allow_file: &str, deny_file: &str, backend: &str) -> String {
    format!(
        "stats = \"127.0.0.1:0\"\n[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
         backends = [\"{backend}\"]\nallow-file = \"{allow_file}\"\ndeny-file = \"{deny_file}\"\n\
         deny = [\"127.0.0.66\"]\n"
    )
}

#[test]
fn list_files_are_read_again_on_reload_and_a_bad_one_changes_nothing() {
    let (backend, _) = counting_echo();
    let allow = TempFile::new("allow.txt", "# clients\n127.0.0.0/24\n");
    let deny = TempFile::new("deny.txt", "127.0.0.3 # abuse\n\n");
    let file = TempFile::new(
        "acl.toml",
        &config(allow.path(), deny.path(), &backend.addr_str()),
    );
    let ringlb = Ringlb::start_raw(&["--config", file.path()]);
    assert_eq!(exchange("127.0.0.2", ringlb.addr), Outcome::Served);
    assert_eq!(exchange("127.0.0.3", ringlb.addr), Outcome::Reset);
    assert_eq!(exchange("127.0.0.66", ringlb.addr), Outcome::Reset);
    assert_eq!(exchange("127.0.1.1", ringlb.addr), Outcome::Reset);

    // The lists change on disk: a reload reads them again.
    deny.write("127.0.0.2\n");
    allow.write("127.0.0.0/16\n");
    ringlb.signal(libc::SIGHUP);
    ringlb
        .wait_log("reload 1 applied", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("reload 1; logs:\n{}", ringlb.logs()));
    assert!(
        ringlb.count_logs("frontends changed: web") > 0,
        "{}",
        ringlb.logs()
    );
    assert_eq!(exchange("127.0.0.2", ringlb.addr), Outcome::Reset);
    assert_eq!(exchange("127.0.0.3", ringlb.addr), Outcome::Served);
    assert_eq!(exchange("127.0.1.1", ringlb.addr), Outcome::Served);

    // A bad line: the reload fails naming file and line; the rules in
    // force stay.
    deny.write("127.0.0.2\n127.0.0.1/8\n");
    ringlb.signal(libc::SIGHUP);
    let line = ringlb
        .wait_log("reload 2 failed", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("reload 2; logs:\n{}", ringlb.logs()));
    assert!(
        line.contains(&format!("{}:2: ", deny.path())) && line.contains("127.0.0.0/8"),
        "{line}"
    );
    assert_eq!(exchange("127.0.0.2", ringlb.addr), Outcome::Reset);
    assert_eq!(exchange("127.0.0.3", ringlb.addr), Outcome::Served);

    // A list file that went missing fails the same way.
    drop(deny);
    ringlb.signal(libc::SIGHUP);
    let line = ringlb
        .wait_log("reload 3 failed", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("reload 3; logs:\n{}", ringlb.logs()));
    assert!(line.contains("deny-file: cannot read"), "{line}");
    assert_eq!(exchange("127.0.0.2", ringlb.addr), Outcome::Reset);
}

#[test]
fn bad_rules_are_refused_at_start_with_their_line() {
    let bad = TempFile::new("bad.txt", "10.0.0.0/8\n\n# x\nnonsense\n");
    let file = TempFile::new(
        "bad.toml",
        &format!(
            "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:9\"]\n\
             allow-file = \"{}\"\n",
            bad.path()
        ),
    );
    let out = std::process::Command::new(BIN)
        .args(["--config", file.path(), "--check"])
        .output()
        .expect("run ringlb --check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:4: allow-file: {}:4: invalid address 'nonsense'",
            file.path(),
            bad.path()
        )),
        "{stderr}"
    );
    let inline = TempFile::new(
        "inline.toml",
        "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:9\"]\n\
         deny = [\n\"10.0.0.0/8\",\n\"10.0.0.1/8\",\n]\n",
    );
    let out = std::process::Command::new(BIN)
        .args(["--config", inline.path(), "--check"])
        .output()
        .expect("run ringlb --check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:6: deny: '10.0.0.1/8'", inline.path())),
        "{stderr}"
    );
    let out = std::process::Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:9",
            "--allow",
            "300.0.0.1",
        ])
        .output()
        .expect("run ringlb");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("300.0.0.1"));
}

fn active(ringlb: &Ringlb) -> u64 {
    ringlb
        .metric("ringlb_frontend_connections_active{frontend=\"default\"}")
        .expect("active metric")
}

/// One address opens 10,000 connections and keeps every one it gets, idle
/// (the flood that filled the fd limit before). With a per-source limit it
/// holds only its share: the frontend's maxconn, which the flood alone
/// would fill, keeps room, and a client from another address is served at
/// once while the flood holds. Afterwards the table is empty again.
#[test]
fn an_idle_flood_from_one_address_does_not_lock_out_others() {
    raise_fd_limit();
    let (backend, _) = counting_echo();
    let ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--stats",
        "127.0.0.1:0",
        "--maxconn",
        "300",
        "--max-conn-per-source",
        "100",
    ]);
    let mut flood = Vec::with_capacity(10_000);
    let mut failed = 0;
    for _ in 0..10_000 {
        match connect_from("127.0.0.2", ringlb.addr) {
            Ok(stream) => flood.push(stream),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => failed += 1,
            Err(e) => panic!(
                "flood connect {}: {e} (the accept queue filled: the flood locked the \
                 frontend); logs:\n{}",
                flood.len() + failed,
                ringlb.logs()
            ),
        }
    }
    // Served at once, while every flood socket is still open.
    let started = std::time::Instant::now();
    assert_eq!(exchange("127.0.0.3", ringlb.addr), Outcome::Served);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "served after {waited:?}");
    assert!(
        eventually(Duration::from_secs(20), || {
            refused(&ringlb, "default", "source-limit") == 9_900
        }),
        "refused {}; logs:\n{}",
        refused(&ringlb, "default", "source-limit"),
        ringlb.logs()
    );
    // The flood's 100, once 127.0.0.3's connection has ended.
    assert!(
        eventually(Duration::from_secs(20), || active(&ringlb) == 100),
        "active {}",
        active(&ringlb)
    );
    // The flood's own clients beyond its share were reset, not left open.
    let mut reset = failed;
    let mut open = 0;
    for stream in &mut flood {
        stream.set_nonblocking(true).expect("non-blocking");
        match stream.read(&mut [0u8; 1]) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => open += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => reset += 1,
            other => panic!("a flood connection: {other:?}"),
        }
    }
    assert_eq!((open, reset), (100, 9_900));
    drop(flood);
    assert!(
        eventually(Duration::from_secs(20), || active(&ringlb) == 0),
        "connections left: {}",
        active(&ringlb)
    );
    assert_eq!(exchange("127.0.0.2", ringlb.addr), Outcome::Served);
}

/// A source's place is given back however its connection ends: a clean
/// end, a client reset, a backend reset, no backend at all. With a limit of
/// one, a place not given back refuses the next connection.
#[test]
fn every_end_gives_the_source_its_place_back() {
    let (backend, _) = counting_echo();
    let resetting = Backend::start(Arc::new(|stream: TcpStream| {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
    }));
    let dead = refused_addr();
    for (label, target) in [
        ("echo", backend.addr),
        ("resetting", resetting.addr),
        ("no backend", dead),
    ] {
        let ringlb = Ringlb::start(&[
            "--backend",
            &target.to_string(),
            "--stats",
            "127.0.0.1:0",
            "--max-conn-per-source",
            "1",
            "--check-interval",
            "1h",
            "--fall",
            "1000",
        ]);
        for round in 0..3 {
            match label {
                "echo" => {
                    assert_eq!(exchange("127.0.0.2", ringlb.addr), Outcome::Served);
                    // The place is given back as the connection ends, which
                    // ringlb sees a moment after the client's close.
                    assert!(eventually(Duration::from_secs(20), || active(&ringlb) == 0));
                    // A client that resets its own connection.
                    let s = connect_from("127.0.0.2", ringlb.addr).expect("connect");
                    socket2::SockRef::from(&s)
                        .set_linger(Some(Duration::ZERO))
                        .expect("linger");
                    (&s).write_all(b"x").expect("write");
                    drop(s);
                }
                // A backend's reset reaches the client as a reset, or as
                // an end when ringlb's send met the reset first (the
                // kernel reports it once; the receive then sees an end).
                "resetting" => assert_ne!(exchange("127.0.0.2", ringlb.addr), Outcome::Served),
                _ => assert_eq!(exchange("127.0.0.2", ringlb.addr), Outcome::Reset),
            }
            assert!(
                eventually(Duration::from_secs(20), || active(&ringlb) == 0),
                "{label} round {round}: connections left {}",
                active(&ringlb)
            );
        }
        assert_eq!(
            refused(&ringlb, "default", "source-limit"),
            0,
            "{label}: a place was not given back; logs:\n{}",
            ringlb.logs()
        );
    }
}

/// New connections per second from one address: a burst past the rate is
/// reset, another address is not affected, and the bucket refills.
#[test]
fn the_rate_per_source_resets_a_burst_and_refills() {
    let (backend, _) = counting_echo();
    let ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--stats",
        "127.0.0.1:0",
        "--max-rate-per-source",
        "5",
    ]);
    let started = std::time::Instant::now();
    let outcomes: Vec<Outcome> = (0..20)
        .map(|_| exchange("127.0.0.2", ringlb.addr))
        .collect();
    let took = started.elapsed().as_secs_f64();
    let served = outcomes.iter().filter(|o| **o == Outcome::Served).count();
    // Five at once, and five more per second the burst took.
    let most = 5 + (took * 5.0).ceil() as usize;
    assert!(
        (5..=most).contains(&served) && served < 20,
        "served {served} of 20 in {took:.2}s"
    );
    assert_eq!(
        refused(&ringlb, "default", "source-rate") as usize,
        20 - served
    );
    assert_eq!(exchange("127.0.0.3", ringlb.addr), Outcome::Served);
    // The bucket refills within a second.
    assert!(eventually(Duration::from_secs(10), || {
        exchange("127.0.0.2", ringlb.addr) == Outcome::Served
    }));
}

/// `timeout-client-fin`: the backend answered and ended its stream; the
/// client keeps its half open and idles. The connection is closed once it
/// idled that long, not after the (much longer) idle timeout.
#[test]
fn a_client_idling_after_the_backends_end_is_closed_at_client_fin() {
    let backend_saw_close = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&backend_saw_close);
    let backend = Backend::start(Arc::new(move |mut stream: TcpStream| {
        let _ = stream.write_all(b"bye\n");
        let _ = stream.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        // Ends when ringlb closes its side (a FIN, or a reset).
        let _ = stream.read_to_end(&mut rest);
        seen.fetch_add(1, SeqCst);
    }));
    let ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--stats",
        "127.0.0.1:0",
        "--idle-timeout",
        "5m",
        "--timeout-client-fin",
        "1s",
        "--check-interval",
        "1h",
    ]);
    let mut client = ringlb.connect();
    let mut got = Vec::new();
    client
        .read_to_end(&mut got)
        .expect("the backend's reply and end");
    assert_eq!(got, b"bye\n");
    // The client's half stays open, idle.
    assert!(
        eventually(Duration::from_secs(20), || active(&ringlb) == 0),
        "still open after 20 s; logs:\n{}",
        ringlb.logs()
    );
    // Every connection the backend had (health checks connect too) ended.
    assert!(eventually(Duration::from_secs(10), || {
        backend_saw_close.load(SeqCst) == backend.accepted.load(SeqCst)
    }));
    assert!(
        ringlb.count_logs("client-fin timeout") == 1,
        "{}",
        ringlb.logs()
    );
    drop(client);
}

/// `timeout-server-fin`: the client sent its request and ended its stream;
/// the backend never answers nor closes. The connection is closed once it
/// idled that long; the client sees its end.
#[test]
fn a_backend_idling_after_the_clients_end_is_closed_at_server_fin() {
    let backend = Backend::start(Arc::new(|mut stream: TcpStream| {
        let mut request = Vec::new();
        let _ = stream.read_to_end(&mut request);
        // Silent and open until ringlb gives up on it.
        std::thread::sleep(Duration::from_secs(60));
    }));
    let ringlb = Ringlb::start(&[
        "--backend",
        &backend.addr_str(),
        "--stats",
        "127.0.0.1:0",
        "--idle-timeout",
        "5m",
        "--timeout-server-fin",
        "1s",
        "--check-interval",
        "1h",
    ]);
    let mut client = ringlb.connect();
    client.write_all(b"request\n").expect("send");
    client.shutdown(Shutdown::Write).expect("FIN");
    let started = std::time::Instant::now();
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut rest = Vec::new();
    match client.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed by server-fin: {e}; logs:\n{}", ringlb.logs()),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || ringlb
            .count_logs("server-fin timeout")
            == 1),
        "{}",
        ringlb.logs()
    );
    assert_eq!(active(&ringlb), 0);
}
