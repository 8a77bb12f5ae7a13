//! kaproxy: a TLS-terminating HTTP reverse proxy and load balancer that never hands a request
//! to a keep-alive connection the other side is about to close.
//!
//! # Layout
//!
//! Data flows one way: listener → proxy → balancer → pool → backend.
//!
//! - [`config`]: TOML → validated, typed [`config::Config`]; the keep-alive timeline of `check`.
//! - [`server`]: the running proxy: binds listeners, spawns the accept loops, shuts down.
//! - [`listener`]: sockets, accept loop, TLS handshake. No HTTP.
//! - [`limit`]: the downstream connection cap (`max_connections`) shared by the listeners:
//!   slots, shedding the longest-idle parked connection at the cap, accept-failure back-off.
//! - [`downstream`]: one client connection: HTTP/1.1 or HTTP/2, idle/head timers, graceful close.
//! - [`proxy`]: the per-request phases: route, forwarding headers, pick, send, retry, error→status.
//!   The only module that sees both downstream and upstream.
//! - [`body`]: request and response bodies in transit: `body_timeout`, request buffering,
//!   response read-ahead, and [`body::BodyError`] (a broken body is the client's fault).
//! - [`balancer`]: [`balancer::Backend`], smooth weighted round-robin, consistent ip-hash. No I/O.
//! - [`pool`]: the keep-alive-aware upstream connection pool. Deadlines, lifetime, max requests,
//!   learned `Keep-Alive`, EOF watch.
//! - [`health`]: active and passive health of a backend (probes with rise/fall; consecutive
//!   failures, cool-down).
//! - [`metrics`]: the Prometheus registry; receives, never calls out.
//! - [`admin`]: the admin listener: `/metrics`, `/healthz`, `/status`.
//! - [`probe`]: `kaproxy probe`: measure a backend's keep-alive behaviour, recommend settings.
//! - [`tls`]: rustls server configuration and the development certificate.
//! - [`demo`]: built-in Apache-like backends for `kaproxy demo`, tests and the bench.
//! - [`send_watch`]: `send_timeout` for HTTP/2 streams whose flow-control window stays closed.
//! - [`relay`]: a TCP relay that delays everything, to widen the keep-alive race on loopback.
//! - [`error`]: typed errors, each knowing its side and whether it may be retried.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balancer;
pub mod body;
pub mod config;
pub mod demo;
pub mod downstream;
pub mod error;
pub mod health;
pub mod limit;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod probe;
pub mod proxy;
pub mod relay;
pub mod send_watch;
pub mod server;
pub mod tls;

pub use server::Server;
