//! kaproxy's own HTTP/1.1 loop (README, "HTTP/1.1 data path"): the requests it takes and the
//! ones it hands to hyper, pipelined on one connection, answered in order; request bodies it
//! reads from the socket (chunked, `Expect: 100-continue`, one answered before it was read); a
//! backend's head written downstream from its bytes (names in the backend's case, hop-by-hop
//! fields left behind).

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

/// kaproxy in front of a recording backend (`routes` after it in the config), and a client
/// connection to it.
async fn recorded_with(routes: &str) -> (RecordingBackend, TestProxy, TcpStream) {
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{}\"]\n{routes}",
        backend.addr()
    ))
    .await;
    let stream = TcpStream::connect(proxy.http().addr).await.unwrap();
    (backend, proxy, stream)
}

async fn recorded() -> (RecordingBackend, TestProxy, TcpStream) {
    recorded_with("").await
}

#[tokio::test]
async fn pipelined_requests_go_in_order_through_both_loops() {
    let (backend, proxy, mut stream) = recorded().await;
    // GETs, a HEAD and a POST whose small body came with it for kaproxy's loop, an
    // expectation it does not take for hyper's, all in one write: each loop must start
    // exactly where the other stopped.
    stream
        .write_all(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
              GET /c HTTP/1.1\r\nHost: x\r\n\r\n\
              HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n\
              PUT /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: x-other\r\n\r\nhi\
              GET /f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let text = read_to_close(&mut stream).await;
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
    assert_eq!(backend.paths(), ["/a", "/b", "/c", "/d", "/e", "/f"]);
    let seen = backend.requests();
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
    let paths = backend.paths();
    assert_eq!(
        paths,
        ["/a"],
        "the malformed request never reaches the backend"
    );
    proxy.shutdown().await;
}

/// Reads the answers to `paths` (none a HEAD) until the proxy closes: each a 200, and the
/// backend saw `paths` in order. Returns what it saw.
async fn served_in_order(
    stream: &mut TcpStream,
    backend: &RecordingBackend,
    paths: &[&str],
) -> Vec<crate::support::backend::RecordedRequest> {
    let text = read_to_close(stream).await;
    let all = responses(&text, &vec![false; paths.len()]);
    assert!(
        all.iter().all(|(h, _)| h.starts_with("HTTP/1.1 200")),
        "{text}"
    );
    assert_eq!(backend.paths(), paths);
    backend.requests()
}

#[tokio::test]
async fn a_body_too_large_for_the_loop_reaches_the_backend_whole() {
    let (backend, proxy, mut stream) = recorded().await;
    // Larger than the loop takes whole (WHOLE_BODY, 16 KiB): fed from the socket as read.
    let large = vec![b'x'; 20_000];
    let mut bytes = format!(
        "POST /large HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        large.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&large);
    bytes.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(&bytes).await.unwrap();
    let seen = served_in_order(&mut stream, &backend, &["/large", "/last"]).await;
    assert_eq!(&seen[0].body[..], &large[..]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_small_body_split_across_writes_reaches_the_backend_whole() {
    let (backend, proxy, mut stream) = recorded().await;
    // The loop takes the body whole if all of it came before it looked, and feeds it from the
    // socket otherwise; the backend gets it whole either way.
    stream
        .write_all(b"POST /split HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    tokio::task::yield_now().await;
    stream
        .write_all(b" worldGET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let seen = served_in_order(&mut stream, &backend, &["/split", "/last"]).await;
    assert_eq!(&seen[0].body[..], b"hello world");
    proxy.shutdown().await;
}

/// Reads from `stream` into `pending` until a request head is there, then takes it off the
/// front (a backend here ignores bodies: its clients send none); false once the stream ends.
async fn read_head(stream: &mut TcpStream, pending: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            return true;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
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
                while read_head(&mut stream, &mut pending).await {
                    if stream.write_all(response).await.is_err() {
                        return;
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

/// A backend that reads one request, answers with `head` (maybe nothing), then waits: `seen`
/// says when the request came, `closed` when kaproxy closed the connection.
async fn silent_backend(
    head: &'static [u8],
) -> (
    SocketAddr,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = tokio::sync::oneshot::channel();
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        if !read_head(&mut stream, &mut Vec::new()).await {
            return;
        }
        let _ = stream.write_all(head).await;
        let _ = seen_tx.send(());
        // Until kaproxy closes its side (or the test ends and aborts this).
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        let _ = closed_tx.send(());
    });
    (addr, seen, closed, task)
}

/// The client closes while its response is pending: kaproxy lets go of the backend's
/// connection at once (not at `response_timeout`, 60 s here), as hyper's server did.
async fn client_gone_frees_the_upstream(head: &'static [u8], read_head: bool) {
    let (addr, seen, closed, task) = silent_backend(head).await;
    let proxy = TestProxy::start(&format!("[upstreams.web]\nservers = [\"{addr}\"]\n")).await;
    let mut stream = TcpStream::connect(proxy.http().addr).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(WITHIN, seen)
        .await
        .expect("the request reached the backend")
        .unwrap();
    if read_head {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(WITHIN, stream.read(&mut buf))
                .await
                .expect("the head in time")
                .unwrap();
            assert!(n > 0, "closed before the head");
            got.extend_from_slice(&buf[..n]);
        }
    }
    drop(stream);
    tokio::time::timeout(WITHIN, closed)
        .await
        .expect("kaproxy closed the upstream connection once the client had gone")
        .unwrap();
    task.abort();
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_gone_before_its_response_frees_the_upstream_connection() {
    client_gone_frees_the_upstream(b"", false).await;
}

#[tokio::test]
async fn a_client_gone_during_a_quiet_stream_frees_the_upstream_connection() {
    // Not buffered (X-Accel-Buffering: no): the body streams from the pooled connection.
    client_gone_frees_the_upstream(
        b"HTTP/1.1 200 OK\r\nX-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n",
        true,
    )
    .await;
}

#[tokio::test]
async fn a_chunked_body_split_across_writes_is_read_and_the_next_request_follows() {
    let (backend, proxy, mut stream) = recorded().await;
    // The loop reads the body from the socket as the proxy reads it: a chunk split across
    // writes, the last chunk in the same write as the next request.
    stream
        .write_all(
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        )
        .await
        .unwrap();
    // Apart, most likely (the answer is the same if both writes arrive as one).
    stream.flush().await.unwrap();
    tokio::task::yield_now().await;
    stream
        .write_all(b"lo\r\n6;ext=1\r\n world\r\n0\r\n\r\nGET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let seen = served_in_order(&mut stream, &backend, &["/chunked", "/last"]).await;
    assert_eq!(&seen[0].body[..], b"hello world");
    assert_eq!(
        seen[0].header("content-length"),
        "11",
        "read whole, then framed by length"
    );
    proxy.shutdown().await;
}

/// kaproxy with a route for `/known` only.
async fn routed_for_known() -> (RecordingBackend, TestProxy, TcpStream) {
    recorded_with("[[routes]]\npath_prefix = \"/known\"\nupstream = \"web\"\n").await
}

#[tokio::test]
async fn a_short_body_answered_before_it_was_read_is_dropped_and_the_connection_goes_on() {
    let (backend, proxy, mut stream) = routed_for_known().await;
    // 404 before the body is read (no route); its 30 KiB (more than the loop takes whole) are
    // read and dropped, and the next request is served on the same connection.
    let body = vec![b'b'; 30_000];
    let mut bytes = format!(
        "POST /unknown HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(b"GET /known HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(&bytes).await.unwrap();
    let text = read_to_close(&mut stream).await;
    let all = responses(&text, &[false, false]);
    assert!(all[0].0.starts_with("HTTP/1.1 404"), "{text}");
    assert!(
        !all[0].0.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(all[1].0.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(backend.paths(), ["/known"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_long_body_answered_before_it_was_read_closes_the_connection() {
    let (backend, proxy, mut stream) = routed_for_known().await;
    // More than the loop reads to drop (256 KiB) by its length: the answer says
    // `Connection: close` and the connection closes without waiting for the body.
    stream
        .write_all(b"POST /unknown HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\nstart")
        .await
        .unwrap();
    let text = read_to_close(&mut stream).await;
    let all = responses(&text, &[false]);
    assert!(all[0].0.starts_with("HTTP/1.1 404"), "{text}");
    assert!(
        all[0].0.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(backend.paths().is_empty());
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_body_dribbled_after_its_answer_is_dropped_for_one_body_timeout_in_all() {
    // body_timeout bounds the whole drain, not each gap: a client sending a byte every 200 ms
    // of a body answered early (no route) loses the connection about a second after the 404,
    // where a gap-by-gap bound would keep it for as long as the dribble lasts.
    let (_backend, proxy, mut stream) = recorded_with(
        "[downstream]\nbody_timeout = \"1s\"\n[[routes]]\npath_prefix = \"/known\"\nupstream = \"web\"\n",
    )
    .await;
    stream
        .write_all(b"POST /unknown HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nb")
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = tokio::time::timeout(WITHIN, stream.read(&mut head))
        .await
        .expect("the 404 in time")
        .unwrap();
    let text = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    let (mut rd, mut wr) = stream.into_split();
    let dribble = tokio::spawn(async move {
        // 25 bytes over 5 s: far fewer than the 1000 the length announced.
        for _ in 0..25 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(b"b").await.is_err() {
                return;
            }
        }
    });
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(4), rd.read_to_end(&mut rest))
        .await
        .expect("the connection closed while the client was still dribbling")
        .ok();
    assert!(rest.is_empty(), "nothing more was answered: {rest:?}");
    dribble.abort();
    proxy.shutdown().await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_only_when_the_body_is_wanted() {
    let (backend, proxy, mut stream) = routed_for_known().await;
    // Refused first (no route): a 404 and no `100 Continue`, and the connection closes, since
    // the client may never send the body it was not asked for.
    stream
        .write_all(b"PUT /unknown HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let text = read_to_close(&mut stream).await;
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );

    // Wanted: `100 Continue`, then the body, then the answer, and the connection goes on.
    let mut stream = TcpStream::connect(proxy.http().addr).await.unwrap();
    stream
        .write_all(
            b"PUT /known HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let mut interim = [0u8; 64];
    let n = tokio::time::timeout(WITHIN, stream.read(&mut interim))
        .await
        .expect("an interim answer in time")
        .unwrap();
    assert_eq!(&interim[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    assert!(backend.paths().is_empty(), "asked before the backend was");
    stream
        .write_all(b"helloGET /known/2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let seen = served_in_order(&mut stream, &backend, &["/known", "/known/2"]).await;
    assert_eq!(&seen[0].body[..], b"hello");
    proxy.shutdown().await;
}
