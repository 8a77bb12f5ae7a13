//! Hot reload from a real config file: a steady request loop loses nothing while the file is
//! rewritten and reloaded (in-process and by `POST /reload`), new servers get traffic, pools of
//! servers that stay are kept, and a bad file or certificate is refused with file, line and
//! reason while the old configuration keeps serving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kaproxy_testkit::demo::DemoBackend;
use kaproxy_testkit::eventually;
use tokio::time::Instant;

use crate::ops::{admin, demo_backend, scrape, status};
use crate::support::client::{Endpoint, KeepAliveClient, Record, Request, Tally};
use crate::support::config_file::{line_of, ConfigFile};

/// Both listeners, so that a reload also rebuilds the TLS configuration.
const LISTEN: &str = "https = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"";
/// Concurrent request loops.
const LOOPS: usize = 3;
/// Each loop opens a new downstream connection after this many requests, as a pool that
/// rotates connections does; connections opened after a reload are served by the new config.
const RECONNECT_EVERY: usize = 4;
/// Further good reloads (in-process and `POST /reload` in turn) while the loops run.
const RELOAD_ROUNDS: usize = 8;
/// Hard bounds on one loop, whatever happens to the stop flag.
const LOOP_MAX_REQUESTS: usize = 5_000;
const LOOP_MAX_TIME: Duration = Duration::from_secs(20);
/// Bound on each "wait until a backend has served so many" step.
const SERVE_WAIT: Duration = Duration::from_secs(5);

fn upstream(servers: &[(&DemoBackend, u32)], keys: &str) -> String {
    let servers: Vec<String> = servers
        .iter()
        .map(|(b, w)| format!("{{ addr = \"{}\", weight = {w} }}", b.addr()))
        .collect();
    format!(
        "[upstreams.web]\nservers = [{}]\nkeepalive_timeout = \"5s\"\n{keys}\n",
        servers.join(", ")
    )
}

/// Sends `GET /` in a loop until `stop` (bounded in count and time), rotating connections.
async fn request_loop(endpoint: Endpoint, slot: usize, stop: Arc<AtomicBool>) -> Tally {
    let deadline = Instant::now() + LOOP_MAX_TIME;
    let mut tally = Tally::default();
    let mut client = KeepAliveClient::new(endpoint.clone(), None);
    for i in 0..LOOP_MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        if i > 0 && i % RECONNECT_EVERY == 0 {
            tally.connects += client.connects;
            client = KeepAliveClient::new(endpoint.clone(), None);
        }
        let result = client.send(&Request::get("/")).await;
        tally.add(Record {
            slot,
            source: None,
            result,
        });
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    tally.connects += client.connects;
    tally
}

/// Waits (bounded by [`SERVE_WAIT`]) until `backend` has answered at least `n` requests.
async fn wait_served(backend: &DemoBackend, n: u64, what: &str) {
    eventually(
        &format!("{what}: backend {} served {n} requests", backend.name()),
        SERVE_WAIT,
        || backend.stats().requests_served >= n,
    )
    .await;
}

async fn shutdown(server: kaproxy::Server) {
    let done = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
    assert!(done.is_ok(), "kaproxy shutdown took longer than 10 s");
}

// Single-threaded: the support client sends back-to-back requests on one connection without
// awaiting hyper's readiness, which only holds when the connection task cannot lag behind.
#[tokio::test]
async fn reload_under_a_steady_request_loop_loses_no_request_and_refuses_bad_files() {
    let a = demo_backend("a", Duration::from_secs(5)).await;
    let b = demo_backend("b", Duration::from_secs(5)).await;
    let c = demo_backend("c", Duration::from_secs(5)).await;
    let file = ConfigFile::new();
    file.write(&file.text(LISTEN, &upstream(&[(&a, 1)], "idle_timeout = \"4s\"")));
    let server = file.start().await;
    let admin_addr = server.admin_addr().expect("admin listener");
    let endpoint = Endpoint::plain(server.http_addr().expect("http listener"));

    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..LOOPS)
        .map(|slot| tokio::spawn(request_loop(endpoint.clone(), slot, stop.clone())))
        .collect();
    wait_served(&a, 20, "before any reload").await;

    // 1. In-process reload adds b.
    file.write(&file.text(
        LISTEN,
        &upstream(&[(&a, 1), (&b, 1)], "idle_timeout = \"4s\""),
    ));
    server
        .reload()
        .await
        .unwrap_or_else(|e| panic!("reload adding b: {e}"));
    wait_served(&b, 20, "after the reload that added b").await;

    // 2. `POST /reload` adds c and changes weights.
    file.write(&file.text(
        LISTEN,
        &upstream(&[(&a, 1), (&b, 1), (&c, 2)], "idle_timeout = \"4s\""),
    ));
    let resp = admin(admin_addr, &Request::post("/reload", "")).await;
    assert_eq!(resp.status, 200, "POST /reload: {}", resp.body_text());
    wait_served(&c, 20, "after POST /reload added c").await;

    // More reloads back and forth, alternating the two ways, each followed by progress.
    for round in 0..RELOAD_ROUNDS {
        let weights = if round % 2 == 0 { [2, 1, 1] } else { [1, 1, 2] };
        file.write(&file.text(
            LISTEN,
            &upstream(
                &[(&a, weights[0]), (&b, weights[1]), (&c, weights[2])],
                "idle_timeout = \"4s\"",
            ),
        ));
        if round % 2 == 0 {
            server
                .reload()
                .await
                .unwrap_or_else(|e| panic!("reload round {round}: {e}"));
        } else {
            let resp = admin(admin_addr, &Request::post("/reload", "")).await;
            assert_eq!(resp.status, 200, "round {round}: {}", resp.body_text());
        }
        let total = a.stats().requests_served;
        wait_served(&a, total + 5, &format!("after reload round {round}")).await;
    }

    // 3. An invalid file: idle_timeout not below keepalive_timeout - safety_margin.
    let invalid = file.text(
        LISTEN,
        &upstream(&[(&a, 1), (&b, 1)], "idle_timeout = \"5s\""),
    );
    file.write(&invalid);
    let line = line_of(&invalid, "idle_timeout = \"5s\"");
    let at = format!("{}:{line}", file.path.display());
    let err = server
        .reload()
        .await
        .expect_err("a file with idle_timeout >= keepalive_timeout - safety_margin must be refused")
        .to_string();
    assert!(
        err.contains(&at) && err.contains("idle_timeout"),
        "the reload error must name {at} and idle_timeout: {err}"
    );
    let resp = admin(admin_addr, &Request::post("/reload", "")).await;
    assert_eq!(resp.status, 422, "POST /reload of an invalid file");
    let body = resp.body_text();
    assert!(
        body.contains(&at) && body.contains("idle_timeout"),
        "POST /reload must name {at} and idle_timeout: {body}"
    );

    // 4. A certificate that cannot be read (its key exists, so none is generated).
    let missing = file.file("missing-cert.pem");
    let mut bad_cert = file.text(
        LISTEN,
        &upstream(&[(&a, 1), (&b, 1)], "idle_timeout = \"4s\""),
    );
    bad_cert = bad_cert.replacen(
        &format!("cert = {:?}", file.cert_path().display().to_string()),
        &format!("cert = {:?}", missing.display().to_string()),
        1,
    );
    assert!(bad_cert.contains("missing-cert.pem"), "{bad_cert}");
    file.write(&bad_cert);
    let err = server
        .reload()
        .await
        .expect_err("a missing certificate must be refused")
        .to_string();
    assert!(
        err.contains("missing-cert.pem"),
        "the reload error must name the certificate: {err}"
    );
    let resp = admin(admin_addr, &Request::post("/reload", "")).await;
    assert_eq!(resp.status, 422, "POST /reload with a missing certificate");
    assert!(
        resp.body_text().contains("missing-cert.pem"),
        "{}",
        resp.body_text()
    );

    // 5. A certificate file that holds no certificate.
    let garbage = file.file("garbage-cert.pem");
    std::fs::write(&garbage, "this is not a certificate\n").expect("write garbage cert");
    file.write(&bad_cert.replace("missing-cert.pem", "garbage-cert.pem"));
    let err = server
        .reload()
        .await
        .expect_err("a file without a certificate must be refused")
        .to_string();
    assert!(err.contains("garbage-cert.pem"), "{err}");

    // The last good configuration (a, b, c) keeps serving, new connections included.
    let served = [&a, &b, &c].map(|x| x.stats().requests_served);
    for (backend, before) in [&a, &b, &c].into_iter().zip(served) {
        wait_served(backend, before + 10, "after the refused reloads").await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    for l in loops {
        tally.merge(l.await.expect("request loop panicked"));
    }
    eprintln!("reload loop: {}", tally.summary());
    assert_eq!(
        tally.error_count(),
        0,
        "requests failed across reloads: {}",
        tally.summary()
    );
    assert!(
        tally.total() >= 100,
        "too few requests: {}",
        tally.summary()
    );
    for name in ["a", "b", "c"] {
        assert!(
            tally.backends.get(name).copied().unwrap_or(0) > 0,
            "{name} got no traffic: {}",
            tally.summary()
        );
    }
    let st = status(admin_addr).await;
    assert_eq!(
        st["upstreams"][0]["servers"].as_array().map(Vec::len),
        Some(3),
        "the refused files must not have been applied: {st:#}"
    );

    shutdown(server).await;
}

#[tokio::test]
async fn reload_keeps_the_pool_of_a_server_that_stays() {
    let a = demo_backend("a", Duration::from_secs(5)).await;
    let b = demo_backend("b", Duration::from_secs(5)).await;
    let file = ConfigFile::new();
    file.write(&file.text(LISTEN, &upstream(&[(&a, 1)], "idle_timeout = \"4s\"")));
    let server = file.start().await;
    let admin_addr = server.admin_addr().expect("admin listener");
    let endpoint = Endpoint::plain(server.http_addr().expect("http listener"));
    let resp = KeepAliveClient::new(endpoint.clone(), None)
        .send(&Request::get("/"))
        .await
        .expect("request before reload");
    assert_eq!(resp.backend().as_deref(), Some("a"));

    file.write(&file.text(
        LISTEN,
        &upstream(&[(&a, 1), (&b, 1)], "idle_timeout = \"4s\""),
    ));
    server.reload().await.expect("reload");
    let mut backends = Vec::new();
    for _ in 0..2 {
        let resp = KeepAliveClient::new(endpoint.clone(), None)
            .send(&Request::get("/"))
            .await
            .expect("request after reload");
        assert_eq!(resp.status, 200);
        backends.push(resp.backend().unwrap_or_default());
    }
    backends.sort();
    assert_eq!(backends, ["a", "b"], "round robin over a and b");
    let m = scrape(admin_addr).await;
    let a_server = a.addr().to_string();
    let a_only = [("server", a_server.as_str())];
    assert_eq!(
        (
            m.sum("kaproxy_upstream_connections_opened_total", &a_only),
            m.sum("kaproxy_upstream_connections_reused_total", &a_only),
        ),
        (1.0, 1.0),
        "a's pooled connection survives the reload:\n{}",
        m.lines_of("kaproxy_upstream_connections")
    );
    assert_eq!(a.stats().connections_accepted, 1, "{:?}", a.stats());
    shutdown(server).await;
}

#[tokio::test]
async fn reload_applies_to_the_next_request_on_an_open_keep_alive_connection() {
    let a = demo_backend("a", Duration::from_secs(5)).await;
    let b = demo_backend("b", Duration::from_secs(5)).await;
    let file = ConfigFile::new();
    file.write(&file.text(LISTEN, &upstream(&[(&a, 1)], "idle_timeout = \"4s\"")));
    let server = file.start().await;
    let mut client = KeepAliveClient::new(Endpoint::plain(server.http_addr().expect("http")), None);
    let resp = client
        .send(&Request::get("/"))
        .await
        .expect("before reload");
    assert_eq!(resp.backend().as_deref(), Some("a"));

    // a is taken out of rotation; the client's pool keeps its connection.
    file.write(&file.text(LISTEN, &upstream(&[(&b, 1)], "idle_timeout = \"4s\"")));
    server.reload().await.expect("reload");
    let mut answered_by = Vec::new();
    for _ in 0..3 {
        let resp = client.send(&Request::get("/")).await.expect("after reload");
        assert_eq!(resp.status, 200);
        answered_by.push(resp.backend().unwrap_or_default());
    }
    assert_eq!(
        answered_by,
        ["b", "b", "b"],
        "requests sent after the reload must use the new configuration (client connects: {})",
        client.connects
    );
    drop(client);
    shutdown(server).await;
}
