//! The measuring half of the ACL table benchmark, shared by
//! `examples/acl_bench` (ringlb's own table) and `bench/acl-crates` (the
//! same measurements for the prefix-table crates it was compared with), so
//! both print figures taken the same way.
//!
//! Each case (a table, a family, a size, a seed) runs in a child process of
//! its own: the resident-memory delta then counts that table alone, not
//! what earlier cases left in the allocator. Cases are interleaved (every
//! table of a size before the next run), so a burst of load from the other
//! jobs on the machine hits all tables alike; each figure printed is the
//! median over the runs.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::{Duration, Instant};

/// A prefix table under test, loaded from a list file's text.
pub trait Table: Sized {
    /// Parses and builds, as a config load does.
    fn load(text: &str) -> Result<Self, String>;
    fn contains(&self, ip: IpAddr) -> bool;
}

/// Runs one case of table `T` in this process and prints its figures.
pub type CaseFn = fn(&Case) -> Result<Figures, String>;

pub const SIZES: [usize; 3] = [10, 1_000, 100_000];
/// Larger than this machine's last-level cache (32 MiB) by half again: a
/// walk over it leaves none of the table in any cache, nor in the TLB.
const EVICT_BYTES: usize = 48 << 20;
/// Probes per kind (hits, misses) for the warm loop.
const PROBES: usize = 4096;
/// Single lookups timed after an eviction, per kind.
const COLD_SAMPLES: usize = 61;
/// How long the warm loop runs.
const WARM: Duration = Duration::from_millis(150);

pub struct Case {
    pub v6: bool,
    pub n: usize,
    pub seed: u64,
}

/// What one case measured.
pub struct Figures {
    pub load_ms: f64,
    pub rss_kib: f64,
    pub warm_hit_ns: f64,
    pub warm_miss_ns: f64,
    pub cold_hit_ns: f64,
    pub cold_miss_ns: f64,
}

impl Figures {
    fn to_line(&self) -> String {
        [
            self.load_ms,
            self.rss_kib,
            self.warm_hit_ns,
            self.warm_miss_ns,
            self.cold_hit_ns,
            self.cold_miss_ns,
        ]
        .map(|x| format!("{x:.2}"))
        .join(" ")
    }
}

/// A tiny xorshift: the same lists on every machine for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn v6(&mut self) -> u128 {
        u128::from(self.next()) << 64 | u128::from(self.next())
    }
}

fn net4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn net6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

/// One prefix as a blocklist has them: IPv4 /20 to /32 (mostly small
/// networks and hosts), IPv6 /32 to /64.
fn random_prefix(v6: bool, rng: &mut Rng) -> (IpAddr, u8) {
    let r = rng.next();
    if v6 {
        let len = 32 + (r % 33) as u8;
        (IpAddr::V6(Ipv6Addr::from(rng.v6() & net6(len))), len)
    } else {
        let len = 20 + (r % 13) as u8;
        (
            IpAddr::V4(Ipv4Addr::from((r >> 32) as u32 & net4(len))),
            len,
        )
    }
}

/// An address inside the prefix, its host bits random.
fn inside((addr, len): (IpAddr, u8), rng: &mut Rng) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
            u32::from(a) | rng.next() as u32 & !net4(len),
        )),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) | rng.v6() & !net6(len))),
    }
}

fn resident_kib() -> Result<f64, String> {
    let statm = std::fs::read_to_string("/proc/self/statm").map_err(|e| e.to_string())?;
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or("no resident size in /proc/self/statm")?;
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * page as f64 / 1024.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Nanoseconds per lookup, looping over the probes for [`WARM`]: the
/// table's lines the probes need stay in the caches as far as they fit.
fn warm<T: Table>(table: &T, probes: &[IpAddr]) -> f64 {
    let start = Instant::now();
    let mut lookups = 0u64;
    let mut found = 0usize;
    while start.elapsed() < WARM {
        for p in probes {
            found += usize::from(black_box(table).contains(black_box(*p)));
        }
        lookups += probes.len() as u64;
    }
    black_box(found);
    start.elapsed().as_nanos() as f64 / lookups as f64
}

/// The median of single lookups each timed after a walk that evicts the
/// caches, less the median of the same timing around no lookup.
fn cold<T: Table>(table: &T, probes: &[IpAddr], evict: &[u8]) -> f64 {
    let walk = || {
        let sum = evict
            .iter()
            .step_by(64)
            .fold(0u8, |s, b| s.wrapping_add(*b));
        black_box(sum);
    };
    let mut timed = Vec::with_capacity(COLD_SAMPLES);
    for p in probes.iter().take(COLD_SAMPLES) {
        walk();
        let start = Instant::now();
        black_box(black_box(table).contains(black_box(*p)));
        timed.push(start.elapsed().as_nanos() as f64);
    }
    let mut empty = Vec::new();
    for p in probes.iter().take(COLD_SAMPLES / 3) {
        walk();
        let start = Instant::now();
        black_box(black_box(*p));
        empty.push(start.elapsed().as_nanos() as f64);
    }
    median(timed) - median(empty)
}

/// Measures one table in this process.
pub fn run_case<T: Table>(case: &Case) -> Result<Figures, String> {
    let mut rng = Rng(case.seed | 1);
    let prefixes: Vec<(IpAddr, u8)> = (0..case.n)
        .map(|_| random_prefix(case.v6, &mut rng))
        .collect();
    let text: String = prefixes.iter().map(|(a, l)| format!("{a}/{l}\n")).collect();
    let evict = vec![1u8; EVICT_BYTES];
    let before = resident_kib()?;
    let start = Instant::now();
    let table = T::load(&text)?;
    let load = start.elapsed();
    let rss = resident_kib()? - before;
    let hits: Vec<IpAddr> = (0..PROBES)
        .map(|_| inside(prefixes[rng.next() as usize % prefixes.len()], &mut rng))
        .collect();
    if let Some(missed) = hits.iter().find(|ip| !table.contains(**ip)) {
        return Err(format!("{missed} is in a listed prefix but not found"));
    }
    let mut misses = Vec::with_capacity(PROBES);
    while misses.len() < PROBES {
        let ip = match case.v6 {
            true => IpAddr::V6(Ipv6Addr::from(rng.v6())),
            false => IpAddr::V4(Ipv4Addr::from(rng.next() as u32)),
        };
        if !table.contains(ip) {
            misses.push(ip);
        }
    }
    Ok(Figures {
        load_ms: load.as_secs_f64() * 1e3,
        rss_kib: rss,
        warm_hit_ns: warm(&table, &hits),
        warm_miss_ns: warm(&table, &misses),
        cold_hit_ns: cold(&table, &hits, &evict),
        cold_miss_ns: cold(&table, &misses, &evict),
    })
}

const USAGE: &str = "usage: [--runs N] [--tables NAME,...] [--sizes N,...]";

/// The entry point: as a child, measures the case its arguments name; as
/// the parent, runs every case in children and prints the medians.
pub fn main(tables: &[(&str, CaseFn)]) -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("case") {
        return child(tables, &args[1..]);
    }
    let mut runs = 5;
    let mut names: Vec<String> = tables.iter().map(|(n, _)| n.to_string()).collect();
    let mut sizes = SIZES.to_vec();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(USAGE)?;
        match flag.as_str() {
            "--runs" => runs = value.parse().map_err(|_| USAGE)?,
            "--tables" => names = value.split(',').map(str::to_string).collect(),
            "--sizes" => {
                sizes = value
                    .split(',')
                    .map(|s| s.parse().map_err(|_| USAGE))
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(USAGE.into()),
        }
    }
    println!("{runs} runs each, medians; lookups in ns, cold = after a 48 MiB cache-evicting walk");
    println!(
        "{:<18} {:>3} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "table", "fam", "prefixes", "load ms", "RSS KiB", "warm hit", "miss", "cold hit", "miss"
    );
    for v6 in [false, true] {
        for &n in &sizes {
            report(&names, v6, n, runs)?;
        }
    }
    Ok(())
}

fn child(tables: &[(&str, CaseFn)], args: &[String]) -> Result<(), String> {
    let [name, family, n, seed] = args else {
        return Err("case NAME v4|v6 N SEED".into());
    };
    let (_, run) = tables
        .iter()
        .find(|(t, _)| t == name)
        .ok_or_else(|| format!("no table {name}"))?;
    let case = Case {
        v6: family == "v6",
        n: n.parse().ok().filter(|n| *n > 0).ok_or("bad N")?,
        seed: seed.parse().map_err(|_| "bad SEED")?,
    };
    println!("{}", run(&case)?.to_line());
    Ok(())
}

/// Runs every table `runs` times at one size, interleaved, and prints a
/// line of medians per table.
fn report(names: &[String], v6: bool, n: usize, runs: usize) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let family = if v6 { "v6" } else { "v4" };
    let mut columns = vec![vec![Vec::new(); 6]; names.len()];
    for run in 0..runs {
        let seed = (run as u64 + 1) * 0x9e37_79b9_7f4a_7c15;
        for (name, columns) in names.iter().zip(&mut columns) {
            let out = Command::new(&exe)
                .args(["case", name, family, &n.to_string(), &seed.to_string()])
                .output()
                .map_err(|e| e.to_string())?;
            let line = String::from_utf8_lossy(&out.stdout);
            let values: Vec<f64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if !out.status.success() || values.len() != 6 {
                return Err(format!(
                    "{name} {family} {n}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            for (column, value) in columns.iter_mut().zip(values) {
                column.push(value);
            }
        }
    }
    for (name, columns) in names.iter().zip(columns) {
        let m: Vec<f64> = columns.into_iter().map(median).collect();
        println!(
            "{name:<18} {family:>3} {n:>7} {:>9.2} {:>9.0} {:>9.1} {:>9.1} {:>9.0} {:>9.0}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
    }
    Ok(())
}
