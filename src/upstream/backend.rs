//! Owns what kaproxy knows of one backend server: its address and weight, its connection
//! pools (one per worker, see [`crate::workers`]; through them its metrics), its health
//! state — the passive verdict
//! (consecutive failures, cool-down) and the active one (written by the probes of
//! [`crate::upstream::health`]) — what the admin API set on it (drained, a weight), and its
//! `slow_start` ramp after it comes back. `kaproxy_server_up` is written here only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::PoolConfig;
use crate::metrics::{BackendMetrics, KeepAliveSource};
use crate::upstream::pool::{Learned, Pool};
use crate::upstream::tls::UpstreamTls;

/// One upstream server: the balancer hands it out, the proxy sends through the pool of the
/// worker it runs on and reports outcomes to it, the health probes write its active verdict.
pub struct Backend {
    pub addr: SocketAddr,
    /// As configured; at least 1.
    configured_weight: u32,
    /// The weight in force: the configured one, or the one the admin API set (at least 1).
    weight: AtomicU32,
    /// Drained by the admin API: the balancer hands it no new request.
    drained: AtomicBool,
    /// The group's `slow_start` (zero: no ramp).
    slow_start: Duration,
    /// When the current ramp began, in nanoseconds from `base` (negative when it began
    /// before this backend was built: a ramp carried over a reload), or [`NO_RAMP`].
    ramp_start: AtomicI64,
    /// Origin of `ramp_start`.
    base: Instant,
    pub health: BackendHealth,
    /// One pool per worker, in worker order (nginx keeps its keepalive cache per worker too);
    /// they share what they learn of the backend and its metrics.
    pools: Box<[Arc<Pool>]>,
    /// The group's pool settings as configured (each worker's pool has its share).
    config: PoolConfig,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("addr", &self.addr)
            .field("weight", &self.weight())
            .field("drained", &self.is_drained())
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// A backend sending through one `pool` (whose address and settings it takes), up until
    /// told otherwise.
    pub fn new(weight: u32, health: BackendHealth, pool: Arc<Pool>) -> Backend {
        let config = pool.config().clone();
        Backend::with_pools(weight, health, config, vec![pool])
    }

    /// A backend with one pool per worker (at least one), configured as `config` says.
    pub fn with_pools(
        weight: u32,
        health: BackendHealth,
        config: PoolConfig,
        pools: Vec<Arc<Pool>>,
    ) -> Backend {
        assert!(!pools.is_empty(), "a backend has at least one pool");
        let backend = Backend {
            addr: pools[0].addr(),
            configured_weight: weight.max(1),
            weight: AtomicU32::new(weight.max(1)),
            drained: AtomicBool::new(false),
            slow_start: Duration::ZERO,
            ramp_start: AtomicI64::new(NO_RAMP),
            base: Instant::now(),
            health,
            pools: pools.into(),
            config,
        };
        backend.publish(Instant::now());
        backend
    }

    /// The weight in force (configured, or set by the admin API).
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// The weight the configuration gives it.
    pub fn configured_weight(&self) -> u32 {
        self.configured_weight
    }

    /// The same backend, ramping over `slow_start` when it comes back (the group's key).
    pub fn with_slow_start(mut self, slow_start: Duration) -> Backend {
        self.slow_start = slow_start;
        self
    }

    /// The share the balancer gives it now, in thousandths of a unit of weight: its weight,
    /// times [`Backend::ramp`] while it ramps.
    pub fn effective_weight(&self, now: Instant) -> u64 {
        let full = u64::from(self.weight()) * WEIGHT_SCALE;
        match self.ramp(now) {
            Some(fraction) => ((full as f64 * fraction) as u64).max(1),
            None => full,
        }
    }

    /// While it ramps after coming back (`slow_start`, as nginx's and HAProxy's do): the share
    /// of its weight it has now, `elapsed / slow_start` but at least [`SLOW_START_FLOOR`] so
    /// that it gets a few requests from the first moment. None once at full weight (or with
    /// no `slow_start`).
    pub fn ramp(&self, now: Instant) -> Option<f64> {
        let start = self.ramp_start.load(Ordering::Relaxed);
        if start == NO_RAMP || self.slow_start.is_zero() {
            return None;
        }
        let elapsed = self.nanos(now).saturating_sub(start);
        let total = i64::try_from(self.slow_start.as_nanos()).unwrap_or(i64::MAX);
        if elapsed >= total {
            // Done: later picks skip the arithmetic. Lost to a newer ramp only if one began
            // in between, which then stays.
            let _ = self.ramp_start.compare_exchange(
                start,
                NO_RAMP,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return None;
        }
        Some((elapsed.max(0) as f64 / total as f64).max(SLOW_START_FLOOR))
    }

    /// Starts a ramp from now (it came back up, or was enabled), with `slow_start` set.
    fn start_ramp(&self, why: &str) {
        if self.slow_start.is_zero() {
            return;
        }
        self.ramp_start
            .store(self.nanos(Instant::now()), Ordering::Relaxed);
        info!(server = %self.addr, slow_start = ?self.slow_start, why,
            "slow start: server ramps to its full weight");
    }

    fn nanos(&self, now: Instant) -> i64 {
        let (later, earlier, sign) = if now >= self.base {
            (now, self.base, 1)
        } else {
            (self.base, now, -1)
        };
        sign * i64::try_from((later - earlier).as_nanos()).unwrap_or(i64::MAX)
    }

    /// Sets the weight in force (the admin API); `weight` at least 1. Returns the old one.
    pub fn set_weight(&self, weight: u32) -> u32 {
        self.weight.swap(weight.max(1), Ordering::Relaxed)
    }

    /// Whether the admin API drained it (no new requests).
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::SeqCst)
    }

    /// Drains it (HAProxy's `set server ... state drain`): the balancer hands it no new
    /// request, requests in flight finish, and its idle connections are closed, as are the
    /// connections that come back from their last request (reason `drained`). Returns whether
    /// it was not drained already.
    pub fn drain(&self) -> bool {
        let changed = !self.drained.swap(true, Ordering::SeqCst);
        for pool in self.pools.iter() {
            pool.set_draining(true);
        }
        changed
    }

    /// Ends a drain: it takes requests again, ramping over `slow_start`. Returns whether it
    /// was drained.
    pub fn enable(&self) -> bool {
        let changed = self.drained.swap(false, Ordering::SeqCst);
        for pool in self.pools.iter() {
            pool.set_draining(false);
        }
        if changed {
            self.start_ramp("enabled");
        }
        changed
    }

    /// Takes over what the admin API set on the same server in the previous configuration
    /// (reload): drained stays drained; a weight set by the API stays while the configured
    /// weight is unchanged (an edited weight in the file wins).
    pub fn inherit_admin(&self, previous: &Backend) {
        if previous.is_drained() {
            self.drain();
        }
        if previous.configured_weight == self.configured_weight {
            self.set_weight(previous.weight());
        }
        // A ramp under way goes on from where it was.
        let start = previous.ramp_start.load(Ordering::Relaxed);
        if start != NO_RAMP {
            let began = previous.base + Duration::from_nanos(start.max(0) as u64);
            let began = began
                .checked_sub(Duration::from_nanos(start.min(0).unsigned_abs()))
                .unwrap_or(began);
            self.ramp_start.store(self.nanos(began), Ordering::Relaxed);
        }
    }

    /// The pool of the worker the caller runs on.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pools[crate::workers::index() % self.pools.len()]
    }

    /// Every worker's pool.
    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    /// The pool settings as configured for the group.
    pub fn pool_config(&self) -> &PoolConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<BackendMetrics> {
        self.pools[0].metrics()
    }

    /// Idle connections in all workers' pools.
    pub fn idle_count(&self) -> usize {
        self.pools.iter().map(|p| p.idle_count()).sum()
    }

    /// Requests in flight to this server now, every worker's together (connecting, waiting
    /// for a slot, or on a checked-out connection); what `least_request` compares.
    pub fn in_flight(&self) -> usize {
        self.pools.iter().map(|p| p.in_flight()).sum()
    }

    /// Whether the caller's worker has an idle connection to this server pooled, i.e. a
    /// request sent there now would reuse a warm connection.
    pub fn has_idle_here(&self) -> bool {
        self.pool().has_idle()
    }

    /// Open connections (idle and busy) in all workers' pools.
    pub fn open_count(&self) -> usize {
        self.pools.iter().map(|p| p.open_count()).sum()
    }

    /// The keep-alive timeout the backend advertised last (shared by the workers' pools).
    pub fn learned_timeout(&self) -> Option<Duration> {
        self.pools[0].learned_timeout()
    }

    /// The backend's keep-alive timeout as kaproxy believes it now.
    pub fn effective_keepalive(&self) -> Duration {
        self.pools[0].effective_keepalive()
    }

    /// The shortest idle time at which this server was seen to close a connection, if any.
    pub fn observed_timeout(&self) -> Option<Duration> {
        self.pools[0].observed_timeout()
    }

    /// The keep-alive timeout this server is held to and where it comes from (the pool's
    /// module doc).
    pub fn keepalive(&self) -> (Duration, KeepAliveSource) {
        self.pools[0].keepalive()
    }

    /// Every worker's pool, kept for a new configuration (reload): warm connections stay,
    /// new ones are opened with `tls` (its files read again).
    pub fn keep_pools(&self, tls: Option<UpstreamTls>) -> Vec<Arc<Pool>> {
        for p in self.pools.iter() {
            p.connector().set_tls(tls.clone());
        }
        self.pools.to_vec()
    }

    /// A request on a fresh connection has had no answer for a while ([`RELIEVE_AFTER`]): to a
    /// backend whose workers are a fixed set (Apache's `MaxRequestWorkers`, one process each
    /// under prefork), that connection may be waiting in the backend's listen backlog while
    /// kaproxy's own idle keep-alive connections hold every worker. One idle connection — the
    /// longest idle, this worker's pool first — is closed (reason `surplus`), so that a worker
    /// is free for it; the request needed a new connection because none was idle then, so
    /// what has gone idle since is more than the traffic needs; the pools' probes of the
    /// backend's timeout too when `probes_too`. Returns whether one was.
    pub fn relieve(&self, probes_too: bool) -> bool {
        let own = crate::workers::index() % self.pools.len();
        self.pools
            .iter()
            .cycle()
            .skip(own)
            .take(self.pools.len())
            .any(|pool| pool.close_longest_idle(probes_too))
    }

    /// Closes every idle connection of every worker (shutdown).
    pub fn close_idle(&self) {
        for p in self.pools.iter() {
            p.close_idle();
        }
    }

    pub fn is_up(&self, now: Instant) -> bool {
        self.health.is_up(now)
    }

    /// A request it answered: ends a passive failure streak or cool-down (and a server that
    /// was marked down ramps up again, with `slow_start`).
    pub fn record_success(&self) {
        if self.health.record_success() && self.health.is_active_up() {
            self.start_ramp("passive health: answered again");
        }
        self.publish(Instant::now());
    }

    /// A failure it caused (connect, reset or close before a response byte, response
    /// timeout); `fall` of them in a row mark it down for the cool-down.
    pub fn record_failure(&self) {
        let now = Instant::now();
        if self.health.record_failure(now) {
            warn!(server = %self.addr, "passive health: server marked down after consecutive failures");
        }
        self.publish(now);
    }

    /// The probes' verdict; returns true when it changed (back up: the ramp starts, with
    /// `slow_start`).
    pub fn set_active_up(&self, up: bool) -> bool {
        let changed = self.health.set_active_up(up);
        if changed && up {
            self.start_ramp("active health: up again");
        }
        self.publish(Instant::now());
        changed
    }

    /// Sets `kaproxy_server_up` from both verdicts, as the balancer sees them now (the
    /// probes call it after each probe, so a passive cool-down that ended shows).
    pub fn publish(&self, now: Instant) {
        self.metrics().up.set(i64::from(self.health.is_up(now)));
    }
}

/// How long a request on a fresh connection waits for its answer before [`Backend::relieve`]
/// frees a backend worker held by an idle connection: far above a LAN round trip and a static
/// page (a millisecond), below what a client notices.
pub const RELIEVE_AFTER: Duration = Duration::from_millis(100);
/// How often one unanswered request looks for an idle connection to close (every
/// [`RELIEVE_AFTER`], so for its first second), and how many it closes at most: an answer that
/// is merely slow (a long page) costs the pool little.
pub const RELIEVE_CHECKS: u32 = 10;
pub const RELIEVE_CLOSES: u32 = 2;
/// After how many checks relief also closes the probe of a backend's timeout (the pool's
/// module doc): a probe holds at most one worker, and a fresh connection through a slow
/// network (a round trip above [`RELIEVE_AFTER`]) must not cost kaproxy what it is learning.
pub const RELIEVE_PROBE_CHECKS: u32 = 5;

/// [`Backend::effective_weight`]'s unit: a thousandth of a unit of weight, so that a share
/// ramped by `slow_start` stays an integer for the balancers.
pub const WEIGHT_SCALE: u64 = 1000;

/// The least share of its weight a ramping server gets (`slow_start`): a twentieth, so that
/// it is tried with a few requests from the first moment rather than none.
pub const SLOW_START_FLOOR: f64 = 0.05;

/// `ramp_start` value meaning "not ramping".
const NO_RAMP: i64 = i64::MIN;

/// `down_until` value meaning "not marked down since the last success".
const NOT_DOWN: u64 = 0;

/// Health of one backend: a passive verdict and an active one.
///
/// Passive: a backend is up until `fall` consecutive failures; then it is down for `cooldown`.
/// After the cool-down it is tried again (half-open): a success clears the mark, a single
/// failure marks it down for another cool-down without waiting for a new streak of `fall`.
///
/// Active: a flag only the probe task of [`crate::upstream::health::spawn_active_checks`]
/// writes (`rise`/`fall` are counted there). It starts up, so traffic flows before the first
/// probe has answered, and stays up for good when the upstream has no `[health]`.
///
/// The two are independent and [`is_up`](Self::is_up) needs both: a server is up only if
/// neither says down. A request that succeeds does not clear an active "down" (probing only
/// one URL, the checker knows something a lucky request does not), and a good probe does not
/// end a passive cool-down (requests failed where probes did not look).
#[derive(Debug)]
pub struct BackendHealth {
    fall: u32,
    cooldown: Duration,
    /// Origin of the nanosecond clock stored in `down_until`.
    base: Instant,
    /// Failures since the last success.
    consecutive_failures: AtomicU32,
    /// Nanoseconds since `base` until which the backend is down, or [`NOT_DOWN`]. Stays set
    /// after the cool-down ends (half-open) until a success clears it.
    down_until: AtomicU64,
    /// Set after `fall` failed probes in a row, cleared after `rise` good ones.
    active_down: AtomicBool,
}

impl BackendHealth {
    /// `fall` below 1 is treated as 1: a server can't be down before it has failed.
    pub fn new(fall: u32, cooldown: Duration) -> Self {
        BackendHealth {
            fall: fall.max(1),
            cooldown,
            base: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            down_until: AtomicU64::new(NOT_DOWN),
            active_down: AtomicBool::new(false),
        }
    }

    /// Up unless active checks marked it down, or `fall` consecutive failures happened and
    /// the cool-down has not passed.
    pub fn is_up(&self, now: Instant) -> bool {
        self.is_active_up() && self.is_passive_up(now)
    }

    /// The passive verdict alone, for status pages and logs.
    pub fn is_passive_up(&self, now: Instant) -> bool {
        let down_until = self.down_until.load(Ordering::Acquire);
        down_until == NOT_DOWN || self.nanos(now) >= down_until
    }

    /// The active verdict alone: false after `fall` failed probes until `rise` good ones.
    pub fn is_active_up(&self) -> bool {
        // Relaxed: the flag publishes no other data.
        !self.active_down.load(Ordering::Relaxed)
    }

    /// Sets the active verdict; returns true when it changed. Written by the probe task of
    /// this backend only.
    pub fn set_active_up(&self, up: bool) -> bool {
        self.active_down.swap(!up, Ordering::Relaxed) == up
    }

    /// Takes over the active verdict of the same server in the previous configuration, so that
    /// a reload does not send traffic to a server the probes had found down until `fall` new
    /// probes have failed again.
    pub fn inherit_active(&self, previous: &BackendHealth) {
        self.set_active_up(previous.is_active_up());
    }

    /// Resets the passive failure streak and ends a passive cool-down. Leaves the active
    /// verdict alone. Returns whether it had been marked down (it recovered).
    pub fn record_success(&self) -> bool {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        // Loaded first: on the hot path the mark is almost never set, and a load does not
        // take the cache line from the other workers.
        self.down_until.load(Ordering::Acquire) != NOT_DOWN
            && self.down_until.swap(NOT_DOWN, Ordering::AcqRel) != NOT_DOWN
    }
    /// Counts a connect/response failure; returns true when this call marked the server down.
    ///
    /// Only one of several concurrent failures returns true, so a caller may log or count the
    /// transition once. A failure during the cool-down (typically a request that was already
    /// in flight when the server was marked down) neither extends the cool-down nor returns
    /// true: it says nothing new about the server.
    pub fn record_failure(&self, now: Instant) -> bool {
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let now_nanos = self.nanos(now);
        let current = self.down_until.load(Ordering::Acquire);
        let half_open = current != NOT_DOWN && now_nanos >= current;
        let streak_reached = current == NOT_DOWN && failures >= self.fall;
        if !half_open && !streak_reached {
            return false;
        }
        let until = now_nanos
            .saturating_add(u64::try_from(self.cooldown.as_nanos()).unwrap_or(u64::MAX))
            .max(NOT_DOWN + 1);
        // Losing the exchange means another failure (or a success) got there first.
        self.down_until
            .compare_exchange(current, until, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Request failures since the last successful request (passive), for status pages.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One pool to the backend at `addr` on each of `workers`, each with its share of `cfg`, all
/// sharing `metrics`, `tls` and what they learn of the backend.
pub fn worker_pools(
    addr: SocketAddr,
    cfg: &PoolConfig,
    metrics: Arc<BackendMetrics>,
    tls: Option<UpstreamTls>,
    workers: &[tokio::runtime::Handle],
) -> Vec<Arc<Pool>> {
    let learned = Arc::new(Learned::default());
    let share = per_worker(cfg, workers.len());
    workers
        .iter()
        .map(|rt| {
            let (metrics, tls, learned) = (metrics.clone(), tls.clone(), learned.clone());
            Pool::for_worker(addr, share.clone(), metrics, tls, learned, rt)
        })
        .collect()
}

/// One worker's share of `cfg` among `workers`: `max_connections_per_server` and
/// `max_idle_per_server` divided, rounded up (README, "Workers"); the rest as configured.
fn per_worker(cfg: &PoolConfig, workers: usize) -> PoolConfig {
    let share = |n: usize| n.div_ceil(workers.max(1)).max(1);
    PoolConfig {
        max_connections_per_server: share(cfg.max_connections_per_server),
        max_idle_per_server: share(cfg.max_idle_per_server)
            .min(share(cfg.max_connections_per_server)),
        ..cfg.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const COOLDOWN: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn up_until_fall_consecutive_failures() {
        let health = BackendHealth::new(3, COOLDOWN);
        assert!(health.is_up(Instant::now()));
        assert!(!health.record_failure(Instant::now()));
        assert!(!health.record_failure(Instant::now()));
        assert!(health.is_up(Instant::now()));
        assert!(health.record_failure(Instant::now()));
        assert!(!health.is_up(Instant::now()));
        assert_eq!(health.consecutive_failures(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_the_streak() {
        let health = BackendHealth::new(3, COOLDOWN);
        health.record_failure(Instant::now());
        health.record_failure(Instant::now());
        health.record_success();
        assert!(!health.record_failure(Instant::now()));
        assert!(!health.record_failure(Instant::now()));
        assert!(health.is_up(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn down_for_the_cool_down_then_half_open() {
        let health = BackendHealth::new(2, COOLDOWN);
        health.record_failure(Instant::now());
        assert!(health.record_failure(Instant::now()));

        advance(COOLDOWN - Duration::from_millis(1)).await;
        assert!(!health.is_up(Instant::now()));
        advance(Duration::from_millis(1)).await;
        assert!(
            health.is_up(Instant::now()),
            "tried again after the cool-down"
        );

        // Half-open: one failure is enough to go down again, for a full cool-down.
        assert!(health.record_failure(Instant::now()));
        assert!(!health.is_up(Instant::now()));
        advance(COOLDOWN - Duration::from_millis(1)).await;
        assert!(!health.is_up(Instant::now()));
        advance(Duration::from_millis(1)).await;
        assert!(health.is_up(Instant::now()));

        // Half-open: a success clears the mark; a fresh streak of `fall` is needed again.
        health.record_success();
        assert!(!health.record_failure(Instant::now()));
        assert!(health.is_up(Instant::now()));
        assert!(health.record_failure(Instant::now()));
        assert!(!health.is_up(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_during_the_cool_down_do_not_extend_it() {
        let health = BackendHealth::new(1, COOLDOWN);
        assert!(health.record_failure(Instant::now()));
        advance(COOLDOWN / 2).await;
        assert!(!health.record_failure(Instant::now()));
        advance(COOLDOWN / 2).await;
        assert!(health.is_up(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn success_during_the_cool_down_marks_up() {
        let health = BackendHealth::new(1, COOLDOWN);
        assert!(health.record_failure(Instant::now()));
        health.record_success();
        assert!(health.is_up(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_fall_means_one() {
        let health = BackendHealth::new(0, COOLDOWN);
        assert!(health.is_up(Instant::now()));
        assert!(health.record_failure(Instant::now()));
        assert!(!health.is_up(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_failures_mark_down_once() {
        let health = std::sync::Arc::new(BackendHealth::new(3, COOLDOWN));
        let now = Instant::now();
        let marked: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let health = &health;
                    scope.spawn(move || (0..100).filter(|_| health.record_failure(now)).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(marked, 1);
        assert!(!health.is_up(now));
    }

    #[tokio::test(start_paused = true)]
    async fn active_and_passive_verdicts_combine() {
        let health = BackendHealth::new(1, COOLDOWN);
        assert!(health.is_active_up(), "a new server starts up");
        assert!(health.set_active_up(false));
        assert!(!health.set_active_up(false), "no change, no transition");
        assert!(!health.is_up(Instant::now()));
        // A request that got through (fail open) does not overrule the probes.
        health.record_success();
        assert!(!health.is_up(Instant::now()));
        assert!(health.is_passive_up(Instant::now()));

        assert!(health.set_active_up(true));
        assert!(health.is_up(Instant::now()));
        // Good probes do not end a passive cool-down.
        assert!(health.record_failure(Instant::now()));
        health.set_active_up(true);
        assert!(!health.is_up(Instant::now()));
        advance(COOLDOWN).await;
        assert!(health.is_up(Instant::now()));

        let reloaded = BackendHealth::new(1, COOLDOWN);
        health.set_active_up(false);
        reloaded.inherit_active(&health);
        assert!(!reloaded.is_up(Instant::now()));
    }
}
