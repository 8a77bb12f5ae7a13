//! Buffering (README, "Buffering"): a request body is read whole — in memory, then in an
//! unlinked temporary file — before any backend connection is taken, and a response is read as
//! fast as the backend sends it, so that a slow client holds kaproxy's memory or disk, never a
//! backend connection; the 413 cap, `Expect: 100-continue`, event streams passed through, an
//! unusable temp dir, and the memory budget under many HTTP/2 streams. Against real Apache
//! (`apache_buffering.rs`): 200 MiB each way with little memory, and slow clients that hold
//! no Apache worker.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::support::backend::RecordingBackend;
use crate::support::binary::{open_files_in, Binary};
use crate::support::client::{tls_connect, KeepAliveClient, Request, TLS_SERVER_NAME};
use crate::support::config_file::ConfigFile;
use crate::support::hostile::{
    chunked_request, connect_small_rcvbuf, raw_exchange, read_response, BulkBackend, StreamEnd,
    ZeroWindowStream, RAW_BOUND,
};
use crate::support::proxy::{Metrics, TestProxy, CLOSED_TOTAL, POOL_IDLE};

const BUFFER_BYTES: &str = "kaproxy_body_buffer_bytes";
const SPILLED: &str = "kaproxy_body_spilled_total";
const SPILL_ERRORS: &str = "kaproxy_body_spill_errors_total";
const TOO_LARGE: &str = "kaproxy_request_body_too_large_total";
const OPENED_TOTAL: &str = "kaproxy_upstream_connections_opened_total";
const MIB: usize = 1024 * 1024;
/// The downstream deadlines of these tests: short, so that a client that stops is cut soon.
const DOWNSTREAM: &str =
    "[downstream]\nbody_timeout = \"2s\"\nsend_timeout = \"2s\"\nheader_timeout = \"2s\"\n";
/// What a 2 s timer and the metrics may take to show on a busy test machine.
const SLACK: Duration = Duration::from_secs(5);

/// kaproxy with the short deadlines, one upstream group on `backend` (plus `upstream_keys`)
/// and its temporary files in a directory of the test's own, returned with it.
async fn start(
    backend: SocketAddr,
    upstream_keys: &str,
    buffering_keys: &str,
) -> (TestProxy, tempfile::TempDir) {
    start_in(DOWNSTREAM, backend, upstream_keys, buffering_keys).await
}

/// [`start`] with another `[downstream]` table.
async fn start_in(
    downstream: &str,
    backend: SocketAddr,
    upstream_keys: &str,
    buffering_keys: &str,
) -> (TestProxy, tempfile::TempDir) {
    let spill = tempfile::Builder::new()
        .prefix("kaproxy-spill-")
        .tempdir()
        .expect("spill dir");
    let proxy = TestProxy::start(&format!(
        "{downstream}\n[upstreams.web]\nservers = [\"{backend}\"]\n{upstream_keys}\n\
         [buffering]\ntemp_dir = {:?}\n{buffering_keys}\n",
        spill.path().display().to_string()
    ))
    .await;
    (proxy, spill)
}

/// Upstream connections of `server` neither closed nor idle in the pool: held by a request.
fn held(m: &Metrics, server: &str) -> f64 {
    m.sum(OPENED_TOTAL, &[("server", server)])
        - m.sum(CLOSED_TOTAL, &[("server", server)])
        - m.sum(POOL_IDLE, &[("server", server)])
}

fn buffered(m: &Metrics, location: &str) -> f64 {
    m.sum(BUFFER_BYTES, &[("location", location)])
}

fn report(m: &Metrics) -> String {
    m.0.lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("kaproxy_body_")
                    || l.contains("kaproxy_upstream_connections")
                    || l.contains("kaproxy_pool_idle")
                    || l.contains("too_large"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every buffer given back and every temporary file closed (this process's descriptors:
/// kaproxy runs in the test process) once the requests are over, and nothing left in the
/// directory.
async fn assert_buffers_released(proxy: &TestProxy, spill: &Path, what: &str) {
    let (m, released) = proxy
        .wait_metrics(SLACK, |m| {
            buffered(m, "memory") == 0.0
                && buffered(m, "disk") == 0.0
                && open_files_in("/proc/self/fd", spill).is_empty()
        })
        .await;
    assert!(
        released,
        "{what}: buffers given back and temporary files closed\n{}\nopen: {:?}",
        report(&m),
        open_files_in("/proc/self/fd", spill)
    );
    let left: Vec<_> = std::fs::read_dir(spill).expect("spill dir").collect();
    assert!(left.is_empty(), "{what}: files left in temp_dir: {left:?}");
}

/// Deterministic bytes for body `seed`, so that what arrives can be compared without keeping
/// a copy.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn normal_get(proxy: &TestProxy, when: &str) {
    let mut client = KeepAliveClient::new(proxy.http(), None).with_timeout(Duration::from_secs(2));
    let resp = client
        .send(&Request::get("/normal"))
        .await
        .unwrap_or_else(|e| panic!("a normal GET {when} failed: {e}"));
    assert_eq!(resp.status, 200, "a normal GET {when}: {resp:?}");
}

// ---------------------------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_slow_upload_is_read_whole_to_disk_before_any_backend_connection_is_taken() {
    const LENGTH: usize = MIB;
    let backend = RecordingBackend::start("up", &[]).await;
    let (proxy, spill) = start(backend.addr(), "", "").await;
    let server = backend.addr().to_string();
    let body = pattern(1, LENGTH);
    let mut stream = TcpStream::connect(proxy.server.http_addr().unwrap())
        .await
        .expect("connect");
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {LENGTH}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..256 * 1024]).await.unwrap();
    // Then a trickle, each gap well inside body_timeout: the slow client of the attack.
    let mut sent = 256 * 1024;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        stream.write_all(&body[sent..sent + 1]).await.unwrap();
        sent += 1;
    }
    let (m, spilled) = proxy
        .wait_metrics(SLACK, |m| buffered(m, "disk") >= sent as f64)
        .await;
    assert!(
        spilled,
        "past request_buffer_bytes, on disk\n{}",
        report(&m)
    );
    assert_eq!(
        m.sum(SPILLED, &[("direction", "request")]),
        1.0,
        "{}",
        report(&m)
    );
    normal_get(&proxy, "while an upload trickles").await;
    let m = proxy.metrics();
    assert!(
        backend.requests().iter().all(|r| r.uri.path() != "/upload"),
        "the backend has not seen the upload yet"
    );
    assert_eq!(
        m.sum(OPENED_TOTAL, &[("server", &server)]),
        1.0,
        "only the normal GET took an upstream connection\n{}",
        report(&m)
    );
    assert_eq!(held(&m, &server), 0.0, "{}", report(&m));

    stream.write_all(&body[sent..]).await.unwrap();
    let resp = read_response(&mut stream, RAW_BOUND).await;
    assert_eq!(resp.status, Some(200), "{resp:?}");
    let upload = backend
        .requests()
        .into_iter()
        .find(|r| r.uri.path() == "/upload")
        .expect("the upload reached the backend");
    assert!(
        upload.body == body,
        "the whole body, intact ({} bytes)",
        upload.body.len()
    );
    assert_eq!(upload.header("content-length"), LENGTH.to_string());
    drop(stream);
    assert_buffers_released(&proxy, spill.path(), "after the slow upload").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_chunked_upload_is_sent_with_its_length_once_read_whole() {
    let backend = RecordingBackend::start("up", &[]).await;
    let (proxy, spill) = start(backend.addr(), "", "").await;
    let body = pattern(2, 150_000);
    let request = chunked_request("/chunked", &body, 40_000);
    let resp = raw_exchange(proxy.server.http_addr().unwrap(), &request).await;
    assert_eq!(resp.status, Some(200), "{resp:?}");
    let got = backend.requests().pop().expect("reached the backend");
    assert!(got.body == body, "intact");
    assert_eq!(
        got.header("content-length"),
        "150000",
        "framed by its length"
    );
    assert_eq!(got.header("transfer-encoding"), "");
    assert_buffers_released(&proxy, spill.path(), "after the chunked upload").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_by_kaproxy_and_not_passed_on() {
    const LENGTH: usize = 300_000;
    let backend = RecordingBackend::start("up", &[]).await;
    let (proxy, _spill) = start(backend.addr(), "", "").await;
    let mut stream = TcpStream::connect(proxy.server.http_addr().unwrap())
        .await
        .expect("connect");
    let head = format!(
        "PUT /file HTTP/1.1\r\nHost: x\r\nContent-Length: {LENGTH}\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = vec![0u8; 64];
    let n = tokio::time::timeout(RAW_BOUND, stream.read(&mut interim))
        .await
        .expect("an interim answer within 5 s")
        .expect("read");
    let interim = String::from_utf8_lossy(&interim[..n]).to_string();
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue\r\n"),
        "{interim:?}"
    );
    assert!(
        backend.requests().is_empty(),
        "kaproxy answered, not the backend"
    );
    stream.write_all(&pattern(3, LENGTH)).await.unwrap();
    let resp = read_response(&mut stream, RAW_BOUND).await;
    assert_eq!(resp.status, Some(200), "{resp:?}");
    let got = backend.requests().pop().expect("reached the backend");
    assert_eq!(got.body.len(), LENGTH);
    assert_eq!(got.header("expect"), "", "the backend is not asked again");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_body_over_max_request_body_bytes_is_413_by_length_or_while_chunked() {
    let backend = RecordingBackend::start("up", &[]).await;
    let (proxy, spill) = start(backend.addr(), "max_request_body_bytes = 100000", "").await;
    let addr = proxy.server.http_addr().unwrap();

    // By Content-Length, at once: with Expect, no 100 Continue comes first.
    let by_length = raw_exchange(
        addr,
        b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 100001\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert_eq!(by_length.status, Some(413), "{by_length:?}");
    assert_eq!(
        by_length.header_values("connection"),
        vec!["close"],
        "{by_length:?}"
    );

    // Chunked, found while reading.
    // 120 000 bytes in chunks of 30 000.
    let chunked = chunked_request("/big", &[b'c'; 120_000], 30_000);
    let overflow = raw_exchange(addr, &chunked).await;
    assert_eq!(overflow.status, Some(413), "{overflow:?}");
    assert_eq!(
        overflow.header_values("connection"),
        vec!["close"],
        "{overflow:?}"
    );

    // Exactly the limit passes.
    let mut exact = b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".to_vec();
    exact.extend(std::iter::repeat_n(b'o', 100_000));
    let ok = raw_exchange(addr, &exact).await;
    assert_eq!(ok.status, Some(200), "{ok:?}");

    let m = proxy.metrics();
    assert_eq!(
        m.sum(TOO_LARGE, &[("upstream", "web")]),
        2.0,
        "{}",
        report(&m)
    );
    let paths = backend.paths();
    assert_eq!(
        paths,
        vec!["/ok"],
        "the backend never saw the refused bodies"
    );
    assert_buffers_released(&proxy, spill.path(), "after the 413s").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_buffering_false_streams_and_still_enforces_the_cap() {
    let backend = RecordingBackend::start("up", &[]).await;
    let (proxy, _spill) = start(
        backend.addr(),
        "request_buffering = false\nmax_request_body_bytes = 100000",
        "",
    )
    .await;
    let addr = proxy.server.http_addr().unwrap();
    // 120 000 bytes in chunks of 30 000.
    let chunked = chunked_request("/big", &[b'c'; 120_000], 30_000);
    let overflow = raw_exchange(addr, &chunked).await;
    // Past request_buffer_bytes the body streamed: the backend was contacted, but never got
    // more than the cap, and the client gets 413 (no response had started).
    assert_eq!(overflow.status, Some(413), "{overflow:?}");
    let m = proxy.metrics();
    assert_eq!(
        m.sum(SPILLED, &[("direction", "request")]),
        0.0,
        "streamed, never spilled"
    );
    assert_eq!(
        m.sum(TOO_LARGE, &[("upstream", "web")]),
        1.0,
        "{}",
        report(&m)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_temp_dir_that_disappears_gives_500_names_the_directory_and_contacts_no_backend() {
    let backend = RecordingBackend::start("up", &[]).await;
    let files = ConfigFile::new();
    let spill = files.file("spill");
    std::fs::create_dir(&spill).expect("spill dir");
    let (mut kaproxy, addr, admin) = Binary::start(
        &files,
        &format!(
            "[upstreams.web]\nservers = [\"{}\"]\n[buffering]\ntemp_dir = {:?}\n",
            backend.addr(),
            spill.display().to_string()
        ),
    )
    .await;
    // The directory existed at load (it is checked); now it is gone, as a full or unmounted
    // disk would be.
    std::fs::remove_dir(&spill).expect("remove spill dir");

    let mut big = b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'b', 200_000));
    let refused = raw_exchange(addr, &big).await;
    assert_eq!(refused.status, Some(500), "{refused:?}");
    assert!(
        refused.body_text().contains("could not be buffered"),
        "{refused:?}"
    );
    // A body that fits in memory is not affected.
    let mut small = b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".to_vec();
    small.extend(std::iter::repeat_n(b's', 1000));
    let served = raw_exchange(addr, &small).await;
    assert_eq!(served.status, Some(200), "{served:?}");

    let paths = backend.paths();
    assert_eq!(
        paths,
        vec!["/small"],
        "the refused body never reached the backend"
    );
    let lines = kaproxy.messages("cannot buffer a request body");
    assert_eq!(lines.len(), 1, "one log line:\n{}", kaproxy.log());
    assert_eq!(
        lines[0]["dir"].as_str(),
        Some(spill.display().to_string().as_str()),
        "{}",
        lines[0]
    );
    let metrics = raw_exchange(admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let m = Metrics(metrics.body_text());
    assert_eq!(
        m.sum(SPILL_ERRORS, &[("direction", "request")]),
        1.0,
        "{}",
        report(&m)
    );
    let _ = kaproxy.child.kill().await;
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// Reads one response whose body is bytes of `x` (BulkBackend): its first `slow_reads` reads
/// 4 KiB at a time with a pause (a slow reader), then as fast as it comes; returns the body
/// length read and whether every byte was `x`.
async fn read_bulk(stream: &mut TcpStream, slow_reads: usize, bound: Duration) -> (usize, bool) {
    let deadline = tokio::time::Instant::now() + bound;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = Vec::new();
    let mut reads = 0;
    let head_end = loop {
        let max = if reads < slow_reads { 4096 } else { buf.len() };
        if reads < slow_reads {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        reads += 1;
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf[..max]))
            .await
            .expect("response head in time")
            .expect("read");
        assert!(n > 0, "closed before the head");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut body_len = got.len() - head_end;
    let mut all_x = got[head_end..].iter().all(|&b| b == b'x');
    while body_len < length {
        let max = if reads < slow_reads { 4096 } else { buf.len() };
        if reads < slow_reads {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        reads += 1;
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf[..max]))
            .await
            .expect("the body in time")
            .expect("read");
        if n == 0 {
            break;
        }
        all_x &= buf[..n].iter().all(|&b| b == b'x');
        body_len += n;
    }
    (body_len, all_x)
}

/// The response of the slow-reader tests.
const BODY: usize = 16 * MIB;

/// A `GET /bytes/BODY` sent through kaproxy to a BulkBackend by a client whose receive buffer
/// is as small as the kernel allows, and that has read nothing yet.
struct SlowRead {
    backend: BulkBackend,
    proxy: TestProxy,
    spill: tempfile::TempDir,
    server: String,
    stream: TcpStream,
}

impl SlowRead {
    async fn start() -> SlowRead {
        let backend = BulkBackend::start("bulk").await;
        let (proxy, spill) = start(backend.addr(), "", "").await;
        let server = backend.addr().to_string();
        let mut stream = connect_small_rcvbuf(proxy.server.http_addr().unwrap()).await;
        stream
            .write_all(format!("GET /bytes/{BODY} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        SlowRead {
            backend,
            proxy,
            spill,
            server,
            stream,
        }
    }
}

#[tokio::test]
async fn a_slow_reader_of_a_large_response_holds_no_upstream_connection() {
    let SlowRead {
        backend,
        proxy,
        spill,
        server,
        mut stream,
    } = SlowRead::start().await;
    // The client reads nothing: the backend's whole response is in kaproxy (its 64 KiB of
    // memory and the rest on disk) and the upstream connection is back in the pool.
    let (m, pooled) = proxy
        .wait_metrics(SLACK, |m| {
            m.sum(POOL_IDLE, &[("server", &server)]) == 1.0 && held(m, &server) == 0.0
        })
        .await;
    assert!(
        pooled,
        "pooled while the client has read nothing\n{}",
        report(&m)
    );
    assert!(buffered(&m, "disk") > 8.0 * MIB as f64, "{}", report(&m));
    assert!(buffered(&m, "memory") <= 64.0 * 1024.0, "{}", report(&m));
    assert_eq!(
        m.sum(SPILLED, &[("direction", "response")]),
        1.0,
        "{}",
        report(&m)
    );
    normal_get(&proxy, "while a slow reader holds a large response").await;
    assert_eq!(backend.requests(), 2);
    assert_eq!(
        proxy.metrics().sum(OPENED_TOTAL, &[("server", &server)]),
        1.0,
        "the normal GET reused the connection the large response gave back"
    );
    // Now the client reads, a little at a time at first, then all of it: intact.
    let (len, intact) = read_bulk(&mut stream, 5, Duration::from_secs(30)).await;
    assert_eq!(len, BODY);
    assert!(intact, "every byte as the backend sent it");
    drop(stream);
    assert_buffers_released(&proxy, spill.path(), "after the slow reader").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_reads_a_buffered_response_is_cut_and_its_file_closed() {
    let SlowRead {
        backend: _backend,
        proxy,
        spill,
        server,
        stream,
    } = SlowRead::start().await;
    let started = Instant::now();
    let (m, pooled) = proxy
        .wait_metrics(SLACK, |m| {
            held(m, &server) == 0.0 && buffered(m, "disk") > 0.0
        })
        .await;
    assert!(pooled, "{}", report(&m));
    // send_timeout (2 s) without progress: kaproxy closes the client connection, and the
    // relay's memory and file go with it.
    let (m, freed) = proxy
        .wait_metrics(Duration::from_secs(2) + SLACK, |m| {
            buffered(m, "disk") == 0.0 && buffered(m, "memory") == 0.0
        })
        .await;
    assert!(freed, "freed after send_timeout\n{}", report(&m));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not before send_timeout"
    );
    assert_eq!(
        m.sum(CLOSED_TOTAL, &[("server", &server), ("reason", "error")]),
        0.0,
        "the upstream connection was not the client's to lose\n{}",
        report(&m)
    );
    assert_buffers_released(&proxy, spill.path(), "after the cut").await;
    drop(stream);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_http2_stream_with_a_closed_window_holds_no_upstream_connection_and_is_cut() {
    let backend = BulkBackend::start("bulk").await;
    let (proxy, spill) = start(backend.addr(), "", "").await;
    let server = backend.addr().to_string();
    let mut stream =
        ZeroWindowStream::get(&proxy.https(&["h2"]), &format!("/bytes/{}", 4 * MIB)).await;
    assert_eq!(stream.status, 200);
    let (m, pooled) = proxy
        .wait_metrics(SLACK, |m| {
            m.sum(POOL_IDLE, &[("server", &server)]) == 1.0 && held(m, &server) == 0.0
        })
        .await;
    assert!(
        pooled,
        "the backend's 4 MiB are in kaproxy and its connection pooled while the stream's \
         window stays shut\n{}",
        report(&m)
    );
    normal_get(&proxy, "while an HTTP/2 stream's window stays shut").await;
    // send_timeout (2 s): the stream is cut, and its relay's memory and file freed.
    let end = stream.end(Duration::from_secs(2) + SLACK).await;
    assert!(matches!(end, StreamEnd::Reset(_)), "{end:?}");
    assert_buffers_released(&proxy, spill.path(), "after the closed window").await;
    assert_eq!(
        proxy
            .metrics()
            .sum(CLOSED_TOTAL, &[("server", &server), ("reason", "error")]),
        0.0,
        "no upstream connection lost for the client's stall"
    );
    drop(stream);
    proxy.shutdown().await;
}

/// A backend whose `GET /{kind}` answers with a chunked body of `count` chunks, each sent when
/// the test adds a permit to `gate` (all at once with enough permits): kind `events` is
/// `text/event-stream`, `accel` carries `X-Accel-Buffering: no`, `plain` is neither.
async fn streaming_backend(gate: Arc<Semaphore>, count: usize, size: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let gate = gate.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let gate = gate.clone();
                    async move {
                        let (tx, rx) =
                            mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
                        tokio::spawn(async move {
                            for i in 0..count {
                                let Ok(permit) = gate.acquire().await else {
                                    return;
                                };
                                permit.forget();
                                let mut event = format!("data: {i}\n\n").into_bytes();
                                event.resize(size.max(event.len()), b' ');
                                if tx
                                    .send(Ok(http_body::Frame::data(Bytes::from(event))))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        });
                        let builder = http::Response::builder().status(200);
                        let builder = match req.uri().path() {
                            "/events" => builder.header("content-type", "text/event-stream"),
                            "/accel" => builder.header("x-accel-buffering", "no"),
                            _ => builder.header("content-type", "application/octet-stream"),
                        };
                        let body = StreamBody::new(tokio_stream_of(rx));
                        Ok::<_, std::convert::Infallible>(builder.body(body).expect("response"))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An mpsc receiver as a `Stream`.
fn tokio_stream_of<T>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Reads from `stream` until `needle` has arrived (within `bound`).
async fn read_until(
    stream: &mut TcpStream,
    got: &mut Vec<u8>,
    needle: &str,
    bound: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    let mut buf = vec![0u8; 64 * 1024];
    while !String::from_utf8_lossy(got).contains(needle) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn event_streams_pass_through_event_by_event_and_are_never_buffered() {
    for (path, what) in [
        ("/events", "text/event-stream"),
        ("/accel", "X-Accel-Buffering: no"),
    ] {
        let gate = Arc::new(Semaphore::new(0));
        let backend = streaming_backend(gate.clone(), 3, 0).await;
        let (proxy, _spill) = start(backend, "", "").await;
        let mut stream = TcpStream::connect(proxy.server.http_addr().unwrap())
            .await
            .unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        // Each event is sent only once the previous one reached the client.
        for i in 0..3 {
            gate.add_permits(1);
            assert!(
                read_until(&mut stream, &mut got, &format!("data: {i}\n\n"), RAW_BOUND).await,
                "{what}: event {i} reached the client before the next was sent: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        let text = String::from_utf8_lossy(&got).to_lowercase();
        assert!(
            !text.contains("x-accel-buffering"),
            "{what}: not forwarded (as nginx): {text}"
        );
        proxy.shutdown().await;
    }

    // A client that does not read: an event stream is held back (nothing buffered, the
    // backend waits), while a plain chunked response of the same shape is taken in whole.
    for (path, spills) in [("/events", false), ("/accel", false), ("/plain", true)] {
        let gate = Arc::new(Semaphore::new(1000));
        let backend = streaming_backend(gate.clone(), 400, 16 * 1024).await;
        let (proxy, _spill) = start(backend, "", "").await;
        let mut stream = connect_small_rcvbuf(proxy.server.http_addr().unwrap()).await;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (m, spilled) = proxy
            .wait_metrics(Duration::from_secs(2), |m| {
                m.sum(SPILLED, &[("direction", "response")]) > 0.0
            })
            .await;
        assert_eq!(
            spilled,
            spills,
            "{path}: spilled to disk: {spilled}\n{}",
            report(&m)
        );
        if !spills {
            assert_eq!(
                buffered(&m, "memory") + buffered(&m, "disk"),
                0.0,
                "{}",
                report(&m)
            );
        }
        drop(stream);
        proxy.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// The memory budget under many HTTP/2 streams
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn many_stalled_http2_uploads_stay_within_the_memory_budget() {
    const STREAMS: usize = 100;
    const SENT: usize = 60_000;
    const LIMIT: usize = 2 * MIB;
    let backend = RecordingBackend::start("up", &[]).await;
    // Uploads that stall for longer than it takes to open them all.
    let downstream = "[downstream]\nbody_timeout = \"10s\"\n";
    let (proxy, spill) = start_in(
        downstream,
        backend.addr(),
        "",
        &format!("memory_limit = {LIMIT}"),
    )
    .await;
    let endpoint = proxy.https(&["h2"]);
    let (tls, _) = tls_connect(endpoint.addr, endpoint.tls.clone().unwrap(), None)
        .await
        .expect("tls");
    let (sender, conn) = h2::client::Builder::new()
        .initial_connection_window_size(8 * MIB as u32)
        .handshake::<_, Bytes>(tls)
        .await
        .expect("h2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut bodies = Vec::new();
    let mut sender = sender;
    for i in 0..STREAMS {
        sender = sender.ready().await.expect("h2 ready");
        // Half announce a large body (it goes to disk from its first byte, as nginx's does past
        // client_body_buffer_size); half announce nothing and are kept in memory while the
        // budget lasts.
        let mut req = http::Request::post(format!("https://{TLS_SERVER_NAME}/up/{i}"));
        if i % 2 == 0 {
            req = req.header("content-length", "1000000");
        }
        let req = req.body(()).unwrap();
        let (resp, body) = sender.send_request(req, false).expect("send");
        bodies.push((body, resp));
    }
    // 60 000 bytes on each stream, then nothing more (the stalled uploads of the attack).
    let data = Bytes::from(vec![b'u'; SENT]);
    for (body, resp) in &mut bodies {
        body.reserve_capacity(SENT);
        let mut left = data.clone();
        while !left.is_empty() {
            let cap = match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                Some(Ok(cap)) => cap,
                other => panic!(
                    "no send capacity: {other:?}; response {:?}\n{}",
                    tokio::time::timeout(RAW_BOUND, resp).await,
                    report(&proxy.metrics())
                ),
            };
            let n = cap.min(left.len());
            body.send_data(left.split_to(n), false).expect("send data");
        }
    }
    let total = (STREAMS * SENT) as f64;
    let (m, held_all) = proxy
        .wait_metrics(SLACK, |m| {
            buffered(m, "memory") + buffered(m, "disk") >= total
        })
        .await;
    assert!(
        held_all,
        "every stream's bytes are in kaproxy\n{}",
        report(&m)
    );
    assert!(
        buffered(&m, "memory") <= LIMIT as f64,
        "memory within memory_limit\n{}",
        report(&m)
    );
    assert!(
        buffered(&m, "memory") >= (LIMIT / 2) as f64,
        "the budget was used before the disk\n{}",
        report(&m)
    );
    // At most LIMIT / SENT whole bodies fit in memory: every other stream is on disk.
    assert!(
        m.sum(SPILLED, &[("direction", "request")]) >= (STREAMS - LIMIT / SENT) as f64,
        "the announced-large streams and those past the budget went to disk\n{}",
        report(&m)
    );
    normal_get(&proxy, "while 100 HTTP/2 uploads stall").await;
    assert!(backend.requests().iter().all(|r| r.uri.path() == "/normal"));
    drop(bodies);
    drop(sender);
    conn.abort();
    assert_buffers_released(&proxy, spill.path(), "after the stalled HTTP/2 uploads").await;
    proxy.shutdown().await;
}
