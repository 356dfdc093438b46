//! ringlb's ACL table against the prefix-table crates, with the harness of
//! `examples/acl_bench`: see Cargo.toml beside this file.

#[allow(dead_code)]
#[path = "../../../src/acl.rs"]
mod acl;
#[path = "../../../examples/acl_bench/harness.rs"]
mod harness;

use std::net::IpAddr;

use harness::{CaseFn, Table};

/// Every table is loaded from the same parse (ringlb's), so load times
/// differ by the building alone.
fn prefixes(text: &str) -> Result<Vec<(IpAddr, u8)>, String> {
    Ok(acl::parse_list(text, "bench")?
        .into_iter()
        .map(|c| (c.network(), c.prefix_len()))
        .collect())
}

struct Ringlb(acl::PrefixSet);

impl Table for Ringlb {
    fn load(text: &str) -> Result<Self, String> {
        Ok(Ringlb(acl::PrefixSet::new(&acl::parse_list(
            text, "bench",
        )?)))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(ip)
    }
}

/// prefix-trie: a tree bitmap (multi-bit nodes of 5 levels), one per
/// family; aggregated after loading, as ringlb merges its ranges.
struct PrefixTrie(
    prefix_trie::PrefixSet<(u32, u8)>,
    prefix_trie::PrefixSet<(u128, u8)>,
);

impl Table for PrefixTrie {
    fn load(text: &str) -> Result<Self, String> {
        let mut v4 = prefix_trie::PrefixSet::new();
        let mut v6 = prefix_trie::PrefixSet::new();
        for (addr, len) in prefixes(text)? {
            match addr {
                IpAddr::V4(a) => v4.insert((u32::from(a), len)),
                IpAddr::V6(a) => v6.insert((u128::from(a), len)),
            };
        }
        v4.aggregate();
        v6.aggregate();
        Ok(PrefixTrie(v4, v6))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match acl::canonical(ip) {
            IpAddr::V4(a) => self.0.is_covered(&(u32::from(a), 32)),
            IpAddr::V6(a) => self.1.is_covered(&(u128::from(a), 128)),
        }
    }
}

/// iptrie: a Patricia trie compressed into a level-compressed trie (read
/// only). Its sets always hold the /0 root, which a lookup returns when no
/// listed prefix matches, so a listed /0 is remembered apart.
struct IpTrie {
    v4: iptrie::Ipv4LCTrieSet,
    v6: iptrie::Ipv6LCTrieSet,
    all_v4: bool,
    all_v6: bool,
}

impl Table for IpTrie {
    fn load(text: &str) -> Result<Self, String> {
        let mut v4 = iptrie::Ipv4RTrieSet::new();
        let mut v6 = iptrie::Ipv6RTrieSet::new();
        let (mut all_v4, mut all_v6) = (false, false);
        for (addr, len) in prefixes(text)? {
            match addr {
                IpAddr::V4(a) => {
                    all_v4 |= len == 0;
                    v4.insert(iptrie::Ipv4Prefix::new(a, len).map_err(|e| format!("{e:?}"))?);
                }
                IpAddr::V6(a) => {
                    all_v6 |= len == 0;
                    v6.insert(iptrie::Ipv6Prefix::new(a, len).map_err(|e| format!("{e:?}"))?);
                }
            }
        }
        Ok(IpTrie {
            v4: v4.compress(),
            v6: v6.compress(),
            all_v4,
            all_v6,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        use iptrie::IpPrefix;
        match acl::canonical(ip) {
            IpAddr::V4(a) => self.all_v4 || self.v4.lookup(&a).len() > 0,
            IpAddr::V6(a) => self.all_v6 || self.v6.lookup(&a).len() > 0,
        }
    }
}

/// ip_network_table: the treebitmap crate's tree bitmap behind an
/// IPv4 + IPv6 interface.
struct NetworkTable(ip_network_table::IpNetworkTable<()>);

impl Table for NetworkTable {
    fn load(text: &str) -> Result<Self, String> {
        let mut table = ip_network_table::IpNetworkTable::new();
        for (addr, len) in prefixes(text)? {
            let net = ip_network::IpNetwork::new(addr, len).map_err(|e| e.to_string())?;
            table.insert(net, ());
        }
        Ok(NetworkTable(table))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0.longest_match(acl::canonical(ip)).is_some()
    }
}

const TABLES: [(&str, CaseFn); 4] = [
    ("ringlb", harness::run_case::<Ringlb>),
    ("prefix-trie 0.10", harness::run_case::<PrefixTrie>),
    ("iptrie 0.11 (LC)", harness::run_case::<IpTrie>),
    ("ip_network_table", harness::run_case::<NetworkTable>),
];

fn main() {
    if let Err(e) = harness::main(&TABLES) {
        eprintln!("acl-crates: {e}");
        std::process::exit(1);
    }
}
