//! ACL prefix table benchmark: load time, resident memory, and ns per
//! lookup (hits and misses, warm and cache-cold) of `ringlb::acl` with 10,
//! 1,000 and 100,000 random IPv4 and IPv6 prefixes.
//! `cargo run --release --example acl_bench [-- --runs 5]`. One thread; it
//! measures the table alone, not a connection (bench/run.sh does that).
//! bench/acl-crates runs the same measurements for the prefix-table crates
//! the table was compared with.

mod harness;

use std::net::IpAddr;

use harness::{CaseFn, Table};
use ringlb::acl::{PrefixSet, parse_list};

impl Table for PrefixSet {
    fn load(text: &str) -> Result<PrefixSet, String> {
        Ok(PrefixSet::new(&parse_list(text, "bench")?))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        PrefixSet::contains(self, ip)
    }
}

const TABLES: [(&str, CaseFn); 1] = [("ringlb", harness::run_case::<PrefixSet>)];

fn main() {
    if let Err(e) = harness::main(&TABLES) {
        eprintln!("acl_bench: {e}");
        std::process::exit(1);
    }
}
