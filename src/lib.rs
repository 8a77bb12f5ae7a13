//! kaproxy: a TLS-terminating HTTP reverse proxy and load balancer that never hands a request
//! to a keep-alive connection the other side is about to close.
//!
//! # Layout
//!
//! The tree reads like the pipeline; data flows one way, and so do the imports:
//!
//! ```text
//! server → control → downstream → proxy → upstream → ground (metrics, config, body, headers, http1, error, shutdown)
//! ```
//!
//! Each floor imports only from the floors below it; `downstream` never names `upstream` (the
//! proxy is the only module that sees both sides).
//!
//! - [`downstream`]: the client side. [`downstream::listener`] binds and accepts (with the
//!   connection cap in [`downstream::limit`]), [`downstream::proxy_protocol`] reads a PROXY
//!   header, [`downstream::tls`] terminates TLS, [`downstream::socket`] is an accepted
//!   socket (its write deadline, its lingering close), [`downstream::conn`] serves one
//!   connection (HTTP/1.1 with parking, HTTP/2), [`downstream::timers`] holds its head, idle
//!   and park timers, [`downstream::send_watch`] cuts off HTTP/2
//!   streams whose window stays closed and [`downstream::h2_head`] bounds an HTTP/2 header
//!   block by `header_timeout`. [`downstream::Generation`] is what a connection needs
//!   from one loaded configuration.
//! - [`proxy`]: the per-request phases: route, forwarding headers, pick, send, retry,
//!   response, access log, with one request context carried through them after routing.
//!   The only module that sees both sides.
//! - [`upstream`]: the backend side. [`upstream::group`] (an upstream group, built and kept
//!   across reloads), [`upstream::backend`] (a server and its health state),
//!   [`upstream::balancer`] (round-robin, ip-hash; no I/O), [`upstream::health`] (active
//!   probes), [`upstream::pool`] (the keep-alive-aware pool, generic over a connector; no
//!   HTTP), [`upstream::exchange`] (the HTTP/1.1 exchange on a pooled connection),
//!   [`upstream::connect`] (dialing; hyper's HTTP/1.1 connection, driven by the request's
//!   task), [`upstream::delivery`] (what the backend acknowledged: the replay proof) and
//!   [`upstream::keep_alive`] (the backend's `Keep-Alive` header).
//! - [`control`]: what an operator runs and reads, above the pipeline: [`control::admin`]
//!   (`/metrics`, `/status`, the status page), [`control::history`] (the page's bounded
//!   history, `/history`), [`control::reload`] (SIGHUP and `POST /reload`),
//!   [`control::probe`] (`kaproxy probe`), and [`control::generation`], which builds what a
//!   loaded configuration runs with.
//! - [`server`]: the running proxy: builds a generation, binds, spawns, drains.
//! - [`metrics`]: the Prometheus registry and the hot path's handles (receives, imports nothing
//!   of ours).
//! - [`headers`]: `Keep-Alive` and the comma-separated token lists, parsed one way.
//! - [`http1`]: kaproxy's own HTTP/1.1 codec without I/O (heads kept as bytes, body framing,
//!   chunked coding), differentially fuzzed against hyper's server and client; not yet on the
//!   data path.
//! - [`config`]: TOML → validated, typed [`config::Config`]; the keep-alive timeline of `check`.
//! - [`body`]: bodies in transit: request bodies (`body_timeout`, the size cap, read whole
//!   or streamed), the memory budget ([`body::budget`]), temporary files ([`body::spill`]),
//!   responses read as fast as the backend sends them ([`body::relay`]); [`body::BodyError`].
//! - [`workers`]: the worker threads, one current-thread runtime each, and [`workers::index`].
//! - [`shutdown`]: the server's shutdown signal and each task's handle on it.
//! - [`sync`]: how a lock is taken (a poisoned lock is used as is), one way everywhere.
//! - [`error`]: typed upstream errors, each knowing its kind and whether it may be retried.
//!
//! Development tooling is not this library: `kaproxy demo`'s backends are the workspace crate
//! `kaproxy-demo` (`demo/`, the binary's default `demo` feature), and the test tooling (the
//! delay relay, the Apache and peer launchers, the naive pool) is `kaproxy-testkit`
//! (`testkit/`), which the binary does not depend on.
//!
//! Words: the client side is *downstream*, the backend side *upstream*; one backend server is a
//! *backend* ([`upstream::backend::Backend`], its [`upstream::pool::Pool`], its
//! [`metrics::BackendMetrics`]). "server" stays only where the configuration and the
//! metrics name it for operators (`servers = [...]`, the `server` label).
//!
//! `cargo test --test it layout` checks that no module imports from a floor above its own, one
//! rule per floor; a module cycle shows up there too, as one of its imports points upward.
//!
//! No `unsafe` but one function: reading Linux `TCP_INFO` (`upstream::delivery::tcp_state`),
//! which neither socket2 nor rustix exposes.
#![deny(unsafe_code)]
// These docs are written for kaproxy's engineers, module docs naming private items:
// `cargo doc --document-private-items` renders them with every link resolved.
#![allow(rustdoc::private_intra_doc_links)]

pub mod body;
pub mod config;
pub mod control;
pub mod downstream;
pub mod error;
pub mod headers;
pub mod http1;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod sync;
pub mod upstream;
pub mod workers;

pub use server::{Server, ServerOptions};
