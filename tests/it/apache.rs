//! kaproxy in front of real Apache httpd 2.4 instances: the keep-alive race, learned timeouts,
//! forwarding headers, balancing, a stopped backend and a backend restart that kills its pool.
//! The race is also run through a relay that delays everything by 100 ms, which opens the
//! window loopback keeps shut: there a naive pool fails against real Apache and kaproxy's
//! pool does not.

use std::net::IpAddr;
use std::time::Duration;

use crate::support::client::{loopback_range, KeepAliveClient, Load, Pacing, Request, Tally};
use crate::support::proxy::{test_config, TestProxy, CLOSED_TOTAL, POOL_IDLE};
use kaproxy_testkit::apache::{require_apache, Apache, ApacheOptions, SLOW_BODY_LEN};
use kaproxy_testkit::relay::DelayRelay;

/// The pause between requests of one client connection: around Apache's 1 s KeepAliveTimeout.
const PAUSE: (Duration, Duration) = (Duration::from_millis(900), Duration::from_millis(1100));
/// Pool settings that obey the rule for Apache's KeepAliveTimeout 1:
/// 600 ms < 1 s - 300 ms.
const POOL_FOR_KEEPALIVE_1S: &str =
    "keepalive_timeout = \"1s\"\nsafety_margin = \"300ms\"\nidle_timeout = \"600ms\"";

async fn apaches(names: &[&str], keep_alive: Duration) -> Vec<Apache> {
    let mut out = Vec::new();
    for name in names {
        out.push(
            Apache::start(
                ApacheOptions::new(name)
                    .keep_alive_timeout(keep_alive)
                    // High enough that Apache never ends a connection for its request count
                    // in these tests: any connection Apache closes is one it found idle.
                    .max_keep_alive_requests(100_000),
            )
            .await
            .expect("start apache"),
        );
    }
    out
}

/// After a race: kaproxy closed idle connections itself, and Apache never closed one first
/// (on loopback kaproxy would see Apache's FIN and survive, so this is what tells a pool that
/// obeys the rule from one that merely gets lucky).
async fn assert_kaproxy_closed_idle_first(proxy: &TestProxy) {
    let (metrics, closed_by_kaproxy) = proxy
        .wait_metrics(Duration::from_secs(3), |m| {
            m.sum(CLOSED_TOTAL, &[("reason", "idle")])
                + m.sum(CLOSED_TOTAL, &[("reason", "learned_timeout")])
                > 0.0
        })
        .await;
    assert!(
        closed_by_kaproxy,
        "kaproxy closes idle upstream connections before Apache does:\n{}",
        metrics.lines_of(CLOSED_TOTAL)
    );
    assert_eq!(
        metrics.sum(CLOSED_TOTAL, &[("reason", "server_close")]),
        0.0,
        "Apache closed pooled connections before kaproxy did:\n{}",
        metrics.lines_of(CLOSED_TOTAL)
    );
}

/// kaproxy closed idle connections on the timeout it learned from Apache's `Keep-Alive`.
fn assert_learned_timeout_closed(proxy: &TestProxy) {
    let metrics = proxy.metrics();
    assert!(
        metrics.sum(CLOSED_TOTAL, &[("reason", "learned_timeout")]) > 0.0,
        "{}",
        metrics.lines_of(CLOSED_TOTAL)
    );
}

fn upstream_toml(balance: &str, servers: &str, pool: &str) -> String {
    format!("[upstreams.web]\nbalance = \"{balance}\"\nservers = [{servers}]\n{pool}\n")
}

fn server_list(apaches: &[Apache]) -> String {
    apaches
        .iter()
        .map(|a| format!("\"{}\"", a.addr()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn error_logs(apaches: &[Apache]) -> String {
    apaches
        .iter()
        .map(|a| format!("--- {} error.log:\n{}", a.name(), a.error_log()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The four loads of a race run: independent callers and a periodic batch, GET and POST.
struct Race {
    loads: Vec<(&'static str, Tally)>,
}

impl Race {
    fn summary(&self) -> String {
        self.loads
            .iter()
            .map(|(name, t)| format!("{name}: {}", t.summary()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn get(&self) -> &Tally {
        &self.loads[0].1
    }
}

/// ≥ 200 GETs and ≥ 200 POSTs from 20 independent client connections each, plus a periodic
/// batch (10 + 10 slots firing together, responses trickled for ~200 ms so a round needs a
/// connection per slot), everything pausing around Apache's 1 s timeout between requests.
async fn race_get_and_post(proxy: &TestProxy) -> Race {
    let load = |req: Request, slots: usize, pacing: Pacing| {
        Load::new(proxy.http(), req)
            .connections(slots)
            .requests_per_connection(10)
            .pause(PAUSE.0, PAUSE.1)
            .pacing(pacing)
    };
    let loads = [
        load(Request::get("/"), 20, Pacing::Independent),
        load(
            Request::post("/echo", vec![b'a'; 1000]),
            20,
            Pacing::Independent,
        ),
        load(Request::get("/slow.txt"), 10, Pacing::Rounds),
        load(
            Request::post("/echo-slow", vec![b'b'; SLOW_BODY_LEN]),
            10,
            Pacing::Rounds,
        ),
    ];
    let (get, post, batch_get, batch_post) = tokio::join!(
        loads[0].run(),
        loads[1].run(),
        loads[2].run(),
        loads[3].run()
    );
    Race {
        loads: vec![
            ("GET", get),
            ("POST", post),
            ("batch GET", batch_get),
            ("batch POST", batch_post),
        ],
    }
}

fn assert_race_clean(race: &Race, apaches: &[Apache]) {
    assert!(race.loads[0].1.total() >= 200 && race.loads[1].1.total() >= 200);
    for (name, tally) in &race.loads {
        assert_eq!(
            tally.error_count(),
            0,
            "{name}: client-visible errors\n{}\n{}",
            race.summary(),
            error_logs(apaches)
        );
        assert_eq!(
            tally.statuses.get(&200),
            Some(&tally.total()),
            "{name}: {}",
            tally.summary()
        );
    }
    for r in &race.loads[1].1.records {
        let body = &r.result.as_ref().expect("no errors").body;
        assert_eq!(body.len(), 1000, "Apache echoes the POST body whole");
    }
    for r in &race.loads[3].1.records {
        let body = &r.result.as_ref().expect("no errors").body;
        assert_eq!(
            body.len(),
            SLOW_BODY_LEN,
            "Apache echoes the POST body whole"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_race_get_and_post_round_robin_has_no_client_errors() {
    if !require_apache() {
        return;
    }
    let apaches = apaches(&["a1", "a2"], Duration::from_secs(1)).await;
    let proxy = TestProxy::start(&upstream_toml(
        "round_robin",
        &server_list(&apaches),
        POOL_FOR_KEEPALIVE_1S,
    ))
    .await;
    let race = race_get_and_post(&proxy).await;
    assert_race_clean(&race, &apaches);
    for a in &apaches {
        assert!(
            race.get().backends.get(a.name()).copied().unwrap_or(0) > 50,
            "round robin reaches {}: {:?}",
            a.name(),
            race.get().backends
        );
    }
    assert_kaproxy_closed_idle_first(&proxy).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_race_with_learned_keep_alive_timeout_has_no_client_errors() {
    if !require_apache() {
        return;
    }
    let apaches = apaches(&["l1", "l2"], Duration::from_secs(1)).await;
    // Configured 30 s; Apache's real 1 s comes from its `Keep-Alive: timeout=1` header.
    let proxy = TestProxy::start(&upstream_toml(
        "round_robin",
        &server_list(&apaches),
        "keepalive_timeout = \"30s\"\nidle_timeout = \"20s\"",
    ))
    .await;
    let race = race_get_and_post(&proxy).await;
    assert_race_clean(&race, &apaches);
    // With a 20 s idle_timeout only the learned 1 s can make kaproxy close first.
    assert_kaproxy_closed_idle_first(&proxy).await;
    assert_learned_timeout_closed(&proxy);
    proxy.shutdown().await;
}

/// One-way delay of the relay between kaproxy and Apache in the widened-race tests: Apache's
/// FIN reaches kaproxy this long after Apache closed, and a request sent in that window (or
/// up to this long before Apache closes) meets a closed socket.
const RELAY_DELAY: Duration = Duration::from_millis(100);
/// The client's pause in the widened race. A connection reused after idling this long reaches
/// Apache (one relay delay later) after its 1 s timer fired, while Apache's FIN is still in
/// the relay: every reuse by a pool that trusts the connection is stale.
const RELAY_PAUSE: (Duration, Duration) = (Duration::from_millis(900), Duration::from_millis(1000));

/// The widened race: one client connection sends 8 GETs, then another 8 POSTs, pausing
/// [`RELAY_PAUSE`] between requests, so that kaproxy's upstream connection idles as long as
/// the client did (with several clients, LIFO reuse would mostly pick a connection idle for
/// much less).
async fn relay_race(proxy: &TestProxy) -> Race {
    let load = |req: Request| {
        Load::new(proxy.http(), req)
            .connections(1)
            .requests_per_connection(8)
            .pause(RELAY_PAUSE.0, RELAY_PAUSE.1)
            .pacing(Pacing::Independent)
    };
    let get = load(Request::get("/")).run().await;
    let post = load(Request::post("/echo", vec![b'a'; 1000])).run().await;
    Race {
        loads: vec![("GET", get), ("POST", post)],
    }
}

/// No client-visible error, every answer a 200, every POST echoed whole.
fn assert_relay_race_clean(race: &Race, apaches: &[Apache]) {
    for (name, tally) in &race.loads {
        assert_eq!(tally.total(), 8, "{name}: {}", tally.summary());
        assert_eq!(
            tally.statuses.get(&200),
            Some(&8),
            "{name}: client-visible errors\n{}\n{}",
            race.summary(),
            error_logs(apaches)
        );
    }
    for r in &race.loads[1].1.records {
        let body = &r.result.as_ref().expect("no errors").body;
        assert_eq!(body.len(), 1000, "Apache echoes the POST body whole");
    }
}

/// One Apache (KeepAliveTimeout 1 s) behind a [`DelayRelay`]; kaproxy is given the relay.
async fn relayed_apache(name: &str) -> (Vec<Apache>, DelayRelay) {
    let apaches = apaches(&[name], Duration::from_secs(1)).await;
    let relay = DelayRelay::start(apaches[0].addr(), RELAY_DELAY)
        .await
        .expect("start relay");
    (apaches, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_behind_a_delay_relay_defeats_a_naive_pool() {
    if !require_apache() {
        return;
    }
    let (_apaches, relay) = relayed_apache("n1").await;
    assert_naive_pool_fails_behind(&relay, "").await;
}

/// The control experiment of the widened race: a pool that trusts connections for 9 s
/// against Apache's 1 s (`extra`: more keys of the upstream, e.g. TLS) must show client
/// errors behind the relay, else the relay widens nothing and the clean runs prove nothing.
async fn assert_naive_pool_fails_behind(relay: &DelayRelay, extra: &str) {
    let mut config = test_config(&upstream_toml(
        "round_robin",
        &format!("\"{}\"", relay.addr()),
        extra,
    ));
    config.naive_pool(false);
    let proxy = config.start().await;
    let race = relay_race(&proxy).await;
    let errors: usize = race.loads.iter().map(|(_, t)| t.error_count()).sum();
    eprintln!(
        "naive pool behind the relay ({extra:?}):\n{}",
        race.summary()
    );
    assert!(
        errors > 0,
        "the naive pool must fail against Apache behind the relay ({extra:?})\n{}",
        race.summary()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_behind_a_delay_relay_has_no_client_errors() {
    if !require_apache() {
        return;
    }
    let (apaches, relay) = relayed_apache("d1").await;
    let proxy = TestProxy::start(&upstream_toml(
        "round_robin",
        &format!("\"{}\"", relay.addr()),
        POOL_FOR_KEEPALIVE_1S,
    ))
    .await;
    let race = relay_race(&proxy).await;
    assert_relay_race_clean(&race, &apaches);
    assert_kaproxy_closed_idle_first(&proxy).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_behind_a_delay_relay_with_only_the_learned_timeout_has_no_client_errors() {
    if !require_apache() {
        return;
    }
    let (apaches, relay) = relayed_apache("r1").await;
    // Configured 30 s: only Apache's `Keep-Alive: timeout=1` tells kaproxy the truth.
    let proxy = TestProxy::start(&upstream_toml(
        "round_robin",
        &format!("\"{}\"", relay.addr()),
        "keepalive_timeout = \"30s\"\nidle_timeout = \"20s\"",
    ))
    .await;
    let race = relay_race(&proxy).await;
    assert_relay_race_clean(&race, &apaches);
    assert_kaproxy_closed_idle_first(&proxy).await;
    assert_learned_timeout_closed(&proxy);
    proxy.shutdown().await;
}

#[tokio::test]
async fn apache_sees_client_ip_in_x_forwarded_for() {
    if !require_apache() {
        return;
    }
    let apaches = apaches(&["x1"], Duration::from_secs(5)).await;
    let proxy = TestProxy::start(&format!(
        "[forwarded]\ntrusted_proxies = [\"127.0.0.8/32\"]\n\n{}",
        upstream_toml("round_robin", &server_list(&apaches), "")
    ))
    .await;
    let untrusted: IpAddr = "127.0.0.7".parse().unwrap();
    let trusted: IpAddr = "127.0.0.8".parse().unwrap();
    let cases = [
        (untrusted, None, "127.0.0.7"),
        (untrusted, Some("203.0.113.9"), "127.0.0.7"),
        (trusted, None, "127.0.0.8"),
        (trusted, Some("203.0.113.9"), "203.0.113.9, 127.0.0.8"),
    ];
    for (source, incoming, expected) in cases {
        let mut client = KeepAliveClient::new(proxy.http(), Some(source));
        let mut req = Request::get("/");
        if let Some(xff) = incoming {
            req = req.header("x-forwarded-for", xff);
        }
        let resp = client.send(&req).await.expect("GET");
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("x-seen-forwarded-for"),
            expected,
            "from {source} with incoming X-Forwarded-For {incoming:?}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_round_robin_weights_1_to_3_split_requests_1_to_3() {
    if !require_apache() {
        return;
    }
    let apaches = apaches(&["w1", "w3"], Duration::from_secs(1)).await;
    let servers = format!(
        "{{ addr = \"{}\", weight = 1 }}, {{ addr = \"{}\", weight = 3 }}",
        apaches[0].addr(),
        apaches[1].addr()
    );
    let proxy = TestProxy::start(&upstream_toml(
        "round_robin",
        &servers,
        POOL_FOR_KEEPALIVE_1S,
    ))
    .await;
    let tally = Load::new(proxy.http(), Request::get("/"))
        .connections(8)
        .requests_per_connection(50)
        .run()
        .await;
    assert_eq!(tally.error_count(), 0, "{}", tally.summary());
    assert_eq!(tally.total(), 400);
    let w1 = tally.backends.get("w1").copied().unwrap_or(0);
    let w3 = tally.backends.get("w3").copied().unwrap_or(0);
    assert!(
        (90..=110).contains(&w1) && (270..=330).contains(&w3),
        "expected ~100 : ~300 (±10%), got w1={w1} w3={w3}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_ip_hash_keeps_each_client_ip_on_one_instance() {
    if !require_apache() {
        return;
    }
    let apaches = apaches(&["h1", "h2"], Duration::from_secs(1)).await;
    let proxy = TestProxy::start(&upstream_toml(
        "ip_hash",
        &server_list(&apaches),
        POOL_FOR_KEEPALIVE_1S,
    ))
    .await;
    let sources = loopback_range(2, 60);
    let mut tally = Tally::default();
    // Two rounds on fresh connections, two requests per connection: stickiness must not depend
    // on the downstream connection.
    for _round in 0..2 {
        let round = Load::new(proxy.http(), Request::get("/"))
            .connections(sources.len())
            .requests_per_connection(2)
            .source_ips(sources.clone())
            .run()
            .await;
        tally.merge(round);
    }
    assert_eq!(tally.error_count(), 0, "{}", tally.summary());
    let by_source = tally.backends_by_source();
    assert_eq!(by_source.len(), sources.len(), "every source answered");
    for (ip, backends) in &by_source {
        assert_eq!(backends.len(), 1, "{ip} moved between {backends:?}");
    }
    let on_h1 = by_source.values().filter(|b| b.contains("h1")).count();
    assert!(
        on_h1 > 0 && on_h1 < sources.len(),
        "both instances get clients: {on_h1} of {} on h1",
        sources.len()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_stopped_instance_loses_no_request() {
    if !require_apache() {
        return;
    }
    let mut apaches = apaches(&["s1", "s2"], Duration::from_secs(5)).await;
    let proxy = TestProxy::start(&upstream_toml(
        "round_robin",
        &server_list(&apaches),
        "keepalive_timeout = \"5s\"\nidle_timeout = \"4s\"",
    ))
    .await;
    let warm = Load::new(proxy.http(), Request::get("/"))
        .connections(4)
        .requests_per_connection(5)
        .run()
        .await;
    assert_eq!(warm.error_count(), 0, "{}", warm.summary());
    assert_eq!(warm.backends.len(), 2, "{}", warm.summary());

    apaches[0].stop().await;

    let get = Load::new(proxy.http(), Request::get("/"))
        .connections(4)
        .requests_per_connection(10);
    let post = Load::new(proxy.http(), Request::post("/echo", "after stop"))
        .connections(2)
        .requests_per_connection(5);
    let (get, post) = tokio::join!(get.run(), post.run());
    assert_eq!(get.error_count(), 0, "GET: {}", get.summary());
    assert_eq!(post.error_count(), 0, "POST: {}", post.summary());
    assert_eq!(get.backends.keys().collect::<Vec<_>>(), vec!["s2"]);
    assert_eq!(get.total() + post.total(), 50);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_hard_restart_zombie_pool_costs_no_get() {
    if !require_apache() {
        return;
    }
    let mut apaches = apaches(&["z1"], Duration::from_secs(10)).await;
    let proxy = TestProxy::start(&upstream_toml(
        "round_robin",
        &server_list(&apaches),
        "keepalive_timeout = \"10s\"\nidle_timeout = \"8s\"",
    ))
    .await;
    let warm = Load::new(proxy.http(), Request::get("/"))
        .connections(10)
        .requests_per_connection(3)
        .run()
        .await;
    assert_eq!(warm.error_count(), 0, "{}", warm.summary());
    let (metrics, pooled) = proxy
        .wait_metrics(Duration::from_secs(3), |m| m.sum(POOL_IDLE, &[]) >= 2.0)
        .await;
    assert!(
        pooled,
        "precondition: idle upstream connections in kaproxy's pool:\n{}",
        metrics.lines_of(POOL_IDLE)
    );

    // Every pooled connection dies at once, and Apache is back on the same port.
    apaches[0].hard_restart().await.expect("hard restart");

    let after = Load::new(proxy.http(), Request::get("/"))
        .connections(8)
        .requests_per_connection(3)
        .run()
        .await;
    assert_eq!(after.total(), 24);
    assert_eq!(
        after.error_count(),
        0,
        "{}\n{}",
        after.summary(),
        error_logs(&apaches)
    );
    proxy.shutdown().await;
}

/// The widened race over TLS (`tls = true`, Apache with mod_ssl and the test CA): the same
/// relay, the same clients; the promise holds unchanged over TLS.
async fn relayed_tls_apache(
    name: &str,
    pki: &kaproxy_testkit::pki::TestPki,
) -> (Vec<Apache>, DelayRelay) {
    let apache = Apache::start(
        ApacheOptions::new(name)
            .keep_alive_timeout(Duration::from_secs(1))
            .max_keep_alive_requests(100_000)
            .tls(&pki.server_cert, &pki.server_key),
    )
    .await
    .expect("start apache with mod_ssl");
    let relay = DelayRelay::start(apache.addr(), RELAY_DELAY)
        .await
        .expect("start relay");
    (vec![apache], relay)
}

fn tls_keys(pki: &kaproxy_testkit::pki::TestPki) -> String {
    format!(
        "tls = true\ntls_ca = {:?}\n",
        pki.ca_cert.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_over_tls_behind_a_delay_relay_defeats_a_naive_pool() {
    if !require_apache() {
        return;
    }
    let pki = kaproxy_testkit::pki::TestPki::generate().unwrap();
    let (_apaches, relay) = relayed_tls_apache("tn1", &pki).await;
    assert_naive_pool_fails_behind(&relay, &tls_keys(&pki)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_over_tls_behind_a_delay_relay_has_no_client_errors() {
    if !require_apache() {
        return;
    }
    let pki = kaproxy_testkit::pki::TestPki::generate().unwrap();
    let (apaches, relay) = relayed_tls_apache("td1", &pki).await;
    // Configured 30 s: only Apache's `Keep-Alive: timeout=1`, read over TLS, tells the truth.
    let proxy = TestProxy::start(&upstream_toml(
        "round_robin",
        &format!("\"{}\"", relay.addr()),
        &format!(
            "{}keepalive_timeout = \"30s\"\nidle_timeout = \"20s\"",
            tls_keys(&pki)
        ),
    ))
    .await;
    let race = relay_race(&proxy).await;
    assert_relay_race_clean(&race, &apaches);
    assert_kaproxy_closed_idle_first(&proxy).await;
    assert_learned_timeout_closed(&proxy);
    let m = proxy.metrics();
    assert!(
        m.sum("kaproxy_upstream_tls_handshakes_total", &[]) >= 1.0,
        "{}",
        m.0
    );
    proxy.shutdown().await;
}

/// Apache prefork with one worker: two requests at once need two connections, and the one
/// that gets the worker second waits in Apache's listen backlog. When the first is answered
/// its connection goes idle in kaproxy's pool — still holding Apache's only worker, for up to
/// kaproxy's idle deadline (4 s here). kaproxy sees the second request unanswered on its fresh
/// connection after 100 ms and closes that idle connection (reason `surplus`), so the worker
/// is free for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_prefork_is_not_starved_by_kaproxy_idle_connections() {
    if !require_apache() {
        return;
    }
    let apache = Apache::start(
        ApacheOptions::new("prefork1")
            .prefork(1)
            .keep_alive_timeout(Duration::from_secs(5)),
    )
    .await
    .expect("start apache");
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{}\"]\nkeepalive_timeout = \"5s\"\n",
        apache.addr()
    ))
    .await;
    let get = |path: &'static str| {
        let endpoint = proxy.http();
        async move {
            let started = std::time::Instant::now();
            let resp = KeepAliveClient::new(endpoint, None)
                .send(&Request::get(path))
                .await;
            (resp.map(|r| r.status.as_u16()), started.elapsed())
        }
    };
    // The quick request starts once the slow one holds a connection (and with it Apache's one
    // worker, for ~200 ms), so it cannot reuse that one: it needs a second.
    let slow = tokio::spawn(get("/slow.txt"));
    kaproxy_testkit::eventually(
        "the slow request opened a connection",
        Duration::from_secs(5),
        || {
            proxy
                .metrics()
                .sum("kaproxy_upstream_connections_opened_total", &[])
                >= 1.0
        },
    )
    .await;
    let quick = get("/").await;
    let slow = slow.await.expect("slow request task");
    for (what, (status, took)) in [("/slow.txt", slow), ("/", quick)] {
        assert_eq!(status.as_ref().ok(), Some(&200), "{what}: {status:?}");
        assert!(
            took < Duration::from_secs(1),
            "{what} answered in {took:?}: the other's idle connection held Apache's only worker"
        );
    }
    let m = proxy.metrics();
    assert_eq!(
        m.sum(CLOSED_TOTAL, &[("reason", "surplus")]),
        1.0,
        "the idle connection closed to free the worker\n{}",
        m.lines_of(CLOSED_TOTAL)
    );
    proxy.shutdown().await;
}
