//! Self-tests of the test harness: Apache, the recording upstream and the downstream client,
//! talking to each other directly (no kaproxy), so a proxy test failure is never the harness's.

use std::net::IpAddr;
use std::time::Duration;

use crate::support::backend::RecordingBackend;
use crate::support::client::{Endpoint, KeepAliveClient, Load, Request};
use kaproxy_testkit::apache::{require_apache, Apache, ApacheOptions};

#[tokio::test]
async fn apache_answers_get_and_post_and_advertises_keep_alive() {
    if !require_apache() {
        return;
    }
    let apache = Apache::start(ApacheOptions::new("h1").max_keep_alive_requests(50))
        .await
        .expect("start apache");
    let mut client = KeepAliveClient::new(Endpoint::plain(apache.addr()), None);

    let get = client
        .send(
            &Request::get("/")
                .header("connection", "keep-alive")
                .header("x-forwarded-for", "192.0.2.1"),
        )
        .await
        .expect("GET");
    assert_eq!(get.status, 200, "{}", apache.error_log());
    assert_eq!(get.backend().as_deref(), Some("h1"));
    assert!(
        get.body_text().contains("hello from h1"),
        "{}",
        get.body_text()
    );
    assert_eq!(get.header("x-seen-forwarded-for"), "192.0.2.1");
    let keep_alive = get.header("keep-alive");
    assert!(
        keep_alive.contains("timeout=1") && keep_alive.contains("max=50"),
        "Keep-Alive: {keep_alive:?}"
    );

    let post = client
        .send(&Request::post("/echo", "some posted bytes").header("x-foo", "bar"))
        .await
        .expect("POST");
    assert_eq!(post.status, 200, "{}", apache.error_log());
    assert_eq!(post.body_text(), "some posted bytes");
    assert_eq!(post.header("x-seen-x-foo"), "bar");
    assert_eq!(
        client.connects, 1,
        "both requests on one keep-alive connection"
    );
}

#[tokio::test]
async fn apache_closes_idle_connection_and_client_reconnects_without_error() {
    if !require_apache() {
        return;
    }
    let apache = Apache::start(ApacheOptions::new("h2"))
        .await
        .expect("start apache");
    // Pauses well past Apache's 1 s KeepAliveTimeout: Apache closes first, the client notices
    // the FIN before reuse (as a pool would) and reconnects; nothing is an error.
    let tally = Load::new(Endpoint::plain(apache.addr()), Request::get("/"))
        .connections(2)
        .requests_per_connection(3)
        .pause(Duration::from_millis(1600), Duration::from_millis(1700))
        .run()
        .await;
    assert_eq!(tally.error_count(), 0, "{}", tally.summary());
    assert_eq!(tally.ok, 6, "{}", tally.summary());
    assert_eq!(tally.graceful_closes, 4, "{}", tally.summary());
    assert_eq!(tally.connects, 6, "{}", tally.summary());
}

#[tokio::test]
async fn apache_hard_restart_serves_again_on_the_same_port() {
    if !require_apache() {
        return;
    }
    let mut apache = Apache::start(ApacheOptions::new("h3"))
        .await
        .expect("start apache");
    let addr = apache.addr();
    let mut client = KeepAliveClient::new(Endpoint::plain(addr), None);
    assert_eq!(
        client.send(&Request::get("/")).await.expect("GET").status,
        200
    );
    apache.hard_restart().await.expect("hard restart");
    assert_eq!(apache.addr(), addr);
    let mut fresh = KeepAliveClient::new(Endpoint::plain(addr), None);
    let resp = fresh
        .send(&Request::get("/"))
        .await
        .expect("GET after restart");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.backend().as_deref(), Some("h3"));

    apache.stop().await;
    let mut after_stop = KeepAliveClient::new(Endpoint::plain(addr), None);
    assert!(
        after_stop.send(&Request::get("/")).await.is_err(),
        "a stopped Apache must refuse connections"
    );
}

#[tokio::test]
async fn recording_backend_sees_the_client_source_address_and_headers() {
    let backend = RecordingBackend::start("rec", &[("x-extra", "1")]).await;
    let source: IpAddr = "127.0.0.9".parse().unwrap();
    let mut client = KeepAliveClient::new(Endpoint::plain(backend.addr()), Some(source));
    let resp = client
        .send(&Request::post("/p?q=1", "abc").header("x-foo", "bar"))
        .await
        .expect("POST");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-extra"), "1");
    assert_eq!(resp.backend().as_deref(), Some("rec"));
    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer.ip(), source);
    assert_eq!(seen[0].header("x-foo"), "bar");
    assert_eq!(seen[0].uri.to_string(), "/p?q=1");
    assert_eq!(&seen[0].body[..], b"abc");
}
