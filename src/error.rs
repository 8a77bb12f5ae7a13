//! Owns the one error type for a request's failure, in the spirit of pingora-error:
//! [`RequestError`] says what failed (each timeout with its duration, the source error kept),
//! which [`Side`] caused it, the metrics kind it counts as (only the backend's failures count),
//! the status the client gets, and how it may be retried ([`Retry`]).
//!
//! It also holds [`UpstreamTlsError`], what building upstream TLS or a handshake with a backend
//! fails with: [`RequestError::Tls`] carries it, and this module names nothing of the upstream
//! layer (`tests/it/layout.rs`), so it is defined here and re-exported by `upstream::tls`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;

use crate::body::BodyError;
use crate::config::pem::PemError;
use crate::http1::chunked::ChunkError;
use crate::http1::framing::FramingError;
use crate::http1::head::HeadError;
use crate::metrics::{BackendMetrics, ErrorKind};

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
    /// The client's request body failed while it was written upstream (a [`BodyError`] is in
    /// the source chain: kaproxy's own writer gives it as is, hyper's tunnel connection wraps it).
    #[error("request body to {addr} failed: {source}")]
    BodyStreamed {
        addr: SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
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
    ClosedBeforeResponse { addr: SocketAddr, source: WireError },
    #[error("{addr} reset the connection: {source}")]
    Reset { addr: SocketAddr, source: WireError },
    /// The backend answered `101 Switching Protocols` to a request that offered no protocol,
    /// or to another one than it offered (RFC 9110 §15.2.2): a protocol violation, answered
    /// 502 and its connection closed; not one of the metrics' kinds.
    #[error("{addr} switched protocols without being asked (RFC 9110 §15.2.2)")]
    UnexpectedUpgrade { addr: SocketAddr },
    /// The response cannot be forwarded: a head or framing that is not HTTP/1.1 (conflicting
    /// lengths, an oversized head), a body that breaks before its first byte is sent on (a
    /// chunk line with an oversized extension), or a temporary file that cannot be read: 502,
    /// not one of the metrics' kinds (the backend did answer), never retried.
    #[error("the response body from {addr} cannot be forwarded: {source}")]
    BrokenResponse {
        addr: SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The TLS handshake with the backend failed (`tls = true`): nothing was sent, and
    /// nothing is ever sent in the clear instead.
    #[error("TLS to {addr} failed: {source}")]
    Tls {
        addr: SocketAddr,
        source: UpstreamTlsError,
    },
}

/// What broke an exchange on a backend connection: its socket, an end before the message did,
/// or bytes that are not HTTP/1.1 by kaproxy's codec ([`crate::http1`]); hyper's errors for
/// the connections hyper still drives (a tunnel's).
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The backend closed the connection (a FIN, or TLS `close_notify`) before the message ended.
    #[error("connection closed {0}")]
    Closed(&'static str),
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

impl WireError {
    /// The backend's bytes were not HTTP/1.1 (as opposed to a connection that ended or broke).
    pub fn is_malformed(&self) -> bool {
        match self {
            WireError::Head(_) | WireError::Framing(_) | WireError::Chunk(_) => true,
            WireError::Hyper(e) => e.is_parse() || e.is_parse_too_large(),
            WireError::Io(_) | WireError::Closed(_) => false,
        }
    }

    /// The error this one wraps, itself: `transparent` variants pass `source()` on to the
    /// wrapped error's own source, which would skip an `io::Error` when a chain is searched.
    fn wrapped(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            WireError::Io(e) => e,
            WireError::Head(e) => e,
            WireError::Framing(e) => e,
            WireError::Chunk(e) => e,
            WireError::Hyper(e) => e,
            WireError::Closed(_) => self,
        }
    }
}

/// Why upstream TLS could not be set up from `[upstreams.NAME]`'s `tls_*` keys, or why a
/// handshake with a backend failed. Handshake failures name the server name kaproxy verified
/// and keep rustls' error as their source.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    /// A `tls_ca`, `tls_client_cert` or `tls_client_key` file (the message starts with its path).
    #[error(transparent)]
    File(#[from] PemError),
    /// `tls_client_cert` without `tls_client_key`, or the reverse.
    #[error("mutual TLS needs both tls_client_cert and tls_client_key")]
    IncompleteClientIdentity,
    /// rustls refused the client configuration.
    #[error("TLS client configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The backend's certificate does not chain to a trusted CA.
    #[error("the backend's certificate is not signed by a trusted CA ({roots}): {source}")]
    UnknownCa {
        /// Which roots were used: `tls_ca <path>` or the webpki-roots bundle.
        roots: String,
        source: rustls::Error,
    },
    /// The certificate is valid, but not for the name kaproxy verifies.
    #[error("the backend's certificate is not valid for {name} (tls_server_name, else the server's IP): {source}")]
    NameMismatch { name: String, source: rustls::Error },
    /// Any other TLS failure: an alert from the backend (e.g. it wants a client certificate),
    /// an expired certificate, no common protocol version, a backend that does not speak TLS.
    #[error("TLS handshake as {name} failed: {source}")]
    Handshake { name: String, source: rustls::Error },
    /// The connection itself failed during the handshake (reset, or closed by the backend).
    #[error("TLS handshake as {name} failed: {source}")]
    Io { name: String, source: io::Error },
}

impl RequestError {
    /// Sorts a hyper send error (a tunnel's connection): the client's body, else as
    /// [`Self::from_wire`] sorts it.
    pub fn from_send(addr: SocketAddr, source: hyper::Error) -> Self {
        if BodyError::in_chain(&source).is_some() {
            RequestError::BodyStreamed {
                addr,
                source: Box::new(source),
            }
        } else {
            RequestError::from_wire(addr, WireError::Hyper(source))
        }
    }

    /// Sorts what broke an exchange before its response could be forwarded: bytes that are
    /// not HTTP/1.1, the backend refusing the TLS session, a reset, or a close.
    pub fn from_wire(addr: SocketAddr, source: WireError) -> Self {
        if source.is_malformed() {
            RequestError::BrokenResponse {
                addr,
                source: Box::new(source),
            }
        } else if let Some(refusal) =
            rustls_error_in(source.wrapped()).filter(|e| is_tls_refusal(e))
        {
            // Under TLS 1.3 a backend checks the client's certificate after kaproxy's side of
            // the handshake is done (RFC 8446 §4.4.2.4), so its refusal arrives with the first
            // read: a failed handshake all the same, and the request was never processed.
            RequestError::Tls {
                addr,
                source: UpstreamTlsError::Handshake {
                    name: addr.ip().to_string(),
                    source: refusal.clone(),
                },
            }
        } else if is_reset(&source) {
            RequestError::Reset { addr, source }
        } else {
            RequestError::ClosedBeforeResponse { addr, source }
        }
    }

    /// The `kind` label of `kaproxy_upstream_errors_total`; None for the client's failures,
    /// which are never counted there, and for a backend's protocol violation, which has no
    /// kind of its own (it is answered 502 and logged).
    pub fn kind(&self) -> Option<ErrorKind> {
        Some(match self {
            RequestError::Body(_)
            | RequestError::BodyStreamed { .. }
            | RequestError::UnexpectedUpgrade { .. }
            | RequestError::BrokenResponse { .. } => return None,
            RequestError::Connect { .. } | RequestError::Handshake { .. } => ErrorKind::Connect,
            RequestError::Tls { .. } => ErrorKind::Tls,
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
            | RequestError::AcquireTimeout { .. }
            | RequestError::UnexpectedUpgrade { .. }
            | RequestError::BrokenResponse { .. } => Retry::Never,
            // A failed TLS handshake sent nothing either: like a connect failure, any method
            // moves on to the next server (never again to this one: proxy/retry.rs).
            RequestError::Connect { .. }
            | RequestError::ConnectTimeout { .. }
            | RequestError::Handshake { .. }
            | RequestError::Tls { .. } => Retry::AnyMethod,
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
            RequestError::BodyStreamed { source, .. } => BodyError::in_chain(&**source),
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

/// An alert by which a TLS peer refuses the session for its certificates (RFC 8446 §6.2).
fn is_tls_refusal(err: &rustls::Error) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        err,
        rustls::Error::AlertReceived(
            A::CertificateRequired
                | A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::HandshakeFailure
        )
    )
}

/// The rustls error in `err`'s source chain, if any: how a TLS failure after the handshake
/// (an alert, a bad record) is told from a plain reset when it surfaces as an I/O or hyper
/// error. tokio-rustls wraps it in an `io::Error`, whose `source()` skips the error it wraps,
/// so that one is looked into with `get_ref`.
pub fn rustls_error_in<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let wrapped = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref);
        if let Some(tls) = wrapped.and_then(|w| w.downcast_ref::<rustls::Error>()) {
            return Some(tls);
        }
        source = e.source();
    }
    None
}

fn is_reset(err: &WireError) -> bool {
    let mut source = Some(err.wrapped());
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
        let tls = RequestError::Tls {
            addr,
            source: UpstreamTlsError::Io {
                name: "127.0.0.1".into(),
                source: io::Error::from(io::ErrorKind::ConnectionReset),
            },
        };
        assert_eq!(tls.side(), Side::Upstream);
        assert_eq!(tls.kind(), Some(ErrorKind::Tls));
        assert_eq!(tls.retry(), refused.retry());
        assert_eq!(tls.status(), StatusCode::BAD_GATEWAY);
        assert!(
            tls.to_string()
                .starts_with("TLS to 127.0.0.1:9 failed: TLS handshake as 127.0.0.1"),
            "{tls}"
        );
        let stalled = RequestError::from(BodyError::Timeout(Duration::from_secs(1)));
        assert_eq!((stalled.side(), stalled.kind()), (Side::Downstream, None));
        assert_eq!(
            (stalled.retry(), stalled.status()),
            (Retry::Never, StatusCode::REQUEST_TIMEOUT)
        );
    }
}
