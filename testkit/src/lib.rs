//! kaproxy-testkit owns kaproxy's development tooling, kept out of the proxy library: what
//! `kaproxy demo`, the integration tests and `kaproxy-bench` put around a running proxy.
//!
//! - [`demo`]: Apache-like HTTP/1.1 backends (`kaproxy demo`'s backends, the tests', the bench's).
//! - [`relay`]: a TCP relay that delays everything, to widen the keep-alive race on loopback.
//! - [`apache`]: a real Apache httpd 2.4 on loopback ports, for the tests and `race --apache`,
//!   optionally serving TLS with mod_ssl.
//! - [`backends`]: real nginx, Gunicorn, Node and Go HTTP/1.1 servers on loopback ports, with a
//!   short idle keep-alive timeout and (but for Node) no `Keep-Alive` header.
//! - [`pki`]: a test CA and the server and client certificates it signs, as PEM files.
//! - [`eventually`]: polling a condition until it holds, bounded.
//!
//! It does not depend on the `kaproxy` crate (the kaproxy binary depends on it).
#![forbid(unsafe_code)]

pub mod apache;
pub mod backends;
pub mod demo;
pub mod pki;
mod poll;
pub mod relay;

pub use poll::{eventually, eventually_async, poll_until, POLL_INTERVAL};
