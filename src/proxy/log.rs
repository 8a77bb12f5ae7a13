//! Owns the access log: one line per request (client, method, path, status, upstream
//! server, bytes, duration, reuse of the upstream connection), written when the response
//! body ends or is abandoned, kaproxy's own error answers included.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tracing::info;

use http::Method;
use tokio::time::Instant;

/// One access log line, written when the response body is finished (or abandoned).
#[derive(Debug)]
pub(super) struct AccessRecord {
    pub(super) client: IpAddr,
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) status: u16,
    pub(super) upstream: String,
    pub(super) server: Option<SocketAddr>,
    pub(super) reused: bool,
    pub(super) conn_age: Duration,
    pub(super) conn_requests: u32,
    pub(super) start: Instant,
}

impl Default for AccessRecord {
    fn default() -> Self {
        AccessRecord {
            client: IpAddr::from([0, 0, 0, 0]),
            method: Method::GET,
            path: String::new(),
            status: 0,
            upstream: String::new(),
            server: None,
            reused: false,
            conn_age: Duration::ZERO,
            conn_requests: 0,
            start: Instant::now(),
        }
    }
}

impl AccessRecord {
    /// Writes the line (target `kaproxy::access`, so `access_log = false` and log filters can
    /// turn it off), with the body bytes sent.
    pub(super) fn write(&self, bytes: u64) {
        let r = self;
        info!(target: "kaproxy::access",
            client = %r.client,
            method = %r.method,
            path = %r.path,
            status = r.status,
            upstream = %r.upstream,
            server = %r.server.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            bytes,
            duration_ms = r.start.elapsed().as_secs_f64() * 1000.0,
            reused = r.reused,
            conn_age_ms = r.conn_age.as_millis() as u64,
            conn_requests = r.conn_requests,
            "access");
    }
}
