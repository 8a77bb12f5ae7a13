//! The request phases before the upstream pool: `[[routes]]` by host and path prefix (HTTP/1.1
//! `Host` and HTTP/2 `:authority`), and the forwarding headers a backend sees.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kaproxy_testkit::demo::DemoBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::client::{
    connect_from, tls_connect, Endpoint, KeepAliveClient, Request, Response,
};
use crate::support::proxy::TestProxy;

/// Bound on one exchange in this file.
const EXCHANGE_BOUND: Duration = Duration::from_secs(10);

/// A demo backend named `name` (answers with `X-Backend: name` and echoes `X-Seen-*`).
async fn demo(name: &str) -> DemoBackend {
    DemoBackend::named(name).await
}

/// Two upstreams, `alpha` and `beta`, and routes where order matters: the host+path route
/// comes before the host-only route for the same host, and the suffix route before the
/// path-only one.
fn routed_toml(alpha: SocketAddr, beta: SocketAddr) -> String {
    format!(
        r#"[upstreams.alpha]
servers = ["{alpha}"]

[upstreams.beta]
servers = ["{beta}"]

[[routes]]
host = "api.example.com"
path_prefix = "/beta/"
upstream = "beta"

[[routes]]
host = "api.example.com"
upstream = "alpha"

[[routes]]
host = "*.example.com"
upstream = "beta"

[[routes]]
path_prefix = "/alpha/"
upstream = "alpha"
"#
    )
}

/// (host, path, the upstream that must answer; None: 404).
const HOST_CASES: &[(&str, &str, Option<&str>)] = &[
    ("api.example.com", "/", Some("alpha")),
    // The first match wins: the host+path route is listed before the host-only one.
    ("api.example.com", "/beta/x", Some("beta")),
    // A path prefix is a string prefix of the path, "/beta/" does not match "/betamax".
    ("api.example.com", "/betamax", Some("alpha")),
    // The port is ignored and host names compare case-insensitively.
    ("api.example.com:8443", "/", Some("alpha")),
    ("API.Example.COM", "/", Some("alpha")),
    ("www.example.com", "/", Some("beta")),
    ("a.b.example.com:80", "/", Some("beta")),
    // The suffix route comes before the path-only route.
    ("www.example.com", "/alpha/x", Some("beta")),
    // `*.example.com` needs a label in front: neither the bare domain nor a look-alike.
    ("example.com", "/", None),
    ("notexample.com", "/", None),
    ("api.example.com.evil.test", "/", None),
    ("other.test", "/alpha/y", Some("alpha")),
    ("other.test", "/alph", None),
    ("other.test", "/", None),
];

/// Checks one routed answer: the right backend, or kaproxy's own 404 with a body.
fn assert_routed(resp: &Response, host: &str, path: &str, expected: Option<&str>) {
    match expected {
        Some(name) => {
            assert_eq!(
                resp.status,
                StatusCode::OK,
                "{host} {path}: {:?}",
                resp.body_text()
            );
            assert_eq!(
                resp.backend().as_deref(),
                Some(name),
                "{host} {path} goes to {name}"
            );
            assert_eq!(
                resp.header("x-seen-host"),
                host,
                "{host} {path}: Host is passed through as sent"
            );
        }
        None => {
            assert_eq!(
                resp.status,
                StatusCode::NOT_FOUND,
                "{host} {path} matches no route: {:?} from {:?}",
                resp.body_text(),
                resp.backend()
            );
            assert_eq!(
                resp.backend(),
                None,
                "{host} {path}: a 404 of kaproxy's own"
            );
            assert!(
                resp.body_text().contains("no route"),
                "{host} {path}: the 404 says why: {:?}",
                resp.body_text()
            );
        }
    }
}

#[tokio::test]
async fn routes_by_exact_host_suffix_and_path_prefix_first_match_wins() {
    let alpha = demo("alpha").await;
    let beta = demo("beta").await;
    let proxy = TestProxy::start(&routed_toml(alpha.addr(), beta.addr())).await;
    let mut client = KeepAliveClient::new(proxy.http(), None);
    for &(host, path, expected) in HOST_CASES {
        let resp = client
            .send(&Request::get(path).header("host", host))
            .await
            .unwrap_or_else(|e| panic!("{host} {path}: {e}"));
        assert_routed(&resp, host, path, expected);
    }
    // A POST is routed the same way and its body reaches the chosen backend.
    let resp = client
        .send(&Request::post("/beta/upload", vec![b'x'; 321]).header("host", "api.example.com"))
        .await
        .expect("POST");
    assert_eq!(resp.backend().as_deref(), Some("beta"));
    assert_eq!(resp.body_text(), "beta received 321 bytes\n");

    let routed = |name: &str| {
        HOST_CASES
            .iter()
            .filter(|(_, _, e)| *e == Some(name))
            .count() as u64
    };
    assert_eq!(
        alpha.stats().requests_served,
        routed("alpha"),
        "every alpha request, and nothing else, reached alpha"
    );
    assert_eq!(
        beta.stats().requests_served,
        routed("beta") + 1,
        "every beta request, and nothing else, reached beta"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn absolute_form_target_routes_by_its_authority_not_the_host_header() {
    let alpha = demo("alpha").await;
    let beta = demo("beta").await;
    let proxy = TestProxy::start(&routed_toml(alpha.addr(), beta.addr())).await;
    // RFC 9112 §3.2.2: a server receiving an absolute-form target MUST ignore the received
    // Host header and use the target's host (nginx's $host does the same).
    for (target, expected) in [
        ("http://api.example.com/", "alpha"),
        ("http://www.example.com/alpha/x", "beta"),
    ] {
        let mut stream = connect_from(proxy.http().addr, None)
            .await
            .expect("connect");
        let req = format!("GET {target} HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("send");
        let mut out = String::new();
        tokio::time::timeout(EXCHANGE_BOUND, stream.read_to_string(&mut out))
            .await
            .expect("response within bound")
            .expect("read response");
        // Field names are case-insensitive (RFC 9110 §5.1); kaproxy passes the backend's.
        let backend = out.lines().find_map(|l| {
            let (name, value) = l.split_once(": ")?;
            name.eq_ignore_ascii_case("x-backend")
                .then(|| value.to_string())
        });
        assert_eq!(backend.as_deref(), Some(expected), "{target}:\n{out}");
    }
    proxy.shutdown().await;
}

/// One HTTP/2 connection to kaproxy's TLS listener (ALPN h2), several streams.
struct H2Conn {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl H2Conn {
    async fn connect(endpoint: &Endpoint) -> H2Conn {
        let config = endpoint.tls.clone().expect("a TLS endpoint");
        let (tls, alpn) = tls_connect(endpoint.addr, config, None)
            .await
            .expect("TLS connect");
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN selects h2");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2 handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        H2Conn { sender, task }
    }

    /// `GET https://{authority}{path}`: the authority becomes `:authority`, no `Host` header.
    async fn get(&mut self, authority: &str, path: &str) -> Response {
        let req = http::Request::get(format!("https://{authority}{path}"))
            .body(Empty::<Bytes>::new())
            .expect("h2 request");
        assert!(req.headers().get("host").is_none());
        let exchange = async {
            let resp = self.sender.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>(Response {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(EXCHANGE_BOUND, exchange)
            .await
            .unwrap_or_else(|_| panic!("h2 GET {authority}{path} timed out"))
            .unwrap_or_else(|e| panic!("h2 GET {authority}{path}: {e}"))
    }
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn http2_authority_routes_and_becomes_the_upstream_host() {
    let alpha = demo("alpha").await;
    let beta = demo("beta").await;
    let proxy = TestProxy::start(&routed_toml(alpha.addr(), beta.addr())).await;
    // Routing is per request: every stream of one connection names its own authority.
    let mut h2 = H2Conn::connect(&proxy.https(&["h2", "http/1.1"])).await;
    for &(host, path, expected) in HOST_CASES {
        // The http crate keeps an authority's case; hyper's h2 client sends it as is.
        let resp = h2.get(host, path).await;
        assert_eq!(resp.version, Version::HTTP_2);
        assert_routed(&resp, host, path, expected);
        if expected.is_some() {
            assert_eq!(
                resp.header("x-seen-forwarded-host"),
                host,
                "X-Forwarded-Host from :authority"
            );
            assert_eq!(resp.header("x-seen-forwarded-proto"), "https");
        }
    }
    proxy.shutdown().await;
}

/// Forwarding settings with every optional header on; `trusted` is a TOML array.
fn forwarding_toml(backend: SocketAddr, trusted: &str) -> String {
    format!(
        r#"[forwarded]
trusted_proxies = {trusted}
x_forwarded_proto = true
forwarded = true
x_real_ip = true

[upstreams.web]
servers = ["{backend}"]
"#
    )
}

/// What a client that is not a proxy might send to spoof the forwarding headers.
fn spoofed(req: Request) -> Request {
    req.header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "gopher")
        .header("x-forwarded-port", "1")
        .header("x-forwarded-host", "evil.test")
        .header("forwarded", "for=6.6.6.6;proto=gopher")
        .header("x-real-ip", "6.6.6.6")
}

#[tokio::test]
async fn https_sets_forwarded_headers_from_the_connection_not_the_client() {
    let backend = demo("fwd").await;
    let proxy = TestProxy::start(&forwarding_toml(backend.addr(), "[]")).await;
    let https_port = proxy.server.https_addr().expect("https").port().to_string();
    let source: IpAddr = "127.0.0.9".parse().unwrap();

    // HTTP/1.1 over TLS, from 127.0.0.9, with every header spoofed.
    let mut client = KeepAliveClient::new(proxy.https(&["http/1.1"]), Some(source));
    let resp = client
        .send(&spoofed(
            Request::get("/").header("host", "shop.example.test"),
        ))
        .await
        .expect("GET over TLS");
    assert_forwarded_over_https(&resp, "127.0.0.9", &https_port, "shop.example.test");

    // HTTP/2: the host comes from :authority.
    let mut h2 = H2Conn::connect(&proxy.https(&["h2"])).await;
    let resp = h2.get("h2.example.test", "/").await;
    assert_forwarded_over_https(&resp, "127.0.0.1", &https_port, "h2.example.test");
    proxy.shutdown().await;
}

#[tokio::test]
async fn untrusted_peer_gets_its_forwarding_headers_overwritten_on_plain_http() {
    let backend = demo("fwd").await;
    let proxy = TestProxy::start(&forwarding_toml(backend.addr(), "[]")).await;
    let http_port = proxy.server.http_addr().expect("http").port().to_string();
    let mut client =
        KeepAliveClient::new(proxy.http(), Some("127.0.0.9".parse::<IpAddr>().unwrap()));
    let resp = client
        .send(
            &Request::get("/")
                .header("host", "shop.example.test")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-for", "203.0.113.7"),
        )
        .await
        .expect("GET");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        resp.header("x-seen-forwarded-proto"),
        "http",
        "an untrusted peer cannot claim https"
    );
    assert_eq!(resp.header("x-seen-forwarded-port"), http_port);
    assert_eq!(resp.header("x-seen-forwarded-for"), "127.0.0.9");
    assert_eq!(resp.header("x-seen-real-ip"), "127.0.0.9");
    assert_eq!(
        resp.header("x-seen-forwarded"),
        "for=127.0.0.9;proto=http;host=\"shop.example.test\""
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn trusted_proxy_keeps_its_forwarding_headers_on_plain_http() {
    let backend = demo("fwd").await;
    let proxy = TestProxy::start(&forwarding_toml(backend.addr(), r#"["127.0.0.0/8"]"#)).await;
    let mut client =
        KeepAliveClient::new(proxy.http(), Some("127.0.0.9".parse::<IpAddr>().unwrap()));
    // A TLS-terminating load balancer in front, on 127.0.0.9, forwarding client 203.0.113.7.
    let resp = client
        .send(
            &Request::get("/")
                .header("host", "shop.example.test")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-port", "443")
                .header("x-forwarded-host", "shop.example.com")
                .header("x-forwarded-for", "203.0.113.7")
                .header("forwarded", "for=203.0.113.7;proto=https"),
        )
        .await
        .expect("GET");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        resp.header("x-seen-forwarded-proto"),
        "https",
        "the trusted proxy's view wins"
    );
    assert_eq!(resp.header("x-seen-forwarded-port"), "443");
    assert_eq!(resp.header("x-seen-forwarded-host"), "shop.example.com");
    assert_eq!(
        resp.header("x-seen-forwarded-for"),
        "203.0.113.7, 127.0.0.9"
    );
    assert_eq!(
        resp.header("x-seen-real-ip"),
        "203.0.113.7",
        "the right-most untrusted address"
    );
    assert_eq!(
        resp.header("x-seen-forwarded"),
        "for=203.0.113.7;proto=https, for=127.0.0.9;proto=http;host=\"shop.example.test\""
    );

    // Without headers of its own the trusted peer's connection is described.
    let resp = client
        .send(&Request::get("/").header("host", "shop.example.test"))
        .await
        .expect("GET");
    assert_eq!(resp.header("x-seen-forwarded-proto"), "http");
    assert_eq!(resp.header("x-seen-forwarded-for"), "127.0.0.9");
    assert_eq!(resp.header("x-seen-real-ip"), "127.0.0.9");
    proxy.shutdown().await;
}

/// What the backend saw (echoed as `X-Seen-*`) for a request from `client` over the HTTPS
/// listener on `port` for `host`, with every forwarding header enabled.
fn assert_forwarded_over_https(resp: &Response, client: &str, port: &str, host: &str) {
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.header("x-seen-forwarded-for"), client);
    assert_eq!(resp.header("x-seen-forwarded-proto"), "https");
    assert_eq!(resp.header("x-seen-forwarded-port"), port);
    assert_eq!(resp.header("x-seen-forwarded-host"), host);
    assert_eq!(
        resp.header("x-seen-forwarded"),
        format!("for={client};proto=https;host=\"{host}\"")
    );
    assert_eq!(resp.header("x-seen-real-ip"), client);
    assert_eq!(resp.header("x-seen-host"), host);
}
