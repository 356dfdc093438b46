//! Every committed fuzz input (fuzz/corpus/TARGET, and fuzz/regressions/
//! TARGET for inputs that once failed) through the same checks as the
//! libFuzzer targets, on stable Rust: CI keeps the parsers honest without
//! a nightly toolchain. See fuzz/README.md.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let data = std::fs::read(&path).expect("a corpus file");
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "{} fails {target}'s checks",
                path.display()
            );
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no committed input for {target}");
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header", checks::proxy_header);
}

#[test]
fn config_corpus() {
    replay("config", checks::config);
}

#[test]
fn cidr_list_corpus() {
    replay("cidr_list", checks::cidr_list);
}
