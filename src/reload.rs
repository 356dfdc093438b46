//! Reload: re-read the config file and bring the difference into force
//! while ringlb serves.
//!
//! The order makes a failure leave nothing half applied: the file is read
//! and checked, then every new listener is bound (for every worker); only
//! when all of that worked does anything change. Then the workers get the
//! new listeners, the new snapshot (for new connections), the removals,
//! and the health scheduler its new target set. Frontends and backends
//! are matched by name, so the ones that stay keep their health, admin
//! state and counters.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use socket2::Socket;

use crate::config::{Config, ConfigError, ConfigSource, FrontendConfig, OnDown};
use crate::health::Targets;
use crate::model::{BackendShared, FrontendShared, FrontendSnapshot, Snapshot};
use crate::server::{Bound, Server, bind, log_listening};

/// Why a reload changed nothing.
#[derive(Debug)]
pub enum Error {
    /// The file cannot be read, parsed or validated, or a new listen
    /// address cannot be bound; the message names the file and line.
    Config(ConfigError),
    /// The health scheduler has stopped (ringlb is stopping).
    Health(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => e.fmt(f),
            Error::Health(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for Error {}

/// What a reload changed, for the log line and `ringlb ctl reload`.
#[derive(Debug, Default)]
pub struct Summary {
    /// The reload's number since start (1 for the first).
    pub number: u64,
    pub generation: u64,
    pub frontends_added: Vec<String>,
    pub frontends_removed: Vec<String>,
    pub frontends_changed: Vec<String>,
    /// "frontend/backend".
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    pub backends_changed: Vec<String>,
    /// Settings that differ in the file but only take effect on restart.
    pub restart_needed: Vec<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reload {} applied (generation {})",
            self.number, self.generation
        )?;
        let parts = [
            ("frontends added", &self.frontends_added),
            ("frontends removed", &self.frontends_removed),
            ("frontends changed", &self.frontends_changed),
            ("backends added", &self.backends_added),
            ("backends removed", &self.backends_removed),
            ("backends changed", &self.backends_changed),
        ];
        let mut any = false;
        for (label, names) in parts {
            if !names.is_empty() {
                write!(
                    f,
                    "{} {label}: {}",
                    if any { ";" } else { ":" },
                    names.join(", ")
                )?;
                any = true;
            }
        }
        if !any {
            f.write_str(": nothing changed")?;
        }
        Ok(())
    }
}

/// A listen address that could not be bound.
#[derive(Debug)]
pub struct BindError {
    pub index: usize,
    pub frontend: String,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// A frontend's new listening sockets, one per worker.
pub struct NewListener {
    pub frontend: String,
    pub configured: SocketAddr,
    pub local: SocketAddr,
    pub sockets: Vec<Socket>,
}

/// The difference between the config in force and a new one, worked out
/// before anything changes.
pub struct Plan {
    pub snapshot: Arc<Snapshot>,
    /// Frontends (by index in the new config) that need new sockets: new
    /// ones, and those whose listen address changed.
    pub to_bind: Vec<usize>,
    /// Listener ids to remove; with the frontend's shared state when the
    /// frontend itself is gone (its connections get the drain timeout).
    pub removed_listeners: Vec<(u64, Option<Arc<FrontendShared>>)>,
    /// Backends gone from frontends with `on-down = "shutdown"`: their
    /// connections are reset.
    pub closed_backends: Vec<Arc<BackendShared>>,
    pub summary: Summary,
    configs: Vec<FrontendConfig>,
}

impl Plan {
    pub fn new(old: &Snapshot, listeners: &[Bound], config: &Config) -> Plan {
        let mut targets = Targets::of(old);
        let mut summary = Summary::default();
        let mut closed_backends = Vec::new();
        let mut frontends = Vec::with_capacity(config.frontends.len());
        for f in &config.frontends {
            let before = old.frontend(&f.name);
            let shared = match before {
                Some(b) => {
                    if b.config != *f {
                        summary.frontends_changed.push(f.name.clone());
                    }
                    Arc::clone(&b.shared)
                }
                None => {
                    summary.frontends_added.push(f.name.clone());
                    Arc::new(FrontendShared::new(&f.name))
                }
            };
            let backends = backends_of(f, before.map(|b| &**b), &mut targets, &mut summary);
            if let Some(b) = before {
                for gone in b
                    .backends
                    .iter()
                    .filter(|o| !backends.iter().any(|n| Arc::ptr_eq(n, o)))
                {
                    if !backends.iter().any(|n| n.name == gone.name) {
                        summary
                            .backends_removed
                            .push(format!("{}/{}", f.name, gone.name));
                    }
                    if f.on_down == OnDown::Shutdown {
                        closed_backends.push(Arc::clone(gone));
                    }
                }
            }
            frontends.push(Arc::new(FrontendSnapshot::new(f.clone(), shared, backends)));
        }
        let mut removed_listeners = Vec::new();
        for bound in listeners {
            match config.frontends.iter().find(|f| f.name == bound.frontend) {
                Some(f) if f.listen == bound.configured => {}
                Some(_) => removed_listeners.push((bound.id, None)),
                None => {
                    summary.frontends_removed.push(bound.frontend.clone());
                    let shared = old.frontend(&bound.frontend).map(|f| Arc::clone(&f.shared));
                    removed_listeners.push((bound.id, shared));
                }
            }
        }
        let to_bind = config
            .frontends
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                !listeners
                    .iter()
                    .any(|b| b.frontend == f.name && b.configured == f.listen)
            })
            .map(|(i, _)| i)
            .collect();
        summary.generation = old.generation + 1;
        Plan {
            snapshot: Arc::new(Snapshot {
                generation: summary.generation,
                frontends,
            }),
            to_bind,
            removed_listeners,
            closed_backends,
            summary,
            configs: config.frontends.clone(),
        }
    }

    /// Binds every new listener for every worker; the first failure drops
    /// what was bound and names the frontend.
    pub fn bind(&self, workers: usize) -> Result<Vec<NewListener>, BindError> {
        let mut bound = Vec::with_capacity(self.to_bind.len());
        for &index in &self.to_bind {
            let f = &self.configs[index];
            let mut addr = f.listen;
            let mut sockets = Vec::with_capacity(workers);
            for _ in 0..workers {
                let socket = bind(addr).map_err(|source| BindError {
                    index,
                    frontend: f.name.clone(),
                    addr,
                    source,
                })?;
                // With port 0 the first bind picks the port; the other
                // workers join it.
                addr = socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .unwrap_or(addr);
                sockets.push(socket);
            }
            bound.push(NewListener {
                frontend: f.name.clone(),
                configured: f.listen,
                local: addr,
                sockets,
            });
        }
        Ok(bound)
    }
}

/// A frontend's backends for the new snapshot: a backend that stays (same
/// name, address and check) is the same `Arc`, with its health, admin
/// state and counters. One whose address or check changed is a new check
/// target: a new `Arc` whose health starts from what its address last
/// showed and whose admin state carries over (the operator's decision is
/// about the name); its counters start again from zero, which Prometheus'
/// `rate()` takes as a reset.
fn backends_of(
    f: &FrontendConfig,
    before: Option<&FrontendSnapshot>,
    targets: &mut Targets,
    summary: &mut Summary,
) -> Vec<Arc<BackendShared>> {
    let old: HashMap<&str, &Arc<BackendShared>> = before
        .map(|b| b.backends.iter().map(|o| (o.name.as_str(), o)).collect())
        .unwrap_or_default();
    f.backends
        .iter()
        .map(|b| {
            let health = targets.health(b, &f.check);
            let label = || format!("{}/{}", f.name, b.name);
            let backend = match old.get(b.name.as_str()) {
                Some(o) if o.addr == b.addr && Arc::ptr_eq(&o.health, &health) => Arc::clone(o),
                Some(o) => {
                    summary.backends_changed.push(label());
                    let new = BackendShared::new(&f.name, &b.name, b.addr, health);
                    new.set_admin(o.admin());
                    Arc::new(new)
                }
                None => {
                    if before.is_some() {
                        summary.backends_added.push(label());
                    }
                    Arc::new(BackendShared::new(&f.name, &b.name, b.addr, health))
                }
            };
            // On a kept backend too: its slot count carries over, the new
            // limit applies to it at once.
            backend.set_maxconn(b.maxconn);
            backend
        })
        .collect()
}

/// Settings that only a restart changes, as log-ready lines.
fn restart_needed(running: &Config, new: &Config) -> Vec<String> {
    let mut lines = Vec::new();
    if running.workers != new.workers {
        lines.push(format!(
            "workers: {} -> {} needs a restart (still {})",
            running.workers, new.workers, running.workers
        ));
    }
    if running.buffers != new.buffers {
        lines.push(format!(
            "buffers: {} -> {} needs a restart (still {})",
            running.buffers, new.buffers, running.buffers
        ));
    }
    if running.stats != new.stats {
        let show = |a: Option<SocketAddr>| a.map_or_else(|| "none".to_string(), |a| a.to_string());
        lines.push(format!(
            "stats: {} -> {} needs a restart (still {})",
            show(running.stats),
            show(new.stats),
            show(running.stats)
        ));
    }
    if running.admin_socket != new.admin_socket {
        let shown = |p: &Option<std::path::PathBuf>| {
            p.as_ref()
                .map_or_else(|| "none".to_string(), |p| p.display().to_string())
        };
        lines.push(format!(
            "admin-socket: {} -> {} needs a restart (still {})",
            shown(&running.admin_socket),
            shown(&new.admin_socket),
            shown(&running.admin_socket)
        ));
    }
    for (key, running, new) in [
        ("user", &running.user, &new.user),
        ("group", &running.group, &new.group),
    ] {
        if running != new {
            let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
            lines.push(format!(
                "{key}: {} -> {} needs a restart (still {})",
                shown(running),
                shown(new),
                shown(running)
            ));
        }
    }
    lines
}

/// Re-reads the file and applies the difference. On any error nothing has
/// changed: the old config keeps serving. Logs the outcome and counts it
/// (`ringlb_reloads_total`, `ringlb_reload_failures_total`); the caller
/// (the signal handler, `ringlb ctl reload`) only reports it.
pub fn reload(server: &Server, source: &ConfigSource) -> Result<Summary, Error> {
    let stats = server.reload_stats();
    let mut control = server.lock();
    control.reload_count += 1;
    let number = control.reload_count;
    let outcome = (|| {
        let mut config = source.load().map_err(Error::Config)?;
        let restart = restart_needed(&control.config, &config);
        // What needs a restart keeps its running value (and is reported
        // again on every reload until the restart).
        config.workers = control.config.workers;
        config.buffers = control.config.buffers;
        config.stats = control.config.stats;
        config.admin_socket.clone_from(&control.config.admin_socket);
        config.user.clone_from(&control.config.user);
        config.group.clone_from(&control.config.group);
        for warning in crate::privdrop::file_warnings(&source.path) {
            log::warn!("reload {number}: {warning}");
        }
        let mut plan = Plan::new(&control.snapshot, &control.listeners, &config);
        let bound = plan.bind(control.workers()).map_err(|e| {
            let mut message = format!(
                "frontend {}: cannot listen on {}: {}",
                e.frontend, e.addr, e.source
            );
            if let Some(hint) = crate::privdrop::bind_hint(e.addr.port(), &e.source) {
                message = format!("{message}: {hint}");
            }
            Error::Config(source.listen_error(e.index, message))
        })?;
        let mut summary = std::mem::take(&mut plan.summary);
        summary.number = number;
        summary.restart_needed = restart;
        let snapshot = Arc::clone(&plan.snapshot);
        let listening: Vec<String> = bound.iter().map(|l| l.frontend.clone()).collect();
        let applied = control.apply(plan, bound, &config);
        control.config = config;
        server.publish(&snapshot);
        applied.map_err(|e| Error::Health(e.to_string()))?;
        for name in &listening {
            if let Some(f) = snapshot.frontend(name) {
                log_listening(f, control.local_addr(name), control.workers());
            }
        }
        Ok(summary)
    })();
    drop(control);
    match &outcome {
        Ok(summary) => {
            stats.reloads.fetch_add(1, Relaxed);
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            stats.last_success.store(now, Relaxed);
            for line in &summary.restart_needed {
                log::warn!("reload {number}: {line}; the rest of the reload applies");
            }
            log::info!("{summary}");
        }
        Err(e) => {
            stats.failures.fetch_add(1, Relaxed);
            log::error!("reload {number} failed: {e}; still serving the previous config");
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AdminState;

    fn config(check: &str) -> Config {
        let text = format!(
            "[[frontend]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n{check}\
             backends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n"
        );
        Config::from_toml(&text, "t").expect("config")
    }

    fn plan(old: &Snapshot, config: &Config) -> Plan {
        Plan::new(old, &[], config)
    }

    #[test]
    fn kept_backends_are_the_same_and_changed_ones_keep_their_admin_state() {
        let empty = Snapshot {
            generation: 0,
            frontends: Vec::new(),
        };
        let first = plan(&empty, &config("")).snapshot;
        let web = &first.frontends[0];
        web.backends[0].set_admin(AdminState::Drain);
        web.backends[1].health.set_up(false);
        web.backends[1]
            .stats
            .connections
            .store(7, std::sync::atomic::Ordering::Relaxed);

        let same = plan(&first, &config(""));
        let kept = &same.snapshot.frontends[0];
        assert!(Arc::ptr_eq(&kept.shared, &web.shared));
        assert!(Arc::ptr_eq(&kept.backends[0], &web.backends[0]));
        assert!(Arc::ptr_eq(&kept.backends[1], &web.backends[1]));
        assert!(same.summary.backends_changed.is_empty());

        // A new check makes new check targets: new `Arc`s, whose admin
        // state carries over and whose health starts where it was.
        let changed = plan(&first, &config("check-interval = \"5s\"\n"));
        let new = &changed.snapshot.frontends[0];
        assert!(Arc::ptr_eq(&new.shared, &web.shared));
        assert!(!Arc::ptr_eq(&new.backends[0], &web.backends[0]));
        assert_eq!(new.backends[0].admin(), AdminState::Drain);
        assert!(!new.backends[1].is_up());
        assert_eq!(changed.summary.backends_changed.len(), 2);
        assert_eq!(changed.summary.frontends_changed, ["web"]);
    }
}
