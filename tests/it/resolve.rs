//! `resolve` and `[resolver] servers` against a DNS server of the test's own on loopback (a
//! UDP responder that answers A queries for one name with an address the test changes): the
//! name is resolved through it at load, traffic follows the address when it changes, a failed
//! lookup keeps the last address, and a name it does not know is a config error with its key.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kaproxy::config::Config;
use kaproxy_testkit::demo::{DemoBackend, DemoBackendConfig};
use kaproxy_testkit::poll_until;

use crate::support::client::{Endpoint, KeepAliveClient, Request};
use crate::support::config_file::ConfigFile;

const NAME: &str = "backend.kaproxy.test";

/// A DNS server on 127.0.0.1 (its own thread, blocking socket) that answers A queries for
/// [`NAME`] with the address in `answer` (TTL 0), NXDOMAIN for any other name, and no
/// records for other types; `0.0.0.0` in `answer` makes it answer NXDOMAIN for [`NAME`] too.
struct TinyDns {
    addr: SocketAddr,
    answer: Arc<AtomicU32>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TinyDns {
    fn start(answer: Ipv4Addr) -> TinyDns {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind DNS socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().unwrap();
        let answer = Arc::new(AtomicU32::new(u32::from(answer)));
        let queries = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (answer, queries, stop) = (answer.clone(), queries.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let ip = Ipv4Addr::from(answer.load(Ordering::Relaxed));
                    if let Some(reply) = reply(&buf[..n], ip) {
                        queries.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            })
        };
        TinyDns {
            addr,
            answer,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, ip: Ipv4Addr) {
        self.answer.store(u32::from(ip), Ordering::Relaxed);
    }

    fn queries(&self) -> usize {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for TinyDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The answer to one query (RFC 1035 §4.1): the header with its id, QR, RD and RA, the
/// question as asked, and one A record pointing back at the question's name; None for what
/// is not a query.
fn reply(query: &[u8], ip: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question = &query[12..i + 4];
    let known = labels.join(".") == NAME && !ip.is_unspecified();
    let answer_a = known && qtype == 1;
    let rcode = if known { 0 } else { 3 };
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&query[..2]);
    out.push(0x80 | (query[2] & 0x01)); // QR, RD as asked
    out.push(0x80 | rcode); // RA
    out.extend_from_slice(&[0, 1, 0, u8::from(answer_a), 0, 0, 0, 0]);
    out.extend_from_slice(question);
    if answer_a {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

/// Two demo backends on one port, `one` on 127.0.0.1 and `two` on 127.0.0.2.
async fn backends_on_one_port() -> (DemoBackend, DemoBackend) {
    let start = |ip: [u8; 4], port: u16, name: &str| {
        DemoBackend::start(
            SocketAddr::from((ip, port)),
            DemoBackendConfig {
                name: name.to_string(),
                ..DemoBackendConfig::default()
            },
        )
    };
    for _ in 0..20 {
        let one = start([127, 0, 0, 1], 0, "one").await.expect("start one");
        if let Ok(two) = start([127, 0, 0, 2], one.addr().port(), "two").await {
            return (one, two);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

fn config_text(files: &ConfigFile, dns: SocketAddr, port: u16, resolve: &str) -> String {
    files.text(
        "http = \"127.0.0.1:0\"",
        &format!(
            "[resolver]\nservers = [\"{dns}\"]\n\n[upstreams.web]\nservers = [\"{NAME}:{port}\"]\n\
             resolve = \"{resolve}\"\n"
        ),
    )
}

async fn backend_of(client: &mut KeepAliveClient) -> String {
    let resp = client.send(&Request::get("/")).await.expect("GET");
    assert_eq!(resp.status, 200);
    resp.backend().expect("X-Backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_the_name_to_its_new_address_and_keeps_it_when_dns_fails() {
    let (one, two) = backends_on_one_port().await;
    let port = one.addr().port();
    let dns = TinyDns::start(Ipv4Addr::new(127, 0, 0, 1));
    let files = ConfigFile::new();
    files.write(&config_text(&files, dns.addr, port, "100ms"));
    let config = files.load();
    assert_eq!(
        config.upstreams[0].servers[0].addr,
        one.addr(),
        "resolved at load"
    );
    assert!(dns.queries() >= 1, "through the configured DNS server");
    let server = kaproxy::Server::start(config).await.expect("start");
    let mut client = KeepAliveClient::new(Endpoint::plain(server.http_addr().unwrap()), None);
    assert_eq!(backend_of(&mut client).await, "one");

    dns.set(Ipv4Addr::new(127, 0, 0, 2));
    let mut last = String::new();
    let moved = poll_until(Duration::from_secs(5), async || {
        last = backend_of(&mut client).await;
        last == "two"
    })
    .await;
    assert!(moved, "still {last} 5 s after the name moved");
    let status = server.generation();
    assert_eq!(status.config.upstreams[0].servers[0].addr, two.addr());
    for _ in 0..20 {
        assert_eq!(backend_of(&mut client).await, "two");
    }

    // The DNS server forgets the name: the last address stays.
    dns.set(Ipv4Addr::UNSPECIFIED);
    let asked = dns.queries();
    assert!(
        poll_until(Duration::from_secs(5), async || dns.queries() >= asked + 3).await,
        "kaproxy kept asking"
    );
    for _ in 0..20 {
        assert_eq!(backend_of(&mut client).await, "two");
    }
    assert_eq!(
        server.generation().config.upstreams[0].servers[0].addr,
        two.addr()
    );
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_resolver_does_not_know_is_a_config_error_with_its_key() {
    let dns = TinyDns::start(Ipv4Addr::UNSPECIFIED);
    let files = ConfigFile::new();
    files.write(&config_text(&files, dns.addr, 8080, "0s"));
    let path = files.path.clone();
    let err = tokio::task::spawn_blocking(move || Config::load(Path::new(&path)))
        .await
        .unwrap()
        .expect_err("an unknown name");
    let text = err.to_string();
    assert!(
        text.contains("upstreams.web.servers[0]") && text.contains("cannot resolve"),
        "{text}"
    );
    assert!(dns.queries() >= 1, "asked the configured server: {text}");
}
