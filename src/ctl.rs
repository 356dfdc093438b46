//! `ringlb ctl`: the client of the admin socket (see [`crate::control`]
//! for the protocol). It sends one request line and prints the answer:
//! the output on stdout with exit 0, or one line on stderr with exit 1.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Where `ringlb ctl` looks when no `--socket` is given.
pub const DEFAULT_SOCKET: &str = "/run/ringlb.sock";

/// Longer than the slowest answer: a reload or `disable --kill` waits up
/// to 5 s for the workers' acknowledgements.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// A bound on the answer: a `show` of thousands of backends is far less.
const MAX_ANSWER: u64 = 64 << 20;

/// Sends `request` and prints the answer; the exit code says how it went.
pub fn run(socket: &Path, request: &str) -> ExitCode {
    match ask(socket, request) {
        Ok(output) => {
            // A closed stdout (`| head`) is not an error of the command.
            let _ = std::io::stdout().write_all(output.as_bytes());
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("ringlb ctl: {why}");
            ExitCode::from(1)
        }
    }
}

/// The answer's output, or the one line saying why there is none.
pub fn ask(socket: &Path, request: &str) -> Result<String, String> {
    if request.chars().any(char::is_control) {
        return Err("the command must be one line without control characters".into());
    }
    let mut stream = UnixStream::connect(socket).map_err(|e| connect_error(socket, &e))?;
    let io = |e: std::io::Error| format!("admin socket {}: {e}", socket.display());
    stream.set_read_timeout(Some(ANSWER_DEADLINE)).map_err(io)?;
    stream
        .set_write_timeout(Some(ANSWER_DEADLINE))
        .map_err(io)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io)?;
    let mut answer = String::new();
    stream
        .take(MAX_ANSWER)
        .read_to_string(&mut answer)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "admin socket {}: no answer within {ANSWER_DEADLINE:?}",
                socket.display()
            ),
            _ => io(e),
        })?;
    if let Some(output) = answer.strip_prefix("ok\n") {
        return Ok(output.to_string());
    }
    match answer.strip_prefix("error: ") {
        Some(why) => Err(why.trim_end().to_string()),
        None if answer.is_empty() => Err(format!(
            "admin socket {}: ringlb closed the connection without an answer",
            socket.display()
        )),
        None => Err(format!(
            "admin socket {}: unexpected answer: {}",
            socket.display(),
            answer.lines().next().unwrap_or_default()
        )),
    }
}

fn connect_error(socket: &Path, e: &std::io::Error) -> String {
    let path = socket.display();
    match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "no admin socket at {path}: is ringlb running with --admin-socket {path}? \
             (give its path with --socket)"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {path}: run ringlb ctl as the user ringlb runs as (or root)"
        ),
        std::io::ErrorKind::ConnectionRefused => {
            format!("nothing answers on {path}: ringlb is not running (a stale socket)")
        }
        _ => format!("cannot connect to {path}: {e}"),
    }
}
