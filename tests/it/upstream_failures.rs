//! What a client sees when the upstream side fails: `response_timeout` → 504, a full pool
//! (`acquire_timeout`) → 503, connect failures moved to the next server for any method, and
//! the retry rule for a reused connection the backend closed without answering.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use kaproxy_testkit::demo::{DemoBackend, DemoBackendConfig, DemoStats, StaleReuse};
use kaproxy_testkit::eventually;
use tokio::time::Instant;

use crate::support::client::{KeepAliveClient, Request, Response};
use crate::support::proxy::{test_config, Metrics, TestProxy, RETRIES_TOTAL};

const ERRORS_TOTAL: &str = "kaproxy_upstream_errors_total";
const SERVER_UP: &str = "kaproxy_server_up";
/// The passive-health `fall` default: consecutive failures that mark a server down.
const DEFAULT_FALL: f64 = 3.0;

async fn demo(cfg: DemoBackendConfig) -> DemoBackend {
    DemoBackend::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg)
        .await
        .expect("start demo backend")
}

async fn demo_named(name: &str) -> DemoBackend {
    demo(DemoBackendConfig {
        name: name.to_string(),
        ..DemoBackendConfig::default()
    })
    .await
}

/// A loopback address nothing listens on: bound to get a free port, then released. Connecting
/// to it is refused at once.
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr
}

fn single_upstream(backend: SocketAddr, keys: &str) -> String {
    format!("[upstreams.web]\nservers = [\"{backend}\"]\n{keys}\n")
}

async fn send(client: &mut KeepAliveClient, req: &Request) -> Response {
    client
        .send(req)
        .await
        .unwrap_or_else(|e| panic!("{} {}: {e}", req.method, req.path))
}

#[tokio::test]
async fn slow_backend_gets_504_after_response_timeout() {
    let backend = demo_named("slow").await;
    let proxy = TestProxy::start(&single_upstream(
        backend.addr(),
        "response_timeout = \"300ms\"",
    ))
    .await;
    let timeouts = |m: &Metrics| m.sum(ERRORS_TOTAL, &[("kind", "timeout")]);
    let before = timeouts(&proxy.metrics());
    let mut client = KeepAliveClient::new(proxy.http(), None);

    let started = Instant::now();
    let resp = send(&mut client, &Request::get("/slow?ms=1500")).await;
    let took = started.elapsed();
    assert_eq!(resp.status, StatusCode::GATEWAY_TIMEOUT, "{resp:?}");
    assert_eq!(resp.backend(), None, "kaproxy's own answer");
    assert!(!resp.body.is_empty(), "the 504 says why");
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(1200),
        "504 after about response_timeout (300 ms), not after the backend's 1.5 s: {took:?}"
    );
    let m = proxy.metrics();
    assert_eq!(
        timeouts(&m),
        before + 1.0,
        "one upstream timeout counted\n{}",
        m.lines_of(ERRORS_TOTAL)
    );
    assert_eq!(
        m.sum("kaproxy_requests_total", &[("status", "504")]),
        1.0,
        "the 504 is counted as an answered request of that server\n{}",
        m.lines_of("kaproxy_requests_total")
    );

    // The timed-out connection is not reused: the next request gets a good answer.
    let resp = send(&mut client, &Request::get("/slow?ms=20")).await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body_text(), "hello from slow\n");
    proxy.shutdown().await;
}

#[tokio::test]
async fn full_pool_gets_503_after_acquire_timeout_then_recovers() {
    let backend = demo_named("one-slot").await;
    let proxy = TestProxy::start(&single_upstream(
        backend.addr(),
        "max_connections_per_server = 1\nmax_idle_per_server = 1\nacquire_timeout = \"200ms\"",
    ))
    .await;
    let endpoint = proxy.http();

    // The only slot is taken by a slow request.
    let mut slow_client = KeepAliveClient::new(endpoint.clone(), None);
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let resp = slow_client.send(&Request::get("/slow?ms=1500")).await;
        (resp, started.elapsed())
    });
    eventually(
        "the slow request reaches the backend",
        Duration::from_secs(5),
        || backend.stats().connections_accepted >= 1,
    )
    .await;

    let mut client = KeepAliveClient::new(endpoint, None);
    let started = Instant::now();
    let resp = send(&mut client, &Request::get("/")).await;
    let took = started.elapsed();
    assert_eq!(
        resp.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no slot within acquire_timeout: {resp:?}"
    );
    assert!(!resp.body.is_empty(), "the 503 says why");
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1000),
        "503 after about acquire_timeout (200 ms): {took:?}"
    );
    assert!(
        !slow.is_finished(),
        "the 503 came while the slot was still taken"
    );

    let (slow_resp, slow_took) = slow.await.expect("slow request task");
    let slow_resp = slow_resp.expect("the slow request itself succeeds");
    assert_eq!(slow_resp.status, StatusCode::OK);
    assert!(slow_took >= Duration::from_millis(1500), "{slow_took:?}");

    // The slot is free again (the connection went back to the pool).
    for _ in 0..3 {
        let resp = send(&mut client, &Request::get("/")).await;
        assert_eq!(resp.status, StatusCode::OK, "{resp:?}");
    }
    assert_eq!(
        backend.stats().connections_accepted,
        1,
        "max_connections_per_server = 1 held throughout: {:?}",
        backend.stats()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn connect_failure_moves_any_method_to_the_next_server_and_marks_it_down() {
    let live = demo_named("live").await;
    let dead = closed_port();
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{}\", \"{dead}\"]\nbalance = \"round_robin\"\n\
         max_retries = 2\nretry_backoff = \"10ms\"\n",
        live.addr()
    ))
    .await;
    let dead_label = dead.to_string();
    let live_label = live.addr().to_string();
    let mut client = KeepAliveClient::new(proxy.http(), None);
    for i in 0..20 {
        let resp = send(&mut client, &Request::post("/submit", vec![b'p'; 1000])).await;
        assert_eq!(resp.status, StatusCode::OK, "POST {i}: {resp:?}");
        assert_eq!(
            resp.body_text(),
            "live received 1000 bytes\n",
            "POST {i}: the whole body reached the live server"
        );
    }
    let m = proxy.metrics();
    let report = format!(
        "{}\n{}\n{}",
        m.lines_of(RETRIES_TOTAL),
        m.lines_of(ERRORS_TOTAL),
        m.lines_of(SERVER_UP)
    );
    let retries = m.sum(RETRIES_TOTAL, &[("cause", "connect")]);
    let connect_errors = m.sum(
        ERRORS_TOTAL,
        &[("server", dead_label.as_str()), ("kind", "connect")],
    );
    assert!(retries > 0.0, "connect failures were retried\n{report}");
    // Once `fall` connect failures marked it down, the balancer skips the dead server for the
    // cool-down (10 s, longer than this test), so it is tried exactly `fall` times.
    assert_eq!(
        connect_errors, DEFAULT_FALL,
        "the dead server was tried until marked down, then skipped\n{report}"
    );
    assert_eq!(
        retries, connect_errors,
        "every connect failure was retried\n{report}"
    );
    assert_eq!(
        m.sum(SERVER_UP, &[("server", dead_label.as_str())]),
        0.0,
        "the dead server is marked down\n{report}"
    );
    assert_eq!(
        m.sum(SERVER_UP, &[("server", live_label.as_str())]),
        1.0,
        "{report}"
    );
    assert_eq!(live.stats().requests_served, 20);
    proxy.shutdown().await;
}

#[tokio::test]
async fn every_server_refusing_gives_502() {
    let (a, b) = (closed_port(), closed_port());
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{a}\", \"{b}\"]\nmax_retries = 2\nretry_backoff = \"10ms\"\n"
    ))
    .await;
    let mut client = KeepAliveClient::new(proxy.http(), None);
    // Enough requests that both servers are marked down: all-down still tries, and fails.
    for i in 0..4 {
        let req = if i % 2 == 0 {
            Request::get("/")
        } else {
            Request::post("/", "body")
        };
        let started = Instant::now();
        let resp = send(&mut client, &req).await;
        assert_eq!(
            resp.status,
            StatusCode::BAD_GATEWAY,
            "request {i}: {resp:?}"
        );
        assert!(!resp.body.is_empty(), "the 502 says why");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused connects fail fast: {:?}",
            started.elapsed()
        );
    }
    let m = proxy.metrics();
    assert!(
        m.sum(ERRORS_TOTAL, &[("kind", "connect")]) >= 4.0,
        "{}",
        m.lines_of(ERRORS_TOTAL)
    );
    for server in [a, b] {
        assert_eq!(
            m.sum(SERVER_UP, &[("server", server.to_string().as_str())]),
            0.0,
            "{}",
            m.lines_of(SERVER_UP)
        );
    }
    proxy.shutdown().await;
}

/// The backend's keep-alive timeout in the stale-reuse cases.
const STALE_KEEPALIVE: Duration = Duration::from_secs(1);
/// The idle pause that makes the pooled connection stale: longer than the backend's timeout.
/// It is the scenario itself, not a wait for something to happen.
const STALE_PAUSE: Duration = Duration::from_millis(1200);

/// What one stale-reuse case produced.
#[derive(Debug)]
struct StaleOutcome {
    status: StatusCode,
    body: String,
    retries: f64,
    /// Request bodies that went to a temporary file.
    spilled: f64,
    backend: DemoStats,
    /// Only read through `Debug`, in failure messages.
    #[allow(dead_code)]
    metrics: String,
}

/// A request sent on a pooled connection that the backend then drops unanswered (the
/// keep-alive race, made deterministic by [`StaleReuse::DropRequest`]) behind a naive pool
/// that trusts connections for 9 s and never learns the backend's 1 s.
async fn stale_reuse(method: Method, body: &'static [u8], retry_idempotent: bool) -> StaleOutcome {
    stale_reuse_buffered(method, body, retry_idempotent, true).await
}

/// [`stale_reuse`] with bodies read whole first (`request_buffering`, the default) or
/// streamed from their first byte (`request_buffering = false`, `request_buffer_bytes = 0`).
async fn stale_reuse_buffered(
    method: Method,
    body: &'static [u8],
    retry_idempotent: bool,
    request_buffering: bool,
) -> StaleOutcome {
    let backend = demo(DemoBackendConfig {
        name: "stale".to_string(),
        keepalive_timeout: STALE_KEEPALIVE,
        stale_reuse: StaleReuse::DropRequest,
        ..DemoBackendConfig::default()
    })
    .await;
    let mut config = test_config(&single_upstream(backend.addr(), ""));
    // No deadline saves the connection.
    config.naive_pool(retry_idempotent);
    if !request_buffering {
        let buffers = &mut config.config.upstreams[0].buffers;
        buffers.request_buffering = false;
        buffers.request_buffer_bytes = 0;
    }
    let proxy = config.start().await;
    let mut client = KeepAliveClient::new(proxy.http(), None);

    let warm = send(&mut client, &Request::get("/warm")).await;
    assert_eq!(warm.status, StatusCode::OK, "{warm:?}");
    tokio::time::sleep(STALE_PAUSE).await;
    let req = Request {
        method: method.clone(),
        path: "/stale".to_string(),
        headers: Vec::new(),
        body: Bytes::from_static(body),
    };
    let resp = send(&mut client, &req).await;
    let m = proxy.metrics();
    let outcome = StaleOutcome {
        status: resp.status,
        body: resp.body_text(),
        retries: m.sum(RETRIES_TOTAL, &[]),
        spilled: m.sum("kaproxy_body_spilled_total", &[("direction", "request")]),
        backend: backend.stats(),
        metrics: format!(
            "{}\n{}\n{}",
            m.lines_of(RETRIES_TOTAL),
            m.lines_of(ERRORS_TOTAL),
            m.lines_of("kaproxy_upstream_connections")
        ),
    };
    assert_eq!(
        outcome.backend.stale_drops, 1,
        "{method}: kaproxy reused the stale connection once (the race happened): {outcome:#?}"
    );
    assert!(
        m.sum("kaproxy_upstream_connections_reused_total", &[]) >= 1.0,
        "{method}: {outcome:#?}"
    );
    proxy.shutdown().await;
    outcome
}

#[tokio::test]
async fn bodiless_idempotent_request_on_a_dropped_reused_connection_is_retried_fresh() {
    let (get, head, delete) = tokio::join!(
        stale_reuse(Method::GET, b"", true),
        stale_reuse(Method::HEAD, b"", true),
        stale_reuse(Method::DELETE, b"", true),
    );
    for (method, outcome) in [("GET", get), ("HEAD", head), ("DELETE", delete)] {
        assert_eq!(
            outcome.status,
            StatusCode::OK,
            "{method}: retried once on a fresh connection: {outcome:#?}"
        );
        if method != "HEAD" {
            assert_eq!(outcome.body, "hello from stale\n", "{method}");
        }
        assert_eq!(outcome.retries, 1.0, "{method}: {outcome:#?}");
        assert_eq!(
            outcome.backend.connections_accepted, 2,
            "{method}: the retry used a fresh connection: {outcome:#?}"
        );
        assert_eq!(
            outcome.backend.requests_served, 2,
            "{method}: warm-up and retry: {outcome:#?}"
        );
    }
}

#[tokio::test]
async fn sent_request_that_is_not_idempotent_or_streamed_its_body_is_not_retried() {
    let (post, put) = tokio::join!(
        stale_reuse(Method::POST, b"order=42", true),
        // Streamed from its first byte, so it cannot be sent again.
        stale_reuse_buffered(Method::PUT, b"replace=1", true, false),
    );
    for (method, outcome) in [("POST", post), ("PUT with a streamed body", put)] {
        assert_eq!(
            outcome.status,
            StatusCode::BAD_GATEWAY,
            "{method}: the backend may have acted on it, kaproxy must not send it again: \
             {outcome:#?}"
        );
        assert_eq!(outcome.retries, 0.0, "{method}: {outcome:#?}");
        assert_eq!(
            outcome.backend.requests_served, 1,
            "{method}: only the warm-up was answered: {outcome:#?}"
        );
    }
}

#[tokio::test]
async fn put_with_a_buffered_body_is_retried_fresh() {
    // The body (9 bytes ≤ request_buffer_bytes) was read whole before sending, so the
    // idempotent PUT can be sent again after the keep-alive race.
    let outcome = stale_reuse(Method::PUT, b"replace=1", true).await;
    assert_eq!(outcome.status, StatusCode::OK, "{outcome:#?}");
    assert_eq!(outcome.body, "stale received 9 bytes\n", "{outcome:#?}");
    assert_eq!(outcome.retries, 1.0, "{outcome:#?}");
    assert_eq!(outcome.backend.connections_accepted, 2, "{outcome:#?}");
}

#[tokio::test]
async fn put_with_a_body_read_whole_to_disk_is_retried_fresh() {
    // 200 KiB: past request_buffer_bytes, so the body waits in a temporary file, and is read
    // from it again for the retry after the keep-alive race.
    let body: &'static [u8] = Box::leak(vec![b'd'; 200 * 1024].into_boxed_slice());
    let outcome = stale_reuse(Method::PUT, body, true).await;
    assert_eq!(outcome.status, StatusCode::OK, "{outcome:#?}");
    assert_eq!(
        outcome.body, "stale received 204800 bytes\n",
        "{outcome:#?}"
    );
    assert_eq!(outcome.spilled, 1.0, "the body was on disk: {outcome:#?}");
    assert_eq!(outcome.retries, 1.0, "{outcome:#?}");
    assert_eq!(outcome.backend.connections_accepted, 2, "{outcome:#?}");
}

#[tokio::test]
async fn retry_idempotent_false_turns_the_dropped_get_into_502() {
    let outcome = stale_reuse(Method::GET, b"", false).await;
    assert_eq!(outcome.status, StatusCode::BAD_GATEWAY, "{outcome:#?}");
    assert_eq!(outcome.retries, 0.0, "{outcome:#?}");
    assert_eq!(outcome.backend.requests_served, 1, "{outcome:#?}");
}

#[tokio::test]
async fn a_connect_failure_moves_to_another_server_without_the_back_off() {
    // A back-off far longer than the client waits: only an attempt on the same servers again
    // may wait it (README, "When a request is sent again").
    let (dead, live) = (closed_port(), demo_named("live").await);
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{dead}\", \"{}\"]\nmax_retries = 2\nretry_backoff = \"30s\"\n",
        live.addr()
    ))
    .await;
    let mut client = KeepAliveClient::new(proxy.http(), None).with_timeout(Duration::from_secs(5));
    for i in 0..4 {
        let req = if i % 2 == 0 {
            Request::get("/")
        } else {
            Request::post("/", "body")
        };
        let resp = send(&mut client, &req).await;
        assert_eq!(resp.status, StatusCode::OK, "request {i}: {resp:?}");
    }
    let m = proxy.metrics();
    assert!(
        m.sum(RETRIES_TOTAL, &[("cause", "connect")]) >= 1.0,
        "the dead server was tried and left: {}",
        m.lines_of(RETRIES_TOTAL)
    );
}

#[tokio::test]
async fn with_every_server_tried_a_connect_failure_waits_the_back_off_and_tries_again() {
    let dead = closed_port();
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{dead}\"]\nmax_retries = 2\nretry_backoff = \"50ms\"\n"
    ))
    .await;
    let mut client = KeepAliveClient::new(proxy.http(), None);
    let resp = send(&mut client, &Request::post("/", "body")).await;
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{resp:?}");
    let m = proxy.metrics();
    assert_eq!(
        m.sum(ERRORS_TOTAL, &[("kind", "connect")]),
        3.0,
        "the one server, tried again twice (max_retries): {}",
        m.lines_of(ERRORS_TOTAL)
    );
    assert_eq!(m.sum(RETRIES_TOTAL, &[("cause", "connect")]), 2.0);
}
