//! The promise for every backend, not only Apache: the widened keep-alive race (a delay relay
//! between kaproxy and the backend, one client pausing just under the backend's real idle
//! timeout, GET and POST) against real nginx, Gunicorn, Node and Go servers with a 1 s
//! timeout, kaproxy's config left at its defaults — told nothing of the backend. Three of the
//! four send no `Keep-Alive` header, so kaproxy must find the timeout from the backend's own
//! closes (its pool's module doc): 0 client-visible errors, the timeout it holds the server to
//! converging to the backend's, while a naive pool fails under the same test.

use std::time::Duration;

use kaproxy_testkit::backends::{require_backend, BackendKind, RealBackend};
use kaproxy_testkit::relay::DelayRelay;

use crate::support::client::{Load, Pacing, Request, Tally};
use crate::support::proxy::{test_config, Metrics, TestProxy};

/// The backends' configured idle timeout.
const BACKEND_IDLE: Duration = Duration::from_secs(1);
/// One-way delay of the relay: a backend's FIN reaches kaproxy this long after it closed.
const RELAY_DELAY: Duration = Duration::from_millis(100);
/// Requests per method, on one client connection (so kaproxy's upstream connection idles as
/// long as the client pauses).
const REQUESTS: usize = 6;
const POST_LEN: usize = 1000;

struct Run {
    get: Tally,
    post: Tally,
}

impl Run {
    fn errors(&self) -> usize {
        [&self.get, &self.post]
            .iter()
            .map(|t| t.total() - t.statuses.get(&200).copied().unwrap_or(0))
            .sum()
    }

    fn summary(&self) -> String {
        format!("GET: {}\nPOST: {}", self.get.summary(), self.post.summary())
    }
}

/// The pause between requests: just under when the backend really closes (`closes`), so a
/// connection trusted that long reaches the backend (a relay delay later) after its timer
/// fired, while its FIN is still in the relay.
fn pause(closes: Duration) -> (Duration, Duration) {
    (
        closes - Duration::from_millis(150),
        closes - Duration::from_millis(50),
    )
}

async fn race(proxy: &TestProxy, closes: Duration) -> Run {
    let (lo, hi) = pause(closes);
    let load = |req: Request| {
        Load::new(proxy.http(), req)
            .connections(1)
            .requests_per_connection(REQUESTS)
            .pause(lo, hi)
            .pacing(Pacing::Independent)
    };
    let get = load(Request::get("/")).run().await;
    let post = load(Request::post("/", vec![b'p'; POST_LEN])).run().await;
    Run { get, post }
}

/// The timeout kaproxy holds the server to, and its source, from
/// `kaproxy_upstream_keepalive_timeout_seconds`.
fn held_to(m: &Metrics) -> (f64, String) {
    let mut series = m.samples("kaproxy_upstream_keepalive_timeout_seconds");
    let (labels, value) = series.next().expect("one series per server");
    let source = labels
        .iter()
        .find(|(k, _)| k == "source")
        .map(|(_, v)| v.to_string())
        .expect("a source label");
    (value, source)
}

/// Both runs for one kind: kaproxy at its defaults, clean and converged; the naive pool failing.
async fn promise_holds_for(kind: BackendKind) {
    if !require_backend(kind) {
        return;
    }
    let backend = RealBackend::start(kind, BACKEND_IDLE)
        .await
        .unwrap_or_else(|e| panic!("{} did not start: {e}", kind.name()));
    let relay = DelayRelay::start(backend.addr(), RELAY_DELAY)
        .await
        .expect("relay");
    let closes = backend.closes_idle_after();
    let upstream = format!("[upstreams.web]\nservers = [\"{}\"]\n", relay.addr());

    let posts_before = backend.post_count().await;
    let proxy = test_config(&upstream).start().await;
    let run = race(&proxy, closes).await;
    let m = proxy.metrics();
    assert_eq!(
        run.errors(),
        0,
        "{}: client-visible errors with kaproxy's defaults\n{}\n{}\n{}",
        kind.name(),
        run.summary(),
        m.lines_of("kaproxy_upstream_connections_closed_total"),
        backend.log()
    );
    for r in &run.post.records {
        let body = &r.result.as_ref().expect("no errors").body;
        assert_eq!(body.as_ref(), format!("got {POST_LEN} bytes\n").as_bytes());
    }
    if let (Some(before), Some(after)) = (posts_before, backend.post_count().await) {
        assert_eq!(
            after - before,
            REQUESTS as u64,
            "{}: every POST processed once",
            kind.name()
        );
    }
    let (timeout, source) = held_to(&m);
    if kind.sends_keep_alive_header() {
        assert_eq!(source, "header", "{}", kind.name());
    } else {
        assert_eq!(
            source,
            "observed",
            "{}: learned from its closes",
            kind.name()
        );
        // Seen at the backend's real close: its FIN through the relay is as late as its idle
        // clock started, so a close seen by the sweep measures the timeout itself; a reuse
        // that met the close measures it less up to one round trip (the backend's clock
        // started a relay delay before kaproxy's, and the request took one more). Above it,
        // within the backend's own timer granularity (Gunicorn checks once a second).
        let slack = if kind == BackendKind::Gunicorn {
            1.1
        } else {
            0.15
        };
        let real = closes.as_secs_f64();
        let round_trip = 2.0 * RELAY_DELAY.as_secs_f64();
        assert!(
            timeout >= real - round_trip - 0.05 && timeout <= real + slack,
            "{}: observed {timeout} s, the backend closes at {real} s",
            kind.name()
        );
    }
    proxy.shutdown().await;

    // The control: a pool that trusts connections for 9 s and learns nothing.
    let mut naive = test_config(&upstream);
    naive.naive_pool(false);
    let proxy = naive.start().await;
    let run = race(&proxy, closes).await;
    eprintln!(
        "{} behind the relay, naive pool:\n{}",
        kind.name(),
        run.summary()
    );
    assert!(
        run.errors() > 0,
        "{}: the naive pool must fail under the same race, else it proves nothing\n{}",
        kind.name(),
        run.summary()
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_backend_without_a_keep_alive_header() {
    promise_holds_for(BackendKind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gunicorn_backend_without_a_keep_alive_header() {
    promise_holds_for(BackendKind::Gunicorn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_backend_with_a_keep_alive_header() {
    promise_holds_for(BackendKind::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_backend_without_a_keep_alive_header() {
    promise_holds_for(BackendKind::Go).await;
}
