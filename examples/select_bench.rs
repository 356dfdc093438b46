//! Selection micro-benchmark: ns per pick for each `balance` algorithm
//! with 2 to 10,000 backends, all up and with a third of them down.
//! `cargo run --release --example select_bench`. One thread; it measures
//! the selector alone, not a connection (see bench/run.sh for that).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use ringlb::config::Config;
use ringlb::model::{BackendShared, FrontendShared, FrontendSnapshot, Health, Tried};

const SIZES: [usize; 5] = [2, 10, 100, 1_000, 10_000];
const ALGORITHMS: [&str; 4] = ["roundrobin", "leastconn", "source", "first"];
/// Each measurement runs this long.
const RUN: Duration = Duration::from_millis(200);

fn frontend(balance: &str, n: usize) -> Result<FrontendSnapshot, String> {
    let backends: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{ address = \"127.1.{}.{}:8080\", weight = {} }}",
                i / 250,
                i % 250 + 1,
                1 + i % 3
            )
        })
        .collect();
    let text = format!(
        "[[frontend]]\nlisten = \"127.0.0.1:1\"\nbalance = \"{balance}\"\nbackends = [{}]\n",
        backends.join(",")
    );
    let config = Config::from_toml(&text, "bench")
        .map_err(|e| e.to_string())?
        .frontends
        .remove(0);
    let shared = Arc::new(FrontendShared::new(&config.name));
    let backends = config
        .backends
        .iter()
        .map(|b| {
            Arc::new(BackendShared::new(
                &config.name,
                &b.name,
                b.addr,
                Arc::new(Health::new(3)),
            ))
        })
        .collect();
    Ok(FrontendSnapshot::new(config, shared, backends))
}

/// Nanoseconds per pick over [`RUN`].
fn measure(mut pick: impl FnMut(u32) -> Option<usize>) -> f64 {
    let tried = Tried::default();
    black_box(&tried);
    let start = Instant::now();
    let mut picks = 0u64;
    while start.elapsed() < RUN {
        for i in 0..1024u32 {
            black_box(pick(i.wrapping_add(picks as u32)));
        }
        picks += 1024;
    }
    start.elapsed().as_nanos() as f64 / picks as f64
}

/// The round robin before weights (a count of usable backends, then the
/// n-th of them: two passes over the pool per pick), for comparison.
fn before(snap: &FrontendSnapshot, next: &AtomicUsize) -> Option<usize> {
    let backends = &snap.backends;
    let usable = |i: &usize| backends[*i].usable();
    let count = (0..backends.len()).filter(usable).count();
    if count == 0 {
        return None;
    }
    let turn = next.fetch_add(1, Relaxed) % count;
    (0..backends.len()).filter(usable).nth(turn)
}

fn main() -> Result<(), String> {
    println!("ns per pick (one thread; weights 1-3; 'down' = every third backend down)");
    print!("{:<22}", "algorithm");
    for n in SIZES {
        print!("{n:>10}");
    }
    println!();
    for down in [false, true] {
        for algorithm in ALGORITHMS {
            print!(
                "{:<22}",
                format!("{algorithm}{}", if down { " down" } else { "" })
            );
            for n in SIZES {
                let snap = frontend(algorithm, n)?;
                if down {
                    for b in snap.backends.iter().step_by(3) {
                        b.health.set_up(false);
                    }
                }
                let none = Tried::default();
                let ns = measure(|i| {
                    let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i));
                    snap.select_for(&none, Some(client))
                });
                print!("{ns:>10.1}");
            }
            println!();
        }
        print!(
            "{:<22}",
            format!("old roundrobin{}", if down { " down" } else { "" })
        );
        for n in SIZES {
            let snap = frontend("roundrobin", n)?;
            if down {
                for b in snap.backends.iter().step_by(3) {
                    b.health.set_up(false);
                }
            }
            let next = AtomicUsize::new(0);
            print!("{:>10.1}", measure(|_| before(&snap, &next)));
        }
        println!();
    }
    Ok(())
}
