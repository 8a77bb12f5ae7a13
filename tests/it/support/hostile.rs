//! Raw-socket helpers for the hostile-client tests: a byte-exact HTTP/1.1 response reader (with
//! chunked decoding), a client socket with a tiny receive buffer, an HTTP/2 client that opens
//! every stream with a zero flow-control window, and small backends: one that serves bodies of
//! any size, and raw-TCP ones that answer canned bytes, reset, or never answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::client::{tls_connect, Endpoint, TLS_SERVER_NAME};

/// Bound on every raw read of a whole response.
pub const RAW_BOUND: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 client side
// ---------------------------------------------------------------------------------------------

/// How reading a raw response ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A complete response (by `Content-Length` or the last chunk) was read.
    Complete,
    /// Clean EOF (FIN) before a complete response, or ending a close-delimited one.
    Eof,
    /// An I/O error such as a reset.
    Error(std::io::ErrorKind),
    /// Nothing more within the bound.
    Timeout,
}

/// One response read byte by byte off a socket.
#[derive(Clone)]
pub struct RawResponse {
    /// The status code, once a head was read.
    pub status: Option<u16>,
    /// Header lines as sent (names lower-cased), in order, duplicates kept.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when the response was chunked.
    pub body: Vec<u8>,
    /// Bytes read in total.
    pub raw_len: usize,
    pub end: End,
    /// How long from the start of reading to the end.
    pub took: Duration,
}

impl RawResponse {
    /// Every value of header `name`.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.body[..self.body.len().min(200)];
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field(
                "body",
                &format!(
                    "{:?}{} ({} bytes)",
                    String::from_utf8_lossy(shown),
                    if self.body.len() > shown.len() {
                        "…"
                    } else {
                        ""
                    },
                    self.body.len()
                ),
            )
            .field("raw_len", &self.raw_len)
            .field("end", &self.end)
            .field("took", &self.took)
            .finish()
    }
}

/// Where a message head in `buf` ends (the index just past its blank line).
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The `Content-Length` of a raw request head, if any (first value).
pub fn request_content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim().eq_ignore_ascii_case("content-length") {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Decodes a complete chunked body at the start of `data`: the body and the bytes consumed,
/// or `None` while incomplete (or malformed: the reader then ends on EOF or its bound).
pub fn decode_chunked(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut body = Vec::new();
    let mut pos = 0;
    // Bounded by `data.len()`: every turn consumes at least a size line.
    loop {
        let line_end = pos + data[pos..].windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&data[pos..line_end]).ok()?;
        let size_text = line.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let end = pos + data[pos..].windows(2).position(|w| w == b"\r\n")?;
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return Some((body, pos));
                }
            }
        }
        if data.len() < pos + size + 2 {
            return None;
        }
        body.extend_from_slice(&data[pos..pos + size]);
        pos += size + 2;
    }
}

fn parse_head(head: &[u8]) -> (Option<u16>, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok());
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    (status, headers)
}

/// Reads one response from `stream` (framed by `Transfer-Encoding: chunked`, which wins, by
/// `Content-Length`, or by EOF), for at most `bound`. Never panics on what arrives.
pub async fn read_response<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    bound: Duration,
) -> RawResponse {
    let started = Instant::now();
    let deadline = started + bound;
    let mut got: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let finish = |got: &[u8], end: End| {
        let (status, headers, body) = match head_len(got) {
            Some(h) => {
                let (status, headers) = parse_head(&got[..h]);
                let rest = &got[h..];
                let chunked = headers.iter().any(|(k, v)| {
                    k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked")
                });
                let body = if chunked {
                    decode_chunked(rest)
                        .map(|(b, _)| b)
                        .unwrap_or_else(|| rest.to_vec())
                } else {
                    rest.to_vec()
                };
                (status, headers, body)
            }
            None => (None, Vec::new(), got.to_vec()),
        };
        RawResponse {
            status,
            headers,
            body,
            raw_len: got.len(),
            end,
            took: started.elapsed(),
        }
    };
    loop {
        if let Some(h) = head_len(&got) {
            let (_, headers) = parse_head(&got[..h]);
            let chunked = headers.iter().any(|(k, v)| {
                k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked")
            });
            let length = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok());
            let complete = if chunked {
                decode_chunked(&got[h..]).is_some()
            } else {
                length.is_some_and(|len| got.len() >= h + len)
            };
            if complete {
                if let (false, Some(len)) = (chunked, length) {
                    got.truncate(h + len);
                }
                return finish(&got, End::Complete);
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return finish(&got, End::Timeout),
            Ok(Ok(0)) => return finish(&got, End::Eof),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return finish(&got, End::Error(e.kind())),
        }
    }
}

/// Reads and discards everything until EOF, an error or `bound`; returns the byte count and
/// how it ended.
pub async fn drain(stream: &mut TcpStream, bound: Duration) -> (usize, End) {
    let deadline = Instant::now() + bound;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (total, End::Timeout),
            Ok(Ok(0)) => return (total, End::Eof),
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => return (total, End::Error(e.kind())),
        }
    }
}

/// A well-formed chunked `POST path` of `data`, in chunks of `chunk` bytes, then the last chunk.
pub fn chunked_request(path: &str, data: &[u8], chunk: usize) -> Vec<u8> {
    let mut bytes =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for part in data.chunks(chunk) {
        bytes.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        bytes.extend_from_slice(part);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

/// Sends `request` on a fresh plain connection to `addr` while reading the response (so that a
/// server that answers before it has read everything is heard), and returns the response. A
/// failed write (the server closed early) is not an error here: the answer is what counts.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect to kaproxy");
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.split();
    let write = async {
        let _ = wr.write_all(request).await;
        // The write half stays open (no FIN) until the response is read.
        std::future::pending::<()>().await
    };
    tokio::select! {
        resp = read_response(&mut rd, RAW_BOUND) => resp,
        () = write => unreachable!("the write future never completes"),
    }
}

/// A TCP connection to `addr` whose receive buffer is as small as the kernel allows, so that a
/// client that never reads stalls the sender after a few KiB instead of after megabytes.
pub async fn connect_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect to kaproxy")
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 client with a zero window
// ---------------------------------------------------------------------------------------------

/// How a zero-window HTTP/2 stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// The server reset the stream or the connection went away (GOAWAY, close, reset).
    Reset(String),
    /// The body ended normally (impossible with a zero window unless it was empty).
    Complete,
    /// Still open after the bound.
    Timeout,
}

/// An HTTP/2 response whose body the client never allows to flow: every stream starts with
/// SETTINGS_INITIAL_WINDOW_SIZE = 0 and no WINDOW_UPDATE is ever sent.
pub struct ZeroWindowStream {
    pub status: u16,
    pub headers: http::HeaderMap,
    body: h2::RecvStream,
    /// DATA bytes that arrived anyway.
    pub received: usize,
    _sender: h2::client::SendRequest<Bytes>,
    conn: JoinHandle<()>,
}

impl ZeroWindowStream {
    /// Opens a TLS connection with ALPN h2 and sends `GET path` with a zero stream window.
    pub async fn get(endpoint: &Endpoint, path: &str) -> ZeroWindowStream {
        let config = endpoint.tls.clone().expect("h2 needs the TLS endpoint");
        let open = async {
            let (tls, alpn) = tls_connect(endpoint.addr, config, None)
                .await
                .expect("tls connect");
            assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN selected h2");
            let (sender, conn) = h2::client::Builder::new()
                .initial_window_size(0)
                .handshake::<_, Bytes>(tls)
                .await
                .expect("h2 handshake");
            let conn = tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut sender = sender.ready().await.expect("h2 ready");
            let req = http::Request::get(format!("https://{TLS_SERVER_NAME}{path}"))
                .body(())
                .expect("request");
            let (resp, _) = sender.send_request(req, true).expect("send h2 request");
            let resp = resp.await.expect("h2 response head");
            let (parts, body) = resp.into_parts();
            ZeroWindowStream {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
                received: 0,
                _sender: sender,
                conn,
            }
        };
        tokio::time::timeout(RAW_BOUND, open)
            .await
            .expect("h2 response head within 5 s")
    }

    /// Waits (at most `bound`) for the stream to end, counting any DATA that arrives.
    pub async fn end(&mut self, bound: Duration) -> StreamEnd {
        let deadline = Instant::now() + bound;
        loop {
            match tokio::time::timeout_at(deadline, self.body.data()).await {
                Err(_) => return StreamEnd::Timeout,
                Ok(None) => return StreamEnd::Complete,
                Ok(Some(Ok(data))) => self.received += data.len(),
                Ok(Some(Err(e))) => return StreamEnd::Reset(e.to_string()),
            }
        }
    }
}

impl Drop for ZeroWindowStream {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

/// A hyper HTTP/1.1 backend that answers `GET /bytes/N` with N bytes of `x` (with
/// `Content-Length`) and anything else with `hello from NAME`, advertising Apache's default
/// `Keep-Alive: timeout=5` (so kaproxy knows its timeout from the first response and keeps no
/// probe connection: each connection given back is reused). Stops when dropped.
pub struct BulkBackend {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// Accepts on `listener` until the returned task is aborted, serving each connection with
/// `serve` on a task of its own (aborted with it). Bounded by the test that drops it.
fn accept_each<F, Fut>(listener: TcpListener, mut serve: F) -> tokio::task::JoinHandle<()>
where
    F: FnMut(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            while conns.try_join_next().is_some() {}
            conns.spawn(serve(stream));
        }
    })
}

impl BulkBackend {
    pub async fn start(name: &str) -> BulkBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let name: Arc<str> = name.into();
        let count = requests.clone();
        let task = accept_each(listener, move |stream| {
            let name = name.clone();
            let count = count.clone();
            async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let name = name.clone();
                    count.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let path = req.uri().path().to_string();
                        let _ = req.into_body().collect().await;
                        let body = match path
                            .strip_prefix("/bytes/")
                            .and_then(|n| n.parse::<usize>().ok())
                        {
                            Some(n) => Bytes::from(vec![b'x'; n]),
                            None => Bytes::from(format!("hello from {name}\n")),
                        };
                        let resp = http::Response::builder()
                            .status(200)
                            .header("x-backend", name.as_ref())
                            .header("keep-alive", "timeout=5")
                            .header("content-length", body.len())
                            .body(Full::new(body))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        });
        BulkBackend {
            addr,
            requests,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for BulkBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a [`RawBackend`] does with each request (head plus `Content-Length` body) it reads.
#[derive(Debug, Clone)]
pub enum RawBehaviour {
    /// Writes these bytes as the response and waits for the next request on the connection.
    Canned(&'static [u8]),
    /// Resets the connection (SO_LINGER 0, then close) after reading the whole request.
    ResetAfterRequest,
    /// Never answers; reads and discards until the peer closes.
    Silent,
}

/// Counters of a [`RawBackend`].
#[derive(Debug, Default)]
pub struct RawStats {
    pub connections: AtomicUsize,
    /// Request heads read (with their `Content-Length` bodies).
    pub requests: AtomicUsize,
    /// Request body bytes read.
    pub body_bytes: AtomicUsize,
    /// Connections the peer (kaproxy) closed: EOF or an error on read.
    pub closed_by_peer: AtomicUsize,
}

/// A snapshot of [`RawStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSnapshot {
    pub connections: usize,
    pub requests: usize,
    pub body_bytes: usize,
    pub closed_by_peer: usize,
}

/// A backend on raw TCP, for answers hyper would not produce. Stops (closing every
/// connection) when dropped.
pub struct RawBackend {
    addr: SocketAddr,
    stats: Arc<RawStats>,
    task: JoinHandle<()>,
}

impl RawBackend {
    pub async fn start(behaviour: RawBehaviour) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let stats: Arc<RawStats> = Arc::default();
        let shared = stats.clone();
        let task = accept_each(listener, move |stream| {
            shared.connections.fetch_add(1, Ordering::Relaxed);
            raw_connection(stream, behaviour.clone(), shared.clone())
        });
        RawBackend { addr, stats, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> RawSnapshot {
        RawSnapshot {
            connections: self.stats.connections.load(Ordering::Relaxed),
            requests: self.stats.requests.load(Ordering::Relaxed),
            body_bytes: self.stats.body_bytes.load(Ordering::Relaxed),
            closed_by_peer: self.stats.closed_by_peer.load(Ordering::Relaxed),
        }
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_connection(mut stream: TcpStream, behaviour: RawBehaviour, stats: Arc<RawStats>) {
    let _ = stream.set_nodelay(true);
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // One turn per request; ends when the peer closes.
    loop {
        let head = loop {
            if let Some(h) = head_len(&pending) {
                break h;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    stats.closed_by_peer.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let len = request_content_length(&pending[..head]).unwrap_or(0);
        while pending.len() < head + len {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    stats.closed_by_peer.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        pending.drain(..head + len);
        stats.body_bytes.fetch_add(len, Ordering::Relaxed);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        match &behaviour {
            RawBehaviour::Canned(bytes) => {
                if stream.write_all(bytes).await.is_err() {
                    stats.closed_by_peer.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            RawBehaviour::ResetAfterRequest => {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
                return;
            }
            RawBehaviour::Silent => {
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                stats.closed_by_peer.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}
