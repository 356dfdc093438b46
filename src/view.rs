//! What an operator sees of the frontends and backends in force: one
//! function builds it from the published snapshot, and every reader
//! renders that same data (`ringlb ctl show` as a table or JSON, the HTTP
//! `/stats` JSON and the status page), so no two views can disagree.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use serde::Serialize;

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
    pub backends: Vec<BackendView>,
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
    /// Relative share of new connections; 1 until weights exist.
    pub weight: u32,
    pub last_check: Option<CheckView>,
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
        backends: f.backends.iter().map(|b| backend(b)).collect(),
    }
}

fn backend(b: &BackendShared) -> BackendView {
    let status = b.health.status();
    let admin = b.admin();
    let health = if b.is_up() { "up" } else { "down" };
    let state = match admin {
        AdminState::Maint => "maint",
        AdminState::Drain => "drain",
        AdminState::Ready => health,
    };
    let stats = &b.stats;
    BackendView {
        name: b.name.clone(),
        addr: b.addr.to_string(),
        health,
        reason: status.reason.clone(),
        changed_at: status.changed_at.map(epoch_seconds),
        admin: admin.to_string(),
        state,
        weight: 1,
        last_check: status.last_check.as_ref().map(|result| CheckView {
            ok: result.is_ok(),
            error: result.as_ref().err().cloned(),
            took_ms: millis(status.last_check_took),
            at: status.checked_at.map(epoch_seconds),
        }),
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
