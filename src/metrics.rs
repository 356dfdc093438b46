//! Counters, and their rendering in the Prometheus text format for the
//! stats endpoint. Workers only ever add to atomics; reading them is the
//! control plane's business.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use crate::model::{BackendStats, FrontendStats};
use crate::model::{ReloadStats, Snapshot};

/// A metric: name, Prometheus type, and where its value lives.
type Metric<S> = (&'static str, &'static str, fn(&S) -> &AtomicU64);

/// All counters of all frontends, one metric family per counter.
pub fn render(snapshot: &Snapshot, reloads: &ReloadStats) -> String {
    let frontends = &snapshot.frontends;
    let mut out = String::new();
    let frontend_metrics: [Metric<FrontendStats>; 7] = [
        ("ringlb_frontend_connections_total", "counter", |s| {
            &s.accepted
        }),
        ("ringlb_frontend_connections_active", "gauge", |s| &s.active),
        ("ringlb_frontend_rejected_maxconn_total", "counter", |s| {
            &s.rejected_maxconn
        }),
        ("ringlb_frontend_no_backend_total", "counter", |s| {
            &s.no_backend
        }),
        ("ringlb_frontend_buffers_exhausted_total", "counter", |s| {
            &s.buffers_exhausted
        }),
        ("ringlb_frontend_pipe_fallbacks_total", "counter", |s| {
            &s.pipe_fallbacks
        }),
        ("ringlb_frontend_local_errors_total", "counter", |s| {
            &s.local_errors
        }),
    ];
    for (name, kind, get) in frontend_metrics {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for f in frontends {
            let _ = writeln!(
                out,
                "{name}{{frontend=\"{}\"}} {}",
                f.config.name,
                get(&f.shared.stats).load(Relaxed)
            );
        }
    }
    let backend_metrics: [Metric<BackendStats>; 8] = [
        ("ringlb_backend_connections_total", "counter", |s| {
            &s.connections
        }),
        ("ringlb_backend_connections_active", "gauge", |s| &s.active),
        ("ringlb_backend_connect_failures_total", "counter", |s| {
            &s.connect_failures
        }),
        ("ringlb_backend_bytes_sent_total", "counter", |s| {
            &s.bytes_to_backend
        }),
        ("ringlb_backend_bytes_received_total", "counter", |s| {
            &s.bytes_from_backend
        }),
        ("ringlb_backend_marked_down_total", "counter", |s| {
            &s.went_down
        }),
        ("ringlb_backend_marked_up_total", "counter", |s| &s.went_up),
        ("ringlb_backend_checks_failed_total", "counter", |s| {
            &s.checks_failed
        }),
    ];
    for (name, kind, get) in backend_metrics {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for f in frontends {
            for b in &f.backends {
                let _ = writeln!(
                    out,
                    "{name}{{frontend=\"{}\",backend=\"{}\"}} {}",
                    f.config.name,
                    b.name,
                    get(&b.stats).load(Relaxed)
                );
            }
        }
    }
    let _ = writeln!(out, "# TYPE ringlb_backend_up gauge");
    for f in frontends {
        for b in &f.backends {
            let _ = writeln!(
                out,
                "ringlb_backend_up{{frontend=\"{}\",backend=\"{}\"}} {}",
                f.config.name,
                b.name,
                u8::from(b.is_up())
            );
        }
    }
    let reload_metrics: [Metric<ReloadStats>; 3] = [
        ("ringlb_reloads_total", "counter", |s| &s.reloads),
        ("ringlb_reload_failures_total", "counter", |s| &s.failures),
        ("ringlb_last_reload_timestamp_seconds", "gauge", |s| {
            &s.last_success
        }),
    ];
    for (name, kind, get) in reload_metrics {
        let _ = writeln!(
            out,
            "# TYPE {name} {kind}\n{name} {}",
            get(reloads).load(Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# TYPE ringlb_log_lines_dropped_total counter\nringlb_log_lines_dropped_total {}",
        crate::logging::dropped()
    );
    out
}
