//! Restart without dropping connections: a new instance binds the same
//! port (SO_REUSEPORT), the old one is drained with SIGTERM.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;

/// Clients still in the old listener's accept queue when it closes are
/// handed to the new one instead of reset (README: "Restart without
/// dropping connections"). Needs root; returns whether it is on.
fn enable_accept_queue_migration() -> bool {
    let path = "/proc/sys/net/ipv4/tcp_migrate_req";
    let _ = std::fs::write(path, "1");
    std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1")
}

#[test]
fn a_new_instance_takes_over_and_the_old_one_drains_without_loss() {
    if !enable_accept_queue_migration() {
        eprintln!("skipped: net.ipv4.tcp_migrate_req cannot be set (needs root)");
        return;
    }
    let old_backend = Backend::start(named("old"));
    let new_backend = Backend::start(named("new"));
    let (old_addr, new_addr) = (old_backend.addr_str(), new_backend.addr_str());
    let mut old = Ringlb::start(&["--backend", &old_addr, "--workers", "2"]);
    let port = old.addr.to_string();
    let new = Ringlb::start_raw(&["--listen", &port, "--backend", &new_addr, "--workers", "2"]);
    assert_eq!(new.addr, old.addr, "both instances share the port");

    // Several clients at once, so that connections are waiting in the old
    // listener's accept queue at the moment it closes.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = old.addr;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let flag = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                while !flag.load(SeqCst) {
                    answers.push((Instant::now(), which(addr).map_err(|e| e.to_string())));
                }
                answers
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    old.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Ok(Some(status)) = old.child.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the old instance did not finish draining"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let old_gone = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, SeqCst);
    let answers: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();

    assert!(status.success(), "the old instance exits 0 after draining");
    let failures: Vec<_> = answers.iter().filter(|(_, a)| a.is_err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} connections failed: {:?}",
        failures.len(),
        answers.len(),
        failures
    );
    assert!(
        answers.iter().any(|(_, a)| a.as_deref() == Ok("old")),
        "the old instance served before"
    );
    let after: Vec<_> = answers.iter().filter(|(at, _)| *at > old_gone).collect();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|(_, a)| a.as_deref() == Ok("new")),
        "only the new instance serves after"
    );
}
