//! The client side: accepting connections (with the connection cap), the PROXY header, TLS,
//! and serving each connection's HTTP/1.1 or HTTP/2; plus [`Generation`], what a connection
//! needs from one loaded configuration.

pub mod conn;
pub mod limit;
pub mod listener;
pub mod proxy_protocol;
pub mod send_watch;
pub mod tls;

use std::sync::Arc;

use crate::config::{Config, DownstreamConfig};
use crate::downstream::tls::TlsError;
use crate::ops::metrics::Metrics;
use crate::proxy::Proxy;

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
        previous: Option<&Proxy>,
    ) -> Result<Generation, TlsError> {
        let tls = match config.listen.https {
            Some(_) => Some(crate::downstream::tls::server_config(&config.tls)?),
            None => None,
        };
        Ok(Generation {
            config: Arc::new(config.clone()),
            proxy: Arc::new(Proxy::reusing(config, metrics.clone(), previous)),
            downstream: Arc::new(config.downstream.clone()),
            tls,
        })
    }
}
