//! kaproxy-testkit owns kaproxy's test tooling, kept out of the proxy library and the binary:
//! what the integration tests and `kaproxy-bench` put around a running proxy.
//!
//! - [`demo`]: the kaproxy-demo crate's Apache-like HTTP/1.1 backends (`kaproxy demo`'s), re-exported.
//! - [`naive`]: the naive pool, the control experiment of the keep-alive race.
//! - [`relay`]: a TCP relay that delays everything, to widen the keep-alive race on loopback.
//! - [`apache`]: a real Apache httpd 2.4 on loopback ports, for the tests and `race --apache`,
//!   optionally serving TLS with mod_ssl.
//! - [`backends`]: real nginx, Gunicorn, Node and Go HTTP/1.1 servers on loopback ports, with a
//!   short idle keep-alive timeout and (but for Node) no `Keep-Alive` header.
//! - [`client`]: what the tests' client and the bench's share: connecting from a 127.0.0.x
//!   source, and the classes of a failed request.
//! - [`pki`]: a test CA and the server and client certificates it signs, as PEM files.
//! - [`eventually`]: polling a condition until it holds, bounded.
//!
//! The kaproxy binary does not depend on it; it depends on the `kaproxy` library.
#![forbid(unsafe_code)]

pub mod apache;
pub mod backends;
pub mod client;
pub mod naive;
pub mod pki;
mod poll;
pub mod relay;

pub use kaproxy_demo as demo;
pub use poll::{eventually, eventually_async, poll_until, POLL_INTERVAL};
