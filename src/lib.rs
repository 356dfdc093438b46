//! ringlb: a layer-4 TCP load balancer for Linux on io_uring.
//!
//! How the pieces fit:
//!
//! ```text
//!              data path                          control plane (own threads)
//!   clients ─► worker 0: io_uring, listeners,  ◄─ commands ── server: start, drain,
//!          ─► worker 1:  sessions (Rc view of    + acks ─►    stop; reload: read
//!               the frontend snapshot they                    the file, bind new
//!               started with) ─► backends                     listeners, build and
//!                   │   ▲                                     publish a snapshot
//!                   ▼   │ reads health/admin,                 health: one scheduler,
//!               model (leaf): Snapshot ─►                     writes `up`
//!                FrontendSnapshot(config, selector,           admin: /metrics over
//!                backends) ─► BackendShared(health,           the published snapshot
//!                admin state, counters) ◄──────────────────── signals: reload, drain
//! ```
//!
//! The data path and the control plane meet only in [`model`]: immutable
//! snapshots handed to workers by command, and atomics with one writer
//! each (health: the scheduler; admin state: the admin and reload path;
//! counters: workers).
//!
//! - [`model`]: the runtime model (a leaf): backends and frontends with
//!   their shared state kept across reloads, snapshots, the selectors.
//! - [`config`]: the settings of each frontend, from a TOML file or flags.
//! - [`cli`]: the command line.
//! - [`reload`]: the difference between two configs, applied in order so
//!   a failure changes nothing.
//! - [`health`]: the failover watcher (active checks, passive signal).
//! - [`server`]: starts workers and the scheduler; the command channels;
//!   brings a config into force (the first, and every reload).
//! - [`worker`]: the per-core io_uring event loop: commands, accept,
//!   connect, retry, the tick.
//! - [`relay`]: one client/backend pair: copy or splice, half-close, reset.
//! - [`uring`]: ring setup, buffer ring, pipe pool, the raw syscalls.
//! - [`metrics`] and [`admin`]: counters and the Prometheus endpoint.
//! - [`privdrop`]: switching to `user`/`group` once everything is bound.
//! - [`notify`]: systemd's readiness protocol (`Type=notify`).
//! - [`proxy`]: the PROXY protocol header, sent and accepted.
//! - [`generate`]: the man page and shell completions, from [`cli`].
//! - [`control`] and [`ctl`]: the admin Unix socket and `ringlb ctl`.
//! - [`access`]: the access log line.
//! - [`acl`] and [`edge`]: source ACLs (a prefix table) and per-source
//!   limits: the admission decision at accept.
//! - [`view`]: what `ringlb ctl show`, `/stats` and the status page show.
//! - [`demo`]: `ringlb demo`, a guided tour on loopback.

pub mod access;
pub mod acl;
pub mod admin;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod edge;
pub mod generate;
pub mod health;
pub mod hello;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod privdrop;
pub mod proxy;
pub mod queue;
pub mod relay;
pub mod reload;
pub mod select;
pub mod server;
pub mod tls;
pub mod uring;
pub mod view;
pub mod worker;
