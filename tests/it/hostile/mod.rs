//! Hostile and slow clients: nothing one client does may hold a backend connection without a
//! deadline, mark a backend down, or starve other clients. Each probe is sent as raw bytes
//! (HTTP/1.1 over a plain socket) or as raw HTTP/2 (the `h2` crate, zero window), with short
//! downstream timeouts; each test checks the answer, the bounded hold on the upstream
//! connection (kaproxy's metrics), that the backend stays up, and that a normal request on
//! another connection is served meanwhile.
//!
//! By what misbehaves: [`requests`] (HTTP/1.1 clients and their bodies), [`http2`] (HTTP/2
//! clients), [`backends`] (what a backend sends back, or does not); the shared proxy set-up
//! and assertions are here.

mod backends;
mod http2;
mod requests;

use std::net::SocketAddr;
use std::time::Duration;

use kaproxy_testkit::demo::DemoBackend;
use kaproxy_testkit::poll_until;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::backend::RecordingBackend;
use crate::support::client::{h2_send, KeepAliveClient, Load, Request};
use crate::support::hostile::{
    connect_small_rcvbuf, drain, raw_exchange, read_response, BulkBackend, End, RawBackend,
    RawBehaviour, StreamEnd, ZeroWindowStream, RAW_BOUND,
};
use crate::support::proxy::{Metrics, TestProxy, CLOSED_TOTAL, POOL_IDLE, RETRIES_TOTAL};
use kaproxy_testkit::apache::{require_apache, Apache, ApacheOptions};

const OPENED_TOTAL: &str = "kaproxy_upstream_connections_opened_total";
const ERRORS_TOTAL: &str = "kaproxy_upstream_errors_total";
const SERVER_UP: &str = "kaproxy_server_up";

/// The downstream timeouts every test here runs with.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
const BODY_TIMEOUT: Duration = Duration::from_secs(1);
const DOWNSTREAM: &str =
    "[downstream]\nbody_timeout = \"1s\"\nsend_timeout = \"1s\"\nheader_timeout = \"2s\"\n";
/// What a 1 s timer may take to act on a busy test machine: timer, write, metrics.
const TIMER_SLACK: Duration = Duration::from_secs(3);
/// The passive-health `fall` default: this many consecutive failures mark a server down.
const DEFAULT_FALL: usize = 3;
const MIB: usize = 1024 * 1024;
/// A pool that keeps an idle connection long past these tests, so that a close is kaproxy's
/// decision about the request or message, not its idle timer.
const LONG_POOL: &str = "keepalive_timeout = \"30s\"\nidle_timeout = \"20s\"";
/// The default `request_buffer_bytes` / `response_buffer_bytes`.
const BUFFER_BYTES: usize = 64 * 1024;
/// Bodies stream both ways past their first `BUFFER_BYTES` (nginx's `proxy_request_buffering
/// off` and `proxy_buffering off`): what the send and body deadlines must still bound.
const STREAMING: &str = "request_buffering = false\nresponse_buffering = false";

fn label(addr: SocketAddr) -> String {
    addr.to_string()
}

/// kaproxy with the short downstream timeouts and one upstream group over `servers`.
async fn proxy(servers: &[SocketAddr], upstream_keys: &str) -> TestProxy {
    let list = servers
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ");
    TestProxy::start(&format!(
        "{DOWNSTREAM}\n[upstreams.web]\nservers = [{list}]\n{upstream_keys}\n"
    ))
    .await
}

fn closed_with(m: &Metrics, server: &str, reason: &str) -> f64 {
    m.sum(CLOSED_TOTAL, &[("server", server), ("reason", reason)])
}

/// Upstream connections of `server` neither closed nor idle in the pool: held by a request.
fn held(m: &Metrics, server: &str) -> f64 {
    m.sum(OPENED_TOTAL, &[("server", server)])
        - m.sum(CLOSED_TOTAL, &[("server", server)])
        - m.sum(POOL_IDLE, &[("server", server)])
}

/// The upstream-side metrics, for assertion messages: every non-zero counter and gauge, and
/// every `server_up`.
fn report(m: &Metrics) -> String {
    [
        OPENED_TOTAL,
        CLOSED_TOTAL,
        POOL_IDLE,
        ERRORS_TOTAL,
        RETRIES_TOTAL,
        SERVER_UP,
    ]
    .iter()
    .flat_map(|name| {
        m.lines_of(name)
            .lines()
            .filter(|l| *name == SERVER_UP || !l.ends_with(" 0"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    })
    .collect::<Vec<_>>()
    .join("\n")
}

/// A normal GET on its own connection is answered 200 by a backend.
async fn normal_get_succeeds(proxy: &TestProxy, when: &str) {
    let mut client = KeepAliveClient::new(proxy.http(), None).with_timeout(Duration::from_secs(5));
    let resp = client
        .send(&Request::get("/normal"))
        .await
        .unwrap_or_else(|e| panic!("a normal GET {when} failed: {e}"));
    assert_eq!(resp.status, 200, "a normal GET {when}: {resp:?}");
}

/// The backend is still up and no upstream failure was blamed on it.
fn assert_backend_not_blamed(m: &Metrics, server: &str, what: &str) {
    assert_eq!(
        m.sum(SERVER_UP, &[("server", server)]),
        1.0,
        "{what}: the backend stays up\n{}",
        report(m)
    );
    assert_eq!(
        m.sum(ERRORS_TOTAL, &[("server", server)]),
        0.0,
        "{what}: a client's fault is not counted as an upstream error\n{}",
        report(m)
    );
}

/// Waits (bounded) until no upstream connection of `server` is held by a request.
async fn assert_nothing_held(proxy: &TestProxy, server: &str, what: &str) {
    let (m, released) = proxy
        .wait_metrics(TIMER_SLACK, |m| held(m, server) == 0.0)
        .await;
    assert!(
        released,
        "{what}: no upstream connection stays held (opened - closed - idle == 0)\n{}",
        report(&m)
    );
}

/// The upstream connection of `what` (started at `started`) is closed with reason `error`
/// within send_timeout plus the timer slack.
async fn assert_upstream_cut_within_send_timeout(
    proxy: &TestProxy,
    server: &str,
    started: Instant,
    what: &str,
) {
    let (m, closed) = proxy
        .wait_metrics(SEND_TIMEOUT + TIMER_SLACK + Duration::from_secs(2), |m| {
            closed_with(m, server, "error") >= 1.0
        })
        .await;
    let took = started.elapsed();
    assert!(
        closed,
        "the upstream connection of the {what} is closed with reason error\n{}",
        report(&m)
    );
    assert!(
        took < SEND_TIMEOUT + TIMER_SLACK,
        "closed within send_timeout (1 s) + slack, not after {took:?}\n{}",
        report(&m)
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Send stall
// ---------------------------------------------------------------------------------------------
