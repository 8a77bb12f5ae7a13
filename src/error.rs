//! Owns the one error type for a request's failure, in the spirit of pingora-error:
//! [`RequestError`] says what failed (each timeout with its duration, the source error kept),
//! which [`Side`] caused it, the metrics kind it counts as (only the backend's failures count),
//! the status the client gets, and how it may be retried ([`Retry`]).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

use crate::body::BodyError;
use crate::ops::metrics::{BackendMetrics, ErrorKind};

/// Which side of the proxy caused a failure (Pingora's split).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client: a broken, stalled or abandoned request body. Never blamed on a backend.
    Downstream,
    /// The backend: connect, reset or close before a response byte, response timeout.
    Upstream,
    /// kaproxy itself: no connection slot within `acquire_timeout`.
    Internal,
}

/// Whether, and how, a failed request may be sent again (the rule is stated once, in
/// `proxy/retry.rs`; this is each failure's part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Not at all (the client's fault, or kaproxy out of slots).
    Never,
    /// Nothing reached the backend's HTTP layer: any method may go to the next server.
    AnyMethod,
    /// The request may have been written: only if it can be sent again (never written, or
    /// idempotent with an empty or buffered body).
    IfResendable,
    /// The backend may still be working on it: only with `retry_on_timeout`, and only if it
    /// can be sent again.
    IfTimeoutsRetried,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The client's request body, read by kaproxy (buffering), failed.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// The client's request body failed while hyper wrote it upstream (a [`BodyError`] is in
    /// the source chain).
    #[error("request body to {addr} failed: {source}")]
    BodyStreamed {
        addr: SocketAddr,
        source: hyper::Error,
    },
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

impl RequestError {
    /// Sorts a hyper send error: the client's body, a reset, or a close before a response.
    pub fn from_send(addr: SocketAddr, source: hyper::Error) -> Self {
        if BodyError::in_chain(&source).is_some() {
            RequestError::BodyStreamed { addr, source }
        } else if is_reset(&source) {
            RequestError::Reset { addr, source }
        } else {
            RequestError::ClosedBeforeResponse { addr, source }
        }
    }

    /// The `kind` label of `kaproxy_upstream_errors_total`; None for the client's failures,
    /// which are never counted there.
    pub fn kind(&self) -> Option<ErrorKind> {
        Some(match self {
            RequestError::Body(_) | RequestError::BodyStreamed { .. } => return None,
            RequestError::Connect { .. } | RequestError::Handshake { .. } => ErrorKind::Connect,
            RequestError::ConnectTimeout { .. }
            | RequestError::AcquireTimeout { .. }
            | RequestError::ResponseTimeout { .. } => ErrorKind::Timeout,
            RequestError::ClosedBeforeResponse { .. } => ErrorKind::ClosedBeforeResponse,
            RequestError::Reset { .. } => ErrorKind::Reset,
        })
    }

    pub fn side(&self) -> Side {
        match self {
            RequestError::Body(_) | RequestError::BodyStreamed { .. } => Side::Downstream,
            RequestError::AcquireTimeout { .. } => Side::Internal,
            _ => Side::Upstream,
        }
    }

    pub fn retry(&self) -> Retry {
        match self {
            RequestError::Body(_)
            | RequestError::BodyStreamed { .. }
            | RequestError::AcquireTimeout { .. } => Retry::Never,
            RequestError::Connect { .. }
            | RequestError::ConnectTimeout { .. }
            | RequestError::Handshake { .. } => Retry::AnyMethod,
            RequestError::ClosedBeforeResponse { .. } | RequestError::Reset { .. } => {
                Retry::IfResendable
            }
            RequestError::ResponseTimeout { .. } => Retry::IfTimeoutsRetried,
        }
    }

    /// Counts this failure in `kaproxy_upstream_errors_total` of `metrics` — the backend's
    /// failures only: a client's never counts against a backend.
    pub fn count_in(&self, metrics: &BackendMetrics) {
        if let Some(kind) = self.kind() {
            metrics.error(kind);
        }
    }

    /// The client's body failure behind this error, if it is one.
    pub fn body_error(&self) -> Option<&BodyError> {
        match self {
            RequestError::Body(e) => Some(e),
            RequestError::BodyStreamed { source, .. } => BodyError::in_chain(source),
            _ => None,
        }
    }

    /// The status the downstream client gets when no retry saves the request.
    pub fn status(&self) -> StatusCode {
        if let Some(body) = self.body_error() {
            return body.status();
        }
        match self {
            RequestError::AcquireTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_knows_its_side_kind_retry_and_status() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let refused = RequestError::Connect {
            addr,
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert_eq!(refused.side(), Side::Upstream);
        assert_eq!(refused.kind(), Some(ErrorKind::Connect));
        assert_eq!(refused.retry(), Retry::AnyMethod);
        assert_eq!(refused.status(), StatusCode::BAD_GATEWAY);
        let slow = RequestError::ResponseTimeout {
            addr,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            (slow.kind(), slow.retry()),
            (Some(ErrorKind::Timeout), Retry::IfTimeoutsRetried)
        );
        assert_eq!(slow.status(), StatusCode::GATEWAY_TIMEOUT);
        let full = RequestError::AcquireTimeout {
            addr,
            timeout: Duration::from_secs(1),
        };
        assert_eq!((full.side(), full.retry()), (Side::Internal, Retry::Never));
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        let stalled = RequestError::from(BodyError::Timeout(Duration::from_secs(1)));
        assert_eq!((stalled.side(), stalled.kind()), (Side::Downstream, None));
        assert_eq!(
            (stalled.retry(), stalled.status()),
            (Retry::Never, StatusCode::REQUEST_TIMEOUT)
        );
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
