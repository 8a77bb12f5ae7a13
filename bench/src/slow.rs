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

// ---- HTTP/1.1 over a bare socket ----

async fn connect(addr: SocketAddr, rcvbuf: Option<usize>) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(n) = rcvbuf {
        // Before connect, so that the window advertised in the SYN is small already.
        socket.set_recv_buffer_size(n as u32)?;
    }
    let stream = match timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A parsed response head.
struct Head {
    status: u16,
    content_length: Option<u64>,
    /// Body bytes read with the head.
    body_start: usize,
}

/// Parses a response head out of `buf` once it holds one.
fn parse_head(buf: &[u8]) -> Option<Result<Head, ()>> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let Some(status) = status else {
        return Some(Err(()));
    };
    let content_length = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    });
    Some(Ok(Head {
        status,
        content_length,
        body_start: end + 4,
    }))
}

fn is_reset(e: &std::io::Error) -> bool {
    !matches!(e.kind(), std::io::ErrorKind::UnexpectedEof)
}

/// Reads until a response head arrives (or the connection ends).
async fn read_head(r: &mut (impl AsyncReadExt + Unpin), buf: &mut Vec<u8>) -> Result<Head, End> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head) = parse_head(buf) {
            return head.map_err(|()| End::Reset);
        }
        if buf.len() > MAX_HEAD {
            return Err(End::Reset);
        }
        match r.read(&mut chunk).await {
            Ok(0) => return Err(End::Eof),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_reset(&e) => return Err(End::Reset),
            Err(_) => return Err(End::Eof),
        }
    }
}

/// One slow upload: the head and the burst, then a byte per interval, while the read side
/// watches for the proxy's answer or close.
async fn uploader(cfg: &SlowArgs, target: &Target, addr: SocketAddr, stats: &Attack) {
    let stream = match connect(addr, None).await {
        Ok(s) => s,
        Err(_) => {
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    stats.opened.fetch_add(1, Ordering::Relaxed);
    let (mut r, mut w) = stream.into_split();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        cfg.upload_path, target.authority, cfg.upload_length
    );
    let writer = async {
        w.write_all(head.as_bytes()).await?;
        let burst = vec![b'u'; cfg.upload_burst as usize];
        w.write_all(&burst).await?;
        stats.bytes.fetch_add(cfg.upload_burst, Ordering::Relaxed);
        let mut sent = cfg.upload_burst;
        while sent < cfg.upload_length {
            sleep(cfg.upload_interval).await;
            w.write_all(b"u").await?;
            sent += 1;
            stats.bytes.fetch_add(1, Ordering::Relaxed);
        }
        // Sent whole: now only the answer matters.
        std::future::pending::<()>().await;
        Ok::<(), std::io::Error>(())
    };
    let mut buf = Vec::new();
    let end = tokio::select! {
        head = read_head(&mut r, &mut buf) => match head {
            Ok(h) if (200..300).contains(&h.status) => End::Completed,
            Ok(h) => End::Answered(h.status),
            Err(end) => end,
        },
        Err(_) = writer => {
            // The proxy stopped reading and closed; it may have answered first.
            match timeout(Duration::from_secs(1), read_head(&mut r, &mut buf)).await {
                Ok(Ok(h)) => End::Answered(h.status),
                Ok(Err(end)) => end,
                Err(_) => End::Reset,
            }
        }
    };
    end.record(stats);
}

/// One slow download: `--read-bytes` per `--read-interval` through a small receive buffer.
async fn reader(cfg: &SlowArgs, target: &Target, addr: SocketAddr, stats: &Attack) {
    let mut stream = match connect(addr, Some(cfg.read_rcvbuf)).await {
        Ok(s) => s,
        Err(_) => {
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    stats.opened.fetch_add(1, Ordering::Relaxed);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        cfg.read_path, target.authority
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        End::Reset.record(stats);
        return;
    }
    let mut tick = tokio::time::interval(cfg.read_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf = vec![0u8; cfg.read_bytes.max(1)];
    let mut head_buf = Vec::new();
    let mut head: Option<Head> = None;
    let mut body = 0u64;
    // The proxy's side of this connection, as /proc/net/tcp lists it.
    let sides = stream
        .local_addr()
        .and_then(|l| Ok((l, stream.peer_addr()?)));
    let end = 'conn: loop {
        tick.tick().await;
        // A proxy that gives up on a slow reader closes its socket with megabytes still queued
        // for it on loopback: its FIN would reach the reader only after minutes of reading.
        if let Ok((local, peer)) = sides {
            if proxy_side_closed(local, peer) {
                break 'conn End::FinQueued;
            }
        }
        let mut budget = cfg.read_bytes.max(1);
        while budget > 0 {
            let n = match stream.read(&mut buf[..budget]).await {
                Ok(0) => break 'conn End::Eof,
                Ok(n) => n,
                Err(e) if is_reset(&e) => break 'conn End::Reset,
                Err(_) => break 'conn End::Eof,
            };
            budget -= n;
            match &head {
                Some(_) => body += n as u64,
                None => {
                    head_buf.extend_from_slice(&buf[..n]);
                    match parse_head(&head_buf) {
                        None if head_buf.len() > MAX_HEAD => break 'conn End::Reset,
                        None => {}
                        Some(Err(())) => break 'conn End::Reset,
                        Some(Ok(h)) if !(200..300).contains(&h.status) => {
                            break 'conn End::Answered(h.status)
                        }
                        Some(Ok(h)) => {
                            body = (head_buf.len() - h.body_start) as u64;
                            head = Some(h);
                        }
                    }
                }
            }
            stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(h) = &head {
                if h.content_length.is_some_and(|len| body >= len) {
                    break 'conn End::Completed;
                }
            }
        }
    };
    end.record(stats);
}

/// Whether the socket at `peer` connected to `local` (the proxy's end of one of our
/// connections) is past ESTABLISHED and has sent or queued its FIN, per /proc/net/tcp(6):
/// FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE or CLOSING. Absent or unreadable: false (a reset
/// shows on our socket anyway).
fn proxy_side_closed(local: SocketAddr, peer: SocketAddr) -> bool {
    let file = match peer {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    let Ok(table) = std::fs::read_to_string(file) else {
        return false;
    };
    let (want_local, want_remote) = (proc_net_addr(peer), proc_net_addr(local));
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace().skip(1);
        let (Some(l), Some(r), Some(state)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        l == want_local && r == want_remote && matches!(state, "04" | "05" | "06" | "07" | "0B")
    })
}

/// An address as /proc/net/tcp(6) writes it: the address words in host byte order, in hex,
/// a colon, the port in hex.
fn proc_net_addr(addr: SocketAddr) -> String {
    let ip = match addr {
        SocketAddr::V4(a) => format!("{:08X}", u32::from_ne_bytes(a.ip().octets())),
        SocketAddr::V6(a) => a
            .ip()
            .octets()
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect(),
    };
    format!("{ip}:{:04X}", addr.port())
}

/// Outcome of one legitimate GET.
#[derive(Debug, Clone, Copy)]
enum LegitOutcome {
    Status(u16, Duration),
    Error,
    Unanswered,
}

async fn legit_get(cfg: &SlowArgs, target: &Target, addr: SocketAddr) -> LegitOutcome {
    let started = Instant::now();
    let exchange = async {
        let mut s = connect(addr, None).await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            cfg.legit_path, target.authority
        );
        s.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        let head = read_head(&mut s, &mut buf)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        let mut body = (buf.len() - head.body_start) as u64;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if head.content_length.is_some_and(|len| body >= len) {
                break;
            }
            match s.read(&mut chunk).await? {
                0 if head.content_length.is_none() => break,
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => body += n as u64,
            }
        }
        Ok::<u16, std::io::Error>(head.status)
    };
    match timeout(cfg.legit_timeout, exchange).await {
        Ok(Ok(status)) => LegitOutcome::Status(status, started.elapsed()),
        Ok(Err(_)) => LegitOutcome::Error,
        Err(_) => LegitOutcome::Unanswered,
    }
}

fn legit_report(a: &SlowArgs, results: &[(u64, LegitOutcome)]) -> LegitReport {
    let mut r = LegitReport {
        sent: results.len() as u64,
        within_deadline: 0,
        deadline_ms: a.deadline.as_millis() as u64,
        late: 0,
        non_2xx: BTreeMap::new(),
        errors: 0,
        unanswered: 0,
        timeout_ms: a.legit_timeout.as_millis() as u64,
        max_latency_ms: None,
        median_latency_ms: None,
        timeline: String::new(),
    };
    let mut latencies = Vec::new();
    for (_, outcome) in results {
        let c = match *outcome {
            LegitOutcome::Status(status, latency) => {
                latencies.push(latency.as_secs_f64() * 1e3);
                if !(200..300).contains(&status) {
                    *r.non_2xx.entry(status.to_string()).or_default() += 1;
                    'x'
                } else if latency <= a.deadline {
                    r.within_deadline += 1;
                    '.'
                } else {
                    r.late += 1;
                    'L'
                }
            }
            LegitOutcome::Error => {
                r.errors += 1;
                'x'
            }
            LegitOutcome::Unanswered => {
                r.unanswered += 1;
                'T'
            }
        };
        r.timeline.push(c);
    }
    latencies.sort_by(f64::total_cmp);
    r.max_latency_ms = latencies.last().copied();
    r.median_latency_ms = latencies.get(latencies.len() / 2).copied();
    r
}

// ---- HTTP/2 stalled streams ----

/// A request body that yields `first` at once, then (optionally) one byte per `trickle`, and
/// otherwise never ends: the stream stays open, its announced length never reached.
struct StallBody {
    first: Option<Bytes>,
    trickle: Option<tokio::time::Interval>,
    /// Bytes left before the announced length.
    left: u64,
    announced: u64,
    stats: Arc<H2Attack>,
}

impl Body for StallBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(first) = self.first.take() {
            let n = first.len() as u64;
            self.left -= n;
            self.stats.streams.bytes.fetch_add(n, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if self.left > 1 {
            if let Some(tick) = self.trickle.as_mut() {
                if tick.poll_tick(cx).is_ready() {
                    self.left -= 1;
                    self.stats.streams.bytes.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"s")))));
                }
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.announced)
    }
}

/// One HTTP/2 connection with `--h2-streams` stalled streams, each opened again when it is
/// answered or reset; returns when the connection ends.
async fn h2_connection(
    cfg: &Arc<SlowArgs>,
    target: &Target,
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    stats: &Arc<H2Attack>,
) {
    let handshake = async {
        let tcp = connect(addr, None).await?;
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())?;
        let stream = tls.connect(name, tcp).await?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err::<_, crate::conn::BoxError>("the server did not negotiate h2".into());
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake::<_, StallBody>(TokioIo::new(stream))
            .await?;
        Ok((sender, conn))
    };
    let (sender, conn) = match timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok(pair)) => pair,
        _ => {
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    stats.connections_opened.fetch_add(1, Ordering::Relaxed);
    let mut streams = JoinSet::new();
    for _ in 0..cfg.h2_streams {
        let (mut sender, cfg, stats, uri) =
            (sender.clone(), cfg.clone(), stats.clone(), target.url());
        streams.spawn(async move {
            loop {
                if sender.ready().await.is_err() {
                    return;
                }
                let body = StallBody {
                    first: Some(Bytes::from(vec![b's'; cfg.h2_bytes as usize])),
                    trickle: (!cfg.h2_trickle.is_zero()).then(|| {
                        let mut t = tokio::time::interval_at(
                            Instant::now() + cfg.h2_trickle,
                            cfg.h2_trickle,
                        );
                        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        t
                    }),
                    left: cfg.h2_content_length,
                    announced: cfg.h2_content_length,
                    stats: stats.clone(),
                };
                let request = Request::builder()
                    .method(Method::POST)
                    .uri(&uri)
                    .header(http::header::CONTENT_LENGTH, cfg.h2_content_length)
                    .header(http::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body)
                    .expect("a valid request");
                stats.streams.opened.fetch_add(1, Ordering::Relaxed);
                match sender.send_request(request).await {
                    Ok(response) => stats.streams.answered(response.status().as_u16()),
                    Err(e) => {
                        let closed = sender.is_closed();
                        if e.is_canceled() || closed {
                            // The connection went away under the stream.
                            stats.streams.eof.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.streams.reset.fetch_add(1, Ordering::Relaxed);
                        }
                        if closed {
                            return;
                        }
                    }
                }
                sleep(cfg.reconnect_delay).await;
            }
        });
    }
    let _ = conn.await;
    stats.connections_closed.fetch_add(1, Ordering::Relaxed);
    streams.abort_all();
    while streams.join_next().await.is_some() {}
}

// ---- RSS from /proc ----

#[derive(Default)]
struct RssState {
    before: u64,
    peak: u64,
    peak_procs: usize,
    samples: u64,
}

impl RssState {
    fn observe(&mut self, (kib, procs): (u64, usize)) {
        self.samples += 1;
        if kib >= self.peak {
            self.peak = kib;
            self.peak_procs = procs;
        }
    }
}

/// VmRSS (KiB) of these processes and their descendants, summed, and how many processes.
fn rss_kib(pids: &[u32]) -> (u64, usize) {
    let mut seen = std::collections::BTreeSet::new();
    let mut todo: Vec<u32> = pids.to_vec();
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    let mut total = 0;
    let mut procs = 0;
    for pid in seen {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if let Some(kib) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            total += kib;
            procs += 1;
        }
    }
    (total, procs)
}

// ---- /metrics ----

async fn fetch_metrics(url: &str, prefixes: &[String]) -> anyhow::Result<Vec<String>> {
    let target = Target::parse(url)?;
    if target.tls {
        bail!("--metrics must be http://");
    }
    let addr = loopback_addr(&target).await?;
    let fetch = async {
        let mut s = connect(addr, None).await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            target.path_and_query, target.authority
        );
        s.write_all(request.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = timeout(METRICS_TIMEOUT, fetch)
        .await
        .context("the metrics page did not come in time")?
        .context("fetching the metrics page")?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{}", head.lines().next().unwrap_or(""));
    }
    Ok(body
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p.as_str())))
        .map(str::to_string)
        .collect())
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
