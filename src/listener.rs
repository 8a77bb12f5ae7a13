//! Owns the downstream sockets: binding with socket2 options, the accept loop with back-off,
//! per-socket options, the PROXY protocol header, and the TLS handshake (ALPN decides HTTP/2
//! or HTTP/1.1). No HTTP here.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, warn};

use crate::limit::{AcceptErrors, ListenerLimit, Slot};

use crate::downstream::{self, LingeringTcp};
use crate::proxy::DownstreamInfo;
use crate::server::Generation;

/// Pending connections the kernel queues for us (nginx's default backlog is 511; kaproxy
/// aims at bursts of TLS handshakes).
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a listening socket with SO_REUSEADDR (quick restarts) and a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Which kind of listener an accept loop serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Https,
    Http,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Https => "https",
            Kind::Http => "http",
        }
    }
}

/// A listener's connection gauges: `kaproxy_downstream_connections` and
/// `kaproxy_downstream_connections_waiting`.
#[derive(Clone)]
pub struct Gauges {
    pub open: Gauge,
    pub waiting: Gauge,
}

/// Accepts connections until shutdown; each connection runs in its own task and holds a
/// clone of `done` so the server can wait for all of them to finish, and a slot of `limit`'s
/// limiter. With every slot taken, the connection just accepted waits (unserved) while the
/// longest-idle parked connection is closed, or until a slot frees; meanwhile nothing more is
/// accepted and new clients wait in the kernel's backlog.
#[allow(clippy::too_many_arguments)]
pub async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    current: Arc<ArcSwap<Generation>>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
    gauges: Gauges,
    proxy_protocol: bool,
    limit: ListenerLimit,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, "listener has no local address");
            return;
        }
    };
    let mut errors = AcceptErrors::new(kind.label());
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                errors.accepted();
                pair
            }
            Err(e) => {
                // Out of file descriptors or similar: the listener stays readable, so back
                // off rather than spin (and shed an idle connection to free a descriptor).
                let pause = errors.failed(&e, Some(limit.limiter()));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        let slot = match limit.limiter().try_acquire() {
            Some(slot) => slot,
            None => {
                debug!(
                    listener = kind.label(),
                    max_connections = limit.limiter().max(),
                    "at max_connections; making room"
                );
                tokio::select! {
                    slot = limit.limiter().acquire() => slot,
                    _ = shutdown.changed() => return,
                }
            }
        };
        let current = current.clone();
        let limit = limit.clone();
        let shutdown = shutdown.clone();
        let done = done.clone();
        let gauges = gauges.clone();
        tokio::spawn(async move {
            gauges.open.inc();
            let on = Accepted {
                peer,
                local,
                kind,
                proxy_protocol,
            };
            handle(stream, on, current, shutdown, gauges.waiting.clone(), limit).await;
            gauges.open.dec();
            drop::<Slot>(slot);
            drop(done);
        });
    }
}

/// Where a connection was accepted.
struct Accepted {
    peer: SocketAddr,
    local: SocketAddr,
    kind: Kind,
    proxy_protocol: bool,
}

async fn handle(
    mut stream: TcpStream,
    on: Accepted,
    current: Arc<ArcSwap<Generation>>,
    shutdown: watch::Receiver<bool>,
    waiting: Gauge,
    limit: ListenerLimit,
) {
    // Connection-level settings (timeouts, TLS) are those current at accept; every request
    // then routes with the configuration current when it arrives.
    let generation = current.load_full();
    let cfg = generation.downstream.clone();
    let Accepted {
        mut peer,
        local,
        kind,
        proxy_protocol,
    } = on;
    if proxy_protocol {
        match tokio::time::timeout(cfg.header_timeout, read_proxy_header(&mut stream)).await {
            Ok(Ok(Some(source))) => peer = source,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                warn!(peer = %peer, error = %e, "bad PROXY protocol header; closing the connection");
                return;
            }
            Err(_) => {
                warn!(peer = %peer, timeout = ?cfg.header_timeout, "no PROXY protocol header in time; closing the connection");
                return;
            }
        }
    }
    let _ = stream.set_nodelay(true);
    if let Some(idle) = cfg.tcp_keepalive {
        let sock = socket2::SockRef::from(&stream);
        let _ = sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle));
    }
    let io = LingeringTcp::new(stream).with_send_timeout(cfg.send_timeout);
    let info = DownstreamInfo::new(peer, local, kind == Kind::Https);
    // Each branch is boxed, so a connection's task holds the state of its own protocol only
    // (the TLS handshake state made every plain connection's task 9 KiB; now ~0.5 KiB + serve).
    match kind {
        Kind::Http => {
            Box::pin(downstream::serve(
                io, false, info, current, cfg, shutdown, waiting, limit,
            ))
            .await
        }
        Kind::Https => {
            let Some(tls) = generation.tls.clone() else {
                return;
            };
            drop(generation);
            Box::pin(serve_tls(
                io, tls, info, current, cfg, shutdown, waiting, limit,
            ))
            .await;
        }
    }
}

/// TLS handshake (bounded by `header_timeout`), then HTTP/2 or HTTP/1.1 as ALPN decided.
#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    io: LingeringTcp,
    tls: Arc<rustls::ServerConfig>,
    info: DownstreamInfo,
    current: Arc<ArcSwap<Generation>>,
    cfg: Arc<crate::config::DownstreamConfig>,
    shutdown: watch::Receiver<bool>,
    waiting: Gauge,
    limit: ListenerLimit,
) {
    let peer = info.peer;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let tls_stream = match tokio::time::timeout(cfg.header_timeout, acceptor.accept(io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(client = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(client = %peer, "TLS handshake timed out");
            return;
        }
    };
    let http2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
    downstream::serve(
        tls_stream, http2, info, current, cfg, shutdown, waiting, limit,
    )
    .await;
}

/// The v2 signature (PROXY protocol spec, section 2.2).
const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const PROXY_V1_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
    #[error("the connection does not start with a PROXY protocol v1 or v2 header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
}

/// Reads exactly one PROXY protocol v1 or v2 header (nothing past it, so TLS or HTTP bytes
/// that follow stay in the socket) and returns the client address it carries; `None` for
/// `LOCAL`/`UNKNOWN` headers (a load balancer's own health check), which keep the peer.
pub async fn read_proxy_header<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // Both versions are at least 15 bytes long ("PROXY UNKNOWN\r\n").
    let mut buf = vec![0u8; 12];
    stream.read_exact(&mut buf).await?;
    if buf.as_slice() == PROXY_V2_SIGNATURE {
        let mut rest = [0u8; 4];
        stream.read_exact(&mut rest).await?;
        buf.extend_from_slice(&rest);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let start = buf.len();
        buf.resize(start + len, 0);
        stream.read_exact(&mut buf[start..]).await?;
        let header = ppp::v2::Header::try_from(buf.as_slice())
            .map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
        if header.command == ppp::v2::Command::Local {
            return Ok(None);
        }
        return Ok(match header.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v2::Addresses::IPv6(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            _ => None,
        });
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    // v1: read up to CRLF, a byte at a time, so that nothing after the header is consumed.
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= PROXY_V1_MAX {
            return Err(ProxyHeaderError::Malformed(
                "v1 header longer than 107 bytes".into(),
            ));
        }
        let byte = stream.read_u8().await?;
        buf.push(byte);
    }
    let header = ppp::v1::Header::try_from(buf.as_slice())
        .map_err(|e| ProxyHeaderError::Malformed(e.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Sends `bytes` then "after" on a real socket; returns what read_proxy_header made of
    /// it and what remained readable.
    async fn parse(bytes: Vec<u8>) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            s.write_all(b"after").await.unwrap();
            s.shutdown().await.unwrap();
            s
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let res = read_proxy_header(&mut stream)
            .await
            .map_err(|e| e.to_string());
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        drop(writer.await);
        (res, rest)
    }

    #[tokio::test]
    async fn v1_header_gives_the_client_address_and_consumes_only_itself() {
        let (res, rest) = parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec()).await;
        assert_eq!(res.unwrap(), Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(rest, b"after");
        let (res, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n".to_vec()).await;
        assert_eq!(res.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        let (res, _) = parse(b"PROXY UNKNOWN\r\n".to_vec()).await;
        assert_eq!(res.unwrap(), None);
    }

    #[tokio::test]
    async fn v2_header_gives_the_client_address_and_consumes_only_itself() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "198.51.100.9:40000".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .write_tlv(ppp::v2::Type::NoOp, b"pad")
        .unwrap()
        .build()
        .unwrap();
        let (res, rest) = parse(header).await;
        assert_eq!(res.unwrap(), Some("198.51.100.9:40000".parse().unwrap()));
        assert_eq!(rest, b"after");
    }

    #[tokio::test]
    async fn missing_or_garbage_header_is_an_error() {
        let (res, _) = parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(res.unwrap_err().contains("does not start with"));
        let (res, _) = parse(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n".to_vec()).await;
        assert!(res.unwrap_err().contains("malformed"));
        let (res, _) = parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 and it goes on and on and on and on and on and on and on and on and on and on and on\r\n".to_vec()).await;
        assert!(res.is_err());
    }
}
