//! Owns the downstream sockets: binding with socket2 options, the accept loop with back-off,
//! per-socket options, and the TLS handshake (ALPN decides HTTP/2 or HTTP/1.1). No HTTP here.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, warn};

use crate::downstream::{self, LingeringTcp};
use crate::proxy::DownstreamInfo;
use crate::server::Generation;

/// Pending connections the kernel queues for us (nginx's default backlog is 511; kaproxy
/// aims at bursts of TLS handshakes).
const LISTEN_BACKLOG: i32 = 4096;
/// The longest pause after repeated accept failures (EMFILE and friends).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

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

/// Accepts connections until shutdown; each connection runs in its own task and holds a
/// clone of `done` so the server can wait for all of them to finish.
pub async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    current: Arc<ArcSwap<Generation>>,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
    open: Gauge,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, "listener has no local address");
            return;
        }
    };
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(e) => {
                // Out of file descriptors or similar: back off rather than spin.
                warn!(listener = kind.label(), error = %e, backoff = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        let generation = current.load_full();
        let shutdown = shutdown.clone();
        let done = done.clone();
        let open = open.clone();
        tokio::spawn(async move {
            open.inc();
            handle(stream, peer, local, kind, generation, shutdown).await;
            open.dec();
            drop(done);
        });
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    kind: Kind,
    generation: Arc<Generation>,
    shutdown: watch::Receiver<bool>,
) {
    let cfg = generation.downstream.clone();
    let _ = stream.set_nodelay(true);
    if let Some(idle) = cfg.tcp_keepalive {
        let sock = socket2::SockRef::from(&stream);
        let _ = sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle));
    }
    let io = LingeringTcp::new(stream);
    let info = DownstreamInfo {
        peer,
        local,
        tls: kind == Kind::Https,
    };
    let proxy = generation.proxy.clone();
    match kind {
        Kind::Http => downstream::serve(io, false, info, proxy, cfg, shutdown).await,
        Kind::Https => {
            let Some(tls) = generation.tls.clone() else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let tls_stream =
                match tokio::time::timeout(cfg.header_timeout, acceptor.accept(io)).await {
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
            downstream::serve(tls_stream, http2, info, proxy, cfg, shutdown).await;
        }
    }
}
