//! Counters, and their rendering in the Prometheus text format for the
//! stats endpoint. Workers only ever add to atomics; reading them is the
//! control plane's business.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::admin::STATS as ADMIN;
use crate::hello::Refusal;
use crate::model::{self, ReloadStats, Snapshot};
pub use crate::model::{BackendStats, FrontendStats};
use crate::tls::Failure;

/// A metric: name, Prometheus type, and where its value lives.
type Metric<S> = (&'static str, &'static str, fn(&S) -> &AtomicU64);

/// A process-wide metric (no labels): name, type, and how to read it.
type Global = (&'static str, &'static str, fn() -> u64);

/// All counters of all frontends, one metric family per counter.
///
/// Prometheus' own text encoder (the `prometheus-client` crate) is not
/// used: it wants its own metric types in its registry and writes the
/// OpenMetrics flavour (it appends `_total` itself and ends with `# EOF`),
/// which would rename our series; our counters are plain atomics, and the
/// one thing its encoder would add, label escaping, is [`escape_label`].
pub fn render(
    snapshot: &Snapshot,
    global: Option<&model::Global>,
    reloads: &ReloadStats,
) -> String {
    let frontends = &snapshot.frontends;
    let mut out = Exposition::default();
    if let Some(global) = global {
        render_global(&mut out, global);
    }
    let frontend_metrics: &[Metric<FrontendStats>] = &[
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
        ("ringlb_frontend_pipe_fallbacks_total", "counter", |s| {
            &s.pipe_fallbacks
        }),
        ("ringlb_frontend_local_errors_total", "counter", |s| {
            &s.local_errors
        }),
        ("ringlb_frontend_queued", "gauge", |s| &s.queued),
        ("ringlb_frontend_queued_max", "gauge", |s| &s.queued_max),
        ("ringlb_frontend_queued_total", "counter", |s| {
            &s.queued_total
        }),
        ("ringlb_frontend_queue_timeouts_total", "counter", |s| {
            &s.queue_timeouts
        }),
        ("ringlb_frontend_retries_total", "counter", |s| &s.retries),
    ];
    for &(name, kind, get) in frontend_metrics {
        out.family(name, kind);
        for f in frontends {
            let labels = [("frontend", f.config.name.as_str())];
            out.sample(name, &labels, get(&f.shared.stats).load(Relaxed));
        }
    }
    render_queue_waits(&mut out, frontends);
    out.family("ringlb_frontend_refused_total", "counter");
    for f in frontends {
        for refusal in crate::edge::Refusal::ALL {
            let labels = [
                ("frontend", f.config.name.as_str()),
                ("reason", refusal.reason()),
            ];
            let value = f.shared.sources.refused(refusal);
            out.sample("ringlb_frontend_refused_total", &labels, value);
        }
        // accept-proxy's refusals in one series here, by why in the next
        // family.
        let labels = [
            ("frontend", f.config.name.as_str()),
            ("reason", "proxy-header"),
        ];
        let value = f.shared.stats.proxy_refused.total();
        out.sample("ringlb_frontend_refused_total", &labels, value);
    }
    let refused = "ringlb_frontend_proxy_refused_total";
    out.family(refused, "counter");
    // Only where headers are read: elsewhere the series could only be 0.
    for f in frontends.iter().filter(|f| f.config.proxy.accept.is_some()) {
        for why in crate::proxy::Refusal::ALL {
            let labels = [
                ("frontend", f.config.name.as_str()),
                ("reason", why.label()),
            ];
            out.sample(refused, &labels, f.shared.stats.proxy_refused.get(why));
        }
    }
    render_routes(&mut out, frontends);
    render_tls(&mut out, frontends);
    let backend_metrics: &[Metric<BackendStats>] = &[
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
        // Connections holding a maxconn slot, connecting ones included;
        // always 0 for a backend without maxconn (nothing is counted).
        ("ringlb_backend_maxconn_slots_used", "gauge", |s| &s.slots),
    ];
    for &(name, kind, get) in backend_metrics {
        out.family(name, kind);
        for f in frontends {
            for b in &f.backends {
                let labels = [("frontend", f.config.name.as_str()), ("backend", &b.name)];
                out.sample(name, &labels, get(&b.stats).load(Relaxed));
            }
        }
    }
    out.family("ringlb_backend_up", "gauge");
    for f in frontends {
        for b in &f.backends {
            let labels = [("frontend", f.config.name.as_str()), ("backend", &b.name)];
            out.sample("ringlb_backend_up", &labels, u64::from(b.is_up()));
        }
    }
    out.family("ringlb_backend_maxconn", "gauge");
    for f in frontends {
        for b in f.backends.iter().filter(|b| b.maxconn().is_some()) {
            let labels = [("frontend", f.config.name.as_str()), ("backend", &b.name)];
            let max = b.maxconn().map_or(0, u64::from);
            out.sample("ringlb_backend_maxconn", &labels, max);
        }
    }
    render_checks(&mut out, snapshot);
    let reload_metrics: &[Metric<ReloadStats>] = &[
        ("ringlb_reloads_total", "counter", |s| &s.reloads),
        ("ringlb_reload_failures_total", "counter", |s| &s.failures),
        ("ringlb_last_reload_timestamp_seconds", "gauge", |s| {
            &s.last_success
        }),
    ];
    for &(name, kind, get) in reload_metrics {
        out.family(name, kind);
        out.sample(name, &[], get(reloads).load(Relaxed));
    }
    let global: &[Global] = &[
        (
            "ringlb_log_lines_dropped_total",
            "counter",
            crate::logging::dropped,
        ),
        ("ringlb_admin_connections_total", "counter", || {
            ADMIN.accepted.load(Relaxed)
        }),
        ("ringlb_admin_connections_active", "gauge", || {
            ADMIN.active.load(Relaxed)
        }),
        ("ringlb_admin_connection_limit", "gauge", || {
            ADMIN.limit.load(Relaxed)
        }),
        ("ringlb_admin_limit_reached_total", "counter", || {
            ADMIN.limit_reached.load(Relaxed)
        }),
        ("ringlb_admin_timeouts_total", "counter", || {
            ADMIN.timeouts.load(Relaxed)
        }),
    ];
    for &(name, kind, get) in global {
        out.family(name, kind);
        out.sample(name, &[], get());
    }
    out.0
}

/// Time spent in the queue by connections that left it: the total (its
/// rate over `ringlb_frontend_queued_total`'s is the mean wait) and the
/// longest (HAProxy's qtime and qtime_max).
fn render_queue_waits(out: &mut Exposition, frontends: &[std::sync::Arc<model::FrontendSnapshot>]) {
    let waits: [Metric<FrontendStats>; 2] = [
        ("ringlb_frontend_queue_wait_seconds_total", "counter", |s| {
            &s.queue_wait_us
        }),
        ("ringlb_frontend_queue_wait_max_seconds", "gauge", |s| {
            &s.queue_wait_max_us
        }),
    ];
    for (name, kind, get) in waits {
        out.family(name, kind);
        for f in frontends {
            let labels = [("frontend", f.config.name.as_str())];
            let us = get(&f.shared.stats).load(Relaxed);
            out.sample_f64(name, &labels, us as f64 / 1e6);
        }
    }
}

/// ClientHello outcomes and SNI routes, for frontends that read hellos.
fn render_routes(out: &mut Exposition, frontends: &[std::sync::Arc<model::FrontendSnapshot>]) {
    let routing = || frontends.iter().filter(|f| f.config.tls.reads_hello());
    let name = "ringlb_frontend_client_hello_refused_total";
    out.family(name, "counter");
    for f in routing() {
        for (reason, counter) in Refusal::ALL.iter().zip(&f.shared.stats.hello_refused) {
            let labels = [
                ("frontend", f.config.name.as_str()),
                ("reason", reason.label()),
            ];
            out.sample(name, &labels, counter.load(Relaxed));
        }
    }
    let name = "ringlb_frontend_client_hello_no_sni_total";
    out.family(name, "counter");
    for f in routing() {
        let labels = [("frontend", f.config.name.as_str())];
        out.sample(name, &labels, f.shared.stats.hello_no_sni.load(Relaxed));
    }
    let route_metrics: &[Metric<model::RouteStats>] = &[
        ("ringlb_route_connections_total", "counter", |s| {
            &s.connections
        }),
        ("ringlb_route_no_backend_total", "counter", |s| {
            &s.no_backend
        }),
    ];
    for &(name, kind, get) in route_metrics {
        out.family(name, kind);
        for f in routing() {
            for route in &f.routes {
                let labels = [("frontend", f.config.name.as_str()), ("route", &route.name)];
                out.sample(name, &labels, get(&route.stats).load(Relaxed));
            }
        }
    }
}

/// What the last check of each backend found, and its agent's weight.
/// Series appear once there is something to say: a backend not checked
/// yet has no `check_ok`, one without an agent no agent weight.
fn render_checks(out: &mut Exposition, snapshot: &Snapshot) {
    let statuses: Vec<(&str, &str, model::Status)> = snapshot
        .frontends
        .iter()
        .flat_map(|f| {
            f.backends
                .iter()
                .map(|b| (f.config.name.as_str(), b.name.as_str(), b.health.status()))
        })
        .collect();
    let labels = |f, b| [("frontend", f), ("backend", b)];
    out.family("ringlb_backend_checks_total", "counter");
    for (f, b, status) in &statuses {
        out.sample(
            "ringlb_backend_checks_total",
            &labels(*f, *b),
            status.checks,
        );
    }
    out.family("ringlb_backend_check_ok", "gauge");
    for (f, b, status) in &statuses {
        if let Some(result) = &status.last_check {
            let name = "ringlb_backend_check_ok";
            out.sample(name, &labels(*f, *b), u64::from(result.is_ok()));
        }
    }
    out.family("ringlb_backend_check_duration_seconds", "gauge");
    for (f, b, status) in &statuses {
        if status.last_check.is_some() {
            let name = "ringlb_backend_check_duration_seconds";
            let seconds = status.last_check_took.as_secs_f64();
            out.sample_f64(name, &labels(*f, *b), seconds);
        }
    }
    out.family("ringlb_backend_agent_weight_percent", "gauge");
    for (f, b, status) in &statuses {
        if let Some(percent) = status.agent.as_ref().and_then(|a| a.weight_percent) {
            let name = "ringlb_backend_agent_weight_percent";
            out.sample(name, &labels(*f, *b), u64::from(percent));
        }
    }
}

/// TLS termination counters, for frontends that terminate.
fn render_tls(out: &mut Exposition, frontends: &[std::sync::Arc<model::FrontendSnapshot>]) {
    let terminating = || frontends.iter().filter(|f| f.config.tls.server.is_some());
    let tls_metrics: &[Metric<model::TlsStats>] = &[
        ("ringlb_tls_handshakes_total", "counter", |s| &s.handshakes),
        ("ringlb_tls_resumed_total", "counter", |s| &s.resumed),
    ];
    for &(name, kind, get) in tls_metrics {
        out.family(name, kind);
        for f in terminating() {
            let labels = [("frontend", f.config.name.as_str())];
            out.sample(name, &labels, get(&f.shared.stats.tls).load(Relaxed));
        }
    }
    let name = "ringlb_tls_handshakes_by_version_total";
    out.family(name, "counter");
    for f in terminating() {
        let stats = &f.shared.stats.tls;
        for (version, counter) in [("1.2", &stats.tls12), ("1.3", &stats.tls13)] {
            let labels = [("frontend", f.config.name.as_str()), ("version", version)];
            out.sample(name, &labels, counter.load(Relaxed));
        }
    }
    let name = "ringlb_tls_handshake_failures_total";
    out.family(name, "counter");
    for f in terminating() {
        for (failure, counter) in Failure::ALL.iter().zip(&f.shared.stats.tls.failures) {
            let labels = [
                ("frontend", f.config.name.as_str()),
                ("reason", failure.label()),
            ];
            out.sample(name, &labels, counter.load(Relaxed));
        }
    }
}

/// A page in the Prometheus text format (version 0.0.4) being written.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str) {
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// One series. Label values come from the config (names an operator
    /// chose), so each is escaped: a quote or newline in one must not end
    /// the value and start a series of its own.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.labels(name, labels);
        let _ = writeln!(self.0, " {value}");
    }

    fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.labels(name, labels);
        let _ = writeln!(self.0, " {value}");
    }

    fn labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.0.push_str(name);
        for (i, (label, text)) in labels.iter().enumerate() {
            self.0.push(if i == 0 { '{' } else { ',' });
            self.0.push_str(label);
            self.0.push_str("=\"");
            escape_label(&mut self.0, text);
            self.0.push('"');
        }
        if !labels.is_empty() {
            self.0.push('}');
        }
    }
}

/// Appends `value` as the text format wants a label value inside its
/// quotes: backslash, double quote and line feed escaped, nothing else.
pub fn escape_label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// The process-wide series: the connection limit, its use, and the
/// workers' completion queues.
fn render_global(out: &mut Exposition, global: &model::Global) {
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
        out.family(name, kind);
        out.sample(name, &[], value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(value: &str) -> String {
        let mut out = String::new();
        escape_label(&mut out, value);
        out
    }

    #[test]
    fn label_values_escape_backslash_quote_and_newline_only() {
        assert_eq!(escaped("web"), "web");
        assert_eq!(escaped(r#"we"b"#), r#"we\"b"#);
        assert_eq!(escaped("a\\b"), "a\\\\b");
        assert_eq!(escaped("a\nb"), "a\\nb");
        // Already-escaped text is escaped again, not taken as an escape.
        assert_eq!(escaped("a\\nb"), "a\\\\nb");
        assert_eq!(escaped("tab\there, é, [::1]:80"), "tab\there, é, [::1]:80");
    }

    #[test]
    fn a_hostile_label_value_stays_inside_its_series() {
        let mut out = Exposition::default();
        out.family("m", "gauge");
        let hostile = "we\"} 1\nfake_metric{a=\"b\\";
        out.sample("m", &[("frontend", hostile), ("backend", "x")], 7);
        let lines: Vec<&str> = out.0.lines().collect();
        assert_eq!(lines.len(), 2, "{}", out.0);
        assert_eq!(
            lines[1],
            r#"m{frontend="we\"} 1\nfake_metric{a=\"b\\",backend="x"} 7"#
        );
        out.sample("plain", &[], 3);
        assert!(out.0.ends_with("\nplain 3\n"), "{}", out.0);
    }
}
