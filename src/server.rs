//! Owns the running proxy: builds a [`Generation`] from the config, binds the listeners,
//! spawns the accept loops and the admin listener, and drains on shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{Config, ConfigError, DownstreamConfig};
use crate::demo::{DemoBackend, DemoBackendConfig};
use crate::error::StartError;
use crate::health::{spawn_active_checks, ActiveChecks};
use crate::listener::{self, Kind};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::tls::TlsError;

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
    fn build(
        config: &Config,
        metrics: &Arc<Metrics>,
        previous: Option<&Proxy>,
    ) -> Result<Generation, TlsError> {
        let tls = match config.listen.https {
            Some(_) => Some(crate::tls::server_config(&config.tls)?),
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

/// Starts the active checks of every upstream with `[health]`, on the backends of `proxy`.
/// They live on [`Control`], not in the generation: an old generation lives as long as any
/// connection accepted under it, and its probes must stop at reload.
fn start_health_checks(config: &Config, proxy: &Proxy) -> Vec<ActiveChecks> {
    config
        .upstreams
        .iter()
        .filter_map(|u| {
            let health = u.health.as_ref()?;
            let upstream = proxy.upstreams().iter().find(|p| p.name == u.name)?;
            let targets = upstream
                .balancer
                .backends()
                .iter()
                .cloned()
                .zip(upstream.pools.iter().map(|p| p.metrics().up.clone()))
                .collect();
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
    Tls(#[from] TlsError),
    #[error("configuration loader failed: {0}")]
    Loader(String),
}

/// Swaps configuration generations at run time (SIGHUP, `POST /reload`).
pub struct Control {
    current: Arc<ArcSwap<Generation>>,
    metrics: Arc<Metrics>,
    source: Option<PathBuf>,
    started: Config,
    health_checks: Mutex<Vec<ActiveChecks>>,
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
        let config = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| ReloadError::Loader(e.to_string()))??;
        self.apply(config)
    }

    /// Swaps in an already validated configuration.
    pub fn apply(&self, config: Config) -> Result<(), ReloadError> {
        let old = self.current.load_full();
        let generation = Generation::build(&config, &self.metrics, Some(&old.proxy))?;
        let checks = start_health_checks(&config, &generation.proxy);
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
        *self.health_checks.lock().unwrap_or_else(|e| e.into_inner()) = checks;
        info!(upstreams = config.upstreams.len(), "configuration reloaded");
        Ok(())
    }
}

/// A running kaproxy.
pub struct Server {
    https: Option<SocketAddr>,
    http: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    shutdown: watch::Sender<bool>,
    connections: mpsc::Receiver<()>,
    tasks: Vec<JoinHandle<()>>,
    shutdown_timeout: Duration,
    demo: Vec<DemoBackend>,
}

impl Server {
    /// Starts serving `config` (already validated): demo backends if configured, listeners,
    /// admin endpoint.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let mut demo = Vec::new();
        if let Some(d) = &config.demo {
            for (i, addr) in d.backends.iter().enumerate() {
                let cfg = DemoBackendConfig {
                    name: format!("demo-{}", i + 1),
                    ..DemoBackendConfig::default()
                };
                let backend =
                    DemoBackend::start(*addr, cfg)
                        .await
                        .map_err(|source| StartError::Demo {
                            addr: *addr,
                            source,
                        })?;
                info!(addr = %backend.addr(), "demo backend started (Apache-like, KeepAliveTimeout 5s, development only)");
                demo.push(backend);
            }
        }
        let generation = Generation::build(&config, &metrics, None)?;
        let health_checks = start_health_checks(&config, &generation.proxy);
        let current = Arc::new(ArcSwap::from_pointee(generation));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (done_tx, connections) = mpsc::channel::<()>(1);
        let mut tasks = Vec::new();
        let control = Arc::new(Control {
            current: current.clone(),
            metrics: metrics.clone(),
            source: config.source.clone(),
            started: config.clone(),
            health_checks: Mutex::new(health_checks),
        });
        let bound = |what: &'static str, addr: SocketAddr| {
            listener::bind(addr).map_err(|source| StartError::Bind { what, addr, source })
        };
        let (max_connections, derived_from) =
            crate::limit::effective_max_connections(config.downstream.max_connections);
        match derived_from {
            Some(nofile) => info!(
                max_connections,
                open_file_limit = nofile,
                "downstream connection cap derived from the open-file limit: (limit - reserve) / 2"
            ),
            None => info!(max_connections, "downstream connection cap"),
        }
        let limiter = crate::limit::Limiter::new(max_connections);
        let mut addrs = [None, None];
        for (slot, kind, addr) in [
            (0, Kind::Https, config.listen.https),
            (1, Kind::Http, config.listen.http),
        ] {
            let Some(addr) = addr else { continue };
            let l = bound(kind.label(), addr)?;
            let local = l.local_addr().map_err(|source| StartError::Bind {
                what: kind.label(),
                addr,
                source,
            })?;
            info!(listener = kind.label(), addr = %local, "listening");
            addrs[slot] = Some(local);
            tasks.push(tokio::spawn(listener::accept_loop(
                l,
                kind,
                current.clone(),
                shutdown_rx.clone(),
                done_tx.clone(),
                listener::Gauges {
                    open: metrics.downstream_connections(kind.label()),
                    waiting: metrics.downstream_connections_waiting(kind.label()),
                },
                config.listen.proxy_protocol,
                crate::limit::ListenerLimit::new(
                    limiter.clone(),
                    metrics.downstream_connections_shed(kind.label()),
                ),
            )));
        }
        let admin = match config.admin.listen {
            Some(addr) => {
                let l = bound("admin", addr)?;
                let local = l.local_addr().map_err(|source| StartError::Bind {
                    what: "admin",
                    addr,
                    source,
                })?;
                info!(addr = %local, "admin listening (/ status page, /metrics, /healthz, /status, POST /reload)");
                tasks.push(tokio::spawn(crate::admin::serve(
                    l,
                    metrics.clone(),
                    control.clone(),
                    shutdown_rx.clone(),
                )));
                Some(local)
            }
            None => None,
        };
        Ok(Server {
            https: addrs[0],
            http: addrs[1],
            admin,
            metrics,
            control,
            shutdown,
            connections,
            tasks,
            shutdown_timeout: config.admin.shutdown_timeout,
            demo,
        })
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The Prometheus text exposition, as `/metrics` serves it.
    pub fn metrics(&self) -> String {
        self.metrics.encode()
    }

    /// The configuration generation new connections are served with.
    pub fn generation(&self) -> Arc<Generation> {
        self.control.current.load_full()
    }

    /// Reloads the configuration file (see [`Control::reload`]).
    pub async fn reload(&self) -> Result<(), ReloadError> {
        self.control.reload().await
    }

    /// Handle for reloading from elsewhere (signal handlers, admin).
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Stops accepting, lets in-flight requests finish (idle connections are closed, busy
    /// ones get `Connection: close` / GOAWAY) for up to `shutdown_timeout`, then closes the
    /// upstream pools.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        // Every connection task holds a sender; recv() yields None when all are gone.
        if tokio::time::timeout(self.shutdown_timeout, self.connections.recv())
            .await
            .is_err()
        {
            warn!(timeout = ?self.shutdown_timeout, "shutdown_timeout passed with requests still in flight");
        }
        self.control
            .health_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.control.current.load().proxy.close_idle();
        for d in self.demo.drain(..) {
            d.stop().await;
        }
        info!("stopped");
    }
}
