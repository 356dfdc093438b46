//! What each fuzz target checks beyond "no panic, no hang": shared by the
//! libFuzzer targets (fuzz_targets/) and by tests/fuzz_corpus.rs, which
//! replays every committed corpus file on stable Rust in `cargo test`.

use ringlb::acl::{self, Cidr, PrefixSet};
use ringlb::config::Config;
use ringlb::proxy::{self, Parsed, Version};

/// The PROXY header parser: bounded, final, and in agreement with the
/// builder.
pub fn proxy_header(data: &[u8]) {
    let parsed = proxy::parse(data);
    match parsed {
        Parsed::Partial => assert!(
            data.len() < proxy::MAX_HEADER,
            "still undecided after {} bytes",
            data.len()
        ),
        Parsed::Done { len, addrs } => {
            assert!(len <= data.len() && len <= proxy::MAX_HEADER, "{len}");
            // Decided by its own bytes: the client's bytes after it do not
            // change it, and a shorter read is only ever "read more".
            assert_eq!(proxy::parse(&data[..len]), parsed);
            for cut in [len - 1, len / 2] {
                assert_eq!(proxy::parse(&data[..cut]), Parsed::Partial, "cut at {cut}");
            }
            if let Some((client, server)) = addrs {
                rebuilt_alike(client, server);
            }
        }
        Parsed::Invalid(why) => {
            // A refusal is final: no more bytes make it a header.
            let mut more = data.to_vec();
            more.extend_from_slice(b"\r\n");
            assert!(
                matches!(proxy::parse(&more), Parsed::Invalid(_)),
                "{why:?} then valid"
            );
        }
    }
}

/// A header built from parsed addresses parses back to them (IPv4-mapped
/// addresses come back as IPv4, which is what the builder sends).
fn rebuilt_alike(client: std::net::SocketAddr, server: std::net::SocketAddr) {
    let canonical =
        |a: std::net::SocketAddr| std::net::SocketAddr::new(acl::canonical(a.ip()), a.port());
    for version in [Version::V1, Version::V2] {
        let header = proxy::header(version, client, server);
        let Parsed::Done {
            len,
            addrs: Some((c, s)),
        } = proxy::parse(&header)
        else {
            panic!("{version}: the built header does not parse: {header:?}");
        };
        assert_eq!(len, header.len());
        let same = canonical(c) == canonical(client) && canonical(s) == canonical(server);
        assert!(same, "{version}: {client} {server} came back as {c} {s}");
    }
}

/// The config parser: any text gives a config or one line naming the
/// problem, never a panic. Host names are not resolved (no DNS queries
/// from arbitrary input) and list files are not read (no arbitrary path
/// is opened: the cidr_list target covers their parser).
pub fn config(data: &[u8]) {
    ringlb::config::resolve_names(false);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("file") {
        return;
    }
    match Config::from_toml(text, "fuzz.toml") {
        Ok(config) => {
            let _ = config.validate();
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("fuzz.toml"), "{message}");
        }
    }
}

/// The CIDR list parser (allow-file, deny-file): what it accepts prints
/// and parses back the same, and the set built from it contains each.
pub fn cidr_list(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match acl::parse_list(text, "list") {
        Ok(cidrs) => {
            let set = PrefixSet::new(&cidrs);
            for cidr in &cidrs {
                let shown = cidr.to_string();
                assert_eq!(Cidr::parse(&shown).as_ref(), Ok(cidr), "{shown}");
                let network = shown.split('/').next().unwrap_or_default();
                let ip: std::net::IpAddr = network.parse().expect("an address");
                assert!(set.contains(ip), "{shown} not in its own set");
            }
        }
        Err(e) => assert!(e.starts_with("list:"), "{e}"),
    }
}
