//! Owns the downstream connection cap: the slots that accepted client connections hold
//! ([`Limiter`], shared by the http and https listeners), the list of idle (parked) HTTP/1
//! connections that may be closed to make room, the derivation of `max_connections` from the
//! open-file limit ([`derived_max_connections`]), and what an accept loop does when the
//! kernel refuses it a descriptor ([`AcceptErrors`]: back off, shed idle connections, log at
//! most once per interval).
//!
//! At the cap, an accept loop first asks the longest-idle parked connection to close (nginx
//! reuses idle keep-alive connections the same way when `worker_connections` runs out); only
//! when none is idle does it stop accepting until a slot frees — the kernel's listen backlog
//! holds new clients meanwhile, and nothing polls.

use std::collections::BTreeMap;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{info, warn};

/// Descriptors kept back from the derived cap for everything that is not a proxied
/// connection: the listeners and the admin listener and its clients, stdio, the runtime's
/// epoll and wake-up descriptors, log files, health-check probes, connections in their
/// lingering close (up to 2 s after their slot is released).
pub const FD_RESERVE: u64 = 64;

/// The shortest pause after a failed accept; doubled on each further failure.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// The longest pause after repeated accept failures (EMFILE and friends).
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// Accept failures are logged at most once per this interval, with a count.
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The effective `max_connections` for an open-file limit `nofile` when the config says 0.
///
/// Derived as HAProxy derives its `maxconn` when none is set (`compute_ideal_maxconn()` in
/// HAProxy's `src/limits.c`): the descriptor limit, minus what the listeners, checks and the
/// like need ([`FD_RESERVE`], or a quarter of a small limit), halved because each client
/// connection may need an upstream connection too. At least 1.
pub fn derived_max_connections(nofile: u64) -> usize {
    let reserve = FD_RESERVE.min(nofile / 4);
    let max = (nofile.saturating_sub(reserve) / 2).max(1);
    usize::try_from(max)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

/// The process' soft open-file limit (RLIMIT_NOFILE), if it can be read.
pub fn nofile_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get_soft().ok()
}

/// Raises the soft open-file limit to the hard limit, as nginx's `worker_rlimit_nofile` and
/// HAProxy do at start, and returns (before, after). Where the hard limit is "unlimited" (which
/// Linux refuses as a soft limit), falls back to the kernel's `fs.nr_open`.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let before = rlimit::Resource::NOFILE.get_soft()?;
    let after = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(e)?;
            rlimit::increase_nofile_limit(nr_open)?
        }
    };
    Ok((before, after))
}

/// `configured`, or when it is 0 the cap derived from the current soft open-file limit.
/// Returns the cap and, when derived, the limit it was derived from.
pub fn effective_max_connections(configured: usize) -> (usize, Option<u64>) {
    if configured > 0 {
        return (configured.min(Semaphore::MAX_PERMITS), None);
    }
    // Unreadable limit: assume the common default soft limit.
    let nofile = nofile_limit().unwrap_or(1024);
    (derived_max_connections(nofile), Some(nofile))
}

/// The connection slots of all downstream listeners and the idle connections that may be
/// closed to free one.
pub struct Limiter {
    max: usize,
    slots: Arc<Semaphore>,
    idle: Mutex<IdleList>,
    /// A connection went idle while every slot was taken: a waiting accept loop may shed it.
    idle_added: Notify,
    /// A connection asked to shed woke for its client's next request instead: the waiting
    /// accept loop must shed another.
    shed_refused: Notify,
}

/// Parked connections by (idle since, registration number): the first is the longest idle.
#[derive(Default)]
struct IdleList {
    next: u64,
    by_age: BTreeMap<(Instant, u64), Arc<IdleEntry>>,
}

struct IdleEntry {
    /// The parked connection's task, woken when it is asked to close (or the server shuts
    /// down: [`Limiter::wake_parked`]).
    waker: AtomicWaker,
    asked: AtomicBool,
    closed: AtomicBool,
}

/// A connection's slot; released when dropped (at the end of the connection's task).
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Limiter {
    pub fn new(max: usize) -> Arc<Limiter> {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Limiter {
            max,
            slots: Arc::new(Semaphore::new(max)),
            idle: Mutex::new(IdleList::default()),
            idle_added: Notify::new(),
            shed_refused: Notify::new(),
        })
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections holding a slot now.
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Parked connections that could be shed now.
    pub fn idle(&self) -> usize {
        self.lock().by_age.len()
    }

    /// A free slot, at once.
    pub fn try_acquire(&self) -> Option<Slot> {
        self.slots.clone().try_acquire_owned().ok().map(Slot)
    }

    /// A slot. At the cap, asks the longest-idle parked connection to close and waits for
    /// its slot; with none idle, waits until a slot frees or a connection goes idle (then
    /// sheds that one). Never polls.
    pub async fn acquire(&self) -> Slot {
        loop {
            if let Some(slot) = self.try_acquire() {
                return slot;
            }
            // Registered before looking at the idle list, so that a connection going idle
            // (or refusing to shed) after the look still wakes this loop.
            let mut idle_added = pin!(self.idle_added.notified());
            idle_added.as_mut().enable();
            let mut refused = pin!(self.shed_refused.notified());
            refused.as_mut().enable();
            let shed = self.shed_longest_idle();
            tokio::select! {
                permit = self.slots.clone().acquire_owned() => {
                    return Slot(permit.expect("the semaphore is never closed"));
                }
                _ = idle_added, if !shed => {}
                _ = refused, if shed => {}
            }
        }
    }

    /// Asks the longest-idle parked connection to close; false when none is parked.
    pub fn shed_longest_idle(&self) -> bool {
        let entry = self.lock().by_age.pop_first();
        match entry {
            Some((_, entry)) => {
                entry.asked.store(true, Ordering::Release);
                entry.waker.wake();
                true
            }
            None => false,
        }
    }

    /// Wakes every parked connection, which then sees that the server shuts down. A
    /// connection that parks after this sees it as it registers ([`ListenerLimit::park`]'s
    /// caller looks after registering).
    pub fn wake_parked(&self) {
        for entry in self.lock().by_age.values() {
            entry.waker.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IdleList> {
        crate::sync::lock(&self.idle)
    }
}

/// One listener's view of the [`Limiter`]: where its parked connections register, and the
/// counter of its connections closed to make room
/// (`kaproxy_downstream_connections_shed_total{listener}`).
#[derive(Clone)]
pub struct ListenerLimit {
    limiter: Arc<Limiter>,
    shed_total: Counter,
}

impl ListenerLimit {
    pub fn new(limiter: Arc<Limiter>, shed_total: Counter) -> ListenerLimit {
        ListenerLimit {
            limiter,
            shed_total,
        }
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Registers a parked connection, idle since `since`, as one that may be closed to make
    /// room, until the returned guard is dropped.
    pub fn park(&self, since: Instant) -> Parked {
        let entry = Arc::new(IdleEntry {
            waker: AtomicWaker::new(),
            asked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let key = {
            let mut idle = self.limiter.lock();
            let key = (since, idle.next);
            idle.next += 1;
            idle.by_age.insert(key, entry.clone());
            key
        };
        if self.limiter.slots.available_permits() == 0 {
            self.limiter.idle_added.notify_waiters();
        }
        Parked {
            limit: self.clone(),
            key,
            entry,
        }
    }
}

/// A parked connection's registration with the [`Limiter`].
pub struct Parked {
    limit: ListenerLimit,
    key: (Instant, u64),
    entry: Arc<IdleEntry>,
}

impl Parked {
    /// `Ready` once the limiter has asked this connection to close to make room; the caller
    /// then closes it (counted in `kaproxy_downstream_connections_shed_total`). Registers
    /// `cx`'s waker, which [`Limiter::wake_parked`] wakes too.
    pub fn poll_shed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.entry.waker.register(cx.waker());
        if !self.entry.asked.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        if !self.entry.closed.swap(true, Ordering::AcqRel) {
            self.limit.shed_total.inc();
        }
        Poll::Ready(())
    }

    /// Completes when the limiter asks this connection to close ([`Parked::poll_shed`]).
    pub async fn shed_requested(&self) {
        std::future::poll_fn(|cx| self.poll_shed(cx)).await
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        let limiter = &self.limit.limiter;
        if self.entry.asked.load(Ordering::Acquire) {
            // Already taken off the list by the shedder.
            if !self.entry.closed.load(Ordering::Acquire) {
                // The client's next request won the race: it is served, and the accept loop
                // that wanted this slot must look for another.
                limiter.shed_refused.notify_waiters();
            }
            return;
        }
        limiter.lock().by_age.remove(&self.key);
    }
}

/// An accept loop's failure handling: a doubling back-off (5 ms .. 1 s), shedding an idle
/// connection when descriptors or buffers run out, and a log line at most once per
/// [`ACCEPT_LOG_INTERVAL`] with the number of failures since the last one, instead of a
/// warning per failure. Shared by the downstream and admin accept loops.
pub struct AcceptErrors {
    listener: &'static str,
    backoff: Duration,
    /// Failures not yet reported in a log line.
    unlogged: u64,
    /// Failures since the last successful accept.
    failing: u64,
    last_log: Option<Instant>,
}

impl AcceptErrors {
    pub fn new(listener: &'static str) -> AcceptErrors {
        AcceptErrors {
            listener,
            backoff: MIN_ACCEPT_BACKOFF,
            unlogged: 0,
            failing: 0,
            last_log: None,
        }
    }

    /// An accept succeeded: the back-off starts over.
    pub fn accepted(&mut self) {
        if self.failing > 0 {
            info!(
                listener = self.listener,
                failures = self.failing,
                "accepting connections again"
            );
            self.failing = 0;
            self.unlogged = 0;
            self.last_log = None;
        }
        self.backoff = MIN_ACCEPT_BACKOFF;
    }

    /// An accept failed with `e`: sheds the longest-idle connection of `limiter` if the
    /// process is out of descriptors or memory, logs if none was logged for an interval, and
    /// returns how long to pause before accepting again.
    pub fn failed(&mut self, e: &io::Error, limiter: Option<&Limiter>) -> Duration {
        let exhausted = is_resource_exhaustion(e);
        let shed = exhausted && limiter.is_some_and(|l| l.shed_longest_idle());
        self.unlogged += 1;
        self.failing += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_INTERVAL)
        {
            warn!(
                listener = self.listener,
                error = %e,
                failures = self.unlogged,
                backoff = ?self.backoff,
                out_of_resources = exhausted,
                shed_idle = shed,
                "accept failing (logged at most every {}s, with the failures since the last line)",
                ACCEPT_LOG_INTERVAL.as_secs()
            );
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_ACCEPT_BACKOFF);
        pause
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or system is out of descriptors or memory;
/// the pending connection stays in the backlog and the listener stays readable.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    const ENOMEM: i32 = 12;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const ENOBUFS: i32 = 105;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    const ENOBUFS: i32 = 55;
    matches!(e.raw_os_error(), Some(ENOMEM | ENFILE | EMFILE | ENOBUFS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_cap_halves_the_limit_after_the_reserve() {
        // 1024 (a common default soft limit): (1024 - 64) / 2.
        assert_eq!(derived_max_connections(1024), 480);
        assert_eq!(derived_max_connections(1_048_576), 524_256);
        // A small limit keeps a quarter back instead of 64.
        assert_eq!(derived_max_connections(64), 24);
        assert_eq!(derived_max_connections(0), 1);
        assert_eq!(derived_max_connections(1), 1);
        // "Unlimited" does not overflow.
        assert_eq!(derived_max_connections(u64::MAX), Semaphore::MAX_PERMITS);
    }

    #[test]
    fn configured_cap_wins_over_the_derived_one() {
        assert_eq!(effective_max_connections(20), (20, None));
        let (max, from) = effective_max_connections(0);
        assert_eq!(max, derived_max_connections(from.expect("derived")));
    }

    #[test]
    fn exhaustion_errors_are_recognised() {
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(24)));
        assert!(is_resource_exhaustion(&io::Error::from_raw_os_error(23)));
        assert!(!is_resource_exhaustion(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
    }

    fn limit(max: usize) -> ListenerLimit {
        ListenerLimit::new(Limiter::new(max), Counter::default())
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_connection_is_asked_to_close() {
        let limit = limit(2);
        let limiter = limit.limiter().clone();
        let a = limiter.try_acquire().unwrap();
        let b = limiter.try_acquire().unwrap();
        assert!(limiter.try_acquire().is_none());
        let now = Instant::now();
        let newer = limit.park(now);
        let older = limit.park(now - Duration::from_secs(5));
        let acquiring = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire().await }
        });
        // The older one is asked; it closes, releasing its slot.
        tokio::time::timeout(Duration::from_secs(5), older.shed_requested())
            .await
            .expect("the longest-idle connection is shed");
        drop(older);
        drop(b);
        let _c = tokio::time::timeout(Duration::from_secs(5), acquiring)
            .await
            .expect("a slot after the shed")
            .unwrap();
        assert_eq!(limit.shed_total.get(), 1);
        assert_eq!(limiter.idle(), 1, "the newer connection is still parked");
        drop(newer);
        assert_eq!(limiter.idle(), 0);
        drop(a);
    }

    #[tokio::test]
    async fn with_none_idle_the_acquirer_waits_then_sheds_a_connection_that_goes_idle() {
        let limit = limit(1);
        let limiter = limit.limiter().clone();
        let busy = limiter.try_acquire().unwrap();
        let acquiring = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!acquiring.is_finished(), "nothing to shed, no slot: waits");
        // The busy connection goes idle: it is shed at once.
        let parked = limit.park(Instant::now());
        tokio::time::timeout(Duration::from_secs(5), parked.shed_requested())
            .await
            .expect("a connection going idle at the cap is shed");
        drop(parked);
        drop(busy);
        tokio::time::timeout(Duration::from_secs(5), acquiring)
            .await
            .expect("a slot")
            .unwrap();
    }

    #[tokio::test]
    async fn a_shed_refused_by_a_request_moves_on_to_the_next_idle_connection() {
        let limit = limit(2);
        let limiter = limit.limiter().clone();
        let _a = limiter.try_acquire().unwrap();
        let b = limiter.try_acquire().unwrap();
        let now = Instant::now();
        let first = limit.park(now - Duration::from_secs(2));
        let second = limit.park(now);
        let acquiring = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire().await }
        });
        // The first one is asked but its client's request arrives: it stays open.
        while !first.entry.asked.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second.shed_requested())
            .await
            .expect("the next idle connection is shed");
        drop(second);
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), acquiring)
            .await
            .expect("a slot")
            .unwrap();
        assert_eq!(limit.shed_total.get(), 1);
    }

    #[test]
    fn accept_failures_back_off_and_log_rarely() {
        let mut errors = AcceptErrors::new("test");
        let emfile = io::Error::from_raw_os_error(24);
        let pauses: Vec<_> = (0..10).map(|_| errors.failed(&emfile, None)).collect();
        assert_eq!(pauses[0], Duration::from_millis(5));
        assert_eq!(pauses[1], Duration::from_millis(10));
        assert_eq!(pauses[9], MAX_ACCEPT_BACKOFF);
        // One line logged for the first failure; nine waiting for the next interval.
        assert_eq!(errors.unlogged, 9);
        errors.accepted();
        assert_eq!(errors.failed(&emfile, None), Duration::from_millis(5));
    }
}
