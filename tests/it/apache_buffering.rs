//! Buffering against real Apache httpd 2.4 (README, "Buffering"): 200 MiB up and 200 MiB down
//! pass intact while the kaproxy binary's memory stays far below the body size, and slow
//! clients (uploaders and readers of bodies far larger than the socket buffers) hold no Apache
//! worker — Apache prefork with 4 workers answers every legitimate request within 1 s while 12
//! slow clients trickle, where the same test with streaming bodies does not.

use std::net::SocketAddr;
use std::time::Duration;

use kaproxy_testkit::apache::{
    file_digest, fill_file_content, require_apache, Apache, ApacheOptions, Digest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::binary::Binary;
use crate::support::config_file::ConfigFile;
use crate::support::hostile::{connect_small_rcvbuf, raw_exchange};
use crate::support::proxy::{Metrics, TestProxy};

const MIB: u64 = 1024 * 1024;
/// Pool settings that obey the rule for Apache's KeepAliveTimeout 1 s.
const POOL_FOR_KEEPALIVE_1S: &str =
    "keepalive_timeout = \"1s\"\nsafety_margin = \"300ms\"\nidle_timeout = \"600ms\"";

/// Reads one HTTP/1.1 response with a `Content-Length` body from `stream`, digesting the body
/// as it arrives (it is never kept); returns the status line, the body's digest and length.
async fn digest_response(stream: &mut TcpStream, bound: Duration) -> (String, Digest) {
    let deadline = Instant::now() + bound;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let mut digest = Digest::new();
    let (status, length) = loop {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("response head in time")
            .expect("read");
        assert!(n > 0, "closed before the response head");
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..end]).to_string();
            let length: u64 = text
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or_else(|| panic!("no Content-Length: {text}"));
            digest.update(&head[end + 4..]);
            break (text.lines().next().unwrap_or_default().to_string(), length);
        }
    };
    while digest.len() < length {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the body in time")
            .expect("read");
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    (status, digest)
}

/// Writes `len` bytes of the testkit file content as a request body.
async fn write_content(stream: &mut TcpStream, len: u64) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(buf.len() as u64) as usize;
        fill_file_content(offset, &mut buf[..n]);
        stream.write_all(&buf[..n]).await.expect("write body");
        offset += n as u64;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_mib_each_way_pass_through_apache_intact_with_little_memory() {
    if !require_apache() {
        return;
    }
    const SIZE: u64 = 200 * MIB;
    /// Far below the body: kaproxy's own footprint plus its 128 MiB budget is never reached,
    /// since one body holds at most its 64 KiB share of memory.
    const PEAK_BOUND: u64 = 64 * MIB;
    let apache = Apache::start(ApacheOptions::new("big").file("big.bin", SIZE))
        .await
        .expect("start apache");
    let files = ConfigFile::new();
    let spill = files.file("spill");
    std::fs::create_dir(&spill).expect("spill dir");
    let (mut kaproxy, addr, admin) = Binary::start(
        &files,
        &format!(
            "[upstreams.web]\nservers = [\"{}\"]\n{POOL_FOR_KEEPALIVE_1S}\n\
                 [buffering]\ntemp_dir = {:?}\n",
            apache.addr(),
            spill.display().to_string()
        ),
    )
    .await;
    let expected = file_digest(SIZE);

    // Up: 200 MiB posted to mod_reflector, which echoes it back.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    write_content(&mut stream, SIZE).await;
    let (status, echoed) = digest_response(&mut stream, Duration::from_secs(120)).await;
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "{status}\n{}",
        apache.error_log()
    );
    assert_eq!(echoed.len(), SIZE, "the whole upload came back");
    assert_eq!(echoed.finish(), expected, "intact both ways");

    // Down: a 200 MiB file.
    stream
        .write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, downloaded) = digest_response(&mut stream, Duration::from_secs(120)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(downloaded.len(), SIZE);
    assert_eq!(downloaded.finish(), expected, "the download is intact");
    drop(stream);

    let peak = kaproxy.peak_rss();
    assert!(
        peak < PEAK_BOUND,
        "kaproxy's peak RSS {} MiB for 200 MiB bodies (bound {} MiB)",
        peak / MIB,
        PEAK_BOUND / MIB
    );
    let metrics = raw_exchange(admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let m = Metrics(metrics.body_text());
    assert_eq!(
        m.sum("kaproxy_body_spilled_total", &[("direction", "request")]),
        1.0,
        "the upload went to disk"
    );
    let mut released = false;
    for _ in 0..50 {
        if kaproxy.open_files_in(&spill).is_empty() {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        released,
        "temporary files closed: {:?}",
        kaproxy.open_files_in(&spill)
    );
    let left: Vec<_> = std::fs::read_dir(&spill).unwrap().collect();
    assert!(left.is_empty(), "nothing left in temp_dir: {left:?}");
    eprintln!("200 MiB up and down; kaproxy peak RSS {} MiB", peak / MIB);
    let _ = kaproxy.child.kill().await;
}

/// What the legitimate client saw while the slow clients trickled.
#[derive(Debug, Default)]
struct Legit {
    sent: usize,
    answered_within_1s: usize,
    slowest: Duration,
}

/// For `duration`: 6 slow uploaders (4 MiB announced, 256 KiB at once, then 1 byte every
/// 300 ms) and 6 slow readers (an 8 MiB file through a 4 KiB receive buffer, 4 KiB every
/// 300 ms) against `addr`, and a legitimate `GET /` on a fresh connection every 250 ms with a
/// 1 s deadline.
async fn slow_clients_beside_a_legit_one(addr: SocketAddr, duration: Duration) -> Legit {
    let until = Instant::now() + duration;
    let mut slow = Vec::new();
    for i in 0..6 {
        slow.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return;
            };
            let head = format!(
                "POST /upload/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                4 * MIB
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&vec![b'u'; 256 * 1024]).await;
            while Instant::now() < until {
                if s.write_all(b"u").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
        slow.push(tokio::spawn(async move {
            let mut s = connect_small_rcvbuf(addr).await;
            let _ = s
                .write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let mut buf = vec![0u8; 4096];
            while Instant::now() < until {
                if matches!(s.read(&mut buf).await, Ok(0) | Err(_)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    // Let the slow clients take their places first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut legit = Legit::default();
    while Instant::now() + Duration::from_secs(1) < until {
        let started = Instant::now();
        legit.sent += 1;
        let answered = tokio::time::timeout(Duration::from_secs(1), async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.ok()?;
            String::from_utf8_lossy(&got)
                .starts_with("HTTP/1.1 200")
                .then_some(())
        })
        .await;
        let took = started.elapsed();
        legit.slowest = legit.slowest.max(took);
        if matches!(answered, Ok(Some(()))) {
            legit.answered_within_1s += 1;
        }
        if let Some(rest) = Duration::from_millis(250).checked_sub(took) {
            tokio::time::sleep(rest).await;
        }
    }
    for task in slow {
        task.abort();
    }
    legit
}

async fn prefork_behind(buffering: &str) -> (Apache, TestProxy) {
    let apache = Apache::start(
        ApacheOptions::new("prefork")
            .prefork(4)
            .file("big.bin", 8 * MIB),
    )
    .await
    .expect("start apache");
    let proxy = TestProxy::start(&format!(
        "[downstream]\nbody_timeout = \"10s\"\nsend_timeout = \"10s\"\n\
         [upstreams.web]\nservers = [\"{}\"]\n{POOL_FOR_KEEPALIVE_1S}\n{buffering}\n",
        apache.addr()
    ))
    .await;
    (apache, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_hold_no_apache_worker_and_the_same_clients_do_when_bodies_stream() {
    if !require_apache() {
        return;
    }
    const DURATION: Duration = Duration::from_secs(5);
    let (apache, proxy) = prefork_behind("").await;
    let legit = slow_clients_beside_a_legit_one(proxy.server.http_addr().unwrap(), DURATION).await;
    assert!(legit.sent >= 10, "{legit:?}");
    assert_eq!(
        legit.answered_within_1s,
        legit.sent,
        "with buffering every legitimate request is answered within 1 s while 6 slow \
         uploaders and 6 slow readers trickle against Apache's 4 prefork workers: {legit:?}\n{}",
        apache.error_log()
    );
    let m = proxy.metrics();
    assert!(
        m.sum("kaproxy_body_spilled_total", &[("direction", "response")]) >= 6.0,
        "the slow readers' responses went to disk: {}",
        m.lines_of("kaproxy_body_")
    );
    proxy.shutdown().await;
    drop(apache);

    // The control: the same clients, bodies streaming (nginx's proxy_request_buffering off
    // and proxy_buffering off): the slow clients take every Apache worker.
    let (apache, proxy) =
        prefork_behind("request_buffering = false\nresponse_buffering = false").await;
    let streamed =
        slow_clients_beside_a_legit_one(proxy.server.http_addr().unwrap(), DURATION).await;
    assert!(
        streamed.answered_within_1s < streamed.sent / 2,
        "with streaming bodies the slow clients hold Apache's workers, so most legitimate \
         requests wait: {streamed:?} (buffered: {legit:?})"
    );
    eprintln!("buffered: {legit:?}; streamed: {streamed:?}");
    proxy.shutdown().await;
    drop(apache);
}
