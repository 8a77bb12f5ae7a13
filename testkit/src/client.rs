//! Owns what every test client of kaproxy shares, the integration tests' keep-alive client and
//! `kaproxy-bench`'s load generator alike: the TCP connect from a chosen 127.0.0.x source
//! address, and sorting a failed request into the classes an operator finds in client logs
//! during a keep-alive race (connect refused, reset by peer, closed before response, timeout;
//! anything else is "other").

use std::error::Error as StdError;
use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

/// Why a request got no complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// Opens a TCP connection to `addr` with `TCP_NODELAY`, from `source` if given (any 127.0.0.x
/// works on Linux without configuring it), so that kaproxy sees distinct client IPs.
pub async fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A server for one failed request: it accepts one connection on a fresh loopback port, reads
/// the request head, then runs `then` on the socket (drop it, reset it, keep it unanswered).
/// Returns its address and, once a client connected, the client's address.
pub async fn one_request_server<F>(
    then: F,
) -> io::Result<(SocketAddr, oneshot::Receiver<SocketAddr>)>
where
    F: FnOnce(TcpStream) + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (peer_tx, peer_rx) = oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut s, peer)) = listener.accept().await else {
            return;
        };
        let _ = peer_tx.send(peer);
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
    Ok((addr, peer_rx))
}

#[cfg(test)]
mod tests {
    //! Classification against real loopback sockets, through a hyper HTTP/1.1 client as both
    //! test clients use one.
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    type BoxError = Box<dyn StdError + Send + Sync>;

    async fn get(addr: SocketAddr, source: Option<IpAddr>) -> Result<http::StatusCode, BoxError> {
        let io = TokioIo::new(connect_from(addr, source).await?);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let request = http::Request::get("/")
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        Ok(status)
    }

    async fn one_request(addr: SocketAddr, timeout: Duration) -> ErrorClass {
        match tokio::time::timeout(timeout, get(addr, None)).await {
            Err(_) => ErrorClass::Timeout,
            Ok(Ok(status)) => panic!("expected an error, got status {status}"),
            Ok(Err(e)) => classify(e.as_ref()),
        }
    }

    #[tokio::test]
    async fn reset_by_peer() {
        let (addr, _) = one_request_server(|s| {
            // SO_LINGER 0: close() sends an RST instead of a FIN.
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
        })
        .await
        .unwrap();
        assert_eq!(
            one_request(addr, Duration::from_secs(5)).await,
            ErrorClass::ResetByPeer
        );
    }

    #[tokio::test]
    async fn closed_before_response() {
        let (addr, _) = one_request_server(drop).await.unwrap();
        assert_eq!(
            one_request(addr, Duration::from_secs(5)).await,
            ErrorClass::ClosedBeforeResponse
        );
    }

    #[tokio::test]
    async fn timeout() {
        let (keep_tx, keep_rx) = std::sync::mpsc::channel();
        // Never answers; the socket is kept open until the test ends.
        let (addr, _) = one_request_server(move |s| keep_tx.send(s).unwrap())
            .await
            .unwrap();
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

    #[tokio::test]
    async fn connects_from_the_chosen_source_address() {
        let (addr, peer) = one_request_server(drop).await.unwrap();
        let source: IpAddr = "127.0.0.7".parse().unwrap();
        let _ = get(addr, Some(source)).await;
        assert_eq!(peer.await.unwrap().ip(), source);
    }

    #[test]
    fn plain_io_kinds() {
        let e = io::Error::new(io::ErrorKind::ConnectionReset, "x");
        assert_eq!(classify(&e), ErrorClass::ResetByPeer);
        let e = io::Error::new(io::ErrorKind::InvalidData, "tls alert");
        assert_eq!(classify(&e), ErrorClass::Other);
    }
}
