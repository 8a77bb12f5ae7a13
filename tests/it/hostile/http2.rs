//! HTTP/2 clients: a closed flow-control window, cookie crumbs, too many fields, a header
//! block trickled in CONTINUATION frames.

use super::*;

#[tokio::test]
async fn h2_zero_window_on_a_large_streamed_response_frees_the_upstream_connection_within_send_timeout(
) {
    let backend = BulkBackend::start("bulk").await;
    let proxy = proxy(&[backend.addr()], STREAMING).await;
    let server = label(backend.addr());
    let started = Instant::now();
    let mut stream = ZeroWindowStream::get(&proxy.https(&["h2"]), &format!("/bytes/{MIB}")).await;
    assert_eq!(stream.status, 200, "{:?}", stream.headers);

    normal_get_succeeds(&proxy, "while an HTTP/2 stream stalls on a zero window").await;

    assert_upstream_cut_within_send_timeout(&proxy, &server, started, "stalled stream").await;
    let end = stream.end(RAW_BOUND).await;
    assert!(
        matches!(end, StreamEnd::Reset(_)),
        "the stalled stream is reset or its connection closed: {end:?} after {:?}, {} bytes",
        started.elapsed(),
        stream.received
    );
    assert!(stream.received < MIB, "{} bytes", stream.received);
    assert_nothing_held(&proxy, &server, "after the h2 send stall").await;
    assert_backend_not_blamed(&proxy.metrics(), &server, "h2 send stall");
    normal_get_succeeds(&proxy, "after the h2 send stall").await;
    drop(stream);
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2_zero_window_on_a_small_response_returns_the_upstream_connection_at_once() {
    let backend = BulkBackend::start("bulk").await;
    let proxy = proxy(&[backend.addr()], LONG_POOL).await;
    let server = label(backend.addr());
    // Exactly response_buffer_bytes: read ahead whole.
    let mut stream =
        ZeroWindowStream::get(&proxy.https(&["h2"]), &format!("/bytes/{BUFFER_BYTES}")).await;
    assert_eq!(stream.status, 200, "{:?}", stream.headers);
    let started = Instant::now();
    let (m, pooled) = proxy
        .wait_metrics(TIMER_SLACK, |m| {
            m.sum(POOL_IDLE, &[("server", &server)]) == 1.0
        })
        .await;
    let took = started.elapsed();
    assert!(
        pooled,
        "a response of response_buffer_bytes is read ahead and its upstream connection pooled, \
         however slowly the client reads\n{}",
        report(&m)
    );
    assert!(
        took < SEND_TIMEOUT,
        "pooled at once (after the response head), not when the stalled stream ends at \
         send_timeout: {took:?}\n{}",
        report(&m)
    );
    assert_eq!(closed_with(&m, &server, "error"), 0.0, "{}", report(&m));

    normal_get_succeeds(&proxy, "while an HTTP/2 stream stalls on a zero window").await;

    // Past send_timeout, however the stalled stream ended (reset), the pooled connection was
    // not touched by it.
    let end = stream.end(SEND_TIMEOUT + Duration::from_secs(1)).await;
    eprintln!("zero-window stream of {BUFFER_BYTES} bytes ended: {end:?}");
    let m = proxy.metrics();
    assert_eq!(
        closed_with(&m, &server, "error"),
        0.0,
        "no upstream connection closed for the client's stall\n{}",
        report(&m)
    );
    assert!(
        m.sum(POOL_IDLE, &[("server", &server)]) >= 1.0,
        "the read-ahead connection is still pooled past send_timeout\n{}",
        report(&m)
    );
    assert_nothing_held(&proxy, &server, "after the small-response stall").await;
    assert_backend_not_blamed(&m, &server, "small-response stall");
    drop(stream);
    proxy.shutdown().await;
}

async fn h2_client(proxy: &TestProxy) -> h2::client::SendRequest<bytes::Bytes> {
    let endpoint = proxy.https(&["h2"]);
    let (tls, _) = crate::support::client::tls_connect(endpoint.addr, endpoint.tls.unwrap(), None)
        .await
        .expect("tls");
    let (sender, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.ready().await.expect("h2 ready")
}

fn h2_get(path: &str) -> http::request::Builder {
    http::Request::get(format!(
        "https://{}{path}",
        crate::support::client::TLS_SERVER_NAME
    ))
}

#[tokio::test]
async fn http2_cookie_crumbs_reach_the_backend_as_one_cookie_line() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy(&[backend.addr()], "").await;
    let mut h2 = h2_client(&proxy).await;
    let req = h2_get("/cookies")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(RAW_BOUND, resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = backend.requests().pop().expect("reached the backend");
    let cookies: Vec<_> = got.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, vec!["a=1; b=2; c=3"], "RFC 9113 §8.2.3");
    proxy.shutdown().await;
}

#[tokio::test]
async fn too_many_header_fields_are_431_on_http2_as_on_http1() {
    const FIELDS: usize = 150;
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy(&[backend.addr()], "").await;
    let mut h2 = h2_client(&proxy).await;
    let mut req = h2_get("/many");
    for i in 0..FIELDS {
        req = req.header(format!("x-{i}"), "v");
    }
    let (resp, _) = h2.send_request(req.body(()).unwrap(), true).expect("send");
    let resp = tokio::time::timeout(RAW_BOUND, resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 431, "HTTP/2");
    let mut raw = b"GET /many HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..FIELDS {
        raw.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    let h1 = raw_exchange(proxy.server.http_addr().unwrap(), &raw).await;
    assert_eq!(h1.status, Some(431), "HTTP/1.1: {h1:?}");
    // kaproxy's answer, not the backend's (whose own parser would refuse 150 fields too).
    let server = label(backend.addr());
    assert_eq!(
        proxy.metrics().sum(OPENED_TOTAL, &[("server", &server)]),
        0.0,
        "neither reached the backend"
    );
    // Within the limit, both pass.
    let mut req = h2_get("/some");
    for i in 0..90 {
        req = req.header(format!("x-{i}"), "v");
    }
    let (resp, _) = h2.send_request(req.body(()).unwrap(), true).expect("send");
    let resp = tokio::time::timeout(RAW_BOUND, resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_http2_header_block_trickled_in_continuations_is_cut_at_header_timeout() {
    use tokio::io::AsyncReadExt;
    let backend = RecordingBackend::start("up", &[]).await;
    // send_timeout long, so that the keep-alive PING (after send_timeout of silence) cannot
    // be what ends the connection: header_timeout must.
    let proxy = TestProxy::start(&format!(
        "[downstream]\nheader_timeout = \"2s\"\nsend_timeout = \"30s\"\n\
         [upstreams.web]\nservers = [\"{}\"]\n",
        backend.addr()
    ))
    .await;
    let endpoint = proxy.https(&["h2"]);
    let (mut tls, alpn) =
        crate::support::client::tls_connect(endpoint.addr, endpoint.tls.unwrap(), None)
            .await
            .expect("tls");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                         // HEADERS without END_HEADERS: `:method GET`, `:scheme https` (static table 2, 7).
    start.extend(frame(0x1, 0x1, 1, &[0x82, 0x87]));
    tls.write_all(&start).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(tls);
    // One CONTINUATION every 2 s (`:path /`, static table 4), never END_HEADERS: the h2
    // crate's own bound (5 CONTINUATIONs at these settings) would take 10 s.
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if wr.write_all(&frame(0x9, 0, 1, &[0x84])).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    // kaproxy's SETTINGS and ACK, then the end of the connection (EOF or reset).
    let ended = async {
        let mut buf = vec![0u8; 16 * 1024];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        tokio::select! {
            () = ended => {}
            () = trickle => {}
        }
    })
    .await;
    let took = started.elapsed();
    assert!(
        closed.is_ok(),
        "still open after 8 s of trickled CONTINUATIONs"
    );
    assert!(
        took < Duration::from_secs(2) + TIMER_SLACK,
        "cut about header_timeout (2 s) after HEADERS: {took:?}"
    );
    assert!(backend.requests().is_empty());
    normal_get_succeeds(&proxy, "after the trickled header block").await;
    proxy.shutdown().await;
}
