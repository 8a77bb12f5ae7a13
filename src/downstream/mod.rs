//! The client side: accepting connections (with the connection cap), the PROXY header, TLS,
//! and serving each connection's HTTP/1.1 or HTTP/2; plus [`Generation`], what a connection
//! needs from one loaded configuration (built by [`crate::control::generation`]).

pub mod conn;
pub mod h1;
pub mod h1_read;
pub mod h2_head;
pub mod limit;
pub mod listener;
pub mod proxy_protocol;
pub mod requests;
pub mod send_watch;
pub mod socket;
pub mod timers;
pub mod tls;

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::{Config, DownstreamConfig};
use crate::downstream::limit::ListenerLimit;
use crate::proxy::{DownstreamInfo, Proxy};
use crate::shutdown::Shutdown;

/// Everything a downstream connection needs from one loaded configuration. A connection keeps
/// the generation it was accepted under; a reload swaps in a new one for new connections.
pub struct Generation {
    pub config: Arc<Config>,
    pub proxy: Arc<Proxy>,
    pub downstream: Arc<DownstreamConfig>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// What one downstream connection carries from accept to serve: who the client is, the
/// settings it was accepted under, and its listener's shared handles.
pub struct ConnContext {
    /// The client address (socket or PROXY header) and the listener's.
    pub info: DownstreamInfo,
    /// The configuration generation current now: each request routes with the one current
    /// when it arrives (reload).
    pub current: Arc<ArcSwap<Generation>>,
    /// The connection-level settings current at accept (timeouts, limits).
    pub cfg: Arc<DownstreamConfig>,
    /// Flips to true when the server shuts down.
    pub shutdown: Shutdown,
    /// `kaproxy_downstream_connections_waiting` of the listener (parked connections).
    pub waiting: Gauge,
    /// The listener's view of the connection cap, where a parked connection registers.
    pub limit: ListenerLimit,
}
