//! Upstream TLS against real Apache httpd 2.4 with mod_ssl (its own config under a temp dir,
//! a test CA made with rcgen): `UpstreamTls::connect` on a socket dialed here, as the pool's
//! connector will call it, then a GET over the TLS stream. Verification by IP and by DNS name,
//! a wrong name, an unknown CA, mutual TLS required by Apache, session resumption, and
//! `kaproxy probe --tls` naming the TLS keys in its recommendation.

use std::error::Error as _;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use kaproxy::config::UpstreamTlsConfig;
use kaproxy::upstream::tls::{rustls_error_in, UpstreamTls, UpstreamTlsError};
use kaproxy_testkit::apache::{require_apache, Apache, ApacheOptions};
use kaproxy_testkit::pki::{TestPki, SERVER_DNS_NAME};
use rustls::pki_types::ServerName;
use rustls::AlertDescription;

/// Apache serving TLS with the test PKI's server certificate; with `mtls`, it also requires
/// a client certificate signed by the test CA.
async fn apache_tls(name: &str, pki: &TestPki, mtls: bool) -> Apache {
    let mut opts = ApacheOptions::new(name).tls(&pki.server_cert, &pki.server_key);
    if mtls {
        opts = opts.require_client_cert(&pki.ca_cert);
    }
    Apache::start(opts)
        .await
        .expect("start apache with mod_ssl")
}

fn verified_by(pki: &TestPki) -> UpstreamTlsConfig {
    UpstreamTlsConfig {
        ca: Some(pki.ca_cert.clone()),
        ..UpstreamTlsConfig::new()
    }
}

fn named(pki: &TestPki, name: &str) -> UpstreamTlsConfig {
    UpstreamTlsConfig {
        server_name: Some(ServerName::try_from(name.to_string()).unwrap()),
        ..verified_by(pki)
    }
}

/// The TLS handshake on a fresh connection to `addr`.
async fn handshake(
    tls: &UpstreamTls,
    addr: SocketAddr,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, bool), UpstreamTlsError> {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("TCP connect to apache");
    tls.connect(tcp, addr).await
}

/// A GET / with `Host: host` over the TLS stream: its status, `X-Backend` and body.
async fn get(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    host: &str,
) -> Result<(StatusCode, String, String), hyper::Error> {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let request = Request::get("/")
        .header(http::header::HOST, host)
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await?;
    let status = response.status();
    let backend = response
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = response.into_body().collect().await?.to_bytes();
    drop(sender);
    let _ = conn.await;
    Ok((status, backend, String::from_utf8_lossy(&body).into_owned()))
}

/// Handshake and GET /: the status, or the error of either (a post-handshake alert shows up
/// in the GET's).
async fn handshake_and_get(
    tls: &UpstreamTls,
    addr: SocketAddr,
    host: &str,
) -> Result<StatusCode, String> {
    let (stream, _) = handshake(tls, addr).await.map_err(|e| e.to_string())?;
    match get(stream, host).await {
        Ok((status, _, _)) => Ok(status),
        Err(e) => Err(match rustls_error_in(&e) {
            Some(tls) => format!("rustls: {tls}"),
            None => format!("{e}: {:?}", e.source()),
        }),
    }
}

#[tokio::test]
async fn upstream_tls_to_apache_verifies_by_ip_and_by_name_and_get_is_answered_200() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-get", &pki, false).await;
    let addr = apache.addr();
    let by_ip = UpstreamTls::new(&verified_by(&pki)).unwrap();
    let (stream, resumed) = handshake(&by_ip, addr)
        .await
        .unwrap_or_else(|e| panic!("handshake: {e}\n{}", apache.error_log()));
    assert!(!resumed, "a first handshake is a full one");
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "kaproxy offers http/1.1 only"
    );
    let (status, backend, body) = get(stream, "127.0.0.1").await.expect("GET over TLS");
    assert_eq!(
        (status, backend.as_str()),
        (StatusCode::OK, "tls-get"),
        "{body}"
    );
    assert!(body.contains("hello from tls-get"), "{body}");

    // By DNS name: sent as SNI, verified against the certificate's DNS SAN.
    let by_name = UpstreamTls::new(&named(&pki, SERVER_DNS_NAME)).unwrap();
    assert_eq!(
        handshake_and_get(&by_name, addr, SERVER_DNS_NAME).await,
        Ok(StatusCode::OK),
        "{}",
        apache.error_log()
    );
}

#[tokio::test]
async fn upstream_tls_to_apache_with_a_wrong_name_fails_naming_it() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-wrong-name", &pki, false).await;
    let tls = UpstreamTls::new(&named(&pki, "wrong.example")).unwrap();
    let err = handshake(&tls, apache.addr()).await.unwrap_err();
    assert!(
        matches!(&err, UpstreamTlsError::NameMismatch { name, .. } if name == "wrong.example"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("not valid for wrong.example (tls_server_name"),
        "{text}"
    );
    assert!(
        err.source()
            .is_some_and(|s| s.downcast_ref::<rustls::Error>().is_some()),
        "rustls' error is kept as the source: {err:?}"
    );
}

#[tokio::test]
async fn upstream_tls_to_apache_with_an_unknown_ca_fails() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-unknown-ca", &pki, false).await;
    let other_ca = UpstreamTls::new(&UpstreamTlsConfig {
        ca: Some(pki.other_ca_cert.clone()),
        ..UpstreamTlsConfig::new()
    })
    .unwrap();
    let built_in_roots = UpstreamTls::new(&UpstreamTlsConfig::new()).unwrap();
    for (tls, roots) in [
        (other_ca, pki.other_ca_cert.display().to_string()),
        (built_in_roots, "webpki-roots".to_string()),
    ] {
        let err = handshake(&tls, apache.addr()).await.unwrap_err();
        assert!(matches!(err, UpstreamTlsError::UnknownCa { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("not signed by a trusted CA") && text.contains(&roots),
            "{text}"
        );
    }
}

#[tokio::test]
async fn upstream_tls_to_apache_requiring_a_client_cert_works_with_it_and_is_refused_without() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-mtls", &pki, true).await;
    let with_cert = UpstreamTls::new(&UpstreamTlsConfig {
        client_cert: Some(pki.client_cert.clone()),
        client_key: Some(pki.client_key.clone()),
        ..verified_by(&pki)
    })
    .unwrap();
    assert_eq!(
        handshake_and_get(&with_cert, apache.addr(), "127.0.0.1").await,
        Ok(StatusCode::OK),
        "{}",
        apache.error_log()
    );
    // Without: under TLS 1.3 Apache's refusal is an alert after the client's side of the
    // handshake, so it comes with the first read; no response either way.
    let without = UpstreamTls::new(&verified_by(&pki)).unwrap();
    let refused = handshake_and_get(&without, apache.addr(), "127.0.0.1")
        .await
        .expect_err("Apache answered a client without a certificate");
    let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
    assert_eq!(refused, format!("rustls: {alert}"));
}

#[tokio::test]
async fn upstream_tls_to_apache_resumes_the_session_on_the_second_handshake() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-resume", &pki, false).await;
    let addr = apache.addr();
    let resumption_on = UpstreamTls::new(&verified_by(&pki)).unwrap();
    let resumption_off = UpstreamTls::new(&UpstreamTlsConfig {
        session_resumption: false,
        ..verified_by(&pki)
    })
    .unwrap();
    for (tls, second_resumed) in [(resumption_on, true), (resumption_off, false)] {
        let mut resumed = Vec::new();
        for _ in 0..2 {
            let (stream, r) = handshake(&tls, addr)
                .await
                .unwrap_or_else(|e| panic!("handshake: {e}\n{}", apache.error_log()));
            resumed.push(r);
            // The exchange reads Apache's session tickets, sent after its handshake.
            let (status, _, _) = get(stream, "127.0.0.1").await.expect("GET over TLS");
            assert_eq!(status, StatusCode::OK);
        }
        assert_eq!(
            resumed,
            [false, second_resumed],
            "resumed per handshake, resumption {}",
            if second_resumed { "on" } else { "off" }
        );
    }
}

#[tokio::test]
async fn upstream_tls_probe_of_apache_over_tls_recommends_the_tls_keys() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-probe", &pki, false).await;
    let report = kaproxy::control::probe::probe(
        &apache.addr().to_string(),
        true,
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("probe --tls: {e}\n{}", apache.error_log()));
    let text = report.to_string();
    assert_eq!(report.status, 200, "{text}");
    assert!(report.recommendation().is_some(), "{text}");
    let settings = text
        .split_once("recommended [upstreams.NAME] settings:\n")
        .unwrap_or_else(|| panic!("{text}"))
        .1;
    assert!(settings.contains("\n  tls = true\n"), "{text}");
    assert!(
        settings.contains("# tls_server_name = \"...\"   default: the server's IP (127.0.0.1)"),
        "{text}"
    );
    assert!(settings.contains("# tls_ca = \"ca.pem\""), "{text}");
}

// ---- Through kaproxy: `tls = true` in `[upstreams.NAME]`, the pool's connector doing TLS ----

use crate::support::client::{KeepAliveClient, Request as ClientRequest};
use crate::support::proxy::{test_config, TestProxy, CLOSED_TOTAL};

const HANDSHAKES: &str = "kaproxy_upstream_tls_handshakes_total";
const RESUMPTIONS: &str = "kaproxy_upstream_tls_resumptions_total";
const ERRORS: &str = "kaproxy_upstream_errors_total";

fn tls_upstream(apache: &Apache, keys: &str) -> String {
    format!(
        "[upstreams.web]\nservers = [\"{}\"]\ntls = true\n{keys}\n",
        apache.addr()
    )
}

fn ca_key(path: &std::path::Path) -> String {
    format!("tls_ca = {:?}\n", path.display().to_string())
}

/// `n` GETs on one client connection; their statuses.
async fn statuses(proxy: &TestProxy, n: usize) -> Vec<u16> {
    let mut client = KeepAliveClient::new(proxy.http(), None);
    let mut out = Vec::new();
    for _ in 0..n {
        let resp = client
            .send(&ClientRequest::get("/"))
            .await
            .expect("kaproxy answers");
        out.push(resp.status.as_u16());
    }
    out
}

#[tokio::test]
async fn kaproxy_reencrypts_to_apache_reuses_the_connection_and_resumes_sessions() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-proxy", &pki, false).await;
    // Three requests on one pooled connection, then two on connections of their own.
    let proxy = TestProxy::start(&tls_upstream(&apache, &ca_key(&pki.ca_cert))).await;
    assert_eq!(statuses(&proxy, 3).await, vec![200, 200, 200]);
    let m = proxy.metrics();
    assert_eq!(m.sum(HANDSHAKES, &[]), 1.0, "{}", m.lines_of(HANDSHAKES));
    assert_eq!(
        m.sum("kaproxy_upstream_connections_reused_total", &[]),
        2.0,
        "the TLS connection is pooled and reused"
    );
    proxy.shutdown().await;

    let proxy = TestProxy::start(&tls_upstream(
        &apache,
        &format!("{}max_requests_per_connection = 1\n", ca_key(&pki.ca_cert)),
    ))
    .await;
    assert_eq!(statuses(&proxy, 3).await, vec![200, 200, 200]);
    let m = proxy.metrics();
    assert_eq!(m.sum(HANDSHAKES, &[]), 3.0, "{}", m.lines_of(HANDSHAKES));
    assert!(
        m.sum(RESUMPTIONS, &[]) >= 2.0,
        "the 2nd and 3rd handshakes resume the session: {}",
        m.lines_of(RESUMPTIONS)
    );
    assert_eq!(
        m.sum(CLOSED_TOTAL, &[("reason", "max_requests")]),
        3.0,
        "{}",
        m.lines_of(CLOSED_TOTAL)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn kaproxy_answers_502_for_a_backend_it_cannot_verify_and_never_falls_back_to_plain() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-refuse", &pki, false).await;
    for (what, keys) in [
        (
            "a wrong name",
            format!("{}tls_server_name = \"wrong.test\"\n", ca_key(&pki.ca_cert)),
        ),
        ("an unknown CA", ca_key(&pki.other_ca_cert)),
    ] {
        let proxy = TestProxy::start(&tls_upstream(&apache, &keys)).await;
        // A plain request to Apache's TLS port would be answered 400 by Apache itself.
        assert_eq!(statuses(&proxy, 1).await, vec![502], "{what}");
        let m = proxy.metrics();
        assert!(
            m.sum(ERRORS, &[("kind", "tls")]) >= 1.0,
            "{what}: counted as a tls error: {}",
            m.lines_of(ERRORS)
        );
        assert_eq!(m.sum(HANDSHAKES, &[]), 0.0, "{what}");
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn kaproxy_presents_its_client_certificate_to_apache_requiring_one() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-proxy-mtls", &pki, true).await;
    let with_cert = format!(
        "{}tls_client_cert = {:?}\ntls_client_key = {:?}\n",
        ca_key(&pki.ca_cert),
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string()
    );
    let proxy = TestProxy::start(&tls_upstream(&apache, &with_cert)).await;
    assert_eq!(
        statuses(&proxy, 2).await,
        vec![200, 200],
        "{}",
        apache.error_log()
    );
    proxy.shutdown().await;

    let proxy = TestProxy::start(&tls_upstream(&apache, &ca_key(&pki.ca_cert))).await;
    assert_eq!(statuses(&proxy, 1).await, vec![502], "refused without one");
    // Under TLS 1.3 the refusal comes with the first read, after the handshake: still a
    // failed handshake (kind `tls`), not a reset or a close of the backend.
    let m = proxy.metrics();
    assert!(
        m.sum(ERRORS, &[("kind", "tls")]) >= 1.0,
        "counted as tls: {}",
        m.lines_of(ERRORS)
    );
    assert_eq!(
        m.sum(ERRORS, &[("kind", "reset")]) + m.sum(ERRORS, &[("kind", "closed_before_response")]),
        0.0,
        "{}",
        m.lines_of(ERRORS)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_tls_files_are_read_again_on_reload_and_a_bad_one_keeps_the_old() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-reload", &pki, false).await;
    // The configured CA file starts as the wrong CA, at a path of the test's own.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("backend-ca.pem");
    std::fs::copy(&pki.other_ca_cert, &ca).unwrap();
    let config = test_config(&tls_upstream(&apache, &ca_key(&ca)));
    let proxy = config.start().await;
    assert_eq!(statuses(&proxy, 1).await, vec![502], "unknown CA at first");

    // The same configuration, the CA file replaced: a reload reads it again.
    std::fs::copy(&pki.ca_cert, &ca).unwrap();
    proxy.server.reload().await.expect("reload");
    assert_eq!(
        statuses(&proxy, 1).await,
        vec![200],
        "the new CA file applies"
    );

    // A broken CA file: the reload is refused and the working configuration keeps serving.
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let err = proxy
        .server
        .reload()
        .await
        .expect_err("a bad CA file is refused");
    let text = err.to_string();
    assert!(text.contains("tls_ca"), "names the key: {text}");
    assert_eq!(
        statuses(&proxy, 2).await,
        vec![200, 200],
        "old config serves"
    );
    proxy.shutdown().await;
}

/// Apache with mod_ssl and KeepAliveTimeout 1 s.
async fn apache_tls_keepalive_1s(name: &str, pki: &TestPki) -> Apache {
    Apache::start(
        ApacheOptions::new(name)
            .tls(&pki.server_cert, &pki.server_key)
            .keep_alive_timeout(std::time::Duration::from_secs(1)),
    )
    .await
    .expect("start apache with mod_ssl")
}

#[tokio::test]
async fn a_tls_connection_apache_closed_while_idle_is_not_reused_and_counts_as_server_close() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls_keepalive_1s("tls-idle-close", &pki).await;
    // The control pool trusts a connection for 9 s; Apache ends it (close_notify, FIN) after
    // 1 s. The check before reuse must see that and open a new connection, not fail.
    let mut config = test_config(&tls_upstream(&apache, &ca_key(&pki.ca_cert)));
    config.naive_pool(false);
    let proxy = config.start().await;
    let mut client = KeepAliveClient::new(proxy.http(), None);
    let first = client.send(&ClientRequest::get("/")).await.expect("first");
    assert_eq!(first.status, 200);
    // Past Apache's KeepAliveTimeout (1 s) with room: Apache has closed its side by now.
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let second = client.send(&ClientRequest::get("/")).await.expect("second");
    assert_eq!(second.status, 200, "no client-visible error");
    let m = proxy.metrics();
    assert_eq!(
        m.sum(CLOSED_TOTAL, &[("reason", "server_close")]),
        1.0,
        "the closed connection was found before reuse: {}",
        m.lines_of(CLOSED_TOTAL)
    );
    assert_eq!(m.sum(HANDSHAKES, &[]), 2.0, "{}", m.lines_of(HANDSHAKES));
    assert_eq!(
        m.sum("kaproxy_upstream_retries_total", &[]),
        0.0,
        "found at checkout, not by a failed request"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn active_health_checks_speak_tls_with_the_traffic_settings() {
    if !require_apache() {
        return;
    }
    let pki = TestPki::generate().unwrap();
    let apache = apache_tls("tls-health", &pki, false).await;
    let health = "[upstreams.web.health]\npath = \"/\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n";
    // Verified with the right CA: the probes handshake and keep the server up.
    let proxy = TestProxy::start(&format!(
        "{}{health}",
        tls_upstream(&apache, &ca_key(&pki.ca_cert))
    ))
    .await;
    let (m, probed) = proxy
        .wait_metrics(std::time::Duration::from_secs(5), |m| {
            m.sum(HANDSHAKES, &[]) >= 3.0
        })
        .await;
    assert!(
        probed,
        "the probes handshake over TLS: {}",
        m.lines_of(HANDSHAKES)
    );
    assert_eq!(m.sum("kaproxy_server_up", &[]), 1.0, "{}", m.0);
    proxy.shutdown().await;

    // The wrong CA: the probes fail verification, as requests would, and mark it down.
    let proxy = TestProxy::start(&format!(
        "{}{health}",
        tls_upstream(&apache, &ca_key(&pki.other_ca_cert))
    ))
    .await;
    let (m, down) = proxy
        .wait_metrics(std::time::Duration::from_secs(5), |m| {
            m.sum("kaproxy_server_up", &[]) == 0.0
        })
        .await;
    assert!(down, "an unverifiable backend is marked down: {}", m.0);
    proxy.shutdown().await;
}
