//! The `kaproxy` binary: parses the command line, sets up tracing and the runtime, loads the
//! config, starts the `[demo]` backends, and runs a command. Nothing else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kaproxy::config::{Config, LogColor, LogConfig, LogFormat};

/// The configuration `kaproxy demo` serves: the repository's default config, built in.
const DEMO_CONFIG: &str = include_str!("../config.toml");

#[derive(Parser)]
#[command(
    name = "kaproxy",
    version,
    about = "TLS-terminating reverse proxy that never reuses a keep-alive connection its peer is about to close"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file.
    #[arg(long, short, global = true, default_value = "config.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default command).
    Run,
    /// Validate the config and print the keep-alive timeline; exit 1 on errors.
    Check,
    /// Measure a backend's real keep-alive behaviour and recommend settings.
    Probe {
        /// The backend, HOST:PORT.
        target: String,
        /// Speak TLS to the backend.
        #[arg(long)]
        tls: bool,
    },
    /// Start two built-in Apache-like demo backends and the proxy in front of them.
    Demo,
    /// Per-server control through the admin listener of the running kaproxy that --config
    /// describes (its [admin] listen and token).
    Server {
        #[command(subcommand)]
        action: ServerAction,
    },
}

#[derive(Subcommand)]
enum ServerAction {
    /// List the servers (of one upstream, or of all) with weight, drain state and load.
    List { upstream: Option<String> },
    /// No new requests to ADDR; its idle connections closed, requests in flight finish.
    Drain { upstream: String, addr: String },
    /// ADDR takes requests again (ramping over slow_start).
    Enable { upstream: String, addr: String },
    /// Set ADDR's weight to N (until a reload that changes its configured weight).
    Weight {
        upstream: String,
        addr: String,
        n: u32,
    },
}

/// mimalloc, because it gives freed pages back to the system (see [`release_memory_every_second`]):
/// with glibc's malloc the buffers of a burst of connections that then sit idle (parked)
/// stay in RSS for good. The `system-alloc` feature leaves the system allocator in place, so that
/// heaptrack sees every allocation (bench/allocs.sh); the `mi_collect` calls below then find
/// mimalloc's heaps empty and allocate nothing.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every second, has mimalloc return the memory freed since to the system, delays expired or
/// not. mimalloc otherwise purges only during later allocations, so a server that goes quiet
/// after a burst (say, 10 000 clients that each sent a request and now idle, parked) would
/// keep the burst's peak in RSS. Measured: 10 000 such connections hold ~68 MiB a second after
/// the burst instead of ~200 MiB until the next activity; CPU per request within noise.
async fn release_memory_every_second() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: mi_collect only gives back memory mimalloc holds unused.
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}

/// Run by each runtime thread as it goes idle: at most once a second, has mimalloc collect
/// that thread's heap (with several workers, the ticker above runs on only one of them).
fn release_memory_when_idle() {
    thread_local!(static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) });
    let now = std::time::Instant::now();
    LAST.with(|last| {
        if last
            .get()
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
        {
            last.set(Some(now));
            // SAFETY: mi_collect only gives back memory mimalloc holds unused.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => load(&cli.config).and_then(|c| serve(c, false)),
        Command::Check => return check(&cli.config),
        Command::Demo => Config::from_toml_str(DEMO_CONFIG, Path::new("config.toml (built in)"))
            .map_err(anyhow::Error::from)
            .and_then(|c| serve(c, true)),
        Command::Probe { target, tls } => probe(&target, tls),
        Command::Server { action } => server(&cli.config, action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kaproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

fn check(path: &Path) -> ExitCode {
    let report = kaproxy::config::check(path);
    print!("{report}");
    if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn probe(target: &str, tls: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    println!(
        "probing {target}: one keep-alive request, then waiting up to {}s for the backend to close it",
        kaproxy::control::probe::DEFAULT_MAX_WAIT.as_secs()
    );
    let report = runtime.block_on(kaproxy::control::probe::probe(
        target,
        tls,
        kaproxy::control::probe::DEFAULT_MAX_WAIT,
    ))?;
    print!("{report}");
    Ok(())
}

/// `kaproxy server ...`: one request to the admin listener, its answer printed; exit 1 unless
/// it was a 2xx.
fn server(config: &Path, action: ServerAction) -> anyhow::Result<()> {
    use kaproxy::control::admin_client;
    let cfg = load(config)?;
    let listen = cfg.admin.listen.with_context(|| {
        format!(
            "{}: [admin] listen is disabled; kaproxy server needs the admin listener",
            config.display()
        )
    })?;
    let seg = |s: &str| {
        s.replace('%', "%25")
            .replace('[', "%5B")
            .replace(']', "%5D")
    };
    let (method, path) = match &action {
        ServerAction::List { upstream: None } => ("GET", "/servers".to_string()),
        ServerAction::List { upstream: Some(u) } => ("GET", format!("/servers/{}", seg(u))),
        ServerAction::Drain { upstream, addr } => (
            "POST",
            format!("/servers/{}/{}/drain", seg(upstream), seg(addr)),
        ),
        ServerAction::Enable { upstream, addr } => (
            "POST",
            format!("/servers/{}/{}/enable", seg(upstream), seg(addr)),
        ),
        ServerAction::Weight { upstream, addr, n } => (
            "POST",
            format!("/servers/{}/{}/weight?value={n}", seg(upstream), seg(addr)),
        ),
    };
    let addr = admin_client::dial_addr(listen);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let token = cfg.admin.token.as_deref();
    let answer = runtime.block_on(admin_client::request(addr, method, &path, token))?;
    if !(200..300).contains(&answer.status) {
        let reason = serde_json::from_str::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| answer.body.trim().to_string());
        anyhow::bail!("{method} {path}: {} {reason}", answer.status);
    }
    let body: serde_json::Value =
        serde_json::from_str(&answer.body).context("the admin listener's answer is not JSON")?;
    let servers = match body {
        serde_json::Value::Array(list) => list,
        one => vec![one],
    };
    println!(
        "{:<12} {:<24} {:>7} {:>10} {:>8} {:>9} {:>5}",
        "UPSTREAM", "SERVER", "WEIGHT", "CONFIGURED", "STATE", "IN_FLIGHT", "IDLE"
    );
    for s in &servers {
        let state = match (s["drained"].as_bool(), s["up"].as_bool()) {
            (Some(true), _) => "drained",
            (_, Some(false)) => "down",
            _ => "up",
        };
        println!(
            "{:<12} {:<24} {:>7} {:>10} {:>8} {:>9} {:>5}",
            s["upstream"].as_str().unwrap_or("?"),
            s["addr"].as_str().unwrap_or("?"),
            s["weight"].to_string(),
            s["configured_weight"].to_string(),
            state,
            s["in_flight"].to_string(),
            s["idle_connections"].to_string(),
        );
    }
    Ok(())
}

fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if !log.access_log {
        filter = filter.add_directive("kaproxy::access=off".parse().expect("valid directive"));
    }
    // stderr, as daemons and containers log (nginx's `error_log stderr`); stdout is left to
    // command output such as `kaproxy check`. Colour only on a terminal unless told.
    let color = match log.color {
        LogColor::Always => true,
        LogColor::Never => false,
        LogColor::Auto => std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().with_ansi(false).init(),
        LogFormat::Text => builder.with_ansi(color).init(),
    }
}

/// The environment variable that sets how often the status page's history samples the
/// metrics, in milliseconds (default 5000).
const HISTORY_INTERVAL_ENV: &str = "KAPROXY_HISTORY_INTERVAL_MS";

/// Options that are not configuration keys (those are fixed by the product spec): from the
/// environment.
fn server_options() -> anyhow::Result<kaproxy::ServerOptions> {
    let mut options = kaproxy::ServerOptions::default();
    if let Ok(ms) = std::env::var(HISTORY_INTERVAL_ENV) {
        let ms: u64 = ms
            .trim()
            .parse()
            .ok()
            .filter(|ms| *ms >= 10)
            .with_context(|| {
                format!("{HISTORY_INTERVAL_ENV}={ms:?}: want milliseconds, at least 10")
            })?;
        options.history_interval = std::time::Duration::from_millis(ms);
    }
    Ok(options)
}

fn serve(config: Config, demo: bool) -> anyhow::Result<()> {
    init_tracing(&config.log);
    let mut options = server_options()?;
    raise_open_file_limit();
    // Workers (README, "Workers"): with one, everything runs on this thread's current-thread
    // runtime; with more, each worker is a thread with its own current-thread runtime and
    // listeners, and this thread's runtime keeps the admin listener, the history, the health
    // probes, the signals and the `[demo]` backends.
    let n = kaproxy::workers::count(config.runtime.worker_threads);
    let workers = match n {
        1 => None,
        n => Some(
            kaproxy::workers::Workers::start(n, std::sync::Arc::new(release_memory_when_idle))
                .context("cannot start the worker threads")?,
        ),
    };
    if let Some(w) = &workers {
        options.workers = w.handles();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(kaproxy::workers::MAX_BLOCKING_THREADS)
        .on_thread_park(release_memory_when_idle)
        .build()
        .context("cannot start the tokio runtime")?;
    let result = runtime.block_on(async move {
        let demo_backends = demo::start(config.demo.as_ref()).await?;
        let server = kaproxy::Server::start_with(config, options).await?;
        tokio::spawn(release_memory_every_second());
        if demo {
            print_demo_help(&server);
        }
        wait_for_signal(&server).await;
        tracing::info!("shutting down: draining in-flight requests");
        server.shutdown().await;
        demo::stop(demo_backends).await;
        Ok(())
    });
    // Lingering closes and demo tasks must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Some(w) = workers {
        w.stop();
    }
    result
}

/// `kaproxy demo` and the `[demo]` backends (Apache-like, `demo-1` … `demo-n`), started before
/// the proxy that sits in front of them: development tooling, in the binary with the default
/// `demo` feature.
#[cfg(feature = "demo")]
mod demo {
    use anyhow::Context;
    use kaproxy_demo::{DemoBackend, DemoBackendConfig};

    pub type Backend = DemoBackend;

    /// Starts the backends `[demo]` names; one that cannot bind stops startup.
    pub async fn start(demo: Option<&kaproxy::config::DemoConfig>) -> anyhow::Result<Vec<Backend>> {
        let mut backends = Vec::new();
        for (i, addr) in demo.map_or(&[][..], |d| &d.backends).iter().enumerate() {
            let cfg = DemoBackendConfig {
                name: format!("demo-{}", i + 1),
                ..DemoBackendConfig::default()
            };
            let backend = DemoBackend::start(*addr, cfg)
                .await
                .with_context(|| format!("cannot start demo backend on {addr}"))?;
            tracing::info!(addr = %backend.addr(), "demo backend started (Apache-like, KeepAliveTimeout 5s, development only)");
            backends.push(backend);
        }
        Ok(backends)
    }

    pub async fn stop(backends: Vec<Backend>) {
        for backend in backends {
            backend.stop().await;
        }
    }
}

/// Built without the `demo` feature: a config that asks for `[demo]` backends is refused.
#[cfg(not(feature = "demo"))]
mod demo {
    pub enum Backend {}

    pub async fn start(demo: Option<&kaproxy::config::DemoConfig>) -> anyhow::Result<Vec<Backend>> {
        if demo.is_some_and(|d| !d.backends.is_empty()) {
            anyhow::bail!(
                "[demo] backends need kaproxy built with the `demo` feature (a default one)"
            );
        }
        Ok(Vec::new())
    }

    pub async fn stop(_: Vec<Backend>) {}
}

/// Raises the soft open-file limit to the hard one before anything is served (nginx's
/// `worker_rlimit_nofile`, HAProxy's start-up): every client connection is a descriptor, and
/// so is its upstream connection. `[downstream] max_connections = 0` is derived from the
/// raised limit (see `kaproxy::downstream::limit::derived_max_connections`).
fn raise_open_file_limit() {
    match kaproxy::downstream::limit::raise_nofile_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(
                from = before,
                to = after,
                "raised the open-file limit (RLIMIT_NOFILE)"
            )
        }
        Ok((_, now)) => tracing::info!(limit = now, "open-file limit (RLIMIT_NOFILE)"),
        Err(e) => tracing::warn!(
            error = %e,
            limit = kaproxy::downstream::limit::nofile_limit(),
            "cannot raise the open-file limit (RLIMIT_NOFILE); keeping it"
        ),
    }
}

fn print_demo_help(server: &kaproxy::Server) {
    println!("kaproxy demo: two Apache-like backends (KeepAliveTimeout 5s) behind kaproxy. Try:");
    if let Some(a) = server.https_addr() {
        println!("  curl -k https://{a}/");
        println!("  curl -k --http2 https://{a}/ -d 'hello'");
    }
    if let Some(a) = server.http_addr() {
        println!("  curl -v http://{a}/");
    }
    if let Some(a) = server.admin_addr() {
        println!("  curl http://{a}/metrics");
        println!("  curl http://{a}/status");
    }
}

/// Waits for SIGTERM/SIGINT; SIGHUP reloads the configuration meanwhile.
async fn wait_for_signal(server: &kaproxy::Server) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading configuration");
                if let Err(e) = server.reload().await {
                    tracing::error!(error = %e, "reload rejected; the old configuration keeps serving");
                }
            }
        }
    }
}
