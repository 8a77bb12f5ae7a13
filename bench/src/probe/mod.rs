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

mod backends;
mod grade;
mod h1;
mod h2;

use backends::*;
use grade::*;
use h1::*;
use h2::*;

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
