//! The downstream side: bad input gets a clear status, keep-alive is advertised and closed
//! gracefully, hop-by-hop headers stop at kaproxy in both directions.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::backend::RecordingBackend;
use crate::support::client::{KeepAliveClient, Request};
use crate::support::proxy::TestProxy;

/// Bound on every raw read in this file.
const READ_BOUND: Duration = Duration::from_secs(5);

/// How a raw read ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Saw the end of a response head.
    Head,
    /// Clean EOF (FIN).
    Eof,
    /// An I/O error such as a reset.
    Error(std::io::ErrorKind),
    /// Nothing more within the bound.
    Timeout,
}

/// Reads from `stream` until a response head is complete (when `stop_at_head`), EOF, an error
/// or `READ_BOUND`; returns what arrived and how it ended.
async fn read_raw(stream: &mut TcpStream, stop_at_head: bool) -> (String, End) {
    let deadline = Instant::now() + READ_BOUND;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if stop_at_head && got.windows(4).any(|w| w == b"\r\n\r\n") {
            return (String::from_utf8_lossy(&got).into_owned(), End::Head);
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), End::Timeout),
            Ok(Ok(0)) => return (String::from_utf8_lossy(&got).into_owned(), End::Eof),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    End::Error(e.kind()),
                )
            }
        }
    }
}

/// Sends `bytes` on a fresh connection and returns the response head (or whatever came).
async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> (String, End) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_raw(&mut stream, true).await
}

fn status_of(head: &str) -> Option<u16> {
    head.split_whitespace().nth(1)?.parse().ok()
}

async fn proxy_with(backend: &RecordingBackend, downstream: &str) -> TestProxy {
    TestProxy::start(&format!(
        "[downstream]\n{downstream}\n\n[upstreams.web]\nservers = [\"{}\"]\n",
        backend.addr()
    ))
    .await
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_with(&backend, "max_header_bytes = 8192").await;
    let addr = proxy.server.http_addr().unwrap();
    // Just over the limit, small enough to be read whole (so the close is not a reset).
    let big = "a".repeat(10_000);
    let (head, end) = raw_request(
        addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&head), Some(431), "got {end:?}: {head:?}");
    // A head under the limit still works on the same proxy.
    let (head, _) = raw_request(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Small: 1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&head), Some(200), "{head:?}");
    assert_eq!(
        backend.requests().len(),
        1,
        "the oversized request never reached upstream"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn garbage_request_line_gets_400() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_with(&backend, "").await;
    let addr = proxy.server.http_addr().unwrap();
    let (head, end) = raw_request(addr, b"GARB\x01\x02AGE / HTTP/1.1\r\n\r\n").await;
    assert_eq!(status_of(&head), Some(400), "got {end:?}: {head:?}");
    assert!(backend.requests().is_empty());
    proxy.shutdown().await;
}

#[tokio::test]
async fn slow_request_head_gets_408_after_header_timeout() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_with(&backend, "header_timeout = \"1s\"").await;
    let addr = proxy.server.http_addr().unwrap();
    let started = Instant::now();
    let (head, end) = raw_request(addr, b"GET /slow HT").await;
    let waited = started.elapsed();
    assert_eq!(
        status_of(&head),
        Some(408),
        "got {end:?} after {waited:?}: {head:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "408 after about header_timeout (1 s), not {waited:?}"
    );
    assert!(backend.requests().is_empty());
    proxy.shutdown().await;
}

#[tokio::test]
async fn responses_advertise_kaproxy_keep_alive_timeout() {
    // The backend advertises its own timeout; downstream must see kaproxy's, not the backend's.
    let backend = RecordingBackend::start("up", &[("keep-alive", "timeout=5, max=100")]).await;
    let proxy = proxy_with(&backend, "idle_timeout = \"33s\"").await;
    let mut client = KeepAliveClient::new(proxy.http(), None);
    for _ in 0..2 {
        let resp = client.send(&Request::get("/")).await.expect("GET");
        assert_eq!(resp.status, 200);
        let keep_alive: Vec<_> = resp
            .headers
            .get_all("keep-alive")
            .iter()
            .map(|v| v.to_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(keep_alive.len(), 1, "one Keep-Alive header: {keep_alive:?}");
        assert!(
            keep_alive[0].contains("timeout=33") && !keep_alive[0].contains("timeout=5"),
            "Keep-Alive: {keep_alive:?}"
        );
    }
    assert_eq!(client.connects, 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let backend = RecordingBackend::start(
        "up",
        &[
            ("connection", "x-bar"),
            ("x-bar", "secret"),
            ("proxy-connection", "keep-alive"),
            ("x-kept-response", "yes"),
        ],
    )
    .await;
    let proxy = proxy_with(&backend, "").await;
    let mut client = KeepAliveClient::new(proxy.http(), None);
    let resp = client
        .send(
            &Request::get("/hop?x=1")
                .header("host", "app.example.test")
                .header("connection", "keep-alive, x-foo")
                .header("x-foo", "1")
                .header("proxy-connection", "keep-alive")
                .header("keep-alive", "timeout=99")
                .header("x-kept", "yes"),
        )
        .await
        .expect("GET");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-kept-response"), "yes");
    assert!(
        resp.headers.get("x-bar").is_none(),
        "X-Bar was named in the backend's Connection header: {:?}",
        resp.headers
    );
    assert!(
        resp.headers.get("proxy-connection").is_none(),
        "{:?}",
        resp.headers
    );
    assert!(
        !resp
            .header("connection")
            .to_ascii_lowercase()
            .contains("x-bar"),
        "{:?}",
        resp.headers
    );

    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    let up = &seen[0];
    assert_eq!(up.uri.to_string(), "/hop?x=1");
    assert_eq!(
        up.header("host"),
        "app.example.test",
        "Host is passed through"
    );
    assert_eq!(up.header("x-kept"), "yes");
    assert!(up.headers.get("x-foo").is_none(), "{:?}", up.headers);
    assert!(
        up.headers.get("proxy-connection").is_none(),
        "{:?}",
        up.headers
    );
    assert!(
        !up.header("keep-alive").contains("99"),
        "the client's Keep-Alive is hop-by-hop: {:?}",
        up.headers
    );
    let connection = up.header("connection").to_ascii_lowercase();
    assert!(
        !connection.contains("x-foo"),
        "Connection upstream: {connection:?}"
    );
    assert!(
        connection.contains("keep-alive"),
        "kaproxy asks upstream for keep-alive: {connection:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_downstream_connection_is_closed_gracefully() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_with(&backend, "idle_timeout = \"1s\"").await;
    let addr = proxy.server.http_addr().unwrap();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let (text, end) = read_raw(&mut stream, false).await;
    let waited = started.elapsed();
    assert_eq!(status_of(&text), Some(200), "{text:?}");
    assert!(text.contains("hello from up"), "{text:?}");
    assert_eq!(
        end,
        End::Eof,
        "a FIN, not a reset or nothing, after {waited:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after about idle_timeout (1 s), not {waited:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn last_response_on_a_connection_says_connection_close() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_with(&backend, "max_requests_per_connection = 3").await;
    let mut client = KeepAliveClient::new(proxy.http(), None);
    for i in 1..=4 {
        let resp = client.send(&Request::get("/")).await.expect("GET");
        assert_eq!(resp.status, 200);
        let close = resp
            .header("connection")
            .to_ascii_lowercase()
            .contains("close");
        assert_eq!(
            close,
            i == 3,
            "request {i}: Connection: {:?}",
            resp.header("connection")
        );
    }
    assert_eq!(
        client.connects, 2,
        "a new connection after the third request"
    );
    proxy.shutdown().await;
}
