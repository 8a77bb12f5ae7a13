//! Owns configuration reload (SIGHUP, `POST /reload`): re-reads the file and certificates,
//! builds a new [`Generation`] that keeps the warm pools of servers that stay, swaps it in
//! atomically and restarts the active health checks; a bad file changes nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::control::generation::{self, GenerationError};
use crate::downstream::Generation;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::upstream::health::{spawn_active_checks, ActiveChecks};

/// Starts the active checks of every upstream with `[health]`, on the backends of `proxy`.
/// They live on [`Control`], not in the generation: an old generation lives as long as any
/// connection accepted under it, and its probes must stop at reload.
pub(crate) fn start_health_checks(proxy: &Proxy) -> Vec<ActiveChecks> {
    proxy
        .upstreams()
        .iter()
        .filter_map(|u| {
            let health = u.config.health.as_ref()?;
            let targets = u.balancer.backends().to_vec();
            Some(spawn_active_checks(&u.name, targets, health))
        })
        .collect()
}

/// Why a reload was refused (the old configuration keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("kaproxy was not started from a configuration file; nothing to reload")]
    NoSource,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Generation(#[from] GenerationError),
    #[error("configuration loader failed: {0}")]
    Loader(#[from] tokio::task::JoinError),
}

/// Swaps configuration generations at run time (SIGHUP, `POST /reload`).
pub struct Control {
    pub(crate) current: Arc<ArcSwap<Generation>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) source: Option<PathBuf>,
    pub(crate) started: Config,
    pub(crate) health_checks: Mutex<Vec<ActiveChecks>>,
    /// The task that re-resolves server names (`resolve`; [`crate::control::resolve`]).
    pub(crate) resolving: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Control {
    /// The generation new connections are served with.
    pub fn generation(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Re-reads the configuration file and certificates and swaps them in atomically:
    /// connections accepted from now on use the new generation, requests in flight finish on
    /// the old one. An invalid file or certificate changes nothing.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let path = self.source.clone().ok_or(ReloadError::NoSource)?;
        let config = tokio::task::spawn_blocking(move || Config::load(&path)).await??;
        self.apply(config)
    }

    /// Swaps in an already validated configuration.
    pub fn apply(&self, config: Config) -> Result<(), ReloadError> {
        let old = self.current.load_full();
        let workers = old.proxy.workers().clone();
        let generation = generation::build(&config, &self.metrics, &workers, Some(&old.proxy))?;
        let checks = start_health_checks(&generation.proxy);
        let s = &self.started;
        if config.listen.https != s.listen.https
            || config.listen.http != s.listen.http
            || config.admin.listen != s.admin.listen
        {
            warn!("listener addresses changed; they take effect on restart only");
        }
        if config.downstream.max_connections != s.downstream.max_connections {
            warn!("downstream max_connections changed; it takes effect on restart only");
        }
        if config.listen.https.is_some() && s.listen.https.is_none() {
            warn!("an https listener was added; it takes effect on restart only");
        }
        self.current.store(Arc::new(generation));
        // Dropping the old checks aborts their probes.
        *crate::sync::lock(&self.health_checks) = checks;
        info!(upstreams = config.upstreams.len(), "configuration reloaded");
        Ok(())
    }
}
