//! `kaproxy-bench slow`: slow clients against a proxy in front of a backend with few workers
//! (Apache prefork), and whether a legitimate client still gets answers (issue 16).
//!
//! For a bounded time it runs, all opened at once at the start (or spread over `--ramp`):
//!
//! - `--uploaders N` slow uploaders: `POST` with `Content-Length: 4 MiB`, 256 KiB at once,
//!   then 1 byte every 3 s: inside every timeout, never finished;
//! - `--readers M` slow readers: `GET` of a large file with `SO_RCVBUF 4096` set before
//!   connect, reading 4 KiB a second;
//! - `--h2-conns C --h2-streams S`: HTTP/2 connections over TLS (ALPN h2, certificate not
//!   verified), each with S `POST` streams that announce `--h2-content-length` bytes, send
//!   `--h2-bytes` and then stall;
//! - one legitimate client: a `GET` every 0.5 s, each on a fresh connection (so that no client
//!   keep-alive state helps or hurts it), open loop (a slow answer does not delay the next
//!   request), counted as answered within the 1 s deadline or not, and waited for up to
//!   `--legit-timeout` to measure its latency.
//!
//! Every attacker connection the proxy ends (a response, a FIN, a reset) is counted and opened
//! again after `--reconnect-delay`; an HTTP/2 stream that is answered or reset is opened again
//! on its connection. Optionally it samples the RSS of the proxy's processes (`--rss-pid`,
//! children included) every 0.5 s and fetches a Prometheus `/metrics` page at the end.
//! Loopback targets only; every loop is bounded by the duration.

mod h1;
mod h2;
mod observe;

use h1::*;
use h2::*;
use observe::*;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http::{Method, Request};
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant, MissedTickBehavior};

use crate::args;
use crate::conn::{client_tls_config, HttpVersion, Target, TlsOptions};

/// Connect (and, for HTTP/2, TLS and the h2 handshake) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A response head larger than this is not HTTP we expect.
const MAX_HEAD: usize = 64 * 1024;
/// After the duration, the metrics page must come within this.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);
/// The metric families kept from `--metrics` by default.
const DEFAULT_METRIC_PREFIXES: &str =
    "kaproxy_body_,kaproxy_upstream_connections_,kaproxy_pool_idle_connections";

#[derive(Args, Debug, Clone)]
pub struct SlowArgs {
    /// The proxy's plain HTTP listener, e.g. http://127.0.0.1:8080 (a path is ignored: see
    /// --upload-path, --read-path, --legit-path). Loopback only.
    url: String,
    /// How long the legitimate client sends (the attackers run until its last answer).
    #[arg(short = 'd', long, default_value = "40s", value_parser = args::parse_duration)]
    duration: Duration,
    /// Open the attackers evenly over this long (0s: all at once at the start).
    #[arg(long, default_value = "0s", value_parser = args::parse_duration)]
    ramp: Duration,
    /// Wait this long after a proxy ended an attacker connection before opening it again.
    #[arg(long, default_value = "100ms", value_parser = args::parse_duration)]
    reconnect_delay: Duration,

    /// Slow uploaders.
    #[arg(long, default_value_t = 12)]
    uploaders: usize,
    #[arg(long, default_value = "/upload.bin")]
    upload_path: String,
    /// The Content-Length the uploaders announce.
    #[arg(long, default_value_t = 4 << 20)]
    upload_length: u64,
    /// Body bytes sent at once after the head.
    #[arg(long, default_value_t = 256 << 10)]
    upload_burst: u64,
    /// Then one byte every this long.
    #[arg(long, default_value = "3s", value_parser = args::parse_duration)]
    upload_interval: Duration,

    /// Slow readers.
    #[arg(long, default_value_t = 12)]
    readers: usize,
    #[arg(long, default_value = "/big.bin")]
    read_path: String,
    /// SO_RCVBUF of a reader's socket, set before connect (the kernel doubles it).
    #[arg(long, default_value_t = 4096)]
    read_rcvbuf: usize,
    /// Bytes a reader reads per --read-interval.
    #[arg(long, default_value_t = 4096)]
    read_bytes: usize,
    #[arg(long, default_value = "1s", value_parser = args::parse_duration)]
    read_interval: Duration,

    /// HTTP/2 connections with stalled streams (over TLS, ALPN h2; needs --h2-url).
    #[arg(long, default_value_t = 0)]
    h2_conns: usize,
    /// Streams per HTTP/2 connection (the server's SETTINGS_MAX_CONCURRENT_STREAMS may hold
    /// some back).
    #[arg(long, default_value_t = 200)]
    h2_streams: usize,
    /// Body bytes each stream sends before it stalls.
    #[arg(long, default_value_t = 60_000)]
    h2_bytes: u64,
    /// The content-length each stream announces.
    #[arg(long, default_value_t = 4 << 20)]
    h2_content_length: u64,
    /// After the first bytes, one byte per stream every this long (0s: a full stall).
    #[arg(long, default_value = "0s", value_parser = args::parse_duration)]
    h2_trickle: Duration,
    /// The proxy's TLS listener and the path the streams POST to, e.g.
    /// https://127.0.0.1:8443/upload.bin (certificate not verified).
    #[arg(long)]
    h2_url: Option<String>,

    /// What the legitimate client GETs.
    #[arg(long, default_value = "/")]
    legit_path: String,
    /// One legitimate GET every this long (open loop, a fresh connection each).
    #[arg(long, default_value = "500ms", value_parser = args::parse_duration)]
    legit_interval: Duration,
    /// A legitimate GET counts as answered when its whole 2xx response came within this.
    #[arg(long, default_value = "1s", value_parser = args::parse_duration)]
    deadline: Duration,
    /// How long a legitimate GET is waited for, to measure how late it is.
    #[arg(long, default_value = "5s", value_parser = args::parse_duration)]
    legit_timeout: Duration,

    /// Sample VmRSS of this process and its descendants (repeatable; summed).
    #[arg(long = "rss-pid")]
    rss_pids: Vec<u32>,
    #[arg(long, default_value = "500ms", value_parser = args::parse_duration)]
    rss_interval: Duration,
    /// Fetch this Prometheus page (http://127.0.0.1:PORT/metrics) at the end, before the
    /// attackers are stopped, and keep the lines of --metric-prefixes.
    #[arg(long)]
    metrics: Option<String>,
    /// Comma-separated metric name prefixes kept from --metrics.
    #[arg(long, default_value = DEFAULT_METRIC_PREFIXES)]
    metric_prefixes: String,

    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

// ---- counters shared by the tasks ----

#[derive(Default)]
struct Attack {
    opened: AtomicU64,
    connect_errors: AtomicU64,
    /// The proxy answered (status -> count).
    answered: Mutex<BTreeMap<u16, u64>>,
    /// The proxy closed (FIN) without an answer.
    eof: AtomicU64,
    /// Reset, broken pipe, or another I/O error from the proxy's side.
    reset: AtomicU64,
    /// Readers: the proxy's side of the connection was closed (seen in /proc/net/tcp) while
    /// its FIN still sat behind bytes the kernel had buffered for the reader.
    fin_queued: AtomicU64,
    /// Finished as a normal client would (a whole upload, a whole download).
    completed: AtomicU64,
    /// Body bytes written (uploaders, h2) or read (readers).
    bytes: AtomicU64,
}

impl Attack {
    fn answered(&self, status: u16) {
        *self.answered.lock().unwrap().entry(status).or_default() += 1;
    }

    fn summary(&self, slots: usize) -> AttackReport {
        let answered = self.answered.lock().unwrap().clone();
        let answered_total: u64 = answered.values().sum();
        let eof = self.eof.load(Ordering::Relaxed);
        let reset = self.reset.load(Ordering::Relaxed);
        let fin_queued = self.fin_queued.load(Ordering::Relaxed);
        AttackReport {
            slots,
            opened: self.opened.load(Ordering::Relaxed),
            connect_errors: self.connect_errors.load(Ordering::Relaxed),
            closed_by_proxy: answered_total + eof + reset + fin_queued,
            answered: answered
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            eof,
            reset,
            fin_queued,
            completed: self.completed.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct H2Attack {
    streams: Attack,
    connections_opened: AtomicU64,
    connections_closed: AtomicU64,
    connect_errors: AtomicU64,
}

/// How an attacker connection ended.
enum End {
    Answered(u16),
    Eof,
    Reset,
    /// The proxy closed its side; the reader has not read up to the FIN yet.
    FinQueued,
    Completed,
}

impl End {
    fn record(self, a: &Attack) {
        match self {
            End::Answered(s) => a.answered(s),
            End::Eof => {
                a.eof.fetch_add(1, Ordering::Relaxed);
            }
            End::Reset => {
                a.reset.fetch_add(1, Ordering::Relaxed);
            }
            End::FinQueued => {
                a.fin_queued.fetch_add(1, Ordering::Relaxed);
            }
            End::Completed => {
                a.completed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// ---- the report ----

#[derive(Debug, Serialize)]
pub struct SlowReport {
    pub target: String,
    pub duration_s: f64,
    pub ramp_s: f64,
    pub legit: LegitReport,
    pub uploaders: AttackReport,
    pub readers: AttackReport,
    pub h2: Option<H2Report>,
    pub rss: Option<RssReport>,
    pub metrics: Option<Vec<String>>,
    pub metrics_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AttackReport {
    pub slots: usize,
    pub opened: u64,
    pub connect_errors: u64,
    /// answered + eof + reset + fin_queued.
    pub closed_by_proxy: u64,
    pub answered: BTreeMap<String, u64>,
    pub eof: u64,
    pub reset: u64,
    /// Readers: closed by the proxy (its socket past ESTABLISHED in /proc/net/tcp) while the
    /// FIN still waited behind buffered bytes; the reader gives up on it there and then.
    pub fin_queued: u64,
    pub completed: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct H2Report {
    pub connections: usize,
    pub streams_per_connection: usize,
    pub connections_opened: u64,
    pub connections_closed_by_proxy: u64,
    pub connect_errors: u64,
    /// Streams: opened = requests handed to the HTTP/2 connection; bytes = body bytes handed
    /// to it.
    pub streams: AttackReport,
}

#[derive(Debug, Serialize)]
pub struct LegitReport {
    pub sent: u64,
    pub within_deadline: u64,
    pub deadline_ms: u64,
    /// 2xx, but after the deadline.
    pub late: u64,
    /// Answered with a status other than 2xx.
    pub non_2xx: BTreeMap<String, u64>,
    /// Connection errors (refused, reset, closed before a whole response).
    pub errors: u64,
    /// No whole response within --legit-timeout.
    pub unanswered: u64,
    pub timeout_ms: u64,
    /// The slowest whole response (any status), ms.
    pub max_latency_ms: Option<f64>,
    pub median_latency_ms: Option<f64>,
    /// One character per GET in send order: `.` within the deadline, `L` late, `x` not 2xx
    /// or an error, `T` unanswered.
    pub timeline: String,
}

#[derive(Debug, Serialize)]
pub struct RssReport {
    pub pids: Vec<u32>,
    /// Processes summed at the peak (the given ones and their descendants).
    pub processes_at_peak: usize,
    pub before_kib: u64,
    pub peak_kib: u64,
    pub end_kib: u64,
    pub samples: u64,
}

// ---- entry point ----

pub async fn run(a: SlowArgs) -> anyhow::Result<()> {
    let target = Target::parse(&a.url)?;
    if target.tls {
        bail!("the slow HTTP/1.1 clients speak plain HTTP: give the proxy's http:// listener (HTTP/2 goes to --h2-url)");
    }
    let addr = loopback_addr(&target).await?;
    let h2 = match (&a.h2_url, a.h2_conns) {
        (_, 0) => None,
        (None, _) => bail!("--h2-conns needs --h2-url https://127.0.0.1:PORT/PATH"),
        (Some(url), _) => {
            let t = Target::parse(url)?;
            if !t.tls {
                bail!("--h2-url must be https:// (HTTP/2 over TLS with ALPN h2)");
            }
            let addr = loopback_addr(&t).await?;
            Some((t, addr))
        }
    };
    if a.legit_interval.is_zero() || a.read_interval.is_zero() || a.upload_interval.is_zero() {
        bail!("intervals must be above zero");
    }
    if a.upload_burst > a.upload_length || a.h2_bytes > a.h2_content_length {
        bail!("the bytes sent at once cannot exceed the announced length");
    }
    if !a.json {
        println!("{}", describe(&a, &target));
    }
    let metric_prefixes: Vec<String> = a
        .metric_prefixes
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();

    let rss = Arc::new(Mutex::new(RssState::default()));
    let mut background = JoinSet::new();
    if !a.rss_pids.is_empty() {
        let first = rss_kib(&a.rss_pids);
        {
            let mut r = rss.lock().unwrap();
            r.before = first.0;
            r.observe(first);
        }
        let (pids, rss, every) = (a.rss_pids.clone(), rss.clone(), a.rss_interval);
        background.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let sample = rss_kib(&pids);
                rss.lock().unwrap().observe(sample);
            }
        });
    }

    let start = Instant::now();
    let attackers = a.uploaders + a.readers + a.h2_conns;
    let offset = |i: usize| {
        if attackers <= 1 || a.ramp.is_zero() {
            Duration::ZERO
        } else {
            a.ramp.mul_f64(i as f64 / attackers as f64)
        }
    };
    let uploads = Arc::new(Attack::default());
    let reads = Arc::new(Attack::default());
    let h2_stats = Arc::new(H2Attack::default());
    let cfg = Arc::new(a.clone());
    let mut i = 0;
    for _ in 0..a.uploaders {
        let (cfg, stats, target) = (cfg.clone(), uploads.clone(), target.clone());
        let at = start + offset(i);
        background.spawn(async move {
            sleep_until(at).await;
            loop {
                uploader(&cfg, &target, addr, &stats).await;
                sleep(cfg.reconnect_delay).await;
            }
        });
        i += 1;
    }
    for _ in 0..a.readers {
        let (cfg, stats, target) = (cfg.clone(), reads.clone(), target.clone());
        let at = start + offset(i);
        background.spawn(async move {
            sleep_until(at).await;
            loop {
                reader(&cfg, &target, addr, &stats).await;
                sleep(cfg.reconnect_delay).await;
            }
        });
        i += 1;
    }
    if let Some((t, h2_addr)) = &h2 {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls_config(
            HttpVersion::Http2,
            &TlsOptions {
                insecure: true,
                cacert: None,
                no_resume: false,
            },
        )?));
        for _ in 0..a.h2_conns {
            let (cfg, stats, t, tls, h2_addr) = (
                cfg.clone(),
                h2_stats.clone(),
                t.clone(),
                tls.clone(),
                *h2_addr,
            );
            let at = start + offset(i);
            background.spawn(async move {
                sleep_until(at).await;
                loop {
                    h2_connection(&cfg, &t, h2_addr, &tls, &stats).await;
                    sleep(cfg.reconnect_delay).await;
                }
            });
            i += 1;
        }
    }

    // The legitimate client: open loop, one GET per tick, the first one tick after the start.
    let mut legit = JoinSet::new();
    let sends = (a.duration.as_secs_f64() / a.legit_interval.as_secs_f64()).floor() as u64;
    for k in 1..=sends {
        let at = start + a.legit_interval.mul_f64(k as f64);
        sleep_until(at).await;
        let (cfg, target) = (cfg.clone(), target.clone());
        legit.spawn(async move { (k, legit_get(&cfg, &target, addr).await) });
    }
    let mut results = Vec::new();
    while let Some(r) = legit.join_next().await {
        results.push(r.context("a legitimate GET panicked")?);
    }
    results.sort_by_key(|(k, _)| *k);

    // The end: metrics and a last RSS sample while the attackers still run.
    let (metrics, metrics_error) = match &a.metrics {
        None => (None, None),
        Some(url) => match fetch_metrics(url, &metric_prefixes).await {
            Ok(lines) => (Some(lines), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
    };
    let rss_report = if a.rss_pids.is_empty() {
        None
    } else {
        let sample = rss_kib(&a.rss_pids);
        let mut r = rss.lock().unwrap();
        r.observe(sample);
        Some(RssReport {
            pids: a.rss_pids.clone(),
            processes_at_peak: r.peak_procs,
            before_kib: r.before,
            peak_kib: r.peak,
            end_kib: sample.0,
            samples: r.samples,
        })
    };
    let elapsed = start.elapsed();
    background.abort_all();
    while background.join_next().await.is_some() {}

    let report = SlowReport {
        target: target.url(),
        duration_s: elapsed.as_secs_f64(),
        ramp_s: a.ramp.as_secs_f64(),
        legit: legit_report(&a, &results),
        uploaders: uploads.summary(a.uploaders),
        readers: reads.summary(a.readers),
        h2: h2.as_ref().map(|_| H2Report {
            connections: a.h2_conns,
            streams_per_connection: a.h2_streams,
            connections_opened: h2_stats.connections_opened.load(Ordering::Relaxed),
            connections_closed_by_proxy: h2_stats.connections_closed.load(Ordering::Relaxed),
            connect_errors: h2_stats.connect_errors.load(Ordering::Relaxed),
            streams: h2_stats.streams.summary(a.h2_conns * a.h2_streams),
        }),
        rss: rss_report,
        metrics,
        metrics_error,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

async fn loopback_addr(target: &Target) -> anyhow::Result<SocketAddr> {
    let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("resolving {}", target.host))?
        .next()
        .with_context(|| format!("{} resolves to nothing", target.host))?;
    if !addr.ip().is_loopback() {
        bail!("{addr}: slow clients are sent to loopback addresses only");
    }
    Ok(addr)
}

fn describe(a: &SlowArgs, target: &Target) -> String {
    let mut s = format!(
        "slow clients against {}://{} for {:?}, attackers opened {}:",
        if target.tls { "https" } else { "http" },
        target.authority,
        a.duration,
        if a.ramp.is_zero() {
            "all at once".to_string()
        } else {
            format!("over {:?}", a.ramp)
        }
    );
    if a.uploaders > 0 {
        let _ = write!(
            s,
            "\n  {} uploaders: POST {} Content-Length {}, {} bytes at once, then 1 byte every {:?}",
            a.uploaders, a.upload_path, a.upload_length, a.upload_burst, a.upload_interval
        );
    }
    if a.readers > 0 {
        let _ = write!(
            s,
            "\n  {} readers: GET {}, SO_RCVBUF {} before connect, {} bytes every {:?}",
            a.readers, a.read_path, a.read_rcvbuf, a.read_bytes, a.read_interval
        );
    }
    if a.h2_conns > 0 {
        let _ = write!(
            s,
            "\n  {} HTTP/2 connections to {} x {} POST streams: content-length {}, {} bytes, then {}",
            a.h2_conns,
            a.h2_url.as_deref().unwrap_or("?"),
            a.h2_streams,
            a.h2_content_length,
            a.h2_bytes,
            if a.h2_trickle.is_zero() {
                "stalled".to_string()
            } else {
                format!("1 byte every {:?}", a.h2_trickle)
            }
        );
    }
    let _ = write!(
        s,
        "\n  legitimate: GET {} every {:?}, a fresh connection each, deadline {:?} (waited for up to {:?})",
        a.legit_path, a.legit_interval, a.deadline, a.legit_timeout
    );
    s
}

// ---- text report ----

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn answered_text(a: &BTreeMap<String, u64>) -> String {
    if a.is_empty() {
        return "-".to_string();
    }
    a.iter()
        .map(|(s, n)| format!("{s}x{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl SlowReport {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let l = &self.legit;
        let _ = writeln!(
            s,
            "\nlegitimate GETs answered within {} ms: {} of {} (late {}, not 2xx {}, errors {}, unanswered after {} ms {}); max latency {}, median {}",
            l.deadline_ms,
            l.within_deadline,
            l.sent,
            l.late,
            l.non_2xx.values().sum::<u64>(),
            l.errors,
            l.timeout_ms,
            l.unanswered,
            l.max_latency_ms.map_or("-".to_string(), |m| format!("{m:.1} ms")),
            l.median_latency_ms.map_or("-".to_string(), |m| format!("{m:.1} ms")),
        );
        let _ = writeln!(
            s,
            "  timeline (. in time, L late, x error, T unanswered): {}",
            l.timeline
        );
        let _ = writeln!(
            s,
            "\n{:<12} {:>6} {:>7} {:>9} {:>8} {:>6} {:>6} {:>10} {:>9} {:>12}  answered",
            "attackers",
            "slots",
            "opened",
            "conn err",
            "closed",
            "eof",
            "reset",
            "fin queued",
            "completed",
            "bytes"
        );
        let mut row = |name: &str, a: &AttackReport| {
            let _ = writeln!(
                s,
                "{:<12} {:>6} {:>7} {:>9} {:>8} {:>6} {:>6} {:>10} {:>9} {:>12}  {}",
                name,
                a.slots,
                a.opened,
                a.connect_errors,
                a.closed_by_proxy,
                a.eof,
                a.reset,
                a.fin_queued,
                a.completed,
                a.bytes,
                answered_text(&a.answered)
            );
        };
        row("uploaders", &self.uploaders);
        row("readers", &self.readers);
        if let Some(h2) = &self.h2 {
            row("h2 streams", &h2.streams);
            let _ = writeln!(
                s,
                "h2 connections: {} x {} streams; opened {}, closed by the proxy {}, connect errors {}",
                h2.connections,
                h2.streams_per_connection,
                h2.connections_opened,
                h2.connections_closed_by_proxy,
                h2.connect_errors
            );
        }
        if let Some(r) = &self.rss {
            let _ = writeln!(
                s,
                "\nRSS of pid {:?} and descendants ({} processes at the peak, {} samples): before {:.1} MiB, peak {:.1} MiB (+{:.1}), at the end {:.1} MiB",
                r.pids,
                r.processes_at_peak,
                r.samples,
                mib(r.before_kib),
                mib(r.peak_kib),
                mib(r.peak_kib.saturating_sub(r.before_kib)),
                mib(r.end_kib)
            );
        }
        if let Some(m) = &self.metrics {
            let _ = writeln!(s, "\nmetrics at the end ({} lines):", m.len());
            for line in m {
                let _ = writeln!(s, "  {line}");
            }
        }
        if let Some(e) = &self.metrics_error {
            let _ = writeln!(s, "\nmetrics: {e}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = parse_head(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 12\r\n\r\nxy")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.status, h.content_length, h.body_start),
            (408, Some(12), 52)
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n").is_none());
        assert!(parse_head(b"garbage\r\n\r\n").unwrap().is_err());
    }

    #[tokio::test]
    async fn a_closed_peer_is_seen_in_proc_net_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (local, peer) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        assert!(!proxy_side_closed(local, peer));
        drop(server);
        assert!(proxy_side_closed(local, peer));
        assert_eq!(
            proc_net_addr("127.0.0.1:80".parse().unwrap()),
            format!("{:08X}:0050", u32::from_ne_bytes([127, 0, 0, 1]))
        );
    }

    #[test]
    fn rss_of_this_process() {
        let (kib, procs) = rss_kib(&[std::process::id()]);
        assert!(kib > 0);
        assert!(procs >= 1);
    }
}
