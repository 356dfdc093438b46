//! Counters, and their rendering in the Prometheus text format for the
//! stats endpoint. Workers only ever add to atomics; reading them is the
//! control plane's business.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::server::Frontend;

#[derive(Default)]
pub struct FrontendStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    /// Times a worker stopped accepting because the frontend was at its
    /// maxconn (new clients then wait in the kernel's accept queue).
    pub maxconn_reached: AtomicU64,
    /// Accepts that failed (out of fds or memory): the listener pauses.
    pub accept_errors: AtomicU64,
    /// Closed because no backend was up or every one failed to connect.
    pub no_backend: AtomicU64,
    /// Receives that found the worker's buffers all held (by sends to slow
    /// peers) and moved to splice: a sign that `buffers` is too small.
    pub buffers_exhausted: AtomicU64,
}

/// A metric: name, Prometheus type, and where its value lives.
type Metric<S> = (&'static str, &'static str, fn(&S) -> &AtomicU64);

/// All counters of all frontends, one metric family per counter.
pub fn render(frontends: &[Arc<Frontend>]) -> String {
    let mut out = String::new();
    render_global(&mut out, frontends);
    let frontend_metrics: [Metric<FrontendStats>; 6] = [
        ("ringlb_frontend_connections_total", "counter", |s| {
            &s.accepted
        }),
        ("ringlb_frontend_connections_active", "gauge", |s| &s.active),
        ("ringlb_frontend_maxconn_reached_total", "counter", |s| {
            &s.maxconn_reached
        }),
        ("ringlb_frontend_accept_errors_total", "counter", |s| {
            &s.accept_errors
        }),
        ("ringlb_frontend_no_backend_total", "counter", |s| {
            &s.no_backend
        }),
        ("ringlb_frontend_buffers_exhausted_total", "counter", |s| {
            &s.buffers_exhausted
        }),
    ];
    for (name, kind, get) in frontend_metrics {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for f in frontends {
            let _ = writeln!(
                out,
                "{name}{{frontend=\"{}\"}} {}",
                f.config.name,
                get(&f.stats).load(Relaxed)
            );
        }
    }
    let backend_metrics: [Metric<crate::pool::BackendStats>; 8] = [
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
            for b in &f.pool.backends {
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
        for b in &f.pool.backends {
            let _ = writeln!(
                out,
                "ringlb_backend_up{{frontend=\"{}\",backend=\"{}\"}} {}",
                f.config.name,
                b.name,
                u8::from(b.is_up())
            );
        }
    }
    out
}

/// The process-wide series: the connection limit, its use, and the
/// workers' completion queues.
fn render_global(out: &mut String, frontends: &[Arc<Frontend>]) {
    let Some(global) = frontends.first().map(|f| &f.global) else {
        return;
    };
    let series: [(&str, &str, u64); 5] = [
        ("ringlb_connection_limit", "gauge", global.limit),
        (
            "ringlb_connections_active",
            "gauge",
            global.active.load(Relaxed),
        ),
        (
            "ringlb_connection_limit_reached_total",
            "counter",
            global.limit_reached.load(Relaxed),
        ),
        (
            "ringlb_completion_queue_dropped_total",
            "counter",
            global.cq_dropped.load(Relaxed),
        ),
        (
            "ringlb_completion_queue_overflowed_total",
            "counter",
            global.cq_overflowed.load(Relaxed),
        ),
    ];
    for (name, kind, value) in series {
        let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
    }
}
