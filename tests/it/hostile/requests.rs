//! HTTP/1.1 clients: responses never read, request bodies that stall, trickle, break or
//! stream past the buffer, `Host` rules.

use super::*;

#[tokio::test]
async fn http1_client_that_never_reads_a_streamed_response_is_cut_after_send_timeout() {
    // Larger than every kernel buffer on the way (kaproxy's send buffer grows to 4 MiB on
    // Linux), so that kaproxy's writes to the client really stall.
    const BODY: usize = 16 * MIB;
    let backend = BulkBackend::start("bulk").await;
    let proxy = proxy(&[backend.addr()], STREAMING).await;
    let server = label(backend.addr());
    let mut stream = connect_small_rcvbuf(proxy.server.http_addr().unwrap()).await;
    stream
        .write_all(format!("GET /bytes/{BODY} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write request");
    let started = Instant::now();

    normal_get_succeeds(&proxy, "while a client does not read its response").await;

    assert_upstream_cut_within_send_timeout(&proxy, &server, started, "unread response").await;
    // kaproxy closed the client connection too: draining what the kernels buffered ends in EOF
    // (or a reset), short of the whole response.
    let (read, end) = drain(&mut stream, RAW_BOUND).await;
    assert!(
        matches!(end, End::Eof | End::Error(_)),
        "kaproxy closes the client connection: read {read} bytes, then {end:?}"
    );
    assert!(read < BODY, "the response was cut: {read} bytes");
    assert_nothing_held(&proxy, &server, "after the HTTP/1.1 send stall").await;
    assert_backend_not_blamed(&proxy.metrics(), &server, "HTTP/1.1 send stall");
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Body timeout
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn stalled_small_body_gets_408_and_never_takes_an_upstream_connection() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy(&[backend.addr()], "").await;
    let server = label(backend.addr());
    let mut stream = TcpStream::connect(proxy.server.http_addr().unwrap())
        .await
        .expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .expect("write");
    let started = Instant::now();

    // Meanwhile: one normal GET, which opens the one upstream connection this test may see.
    normal_get_succeeds(&proxy, "while an upload stalls").await;

    let resp = read_response(&mut stream, RAW_BOUND).await;
    let took = started.elapsed();
    assert_eq!(resp.status, Some(408), "{resp:?}");
    assert!(
        took >= BODY_TIMEOUT - Duration::from_millis(100) && took < BODY_TIMEOUT + TIMER_SLACK,
        "408 after about body_timeout (1 s), not {took:?}"
    );
    let m = proxy.metrics();
    assert_eq!(
        m.sum(OPENED_TOTAL, &[("server", &server)]),
        1.0,
        "only the normal GET opened an upstream connection: a body within request_buffer_bytes \
         is read whole before one is taken\n{}",
        report(&m)
    );
    let posts: Vec<_> = backend
        .requests()
        .into_iter()
        .filter(|r| r.method == http::Method::POST)
        .collect();
    assert!(
        posts.is_empty(),
        "the stalled POST reached the backend: {posts:?}"
    );
    assert_backend_not_blamed(&m, &server, "stalled small body");
    proxy.shutdown().await;
}

#[tokio::test]
async fn body_trickled_within_body_timeout_is_forwarded_whole() {
    const BODY: &[u8] = b"trickled";
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy(&[backend.addr()], "").await;
    let mut stream = TcpStream::connect(proxy.server.http_addr().unwrap())
        .await
        .expect("connect");
    stream
        .write_all(
            format!(
                "POST /trickle HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                BODY.len()
            )
            .as_bytes(),
        )
        .await
        .expect("write head");
    let started = Instant::now();
    for (i, byte) in BODY.iter().enumerate() {
        // The trickle itself: each gap (300 ms) is shorter than body_timeout (1 s).
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream
            .write_all(std::slice::from_ref(byte))
            .await
            .unwrap_or_else(|e| panic!("byte {i} after {:?}: {e}", started.elapsed()));
        if i == 2 {
            normal_get_succeeds(&proxy, "while a body trickles in").await;
        }
    }
    let resp = read_response(&mut stream, RAW_BOUND).await;
    assert_eq!(
        resp.status,
        Some(200),
        "a body whose gaps stay under body_timeout is fine: {resp:?} after {:?}",
        started.elapsed()
    );
    let posts: Vec<_> = backend
        .requests()
        .into_iter()
        .filter(|r| r.method == http::Method::POST)
        .collect();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(
        &posts[0].body[..],
        BODY,
        "the backend saw all {} bytes",
        BODY.len()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn large_streamed_body_that_stalls_gets_408_and_is_not_blamed_on_the_backend() {
    const LENGTH: usize = 200_000;
    const SENT: usize = 100 * 1024;
    // More stalled uploads than the passive-health `fall`, all at once.
    const UPLOADS: usize = DEFAULT_FALL + 1;
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy(&[backend.addr()], STREAMING).await;
    let server = label(backend.addr());
    let addr = proxy.server.http_addr().unwrap();
    let started = Instant::now();
    let upload = |i: usize| async move {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut bytes =
            format!("POST /big/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {LENGTH}\r\n\r\n")
                .into_bytes();
        bytes.extend(std::iter::repeat_n(b'b', SENT));
        stream.write_all(&bytes).await.expect("write 100 KiB");
        read_response(&mut stream, RAW_BOUND).await
    };
    let uploads = futures_util::future::join_all((0..UPLOADS).map(upload));
    let (responses, ()) = tokio::join!(
        uploads,
        normal_get_succeeds(&proxy, "while large uploads stall")
    );
    let took = started.elapsed();
    for (i, resp) in responses.iter().enumerate() {
        // The recording backend answers only after the whole body, so no response has started
        // and kaproxy can still answer 408.
        assert_eq!(
            resp.status,
            Some(408),
            "upload {i} after {took:?}: {resp:?}"
        );
        assert!(
            resp.took < BODY_TIMEOUT + TIMER_SLACK,
            "upload {i}: 408 after about body_timeout: {resp:?}"
        );
    }
    let (m, closed) = proxy
        .wait_metrics(TIMER_SLACK, |m| {
            closed_with(m, &server, "error") >= UPLOADS as f64
        })
        .await;
    assert!(
        closed,
        "every half-sent upstream request's connection is closed with reason error\n{}",
        report(&m)
    );
    assert_nothing_held(&proxy, &server, "after the stalled large uploads").await;
    assert_backend_not_blamed(&proxy.metrics(), &server, "stalled large uploads");
    normal_get_succeeds(&proxy, "after the stalled large uploads").await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Client faults are the client's
// ---------------------------------------------------------------------------------------------

/// A chunked POST head followed by `body`.
fn chunked_post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[tokio::test]
async fn malformed_chunked_bodies_get_400_and_are_not_blamed_on_the_backend() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy(&[backend.addr()], "").await;
    let server = label(backend.addr());
    let addr = proxy.server.http_addr().unwrap();
    let mut huge_extension = b"5;".to_vec();
    huge_extension.extend(std::iter::repeat_n(b'a', MIB));
    huge_extension.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
    // hyper 1.x rejects every one of these while decoding (including the bare-LF chunk lines:
    // its size-line parser wants CR LF), so each must be the client's 400.
    let probes: Vec<(&str, Vec<u8>)> = vec![
        ("chunk size x5", b"x5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("chunk size 5x", b"5x\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("chunk size -5", b"-5\r\nhello\r\n0\r\n\r\n".to_vec()),
        (
            "chunk size overflowing u64",
            b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        ("1 MiB chunk extension", huge_extension),
        ("bare-LF chunk lines", b"5\nhello\n0\n\n".to_vec()),
    ];
    let mut failures = Vec::new();
    let mut sent = 0;
    for round in 0..2 {
        for (name, body) in &probes {
            let resp = raw_exchange(addr, &chunked_post("/chunked", body)).await;
            sent += 1;
            if resp.status != Some(400) {
                failures.push(format!("{name} (round {round}): {resp:?}"));
            }
        }
    }
    assert!(sent > DEFAULT_FALL);
    assert!(
        failures.is_empty(),
        "every malformed chunked body is answered 400 (never 502):\n{}",
        failures.join("\n")
    );
    let posts: Vec<_> = backend
        .requests()
        .into_iter()
        .filter(|r| r.method == http::Method::POST)
        .collect();
    assert!(
        posts.is_empty(),
        "bodies that fail within request_buffer_bytes never reach the backend: {posts:?}"
    );
    assert_backend_not_blamed(&proxy.metrics(), &server, "malformed chunked bodies");
    normal_get_succeeds(&proxy, "after the malformed chunked bodies").await;
    assert_nothing_held(&proxy, &server, "after the malformed chunked bodies").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn broken_chunk_after_the_request_buffer_gets_400_and_is_not_blamed_on_the_backend() {
    const CHUNK: usize = 8 * 1024;
    // 80 KiB of good chunks: past request_buffer_bytes, so the body is already streaming.
    const GOOD_CHUNKS: usize = 10;
    const UPLOADS: usize = DEFAULT_FALL + 1;
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy(&[backend.addr()], STREAMING).await;
    let server = label(backend.addr());
    let addr = proxy.server.http_addr().unwrap();
    let mut body = Vec::new();
    for _ in 0..GOOD_CHUNKS {
        body.extend_from_slice(format!("{CHUNK:x}\r\n").as_bytes());
        body.extend(std::iter::repeat_n(b'c', CHUNK));
        body.extend_from_slice(b"\r\n");
    }
    const { assert!(GOOD_CHUNKS * CHUNK > BUFFER_BYTES) };
    body.extend_from_slice(b"zz\r\nbroken\r\n0\r\n\r\n");
    let request = chunked_post("/streamed", &body);
    let mut failures = Vec::new();
    for i in 0..UPLOADS {
        let resp = raw_exchange(addr, &request).await;
        if resp.status != Some(400) {
            failures.push(format!("upload {i}: {resp:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "a broken chunk on the streaming path is the client's 400 (never 502):\n{}",
        failures.join("\n")
    );
    assert_nothing_held(&proxy, &server, "after broken streamed bodies").await;
    assert_backend_not_blamed(&proxy.metrics(), &server, "broken streamed bodies");
    normal_get_succeeds(&proxy, "after broken streamed bodies").await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Backend framing (RFC 9112 §6.3)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn host_header_rules() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy(&[backend.addr()], "").await;
    let addr = proxy.server.http_addr().unwrap();

    let resp = raw_exchange(addr, b"GET /no-host HTTP/1.1\r\n\r\n").await;
    assert_eq!(resp.status, Some(400), "HTTP/1.1 without Host: {resp:?}");

    let resp = raw_exchange(
        addr,
        b"GET /two-hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, Some(400), "two Host headers: {resp:?}");

    let resp = raw_exchange(addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(
        resp.status,
        Some(200),
        "HTTP/1.0 without Host is fine: {resp:?}"
    );

    let resp = raw_exchange(
        addr,
        b"GET http://a.example/x HTTP/1.1\r\nHost: b.example\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, Some(200), "absolute form: {resp:?}");

    let (seen, paths) = (backend.requests(), backend.paths());
    assert_eq!(
        paths,
        ["/old", "/x"],
        "the requests answered 400 never reached the backend: {seen:?}"
    );
    let absolute = &seen[1];
    assert_eq!(
        absolute.header("host"),
        "a.example",
        "the absolute-form authority replaces Host: {absolute:?}"
    );
    normal_get_succeeds(&proxy, "after the Host probes").await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Next server on a fresh-connection failure
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn response_timeout_counts_from_the_end_of_a_streamed_upload() {
    const LENGTH: usize = 200 * 1024;
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy(
        &[backend.addr()],
        "request_buffering = false\nresponse_timeout = \"1s\"",
    )
    .await;
    let mut stream = TcpStream::connect(proxy.server.http_addr().unwrap())
        .await
        .unwrap();
    let head = format!("POST /slow-upload HTTP/1.1\r\nHost: x\r\nContent-Length: {LENGTH}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // 2.5 s of upload, each gap inside body_timeout (1 s), all of it past response_timeout.
    let chunk = vec![b's'; LENGTH / 10];
    for _ in 0..10 {
        stream.write_all(&chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let resp = read_response(&mut stream, RAW_BOUND).await;
    assert_eq!(
        resp.status,
        Some(200),
        "the backend answered once the body was whole: {resp:?}"
    );
    let got = backend.requests().pop().expect("reached the backend");
    assert_eq!(got.body.len(), LENGTH);
    proxy.shutdown().await;
}
