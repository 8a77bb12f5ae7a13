//! The client side: accepting connections (with the connection cap), the PROXY header, TLS,
//! and serving each connection's HTTP/1.1 or HTTP/2; plus [`Generation`], what a connection
//! needs from one loaded configuration.

pub mod conn;
pub mod h2_head;
pub mod limit;
pub mod listener;
pub mod proxy_protocol;
pub mod send_watch;
pub mod tls;

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use crate::config::{Config, DownstreamConfig};
use crate::downstream::limit::ListenerLimit;
use crate::downstream::tls::TlsError;
use crate::ops::metrics::Metrics;
use crate::proxy::{DownstreamInfo, Proxy, ProxyError};

/// Why a configuration could not be put to work (at start; at reload the old one keeps
/// serving): its certificates, or its upstreams' TLS files.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

/// Everything a downstream connection needs from one loaded configuration. A connection keeps
/// the generation it was accepted under; a reload swaps in a new one for new connections.
pub struct Generation {
    pub config: Arc<Config>,
    pub proxy: Arc<Proxy>,
    pub downstream: Arc<DownstreamConfig>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Generation {
    /// Builds everything a configuration needs at run time, keeping the pools of `previous`
    /// that still fit (see [`Proxy::reusing`]).
    pub fn build(
        config: &Config,
        metrics: &Arc<Metrics>,
        workers: &Arc<[tokio::runtime::Handle]>,
        previous: Option<&Proxy>,
    ) -> Result<Generation, GenerationError> {
        let tls = match config.listen.https {
            Some(_) => Some(crate::downstream::tls::server_config(&config.tls)?),
            None => None,
        };
        let proxy = Proxy::reusing(config, metrics.clone(), workers, previous)?;
        crate::upstream::tls::warn_unverified(&config.upstreams);
        Ok(Generation {
            config: Arc::new(config.clone()),
            proxy: Arc::new(proxy),
            downstream: Arc::new(config.downstream.clone()),
            tls,
        })
    }
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
    pub shutdown: watch::Receiver<bool>,
    /// `kaproxy_downstream_connections_waiting` of the listener (parked connections).
    pub waiting: Gauge,
    /// The listener's view of the connection cap, where a parked connection registers.
    pub limit: ListenerLimit,
}
