//! `resolve` and `[resolver] servers` against a DNS server of the test's own on loopback (a
//! UDP responder that answers A queries for one name with addresses the test changes): the
//! name is resolved through it at load, traffic follows the addresses when they change — a
//! name with several records is several backends, one that stays keeps its pool, one that goes
//! finishes its requests in flight and closes its idle connections — a failed lookup keeps the
//! last addresses, and a name it does not know is a config error with its key.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kaproxy::config::Config;
use kaproxy_testkit::demo::{DemoBackend, DemoBackendConfig};
use kaproxy_testkit::{eventually, eventually_async, poll_until};

use crate::support::client::{Endpoint, KeepAliveClient, Request};
use crate::support::config_file::ConfigFile;
use crate::support::proxy::Metrics;

const NAME: &str = "backend.kaproxy.test";

/// A DNS server on 127.0.0.1 (its own thread, blocking socket) that answers A queries for
/// [`NAME`] with the addresses in `answer` (one A record each, in that order, TTL 0), NXDOMAIN
/// for any other name, and no records for other types; no address in `answer` makes it answer
/// NXDOMAIN for [`NAME`] too.
struct TinyDns {
    addr: SocketAddr,
    answer: Arc<Mutex<Vec<Ipv4Addr>>>,
    queries: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TinyDns {
    fn start(answer: &[Ipv4Addr]) -> TinyDns {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind DNS socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(answer.to_vec()));
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
                    let ips = answer.lock().unwrap().clone();
                    if let Some(reply) = reply(&buf[..n], &ips) {
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

    fn set(&self, ips: &[Ipv4Addr]) {
        *self.answer.lock().unwrap() = ips.to_vec();
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
/// question as asked, and one A record per address pointing back at the question's name; None
/// for what is not a query.
fn reply(query: &[u8], ips: &[Ipv4Addr]) -> Option<Vec<u8>> {
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
    let known = labels.join(".") == NAME && !ips.is_empty();
    let answer_a = known && qtype == 1;
    let rcode = if known { 0 } else { 3 };
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&query[..2]);
    out.push(0x80 | (query[2] & 0x01)); // QR, RD as asked
    out.push(0x80 | rcode); // RA
    let count = if answer_a { ips.len() as u16 } else { 0 };
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in ips.iter().filter(|_| answer_a) {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

/// Demo backends on one port, one on each of `hosts` (127.0.0.N, and its name).
async fn on_one_port(hosts: &[(u8, &str)]) -> Vec<DemoBackend> {
    let start = |(host, name): (u8, &str), port: u16| {
        DemoBackend::start(
            SocketAddr::from(([127, 0, 0, host], port)),
            DemoBackendConfig {
                name: name.to_string(),
                ..DemoBackendConfig::default()
            },
        )
    };
    'again: for _ in 0..20 {
        let first = start(hosts[0], 0).await.expect("start a backend");
        let port = first.addr().port();
        let mut all = vec![first];
        for &host in &hosts[1..] {
            match start(host, port).await {
                Ok(b) => all.push(b),
                Err(_) => continue 'again,
            }
        }
        return all;
    }
    panic!("no port free on every one of {hosts:?}");
}

/// Two demo backends on one port, `one` on 127.0.0.1 and `two` on 127.0.0.2.
async fn backends_on_one_port() -> (DemoBackend, DemoBackend) {
    let mut b = on_one_port(&[(1, "one"), (2, "two")]).await;
    let two = b.pop().unwrap();
    let one = b.pop().unwrap();
    (one, two)
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
    let dns = TinyDns::start(&[Ipv4Addr::new(127, 0, 0, 1)]);
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

    dns.set(&[Ipv4Addr::new(127, 0, 0, 2)]);
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
    dns.set(&[]);
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

/// `GET /` `n` times in turn on `client`, each a 200 (else it panics): the backends that answered.
async fn backends_of(client: &mut KeepAliveClient, n: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        seen.insert(backend_of(client).await);
    }
    seen
}

fn set_of(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_several_records_is_several_backends_and_a_change_keeps_the_ones_that_stay() {
    let b = on_one_port(&[(2, "two"), (3, "three"), (4, "four")]).await;
    let (two, three, four) = (&b[0], &b[1], &b[2]);
    let port = two.addr().port();
    let ip = |n: u8| Ipv4Addr::new(127, 0, 0, n);
    // Out of order: the backends are sorted whatever order the records come in.
    let dns = TinyDns::start(&[ip(3), ip(2)]);
    let files = ConfigFile::new();
    files.write(&config_text(&files, dns.addr, port, "100ms"));
    let config = files.load();
    let addrs_of = |c: &Config| {
        c.upstreams[0]
            .servers
            .iter()
            .map(|s| s.addr)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        addrs_of(&config),
        [two.addr(), three.addr()],
        "both records, sorted"
    );
    let server = kaproxy::Server::start(config).await.expect("start");
    let endpoint = Endpoint::plain(server.http_addr().unwrap());
    let mut client = KeepAliveClient::new(endpoint.clone(), None);
    assert_eq!(
        backends_of(&mut client, 10).await,
        set_of(&["two", "three"]),
        "round robin over both addresses"
    );
    let three_accepted = three.stats().connections_accepted;
    let three_opened = opened_total(&server, three.addr());
    assert_eq!(
        three_accepted, 1,
        "sequential keep-alive traffic: one connection"
    );

    // 127.0.0.2 goes, 127.0.0.4 comes, 127.0.0.3 stays.
    dns.set(&[ip(4), ip(3)]);
    let mut last = BTreeSet::new();
    let moved = poll_until(Duration::from_secs(5), async || {
        last = backends_of(&mut client, 4).await;
        last == set_of(&["three", "four"])
    })
    .await;
    assert!(moved, "still {last:?} 5 s after the records changed");
    assert_eq!(
        addrs_of(&server.generation().config),
        [three.addr(), four.addr()]
    );
    assert_eq!(
        backends_of(&mut client, 20).await,
        set_of(&["three", "four"])
    );
    assert_eq!(
        (
            three.stats().connections_accepted,
            opened_total(&server, three.addr())
        ),
        (three_accepted, three_opened),
        "the address that stayed kept its pool and its warm connection"
    );
    eventually(
        "the idle connection to the address that went is closed",
        Duration::from_secs(5),
        || two.stats().connections_open == 0,
    )
    .await;
    assert_eq!(
        removed_total(&server, two.addr()),
        1.0,
        "counted as removed:\n{}",
        Metrics(server.metrics()).lines_of("kaproxy_upstream_connections_closed")
    );

    // 127.0.0.4 goes while requests are in flight on it: they finish, as 200s.
    let accepted = || three.stats().connections_accepted + four.stats().connections_accepted;
    let before = accepted();
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let mut c = KeepAliveClient::new(endpoint, None);
                let resp = c
                    .send(&Request::get("/slow?ms=1500"))
                    .await
                    .expect("slow GET");
                (resp.status, resp.backend().unwrap_or_default())
            })
        })
        .collect();
    // Four at once on two idle connections: two more are opened, so all four are in flight.
    eventually(
        "the slow requests reached the backends",
        Duration::from_secs(5),
        || accepted() >= before + 2,
    )
    .await;
    dns.set(&[ip(3)]);
    eventually_async(
        "127.0.0.4 is no longer a backend",
        Duration::from_secs(5),
        async || addrs_of(&server.generation().config) == [three.addr()],
    )
    .await;
    let mut answered = Vec::new();
    for task in slow {
        answered.push(task.await.expect("slow request task"));
    }
    assert!(
        answered.iter().all(|(status, _)| *status == 200),
        "{answered:?}"
    );
    assert!(
        answered.iter().any(|(_, backend)| backend == "four"),
        "one was in flight on the address that went: {answered:?}"
    );
    assert_eq!(backends_of(&mut client, 10).await, set_of(&["three"]));
    eventually(
        "the connections to the address that went are closed once their requests finished",
        Duration::from_secs(5),
        || four.stats().connections_open == 0,
    )
    .await;
    assert!(
        removed_total(&server, four.addr()) >= 1.0,
        "counted as removed"
    );
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown in time");
}

/// `kaproxy_upstream_connections_closed_total{reason="removed"}` of the server at `addr`.
fn removed_total(server: &kaproxy::Server, addr: SocketAddr) -> f64 {
    let addr = addr.to_string();
    Metrics(server.metrics()).sum(
        "kaproxy_upstream_connections_closed_total",
        &[("server", addr.as_str()), ("reason", "removed")],
    )
}

/// `kaproxy_upstream_connections_opened_total` of the server at `addr`.
fn opened_total(server: &kaproxy::Server, addr: SocketAddr) -> f64 {
    let addr = addr.to_string();
    Metrics(server.metrics()).sum(
        "kaproxy_upstream_connections_opened_total",
        &[("server", addr.as_str())],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_resolver_does_not_know_is_a_config_error_with_its_key() {
    let dns = TinyDns::start(&[]);
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
