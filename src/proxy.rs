//! The PROXY protocol (HAProxy's spec, versions 1 and 2): the header a
//! balancer sends before the client's bytes so that the next hop knows
//! who the client was.
//!
//! Our own parser and builder rather than the `ppp` crate: the worker
//! needs three answers from a partial read (need more bytes, a header of
//! N bytes, or refuse it and why) with hard bounds before any byte is
//! trusted, and no allocation on the data path; the formats are small and
//! fixed, and the parser is fuzzed (fuzz/fuzz_targets/proxy_header.rs).
//!
//! The config, the model and the worker use it; it uses only [`crate::acl`]
//! (its prefixes, for the trusted upstreams).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Deserialize;

pub use crate::acl::Cidr;
use crate::acl::PrefixSet;

/// Version 1's longest header, CRLF included (the spec's bound).
pub const V1_MAX: usize = 107;
/// The longest version 2 header accepted, TLVs included. The format allows
/// 64 KiB; what cloud balancers send (addresses, a few TLVs: an endpoint
/// id, an ALPN, a TLS summary) fits in a few hundred bytes, and a peer
/// may never make ringlb hold more than this per connection before it
/// knows where the connection goes.
pub const MAX_HEADER: usize = 4096;
/// Version 2's signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// How long a trusted upstream gets to send its header.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Which header to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// Text: `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// Binary: what HAProxy, nginx and the cloud balancers prefer.
    V2,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

fn unmap_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(crate::acl::canonical(addr.ip()), addr.port())
}

/// A frontend's PROXY protocol settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `send-proxy`: the header every backend of the frontend gets, unless
    /// the backend's own `send-proxy` says otherwise.
    pub send: Option<Version>,
    /// `accept-proxy`: read a header from a trusted upstream first.
    pub accept: Option<Accept>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    /// `accept-proxy-from`: only these peers may send a header; any other
    /// peer is reset at accept. Never empty (the config refuses that).
    pub from: PrefixSet,
    /// `timeout-proxy-header`: from accept to the header's last byte.
    pub timeout: Duration,
}

impl Accept {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.from.contains(ip)
    }
}

/// Reads `accept-proxy-from`; `what` names the key for messages.
pub fn parse_from(list: &[String], what: &str) -> Result<Vec<Cidr>, String> {
    list.iter()
        .map(|c| Cidr::parse(c).map_err(|e| format!("{what}: {e}")))
        .collect()
}

/// The `accept-proxy` settings, checked as a whole: a header read from
/// anyone would let any client claim any address, so the trusted peers
/// must be listed (`0.0.0.0/0` and `::/0` trust everyone, as HAProxy's
/// `accept-proxy` does, but only when written down).
pub fn accept(
    on: bool,
    from: Option<Vec<Cidr>>,
    timeout: Option<Duration>,
) -> Result<Option<Accept>, String> {
    match (on, from) {
        (false, None) if timeout.is_none() => Ok(None),
        (false, _) => Err(
            "accept-proxy-from and timeout-proxy-header need accept-proxy = true \
             (without it no header is read)"
                .into(),
        ),
        (true, None) => Err(
            "accept-proxy needs accept-proxy-from: the addresses of the balancers allowed to \
             send a PROXY header (everyone else is reset); [\"0.0.0.0/0\", \"::/0\"] trusts \
             every peer"
                .into(),
        ),
        (true, Some(from)) if from.is_empty() => Err(
            "accept-proxy-from is empty: it would refuse every client; list the balancers \
             allowed to send a PROXY header"
                .into(),
        ),
        (true, Some(from)) => Ok(Some(Accept {
            from: PrefixSet::new(&from),
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
        })),
    }
}

/// Why a connection was refused before it reached a backend, as counted
/// in `ringlb_frontend_proxy_refused_total{reason=...}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The peer is not in `accept-proxy-from`.
    Untrusted,
    /// No complete header within `timeout-proxy-header`.
    Timeout,
    /// The peer ended or reset its stream before the header was complete.
    Truncated,
    /// Not a PROXY header, or one that breaks the spec.
    Malformed,
    /// Longer than version 1's 107 bytes or [`MAX_HEADER`].
    Oversized,
    /// A version 2 signature with a version other than 2.
    Version,
    /// A version 2 header whose CRC32C TLV does not match its bytes: it
    /// was damaged on its way, or forged by something that did not know
    /// to fix the checksum up.
    Checksum,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Untrusted,
        Refusal::Timeout,
        Refusal::Truncated,
        Refusal::Malformed,
        Refusal::Oversized,
        Refusal::Version,
        Refusal::Checksum,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Untrusted => "untrusted",
            Refusal::Timeout => "timeout",
            Refusal::Truncated => "truncated",
            Refusal::Malformed => "malformed",
            Refusal::Oversized => "oversized",
            Refusal::Version => "version",
            Refusal::Checksum => "bad-checksum",
        }
    }
}

/// Refusals of one frontend, by reason.
#[derive(Default)]
pub struct Refusals([AtomicU64; Refusal::ALL.len()]);

impl Refusals {
    pub fn count(&self, why: Refusal) {
        self.0[why as usize].fetch_add(1, Relaxed);
    }

    pub fn get(&self, why: Refusal) -> u64 {
        self.0[why as usize].load(Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|n| n.load(Relaxed)).sum()
    }
}

/// What the bytes read so far hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A valid beginning: read more.
    Partial,
    /// A whole header of `len` bytes; `addrs` is the client's address and
    /// the one it connected to, or `None` for a header that carries none
    /// (v2 LOCAL, as an upstream's health check sends; v1 UNKNOWN; v2
    /// UNSPEC or UNIX): the connection keeps its peer's address.
    Done {
        len: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
    },
    Invalid(Refusal),
}

/// Parses the start of a stream. Never reads past what a header may be:
/// the answer is final once [`V1_MAX`] or [`MAX_HEADER`] bytes are in.
pub fn parse(buf: &[u8]) -> Parsed {
    let n = buf.len().min(V2_SIGNATURE.len());
    if n > 0 && buf[..n] == V2_SIGNATURE[..n] {
        return parse_v2(buf);
    }
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Parsed::Invalid(Refusal::Malformed);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        // The line must end within 107 bytes; a bare LF never ends it.
        return if buf.len() >= V1_MAX {
            Parsed::Invalid(Refusal::Oversized)
        } else {
            Parsed::Partial
        };
    };
    let len = end + 2;
    let Ok(line) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Invalid(Refusal::Malformed);
    };
    match v1_fields(line) {
        Some(addrs) => Parsed::Done { len, addrs },
        None => Parsed::Invalid(Refusal::Malformed),
    }
}

/// The addresses of a v1 line (without its CRLF); `None` if malformed.
fn v1_fields(line: &str) -> Option<Option<(SocketAddr, SocketAddr)>> {
    let mut fields = line.split(' ');
    let (Some("PROXY"), Some(proto)) = (fields.next(), fields.next()) else {
        return None;
    };
    if proto == "UNKNOWN" {
        // The spec: the receiver ignores whatever follows UNKNOWN.
        return Some(None);
    }
    let parts: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = parts[..] else {
        return None;
    };
    let (src, dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (IpAddr::V4(src.parse().ok()?), IpAddr::V4(dst.parse().ok()?)),
        "TCP6" => (IpAddr::V6(src.parse().ok()?), IpAddr::V6(dst.parse().ok()?)),
        _ => return None,
    };
    let sport = port(sport)?;
    let dport = port(dport)?;
    Some(Some((
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
    )))
}

/// A decimal port: digits only, no leading zero, at most 65535.
fn port(text: &str) -> Option<u16> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        // A version byte already seen can be refused early.
        return match buf.get(12) {
            Some(v) if v >> 4 != 2 => Parsed::Invalid(Refusal::Version),
            _ => Parsed::Partial,
        };
    }
    let (version, command, family) = (buf[12] >> 4, buf[12] & 0x0f, buf[13]);
    if version != 2 {
        return Parsed::Invalid(Refusal::Version);
    }
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER {
        return Parsed::Invalid(Refusal::Oversized);
    }
    if command > 1 {
        return Parsed::Invalid(Refusal::Malformed);
    }
    if buf.len() < len {
        return Parsed::Partial;
    }
    let body = &buf[16..len];
    if command == 0 {
        // LOCAL: the spec says to ignore the address block whatever it is.
        return Parsed::Done { len, addrs: None };
    }
    let (addrs, used) = match family {
        0x00 => (None, 0),
        0x11 if body.len() >= 12 => (Some(v2_inet4(body)), 12),
        0x21 if body.len() >= 36 => (Some(v2_inet6(body)), 36),
        0x31 if body.len() >= 216 => (None, 216),
        _ => return Parsed::Invalid(Refusal::Malformed),
    };
    if family == 0x00 {
        // UNSPEC: the spec has the receiver ignore what follows.
        return Parsed::Done { len, addrs };
    }
    match tlvs(&body[used..]) {
        Tlvs::Malformed => Parsed::Invalid(Refusal::Malformed),
        Tlvs::Crc32c(at) if !crc32c_matches(&buf[..len], 16 + used + at) => {
            Parsed::Invalid(Refusal::Checksum)
        }
        _ => Parsed::Done { len, addrs },
    }
}

fn v2_inet4(body: &[u8]) -> (SocketAddr, SocketAddr) {
    let ip = |at: usize| Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]);
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    (
        SocketAddr::new(IpAddr::V4(ip(0)), port(8)),
        SocketAddr::new(IpAddr::V4(ip(4)), port(10)),
    )
}

fn v2_inet6(body: &[u8]) -> (SocketAddr, SocketAddr) {
    let ip = |at: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&body[at..at + 16]);
        Ipv6Addr::from(octets)
    };
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    (
        SocketAddr::new(IpAddr::V6(ip(0)), port(32)),
        SocketAddr::new(IpAddr::V6(ip(16)), port(34)),
    )
}

/// `PP2_TYPE_CRC32C`: a CRC32c of the whole header, taken with its own
/// four bytes zeroed.
const PP2_TYPE_CRC32C: u8 = 0x03;

/// What the TLV list of a v2 header holds, as far as ringlb checks it.
#[derive(Debug, PartialEq, Eq)]
enum Tlvs {
    /// Well formed, no checksum.
    Plain,
    /// Well formed, with a CRC32C TLV whose value starts this many bytes
    /// into the list.
    Crc32c(usize),
    Malformed,
}

/// Walks the TLVs (type, 16-bit length, value): they must exactly fill
/// what follows the addresses (a length running past the header is a
/// forged or broken one), and a CRC32C TLV must be 4 bytes and alone.
fn tlvs(list: &[u8]) -> Tlvs {
    let mut found = Tlvs::Plain;
    let mut at = 0;
    while at < list.len() {
        let [kind, high, low, ..] = list[at..] else {
            return Tlvs::Malformed;
        };
        let value = usize::from(u16::from_be_bytes([high, low]));
        let end = at + 3 + value;
        if end > list.len() {
            return Tlvs::Malformed;
        }
        if kind == PP2_TYPE_CRC32C {
            if value != 4 || found != Tlvs::Plain {
                return Tlvs::Malformed;
            }
            found = Tlvs::Crc32c(at + 3);
        }
        at = end;
    }
    found
}

/// CRC-32C (Castagnoli), the checksum the PROXY spec names.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Whether the header's CRC32C (4 bytes at `at`) is the one of the header
/// with those bytes zeroed; computed in place, without a copy.
fn crc32c_matches(header: &[u8], at: usize) -> bool {
    let sent = u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let mut digest = CRC32C.digest();
    digest.update(&header[..at]);
    digest.update(&[0; 4]);
    digest.update(&header[at + 4..]);
    digest.finalize() == sent
}

/// The header for a connection from `client` to `server` (the address the
/// client connected to). Both in one family: TCP4 when both are IPv4 (an
/// IPv4-mapped IPv6 address counts as IPv4), TCP6 otherwise.
pub fn header(version: Version, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (client, server) = same_family(client, server);
    match version {
        Version::V1 => {
            let proto = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {proto} {} {} {} {}\r\n",
                client.ip(),
                server.ip(),
                client.port(),
                server.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut out = Vec::with_capacity(16 + 36);
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21);
            match (client.ip(), server.ip()) {
                (IpAddr::V4(c), IpAddr::V4(s)) => {
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&c.octets());
                    out.extend_from_slice(&s.octets());
                }
                (c, s) => {
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&v6(c).octets());
                    out.extend_from_slice(&v6(s).octets());
                }
            }
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&server.port().to_be_bytes());
            out
        }
    }
}

/// The header a health check sends (HAProxy's `check-send-proxy`): one
/// that carries no client, so the backend does not log a check as one.
pub fn check_header(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.extend_from_slice(&[0x20, 0x00, 0, 0]);
            out
        }
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn same_family(client: SocketAddr, server: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (c, s) = (unmap_addr(client), unmap_addr(server));
    if c.is_ipv4() == s.is_ipv4() {
        return (c, s);
    }
    let widen = |a: SocketAddr| SocketAddr::new(IpAddr::V6(v6(a.ip())), a.port());
    (widen(c), widen(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[test]
    fn headers_round_trip_in_both_versions_and_families() {
        for (client, server) in [
            ("127.0.0.2:40000", "127.0.0.1:80"),
            ("[2001:db8::1]:1", "[::1]:443"),
        ] {
            let (c, s) = (addr(client), addr(server));
            for version in [Version::V1, Version::V2] {
                let mut bytes = header(version, c, s);
                let len = bytes.len();
                bytes.extend_from_slice(b"GET / HTTP/1.0\r\n");
                assert_eq!(
                    parse(&bytes),
                    Parsed::Done {
                        len,
                        addrs: Some((c, s))
                    },
                    "{version} {client}"
                );
                for cut in 0..len {
                    assert_eq!(parse(&bytes[..cut]), Parsed::Partial, "{version} {cut}");
                }
            }
        }
    }

    #[test]
    fn mapped_clients_are_sent_as_tcp4() {
        let c = addr("[::ffff:127.0.0.2]:5000");
        let s = addr("[::ffff:127.0.0.1]:80");
        assert_eq!(
            header(Version::V1, c, s),
            b"PROXY TCP4 127.0.0.2 127.0.0.1 5000 80\r\n"
        );
        assert_eq!(header(Version::V2, c, s)[13], 0x11);
        let mixed = header(Version::V1, addr("127.0.0.2:1"), addr("[::1]:2"));
        assert_eq!(mixed, b"PROXY TCP6 ::ffff:127.0.0.2 ::1 1 2\r\n");
    }

    #[test]
    fn v1_is_read_strictly() {
        let done = |s: &str| parse(s.as_bytes());
        assert!(matches!(
            done("PROXY UNKNOWN\r\n"),
            Parsed::Done {
                len: 15,
                addrs: None
            }
        ));
        assert!(matches!(
            done("PROXY UNKNOWN 1.2.3.4 x y z\r\n"),
            Parsed::Done { addrs: None, .. }
        ));
        for bad in [
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            "PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            "PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            "PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",
            "PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            "GET / HTTP/1.1\r\n",
            "proxy TCP4",
        ] {
            let got = done(bad);
            assert!(
                matches!(got, Parsed::Invalid(_))
                    || (got == Parsed::Partial && !bad.contains('\r')),
                "{bad:?}: {got:?}"
            );
        }
        assert_eq!(done("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), Parsed::Partial);
        let long = format!("PROXY TCP6 {}", "1".repeat(120));
        assert_eq!(done(&long), Parsed::Invalid(Refusal::Oversized));
        assert_eq!(done(&long[..106]), Parsed::Partial);
        assert_eq!(done("GET"), Parsed::Invalid(Refusal::Malformed));
        assert_eq!(done("PROX"), Parsed::Partial);
        assert_eq!(done(""), Parsed::Partial);
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(command);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn v2_is_read_strictly() {
        let addrs = [127, 0, 0, 2, 127, 0, 0, 1, 0x9c, 0x40, 0, 80];
        let mut with_tlvs = addrs.to_vec();
        with_tlvs.extend_from_slice(&[0x05, 0, 3, b'a', b'b', b'c', 0x04, 0, 0]);
        let header = v2(0x21, 0x11, &with_tlvs);
        assert_eq!(
            parse(&header),
            Parsed::Done {
                len: header.len(),
                addrs: Some((addr("127.0.0.2:40000"), addr("127.0.0.1:80")))
            }
        );
        let mut broken = addrs.to_vec();
        broken.extend_from_slice(&[0x05, 0, 9, b'a']);
        assert_eq!(
            parse(&v2(0x21, 0x11, &broken)),
            Parsed::Invalid(Refusal::Malformed)
        );
        assert_eq!(
            parse(&v2(0x21, 0x11, &addrs[..8])),
            Parsed::Invalid(Refusal::Malformed)
        );
        assert_eq!(
            parse(&v2(0x21, 0x12, &addrs)),
            Parsed::Invalid(Refusal::Malformed),
            "a UDP header on a TCP connection"
        );
        assert_eq!(
            parse(&v2(0x22, 0x11, &addrs)),
            Parsed::Invalid(Refusal::Malformed)
        );
        assert_eq!(
            parse(&v2(0x11, 0x11, &addrs)),
            Parsed::Invalid(Refusal::Version)
        );
        assert_eq!(
            parse(&v2(0x11, 0x11, &addrs)[..13]),
            Parsed::Invalid(Refusal::Version)
        );
        let local = check_header(Version::V2);
        assert_eq!(
            parse(&local),
            Parsed::Done {
                len: 16,
                addrs: None
            }
        );
        assert_eq!(
            parse(&v2(0x20, 0x11, &addrs)),
            Parsed::Done {
                len: 28,
                addrs: None
            }
        );
        let mut huge = v2(0x21, 0x11, &addrs);
        huge[14..16].copy_from_slice(&((MAX_HEADER - 15) as u16).to_be_bytes());
        assert_eq!(parse(&huge), Parsed::Invalid(Refusal::Oversized));
        huge[14..16].copy_from_slice(&((MAX_HEADER - 16) as u16).to_be_bytes());
        assert_eq!(parse(&huge), Parsed::Partial);
    }

    /// A header HAProxy 2.6 sent (`send-proxy-v2 proxy-v2-options
    /// crc32c`), captured on this machine: 127.0.0.7:38313 to
    /// 127.0.0.1:23991, then a CRC32C TLV.
    const HAPROXY_CRC: [u8; 35] = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x11, 0x00,
        0x13, 0x7f, 0x00, 0x00, 0x07, 0x7f, 0x00, 0x00, 0x01, 0x95, 0xa9, 0x5d, 0xb7, 0x03, 0x00,
        0x04, 0x74, 0x1a, 0xc1, 0x5b,
    ];

    /// CRC-32C bit by bit (reflected, polynomial 0x82F63B78), to check the
    /// crate's table against something written apart from it.
    fn crc32c_slow(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for byte in data {
            crc ^= u32::from(*byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A TCP4 header with `tlvs` after the addresses, and a CRC32C TLV
    /// last, filled in.
    fn v2_with_crc(tlvs: &[u8]) -> Vec<u8> {
        let mut body = vec![127, 0, 0, 2, 127, 0, 0, 1, 0x9c, 0x40, 0, 80];
        body.extend_from_slice(tlvs);
        body.extend_from_slice(&[PP2_TYPE_CRC32C, 0, 4, 0, 0, 0, 0]);
        let mut out = v2(0x21, 0x11, &body);
        let crc = crc32c_slow(&out);
        let at = out.len() - 4;
        out[at..].copy_from_slice(&crc.to_be_bytes());
        out
    }

    #[test]
    fn crc32c_is_castagnolis() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c_slow(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_crc32c_tlv_is_verified() {
        assert_eq!(
            parse(&HAPROXY_CRC),
            Parsed::Done {
                len: HAPROXY_CRC.len(),
                addrs: Some((addr("127.0.0.7:38313"), addr("127.0.0.1:23991")))
            },
            "HAProxy's own checksum"
        );
        for tlvs in [&[][..], &[0x05, 0, 3, b'a', b'b', b'c', 0x04, 0, 0]] {
            let good = v2_with_crc(tlvs);
            assert!(matches!(parse(&good), Parsed::Done { .. }), "{tlvs:?}");
            // Any byte changed after the fixed part (addresses, ports,
            // TLVs, the checksum itself) is caught, but the checksum's own
            // type: a header without one is not checked (the spec's way).
            let crc_type = good.len() - 7;
            for at in (16..good.len()).filter(|&at| at != crc_type) {
                let mut bad = good.clone();
                bad[at] ^= 0x20;
                let got = parse(&bad);
                assert!(
                    got == Parsed::Invalid(Refusal::Checksum)
                        || got == Parsed::Invalid(Refusal::Malformed),
                    "byte {at}: {got:?}"
                );
            }
            let mut bad = good.clone();
            let crc = bad.len() - 1;
            bad[crc] ^= 1;
            assert_eq!(parse(&bad), Parsed::Invalid(Refusal::Checksum));
            // Undecided until the whole header is in.
            for cut in 0..good.len() {
                assert_eq!(parse(&bad[..cut]), Parsed::Partial, "{cut}");
            }
        }
        // The bytes after the header are the client's: not checksummed.
        let mut more = HAPROXY_CRC.to_vec();
        more.extend_from_slice(b"hello");
        assert!(matches!(parse(&more), Parsed::Done { len: 35, .. }));
    }

    #[test]
    fn a_crc32c_tlv_must_be_four_bytes_and_alone() {
        let addrs = [127, 0, 0, 2, 127, 0, 0, 1, 0x9c, 0x40, 0, 80];
        for crc in [&[0x03, 0, 3, 1, 2, 3][..], &[0x03, 0, 5, 1, 2, 3, 4, 5]] {
            let header = v2(0x21, 0x11, &[&addrs[..], crc].concat());
            assert_eq!(parse(&header), Parsed::Invalid(Refusal::Malformed));
        }
        let twice = v2_with_crc(&[0x03, 0, 4, 0, 0, 0, 0]);
        assert_eq!(parse(&twice), Parsed::Invalid(Refusal::Malformed));
        // LOCAL: nothing after the fixed part is read, the spec says.
        let mut local = HAPROXY_CRC;
        local[12] = 0x20;
        assert!(matches!(parse(&local), Parsed::Done { addrs: None, .. }));
    }

    #[test]
    fn a_tlv_list_is_walked_to_its_exact_end() {
        let addrs = [127, 0, 0, 2, 127, 0, 0, 1, 0x9c, 0x40, 0, 80];
        for tail in [
            &[0x05][..],
            &[0x05, 0],
            &[0x05, 0, 1],
            &[0x05, 0, 0, 0x04, 0, 2, 1],
            &[0x05, 0xff, 0xff, 1],
        ] {
            let header = v2(0x21, 0x11, &[&addrs[..], tail].concat());
            assert_eq!(
                parse(&header),
                Parsed::Invalid(Refusal::Malformed),
                "{tail:?}"
            );
        }
        let exact = v2(
            0x21,
            0x11,
            &[&addrs[..], &[0x05, 0, 1, 9, 0x04, 0, 0]].concat(),
        );
        assert!(matches!(parse(&exact), Parsed::Done { .. }));
    }

    #[test]
    fn accept_proxy_needs_its_trusted_peers() {
        let from = Some(vec![Cidr::parse("127.0.0.1").expect("cidr")]);
        assert!(accept(true, None, None).is_err());
        assert!(accept(true, Some(vec![]), None).is_err());
        assert!(accept(false, from.clone(), None).is_err());
        assert!(accept(false, None, Some(DEFAULT_TIMEOUT)).is_err());
        assert_eq!(accept(false, None, None), Ok(None));
        let on = accept(true, from, None).expect("valid").expect("on");
        assert_eq!(on.timeout, DEFAULT_TIMEOUT);
        assert!(on.trusts("127.0.0.1".parse().expect("ip")));
        assert!(on.trusts("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!on.trusts("127.0.0.2".parse().expect("ip")));
    }
}
