//! What an operator sees of the frontends and backends in force: one
//! function builds it from the published snapshot, and every reader
//! renders that same data (`ringlb ctl show` as a table or JSON, the HTTP
//! `/stats` JSON and the status page), so no two views can disagree.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::{BackendConfig, CheckConfig};
use crate::model::{AdminState, BackendShared, FrontendSnapshot, Snapshot};

/// One frontend, as in force now.
#[derive(Clone, Debug, Serialize)]
pub struct FrontendView {
    pub name: String,
    /// The listen address as configured (port 0 stays 0).
    pub listen: String,
    /// How it balances: "active-active" or "active-passive".
    pub mode: String,
    pub active: u64,
    pub accepted: u64,
    /// Its limit of client connections at once, if any.
    pub maxconn: Option<u32>,
    #[serde(flatten)]
    pub queue: QueueView,
    pub backends: Vec<BackendView>,
}

/// The frontend's queue: connections that found every usable backend at
/// its maxconn and wait for a slot (HAProxy's backend queue; ringlb has
/// no per-backend queue, a queued connection takes the first slot freed).
#[derive(Clone, Debug, Serialize)]
pub struct QueueView {
    /// Waiting now (HAProxy's qcur).
    pub queued: u64,
    /// The most waiting at once since the frontend appeared (qmax).
    pub queued_max: u64,
    /// Connections that ever waited.
    pub queued_total: u64,
    /// Of those, reset when `timeout_queue_ms` passed.
    pub queue_timeouts: u64,
    /// How long a connection may wait (timeout-queue, else the connect
    /// timeout).
    pub timeout_queue_ms: f64,
    /// Mean and longest wait of the connections that left the queue;
    /// `None` before the first one did.
    pub queue_wait_avg_ms: Option<f64>,
    pub queue_wait_max_ms: Option<f64>,
    /// Connect attempts after a connection's first.
    pub retries: u64,
}

/// One backend of one frontend.
#[derive(Clone, Debug, Serialize)]
pub struct BackendView {
    /// As the user wrote it (the address, unless named).
    pub name: String,
    pub addr: String,
    /// What the checks say: "up" or "down".
    pub health: &'static str,
    /// Why it is in that health state, as the UP/DOWN log line said it
    /// (empty until the first change).
    pub reason: String,
    /// Seconds since the epoch of the last health change (or of the start
    /// of checking).
    pub changed_at: Option<f64>,
    /// What the operator asked: "ready", "drain" or "maint".
    pub admin: String,
    /// One word for a person (and the status page's colour): "maint" or
    /// "drain" when the operator set it, else the health.
    pub state: &'static str,
    /// Relative share of new connections, as configured (0-256).
    pub weight: u32,
    /// Takes traffic only when no non-backup backend is usable.
    pub backup: bool,
    /// Most connections at once (HAProxy's slim); `None`: no limit.
    pub maxconn: Option<u32>,
    /// Connections holding one of its maxconn slots, connecting ones
    /// included; only counted when it has a maxconn.
    pub slots: u64,
    pub last_check: Option<CheckView>,
    /// What its check does: "tcp", "redis-master", "http GET /primary".
    pub check: String,
    /// Where its checks go (its check-port / check-address, else its own).
    pub check_addr: String,
    /// Checks run since checking started.
    pub checks: u64,
    /// The share of its weight it takes, in percent (an agent's `NN%`).
    pub weight_percent: u32,
    /// Its agent's last answer, if it has an agent.
    pub agent: Option<AgentView>,
    pub active: u64,
    /// Connections sent to it since it appeared (kept across reloads).
    pub connections: u64,
    pub connect_failures: u64,
    pub checks_failed: u64,
    pub bytes_to_backend: u64,
    pub bytes_from_backend: u64,
}

/// The last check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct CheckView {
    pub ok: bool,
    /// Why it failed; `None` when it passed.
    pub error: Option<String>,
    pub took_ms: f64,
    /// Seconds since the epoch when it ended.
    pub at: Option<f64>,
    /// The step it failed in, e.g. "step 2 (expect \"+PONG\")".
    pub step: Option<String>,
}

/// An agent check's last answer.
#[derive(Clone, Debug, Serialize)]
pub struct AgentView {
    pub addr: String,
    /// The agent's line; `None` when it did not answer.
    pub reply: Option<String>,
    /// Why there was no answer (which changes nothing).
    pub error: Option<String>,
    pub at: f64,
    /// What the agent last set: "ready", "drain" or "maint".
    pub state: String,
    /// The last `NN%` it gave.
    pub weight_percent: Option<u32>,
    /// Why it holds the backend down (`down`, `fail`, `stopped`).
    pub down: Option<String>,
}

/// The view of every frontend in `snapshot`, in config order.
pub fn show(snapshot: &Snapshot) -> Vec<FrontendView> {
    snapshot.frontends.iter().map(|f| frontend(f)).collect()
}

fn frontend(f: &FrontendSnapshot) -> FrontendView {
    let stats = &f.shared.stats;
    FrontendView {
        name: f.config.name.clone(),
        listen: f.config.listen.to_string(),
        mode: f.config.mode.to_string(),
        active: stats.active.load(Relaxed),
        accepted: stats.accepted.load(Relaxed),
        maxconn: f.config.maxconn,
        queue: queue(f),
        backends: crate::health::configured(f)
            .into_iter()
            .map(|(b, config)| backend(b, config, &f.config.check))
            .collect(),
    }
}

fn queue(f: &FrontendSnapshot) -> QueueView {
    let stats = &f.shared.stats;
    let queued = stats.queued.load(Relaxed);
    let total = stats.queued_total.load(Relaxed);
    // Read after the gauge: a connection counted in `left` has added its
    // wait, give or take one in flight between the two loads.
    let left = total.saturating_sub(queued);
    let us_to_ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
    let waited = stats.queue_wait_us.load(Relaxed);
    QueueView {
        queued,
        queued_max: stats.queued_max.load(Relaxed),
        queued_total: total,
        queue_timeouts: stats.queue_timeouts.load(Relaxed),
        timeout_queue_ms: millis(f.config.timeout_queue.unwrap_or(f.config.connect_timeout)),
        queue_wait_avg_ms: (left > 0).then(|| us_to_ms(waited / left)),
        queue_wait_max_ms: (left > 0).then(|| us_to_ms(stats.queue_wait_max_us.load(Relaxed))),
        retries: stats.retries.load(Relaxed),
    }
}

fn backend(b: &BackendShared, config: &BackendConfig, check: &CheckConfig) -> BackendView {
    let status = b.health.status();
    let admin = b.admin();
    let health = if b.is_up() { "up" } else { "down" };
    let agent_state = b.health.agent_state();
    let state = match (admin, agent_state) {
        (AdminState::Maint, _) | (_, AdminState::Maint) => "maint",
        (AdminState::Drain, _) | (_, AdminState::Drain) => "drain",
        (AdminState::Ready, AdminState::Ready) => health,
    };
    let agent = status.agent.as_ref().map(|a| AgentView {
        addr: check
            .agent_target(config)
            .map_or_else(String::new, |t| t.to_string()),
        reply: a.reply.as_ref().ok().cloned(),
        error: a.reply.as_ref().err().cloned(),
        at: epoch_seconds(a.at),
        state: agent_state.to_string(),
        weight_percent: a.weight_percent,
        down: a.down.clone(),
    });
    let stats = &b.stats;
    BackendView {
        name: b.name.clone(),
        addr: b.addr.to_string(),
        health,
        reason: status.reason.clone(),
        changed_at: status.changed_at.map(epoch_seconds),
        admin: admin.to_string(),
        state,
        weight: config.weight,
        backup: config.backup,
        maxconn: b.maxconn(),
        slots: stats.slots.load(Relaxed),
        last_check: status.last_check.as_ref().map(|result| CheckView {
            ok: result.is_ok(),
            error: result.as_ref().err().cloned(),
            took_ms: millis(status.last_check_took),
            at: status.checked_at.map(epoch_seconds),
            step: status.failed_step.clone(),
        }),
        check: check.script.describe(),
        check_addr: check.target(config).to_string(),
        checks: status.checks,
        weight_percent: b.health.weight_percent(),
        agent,
        active: stats.active.load(Relaxed),
        connections: stats.connections.load(Relaxed),
        connect_failures: stats.connect_failures.load(Relaxed),
        checks_failed: stats.checks_failed.load(Relaxed),
        bytes_to_backend: stats.bytes_to_backend.load(Relaxed),
        bytes_from_backend: stats.bytes_from_backend.load(Relaxed),
    }
}

fn epoch_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// The view as JSON: `ringlb ctl show --json` and the HTTP `/stats`.
pub fn to_json(views: &[FrontendView]) -> String {
    /// A struct, not `json!`, so that fields keep their declared order.
    #[derive(Serialize)]
    struct Document<'a> {
        frontends: &'a [FrontendView],
    }
    // Plain structs of strings and numbers always serialize; the fallback
    // is still valid JSON should that ever change.
    serde_json::to_string_pretty(&Document { frontends: views })
        .unwrap_or_else(|_| "{\"frontends\": []}".into())
}

/// Short texts for the `ringlb ctl show` table, kept next to the data so
/// that a field added here is rendered in one place.
impl FrontendView {
    /// The queue in one phrase, or `None` where no backend has a maxconn
    /// and nothing ever queued (a queue cannot form there).
    pub fn queue_text(&self) -> Option<String> {
        let q = &self.queue;
        let limited = self.backends.iter().any(|b| b.maxconn.is_some());
        if !limited && q.queued_total == 0 {
            return None;
        }
        let mut text = format!(
            "queue {} now, {} at most, {} in all, {} timed out after {}ms",
            q.queued, q.queued_max, q.queued_total, q.queue_timeouts, q.timeout_queue_ms
        );
        if let (Some(avg), Some(max)) = (q.queue_wait_avg_ms, q.queue_wait_max_ms) {
            let _ = write!(text, ", waited {avg}ms on average, {max}ms at most");
        }
        Some(text)
    }
}

impl BackendView {
    /// The weight, with the agent's share and the backup flag when set.
    pub fn weight_text(&self) -> String {
        let mut text = self.weight.to_string();
        if self.weight_percent != 100 {
            let _ = write!(text, " {}%", self.weight_percent);
        }
        if self.backup {
            text.push_str(" backup");
        }
        text
    }

    /// Maxconn slots in use over the limit (HAProxy's scur/slim), or "-".
    pub fn slots_text(&self) -> String {
        self.maxconn
            .map_or_else(|| "-".into(), |max| format!("{}/{max}", self.slots))
    }

    /// What the check does, and where when not at the traffic address.
    pub fn check_text(&self) -> String {
        if self.check_addr == self.addr {
            self.check.clone()
        } else {
            format!("{} @{}", self.check, self.check_addr)
        }
    }

    /// The last check: "ok 1.2ms" or "failed in step 2 after 3ms", with
    /// the time since it ran from `ago`.
    pub fn last_check_text(&self, ago: impl Fn(Option<f64>) -> String) -> String {
        let Some(c) = &self.last_check else {
            return "-".into();
        };
        if c.ok {
            return format!("ok {}ms {}", c.took_ms, ago(c.at));
        }
        match c.step.as_deref().and_then(|s| s.split(" (").next()) {
            Some(step) => format!("failed in {step} after {}ms {}", c.took_ms, ago(c.at)),
            None => format!("failed after {}ms {}", c.took_ms, ago(c.at)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> BackendView {
        BackendView {
            name: "db".into(),
            addr: "10.0.0.1:5432".into(),
            health: "down",
            reason: String::new(),
            changed_at: None,
            admin: "ready".into(),
            state: "down",
            weight: 3,
            backup: false,
            maxconn: None,
            slots: 0,
            last_check: None,
            check: "http GET /primary".into(),
            check_addr: "10.0.0.1:5432".into(),
            checks: 0,
            weight_percent: 100,
            agent: None,
            active: 0,
            connections: 0,
            connect_failures: 0,
            checks_failed: 0,
            bytes_to_backend: 0,
            bytes_from_backend: 0,
        }
    }

    #[test]
    fn the_table_texts_say_only_what_is_set() {
        let plain = backend();
        assert_eq!(
            (plain.weight_text(), plain.slots_text(), plain.check_text()),
            ("3".into(), "-".into(), "http GET /primary".into())
        );
        let set = BackendView {
            backup: true,
            weight_percent: 50,
            maxconn: Some(10),
            slots: 4,
            check_addr: "10.0.0.1:8008".into(),
            last_check: Some(CheckView {
                ok: false,
                error: Some("status 503".into()),
                took_ms: 2.5,
                at: None,
                step: Some("http check (expect status 2xx/3xx)".into()),
            }),
            ..backend()
        };
        assert_eq!(set.weight_text(), "3 50% backup");
        assert_eq!(set.slots_text(), "4/10");
        assert_eq!(set.check_text(), "http GET /primary @10.0.0.1:8008");
        assert_eq!(
            set.last_check_text(|_| "-".into()),
            "failed in http check after 2.5ms -"
        );
    }
}
