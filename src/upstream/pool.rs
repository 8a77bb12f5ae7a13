//! Owns the keep-alive-aware upstream connection pool: one [`Pool`] per backend and worker,
//! whose idle connections always expire on kaproxy's side before the backend's keep-alive
//! timer fires.
//!
//! The rule (README, "How the upstream pool keeps the promise"): a pooled connection's idle
//! deadline is the earliest of `last_used + idle_timeout`, `last_used + (keep-alive timeout −
//! safety_margin)` and `born + max_lifetime`. A connection past its deadline, or whose peer
//! already closed it (checked when it comes back and before it is handed out, see
//! [`crate::upstream::connect::Connection`]), is never handed out; a sweep task closes expired
//! idle connections so that kaproxy, not the backend, closes, and is woken by a backend's FIN
//! on an idle connection, so that it sees the close as it happens.
//!
//! Where the keep-alive timeout comes from, per server and shared by the workers' pools
//! ([`Learned`]; README, "Where a deadline comes from"), first that applies:
//! 1. **header** — what the backend last advertised in `Keep-Alive: timeout=N`: its own word.
//! 2. **observed** — the shortest idle time at which the backend was seen to close one of
//!    these connections (by the sweep as its FIN comes in, at the check before reuse, or as a
//!    reused connection failed). Most servers send no header (nginx, gunicorn, Go, Jetty), and
//!    even Apache closes early when busy; a close is the backend showing its real timeout, or
//!    less, so the shortest one is safe. It is raised only on evidence: now and then
//!    ([`PROBE_INTERVAL`]) one connection that reached the observed deadline is kept, never
//!    handed out, until the backend closes it (its age is then the timeout, higher or not) or
//!    until the configured deadline (then the backend keeps connections at least that long,
//!    and the observation is dropped). A backend restarted with a longer timeout, or a mass
//!    close at a restart that taught a too-short one, is so found out within a probe.
//! 3. **config** — `keepalive_timeout`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Wake, Waker};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::PoolConfig;
use crate::error::RequestError;
use crate::metrics::{BackendMetrics, CloseReason, KeepAliveSource};
use crate::upstream::connect::{Connection, Connector, Http1};
use crate::upstream::keep_alive::KeepAliveHint;
use crate::upstream::tls::UpstreamTls;

/// One pooled connection and what kaproxy knows of it.
struct Entry<T> {
    id: u64,
    conn: T,
    born: Instant,
    last_used: Instant,
    requests: u32,
    /// Requests the backend still accepts on it (`Keep-Alive: max=` of the last response).
    remaining: Option<u32>,
    _permit: OwnedSemaphorePermit,
}

impl<T: Connection> Entry<T> {
    fn is_closed(&mut self) -> bool {
        self.conn.is_closed()
    }
}

/// The pool of connections to one backend address.
pub struct Pool<C: Connector = Http1> {
    connector: C,
    addr: SocketAddr,
    cfg: PoolConfig,
    idle: Mutex<Vec<Entry<C::Conn>>>,
    permits: Arc<Semaphore>,
    /// What the backend advertised, shared with the other workers' pools to it.
    learned: Arc<Learned>,
    /// This pool's share of `kaproxy_upstream_connections_idle` (the gauge sums the pools of
    /// every worker).
    published_idle: std::sync::atomic::AtomicI64,
    next_id: AtomicU64,
    sweep: Arc<Notify>,
    /// Told when a connection goes back to idle, for requests waiting at
    /// `max_connections_per_server` (idle connections hold their slot).
    returned: Notify,
    /// Requests waiting in [`Pool::wait_for_slot`] now.
    waiting: std::sync::atomic::AtomicUsize,
    sweeper: Mutex<Option<AbortHandle>>,
    /// Wakes the sweep (`sweep`) when something happens on an idle connection (a FIN).
    sweep_waker: Waker,
    /// The connection kept past the observed deadline to find out whether the backend's
    /// timeout went up; never handed out ([`PROBE_INTERVAL`]).
    probe: Mutex<Option<Probe<C::Conn>>>,
    metrics: Arc<BackendMetrics>,
}

/// The connection kept to find out the backend's timeout, and when it was last seen open.
struct Probe<T> {
    conn: Entry<T>,
    seen_open: Instant,
}

/// How often the sweep looks at a probe: a close is dated no later than this after it
/// happened, and never later than it happened (the probe's idle time when last seen open), so
/// a missed wake-up can only make the observed timeout shorter, never longer.
const PROBE_LOOK_EVERY: Duration = Duration::from_millis(100);

/// How often one connection per server is let idle past the observed keep-alive timeout
/// (module doc): a probe costs one connection held unused for at most the configured
/// deadline, and a too-short observation costs reuse until the next probe.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// Wakes a pool's sweep task.
struct SweepWake(Arc<Notify>);

impl Wake for SweepWake {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// What kaproxy learned of one backend's keep-alive, from its `Keep-Alive` header and from
/// its closes, shared by the pools of every worker to that backend (README, "Workers").
pub struct Learned {
    /// The advertised keep-alive timeout in ms (0: none learned yet).
    timeout_ms: AtomicU64,
    /// The shortest idle time in ms at which the backend was seen to close (0: none).
    observed_ms: AtomicU64,
    /// The probe of the observed timeout, across workers: one at a time.
    probe: Mutex<ProbeTimes>,
    /// The timeout and source last published (metric, log).
    published: Mutex<Option<(Duration, KeepAliveSource)>>,
    /// Wakes every sweep when it changes, since deadlines move with it.
    changed: Notify,
    /// While nothing is known of the backend's timeout and a probe runs: the probe's last use
    /// plus the safety margin, in µs since `epoch` (0: no such probe). A connection last used
    /// before it is not reused: the probe has not shown the backend keeps one that long.
    unproven_before_us: AtomicU64,
    epoch: Instant,
}

impl Default for Learned {
    fn default() -> Self {
        Learned {
            timeout_ms: AtomicU64::new(0),
            observed_ms: AtomicU64::new(0),
            probe: Mutex::default(),
            published: Mutex::new(None),
            changed: Notify::new(),
            unproven_before_us: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Learned {
    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64 + 1
    }
}

#[derive(Default)]
struct ProbeTimes {
    running: bool,
    /// No probe starts before this.
    next: Option<Instant>,
    /// The backend has shown something of its timeout: a close, or a probe that outlived the
    /// configured deadline. Until then, connections coming back idle start probes.
    settled: bool,
    /// The shortest close (ms) seen while the probe runs: the probe cannot raise the observed
    /// timeout above it (a backend whose timer is coarse closes some connections later than
    /// others; the earliest is what holds).
    shortest_meanwhile: Option<u64>,
}

/// How a probe of the observed timeout ended.
enum ProbeEnd {
    /// The backend closed it after this idle time: its timeout now.
    Closed(Duration),
    /// It stayed open to the configured deadline: the observation no longer holds.
    Outlived,
    /// kaproxy needed it gone (shutdown, relief): nothing learned.
    Abandoned,
}

impl Pool<Http1> {
    /// A pool of real HTTP/1.1 connections; needs a tokio runtime (it starts its sweep task).
    pub fn new(addr: SocketAddr, cfg: PoolConfig, metrics: Arc<BackendMetrics>) -> Arc<Self> {
        let connector = Http1::new(None, metrics.clone());
        Pool::with_connector(addr, cfg, metrics, connector)
    }

    /// One worker's pool to a backend: its sweep runs on `runtime` (the worker's, where its
    /// connections live), and what it learns of the backend is `learned`, shared.
    pub fn for_worker(
        addr: SocketAddr,
        cfg: PoolConfig,
        metrics: Arc<BackendMetrics>,
        tls: Option<UpstreamTls>,
        learned: Arc<Learned>,
        runtime: &tokio::runtime::Handle,
    ) -> Arc<Self> {
        let connector = Http1::new(tls, metrics.clone());
        Pool::build(addr, cfg, metrics, connector, learned, runtime)
    }

    /// How this pool opens connections (the tunnel and the health probes open theirs the same
    /// way, TLS included).
    pub fn connector(&self) -> &Http1 {
        &self.connector
    }
}

impl<C: Connector> Pool<C> {
    /// A pool that opens its connections with `connector`.
    pub fn with_connector(
        addr: SocketAddr,
        cfg: PoolConfig,
        metrics: Arc<BackendMetrics>,
        connector: C,
    ) -> Arc<Self> {
        let runtime = tokio::runtime::Handle::current();
        Pool::build(addr, cfg, metrics, connector, Arc::default(), &runtime)
    }

    fn build(
        addr: SocketAddr,
        cfg: PoolConfig,
        metrics: Arc<BackendMetrics>,
        connector: C,
        learned: Arc<Learned>,
        runtime: &tokio::runtime::Handle,
    ) -> Arc<Self> {
        let sweep = Arc::new(Notify::new());
        let sweep_waker = Waker::from(Arc::new(SweepWake(sweep.clone())));
        let pool = Arc::new(Pool {
            connector,
            addr,
            permits: Arc::new(Semaphore::new(cfg.max_connections_per_server)),
            cfg,
            idle: Mutex::new(Vec::new()),
            learned,
            published_idle: std::sync::atomic::AtomicI64::new(0),
            next_id: AtomicU64::new(1),
            sweep,
            returned: Notify::new(),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            sweeper: Mutex::new(None),
            sweep_waker,
            probe: Mutex::new(None),
            metrics,
        });
        pool.publish_keepalive();
        let task = runtime.spawn(sweep_loop(Arc::downgrade(&pool), pool.sweep.clone()));
        *crate::sync::lock(&pool.sweeper) = Some(task.abort_handle());
        pool
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Arc<BackendMetrics> {
        &self.metrics
    }

    /// Number of open connections (idle and busy).
    pub fn open_count(&self) -> usize {
        self.cfg.max_connections_per_server - self.permits.available_permits()
    }

    /// Requests waiting for a slot at `max_connections_per_server` now.
    pub fn waiting_for_slot(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Number of idle pooled connections.
    pub fn idle_count(&self) -> usize {
        crate::sync::lock(&self.idle).len()
    }

    /// The keep-alive timeout the backend advertised last, if any.
    pub fn learned_timeout(&self) -> Option<Duration> {
        match self.learned.timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The shortest idle time at which the backend was seen to close, if it was.
    pub fn observed_timeout(&self) -> Option<Duration> {
        match self.learned.observed_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The backend's keep-alive timeout as kaproxy believes it now, and where it comes from
    /// (module doc: header, else observed, else config).
    pub fn keepalive(&self) -> (Duration, KeepAliveSource) {
        if self.cfg.learn_keep_alive {
            if let Some(t) = self.learned_timeout() {
                return (t, KeepAliveSource::Header);
            }
            if let Some(t) = self.observed_timeout() {
                return (t.min(self.cfg.keepalive_timeout), KeepAliveSource::Observed);
            }
        }
        (self.cfg.keepalive_timeout, KeepAliveSource::Config)
    }

    /// The backend's keep-alive timeout as kaproxy believes it now.
    pub fn effective_keepalive(&self) -> Duration {
        self.keepalive().0
    }

    /// When an idle connection last used at `last_used` and born at `born` must be gone, and
    /// which limit decides it.
    fn deadline(&self, born: Instant, last_used: Instant) -> (Instant, CloseReason) {
        let (keepalive, source) = self.keepalive();
        if source == KeepAliveSource::Config {
            let unproven = self.learned.unproven_before_us.load(Ordering::Relaxed);
            if unproven != 0 && self.learned.micros(last_used) < unproven {
                return (last_used, CloseReason::LearnedTimeout);
            }
        }
        self.deadline_with(keepalive, born, last_used)
    }

    /// [`Pool::deadline`] for a keep-alive timeout of `keepalive`.
    fn deadline_with(
        &self,
        keepalive: Duration,
        born: Instant,
        last_used: Instant,
    ) -> (Instant, CloseReason) {
        let by_idle = last_used + self.cfg.idle_timeout;
        let by_keepalive = last_used + keepalive.saturating_sub(self.cfg.safety_margin);
        let by_lifetime = born + self.cfg.max_lifetime;
        let mut best = (by_idle, CloseReason::Idle);
        if by_keepalive < best.0 {
            best = (by_keepalive, CloseReason::LearnedTimeout);
        }
        if by_lifetime < best.0 {
            best = (by_lifetime, CloseReason::Lifetime);
        }
        best
    }

    /// A reusable idle connection if there is one, else a new connection.
    pub async fn acquire(self: &Arc<Self>) -> Result<PooledConn<C>, RequestError> {
        if let Some(conn) = self.take_idle(Instant::now()) {
            self.metrics.reused.inc();
            debug!(server = %self.addr, conn = conn.id, age_ms = conn.born.elapsed().as_millis() as u64,
                idle_ms = conn.last_used.elapsed().as_millis() as u64, requests = conn.requests,
                "pool: reusing idle connection");
            return Ok(PooledConn::new(conn, self.clone(), true));
        }
        // Boxed: connecting is the rare path, and its state (TCP connect, handshake) would
        // otherwise enlarge the future of every request, which is moved around per request.
        Box::pin(self.connect()).await
    }

    /// Always a new connection (the retry after a reused connection failed).
    pub async fn acquire_fresh(self: &Arc<Self>) -> Result<PooledConn<C>, RequestError> {
        Box::pin(self.connect()).await
    }

    /// Pops the most recently used idle connection that is still safe to reuse, closing the
    /// ones found dead or expired on the way.
    fn take_idle(&self, now: Instant) -> Option<Entry<C::Conn>> {
        loop {
            let mut conn = {
                let mut idle = crate::sync::lock(&self.idle);
                let conn = idle.pop();
                self.publish_idle(idle.len());
                conn?
            };
            if conn.is_closed() {
                self.observe_close(now - conn.last_used);
                self.close(conn, CloseReason::ServerClose);
                continue;
            }
            let (deadline, reason) = self.deadline(conn.born, conn.last_used);
            if now >= deadline {
                self.close(conn, reason);
                continue;
            }
            return Some(conn);
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<PooledConn<C>, RequestError> {
        let addr = self.addr;
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match self.wait_for_slot().await? {
                Slot::New(permit) => permit,
                Slot::Idle(conn) => return Ok(conn),
            },
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = self.connector.connect(addr, &self.cfg, id).await?;
        self.metrics.opened.inc();
        let now = Instant::now();
        debug!(server = %addr, conn = id, "pool: opened new connection");
        let entry = Entry {
            id,
            conn,
            born: now,
            last_used: now,
            requests: 0,
            remaining: None,
            _permit: permit,
        };
        Ok(PooledConn::new(entry, self.clone(), false))
    }

    /// A slot of `max_connections_per_server` for a connection the pool does not keep (an
    /// `Upgrade` tunnel, held for the tunnel's life): a free one, else one an idle connection
    /// gives up (closed, reason `surplus`), else one waited for within `acquire_timeout`
    /// (then [`RequestError::AcquireTimeout`], a 503), as a pooled connection's would be.
    pub async fn unpooled_slot(self: &Arc<Self>) -> Result<OwnedSemaphorePermit, RequestError> {
        loop {
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                return Ok(permit);
            }
            if self.close_longest_idle(true) {
                continue;
            }
            match self.wait_for_slot().await? {
                Slot::New(permit) => return Ok(permit),
                Slot::Idle(mut conn) => {
                    if let Some(entry) = conn.conn.take() {
                        self.close(entry, CloseReason::Surplus);
                    }
                }
            }
        }
    }

    /// At `max_connections_per_server`: waits up to `acquire_timeout` for a free slot or for a
    /// connection coming back idle, whichever is first.
    async fn wait_for_slot(self: &Arc<Self>) -> Result<Slot<C>, RequestError> {
        /// Counts this request in `waiting` for as long as it waits.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        let deadline = Instant::now() + self.cfg.acquire_timeout;
        loop {
            let returned = self.returned.notified();
            tokio::select! {
                permit = self.permits.clone().acquire_owned() => {
                    return Ok(Slot::New(permit.expect("pool semaphore is never closed")));
                }
                _ = returned => {
                    if let Some(conn) = self.take_idle(Instant::now()) {
                        self.metrics.reused.inc();
                        return Ok(Slot::Idle(PooledConn::new(conn, self.clone(), true)));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(RequestError::AcquireTimeout {
                        addr: self.addr,
                        timeout: self.cfg.acquire_timeout,
                    });
                }
            }
        }
    }

    /// Takes back a connection whose response finished cleanly.
    fn release(self: &Arc<Self>, mut conn: Entry<C::Conn>, retire: Option<CloseReason>) {
        let closed = retire.is_none() && conn.is_closed();
        if retire.is_none() && !closed && !conn.conn.is_idle() {
            // Rare: the backend answered before the request body was all written. The rest
            // is written by a task of its own (the client's task has moved on), for at most
            // idle_timeout; then the connection comes back here.
            let pool = self.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(pool.cfg.idle_timeout, conn.conn.settle()).await {
                    Ok(true) => pool.release(conn, None),
                    _ => pool.close(conn, CloseReason::Error),
                }
            });
            return;
        }
        let now = Instant::now();
        conn.last_used = now;
        let reason = retire.or_else(|| {
            if closed {
                Some(CloseReason::ServerClose)
            } else if conn.requests >= self.cfg.max_requests_per_connection
                || conn.remaining == Some(0)
            {
                Some(CloseReason::MaxRequests)
            } else if now >= conn.born + self.cfg.max_lifetime {
                Some(CloseReason::Lifetime)
            } else {
                None
            }
        });
        if let Some(reason) = reason {
            self.close(conn, reason);
            return;
        }
        if self.keepalive().1 == KeepAliveSource::Config
            && self.start_probe(now, conn.born, conn.last_used)
        {
            // Nothing known of the backend's timeout yet: this one finds it out, unused.
            debug!(server = %self.addr, conn = conn.id, "pool: probing the backend's keep-alive timeout");
            conn.conn.detach(&self.sweep_waker);
            self.set_probe(conn);
            self.sweep.notify_one();
            return;
        }
        let mut idle = crate::sync::lock(&self.idle);
        if idle.len() >= self.cfg.max_idle_per_server {
            drop(idle);
            self.close(conn, CloseReason::Surplus);
            return;
        }
        let was_empty = idle.is_empty();
        conn.conn.detach(&self.sweep_waker);
        debug!(server = %self.addr, conn = conn.id, requests = conn.requests, "pool: connection back to idle");
        idle.push(conn);
        self.publish_idle(idle.len());
        drop(idle);
        self.returned.notify_one();
        // Deadlines grow with last use, so the sweeper's next wake-up only moves earlier when
        // the pool was empty.
        if was_empty {
            self.sweep.notify_one();
        }
    }

    fn close(&self, mut conn: Entry<C::Conn>, reason: CloseReason) {
        self.metrics.closed(reason);
        debug!(server = %self.addr, conn = conn.id, reason = reason.as_str(),
            age_ms = conn.born.elapsed().as_millis() as u64, requests = conn.requests,
            "pool: closing upstream connection");
        // TLS close_notify first; dropping it then closes the socket (FIN).
        conn.conn.close();
        drop(conn);
    }

    /// Learns the backend's keep-alive settings from a response.
    fn learn(&self, hint: &KeepAliveHint) {
        if !self.cfg.learn_keep_alive {
            return;
        }
        if let Some(timeout) = hint.timeout {
            let ms = timeout.as_millis().max(1) as u64;
            let old = self.learned.timeout_ms.swap(ms, Ordering::Relaxed);
            if old != ms {
                if timeout < self.cfg.keepalive_timeout {
                    warn!(server = %self.addr, learned = ?timeout, configured = ?self.cfg.keepalive_timeout,
                        "backend advertises a shorter keep-alive timeout than configured; using it");
                } else {
                    debug!(server = %self.addr, learned = ?timeout, "pool: learned keep-alive timeout");
                }
                self.keepalive_changed();
            }
        }
    }

    /// Learns from the backend closing a connection that had been idle `idle_for` (found by
    /// the sweep or the check before reuse, or a reused connection that failed): the
    /// observed timeout is the shortest such time (module doc).
    pub(crate) fn observe_close(&self, idle_for: Duration) {
        if !self.cfg.learn_keep_alive {
            return;
        }
        let ms = (idle_for.as_millis() as u64).max(1);
        {
            let mut probe = crate::sync::lock(&self.learned.probe);
            probe.settled = true;
            if probe.running {
                probe.shortest_meanwhile = Some(probe.shortest_meanwhile.map_or(ms, |s| s.min(ms)));
            }
        }
        let lowered = self
            .learned
            .observed_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                (old == 0 || ms < old).then_some(ms)
            })
            .is_ok();
        if lowered {
            debug!(server = %self.addr, idle_ms = ms, "pool: backend closed an idle connection");
            self.keepalive_changed();
        }
    }

    /// Deadlines move: wakes every worker's sweep, and publishes the timeout if it changed.
    fn keepalive_changed(&self) {
        self.publish_keepalive();
        self.learned.changed.notify_waiters();
        self.sweep.notify_one();
    }

    /// Sets `kaproxy_upstream_keepalive_timeout_seconds` and logs when the timeout this server
    /// is held to, or its source, changes.
    fn publish_keepalive(&self) {
        let now = self.keepalive();
        let mut published = crate::sync::lock(&self.learned.published);
        if *published == Some(now) {
            return;
        }
        let (timeout, source) = now;
        if published.is_some() {
            warn!(server = %self.addr, keepalive_timeout = ?timeout, source = source.as_str(),
                deadline = ?timeout.saturating_sub(self.cfg.safety_margin).min(self.cfg.idle_timeout),
                "backend keep-alive timeout changed");
        }
        *published = Some(now);
        self.metrics.keepalive_timeout(source, timeout);
    }

    /// Whether a connection should become the probe: one that reached the observed deadline
    /// (the configured one being later), or — while nothing is known of the backend's timeout
    /// (no header, no close seen) — one coming back idle, which is then never reused; when
    /// no probe runs (in any worker), the last ended [`PROBE_INTERVAL`] ago, and the probe
    /// leaves a connection for requests (`max_connections_per_server` > 1).
    fn start_probe(&self, now: Instant, born: Instant, last_used: Instant) -> bool {
        let source = self.keepalive().1;
        if !self.cfg.learn_keep_alive
            || source == KeepAliveSource::Header
            || self.cfg.max_connections_per_server < 2
            || crate::sync::lock(&self.probe).is_some()
        {
            return false;
        }
        let (configured, _) = self.deadline_with(self.cfg.keepalive_timeout, born, last_used);
        if configured <= now {
            return false;
        }
        let mut probe = crate::sync::lock(&self.learned.probe);
        if probe.running
            || probe.next.is_some_and(|next| now < next)
            || (source == KeepAliveSource::Config && probe.settled)
        {
            return false;
        }
        probe.running = true;
        probe.shortest_meanwhile = None;
        if source == KeepAliveSource::Config {
            let mark = self.learned.micros(last_used + self.cfg.safety_margin);
            self.learned
                .unproven_before_us
                .store(mark, Ordering::Relaxed);
        }
        true
    }

    /// A probe ended: what it showed becomes the observed timeout.
    fn end_probe(&self, now: Instant, end: ProbeEnd) {
        let shortest_meanwhile;
        {
            let mut probe = crate::sync::lock(&self.learned.probe);
            probe.running = false;
            shortest_meanwhile = probe.shortest_meanwhile.take();
            self.learned.unproven_before_us.store(0, Ordering::Relaxed);
            if matches!(end, ProbeEnd::Abandoned) {
                // Nothing learned: the next connection coming back may probe again.
                return;
            }
            probe.next = Some(now + PROBE_INTERVAL);
            probe.settled = true;
        }
        let observed = &self.learned.observed_ms;
        match end {
            ProbeEnd::Closed(idle) => {
                let ms = (idle.as_millis() as u64)
                    .max(1)
                    .min(shortest_meanwhile.unwrap_or(u64::MAX));
                debug!(server = %self.addr, idle_ms = ms, "pool: probe closed by the backend");
                observed.store(ms, Ordering::Relaxed);
            }
            ProbeEnd::Outlived => match shortest_meanwhile {
                // Outlived, but another connection closed sooner meanwhile: that holds.
                Some(ms) => observed.store(ms, Ordering::Relaxed),
                None => {
                    debug!(server = %self.addr, "pool: probe outlived the observed timeout");
                    observed.store(0, Ordering::Relaxed);
                }
            },
            ProbeEnd::Abandoned => unreachable!("returned above"),
        }
        self.keepalive_changed();
    }

    /// Sweeps the probe connection: ended when the backend closed it or it reached the
    /// configured deadline; else when to look again.
    fn sweep_probe(&self, now: Instant) -> Option<Instant> {
        let mut slot = crate::sync::lock(&self.probe);
        let probe = slot.as_mut()?;
        let conn = &mut probe.conn;
        let end = if conn.is_closed() {
            // It closed after it was last seen open: that idle time is proven.
            Some((
                ProbeEnd::Closed(probe.seen_open - conn.last_used),
                CloseReason::ServerClose,
            ))
        } else {
            let (deadline, reason) =
                self.deadline_with(self.cfg.keepalive_timeout, conn.born, conn.last_used);
            if now < deadline {
                probe.seen_open = now;
                conn.conn.detach(&self.sweep_waker);
                return Some(deadline.min(now + PROBE_LOOK_EVERY));
            }
            Some((ProbeEnd::Outlived, reason))
        };
        let conn = slot.take().expect("checked above").conn;
        // Out of the pool's idle connections (set_probe counted it in).
        self.metrics.idle.dec();
        drop(slot);
        if let Some((end, reason)) = end {
            self.end_probe(now, end);
            self.close(conn, reason);
        }
        None
    }

    /// Makes `conn` the probe: idle, and counted so in `kaproxy_upstream_connections_idle`,
    /// but never handed out.
    fn set_probe(&self, mut conn: Entry<C::Conn>) {
        conn.conn.detach(&self.sweep_waker);
        self.metrics.idle.inc();
        let seen_open = Instant::now();
        *crate::sync::lock(&self.probe) = Some(Probe { conn, seen_open });
    }

    /// Closes the probe connection, if there is one, learning nothing from it.
    fn abandon_probe(&self) -> bool {
        let Some(Probe { conn, .. }) = crate::sync::lock(&self.probe).take() else {
            return false;
        };
        self.metrics.idle.dec();
        self.end_probe(Instant::now(), ProbeEnd::Abandoned);
        self.close(conn, CloseReason::Surplus);
        true
    }

    /// Closes dead and expired idle connections; returns the next deadline to wake at.
    fn sweep_idle(&self, now: Instant) -> Option<Instant> {
        let all = std::mem::take(&mut *crate::sync::lock(&self.idle));
        let mut keep = Vec::with_capacity(all.len());
        let mut doomed = Vec::new();
        let mut next: Option<Instant> = None;
        for mut conn in all {
            if conn.is_closed() {
                self.observe_close(now - conn.last_used);
                doomed.push((conn, CloseReason::ServerClose));
                continue;
            }
            let (deadline, reason) = self.deadline(conn.born, conn.last_used);
            if now >= deadline {
                if reason == CloseReason::LearnedTimeout
                    && self.keepalive().1 == KeepAliveSource::Observed
                    && self.start_probe(now, conn.born, conn.last_used)
                {
                    debug!(server = %self.addr, conn = conn.id, "pool: probing the observed keep-alive timeout");
                    conn.conn.detach(&self.sweep_waker);
                    self.set_probe(conn);
                    continue;
                }
                doomed.push((conn, reason));
            } else {
                // Re-armed: the FIN that wakes the sweep for it may not have come yet.
                conn.conn.detach(&self.sweep_waker);
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
                keep.push(conn);
            }
        }
        if let Some(at) = self.sweep_probe(now) {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        {
            let mut idle = crate::sync::lock(&self.idle);
            // Connections released while we swept were pushed meanwhile; keep LIFO order
            // (older first).
            keep.append(&mut idle);
            *idle = keep;
            self.publish_idle(idle.len());
            for conn in idle.iter() {
                let (deadline, _) = self.deadline(conn.born, conn.last_used);
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        for (conn, reason) in doomed {
            self.close(conn, reason);
        }
        next
    }

    /// Moves `kaproxy_upstream_connections_idle` by the change in this pool's idle count.
    fn publish_idle(&self, now: usize) {
        let old = self.published_idle.swap(now as i64, Ordering::Relaxed);
        self.metrics.idle.inc_by(now as i64 - old);
    }

    /// Closes this pool's longest-idle connection (reason `surplus`), if it has one, the
    /// probe of the backend's timeout too when `probe_too`; see
    /// [`crate::upstream::backend::Backend::relieve`].
    pub fn close_longest_idle(&self, probe_too: bool) -> bool {
        if probe_too && self.abandon_probe() {
            return true;
        }
        let oldest = {
            let mut idle = crate::sync::lock(&self.idle);
            let oldest = (!idle.is_empty()).then(|| idle.remove(0));
            self.publish_idle(idle.len());
            oldest
        };
        match oldest {
            Some(conn) => {
                self.close(conn, CloseReason::Surplus);
                true
            }
            None => false,
        }
    }

    /// Closes every idle connection (shutdown).
    pub fn close_idle(&self) {
        self.abandon_probe();
        let all = std::mem::take(&mut *crate::sync::lock(&self.idle));
        self.publish_idle(0);
        for conn in all {
            self.close(conn, CloseReason::Idle);
        }
    }
}

impl<C: Connector> Drop for Pool<C> {
    fn drop(&mut self) {
        if let Some(task) = crate::sync::lock(&self.sweeper).take() {
            task.abort();
        }
    }
}

/// Wakes at the earliest idle deadline (or when told the pool changed) and sweeps. Holds the
/// pool only while sweeping, so dropping the pool ends the task.
async fn sweep_loop<C: Connector>(pool: Weak<Pool<C>>, notify: Arc<Notify>) {
    loop {
        let (next, learned) = match pool.upgrade() {
            Some(strong) => (strong.sweep_idle(Instant::now()), strong.learned.clone()),
            None => return,
        };
        let relearned = learned.changed.notified();
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = notify.notified() => {}
                    _ = relearned => {}
                }
            }
            None => {
                tokio::select! {
                    _ = notify.notified() => {}
                    _ = relearned => {}
                }
            }
        }
    }
}

/// What a request waiting at `max_connections_per_server` gets.
enum Slot<C: Connector> {
    New(OwnedSemaphorePermit),
    Idle(PooledConn<C>),
}

/// A connection checked out of a [`Pool`]. Dropped without being released, it is closed
/// with reason `error`.
pub struct PooledConn<C: Connector = Http1> {
    conn: Option<Entry<C::Conn>>,
    pool: Arc<Pool<C>>,
    reused: bool,
    /// How long it had idled when it was handed out (zero when new).
    idle_for: Duration,
    retire: Option<CloseReason>,
}

impl<C: Connector> PooledConn<C> {
    fn new(conn: Entry<C::Conn>, pool: Arc<Pool<C>>, reused: bool) -> Self {
        let idle_for = if reused {
            conn.last_used.elapsed()
        } else {
            Duration::ZERO
        };
        PooledConn {
            conn: Some(conn),
            pool,
            reused,
            idle_for,
            retire: None,
        }
    }

    /// The backend closed or reset this reused connection before answering: evidence of its
    /// keep-alive timeout, as a close found while idle is (the pool's module doc).
    pub fn closed_on_reuse(&self) {
        if self.reused {
            self.pool.observe_close(self.idle_for);
        }
    }

    /// Whether this connection had served a request before this one.
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    pub fn addr(&self) -> SocketAddr {
        self.pool.addr
    }

    fn conn(&self) -> &Entry<C::Conn> {
        self.conn.as_ref().expect("conn present until release")
    }

    /// Age of the connection and the number of requests it carried (this one included).
    pub fn age_and_requests(&self) -> (Duration, u32) {
        let c = self.conn();
        (c.born.elapsed(), c.requests)
    }

    /// What the response head said of the backend's keep-alive (its `Keep-Alive` header, and
    /// whether it closes this connection): learned for the server, and the connection retired
    /// when it is done for.
    pub(super) fn advertised(&mut self, hint: &KeepAliveHint, closing: bool) {
        self.pool.learn(hint);
        let conn = self.conn.as_mut().expect("conn present until release");
        let was_last = conn.remaining == Some(1);
        if hint.max.is_some() && self.pool.cfg.learn_keep_alive {
            conn.remaining = hint.max;
        }
        if closing {
            self.retire = Some(if was_last {
                CloseReason::MaxRequests
            } else {
                CloseReason::ServerClose
            });
        }
    }

    /// The live connection, and its request count to add this request to (the exchange).
    pub(super) fn connection(&mut self) -> (&mut C::Conn, &mut u32) {
        let entry = self.conn.as_mut().expect("conn present until release");
        (&mut entry.conn, &mut entry.requests)
    }

    /// The live connection while it is checked out, if it still is.
    pub(super) fn live(&mut self) -> Option<&mut C::Conn> {
        self.conn.as_mut().map(|e| &mut e.conn)
    }

    /// Closes the connection with `reason` once its response is done, instead of pooling it
    /// (e.g. a response whose framing was ambiguous).
    pub fn retire_after(&mut self, reason: CloseReason) {
        self.retire = Some(reason);
    }

    /// Gives the connection back after its response body ended cleanly.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.release(conn, self.retire);
        }
    }
}

impl<C: Connector> Drop for PooledConn<C> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool
                .close(conn, self.retire.unwrap_or(CloseReason::Error));
        }
    }
}

#[cfg(test)]
mod tests {
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
            [
                r#"kaproxy_upstream_keepalive_timeout_seconds{server="127.0.0.1:9",source="header"} 3.0"#
            ]
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
    use kaproxy_testkit::demo::{DemoBackend, DemoBackendConfig, StaleReuse};

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
        let resp = conn.send(req).await.map_err(|f| f.error)?;
        assert_eq!(resp.status(), 200);
        let body = conn.attach(resp.into_body());
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
            .find(|l| {
                l.starts_with("kaproxy_upstream_connections_closed_total") && l.contains(&needle)
            })
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
}
