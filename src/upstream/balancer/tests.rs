//! The balancers' unit tests: distribution, weights, health, drain, slow start, least request.

use super::*;
use crate::config::PassiveHealth;
use crate::config::{HealthConfig, PoolConfig, RetryConfig, ServerConfig};
use crate::upstream::backend::BackendHealth;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

fn upstream(balance: BalanceKind, servers: &[(&str, u32)]) -> UpstreamConfig {
    UpstreamConfig {
        name: "web".to_string(),
        balance,
        entries: Vec::new(),
        servers: servers
            .iter()
            .map(|&(addr, weight)| ServerConfig {
                addr: addr.parse().unwrap(),
                weight,
                name: None,
            })
            .collect(),
        pool: PoolConfig::default(),
        retry: RetryConfig::default(),
        buffers: Default::default(),
        response_timeout: Duration::from_secs(60),
        upgrade_protocols: vec!["websocket".to_string()],
        tunnel_idle_timeout: Duration::from_secs(60),
        ip_hash_prefix_v4: 32,
        ip_hash_prefix_v6: 64,
        slow_start: Duration::ZERO,
        resolve: Duration::ZERO,
        health: None,
        passive: PassiveHealth::default(),
        tls: None,
    }
}

/// A balancer over fresh backends for `cfg` (pools that never connect here).
fn balancer(cfg: &UpstreamConfig) -> Balancer {
    let metrics = crate::metrics::Metrics::new();
    let fall = cfg.passive.fall;
    let backends = cfg
        .servers
        .iter()
        .map(|s| {
            let pool = crate::upstream::pool::Pool::new(
                s.addr,
                cfg.pool.clone(),
                metrics.server(&cfg.name, s.addr),
            );
            let health = BackendHealth::new(fall, cfg.passive.cooldown);
            Arc::new(Backend::new(s.weight, health, pool).with_slow_start(cfg.slow_start))
        })
        .collect();
    Balancer::new(cfg, backends)
}

const A: &str = "127.0.0.1:8081";
const B: &str = "127.0.0.1:8082";
const C: &str = "127.0.0.1:8083";
const D: &str = "127.0.0.1:8084";
const ANY_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn mark_down(balancer: &Balancer, i: usize, now: Instant) {
    while !balancer.backends()[i].health.record_failure(now) {}
    assert!(!balancer.backends()[i].health.is_up(now));
}

fn picks(balancer: &Balancer, n: usize, tried: &[usize], now: Instant) -> Vec<usize> {
    (0..n)
        .map(|_| balancer.pick_index(ANY_IP, tried, now).unwrap())
        .collect()
}

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

#[tokio::test]
async fn round_robin_is_nginx_smooth_order() {
    // current_weight (a, b, c) after adding weights → pick → after subtracting total 6:
    // (1, 2, 3) → c → (1, 2,-3);  (2, 4, 0) → b → (2,-2, 0);  (3, 0, 3) → a (first of
    // the tie) → (-3, 0, 3);  (-2, 2, 6) → c → (-2, 2, 0);  (-1, 4, 3) → b → (-1,-2, 3);
    // (0, 0, 6) → c → (0, 0, 0), back where it started.
    let balancer = balancer(&upstream(
        BalanceKind::RoundRobin,
        &[(A, 1), (B, 2), (C, 3)],
    ));
    let now = Instant::now();
    assert_eq!(picks(&balancer, 6, &[], now), [2, 1, 0, 2, 1, 2]);
    assert_eq!(picks(&balancer, 6, &[], now), [2, 1, 0, 2, 1, 2]);
}

#[tokio::test]
async fn round_robin_holds_weights_over_many_picks() {
    let balancer = balancer(&upstream(
        BalanceKind::RoundRobin,
        &[(A, 1), (B, 2), (C, 3), (D, 5)],
    ));
    let mut counts = [0; 4];
    for i in picks(&balancer, 11 * 1000, &[], Instant::now()) {
        counts[i] += 1;
    }
    assert_eq!(counts, [1000, 2000, 3000, 5000]);
}

#[tokio::test]
async fn round_robin_equal_weights_alternate() {
    let balancer = balancer(&upstream(BalanceKind::RoundRobin, &[(A, 1), (B, 1)]));
    assert_eq!(picks(&balancer, 4, &[], Instant::now()), [0, 1, 0, 1]);
}

#[tokio::test]
async fn round_robin_skips_down_backends() {
    let balancer = balancer(&upstream(
        BalanceKind::RoundRobin,
        &[(A, 1), (B, 2), (C, 3)],
    ));
    let now = Instant::now();
    mark_down(&balancer, 1, now);
    let mut counts = [0; 3];
    for i in picks(&balancer, 400, &[], now) {
        counts[i] += 1;
    }
    assert_eq!(counts, [100, 0, 300]);

    // After the cool-down it is tried again and takes its share.
    let later = now + PassiveHealth::default().cooldown;
    let mut counts = [0; 3];
    for i in picks(&balancer, 600, &[], later) {
        counts[i] += 1;
    }
    assert_eq!(counts, [100, 200, 300]);
}

#[tokio::test]
async fn round_robin_skips_tried_and_returns_none_when_all_tried() {
    let balancer = balancer(&upstream(
        BalanceKind::RoundRobin,
        &[(A, 1), (B, 2), (C, 3)],
    ));
    let now = Instant::now();
    assert!(picks(&balancer, 50, &[2], now).iter().all(|&i| i != 2));
    assert_eq!(picks(&balancer, 3, &[0, 2], now), [1, 1, 1]);
    assert_eq!(balancer.pick_index(ANY_IP, &[0, 1, 2], now), None);
}

#[tokio::test]
async fn round_robin_fails_open_among_untried() {
    let balancer = balancer(&upstream(
        BalanceKind::RoundRobin,
        &[(A, 1), (B, 1), (C, 1)],
    ));
    let now = Instant::now();
    for i in 0..3 {
        mark_down(&balancer, i, now);
    }
    let mut seen = picks(&balancer, 3, &[], now);
    seen.sort();
    assert_eq!(seen, [0, 1, 2], "all down: still spread over every server");

    // B up, A and C down, B already tried: the down ones rather than nothing.
    balancer.backends()[1].health.record_success();
    let retry = balancer.pick_index(ANY_IP, &[1], now).unwrap();
    assert!(retry == 0 || retry == 2);
}

#[tokio::test]
async fn empty_upstream_picks_nothing() {
    for kind in [
        BalanceKind::RoundRobin,
        BalanceKind::IpHash,
        BalanceKind::LeastRequest,
    ] {
        let balancer = balancer(&upstream(kind, &[]));
        assert_eq!(balancer.pick_index(ANY_IP, &[], Instant::now()), None);
    }
}

#[tokio::test]
async fn fall_comes_from_health_config() {
    let mut cfg = upstream(BalanceKind::RoundRobin, &[(A, 1)]);
    cfg.health = Some(HealthConfig {
        path: "/".to_string(),
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(1),
        rise: 2,
        fall: 1,
        ..HealthConfig::default()
    });
    // Resolved once, as the config loader does.
    cfg.passive = PassiveHealth::of(cfg.health.as_ref());
    let with_fall_1 = balancer(&cfg);
    assert!(with_fall_1.backends()[0]
        .health
        .record_failure(Instant::now()));

    let by_default = balancer(&upstream(BalanceKind::RoundRobin, &[(A, 1)]));
    let health = &by_default.backends()[0].health;
    let now = Instant::now();
    let marked = (1..=PassiveHealth::default().fall).find(|_| health.record_failure(now));
    assert_eq!(marked, Some(PassiveHealth::default().fall));
}

#[tokio::test]
async fn ip_hash_is_the_same_across_balancers() {
    let cfg = upstream(BalanceKind::IpHash, &[(A, 1), (B, 1), (C, 1), (D, 1)]);
    let first = balancer(&cfg);
    let second = balancer(&cfg);
    let now = Instant::now();
    for i in 0..1000 {
        let ip = client(i * 7919);
        assert_eq!(
            first.pick_index(ip, &[], now),
            second.pick_index(ip, &[], now)
        );
        assert_eq!(
            first.pick_index(ip, &[], now),
            first.pick_index(ip, &[], now)
        );
    }
}

#[tokio::test]
async fn ip_hash_is_pinned() {
    // Guards the hash itself: these must not change between releases, or every instance
    // of a mixed-version fleet sends clients to different backends.
    assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    let balancer = balancer(&upstream(
        BalanceKind::IpHash,
        &[(A, 1), (B, 1), (C, 1), (D, 1)],
    ));
    let now = Instant::now();
    let mapped: Vec<usize> = (0..16)
        .map(|i| balancer.pick_index(client(i), &[], now).unwrap())
        .collect();
    assert_eq!(mapped, PINNED_MAPPING);
}

/// 10.0.0.0..=10.0.0.15 over A, B, C, D (weights 1), prefix 32. Cross-checked against an
/// independent Python implementation of the same hash.
const PINNED_MAPPING: [usize; 16] = [1, 1, 2, 3, 2, 2, 1, 1, 2, 1, 1, 3, 3, 2, 3, 3];

#[tokio::test]
async fn ip_hash_prefix_groups_clients() {
    let mut cfg = upstream(BalanceKind::IpHash, &[(A, 1), (B, 1), (C, 1), (D, 1)]);
    cfg.ip_hash_prefix_v4 = 24;
    cfg.ip_hash_prefix_v6 = 48;
    let balancer = balancer(&cfg);
    let now = Instant::now();
    let pick = |ip: &str| balancer.pick_index(ip.parse().unwrap(), &[], now);
    assert_eq!(pick("10.0.0.1"), pick("10.0.0.200"));
    assert_eq!(pick("10.0.0.1"), pick("::ffff:10.0.0.77"));
    assert_eq!(pick("2001:db8:1::1"), pick("2001:db8:1:ffff::2"));
    // Different /24s do not all collapse onto one server.
    let servers: std::collections::HashSet<_> =
        (0..64).map(|i| pick(&format!("10.0.{i}.1"))).collect();
    assert_eq!(servers.len(), 4);
}

#[tokio::test]
async fn ip_hash_whole_address_by_default() {
    let balancer = balancer(&upstream(
        BalanceKind::IpHash,
        &[(A, 1), (B, 1), (C, 1), (D, 1)],
    ));
    let now = Instant::now();
    let servers: std::collections::HashSet<_> = (0..64)
        .map(|i| balancer.pick_index(client(i), &[], now))
        .collect();
    assert_eq!(servers.len(), 4, "prefix 32: neighbours spread");
}

#[tokio::test]
async fn ip_hash_removing_a_server_remaps_only_its_clients() {
    let four = balancer(&upstream(
        BalanceKind::IpHash,
        &[(A, 1), (B, 1), (C, 1), (D, 1)],
    ));
    let three = balancer(&upstream(BalanceKind::IpHash, &[(A, 1), (B, 1), (D, 1)]));
    let now = Instant::now();
    let addr = |balancer: &Balancer, ip| {
        let i = balancer.pick_index(ip, &[], now).unwrap();
        balancer.backends()[i].addr
    };
    let removed: SocketAddr = C.parse().unwrap();
    let mut moved = 0;
    for i in 0..10_000 {
        let ip = client(i);
        let before = addr(&four, ip);
        let after = addr(&three, ip);
        if before == removed {
            moved += 1;
        } else {
            assert_eq!(before, after, "{ip} moved from {before} to {after}");
        }
    }
    assert!((2000..3000).contains(&moved), "{moved} clients were on C");
}

#[tokio::test]
async fn ip_hash_distribution_follows_weights() {
    let weights = [1, 1, 2, 4];
    let balancer = balancer(&upstream(
        BalanceKind::IpHash,
        &[
            (A, weights[0]),
            (B, weights[1]),
            (C, weights[2]),
            (D, weights[3]),
        ],
    ));
    let now = Instant::now();
    let mut counts: HashMap<usize, u32> = HashMap::new();
    let n = 10_000;
    for i in 0..n {
        *counts
            .entry(balancer.pick_index(client(i), &[], now).unwrap())
            .or_default() += 1;
    }
    for (i, weight) in weights.iter().enumerate() {
        let expected = f64::from(n * weight) / 8.0;
        let got = f64::from(counts.get(&i).copied().unwrap_or(0));
        assert!(
            (got - expected).abs() < expected * 0.15,
            "server {i}: {got} clients, expected about {expected}"
        );
    }
}

#[tokio::test]
async fn ip_hash_down_or_tried_server_moves_its_clients_and_they_come_back() {
    let balancer = balancer(&upstream(
        BalanceKind::IpHash,
        &[(A, 1), (B, 1), (C, 1), (D, 1)],
    ));
    let now = Instant::now();
    let before: Vec<usize> = (0..2000)
        .map(|i| balancer.pick_index(client(i), &[], now).unwrap())
        .collect();

    // A tried server moves each of its clients to the same place a down one does.
    let tried: Vec<usize> = (0..2000)
        .map(|i| balancer.pick_index(client(i), &[2], now).unwrap())
        .collect();

    mark_down(&balancer, 2, now);
    for (i, &was) in before.iter().enumerate() {
        let now_on = balancer.pick_index(client(i as u32), &[], now).unwrap();
        if was == 2 {
            assert_ne!(now_on, 2);
        } else {
            assert_eq!(now_on, was, "only the down server's clients move");
        }
        assert_eq!(now_on, tried[i]);
    }

    // Fail open: with C the only untried server, its clients still reach it.
    let c_client = client(before.iter().position(|&s| s == 2).unwrap() as u32);
    assert_eq!(balancer.pick_index(c_client, &[0, 1, 3], now), Some(2));

    balancer.backends()[2].health.record_success();
    let after: Vec<usize> = (0..2000)
        .map(|i| balancer.pick_index(client(i), &[], now).unwrap())
        .collect();
    assert_eq!(before, after);

    // Also back after the cool-down alone (half-open).
    mark_down(&balancer, 2, now);
    let later = now + PassiveHealth::default().cooldown;
    let after: Vec<usize> = (0..2000)
        .map(|i| balancer.pick_index(client(i), &[], later).unwrap())
        .collect();
    assert_eq!(before, after);
}

/// How often each backend is picked in `n` picks.
fn counts(balancer: &Balancer, n: usize, now: Instant) -> Vec<u32> {
    let mut counts = vec![0; balancer.backends().len()];
    for i in picks(balancer, n, &[], now) {
        counts[i] += 1;
    }
    counts
}

/// `n` requests in flight on backend `i` for as long as the guards live.
fn load(balancer: &Balancer, i: usize, n: usize) -> Vec<crate::upstream::pool::InFlight<'_>> {
    let pool = balancer.backends()[i].pool();
    (0..n).map(|_| pool.track_in_flight()).collect()
}

#[tokio::test]
async fn least_request_at_no_load_follows_weights() {
    let weights = [1, 1, 2, 4];
    let balancer = balancer(&upstream(
        BalanceKind::LeastRequest,
        &[
            (A, weights[0]),
            (B, weights[1]),
            (C, weights[2]),
            (D, weights[3]),
        ],
    ));
    let n = 16_000;
    let counts = counts(&balancer, n, Instant::now());
    for (i, weight) in weights.iter().enumerate() {
        let expected = (n as u32 * weight / 8) as f64;
        let got = f64::from(counts[i]);
        assert!(
            (got - expected).abs() < expected * 0.1,
            "server {i}: {got} picks, expected about {expected} ({counts:?})"
        );
    }
}

#[tokio::test]
async fn least_request_never_picks_the_most_loaded_of_three() {
    let balancer = balancer(&upstream(
        BalanceKind::LeastRequest,
        &[(A, 1), (B, 1), (C, 1)],
    ));
    let _busy = load(&balancer, 0, 5);
    assert_eq!(balancer.backends()[0].in_flight(), 5);
    let counts = counts(&balancer, 3000, Instant::now());
    // Two distinct servers are compared: A always meets a less loaded one.
    assert_eq!(counts[0], 0, "{counts:?}");
    assert!(counts[1] > 1200 && counts[2] > 1200, "{counts:?}");
}

#[tokio::test]
async fn least_request_follows_load_as_it_changes() {
    let balancer = balancer(&upstream(BalanceKind::LeastRequest, &[(A, 1), (B, 1)]));
    let now = Instant::now();
    let busy_a = load(&balancer, 0, 2);
    let busy_b = load(&balancer, 1, 1);
    assert_eq!(picks(&balancer, 50, &[], now), [1; 50]);
    drop(busy_a);
    assert_eq!(picks(&balancer, 50, &[], now), [0; 50]);
    drop(busy_b);
    let counts = counts(&balancer, 2000, now);
    assert!(counts[0] > 800 && counts[1] > 800, "even again: {counts:?}");
}

#[tokio::test]
async fn least_request_compares_in_flight_per_weight() {
    // A weighs 1, B 4: B takes four times A's load before A is preferred.
    let balancer = balancer(&upstream(BalanceKind::LeastRequest, &[(A, 1), (B, 4)]));
    let now = Instant::now();
    let _a = load(&balancer, 0, 1);
    let mut b = load(&balancer, 1, 3);
    assert_eq!(picks(&balancer, 50, &[], now), [1; 50], "3/4 < 1/1");
    b.extend(load(&balancer, 1, 2));
    assert_eq!(picks(&balancer, 50, &[], now), [0; 50], "5/4 > 1/1");
    // Even (4/4 = 1/1): the first drawn, which is B four times in five.
    b.pop();
    let counts = counts(&balancer, 5000, now);
    assert!(
        (3700..4300).contains(&counts[1]),
        "even loads follow the weights: {counts:?}"
    );
}

#[tokio::test]
async fn least_request_even_loads_go_to_an_idle_pooled_connection() {
    let demo = kaproxy_demo::DemoBackend::start(
        "127.0.0.1:0".parse().unwrap(),
        kaproxy_demo::DemoBackendConfig::default(),
    )
    .await
    .unwrap();
    let warm = demo.addr().to_string();
    let mut cfg = upstream(BalanceKind::LeastRequest, &[(A, 1), (&warm, 1)]);
    // No probe of the backend's timeout: the connection goes straight to the idle list.
    cfg.pool.learn_keep_alive = false;
    let balancer = balancer(&cfg);
    let now = Instant::now();
    let cold = counts(&balancer, 2000, now);
    assert!(cold[0] > 800 && cold[1] > 800, "no idle anywhere: {cold:?}");

    let pool = balancer.backends()[1].pool().clone();
    let conn = pool.acquire().await.unwrap();
    assert_eq!(
        balancer.backends()[1].in_flight(),
        1,
        "checked out: in flight"
    );
    conn.release();
    assert!(pool.has_idle());
    assert_eq!(balancer.backends()[1].in_flight(), 0);
    assert_eq!(
        picks(&balancer, 50, &[], now),
        [1; 50],
        "the warm one wins ties"
    );

    // Load still decides first: one more in flight there, and the cold one wins.
    let _busy = load(&balancer, 1, 1);
    assert_eq!(picks(&balancer, 50, &[], now), [0; 50]);
}

#[tokio::test]
async fn least_request_skips_down_and_tried_and_fails_open() {
    let balancer = balancer(&upstream(
        BalanceKind::LeastRequest,
        &[(A, 1), (B, 1), (C, 1)],
    ));
    let now = Instant::now();
    mark_down(&balancer, 1, now);
    let counts = counts(&balancer, 1000, now);
    assert_eq!(counts[1], 0, "down: {counts:?}");
    assert!(picks(&balancer, 100, &[0], now).iter().all(|&i| i == 2));

    // Every untried server down: picked anyway.
    mark_down(&balancer, 0, now);
    mark_down(&balancer, 2, now);
    let mut seen = picks(&balancer, 300, &[], now);
    seen.sort();
    seen.dedup();
    assert_eq!(seen, [0, 1, 2], "all down: still spread over every server");
    assert_eq!(picks(&balancer, 10, &[0, 2], now), [1; 10]);
    assert_eq!(balancer.pick_index(ANY_IP, &[0, 1, 2], now), None);
}

#[tokio::test]
async fn a_drained_server_gets_no_new_request_in_any_balancer() {
    for kind in [
        BalanceKind::RoundRobin,
        BalanceKind::IpHash,
        BalanceKind::LeastRequest,
    ] {
        let balancer = balancer(&upstream(kind, &[(A, 1), (B, 1), (C, 1)]));
        let now = Instant::now();
        assert!(balancer.backends()[1].drain());
        let hit = |tried: &[usize]| {
            (0..300).any(|i| balancer.pick_index(client(i), tried, now) == Some(1))
        };
        assert!(!hit(&[]), "{kind:?}");
        // Not even when every other server is down (fail open skips it too).
        mark_down(&balancer, 0, now);
        mark_down(&balancer, 2, now);
        assert!(!hit(&[]), "{kind:?}: others down");
        assert_eq!(balancer.pick_index(ANY_IP, &[0, 2], now), None, "{kind:?}");

        assert!(balancer.backends()[1].enable());
        assert!(hit(&[]), "{kind:?}: enabled again");
    }
}

#[tokio::test]
async fn a_weight_set_at_run_time_counts_at_once() {
    let balancer = balancer(&upstream(BalanceKind::RoundRobin, &[(A, 1), (B, 1)]));
    let now = Instant::now();
    assert_eq!(counts(&balancer, 200, now), [100, 100]);
    assert_eq!(balancer.backends()[1].set_weight(3), 1);
    assert_eq!(counts(&balancer, 400, now), [100, 300]);
}

const SLOW_START: Duration = Duration::from_secs(10);

/// A balancer of `kind` over `servers` with a 10 s slow_start, and server `ramping`
/// drained and enabled now (its ramp starts).
fn ramping(kind: BalanceKind, servers: &[(&str, u32)], ramping: usize) -> Balancer {
    let mut cfg = upstream(kind, servers);
    cfg.slow_start = SLOW_START;
    let balancer = balancer(&cfg);
    let b = &balancer.backends()[ramping];
    assert!(b.drain() && b.enable());
    balancer
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_an_enabled_server_in_round_robin() {
    let balancer = ramping(BalanceKind::RoundRobin, &[(A, 1), (B, 1)], 1);
    // Shares of 1000 + B's ramped weight in thousandths: the floor (5%), 20%, 50%, full.
    let enabled = Instant::now();
    for (at_ms, b_weight) in [(0, 50), (2000, 200), (5000, 500), (10_000, 1000)] {
        tokio::time::advance(Duration::from_millis(at_ms).saturating_sub(enabled.elapsed())).await;
        let now = Instant::now();
        let expected = b_weight as f64 / (1000 + b_weight) as f64;
        let counts = counts(&balancer, 2000 + 2 * b_weight, now);
        let got = f64::from(counts[1]) / f64::from(counts[0] + counts[1]);
        assert!(
            (got - expected).abs() < 0.01,
            "{at_ms} ms into the ramp: B got {got:.3} of the picks, expected {expected:.3}"
        );
    }
    assert_eq!(balancer.backends()[1].ramp(Instant::now()), None, "done");
}

#[tokio::test(start_paused = true)]
async fn slow_start_ramps_an_enabled_server_in_least_request() {
    let balancer = ramping(BalanceKind::LeastRequest, &[(A, 1), (B, 1)], 1);
    let share = |balancer: &Balancer| {
        let counts = counts(balancer, 20_000, Instant::now());
        f64::from(counts[1]) / 20_000.0
    };
    let at_start = share(&balancer);
    assert!((0.03..0.07).contains(&at_start), "floor 5/105: {at_start}");
    tokio::time::advance(Duration::from_millis(2500)).await;
    let quarter = share(&balancer);
    assert!((0.18..0.22).contains(&quarter), "250/1250: {quarter}");
    tokio::time::advance(Duration::from_millis(7500)).await;
    let full = share(&balancer);
    assert!((0.47..0.53).contains(&full), "even again: {full}");
}

#[tokio::test(start_paused = true)]
async fn slow_start_in_ip_hash_brings_a_growing_part_of_its_clients_back_for_good() {
    let servers = [(A, 1), (B, 1), (C, 1), (D, 1)];
    let steady = balancer(&upstream(BalanceKind::IpHash, &servers));
    let balancer = ramping(BalanceKind::IpHash, &servers, 2);
    let now = Instant::now();
    let home: Vec<usize> = (0..4000)
        .map(|i| steady.pick_index(client(i), &[], now).unwrap())
        .collect();
    let on_c: Vec<u32> = (0..4000).filter(|&i| home[i as usize] == 2).collect();
    let back_at = |balancer: &Balancer| -> Vec<u32> {
        let now = Instant::now();
        for i in 0..4000 {
            let pick = balancer.pick_index(client(i), &[], now).unwrap();
            if home[i as usize] != 2 {
                assert_eq!(pick, home[i as usize], "other servers' clients never move");
            }
        }
        on_c.iter()
            .copied()
            .filter(|&i| balancer.pick_index(client(i), &[], now) == Some(2))
            .collect()
    };
    let n = on_c.len() as f64;
    let first = back_at(&balancer);
    assert!(
        (first.len() as f64 / n) < 0.09,
        "the floor: {} of {n}",
        first.len()
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    let third = back_at(&balancer);
    let share = third.len() as f64 / n;
    assert!((0.25..0.35).contains(&share), "30%: {share}");
    assert!(
        first.iter().all(|c| third.contains(c)),
        "who came back stays"
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    let more = back_at(&balancer);
    assert!((0.55..0.65).contains(&(more.len() as f64 / n)), "60%");
    assert!(
        third.iter().all(|c| more.contains(c)),
        "who came back stays"
    );
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(back_at(&balancer), on_c, "full weight: all of them");
}

#[tokio::test(start_paused = true)]
async fn a_ramp_under_way_goes_on_after_a_reload() {
    let servers = [(A, 1), (B, 1)];
    let old = ramping(BalanceKind::RoundRobin, &servers, 1);
    tokio::time::advance(Duration::from_secs(3)).await;
    let mut cfg = upstream(BalanceKind::RoundRobin, &servers);
    cfg.slow_start = SLOW_START;
    let new = balancer(&cfg);
    new.backends()[1].inherit_admin(&old.backends()[1]);
    let share = new.backends()[1].ramp(Instant::now()).unwrap();
    assert!((share - 0.3).abs() < 1e-6, "3 s of 10 s: {share}");
    assert_eq!(new.backends()[0].ramp(Instant::now()), None);
    tokio::time::advance(Duration::from_secs(7)).await;
    assert_eq!(new.backends()[1].ramp(Instant::now()), None);
}

#[tokio::test(start_paused = true)]
async fn slow_start_begins_when_health_brings_a_server_back() {
    let mut cfg = upstream(BalanceKind::RoundRobin, &[(A, 1)]);
    cfg.slow_start = SLOW_START;
    let balancer = balancer(&cfg);
    let b = &balancer.backends()[0];
    assert_eq!(
        b.ramp(Instant::now()),
        None,
        "a server starts at full weight"
    );
    assert!(b.set_active_up(false));
    assert!(b.set_active_up(true));
    assert_eq!(
        b.ramp(Instant::now()),
        Some(0.05),
        "probes' rise: from the floor"
    );
    tokio::time::advance(SLOW_START).await;
    assert_eq!(b.ramp(Instant::now()), None);

    while !b.health.record_failure(Instant::now()) {}
    b.record_success();
    tokio::time::advance(SLOW_START / 2).await;
    assert_eq!(
        b.ramp(Instant::now()),
        Some(0.5),
        "passive recovery ramps too"
    );
    b.record_success();
    assert_eq!(
        b.ramp(Instant::now()),
        Some(0.5),
        "a success while up starts nothing"
    );

    // Without slow_start nothing ramps.
    let plain = self::balancer(&upstream(BalanceKind::RoundRobin, &[(A, 1)]));
    let p = &plain.backends()[0];
    assert!(p.drain() && p.enable());
    assert_eq!(p.ramp(Instant::now()), None);
    assert_eq!(p.effective_weight(Instant::now()), 1000);
}
