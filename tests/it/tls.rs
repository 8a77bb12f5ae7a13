//! The TLS listener: a development certificate generated on start, ALPN h2 and http/1.1.

use http::Version;

use crate::support::backend::RecordingBackend;
use crate::support::client::{h2_send, KeepAliveClient, Request};
use crate::support::proxy::{test_config, TestProxy};

fn upstream_toml(backend: &RecordingBackend) -> String {
    format!("[upstreams.web]\nservers = [\"{}\"]\n", backend.addr())
}

#[tokio::test]
async fn https_generates_dev_certificate_and_serves_http1() {
    let backend = RecordingBackend::start("tls-up", &[]).await;
    let config = test_config(&upstream_toml(&backend));
    let cert = config.dir.path().join("dev-cert.pem");
    assert!(!cert.exists(), "precondition: no certificate yet");
    let proxy = config.start().await;
    assert!(
        proxy.cert_path().is_file(),
        "kaproxy generates the dev certificate"
    );

    for alpn in [&["http/1.1"][..], &[][..]] {
        let mut client = KeepAliveClient::new(proxy.https(alpn), None);
        for _ in 0..2 {
            let resp = client
                .send(&Request::get("/tls"))
                .await
                .unwrap_or_else(|e| panic!("GET over TLS with ALPN {alpn:?}: {e}"));
            assert_eq!(resp.status, 200);
            assert_eq!(resp.version, Version::HTTP_11);
            assert_eq!(resp.body_text(), "hello from tls-up\n");
        }
        assert_eq!(client.connects, 1, "keep-alive over TLS");
    }
    let seen = backend.requests();
    assert_eq!(seen.len(), 4);
    for req in &seen {
        assert_eq!(req.header("x-forwarded-proto"), "https");
        assert_eq!(req.header("x-forwarded-for"), "127.0.0.1");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn https_negotiates_h2_by_alpn() {
    let backend = RecordingBackend::start("h2-up", &[]).await;
    let proxy = TestProxy::start(&upstream_toml(&backend)).await;
    let endpoint = proxy.https(&["h2", "http/1.1"]);
    let (resp, alpn) = h2_send(&endpoint, &Request::get("/h2"))
        .await
        .expect("GET over h2");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN selects h2");
    assert_eq!(resp.version, Version::HTTP_2);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_text(), "hello from h2-up\n");
    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri.path(), "/h2");
    assert_eq!(seen[0].header("x-forwarded-proto"), "https");
    assert_eq!(seen[0].version, Version::HTTP_11, "upstream stays HTTP/1.1");
    proxy.shutdown().await;
}

#[tokio::test]
async fn http2_connection_gets_goaway_after_max_requests_per_connection() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::time::Duration;

    let backend = RecordingBackend::start("h2-max", &[]).await;
    let proxy = TestProxy::start(&format!(
        "[downstream]\nmax_requests_per_connection = 2\n{}",
        upstream_toml(&backend)
    ))
    .await;
    let endpoint = proxy.https(&["h2"]);
    let (tls, alpn) = crate::support::client::tls_connect(
        endpoint.addr,
        endpoint.tls.clone().expect("tls"),
        None,
    )
    .await
    .expect("tls connect");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let get = || {
        http::Request::get(format!("https://localhost:{}/", endpoint.addr.port()))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    for i in 0..2 {
        let resp = sender
            .send_request(get())
            .await
            .expect("request on the connection");
        assert_eq!(resp.status(), 200, "request {i}");
        resp.into_body().collect().await.expect("body");
    }
    // After the second request kaproxy sends GOAWAY and closes the connection.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the h2 connection did not end after GOAWAY");
    assert!(
        sender.send_request(get()).await.is_err(),
        "no third request on a connection that got GOAWAY"
    );
    assert_eq!(backend.requests().len(), 2);
    proxy.shutdown().await;
}
