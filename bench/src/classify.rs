//! Sorts a failed request into the classes an operator finds in client logs during a keep-alive
//! race: connect refused, reset by peer, closed before response, timeout (anything else is
//! "other").

use std::error::Error as StdError;
use std::io;

use serde::Serialize;

/// Why a request got no complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// `ECONNREFUSED` on connect: nothing listens (or the backlog is full).
    ConnectRefused,
    /// `ECONNRESET` / `EPIPE`: the peer answered with an RST ("Connection reset by peer").
    ResetByPeer,
    /// The peer closed (FIN) before a whole response arrived: "connection closed before
    /// message completed", Reactor Netty's "Connection prematurely closed BEFORE response".
    ClosedBeforeResponse,
    /// No complete response within the request timeout.
    Timeout,
    /// TLS failures, protocol errors, local resource errors.
    Other,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::ConnectRefused,
        ErrorClass::ResetByPeer,
        ErrorClass::ClosedBeforeResponse,
        ErrorClass::Timeout,
        ErrorClass::Other,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            ErrorClass::ConnectRefused => "connect refused",
            ErrorClass::ResetByPeer => "reset by peer",
            ErrorClass::ClosedBeforeResponse => "closed before response",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Other => "other",
        }
    }
}

/// Classifies an error by walking its source chain: the first I/O error kind or hyper condition
/// that names a class decides.
pub fn classify(err: &(dyn StdError + 'static)) -> ErrorClass {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(class) = classify_io(io.kind()) {
                return class;
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return ErrorClass::Timeout;
            }
            // A hyper error that wraps an I/O error is decided by that error (next in the chain).
            let wraps_io = h
                .source()
                .is_some_and(|s| s.downcast_ref::<io::Error>().is_some());
            if !wraps_io && (h.is_incomplete_message() || h.is_canceled() || h.is_closed()) {
                return ErrorClass::ClosedBeforeResponse;
            }
        }
        cur = e.source();
    }
    ErrorClass::Other
}

fn classify_io(kind: io::ErrorKind) -> Option<ErrorClass> {
    match kind {
        io::ErrorKind::ConnectionRefused => Some(ErrorClass::ConnectRefused),
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Some(ErrorClass::ResetByPeer),
        // A TLS handshake or read that met EOF where data was due.
        io::ErrorKind::UnexpectedEof => Some(ErrorClass::ClosedBeforeResponse),
        io::ErrorKind::TimedOut => Some(ErrorClass::Timeout),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! Classification against real loopback sockets: the errors come from the same client code
    //! the load generator uses.
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::conn::{Connector, HttpVersion, RequestTemplate, Target, TlsOptions};

    async fn one_request(addr: SocketAddr, timeout: Duration) -> ErrorClass {
        let target = Target::parse(&format!("http://{addr}/")).unwrap();
        let connector = Arc::new(
            Connector::new(&target, HttpVersion::Http1, &TlsOptions::default(), None)
                .await
                .unwrap(),
        );
        let template = RequestTemplate::get(&target, HttpVersion::Http1);
        let result = crate::conn::request_once(&connector, &template, timeout).await;
        match result {
            Ok(r) => panic!("expected an error, got status {}", r.status),
            Err(e) => classify(e.as_ref()),
        }
    }

    /// Accepts one connection, reads the request head, then runs `then` on the socket.
    async fn server<F>(then: F) -> SocketAddr
    where
        F: FnOnce(tokio::net::TcpStream) + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            then(s);
        });
        addr
    }

    #[tokio::test]
    async fn reset_by_peer() {
        let addr = server(|s| {
            // SO_LINGER 0: close() sends an RST instead of a FIN.
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
        })
        .await;
        assert_eq!(
            one_request(addr, Duration::from_secs(5)).await,
            ErrorClass::ResetByPeer
        );
    }

    #[tokio::test]
    async fn closed_before_response() {
        let addr = server(drop).await;
        assert_eq!(
            one_request(addr, Duration::from_secs(5)).await,
            ErrorClass::ClosedBeforeResponse
        );
    }

    #[tokio::test]
    async fn timeout() {
        let (keep_tx, keep_rx) = std::sync::mpsc::channel();
        // Never answers; the socket is kept open until the test ends.
        let addr = server(move |s| keep_tx.send(s).unwrap()).await;
        assert_eq!(
            one_request(addr, Duration::from_millis(200)).await,
            ErrorClass::Timeout
        );
        drop(keep_rx);
    }

    #[tokio::test]
    async fn connect_refused() {
        // A port that was free a moment ago and has no listener now.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert_eq!(
            one_request(addr, Duration::from_secs(5)).await,
            ErrorClass::ConnectRefused
        );
    }

    #[test]
    fn plain_io_kinds() {
        let e = io::Error::new(io::ErrorKind::ConnectionReset, "x");
        assert_eq!(classify(&e), ErrorClass::ResetByPeer);
        let e = io::Error::new(io::ErrorKind::InvalidData, "tls alert");
        assert_eq!(classify(&e), ErrorClass::Other);
    }
}
