//! Graceful shutdown: slow requests in flight when shutdown starts all complete (HTTP/1.1 ones
//! with `Connection: close`, HTTP/2 ones despite the GOAWAY), new connections are refused at
//! once, and shutdown returns; the real binary does the same on SIGTERM and exits 0.

use std::net::SocketAddr;
use std::time::Duration;

use kaproxy_testkit::{eventually, poll_until};
use tokio::time::Instant;

use crate::ops::demo_backend;
use crate::support::binary::Binary;
use crate::support::client::{h2_send, KeepAliveClient, Request};
use crate::support::config_file::ConfigFile;
use crate::support::proxy::TestProxy;

/// How long each in-flight request takes at the backend.
const SLOW_MS: u64 = 1000;
/// Concurrent HTTP/1.1 and HTTP/2 requests in flight at shutdown.
const H1_IN_FLIGHT: usize = 3;
const H2_IN_FLIGHT: usize = 2;
/// Bound on every wait in this file.
const BOUND: Duration = Duration::from_secs(10);

fn has_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
}

/// Polls (bounded) until `addr` refuses connections; returns how long that took.
async fn wait_refused(addr: SocketAddr, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let refused = poll_until(within, async || {
        let connect = tokio::net::TcpStream::connect(addr);
        matches!(
            tokio::time::timeout(Duration::from_millis(200), connect).await,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
    .await;
    refused.then(|| start.elapsed())
}

/// Waits (bounded) until the backend has accepted `n` connections: kaproxy has read each
/// request head and is forwarding it.
async fn wait_accepted(backend: &kaproxy_testkit::demo::DemoBackend, n: u64) {
    eventually(
        &format!("the backend accepted {n} connections"),
        BOUND,
        || backend.stats().connections_accepted >= n,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_in_flight_requests_with_connection_close_and_refuses_new_ones() {
    let backend = demo_backend("slow", Duration::from_secs(5)).await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{}\"]\n",
        backend.addr()
    ))
    .await;
    let http = proxy.http();
    let https = proxy.https(&["h2"]);
    let http_addr = http.addr;
    let https_addr = https.addr;
    let slow = Request::get(&format!("/slow?ms={SLOW_MS}"));

    let h1: Vec<_> = (0..H1_IN_FLIGHT)
        .map(|_| {
            let (endpoint, slow) = (http.clone(), slow.clone());
            tokio::spawn(async move {
                KeepAliveClient::new(endpoint, None)
                    .with_timeout(BOUND)
                    .send(&slow)
                    .await
            })
        })
        .collect();
    let h2: Vec<_> = (0..H2_IN_FLIGHT)
        .map(|_| {
            let (endpoint, slow) = (https.clone(), slow.clone());
            tokio::spawn(async move { h2_send(&endpoint, &slow).await })
        })
        .collect();
    wait_accepted(&backend, (H1_IN_FLIGHT + H2_IN_FLIGHT) as u64).await;

    let started = Instant::now();
    let shutdown = tokio::spawn(proxy.shutdown());
    let refused = wait_refused(http_addr, Duration::from_secs(2)).await;
    let in_flight = h1.iter().filter(|t| !t.is_finished()).count()
        + h2.iter().filter(|t| !t.is_finished()).count();
    assert!(
        refused.is_some(),
        "the http listener still accepts 2 s after shutdown started"
    );
    assert!(
        in_flight > 0,
        "refusal ({refused:?}) must come while requests are still in flight, not after the drain"
    );
    assert!(
        wait_refused(https_addr, Duration::from_secs(1))
            .await
            .is_some(),
        "the https listener still accepts after shutdown started"
    );

    for (i, task) in h1.into_iter().enumerate() {
        let resp = tokio::time::timeout(BOUND, task)
            .await
            .expect("bounded")
            .expect("task")
            .unwrap_or_else(|e| panic!("in-flight HTTP/1.1 request {i} failed at shutdown: {e}"));
        assert_eq!(resp.status, 200, "h1 {i}: {}", resp.body_text());
        assert_eq!(resp.version, http::Version::HTTP_11);
        assert!(
            has_close(&resp.headers),
            "h1 {i}: a response finished during shutdown must say Connection: close: {:?}",
            resp.headers
        );
    }
    for (i, task) in h2.into_iter().enumerate() {
        let (resp, alpn) = tokio::time::timeout(BOUND, task)
            .await
            .expect("bounded")
            .expect("task")
            .unwrap_or_else(|e| panic!("in-flight HTTP/2 request {i} failed at shutdown: {e}"));
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(resp.status, 200, "h2 {i}: {}", resp.body_text());
        assert_eq!(resp.version, http::Version::HTTP_2);
    }
    tokio::time::timeout(BOUND, shutdown)
        .await
        .expect("shutdown returns")
        .expect("shutdown task");
    let took = started.elapsed();
    let stats = backend.stats();
    assert_eq!(
        stats.requests_served,
        (H1_IN_FLIGHT + H2_IN_FLIGHT) as u64,
        "{stats:?}"
    );
    // The base test config's shutdown_timeout is 2 s; the requests needed about 1 s.
    assert!(
        took < Duration::from_millis(2000 + SLOW_MS),
        "shutdown took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_binary_finish_a_slow_request_and_exit_0() {
    let backend = demo_backend("slow", Duration::from_secs(5)).await;
    let file = ConfigFile::new();
    file.write(&file.text_with(
        "http = \"127.0.0.1:0\"",
        "listen = \"\"\nshutdown_timeout = \"5s\"",
        "format = \"json\"\naccess_log = false\nlevel = \"info\"",
        &format!("[upstreams.web]\nservers = [\"{}\"]\n", backend.addr()),
    ));
    file.load();
    let mut kaproxy = Binary::spawn(&file.path, &file.file("kaproxy.log"));
    let addr = kaproxy.addr("listening", Some("http")).await;

    let request = tokio::spawn(async move {
        KeepAliveClient::new(crate::support::client::Endpoint::plain(addr), None)
            .with_timeout(BOUND)
            .send(&Request::get(&format!("/slow?ms={SLOW_MS}")))
            .await
    });
    wait_accepted(&backend, 1).await;
    let pid = kaproxy.child.id().expect("kaproxy is running");
    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -TERM {pid}");
    let sent = Instant::now();

    let resp = tokio::time::timeout(BOUND, request)
        .await
        .expect("bounded")
        .expect("task")
        .unwrap_or_else(|e| {
            panic!(
                "the in-flight request failed on SIGTERM: {e}\n{}",
                kaproxy.log()
            )
        });
    assert_eq!(resp.status, 200, "{}", resp.body_text());
    assert!(has_close(&resp.headers), "{:?}", resp.headers);
    let status = tokio::time::timeout(BOUND, kaproxy.child.wait())
        .await
        .unwrap_or_else(|_| panic!("kaproxy still running {BOUND:?} after SIGTERM"))
        .expect("wait for kaproxy");
    assert!(
        status.success(),
        "kaproxy exited with {status} after SIGTERM:\n{}",
        kaproxy.log()
    );
    eprintln!("kaproxy exited {:?} after SIGTERM", sent.elapsed());
    assert_eq!(backend.stats().requests_served, 1);
}
