//! The runtime model seen from outside: pools of any size.

mod common;

use std::time::Duration;

use common::*;

/// No pool-size cap: a frontend with 70 backends starts, and a connection
/// retries past 64 refusing ones (the old 64-bit tried mask's limit) to
/// the one that answers (with `retries` raised from HAProxy's 3 to allow
/// that many attempts).
#[test]
fn a_pool_of_seventy_backends_retries_past_the_sixty_fourth() {
    let live = Backend::start(named("live"));
    let mut backends: Vec<String> = (0..69).map(|_| format!("\"{}\"", refused_addr())).collect();
    backends.sort();
    backends.dedup();
    backends.push(format!("\"{}\"", live.addr_str()));
    let text = format!(
        "[[frontend]]\nlisten = \"127.0.0.1:0\"\nmode = \"active-passive\"\n\
         check-interval = \"1h\"\nretries = 69\nbackends = [{}]\n",
        backends.join(", ")
    );
    let path = std::env::temp_dir().join(format!("ringlb-model-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write config");
    let path_str = path.to_str().expect("utf-8 path").to_string();
    let ringlb = Ringlb::start_raw(&["--config", &path_str]);
    let _ = std::fs::remove_file(&path);
    assert!(
        backends.len() > 65,
        "only {} distinct ports",
        backends.len()
    );
    assert_eq!(
        which(ringlb.addr).unwrap_or_else(|e| panic!("{e}; logs:\n{}", ringlb.logs())),
        "live"
    );
    // Three in a row mark the refusing ones down (fall = 3); after that
    // the live one is the first usable.
    for _ in 0..3 {
        assert_eq!(which(ringlb.addr).expect("served"), "live");
    }
    assert!(
        ringlb
            .wait_log("is DOWN", Duration::from_secs(10))
            .is_some(),
        "the refusing backends are marked down by live failures"
    );
}
