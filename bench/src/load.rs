//! Drives the load: one task per connection (per stream for HTTP/2), closed loop or open loop
//! at a constant arrival rate, bounded by a duration or a request count, with optional idle
//! gaps, a connection per request, and a live progress line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::conn::{timed_out, BoxError, Connector, HttpVersion, Outcome, RequestTemplate, Sender};
use crate::stats::Stats;
use kaproxy_testkit::client::{classify, ErrorClass};

/// After a failed connect, a worker waits this long before trying again, so that a dead target
/// does not turn the run into a busy loop of refused connects.
const CONNECT_ERROR_BACKOFF: Duration = Duration::from_millis(10);
const PROGRESS_TICK: Duration = Duration::from_millis(250);

/// What to run; validated by the caller.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub connections: usize,
    /// Concurrent requests per HTTP/2 connection (1 for HTTP/1.1).
    pub streams: usize,
    /// Stop after this long (in-flight requests at the deadline are not counted).
    pub duration: Option<Duration>,
    /// Stop after this many requests (responses plus errors).
    pub requests: Option<u64>,
    /// Open loop: total requests per second, latency measured from each request's intended
    /// send time so that a stalled server is not hidden by a stalled client.
    pub rate: Option<f64>,
    pub new_conn: bool,
    pub idle_gap: Option<(Duration, Duration)>,
    pub timeout: Duration,
    pub progress: bool,
}

impl LoadPlan {
    pub fn workers(&self) -> usize {
        self.connections * self.streams.max(1)
    }
}

pub struct LoadResult {
    pub stats: Stats,
    pub elapsed: Duration,
}

struct Shared {
    plan: LoadPlan,
    connector: Arc<Connector>,
    template: Arc<RequestTemplate>,
    /// Request tokens left when `plan.requests` bounds the run.
    remaining: Option<AtomicU64>,
    done: AtomicU64,
    failed: AtomicU64,
    start: Instant,
}

impl Shared {
    fn claim(&self) -> bool {
        match &self.remaining {
            None => true,
            Some(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }
}

/// Where a worker gets its connection: its own, or one HTTP/2 connection shared by
/// `plan.streams` workers.
enum Slot {
    Own(Option<Sender>),
    Shared(Arc<Mutex<Option<Sender>>>),
}

impl Slot {
    async fn exchange(&mut self, shared: &Shared) -> Result<Outcome, BoxError> {
        match self {
            Slot::Own(conn) => {
                let reusable = match conn {
                    Some(s) => s.ready().await,
                    None => false,
                };
                if !reusable {
                    *conn = None;
                    *conn = Some(shared.connector.connect().await?);
                }
                conn.as_mut()
                    .expect("just connected")
                    .exchange(&shared.template)
                    .await
            }
            Slot::Shared(cell) => {
                let mut sender = {
                    let mut guard = cell.lock().await;
                    if guard.as_ref().is_none_or(Sender::is_closed) {
                        *guard = None;
                        *guard = Some(shared.connector.connect().await?);
                    }
                    guard
                        .as_ref()
                        .and_then(Sender::clone_h2)
                        .expect("an HTTP/2 connection")
                };
                sender.exchange(&shared.template).await
            }
        }
    }

    /// Drops the connection after an error or with `--new-conn`.
    async fn discard(&mut self) {
        match self {
            Slot::Own(conn) => *conn = None,
            Slot::Shared(cell) => {
                let mut guard = cell.lock().await;
                if guard.as_ref().is_some_and(Sender::is_closed) {
                    *guard = None;
                }
            }
        }
    }
}

/// Runs `plan` against `connector` and returns the merged statistics.
pub async fn run(
    plan: LoadPlan,
    connector: Arc<Connector>,
    template: Arc<RequestTemplate>,
) -> LoadResult {
    let workers = plan.workers();
    let shared_h2 = connector.version() == HttpVersion::Http2 && !plan.new_conn && plan.streams > 1;
    let shared = Arc::new(Shared {
        remaining: plan.requests.map(AtomicU64::new),
        plan,
        connector,
        template,
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        start: Instant::now(),
    });
    let deadline = shared.plan.duration.map(|d| shared.start + d);
    let progress = shared.plan.progress.then(|| spawn_progress(shared.clone()));

    let mut h2_cells = Vec::new();
    let mut tasks = Vec::with_capacity(workers);
    for id in 0..workers {
        let slot = match shared_h2 {
            false => Slot::Own(None),
            true => {
                let conn = id / shared.plan.streams;
                if h2_cells.len() <= conn {
                    h2_cells.push(Arc::new(Mutex::new(None)));
                }
                Slot::Shared(h2_cells[conn].clone())
            }
        };
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::new();
            let work = worker(id, workers, &shared, slot, &mut stats);
            match deadline {
                Some(deadline) => {
                    let _ = tokio::time::timeout_at(deadline, work).await;
                }
                None => work.await,
            }
            stats
        }));
    }
    let mut stats = Stats::new();
    for task in tasks {
        if let Ok(s) = task.await {
            stats.merge(&s);
        }
    }
    let elapsed = match deadline {
        Some(deadline) => deadline.min(Instant::now()) - shared.start,
        None => shared.start.elapsed(),
    };
    if let Some((bar, ticker)) = progress {
        ticker.abort();
        bar.finish_and_clear();
    }
    LoadResult { stats, elapsed }
}

async fn worker(id: usize, workers: usize, shared: &Shared, mut slot: Slot, stats: &mut Stats) {
    let plan = &shared.plan;
    let mut rng = XorShift::new(id as u64);
    // Open loop: worker `id` owns send times start + (id + k * workers) / rate.
    let interval = plan
        .rate
        .map(|r| Duration::from_secs_f64(workers as f64 / r));
    let mut next_send = shared.start
        + plan
            .rate
            .map_or(Duration::ZERO, |r| Duration::from_secs_f64(id as f64 / r));
    while shared.claim() {
        let intended = match interval {
            Some(interval) => {
                let t = next_send;
                next_send += interval;
                tokio::time::sleep_until(t).await;
                t
            }
            None => Instant::now(),
        };
        let result = match tokio::time::timeout(plan.timeout, slot.exchange(shared)).await {
            Ok(r) => r,
            Err(_) => Err(timed_out(plan.timeout)),
        };
        match result {
            Ok(outcome) => {
                stats.record_response(outcome.status, intended.elapsed(), outcome.body_bytes)
            }
            Err(err) => {
                let class = classify(err.as_ref());
                stats.record_error(class, || error_chain(err.as_ref()));
                shared.failed.fetch_add(1, Ordering::Relaxed);
                slot.discard().await;
                if class == ErrorClass::ConnectRefused {
                    tokio::time::sleep(CONNECT_ERROR_BACKOFF).await;
                }
            }
        }
        if plan.progress {
            shared.done.fetch_add(1, Ordering::Relaxed);
        }
        if plan.new_conn {
            slot.discard_own();
        }
        if let Some((min, max)) = plan.idle_gap {
            tokio::time::sleep(rng.between(min, max)).await;
        }
    }
}

impl Slot {
    fn discard_own(&mut self) {
        if let Slot::Own(conn) = self {
            *conn = None;
        }
    }
}

/// "outer: inner: innermost", the way an application log shows a wrapped error.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

fn spawn_progress(shared: Arc<Shared>) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template("{msg}").expect("valid template"));
    let b = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(PROGRESS_TICK).await;
            let now = Instant::now();
            let done = shared.done.load(Ordering::Relaxed);
            let rate = (done - last.1) as f64 / (now - last.0).as_secs_f64();
            last = (now, done);
            b.set_message(format!(
                "{:>6.1} s  {done} requests  {rate:.0} req/s  {} errors",
                shared.start.elapsed().as_secs_f64(),
                shared.failed.load(Ordering::Relaxed)
            ));
        }
    });
    (bar, ticker)
}

/// xorshift64*: enough randomness for idle gaps, no dependency.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
        XorShift((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ nanos) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn between(&mut self, min: Duration, max: Duration) -> Duration {
        let span = (max - min).as_nanos() as u64;
        if span == 0 {
            return min;
        }
        min + Duration::from_nanos(self.next() % (span + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Target, TlsOptions};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn gaps_stay_in_range() {
        let mut r = XorShift::new(7);
        let (min, max) = (Duration::from_millis(900), Duration::from_millis(1100));
        for _ in 0..1000 {
            let g = r.between(min, max);
            assert!(g >= min && g <= max);
        }
        assert_eq!(r.between(min, min), min);
    }

    /// A tiny keep-alive HTTP/1.1 server that answers every request with "ok".
    async fn ok_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    async fn run_against(addr: std::net::SocketAddr, plan: LoadPlan) -> LoadResult {
        let target = Target::parse(&format!("http://{addr}/")).unwrap();
        let connector = Connector::new(&target, HttpVersion::Http1, &TlsOptions::default(), None)
            .await
            .unwrap();
        let template = RequestTemplate::get(&target, HttpVersion::Http1);
        run(plan, Arc::new(connector), Arc::new(template)).await
    }

    fn plan() -> LoadPlan {
        LoadPlan {
            connections: 4,
            streams: 1,
            duration: None,
            requests: Some(200),
            rate: None,
            new_conn: false,
            idle_gap: None,
            timeout: Duration::from_secs(5),
            progress: false,
        }
    }

    #[tokio::test]
    async fn request_count_is_exact() {
        let addr = ok_server().await;
        let r = run_against(addr, plan()).await;
        let report = r.stats.report(r.elapsed);
        assert_eq!(report.requests, 200);
        assert_eq!(report.status.s2xx, 200);
        assert_eq!(report.body_bytes, 400);
    }

    #[tokio::test]
    async fn new_conn_and_open_loop_rate() {
        let addr = ok_server().await;
        let r = run_against(
            addr,
            LoadPlan {
                requests: Some(40),
                rate: Some(200.0),
                new_conn: true,
                ..plan()
            },
        )
        .await;
        assert_eq!(r.stats.report(r.elapsed).status.s2xx, 40);
        // 40 requests at 200/s are spread over about 200 ms.
        assert!(r.elapsed >= Duration::from_millis(180), "{:?}", r.elapsed);
    }

    #[tokio::test]
    async fn duration_bounds_the_run() {
        let addr = ok_server().await;
        let r = run_against(
            addr,
            LoadPlan {
                requests: None,
                duration: Some(Duration::from_millis(300)),
                ..plan()
            },
        )
        .await;
        assert_eq!(r.elapsed, Duration::from_millis(300));
        assert!(r.stats.responses() > 0);
    }
}
