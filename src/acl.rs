//! Source address lists: CIDR parsing and the prefix table a frontend's
//! `allow` / `deny` rules are checked against at accept.
//!
//! A list is kept as sorted, disjoint address ranges (one vector per
//! family), built once per config: a lookup is a binary search with no
//! allocation, over ranges packed in one array. A large list (1,024 ranges
//! or more) also gets an index on the top 16 bits of the address, which
//! narrows the search to the few ranges of that block: a lookup in 100,000
//! prefixes then reads two cache lines of index and one or two of ranges,
//! where a plain binary search (17 steps over 1 MiB) would miss the cache
//! at most of them. Merged ranges make equality between two loads (a
//! reload that changed nothing) a plain comparison.
//!
//! Why not a prefix-table crate: they were measured against this table
//! (bench/acl-crates, the harness of `cargo run --release --example
//! acl_bench`) and lost where it matters. A trie walks down to the listed
//! prefix's length, one node (and at worst one cache miss) per 1 to 5
//! bits, where the index jumps to the right block at once: at 100,000
//! random IPv4 prefixes of /20 to /32 a hit cost 3x (iptrie 0.11's
//! LC-trie) to 15x (prefix-trie 0.10, ip_network_table 0.2) as long warm
//! and 2x to 4x as long cache-cold, for 1.5x to 4x the memory, and each
//! loaded more slowly. IPv6 lists came out alike. At 1,000 prefixes the
//! LC-trie was level (IPv4) or faster warm (IPv6 hits, 70 against 140 ns:
//! below 1,024 ranges this table has no index), but its sets are neither
//! `Clone` nor `Eq`, which a config (compared on reload) needs. The address
//! parsing is std's; a CIDR crate (ipnet) would replace only the split at
//! `/` and the length's parse, since the bare address, the host-bit check
//! and the messages naming the text stay ours either way.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`), as a dual-stack listener
//! sees IPv4 clients, are IPv4 here, in rules and in lookups alike.

use std::fmt;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// The largest list file read: 100,000 IPv6 prefixes take about 4 MiB.
pub const MAX_LIST_BYTES: u64 = 64 * 1024 * 1024;

/// One prefix: an address with its host bits zero, and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or
    /// /128). Host bits set (`10.0.0.1/8`) are refused: such a rule is
    /// usually a typo that would match far more than meant.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| {
            format!("invalid address '{text}': expected a CIDR such as 10.0.0.0/8 or 2001:db8::/32")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_text {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max && !l.starts_with('+'))
                .ok_or_else(|| format!("invalid prefix length in '{text}': 0 to {max}"))?,
        };
        let cidr = Cidr { addr, len };
        if cidr.masked() != cidr.addr {
            return Err(format!(
                "'{text}' has bits set past its /{len}: write {}/{len} for the network, or the \
                 address alone for one host",
                cidr.masked()
            ));
        }
        Ok(cidr.canonical())
    }

    /// The network address (host bits zero).
    pub fn network(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    fn masked(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.len))),
        }
    }

    /// An IPv4-mapped rule of /96 or longer is the IPv4 rule it maps.
    fn canonical(self) -> Cidr {
        match self.addr {
            IpAddr::V6(a) if self.len >= 96 => match a.to_ipv4_mapped() {
                Some(v4) => Cidr {
                    addr: IpAddr::V4(v4),
                    len: self.len - 96,
                },
                None => self,
            },
            _ => self,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// An IPv4-mapped IPv6 address is the IPv4 address it carries.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Parses a list file's text: one CIDR per line, `#` starts a comment
/// (also after an entry), blank lines are skipped. Errors name
/// `origin:line`. Pure: no I/O, no panic on any input.
pub fn parse_list(text: &str, origin: &str) -> Result<Vec<Cidr>, String> {
    let mut cidrs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        let cidr = Cidr::parse(entry).map_err(|e| format!("{origin}:{}: {e}", index + 1))?;
        cidrs.push(cidr);
    }
    Ok(cidrs)
}

/// Reads a list file (at most [`MAX_LIST_BYTES`]) and parses it.
pub fn read_list(path: &Path) -> Result<Vec<Cidr>, String> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_LIST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if bytes.len() as u64 > MAX_LIST_BYTES {
        return Err(format!(
            "{shown} is larger than {} MiB: refused (is it the right file?)",
            MAX_LIST_BYTES >> 20
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| format!("{shown}: not UTF-8 text"))?;
    parse_list(&text, &shown.to_string())
}

/// A set of prefixes as sorted, disjoint, inclusive address ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefixSet {
    v4: Ranges<u32>,
    v6: Ranges<u128>,
    /// Prefixes it was built from (before merging), for log lines.
    prefixes: usize,
}

impl PrefixSet {
    pub fn new(cidrs: &[Cidr]) -> PrefixSet {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for cidr in cidrs {
            match cidr.addr {
                IpAddr::V4(a) => {
                    let start = u32::from(a);
                    v4.push((start, start | !mask32(cidr.len)));
                }
                IpAddr::V6(a) => {
                    let start = u128::from(a);
                    v6.push((start, start | !mask128(cidr.len)));
                }
            }
        }
        PrefixSet {
            v4: Ranges::new(v4),
            v6: Ranges::new(v6),
            prefixes: cidrs.len(),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(a) => self.v4.contains(u32::from(a)),
            IpAddr::V6(a) => self.v6.contains(u128::from(a)),
        }
    }

    pub fn prefixes(&self) -> usize {
        self.prefixes
    }

    pub fn is_empty(&self) -> bool {
        self.v4.ranges.is_empty() && self.v6.ranges.is_empty()
    }
}

/// Ranges from which on a family gets its index: below, the binary search
/// stays in a few cache lines anyway.
const INDEXED_FROM: usize = 1024;
/// One entry per value of an address's top 16 bits, plus the end.
const BLOCKS: usize = 1 << 16;

/// One family's ranges, with the index once there are many.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ranges<T> {
    ranges: Vec<(T, T)>,
    /// `index[h]`: the first range that ends in block `h` or later. The
    /// range holding an address of block `h`, if any, is among
    /// `index[h]..=index[h + 1]`: any later one starts past the block.
    index: Vec<u32>,
}

impl<T: num::Addr> Ranges<T> {
    fn new(ranges: Vec<(T, T)>) -> Ranges<T> {
        let ranges = merge(ranges);
        let index = if ranges.len() >= INDEXED_FROM {
            (0..=BLOCKS)
                .map(|h| ranges.partition_point(|r| r.1.block() < h) as u32)
                .collect()
        } else {
            Vec::new()
        };
        Ranges { ranges, index }
    }

    fn contains(&self, x: T) -> bool {
        if self.index.is_empty() {
            return within(&self.ranges, x);
        }
        let h = x.block();
        let first = self.index[h] as usize;
        let last = (self.index[h + 1] as usize + 1).min(self.ranges.len());
        within(&self.ranges[first..last.max(first)], x)
    }
}

/// Sorts ranges and joins those that overlap or touch.
fn merge<T: num::Addr>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        if let Some(last) = out.last_mut()
            && (start <= last.1 || last.1.successor() == Some(start))
        {
            last.1 = last.1.max(end);
            continue;
        }
        out.push((start, end));
    }
    out.shrink_to_fit();
    out
}

fn within<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    let after = ranges.partition_point(|r| r.0 <= x);
    after > 0 && ranges[after - 1].1 >= x
}

mod num {
    /// An address as a number: IPv4 as u32, IPv6 as u128.
    pub trait Addr: Copy + Ord {
        fn successor(self) -> Option<Self>;
        /// Its top 16 bits.
        fn block(self) -> usize;
    }
    impl Addr for u32 {
        fn successor(self) -> Option<u32> {
            self.checked_add(1)
        }
        fn block(self) -> usize {
            (self >> 16) as usize
        }
    }
    impl Addr for u128 {
        fn successor(self) -> Option<u128> {
            self.checked_add(1)
        }
        fn block(self) -> usize {
            (self >> 112) as usize
        }
    }
}

/// A frontend's source rules: deny wins; with an allow list, only what it
/// lists gets in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    /// `None`: no allow rule, everyone not denied gets in.
    pub allow: Option<PrefixSet>,
    pub deny: PrefixSet,
}

impl Acl {
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.deny.contains(ip) {
            return false;
        }
        self.allow.as_ref().is_none_or(|a| a.contains(ip))
    }

    /// For the start and reload log.
    pub fn describe(&self) -> String {
        let allow = self.allow.as_ref().map_or_else(
            || "everyone".to_string(),
            |a| format!("{} prefixes", a.prefixes()),
        );
        format!("allow {allow}, deny {} prefixes", self.deny.prefixes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn set(list: &[&str]) -> PrefixSet {
        let cidrs: Vec<Cidr> = list.iter().map(|c| Cidr::parse(c).expect("cidr")).collect();
        PrefixSet::new(&cidrs)
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(Cidr::parse("10.0.0.0/8").map(|c| c.len), Ok(8));
        assert_eq!(Cidr::parse(" 10.1.2.3 ").map(|c| c.len), Ok(32));
        assert_eq!(Cidr::parse("::1").map(|c| c.len), Ok(128));
        assert_eq!(Cidr::parse("0.0.0.0/0").map(|c| c.len), Ok(0));
        assert_eq!(Cidr::parse("::/0").map(|c| c.len), Ok(0));
        assert!(
            Cidr::parse("10.0.0.1/8")
                .unwrap_err()
                .contains("10.0.0.0/8")
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0.0/+8").is_err());
        assert!(Cidr::parse("10.0.0.0/").is_err());
        assert!(Cidr::parse("2001:db8::/129").is_err());
        assert!(Cidr::parse("example.com").is_err());
        assert!(Cidr::parse("10.0.0.0/8/8").is_err());
        assert!(Cidr::parse("").is_err());
        // An IPv4-mapped rule is the IPv4 rule.
        assert_eq!(
            Cidr::parse("::ffff:10.0.0.0/104"),
            Cidr::parse("10.0.0.0/8")
        );
        let mapped = Cidr::parse("::ffff:192.0.2.0/120").expect("cidr");
        assert_eq!(mapped.network(), ip("192.0.2.0"));
        assert_eq!(mapped.prefix_len(), 24);
    }

    #[test]
    fn list_errors_name_file_and_line() {
        let text = "# office\n10.0.0.0/8\n\n  192.0.2.7  # one host\n2001:db8::/32\n";
        assert_eq!(parse_list(text, "a.txt").map(|l| l.len()), Ok(3));
        let err = parse_list("10.0.0.0/8\n\nnot-an-ip\n", "a.txt").unwrap_err();
        assert!(err.starts_with("a.txt:3: "), "{err}");
        assert_eq!(parse_list("", "a.txt"), Ok(Vec::new()));
        assert!(parse_list("\u{0}\u{ffff}/\n", "x").is_err());
    }

    #[test]
    fn lookups_follow_prefixes_and_families() {
        let s = set(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "10.2.0.0/16"]);
        assert!(s.contains(ip("10.255.1.1")));
        assert!(!s.contains(ip("11.0.0.0")));
        assert!(s.contains(ip("192.0.2.7")));
        assert!(!s.contains(ip("192.0.2.8")));
        assert!(!s.contains(ip("192.0.2.6")));
        assert!(s.contains(ip("2001:db8:ffff::1")));
        assert!(!s.contains(ip("2001:db9::")));
        // A dual-stack listener's IPv4 client matches IPv4 rules.
        assert!(s.contains(ip("::ffff:10.1.2.3")));
        assert!(!s.contains(ip("::ffff:11.1.2.3")));
        let all = set(&["0.0.0.0/0", "::/0"]);
        assert!(all.contains(ip("255.255.255.255")) && all.contains(ip("::")));
        // Adjacent and nested ranges merge.
        let merged = set(&["10.0.0.0/9", "10.128.0.0/9", "10.1.0.0/16"]);
        assert_eq!(merged.v4.ranges, vec![(0x0a00_0000, 0x0aff_ffff)]);
        assert_eq!(merged.prefixes(), 3);
    }

    #[test]
    fn deny_wins_and_allow_is_exclusive() {
        let acl = Acl {
            allow: Some(set(&["127.0.0.0/8"])),
            deny: set(&["127.0.0.3"]),
        };
        assert!(acl.allows(ip("127.0.0.2")));
        assert!(!acl.allows(ip("127.0.0.3")));
        assert!(!acl.allows(ip("10.0.0.1")));
        let deny_only = Acl {
            allow: None,
            deny: set(&["127.0.0.3"]),
        };
        assert!(deny_only.allows(ip("10.0.0.1")));
        assert!(!deny_only.allows(ip("::ffff:127.0.0.3")));
    }

    /// The index finds exactly what a plain binary search finds: at every
    /// range's edges, and between.
    #[test]
    fn the_index_agrees_with_the_plain_search() {
        let mut seed = 0x2545_f491_4f6c_dd1d;
        let text = random_list(20_000, &mut seed);
        let set = PrefixSet::new(&parse_list(&text, "list").expect("list"));
        assert!(!set.v4.index.is_empty() && !set.v6.index.is_empty());
        let mut probes: Vec<u32> = vec![0, 1, u32::MAX, u32::MAX - 1];
        for &(start, end) in &set.v4.ranges {
            probes.extend([start, end, start.wrapping_sub(1), end.wrapping_add(1)]);
        }
        for x in probes {
            assert_eq!(set.v4.contains(x), within(&set.v4.ranges, x), "{x:#x}");
        }
        for &(start, end) in &set.v6.ranges {
            for x in [start, end, start.wrapping_sub(1), end.wrapping_add(1)] {
                assert_eq!(set.v6.contains(x), within(&set.v6.ranges, x), "{x:#x}");
            }
        }
        let edge = PrefixSet::new(&[Cidr::parse("255.255.0.0/16").expect("cidr")]);
        assert!(edge.contains("255.255.255.255".parse().expect("ip")));
    }

    /// A tiny xorshift, so the table is the same on every run.
    fn random_list(n: usize, seed: &mut u64) -> String {
        let mut text = String::with_capacity(n * 20);
        for i in 0..n {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            if i % 4 == 3 {
                let len = 32 + (*seed % 33) as u8;
                let addr = u128::from(*seed) << 64 & mask128(len);
                text.push_str(&format!("{}/{len}\n", Ipv6Addr::from(addr)));
            } else {
                // /20 to /32, as blocklists are: mostly hosts and small nets.
                let len = 20 + (*seed % 13) as u8;
                let addr = (*seed >> 32) as u32 & mask32(len);
                text.push_str(&format!("{}/{len}\n", Ipv4Addr::from(addr)));
            }
        }
        text
    }

    /// The best of several runs: the other jobs on the machine only ever
    /// add time.
    fn ns_per_lookup(acl: &Acl, probes: &[IpAddr]) -> f64 {
        (0..7)
            .map(|_| {
                let start = Instant::now();
                let mut hits = 0usize;
                for p in probes {
                    hits += usize::from(std::hint::black_box(acl).allows(*p));
                }
                std::hint::black_box(hits);
                start.elapsed().as_nanos() as f64 / probes.len() as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Not a timed assert (the machine is shared): prints what a lookup
    /// and a load cost, for the report. `cargo test --release --lib acl --
    /// --nocapture` shows it.
    #[test]
    fn a_large_list_costs_about_what_a_small_one_does() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let small_text = random_list(10, &mut seed);
        let large_text = random_list(100_000, &mut seed);
        let started = Instant::now();
        let large = PrefixSet::new(&parse_list(&large_text, "large").expect("large list"));
        let load = started.elapsed();
        let small = PrefixSet::new(&parse_list(&small_text, "small").expect("small list"));
        let probes: Vec<IpAddr> = (0..100_000u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761);
                if i % 4 == 0 {
                    IpAddr::V6(Ipv6Addr::from(u128::from(x) << 96 | 1))
                } else {
                    IpAddr::V4(Ipv4Addr::from(x))
                }
            })
            .collect();
        let acl = |s: PrefixSet| Acl {
            allow: None,
            deny: s,
        };
        let mut unindexed = large.clone();
        unindexed.v4.index.clear();
        unindexed.v6.index.clear();
        let (small, large, unindexed) = (acl(small), acl(large), acl(unindexed));
        let small_ns = ns_per_lookup(&small, &probes);
        let large_ns = ns_per_lookup(&large, &probes);
        let unindexed_ns = ns_per_lookup(&unindexed, &probes);
        println!(
            "acl: lookup {small_ns:.0} ns with 10 prefixes, {large_ns:.0} ns with 100,000 \
             ({unindexed_ns:.0} ns without the index; {} v4 + {} v6 ranges after merging); \
             parsing and building 100,000 took {load:?}",
            large.deny.v4.ranges.len(),
            large.deny.v6.ranges.len()
        );
        assert!(load < Duration::from_secs(60), "{load:?}");
        // Every listed prefix is found, whatever the size.
        for line in large_text.lines().take(1000) {
            let cidr = Cidr::parse(line).expect("cidr");
            assert!(large.deny.contains(cidr.addr), "{cidr}");
        }
    }
}
