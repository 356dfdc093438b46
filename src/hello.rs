//! The TLS ClientHello, read without decrypting anything: enough of it to
//! route a connection by the server name its client asks for (SNI), while
//! the bytes themselves are replayed to the backend untouched.
//!
//! The parser is our own: a few hundred lines, bounded (it looks at no
//! more than [`MAX_HELLO`] bytes), allocation-free and without a panic on
//! any input (`fuzz/fuzz_targets/client_hello.rs` and the corpus replayed
//! by `tests/fuzz_corpus_hello.rs`). The crates that parse TLS handshakes
//! either bring a whole TLS stack or a nom-based parser of every message,
//! and ringlb needs one message and two extensions of it.
//!
//! A ClientHello may span several TLS records (RFC 8446 5.1 lets a
//! handshake message be fragmented), and a record several TCP segments:
//! [`parse`] says `Incomplete` until the whole message is there.

use std::collections::HashMap;

/// The most bytes buffered while waiting for a ClientHello: a hello with
/// post-quantum key shares is under 2 KiB, and one TLS record is 16 KiB.
pub const MAX_HELLO: usize = 16 * 1024;

const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
const CONTENT_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const MAX_RECORD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// RFC 1035: a DNS name is at most 253 characters written out.
const MAX_NAME: usize = 253;

/// Why a ClientHello was refused; also the `reason` label of its metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not TLS, or not a ClientHello, or a length that does not add up.
    Malformed,
    /// Longer than [`MAX_HELLO`].
    Oversized,
    /// Not complete within `timeout-client-hello`.
    Timeout,
    /// The client ended its stream before the hello was complete.
    Closed,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::Malformed,
        Refusal::Oversized,
        Refusal::Timeout,
        Refusal::Closed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Oversized => "oversized",
            Refusal::Timeout => "timeout",
            Refusal::Closed => "closed",
        }
    }
}

/// What a complete ClientHello says that routing needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// The host name, as sent (validated as a DNS name; compare it
    /// lower-cased). `None`: the client sent no SNI.
    pub server_name: Option<HostName>,
    /// The client offered ALPN protocols.
    pub alpn: bool,
}

/// A validated DNS name, held inline (no allocation per hello).
#[derive(Clone, PartialEq, Eq)]
pub struct HostName {
    bytes: [u8; MAX_NAME],
    len: u8,
}

impl HostName {
    fn new(name: &str) -> Option<HostName> {
        let mut bytes = [0u8; MAX_NAME];
        bytes
            .get_mut(..name.len())?
            .copy_from_slice(name.as_bytes());
        Some(HostName {
            bytes,
            len: u8::try_from(name.len()).ok()?,
        })
    }

    pub fn as_str(&self) -> &str {
        // Built from a &str in `new`, and never changed.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Returned by value once per read: 256 bytes on the stack cost less than
/// boxing the name.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed (and may come: the bound is not reached).
    Incomplete,
    Complete(Hello),
    Refused(Refusal),
}

/// Looks at the bytes a client sent so far. Never reads past `buf`, never
/// panics, and returns `Incomplete` only while `buf` is shorter than
/// [`MAX_HELLO`] could still allow.
pub fn parse(buf: &[u8]) -> Parsed {
    match gather(buf) {
        Gathered::Incomplete if buf.len() >= MAX_HELLO => Parsed::Refused(Refusal::Oversized),
        Gathered::Incomplete => Parsed::Incomplete,
        Gathered::Refused(r) => Parsed::Refused(r),
        Gathered::OneRecord(message) => match client_hello(message) {
            Some(hello) => Parsed::Complete(hello),
            None => Parsed::Refused(Refusal::Malformed),
        },
        Gathered::Fragmented => {
            // Rare (a hello larger than a record, or a client that splits
            // it): the parts are copied together once, on the stack.
            let mut joined = [0u8; MAX_HELLO];
            match join(buf, &mut joined) {
                Some(len) => match client_hello(&joined[..len]) {
                    Some(hello) => Parsed::Complete(hello),
                    None => Parsed::Refused(Refusal::Malformed),
                },
                None => Parsed::Refused(Refusal::Malformed),
            }
        }
    }
}

enum Gathered<'a> {
    Incomplete,
    Refused(Refusal),
    /// The whole handshake message, inside the first record.
    OneRecord(&'a [u8]),
    /// The whole message is there, over several records.
    Fragmented,
}

/// Walks the record headers: is the whole ClientHello message there?
fn gather(buf: &[u8]) -> Gathered<'_> {
    let mut at = 0;
    let mut payload = 0usize;
    let mut needed: Option<usize> = None;
    loop {
        let Some(header) = buf.get(at..at + RECORD_HEADER) else {
            return Gathered::Incomplete;
        };
        // A TLS record of the handshake type with a 3.x version: an SSLv2
        // hello or a plain-text protocol on a TLS port is refused here.
        if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
            return Gathered::Refused(Refusal::Malformed);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Gathered::Refused(Refusal::Malformed);
        }
        let start = at + RECORD_HEADER;
        let end = start + len;
        if end > MAX_HELLO {
            return Gathered::Refused(Refusal::Oversized);
        }
        if needed.is_none() {
            // The handshake header opens the first record; one split over
            // records is allowed by the RFC but sent by no client.
            if len < HANDSHAKE_HEADER {
                return Gathered::Refused(Refusal::Malformed);
            }
            let Some(hs) = buf.get(start..start + HANDSHAKE_HEADER) else {
                return Gathered::Incomplete;
            };
            if hs[0] != CLIENT_HELLO {
                return Gathered::Refused(Refusal::Malformed);
            }
            let body = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
            let total = HANDSHAKE_HEADER + body;
            // Each record adds its header: a message needing more than the
            // bound is refused now, not after buffering it all.
            if total + RECORD_HEADER * total.div_ceil(MAX_RECORD) > MAX_HELLO {
                return Gathered::Refused(Refusal::Oversized);
            }
            needed = Some(total);
        }
        payload += buf.len().min(end) - start;
        if let Some(total) = needed.filter(|t| payload >= *t) {
            if at == 0 {
                return Gathered::OneRecord(&buf[start..start + total]);
            }
            return Gathered::Fragmented;
        }
        if buf.len() < end {
            return Gathered::Incomplete;
        }
        at = end;
    }
}

/// Copies the fragments of the message into `out`; its length.
fn join(buf: &[u8], out: &mut [u8; MAX_HELLO]) -> Option<usize> {
    let mut at = 0;
    let mut len = 0;
    let mut total = None;
    while total.is_none_or(|t| len < t) {
        let header = buf.get(at..at + RECORD_HEADER)?;
        if header[0] != CONTENT_HANDSHAKE {
            return None;
        }
        let record = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let start = at + RECORD_HEADER;
        let end = (start + record).min(buf.len());
        let part = buf.get(start..end)?;
        out.get_mut(len..len + part.len())?.copy_from_slice(part);
        len += part.len();
        if total.is_none() && len >= HANDSHAKE_HEADER {
            let body = usize::from(out[1]) << 16 | usize::from(out[2]) << 8 | usize::from(out[3]);
            total = Some(HANDSHAKE_HEADER + body);
        }
        at = start + record;
    }
    total
}

/// A byte reader that fails (`None`) instead of reading past its end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// The handshake message (header included) as a ClientHello.
fn client_hello(message: &[u8]) -> Option<Hello> {
    let mut r = Reader { buf: message };
    if r.u8()? != CLIENT_HELLO {
        return None;
    }
    let len = r.take(3)?;
    let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
    let mut r = Reader { buf: r.take(len)? };
    let version = r.u16()?;
    if version >> 8 != 3 {
        return None;
    }
    r.take(32)?; // random
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return None;
    }
    if r.vec8()?.is_empty() {
        return None; // compression methods: "null" at least
    }
    let mut hello = Hello::default();
    if r.buf.is_empty() {
        return Some(hello); // no extensions (old clients): no SNI
    }
    let mut exts = Reader { buf: r.vec16()? };
    if !r.buf.is_empty() {
        return None;
    }
    let mut seen_sni = false;
    while !exts.buf.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        match kind {
            EXT_SERVER_NAME if seen_sni => return None,
            EXT_SERVER_NAME => {
                seen_sni = true;
                hello.server_name = server_name(data)?.and_then(HostName::new);
            }
            EXT_ALPN => hello.alpn = alpn(data)?,
            _ => {}
        }
    }
    Some(hello)
}

/// The server_name extension (RFC 6066 3): the host_name entry, if any.
/// An empty extension (a server's echo) carries none.
fn server_name(data: &[u8]) -> Option<Option<&str>> {
    if data.is_empty() {
        return Some(None);
    }
    let mut outer = Reader { buf: data };
    let mut list = Reader {
        buf: outer.vec16()?,
    };
    if !outer.buf.is_empty() || list.buf.is_empty() {
        return None;
    }
    let mut name = None;
    while !list.buf.is_empty() {
        let kind = list.u8()?;
        let value = list.vec16()?;
        // RFC 6066: at most one name of each type; host_name is type 0.
        if kind == 0 {
            if name.is_some() {
                return None;
            }
            name = Some(host_name(value)?);
        }
    }
    Some(name)
}

/// A DNS host name (letters, digits, `-`, `_`, dots; one trailing dot
/// allowed): anything else is refused, so what reaches the logs is safe.
fn host_name(value: &[u8]) -> Option<&str> {
    let name = value.strip_suffix(b".").unwrap_or(value);
    if name.is_empty() || name.len() > MAX_NAME {
        return None;
    }
    let valid_label = |label: &[u8]| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
    };
    if !name.split(|c| *c == b'.').all(valid_label) {
        return None;
    }
    std::str::from_utf8(name).ok()
}

/// The ALPN extension (RFC 7301): a list of non-empty protocol names.
fn alpn(data: &[u8]) -> Option<bool> {
    let mut outer = Reader { buf: data };
    let list = outer.vec16()?;
    if !outer.buf.is_empty() || list.is_empty() {
        return None;
    }
    let mut r = Reader { buf: list };
    while !r.buf.is_empty() {
        if r.vec8()?.is_empty() {
            return None;
        }
    }
    Some(true)
}

/// Server names to routes: exact names first, then the longest matching
/// wildcard (`*.foobar.com` matches any name that ends in `.foobar.com`,
/// at any depth, as nginx's `server_name`), else no route.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, usize>,
    /// Suffixes with their leading dot (`.foobar.com`), longest first.
    wildcards: Vec<(String, usize)>,
}

impl Router {
    /// `routes[i]` lists the patterns of route `i`, already checked.
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a [String]>) -> Router {
        let mut router = Router::default();
        for (i, patterns) in routes.into_iter().enumerate() {
            for pattern in patterns {
                let pattern = pattern.to_ascii_lowercase();
                match pattern.strip_prefix('*') {
                    Some(suffix) => router.wildcards.push((suffix.to_string(), i)),
                    None => {
                        router.exact.entry(pattern).or_insert(i);
                    }
                }
            }
        }
        router
            .wildcards
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        router
    }

    pub fn route(&self, name: &str) -> Option<usize> {
        let mut lower = [0u8; MAX_NAME];
        let bytes = name.as_bytes();
        let lower = lower.get_mut(..bytes.len())?;
        lower.copy_from_slice(bytes);
        lower.make_ascii_lowercase();
        let name = std::str::from_utf8(lower).ok()?;
        if let Some(&i) = self.exact.get(name) {
            return Some(i);
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map(|&(_, i)| i)
    }
}

/// Checks one `sni` pattern of the config: a host name, or `*.` and one.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    if name.contains('*') || host_name(name.as_bytes()).is_none() || name.ends_with('.') {
        return Err(format!(
            "'{pattern}' is not a host name or a wildcard such as *.example.com"
        ));
    }
    Ok(())
}

/// Test helpers: ClientHellos as real clients send them.
pub mod build {
    /// A ClientHello with these extensions, in one record.
    pub fn client_hello(server_name: Option<&str>, padding: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = server_name {
            let mut entry = vec![0u8];
            entry.extend((name.len() as u16).to_be_bytes());
            entry.extend(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend(entry);
            exts.extend(0u16.to_be_bytes());
            exts.extend((list.len() as u16).to_be_bytes());
            exts.extend(list);
        }
        // ALPN h2, http/1.1
        let protocols = b"\x02h2\x08http/1.1";
        exts.extend(16u16.to_be_bytes());
        exts.extend(((protocols.len() + 2) as u16).to_be_bytes());
        exts.extend((protocols.len() as u16).to_be_bytes());
        exts.extend(protocols);
        if padding > 0 {
            // The padding extension (21), as large key shares make a hello.
            exts.extend(21u16.to_be_bytes());
            exts.extend((padding as u16).to_be_bytes());
            exts.extend(std::iter::repeat_n(0u8, padding));
        }
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(32);
        body.extend([9u8; 32]);
        body.extend(4u16.to_be_bytes());
        body.extend([0x13, 0x01, 0x13, 0x02]);
        body.extend([1, 0]);
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut message = vec![1];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        records(&message, 1 << 14)
    }

    /// The message cut into records of at most `max` bytes each.
    pub fn records(message: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in message.chunks(max) {
            out.extend([22, 3, 1]);
            out.extend((part.len() as u16).to_be_bytes());
            out.extend(part);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sni(buf: &[u8]) -> Option<String> {
        match parse(buf) {
            Parsed::Complete(h) => h.server_name.map(|n| n.as_str().to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_hello_gives_its_server_name_and_alpn() {
        let hello = build::client_hello(Some("www.foobar.com"), 0);
        assert_eq!(sni(&hello).as_deref(), Some("www.foobar.com"));
        let Parsed::Complete(h) = parse(&hello) else {
            panic!()
        };
        assert!(h.alpn);
        assert_eq!(sni(&build::client_hello(None, 0)), None);
    }

    #[test]
    fn every_prefix_is_incomplete_and_the_whole_complete() {
        let hello = build::client_hello(Some("a.b"), 1500);
        for cut in 0..hello.len() {
            assert_eq!(parse(&hello[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        assert_eq!(sni(&hello).as_deref(), Some("a.b"));
        // Bytes after the hello (a client that sends early data) are fine.
        let mut more = hello.clone();
        more.extend(b"xyz");
        assert_eq!(sni(&more).as_deref(), Some("a.b"));
    }

    #[test]
    fn a_hello_fragmented_over_records_is_joined() {
        let one = build::client_hello(Some("frag.example.com"), 3000);
        let message = &one[5..];
        for size in [100, 1000, 4096] {
            let split = build::records(message, size);
            for cut in 0..split.len() {
                assert_eq!(parse(&split[..cut]), Parsed::Incomplete, "{size} {cut}");
            }
            assert_eq!(sni(&split).as_deref(), Some("frag.example.com"), "{size}");
        }
    }

    #[test]
    fn not_tls_and_broken_lengths_are_malformed() {
        let refused = Parsed::Refused(Refusal::Malformed);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), refused);
        assert_eq!(parse(&[22, 3, 1, 0, 0]), refused);
        let mut hello = build::client_hello(Some("x.y"), 0);
        hello[5] = 2; // a ServerHello
        assert_eq!(parse(&hello), refused);
        let mut hello = build::client_hello(Some("x.y"), 0);
        hello[8] -= 1; // the message ends before its extensions do
        assert_eq!(parse(&hello), refused);
        assert_eq!(parse(&build::client_hello(Some("bad name!"), 0)), refused);
    }

    #[test]
    fn a_hello_over_the_bound_is_oversized_at_once() {
        let hello = build::client_hello(Some("x.y"), 20_000);
        assert_eq!(parse(&hello[..100]), Parsed::Refused(Refusal::Oversized));
        let junk = [22u8, 3, 1, 0x40, 0];
        assert_eq!(parse(&junk), Parsed::Refused(Refusal::Oversized));
    }

    #[test]
    fn exact_names_beat_wildcards_and_longer_wildcards_win() {
        let routes = [
            vec!["*.foobar.com".to_string()],
            vec!["www.foobar.com".to_string()],
            vec!["*.api.foobar.com".to_string()],
        ];
        let router = Router::new(routes.iter().map(Vec::as_slice));
        assert_eq!(router.route("WWW.foobar.com"), Some(1));
        assert_eq!(router.route("img.foobar.com"), Some(0));
        assert_eq!(router.route("a.b.foobar.com"), Some(0));
        assert_eq!(router.route("v1.api.foobar.com"), Some(2));
        assert_eq!(router.route("foobar.com"), None);
        assert_eq!(router.route("xfoobar.com"), None);
    }

    #[test]
    fn patterns_are_checked() {
        assert!(check_pattern("www.foobar.com").is_ok());
        assert!(check_pattern("*.foobar.com").is_ok());
        for bad in ["*", "*foo.com", "a.*.com", "a b", "", "x..y", "a."] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }
}
