//! Owns an upstream group: its name, its configuration as loaded, and the balancer over its
//! backends — and building it at load, each backend with one pool per worker and the group's
//! TLS, and on reload keeping the backends (their pools, warm connections and active-health
//! verdict) that still fit.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::runtime::Handle;

use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::upstream::backend::{worker_pools, Backend, BackendHealth};
use crate::upstream::balancer::Balancer;
use crate::upstream::tls::{UpstreamTls, UpstreamTlsError};

/// Why an upstream group could not be built (a reload keeps the old one).
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("upstream {upstream}: {source}")]
    Tls {
        upstream: String,
        source: Box<UpstreamTlsError>,
    },
}

/// One named upstream group: its balancer over its backends, each with its pools.
pub struct UpstreamGroup {
    pub name: String,
    pub balancer: Balancer,
    /// The group's configuration as loaded (retry, buffers, timeouts; `/status` reads it).
    pub config: UpstreamConfig,
    /// `kaproxy_request_body_too_large_total` of this group.
    pub too_large: Counter,
}

impl UpstreamGroup {
    /// Builds the group `u` describes, keeping the pools (and their warm connections) of
    /// `previous`'s servers that stay with the same pool and TLS settings (reload; their TLS
    /// files are read again and apply to the connections they open from now on).
    pub fn build(
        u: &UpstreamConfig,
        metrics: &Metrics,
        workers: &Arc<[Handle]>,
        previous: Option<&UpstreamGroup>,
    ) -> Result<UpstreamGroup, GroupError> {
        let tls = match &u.tls {
            Some(t) => Some(UpstreamTls::new(t).map_err(|source| GroupError::Tls {
                upstream: u.name.clone(),
                source: Box::new(source),
            })?),
            None => None,
        };
        let old = previous.filter(|o| o.config.tls == u.tls);
        let backends = u
            .servers
            .iter()
            .map(|server| {
                let old =
                    old.and_then(|o| o.balancer.backends().iter().find(|b| b.addr == server.addr));
                // A server that stays with the same pool settings keeps its pool and its warm
                // connections.
                let pools = old
                    .filter(|b| b.pool_config() == &u.pool)
                    .filter(|b| b.pools().len() == workers.len())
                    .map(|b| b.keep_pools(tls.clone()))
                    .unwrap_or_else(|| {
                        let m = metrics.server(&u.name, server.addr);
                        worker_pools(server.addr, &u.pool, m, tls.clone(), workers)
                    });
                let health = BackendHealth::new(u.passive.fall, u.passive.cooldown);
                // The probes' verdict survives a reload (only while probes run to clear it).
                if let (Some(old), Some(_)) = (old, &u.health) {
                    health.inherit_active(&old.health);
                }
                let backend = Backend::with_pools(server.weight, health, u.pool.clone(), pools)
                    .with_slow_start(u.slow_start);
                // Drained or re-weighted by the admin API: still so after the reload, whatever
                // else changed.
                let same_server = previous
                    .and_then(|o| o.balancer.backends().iter().find(|b| b.addr == server.addr));
                if let Some(old) = same_server {
                    backend.inherit_admin(old);
                }
                Arc::new(backend)
            })
            .collect();
        Ok(UpstreamGroup {
            name: u.name.clone(),
            balancer: Balancer::new(u, backends),
            config: u.clone(),
            too_large: metrics.request_body_too_large(&u.name),
        })
    }
}
