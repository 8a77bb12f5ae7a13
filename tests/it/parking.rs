//! Parked HTTP/1 connections: a client connection idle between requests gives hyper's state
//! back (`kaproxy_downstream_connections_waiting` counts it) and is served again as soon as
//! it sends, over plain TCP and TLS; bytes hyper had read but not parsed are not lost.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::backend::RecordingBackend;
use crate::support::client::{connect, Endpoint};
use crate::support::proxy::{Metrics, TestProxy};

/// kaproxy parks a connection idle for 1 s (`downstream::PARK_AFTER`); this bounds the wait.
const PARK_WITHIN: Duration = Duration::from_secs(5);
/// A pause longer than `downstream::PARK_AFTER`, for the cases kaproxy must not get wrong
/// when it parks.
const PAST_PARK_AFTER: Duration = Duration::from_millis(1500);

fn waiting(m: &Metrics, listener: &str) -> f64 {
    m.sum(
        "kaproxy_downstream_connections_waiting",
        &[("listener", listener)],
    )
}

async fn proxy_for(backend: SocketAddr) -> TestProxy {
    TestProxy::start(&format!("[upstreams.web]\nservers = [\"{backend}\"]\n")).await
}

/// Where the head in `buf` ends (the index of its blank line), once it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// The `Content-Length` of a message head.
fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head)
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(str::to_string))
        .map(|v| v.trim().parse().expect("a number"))
}

/// One client connection: a request, a pause until kaproxy has parked it, another request on
/// the same connection.
async fn parked_connection_serves_again(proxy: &TestProxy, endpoint: Endpoint, listener: &str) {
    let io = connect(&endpoint, None).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("client handshake");
    let conn = tokio::spawn(conn);
    let get = |path: &str| {
        http::Request::get(path)
            .header("host", "parking.test")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };

    let resp = sender.send_request(get("/first")).await.expect("first");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.expect("first body");

    let (m, parked) = proxy
        .wait_metrics(PARK_WITHIN, |m| waiting(m, listener) == 1.0)
        .await;
    assert!(
        parked,
        "the idle connection is parked within {PARK_WITHIN:?}: {}",
        m.lines_of("kaproxy_downstream_connections_waiting")
    );

    let resp = sender
        .send_request(get("/second"))
        .await
        .expect("a request on the parked connection is served");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("second body");
    assert_eq!(body.to_bytes(), "hello from up\n");
    // Woken by the request: no longer parked while hyper serves it.
    assert_eq!(waiting(&proxy.metrics(), listener), 0.0);
    assert!(!conn.is_finished(), "still the same client connection");
    drop(sender);
    let _ = conn.await;
}

#[tokio::test]
async fn idle_plain_connection_is_parked_and_served_again() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_for(backend.addr()).await;
    parked_connection_serves_again(&proxy, proxy.http(), "http").await;
    assert_eq!(backend.paths(), ["/first", "/second"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_tls_connection_is_parked_and_served_again() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_for(backend.addr()).await;
    parked_connection_serves_again(&proxy, proxy.https(&["http/1.1"]), "https").await;
    assert_eq!(backend.requests().len(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn new_connection_waits_parked_for_its_first_request() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_for(backend.addr()).await;
    let addr = proxy.server.http_addr().unwrap();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let (m, parked) = proxy
        .wait_metrics(PARK_WITHIN, |m| waiting(m, "http") == 1.0)
        .await;
    assert!(
        parked,
        "{}",
        m.lines_of("kaproxy_downstream_connections_waiting")
    );
    silent
        .write_all(b"GET /late HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut got))
        .await
        .expect("answered within 5 s")
        .expect("read");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("hello from up\n"), "{text}");
    proxy.shutdown().await;
}

/// Reads one response with a `Content-Length` body from `stream`, leaving what follows.
async fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = head_end(pending) {
            let len = content_length(&pending[..end]).expect("content-length");
            let total = end + 4 + len;
            if pending.len() >= total {
                let resp: Vec<u8> = pending.drain(..total).collect();
                return String::from_utf8_lossy(&resp).into_owned();
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("response within 5 s")
            .expect("read");
        assert!(n > 0, "connection closed mid-response");
        pending.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn pipelined_start_of_a_request_survives_parking() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_for(backend.addr()).await;
    let addr = proxy.server.http_addr().unwrap();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // One request and the start of the next in one write: kaproxy's loop reads both.
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let first = read_response(&mut stream, &mut pending).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Past PARK_AFTER the half-read head is still held (a connection holding unparsed bytes
    // is never parked: `kaproxy_downstream_connections_waiting` never counts it), and read
    // on. Time itself must pass here, and no gauge can show it.
    tokio::time::sleep(PAST_PARK_AFTER).await;
    stream.write_all(b"st: x\r\n\r\n").await.unwrap();
    let second = read_response(&mut stream, &mut pending).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(backend.paths(), ["/a", "/b"]);
    proxy.shutdown().await;
}

/// A backend that answers every request at once, before reading its body, then reads and
/// discards the body (as a server rejecting an upload early may).
async fn answer_before_body_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Bounded by the test: aborted at its end.
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Some(end) = head_end(&pending) else {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let len = content_length(&pending[..end]).unwrap_or(0);
                    pending.drain(..end + 4);
                    let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nearly\n";
                    if stream.write_all(resp).await.is_err() {
                        return;
                    }
                    while pending.len() < len {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    }
                    pending.drain(..len);
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn request_body_still_arriving_after_its_response_is_not_cut_by_parking() {
    let (backend, task) = answer_before_body_backend().await;
    // A streamed body (request_buffering = false, request_buffer_bytes = 0): a buffered one
    // is read whole before the backend sees the request, so no response could start before
    // its end.
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{backend}\"]\nrequest_buffering = false\nrequest_buffer_bytes = 0\n"
    ))
    .await;
    let addr = proxy.server.http_addr().unwrap();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{\"k\": \"val")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let first = read_response(&mut stream, &mut pending).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // The response is complete, the body is not: past PARK_AFTER, kaproxy must still be
    // reading it, not parking the connection and taking the rest for a new request. (Here
    // time itself must pass: what is checked is that the park timer did not act.)
    tokio::time::sleep(PAST_PARK_AFTER).await;
    assert_eq!(
        waiting(&proxy.metrics(), "http"),
        0.0,
        "a connection whose request body is still arriving is not parked"
    );
    // Read as the start of a request, `ue"}` would be a 400 (`"` cannot start a method).
    stream.write_all(b"ue\"}      ").await.unwrap();
    stream
        .write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let second = read_response(&mut stream, &mut pending).await;
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "the rest of the body was read as a body, not as a request: {second}"
    );
    assert!(second.ends_with("early\n"), "{second}");
    proxy.shutdown().await;
    task.abort();
}

#[tokio::test]
async fn a_parked_connection_is_closed_when_the_server_shuts_down() {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_for(backend.addr()).await;
    let mut stream = TcpStream::connect(proxy.server.http_addr().unwrap())
        .await
        .expect("connect");
    stream
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let first = read_response(&mut stream, &mut pending).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let (m, parked) = proxy
        .wait_metrics(PARK_WITHIN, |m| waiting(m, "http") == 1.0)
        .await;
    assert!(
        parked,
        "{}",
        m.lines_of("kaproxy_downstream_connections_waiting")
    );
    // A parked connection watches no shutdown of its own: the listener wakes it. The server
    // must not wait for its 75 s idle_timeout (shutdown() allows 10 s).
    let closed = async {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("closed within 5 s of the shutdown")
            .expect("a clean close");
        rest
    };
    let (rest, ()) = tokio::join!(closed, proxy.shutdown());
    assert!(rest.is_empty(), "nothing more was sent: {rest:?}");
}
