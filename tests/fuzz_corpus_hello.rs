//! Replays every file of the ClientHello fuzz corpus (fuzz/corpus/
//! client_hello/, what `cargo fuzz run client_hello` found and the seeds)
//! through the parser on stable Rust, then mutates the seeds with a fixed
//! random sequence: no input may panic, and the captured real hellos must
//! keep parsing as they did.

use std::path::Path;

use ringlb::hello::{MAX_HELLO, Parsed, parse};

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/client_hello");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("the corpus directory")
        .map(|e| {
            let path = e.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            (name, std::fs::read(&path).expect("read corpus file"))
        })
        .collect();
    files.sort();
    files
}

fn sni(data: &[u8]) -> Option<String> {
    match parse(data) {
        Parsed::Complete(h) => h.server_name.map(|n| n.as_str().to_string()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_corpus_file_parses_without_panic_and_real_hellos_give_their_name() {
    let files = corpus();
    assert!(files.len() >= 8, "the seeds are missing");
    for (_, data) in &files {
        let _ = parse(data);
    }
    let get = |name: &str| &files.iter().find(|(n, _)| n == name).expect(name).1;
    for seed in [
        "seed-openssl-tls13-sni",
        "seed-openssl-tls12-sni",
        "seed-curl",
        "seed-fragmented-records",
    ] {
        assert_eq!(sni(get(seed)).as_deref(), Some("www.foobar.com"), "{seed}");
    }
    assert_eq!(sni(get("seed-openssl-no-sni")), None);
    assert_eq!(
        sni(get("seed-openssl-alpn-groups")).as_deref(),
        Some("api.foobar.com")
    );
    assert_eq!(parse(get("seed-truncated")), Parsed::Incomplete);
    assert!(matches!(parse(get("seed-http")), Parsed::Refused(_)));
}

/// xorshift64: the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn mutated_seeds_never_panic() {
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|(_, d)| d).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..40_000 {
        let mut data = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(data.len());
            match rng.below(5) {
                0 if !data.is_empty() => data[at] = rng.next() as u8,
                1 if !data.is_empty() => data[at] ^= 1 << rng.below(8),
                2 => data.truncate(at),
                3 => data.insert(at.min(data.len()), rng.next() as u8),
                _ => {
                    // Lengths are where parsers break: set one to an edge.
                    if at + 1 < data.len() {
                        let edge = [0u16, 1, 0xff, 0x100, 0x3fff, 0x4000, 0xffff];
                        let v = edge[rng.below(edge.len())].to_be_bytes();
                        data[at..at + 2].copy_from_slice(&v);
                    }
                }
            }
        }
        data.truncate(MAX_HELLO + 64);
        let _ = parse(&data);
    }
}
