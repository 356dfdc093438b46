//! systemd's readiness protocol (sd_notify(3)), for `Type=notify` units:
//! one datagram per state change to the socket named by `$NOTIFY_SOCKET`.
//! Without that variable (not started by systemd) every call does nothing.
//!
//! Written on std rather than a crate: the protocol is one datagram, and
//! the `sd-notify` crate (0.5) cannot reach an abstract socket (`@name`),
//! which service managers in containers hand out.
//!
//! The unit shipped in packaging/ is `Type=notify` (systemd 240 and later,
//! Debian 12 has 252). [`reloading`] sends what `Type=notify-reload`
//! (systemd 253 and later) requires, for the in-place reload to come.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::server::Server;

/// Every listener is bound and every worker runs: systemd may start the
/// units ordered after ringlb, and `systemctl start` returns.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}\n"));
}

/// A drain or stop has begun: systemd shows the unit as deactivating, even
/// when the stop came from a signal it did not send itself.
pub fn stopping(status: &str) {
    send(&format!("STOPPING=1\nSTATUS={status}\n"));
}

/// A reload has begun; [`ready`] must follow once it is done. systemd 253
/// and later drop a RELOADING=1 that comes without the monotonic clock
/// (it tells this reload from an older one), so it is always sent.
pub fn reloading(status: &str) {
    send(&reloading_message(status, monotonic_usec()));
}

/// What `systemctl status` shows once ready: each frontend and the
/// address it really listens on (a port 0 in the config is resolved).
pub fn serving_status(server: &Server) -> String {
    let frontends: Vec<String> = server
        .frontends()
        .iter()
        .map(|(f, addr)| format!("{} on {addr}", f.config.name))
        .collect();
    format!("serving {}", frontends.join(", "))
}

fn reloading_message(status: &str, monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}\nSTATUS={status}\n")
}

/// Sends `message` to `$NOTIFY_SOCKET`, if set. A failure is logged, never
/// fatal: systemd then times the start out, which says more than an exit.
fn send(message: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_to(&socket, message.as_bytes()) {
        log::warn!(
            "cannot notify the service manager at {}: {e}",
            socket.to_string_lossy()
        );
    }
}

/// One datagram to a path (`/run/systemd/notify`) or an abstract name
/// (`@name`). Non-blocking: a manager that does not read must never hold
/// up a stop.
pub fn send_to(socket: &OsStr, message: &[u8]) -> io::Result<()> {
    let addr = notify_addr(socket)?;
    let datagram = UnixDatagram::unbound()?;
    datagram.set_nonblocking(true)?;
    let sent = datagram.send_to_addr(message, &addr)?;
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the notification was cut short",
        ));
    }
    Ok(())
}

fn notify_addr(socket: &OsStr) -> io::Result<SocketAddr> {
    match socket.as_bytes() {
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        [b'/', ..] => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unsupported NOTIFY_SOCKET {:?}: expected a path or @name",
                OsString::from(socket)
            ),
        )),
    }
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares with.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("ringlb-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind");
        send_to(path.as_os_str(), b"READY=1\n").expect("send");
        assert_eq!(receive(&socket), "READY=1\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("ringlb-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind");
        send_to(OsStr::new(&format!("@{name}")), b"STOPPING=1\n").expect("send");
        assert_eq!(receive(&socket), "STOPPING=1\n");
    }

    #[test]
    fn refuses_what_is_neither_path_nor_abstract() {
        assert!(send_to(OsStr::new("vsock:2:1234"), b"READY=1\n").is_err());
        assert!(send_to(OsStr::new(""), b"READY=1\n").is_err());
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let before = monotonic_usec();
        let message = reloading_message("reloading", monotonic_usec());
        let usec: u64 = message
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .expect("MONOTONIC_USEC line");
        assert!(message.starts_with("RELOADING=1\n"));
        assert!(usec >= before && usec > 0);
    }
}
