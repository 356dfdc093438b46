//! Privilege drop: started as root with `user`, ringlb binds everything,
//! then every thread runs as that user with no capability, and serves.
//! A reload can no longer bind a port below 1024, and says why.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use common::*;

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("ringlb-privdrop-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write temp file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");
        TempFile(path)
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

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `id -u USER` / `id -g USER`.
fn id_of(flag: &str, user: &str) -> u32 {
    let out = std::process::Command::new("id")
        .args([flag, user])
        .output()
        .expect("run id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a numeric id")
}

/// A `Name: value` line of a /proc status file.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map_or("", str::trim)
}

fn echo_round_trip(addr: SocketAddr) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream.write_all(b"ping\n").expect("send");
    let mut got = [0u8; 5];
    stream.read_exact(&mut got).expect("echo");
    assert_eq!(&got, b"ping\n");
}

/// A port below 1024 that nothing listens on now.
fn free_privileged_port() -> Option<u16> {
    (900..1024)
        .rev()
        .find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

fn config(backend: &str, extra_frontend: &str) -> String {
    format!(
        "user = \"nobody\"\nstats = \"127.0.0.1:0\"\nworkers = 2\n\
         [[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n\
         {extra_frontend}"
    )
}

#[test]
fn dropped_to_nobody_every_thread_has_no_privilege_and_traffic_flows() {
    if !is_root() {
        eprintln!("skipped: needs root to drop privileges");
        return;
    }
    let (uid, gid) = (id_of("-u", "nobody"), id_of("-g", "nobody"));
    let backend = Backend::start(echo());
    let file = TempFile::new("nobody.toml", &config(&backend.addr_str(), ""));
    let ringlb = Ringlb::start_raw(&["--config", file.path()]);
    ringlb
        .wait_log("running as user nobody", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no drop; logs:\n{}", ringlb.logs()));
    let pid = ringlb.child.id();
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .collect();
    // The main thread, the workers, the health checker, the logger, the
    // stats server: every one switched, not only the caller.
    assert!(tasks.len() >= 4, "{} threads", tasks.len());
    for task in tasks {
        let status = std::fs::read_to_string(task.path().join("status")).expect("status");
        let name = field(&status, "Name:");
        let ids = |n| format!("{n}\t{n}\t{n}\t{n}");
        assert_eq!(field(&status, "Uid:"), ids(uid), "{name}");
        assert_eq!(field(&status, "Gid:"), ids(gid), "{name}");
        assert_eq!(field(&status, "Groups:"), "", "{name}");
        for caps in ["CapEff:", "CapPrm:", "CapInh:"] {
            assert_eq!(field(&status, caps), "0000000000000000", "{name} {caps}");
        }
    }
    echo_round_trip(ringlb.addr);
    // Metrics still answer: the stats listener was bound before the drop.
    assert!(
        ringlb
            .metric("ringlb_frontend_connections_total{frontend=\"web\"}")
            .is_some_and(|n| n >= 1)
    );

    // A reload adding a listener on a privileged port fails, naming it and
    // what to do; the rest keeps serving.
    let Some(port) = free_privileged_port() else {
        eprintln!("no free port below 1024: the reload part is skipped");
        return;
    };
    let low = format!(
        "[[frontend]]\nname = \"low\"\nlisten = \"127.0.0.1:{port}\"\nbackends = [\"{}\"]\n",
        backend.addr_str()
    );
    std::fs::write(&file.0, config(&backend.addr_str(), &low)).expect("rewrite config");
    ringlb.signal(libc::SIGHUP);
    let line = ringlb
        .wait_log("reload 1 failed", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no reload outcome; logs:\n{}", ringlb.logs()));
    assert!(
        line.contains(&format!("port {port} is below"))
            && line.contains("CAP_NET_BIND_SERVICE")
            && line.contains("Permission denied"),
        "{line}"
    );
    echo_round_trip(ringlb.addr);
}

#[test]
fn a_user_that_does_not_exist_fails_the_start_before_binding() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let out = std::process::Command::new(BIN)
        .args([
            "--listen",
            &listen,
            "--backend",
            "127.0.0.1:9",
            "--user",
            "no-such-user-ringlb",
        ])
        .output()
        .expect("run ringlb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("user 'no-such-user-ringlb' does not exist"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    let file = TempFile::new(
        "nouser.toml",
        "user = \"no-such-user-ringlb\"\n[[frontend]]\nlisten = \"127.0.0.1:0\"\n\
         backends = [\"127.0.0.1:9\"]\n",
    );
    let out = std::process::Command::new(BIN)
        .args(["--config", file.path(), "--check"])
        .output()
        .expect("run ringlb --check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:1: user 'no-such-user-ringlb' does not exist",
            file.path()
        )),
        "{stderr}"
    );
}

#[test]
fn a_config_file_others_can_write_is_warned_about_at_start_and_reload() {
    let backend = Backend::start(echo());
    let text = format!(
        "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        backend.addr_str()
    );
    let file = TempFile::new("writable.toml", &text);
    std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let ringlb = Ringlb::start_raw(&["--config", file.path()]);
    let warning = ringlb
        .wait_log(
            "is writable by its group and all users",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("no warning; logs:\n{}", ringlb.logs()));
    assert!(
        warning.contains("WARN") && warning.contains("chmod go-w"),
        "{warning}"
    );
    ringlb.signal(libc::SIGHUP);
    ringlb
        .wait_log("reload 1 applied", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no reload; logs:\n{}", ringlb.logs()));
    assert_eq!(ringlb.count_logs("is writable by"), 2);
    // Fixed, it is quiet.
    std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    ringlb.signal(libc::SIGHUP);
    ringlb
        .wait_log("reload 2 applied", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no reload; logs:\n{}", ringlb.logs()));
    assert_eq!(ringlb.count_logs("is writable by"), 2);
}
