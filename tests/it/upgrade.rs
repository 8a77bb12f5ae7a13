//! WebSocket / `Upgrade` tunnelling: a raw client through kaproxy to a tiny backend that
//! switches protocols and echoes bytes, on the plain and the TLS listener.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::support::client::{connect_from, tls_connect};
use crate::support::proxy::TestProxy;

/// Bound on every read in this file (and on the backend's wait for a request head).
const IO_BOUND: Duration = Duration::from_secs(5);
/// Larger than any head either side sends.
const MAX_HEAD: usize = 64 * 1024;
/// Echo round trips per tunnel.
const ROUND_TRIPS: usize = 5;
/// A payload larger than socket and proxy buffers, so the tunnel must stream both ways at once.
const BULK_LEN: usize = 256 * 1024;
/// The path at which the backend declines to switch protocols.
const DECLINE_PATH: &str = "/decline";
const DECLINE_BODY: &str = "upgrade refused\n";

/// A request head as a backend or client received it: the start line and lowercased header
/// names with their values in order.
#[derive(Debug, Clone, Default)]
struct Head {
    start: String,
    headers: BTreeMap<String, Vec<String>>,
}

impl Head {
    fn parse(raw: &[u8]) -> Head {
        let text = String::from_utf8_lossy(raw);
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or_default().to_string();
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in lines.take_while(|l| !l.is_empty()) {
            if let Some((name, value)) = line.split_once(':') {
                headers
                    .entry(name.trim().to_ascii_lowercase())
                    .or_default()
                    .push(value.trim().to_string());
            }
        }
        Head { start, headers }
    }

    /// All values of a header joined with ", " ("" when absent).
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.join(", "))
            .unwrap_or_default()
    }

    /// True when the comma-separated values of `name` include `token` (case-insensitive).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The status code of a response head.
    fn status(&self) -> Option<u16> {
        self.start.split_whitespace().nth(1)?.parse().ok()
    }

    fn path(&self) -> &str {
        self.start.split_whitespace().nth(1).unwrap_or("")
    }
}

/// Reads until the end of a head; returns the head and the bytes that came after it.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<(Head, Vec<u8>)> {
    let deadline = Instant::now() + IO_BOUND;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = got.split_off(end + 4);
            return Ok((Head::parse(&got), rest));
        }
        if got.len() > MAX_HEAD {
            return Err(std::io::Error::other("head too large"));
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .map_err(|_| {
                std::io::Error::other(format!("no complete head within {IO_BOUND:?}"))
            })??;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("EOF after {:?}", String::from_utf8_lossy(&got)),
            ));
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// Reads exactly `n` bytes, bounded by [`IO_BOUND`].
async fn read_exact_bounded<S: AsyncRead + Unpin>(stream: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(IO_BOUND, stream.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{n} bytes did not arrive within {IO_BOUND:?}"))
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}

/// A backend that answers any `Upgrade` request with `Connection: upgrade` (except at
/// [`DECLINE_PATH`]) with
/// `101 Switching Protocols`, greets with `hello <protocol>\n` in the same write as the head,
/// then echoes every byte until the peer half-closes, and half-closes in turn.
struct EchoUpgradeBackend {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<Head>>>,
    task: JoinHandle<()>,
}

impl EchoUpgradeBackend {
    async fn start() -> EchoUpgradeBackend {
        Self::start_with(None).await
    }

    /// Serves TLS with `tls` (for `tls = true` upstreams), else plain HTTP.
    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> EchoUpgradeBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upgrade backend");
        let addr = listener.local_addr().expect("local addr");
        let heads: Arc<Mutex<Vec<Head>>> = Arc::default();
        let log = heads.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when the test aborts this task) aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let log = log.clone();
                            match tls.clone() {
                                None => {
                                    connections.spawn(Self::serve(stream, log));
                                }
                                Some(acceptor) => {
                                    connections.spawn(async move {
                                        if let Ok(stream) = acceptor.accept(stream).await {
                                            Self::serve(stream, log).await;
                                        }
                                    });
                                }
                            }
                        }
                        // E.g. EMFILE: back off instead of spinning.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
        });
        EchoUpgradeBackend { addr, heads, task }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, log: Arc<Mutex<Vec<Head>>>) {
        let Ok((head, early)) = read_head(&mut stream).await else {
            return;
        };
        log.lock().unwrap().push(head.clone());
        let protocol = head.header("upgrade");
        // Like a real WebSocket server: no switch without `Connection: upgrade`.
        if head.path() == DECLINE_PATH
            || protocol.is_empty()
            || !head.has_token("connection", "upgrade")
        {
            let resp = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{DECLINE_BODY}",
                DECLINE_BODY.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
            let _ = stream.shutdown().await;
            return;
        }
        let switch = format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n\
             hello {protocol}\n"
        );
        if stream.write_all(switch.as_bytes()).await.is_err() {
            return;
        }
        if !early.is_empty() && stream.write_all(&early).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 16 * 1024];
        // Ends at the peer's EOF or an error; the test aborts it at the latest.
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stream.shutdown().await;
    }

    fn heads(&self) -> Vec<Head> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for EchoUpgradeBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn upgrade_request(path: &str, protocol: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: ws.example.test\r\nConnection: Upgrade\r\n\
         Upgrade: {protocol}\r\nX-Forwarded-For: 6.6.6.6\r\n{extra}\r\n"
    )
}

/// Upgrades `stream` through kaproxy, then checks the greeting, several echo round trips, a
/// bulk payload streamed both ways at once, and that a half-close travels end to end.
async fn exercise_tunnel<S>(mut stream: S, protocol: &str, extra: &str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    stream
        .write_all(upgrade_request("/chat", protocol, extra).as_bytes())
        .await
        .expect("send upgrade request");
    let (head, mut early) = read_head(&mut stream).await.expect("response head");
    assert_eq!(head.status(), Some(101), "switching protocols: {head:?}");
    assert!(
        head.has_token("connection", "upgrade"),
        "the 101 keeps Connection: upgrade: {head:?}"
    );
    assert_eq!(head.header("upgrade"), protocol, "{head:?}");

    // The greeting the backend wrote together with its 101 head.
    let greeting = format!("hello {protocol}\n");
    if early.len() < greeting.len() {
        let more = read_exact_bounded(&mut stream, greeting.len() - early.len()).await;
        early.extend_from_slice(&more);
    }
    assert_eq!(
        String::from_utf8_lossy(&early),
        greeting,
        "upstream bytes sent with the 101 reach the client"
    );

    for i in 0..ROUND_TRIPS {
        let msg = format!("ping {i} over {protocol}\n");
        stream.write_all(msg.as_bytes()).await.expect("write");
        let echoed = read_exact_bounded(&mut stream, msg.len()).await;
        assert_eq!(String::from_utf8_lossy(&echoed), msg, "round trip {i}");
    }

    // Bulk: write and read concurrently so neither direction's buffers can stall the other.
    let bulk: Vec<u8> = (0..BULK_LEN).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write = async {
        wr.write_all(&bulk).await.expect("write bulk");
        wr.flush().await.expect("flush");
    };
    let read = read_exact_bounded(&mut rd, BULK_LEN);
    let ((), echoed) = tokio::join!(write, read);
    assert!(echoed == bulk, "bulk payload echoed intact");

    // Half-close: our FIN reaches the backend, which closes in turn; we then see EOF.
    wr.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(IO_BOUND, rd.read_to_end(&mut rest)).await;
    match ended {
        Ok(Ok(_)) => assert!(rest.is_empty(), "nothing after the echo: {rest:?}"),
        Ok(Err(e)) => panic!("tunnel ended with an error instead of EOF: {e}"),
        Err(_) => panic!("no EOF within {IO_BOUND:?} after half-closing the tunnel"),
    }
}

/// What the backend must have seen for an upgrade request from 127.0.0.1.
fn assert_backend_saw_upgrade(head: &Head, protocol: &str) {
    assert_eq!(head.start, "GET /chat HTTP/1.1", "{head:?}");
    assert_eq!(head.header("upgrade"), protocol, "{head:?}");
    assert!(
        head.has_token("connection", "upgrade"),
        "Connection: upgrade forwarded: {head:?}"
    );
    assert!(
        !head.has_token("connection", "keep-alive"),
        "an upgrade is not a pooled keep-alive request: {head:?}"
    );
    assert_eq!(
        head.header("x-forwarded-for"),
        "127.0.0.1",
        "X-Forwarded-For replaced: {head:?}"
    );
    assert_eq!(head.header("host"), "ws.example.test", "{head:?}");
}

/// The group in front of the echo backend, which tunnels WebSocket (the default) and the
/// test protocols these tests name.
fn upstream_toml(backend: &EchoUpgradeBackend) -> String {
    format!(
        "[upstreams.ws]\nservers = [\"{}\"]\n{TEST_PROTOCOLS}\n",
        backend.addr
    )
}

const TEST_PROTOCOLS: &str =
    r#"upgrade_protocols = ["websocket", "echo-proto", "echo-0", "echo-1", "echo-2", "echo-3"]"#;

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_on_plain_http() {
    let backend = EchoUpgradeBackend::start().await;
    let proxy = TestProxy::start(&upstream_toml(&backend)).await;
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let stream = connect_from(proxy.http().addr, None)
        .await
        .expect("connect");
    exercise_tunnel(stream, "websocket", key).await;

    let heads = backend.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert_backend_saw_upgrade(&heads[0], "websocket");
    assert_eq!(
        heads[0].header("sec-websocket-key"),
        "dGhlIHNhbXBsZSBub25jZQ==",
        "end-to-end WebSocket headers pass through"
    );
    assert_eq!(heads[0].header("sec-websocket-version"), "13");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_listed_upgrade_protocol_is_tunnelled_on_the_tls_listener() {
    let backend = EchoUpgradeBackend::start().await;
    let proxy = TestProxy::start(&upstream_toml(&backend)).await;
    let endpoint = proxy.https(&["http/1.1"]);
    let (tls, alpn) = tls_connect(endpoint.addr, endpoint.tls.clone().unwrap(), None)
        .await
        .expect("TLS connect");
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    exercise_tunnel(tls, "echo-proto", "").await;

    let heads = backend.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert_backend_saw_upgrade(&heads[0], "echo-proto");
    assert_eq!(heads[0].header("x-forwarded-proto"), "https");
    proxy.shutdown().await;
}

#[tokio::test]
async fn concurrent_tunnels_stay_separate() {
    let backend = EchoUpgradeBackend::start().await;
    let proxy = TestProxy::start(&upstream_toml(&backend)).await;
    let addr = proxy.http().addr;
    let tunnels = (0..4).map(|i| async move {
        let stream = connect_from(addr, None).await.expect("connect");
        exercise_tunnel(stream, &format!("echo-{i}"), "").await;
    });
    futures_util::future::join_all(tunnels).await;
    assert_eq!(backend.heads().len(), 4);
    proxy.shutdown().await;
}

#[tokio::test]
async fn declined_upgrade_is_relayed_as_a_normal_response() {
    let backend = EchoUpgradeBackend::start().await;
    let proxy = TestProxy::start(&upstream_toml(&backend)).await;
    let mut stream = connect_from(proxy.http().addr, None)
        .await
        .expect("connect");
    stream
        .write_all(upgrade_request(DECLINE_PATH, "websocket", "").as_bytes())
        .await
        .expect("send");
    let (head, mut body) = read_head(&mut stream).await.expect("response head");
    assert_eq!(head.status(), Some(403), "{head:?}");
    assert!(
        head.header("upgrade").is_empty(),
        "no Upgrade on a refusal: {head:?}"
    );
    let len: usize = head.header("content-length").parse().unwrap_or(0);
    if len > 0 && body.len() < len {
        let more = read_exact_bounded(&mut stream, len - body.len()).await;
        body.extend_from_slice(&more);
    } else if len == 0 {
        // Chunked or close-delimited: read to the end of the body (kaproxy may close).
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(IO_BOUND, stream.read_to_end(&mut rest)).await;
        body.extend_from_slice(&rest);
    }
    assert!(
        String::from_utf8_lossy(&body).contains(DECLINE_BODY.trim()),
        "the backend's refusal body reaches the client: {:?} {:?}",
        head,
        String::from_utf8_lossy(&body)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn upgrade_moves_on_to_the_next_server_when_connect_fails() {
    let backend = EchoUpgradeBackend::start().await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("local addr")
    };
    let proxy = TestProxy::start(&format!(
        "[upstreams.ws]\nservers = [\"{dead}\", \"{}\"]\nretry_backoff = \"10ms\"\n{TEST_PROTOCOLS}\n",
        backend.addr
    ))
    .await;
    // SPEC.md: "connect failures move on to the next server for any method".
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let mut stream = connect_from(proxy.http().addr, None)
            .await
            .expect("connect");
        stream
            .write_all(upgrade_request("/chat", "echo-proto", "").as_bytes())
            .await
            .expect("send");
        let (head, _) = read_head(&mut stream).await.expect("response head");
        statuses.push(head.status());
    }
    let m = proxy.metrics();
    assert_eq!(
        statuses,
        vec![Some(101); 8],
        "every upgrade reaches the live server\n{}",
        m.lines_of("kaproxy_upstream")
    );
    assert_eq!(
        m.sum(
            "kaproxy_server_up",
            &[("server", dead.to_string().as_str())]
        ),
        0.0,
        "the refused connects mark the dead server down\n{}",
        m.lines_of("kaproxy_server_up")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn upgrade_is_tunnelled_over_tls_to_a_tls_upstream() {
    use rustls_pki_types::pem::PemObject;
    let pki = kaproxy_testkit::pki::TestPki::generate().unwrap();
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&pki.server_cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let backend =
        EchoUpgradeBackend::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
            .await;
    let proxy = TestProxy::start(&format!(
        "{}tls = true\ntls_ca = {:?}\n",
        upstream_toml(&backend),
        pki.ca_cert.display().to_string()
    ))
    .await;
    let stream = connect_from(proxy.http().addr, None)
        .await
        .expect("connect");
    exercise_tunnel(stream, "websocket", "").await;
    let heads = backend.heads();
    assert_eq!(
        heads.len(),
        1,
        "the backend read the upgrade over TLS: {heads:?}"
    );
    assert_backend_saw_upgrade(&heads[0], "websocket");
    let m = proxy.metrics();
    assert_eq!(
        m.sum("kaproxy_upstream_tls_handshakes_total", &[]),
        1.0,
        "{}",
        m.lines_of("kaproxy_upstream_tls_handshakes_total")
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Hostile upgrades (issue 17: "Through a tunnel")
// ---------------------------------------------------------------------------------------------

/// Sends `request` on a fresh connection to kaproxy's plain listener; the connection, the
/// response head, and what came after it.
async fn exchange_head(proxy: &TestProxy, request: &str) -> (TcpStream, Head, Vec<u8>) {
    let mut stream = connect_from(proxy.http().addr, None)
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let (head, early) = read_head(&mut stream).await.expect("response head");
    (stream, head, early)
}

/// The h2c smuggling of BishopFox's h2csmuggler: an `Upgrade: h2c` that a backend accepts
/// would carry the client's own HTTP/2 frames past the routes, the forwarding headers and the
/// access log. kaproxy serves it as the plain HTTP/1.1 request it also is: the backend sees
/// no Upgrade and no HTTP2-Settings, and the client gets the backend's plain answer.
#[tokio::test]
async fn an_h2c_upgrade_is_never_tunnelled_on_either_listener() {
    let backend = EchoUpgradeBackend::start().await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.ws]\nservers = [\"{}\"]\n",
        backend.addr
    ))
    .await;
    let request = "GET /_be/upgrade/h2c HTTP/1.1\r\nHost: ws.example.test\r\n\
                   Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\
                   Connection: Upgrade, HTTP2-Settings\r\n\r\n";
    let mut plain = connect_from(proxy.http().addr, None)
        .await
        .expect("connect");
    plain.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_head(&mut plain).await.expect("response head");
    assert_eq!(
        head.status(),
        Some(403),
        "served as plain HTTP/1.1: {head:?}"
    );

    let endpoint = proxy.https(&["http/1.1"]);
    let (mut tls, _) = tls_connect(endpoint.addr, endpoint.tls.clone().unwrap(), None)
        .await
        .expect("TLS connect");
    tls.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = read_head(&mut tls).await.expect("response head");
    assert_eq!(head.status(), Some(403), "over TLS too: {head:?}");

    let heads = backend.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in heads {
        assert_eq!(
            head.header("upgrade"),
            "",
            "no Upgrade reached the backend: {head:?}"
        );
        assert_eq!(head.header("http2-settings"), "", "{head:?}");
        assert!(!head.has_token("connection", "upgrade"), "{head:?}");
    }
    proxy.shutdown().await;
}

/// A backend that answers every request with `response`, then keeps the connection open.
async fn canned_backend(response: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            connections.spawn(async move {
                if read_head(&mut stream).await.is_ok() {
                    let _ = stream.write_all(response.as_bytes()).await;
                    let mut sink = vec![0u8; 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    (addr, task)
}

/// RFC 9110 §15.2.2: a server must not switch to a protocol the request did not offer.
#[tokio::test]
async fn a_101_the_request_did_not_ask_for_is_a_502() {
    let (backend, task) = canned_backend(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    let proxy = TestProxy::start(&format!("[upstreams.ws]\nservers = [\"{backend}\"]\n")).await;
    // A plain GET, no upgrade offered.
    let request = "GET /plain HTTP/1.1\r\nHost: ws.example.test\r\n\r\n";
    let (_, head, _) = exchange_head(&proxy, request).await;
    assert_eq!(head.status(), Some(502), "{head:?}");
    // A WebSocket upgrade answered with a switch to another protocol.
    let (_, head, _) = exchange_head(&proxy, &upgrade_request("/chat", "websocket", "")).await;
    assert_eq!(head.status(), Some(502), "h2c was not offered: {head:?}");
    proxy.shutdown().await;
    task.abort();
}

#[tokio::test]
async fn an_idle_websocket_is_closed_at_tunnel_idle_timeout_on_both_sides() {
    let backend = EchoUpgradeBackend::start().await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.ws]\nservers = [\"{}\"]\ntunnel_idle_timeout = \"1s\"\n",
        backend.addr
    ))
    .await;
    let server = backend.addr.to_string();
    let (mut stream, head, mut early) =
        exchange_head(&proxy, &upgrade_request("/chat", "websocket", "")).await;
    assert_eq!(head.status(), Some(101), "{head:?}");
    let greeting = b"hello websocket\n";
    if early.len() < greeting.len() {
        early.extend(read_exact_bounded(&mut stream, greeting.len() - early.len()).await);
    }
    stream.write_all(b"ping").await.unwrap();
    assert_eq!(read_exact_bounded(&mut stream, 4).await, b"ping");
    let m = proxy.metrics();
    assert_eq!(
        m.sum("kaproxy_upstream_tunnels", &[("server", &server)]),
        1.0
    );
    // Then silence: kaproxy closes both sides after 1 s.
    let quiet = Instant::now();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(IO_BOUND, stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(ended, Ok(Ok(0))),
        "closed by kaproxy: {ended:?} {rest:?}"
    );
    let took = quiet.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed about tunnel_idle_timeout after the last byte: {took:?}"
    );
    let (m, closed) = proxy
        .wait_metrics(IO_BOUND, |m| {
            m.sum(
                "kaproxy_upstream_tunnels_closed_total",
                &[("server", &server), ("reason", "idle")],
            ) == 1.0
                && m.sum("kaproxy_upstream_tunnels", &[("server", &server)]) == 0.0
        })
        .await;
    assert!(closed, "{}", m.lines_of("kaproxy_upstream_tunnels"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn tunnels_hold_a_slot_of_max_connections_per_server() {
    let backend = EchoUpgradeBackend::start().await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.ws]\nservers = [\"{}\"]\nmax_connections_per_server = 2\n\
         max_idle_per_server = 2\nacquire_timeout = \"500ms\"\n",
        backend.addr
    ))
    .await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let (stream, head, _) =
            exchange_head(&proxy, &upgrade_request("/chat", "websocket", "")).await;
        assert_eq!(head.status(), Some(101), "{head:?}");
        open.push(stream);
    }
    let started = Instant::now();
    let (_third, head, _) = exchange_head(&proxy, &upgrade_request("/chat", "websocket", "")).await;
    assert_eq!(
        head.status(),
        Some(503),
        "both slots are held by tunnels: {head:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "after acquire_timeout"
    );
    assert_eq!(
        backend.heads().len(),
        2,
        "the third never reached the backend"
    );
    // A tunnel that ends gives its slot back.
    drop(open.pop());
    let (_fourth, head, _) =
        exchange_head(&proxy, &upgrade_request("/chat", "websocket", "")).await;
    assert_eq!(head.status(), Some(101), "{head:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn bytes_sent_right_after_the_upgrade_request_go_through_the_tunnel() {
    let backend = EchoUpgradeBackend::start().await;
    let proxy = TestProxy::start(&upstream_toml(&backend)).await;
    let mut stream = connect_from(proxy.http().addr, None)
        .await
        .expect("connect");
    // The first message in the same write as the request: kaproxy has read it with the head
    // and must hand it to the tunnel first.
    let mut bytes = upgrade_request("/chat", "echo-proto", "").into_bytes();
    bytes.extend_from_slice(b"early ping\n");
    stream.write_all(&bytes).await.expect("send");
    let (head, mut early) = read_head(&mut stream).await.expect("response head");
    assert_eq!(head.status(), Some(101), "{head:?}");
    let expected = b"hello echo-proto\nearly ping\n";
    if early.len() < expected.len() {
        let more = read_exact_bounded(&mut stream, expected.len() - early.len()).await;
        early.extend_from_slice(&more);
    }
    assert_eq!(
        String::from_utf8_lossy(&early),
        String::from_utf8_lossy(expected),
        "the greeting, then the early message echoed"
    );
    proxy.shutdown().await;
}
