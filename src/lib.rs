//! ringlb: a layer-4 TCP load balancer for Linux on io_uring.
//!
//! How the pieces fit:
//!
//! ```text
//!   clients ─► worker 0 (io_uring, SO_REUSEPORT listener) ─┐
//!          ─► worker 1 (io_uring, SO_REUSEPORT listener) ─┼─► backends
//!                  ▲ reads `up`, bumps counters            │
//!   control plane: pool (atomics) ◄── health watchers (one thread per backend)
//!                  admin (/metrics), signals (drain, stop)
//! ```
//!
//! - [`config`]: the settings of each frontend, from a TOML file or flags.
//! - [`cli`]: the command line.
//! - [`pool`]: backends, their up/down state and counters, and the choice
//!   of a backend (round robin or priority); lock-free.
//! - [`health`]: the failover watcher (active checks, passive signal).
//! - [`server`]: binds listeners, starts workers and watchers, drains.
//! - [`worker`]: the per-core io_uring event loop: accept, connect, retry.
//! - [`relay`]: one client/backend pair: copy or splice, half-close, reset.
//! - [`uring`]: ring setup, buffer ring, pipe pool, the raw syscalls.
//! - [`metrics`] and [`admin`]: counters and the Prometheus endpoint.
//! - [`notify`]: systemd's readiness protocol (`Type=notify`).
//! - [`generate`]: the man page and shell completions, from [`cli`].
//! - [`demo`]: `ringlb demo`, a guided tour on loopback.

pub mod admin;
pub mod cli;
pub mod config;
pub mod demo;
pub mod generate;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod relay;
pub mod server;
pub mod uring;
pub mod worker;
