//! Owns the upstream side's typed errors: what failed (each timeout with its duration), the
//! metrics kind it counts as, the status the client gets, and whether it may move on to the
//! next server (a client's broken body is [`crate::body::BodyError`], never one of these).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

use crate::ops::metrics::ErrorKind;

/// A failure while getting a response from a backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP/1.1 handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error(
        "no connection slot to {addr} within {timeout:?} (max_connections_per_server reached)"
    )]
    AcquireTimeout { addr: SocketAddr, timeout: Duration },
    #[error("{addr} sent no response within {timeout:?}")]
    ResponseTimeout { addr: SocketAddr, timeout: Duration },
    #[error("{addr} closed the connection before responding: {source}")]
    ClosedBeforeResponse {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{addr} reset the connection: {source}")]
    Reset {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Sorts a hyper send error into reset / closed-before-response.
    pub fn from_send(addr: SocketAddr, source: hyper::Error) -> Self {
        if is_reset(&source) {
            UpstreamError::Reset { addr, source }
        } else {
            UpstreamError::ClosedBeforeResponse { addr, source }
        }
    }

    /// The `kind` label of `kaproxy_upstream_errors_total`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Handshake { .. } => ErrorKind::Connect,
            UpstreamError::ConnectTimeout { .. }
            | UpstreamError::AcquireTimeout { .. }
            | UpstreamError::ResponseTimeout { .. } => ErrorKind::Timeout,
            UpstreamError::ClosedBeforeResponse { .. } => ErrorKind::ClosedBeforeResponse,
            UpstreamError::Reset { .. } => ErrorKind::Reset,
        }
    }

    /// Connecting never reached the backend's HTTP layer, so any method may move on to the
    /// next server.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Handshake { .. }
        )
    }

    /// The status the downstream client gets when no retry saves the request.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::AcquireTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

fn is_reset(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            );
        }
        source = e.source();
    }
    false
}
