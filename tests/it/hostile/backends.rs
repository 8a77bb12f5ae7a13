//! What a backend does to a request it was sent: framing it should not send (CL+TE,
//! conflicting lengths, a chunk line kaproxy cannot forward), resets, silence, hard restarts.

use super::*;

#[tokio::test]
async fn response_with_content_length_and_chunked_is_forwarded_by_its_chunks_and_not_reused() {
    let backend = RawBackend::start(RawBehaviour::Canned(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    ))
    .await;
    let proxy = proxy(&[backend.addr()], LONG_POOL).await;
    let server = label(backend.addr());
    let addr = proxy.server.http_addr().unwrap();

    // HTTP/1.1 client, read byte for byte.
    let resp = raw_exchange(addr, b"GET /te HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(resp.status, Some(200), "{resp:?}");
    assert_eq!(
        resp.body_text(),
        "hello",
        "the chunks win over Content-Length: {resp:?}"
    );
    assert!(
        resp.header_values("content-length")
            .iter()
            .all(|v| v == "5"),
        "never Content-Length: 3 (nor any length but the body's): {resp:?}"
    );
    wait_closed(&proxy, &backend, &server, 1, "HTTP/1.1").await;

    // HTTP/2 client.
    let (resp, alpn) = h2_send(&proxy.https(&["h2"]), &Request::get("/te"))
        .await
        .unwrap_or_else(|e| panic!("h2 GET /te: {e}"));
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body_text(), "hello", "{resp:?}");
    let lengths: Vec<_> = resp.headers.get_all("content-length").iter().collect();
    assert!(
        lengths.iter().all(|v| v.as_bytes() == b"5"),
        "no content-length: 3 over HTTP/2: {:?}",
        resp.headers
    );
    wait_closed(&proxy, &backend, &server, 2, "HTTP/2").await;
    assert_backend_not_blamed(&proxy.metrics(), &server, "CL + TE response");
    proxy.shutdown().await;
}

/// Waits (bounded) until `n` upstream connections to the raw backend were closed after their
/// response: the backend saw EOF, or kaproxy counted a close with reason error; none is pooled.
async fn wait_closed(proxy: &TestProxy, backend: &RawBackend, server: &str, n: usize, what: &str) {
    let mut last = proxy.metrics();
    let closed = poll_until(RAW_BOUND, async || {
        last = proxy.metrics();
        backend.stats().closed_by_peer >= n || closed_with(&last, server, "error") >= n as f64
    })
    .await;
    assert!(
        closed,
        "{what}: the upstream connection is closed after a response with both Content-Length \
         and Transfer-Encoding: backend {:?}\n{}",
        backend.stats(),
        report(&last)
    );
    assert_eq!(
        last.sum(POOL_IDLE, &[("server", server)]),
        0.0,
        "{what}: not pooled\n{}",
        report(&last)
    );
}

#[tokio::test]
async fn response_with_conflicting_content_lengths_gets_502() {
    let backend = RawBackend::start(RawBehaviour::Canned(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello",
    ))
    .await;
    let proxy = proxy(&[backend.addr()], LONG_POOL).await;
    let addr = proxy.server.http_addr().unwrap();
    let resp = raw_exchange(addr, b"GET /cl HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(
        resp.status,
        Some(502),
        "kaproxy never forwards a length that disagrees with the body: {resp:?}"
    );
    let h2 = h2_send(&proxy.https(&["h2"]), &Request::get("/cl")).await;
    match &h2 {
        Ok((resp, _)) => assert_eq!(resp.status, 502, "HTTP/2: {resp:?}"),
        Err(e) => panic!("HTTP/2: a 502, not {e}"),
    }
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Host (RFC 9112 §3.2)
// ---------------------------------------------------------------------------------------------

async fn demo_named(name: &str) -> DemoBackend {
    DemoBackend::named(name).await
}

const RETRY_KEYS: &str = "balance = \"round_robin\"\nmax_retries = 2\nretry_backoff = \"10ms\"";

#[tokio::test]
async fn get_reset_on_a_fresh_connection_moves_to_the_next_server() {
    let bad = RawBackend::start(RawBehaviour::ResetAfterRequest).await;
    let good = demo_named("good").await;
    let proxy = proxy(&[bad.addr(), good.addr()], RETRY_KEYS).await;
    let bad_label = label(bad.addr());
    let mut client = KeepAliveClient::new(proxy.http(), None).with_timeout(Duration::from_secs(5));
    let mut failures = Vec::new();
    for i in 0..20 {
        match client.send(&Request::get("/")).await {
            Ok(resp) if resp.status == 200 && resp.backend().as_deref() == Some("good") => {}
            other => failures.push(format!("GET {i}: {other:?}")),
        }
    }
    let m = proxy.metrics();
    assert!(
        failures.is_empty(),
        "every GET reset by the bad server is moved to the good one:\n{}\nbad backend {:?}\n{}",
        failures.join("\n"),
        bad.stats(),
        report(&m)
    );
    let retried = m.sum(RETRIES_TOTAL, &[("server", &bad_label), ("cause", "reset")])
        + m.sum(
            RETRIES_TOTAL,
            &[("server", &bad_label), ("cause", "closed_before_response")],
        );
    assert!(
        retried > 0.0,
        "the resets were retried (cause reset)\nbad backend {:?}\n{}",
        bad.stats(),
        report(&m)
    );
    assert!(bad.stats().requests > 0, "{:?}", bad.stats());
    assert_eq!(
        m.sum(SERVER_UP, &[("server", &label(good.addr()))]),
        1.0,
        "{}",
        report(&m)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn post_written_to_a_resetting_server_gets_502_and_is_not_retried() {
    const BODY_LEN: usize = 1000;
    let bad = RawBackend::start(RawBehaviour::ResetAfterRequest).await;
    let good = demo_named("good").await;
    let proxy = proxy(&[bad.addr(), good.addr()], RETRY_KEYS).await;
    let mut client = KeepAliveClient::new(proxy.http(), None).with_timeout(Duration::from_secs(5));
    let mut statuses = Vec::new();
    // Round robin over two servers: one of the two POSTs goes to the resetting one.
    for i in 0..2 {
        let resp = client
            .send(&Request::post("/order", vec![b'p'; BODY_LEN]))
            .await
            .unwrap_or_else(|e| panic!("POST {i}: {e}"));
        if resp.status == 200 {
            assert_eq!(
                resp.body_text(),
                format!("good received {BODY_LEN} bytes\n"),
                "POST {i}"
            );
        }
        statuses.push(resp.status.as_u16());
    }
    let m = proxy.metrics();
    let written = bad.stats().requests;
    assert!(
        written >= 1,
        "precondition: a POST reached the resetting server: {:?} {statuses:?}",
        bad.stats()
    );
    assert_eq!(
        bad.stats().body_bytes,
        written * BODY_LEN,
        "its whole body was written"
    );
    let bad_gateways = statuses.iter().filter(|s| **s == 502).count();
    assert_eq!(
        bad_gateways,
        written,
        "every POST whose body was written to the resetting server is a 502 (it may have been \
         acted on), every other one a 200: {statuses:?}\n{}",
        report(&m)
    );
    assert_eq!(
        m.sum(RETRIES_TOTAL, &[]),
        0.0,
        "a written POST is not retried\n{}",
        report(&m)
    );
    normal_get_succeeds(&proxy, "after the reset POST").await;
    proxy.shutdown().await;
}

/// A silent backend and a good one behind kaproxy with response_timeout 300 ms and
/// `retry_on_timeout` as given; the good one is returned so it lives as long as the test.
async fn silent_and_good(
    retry_on_timeout: bool,
) -> (RawBackend, DemoBackend, TestProxy, KeepAliveClient) {
    let silent = RawBackend::start(RawBehaviour::Silent).await;
    let good = demo_named("good").await;
    let proxy = proxy(
        &[silent.addr(), good.addr()],
        &format!(
            "{RETRY_KEYS}\nresponse_timeout = \"300ms\"\nretry_on_timeout = {retry_on_timeout}"
        ),
    )
    .await;
    let client = KeepAliveClient::new(proxy.http(), None).with_timeout(Duration::from_secs(5));
    (silent, good, proxy, client)
}

#[tokio::test]
async fn retry_on_timeout_moves_a_get_from_a_silent_server_to_the_next() {
    let (silent, _good, proxy, mut client) = silent_and_good(true).await;
    let mut failures = Vec::new();
    for i in 0..6 {
        match client.send(&Request::get("/")).await {
            Ok(resp) if resp.status == 200 && resp.backend().as_deref() == Some("good") => {}
            other => failures.push(format!("GET {i}: {other:?}")),
        }
    }
    let m = proxy.metrics();
    assert!(
        failures.is_empty(),
        "with retry_on_timeout every GET ends on the good server:\n{}\nsilent backend {:?}\n{}",
        failures.join("\n"),
        silent.stats(),
        report(&m)
    );
    assert!(
        m.sum(
            RETRIES_TOTAL,
            &[("server", &label(silent.addr())), ("cause", "timeout")]
        ) > 0.0,
        "the timeouts were retried (cause timeout)\nsilent backend {:?}\n{}",
        silent.stats(),
        report(&m)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_retry_on_timeout_a_silent_server_gives_504() {
    let (silent, _good, proxy, mut client) = silent_and_good(false).await;
    let mut statuses = Vec::new();
    // Round robin over two servers: one of the two GETs goes to the silent one.
    for i in 0..2 {
        let resp = client
            .send(&Request::get("/"))
            .await
            .unwrap_or_else(|e| panic!("GET {i}: {e}"));
        statuses.push(resp.status.as_u16());
    }
    let m = proxy.metrics();
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [200, 504],
        "the GET sent to the silent server times out, the other is served: {statuses:?}\n\
         silent backend {:?}\n{}",
        silent.stats(),
        report(&m)
    );
    assert_eq!(
        m.sum(RETRIES_TOTAL, &[("cause", "timeout")]),
        0.0,
        "{}",
        report(&m)
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Under load against real Apache
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_hard_restarts_under_load_cost_no_get() {
    if !require_apache() {
        return;
    }
    let mut apaches = Vec::new();
    for name in ["h1", "h2"] {
        apaches.push(
            Apache::start(
                ApacheOptions::new(name)
                    .keep_alive_timeout(Duration::from_secs(10))
                    .max_keep_alive_requests(100_000),
            )
            .await
            .expect("start apache"),
        );
    }
    let servers: Vec<SocketAddr> = apaches.iter().map(Apache::addr).collect();
    let proxy = proxy(
        &servers,
        &format!("{RETRY_KEYS}\nkeepalive_timeout = \"10s\"\nidle_timeout = \"8s\""),
    )
    .await;
    // 5 keep-alive connections, each a GET about every 50 ms: ~100 GET/s for ~4 s, a crash
    // about every 1.3 s. For a longer measurement (not in CI), KAPROXY_APACHE_KILL_LOAD=
    // "CONNSxREQUESTS@INTERVAL_MS", e.g. "25x600@10000": ~500 GET/s for ~30 s, a crash every 10 s.
    let (conns, per_conn, every) = std::env::var("KAPROXY_APACHE_KILL_LOAD")
        .ok()
        .and_then(|v| {
            let (load, every) = v.split_once('@')?;
            let (c, r) = load.split_once('x')?;
            Some((c.parse().ok()?, r.parse().ok()?, every.parse().ok()?))
        })
        .unwrap_or((5usize, 80usize, 1300u64));
    let mut load = Load::new(proxy.http(), Request::get("/"))
        .connections(conns)
        .requests_per_connection(per_conn)
        .pause(Duration::from_millis(40), Duration::from_millis(60));
    load.timeout = Duration::from_secs(5);
    let restarted = &mut apaches[0];
    let (tally, restarts) = tokio::join!(load.run(), async {
        let mut results = Vec::new();
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(every)).await;
            results.push(restarted.hard_restart().await);
        }
        results
    });
    for (i, r) in restarts.iter().enumerate() {
        assert!(r.is_ok(), "hard restart {i}: {r:?}");
    }
    assert_eq!(tally.total(), conns * per_conn);
    assert_eq!(
        tally.error_count(),
        0,
        "no GET fails while an Apache is SIGKILLed twice: {}\n{}\n{}",
        tally.summary(),
        apaches
            .iter()
            .map(|a| format!("{}: {}", a.name(), a.error_log()))
            .collect::<Vec<_>>()
            .join("\n"),
        report(&proxy.metrics())
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Across HTTP/2 → HTTP/1, and clear answers (issue 17)
// ---------------------------------------------------------------------------------------------

/// An h2 connection over TLS to kaproxy (ALPN h2), with the h2 crate's client.
#[tokio::test]
async fn a_response_kaproxy_cannot_forward_is_a_502_before_any_byte() {
    // A chunk line with a 1 MiB extension: hyper refuses it while reading the body.
    let mut canned = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;".to_vec();
    canned.extend(std::iter::repeat_n(b'e', MIB));
    canned.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
    let canned: &'static [u8] = Box::leak(canned.into_boxed_slice());
    let backend = RawBackend::start(RawBehaviour::Canned(canned)).await;
    let proxy = proxy(&[backend.addr()], "").await;
    let resp = raw_exchange(
        proxy.server.http_addr().unwrap(),
        b"GET /ext HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, Some(502), "{resp:?}");
    let m = proxy.metrics();
    assert_eq!(
        m.sum(ERRORS_TOTAL, &[("kind", "closed_before_response")]),
        0.0,
        "the backend answered; its body was malformed\n{}",
        report(&m)
    );
    proxy.shutdown().await;
}
