//! The downstream connection cap (`[downstream] max_connections`) and running out of file
//! descriptors: at the cap kaproxy closes the longest-idle parked keep-alive connection to
//! make room for a new client; with none idle it stops accepting until a slot frees, without
//! spinning; and when accept fails with EMFILE, the real binary's accept loops (downstream and
//! admin) back off instead of burning a CPU, and serve again once descriptors free up.

use std::net::SocketAddr;
use std::time::Duration;

use kaproxy_testkit::poll_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::backend::RecordingBackend;
use crate::support::binary::Binary;
use crate::support::config_file::ConfigFile;
use crate::support::proxy::{Metrics, TestProxy};

/// Bound on every positive wait in this file.
const BOUND: Duration = Duration::from_secs(10);
/// kaproxy parks a connection idle for 1 s (`downstream::PARK_AFTER`); this bounds the wait.
const PARK_WITHIN: Duration = Duration::from_secs(5);
const WAITING: &str = "kaproxy_downstream_connections_waiting";
const OPEN: &str = "kaproxy_downstream_connections";
const SHED: &str = "kaproxy_downstream_connections_shed_total";

fn http(m: &Metrics, name: &str) -> f64 {
    m.sum(name, &[("listener", "http")])
}

async fn proxy_with_cap(backend: SocketAddr, max_connections: usize) -> TestProxy {
    TestProxy::start(&format!(
        "[downstream]\nmax_connections = {max_connections}\n\n\
         [upstreams.web]\nservers = [\"{backend}\"]\n"
    ))
    .await
}

/// Reads one response (head and `Content-Length` body) from `stream`; its status line.
async fn read_response(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let length: usize = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .map(|v| v.parse().expect("a number"))
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Ok(head.lines().next().unwrap_or_default().to_string());
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One keep-alive GET on `stream`, bounded; its status line.
async fn get(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: flood.test\r\n\r\n").as_bytes())
        .await
        .expect("write request");
    tokio::time::timeout(BOUND, read_response(stream))
        .await
        .unwrap_or_else(|_| panic!("no response to {path} within {BOUND:?}"))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Waits (bounded) until kaproxy closes `stream`: read returns EOF.
async fn closed_by_kaproxy(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// CPU time (user + system) of this thread so far: under a current-thread runtime, that is
/// everything kaproxy (in-process) and the test do.
fn thread_cpu() -> Duration {
    cpu_of("/proc/thread-self/stat")
}

/// utime + stime of a /proc/.../stat file.
fn cpu_of(stat: &str) -> Duration {
    let text = std::fs::read_to_string(stat).unwrap_or_else(|e| panic!("read {stat}: {e}"));
    // Fields after the command (which may contain spaces) start after the last ')'.
    let after = &text[text.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based); `after` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_longest_idle_keep_alive_connection_makes_room() {
    const CAP: usize = 20;
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_with_cap(backend.addr(), CAP).await;
    let addr = proxy.server.http_addr().unwrap();

    // CAP keep-alive connections, each served once, one after the other: the first is the
    // longest idle.
    let mut idle = Vec::new();
    for i in 0..CAP {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let status = get(&mut s, &format!("/idle/{i}")).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        idle.push(s);
    }
    let (m, parked) = proxy
        .wait_metrics(PARK_WITHIN, |m| http(m, WAITING) == CAP as f64)
        .await;
    assert!(parked, "all {CAP} parked: {}", m.lines_of(WAITING));
    assert_eq!(http(&m, SHED), 0.0, "{}", m.lines_of(SHED));

    // One more client: served promptly, the longest-idle connection closed for it.
    let started = Instant::now();
    let mut newcomer = TcpStream::connect(addr).await.expect("connect");
    let status = get(&mut newcomer, "/newcomer").await;
    let took = started.elapsed();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        took < Duration::from_secs(2),
        "the client over the cap waited {took:?}"
    );
    assert!(
        closed_by_kaproxy(&mut idle[0], BOUND).await,
        "the longest-idle connection was closed to make room"
    );
    let m = proxy.metrics();
    assert_eq!(http(&m, SHED), 1.0, "one shed: {}", m.lines_of(SHED));
    assert!(http(&m, OPEN) <= CAP as f64, "{}", m.lines_of(OPEN));

    // The most recently idle one is still open and serves.
    let status = get(&mut idle[CAP - 1], "/still-open").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    proxy.shutdown().await;
}

/// Current-thread runtime: the thread's CPU time is kaproxy's, for the no-spin check.
#[tokio::test]
async fn at_the_cap_with_none_idle_the_next_client_waits_for_a_slot_without_spinning() {
    const CAP: usize = 5;
    let backend = RecordingBackend::start("up", &[]).await;
    let proxy = proxy_with_cap(backend.addr(), CAP).await;
    let addr = proxy.server.http_addr().unwrap();

    // CAP connections mid-request: each has sent part of a request head.
    let mut busy = Vec::new();
    for i in 0..CAP {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET /busy/{i} HTTP/1.1\r\nHost: flood.test\r\n").as_bytes())
            .await
            .unwrap();
        busy.push(s);
    }
    let (m, ready) = proxy
        .wait_metrics(BOUND, |m| {
            http(m, OPEN) == CAP as f64 && http(m, WAITING) == 0.0
        })
        .await;
    assert!(ready, "{}\n{}", m.lines_of(OPEN), m.lines_of(WAITING));

    // A sixth client: accepted by the kernel, not served while every slot is busy.
    let mut sixth = TcpStream::connect(addr).await.expect("connect");
    sixth
        .write_all(b"GET /sixth HTTP/1.1\r\nHost: flood.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let cpu_before = thread_cpu();
    let window = Duration::from_millis(700);
    let early = tokio::time::timeout(window, read_response(&mut sixth)).await;
    let cpu = thread_cpu() - cpu_before;
    assert!(early.is_err(), "served over the cap: {early:?}");
    assert!(
        cpu < Duration::from_millis(200),
        "{cpu:?} of CPU in {window:?}: spinning"
    );
    let m = proxy.metrics();
    assert_eq!(http(&m, OPEN), CAP as f64, "{}", m.lines_of(OPEN));

    // One busy connection finishes (and closes): the sixth is served (and closes too, so
    // that every slot is busy again).
    busy[0]
        .write_all(b"Connection: close\r\n\r\n")
        .await
        .unwrap();
    let status = tokio::time::timeout(BOUND, read_response(&mut busy[0]))
        .await
        .expect("bounded")
        .expect("the finished request's response");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let status = tokio::time::timeout(BOUND, read_response(&mut sixth))
        .await
        .expect("the sixth client is served once a slot frees")
        .expect("response");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    // Every slot busy again (the sixth has closed, busy[0] too): one more mid-request.
    let mut filler = TcpStream::connect(addr).await.expect("connect");
    filler
        .write_all(b"GET /filler HTTP/1.1\r\nHost: flood.test\r\n")
        .await
        .unwrap();
    let (m, ready) = proxy
        .wait_metrics(BOUND, |m| {
            http(m, OPEN) == CAP as f64 && http(m, WAITING) == 0.0
        })
        .await;
    assert!(ready, "{}\n{}", m.lines_of(OPEN), m.lines_of(WAITING));

    // A seventh waits too; another busy one finishes but keeps its connection: once that
    // connection goes idle (parked), it is closed to make room.
    let mut seventh = TcpStream::connect(addr).await.expect("connect");
    seventh
        .write_all(b"GET /seventh HTTP/1.1\r\nHost: flood.test\r\n\r\n")
        .await
        .unwrap();
    busy[1].write_all(b"\r\n").await.unwrap();
    let status = tokio::time::timeout(BOUND, read_response(&mut busy[1]))
        .await
        .expect("bounded")
        .expect("response");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let status = tokio::time::timeout(BOUND, read_response(&mut seventh))
        .await
        .expect("the seventh client is served once a keep-alive connection goes idle")
        .expect("response");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        closed_by_kaproxy(&mut busy[1], BOUND).await,
        "the connection that went idle at the cap was closed"
    );
    assert_eq!(http(&proxy.metrics(), SHED), 1.0);
    proxy.shutdown().await;
}

/// The CPU time the binary has used.
fn cpu(kaproxy: &Binary) -> Duration {
    cpu_of(&format!("/proc/{}/stat", kaproxy.pid()))
}

/// A plain GET on a fresh connection, bounded by `within`; the status line or an error.
async fn fresh_get(addr: SocketAddr, path: &str, within: Duration) -> Result<String, String> {
    tokio::time::timeout(within, async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: flood.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        read_response(&mut s).await.map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| format!("no response within {within:?}"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_binary_backs_off_instead_of_spinning() {
    const NOFILE: u32 = 64;
    let backend = RecordingBackend::start("up", &[]).await;
    let file = ConfigFile::new();
    file.write(&file.text_with(
        "http = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"",
        "format = \"json\"\naccess_log = false\nlevel = \"info\"",
        &format!(
            "[runtime]\nworker_threads = 2\n\n\
             [downstream]\nmax_connections = 1000\nheader_timeout = \"60s\"\n\
             idle_timeout = \"60s\"\n\n\
             [upstreams.web]\nservers = [\"{}\"]\n",
            backend.addr()
        ),
    ));
    file.load();
    let mut kaproxy = Binary::spawn_limited(NOFILE, &file.path, &file.file("kaproxy.log"));
    let http_addr = kaproxy.addr("listening", Some("http")).await;
    let admin_addr = kaproxy.addr("admin listening", None).await;
    let status = fresh_get(http_addr, "/before", BOUND)
        .await
        .expect("served");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    // More silent clients than descriptors are left: kaproxy accepts until EMFILE, the rest
    // wait in the backlog.
    let spare = (NOFILE as usize).saturating_sub(kaproxy.open_fds());
    let mut clients = Vec::new();
    for _ in 0..spare + 16 {
        clients.push(TcpStream::connect(http_addr).await.expect("connect"));
    }
    let ran_out = poll_until(BOUND, async || {
        !kaproxy.messages("accept failing").is_empty()
    })
    .await;
    assert!(
        ran_out,
        "kaproxy never ran out of descriptors ({} open):\n{}",
        kaproxy.open_fds(),
        kaproxy.log()
    );
    // The admin listener's accept fails too.
    let _admin_client = TcpStream::connect(admin_addr).await.expect("connect admin");

    let window = Duration::from_secs(2);
    let before = cpu(&kaproxy);
    tokio::time::sleep(window).await;
    let cpu = cpu(&kaproxy) - before;
    assert!(
        cpu < Duration::from_millis(500),
        "kaproxy used {cpu:?} of CPU in {window:?} out of descriptors: an accept loop spins\n{}",
        kaproxy.log()
    );
    let failing = kaproxy.messages("accept failing");
    eprintln!(
        "out of descriptors: {cpu:?} CPU in {window:?}, {} open fds, {} 'accept failing' lines",
        kaproxy.open_fds(),
        failing.len()
    );
    assert!(
        failing.len() <= 4,
        "accept failures are logged at most once per 5 s per listener, got {} lines:\n{}",
        failing.len(),
        kaproxy.log()
    );

    // The clients leave: kaproxy serves again, on both listeners.
    drop(clients);
    drop(_admin_client);
    let mut last = Err("no request sent".to_string());
    let served = poll_until(BOUND, async || {
        last = fresh_get(http_addr, "/after", Duration::from_secs(2)).await;
        last.as_ref().is_ok_and(|s| s.starts_with("HTTP/1.1 200"))
    })
    .await;
    assert!(
        served,
        "no successful request within {BOUND:?} after the clients left: {last:?}\n{}",
        kaproxy.log()
    );
    let metrics = fresh_get(admin_addr, "/healthz", BOUND)
        .await
        .expect("the admin listener serves again");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");

    let pid = kaproxy.pid();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = tokio::time::timeout(BOUND, kaproxy.child.wait()).await;
}
