//! Owns the bounded "poll until" loop of the tests: [`eventually`] (panics when the condition
//! never held), [`eventually_async`] for conditions that await, and [`poll_until`] for callers
//! that report a failure themselves (with the state they saw last).

use std::time::Duration;

use tokio::time::Instant;

/// The pause between two checks of a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Checks `cond` every [`POLL_INTERVAL`] until it holds; panics with `what` (what was expected,
/// "the backend accepted 3 connections") when it still does not after `timeout`. Checked at
/// least once, and once more at the deadline.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    eventually_async(what, timeout, async || cond()).await;
}

/// [`eventually`] for a condition that awaits (an async closure, which may borrow and update
/// what it captures).
pub async fn eventually_async(what: &str, timeout: Duration, cond: impl AsyncFnMut() -> bool) {
    if !poll_until(timeout, cond).await {
        panic!("not within {timeout:?}: {what}");
    }
}

/// Checks `cond` every [`POLL_INTERVAL`] until it holds or `timeout` has passed; returns whether
/// it held. Checked at least once, and once more at the deadline.
pub async fn poll_until(timeout: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep_until((now + POLL_INTERVAL).min(deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_once_the_condition_holds() {
        let mut checks = 0;
        eventually("three checks", Duration::from_secs(1), || {
            checks += 1;
            checks == 3
        })
        .await;
        assert_eq!(checks, 3);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "not within 100ms: never")]
    async fn panics_with_what_after_the_timeout() {
        eventually("never", Duration::from_millis(100), || false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn poll_until_checks_at_the_deadline_and_reports() {
        let started = Instant::now();
        let mut checks = 0u32;
        let held = poll_until(Duration::from_millis(50), async || {
            checks += 1;
            false
        })
        .await;
        assert!(!held);
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        // 0, 20, 40 and the deadline at 50 ms.
        assert_eq!(checks, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_async_condition_may_update_what_it_captures() {
        let mut last = 0;
        eventually_async("counted to 5", Duration::from_secs(1), async || {
            tokio::task::yield_now().await;
            last += 1;
            last >= 5
        })
        .await;
        assert_eq!(last, 5);
    }
}
