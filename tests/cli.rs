//! The command line and the config file, driven through the real binary:
//! every bad input ends the process by itself with the right exit code (2
//! for a wrong flag or value, 1 for a config file or start failure) and one
//! line on stderr that names the problem, never a panic or a backtrace.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

/// Every case here must end on its own well within this.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/foobar.toml");

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// Exit `code`, nothing on stdout, and exactly one line on stderr that
    /// starts with `ringlb: ` and contains every one of `needles`.
    #[track_caller]
    fn assert_error(&self, code: i32, needles: &[&str]) {
        let Outcome {
            code: got,
            stdout,
            stderr,
        } = self;
        assert_eq!(
            *got,
            Some(code),
            "exit code; stdout: {stdout:?}, stderr: {stderr:?}"
        );
        assert!(
            stderr.ends_with('\n') && stderr.matches('\n').count() == 1,
            "stderr must be exactly one line: {stderr:?}"
        );
        assert!(
            stderr.starts_with("ringlb: "),
            "stderr should start with 'ringlb: ': {stderr:?}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "stderr should mention {needle:?}: {stderr:?}"
            );
        }
        self.assert_no_panic();
        assert!(stdout.is_empty(), "nothing on stdout expected: {stdout:?}");
    }

    #[track_caller]
    fn assert_no_panic(&self) {
        let all = format!("{}{}", self.stdout, self.stderr).to_lowercase();
        assert!(
            !all.contains("panicked") && !all.contains("backtrace"),
            "panic: {}",
            self.stderr
        );
    }
}

/// Runs ringlb with `args` and waits (bounded) for it to exit.
fn ringlb(args: &[&str]) -> Outcome {
    let mut command = Command::new(BIN);
    command.args(args);
    run(command)
}

/// Runs `command` with piped output; kills it and fails the test if it
/// does not exit within [`EXIT_WITHIN`].
fn run(command: Command) -> Outcome {
    run_within(command, EXIT_WITHIN)
}

fn run_within(mut command: Command, within: Duration) -> Outcome {
    // A user's RUST_LOG must not add log lines to the one error line.
    command
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn ringlb");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let code = wait_bounded(&mut child, within);
    let stdout = stdout.join().expect("stdout reader");
    let stderr = stderr.join().expect("stderr reader");
    match code {
        Some(code) => Outcome {
            code,
            stdout,
            stderr,
        },
        None => {
            panic!("ringlb did not exit within {within:?}; stdout: {stdout:?}, stderr: {stderr:?}")
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// `Some(exit code)` (`None` inside for a signal), or `None` if the child
/// had to be killed.
fn wait_bounded(child: &mut Child, within: Duration) -> Option<Option<i32>> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait for ringlb") {
            return Some(status.code());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A config file in a private temp directory, removed on drop.
struct TempConfig {
    path: PathBuf,
}

impl TempConfig {
    fn new(name: &str, text: &str) -> TempConfig {
        let dir = std::env::temp_dir().join(format!("ringlb-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write temp config");
        TempConfig { path }
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }

    /// How ringlb names a line of this file: `PATH:LINE:`.
    fn at(&self, line: usize) -> String {
        format!("{}:{line}:", self.path())
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

// --- Wrong flags and values: exit 2 -------------------------------------

#[test]
fn unknown_flag_is_named() {
    ringlb(&["--bogus"]).assert_error(2, &["--bogus"]);
}

#[test]
fn listen_address_without_port_is_named() {
    ringlb(&["--listen", "127.0.0.1", "--backend", "127.0.0.1:1"])
        .assert_error(2, &["'127.0.0.1'", "--listen", "HOST:PORT"]);
}

#[test]
fn backend_address_without_port_is_named() {
    ringlb(&["--listen", "127.0.0.1:0", "--backend", "nohost"])
        .assert_error(2, &["'nohost'", "--backend", "HOST:PORT"]);
}

#[test]
fn backend_port_out_of_range_is_named() {
    ringlb(&["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:99999"])
        .assert_error(2, &["127.0.0.1:99999", "--backend"]);
}

#[test]
fn duration_with_unknown_unit_is_named() {
    ringlb(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:1",
        "--idle-timeout",
        "5x",
    ])
    .assert_error(2, &["'5x'", "--idle-timeout", "unit"]);
}

#[test]
fn zero_duration_is_refused() {
    ringlb(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:1",
        "--connect-timeout",
        "0s",
    ])
    .assert_error(2, &["'0s'", "--connect-timeout", "zero"]);
}

#[test]
fn duration_too_large_for_a_number_is_named() {
    ringlb(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:1",
        "--check-interval",
        "99999999999999999999s",
    ])
    .assert_error(2, &["99999999999999999999s", "--check-interval"]);
}

/// A duration that parses but overflows `Instant + Duration` later: today
/// the health watcher thread panics at its first check (checks stop
/// silently) and a SIGTERM with such a --drain-timeout panics in main.
#[test]
fn duration_too_large_for_a_deadline_is_refused() {
    for flag in ["--check-interval", "--drain-timeout", "--idle-timeout"] {
        ringlb(&[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:1",
            flag,
            "18446744073709551615s",
        ])
        .assert_error(2, &["18446744073709551615s", flag]);
    }
}

#[test]
fn bad_escape_in_check_payload_is_named() {
    ringlb(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:1",
        "--check-send",
        r"\q",
    ])
    .assert_error(2, &["--check-send", r"'\q'"]);
    ringlb(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:1",
        "--check-expect",
        r"\x4",
    ])
    .assert_error(2, &["--check-expect", "two hex digits"]);
}

#[test]
fn unknown_mode_is_named() {
    ringlb(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:1",
        "--mode",
        "round-robin",
    ])
    .assert_error(2, &["'round-robin'", "--mode"]);
}

#[test]
fn out_of_range_numbers_are_refused() {
    let base = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"];
    for (flag, value, needle) in [
        ("--workers", "0", "workers"),
        ("--buffers", "0", "buffers must be a power of two"),
        ("--buffers", "1000", "not 1000"),
        ("--buffers", "65536", "32768"),
        ("--rise", "0", "rise"),
        ("--fall", "0", "fall"),
        ("--maxconn", "0", "maxconn"),
        ("--maxconn", "lots", "--maxconn"),
    ] {
        let mut args = base.to_vec();
        args.extend([flag, value]);
        ringlb(&args).assert_error(2, &[needle]);
    }
}

#[test]
fn listen_without_backend_says_no_backend() {
    ringlb(&["--listen", "127.0.0.1:0"]).assert_error(2, &["no backend", "--backend"]);
}

#[test]
fn no_arguments_says_what_to_give() {
    ringlb(&[]).assert_error(2, &["--listen", "--backend", "--config"]);
}

#[test]
fn config_conflicts_with_frontend_flags() {
    ringlb(&["--config", EXAMPLE, "--listen", "127.0.0.1:0"])
        .assert_error(2, &["--config", "--listen"]);
}

/// clap's "required arguments were not provided:" puts the argument on the
/// next line, which `cli::first_line` drops.
#[test]
fn check_without_config_names_config() {
    ringlb(&["--check"]).assert_error(2, &["--config"]);
}

// --- Config files: exit 1 -----------------------------------------------

#[test]
fn missing_config_file_is_named() {
    let path = std::env::temp_dir().join("ringlb-cli-no-such-dir/ringlb.toml");
    let path = path.to_str().unwrap();
    ringlb(&["--config", path]).assert_error(1, &[path, "cannot read"]);
    ringlb(&["--config", path, "--check"]).assert_error(1, &[path, "cannot read"]);
}

#[test]
fn syntax_error_names_file_and_line() {
    let file = TempConfig::new(
        "syntax.toml",
        "workers = 1\n[[frontend]]\nlisten = 127.0.0.1:80\nbackends = [\"127.0.0.1:1\"]\n",
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(3)]);
}

#[test]
fn misspelt_key_names_key_and_line() {
    let file = TempConfig::new(
        "key.toml",
        "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\nidle-timout = \"5s\"\n",
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(4), "idle-timout"]);
}

#[test]
fn bad_backend_address_names_address_and_line() {
    let file = TempConfig::new(
        "backend.toml",
        "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\n  \"127.0.0.1:1\",\n  \"nohost\",\n]\n",
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(5), "'nohost'", "backends"]);
}

#[test]
fn bad_buffer_count_in_file_is_named() {
    let file = TempConfig::new(
        "buffers.toml",
        "buffers = 1000\n[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n",
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(1), "buffers", "1000"]);
}

#[test]
fn bad_duration_in_file_names_key_and_line() {
    let file = TempConfig::new(
        "duration.toml",
        "[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\ncheck-interval = \"0s\"\n",
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(4), "check-interval", "'0s'"]);
}

#[test]
fn frontend_without_listen_is_named() {
    let file = TempConfig::new(
        "nolisten.toml",
        "[[frontend]]\nbackends = [\"127.0.0.1:1\"]\n",
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[file.path(), "listen"]);
}

#[test]
fn config_without_frontend_says_so() {
    let file = TempConfig::new("empty.toml", "workers = 2\n");
    ringlb(&["--config", file.path()]).assert_error(1, &[file.path(), "no frontend"]);
}

#[test]
fn check_accepts_the_example() {
    let out = ringlb(&["--config", EXAMPLE, "--check"]);
    assert_eq!(out.code, Some(0), "stderr: {:?}", out.stderr);
    assert!(out.stdout.contains("OK"), "stdout: {:?}", out.stdout);
    assert!(
        out.stdout.contains("web") && out.stdout.contains("db"),
        "both frontends named: {:?}",
        out.stdout
    );
    assert!(out.stderr.is_empty(), "stderr: {:?}", out.stderr);
    out.assert_no_panic();
}

#[test]
fn check_refuses_a_broken_file() {
    let file = TempConfig::new(
        "broken.toml",
        "[[frontend]]\nlisten = \"127.0.0.1:0\"\nmode = \"round-robin\"\nbackends = [\"127.0.0.1:1\"]\n",
    );
    ringlb(&["--config", file.path(), "--check"]).assert_error(1, &[&file.at(3), "round-robin"]);
}

/// The file's drain-timeout must count when --drain-timeout is not given;
/// today the flag's default (30s) always replaces it.
#[test]
fn config_file_drain_timeout_is_used() {
    use std::io::{BufRead, BufReader};
    let backend = common::Backend::start(common::echo());
    let file = TempConfig::new(
        "drain.toml",
        &format!(
            "workers = 1\ndrain-timeout = \"200ms\"\n[[frontend]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
            backend.addr
        ),
    );
    let mut child = Command::new(BIN)
        .args(["--config", file.path()])
        // The drain alone is timed here, not the leave before it.
        .args(["--leave-delay", "0"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringlb");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .find_map(|l| l.ok().filter(|l| l.contains("listening on")))
        .expect("listen line");
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .expect("address in log");
    // An echo round trip: the connection is relayed and stays open.
    let mut held = std::net::TcpStream::connect(addr).expect("connect");
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(&mut held, b"x").expect("send");
    let mut echoed = [0u8; 1];
    held.read_exact(&mut echoed).expect("echo");
    let started = Instant::now();
    // SAFETY: plain libc call on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::spawn(move || lines.for_each(drop));
    let code = wait_bounded(&mut child, EXIT_WITHIN).expect("ringlb exits after the drain timeout");
    assert_eq!(code, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drained for {:?}",
        started.elapsed()
    );
}

// --- Careless configs (issue 9 points 10 and 11) -------------------------

/// One frontend table per `(name, listen, backends)`.
fn frontends(tables: &[(&str, &str, &[&str])]) -> String {
    let mut text = String::new();
    for (name, listen, backends) in tables {
        text.push_str(&format!(
            "[[frontend]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbackends = [\n"
        ));
        for backend in *backends {
            text.push_str(&format!("  \"{backend}\",\n"));
        }
        text.push_str("]\n");
    }
    text
}

/// A port nothing listens on now (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Whether an IPv6 wildcard listener also takes IPv4 clients here.
fn dual_stack() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").map_or(true, |v| v.trim() != "1")
}

/// Today's code compared every pair of frontends, twice at start: 80,000
/// frontends took 51-63 s (over 2 minutes on a busy machine).
#[test]
fn eighty_thousand_frontends_validate_quickly() {
    let mut text = String::with_capacity(8 << 20);
    for i in 0..80_000u32 {
        text.push_str(&format!(
            "[[frontend]]\nname = \"f{i}\"\nlisten = \"127.{}.{}.{}:{}\"\nbackends = [\"10.0.0.1:80\", \"10.0.0.2:80\"]\n",
            i / 62_500 + 1,
            i / 250 % 250,
            i % 250 + 1,
            10_000 + i % 7
        ));
    }
    let file = TempConfig::new("eighty-thousand.toml", &text);
    let mut command = Command::new(BIN);
    command.args(["--config", file.path(), "--check"]);
    let out = run_within(command, Duration::from_secs(20));
    assert_eq!(out.code, Some(0), "stderr: {:?}", out.stderr);
    assert!(
        out.stdout.contains("OK (80000 frontends"),
        "{}",
        &out.stdout[..200.min(out.stdout.len())]
    );
    out.assert_no_panic();
}

/// Runs ringlb with at most 1 GiB of address space, so that a read without
/// bound (today's, of /dev/zero) ends in an allocation failure rather than
/// in the machine's memory.
fn ringlb_memory_capped(args: &[&str]) -> Outcome {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(BIN);
    command.args(args);
    // SAFETY: runs in the forked child before exec; setrlimit is
    // async-signal-safe and the struct lives on the child's stack.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run(command)
}

#[test]
fn config_file_size_is_capped() {
    ringlb_memory_capped(&["--config", "/dev/zero"]).assert_error(1, &["/dev/zero", "64 MiB"]);
    ringlb_memory_capped(&["--config", "/dev/zero", "--check"])
        .assert_error(1, &["/dev/zero", "64 MiB"]);
    let file = TempConfig::new("huge.toml", "");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file.path)
        .and_then(|f| f.set_len(65 << 20))
        .expect("a sparse 65 MiB file");
    ringlb_memory_capped(&["--config", file.path()]).assert_error(1, &[file.path(), "64 MiB"]);
}

#[test]
fn backend_on_port_zero_is_refused() {
    let file = TempConfig::new(
        "port0.toml",
        &frontends(&[("web", "127.0.0.1:0", &["10.0.0.1:80", "10.0.0.2:0"])]),
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(6), "10.0.0.2:0", "port 0"]);
    ringlb(&["--listen", "127.0.0.1:0", "--backend", "10.0.0.2:0"])
        .assert_error(2, &["--backend", "10.0.0.2:0", "port 0"]);
}

#[test]
fn overlapping_listeners_are_refused() {
    let b: &[&str] = &["10.0.0.1:80"];
    for (first, second, overlap) in [
        ("0.0.0.0:7001", "127.0.0.1:7001", true),
        ("127.0.0.1:7001", "0.0.0.0:7001", true),
        ("[::]:7001", "[::1]:7001", true),
        ("[::]:7001", "0.0.0.0:7001", dual_stack()),
        ("127.0.0.1:7001", "127.0.0.1:7001", true),
        ("127.0.0.1:7001", "127.0.0.2:7001", false),
        ("0.0.0.0:7001", "0.0.0.0:7002", false),
    ] {
        let file = TempConfig::new(
            "overlap.toml",
            &frontends(&[("alpha", first, b), ("beta", second, b)]),
        );
        let out = ringlb(&["--config", file.path(), "--check"]);
        if overlap {
            // Line 9: the second frontend's listen.
            out.assert_error(1, &[&file.at(9), "alpha", "beta", first, second]);
        } else {
            assert_eq!(out.code, Some(0), "{first} and {second}: {:?}", out.stderr);
        }
    }
    // Not only --check: a start with such a file ends at once, before
    // binding anything.
    let port = free_port();
    let (first, second) = (format!("0.0.0.0:{port}"), format!("127.0.0.1:{port}"));
    let file = TempConfig::new(
        "overlap-run.toml",
        &frontends(&[("alpha", &first, b), ("beta", &second, b)]),
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(9), "alpha", "beta", "overlap"]);
}

/// A backend that is ringlb's own listener makes every connection (and
/// every health check) loop through ringlb until it runs out of fds.
#[test]
fn a_backend_that_is_ringlb_itself_is_refused() {
    let port = free_port();
    let own = format!("127.0.0.1:{port}");
    let wildcard = format!("0.0.0.0:{port}");
    let other = format!("127.0.0.1:{}", free_port());
    // Exact: the frontend's own address.
    let file = TempConfig::new(
        "loop.toml",
        &frontends(&[("web", &own, &["10.0.0.1:80", &own])]),
    );
    ringlb(&["--config", file.path()])
        .assert_error(1, &[&file.at(6), &own, "own listener", "loop"]);
    // Through a wildcard listener of another frontend.
    let file = TempConfig::new(
        "loop-wildcard.toml",
        &frontends(&[
            ("any", &wildcard, &["10.0.0.1:80"]),
            ("web", &other, &[&own]),
        ]),
    );
    ringlb(&["--config", file.path()])
        .assert_error(1, &[&file.at(11), &own, "frontend any", "loop"]);
    if dual_stack() {
        let file = TempConfig::new(
            "loop-v6.toml",
            &frontends(&[
                ("any6", &format!("[::]:{port}"), &["10.0.0.1:80"]),
                ("web", &other, &[&own]),
            ]),
        );
        ringlb(&["--config", file.path(), "--check"])
            .assert_error(1, &[&file.at(11), "frontend any6", "loop"]);
    }
    ringlb(&["--listen", &own, "--backend", &own]).assert_error(2, &[&own, "own listener"]);
}

#[test]
fn names_outside_a_safe_charset_are_refused() {
    // A quote and a newline in a metric label inject a fake series.
    let file = TempConfig::new(
        "name.toml",
        "[[frontend]]\nlisten = \"127.0.0.1:0\"\nname = \"we\\\"b\\nx\"\nbackends = [\"10.0.0.1:80\"]\n",
    );
    ringlb(&["--config", file.path()])
        .assert_error(1, &[&file.at(3), "invalid name", "we\\\"b\\nx"]);
    let file = TempConfig::new(
        "backend-name.toml",
        &frontends(&[("web", "127.0.0.1:0", &["10.0.0.1:80", "db{1}:80"])]),
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(6), "invalid name", "db{1}:80"]);
    ringlb(&["--listen", "127.0.0.1:0", "--backend", "db{1}:80"])
        .assert_error(2, &["--backend", "invalid name"]);
    // Every form of address is still a valid name.
    let file = TempConfig::new(
        "names-ok.toml",
        &frontends(&[(
            "web-1_a.b:c/d@e",
            "127.0.0.1:0",
            &["10.0.0.1:80", "[::1]:80", "localhost:8080"],
        )]),
    );
    let out = ringlb(&["--config", file.path(), "--check"]);
    assert_eq!(out.code, Some(0), "{:?}", out.stderr);
}

#[test]
fn duplicate_backends_are_refused() {
    let file = TempConfig::new(
        "dup.toml",
        &frontends(&[(
            "web",
            "127.0.0.1:0",
            &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.1:80"],
        )]),
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(7), "10.0.0.1:80", "twice"]);
    let file = TempConfig::new(
        "dup-addr.toml",
        &frontends(&[(
            "web",
            "127.0.0.1:0",
            &["10.0.0.1:80", "[::ffff:10.0.0.1]:80"],
        )]),
    );
    ringlb(&["--config", file.path()]).assert_error(1, &[&file.at(6), "same address"]);
    ringlb(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "10.0.0.1:80",
        "--backend",
        "10.0.0.1:80",
    ])
    .assert_error(2, &["10.0.0.1:80", "twice"]);
}

#[test]
fn check_warns_of_more_workers_than_cores() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let text = format!(
        "workers = {}\n{}",
        cores + 1,
        frontends(&[("web", "127.0.0.1:0", &["10.0.0.1:80"])])
    );
    let file = TempConfig::new("workers.toml", &text);
    let out = ringlb(&["--config", file.path(), "--check"]);
    assert_eq!(out.code, Some(0), "{:?}", out.stderr);
    assert!(out.stdout.contains("OK"), "{:?}", out.stdout);
    assert!(
        out.stderr.contains("warning") && out.stderr.contains(&format!("{cores} cores")),
        "{:?}",
        out.stderr
    );
}

// --- Start failures: exit 1 ---------------------------------------------

#[test]
fn listen_address_in_use_is_named() {
    // No SO_REUSEPORT here, so ringlb's listeners cannot join this one.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().unwrap().to_string();
    ringlb(&["--listen", &addr, "--backend", "127.0.0.1:1"]).assert_error(1, &[&addr, "in use"]);
    drop(taken);
}

/// Makes each of `syscalls` fail with `errno` in the child, as a
/// container's seccomp profile or a resource limit would; every other
/// system call is allowed.
#[cfg(target_arch = "x86_64")]
fn refuse_syscalls(command: &mut Command, syscalls: &[libc::c_long], errno: i32) {
    use std::os::unix::process::CommandExt;

    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // struct seccomp_data { int nr; __u32 arch; ... }
    const NR_OFFSET: u32 = 0;
    const ARCH_OFFSET: u32 = 4;
    let op = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let n = syscalls.len() as u8;
    let mut filter = vec![
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            ARCH_OFFSET,
            0,
            0,
        ),
        // Another architecture: jump past the load and the checks to "allow".
        op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            AUDIT_ARCH_X86_64,
            0,
            n + 1,
        ),
        op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, NR_OFFSET, 0, 0),
    ];
    for (i, nr) in syscalls.iter().enumerate() {
        // A match jumps to "refuse", past the remaining checks and "allow".
        let to_refuse = (syscalls.len() - i) as u8;
        filter.push(op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            *nr as u32,
            to_refuse,
            0,
        ));
    }
    filter.push(op(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ALLOW,
        0,
        0,
    ));
    filter.push(op(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | errno as u32,
        0,
        0,
    ));
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two prctl calls (async-signal-safe) on data the child owns:
    // the filter was moved into the closure before the fork, and the
    // sock_fprog pointing at it lives on the child's stack for the call.
    unsafe {
        command.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            let one: libc::c_ulong = 1;
            let zero: libc::c_ulong = 0;
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, one, zero, zero, zero) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mode = libc::SECCOMP_MODE_FILTER as libc::c_ulong;
            if libc::prctl(libc::PR_SET_SECCOMP, mode, &prog as *const libc::sock_fprog) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn io_uring_refused_by_seccomp_is_named() {
    let mut command = Command::new(BIN);
    command.args(["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"]);
    // io_uring_setup fails with EPERM, as under a container's seccomp profile.
    refuse_syscalls(&mut command, &[libc::SYS_io_uring_setup], libc::EPERM);
    run(command).assert_error(1, &["io_uring", "disabled"]);
}

/// A logger thread that cannot start must not cost the log: ringlb says
/// so and writes its lines to stderr itself.
#[cfg(target_arch = "x86_64")]
#[test]
fn without_threads_the_log_goes_straight_to_stderr() {
    let mut command = Command::new(BIN);
    command.args(["--config", EXAMPLE, "--check"]);
    refuse_syscalls(
        &mut command,
        &[libc::SYS_clone, libc::SYS_clone3],
        libc::EAGAIN,
    );
    let out = run(command);
    assert_eq!(out.code, Some(0), "stderr: {:?}", out.stderr);
    assert!(out.stdout.contains("OK"), "stdout: {:?}", out.stdout);
    assert!(
        out.stderr.contains("WARN") && out.stderr.contains("cannot start the logger thread"),
        "stderr: {:?}",
        out.stderr
    );
    out.assert_no_panic();
    // With threads refused, a start fails with one clear error.
    let mut command = Command::new(BIN);
    command.args(["--listen", "127.0.0.1:0", "--backend", "10.0.0.1:80"]);
    refuse_syscalls(
        &mut command,
        &[libc::SYS_clone, libc::SYS_clone3],
        libc::EAGAIN,
    );
    let out = run(command);
    assert_eq!(out.code, Some(1), "stderr: {:?}", out.stderr);
    assert!(
        out.stderr.contains("ringlb: cannot start a worker"),
        "stderr: {:?}",
        out.stderr
    );
    out.assert_no_panic();
}

#[cfg(not(target_arch = "x86_64"))]
#[test]
fn io_uring_refused_by_seccomp_is_named() {
    eprintln!("skipped: the seccomp filter in this test is written for x86_64");
}

// --- Help and version: exit 0 -------------------------------------------

#[test]
fn help_lists_every_option_and_default() {
    let out = ringlb(&["--help"]);
    assert_eq!(out.code, Some(0), "stderr: {:?}", out.stderr);
    assert!(out.stderr.is_empty(), "stderr: {:?}", out.stderr);
    out.assert_no_panic();
    for option in [
        "--listen",
        "--backend",
        "--mode",
        "--workers",
        "--buffers",
        "--connect-timeout",
        "--idle-timeout",
        "--check-interval",
        "--check-timeout",
        "--rise",
        "--fall",
        "--check-send",
        "--check-expect",
        "--no-failback",
        "--on-down",
        "--maxconn",
        "--drain-timeout",
        "--stats",
        "--config",
        "--check",
    ] {
        assert!(
            out.stdout.contains(&format!("{option} "))
                || out.stdout.contains(&format!("{option}\n")),
            "--help should list {option}"
        );
    }
    for default in [
        "[default: 2s]",
        "[default: 5m]",
        "[default: 30s]",
        "[default: 2]",
        "[default: 3]",
        "[default: active-active]",
        "[default: keep]",
        "[default: number of cores]",
        "[default: 1024]",
        "[default: no limit]",
        "at most 1s",
    ] {
        assert!(out.stdout.contains(default), "--help should show {default}");
    }
    assert!(
        Path::new(EXAMPLE).exists(),
        "--help points at examples/foobar.toml"
    );
}

#[test]
fn version_exits_zero() {
    let out = ringlb(&["--version"]);
    assert_eq!(out.code, Some(0), "stderr: {:?}", out.stderr);
    assert!(
        out.stdout.starts_with("ringlb "),
        "stdout: {:?}",
        out.stdout
    );
    out.assert_no_panic();
}

#[test]
fn a_stats_address_on_a_frontends_port_is_refused() {
    // Found by review: it passed --check, then failed to bind at start.
    let text = "stats = \"127.0.0.1:7109\"\n[[frontend]]\nname = \"web\"\nlisten = \"0.0.0.0:7109\"\nbackends = [\"10.0.0.1:80\"]\n";
    let file = TempConfig::new("stats-overlap.toml", text);
    ringlb(&["--config", file.path(), "--check"]).assert_error(1, &[&file.at(1), "stats", "web"]);
    ringlb(&[
        "--listen",
        "127.0.0.1:7110",
        "--backend",
        "10.0.0.1:80",
        "--stats",
        "0.0.0.0:7110",
    ])
    .assert_error(2, &["stats", "default"]);
}

#[test]
fn a_config_that_is_a_pipe_is_refused_at_once() {
    // Found by review: open(2) of a FIFO with no writer blocked forever.
    let dir = std::env::temp_dir().join(format!("ringlb-fifo-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let fifo = dir.join("config.toml");
    let _ = std::fs::remove_file(&fifo);
    let path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let name = fifo.to_string_lossy().into_owned();
    ringlb(&["--config", &name, "--check"]).assert_error(1, &[&name, "pipe"]);
    let _ = std::fs::remove_dir_all(&dir);
}
