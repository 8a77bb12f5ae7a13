//! PROXY protocol on a raw socket: a v1 or v2 header's source address becomes the client
//! (X-Forwarded-For, ip_hash); a missing, garbage or malformed header closes the connection
//! before anything reaches a backend.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use kaproxy_testkit::demo::DemoBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::ops::demo_backend;
use crate::support::config_file::ConfigFile;

/// Bound on every raw exchange.
const READ_BOUND: Duration = Duration::from_secs(5);
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n";

/// How a raw exchange ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Clean EOF.
    Eof,
    /// Reset or another I/O error.
    Error(std::io::ErrorKind),
    /// Nothing more within [`READ_BOUND`].
    Timeout,
}

/// Sends `bytes` on a fresh connection to `addr` and reads until the connection ends.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (String, End) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let deadline = Instant::now() + READ_BOUND;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => break End::Timeout,
            Ok(Ok(0)) => break End::Eof,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => break End::Error(e.kind()),
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), end)
}

/// A header of the response in `raw` ("" when absent).
fn header(raw: &str, name: &str) -> String {
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

fn v1(source: Ipv4Addr) -> Vec<u8> {
    format!("PROXY TCP4 {source} 127.0.0.1 5555 80\r\n").into_bytes()
}

/// A v2 PROXY header for TCP over IPv4, built by hand from the spec (section 2.2): the
/// 12-byte signature, version 2 + PROXY, AF_INET + STREAM, length 12, then source and
/// destination addresses and ports, big-endian.
fn v2(source: Ipv4Addr, source_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21);
    h.push(0x11);
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&source.octets());
    h.extend_from_slice(&Ipv4Addr::LOCALHOST.octets());
    h.extend_from_slice(&source_port.to_be_bytes());
    h.extend_from_slice(&80u16.to_be_bytes());
    h
}

async fn start(file: &ConfigFile, backends: &[&DemoBackend], balance: &str) -> kaproxy::Server {
    let servers: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.addr()))
        .collect();
    file.write(&file.text(
        "http = \"127.0.0.1:0\"\nproxy_protocol = true",
        &format!(
            "[downstream]\nheader_timeout = \"1s\"\n\n[upstreams.web]\nbalance = \"{balance}\"\n\
             servers = [{}]\n",
            servers.join(", ")
        ),
    ));
    file.start().await
}

async fn shutdown(server: kaproxy::Server) {
    let done = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
    assert!(done.is_ok(), "kaproxy shutdown took longer than 10 s");
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_source_becomes_x_forwarded_for() {
    let backend = demo_backend("pp", Duration::from_secs(5)).await;
    let file = ConfigFile::new();
    let server = start(&file, &[&backend], "round_robin").await;
    let addr = server.http_addr().expect("http listener");

    let mut bytes = v1(Ipv4Addr::new(203, 0, 113, 7));
    bytes.extend_from_slice(GET);
    let (raw, end) = exchange(addr, &bytes).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "v1: {raw:?} ({end:?})");
    assert_eq!(header(&raw, "x-seen-forwarded-for"), "203.0.113.7", "{raw}");

    let mut bytes = v2(Ipv4Addr::new(198, 51, 100, 9), 40000);
    bytes.extend_from_slice(GET);
    let (raw, end) = exchange(addr, &bytes).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "v2: {raw:?} ({end:?})");
    assert_eq!(
        header(&raw, "x-seen-forwarded-for"),
        "198.51.100.9",
        "{raw}"
    );

    assert_eq!(backend.stats().requests_served, 2);
    shutdown(server).await;
}

#[tokio::test]
async fn proxy_protocol_missing_or_garbage_header_closes_without_reaching_a_backend() {
    let backend = demo_backend("pp", Duration::from_secs(5)).await;
    let file = ConfigFile::new();
    let server = start(&file, &[&backend], "round_robin").await;
    let addr = server.http_addr().expect("http listener");

    // The v2 signature, then version 9 instead of 2.
    let mut bad_version_v2 = v2(Ipv4Addr::new(198, 51, 100, 9), 40000);
    bad_version_v2[12] = 0x91;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("plain HTTP without a header", GET.to_vec()),
        (
            "garbage",
            b"HELLO THERE, THIS IS NOT A PROXY HEADER\r\n\r\n".to_vec(),
        ),
        (
            "malformed v1",
            [&b"PROXY TCP4 not-an-ip 127.0.0.1 5555 80\r\n"[..], GET].concat(),
        ),
        ("v2 with a bad version", [&bad_version_v2[..], GET].concat()),
    ];
    for (what, bytes) in &cases {
        let (raw, end) = exchange(addr, bytes).await;
        assert!(
            !raw.contains("HTTP/"),
            "{what}: kaproxy answered instead of closing: {raw:?}"
        );
        assert_ne!(end, End::Timeout, "{what}: connection not closed");
    }
    // A good request afterwards is served: the backend saw exactly that one.
    let mut bytes = v1(Ipv4Addr::new(203, 0, 113, 7));
    bytes.extend_from_slice(GET);
    let (raw, _) = exchange(addr, &bytes).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw:?}");
    let stats = backend.stats();
    assert_eq!(
        stats.requests_served, 1,
        "only the request with a valid header reached the backend: {stats:?}"
    );
    assert_eq!(stats.connections_accepted, 1, "{stats:?}");
    shutdown(server).await;
}

#[tokio::test]
async fn proxy_protocol_source_drives_ip_hash() {
    let backends = [
        demo_backend("h1", Duration::from_secs(5)).await,
        demo_backend("h2", Duration::from_secs(5)).await,
        demo_backend("h3", Duration::from_secs(5)).await,
    ];
    let file = ConfigFile::new();
    let server = start(
        &file,
        &[&backends[0], &backends[1], &backends[2]],
        "ip_hash",
    )
    .await;
    let addr = server.http_addr().expect("http listener");

    let mut chosen = std::collections::BTreeMap::new();
    for i in 1..=12u8 {
        let source = Ipv4Addr::new(203, 0, 113, i);
        for round in 0..3u16 {
            // Alternate header versions: the address, not the encoding, must decide.
            let mut bytes = if round % 2 == 0 {
                v1(source)
            } else {
                v2(source, 1000 + round)
            };
            bytes.extend_from_slice(GET);
            let (raw, _) = exchange(addr, &bytes).await;
            assert!(raw.starts_with("HTTP/1.1 200"), "{source}: {raw:?}");
            assert_eq!(header(&raw, "x-seen-forwarded-for"), source.to_string());
            let backend = header(&raw, "x-backend");
            let first = chosen.entry(source).or_insert_with(|| backend.clone());
            assert_eq!(
                *first, backend,
                "source {source} moved between backends (round {round})"
            );
        }
    }
    let distinct: std::collections::BTreeSet<_> = chosen.values().collect();
    assert!(
        distinct.len() >= 2,
        "12 PROXY sources all hashed to one backend, as if the real peer (127.0.0.1) decided: \
         {chosen:?}"
    );
    shutdown(server).await;
}
