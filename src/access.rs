//! The access log: one line per connection of a frontend with `log =
//! true`, written at its end at info level under the target
//! [`TARGET`], through the non-blocking logger (a stalled stderr drops
//! lines and counts them; it never stalls a worker).
//!
//! The fields are HAProxy's `option tcplog` ones: client address and port,
//! frontend, backend, time to connect, total duration, bytes each way and
//! why the connection ended. Text is `key=value` pairs (grep and people);
//! `log-format = "json"` writes the same as one JSON object.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::config::AccessLog;
use crate::relay::End;

/// The log target, so `RUST_LOG=warn,ringlb::access=info` keeps the
/// access log and quiets the rest.
pub const TARGET: &str = "ringlb::access";

/// One ended connection, as the worker knows it.
#[derive(Serialize)]
pub struct Entry<'a> {
    /// `None` only if the client was gone before its address was read.
    pub client: Option<SocketAddr>,
    pub frontend: &'a str,
    /// The backend it relayed to; `None` when it never got one.
    pub backend: Option<&'a str>,
    /// From accept to the backend's accept, retries included (HAProxy's
    /// Tc, which it too leaves out when no connect succeeded).
    pub connect_ms: Option<u64>,
    /// From accept to the end (HAProxy's Tt).
    pub duration_ms: u64,
    /// Client to backend.
    pub bytes_up: u64,
    /// Backend to client.
    pub bytes_down: u64,
    /// A short code (see [`end_code`]).
    pub end: &'static str,
    /// The SNI route that chose the backend (frontends with routes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<&'a str>,
    /// The server name of the client's ClientHello, when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<&'a str>,
}

impl Entry<'_> {
    pub fn write(&self, format: AccessLog) {
        match format {
            AccessLog::Off => {}
            // Formatted straight into the logger's line: no second string.
            AccessLog::Text => log::info!(target: TARGET, "{self}"),
            AccessLog::Json => log::info!(target: TARGET, "{}", self.json()),
        }
    }

    pub fn json(&self) -> String {
        // Plain strings and numbers always serialize; an empty object
        // would still be one line of valid JSON.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

/// The text form: `key=value` pairs, `-` for what the connection never had.
impl fmt::Display for Entry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("client=")?;
        match self.client {
            Some(addr) => write!(f, "{addr}")?,
            None => f.write_str("-")?,
        }
        write!(
            f,
            " frontend={} backend={} connect_ms=",
            self.frontend,
            self.backend.unwrap_or("-")
        )?;
        match self.connect_ms {
            Some(ms) => write!(f, "{ms}")?,
            None => f.write_str("-")?,
        }
        write!(
            f,
            " duration_ms={} bytes_up={} bytes_down={} end={}",
            self.duration_ms, self.bytes_up, self.bytes_down, self.end
        )?;
        if let Some(route) = self.route {
            write!(f, " route={route} sni={}", self.sni.unwrap_or("-"))?;
        }
        Ok(())
    }
}

/// Milliseconds, as the log writes durations.
pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Why a connection ended, as one word a log query can match: which side
/// ended it, or which limit or operator action did.
pub fn end_code(end: Option<End>) -> &'static str {
    match end {
        Some(End::Done) => "done",
        Some(End::ClientReset) => "client-reset",
        Some(End::BackendReset) => "backend-reset",
        Some(End::IdleTimeout) => "idle-timeout",
        Some(End::ClientFinTimeout) => "client-fin-timeout",
        Some(End::ServerFinTimeout) => "server-fin-timeout",
        Some(End::NoBackend) => "no-backend",
        Some(End::BackendDown) => "backend-down",
        Some(End::Stopped) => "stopped",
        Some(End::BackendClosed) => "backend-closed",
        Some(End::FrontendRemoved) => "frontend-removed",
        Some(End::LocalError) => "local-error",
        Some(End::ProxyHeader) => "proxy-header",
        Some(End::Refused) => "refused",
        Some(End::HelloRefused) => "bad-hello",
        Some(End::QueueTimeout) => "queue-timeout",
        Some(End::ClientAborted) => "client-aborted",
        Some(End::HandshakeFailed) => "tls-handshake",
        None => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            client: Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
            frontend: "web",
            backend: None,
            connect_ms: None,
            duration_ms: 3,
            bytes_up: 0,
            bytes_down: 0,
            end: end_code(Some(End::NoBackend)),
            route: None,
            sni: None,
        }
    }

    #[test]
    fn a_connection_without_backend_shows_dashes_and_nulls() {
        let e = entry();
        assert_eq!(
            e.to_string(),
            "client=127.0.0.1:40000 frontend=web backend=- connect_ms=- duration_ms=3 \
             bytes_up=0 bytes_down=0 end=no-backend"
        );
        let v: serde_json::Value = serde_json::from_str(&e.json()).expect("json");
        assert_eq!(v["backend"], serde_json::Value::Null);
        assert_eq!(v["client"], "127.0.0.1:40000");
        assert_eq!(v["end"], "no-backend");
    }
}
