//! Owns the end-to-end checks of `kaproxy_testkit::backends` against the real servers: each
//! kind keeps one connection alive over two GETs and a POST, answers as documented (with a
//! `Keep-Alive` header exactly when it says it sends one), counts the POST once where it counts,
//! and closes the idle connection by itself about its timeout later. A kind that is not
//! installed is skipped loudly (a failure with `KAPROXY_REQUIRE_BACKENDS=1`).

use std::time::Duration;

use kaproxy_testkit::backends::{require_backend, BackendKind, RealBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// The idle keep-alive timeout every kind is started with.
const IDLE: Duration = Duration::from_secs(1);
/// How much earlier than its timeout a server may seem to close: the clock here starts once
/// the last response has been read, a little after the server's own started.
const EARLY: Duration = Duration::from_millis(200);
/// How long a response may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How much later than its timeout a kind may close the idle connection. nginx, Node and Go
/// arm a timer per connection and close within a few ms of it; 1 s is left for a loaded
/// machine. Gunicorn's gthread worker only looks at its idle connections once per turn of its
/// event loop, which waits up to 1 s for an event (`poller.select(1.0)`), so it closes between
/// the timeout and about 1 s after it: 2 s leaves it the same 1 s for a loaded machine.
fn late_slack(kind: BackendKind) -> Duration {
    match kind {
        BackendKind::Gunicorn => Duration::from_secs(2),
        BackendKind::Nginx | BackendKind::Node | BackendKind::Go => Duration::from_secs(1),
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response with a `Content-Length` body off `s`, and nothing after it.
async fn read_response(s: &mut TcpStream) -> Response {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = timeout(RESPONSE_TIMEOUT, s.read(&mut chunk))
            .await
            .expect("a response head in time")
            .expect("reading the response head");
        assert!(
            n > 0,
            "closed before a whole head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{head}");
    let status = status_line[9..12].parse().expect("a status code");
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("a header line");
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .unwrap_or_else(|| panic!("no Content-Length in {head}"))
        .1
        .parse()
        .expect("a numeric Content-Length");
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = timeout(RESPONSE_TIMEOUT, s.read(&mut chunk))
            .await
            .expect("a response body in time")
            .expect("reading the response body");
        assert!(n > 0, "closed within the body of a response to {head}");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(
        body.len(),
        len,
        "more than one response's bytes after {head}"
    );
    Response {
        status,
        headers,
        body: String::from_utf8(body).expect("a text body"),
    }
}

/// Sends `req` on `s` and reads its response, which must be a keep-alive `200` with
/// `Keep-Alive` exactly when `kind` says it sends one.
async fn exchange(kind: BackendKind, s: &mut TcpStream, req: &[u8]) -> Response {
    s.write_all(req).await.expect("sending a request");
    let r = read_response(s).await;
    assert_eq!(r.status, 200, "{kind}: {:?} {}", r.headers, r.body);
    assert!(
        !r.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "{kind} closes after this response: {:?}",
        r.headers
    );
    assert_eq!(
        r.header("keep-alive").is_some(),
        kind.sends_keep_alive_header(),
        "{kind}: Keep-Alive header {:?} (headers {:?})",
        r.header("keep-alive"),
        r.headers
    );
    r
}

/// The whole check for one kind (see the module doc).
async fn keeps_alive_then_closes_when_idle(kind: BackendKind) {
    if !require_backend(kind) {
        return;
    }
    let backend = RealBackend::start(kind, IDLE)
        .await
        .unwrap_or_else(|e| panic!("{kind} starts: {e}"));
    assert_eq!((backend.kind(), backend.idle_timeout()), (kind, IDLE));
    // When it really closes: its timeout, but for Node, which adds its keep-alive buffer.
    let close = backend.closes_idle_after();
    if kind == BackendKind::Node {
        assert!(
            close >= IDLE,
            "node closes before its keepAliveTimeout: {close:?}"
        );
    } else {
        assert_eq!(close, IDLE, "{kind}");
    }
    let count_before = backend.post_count().await;
    assert_eq!(count_before.is_some(), kind.counts_posts(), "{kind}");

    let mut s = TcpStream::connect(backend.addr()).await.unwrap();
    let get = format!("GET /a HTTP/1.1\r\nHost: {}\r\n\r\n", backend.addr());
    for _ in 0..2 {
        let r = exchange(kind, &mut s, get.as_bytes()).await;
        assert_eq!(r.body, format!("ok {}\n", kind.name()));
        if let Some(ka) = r.header("keep-alive") {
            assert!(ka.starts_with("timeout=1"), "{kind}: Keep-Alive: {ka}");
        }
    }
    let mut post = format!(
        "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 1000\r\n\r\n",
        backend.addr()
    )
    .into_bytes();
    post.extend(std::iter::repeat_n(b'x', 1000));
    let r = exchange(kind, &mut s, &post).await;
    assert_eq!(r.body, "got 1000 bytes\n", "{kind}");

    // Idle from here on: the server must close the connection by itself.
    let idle_since = Instant::now();
    let late = late_slack(kind);
    let mut buf = [0u8; 1024];
    let read = timeout(close + late + Duration::from_secs(5), s.read(&mut buf)).await;
    let closed_after = idle_since.elapsed();
    match read {
        Ok(Ok(0)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Ok(n)) => panic!(
            "{kind} sent {:?} on an idle connection",
            String::from_utf8_lossy(&buf[..n])
        ),
        Ok(Err(e)) => panic!("{kind}: reading the idle connection: {e}"),
        Err(_) => panic!(
            "{kind} kept the idle connection open for {closed_after:?}; log:\n{}",
            backend.log()
        ),
    }
    eprintln!(
        "{kind} ({}), idle timeout {IDLE:?}, closes after {close:?}: closed the idle connection \
         after {closed_after:?}",
        kind.version()
    );
    assert!(
        closed_after >= close - EARLY && closed_after <= close + late,
        "{kind} closed the idle connection after {closed_after:?}, expected within \
         [{:?}, {:?}]",
        close - EARLY,
        close + late
    );

    if let Some(before) = count_before {
        assert_eq!(backend.post_count().await, Some(before + 1), "{kind}");
    }
}

#[tokio::test]
async fn nginx_keeps_alive_then_closes_when_idle() {
    keeps_alive_then_closes_when_idle(BackendKind::Nginx).await;
}

#[tokio::test]
async fn gunicorn_keeps_alive_then_closes_when_idle() {
    keeps_alive_then_closes_when_idle(BackendKind::Gunicorn).await;
}

#[tokio::test]
async fn node_keeps_alive_then_closes_when_idle() {
    keeps_alive_then_closes_when_idle(BackendKind::Node).await;
}

#[tokio::test]
async fn go_keeps_alive_then_closes_when_idle() {
    keeps_alive_then_closes_when_idle(BackendKind::Go).await;
}

#[test]
fn every_kind_is_listed_once_with_its_own_name() {
    let names: Vec<_> = BackendKind::ALL.iter().map(BackendKind::name).collect();
    assert_eq!(names, ["nginx", "gunicorn", "node", "go"]);
    let with_header: Vec<_> = BackendKind::ALL
        .into_iter()
        .filter(BackendKind::sends_keep_alive_header)
        .collect();
    assert_eq!(with_header, [BackendKind::Node]);
}
