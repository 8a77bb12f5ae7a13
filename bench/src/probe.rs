//! `kaproxy-bench probe`: issue 17's fifteen hostile-input findings, sent to a proxy as an
//! attacker would, with what each proxy answered and what reached which backend.
//!
//! The subcommand runs two tiny recording HTTP/1.1 backends itself, `adm` and `web`, on the
//! fixed loopback addresses given by `--adm` and `--web` (defaults 127.0.0.1:19491 and :19492),
//! so a script writes the proxies' configs with those addresses before any probe runs: routes
//! `Host: route.test` + path prefix `/admin` to `adm`, everything else to `web`. Each backend is
//! hand-written (no parser limits of its own: 1 500 header fields get through), records the
//! method, target, headers, body length and any bytes that came through a tunnel of every
//! request, and answers by path:
//!
//! - `/_be/upgrade/...` with an `Upgrade` header: `101 Switching Protocols` (`Upgrade: h2c`),
//!   then reads and records what comes through the tunnel (case 4);
//! - `/_be/ws` with an `Upgrade` header: `101` (`Upgrade: websocket`), then echoes (case 7);
//! - `/_be/101`: `101` (`Upgrade: h2c`) to any request, then records the tunnel (case 8);
//! - `/_be/badchunk`: a chunk line `5;` with 1 MiB of extension, then the chunk (case 12);
//! - anything else: `200` with `X-Backend: NAME` and `hello from NAME` (after the whole body).
//!
//! The client side speaks raw HTTP/1.1 over TCP (the proxy's `--http` listener) and raw HTTP/2
//! over TLS (`--https`, ALPN h2, the certificate not verified): frames written by hand, header
//! blocks as HPACK literals without Huffman, and of the answer only `:status` decoded. Every
//! case runs on fresh connections, one after the other, and waits a little
//! ([`SETTLE`]) before it reads the backends' records. Each case gets a grade (2 good, 1
//! acceptable, 0 bad; see [`grade`](CaseResult::score)), which `bench/hostile.sh` compares
//! between proxies. Loopback only; every wait is bounded (`--timeout`, `--tunnel-wait`,
//! `--header-wait`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kaproxy::upstream::tls::AnyCertificate;
use rustls::client::Resumption;
use rustls::crypto::ring::cipher_suite as suites;
use rustls::pki_types::ServerName;
use rustls::{SupportedCipherSuite, SupportedProtocolVersion};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};

use crate::args;

/// After an exchange, wait this long before reading what the backends recorded.
const SETTLE: Duration = Duration::from_millis(300);
const MIB: usize = 1 << 20;
/// A backend connection silent this long is closed.
const BACKEND_IDLE: Duration = Duration::from_secs(120);
/// The largest request head a backend reads.
const MAX_BACKEND_HEAD: usize = MIB;
/// Bytes of one response the client keeps (all are counted).
const MAX_KEPT: usize = 4 * MIB;
/// Bytes of a tunnel a backend keeps (all are counted).
const TUNNEL_KEPT: usize = 64 << 10;
/// RFC 6455's sample key and its accept value.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const H2C_SETTINGS: &str = "AAMAAABkAARAAAAAAAIAAAAA";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Case 10: header fields per request.
const FIELDS: usize = 1500;
/// Case 13: the upload, in pieces.
const UPLOAD_LEN: usize = MIB;
const UPLOAD_PIECES: usize = 16;
const UPLOAD_GAP: Duration = Duration::from_millis(500);
/// Case 11: one CONTINUATION this often.
const TRICKLE_GAP: Duration = Duration::from_secs(2);
/// What a configured timer may take beyond its value and still count as "within the bound".
const SLACK: Duration = Duration::from_secs(5);
/// The path smuggled through tunnels.
const SECRET: &str = "/admin/secret";
/// A malformed chunked response: the chunk line `5;` with 1 MiB of extension.
fn bad_chunk_response() -> Vec<u8> {
    let mut r =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Backend: web\r\n\r\n5;".to_vec();
    r.extend(std::iter::repeat_n(b'e', MIB));
    r.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
    r
}

const TITLES: [&str; 16] = [
    "baseline: GET /admin/ok and /ok (Host route.test) over HTTP/1.1 and HTTP/2",
    "GET /public/%2e%2e/admin/x (Host route.test)",
    "GET /%61dmin/x (Host route.test)",
    "GET //admin/x (Host route.test)",
    "Upgrade: h2c + HTTP2-Settings to a backend that would switch; then HTTP/2 for /admin/secret through it",
    "GET route.test:80 HTTP/1.1 (authority form), Host probe.test",
    "Host: probe.test@route.test (HTTP/1.1), :authority probe.test@route.test (HTTP/2), GET /admin/x",
    "an idle WebSocket: handshake, one frame echoed, then silence",
    "a backend's 101 to a request that asked for no upgrade; then GET /admin/secret through it",
    "HTTP/2 request with three cookie fields a=1, b=2, c=3",
    "1 500 header fields over HTTP/1.1 and over HTTP/2",
    "HTTP/2 header block trickled: HEADERS without END_HEADERS, then a CONTINUATION every 2 s",
    "a backend's chunk line `5;` + 1 MiB of extension, then the chunk",
    "a legitimate slow upload: 1 MiB with Content-Length in 16 pieces every 0.5 s",
    "CONNECT route.test:443 (HTTP/1.1 and HTTP/2)",
    "TLS cipher order: two handshakes per version offering the suites in opposite orders",
];

#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
    /// The proxy's plain HTTP listener, e.g. 127.0.0.1:19381 (loopback only).
    #[arg(long)]
    http: SocketAddr,
    /// The proxy's TLS listener (HTTP/2 with ALPN h2; the certificate is not verified).
    #[arg(long)]
    https: SocketAddr,
    /// Where the recording backend `adm` listens: the probe binds it; the proxy routes `Host:
    /// route.test` with a path under `/admin` there.
    #[arg(long, default_value = "127.0.0.1:19491")]
    adm: SocketAddr,
    /// Where the recording backend `web` (everything else) listens.
    #[arg(long, default_value = "127.0.0.1:19492")]
    web: SocketAddr,
    /// Only these cases, e.g. `1,2,13` or `1-6,9` (case 0, the routes' baseline, always runs).
    #[arg(long, value_parser = args::parse_cases)]
    only: Option<BTreeSet<u8>>,
    /// Case 7: how long an idle WebSocket is watched for the proxy's close.
    #[arg(long, default_value = "90s", value_parser = args::parse_duration)]
    tunnel_wait: Duration,
    /// Case 7: the proxy's configured idle timeout for tunnels (for the grade).
    #[arg(long, default_value = "10s", value_parser = args::parse_duration)]
    tunnel_idle: Duration,
    /// Case 11: how long a trickled HTTP/2 header block is kept up.
    #[arg(long, default_value = "30s", value_parser = args::parse_duration)]
    header_wait: Duration,
    /// Case 11: the proxy's configured request-header timeout (for the grade).
    #[arg(long, default_value = "10s", value_parser = args::parse_duration)]
    header_timeout: Duration,
    /// Case 13: the proxy's configured response timeout (the answer is waited for this plus
    /// --timeout after the upload).
    #[arg(long, default_value = "5s", value_parser = args::parse_duration)]
    response_timeout: Duration,
    /// Every other exchange, connect to the end of the answer, is waited for this plus
    /// --response-timeout (a proxy that waits for the backend answers within the sum).
    #[arg(long, default_value = "5s", value_parser = args::parse_duration)]
    timeout: Duration,
    /// The proxy's name in the report.
    #[arg(long, default_value = "proxy")]
    name: String,
    /// Only run the two backends for this long (to try a proxy by hand), then exit.
    #[arg(long, value_parser = args::parse_duration)]
    serve: Option<Duration>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------------
// The recording backends
// ---------------------------------------------------------------------------------------------

/// One request as a backend read it, and the tunnel that followed, if any.
#[derive(Debug, Clone)]
struct Record {
    backend: &'static str,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body_len: usize,
    switched_at: Option<Instant>,
    tunnel: Vec<u8>,
    tunnel_total: usize,
    tunnel_last_byte: Option<Instant>,
    tunnel_closed: Option<Instant>,
}

type Log = Arc<Mutex<Vec<Record>>>;

fn update(log: &Log, index: usize, f: impl FnOnce(&mut Record)) {
    if let Some(r) = log.lock().unwrap().get_mut(index) {
        f(r);
    }
}

/// `adm` and `web`, one log in arrival order. Dropping it stops both and every connection.
struct Backends {
    log: Log,
    _tasks: JoinSet<()>,
}

impl Backends {
    async fn start(adm: SocketAddr, web: SocketAddr) -> anyhow::Result<Backends> {
        let log: Log = Arc::default();
        let mut tasks = JoinSet::new();
        for (name, addr) in [("adm", adm), ("web", web)] {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the backend {name} on {addr}"))?;
            tasks.spawn(accept_loop(name, listener, log.clone()));
        }
        Ok(Backends { log, _tasks: tasks })
    }

    fn mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// What reached a backend since `mark`, after [`SETTLE`].
    async fn since(&self, mark: usize) -> Vec<Seen> {
        sleep(SETTLE).await;
        self.log.lock().unwrap()[mark..]
            .iter()
            .map(Seen::from)
            .collect()
    }
}

/// Accepts until aborted (with [`Backends`]); each connection on a task of the set.
async fn accept_loop(name: &'static str, listener: TcpListener, log: Log) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(backend_conn(name, stream, log.clone()));
                }
                // E.g. EMFILE: back off instead of spinning.
                Err(_) => sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// A request head as a backend read it.
struct ReqHead {
    method: String,
    target: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl ReqHead {
    fn parse(raw: &[u8]) -> ReqHead {
        let text = String::from_utf8_lossy(raw);
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or_default();
        let mut parts = start.splitn(3, ' ');
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let version = parts.next().unwrap_or_default().to_string();
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect();
        ReqHead {
            method,
            target,
            version,
            headers,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }

    fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.parse().ok()
    }

    fn wants_close(&self) -> bool {
        self.has_token("connection", "close")
            || (self.version == "HTTP/1.0" && !self.has_token("connection", "keep-alive"))
    }
}

fn find(buf: &[u8], what: &[u8]) -> Option<usize> {
    buf.windows(what.len()).position(|w| w == what)
}

fn head_end(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n\r\n").map(|i| i + 4)
}

/// Reads more bytes into `pending`; false on EOF, an error or [`BACKEND_IDLE`] of silence.
async fn read_more(stream: &mut TcpStream, pending: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 16 * 1024];
    match timeout(BACKEND_IDLE, stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {
            pending.extend_from_slice(&buf[..n]);
            true
        }
        _ => false,
    }
}

/// One backend connection: a turn per request until the peer closes (or a tunnel took it).
async fn backend_conn(name: &'static str, mut stream: TcpStream, log: Log) {
    let _ = stream.set_nodelay(true);
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = head_end(&pending) {
                break end;
            }
            if pending.len() > MAX_BACKEND_HEAD || !read_more(&mut stream, &mut pending).await {
                return;
            }
        };
        let head = ReqHead::parse(&pending[..end]);
        pending.drain(..end);
        let index = {
            let mut l = log.lock().unwrap();
            l.push(Record {
                backend: name,
                method: head.method.clone(),
                target: head.target.clone(),
                headers: head.headers.clone(),
                body_len: 0,
                switched_at: None,
                tunnel: Vec::new(),
                tunnel_total: 0,
                tunnel_last_byte: None,
                tunnel_closed: None,
            });
            l.len() - 1
        };
        let upgrade = head.header("upgrade").is_some();
        let path = head.target.as_str();
        let switch = if path.starts_with("/_be/ws") && upgrade {
            Some("websocket")
        } else if path.starts_with("/_be/101") || (path.starts_with("/_be/upgrade") && upgrade) {
            Some("h2c")
        } else {
            None
        };
        if let Some(protocol) = switch {
            let mut resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n"
            );
            if protocol == "websocket" {
                resp.push_str(&format!("Sec-WebSocket-Accept: {WS_ACCEPT}\r\n"));
            }
            resp.push_str("\r\n");
            update(&log, index, |r| r.switched_at = Some(Instant::now()));
            if stream.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            tunnel(&mut stream, pending, &log, index, protocol == "websocket").await;
            return;
        }
        if !read_body(&mut stream, &mut pending, &head, &log, index).await {
            return;
        }
        let written = if path.starts_with("/_be/badchunk") {
            stream.write_all(&bad_chunk_response()).await
        } else {
            let body = format!("hello from {name}\n");
            let close = if head.wants_close() {
                "Connection: close\r\n"
            } else {
                ""
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\n{close}\r\n{body}",
                body.len()
            );
            stream.write_all(resp.as_bytes()).await
        };
        if written.is_err() {
            return;
        }
        if head.wants_close() {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Reads the request body (chunked or by `Content-Length`), counting it into the record as it
/// arrives; false when the connection ended first.
async fn read_body(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    head: &ReqHead,
    log: &Log,
    index: usize,
) -> bool {
    if head.chunked() {
        // A turn per chunk; bounded by what the peer sends and BACKEND_IDLE.
        loop {
            let line = loop {
                if let Some(p) = find(pending, b"\r\n") {
                    break p;
                }
                if pending.len() > 64 * 1024 || !read_more(stream, pending).await {
                    return false;
                }
            };
            let text = String::from_utf8_lossy(&pending[..line]).into_owned();
            let Ok(size) = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
            else {
                return false;
            };
            pending.drain(..line + 2);
            if size == 0 {
                loop {
                    let p = loop {
                        if let Some(p) = find(pending, b"\r\n") {
                            break p;
                        }
                        if pending.len() > 64 * 1024 || !read_more(stream, pending).await {
                            return false;
                        }
                    };
                    pending.drain(..p + 2);
                    if p == 0 {
                        return true;
                    }
                }
            }
            while pending.len() < size + 2 {
                if !read_more(stream, pending).await {
                    return false;
                }
            }
            pending.drain(..size + 2);
            update(log, index, |r| r.body_len += size);
        }
    }
    let mut left = head.content_length().unwrap_or(0);
    loop {
        let take = left.min(pending.len());
        pending.drain(..take);
        left -= take;
        update(log, index, |r| r.body_len += take);
        if left == 0 {
            return true;
        }
        if !read_more(stream, pending).await {
            return false;
        }
    }
}

/// After a 101: records (and with `echo`, echoes) every byte until the peer closes.
async fn tunnel(stream: &mut TcpStream, early: Vec<u8>, log: &Log, index: usize, echo: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut data = early;
    loop {
        if !data.is_empty() {
            let now = Instant::now();
            update(log, index, |r| {
                r.tunnel_total += data.len();
                let room = TUNNEL_KEPT.saturating_sub(r.tunnel.len());
                r.tunnel.extend_from_slice(&data[..data.len().min(room)]);
                r.tunnel_last_byte = Some(now);
            });
            if echo && stream.write_all(&data).await.is_err() {
                break;
            }
        }
        match timeout(BACKEND_IDLE, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => data = buf[..n].to_vec(),
            _ => break,
        }
    }
    update(log, index, |r| r.tunnel_closed = Some(Instant::now()));
}

/// What reached a backend, as the report shows it.
#[derive(Debug, Clone, Serialize)]
struct Seen {
    backend: &'static str,
    method: String,
    target: String,
    /// Every `Host` value, in order.
    host: Vec<String>,
    /// Header fields in the head.
    fields: usize,
    /// Every `Cookie` line.
    cookie: Vec<String>,
    body_len: usize,
    upgrade: Option<String>,
    http2_settings: bool,
    /// The backend answered 101.
    switched: bool,
    tunnel_bytes: usize,
    tunnel_http2_preface: bool,
    tunnel_secret: bool,
    /// From the last byte through the tunnel (or the 101) to the proxy's close of the backend's
    /// side; none while it is open.
    tunnel_closed_after_ms: Option<f64>,
}

impl From<&Record> for Seen {
    fn from(r: &Record) -> Seen {
        let all = |name: &str| -> Vec<String> {
            r.headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .collect()
        };
        let last = r.tunnel_last_byte.or(r.switched_at);
        Seen {
            backend: r.backend,
            method: r.method.clone(),
            target: r.target.clone(),
            host: all("host"),
            fields: r.headers.len(),
            cookie: all("cookie"),
            body_len: r.body_len,
            upgrade: all("upgrade").into_iter().next(),
            http2_settings: !all("http2-settings").is_empty(),
            switched: r.switched_at.is_some(),
            tunnel_bytes: r.tunnel_total,
            tunnel_http2_preface: r.tunnel.starts_with(PREFACE),
            tunnel_secret: find(&r.tunnel, SECRET.as_bytes()).is_some(),
            tunnel_closed_after_ms: match (r.tunnel_closed, last) {
                (Some(c), Some(l)) => Some(c.saturating_duration_since(l).as_secs_f64() * 1e3),
                _ => None,
            },
        }
    }
}

/// How a request reached a backend, against the routes.
#[derive(Debug, PartialEq, Eq)]
enum Routing {
    /// The backend the routes give to what this backend reads (normalized path, host after any
    /// userinfo), forwarded in normal form.
    Normal,
    /// The right backend, but forwarded as sent: the backend normalizes it again.
    Unnormalized,
    /// Reached `backend`; the routes give what it reads to `expected`.
    Bypass {
        expected: &'static str,
        host: String,
        path: String,
    },
    /// A target that is neither origin form, absolute form nor `*`.
    OddTarget,
}

impl Seen {
    fn routing(&self) -> Routing {
        let (host, path) = if self.target.starts_with('/') {
            (
                self.host.first().cloned().unwrap_or_default(),
                self.target.clone(),
            )
        } else if self.target == "*" {
            return Routing::Normal;
        } else if let Some(rest) = strip_prefix_ci(&self.target, "http://")
            .or_else(|| strip_prefix_ci(&self.target, "https://"))
        {
            match rest.find('/') {
                Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
                None => (rest.to_string(), "/".to_string()),
            }
        } else {
            return Routing::OddTarget;
        };
        let raw_path = path.split('?').next().unwrap_or("").to_string();
        let normal = normalize(&raw_path);
        let expected = route_for(&host, &normal);
        if expected != self.backend {
            Routing::Bypass {
                expected,
                host: lenient_host(&host),
                path: normal,
            }
        } else if raw_path != normal || !self.target.starts_with('/') {
            Routing::Unnormalized
        } else {
            Routing::Normal
        }
    }

    fn short(&self) -> String {
        let mut s = format!(
            "{}: {} {}",
            self.backend,
            self.method,
            shorten(&self.target, 60)
        );
        match self.host.len() {
            0 => s.push_str(" (no Host)"),
            1 => s.push_str(&format!(" (Host {})", self.host[0])),
            n => s.push_str(&format!(" ({n} Host lines: {})", self.host.join(", "))),
        }
        if self.fields > 50 {
            s.push_str(&format!(", {} header fields", self.fields));
        }
        if !self.cookie.is_empty() {
            let lines: Vec<String> = self.cookie.iter().map(|c| format!("\"{c}\"")).collect();
            s.push_str(&format!(
                ", {} Cookie line{}: {}",
                self.cookie.len(),
                if self.cookie.len() == 1 { "" } else { "s" },
                lines.join(" + ")
            ));
        }
        if self.body_len > 0 {
            s.push_str(&format!(", body {} bytes", self.body_len));
        }
        if let Some(u) = &self.upgrade {
            s.push_str(&format!(
                ", Upgrade: {u}{}",
                if self.http2_settings {
                    " + HTTP2-Settings"
                } else {
                    ""
                }
            ));
        }
        if self.switched {
            s.push_str(", answered 101");
            if self.tunnel_bytes > 0 {
                let what = match (self.tunnel_http2_preface, self.tunnel_secret) {
                    (true, true) => " (the HTTP/2 preface and a HEADERS for /admin/secret)",
                    (true, false) => " (the HTTP/2 preface)",
                    (false, true) => " (a request for /admin/secret)",
                    (false, false) => "",
                };
                s.push_str(&format!(
                    ", read {} bytes through the tunnel{what}",
                    self.tunnel_bytes
                ));
            }
            match self.tunnel_closed_after_ms {
                Some(ms) => s.push_str(&format!(
                    ", its side closed {:.1} s after the last byte",
                    ms / 1e3
                )),
                None => s.push_str(", its side still open"),
            }
        }
        s
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// A path as a lenient backend resolves it (Apache, a framework's router): percent-encoded
/// unreserved characters decoded, repeated slashes merged, dot segments removed.
fn normalize(path: &str) -> String {
    let b = path.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut decoded: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let v = (h * 16 + l) as u8;
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    decoded.push(v);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(b[i]);
        i += 1;
    }
    let text = String::from_utf8_lossy(&decoded).into_owned();
    let last = text.rsplit('/').next().unwrap_or("");
    let trailing = text.ends_with('/') || last == "." || last == "..";
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = format!("/{}", out.join("/"));
    if trailing && !out.is_empty() {
        s.push('/');
    }
    s
}

/// A Host as a lenient parser reads it: the part after any userinfo, without the port,
/// lower-case, without a trailing dot.
fn lenient_host(host: &str) -> String {
    let h = host.rsplit('@').next().unwrap_or("");
    let h = if h.starts_with('[') {
        h.split(']')
            .next()
            .map(|x| format!("{x}]"))
            .unwrap_or_default()
    } else {
        h.split(':').next().unwrap_or("").to_string()
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// The routes every proxy is configured with.
fn route_for(host: &str, normal_path: &str) -> &'static str {
    if lenient_host(host) == "route.test" && normal_path.starts_with("/admin") {
        "adm"
    } else {
        "web"
    }
}

// ---------------------------------------------------------------------------------------------
// The client side: answers
// ---------------------------------------------------------------------------------------------

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum End {
    /// A whole answer.
    Complete,
    /// A 101 (or a 2xx to CONNECT): the connection is now a tunnel.
    Switched,
    /// The proxy closed the connection (FIN, or GOAWAY then FIN).
    Closed,
    /// A reset (TCP RST, or an HTTP/2 RST_STREAM).
    Reset,
    /// Nothing more within the bound.
    Timeout,
    /// Connect, TLS or ALPN failed.
    Failed,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::Switched => "switched",
            End::Closed => "closed",
            End::Reset => "reset",
            End::Timeout => "timeout",
            End::Failed => "failed",
        }
    }
}

fn io_end(e: &std::io::Error) -> End {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => End::Reset,
        UnexpectedEof => End::Closed,
        _ => End::Failed,
    }
}

/// One exchange's answer and what reached the backends meanwhile.
#[derive(Debug, Clone, Serialize)]
struct Answer {
    label: String,
    status: Option<u16>,
    end: End,
    /// E.g. `GOAWAY PROTOCOL_ERROR`, `RST_STREAM REFUSED_STREAM`, an I/O error.
    detail: Option<String>,
    took_ms: f64,
    body_bytes: usize,
    raw_bytes: usize,
    /// What the case did or saw beyond the status.
    note: Option<String>,
    /// Shown instead of the status (case 15).
    summary: Option<String>,
    reached: Vec<Seen>,
}

impl Answer {
    fn new(label: &str, end: End, took: Duration) -> Answer {
        Answer {
            label: label.to_string(),
            status: None,
            end,
            detail: None,
            took_ms: took.as_secs_f64() * 1e3,
            body_bytes: 0,
            raw_bytes: 0,
            note: None,
            summary: None,
            reached: Vec::new(),
        }
    }

    fn from_h1(label: &str, r: &H1, reached: Vec<Seen>) -> Answer {
        Answer {
            status: r.status,
            detail: r.detail.clone(),
            body_bytes: r.body.len(),
            raw_bytes: r.raw_bytes,
            reached,
            ..Answer::new(label, r.end, r.took)
        }
    }

    fn took(&self) -> Duration {
        Duration::from_secs_f64(self.took_ms / 1e3)
    }

    /// `400`, `200, then closed after 0.2 s`, `closed after 10.1 s (GOAWAY NO_ERROR)`, ...
    fn text(&self) -> String {
        if let Some(s) = &self.summary {
            return s.clone();
        }
        let secs = self.took_ms / 1e3;
        let mut t = match (self.status, self.end) {
            (Some(s), End::Complete) if secs < 1.0 => format!("{s}"),
            (Some(s), End::Complete) => format!("{s} after {secs:.1} s"),
            (Some(s), End::Switched) => format!("{s} (a tunnel)"),
            (Some(s), end) => format!("{s}, then {} after {secs:.1} s", end.label()),
            (None, end) => format!("{} after {secs:.1} s", end.label()),
        };
        if let Some(d) = &self.detail {
            t.push_str(&format!(" ({d})"));
        }
        if let Some(n) = &self.note {
            t.push_str(&format!("; {n}"));
        }
        t
    }

    fn reached_text(&self) -> String {
        if self.reached.is_empty() {
            "nothing reached a backend".to_string()
        } else {
            self.reached
                .iter()
                .map(Seen::short)
                .collect::<Vec<_>>()
                .join("; ")
        }
    }
}

/// One case: its answers, a grade and the table cell.
#[derive(Debug, Serialize)]
struct CaseResult {
    case: u8,
    title: &'static str,
    answers: Vec<Answer>,
    /// 2 good, 1 acceptable, 0 bad (what is what: `grade_*` below and bench/HOSTILE.md).
    score: u8,
    grade: String,
    /// The answers and what reached the backends, in one line.
    cell: String,
}

impl CaseResult {
    fn new(case: u8, answers: Vec<Answer>, (score, grade): (u8, String)) -> CaseResult {
        let cell = answers
            .iter()
            .map(|a| {
                // Case 15's handshakes reach no backend: its summary is the whole answer.
                let body = if a.summary.is_some() {
                    a.text()
                } else {
                    format!("{} → {}", a.text(), a.reached_text())
                };
                if a.label.is_empty() {
                    body
                } else {
                    format!("{}: {body}", a.label)
                }
            })
            .collect::<Vec<_>>()
            .join(" · ");
        CaseResult {
            case,
            title: TITLES[case as usize],
            answers,
            score,
            grade,
            cell,
        }
    }

    fn to_text(&self) -> String {
        let mut s = format!("{:>2}. {}\n", self.case, self.title);
        for a in &self.answers {
            let label = if a.label.is_empty() {
                "answer"
            } else {
                &a.label
            };
            s.push_str(&format!("      {label}: {}\n", a.text()));
            s.push_str(&format!(
                "      {:width$}  {}\n",
                "",
                a.reached_text(),
                width = label.len()
            ));
        }
        s.push_str(&format!("      grade {}: {}\n", self.score, self.grade));
        s
    }
}

#[derive(Debug, Serialize)]
struct ProbeReport {
    proxy: String,
    http: String,
    https: String,
    adm: String,
    web: String,
    cases: Vec<CaseResult>,
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1
// ---------------------------------------------------------------------------------------------

/// A response read byte by byte.
struct H1 {
    status: Option<u16>,
    body: Vec<u8>,
    raw_bytes: usize,
    end: End,
    detail: Option<String>,
    took: Duration,
    /// After a 101: the bytes that came with the head.
    rest: Vec<u8>,
}

impl H1 {
    fn failed(what: String, took: Duration) -> H1 {
        H1 {
            status: None,
            body: Vec::new(),
            raw_bytes: 0,
            end: End::Failed,
            detail: Some(what),
            took,
            rest: Vec::new(),
        }
    }
}

fn parse_status_head(head: &[u8]) -> (Option<u16>, Vec<(String, String)>) {
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

/// A complete chunked body at the start of `data`, or `None` while incomplete or malformed.
fn decode_chunked(data: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut pos = 0;
    // Every turn consumes a size line: bounded by `data.len()`.
    loop {
        let line_end = pos + find(&data[pos..], b"\r\n")?;
        let line = std::str::from_utf8(&data[pos..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            loop {
                let end = pos + find(&data[pos..], b"\r\n")?;
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return Some(body);
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

/// Reads one response for at most `bound`: framed by chunked, `Content-Length` or EOF; a 101
/// (or, with `connect`, a 2xx) ends it at the head. Informational 1xx heads are skipped.
async fn read_h1<S: AsyncRead + Unpin>(s: &mut S, bound: Duration, connect: bool) -> H1 {
    let started = Instant::now();
    let deadline = started + bound;
    let mut got: Vec<u8> = Vec::new();
    let mut raw = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let finish = |got: &[u8], raw: usize, end: End, detail: Option<String>| {
        let (status, body, end) = match head_end(got) {
            Some(h) => {
                let (status, headers) = parse_status_head(&got[..h]);
                let rest = &got[h..];
                let chunked = headers.iter().any(|(k, v)| {
                    k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked")
                });
                let delimited = !chunked && !headers.iter().any(|(k, _)| k == "content-length");
                let body = if chunked {
                    decode_chunked(rest).unwrap_or_else(|| rest.to_vec())
                } else {
                    rest.to_vec()
                };
                // A close-delimited body ends with the close.
                let end = if end == End::Closed && delimited {
                    End::Complete
                } else {
                    end
                };
                (status, body, end)
            }
            None => (None, Vec::new(), end),
        };
        H1 {
            status,
            body,
            raw_bytes: raw,
            end,
            detail,
            took: started.elapsed(),
            rest: Vec::new(),
        }
    };
    // A turn per read; bounded by the deadline.
    loop {
        if let Some(h) = head_end(&got) {
            let (status, headers) = parse_status_head(&got[..h]);
            let tunnel =
                status == Some(101) || (connect && status.is_some_and(|s| (200..300).contains(&s)));
            if tunnel {
                let mut r = finish(&got[..h], raw, End::Switched, None);
                r.rest = got[h..].to_vec();
                r.body.clear();
                return r;
            }
            if status.is_some_and(|s| (100..200).contains(&s)) {
                got.drain(..h);
                continue;
            }
            let rest = &got[h..];
            let chunked = headers.iter().any(|(k, v)| {
                k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked")
            });
            let length = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok());
            let complete = if chunked {
                decode_chunked(rest).is_some()
            } else {
                length.is_some_and(|len| rest.len() >= len)
            };
            if complete {
                if let (false, Some(len)) = (chunked, length) {
                    got.truncate(h + len);
                }
                return finish(&got, raw, End::Complete, None);
            }
        }
        match timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return finish(&got, raw, End::Timeout, None),
            Ok(Ok(0)) => return finish(&got, raw, End::Closed, None),
            Ok(Ok(n)) => {
                raw += n;
                if got.len() < MAX_KEPT {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            Ok(Err(e)) => return finish(&got, raw, io_end(&e), Some(e.kind().to_string())),
        }
    }
}

async fn connect_tcp(addr: SocketAddr, bound: Duration) -> Result<TcpStream, String> {
    match timeout(bound, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect: timeout".to_string()),
    }
}

/// Sends `request` on a fresh connection while reading the answer (no FIN from our side).
async fn h1_exchange(addr: SocketAddr, request: &[u8], bound: Duration, connect: bool) -> H1 {
    let started = Instant::now();
    let mut stream = match connect_tcp(addr, bound).await {
        Ok(s) => s,
        Err(e) => return H1::failed(e, started.elapsed()),
    };
    let (mut rd, mut wr) = stream.split();
    let write = async {
        let _ = wr.write_all(request).await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        r = read_h1(&mut rd, bound, connect) => r,
        () = write => unreachable!("the write future never completes"),
    }
}

fn get(target: &str, host: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/2 over TLS
// ---------------------------------------------------------------------------------------------

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const MAX_FRAME: usize = 16 * 1024;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn error_code(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => return format!("0x{code:x}"),
    };
    name.to_string()
}

fn be32(b: &[u8]) -> u32 {
    b.get(..4)
        .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
        .unwrap_or(0)
}

/// An HPACK integer with an N-bit prefix: the value and the bytes it took.
fn hpack_int(buf: &[u8], prefix: u8) -> Option<(u64, usize)> {
    let mask = ((1u16 << prefix) - 1) as u8;
    let mut v = u64::from(buf.first()? & mask);
    if v < u64::from(mask) {
        return Some((v, 1));
    }
    let mut shift = 0;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        v += u64::from(b & 0x7f) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            return Some((v, i));
        }
        if shift > 28 {
            return None;
        }
    }
}

fn hpack_int_encode(out: &mut Vec<u8>, mut v: usize, prefix: u8, first: u8) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literals without indexing, new names, no Huffman: every field as sent.
fn hpack_literal(fields: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int_encode(&mut out, name.len(), 7, 0x00);
        out.extend_from_slice(name.as_bytes());
        hpack_int_encode(&mut out, value.len(), 7, 0x00);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// Huffman-coded digits (RFC 7541 Appendix B: `0`-`2` are the 5-bit codes 0-2, `3`-`9` the
/// 6-bit codes 0x19-0x1f), then fewer than 8 bits of padding ones; `None` for anything else.
fn huffman_digits(raw: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &b in raw {
        acc = (acc << 8) | u64::from(b);
        bits += 8;
        if bits > 40 {
            return None;
        }
        loop {
            if bits >= 5 {
                let c5 = (acc >> (bits - 5)) & 0x1f;
                if c5 <= 2 {
                    out.push(char::from(b'0' + c5 as u8));
                    bits -= 5;
                    acc &= (1u64 << bits) - 1;
                    continue;
                }
            }
            if bits >= 6 {
                let c6 = (acc >> (bits - 6)) & 0x3f;
                if (0x19..=0x1f).contains(&c6) {
                    out.push(char::from(b'3' + (c6 - 0x19) as u8));
                    bits -= 6;
                    acc &= (1u64 << bits) - 1;
                    continue;
                }
            }
            break;
        }
    }
    (bits < 8 && acc == (1u64 << bits) - 1).then_some(out)
}

/// `:status` of a response header block, when it is the first field (as servers send it).
fn hpack_status(block: &[u8]) -> Option<u16> {
    let mut i = 0;
    // Dynamic table size updates may come first.
    while block.get(i).is_some_and(|b| b & 0xe0 == 0x20) {
        i += hpack_int(&block[i..], 5)?.1;
    }
    let b = *block.get(i)?;
    if b & 0x80 != 0 {
        let (index, _) = hpack_int(&block[i..], 7)?;
        return match index {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    let prefix = if b & 0x40 != 0 { 6 } else { 4 };
    let (name, n) = hpack_int(&block[i..], prefix)?;
    if !(8..=14).contains(&name) {
        return None;
    }
    i += n;
    let huffman = block.get(i)? & 0x80 != 0;
    let (len, n) = hpack_int(&block[i..], 7)?;
    i += n;
    let raw = block.get(i..i + len as usize)?;
    let text = if huffman {
        huffman_digits(raw)?
    } else {
        String::from_utf8(raw.to_vec()).ok()?
    };
    text.parse().ok()
}

/// A frame's payload without padding and priority fields.
fn frame_payload(kind: u8, flags: u8, payload: &[u8]) -> &[u8] {
    let mut p = payload;
    if (kind == HEADERS || kind == DATA) && flags & PADDED != 0 {
        let pad = usize::from(*p.first().unwrap_or(&0));
        p = p.get(1..p.len().saturating_sub(pad)).unwrap_or(&[]);
    }
    if kind == HEADERS && flags & PRIORITY != 0 {
        p = p.get(5..).unwrap_or(&[]);
    }
    p
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A raw HTTP/2 connection.
struct H2<S> {
    io: S,
    buf: Vec<u8>,
}

/// The answer on one stream.
struct H2Resp {
    status: Option<u16>,
    end: End,
    detail: Option<String>,
    body_bytes: usize,
}

fn tls_config(
    alpn: &[&[u8]],
    cipher_suites: Option<Vec<SupportedCipherSuite>>,
    version: Option<&'static SupportedProtocolVersion>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(s) = cipher_suites {
        provider.cipher_suites = s;
    }
    let provider = Arc::new(provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone());
    let builder = match version {
        Some(v) => builder.with_protocol_versions(&[v])?,
        None => builder.with_safe_default_protocol_versions()?,
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate::new(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    bound: Duration,
) -> anyhow::Result<Tls> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await.context("connect")?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("localhost").context("server name")?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .context("TLS handshake")
    };
    timeout(bound, connect)
        .await
        .map_err(|_| anyhow::anyhow!("connect and TLS handshake: timeout"))?
}

impl H2<Tls> {
    /// TLS with ALPN h2 only, then the preface, SETTINGS (no push, 1 MiB stream windows) and
    /// a 1 MiB connection window.
    async fn connect(addr: SocketAddr, bound: Duration) -> anyhow::Result<H2<Tls>> {
        let tls = tls_connect(addr, tls_config(&[&b"h2"[..]], None, None)?, bound).await?;
        if tls.get_ref().1.alpn_protocol() != Some(&b"h2"[..]) {
            bail!("the server did not select h2 (ALPN)");
        }
        let mut h2 = H2 {
            io: tls,
            buf: Vec::new(),
        };
        let mut start = PREFACE.to_vec();
        let mut settings = Vec::new();
        for (id, value) in [(0x2u16, 0u32), (0x4, 1 << 20)] {
            settings.extend_from_slice(&id.to_be_bytes());
            settings.extend_from_slice(&value.to_be_bytes());
        }
        start.extend(frame(SETTINGS, 0, 0, &settings));
        start.extend(frame(WINDOW_UPDATE, 0, 0, &(1u32 << 20).to_be_bytes()));
        h2.write(&start).await?;
        Ok(h2)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> H2<S> {
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// HEADERS, then CONTINUATIONs for what does not fit a 16 KiB frame.
    async fn send_headers(
        &mut self,
        stream: u32,
        block: &[u8],
        end_stream: bool,
    ) -> std::io::Result<()> {
        let chunks: Vec<&[u8]> = if block.is_empty() {
            vec![&[]]
        } else {
            block.chunks(MAX_FRAME).collect()
        };
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let mut flags = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            if i == 0 {
                if end_stream {
                    flags |= END_STREAM;
                }
                out.extend(frame(HEADERS, flags, stream, c));
            } else {
                out.extend(frame(CONTINUATION, flags, stream, c));
            }
        }
        self.write(&out).await
    }

    /// The next frame, or how the connection ended (cancel-safe: bytes stay in `buf`).
    async fn read_frame(&mut self, deadline: Instant) -> Result<Frame, (End, Option<String>)> {
        let mut tmp = vec![0u8; 16 * 1024];
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: be32(&self.buf[5..9]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Ok(f);
                }
            }
            match timeout_at(deadline, self.io.read(&mut tmp)).await {
                Err(_) => return Err((End::Timeout, None)),
                Ok(Ok(0)) => return Err((End::Closed, None)),
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
                Ok(Err(e)) => return Err((io_end(&e), Some(e.kind().to_string()))),
            }
        }
    }

    /// Reads until `stream` is answered whole (with `connect`, a 2xx head: a tunnel), reset, or
    /// the connection ends; answers SETTINGS and PING, keeps the windows open.
    async fn response(&mut self, stream: u32, deadline: Instant, connect: bool) -> H2Resp {
        let mut r = H2Resp {
            status: None,
            end: End::Timeout,
            detail: None,
            body_bytes: 0,
        };
        let mut goaway: Option<String> = None;
        let mut block: Vec<u8> = Vec::new();
        let mut block_ends_stream = false;
        let with_goaway = |d: Option<String>, g: &Option<String>| match (g, d) {
            (Some(g), Some(d)) => Some(format!("{g}, {d}")),
            (Some(g), None) => Some(g.clone()),
            (None, d) => d,
        };
        // A turn per frame; bounded by the deadline.
        loop {
            let f = match self.read_frame(deadline).await {
                Ok(f) => f,
                Err((end, d)) => {
                    r.end = end;
                    r.detail = with_goaway(d, &goaway);
                    return r;
                }
            };
            let mut headers_done = false;
            match f.kind {
                SETTINGS if f.flags & ACK == 0 => {
                    let _ = self.write(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                PING if f.flags & ACK == 0 => {
                    let _ = self.write(&frame(PING, ACK, 0, &f.payload)).await;
                }
                GOAWAY => {
                    let last = be32(&f.payload) & 0x7fff_ffff;
                    goaway = Some(format!(
                        "GOAWAY {}",
                        error_code(be32(f.payload.get(4..).unwrap_or(&[])))
                    ));
                    if last < stream {
                        r.end = End::Closed;
                        r.detail = goaway;
                        return r;
                    }
                }
                RST_STREAM if f.stream == stream => {
                    r.end = End::Reset;
                    r.detail = with_goaway(
                        Some(format!("RST_STREAM {}", error_code(be32(&f.payload)))),
                        &goaway,
                    );
                    return r;
                }
                HEADERS if f.stream == stream => {
                    block = frame_payload(f.kind, f.flags, &f.payload).to_vec();
                    block_ends_stream = f.flags & END_STREAM != 0;
                    headers_done = f.flags & END_HEADERS != 0;
                }
                CONTINUATION if f.stream == stream => {
                    block.extend_from_slice(&f.payload);
                    headers_done = f.flags & END_HEADERS != 0;
                }
                DATA if f.stream == stream => {
                    let data = frame_payload(f.kind, f.flags, &f.payload).len();
                    r.body_bytes += data;
                    if !f.payload.is_empty() {
                        let inc = (f.payload.len() as u32).to_be_bytes();
                        let mut w = frame(WINDOW_UPDATE, 0, 0, &inc);
                        w.extend(frame(WINDOW_UPDATE, 0, stream, &inc));
                        let _ = self.write(&w).await;
                    }
                    if f.flags & END_STREAM != 0 {
                        r.end = End::Complete;
                        r.detail = goaway;
                        return r;
                    }
                }
                _ => {}
            }
            if headers_done {
                match hpack_status(&block) {
                    Some(s) if (100..200).contains(&s) => {}
                    Some(s) => r.status = r.status.or(Some(s)),
                    None if r.status.is_none() => {
                        r.detail = Some("HEADERS, :status not decoded".to_string());
                    }
                    None => {}
                }
                if connect && r.status.is_some_and(|s| (200..300).contains(&s)) {
                    r.end = End::Switched;
                    r.detail = with_goaway(r.detail.take(), &goaway);
                    return r;
                }
                if block_ends_stream {
                    r.end = End::Complete;
                    r.detail = with_goaway(r.detail.take(), &goaway);
                    return r;
                }
            }
        }
    }
}

/// `:method`, `:scheme https`, `:authority`, `:path` (each only when given), then `extra`.
fn h2_fields(
    method: &str,
    authority: &str,
    path: Option<&str>,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut f = vec![(":method".to_string(), method.to_string())];
    if let Some(p) = path {
        f.push((":scheme".to_string(), "https".to_string()));
        f.push((":authority".to_string(), authority.to_string()));
        f.push((":path".to_string(), p.to_string()));
    } else {
        f.push((":authority".to_string(), authority.to_string()));
    }
    f.extend_from_slice(extra);
    f
}

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

struct Probe {
    a: ProbeArgs,
    backends: Backends,
}

impl Probe {
    /// How long one exchange is waited for.
    fn bound(&self) -> Duration {
        self.a.timeout + self.a.response_timeout
    }

    /// Raw HTTP/1.1 bytes on a fresh plain connection.
    async fn h1(&self, label: &str, request: &[u8]) -> Answer {
        let mark = self.backends.mark();
        let connect = request.starts_with(b"CONNECT ");
        let r = h1_exchange(self.a.http, request, self.bound(), connect).await;
        let reached = self.backends.since(mark).await;
        Answer::from_h1(label, &r, reached)
    }

    /// One HTTP/2 request on a fresh TLS connection.
    async fn h2(&self, label: &str, fields: &[(String, String)], end_stream: bool) -> Answer {
        let mark = self.backends.mark();
        let started = Instant::now();
        let deadline = started + self.bound();
        let connect = fields.first().is_some_and(|(_, m)| m == "CONNECT");
        let mut answer = match H2::connect(self.a.https, self.a.timeout).await {
            Ok(mut h2) => {
                let block = hpack_literal(fields);
                // A failed write (the server closed early) still leaves its answer to read.
                let written = h2.send_headers(1, &block, end_stream).await;
                let r = h2.response(1, deadline, connect).await;
                let mut a = Answer::new(label, r.end, started.elapsed());
                a.status = r.status;
                a.detail = r.detail;
                a.body_bytes = r.body_bytes;
                if let Err(e) = written {
                    a.note = Some(format!("writing the request failed: {}", e.kind()));
                }
                a
            }
            Err(e) => {
                let mut a = Answer::new(label, End::Failed, started.elapsed());
                a.detail = Some(format!("{e:#}"));
                a
            }
        };
        answer.reached = self.backends.since(mark).await;
        answer
    }

    async fn case(&self, n: u8) -> CaseResult {
        match n {
            0 => self.baseline().await,
            1 => self.path(1, "/public/%2e%2e/admin/x").await,
            2 => self.path(2, "/%61dmin/x").await,
            3 => self.path(3, "//admin/x").await,
            4 => self.h2c().await,
            5 => {
                let a = self
                    .h1(
                        "",
                        b"GET route.test:80 HTTP/1.1\r\nHost: probe.test\r\n\r\n",
                    )
                    .await;
                let g = grade_routing(std::slice::from_ref(&a));
                CaseResult::new(5, vec![a], g)
            }
            6 => {
                let h1 = self
                    .h1("HTTP/1.1", &get("/admin/x", "probe.test@route.test"))
                    .await;
                let h2 = self
                    .h2(
                        "HTTP/2",
                        &h2_fields("GET", "probe.test@route.test", Some("/admin/x"), &[]),
                        true,
                    )
                    .await;
                let answers = vec![h1, h2];
                let g = grade_routing(&answers);
                CaseResult::new(6, answers, g)
            }
            7 => self.websocket().await,
            8 => self.unsolicited_101().await,
            9 => {
                let cookies: Vec<(String, String)> = ["a=1", "b=2", "c=3"]
                    .iter()
                    .map(|c| ("cookie".to_string(), c.to_string()))
                    .collect();
                let a = self
                    .h2(
                        "HTTP/2",
                        &h2_fields("GET", "probe.test", Some("/cookies"), &cookies),
                        true,
                    )
                    .await;
                let g = grade_cookies(&a);
                CaseResult::new(9, vec![a], g)
            }
            10 => {
                let mut raw = b"GET /fields HTTP/1.1\r\nHost: probe.test\r\n".to_vec();
                let mut extra = Vec::new();
                for i in 0..FIELDS {
                    raw.extend_from_slice(format!("x-f{i:04}: v\r\n").as_bytes());
                    extra.push((format!("x-f{i:04}"), "v".to_string()));
                }
                raw.extend_from_slice(b"\r\n");
                let h1 = self.h1("HTTP/1.1", &raw).await;
                let h2 = self
                    .h2(
                        "HTTP/2",
                        &h2_fields("GET", "probe.test", Some("/fields"), &extra),
                        true,
                    )
                    .await;
                let answers = vec![h1, h2];
                let g = grade_fields(&answers);
                CaseResult::new(10, answers, g)
            }
            11 => self.trickle().await,
            12 => {
                let a = self.h1("", &get("/_be/badchunk", "probe.test")).await;
                let g = grade_bad_chunk(&a);
                CaseResult::new(12, vec![a], g)
            }
            13 => self.slow_upload().await,
            14 => {
                let h1 = self
                    .h1(
                        "HTTP/1.1",
                        b"CONNECT route.test:443 HTTP/1.1\r\nHost: route.test:443\r\n\r\n",
                    )
                    .await;
                let h2 = self
                    .h2(
                        "HTTP/2",
                        &h2_fields("CONNECT", "route.test:443", None, &[]),
                        false,
                    )
                    .await;
                let answers = vec![h1, h2];
                let g = grade_connect(&answers);
                CaseResult::new(14, answers, g)
            }
            15 => self.cipher_order().await,
            _ => unreachable!("cases are 0-15"),
        }
    }

    async fn baseline(&self) -> CaseResult {
        let answers = vec![
            self.h1("HTTP/1.1 /admin/ok", &get("/admin/ok", "route.test"))
                .await,
            self.h1("HTTP/1.1 /ok", &get("/ok", "route.test")).await,
            self.h2(
                "HTTP/2 /admin/ok",
                &h2_fields("GET", "route.test", Some("/admin/ok"), &[]),
                true,
            )
            .await,
        ];
        let expected = ["adm", "web", "adm"];
        let ok = answers.iter().zip(expected).all(|(a, backend)| {
            a.status == Some(200) && a.reached.len() == 1 && a.reached[0].backend == backend
        });
        let g = if ok {
            (
                2,
                "the routes work: /admin/ok reached adm, /ok reached web".to_string(),
            )
        } else {
            (
                0,
                "the routes do not work as configured: the other results are not comparable"
                    .to_string(),
            )
        };
        CaseResult::new(0, answers, g)
    }

    async fn path(&self, n: u8, target: &str) -> CaseResult {
        let a = self.h1("", &get(target, "route.test")).await;
        let g = grade_routing(std::slice::from_ref(&a));
        CaseResult::new(n, vec![a], g)
    }

    async fn h2c(&self) -> CaseResult {
        let mark = self.backends.mark();
        let started = Instant::now();
        let request = format!(
            "GET /_be/upgrade/h2c HTTP/1.1\r\nHost: probe.test\r\nUpgrade: h2c\r\n\
             HTTP2-Settings: {H2C_SETTINGS}\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n"
        );
        let mut a = match connect_tcp(self.a.http, self.a.timeout).await {
            Err(e) => Answer::new("", End::Failed, started.elapsed()).with_detail(e),
            Ok(mut s) => {
                let _ = s.write_all(request.as_bytes()).await;
                let r = read_h1(&mut s, self.bound(), false).await;
                let mut a = Answer::from_h1("", &r, Vec::new());
                if r.end == End::Switched {
                    // The client's own HTTP/2, past the routes: a request for /admin/secret.
                    let mut bytes = PREFACE.to_vec();
                    bytes.extend(frame(SETTINGS, 0, 0, &[]));
                    let mut fields = h2_fields("GET", "route.test", Some(SECRET), &[]);
                    fields[1].1 = "http".to_string();
                    bytes.extend(frame(
                        HEADERS,
                        END_HEADERS | END_STREAM,
                        3,
                        &hpack_literal(&fields),
                    ));
                    let sent = s.write_all(&bytes).await.is_ok();
                    let (back, _) = drain(&mut s, Duration::from_secs(1)).await;
                    a.note = Some(format!(
                        "{} the HTTP/2 preface and a HEADERS for {SECRET} through it, {back} bytes came back",
                        if sent { "sent" } else { "could not send" }
                    ));
                }
                a
            }
        };
        a.reached = self.backends.since(mark).await;
        let g = if a.status == Some(101) {
            if a.reached.iter().any(|s| s.tunnel_secret) {
                (
                    0,
                    format!(
                        "an h2c tunnel: the client's own HTTP/2 request for {SECRET} reached a backend past the routes"
                    ),
                )
            } else {
                (0, "an h2c tunnel (101 relayed)".to_string())
            }
        } else if a.status.is_none() {
            (0, format!("no answer ({})", a.end.label()))
        } else if a.reached.iter().any(|s| s.upgrade.is_some()) {
            (
                1,
                format!(
                    "no tunnel, but Upgrade: h2c reached the backend and its 101 was refused ({})",
                    a.status.unwrap_or(0)
                ),
            )
        } else {
            (
                2,
                "served as plain HTTP/1.1: no Upgrade reached the backend, no tunnel".to_string(),
            )
        };
        CaseResult::new(4, vec![a], g)
    }

    async fn websocket(&self) -> CaseResult {
        let mark = self.backends.mark();
        let started = Instant::now();
        let request = format!(
            "GET /_be/ws HTTP/1.1\r\nHost: probe.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let mut echoed = false;
        let mut a = match connect_tcp(self.a.http, self.a.timeout).await {
            Err(e) => Answer::new("", End::Failed, started.elapsed()).with_detail(e),
            Ok(mut s) => {
                let _ = s.write_all(request.as_bytes()).await;
                let r = read_h1(&mut s, self.bound(), false).await;
                let mut a = Answer::from_h1("", &r, Vec::new());
                if r.end == End::Switched {
                    // A masked text frame "ping"; the backend echoes the bytes as they are.
                    let mask = [0x12u8, 0x34, 0x56, 0x78];
                    let mut ws = vec![0x81, 0x80 | 4];
                    ws.extend_from_slice(&mask);
                    ws.extend(b"ping".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
                    let mut got = r.rest.clone();
                    if s.write_all(&ws).await.is_ok() {
                        let deadline = Instant::now() + self.a.timeout;
                        let mut buf = [0u8; 1024];
                        while got.len() < ws.len() {
                            match timeout_at(deadline, s.read(&mut buf)).await {
                                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                                _ => break,
                            }
                        }
                    }
                    echoed = got.starts_with(&ws);
                    if echoed {
                        // Silence: how long until the proxy closes?
                        let quiet = Instant::now();
                        let (_, end) = drain(&mut s, self.a.tunnel_wait).await;
                        a.end = end;
                        a.took_ms = quiet.elapsed().as_secs_f64() * 1e3;
                        a.note = Some("one frame echoed; time counted from then".to_string());
                    } else {
                        a.note = Some(format!(
                            "the frame was not echoed ({} bytes back)",
                            got.len()
                        ));
                    }
                }
                a
            }
        };
        a.reached = self.backends.since(mark).await;
        let idle = self.a.tunnel_idle;
        let took = a.took();
        let g = if a.status != Some(101) {
            (1, format!("no tunnel ({}): nothing to time", a.text()))
        } else if !echoed {
            (1, "a tunnel that did not echo".to_string())
        } else {
            match a.end {
                End::Timeout => (
                    0,
                    format!("still open {:.0} s after the last byte", took.as_secs_f64()),
                ),
                _ if took + Duration::from_secs(1) < idle => (
                    1,
                    format!(
                        "closed {:.1} s after the last byte, before the configured {:.0} s",
                        took.as_secs_f64(),
                        idle.as_secs_f64()
                    ),
                ),
                _ if took <= idle + SLACK => (
                    2,
                    format!(
                        "closed {:.1} s after the last byte (configured {:.0} s)",
                        took.as_secs_f64(),
                        idle.as_secs_f64()
                    ),
                ),
                _ => (
                    1,
                    format!(
                        "closed {:.1} s after the last byte, later than the configured {:.0} s",
                        took.as_secs_f64(),
                        idle.as_secs_f64()
                    ),
                ),
            }
        };
        CaseResult::new(7, vec![a], g)
    }

    async fn unsolicited_101(&self) -> CaseResult {
        let mark = self.backends.mark();
        let started = Instant::now();
        let mut a = match connect_tcp(self.a.http, self.a.timeout).await {
            Err(e) => Answer::new("", End::Failed, started.elapsed()).with_detail(e),
            Ok(mut s) => {
                let _ = s.write_all(&get("/_be/101", "probe.test")).await;
                let r = read_h1(&mut s, self.bound(), false).await;
                let mut a = Answer::from_h1("", &r, Vec::new());
                if r.end == End::Switched {
                    let smuggled = format!("GET {SECRET} HTTP/1.1\r\nHost: route.test\r\n\r\n");
                    let sent = s.write_all(smuggled.as_bytes()).await.is_ok();
                    let (back, _) = drain(&mut s, Duration::from_secs(1)).await;
                    a.note = Some(format!(
                        "{} GET {SECRET} (Host route.test) through it, {back} bytes came back",
                        if sent { "sent" } else { "could not send" }
                    ));
                }
                a
            }
        };
        a.reached = self.backends.since(mark).await;
        let g = match a.status {
            Some(101) if a.reached.iter().any(|s| s.tunnel_secret) => (
                0,
                format!("relayed the 101: a tunnel nobody asked for, and GET {SECRET} went through it to the backend"),
            ),
            Some(101) => (0, "relayed the 101: a tunnel nobody asked for".to_string()),
            Some(s) if s >= 500 => (2, format!("refused the backend's 101 with {s}")),
            Some(s) => (1, format!("answered {s}")),
            None if a.end == End::Timeout => (0, "no answer".to_string()),
            None => (1, format!("closed without an answer ({})", a.end.label())),
        };
        CaseResult::new(8, vec![a], g)
    }

    async fn trickle(&self) -> CaseResult {
        let mark = self.backends.mark();
        let started = Instant::now();
        let (mut a, reset) = match H2::connect(self.a.https, self.a.timeout).await {
            Err(e) => (
                Answer::new("HTTP/2", End::Failed, started.elapsed()).with_detail(format!("{e:#}")),
                None,
            ),
            Ok(mut h2) => self.trickle_on(&mut h2).await,
        };
        a.reached = self.backends.since(mark).await;
        let bound = self.a.header_timeout;
        let secs = |d: Duration| d.as_secs_f64();
        // The header block ends with the stream's reset or the connection, whichever comes
        // first; a reset stream leaves an idle connection, as any client may keep one.
        let (ended, how) = match (reset, a.end) {
            (Some(r), _) => (
                Some(r),
                format!(
                    "the stream reset {:.1} s after HEADERS{}",
                    secs(r),
                    if a.end == End::Timeout {
                        ", the connection left open (idle)"
                    } else {
                        ""
                    }
                ),
            ),
            (None, End::Timeout | End::Failed) => (None, String::new()),
            (None, _) => (
                Some(a.took()),
                format!("closed {:.1} s after HEADERS", secs(a.took())),
            ),
        };
        let g = match ended {
            _ if a.end == End::Failed => (0, "could not connect".to_string()),
            None => (
                0,
                format!(
                    "still open after {:.0} s of trickled CONTINUATIONs",
                    secs(a.took())
                ),
            ),
            Some(_) if !a.reached.is_empty() => (1, format!("{how}; a request reached a backend")),
            Some(e) if e <= bound + SLACK => {
                (2, format!("{how} (header timeout {:.0} s)", secs(bound)))
            }
            Some(_) => (
                1,
                format!("{how}, later than the header timeout {:.0} s", secs(bound)),
            ),
        };
        CaseResult::new(11, vec![a], g)
    }

    /// The trickle itself: the answer (ended by the connection's end or --header-wait) and
    /// when the server reset the stream, if it did.
    async fn trickle_on(&self, h2: &mut H2<Tls>) -> (Answer, Option<Duration>) {
        // The server's SETTINGS first, acknowledged: nothing may come between HEADERS and the
        // CONTINUATIONs of its block, not even an ACK.
        let deadline = Instant::now() + self.a.timeout;
        loop {
            match h2.read_frame(deadline).await {
                Ok(f) if f.kind == SETTINGS && f.flags & ACK == 0 => {
                    let _ = h2.write(&frame(SETTINGS, ACK, 0, &[])).await;
                    break;
                }
                Ok(_) => {}
                Err((end, d)) => {
                    let mut a = Answer::new("HTTP/2", end, Duration::ZERO);
                    a.detail = Some(format!(
                        "before the server's SETTINGS{}",
                        d.map(|d| format!(": {d}")).unwrap_or_default()
                    ));
                    return (a, None);
                }
            }
        }
        let first = hpack_literal(&[
            (":method".to_string(), "GET".to_string()),
            (":scheme".to_string(), "https".to_string()),
        ]);
        let started = Instant::now();
        let mut a = Answer::new("HTTP/2", End::Timeout, Duration::ZERO);
        if let Err(e) = h2.write(&frame(HEADERS, END_STREAM, 1, &first)).await {
            a.end = io_end(&e);
            a.detail = Some(format!("writing HEADERS: {}", e.kind()));
            return (a, None);
        }
        let deadline = started + self.a.header_wait;
        let mut sent = 0usize;
        let mut next = started + TRICKLE_GAP;
        let mut frames: Vec<String> = Vec::new();
        let mut reset: Option<Duration> = None;
        // A turn per CONTINUATION or frame read; bounded by --header-wait.
        loop {
            tokio::select! {
                () = sleep_until(next), if reset.is_none() => {
                    let fields = if sent == 0 {
                        vec![
                            (":authority".to_string(), "probe.test".to_string()),
                            (":path".to_string(), "/trickle".to_string()),
                        ]
                    } else {
                        vec![(format!("x-trickle-{sent}"), "1".to_string())]
                    };
                    // A failed write: the server is closing; its close is read next.
                    if h2.write(&frame(CONTINUATION, 0, 1, &hpack_literal(&fields))).await.is_ok() {
                        sent += 1;
                    }
                    next += TRICKLE_GAP;
                }
                f = h2.read_frame(deadline) => match f {
                    Ok(f) if f.kind == GOAWAY => {
                        frames.push(format!(
                            "GOAWAY {} at {:.1} s",
                            error_code(be32(f.payload.get(4..).unwrap_or(&[]))),
                            started.elapsed().as_secs_f64()
                        ));
                    }
                    Ok(f) if f.kind == HEADERS && f.stream == 1 => {
                        a.status = hpack_status(frame_payload(f.kind, f.flags, &f.payload));
                    }
                    Ok(f) if f.kind == RST_STREAM && f.stream == 1 => {
                        // The block is dead: no more CONTINUATIONs (one for a closed stream
                        // would be our protocol error); watch the connection.
                        reset = reset.or(Some(started.elapsed()));
                        frames.push(format!(
                            "RST_STREAM {} at {:.1} s",
                            error_code(be32(&f.payload)),
                            started.elapsed().as_secs_f64()
                        ));
                    }
                    Ok(_) => {}
                    Err((end, d)) => {
                        a.end = end;
                        frames.extend(d);
                        break;
                    }
                },
            }
        }
        a.took_ms = started.elapsed().as_secs_f64() * 1e3;
        if !frames.is_empty() {
            a.detail = Some(frames.join(", "));
        }
        a.note = Some(format!("{sent} CONTINUATIONs sent, one every 2 s"));
        (a, reset)
    }

    async fn slow_upload(&self) -> CaseResult {
        let mark = self.backends.mark();
        let started = Instant::now();
        let bound = UPLOAD_GAP * UPLOAD_PIECES as u32 + self.bound();
        let mut a = match connect_tcp(self.a.http, self.a.timeout).await {
            Err(e) => Answer::new("", End::Failed, started.elapsed()).with_detail(e),
            Ok(stream) => {
                let (mut rd, mut wr) = stream.into_split();
                let sent = Arc::new(AtomicUsize::new(0));
                let counter = sent.clone();
                let writer = tokio::spawn(async move {
                    let head = format!(
                        "POST /upload HTTP/1.1\r\nHost: probe.test\r\nContent-Type: application/octet-stream\r\n\
                         Content-Length: {UPLOAD_LEN}\r\n\r\n"
                    );
                    if wr.write_all(head.as_bytes()).await.is_err() {
                        return wr;
                    }
                    let piece = vec![b'u'; UPLOAD_LEN / UPLOAD_PIECES];
                    for i in 0..UPLOAD_PIECES {
                        if i > 0 {
                            sleep(UPLOAD_GAP).await;
                        }
                        if wr.write_all(&piece).await.is_err() {
                            break;
                        }
                        counter.fetch_add(piece.len(), Ordering::Relaxed);
                    }
                    wr
                });
                let r = read_h1(&mut rd, bound, false).await;
                writer.abort();
                let mut a = Answer::from_h1("", &r, Vec::new());
                a.took_ms = started.elapsed().as_secs_f64() * 1e3;
                let sent = sent.load(Ordering::Relaxed);
                a.note = Some(format!(
                    "{sent} of {UPLOAD_LEN} bytes sent when it ended{}",
                    if sent < UPLOAD_LEN {
                        " (cut short)"
                    } else {
                        ""
                    }
                ));
                a
            }
        };
        a.reached = self.backends.since(mark).await;
        let whole = a.reached.iter().any(|s| s.body_len == UPLOAD_LEN);
        let g = match a.status {
            Some(200) if whole => (
                2,
                format!(
                    "200 after {:.1} s, the whole body reached the backend",
                    a.took_ms / 1e3
                ),
            ),
            Some(s) => (
                0,
                format!(
                    "a legitimate slow upload got {s} after {:.1} s",
                    a.took_ms / 1e3
                ),
            ),
            None => (
                0,
                format!(
                    "a legitimate slow upload: {} after {:.1} s",
                    a.end.label(),
                    a.took_ms / 1e3
                ),
            ),
        };
        CaseResult::new(13, vec![a], g)
    }

    async fn cipher_order(&self) -> CaseResult {
        let tls13_a = vec![
            suites::TLS13_AES_128_GCM_SHA256,
            suites::TLS13_AES_256_GCM_SHA384,
            suites::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        let tls12_a = vec![
            suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suites::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suites::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suites::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        let reversed = |v: &Vec<SupportedCipherSuite>| {
            // ChaCha20 first, AES-128 last (ECDSA before RSA in each pair).
            let mut pairs: Vec<Vec<SupportedCipherSuite>> = if v.len() == 6 {
                v.chunks(2).map(|c| c.to_vec()).collect()
            } else {
                v.iter().map(|s| vec![*s]).collect()
            };
            pairs.reverse();
            pairs.concat()
        };
        let mut answers = Vec::new();
        let mut server_order = 0;
        let mut verdicts = Vec::new();
        for (label, version, order_a) in [
            ("TLS 1.3", &rustls::version::TLS13, tls13_a),
            ("TLS 1.2", &rustls::version::TLS12, tls12_a),
        ] {
            let started = Instant::now();
            let order_b = reversed(&order_a);
            let mut picks = Vec::new();
            for order in [order_a.clone(), order_b] {
                let first = suite_name(order[0]);
                let pick = match tls_config(&[&b"http/1.1"[..]], Some(order), Some(version)) {
                    Ok(config) => match tls_connect(self.a.https, config, self.a.timeout).await {
                        Ok(tls) => tls
                            .get_ref()
                            .1
                            .negotiated_cipher_suite()
                            .map(suite_name)
                            .unwrap_or_else(|| "?".to_string()),
                        Err(e) => format!("failed: {e:#}"),
                    },
                    Err(e) => format!("failed: {e:#}"),
                };
                picks.push((first, pick));
            }
            let failed = picks.iter().any(|(_, p)| p.starts_with("failed"));
            let same = picks[0].1 == picks[1].1 && !failed;
            if same {
                server_order += 1;
            }
            let verdict = if failed {
                "no handshake"
            } else if same {
                "the server's order"
            } else if picks.iter().all(|(first, pick)| first == pick) {
                "the client's order"
            } else {
                "mixed: the server's order for one, the client's first for the other"
            };
            verdicts.push(format!("{label}: {verdict}"));
            let mut a = Answer::new(label, End::Complete, started.elapsed());
            a.summary = Some(format!(
                "{} first → {}, {} first → {}: {verdict}",
                picks[0].0, picks[0].1, picks[1].0, picks[1].1,
            ));
            answers.push(a);
        }
        let g = (server_order, verdicts.join("; "));
        CaseResult::new(15, answers, g)
    }
}

impl Answer {
    fn with_detail(mut self, d: String) -> Answer {
        self.detail = Some(d);
        self
    }
}

fn suite_name(s: SupportedCipherSuite) -> String {
    let full = format!("{:?}", s.suite());
    full.trim_start_matches("TLS13_")
        .trim_start_matches("TLS_ECDHE_ECDSA_WITH_")
        .trim_start_matches("TLS_ECDHE_RSA_WITH_")
        .to_string()
}

/// Reads and discards until EOF, an error or `bound`: the bytes read and how it ended.
async fn drain<S: AsyncRead + Unpin>(s: &mut S, bound: Duration) -> (usize, End) {
    let deadline = Instant::now() + bound;
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0;
    loop {
        match timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (total, End::Timeout),
            Ok(Ok(0)) => return (total, End::Closed),
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => return (total, io_end(&e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Grades: 2 good, 1 acceptable, 0 bad
// ---------------------------------------------------------------------------------------------

/// Cases 1-3, 5, 6. Bad: no answer within the bound; a request reached a backend other than
/// the one the routes give to what that backend reads (the path resolved as a lenient backend
/// resolves it, the host after any userinfo); a target that is not origin or absolute form
/// reached a backend. Good: refused with a 4xx, or routed and forwarded in normal form.
/// Acceptable: routed right but forwarded as sent, or closed without an answer, or a 5xx.
fn grade_routing(answers: &[Answer]) -> (u8, String) {
    let mut score = 2;
    let mut why = Vec::new();
    for a in answers {
        let (s, w) = grade_one_routing(a);
        score = score.min(s);
        why.push(if answers.len() > 1 {
            format!("{}: {w}", a.label)
        } else {
            w
        });
    }
    (score, why.join("; "))
}

fn grade_one_routing(a: &Answer) -> (u8, String) {
    for s in &a.reached {
        match s.routing() {
            Routing::Bypass {
                expected,
                host,
                path,
            } => {
                return (
                    0,
                    format!(
                        "{} got what a backend reads as {host}{path}, which the routes give to {expected}",
                        s.backend
                    ),
                )
            }
            Routing::OddTarget => {
                return (0, format!("the target {:?} reached {} as it was", s.target, s.backend))
            }
            Routing::Normal | Routing::Unnormalized => {}
        }
    }
    if a.reached.is_empty() {
        return match (a.status, a.end) {
            (Some(s), _) if (400..500).contains(&s) => (2, format!("refused with {s}")),
            (Some(s), _) => (1, format!("{s} without reaching a backend")),
            (None, End::Timeout) => (0, "no answer within the bound".to_string()),
            (None, end) => (1, format!("{} without an answer", end.label())),
        };
    }
    if a.status.is_none() && a.end == End::Timeout {
        return (
            0,
            "reached a backend, but no answer within the bound".to_string(),
        );
    }
    if a.reached.iter().all(|s| s.routing() == Routing::Normal) {
        (
            2,
            "routed on the normalized request and forwarded in that form".to_string(),
        )
    } else {
        (
            1,
            "routed right, but forwarded as sent (the backend resolves it again)".to_string(),
        )
    }
}

/// Case 9. Good: one Cookie line `a=1; b=2; c=3` (RFC 9113 §8.2.3). Bad: several lines (a
/// backend that reads one sees one cookie), or the request not served.
fn grade_cookies(a: &Answer) -> (u8, String) {
    let Some(seen) = a.reached.first() else {
        return (0, format!("not served: {}", a.text()));
    };
    match seen.cookie.as_slice() {
        [one] if one == "a=1; b=2; c=3" => (2, "one Cookie line with the three crumbs".to_string()),
        [one] => (1, format!("one Cookie line, {one:?}")),
        [] => (0, "no Cookie reached the backend".to_string()),
        many => (
            0,
            format!(
                "{} Cookie lines: a backend that reads one line sees one cookie",
                many.len()
            ),
        ),
    }
}

/// Case 10, per protocol. Good: a 4xx and nothing reached a backend. Acceptable: every field
/// forwarded (the backend's own limit decides; Apache's LimitRequestFields is 100), a close or
/// reset without an answer, or a 5xx. Bad: no answer within the bound, or fields lost on the
/// way.
fn grade_fields(answers: &[Answer]) -> (u8, String) {
    let mut score = 2;
    let mut why = Vec::new();
    for a in answers {
        let (s, w) = match (a.status, a.reached.first()) {
            (_, Some(seen)) if seen.fields < FIELDS => (
                0,
                format!(
                    "{} of {FIELDS} fields reached {}",
                    seen.fields, seen.backend
                ),
            ),
            (Some(s), Some(seen)) => (
                1,
                format!(
                    "{s}: all {} fields forwarded to {}",
                    seen.fields, seen.backend
                ),
            ),
            (Some(s), None) if (400..500).contains(&s) => {
                (2, format!("{s}, nothing reached a backend"))
            }
            (Some(s), None) => (1, format!("{s}, nothing reached a backend")),
            (None, _) if a.end == End::Timeout => (0, "no answer within the bound".to_string()),
            (None, _) => (1, format!("{} without an answer", a.end.label())),
        };
        score = score.min(s);
        why.push(format!("{}: {w}", a.label));
    }
    (score, why.join("; "))
}

/// Case 12. Good: a 5xx, or the body re-framed without the extension. Acceptable: a 200 cut
/// short, a close without an answer. Bad: the 1 MiB extension passed on, or no answer.
fn grade_bad_chunk(a: &Answer) -> (u8, String) {
    if a.raw_bytes > MIB {
        return (
            0,
            format!("relayed the malformed response ({} bytes)", a.raw_bytes),
        );
    }
    match (a.status, a.end) {
        (Some(s), End::Complete) if s >= 500 => (2, format!("{s}: the malformed response refused")),
        (Some(200), End::Complete) if a.body_bytes == 5 => (
            2,
            "the 5-byte chunk forwarded, re-framed without the extension".to_string(),
        ),
        (Some(s), End::Complete) => (1, format!("{s} with {} body bytes", a.body_bytes)),
        (Some(s), end) => (
            1,
            format!("{s}, then {} (the response cut short)", end.label()),
        ),
        (None, End::Timeout) => (0, "no answer within the bound".to_string()),
        (None, end) => (1, format!("{} without an answer", end.label())),
    }
}

/// Case 14, per protocol. Good: a 4xx/5xx and nothing reached a backend. Bad: forwarded, a
/// 2xx tunnel, or no answer. Acceptable: a close without an answer.
fn grade_connect(answers: &[Answer]) -> (u8, String) {
    let mut score = 2;
    let mut why = Vec::new();
    for a in answers {
        let (s, w) = if let Some(seen) = a.reached.first() {
            (0, format!("forwarded to {}", seen.backend))
        } else {
            match a.status {
                Some(s) if (200..300).contains(&s) => (0, format!("{s}: a tunnel")),
                Some(s) if s >= 400 => (2, format!("{s}")),
                Some(s) => (1, format!("{s}")),
                None if a.end == End::Timeout => (0, "no answer within the bound".to_string()),
                None => (1, format!("{} without an answer", a.end.label())),
            }
        };
        score = score.min(s);
        why.push(format!("{}: {w}", a.label));
    }
    (score, why.join("; "))
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

pub async fn run(a: ProbeArgs) -> anyhow::Result<()> {
    for (what, addr) in [
        ("--http", a.http),
        ("--https", a.https),
        ("--adm", a.adm),
        ("--web", a.web),
    ] {
        if !addr.ip().is_loopback() {
            bail!("{what} {addr}: loopback addresses only");
        }
    }
    if a.adm == a.web {
        bail!("--adm and --web must differ");
    }
    if a.only.as_ref().is_some_and(|o| o.iter().any(|c| *c > 15)) {
        bail!("cases are 1-15");
    }
    let backends = Backends::start(a.adm, a.web).await?;
    if let Some(d) = a.serve {
        println!("backends: adm {} web {} (for {d:?})", a.adm, a.web);
        sleep(d).await;
        return Ok(());
    }
    if !a.json {
        println!(
            "kaproxy-bench probe {}: http {}, https {}; backends adm {}, web {}",
            a.name, a.http, a.https, a.adm, a.web
        );
    }
    let probe = Probe {
        a: a.clone(),
        backends,
    };
    let mut cases = Vec::new();
    for n in 0..=15u8 {
        if n != 0 && a.only.as_ref().is_some_and(|o| !o.contains(&n)) {
            continue;
        }
        eprintln!("probe {}: case {n}: {}", a.name, TITLES[n as usize]);
        let r = probe.case(n).await;
        if !a.json {
            print!("{}", r.to_text());
        }
        cases.push(r);
    }
    if a.json {
        let report = ProbeReport {
            proxy: a.name.clone(),
            http: a.http.to_string(),
            https: a.https.to_string(),
            adm: a.adm.to_string(),
            web: a.web.to_string(),
            cases,
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_like_a_lenient_backend() {
        for (path, normal) in [
            ("/public/%2e%2e/admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("//admin/x", "/admin/x"),
            ("/admin/x/.", "/admin/x/"),
            ("/a/b/../../..", "/"),
            ("/%41dmin", "/Admin"),
            ("/a%2fb", "/a%2fb"),
            ("/x%", "/x%"),
            ("/", "/"),
        ] {
            assert_eq!(normalize(path), normal, "{path}");
        }
    }

    #[test]
    fn hosts_and_routes() {
        assert_eq!(lenient_host("probe.test@route.test"), "route.test");
        assert_eq!(lenient_host("ROUTE.test.:80"), "route.test");
        assert_eq!(lenient_host("[::1]:8080"), "[::1]");
        assert_eq!(route_for("route.test", "/admin/x"), "adm");
        assert_eq!(route_for("route.test", "/public"), "web");
        assert_eq!(route_for("probe.test", "/admin/x"), "web");
    }

    fn seen(backend: &'static str, target: &str, host: &str) -> Seen {
        Seen {
            backend,
            method: "GET".into(),
            target: target.into(),
            host: vec![host.into()],
            fields: 1,
            cookie: Vec::new(),
            body_len: 0,
            upgrade: None,
            http2_settings: false,
            switched: false,
            tunnel_bytes: 0,
            tunnel_http2_preface: false,
            tunnel_secret: false,
            tunnel_closed_after_ms: None,
        }
    }

    #[test]
    fn routing_of_what_reached_a_backend() {
        assert_eq!(
            seen("adm", "/admin/x", "route.test").routing(),
            Routing::Normal
        );
        assert_eq!(
            seen("adm", "/public/%2e%2e/admin/x", "route.test").routing(),
            Routing::Unnormalized
        );
        assert!(matches!(
            seen("web", "/public/%2e%2e/admin/x", "route.test").routing(),
            Routing::Bypass {
                expected: "adm",
                ..
            }
        ));
        assert!(matches!(
            seen("web", "/admin/x", "probe.test@route.test").routing(),
            Routing::Bypass {
                expected: "adm",
                ..
            }
        ));
        assert_eq!(
            seen("web", "route.test:80", "probe.test").routing(),
            Routing::OddTarget
        );
        assert_eq!(
            seen("adm", "http://route.test/admin/x", "probe.test").routing(),
            Routing::Unnormalized
        );
    }

    #[test]
    fn hpack_round_trips_and_status() {
        let mut out = Vec::new();
        hpack_int_encode(&mut out, 1337, 5, 0);
        assert_eq!(out, [31, 154, 10]);
        assert_eq!(hpack_int(&out, 5), Some((1337, 3)));
        // Indexed :status 200, 404.
        assert_eq!(hpack_status(&[0x88]), Some(200));
        assert_eq!(hpack_status(&[0x8d]), Some(404));
        // A table size update, then literal with incremental indexing, name index 8, "431".
        assert_eq!(
            hpack_status(&[0x20, 0x48, 0x03, b'4', b'3', b'1']),
            Some(431)
        );
        // Huffman "405": 011010 00000 011011 + 7 padding ones = 0x68 0x1b 0x7f? computed below.
        let bits = "011010".to_string() + "00000" + "011011";
        let padded = format!("{bits:1<24}");
        let bytes: Vec<u8> = (0..3)
            .map(|i| u8::from_str_radix(&padded[i * 8..i * 8 + 8], 2).unwrap())
            .collect();
        let mut block = vec![0x08, 0x80 | 3];
        block.extend_from_slice(&bytes);
        assert_eq!(hpack_status(&block), Some(405));
        assert_eq!(huffman_digits(&bytes), Some("405".to_string()));
        // "200": 00010 00000 00000 + 1 padding one.
        assert_eq!(
            huffman_digits(&[0b0001_0000, 0b0000_0001]),
            Some("200".to_string())
        );
        assert_eq!(huffman_digits(&[0x00]), None);
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            decode_chunked(b"5\r\nhello\r\n0\r\n\r\n"),
            Some(b"hello".to_vec())
        );
        assert_eq!(
            decode_chunked(b"5;e=1\r\nhello\r\n0\r\n\r\n"),
            Some(b"hello".to_vec())
        );
        assert_eq!(decode_chunked(b"5\r\nhel"), None);
    }
}
