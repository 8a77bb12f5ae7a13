//! Owns the running proxy: builds a [`Generation`] from the config, binds the listeners,
//! spawns the accept loops and the admin listener, and drains on shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::Config;
use crate::control::generation::{self, GenerationError};
use crate::control::history::History;
use crate::control::reload::{start_health_checks, Control, ReloadError};
use crate::downstream::limit::{self, Limiter, ListenerLimit};
use crate::downstream::listener::{self, Kind, Listener};
use crate::downstream::Generation;
use crate::metrics::Metrics;
use crate::shutdown::ShutdownSignal;

/// Failures that stop kaproxy from starting (or a reload from taking effect).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(transparent)]
    Generation(#[from] GenerationError),
}

/// How a [`Server`] runs beyond its [`Config`] (which holds only the product's configuration
/// keys): set by the binary from its environment, by tests directly.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How often the status page's history samples the metrics (`KAPROXY_HISTORY_INTERVAL_MS`
    /// for the binary; default 5 s, [`crate::control::history::SAMPLES`] samples kept).
    pub history_interval: Duration,
    /// The worker runtimes that accept and serve connections, each with its own listeners
    /// and pools ([`crate::workers::Workers`]); empty: the runtime calling
    /// [`Server::start_with`] is the one worker. The admin listener, the history and the
    /// health probes run on the calling runtime either way.
    pub workers: Arc<[Handle]>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            history_interval: crate::control::history::DEFAULT_INTERVAL,
            workers: Arc::new([]),
        }
    }
}

/// A running kaproxy.
pub struct Server {
    https: Option<SocketAddr>,
    http: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    shutdown: ShutdownSignal,
    connections: mpsc::Receiver<()>,
    tasks: Vec<JoinHandle<()>>,
    shutdown_timeout: Duration,
}

impl Server {
    /// Starts serving `config` (already validated): listeners, admin endpoint. (`[demo]`
    /// backends are the binary's to start, before this.)
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Self::start_with(config, ServerOptions::default()).await
    }

    /// [`Server::start`] with `options`.
    pub async fn start_with(config: Config, options: ServerOptions) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let workers: Arc<[Handle]> = match options.workers.len() {
            0 => Arc::new([Handle::current()]),
            _ => options.workers.clone(),
        };
        let generation = generation::build(&config, &metrics, &workers, None)?;
        let health_checks = start_health_checks(&generation.proxy);
        let current = Arc::new(ArcSwap::from_pointee(generation));
        let shutdown = ShutdownSignal::new();
        let (done_tx, connections) = mpsc::channel::<()>(1);
        let mut tasks = Vec::new();
        let control = Arc::new(Control {
            current: current.clone(),
            metrics: metrics.clone(),
            source: config.source.clone(),
            started: config.clone(),
            health_checks: Mutex::new(health_checks),
            resolving: Mutex::new(None),
        });
        *crate::sync::lock(&control.resolving) = Some(crate::control::resolve::spawn(&control));
        let bind_error = |what: &'static str, addr: SocketAddr| {
            move |source| StartError::Bind { what, addr, source }
        };
        let (max_connections, derived_from) =
            limit::effective_max_connections(config.downstream.max_connections);
        match derived_from {
            Some(nofile) => info!(
                max_connections,
                open_file_limit = nofile,
                "downstream connection cap derived from the open-file limit: (limit - reserve) / 2"
            ),
            None => info!(max_connections, "downstream connection cap"),
        }
        let limiter = Limiter::new(max_connections);
        let mut addrs = [None, None];
        for (slot, kind, addr) in [
            (0, Kind::Https, config.listen.https),
            (1, Kind::Http, config.listen.http),
        ] {
            let Some(addr) = addr else { continue };
            let what = kind.label();
            let sockets =
                listener::bind_for_workers(addr, workers.len()).map_err(bind_error(what, addr))?;
            let local = sockets[0].local_addr().map_err(bind_error(what, addr))?;
            info!(listener = what, addr = %local, workers = workers.len(), "listening");
            addrs[slot] = Some(local);
            let shed = metrics.downstream_connections_shed(what);
            for (socket, worker) in sockets.into_iter().zip(workers.iter()) {
                // Registered with the worker's reactor, accepted and served on its thread.
                let socket = {
                    let _on_worker = worker.enter();
                    tokio::net::TcpListener::from_std(socket).map_err(bind_error(what, addr))?
                };
                let listener = Listener {
                    socket,
                    kind,
                    proxy_protocol: config.listen.proxy_protocol,
                    current: current.clone(),
                    shutdown: shutdown.subscribe(),
                    done: done_tx.clone(),
                    gauges: listener::Gauges {
                        open: metrics.downstream_connections(what),
                        waiting: metrics.downstream_connections_waiting(what),
                    },
                    limit: ListenerLimit::new(limiter.clone(), shed.clone()),
                };
                tasks.push(worker.spawn(listener.run()));
            }
        }
        let admin = match config.admin.listen {
            Some(addr) => {
                let l = listener::bind(addr).map_err(bind_error("admin", addr))?;
                let local = l.local_addr().map_err(bind_error("admin", addr))?;
                info!(addr = %local, "admin listening (/ status page, /metrics, /healthz, /status, /history, POST /reload, /servers)");
                let history = History::new(options.history_interval);
                tasks.push(tokio::spawn(
                    history.clone().start(current.clone(), shutdown.subscribe()),
                ));
                tasks.push(tokio::spawn(crate::control::admin::serve(
                    l,
                    metrics.clone(),
                    control.clone(),
                    history,
                    shutdown.subscribe(),
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
        self.shutdown.begin();
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
        crate::sync::lock(&self.control.health_checks).clear();
        if let Some(task) = crate::sync::lock(&self.control.resolving).take() {
            task.abort();
        }
        self.control.current.load().proxy.close_idle();
        info!("stopped");
    }
}
