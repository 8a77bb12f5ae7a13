//! Owns the downstream sockets: binding with socket2 options, the accept loop with back-off,
//! per-socket options, the PROXY protocol header, and the TLS handshake (ALPN decides HTTP/2
//! or HTTP/1.1). No HTTP here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::Either;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use crate::downstream::limit::{AcceptErrors, ListenerLimit, Slot};

use crate::config::DownstreamConfig;
use crate::downstream::conn;
use crate::downstream::socket::LingeringTcp;
use crate::downstream::{ConnContext, Generation};
use crate::proxy::DownstreamInfo;
use crate::shutdown::Shutdown;

/// Pending connections the kernel queues for us (nginx's default backlog is 511; kaproxy
/// aims at bursts of TLS handshakes).
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a listening socket with SO_REUSEADDR (quick restarts) and a deep backlog, in the
/// current tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, false)?)
}

/// Binds `workers` listening sockets on the same address, each for one worker's runtime to
/// register: with more than one, `SO_REUSEPORT`, so that the kernel spreads new connections
/// over them (nginx's `listen ... reuseport`). Port 0 picks one port for all of them.
///
/// An address in use is an error, as with one worker: the address is first bound once
/// without `SO_REUSEPORT` (which fails while any socket listens there, `SO_REUSEPORT` or
/// not), so a second kaproxy started by the same user does not silently share the port.
pub fn bind_for_workers(
    addr: SocketAddr,
    workers: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    if workers <= 1 {
        return Ok(vec![bind_std(addr, false)?]);
    }
    let addr = bind_std(addr, false)?.local_addr()?;
    (0..workers).map(|_| bind_std(addr, true)).collect()
}

fn bind_std(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
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

/// One listening socket and what its connections share (mini-redis's `Listener`).
pub struct Listener {
    pub socket: TcpListener,
    pub kind: Kind,
    /// Each connection starts with a PROXY protocol header (`listen.proxy_protocol`).
    pub proxy_protocol: bool,
    /// The configuration generation current now (swapped by a reload).
    pub current: Arc<ArcSwap<Generation>>,
    pub shutdown: Shutdown,
    /// Each connection's task holds a clone, so the server can wait for all of them to end.
    pub done: mpsc::Sender<()>,
    pub gauges: Gauges,
    /// The connection cap, shared with the server's other listeners.
    pub limit: ListenerLimit,
}

impl Listener {
    /// At shutdown: the parked connections are woken to see it (they watch no shutdown
    /// future of their own while they wait).
    fn stopped(&self) {
        self.limit.limiter().wake_parked();
    }

    /// Accepts connections until shutdown, each served in its own task holding a slot of the
    /// limiter. With every slot taken, the connection just accepted waits (unserved) while the
    /// longest-idle parked connection is closed, or until a slot frees; meanwhile nothing more
    /// is accepted and new clients wait in the kernel's backlog.
    pub async fn run(mut self) {
        let local = match self.socket.local_addr() {
            Ok(a) => a,
            Err(e) => {
                error!(error = %e, "listener has no local address");
                return;
            }
        };
        let label = self.kind.label();
        let mut errors = AcceptErrors::new(label);
        loop {
            let accepted = tokio::select! {
                res = self.socket.accept() => res,
                _ = self.shutdown.begun() => return self.stopped(),
            };
            let (stream, peer) = match accepted {
                Ok(pair) => {
                    errors.accepted();
                    pair
                }
                Err(e) => {
                    // Out of file descriptors or similar: the listener stays readable, so back
                    // off rather than spin (and shed an idle connection to free a descriptor).
                    let pause = errors.failed(&e, Some(self.limit.limiter()));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = self.shutdown.begun() => return self.stopped(),
                    }
                }
            };
            let slot = match self.limit.limiter().try_acquire() {
                Some(slot) => slot,
                None => {
                    debug!(
                        listener = label,
                        max_connections = self.limit.limiter().max(),
                        "at max_connections; making room"
                    );
                    tokio::select! {
                        slot = self.limit.limiter().acquire() => slot,
                        _ = self.shutdown.begun() => return self.stopped(),
                    }
                }
            };
            let on = Accepted {
                peer,
                local,
                kind: self.kind,
                proxy_protocol: self.proxy_protocol,
            };
            let listening = Listening {
                current: self.current.clone(),
                shutdown: self.shutdown.clone(),
                waiting: self.gauges.waiting.clone(),
                limit: self.limit.clone(),
            };
            let held = Held::new(self.gauges.open.clone(), slot, self.done.clone());
            tokio::spawn(handle(stream, on, listening, held));
        }
    }
}

/// What a connection's task holds for its whole life: counted in `open`, a slot of the
/// limiter, and a clone of the server's `done` sender; all let go when the task ends.
struct Held {
    open: Gauge,
    _slot: Slot,
    _done: mpsc::Sender<()>,
}

impl Held {
    fn new(open: Gauge, slot: Slot, done: mpsc::Sender<()>) -> Held {
        open.inc();
        Held {
            open,
            _slot: slot,
            _done: done,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Where a connection was accepted.
struct Accepted {
    peer: SocketAddr,
    local: SocketAddr,
    kind: Kind,
    proxy_protocol: bool,
}

/// The listener's handles each of its connections gets a clone of.
struct Listening {
    current: Arc<ArcSwap<Generation>>,
    shutdown: Shutdown,
    waiting: Gauge,
    limit: ListenerLimit,
}

/// Serves one accepted connection: its PROXY header first when the listener expects one, then
/// TLS or not, then HTTP. A plain connection without a PROXY header (the most common, and the
/// one most often parked) is its serving future and the task's guards, nothing else: one
/// allocation. The others are boxed, with the state of their first steps.
fn handle(
    stream: TcpStream,
    on: Accepted,
    listening: Listening,
    held: Held,
) -> impl Future<Output = ()> {
    // Connection-level settings (timeouts, TLS) are those current at accept; every request
    // then routes with the configuration current when it arrives.
    let cfg = listening.current.load().downstream.clone();
    if on.kind == Kind::Http && !on.proxy_protocol {
        let (io, ctx) = prepare(stream, on.peer, &on, cfg, listening);
        return Either::Left(Holding {
            conn: conn::serve(io, false, ctx),
            _held: held,
        });
    }
    Either::Right(Box::pin(async move {
        let _held = held;
        let mut stream = stream;
        let mut peer = on.peer;
        if on.proxy_protocol {
            match tokio::time::timeout(
                cfg.header_timeout,
                crate::downstream::proxy_protocol::read_proxy_header(&mut stream),
            )
            .await
            {
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
        let (io, ctx) = prepare(stream, peer, &on, cfg, listening);
        match on.kind {
            Kind::Http => conn::serve(io, false, ctx).await,
            Kind::Https => {
                // Not held while serving: a connection kept alive must not keep an old
                // generation (and the pools of servers a reload or `resolve` removed, with
                // their idle connections) alive.
                let Some(tls) = ctx.current.load().tls.clone() else {
                    return;
                };
                serve_tls(io, tls, ctx).await;
            }
        }
    }))
}

/// The accepted socket set up (`TCP_NODELAY`, keep-alive probes, the send deadline) and the
/// context it is served with, `peer` the client (the socket's, or the PROXY header's).
fn prepare(
    stream: TcpStream,
    peer: SocketAddr,
    on: &Accepted,
    cfg: Arc<DownstreamConfig>,
    listening: Listening,
) -> (LingeringTcp, ConnContext) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = cfg.tcp_keepalive {
        let sock = socket2::SockRef::from(&stream);
        let _ = sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle));
    }
    let io = LingeringTcp::new(stream).with_send_timeout(cfg.send_timeout);
    let ctx = ConnContext {
        info: DownstreamInfo::new(peer, on.local, on.kind == Kind::Https),
        current: listening.current,
        cfg,
        shutdown: listening.shutdown,
        waiting: listening.waiting,
        limit: listening.limit,
    };
    (io, ctx)
}

pin_project_lite::pin_project! {
    /// A connection's serving future with the guards its task holds.
    struct Holding<F> {
        #[pin]
        conn: F,
        _held: Held,
    }
}

impl<F: Future> Future for Holding<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().conn.poll(cx)
    }
}

/// TLS handshake (bounded by `header_timeout`), then HTTP/2 or HTTP/1.1 as ALPN decided.
async fn serve_tls(io: LingeringTcp, tls: Arc<rustls::ServerConfig>, ctx: ConnContext) {
    let (peer, cfg) = (ctx.info.peer, ctx.cfg.clone());
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
    conn::serve(tls_stream, http2, ctx).await;
}
