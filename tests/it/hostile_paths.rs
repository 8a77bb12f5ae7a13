//! Hostile input, part 2 (issue 17): paths, hosts and methods that tried to get past kaproxy's
//! routes. Every test runs kaproxy with two recording backends, `adm` (routes `Host:
//! route.test` with path prefix `/admin`) and `web` (everything else), sends its probes as raw
//! HTTP/1.1 bytes (or raw HTTP/2 with the `h2` crate), and checks the status the client gets
//! and what reached which backend: the path and Host a backend saw, or nothing at all.

use std::net::SocketAddr;
use std::sync::Arc;

use http::Method;

use crate::support::backend::{RecordedRequest, RecordingBackend};
use crate::support::client::{tls_connect, Endpoint};
use crate::support::hostile::{raw_exchange, RawResponse, RAW_BOUND};
use crate::support::proxy::TestProxy;

/// kaproxy in front of `adm` and `web`, and what each of them has seen so far.
struct Routed {
    proxy: TestProxy,
    adm: RecordingBackend,
    web: RecordingBackend,
    /// Requests of `adm` and `web` already looked at by [`Routed::probe`].
    seen: (usize, usize),
}

/// Where a probe went: the backend's name and the request as it saw it.
type Reached = Vec<(&'static str, RecordedRequest)>;

impl Routed {
    async fn start() -> Routed {
        let adm = RecordingBackend::start("adm", &[]).await;
        let web = RecordingBackend::start("web", &[]).await;
        let proxy = TestProxy::start(&format!(
            r#"[downstream]
header_timeout = "2s"

[upstreams.adm]
servers = ["{adm}"]

[upstreams.web]
servers = ["{web}"]

[[routes]]
host = "route.test"
path_prefix = "/admin"
upstream = "adm"

[[routes]]
upstream = "web"
"#,
            adm = adm.addr(),
            web = web.addr(),
        ))
        .await;
        Routed {
            proxy,
            adm,
            web,
            seen: (0, 0),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.server.http_addr().expect("http listener")
    }

    /// The requests that reached a backend since the last call.
    fn reached(&mut self) -> Reached {
        let adm = self.adm.requests();
        let web = self.web.requests();
        let mut out: Reached = Vec::new();
        out.extend(adm[self.seen.0..].iter().cloned().map(|r| ("adm", r)));
        out.extend(web[self.seen.1..].iter().cloned().map(|r| ("web", r)));
        self.seen = (adm.len(), web.len());
        out
    }

    /// Sends `request` (raw bytes) on a fresh connection; the response and where it went.
    async fn probe(&mut self, request: &[u8]) -> (RawResponse, Reached) {
        let resp = raw_exchange(self.addr(), request).await;
        (resp, self.reached())
    }

    /// `GET target` with `Host: host`.
    async fn get(&mut self, target: &str, host: &str) -> (RawResponse, Reached) {
        self.probe(format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .await
    }

    /// Asserts that `target` (with `Host: route.test`) is answered 200 by `backend`, which
    /// saw `path` (and `query`, byte for byte) and nothing else saw anything.
    async fn assert_forwarded(
        &mut self,
        target: &str,
        backend: &str,
        path: &str,
        query: Option<&str>,
    ) {
        let (resp, reached) = self.get(target, "route.test").await;
        assert_eq!(resp.status, Some(200), "GET {target}: {resp:?}");
        assert_eq!(
            resp.header_values("x-backend"),
            [backend],
            "GET {target} is served by {backend}: {resp:?}"
        );
        assert_eq!(
            reached.len(),
            1,
            "GET {target}: one request upstream: {reached:?}"
        );
        let (name, seen) = &reached[0];
        assert_eq!(*name, backend, "GET {target} reached {backend}: {seen:?}");
        assert_eq!(
            (seen.uri.path(), seen.uri.query()),
            (path, query),
            "GET {target}: the path {backend} got is the one the route matched: {seen:?}"
        );
        assert_eq!(seen.header("host"), "route.test", "GET {target}: {seen:?}");
    }

    /// Asserts that `request` gets `status` from kaproxy itself and reaches no backend.
    async fn assert_refused(&mut self, request: &[u8], status: u16, what: &str) -> RawResponse {
        let (resp, reached) = self.probe(request).await;
        assert_eq!(resp.status, Some(status), "{what}: {resp:?}");
        assert!(
            resp.header_values("x-backend").is_empty(),
            "{what}: kaproxy's own answer: {resp:?}"
        );
        assert!(
            reached.is_empty(),
            "{what}: reaches no backend, got {reached:?}"
        );
        resp
    }

    /// A plain GET still works: the routes themselves are intact.
    async fn assert_normal_requests_work(&mut self) {
        self.assert_forwarded("/admin/ok", "adm", "/admin/ok", None)
            .await;
        self.assert_forwarded("/ok", "web", "/ok", None).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Paths (findings 1-3): matched on the normalized path, and the backend gets that path
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn encoded_dot_segments_are_resolved_before_routing_and_forwarded_resolved() {
    let mut t = Routed::start().await;
    for (target, backend, path, query) in [
        // Finding 1: the backend would decode `%2e` and resolve the dot segments itself.
        ("/public/%2e%2e/admin/x", "adm", "/admin/x", None),
        ("/public/%2E%2e/admin/x", "adm", "/admin/x", None),
        ("/public/.%2e/admin/x", "adm", "/admin/x", None),
        ("/public/%2e./admin/x", "adm", "/admin/x", None),
        ("/public/a/%2e%2e/%2e%2E/admin/x", "adm", "/admin/x", None),
        ("/%2e/admin/x", "adm", "/admin/x", None),
        ("/admin/x/%2e", "adm", "/admin/x/", None),
        // Plain dot segments, as before, now also forwarded resolved.
        ("/public/../admin/x", "adm", "/admin/x", None),
        ("/admin/../public/x", "web", "/public/x", None),
        ("/admin/%2e%2e/public/x", "web", "/public/x", None),
        ("/../../admin", "adm", "/admin", None),
        // A dot segment only in the query is left alone, byte for byte.
        (
            "/public/%2e%2e/admin/x?next=/%2e%2e/../a%2fb&x=%61",
            "adm",
            "/admin/x",
            Some("next=/%2e%2e/../a%2fb&x=%61"),
        ),
        // `.well-known` and `..x` are names, not dot segments.
        ("/.well-known/x", "web", "/.well-known/x", None),
        ("/admin/..x", "adm", "/admin/..x", None),
    ] {
        t.assert_forwarded(target, backend, path, query).await;
    }
    t.assert_normal_requests_work().await;
    t.proxy.shutdown().await;
}

#[tokio::test]
async fn encoded_unreserved_characters_are_decoded_before_routing_and_forwarded_decoded() {
    let mut t = Routed::start().await;
    for (target, backend, path, query) in [
        // Finding 2: `%61` is `a`.
        ("/%61dmin/x", "adm", "/admin/x", None),
        ("/adm%69n/x", "adm", "/admin/x", None),
        ("/%61%64%6D%69%6e/x", "adm", "/admin/x", None),
        // `%41` is `A`: a different path (routes are case-sensitive, as Apache's paths are).
        ("/%41dmin/x", "web", "/Admin/x", None),
        ("/%7Euser/%2D%5F%2E%30", "web", "/~user/-_.0", None),
        // Reserved and other characters stay encoded; only their hex digits are upper-cased
        // (RFC 3986 §6.2.2.1).
        (
            "/admin/a%20b%3f%25%2a",
            "adm",
            "/admin/a%20b%3F%25%2A",
            None,
        ),
        ("/admin/caf%c3%a9", "adm", "/admin/caf%C3%A9", None),
        ("/admin/%252e%252e/x", "adm", "/admin/%252e%252e/x", None),
        ("/%2561dmin/x", "web", "/%2561dmin/x", None),
        (
            "/%61dmin/x?q=%61&r=%2F",
            "adm",
            "/admin/x",
            Some("q=%61&r=%2F"),
        ),
    ] {
        t.assert_forwarded(target, backend, path, query).await;
    }
    t.assert_normal_requests_work().await;
    t.proxy.shutdown().await;
}

#[tokio::test]
async fn repeated_slashes_are_merged_before_routing_and_forwarded_merged() {
    let mut t = Routed::start().await;
    for (target, backend, path, query) in [
        // Finding 3: Apache (MergeSlashes On) and nginx (merge_slashes on) serve `/admin/x`.
        ("//admin/x", "adm", "/admin/x", None),
        ("///admin//x//", "adm", "/admin/x/", None),
        ("/public//..//admin/x", "adm", "/admin/x", None),
        ("//", "web", "/", None),
        ("/x?a=//b", "web", "/x", Some("a=//b")),
    ] {
        t.assert_forwarded(target, backend, path, query).await;
    }
    t.assert_normal_requests_work().await;
    t.proxy.shutdown().await;
}

#[tokio::test]
async fn ambiguous_paths_get_400_and_reach_no_backend() {
    let mut t = Routed::start().await;
    for target in [
        // An encoded `/`: a segment or a separator, depending on who decodes.
        "/public%2F..%2Fadmin/x",
        "/admin%2fx",
        "/public/..%2Fadmin/x",
        // `\`: a separator on Windows and to some backends; raw or encoded.
        "/public/..\\admin/x",
        "/public\\x",
        "/public/..%5Cadmin/x",
        "/public/%5c",
        // NUL and other control bytes, encoded.
        "/admin%00.txt",
        "/public/%0d%0aX-Injected:%20yes",
        "/public/%1F",
        "/public/%7f",
        // Malformed percent-escapes.
        "/public/%zz",
        "/public/%4",
        "/public/%",
        "/public/%4g/x",
        "/public/%%61",
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: route.test\r\n\r\n");
        let resp = t
            .assert_refused(request.as_bytes(), 400, &format!("GET {target}"))
            .await;
        assert!(
            resp.body_text().contains("path"),
            "GET {target}: the 400 says what is wrong: {resp:?}"
        );
    }
    t.assert_normal_requests_work().await;
    t.proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Request-target forms and Host (findings 5, 6)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn authority_form_is_refused_except_for_connect_and_absolute_form_still_wins() {
    let mut t = Routed::start().await;
    // Finding 5: authority form is CONNECT's alone (RFC 9112 §3.2.3).
    for request in [
        &b"GET route.test:80 HTTP/1.1\r\nHost: probe.test\r\n\r\n"[..],
        b"GET route.test:80 HTTP/1.1\r\nHost: route.test\r\n\r\n",
        b"OPTIONS route.test:80 HTTP/1.1\r\nHost: probe.test\r\n\r\n",
        b"POST route.test:80 HTTP/1.1\r\nHost: probe.test\r\nContent-Length: 0\r\n\r\n",
        // Asterisk form is OPTIONS's alone (RFC 9112 §3.2.4).
        b"GET * HTTP/1.1\r\nHost: route.test\r\n\r\n",
    ] {
        let what = String::from_utf8_lossy(request).into_owned();
        t.assert_refused(request, 400, &what).await;
    }
    // `OPTIONS *` is forwarded as before.
    let (resp, reached) = t
        .probe(b"OPTIONS * HTTP/1.1\r\nHost: route.test\r\n\r\n")
        .await;
    assert_eq!(resp.status, Some(200), "OPTIONS *: {resp:?}");
    assert_eq!(reached.len(), 1, "OPTIONS *: {reached:?}");
    assert_eq!(reached[0].0, "web");
    assert_eq!(reached[0].1.method, Method::OPTIONS);
    assert_eq!(reached[0].1.uri, "*", "{reached:?}");

    // An absolute-form target keeps winning over Host, and its path is normalized too.
    let (resp, reached) = t
        .probe(
            b"GET http://route.test/public/%2e%2e//admin/x?y HTTP/1.1\r\nHost: probe.test\r\n\r\n",
        )
        .await;
    assert_eq!(resp.status, Some(200), "absolute form: {resp:?}");
    assert_eq!(reached.len(), 1, "absolute form: {reached:?}");
    let (name, seen) = &reached[0];
    assert_eq!(
        *name, "adm",
        "absolute form routes by its authority: {seen:?}"
    );
    assert_eq!(seen.uri, "/admin/x?y", "origin form, normalized: {seen:?}");
    assert_eq!(seen.header("host"), "route.test", "{seen:?}");

    t.assert_normal_requests_work().await;
    t.proxy.shutdown().await;
}

#[tokio::test]
async fn a_host_with_userinfo_or_anything_but_host_and_port_gets_400() {
    let mut t = Routed::start().await;
    // Finding 6: a uri-host has no userinfo (RFC 9110 §4.2.4, §7.2).
    for host in [
        "probe.test@route.test",
        "@route.test",
        "user:pass@route.test:80",
        "route.test:8o",
        "route.test:99999",
        "route.test:80:80",
        ":80",
        "route.test,probe.test",
        "route.test;x=y",
        "route%2Etest",
        "[::1",
        "[route.test]",
        "[::1]x",
        "::1",
        "route.test/admin",
        "route test",
    ] {
        let request = format!("GET /admin/x HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let resp = t
            .assert_refused(request.as_bytes(), 400, &format!("Host: {host}"))
            .await;
        assert!(
            resp.body_text().contains("Host"),
            "Host: {host}: the 400 says what is wrong: {resp:?}"
        );
    }
    // The same rule for the authority of an absolute-form target.
    t.assert_refused(
        b"GET http://probe.test@route.test/admin/x HTTP/1.1\r\nHost: route.test\r\n\r\n",
        400,
        "absolute form with userinfo",
    )
    .await;

    // Hosts that are fine, and where they go.
    for (host, backend) in [
        ("route.test", "adm"),
        ("route.test:80", "adm"),
        ("ROUTE.test.", "adm"),
        ("route.test:", "adm"),
        ("probe.test", "web"),
        ("127.0.0.1:8080", "web"),
        ("[::1]:8080", "web"),
        ("[2001:db8::ffff:10.0.0.1]", "web"),
        ("under_score-and~tilde.test", "web"),
    ] {
        let (resp, reached) = t.get("/admin/x", host).await;
        assert_eq!(resp.status, Some(200), "Host: {host}: {resp:?}");
        assert_eq!(reached.len(), 1, "Host: {host}: {reached:?}");
        assert_eq!(reached[0].0, backend, "Host: {host}: {reached:?}");
        assert_eq!(
            reached[0].1.header("host"),
            host,
            "Host: {host}: {reached:?}"
        );
    }
    t.assert_normal_requests_work().await;
    t.proxy.shutdown().await;
}

/// One HTTP/2 request on a fresh TLS connection with the `h2` crate, which sends the URI's
/// authority (userinfo and all) as `:authority`; the status, or the h2 error.
async fn h2_status(endpoint: &Endpoint, method: Method, uri: &str) -> Result<u16, String> {
    let config = endpoint.tls.clone().expect("h2 needs the TLS endpoint");
    let exchange = async {
        let (tls, alpn) = tls_connect(endpoint.addr, config, None)
            .await
            .map_err(|e| format!("tls connect: {e}"))?;
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN selected h2");
        let (sender, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut sender = sender.ready().await.map_err(|e| format!("ready: {e}"))?;
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .map_err(|e| format!("request: {e}"))?;
        let (resp, _) = sender
            .send_request(req, true)
            .map_err(|e| format!("send: {e}"))?;
        let resp = resp.await.map_err(|e| format!("response: {e}"));
        conn.abort();
        resp.map(|r| r.status().as_u16())
    };
    tokio::time::timeout(RAW_BOUND, exchange)
        .await
        .unwrap_or_else(|_| Err("no h2 answer within 5 s".into()))
}

#[tokio::test]
async fn http2_authority_with_userinfo_gets_400() {
    let mut t = Routed::start().await;
    let https = t.proxy.https(&["h2"]);
    // Finding 6 over HTTP/2: RFC 9113 §8.3.1 calls such a request malformed.
    for uri in [
        "https://probe.test@route.test/admin/x",
        "https://u:p@route.test/x",
    ] {
        let status = h2_status(&https, Method::GET, uri).await;
        assert_eq!(status, Ok(400), ":authority of {uri}");
        let reached = t.reached();
        assert!(reached.is_empty(), "{uri}: reaches no backend: {reached:?}");
    }
    // The HTTP/2 path is normalized like any other.
    let status = h2_status(&https, Method::GET, "https://route.test//%61dmin/%2e/x").await;
    assert_eq!(status, Ok(200));
    let reached = t.reached();
    assert_eq!(reached.len(), 1, "{reached:?}");
    assert_eq!(reached[0].0, "adm", "{reached:?}");
    assert_eq!(reached[0].1.uri, "/admin/x", "{reached:?}");
    assert_eq!(reached[0].1.header("host"), "route.test", "{reached:?}");
    t.proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// CONNECT (finding 14)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connect_gets_405_with_allow_and_reaches_no_backend() {
    let mut t = Routed::start().await;
    for request in [
        &b"CONNECT route.test:443 HTTP/1.1\r\nHost: route.test:443\r\n\r\n"[..],
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
        b"CONNECT /admin/x HTTP/1.1\r\nHost: route.test\r\n\r\n",
        // TRACE too: Apache would echo the request, credentials included.
        b"TRACE / HTTP/1.1\r\nHost: route.test\r\nCookie: session=secret\r\n\r\n",
    ] {
        let what = String::from_utf8_lossy(request).into_owned();
        let resp = t.assert_refused(request, 405, &what).await;
        let allow = resp.header_values("allow");
        assert_eq!(allow.len(), 1, "{what}: 405 carries Allow: {resp:?}");
        assert!(
            allow[0].contains("GET")
                && !allow[0].contains("CONNECT")
                && !allow[0].contains("TRACE"),
            "{what}: {allow:?}"
        );
        assert_eq!(
            resp.header_values("connection"),
            ["close"],
            "{what}: what follows a CONNECT is not a request: {resp:?}"
        );
    }
    // HTTP/2 CONNECT (`:method CONNECT`, `:authority` only).
    let https = t.proxy.https(&["h2"]);
    let status = h2_status(&https, Method::CONNECT, "route.test:443").await;
    assert_eq!(status, Ok(405), "HTTP/2 CONNECT");
    let reached = t.reached();
    assert!(reached.is_empty(), "HTTP/2 CONNECT: {reached:?}");
    t.assert_normal_requests_work().await;
    t.proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// TLS (finding 15): the server's cipher-suite order wins
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_server_cipher_suite_order_wins_over_the_clients() {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};

    let t = Routed::start().await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(t.proxy.cert_path()).expect("read dev cert") {
        roots.add(cert.expect("parse dev cert")).expect("trust it");
    }
    // The client prefers ChaCha20 over the AES suites kaproxy lists first (rustls' order).
    for (protocol, client_order, server_pick) in [
        (
            &rustls::version::TLS13,
            vec![
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
            ],
            cipher_suite::TLS13_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS12,
            vec![
                cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            ],
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
    ] {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: client_order,
            ..default_provider()
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[protocol])
            .expect("protocol version")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(t.proxy.server.https_addr().unwrap())
            .await
            .expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let tls = tokio::time::timeout(
            RAW_BOUND,
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .expect("handshake within 5 s")
        .expect("handshake");
        let suite = tls.get_ref().1.negotiated_cipher_suite().expect("suite");
        assert_eq!(
            suite.suite(),
            server_pick.suite(),
            "{protocol:?}: kaproxy picks its own first suite the client offers"
        );
    }
    t.proxy.shutdown().await;
}
