//! The pool's rules under paused time with fake connections, and against demo backends.

use super::learn::PROBE_LOOK_EVERY;
use super::*;
use std::sync::atomic::AtomicBool;

fn cfg() -> PoolConfig {
    PoolConfig::default()
}

fn pool(cfg: PoolConfig) -> Arc<Pool> {
    let metrics = crate::metrics::Metrics::new();
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    Pool::new(addr, cfg, metrics.server("web", addr))
}

/// A connection the test closes by hand (the backend's FIN).
struct FakeConn(Arc<AtomicBool>);

impl Connection for FakeConn {
    fn is_closed(&mut self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Opens fake connections and keeps each one's "peer closed" switch.
#[derive(Default)]
struct FakeConnector {
    opened: Mutex<Vec<Arc<AtomicBool>>>,
}

impl Connector for FakeConnector {
    type Conn = FakeConn;

    async fn connect(
        &self,
        _addr: SocketAddr,
        _cfg: &PoolConfig,
        _id: u64,
    ) -> Result<FakeConn, RequestError> {
        let closed = Arc::new(AtomicBool::new(false));
        crate::sync::lock(&self.opened).push(closed.clone());
        Ok(FakeConn(closed))
    }
}

fn fake_pool(cfg: PoolConfig) -> (Arc<Pool<FakeConnector>>, crate::metrics::Metrics) {
    let metrics = crate::metrics::Metrics::new();
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let pool = Pool::with_connector(
        addr,
        cfg,
        metrics.server("web", addr),
        FakeConnector::default(),
    );
    (pool, metrics)
}

/// A fake pool whose backend's timeout is not being probed (no probe for a day): for the
/// tests of the other limits.
fn unprobed_pool(cfg: PoolConfig) -> (Arc<Pool<FakeConnector>>, crate::metrics::Metrics) {
    let (pool, metrics) = fake_pool(cfg);
    crate::sync::lock(&pool.learned.probe).next =
        Some(Instant::now() + Duration::from_secs(86_400));
    (pool, metrics)
}

fn opened(pool: &Pool<FakeConnector>) -> usize {
    crate::sync::lock(&pool.connector.opened).len()
}

/// Lets the sweep task run after a time advance.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_reused_within_its_deadline_and_swept_after_it() {
    let (pool, metrics) = unprobed_pool(cfg()); // idle_timeout 4 s < 5 s - 500 ms
    pool.acquire().await.unwrap().release();
    tokio::time::advance(Duration::from_millis(3900)).await;
    let again = pool.acquire().await.unwrap();
    assert!(again.is_reused(), "3.9 s idle < 4 s: reused");
    again.release();
    tokio::time::advance(Duration::from_millis(4001)).await;
    settle().await;
    assert_eq!(pool.idle_count(), 0, "the sweep closed it at its deadline");
    assert_eq!(closed(&metrics, "idle"), 1);
    assert!(!pool.acquire().await.unwrap().is_reused());
    assert_eq!(opened(&pool), 2);
}

#[tokio::test(start_paused = true)]
async fn a_steady_load_emptying_and_refilling_the_pool_does_not_wake_the_sweep_each_time() {
    let (pool, metrics) = unprobed_pool(cfg()); // idle_timeout 4 s
    settle().await;
    let before = pool.sweeps.load(Ordering::Relaxed);
    for _ in 0..50 {
        // Each request takes the one idle connection (the pool empties) and gives it back.
        let conn = pool.acquire().await.unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        conn.release();
        settle().await;
    }
    let woke = pool.sweeps.load(Ordering::Relaxed) - before;
    assert!(
        woke <= 2,
        "the sweep ran {woke} times for 50 releases whose deadlines came after its wake-up"
    );
    // It still closes the connection at its deadline (4 s after its last release).
    tokio::time::advance(Duration::from_millis(3990)).await;
    settle().await;
    assert_eq!(pool.idle_count(), 1, "not yet at its deadline");
    tokio::time::advance(Duration::from_millis(11)).await;
    settle().await;
    assert_eq!(pool.idle_count(), 0, "the sweep closed it at its deadline");
    assert_eq!(closed(&metrics, "idle"), 1);
}

#[tokio::test(start_paused = true)]
async fn draining_closes_idle_and_returning_connections_and_enable_pools_again() {
    let (pool, metrics) = unprobed_pool(cfg());
    let busy = pool.acquire().await.unwrap();
    pool.acquire_fresh().await.unwrap().release();
    assert_eq!((pool.idle_count(), pool.in_flight()), (1, 1));

    pool.set_draining(true);
    assert_eq!(pool.idle_count(), 0, "idle connections closed at once");
    assert_eq!(closed(&metrics, "drained"), 1);
    assert!(!pool.has_idle());
    // The request in flight finishes; its connection is closed, not pooled.
    busy.release();
    assert_eq!((pool.idle_count(), pool.in_flight()), (0, 0));
    assert_eq!(closed(&metrics, "drained"), 2);

    pool.set_draining(false);
    pool.acquire().await.unwrap().release();
    assert_eq!(pool.idle_count(), 1, "enabled: pooled again");
    assert_eq!(closed(&metrics, "drained"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_pool_let_go_closes_its_idle_connections_once_its_requests_finished() {
    let (pool, metrics) = unprobed_pool(cfg());
    let busy = pool.acquire().await.unwrap();
    pool.acquire_fresh().await.unwrap().release();
    assert_eq!((pool.idle_count(), pool.in_flight()), (1, 1));
    // A reload or `resolve` replaced it: the configuration's hold goes, the request's stays.
    drop(pool);
    assert_eq!(closed(&metrics, "removed"), 0, "a request still runs on it");
    busy.release();
    assert_eq!(closed(&metrics, "removed"), 2, "both closed, counted");
}

#[tokio::test(start_paused = true)]
async fn a_connection_whose_peer_closed_is_never_handed_out() {
    let (pool, metrics) = unprobed_pool(cfg());
    pool.acquire().await.unwrap().release();
    crate::sync::lock(&pool.connector.opened)[0].store(true, Ordering::Release);
    let conn = pool.acquire().await.unwrap();
    assert!(!conn.is_reused());
    assert_eq!(closed(&metrics, "server_close"), 1);
    assert_eq!(opened(&pool), 2);
}

#[tokio::test(start_paused = true)]
async fn a_learned_keep_alive_timeout_shortens_the_deadline() {
    let (pool, metrics) = fake_pool(cfg());
    pool.learn(&KeepAliveHint {
        timeout: Some(Duration::from_secs(1)),
        max: None,
    });
    pool.acquire().await.unwrap().release();
    tokio::time::advance(Duration::from_millis(499)).await;
    let conn = pool.acquire().await.unwrap();
    assert!(conn.is_reused(), "499 ms < 1 s - 500 ms");
    conn.release();
    tokio::time::advance(Duration::from_millis(501)).await;
    assert!(!pool.acquire().await.unwrap().is_reused());
    assert_eq!(closed(&metrics, "learned_timeout"), 1);
}

/// Marks fake connection `i` closed by the backend (its FIN).
fn backend_closes(pool: &Pool<FakeConnector>, i: usize) {
    crate::sync::lock(&pool.connector.opened)[i].store(true, Ordering::Release);
}

/// Lets `d` pass in steps, the sweep running at each (as a probe is looked at).
async fn pass(d: Duration) {
    let step = Duration::from_millis(20);
    let mut left = d;
    while left > Duration::ZERO {
        let now = step.min(left);
        tokio::time::advance(now).await;
        settle().await;
        left -= now;
    }
}

/// The observed timeout, which a probe dates from its last look (at most
/// `PROBE_LOOK_EVERY` early): within that of `real`, and never above it.
fn observed_about(pool: &Pool<FakeConnector>, real: Duration) {
    let (t, source) = pool.keepalive();
    assert_eq!(source, KeepAliveSource::Observed);
    assert!(
        t <= real && t + PROBE_LOOK_EVERY >= real,
        "observed {t:?}, the backend closed at {real:?}"
    );
}

/// Wakes the sweep as a FIN on an idle connection does, and lets it run.
async fn sweep_now(pool: &Pool<FakeConnector>) {
    pool.sweep.notify_one();
    settle().await;
}

fn keepalive_series(metrics: &crate::metrics::Metrics) -> Vec<String> {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("kaproxy_upstream_keepalive_timeout_seconds{"))
        .map(str::to_string)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_shortest_close_a_backend_showed_becomes_its_timeout() {
    let (pool, metrics) = fake_pool(cfg()); // keepalive_timeout 5 s, margin 500 ms
    assert_eq!(
        pool.keepalive(),
        (Duration::from_secs(5), KeepAliveSource::Config)
    );
    pool.acquire().await.unwrap().release();
    tokio::time::advance(Duration::from_secs(2)).await;
    backend_closes(&pool, 0);
    sweep_now(&pool).await;
    assert_eq!(closed(&metrics, "server_close"), 1);
    assert_eq!(
        pool.keepalive(),
        (Duration::from_secs(2), KeepAliveSource::Observed)
    );
    assert_eq!(
        keepalive_series(&metrics),
        [
            r#"kaproxy_upstream_keepalive_timeout_seconds{server="127.0.0.1:9",source="observed"} 2.0"#
        ]
    );
    // A later close does not raise it; a shorter one lowers it.
    pool.observe_close(Duration::from_secs(3));
    assert_eq!(pool.effective_keepalive(), Duration::from_secs(2));
    pool.observe_close(Duration::from_millis(1800));
    assert_eq!(pool.effective_keepalive(), Duration::from_millis(1800));
    // Its deadline is the observed timeout less the margin: 1.3 s.
    pool.acquire().await.unwrap().release();
    tokio::time::advance(Duration::from_millis(1299)).await;
    let conn = pool.acquire().await.unwrap();
    assert!(conn.is_reused(), "1.299 s idle < 1.8 s - 500 ms");
    conn.release();
    tokio::time::advance(Duration::from_millis(1301)).await;
    assert!(!pool.acquire().await.unwrap().is_reused());
}

#[tokio::test(start_paused = true)]
async fn a_reused_connection_that_failed_teaches_its_idle_time() {
    let (pool, _metrics) = unprobed_pool(cfg());
    pool.acquire().await.unwrap().release();
    tokio::time::advance(Duration::from_millis(2500)).await;
    let conn = pool.acquire().await.unwrap();
    assert!(conn.is_reused());
    conn.closed_on_reuse();
    assert_eq!(
        pool.keepalive(),
        (Duration::from_millis(2500), KeepAliveSource::Observed)
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_raises_the_observed_timeout_only_on_evidence() {
    let (pool, metrics) = fake_pool(cfg()); // configured deadline: idle_timeout 4 s
    pool.observe_close(Duration::from_secs(2));
    // Connection 0 reaches the observed deadline (1.5 s): kept as the probe, not closed,
    // and never handed out.
    pool.acquire().await.unwrap().release();
    tokio::time::advance(Duration::from_millis(1501)).await;
    settle().await;
    assert_eq!(closed(&metrics, "learned_timeout"), 0, "kept as the probe");
    assert_eq!(pool.idle_count(), 0, "the probe is not idle for use");
    let other = pool.acquire().await.unwrap();
    assert!(!other.is_reused(), "the probe is never handed out");
    // The backend closes the probe at 3 s idle: its timeout went up to 3 s.
    pass(Duration::from_millis(1499)).await;
    backend_closes(&pool, 0);
    sweep_now(&pool).await;
    observed_about(&pool, Duration::from_secs(3));
    // No second probe within PROBE_INTERVAL: connection 1 closes at its deadline (2.5 s).
    other.release();
    tokio::time::advance(Duration::from_millis(2501)).await;
    settle().await;
    assert_eq!(closed(&metrics, "learned_timeout"), 1);
    // After it, the next probe outlives the observed timeout up to the configured
    // deadline (4 s): the observation is dropped.
    tokio::time::advance(PROBE_INTERVAL).await;
    pool.acquire().await.unwrap().release();
    tokio::time::advance(Duration::from_millis(2501)).await;
    settle().await;
    assert_eq!(closed(&metrics, "learned_timeout"), 1, "the new probe");
    tokio::time::advance(Duration::from_millis(1500)).await;
    settle().await;
    assert_eq!(
        pool.keepalive(),
        (Duration::from_secs(5), KeepAliveSource::Config)
    );
    assert_eq!(
        closed(&metrics, "idle"),
        1,
        "the probe, closed by kaproxy at 4 s"
    );
}

#[tokio::test(start_paused = true)]
async fn while_nothing_is_known_the_first_idle_connection_finds_the_timeout_unused() {
    let (pool, metrics) = fake_pool(cfg()); // no header, nothing observed
    pool.acquire().await.unwrap().release();
    assert_eq!(pool.idle_count(), 0, "kept as the probe");
    let second = pool.acquire().await.unwrap();
    assert!(!second.is_reused(), "the probe is never handed out");
    second.release();
    assert_eq!(pool.idle_count(), 1, "one probe at a time");
    // The backend closes the probe after 1.2 s idle: its timeout, before any reuse met it.
    pass(Duration::from_millis(1200)).await;
    backend_closes(&pool, 0);
    sweep_now(&pool).await;
    observed_about(&pool, Duration::from_millis(1200));
    assert_eq!(closed(&metrics, "server_close"), 1);
    // The other connection, idle as long, is past the new deadline (700 ms): not reused.
    assert!(!pool.acquire().await.unwrap().is_reused());
    assert_eq!(closed(&metrics, "learned_timeout"), 1);
}

#[tokio::test(start_paused = true)]
async fn while_probing_a_connection_is_trusted_only_as_long_as_the_probe_stayed_open() {
    let (pool, metrics) = fake_pool(cfg()); // margin 500 ms
                                            // A wave: three connections come back together; the first is the probe.
    let (a, b, c) = (
        pool.acquire().await.unwrap(),
        pool.acquire().await.unwrap(),
        pool.acquire().await.unwrap(),
    );
    a.release();
    tokio::time::advance(Duration::from_millis(100)).await;
    b.release();
    tokio::time::advance(Duration::from_millis(500)).await;
    c.release();
    // b came back 100 ms after the probe: the probe has not shown that the backend keeps
    // a connection 100 ms + the margin longer than it, so b is not reused; c, 600 ms
    // after, is.
    let first = pool.acquire().await.unwrap();
    assert!(
        first.is_reused(),
        "c, last used past the probe's last use + margin"
    );
    let second = pool.acquire().await.unwrap();
    assert!(!second.is_reused(), "b is not trusted while the probe runs");
    assert_eq!(closed(&metrics, "learned_timeout"), 1, "b");
    // The backend closes the probe: its timeout is known, the rule ends with the probe.
    pass(Duration::from_millis(400)).await;
    backend_closes(&pool, 0);
    sweep_now(&pool).await;
    observed_about(&pool, Duration::from_secs(1));
    assert_eq!(pool.learned.unproven_before_us.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_outlives_the_configured_deadline_settles_on_it() {
    let (pool, metrics) = fake_pool(cfg()); // configured deadline: idle_timeout 4 s
    pool.acquire().await.unwrap().release();
    tokio::time::advance(Duration::from_millis(4001)).await;
    settle().await;
    assert_eq!(
        closed(&metrics, "idle"),
        1,
        "the probe, at the configured deadline"
    );
    assert_eq!(
        pool.keepalive(),
        (Duration::from_secs(5), KeepAliveSource::Config)
    );
    // Settled: connections coming back are pooled, not probes, and all are reused.
    pool.acquire().await.unwrap().release();
    assert_eq!(pool.idle_count(), 1);
    assert!(pool.acquire().await.unwrap().is_reused());
}

#[tokio::test(start_paused = true)]
async fn a_probe_never_raises_the_timeout_above_a_close_seen_meanwhile() {
    // Gunicorn's timer is coarse: it closes some connections a second late. The probe's
    // late close must not undo what an earlier close showed while it ran.
    let (pool, _metrics) = fake_pool(cfg());
    pool.acquire().await.unwrap().release(); // the start probe
    pass(Duration::from_millis(900)).await;
    pool.observe_close(Duration::from_millis(850)); // another connection, closed sooner
    pass(Duration::from_millis(1100)).await;
    backend_closes(&pool, 0); // the probe, at 2 s
    sweep_now(&pool).await;
    assert_eq!(
        pool.keepalive(),
        (Duration::from_millis(850), KeepAliveSource::Observed)
    );
}

#[tokio::test(start_paused = true)]
async fn the_header_wins_over_observation() {
    let (pool, metrics) = fake_pool(cfg());
    pool.observe_close(Duration::from_secs(2));
    pool.learn(&KeepAliveHint {
        timeout: Some(Duration::from_secs(3)),
        max: None,
    });
    assert_eq!(
        pool.keepalive(),
        (Duration::from_secs(3), KeepAliveSource::Header)
    );
    assert_eq!(
        keepalive_series(&metrics),
        [r#"kaproxy_upstream_keepalive_timeout_seconds{server="127.0.0.1:9",source="header"} 3.0"#]
    );
}

#[tokio::test(start_paused = true)]
async fn learning_off_ignores_closes() {
    let mut c = cfg();
    c.learn_keep_alive = false;
    let (pool, _metrics) = fake_pool(c);
    pool.observe_close(Duration::from_secs(1));
    assert_eq!(
        pool.keepalive(),
        (Duration::from_secs(5), KeepAliveSource::Config)
    );
}

#[tokio::test(start_paused = true)]
async fn surplus_idle_connections_and_old_ones_are_closed_on_release() {
    let mut c = cfg();
    c.max_idle_per_server = 1;
    c.max_lifetime = Duration::from_secs(10);
    let (pool, metrics) = unprobed_pool(c);
    let (a, b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
    a.release();
    b.release();
    assert_eq!(pool.idle_count(), 1);
    assert_eq!(closed(&metrics, "surplus"), 1, "the surplus one");
    assert_eq!(closed(&metrics, "idle"), 0, "not an expiry");
    let old = pool.acquire().await.unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    old.release();
    assert_eq!(closed(&metrics, "lifetime"), 1);
    assert_eq!(pool.idle_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn deadline_is_the_earliest_limit() {
    let p = pool(cfg());
    let t0 = Instant::now();
    // idle_timeout 4s < 5s - 500ms.
    assert_eq!(
        p.deadline(t0, t0),
        (t0 + Duration::from_secs(4), CloseReason::Idle)
    );
    // A learned 1s keep-alive: 1s - 500ms wins.
    p.learn(&KeepAliveHint {
        timeout: Some(Duration::from_secs(1)),
        max: None,
    });
    assert_eq!(
        p.deadline(t0, t0),
        (t0 + Duration::from_millis(500), CloseReason::LearnedTimeout)
    );
    // Lifetime wins for an old connection.
    tokio::time::advance(Duration::from_secs(100)).await;
    let now = Instant::now();
    assert_eq!(
        p.deadline(t0, now),
        (t0 + Duration::from_secs(60), CloseReason::Lifetime)
    );
}

#[tokio::test(start_paused = true)]
async fn learned_timeout_shorter_than_margin_means_never_reuse() {
    let p = pool(cfg());
    p.learn(&KeepAliveHint {
        timeout: Some(Duration::from_millis(0)),
        max: None,
    });
    let t0 = Instant::now();
    let (deadline, reason) = p.deadline(t0, t0);
    assert!(deadline <= t0);
    assert_eq!(reason, CloseReason::LearnedTimeout);
}

#[tokio::test(start_paused = true)]
async fn learning_off_ignores_the_header() {
    let mut c = cfg();
    c.learn_keep_alive = false;
    c.keepalive_timeout = Duration::from_secs(10);
    c.idle_timeout = Duration::from_secs(9);
    c.safety_margin = Duration::ZERO;
    let p = pool(c);
    p.learn(&KeepAliveHint {
        timeout: Some(Duration::from_secs(1)),
        max: None,
    });
    let t0 = Instant::now();
    assert_eq!(
        p.deadline(t0, t0),
        (t0 + Duration::from_secs(9), CloseReason::Idle)
    );
}

use crate::body::UpstreamBody;
use http::Request;
use http_body_util::BodyExt;
use kaproxy_demo::{DemoBackend, DemoBackendConfig, StaleReuse};

fn demo(keepalive_ms: u64, stale_reuse: StaleReuse) -> DemoBackendConfig {
    DemoBackendConfig {
        name: "b".into(),
        keepalive_timeout: Duration::from_millis(keepalive_ms),
        stale_reuse,
        ..DemoBackendConfig::default()
    }
}

async fn start_demo(cfg: DemoBackendConfig) -> DemoBackend {
    DemoBackend::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .expect("demo backend")
}

fn real_pool(addr: SocketAddr, cfg: PoolConfig) -> (Arc<Pool>, crate::metrics::Metrics) {
    let metrics = crate::metrics::Metrics::new();
    let pool = Pool::new(addr, cfg, metrics.server("web", addr));
    (pool, metrics)
}

/// One GET through the pool; the body is read to the end so the connection is released.
async fn get(pool: &Arc<Pool>) -> Result<bool, RequestError> {
    let mut conn = pool.acquire().await?;
    let reused = conn.is_reused();
    let mut req = Request::new(UpstreamBody::Empty);
    *req.uri_mut() = "/".parse().unwrap();
    crate::upstream::keep_alive::ask_keep_alive(req.headers_mut());
    req.headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_static("b"));
    let (parts, body) = req.into_parts();
    let head = crate::upstream::wire::OutgoingHead::from_parts(&parts);
    let resp = conn.send(&head, body).await.map_err(|f| f.error)?;
    assert_eq!(resp.status, 200);
    let body = conn.attach(resp.body);
    body.collect().await.expect("body");
    Ok(reused)
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn closed(metrics: &crate::metrics::Metrics, reason: &str) -> u64 {
    let needle = format!("reason=\"{reason}\"");
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with("kaproxy_upstream_connections_closed_total") && l.contains(&needle))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn reuses_a_connection_within_its_deadline() {
    let backend = start_demo(demo(5000, StaleReuse::CloseIdle)).await;
    let (pool, _m) = real_pool(backend.addr(), cfg());
    assert!(!get(&pool).await.unwrap());
    assert!(
        get(&pool).await.unwrap(),
        "second request reuses the pooled connection"
    );
    assert_eq!(backend.stats().connections_accepted, 1);
    assert_eq!(pool.learned_timeout(), Some(Duration::from_secs(5)));
}

#[tokio::test]
async fn sweep_closes_idle_connections_before_the_backend_does() {
    // Backend keep-alive 2 s (advertised as timeout=2); kaproxy's deadline is 2 s - 1.5 s.
    let backend = start_demo(demo(2000, StaleReuse::CloseIdle)).await;
    let mut c = cfg();
    c.safety_margin = Duration::from_millis(1500);
    let (pool, metrics) = real_pool(backend.addr(), c);
    get(&pool).await.unwrap();
    assert_eq!(pool.idle_count(), 1);
    wait_until("the sweep to close the idle connection", || {
        pool.idle_count() == 0
    })
    .await;
    assert_eq!(closed(&metrics, "learned_timeout"), 1);
    assert_eq!(closed(&metrics, "server_close"), 0);
    // The backend saw kaproxy's FIN, not its own timer.
    wait_until("the backend to see the close", || {
        backend.stats().connections_open == 0
    })
    .await;
    assert_eq!(backend.stats().idle_closes, 0);
}

#[tokio::test]
async fn a_connection_the_backend_closed_is_never_handed_out() {
    // A naive pool (deadline 9 s) in front of a backend that closes after 300 ms: the check
    // at checkout must still keep the dead connection out of use.
    let backend = start_demo(demo(300, StaleReuse::CloseIdle)).await;
    let mut c = cfg();
    c.learn_keep_alive = false;
    c.keepalive_timeout = Duration::from_secs(10);
    c.idle_timeout = Duration::from_secs(9);
    c.safety_margin = Duration::ZERO;
    let (pool, metrics) = real_pool(backend.addr(), c);
    get(&pool).await.unwrap();
    wait_until("the backend's idle close", || {
        backend.stats().idle_closes == 1
    })
    .await;
    // Its FIN woke the sweep, which closed it as it came in.
    wait_until("the sweep to see the FIN", || pool.idle_count() == 0).await;
    assert_eq!(closed(&metrics, "server_close"), 1);
    assert!(
        !get(&pool).await.unwrap(),
        "a fresh connection, not the dead one"
    );
    assert_eq!(pool.observed_timeout(), None, "learning is off");
}

#[tokio::test]
async fn max_requests_retires_the_connection() {
    let backend = start_demo(demo(5000, StaleReuse::CloseIdle)).await;
    let mut c = cfg();
    c.max_requests_per_connection = 2;
    let (pool, metrics) = real_pool(backend.addr(), c);
    for _ in 0..4 {
        get(&pool).await.unwrap();
    }
    assert_eq!(backend.stats().connections_accepted, 2);
    assert_eq!(closed(&metrics, "max_requests"), 2);
}

#[tokio::test]
async fn backend_max_from_keep_alive_header_is_honoured() {
    // Apache MaxKeepAliveRequests 2: max=2 then max=1, then the third gets Connection: close.
    let mut d = demo(5000, StaleReuse::CloseIdle);
    d.max_keepalive_requests = 2;
    let backend = start_demo(d).await;
    let (pool, metrics) = real_pool(backend.addr(), cfg());
    for _ in 0..6 {
        get(&pool).await.unwrap();
    }
    assert_eq!(backend.stats().connections_accepted, 2);
    assert_eq!(closed(&metrics, "max_requests"), 2);
    assert_eq!(closed(&metrics, "error"), 0);
}

#[tokio::test]
async fn a_request_waiting_for_a_slot_takes_a_connection_coming_back_idle() {
    let backend = start_demo(demo(5000, StaleReuse::CloseIdle)).await;
    let mut c = cfg();
    c.max_connections_per_server = 1;
    c.max_idle_per_server = 1;
    c.acquire_timeout = Duration::from_secs(5);
    let (pool, _m) = real_pool(backend.addr(), c);
    get(&pool).await.unwrap();
    // The only slot is busy with `held`; a second request has to wait for it.
    let held = pool.acquire().await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let conn = pool.acquire().await;
            (conn.map(|c| c.is_reused()), started.elapsed())
        })
    };
    wait_until("the second request waits for the slot", || {
        pool.waiting_for_slot() == 1
    })
    .await;
    held.release();
    let (reused, waited) = waiter.await.unwrap();
    assert!(
        reused.unwrap(),
        "the waiter got the connection that came back idle"
    );
    assert!(
        waited < Duration::from_secs(2),
        "waited {waited:?}, not the acquire_timeout"
    );
    assert_eq!(backend.stats().connections_accepted, 1);
}
