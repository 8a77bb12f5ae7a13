//! `kaproxy-bench race`: reproduces the field incident on loopback. Backends with a short
//! keep-alive timeout sit behind kaproxy — built-in Apache-like ones, real Apache, or real
//! nginx, Gunicorn, Node or Go servers (`--real`, all but Node without a `Keep-Alive` header) —
//! run twice: once with a NAIVE pool (it trusts idle connections longer than the backend keeps
//! them, never learns the backend's timeout, never retries) and once as configured by DEFAULT
//! (kaproxy learns the backend's timeout from its header, or from its closes). Keep-alive
//! clients pausing around that timeout drive both; the client-visible errors and kaproxy's
//! pool metrics are printed side by side.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use clap::Args;
use http::Method;
use kaproxy::config::Config;
use kaproxy::Server;
use kaproxy_testkit::apache::{apache_version, Apache, ApacheOptions};
use kaproxy_testkit::backends::{BackendKind, RealBackend};
use kaproxy_testkit::demo::{DemoBackend, DemoBackendConfig, DemoStats, StaleReuse};
use kaproxy_testkit::relay::DelayRelay;
use serde::Serialize;

use crate::args;
use crate::conn::{Connector, HttpVersion, RequestTemplate, Target, TlsOptions};
use crate::load::{self, LoadPlan};
use crate::stats::Report;

/// How long the DEFAULT config claims the backend keeps connections: deliberately wrong, so
/// that only what kaproxy learns at run time (the backend's `Keep-Alive: timeout=N` header, or
/// its closes) can save the run.
const DEFAULT_MODE_TOML_POOL: &str = "keepalive_timeout = \"30s\"\nidle_timeout = \"20s\"";
/// After the load, kaproxy's sweep gets this long to close the idle upstream connections, so
/// that the metrics show who closed them.
const SETTLE: Duration = Duration::from_millis(1500);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub struct RaceArgs {
    /// Requests per method (GET and POST) per mode.
    #[arg(short = 'n', long, default_value_t = 2000)]
    requests: u64,
    /// Client keep-alive connections per method.
    #[arg(short = 'c', long, default_value_t = 100)]
    connections: usize,
    /// The backends' keep-alive timeout (Apache's KeepAliveTimeout).
    #[arg(long, default_value = "1s", value_parser = args::parse_duration)]
    backend_keepalive: Duration,
    /// Pause between two requests on a client connection (MIN..MAX).
    #[arg(long, default_value = "900ms..1100ms", value_parser = args::parse_gap)]
    idle_gap: (Duration, Duration),
    /// Number of backends.
    #[arg(long, default_value_t = 2)]
    backends: usize,
    /// POST body size in bytes.
    #[arg(long, default_value_t = 1234)]
    body_size: usize,
    /// Use real Apache httpd (/usr/sbin/apache2) as the backends instead of the built-in ones.
    #[arg(long)]
    apache: bool,
    /// Built-in backends close idle connections on their own timer, like Apache, instead of
    /// the deterministic model (drop a request that arrives on a connection idle >= timeout).
    #[arg(long, conflicts_with = "apache")]
    close_idle: bool,
    /// Use real servers of this kind as the backends: nginx, gunicorn, go (no `Keep-Alive`
    /// header: kaproxy must learn from their closes) or node (a header), `--backends` of them,
    /// with `--backend-keepalive` as their idle timeout.
    #[arg(long, value_parser = parse_kind, conflicts_with_all = ["apache", "close_idle"])]
    real: Option<BackendKind>,
    /// Put a relay that delays everything by this much (each way) in front of every backend,
    /// as a network would: Apache's FIN then reaches kaproxy this late, which opens the race
    /// window loopback keeps shut. 0s: no relay.
    #[arg(long, default_value = "0s", value_parser = args::parse_duration)]
    relay_delay: Duration,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    Naive,
    Default,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Naive => "NAIVE pool",
            Mode::Default => "kaproxy DEFAULT",
        }
    }
}

/// Everything one mode produced.
#[derive(Debug, Serialize)]
struct ModeRun {
    mode: Mode,
    get: Report,
    post: Report,
    pool: PoolMetrics,
    /// Built-in backends only.
    backend: Option<BackendCounters>,
}

#[derive(Debug, Default, Serialize)]
struct BackendCounters {
    connections_accepted: u64,
    requests_served: u64,
    /// Requests that arrived on a connection the backend had given up on (the race itself).
    stale_drops: u64,
    idle_closes: u64,
}

impl BackendCounters {
    fn add(&mut self, s: &DemoStats) {
        self.connections_accepted += s.connections_accepted;
        self.requests_served += s.requests_served;
        self.stale_drops += s.stale_drops;
        self.idle_closes += s.idle_closes;
    }
}

/// kaproxy's pool metrics, summed over servers.
#[derive(Debug, Default, Serialize)]
struct PoolMetrics {
    opened: f64,
    reused: f64,
    closed: BTreeMap<String, f64>,
    retries: BTreeMap<String, f64>,
    upstream_errors: BTreeMap<String, f64>,
}

#[derive(Serialize)]
struct RaceReport<'a> {
    backends: String,
    requests_per_method: u64,
    naive: &'a ModeRun,
    default: &'a ModeRun,
    /// True when the DEFAULT mode showed no client-visible error.
    clean: bool,
}

fn parse_kind(s: &str) -> Result<BackendKind, String> {
    BackendKind::ALL
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| format!("unknown server {s:?}: one of nginx, gunicorn, node, go"))
}

/// The backends both modes run against.
enum Backends {
    Demo(Vec<DemoBackend>),
    Apache(Box<Apache>),
    Real(Vec<RealBackend>),
}

impl Backends {
    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Backends::Demo(b) => b.iter().map(DemoBackend::addr).collect(),
            Backends::Apache(a) => a.addrs().to_vec(),
            Backends::Real(r) => r.iter().map(RealBackend::addr).collect(),
        }
    }

    fn counters(&self) -> Option<BackendCounters> {
        match self {
            Backends::Demo(b) => {
                let mut c = BackendCounters::default();
                for backend in b {
                    c.add(&backend.stats());
                }
                Some(c)
            }
            Backends::Apache(_) | Backends::Real(_) => None,
        }
    }

    async fn stop(self) {
        match self {
            Backends::Demo(b) => {
                for backend in b {
                    backend.stop().await;
                }
            }
            Backends::Apache(mut a) => a.stop().await,
            // Dropping each kills its process.
            Backends::Real(r) => drop(r),
        }
    }
}

/// Runs both modes; returns whether the DEFAULT mode was free of client-visible errors.
pub async fn run(a: RaceArgs) -> anyhow::Result<bool> {
    if a.requests == 0 || a.connections == 0 || a.backends == 0 {
        return Err(anyhow!(
            "--requests, --connections and --backends must be at least 1"
        ));
    }
    let description = match (a.apache, a.close_idle) {
        _ if a.real.is_some() => {
            let kind = a.real.expect("checked");
            format!(
                "{} real {} ({}), idle timeout {:?}, {}",
                a.backends,
                kind.name(),
                kind.version(),
                a.backend_keepalive,
                if kind.sends_keep_alive_header() {
                    "with a Keep-Alive header"
                } else {
                    "no Keep-Alive header"
                }
            )
        }
        (true, _) => format!(
            "real Apache ({}), KeepAliveTimeout {:?}",
            apache_version(),
            a.backend_keepalive
        ),
        (false, true) => format!(
            "{} built-in Apache-like backends, KeepAliveTimeout {:?}, closing idle connections on their own timer",
            a.backends, a.backend_keepalive
        ),
        (false, false) => format!(
            "{} built-in Apache-like backends, KeepAliveTimeout {:?}, dropping any request that arrives on a connection idle that long (deterministic race)",
            a.backends, a.backend_keepalive
        ),
    };
    let description = if a.relay_delay.is_zero() {
        description
    } else {
        format!(
            "{description}, behind relays delaying {:?} each way",
            a.relay_delay
        )
    };
    let mut runs = Vec::new();
    for mode in [Mode::Naive, Mode::Default] {
        if !a.json {
            eprintln!(
                "{}: {} GET + {} POST over {} + {} keep-alive connections, pausing {:?}..{:?} between requests...",
                mode.label(),
                a.requests,
                a.requests,
                a.connections,
                a.connections,
                a.idle_gap.0,
                a.idle_gap.1
            );
        }
        // Fresh backends for each mode, so that their counters belong to one mode.
        let backends = start_backends(&a).await?;
        let mut relays = Vec::new();
        for addr in backends.addrs() {
            if !a.relay_delay.is_zero() {
                relays.push(
                    DelayRelay::start(addr, a.relay_delay)
                        .await
                        .context("starting the delay relay")?,
                );
            }
        }
        let servers = if relays.is_empty() {
            backends.addrs()
        } else {
            relays.iter().map(DelayRelay::addr).collect()
        };
        let run = run_mode(mode, &a, &backends, &servers).await;
        drop(relays);
        backends.stop().await;
        runs.push(run?);
    }
    let (naive, default) = (&runs[0], &runs[1]);
    let clean = default.get.client_visible_errors + default.post.client_visible_errors == 0;
    if a.json {
        let report = RaceReport {
            backends: description,
            requests_per_method: a.requests,
            naive,
            default,
            clean,
        };
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("backends: {description}");
        print!("{}", side_by_side(naive, default));
        let naive_errors = naive.get.client_visible_errors + naive.post.client_visible_errors;
        match (clean, naive_errors) {
            (true, 0) => println!("\nkaproxy DEFAULT: 0 client-visible errors; the NAIVE pool happened to show none either this time."),
            (true, n) => println!("\nkaproxy DEFAULT: 0 client-visible errors, where the NAIVE pool showed {n}."),
            (false, _) => println!("\nFAIL: kaproxy DEFAULT showed client-visible errors (see above)."),
        }
    }
    Ok(clean)
}

async fn start_backends(a: &RaceArgs) -> anyhow::Result<Backends> {
    if let Some(kind) = a.real {
        let mut servers = Vec::new();
        for _ in 0..a.backends {
            servers.push(
                RealBackend::start(kind, a.backend_keepalive)
                    .await
                    .with_context(|| format!("starting {}", kind.name()))?,
            );
        }
        return Ok(Backends::Real(servers));
    }
    if a.apache {
        let apache = Apache::start(
            ApacheOptions::new("apache")
                .keep_alive_timeout(a.backend_keepalive)
                .ports(a.backends)
                .threads_per_child(128),
        )
        .await
        .context("starting Apache")?;
        return Ok(Backends::Apache(Box::new(apache)));
    }
    let cfg = DemoBackendConfig {
        name: "race".to_string(),
        keepalive_timeout: a.backend_keepalive,
        stale_reuse: if a.close_idle {
            StaleReuse::CloseIdle
        } else {
            StaleReuse::DropRequest
        },
        ..DemoBackendConfig::default()
    };
    let backends = DemoBackend::start_many(a.backends, cfg)
        .await
        .context("starting the demo backends")?;
    Ok(Backends::Demo(backends))
}

fn race_config(mode: Mode, servers: &[SocketAddr]) -> anyhow::Result<Config> {
    let servers = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let toml = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\n\n\
         [upstreams.web]\nservers = [{servers}]\n{DEFAULT_MODE_TOML_POOL}\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"3s\"\n\n\
         [log]\naccess_log = false\n"
    );
    let mut config = Config::from_toml_str(&toml, Path::new("kaproxy-bench-race.toml"))
        .map_err(|e| anyhow!("race config rejected: {e}"))?;
    if mode == Mode::Naive {
        // The hidden test-only switches: what `kaproxy check` refuses in a file.
        for upstream in &mut config.upstreams {
            kaproxy_testkit::naive::make_naive(upstream, false);
        }
    }
    Ok(config)
}

/// One mode against `servers` (the backends, or the relays in front of them).
async fn run_mode(
    mode: Mode,
    a: &RaceArgs,
    backends: &Backends,
    servers: &[SocketAddr],
) -> anyhow::Result<ModeRun> {
    let config = race_config(mode, servers)?;
    let server = Server::start(config)
        .await
        .map_err(|e| anyhow!("starting kaproxy: {e}"))?;
    let addr = server
        .http_addr()
        .ok_or_else(|| anyhow!("kaproxy has no HTTP listener"))?;
    let post_path = if a.apache { "/echo" } else { "/" };
    let get_target = Target::parse(&format!("http://{addr}/"))?;
    let post_target = Target::parse(&format!("http://{addr}{post_path}"))?;
    let tls = TlsOptions::default();
    let connector = Arc::new(Connector::new(&get_target, HttpVersion::Http1, &tls, None).await?);
    let get = RequestTemplate::get(&get_target, HttpVersion::Http1);
    let post = RequestTemplate::new(
        &post_target,
        HttpVersion::Http1,
        Method::POST,
        &[(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/octet-stream"),
        )],
        Bytes::from(vec![b'p'; a.body_size]),
    )?;
    let plan = LoadPlan {
        connections: a.connections,
        streams: 1,
        duration: None,
        requests: Some(a.requests),
        rate: None,
        new_conn: false,
        idle_gap: Some(a.idle_gap),
        timeout: REQUEST_TIMEOUT,
        progress: false,
    };
    let (get, post) = tokio::join!(
        load::run(plan.clone(), connector.clone(), Arc::new(get)),
        load::run(plan, connector, Arc::new(post)),
    );
    tokio::time::sleep(SETTLE).await;
    let pool = pool_metrics(&server.metrics());
    let backend = backends.counters();
    server.shutdown().await;
    Ok(ModeRun {
        mode,
        get: get.stats.report(get.elapsed),
        post: post.stats.report(post.elapsed),
        pool,
        backend,
    })
}

fn pool_metrics(text: &str) -> PoolMetrics {
    let samples = parse_prometheus(text);
    let total = |name: &str| {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum::<f64>()
    };
    PoolMetrics {
        opened: total("kaproxy_upstream_connections_opened_total"),
        reused: total("kaproxy_upstream_connections_reused_total"),
        closed: sum_by(
            &samples,
            "kaproxy_upstream_connections_closed_total",
            "reason",
        ),
        retries: sum_by(&samples, "kaproxy_upstream_retries_total", "cause"),
        upstream_errors: sum_by(&samples, "kaproxy_upstream_errors_total", "kind"),
    }
}

/// One line of the Prometheus text format.
#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            None => (head.to_string(), Vec::new()),
            Some((name, rest)) => {
                let body = rest.trim_end_matches('}');
                let labels = body
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
                    .collect();
                (name.to_string(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn sum_by(samples: &[Sample], name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name) {
        if let Some((_, v)) = s.labels.iter().find(|(k, _)| k == label) {
            *out.entry(v.clone()).or_insert(0.0) += s.value;
        }
    }
    out
}

fn side_by_side(naive: &ModeRun, default: &ModeRun) -> String {
    let mut out = String::new();
    let row = |out: &mut String, label: &str, cells: [String; 4]| {
        let _ = writeln!(
            out,
            "{label:<44}{:>10}{:>10}   {:>10}{:>10}",
            cells[0], cells[1], cells[2], cells[3]
        );
    };
    let _ = writeln!(
        out,
        "\n{:<44}{:>20}   {:>20}",
        "client-visible",
        Mode::Naive.label(),
        Mode::Default.label()
    );
    row(
        &mut out,
        "",
        ["GET".into(), "POST".into(), "GET".into(), "POST".into()],
    );
    let reports = [&naive.get, &naive.post, &default.get, &default.post];
    let cells = |f: &dyn Fn(&Report) -> String| reports.map(f);
    row(&mut out, "requests", cells(&|r| r.requests.to_string()));
    row(&mut out, "2xx", cells(&|r| r.status.s2xx.to_string()));
    row(
        &mut out,
        "5xx (502/503/504)",
        cells(&|r| r.status.s5xx.to_string()),
    );
    row(
        &mut out,
        "reset by peer",
        cells(&|r| r.errors.reset_by_peer.to_string()),
    );
    row(
        &mut out,
        "closed before response",
        cells(&|r| r.errors.closed_before_response.to_string()),
    );
    row(
        &mut out,
        "timeout",
        cells(&|r| r.errors.timeout.to_string()),
    );
    row(
        &mut out,
        "connect refused",
        cells(&|r| r.errors.connect_refused.to_string()),
    );
    row(
        &mut out,
        "other errors",
        cells(&|r| r.errors.other.to_string()),
    );
    row(
        &mut out,
        "= client-visible errors",
        cells(&|r| r.client_visible_errors.to_string()),
    );
    row(
        &mut out,
        "latency p99 (ms)",
        cells(&|r| format!("{:.2}", r.latency_ms.p99)),
    );

    let pair = |out: &mut String, label: &str, a: f64, b: f64| {
        let _ = writeln!(out, "{label:<44}{a:>20}   {b:>20}");
    };
    let _ = writeln!(
        out,
        "\n{:<44}{:>20}   {:>20}",
        "kaproxy upstream pool",
        Mode::Naive.label(),
        Mode::Default.label()
    );
    pair(
        &mut out,
        "connections opened",
        naive.pool.opened,
        default.pool.opened,
    );
    pair(
        &mut out,
        "connections reused",
        naive.pool.reused,
        default.pool.reused,
    );
    let keys = |f: fn(&PoolMetrics) -> &BTreeMap<String, f64>| {
        let mut k: Vec<String> = f(&naive.pool)
            .keys()
            .chain(f(&default.pool).keys())
            .cloned()
            .collect();
        k.sort();
        k.dedup();
        k
    };
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    for reason in keys(|p| &p.closed) {
        pair(
            &mut out,
            &format!("closed, reason={reason}"),
            get(&naive.pool.closed, &reason),
            get(&default.pool.closed, &reason),
        );
    }
    for cause in keys(|p| &p.retries) {
        pair(
            &mut out,
            &format!("retries, cause={cause}"),
            get(&naive.pool.retries, &cause),
            get(&default.pool.retries, &cause),
        );
    }
    if naive.pool.retries.is_empty() && default.pool.retries.is_empty() {
        pair(&mut out, "retries", 0.0, 0.0);
    }
    for kind in keys(|p| &p.upstream_errors) {
        pair(
            &mut out,
            &format!("upstream errors, kind={kind}"),
            get(&naive.pool.upstream_errors, &kind),
            get(&default.pool.upstream_errors, &kind),
        );
    }
    if let (Some(n), Some(d)) = (&naive.backend, &default.backend) {
        let _ = writeln!(out, "\nbackends (built-in)");
        pair(
            &mut out,
            "requests dropped on stale conns",
            n.stale_drops as f64,
            d.stale_drops as f64,
        );
        pair(
            &mut out,
            "idle connections closed",
            n.idle_closes as f64,
            d.idle_closes as f64,
        );
        pair(
            &mut out,
            "connections accepted",
            n.connections_accepted as f64,
            d.connections_accepted as f64,
        );
    }
    for run in [naive, default] {
        for (method, r) in [("GET", &run.get), ("POST", &run.post)] {
            for m in &r.error_samples {
                let _ = writeln!(out, "  {} {method} e.g.: {m}", run.mode.label());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP x y\n# TYPE kaproxy_upstream_connections_closed counter\n\
            kaproxy_upstream_connections_closed_total{server=\"127.0.0.1:1\",reason=\"idle\"} 3\n\
            kaproxy_upstream_connections_closed_total{server=\"127.0.0.1:2\",reason=\"idle\"} 2\n\
            kaproxy_upstream_connections_closed_total{server=\"127.0.0.1:2\",reason=\"server_close\"} 1\n\
            kaproxy_upstream_connections_opened_total{server=\"127.0.0.1:2\"} 7\n\
            kaproxy_pool_idle_connections 4\n";
        let m = pool_metrics(text);
        assert_eq!(m.opened, 7.0);
        assert_eq!(m.closed.get("idle"), Some(&5.0));
        assert_eq!(m.closed.get("server_close"), Some(&1.0));
        let samples = parse_prometheus(text);
        assert_eq!(samples.len(), 5);
        assert_eq!(samples[4].name, "kaproxy_pool_idle_connections");
    }

    #[test]
    fn naive_mode_overrides_the_pool() {
        let servers = ["127.0.0.1:1".parse().unwrap()];
        let naive = race_config(Mode::Naive, &servers).unwrap();
        let pool = &naive.upstreams[0].pool;
        assert_eq!(
            pool.idle_timeout,
            kaproxy_testkit::naive::NAIVE_IDLE_TIMEOUT
        );
        assert!(!pool.learn_keep_alive);
        assert!(!naive.upstreams[0].retry.retry_idempotent);
        let default = race_config(Mode::Default, &servers).unwrap();
        assert!(default.upstreams[0].pool.learn_keep_alive);
        assert!(default.upstreams[0].retry.retry_idempotent);
    }
}
