//! Owns the naive pool: the control experiment of the keep-alive race tests and
//! `kaproxy-bench race`, a pool configured the way a proxy that trusts a fixed keep-alive
//! timeout is. No config file can say this (`kaproxy check` refuses an idle timeout at or past
//! the backend's keep-alive timeout, and `Keep-Alive` is always learned from TOML), so it is
//! built here from the parsed config rather than in the product's config module.

use std::time::Duration;

use kaproxy::config::UpstreamConfig;

/// The naive pool's belief about the backend: Apache-like 10 s, whatever the backend says.
pub const NAIVE_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The naive pool's idle timeout: 9 s, longer than a short real keep-alive timeout.
pub const NAIVE_IDLE_TIMEOUT: Duration = Duration::from_secs(9);

/// Turns `upstream`'s pool into a naive one: it believes the backend keeps connections
/// [`NAIVE_KEEPALIVE_TIMEOUT`], evicts after [`NAIVE_IDLE_TIMEOUT`] with no safety margin, learns
/// nothing from `Keep-Alive`, and re-sends written requests only when `retry_idempotent`.
pub fn make_naive(upstream: &mut UpstreamConfig, retry_idempotent: bool) {
    upstream.pool.keepalive_timeout = NAIVE_KEEPALIVE_TIMEOUT;
    upstream.pool.idle_timeout = NAIVE_IDLE_TIMEOUT;
    upstream.pool.safety_margin = Duration::ZERO;
    upstream.pool.learn_keep_alive = false;
    upstream.retry.retry_idempotent = retry_idempotent;
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kaproxy::config::Config;

    use super::*;

    #[test]
    fn naive_pool_trusts_a_fixed_timeout_and_learns_nothing() {
        let toml =
            "[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.web]\nservers = [\"127.0.0.1:1\"]\n";
        let mut config = Config::from_toml_str(toml, Path::new("naive.toml")).expect("parses");
        let upstream = &mut config.upstreams[0];
        assert!(upstream.pool.learn_keep_alive, "the default learns");
        make_naive(upstream, false);
        assert_eq!(upstream.pool.keepalive_timeout, NAIVE_KEEPALIVE_TIMEOUT);
        assert_eq!(upstream.pool.idle_timeout, NAIVE_IDLE_TIMEOUT);
        assert_eq!(upstream.pool.safety_margin, Duration::ZERO);
        assert!(!upstream.pool.learn_keep_alive);
        assert!(!upstream.retry.retry_idempotent);
    }
}
