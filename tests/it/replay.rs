//! The replay rule for a request the backend never received (README, "When a request is sent
//! again"): a POST on a reused connection that the backend's TCP stack reset without
//! acknowledging any of its bytes is sent again on a fresh connection; one whose bytes were
//! acknowledged is not, whatever happened after. Both sides, against a raw backend that sends
//! no `Keep-Alive` header and ends idle connections one of two ways.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::client::{KeepAliveClient, Request};
use crate::support::proxy::{test_config, RETRIES_TOTAL};

/// How long a connection of the backend idles before its end comes.
const BACKEND_IDLE: Duration = Duration::from_millis(300);

/// How the raw backend ends a connection idle past [`BACKEND_IDLE`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Forgets it without a FIN or a reset (Linux `TCP_REPAIR` mode, as CRIU detaches a
    /// connection): what a proxy sees when the backend's FIN is still on its way, or lost. The
    /// next bytes kaproxy sends meet a reset from a port with no such connection, and are never
    /// acknowledged.
    Vanish,
    /// Keeps it; the first request that comes after the idle time is read whole (so its bytes
    /// are acknowledged) and the connection then closed without an answer.
    ReadThenClose,
}

/// A keep-alive HTTP/1.1 backend with no `Keep-Alive` header, counting the POSTs it read.
struct RawBackend {
    addr: SocketAddr,
    posts: Arc<AtomicUsize>,
    vanished: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawBackend {
    async fn start(ending: Ending) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let posts = Arc::new(AtomicUsize::new(0));
        let vanished = Arc::new(AtomicUsize::new(0));
        let (p, v) = (posts.clone(), vanished.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(conn, ending, p.clone(), v.clone()));
            }
        });
        RawBackend {
            addr,
            posts,
            vanished,
            task,
        }
    }
}

/// Reads one request (head and `Content-Length` body); None at end of stream.
async fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(bool, usize)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..head_end + len);
    Some((head.starts_with("post "), len))
}

async fn serve(
    mut conn: TcpStream,
    ending: Ending,
    posts: Arc<AtomicUsize>,
    vanished: Arc<AtomicUsize>,
) {
    let mut buf = Vec::new();
    let mut served = 0;
    loop {
        let next = read_request(&mut conn, &mut buf);
        let request = if served > 0 && ending == Ending::Vanish {
            match tokio::time::timeout(BACKEND_IDLE, next).await {
                Ok(request) => request,
                Err(_) => {
                    vanish(conn);
                    vanished.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        } else {
            let started = tokio::time::Instant::now();
            let request = next.await;
            if served > 0 && started.elapsed() >= BACKEND_IDLE {
                if let Some((true, _)) = request {
                    posts.fetch_add(1, Ordering::SeqCst);
                }
                return; // read whole, closed unanswered (FIN)
            }
            request
        };
        let Some((post, _len)) = request else {
            return;
        };
        if post {
            posts.fetch_add(1, Ordering::SeqCst);
        }
        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
        if conn.write_all(reply).await.is_err() {
            return;
        }
        served += 1;
    }
}

/// Closes the socket without a FIN or a reset: in `TCP_REPAIR` mode Linux drops a connection
/// silently on close. Needs CAP_NET_ADMIN, which [`repair_allowed`] checks first.
#[allow(unsafe_code)]
fn vanish(conn: TcpStream) {
    let conn = conn.into_std().unwrap();
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_REPAIR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_REPAIR: {}", std::io::Error::last_os_error());
    drop(conn);
}

/// Whether this process may put a socket in `TCP_REPAIR` mode (CAP_NET_ADMIN; CI runs as root).
/// Without it the test is skipped loudly, or fails where `KAPROXY_REQUIRE_APACHE=1` says this
/// is CI.
fn repair_allowed() -> bool {
    let allowed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let caps = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&caps, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 12) != 0); // CAP_NET_ADMIN
    if !allowed {
        assert_ne!(
            std::env::var(kaproxy_testkit::apache::REQUIRE_APACHE_ENV).as_deref(),
            Ok("1"),
            "this is CI, but the process lacks CAP_NET_ADMIN for TCP_REPAIR"
        );
        eprintln!("SKIPPED: no CAP_NET_ADMIN, so no backend can vanish silently (TCP_REPAIR)");
    }
    allowed
}

async fn proxy_for(backend: &RawBackend) -> crate::support::proxy::TestProxy {
    // kaproxy's defaults, told nothing of the backend: it trusts an idle connection 4 s.
    test_config(&format!(
        "[upstreams.web]\nservers = [\"{}\"]\n",
        backend.addr
    ))
    .start()
    .await
}

/// Two POSTs: the first connection becomes the pool's probe of the backend's timeout (it sends
/// no header) and is never reused; the second, sent more than kaproxy's default
/// `safety_margin` (500 ms) after it so that the pool trusts it while the probe runs (README,
/// "Where a deadline comes from"), is the pooled one the test's request reuses.
async fn warm_up(client: &mut KeepAliveClient) {
    let resp = client.send(&post()).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let resp = client.send(&post()).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
}

fn post() -> Request {
    Request::post("/pay", Bytes::from_static(b"amount=10"))
}

#[tokio::test]
async fn a_post_the_backend_never_received_is_replayed_on_a_fresh_connection() {
    if !repair_allowed() {
        return;
    }
    let backend = RawBackend::start(Ending::Vanish).await;
    let proxy = proxy_for(&backend).await;
    let mut client = KeepAliveClient::new(proxy.http(), None);
    warm_up(&mut client).await;
    // The backend forgets both connections; kaproxy sees nothing and reuses the pooled one.
    kaproxy_testkit::eventually(
        "the backend to drop the idle connections",
        Duration::from_secs(5),
        || backend.vanished.load(Ordering::SeqCst) == 2,
    )
    .await;
    let second = client.send(&post()).await.unwrap();
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    let m = proxy.metrics();
    assert_eq!(
        m.sum(RETRIES_TOTAL, &[("cause", "unacknowledged")]),
        1.0,
        "{}",
        m.lines_of(RETRIES_TOTAL)
    );
    assert_eq!(m.sum("kaproxy_upstream_connections_reused_total", &[]), 1.0);
    assert_eq!(
        backend.posts.load(Ordering::SeqCst),
        3,
        "each POST reached the backend's application once"
    );
}

#[tokio::test]
async fn a_post_the_backend_acknowledged_is_not_replayed() {
    let backend = RawBackend::start(Ending::ReadThenClose).await;
    let proxy = proxy_for(&backend).await;
    let mut client = KeepAliveClient::new(proxy.http(), None);
    warm_up(&mut client).await;
    // The backend takes the next request only after BACKEND_IDLE; this pause makes it so.
    tokio::time::sleep(BACKEND_IDLE + Duration::from_millis(100)).await;
    let second = client.send(&post()).await.unwrap();
    assert_eq!(
        second.status,
        StatusCode::BAD_GATEWAY,
        "acknowledged, so maybe processed: not sent again"
    );
    let m = proxy.metrics();
    assert_eq!(
        m.sum(RETRIES_TOTAL, &[]),
        0.0,
        "{}",
        m.lines_of(RETRIES_TOTAL)
    );
    assert_eq!(
        backend.posts.load(Ordering::SeqCst),
        3,
        "the last POST reached the backend once, and only once"
    );
}
