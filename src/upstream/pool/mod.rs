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
//! Where the keep-alive timeout comes from (header, observed, config) and how the pool finds
//! it out is [`learn`]'s.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Wake, Waker};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::debug;

use crate::config::PoolConfig;
use crate::error::RequestError;
use crate::metrics::{BackendMetrics, CloseReason, KeepAliveSource};
use crate::upstream::connect::{Connection, Connector, Http1};
use crate::upstream::keep_alive::KeepAliveHint;
use crate::upstream::tls::UpstreamTls;

mod learn;

use learn::Probe;
pub use learn::{Learned, PROBE_INTERVAL};

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
    /// When the sweep wakes next ([`Learned::nanos`]; `u64::MAX`: not until told), set and read
    /// under the `idle` lock: a connection going idle wakes the sweep only when its deadline
    /// comes earlier, not on every release.
    sweep_at: AtomicU64,
    /// How many times the sweep ran (tests count its wake-ups).
    #[cfg(test)]
    sweeps: AtomicU64,
    /// Told when a connection goes back to idle, for requests waiting at
    /// `max_connections_per_server` (idle connections hold their slot).
    returned: Notify,
    /// Requests waiting in [`Pool::wait_for_slot`] now.
    waiting: std::sync::atomic::AtomicUsize,
    /// Requests this pool is serving now: connecting (or waiting for a slot) or holding a
    /// checked-out connection ([`InFlight`], [`PooledConn`]); what `least_request` balances on.
    in_flight: AtomicUsize,
    /// Set while the server is drained (the admin API): no connection goes back to idle.
    draining: std::sync::atomic::AtomicBool,
    sweeper: Mutex<Option<AbortHandle>>,
    /// Wakes the sweep (`sweep`) when something happens on an idle connection (a FIN).
    sweep_waker: Waker,
    /// The connection kept past the observed deadline to find out whether the backend's
    /// timeout went up; never handed out ([`PROBE_INTERVAL`]).
    probe: Mutex<Option<Probe<C::Conn>>>,
    metrics: Arc<BackendMetrics>,
}

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
            sweep_at: AtomicU64::new(u64::MAX),
            #[cfg(test)]
            sweeps: AtomicU64::new(0),
            returned: Notify::new(),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
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

    /// Whether an idle connection is pooled now (without taking the idle list's lock: the
    /// count last published; the balancer asks on every pick).
    pub fn has_idle(&self) -> bool {
        self.published_idle.load(Ordering::Relaxed) > 0
    }

    /// Requests in flight through this pool now: connecting, waiting for a slot, or on a
    /// checked-out connection until it is released or closed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request in [`Pool::in_flight`] until the guard is dropped.
    pub fn track_in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
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
        // In flight from now on, so that the balancer sees a slow connect as load.
        let _connecting = self.track_in_flight();
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
            if self.is_draining() {
                Some(CloseReason::Drained)
            } else if closed {
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
        // Under the lock, as `drain` empties the list under it: a connection released while
        // the server is being drained is either emptied by `drain` or closed here.
        if self.is_draining() {
            drop(idle);
            self.close(conn, CloseReason::Drained);
            return;
        }
        if idle.len() >= self.cfg.max_idle_per_server {
            drop(idle);
            self.close(conn, CloseReason::Surplus);
            return;
        }
        let wake = self.sweep_by(self.deadline(conn.born, conn.last_used).0);
        conn.conn.detach(&self.sweep_waker);
        debug!(server = %self.addr, conn = conn.id, requests = conn.requests, "pool: connection back to idle");
        idle.push(conn);
        self.publish_idle(idle.len());
        drop(idle);
        self.returned.notify_one();
        if wake {
            self.sweep.notify_one();
        }
    }

    /// Whether the sweep must be woken to be at `deadline` (it is set to wake at the latest
    /// then); called under the `idle` lock, where the sweep sets its next wake-up.
    fn sweep_by(&self, deadline: Instant) -> bool {
        let at = self.learned.nanos(deadline);
        if at < self.sweep_at.load(Ordering::Relaxed) {
            self.sweep_at.store(at, Ordering::Relaxed);
            true
        } else {
            false
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

    /// Closes dead and expired idle connections; returns the next deadline to wake at. With
    /// no connection left to wake for, and `wait_empty` (the timer woke the sweep, not a
    /// release), none; else, while requests come and go, a pool found empty wakes at the
    /// deadline a connection released now would have (what [`Pool::release`] compares a
    /// release's deadline with), so that releases into a pool emptied and refilled by a steady
    /// load do not wake the sweep each time.
    fn sweep_idle(&self, now: Instant, wait_empty: bool) -> Option<Instant> {
        #[cfg(test)]
        self.sweeps.fetch_add(1, Ordering::Relaxed);
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
            if next.is_none() && !wait_empty {
                next = Some(self.deadline(now, now).0);
            }
            let at = next.map_or(u64::MAX, |at| self.learned.nanos(at));
            self.sweep_at.store(at, Ordering::Relaxed);
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
        self.close_all_idle(CloseReason::Idle);
    }

    fn close_all_idle(&self, reason: CloseReason) {
        self.abandon_probe();
        let all = std::mem::take(&mut *crate::sync::lock(&self.idle));
        self.publish_idle(0);
        for conn in all {
            self.close(conn, reason);
        }
    }

    /// The server is drained (or enabled again, `false`): while drained, idle connections
    /// are closed (reason `drained`) and connections coming back from their request are closed
    /// instead of pooled; the requests on them finish as they would.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::SeqCst);
        if draining {
            self.close_all_idle(CloseReason::Drained);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

impl<C: Connector> Drop for Pool<C> {
    /// The last holder let go (every request on it finished): a pool a reload or `resolve`
    /// replaced. Its idle connections are closed here, counted, rather than dropped unseen.
    fn drop(&mut self) {
        self.close_all_idle(CloseReason::Removed);
        if let Some(task) = crate::sync::lock(&self.sweeper).take() {
            task.abort();
        }
    }
}

/// Wakes at the earliest idle deadline (or when told the pool changed) and sweeps. Holds the
/// pool only while sweeping, so dropping the pool ends the task.
async fn sweep_loop<C: Connector>(pool: Weak<Pool<C>>, notify: Arc<Notify>) {
    // This wake-up is the timer's, not a release's or a FIN's: a pool found empty now waits
    // for a release.
    let mut idle_round = false;
    loop {
        let (next, learned) = match pool.upgrade() {
            Some(strong) => {
                let next = strong.sweep_idle(Instant::now(), idle_round);
                (next, strong.learned.clone())
            }
            None => return,
        };
        let relearned = learned.changed.notified();
        idle_round = false;
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => idle_round = true,
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

/// One request counted in its pool's [`Pool::in_flight`] while it connects or waits for a
/// slot; dropping it ends the count. A [`PooledConn`] counts itself, through the pool it holds.
#[derive(Debug)]
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<C: Connector> PooledConn<C> {
    fn new(conn: Entry<C::Conn>, pool: Arc<Pool<C>>, reused: bool) -> Self {
        let idle_for = if reused {
            conn.last_used.elapsed()
        } else {
            Duration::ZERO
        };
        // In flight until dropped (released or closed): see `Drop`.
        pool.in_flight.fetch_add(1, Ordering::Relaxed);
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
        self.pool.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
