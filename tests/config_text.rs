//! Errors that quote what the operator wrote (config values, list files,
//! flags) stay one line with control characters escaped: a newline in a
//! TOML string must not forge a second log line, an escape sequence must
//! not repaint the terminal reading the log.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ringlb-text-{tag}-{}", std::process::id()));
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

/// A TOML string: a newline, a forged log line, a colour escape.
const EVIL: &str = r#"1\n2026-12-01T00:00:00Z ERROR forged\u001b[31m"#;

fn frontend(backend: &str, extra: &str) -> String {
    format!(
        "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
         backends = [\"{backend}\"]\n{extra}\n"
    )
}

fn assert_one_line(what: &str, text: &str, key: &str) {
    let text = text.trim_end_matches('\n');
    assert!(
        !text.contains(|c: char| c.is_control()),
        "{what}: a control character in {text:?}"
    );
    assert!(text.contains(key), "{what}: {key} not named in {text}");
    assert!(text.contains("\\u{1b}[31m"), "{what}: {text}");
}

#[test]
fn check_prints_one_line_naming_the_key_for_a_value_with_control_characters() {
    let dir = TempDir::new("check");
    let allow = dir.path("allow.txt");
    std::fs::write(&allow, "10.0.0.0/8\n1.2.3.4\x1b[31m\r\n").expect("allow list");
    let allow = allow.to_string_lossy().to_string();
    for (extra, key) in [
        (
            format!("timeout-client-fin = \"{EVIL}\""),
            "timeout-client-fin",
        ),
        (format!("deny = [\"{EVIL}\"]"), "deny"),
        (format!("allow-file = \"{allow}\""), "allow-file"),
        (format!("check-expect = \"\\\\{EVIL}\""), "check-expect"),
    ] {
        let path = dir.path("check.toml");
        std::fs::write(&path, frontend("127.0.0.1:1", &extra)).expect("config");
        let out = Command::new(BIN)
            .args(["--config", path.to_str().expect("utf-8"), "--check"])
            .output()
            .expect("run ringlb --check");
        assert_eq!(out.status.code(), Some(1), "{key}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_one_line(key, &stderr, key);
    }
    // A flag's value, and a list file a flag names.
    for args in [
        vec!["--timeout-client-fin", "1\n\x1b[31m"],
        vec!["--deny", "1.2.3.4\x1b[31m"],
    ] {
        let out = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"])
            .args(&args)
            .output()
            .expect("run ringlb");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let text = stderr.trim_end_matches('\n');
        assert!(
            !text.contains(|c: char| c.is_control()),
            "{args:?}: a control character in {text:?}"
        );
        assert!(text.contains(args[0]), "{args:?}: {text}");
    }
}

/// The case that matters most: a reload's error is a log line. The
/// forged text must stay inside the one "reload failed" line.
#[test]
fn a_failed_reload_logs_one_line_whatever_the_value_holds() {
    let dir = TempDir::new("reload");
    let backend = Backend::start(echo());
    let path = dir.path("ringlb.toml");
    let good = frontend(&backend.addr_str(), "");
    std::fs::write(&path, &good).expect("config");
    let ringlb = Ringlb::start_raw(&["--config", path.to_str().expect("utf-8")]);
    let bad = frontend(&backend.addr_str(), &format!("idle-timeout = \"{EVIL}\""));
    std::fs::write(&path, bad).expect("config");
    ringlb.signal(libc::SIGHUP);
    let line = ringlb
        .wait_log("reload 1 failed", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no reload outcome; logs:\n{}", ringlb.logs()));
    assert_one_line("reload", &line, "idle-timeout");
    assert_eq!(
        ringlb.count_logs("forged"),
        1,
        "the forged text is on a line of its own:\n{}",
        ringlb.logs()
    );
}
