//! Owns the built-in Apache-like HTTP/1.1 backends that `kaproxy demo`, the tests and the bench's
//! race reproducer put behind the proxy, with Apache httpd 2.4's keep-alive behaviour.
//!
//! What "Apache-like" means here, taken from `ap_set_keepalive` (server/http_protocol.c) and the
//! event MPM:
//!
//! - A response stays persistent unless the client sent `Connection: close`, the status is one
//!   Apache drops the connection for (400, 408, 411, 413, 414, 500, 501, 503), the connection
//!   has used up `MaxKeepAliveRequests`, or the request is HTTP/1.0 without `keep-alive`. The
//!   last response on a connection carries `Connection: close`.
//! - Only a request that carried a `keep-alive` token gets `Keep-Alive: timeout=T, max=M` (and
//!   `Connection: Keep-Alive`) back; `T` is whole seconds rounded down (so a 300 ms timeout is
//!   advertised as `timeout=0`), `M` the requests left on the connection including this one.
//! - A connection idle `KeepAliveTimeout` after its last response is closed with a lingering
//!   close: FIN first, then whatever the peer still sends is read and discarded for a while, so
//!   a request that raced the close sees a clean EOF rather than an RST.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Apache httpd 2.4's default `KeepAliveTimeout`.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Apache httpd 2.4's default `MaxKeepAliveRequests`.
pub const DEFAULT_MAX_KEEPALIVE_REQUESTS: u32 = 100;
/// Apache httpd 2.4's default `Timeout`, which is what a fresh connection gets to send its first
/// request (`KeepAliveTimeout` only applies between requests).
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a closing connection keeps discarding what the peer still sends: Apache's event MPM
/// lingers 2 s (`SECONDS_TO_LINGER`).
const LINGER: Duration = Duration::from_secs(2);
/// Upper bound of `/slow?ms=N`, so that a typo cannot pin a connection for hours.
const MAX_SLOW: Duration = Duration::from_secs(600);
/// Pause after a failed `accept` (for example EMFILE) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Request headers a demo backend echoes back as `X-Seen-*`, so that tests can check what the
/// proxy forwarded (including the `Connection` header it sends upstream).
const ECHOED_HEADERS: [(&str, &str); 8] = [
    ("x-forwarded-for", "x-seen-forwarded-for"),
    ("x-forwarded-proto", "x-seen-forwarded-proto"),
    ("x-forwarded-port", "x-seen-forwarded-port"),
    ("x-forwarded-host", "x-seen-forwarded-host"),
    ("forwarded", "x-seen-forwarded"),
    ("x-real-ip", "x-seen-real-ip"),
    ("host", "x-seen-host"),
    ("connection", "x-seen-connection"),
];

/// How one demo backend behaves.
#[derive(Debug, Clone)]
pub struct DemoBackendConfig {
    /// Shown in the body and in the `X-Backend` header.
    pub name: String,
    /// Apache's `KeepAliveTimeout`.
    pub keepalive_timeout: Duration,
    /// Apache's `MaxKeepAliveRequests`; 0 means unlimited, as in Apache.
    pub max_keepalive_requests: u32,
    pub stale_reuse: StaleReuse,
}

impl Default for DemoBackendConfig {
    fn default() -> DemoBackendConfig {
        DemoBackendConfig {
            name: "demo".to_string(),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_keepalive_requests: DEFAULT_MAX_KEEPALIVE_REQUESTS,
            stale_reuse: StaleReuse::CloseIdle,
        }
    }
}

/// What a demo backend does about a keep-alive connection that has been idle `keepalive_timeout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StaleReuse {
    /// Like Apache: closes a keep-alive connection after it has been idle `keepalive_timeout`.
    #[default]
    CloseIdle,
    /// Deterministic model of the keep-alive race for tests: never closes idle connections by
    /// itself, but when a request arrives on a connection that has been idle >= keepalive_timeout
    /// since its last response, closes the connection WITHOUT answering (no response byte) —
    /// exactly what a proxy sees when it reuses a connection just as the backend's idle timer
    /// fired. Counted in stats.
    DropRequest,
}

/// A snapshot of a demo backend's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DemoStats {
    pub connections_accepted: u64,
    /// Connections accepted and not yet closed.
    pub connections_open: u64,
    /// Responses sent (a request dropped by [`StaleReuse::DropRequest`] is not one).
    pub requests_served: u64,
    /// Requests closed without a response by [`StaleReuse::DropRequest`].
    pub stale_drops: u64,
    /// Keep-alive connections the backend closed because they sat idle `keepalive_timeout`.
    pub idle_closes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections_accepted: AtomicU64,
    connections_open: AtomicU64,
    requests_served: AtomicU64,
    stale_drops: AtomicU64,
    idle_closes: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> DemoStats {
        DemoStats {
            connections_accepted: self.connections_accepted.load(Ordering::Relaxed),
            connections_open: self.connections_open.load(Ordering::Relaxed),
            requests_served: self.requests_served.load(Ordering::Relaxed),
            stale_drops: self.stale_drops.load(Ordering::Relaxed),
            idle_closes: self.idle_closes.load(Ordering::Relaxed),
        }
    }
}

/// What every connection of one backend shares.
#[derive(Debug)]
struct BackendShared {
    cfg: DemoBackendConfig,
    counters: Counters,
}

/// A running demo backend. Dropping it aborts its tasks, which closes every connection.
#[derive(Debug)]
pub struct DemoBackend {
    addr: SocketAddr,
    shared: Arc<BackendShared>,
    shutdown: Option<oneshot::Sender<()>>,
    accept_task: Option<JoinHandle<()>>,
}

impl DemoBackend {
    /// Binds `addr` (port 0 picks a free one) and starts serving; needs a tokio runtime.
    pub async fn start(addr: SocketAddr, cfg: DemoBackendConfig) -> std::io::Result<DemoBackend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(BackendShared {
            cfg,
            counters: Counters::default(),
        });
        let (shutdown, shutdown_rx) = oneshot::channel();
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        tracing::debug!(backend = %shared.cfg.name, %addr, "demo backend listening");
        Ok(DemoBackend {
            addr,
            shared,
            shutdown: Some(shutdown),
            accept_task: Some(accept_task),
        })
    }

    /// A backend with default settings named `name` on a free loopback port (it answers with
    /// `X-Backend: name`); panics if it cannot start, as a test would.
    pub async fn named(name: &str) -> DemoBackend {
        let cfg = DemoBackendConfig {
            name: name.to_string(),
            ..DemoBackendConfig::default()
        };
        DemoBackend::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg)
            .await
            .expect("start demo backend")
    }

    /// Starts `n` backends on free loopback ports, named `{cfg.name}-1` … `{cfg.name}-n`.
    pub async fn start_many(n: usize, cfg: DemoBackendConfig) -> std::io::Result<Vec<DemoBackend>> {
        let mut backends = Vec::with_capacity(n);
        for i in 1..=n {
            let cfg = DemoBackendConfig {
                name: format!("{}-{i}", cfg.name),
                ..cfg.clone()
            };
            backends.push(DemoBackend::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await?);
        }
        Ok(backends)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.shared.cfg.name
    }

    pub fn stats(&self) -> DemoStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting and closes every connection, in-flight requests included.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connection tasks; dropping it aborts them all.
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<BackendShared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Apache sets TCP_NODELAY on every connection.
                    let _ = stream.set_nodelay(true);
                    Counters::bump(&shared.counters.connections_accepted);
                    connections.spawn(serve_connection(stream, shared.clone()));
                }
                Err(err) => {
                    tracing::warn!(backend = %shared.cfg.name, %err, "demo backend accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Where one connection stands, shared by its request handler and its idle timer.
#[derive(Debug)]
struct ConnTimeline {
    accepted_at: Instant,
    /// Responses after which the connection stayed open (Apache's `c->keepalives`).
    kept_alive: u32,
    in_flight: bool,
    last_response_at: Option<Instant>,
}

#[derive(Debug)]
struct ConnShared {
    timeline: Mutex<ConnTimeline>,
    /// Woken when a request finishes, so that the idle timer re-arms from its end.
    request_done: Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleKind {
    /// No request yet: Apache's `Timeout`.
    FirstRequest,
    /// Between requests: Apache's `KeepAliveTimeout`.
    KeepAlive,
}

impl ConnShared {
    fn timeline(&self) -> MutexGuard<'_, ConnTimeline> {
        // A panic while holding this lock cannot leave the plain counters inconsistent.
        self.timeline.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the connection is to be closed for idleness, if it is idle at all.
    fn idle_deadline(&self, cfg: &DemoBackendConfig) -> Option<(Instant, IdleKind)> {
        let timeline = self.timeline();
        if timeline.in_flight {
            return None;
        }
        match (timeline.last_response_at, cfg.stale_reuse) {
            (None, _) => Some((
                timeline.accepted_at + DEFAULT_FIRST_REQUEST_TIMEOUT,
                IdleKind::FirstRequest,
            )),
            (Some(at), StaleReuse::CloseIdle) => {
                Some((at + cfg.keepalive_timeout, IdleKind::KeepAlive))
            }
            (Some(_), StaleReuse::DropRequest) => None,
        }
    }

    /// Marks a request as started; returns how long the connection had been idle since its last
    /// response if that is at least `keepalive_timeout` (a stale reuse).
    fn begin_request(&self, cfg: &DemoBackendConfig) -> Option<Duration> {
        let mut timeline = self.timeline();
        timeline.in_flight = true;
        let idle = timeline.last_response_at?.elapsed();
        (idle >= cfg.keepalive_timeout).then_some(idle)
    }

    fn end_request(&self) {
        let mut timeline = self.timeline();
        timeline.in_flight = false;
        timeline.last_response_at = Some(Instant::now());
        drop(timeline);
        self.request_done.notify_one();
    }
}

/// Ends the request when dropped, also when hyper drops the handler of an aborted request.
struct InFlight(Arc<ConnShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

/// Decrements `connections_open` however the connection task ends, abort included.
struct OpenConnection(Arc<BackendShared>);

impl OpenConnection {
    fn new(shared: Arc<BackendShared>) -> OpenConnection {
        Counters::bump(&shared.counters.connections_open);
        OpenConnection(shared)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .counters
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("request on a connection idle for {0:?} (>= keepalive_timeout) dropped unanswered")]
    StaleReuse(Duration),
    #[error("reading the request body: {0}")]
    Body(#[from] hyper::Error),
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, DemoError>> + Send>>;

async fn serve_connection(stream: TcpStream, shared: Arc<BackendShared>) {
    let _open = OpenConnection::new(shared.clone());
    let conn_shared = Arc::new(ConnShared {
        timeline: Mutex::new(ConnTimeline {
            accepted_at: Instant::now(),
            kept_alive: 0,
            in_flight: false,
            last_response_at: None,
        }),
        request_done: Notify::new(),
    });
    let service = {
        let shared = shared.clone();
        let conn_shared = conn_shared.clone();
        // hyper calls this synchronously as soon as it has parsed a request head, so the
        // request is marked in flight before the idle timer below can look at it again.
        service_fn(move |req| -> HandlerFuture {
            let stale = conn_shared.begin_request(&shared.cfg);
            let in_flight = InFlight(conn_shared.clone());
            let shared = shared.clone();
            Box::pin(async move {
                if let Some(idle) = stale {
                    Counters::bump(&shared.counters.stale_drops);
                    tracing::debug!(backend = %shared.cfg.name, ?idle, "dropping stale request");
                    // hyper closes the connection without writing anything when the service
                    // fails; the lingering close below turns that into a clean FIN.
                    return Err(DemoError::StaleReuse(idle));
                }
                respond(req, &shared, &in_flight.0).await
            })
        })
    };
    let mut conn = http1::Builder::new()
        // Apache writes `Keep-Alive`, `Content-Length`, …; some clients only ever saw that.
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service);

    let mut closing = false;
    let result = loop {
        let deadline = if closing {
            None
        } else {
            conn_shared.idle_deadline(&shared.cfg)
        };
        let idle_timer = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break result,
            () = conn_shared.request_done.notified() => {}
            () = idle_timer => {
                // Re-check: a request may have started since the deadline was computed.
                match conn_shared.idle_deadline(&shared.cfg) {
                    Some((at, kind)) if at <= Instant::now() => {
                        if kind == IdleKind::KeepAlive {
                            Counters::bump(&shared.counters.idle_closes);
                        }
                        tracing::debug!(backend = %shared.cfg.name, ?kind, "closing idle connection");
                        closing = true;
                        // On an idle HTTP/1 connection this makes hyper finish at once.
                        Pin::new(&mut conn).graceful_shutdown();
                    }
                    _ => {}
                }
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(backend = %shared.cfg.name, %err, "demo connection ended with an error");
    }
    let stream = conn.into_parts().io.into_inner();
    lingering_close(stream).await;
}

/// Closes like Apache: FIN first, then read and discard what the peer still sends until it
/// closes too or [`LINGER`] passes. Closing a socket with unread data makes the kernel send an
/// RST, which would turn a request that raced the close into "connection reset by peer".
async fn lingering_close(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut discard = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut discard)).await {
        if n == 0 {
            break;
        }
    }
}

async fn respond(
    req: Request<Incoming>,
    shared: &BackendShared,
    conn: &ConnShared,
) -> Result<Response<Full<Bytes>>, DemoError> {
    let cfg = &shared.cfg;
    let (parts, body) = req.into_parts();
    let client_keep_alive = ClientKeepAlive::of(&parts.headers, parts.version);

    let mut status = StatusCode::OK;
    let mut slow = Duration::ZERO;
    let path = parts.uri.path();
    if path == "/slow" {
        match slow_param(parts.uri.query()) {
            Some(ms) => slow = Duration::from_millis(ms).min(MAX_SLOW),
            None => status = StatusCode::BAD_REQUEST,
        }
    } else if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .filter(|code| (200..=599).contains(code))
            .and_then(|code| StatusCode::from_u16(code).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    }

    let text = if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
        let received = body.collect().await?.to_bytes().len();
        format!("{} received {received} bytes\n", cfg.name)
    } else {
        drop(body);
        format!("hello from {}\n", cfg.name)
    };
    if !slow.is_zero() {
        tokio::time::sleep(slow).await;
    }

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-backend"),
        header_value(cfg.name.as_bytes()),
    );
    for (seen, echo) in ECHOED_HEADERS {
        let values: Vec<&[u8]> = parts
            .headers
            .get_all(seen)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        headers.insert(
            HeaderName::from_static(echo),
            header_value(&values.join(&b", "[..])),
        );
    }
    if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // Set explicitly so that HEAD gets the length of the body it does not get.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(text.len()));
        if parts.method != Method::HEAD {
            *response.body_mut() = Full::new(Bytes::from(text));
        }
    }
    {
        let mut timeline = conn.timeline();
        set_keep_alive(
            response.headers_mut(),
            client_keep_alive,
            status,
            cfg,
            &mut timeline.kept_alive,
        );
    }
    Counters::bump(&shared.counters.requests_served);
    Ok(response)
}

/// `ms` of `/slow?ms=N`.
fn slow_param(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .and_then(|ms| ms.parse().ok())
}

fn header_value(bytes: &[u8]) -> HeaderValue {
    // Request header values are already valid header values; a backend name might not be.
    HeaderValue::from_bytes(bytes).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// What the request said about keeping the connection.
#[derive(Debug, Clone, Copy)]
struct ClientKeepAlive {
    http11: bool,
    asked_close: bool,
    asked_keep_alive: bool,
}

impl ClientKeepAlive {
    fn of(headers: &HeaderMap, version: Version) -> ClientKeepAlive {
        ClientKeepAlive {
            http11: version >= Version::HTTP_11,
            asked_close: has_connection_token(headers, "close"),
            asked_keep_alive: has_connection_token(headers, "keep-alive"),
        }
    }
}

fn has_connection_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Apache 2.4's `ap_set_keepalive`, reduced to what a demo backend has: decides whether the
/// connection stays open after this response and writes `Connection` / `Keep-Alive` to match.
fn set_keep_alive(
    headers: &mut HeaderMap,
    client: ClientKeepAlive,
    status: StatusCode,
    cfg: &DemoBackendConfig,
    kept_alive: &mut u32,
) {
    let max = cfg.max_keepalive_requests;
    // Apache's `left`: what is left of MaxKeepAliveRequests, this request included.
    let left = max.saturating_sub(*kept_alive);
    let persist = !cfg.keepalive_timeout.is_zero()
        && (max == 0 || left > 0)
        && !status_drops_connection(status)
        && !client.asked_close
        && (client.asked_keep_alive || client.http11);
    if !persist {
        // Apache sends `close` to HTTP/1.0 clients too, "because a broken proxy may identify
        // itself as HTTP/1.0"; hyper closes after a response that carries it.
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        return;
    }
    *kept_alive = kept_alive.saturating_add(1);
    if client.asked_keep_alive {
        let timeout = cfg.keepalive_timeout.as_secs();
        let value = if max == 0 {
            format!("timeout={timeout}")
        } else {
            format!("timeout={timeout}, max={left}")
        };
        headers.insert(
            HeaderName::from_static("keep-alive"),
            header_value(value.as_bytes()),
        );
        headers.insert(CONNECTION, HeaderValue::from_static("Keep-Alive"));
    }
}

/// Apache's `ap_status_drops_connection`.
fn status_drops_connection(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_REQUEST
            | StatusCode::REQUEST_TIMEOUT
            | StatusCode::LENGTH_REQUIRED
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::URI_TOO_LONG
            | StatusCode::INTERNAL_SERVER_ERROR
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::NOT_IMPLEMENTED
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw HTTP/1.1 connection to a demo backend, independent of any proxy code.
    struct RawConn {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    #[derive(Debug)]
    struct RawResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl RawResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn body_text(&self) -> &str {
            std::str::from_utf8(&self.body).unwrap()
        }
    }

    impl RawConn {
        async fn connect(backend: &DemoBackend) -> RawConn {
            RawConn {
                stream: TcpStream::connect(backend.addr()).await.unwrap(),
                buf: Vec::new(),
            }
        }

        async fn send(&mut self, request: &[u8]) {
            self.stream.write_all(request).await.unwrap();
        }

        async fn read_more(&mut self) -> usize {
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await.unwrap();
            self.buf.extend_from_slice(&chunk[..n]);
            n
        }

        /// Reads one response; `head` says it answers a HEAD request (no body follows).
        async fn response(&mut self, head: bool) -> RawResponse {
            let read = async {
                let head_end = loop {
                    if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    assert!(self.read_more().await > 0, "EOF before a response head");
                };
                let text = String::from_utf8(self.buf[..head_end].to_vec()).unwrap();
                let mut lines = text.split("\r\n");
                let status = lines.next().unwrap().split(' ').nth(1).unwrap();
                let headers: Vec<(String, String)> = lines
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (n, v) = l.split_once(':').unwrap();
                        (n.to_string(), v.trim().to_string())
                    })
                    .collect();
                let mut response = RawResponse {
                    status: status.parse().unwrap(),
                    headers,
                    body: Vec::new(),
                };
                let len: usize = match (head, response.header("content-length")) {
                    (false, Some(len)) => len.parse().unwrap(),
                    _ => 0,
                };
                while self.buf.len() < head_end + len {
                    assert!(self.read_more().await > 0, "EOF inside a response body");
                }
                response.body = self.buf[head_end..head_end + len].to_vec();
                self.buf.drain(..head_end + len);
                response
            };
            tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .expect("no response within 5 s")
        }

        /// Reads until EOF, which must come within `limit`; returns the bytes seen before it.
        async fn read_to_eof(&mut self, limit: Duration) -> Vec<u8> {
            tokio::time::timeout(limit, async { while self.read_more().await > 0 {} })
                .await
                .expect("connection not closed in time");
            std::mem::take(&mut self.buf)
        }

        async fn get(&mut self, path: &str, extra_headers: &str) -> RawResponse {
            let request = format!("GET {path} HTTP/1.1\r\nHost: demo.test\r\n{extra_headers}\r\n");
            self.send(request.as_bytes()).await;
            self.response(false).await
        }
    }

    const KEEP_ALIVE: &str = "Connection: keep-alive\r\n";

    async fn start(cfg: DemoBackendConfig) -> DemoBackend {
        DemoBackend::start(SocketAddr::from(([127, 0, 0, 1], 0)), cfg)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn keep_alive_header_counts_down_like_apache() {
        let backend = start(DemoBackendConfig::default()).await;
        let mut conn = RawConn::connect(&backend).await;

        let first = conn.get("/", KEEP_ALIVE).await;
        assert_eq!(first.status, 200);
        assert_eq!(first.header("keep-alive"), Some("timeout=5, max=100"));
        assert_eq!(first.header("connection"), Some("Keep-Alive"));
        assert_eq!(first.body_text(), "hello from demo\n");
        assert_eq!(first.header("x-backend"), Some("demo"));

        let second = conn.get("/", KEEP_ALIVE).await;
        assert_eq!(second.header("keep-alive"), Some("timeout=5, max=99"));

        // HTTP/1.1 without the keep-alive token: no Keep-Alive header, yet still persistent.
        let third = conn.get("/", "").await;
        assert_eq!(third.header("keep-alive"), None);
        assert_eq!(third.header("connection"), None);
        let fourth = conn.get("/", KEEP_ALIVE).await;
        assert_eq!(fourth.header("keep-alive"), Some("timeout=5, max=97"));

        let stats = backend.stats();
        assert_eq!(stats.connections_accepted, 1);
        assert_eq!(stats.requests_served, 4);
    }

    #[tokio::test]
    async fn last_keep_alive_request_gets_connection_close() {
        let backend = start(DemoBackendConfig {
            max_keepalive_requests: 2,
            ..DemoBackendConfig::default()
        })
        .await;
        let mut conn = RawConn::connect(&backend).await;
        let first = conn.get("/", KEEP_ALIVE).await;
        assert_eq!(first.header("keep-alive"), Some("timeout=5, max=2"));
        let second = conn.get("/", KEEP_ALIVE).await;
        assert_eq!(second.header("keep-alive"), Some("timeout=5, max=1"));
        let third = conn.get("/", KEEP_ALIVE).await;
        assert_eq!(third.status, 200);
        assert_eq!(third.header("connection"), Some("close"));
        assert_eq!(third.header("keep-alive"), None);
        assert!(conn.read_to_eof(Duration::from_secs(1)).await.is_empty());
        assert_eq!(backend.stats().idle_closes, 0);
    }

    #[tokio::test]
    async fn close_idle_closes_after_keepalive_timeout() {
        let backend = start(DemoBackendConfig {
            keepalive_timeout: Duration::from_secs(1),
            ..DemoBackendConfig::default()
        })
        .await;
        let mut conn = RawConn::connect(&backend).await;
        let response = conn.get("/", KEEP_ALIVE).await;
        assert_eq!(response.header("keep-alive"), Some("timeout=1, max=100"));
        let idle_since = std::time::Instant::now();
        assert!(conn
            .read_to_eof(Duration::from_millis(1600))
            .await
            .is_empty());
        let idle = idle_since.elapsed();
        assert!(idle >= Duration::from_millis(950), "closed after {idle:?}");
        assert_eq!(backend.stats().idle_closes, 1);
        assert_eq!(backend.stats().stale_drops, 0);
    }

    #[tokio::test]
    async fn close_idle_never_closes_a_connection_with_a_request_in_flight() {
        let backend = start(DemoBackendConfig {
            keepalive_timeout: Duration::from_millis(300),
            ..DemoBackendConfig::default()
        })
        .await;
        let mut conn = RawConn::connect(&backend).await;
        let first = conn.get("/", KEEP_ALIVE).await;
        // Apache rounds the advertised timeout down to whole seconds.
        assert_eq!(first.header("keep-alive"), Some("timeout=0, max=100"));
        let slow = conn.get("/slow?ms=700", KEEP_ALIVE).await;
        assert_eq!(slow.status, 200);
        // The idle timer restarts from the end of the slow response.
        let after = conn.get("/", KEEP_ALIVE).await;
        assert_eq!(after.header("keep-alive"), Some("timeout=0, max=98"));
        assert_eq!(backend.stats().idle_closes, 0);
    }

    #[tokio::test]
    async fn drop_request_closes_a_stale_connection_without_a_byte() {
        let backend = start(DemoBackendConfig {
            keepalive_timeout: Duration::from_millis(300),
            stale_reuse: StaleReuse::DropRequest,
            ..DemoBackendConfig::default()
        })
        .await;
        let mut conn = RawConn::connect(&backend).await;
        assert_eq!(conn.get("/", KEEP_ALIVE).await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(conn.get("/", KEEP_ALIVE).await.status, 200);
        tokio::time::sleep(Duration::from_millis(350)).await;
        conn.send(b"GET / HTTP/1.1\r\nHost: demo.test\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let seen = conn.read_to_eof(Duration::from_secs(1)).await;
        assert!(seen.is_empty(), "got {:?}", String::from_utf8_lossy(&seen));
        let stats = backend.stats();
        assert_eq!(stats.stale_drops, 1);
        assert_eq!(stats.requests_served, 2);
        assert_eq!(stats.idle_closes, 0);
    }

    #[tokio::test]
    async fn drop_request_with_an_unread_body_still_closes_with_fin_not_rst() {
        let backend = start(DemoBackendConfig {
            keepalive_timeout: Duration::from_millis(100),
            stale_reuse: StaleReuse::DropRequest,
            ..DemoBackendConfig::default()
        })
        .await;
        let mut conn = RawConn::connect(&backend).await;
        assert_eq!(conn.get("/", KEEP_ALIVE).await.status, 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let body = vec![b'x'; 256 * 1024];
        let head = format!(
            "PUT /upload HTTP/1.1\r\nHost: demo.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // Head and body in one write, so that unread bytes sit in the backend's socket when it
        // drops the request: closing it then would send an RST instead of a FIN.
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        conn.send(&request).await;
        // read_more unwraps the read, so ECONNRESET fails the test here.
        assert!(conn.read_to_eof(Duration::from_secs(3)).await.is_empty());
        assert_eq!(backend.stats().stale_drops, 1);
    }

    #[tokio::test]
    async fn post_body_size_is_echoed() {
        let backend = start(DemoBackendConfig {
            name: "b1".to_string(),
            ..DemoBackendConfig::default()
        })
        .await;
        let mut conn = RawConn::connect(&backend).await;
        let body = vec![b'a'; 12345];
        let head = format!(
            "POST /submit HTTP/1.1\r\nHost: demo.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.send(head.as_bytes()).await;
        conn.send(&body).await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200);
        assert_eq!(response.body_text(), "b1 received 12345 bytes\n");

        conn.send(b"PUT /x HTTP/1.1\r\nHost: demo.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .await;
        assert_eq!(
            conn.response(false).await.body_text(),
            "b1 received 3 bytes\n"
        );
    }

    #[tokio::test]
    async fn forwarding_headers_are_echoed() {
        let backend = start(DemoBackendConfig::default()).await;
        let mut conn = RawConn::connect(&backend).await;
        let response = conn
            .get(
                "/",
                "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\nX-Forwarded-Proto: https\r\n",
            )
            .await;
        assert_eq!(
            response.header("x-seen-forwarded-for"),
            Some("10.0.0.1, 10.0.0.2")
        );
        assert_eq!(response.header("x-seen-forwarded-proto"), Some("https"));
        assert_eq!(response.header("x-seen-host"), Some("demo.test"));
        assert_eq!(response.header("x-seen-connection"), Some(""));

        let bare = conn.get("/", "").await;
        assert_eq!(bare.header("x-seen-forwarded-for"), Some(""));
        assert_eq!(bare.header("x-seen-forwarded-proto"), Some(""));
    }

    #[tokio::test]
    async fn head_gets_the_length_but_no_body() {
        let backend = start(DemoBackendConfig::default()).await;
        let mut conn = RawConn::connect(&backend).await;
        conn.send(b"HEAD / HTTP/1.1\r\nHost: demo.test\r\n\r\n")
            .await;
        let head = conn.response(true).await;
        assert_eq!(head.status, 200);
        assert_eq!(head.header("content-length"), Some("16"));
        // The next response must follow directly: no stray body bytes in between.
        let get = conn.get("/", "").await;
        assert_eq!(get.body_text(), "hello from demo\n");
    }

    #[tokio::test]
    async fn status_route_and_apache_connection_dropping_statuses() {
        let backend = start(DemoBackendConfig::default()).await;
        let mut conn = RawConn::connect(&backend).await;
        let not_found = conn.get("/status/404", KEEP_ALIVE).await;
        assert_eq!(not_found.status, 404);
        assert_eq!(not_found.header("keep-alive"), Some("timeout=5, max=100"));
        let no_content = conn.get("/status/204", KEEP_ALIVE).await;
        assert_eq!(no_content.status, 204);
        assert!(no_content.body.is_empty());
        // Like Apache, a 503 ends the connection.
        let unavailable = conn.get("/status/503", KEEP_ALIVE).await;
        assert_eq!(unavailable.status, 503);
        assert_eq!(unavailable.header("connection"), Some("close"));
        assert!(conn.read_to_eof(Duration::from_secs(1)).await.is_empty());
    }

    #[tokio::test]
    async fn client_connection_close_and_http10() {
        let backend = start(DemoBackendConfig::default()).await;

        let mut conn = RawConn::connect(&backend).await;
        let closed = conn.get("/", "Connection: close\r\n").await;
        assert_eq!(closed.header("connection"), Some("close"));
        assert!(conn.read_to_eof(Duration::from_secs(1)).await.is_empty());

        let mut conn = RawConn::connect(&backend).await;
        conn.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let kept = conn.response(false).await;
        assert_eq!(kept.header("keep-alive"), Some("timeout=5, max=100"));
        conn.send(b"GET / HTTP/1.0\r\n\r\n").await;
        let last = conn.response(false).await;
        assert_eq!(last.header("connection"), Some("close"));
        assert!(conn.read_to_eof(Duration::from_secs(1)).await.is_empty());
    }

    #[tokio::test]
    async fn stop_closes_connections_and_the_listener() {
        let backends = DemoBackend::start_many(2, DemoBackendConfig::default())
            .await
            .unwrap();
        assert_eq!(backends[1].name(), "demo-2");
        let mut backends = backends.into_iter();
        let backend = backends.next().unwrap();
        let addr = backend.addr();
        let mut conn = RawConn::connect(&backend).await;
        assert_eq!(
            conn.get("/", KEEP_ALIVE).await.body_text(),
            "hello from demo-1\n"
        );
        assert_eq!(backend.stats().connections_open, 1);
        backend.stop().await;
        assert!(conn.read_to_eof(Duration::from_secs(1)).await.is_empty());
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
