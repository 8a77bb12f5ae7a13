//! Owns the active probes of `[upstreams.NAME.health]` that mark a backend down and up; the
//! state they write (and the passive verdict beside it) is [`BackendHealth`], in
//! [`crate::upstream::backend`].
//!
//! Passive checks are always on: the proxy reports each connect/response outcome through
//! [`BackendHealth::record_success`] and [`BackendHealth::record_failure`], and balancers ask
//! [`BackendHealth::is_up`]. That side does no I/O and takes no lock: the state is a few
//! atomics, so every request may touch it.
//!
//! Active checks are optional: [`spawn_active_checks`] starts one task per backend that sends
//! `GET {path}` on a fresh connection every `interval`; after `fall` failed probes in a row it
//! marks the server down with [`BackendHealth::set_active_up`], after `rise` good ones up
//! again. The tasks belong to an [`ActiveChecks`], which stops them when dropped, so that a
//! reload replaces one generation of probes with the next.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::config::HealthConfig;
use crate::upstream::backend::Backend;
#[cfg(doc)]
use crate::upstream::backend::BackendHealth;

/// The first probes of an upstream's backends are spread over a tenth of `interval`, and never
/// over more than this: a 5 s interval and 100 backends put them 5 ms apart, and even the last
/// one learns its server's state within half a second of a start or reload.
const MAX_FIRST_PROBE_SPREAD: Duration = Duration::from_millis(500);

/// How much of a probe's response body is read (and thrown away) so that the connection ends
/// with the server's FIN rather than our RST; a larger body is cut short, the status decides.
const MAX_PROBE_BODY: usize = 64 * 1024;

/// `User-Agent` of the probes, so that backends can tell them from traffic in their logs.
const PROBE_USER_AGENT: &str = "kaproxy-health";

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("connect failed: {0}")]
    Connect(crate::error::RequestError),
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The probe tasks of one upstream. Dropping it aborts them (a reload drops the old
/// generation's checks); the health they wrote stays as it was.
#[derive(Debug)]
pub struct ActiveChecks {
    upstream: String,
    tasks: Vec<JoinHandle<()>>,
}

impl ActiveChecks {
    pub fn upstream(&self) -> &str {
        &self.upstream
    }
}

impl Drop for ActiveChecks {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts active checks for the backends of `upstream`, each with the gauge
/// `kaproxy_server_up{upstream,server}` of that server. Must run inside a tokio runtime.
///
/// One task per backend: every `cfg.interval`, a fresh TCP connection and
/// `GET {cfg.path} HTTP/1.1` with `Host: <addr>`, `Connection: close` and
/// `User-Agent: kaproxy-health`, connect and exchange bounded together by `cfg.timeout`. A 2xx
/// or 3xx answer is a success; any other status, a timeout or a connect/HTTP error a failure.
/// `cfg.fall` failures in a row mark the server down, `cfg.rise` successes in a row up again;
/// each change is logged. After every probe the gauge gets [`BackendHealth::is_up`], the
/// combined verdict, so that it also catches up with passive cool-downs that ended.
///
/// A server starts in the active state its [`BackendHealth`] holds (up for a new one), so
/// traffic flows before the first probe completes. The first probes run right away, spread
/// deterministically over a tenth of the interval (at most 500 ms) so that a hundred backends
/// are not probed in the same millisecond.
///
/// A `path` that is not a valid request target disables the checks of this upstream (logged as
/// an error): probing it would mark every server down.
pub fn spawn_active_checks(
    upstream: &str,
    targets: Vec<Arc<Backend>>,
    cfg: &HealthConfig,
) -> ActiveChecks {
    let mut checks = ActiveChecks {
        upstream: upstream.to_string(),
        tasks: Vec::with_capacity(targets.len()),
    };
    let path = match cfg.path.parse::<Uri>() {
        Ok(path) if path.scheme().is_none() && path.path().starts_with('/') => path,
        _ => {
            error!(upstream, path = %cfg.path, "active health: invalid probe path; checks disabled");
            return checks;
        }
    };
    let upstream: Arc<str> = Arc::from(upstream);
    let count = targets.len();
    for (index, backend) in targets.into_iter().enumerate() {
        let probe = Probe {
            upstream: upstream.clone(),
            host: HeaderValue::from_str(&backend.addr.to_string())
                .expect("a socket address is a valid header value"),
            path: path.clone(),
            backend,
            interval: cfg.interval,
            timeout: cfg.timeout,
            streak: ProbeStreak::new(cfg.rise, cfg.fall, true),
        };
        let delay = first_probe_delay(&upstream, index, count, cfg.interval);
        checks.tasks.push(tokio::spawn(probe.run(delay)));
    }
    checks
}

/// When the first probe of backend `index` of `count` runs: evenly spaced slots over a tenth
/// of the interval (at most [`MAX_FIRST_PROBE_SPREAD`]), shifted within a slot by a hash of
/// the upstream name so that the first backends of several upstreams do not coincide either.
fn first_probe_delay(upstream: &str, index: usize, count: usize, interval: Duration) -> Duration {
    let window = (interval / 10).min(MAX_FIRST_PROBE_SPREAD);
    let count = u32::try_from(count).unwrap_or(u32::MAX).max(1);
    let index = u32::try_from(index).unwrap_or(u32::MAX).min(count - 1);
    let slot = window / count;
    // FNV-1a: any fixed hash will do; std's DefaultHasher may change between builds.
    let hash = upstream
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    let phase = u32::try_from(hash % 1000).expect("below 1000");
    slot * index + slot * phase / 1000
}

/// Counts probe results against `rise`/`fall`; owned by one probe task, so plain numbers.
#[derive(Debug)]
struct ProbeStreak {
    rise: u32,
    fall: u32,
    up: bool,
    /// Results in a row that disagree with `up`.
    against: u32,
}

impl ProbeStreak {
    /// `rise`/`fall` below 1 are treated as 1.
    fn new(rise: u32, fall: u32, up: bool) -> ProbeStreak {
        ProbeStreak {
            rise: rise.max(1),
            fall: fall.max(1),
            up,
            against: 0,
        }
    }

    /// Counts one probe; returns the new verdict when this probe changed it.
    fn record(&mut self, success: bool) -> Option<bool> {
        if success == self.up {
            self.against = 0;
            return None;
        }
        self.against += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.against < needed {
            return None;
        }
        self.up = success;
        self.against = 0;
        Some(self.up)
    }
}

/// Everything one backend's probe task needs.
struct Probe {
    upstream: Arc<str>,
    backend: Arc<Backend>,
    /// `Host` of every probe: the server's address.
    host: HeaderValue,
    path: Uri,
    interval: Duration,
    timeout: Duration,
    streak: ProbeStreak,
}

impl Probe {
    async fn run(mut self, first_delay: Duration) {
        self.streak.up = self.backend.health.is_active_up();
        let mut ticks = tokio::time::interval_at(Instant::now() + first_delay, self.interval);
        // A probe slower than the interval pushes the next one back instead of firing a burst.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let result = self.probe().await;
            let server = self.backend.addr;
            if let Err(reason) = &result {
                debug!(upstream = %self.upstream, %server, %reason, "active health: probe failed");
            }
            match (self.streak.record(result.is_ok()), &result) {
                (Some(false), Err(reason)) => {
                    self.backend.set_active_up(false);
                    warn!(upstream = %self.upstream, %server, %reason, fall = self.streak.fall,
                        "active health: server marked down after consecutive failed probes");
                }
                (Some(true), Ok(status)) => {
                    self.backend.set_active_up(true);
                    info!(upstream = %self.upstream, %server, status = status.as_u16(),
                        rise = self.streak.rise,
                        "active health: server marked up after consecutive successful probes");
                }
                _ => {}
            }
            self.backend.publish(Instant::now());
        }
    }

    /// One probe: the status of a 2xx/3xx answer, or why the server failed it.
    async fn probe(&self) -> Result<StatusCode, CheckError> {
        match tokio::time::timeout(self.timeout, self.exchange()).await {
            Ok(Ok(status)) if status.is_success() || status.is_redirection() => Ok(status),
            Ok(Ok(status)) => Err(CheckError::Status(status)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CheckError::Timeout(self.timeout)),
        }
    }

    async fn exchange(&self) -> Result<StatusCode, CheckError> {
        // Opened as the traffic's connections are (TLS included, README "TLS to the
        // backends"), bounded by the probe's timeout.
        let pool = self.backend.pool();
        let stream = pool
            .connector()
            .open(self.backend.addr, pool.config())
            .await
            .map_err(CheckError::Connect)?;
        let (mut sender, conn) =
            crate::upstream::connect::http1_handshake::<_, Empty<Bytes>>(stream).await?;
        let mut request = Request::new(Empty::new());
        *request.method_mut() = Method::GET;
        *request.uri_mut() = self.path.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        headers.insert(USER_AGENT, HeaderValue::from_static(PROBE_USER_AGENT));

        let mut exchange = pin!(async move {
            let response = sender.send_request(request).await?;
            let status = response.status();
            // Read the (small) body so that the server closes first; its errors say nothing
            // the status did not.
            let mut body = response.into_body();
            let mut read = 0;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > MAX_PROBE_BODY {
                    break;
                }
            }
            Ok::<_, CheckError>(status)
        });
        // The connection is driven here rather than in a task of its own, so that a timeout
        // or an abort drops it with the probe.
        let mut conn = pin!(conn);
        tokio::select! {
            result = &mut exchange => result,
            closed = &mut conn => {
                closed?;
                exchange.await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use crate::config::PassiveHealth;
    use crate::config::PoolConfig;
    use crate::upstream::backend::BackendHealth;
    use crate::upstream::pool::Pool;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use kaproxy_demo::{DemoBackend, DemoBackendConfig};

    #[test]
    fn streak_goes_down_after_fall_and_up_after_rise() {
        let mut streak = ProbeStreak::new(2, 3, true);
        assert_eq!(streak.record(false), None);
        assert_eq!(streak.record(false), None);
        assert_eq!(streak.record(false), Some(false));
        assert_eq!(streak.record(false), None, "already down");
        assert_eq!(streak.record(true), None);
        assert_eq!(streak.record(true), Some(true));
        assert_eq!(streak.record(true), None, "already up");
    }

    #[test]
    fn streak_is_broken_by_one_disagreeing_probe() {
        let mut streak = ProbeStreak::new(2, 3, true);
        streak.record(false);
        streak.record(false);
        assert_eq!(streak.record(true), None);
        assert_eq!(streak.record(false), None);
        assert_eq!(streak.record(false), None);
        assert_eq!(streak.record(false), Some(false));
        streak.record(true);
        assert_eq!(streak.record(false), None);
        assert_eq!(streak.record(true), None);
        assert_eq!(streak.record(true), Some(true));
        // rise/fall of 0 mean 1.
        let mut hair_trigger = ProbeStreak::new(0, 0, true);
        assert_eq!(hair_trigger.record(false), Some(false));
        assert_eq!(hair_trigger.record(true), Some(true));
    }

    #[test]
    fn first_probes_are_spread_over_a_tenth_of_the_interval() {
        let interval = Duration::from_secs(5);
        let delays: Vec<Duration> = (0..100)
            .map(|i| first_probe_delay("web", i, 100, interval))
            .collect();
        assert_eq!(delays, {
            let mut sorted = delays.clone();
            sorted.sort();
            sorted
        });
        assert!(delays[99] < MAX_FIRST_PROBE_SPREAD);
        for pair in delays.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(5));
        }
        assert_eq!(
            delays,
            (0..100)
                .map(|i| first_probe_delay("web", i, 100, interval))
                .collect::<Vec<_>>()
        );
        assert_ne!(first_probe_delay("api", 0, 100, interval), delays[0]);
        // Short intervals keep the spread within a tenth of them; a lone backend starts at once.
        assert!(
            first_probe_delay("web", 9, 10, Duration::from_millis(100)) < Duration::from_millis(10)
        );
        assert!(first_probe_delay("web", 0, 1, interval) < MAX_FIRST_PROBE_SPREAD);
    }

    // Active checks against real sockets, in real time: paused time would let timeouts fire
    // while the kernel still has the bytes on their way.

    const PROBE_INTERVAL: Duration = Duration::from_millis(100);

    fn health_config(path: &str) -> HealthConfig {
        HealthConfig {
            path: path.to_string(),
            interval: PROBE_INTERVAL,
            timeout: Duration::from_millis(200),
            rise: 2,
            fall: 3,
            ..HealthConfig::default()
        }
    }

    fn backend(addr: SocketAddr) -> Arc<Backend> {
        let metrics = crate::metrics::Metrics::new();
        let pool = Pool::new(addr, PoolConfig::default(), metrics.server("web", addr));
        let passive = PassiveHealth::default();
        let health = BackendHealth::new(passive.fall, passive.cooldown);
        Arc::new(Backend::new(1, health, pool))
    }

    fn spawn_one(addr: SocketAddr, path: &str) -> (Arc<Backend>, Gauge, ActiveChecks) {
        let backend = backend(addr);
        let gauge = backend.metrics().up.clone();
        let checks = spawn_active_checks("web", vec![backend.clone()], &health_config(path));
        (backend, gauge, checks)
    }

    /// Polls `done` every 5 ms for up to 3 s.
    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn demo_backend() -> DemoBackend {
        DemoBackend::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            DemoBackendConfig::default(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_healthy_backend_stays_up() {
        let demo = demo_backend().await;
        let (backend, gauge, _checks) = spawn_one(demo.addr(), "/");
        wait_until("4 probes were answered", || {
            demo.stats().requests_served >= 4
        })
        .await;
        assert!(backend.health.is_up(Instant::now()));
        assert_eq!(gauge.get(), 1);
        // A fresh connection per probe: none carried two requests.
        let stats = demo.stats();
        assert!(stats.connections_accepted >= stats.requests_served);
    }

    #[tokio::test]
    async fn an_error_status_marks_down_after_fall_probes() {
        let demo = demo_backend().await;
        let (backend, gauge, _checks) = spawn_one(demo.addr(), "/status/500");
        wait_until("the server is down", || {
            let down = !backend.health.is_up(Instant::now());
            // Read after the verdict: the third answer was served before it changed.
            assert!(!down || demo.stats().requests_served >= 3, "down too early");
            down
        })
        .await;
        wait_until("the gauge reads 0", || gauge.get() == 0).await;
        assert!(
            backend.health.is_passive_up(Instant::now()),
            "only the probes said down"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_marks_down() {
        let demo = demo_backend().await;
        let addr = demo.addr();
        demo.stop().await;
        let (backend, gauge, _checks) = spawn_one(addr, "/");
        wait_until("the server is down", || !backend.health.is_active_up()).await;
        wait_until("the gauge reads 0", || gauge.get() == 0).await;
    }

    #[tokio::test]
    async fn a_slow_answer_counts_as_a_failure() {
        let demo = demo_backend().await;
        let (backend, _gauge, _checks) = spawn_one(demo.addr(), "/slow?ms=2000");
        wait_until("the server is down", || !backend.health.is_active_up()).await;
        assert_eq!(demo.stats().requests_served, 0, "every probe gave up first");
    }

    #[tokio::test]
    async fn an_invalid_path_disables_the_checks() {
        let demo = demo_backend().await;
        let (backend, _gauge, checks) = spawn_one(demo.addr(), "/a b");
        assert!(checks.tasks.is_empty());
        assert!(backend.health.is_up(Instant::now()));
    }

    /// A backend whose answer (200 or 500) a test flips, and which counts what it sees.
    struct FlipBackend {
        addr: SocketAddr,
        healthy: Arc<AtomicBool>,
        connections: Arc<AtomicUsize>,
        ok_answers: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
        task: JoinHandle<()>,
    }

    impl FlipBackend {
        async fn start(healthy: bool) -> FlipBackend {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let healthy = Arc::new(AtomicBool::new(healthy));
            let connections = Arc::new(AtomicUsize::new(0));
            let ok_answers = Arc::new(AtomicUsize::new(0));
            let heads = Arc::new(Mutex::new(Vec::new()));
            let task = tokio::spawn({
                let (healthy, connections) = (healthy.clone(), connections.clone());
                let (ok_answers, heads) = (ok_answers.clone(), heads.clone());
                async move {
                    loop {
                        let (mut stream, _) = listener.accept().await.unwrap();
                        connections.fetch_add(1, Ordering::SeqCst);
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.ends_with(b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        heads
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into());
                        let ok = healthy.load(Ordering::SeqCst);
                        let status = if ok {
                            "200 OK"
                        } else {
                            "500 Internal Server Error"
                        };
                        let answer = format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nhi\n"
                        );
                        if stream.write_all(answer.as_bytes()).await.is_ok() && ok {
                            ok_answers.fetch_add(1, Ordering::SeqCst);
                        }
                        let _ = stream.shutdown().await;
                    }
                }
            });
            FlipBackend {
                addr,
                healthy,
                connections,
                ok_answers,
                heads,
                task,
            }
        }
    }

    impl Drop for FlipBackend {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[tokio::test]
    async fn a_recovered_backend_comes_back_after_rise_probes() {
        let flip = FlipBackend::start(false).await;
        let (backend, gauge, _checks) = spawn_one(flip.addr, "/healthz?full=1");
        wait_until("the server is down", || {
            !backend.health.is_up(Instant::now())
        })
        .await;
        wait_until("the gauge reads 0", || gauge.get() == 0).await;

        flip.healthy.store(true, Ordering::SeqCst);
        wait_until("the server is up", || {
            let up = backend.health.is_up(Instant::now());
            assert!(
                !up || flip.ok_answers.load(Ordering::SeqCst) >= 2,
                "up too early"
            );
            up
        })
        .await;
        wait_until("the gauge reads 1", || gauge.get() == 1).await;

        let head = flip.heads.lock().unwrap()[0].to_ascii_lowercase();
        assert!(
            head.starts_with("get /healthz?full=1 http/1.1\r\n"),
            "{head}"
        );
        for header in [
            format!("host: {}\r\n", flip.addr),
            "connection: close\r\n".to_string(),
            "user-agent: kaproxy-health\r\n".to_string(),
        ] {
            assert!(head.contains(&header), "no {header:?} in {head}");
        }
    }

    #[tokio::test]
    async fn dropping_the_checks_stops_the_probes() {
        let flip = FlipBackend::start(true).await;
        let (_backend, _gauge, checks) = spawn_one(flip.addr, "/");
        wait_until("2 probes", || flip.connections.load(Ordering::SeqCst) >= 2).await;
        drop(checks);
        // A probe that had already connected may still be accepted.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let seen = flip.connections.load(Ordering::SeqCst);
        tokio::time::sleep(PROBE_INTERVAL * 3).await;
        assert_eq!(flip.connections.load(Ordering::SeqCst), seen);
    }
}
