//! Owns what a pool learns of its backend's keep-alive timeout, shared by the workers' pools
//! of that backend ([`Learned`]; README, "Where a deadline comes from"), and the probes that
//! find it out.
//!
//! Where the timeout comes from, first that applies:
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
//!
//! While nothing is known (no header, no close seen), the first connection to come back idle
//! is the probe, and a connection is reused only if it came back more than `safety_margin`
//! after it ([`Learned`]'s `unproven_before_us`).
//!
//! A probe's close is dated at the sweep's last look that found it open (every
//! [`PROBE_LOOK_EVERY`]), and never raises the observation above a shorter close seen while it
//! ran: both can only make the observed timeout shorter, never longer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Entry, Pool};
use crate::metrics::{CloseReason, KeepAliveSource};
use crate::upstream::connect::{Connection, Connector};
use crate::upstream::keep_alive::KeepAliveHint;

/// The connection kept to find out the backend's timeout, and when it was last seen open.
pub(super) struct Probe<T> {
    pub(super) conn: Entry<T>,
    pub(super) seen_open: Instant,
}

/// How often the sweep looks at a probe: a close is dated no later than this after it
/// happened, and never later than it happened (the probe's idle time when last seen open), so
/// a missed wake-up can only make the observed timeout shorter, never longer.
pub(super) const PROBE_LOOK_EVERY: Duration = Duration::from_millis(100);

/// How often one connection per server is let idle past the observed keep-alive timeout
/// (module doc): a probe costs one connection held unused for at most the configured
/// deadline, and a too-short observation costs reuse until the next probe.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// What kaproxy learned of one backend's keep-alive, from its `Keep-Alive` header and from
/// its closes, shared by the pools of every worker to that backend (README, "Workers").
pub struct Learned {
    /// The advertised keep-alive timeout in ms (0: none learned yet).
    pub(super) timeout_ms: AtomicU64,
    /// The shortest idle time in ms at which the backend was seen to close (0: none).
    pub(super) observed_ms: AtomicU64,
    /// The probe of the observed timeout, across workers: one at a time.
    pub(super) probe: Mutex<ProbeTimes>,
    /// The timeout and source last published (metric, log).
    pub(super) published: Mutex<Option<(Duration, KeepAliveSource)>>,
    /// Wakes every sweep when it changes, since deadlines move with it.
    pub(super) changed: Notify,
    /// While nothing is known of the backend's timeout and a probe runs: the probe's last use
    /// plus the safety margin, in µs since `epoch` (0: no such probe). A connection last used
    /// before it is not reused: the probe has not shown the backend keeps one that long.
    pub(super) unproven_before_us: AtomicU64,
    pub(super) epoch: Instant,
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
    pub(super) fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64 + 1
    }

    /// `at` in ns since `epoch`, for instants compared in an atomic.
    pub(super) fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

#[derive(Default)]
pub(super) struct ProbeTimes {
    pub(super) running: bool,
    /// No probe starts before this.
    pub(super) next: Option<Instant>,
    /// The backend has shown something of its timeout: a close, or a probe that outlived the
    /// configured deadline. Until then, connections coming back idle start probes.
    pub(super) settled: bool,
    /// The shortest close (ms) seen while the probe runs: the probe cannot raise the observed
    /// timeout above it (a backend whose timer is coarse closes some connections later than
    /// others; the earliest is what holds).
    pub(super) shortest_meanwhile: Option<u64>,
}

/// How a probe of the observed timeout ended.
pub(super) enum ProbeEnd {
    /// The backend closed it after this idle time: its timeout now.
    Closed(Duration),
    /// It stayed open to the configured deadline: the observation no longer holds.
    Outlived,
    /// kaproxy needed it gone (shutdown, relief): nothing learned.
    Abandoned,
}

/// A timeout kept in ms, 0 meaning none.
fn millis(ms: &AtomicU64) -> Option<Duration> {
    match ms.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    }
}

impl<C: Connector> Pool<C> {
    /// The keep-alive timeout the backend advertised last, if any.
    pub fn learned_timeout(&self) -> Option<Duration> {
        millis(&self.learned.timeout_ms)
    }

    /// The shortest idle time at which the backend was seen to close, if it was.
    pub fn observed_timeout(&self) -> Option<Duration> {
        millis(&self.learned.observed_ms)
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

    /// Learns the backend's keep-alive settings from a response.
    pub(super) fn learn(&self, hint: &KeepAliveHint) {
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
    pub(super) fn keepalive_changed(&self) {
        self.publish_keepalive();
        self.learned.changed.notify_waiters();
        self.sweep.notify_one();
    }

    /// Sets `kaproxy_upstream_keepalive_timeout_seconds` and logs when the timeout this server
    /// is held to, or its source, changes.
    pub(super) fn publish_keepalive(&self) {
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
    pub(super) fn start_probe(&self, now: Instant, born: Instant, last_used: Instant) -> bool {
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
    pub(super) fn end_probe(&self, now: Instant, end: ProbeEnd) {
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
    pub(super) fn sweep_probe(&self, now: Instant) -> Option<Instant> {
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
    pub(super) fn set_probe(&self, mut conn: Entry<C::Conn>) {
        conn.conn.detach(&self.sweep_waker);
        self.metrics.idle.inc();
        let seen_open = Instant::now();
        *crate::sync::lock(&self.probe) = Some(Probe { conn, seen_open });
    }

    /// Closes the probe connection, if there is one, learning nothing from it.
    pub(super) fn abandon_probe(&self) -> bool {
        let Some(Probe { conn, .. }) = crate::sync::lock(&self.probe).take() else {
            return false;
        };
        self.metrics.idle.dec();
        self.end_probe(Instant::now(), ProbeEnd::Abandoned);
        self.close(conn, CloseReason::Surplus);
        true
    }
}
