//! Owns putting a loaded configuration to work: [`build`] makes the [`Generation`] a
//! downstream connection serves under — server TLS, the proxy with its upstream groups (pools
//! kept across a reload where they still fit) — at start and at every reload. The control
//! floor builds the world; the client side only serves in it.

use std::sync::Arc;

use crate::config::Config;
use crate::downstream::tls::TlsError;
use crate::downstream::Generation;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyError};

/// Why a configuration could not be put to work (at start; at reload the old one keeps
/// serving): its certificates, or its upstreams' TLS files.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

/// Builds everything `config` needs at run time, keeping the pools of `previous` that still
/// fit (see [`Proxy::reusing`]).
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
