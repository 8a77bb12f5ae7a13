//! The keep-alive race, in-process against the deterministic demo backend: kaproxy's pool shows
//! no client errors where a naive pool (idle timeout longer than the backend's) shows them.

use std::net::SocketAddr;
use std::time::Duration;

use kaproxy_testkit::demo::{DemoBackend, DemoBackendConfig, DemoStats, StaleReuse};

use crate::support::client::{Endpoint, Load, Pacing, Request, Tally};
use crate::support::proxy::{test_config, Metrics, TestConfig, TestProxy, CLOSED_TOTAL};

/// The backend's real keep-alive timeout in every race here.
const BACKEND_KEEPALIVE: Duration = Duration::from_secs(1);
/// Client slots per method; every slot sends `REQUESTS_PER_SLOT` requests.
const SLOTS: usize = 20;
/// Client slots per method of the periodic batch.
const BATCH_SLOTS: usize = 10;
/// The batch's requests take this long at the backend, so a round's requests overlap.
const BATCH_PATH: &str = "/slow?ms=150";
const REQUESTS_PER_SLOT: usize = 10;
/// The pause between two requests on one client connection: around the backend's timeout,
/// which is where the race lives.
const PAUSE: (Duration, Duration) = (Duration::from_millis(900), Duration::from_millis(1100));
const POST_BODY_LEN: usize = 1234;

/// Everything one race run produced.
struct RaceRun {
    /// Independent callers (each on its own clock).
    get: Tally,
    post: Tally,
    /// A periodic batch (all slots fire together, rounds ~1 s apart).
    batch_get: Tally,
    batch_post: Tally,
    backend: DemoStats,
    metrics: Metrics,
    /// Whether kaproxy reported closing idle connections itself (bounded wait after the run).
    kaproxy_closed_idle: bool,
}

impl RaceRun {
    fn tallies(&self) -> [(&'static str, &Tally); 4] {
        [
            ("GET", &self.get),
            ("POST", &self.post),
            ("batch GET", &self.batch_get),
            ("batch POST", &self.batch_post),
        ]
    }

    fn errors(&self) -> usize {
        self.tallies().iter().map(|(_, t)| t.error_count()).sum()
    }

    fn summary(&self) -> String {
        let mut out = String::new();
        for (name, t) in self.tallies() {
            out.push_str(&format!("{name}: {}\n", t.summary()));
        }
        format!(
            "{out}backend: {:?}\nmetrics:\n{}",
            self.backend,
            self.metrics.lines_of("kaproxy_upstream")
        )
    }
}

async fn start_backend() -> DemoBackend {
    DemoBackend::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        DemoBackendConfig {
            name: "race".to_string(),
            keepalive_timeout: BACKEND_KEEPALIVE,
            stale_reuse: StaleReuse::DropRequest,
            ..DemoBackendConfig::default()
        },
    )
    .await
    .expect("start demo backend")
}

fn upstream_toml(backend: SocketAddr, pool: &str) -> String {
    format!("[upstreams.race]\nservers = [\"{backend}\"]\n{pool}\n")
}

/// Runs ≥ 200 GETs and ≥ 200 POSTs from independent callers, and 100 of each from a periodic
/// batch, concurrently through kaproxy, every client connection pausing around the backend's
/// keep-alive timeout between requests.
async fn race(config: TestConfig, backend: DemoBackend) -> RaceRun {
    let proxy = config.start().await;
    let endpoint: Endpoint = proxy.http();
    let get = Request::get("/");
    let post = Request::post("/", vec![b'p'; POST_BODY_LEN]);
    // The batch's requests overlap, so each round needs a connection per slot.
    let batch_get = Request::get(BATCH_PATH);
    let batch_post = Request::post(BATCH_PATH, vec![b'b'; POST_BODY_LEN]);
    let load = |req: &Request, slots: usize, pacing: Pacing| {
        Load::new(endpoint.clone(), req.clone())
            .connections(slots)
            .requests_per_connection(REQUESTS_PER_SLOT)
            .pause(PAUSE.0, PAUSE.1)
            .pacing(pacing)
    };
    let loads = [
        load(&get, SLOTS, Pacing::Independent),
        load(&post, SLOTS, Pacing::Independent),
        load(&batch_get, BATCH_SLOTS, Pacing::Rounds),
        load(&batch_post, BATCH_SLOTS, Pacing::Rounds),
    ];
    let (get, post, batch_get, batch_post) = tokio::join!(
        loads[0].run(),
        loads[1].run(),
        loads[2].run(),
        loads[3].run()
    );
    let (metrics, kaproxy_closed_idle) = proxy
        .wait_metrics(Duration::from_secs(3), |m| {
            m.sum(CLOSED_TOTAL, &[("reason", "idle")])
                + m.sum(CLOSED_TOTAL, &[("reason", "learned_timeout")])
                > 0.0
        })
        .await;
    let backend_stats = backend.stats();
    proxy.shutdown().await;
    backend.stop().await;
    RaceRun {
        get,
        post,
        batch_get,
        batch_post,
        backend: backend_stats,
        metrics,
        kaproxy_closed_idle,
    }
}

fn assert_request_counts(run: &RaceRun) {
    assert!(
        run.get.total() >= 200 && run.post.total() >= 200,
        "{}",
        run.summary()
    );
}

fn assert_no_client_errors(run: &RaceRun) {
    assert_request_counts(run);
    assert_eq!(run.errors(), 0, "client-visible errors\n{}", run.summary());
    let expected = format!("received {POST_BODY_LEN} bytes");
    for (name, tally) in run.tallies() {
        assert_eq!(
            tally.statuses.get(&200),
            Some(&tally.total()),
            "{name}: {}",
            tally.summary()
        );
        if name.contains("POST") {
            for r in &tally.records {
                let body = r.result.as_ref().expect("no errors").body_text();
                assert!(
                    body.contains(&expected),
                    "POST body forwarded whole: {body:?}"
                );
            }
        }
    }
    // The promise itself: no request was ever handed to a connection the backend had given up.
    assert_eq!(
        run.backend.stale_drops,
        0,
        "kaproxy reused stale connections (hidden by retries?)\n{}",
        run.summary()
    );
    assert!(
        run.kaproxy_closed_idle,
        "kaproxy, not the backend, must close idle upstream connections: no {CLOSED_TOTAL} with \
         reason idle|learned_timeout > 0\n{}",
        run.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_with_default_pool_rules_has_no_client_errors() {
    let backend = start_backend().await;
    // The rule: idle_timeout (600 ms) < keepalive_timeout (1 s) - safety_margin (300 ms).
    let config = test_config(&upstream_toml(
        backend.addr(),
        "keepalive_timeout = \"1s\"\nsafety_margin = \"300ms\"\nidle_timeout = \"600ms\"",
    ));
    let run = race(config, backend).await;
    assert_no_client_errors(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_with_naive_pool_shows_client_errors() {
    let backend = start_backend().await;
    let mut config = test_config(&upstream_toml(backend.addr(), ""));
    // Trusts connections for 9 s against a backend that drops them after 1 s.
    config.naive_pool(false);
    let run = race(config, backend).await;
    assert_request_counts(&run);
    eprintln!("naive pool:\n{}", run.summary());
    assert!(
        run.errors() > 0,
        "the naive pool must reproduce the field errors, else this test proves nothing\n{}",
        run.summary()
    );
    assert!(run.backend.stale_drops > 0, "{}", run.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_with_learned_keep_alive_timeout_has_no_client_errors() {
    let backend = start_backend().await;
    // The config is wrong (30 s); the backend says `Keep-Alive: timeout=1` and kaproxy learns it.
    let config = test_config(&upstream_toml(
        backend.addr(),
        "keepalive_timeout = \"30s\"\nidle_timeout = \"20s\"",
    ));
    let run = race(config, backend).await;
    assert_no_client_errors(&run);
}

#[tokio::test]
async fn proxy_serves_demo_backend_with_forwarding_headers() {
    let backend = DemoBackend::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        DemoBackendConfig {
            name: "plain".to_string(),
            ..DemoBackendConfig::default()
        },
    )
    .await
    .expect("start demo backend");
    let proxy = TestProxy::start(&upstream_toml(backend.addr(), "")).await;
    let tally = Load::new(
        proxy.http(),
        Request::get("/").header("host", "app.example.test"),
    )
    .requests_per_connection(3)
    .source_ips(vec!["127.0.0.5".parse().unwrap()])
    .run()
    .await;
    assert_eq!(tally.error_count(), 0, "{}", tally.summary());
    for r in &tally.records {
        let resp = r.result.as_ref().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body_text(), "hello from plain\n");
        assert_eq!(resp.header("x-seen-forwarded-for"), "127.0.0.5");
        assert_eq!(resp.header("x-seen-forwarded-proto"), "http");
        assert_eq!(resp.header("x-seen-host"), "app.example.test");
        assert!(
            resp.header("x-seen-connection")
                .to_ascii_lowercase()
                .contains("keep-alive"),
            "kaproxy asks upstream for keep-alive: {:?}",
            resp.header("x-seen-connection")
        );
    }
    assert_eq!(tally.connects, 1);
    proxy.shutdown().await;
    backend.stop().await;
}
