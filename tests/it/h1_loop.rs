//! kaproxy's own HTTP/1.1 loop (README, "HTTP/1.1 data path"): the requests it takes and the
//! ones it hands to hyper, pipelined on one connection, answered in order; a backend's head
//! written downstream from its bytes (names in the backend's case, hop-by-hop fields left
//! behind).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::backend::RecordingBackend;
use crate::support::proxy::TestProxy;

/// Bounds every exchange of these tests.
const WITHIN: Duration = Duration::from_secs(10);

/// Reads until the proxy closes the connection.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(WITHIN, stream.read_to_end(&mut out))
        .await
        .expect("the connection closes in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// The responses in `text`, split by their heads' `Content-Length` (none after a HEAD: the
/// `heads` say which responses answer one). Each is (head, body).
fn responses(text: &str, heads: &[bool]) -> Vec<(String, String)> {
    let mut rest = text;
    let mut all = Vec::new();
    for &head_request in heads {
        let Some(end) = rest.find("\r\n\r\n") else {
            break;
        };
        let head = &rest[..end];
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().expect("a length"))
            })
            .unwrap_or(0);
        let length = if head_request { 0 } else { length };
        let body = &rest[end + 4..end + 4 + length];
        all.push((head.to_string(), body.to_string()));
        rest = &rest[end + 4 + length..];
    }
    assert!(rest.is_empty(), "nothing after the last response: {rest:?}");
    all
}

/// kaproxy in front of a recording backend, and a client connection to it.
async fn recorded() -> (RecordingBackend, TestProxy, TcpStream) {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{}\"]\n",
        backend.addr()
    ))
    .await;
    let stream = TcpStream::connect(proxy.http().addr).await.unwrap();
    (backend, proxy, stream)
}

#[tokio::test]
async fn pipelined_requests_go_in_order_through_both_loops() {
    let (backend, proxy, mut stream) = recorded().await;
    // GETs, a HEAD and a POST whose small body came with it for kaproxy's loop, an Expect for
    // hyper's, all in one write: each loop must start exactly where the other stopped.
    stream
        .write_all(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
              GET /c HTTP/1.1\r\nHost: x\r\n\r\n\
              HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n\
              PUT /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi\
              GET /f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let text = read_to_close(&mut stream).await;
    // hyper answers `Expect: 100-continue` before the body is read.
    let text = text.replacen("HTTP/1.1 100 Continue\r\n\r\n", "", 1);
    let all = responses(&text, &[false, false, false, true, false, false]);
    assert_eq!(all.len(), 6, "{text}");
    for (head, body) in &all {
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(body.is_empty() || body == "hello from up\n", "{body:?}");
    }
    assert!(all[3].1.is_empty(), "no body after a HEAD");
    assert!(
        all[5].0.to_ascii_lowercase().contains("connection: close"),
        "the last says so: {}",
        all[5].0
    );
    let seen = backend.requests();
    let paths: Vec<_> = seen.iter().map(|r| r.uri.path().to_string()).collect();
    assert_eq!(paths, ["/a", "/b", "/c", "/d", "/e", "/f"]);
    assert_eq!(&seen[1].body[..], b"hello");
    assert_eq!(&seen[4].body[..], b"hi");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_head_the_loop_cannot_take_is_answered_by_hyper_after_the_ones_before_it() {
    let (backend, proxy, mut stream) = recorded().await;
    // A field name with a space in it: hyper's 400, after the GET kaproxy's loop answered.
    stream
        .write_all(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",
        )
        .await
        .unwrap();
    let text = read_to_close(&mut stream).await;
    let all = responses(&text, &[false, false]);
    assert!(all[0].0.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(all[1].0.starts_with("HTTP/1.1 400"), "{text}");
    let paths: Vec<_> = backend
        .requests()
        .iter()
        .map(|r| r.uri.path().to_string())
        .collect();
    assert_eq!(
        paths,
        ["/a"],
        "the malformed request never reaches the backend"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn bodies_too_large_for_the_loop_or_split_across_writes_reach_the_backend_whole() {
    let (backend, proxy, mut stream) = recorded().await;
    // Larger than the loop takes (WHOLE_BODY, 16 KiB): hyper's, whenever it arrives.
    let large = vec![b'x'; 20_000];
    let mut first = format!(
        "POST /large HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        large.len()
    )
    .into_bytes();
    first.extend_from_slice(&large);
    // Then a small body in two writes: the loop takes it if both came before it looked,
    // hyper does otherwise; the backend gets it whole either way.
    first.extend_from_slice(b"POST /split HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello");
    stream.write_all(&first).await.unwrap();
    stream.flush().await.unwrap();
    tokio::task::yield_now().await;
    stream
        .write_all(b" worldGET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut stream).await;
    let all = responses(&text, &[false, false, false]);
    assert!(
        all.iter().all(|(h, _)| h.starts_with("HTTP/1.1 200")),
        "{text}"
    );
    let seen = backend.requests();
    let paths: Vec<_> = seen.iter().map(|r| r.uri.path().to_string()).collect();
    assert_eq!(paths, ["/large", "/split", "/last"]);
    assert_eq!(&seen[0].body[..], &large[..]);
    assert_eq!(&seen[1].body[..], b"hello world");
    proxy.shutdown().await;
}

/// A backend that answers every request with `response` (bytes as written), keeping the
/// connection; stops with the test (aborted).
async fn fixed_backend(response: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if stream.write_all(response).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_backends_head_goes_down_in_its_own_case_without_its_hop_by_hop_fields() {
    let (addr, task) = fixed_backend(
        b"HTTP/1.1 200 OK\r\nX-Mixed-Case: One\r\nConnection: keep-alive, X-Private\r\n\
          X-Private: secret\r\nKeep-Alive: timeout=5, max=100\r\nSet-Cookie: a=1\r\n\
          Content-Length: 2\r\nSet-Cookie: b=2\r\n\r\nok",
    )
    .await;
    let proxy = TestProxy::start(&format!("[upstreams.web]\nservers = [\"{addr}\"]\n")).await;
    let mut stream = TcpStream::connect(proxy.http().addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut stream).await;
    let all = responses(&text, &[false]);
    let (head, body) = &all[0];
    assert_eq!(body, "ok");
    let lines: Vec<&str> = head.lines().skip(1).collect();
    assert!(lines.contains(&"X-Mixed-Case: One"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("x-private"),
        "a field the backend's Connection names stays behind: {head}"
    );
    assert!(
        !head.contains("max=100"),
        "the backend's Keep-Alive stays behind: {head}"
    );
    let cookies: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("Set-Cookie: "))
        .collect();
    assert_eq!(cookies, [&"Set-Cookie: a=1", &"Set-Cookie: b=2"], "{head}");
    let lower = head.to_ascii_lowercase();
    assert_eq!(lower.matches("connection: close").count(), 1, "{head}");
    assert_eq!(
        lower.matches("\ndate: ").count(),
        1,
        "kaproxy adds one Date: {head}"
    );
    task.abort();
    proxy.shutdown().await;
}
