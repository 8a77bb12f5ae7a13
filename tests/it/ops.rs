//! What an operator reads from the admin listener: `/metrics` after known traffic, `/status`
//! JSON, the status page as headless Chromium renders it (with its `/history` charts), and
//! active health checks taking a stopped server out of rotation and back.

use std::net::SocketAddr;
use std::time::Duration;

use kaproxy_testkit::demo::{DemoBackend, DemoBackendConfig};
use kaproxy_testkit::poll_until;
use tokio::time::Instant;

use crate::support::chromium::{self, Output};
use crate::support::client::{Endpoint, KeepAliveClient, Request, Response};
use crate::support::proxy::{Metrics, TestProxy, CLOSED_TOTAL, POOL_IDLE};

const REQUESTS_TOTAL: &str = "kaproxy_requests_total";
const OPENED_TOTAL: &str = "kaproxy_upstream_connections_opened_total";
const REUSED_TOTAL: &str = "kaproxy_upstream_connections_reused_total";
const SERVER_UP: &str = "kaproxy_server_up";
const DOWNSTREAM_CONNECTIONS: &str = "kaproxy_downstream_connections";
const DURATION_COUNT: &str = "kaproxy_request_duration_seconds_count";
/// Bound on one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A demo backend on a free loopback port with `keepalive` as its KeepAliveTimeout.
pub async fn demo_backend(name: &str, keepalive: Duration) -> DemoBackend {
    DemoBackend::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        DemoBackendConfig {
            name: name.to_string(),
            keepalive_timeout: keepalive,
            ..DemoBackendConfig::default()
        },
    )
    .await
    .expect("start demo backend")
}

/// One request to the admin listener at `addr`, on its own connection.
pub async fn admin(addr: SocketAddr, req: &Request) -> Response {
    KeepAliveClient::new(Endpoint::plain(addr), None)
        .with_timeout(ADMIN_TIMEOUT)
        .send(req)
        .await
        .unwrap_or_else(|e| panic!("admin {} {}: {e}", req.method, req.path))
}

/// `GET path` on the admin listener; panics unless 200.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Response {
    let resp = admin(addr, &Request::get(path)).await;
    assert_eq!(resp.status, 200, "GET {path}: {}", resp.body_text());
    resp
}

/// `/metrics` fetched over HTTP from the admin listener.
pub async fn scrape(addr: SocketAddr) -> Metrics {
    let resp = admin_get(addr, "/metrics").await;
    assert!(
        resp.header("content-type").contains("text"),
        "content-type {:?}",
        resp.header("content-type")
    );
    Metrics(resp.body_text())
}

/// `/status` fetched over HTTP and parsed.
pub async fn status(addr: SocketAddr) -> serde_json::Value {
    let resp = admin_get(addr, "/status").await;
    serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", resp.body_text()))
}

/// kaproxy in front of one demo backend (keep-alive `backend_keepalive`, advertised in its
/// `Keep-Alive` header) after one request through it, so the pool has learned the backend's
/// timeout. Returns the backend (keep it alive), the proxy and its admin address.
async fn proxy_after_one_request(
    name: &str,
    backend_keepalive: Duration,
    upstream_keys: &str,
) -> (DemoBackend, TestProxy, SocketAddr) {
    let backend = demo_backend(name, backend_keepalive).await;
    let proxy = TestProxy::start(&upstream_toml("web", &[&backend], upstream_keys)).await;
    let admin_addr = proxy.server.admin_addr().expect("admin listener");
    let resp = KeepAliveClient::new(proxy.http(), None)
        .send(&Request::get("/"))
        .await
        .expect("request");
    assert_eq!(resp.status, 200);
    (backend, proxy, admin_addr)
}

fn upstream_toml(name: &str, servers: &[&DemoBackend], keys: &str) -> String {
    let servers: Vec<String> = servers
        .iter()
        .map(|b| format!("\"{}\"", b.addr()))
        .collect();
    format!(
        "[upstreams.{name}]\nservers = [{}]\n{keys}\n",
        servers.join(", ")
    )
}

#[tokio::test]
async fn metrics_after_known_traffic_show_requests_reuse_and_kaproxy_idle_closes() {
    const N: usize = 12;
    // The backend keeps idle connections 2 s (and says so in Keep-Alive); kaproxy gives up
    // on them after 500 ms, so every close must be kaproxy's, by reason "idle".
    let backend = demo_backend("ka2s", Duration::from_secs(2)).await;
    let server = backend.addr().to_string();
    let proxy = TestProxy::start(&upstream_toml(
        "web",
        &[&backend],
        "keepalive_timeout = \"2s\"\nidle_timeout = \"500ms\"",
    ))
    .await;
    let admin_addr = proxy.server.admin_addr().expect("admin listener");

    let mut client = KeepAliveClient::new(proxy.http(), None);
    for i in 0..N {
        let resp = client
            .send(&Request::get("/"))
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(resp.status, 200, "request {i}: {}", resp.body_text());
    }
    assert_eq!(client.connects, 1, "one downstream keep-alive connection");

    // Bounded wait for the sweep: every upstream connection closed, by kaproxy, idle.
    let (m, settled) = proxy
        .wait_metrics(Duration::from_secs(3), |m| {
            let opened = m.sum(OPENED_TOTAL, &[]);
            opened >= 1.0
                && m.sum(CLOSED_TOTAL, &[]) == opened
                && m.sum(CLOSED_TOTAL, &[("reason", "idle")]) >= 1.0
                && m.sum(POOL_IDLE, &[]) == 0.0
        })
        .await;
    assert!(
        settled,
        "the idle upstream connection was not closed by kaproxy within 3 s:\n{}\n{}",
        m.lines_of(CLOSED_TOTAL),
        m.lines_of(POOL_IDLE)
    );

    // What an operator scrapes.
    let m = scrape(admin_addr).await;
    let ctx = || {
        format!(
            "\n{}\n{}\n{}\n{}\n{}",
            m.lines_of(REQUESTS_TOTAL),
            m.lines_of("kaproxy_upstream_connections"),
            m.lines_of(POOL_IDLE),
            m.lines_of(SERVER_UP),
            m.lines_of(DOWNSTREAM_CONNECTIONS)
        )
    };
    let this = [("server", server.as_str())];
    assert_eq!(
        m.sum(
            REQUESTS_TOTAL,
            &[("upstream", "web"), ("server", &server), ("status", "200")]
        ),
        N as f64,
        "requests_total{{status=200}}{}",
        ctx()
    );
    assert_eq!(m.sum(REQUESTS_TOTAL, &[]), N as f64, "{}", ctx());
    assert_eq!(m.sum(DURATION_COUNT, &[]), N as f64, "{}", ctx());
    let opened = m.sum(OPENED_TOTAL, &this);
    let reused = m.sum(REUSED_TOTAL, &this);
    let stats = backend.stats();
    assert!(opened >= 1.0, "{}", ctx());
    assert_eq!(
        opened + reused,
        N as f64,
        "every request went out on an opened or a reused connection{}",
        ctx()
    );
    assert!(
        reused >= (N / 2) as f64,
        "sequential requests reuse the pooled connection{}",
        ctx()
    );
    assert_eq!(
        opened,
        stats.connections_accepted as f64,
        "kaproxy's opened count is what the backend accepted ({stats:?}){}",
        ctx()
    );
    assert_eq!(stats.requests_served, N as u64, "{stats:?}");
    assert!(
        m.sum(CLOSED_TOTAL, &[("server", &server), ("reason", "idle")]) >= 1.0,
        "{}",
        ctx()
    );
    assert_eq!(
        m.sum(CLOSED_TOTAL, &[("reason", "server_close")]),
        0.0,
        "no backend-initiated close may be counted{}",
        ctx()
    );
    assert_eq!(
        m.sum(CLOSED_TOTAL, &this),
        opened,
        "every opened connection is closed{}",
        ctx()
    );
    assert_eq!(
        stats.idle_closes, 0,
        "the backend itself closed an idle connection: {stats:?}"
    );
    assert_eq!(m.sum(POOL_IDLE, &this), 0.0, "{}", ctx());
    assert!(m.has(POOL_IDLE), "{}", ctx());
    assert_eq!(
        m.sum(SERVER_UP, &[("upstream", "web"), ("server", &server)]),
        1.0,
        "{}",
        ctx()
    );
    assert!(m.has(DOWNSTREAM_CONNECTIONS), "{}", ctx());
    assert_eq!(
        m.sum(DOWNSTREAM_CONNECTIONS, &[("listener", "http")]),
        1.0,
        "the test client's keep-alive connection is open{}",
        ctx()
    );
    drop(client);
    proxy.shutdown().await;
}

#[tokio::test]
async fn status_json_shows_servers_health_pool_and_learned_keepalive_timeout() {
    // Configured 4 s, but the backend advertises (and uses) 3 s: kaproxy must learn 3 s.
    let backend = demo_backend("ka3s", Duration::from_secs(3)).await;
    let proxy = TestProxy::start(&format!(
        "[downstream]\nidle_timeout = \"30s\"\n\n{}",
        upstream_toml(
            "web",
            &[&backend],
            "keepalive_timeout = \"4s\"\nidle_timeout = \"2s\"\nsafety_margin = \"500ms\""
        )
    ))
    .await;
    let admin_addr = proxy.server.admin_addr().expect("admin listener");

    let before = status(admin_addr).await;
    let server = &before["upstreams"][0]["servers"][0];
    assert!(
        server["learned_keepalive_timeout_s"].is_null(),
        "nothing learned before any response: {before:#}"
    );
    assert_eq!(server["effective_keepalive_timeout_s"], 4.0, "{before:#}");
    assert_eq!(server["keepalive_timeout_source"], "config", "{before:#}");

    let mut client = KeepAliveClient::new(proxy.http(), None);
    let resp = client.send(&Request::get("/")).await.expect("request");
    assert_eq!(resp.status, 200);
    // The upstream connection goes back to the pool as the response ends; wait (bounded, well
    // within the 2 s idle timeout) until /status shows it there.
    let mut st = serde_json::Value::Null;
    poll_until(Duration::from_secs(1), async || {
        st = status(admin_addr).await;
        st["upstreams"][0]["servers"][0]["idle_connections"] == 1
    })
    .await;
    let ctx = format!("{st:#}");

    assert_eq!(st["downstream"]["idle_timeout_s"], 30.0, "{ctx}");
    let ups = st["upstreams"].as_array().expect("upstreams array");
    assert_eq!(ups.len(), 1, "{ctx}");
    let web = &ups[0];
    assert_eq!(web["name"], "web", "{ctx}");
    assert_eq!(web["balance"], "round_robin", "{ctx}");
    assert_eq!(web["idle_timeout_s"], 2.0, "{ctx}");
    assert_eq!(web["keepalive_timeout_s"], 4.0, "{ctx}");
    assert_eq!(web["safety_margin_s"], 0.5, "{ctx}");
    let servers = web["servers"].as_array().expect("servers array");
    assert_eq!(servers.len(), 1, "{ctx}");
    let s = &servers[0];
    assert_eq!(s["addr"], backend.addr().to_string(), "{ctx}");
    assert_eq!(s["up"], true, "{ctx}");
    assert_eq!(s["weight"], 1, "{ctx}");
    // The request is done and its connection back in the pool (idle for up to 2 s).
    assert_eq!(s["idle_connections"], 1, "{ctx}");
    assert_eq!(s["busy_connections"], 0, "{ctx}");
    assert_eq!(s["learned_keepalive_timeout_s"], 3.0, "{ctx}");
    assert_eq!(s["effective_keepalive_timeout_s"], 3.0, "{ctx}");
    assert_eq!(s["keepalive_timeout_source"], "header", "{ctx}");
    assert!(s["observed_keepalive_timeout_s"].is_null(), "{ctx}");
    let closed = s["closed"].as_object().expect("closed by reason");
    for reason in [
        "idle",
        "learned_timeout",
        "lifetime",
        "max_requests",
        "server_close",
        "error",
        "surplus",
    ] {
        assert_eq!(closed.get(reason), Some(&0.into()), "{reason}: {ctx}");
    }

    // After kaproxy's sweep the pool is empty and the close is counted by reason.
    let mut last = st;
    poll_until(Duration::from_secs(5), async || {
        last = status(admin_addr).await;
        last["upstreams"][0]["servers"][0]["closed"]["idle"] == 1
    })
    .await;
    let s = &last["upstreams"][0]["servers"][0];
    assert_eq!(s["closed"]["idle"], 1, "{last:#}");
    assert_eq!(s["closed"]["server_close"], 0, "{last:#}");
    assert_eq!(s["idle_connections"], 0, "{last:#}");
    drop(client);
    proxy.shutdown().await;
}

/// The status page of `admin`, rendered by headless Chromium: its DOM, and a screenshot when
/// `screenshot` names a file.
async fn render_status_page(admin: SocketAddr, screenshot: Option<&std::path::Path>) -> String {
    let profiles = tempfile::Builder::new()
        .prefix("kaproxy-chromium-")
        .tempdir()
        .expect("temp dir");
    let url = format!("http://{admin}/");
    let (dom_profile, shot_profile) = (profiles.path().join("dom"), profiles.path().join("shot"));
    let dom = chromium::headless(&url, Output::Dom, &dom_profile);
    match screenshot {
        None => dom.await,
        Some(path) => {
            let shot = chromium::headless(
                &url,
                Output::Screenshot {
                    path: path.to_path_buf(),
                    width: 900,
                    height: 1000,
                },
                &shot_profile,
            );
            tokio::join!(dom, shot).0
        }
    }
}

/// The tags inside the `<svg data-timeline="{id}">` of `dom`.
fn timeline_tags(dom: &str, id: &str) -> Vec<chromium::Tag> {
    let marker = format!("data-timeline=\"{id}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no <svg {marker}> in the rendered page:\n{dom}"));
    let end = dom[start..].find("</svg>").map_or(dom.len(), |e| start + e);
    chromium::tags(&dom[start..end])
}

/// The rendered card of upstream `name` (up to the next card).
fn upstream_card<'a>(dom: &'a str, name: &str) -> &'a str {
    let marker = format!("data-upstream=\"{name}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no card {marker} in the rendered page:\n{dom}"));
    let end = dom[start + marker.len()..]
        .find("data-upstream=")
        .map_or(dom.len(), |e| start + marker.len() + e);
    &dom[start..end]
}

/// The `data-x` of the kaproxy-idle bar's end and of each backend-keepalive line.
/// For every server row of an upstream's timeline: where kaproxy's reuse bar ends and where
/// the backend's keep-alive line is (in drawing order, one pair per server).
fn idle_and_keepalive_x(dom: &str, upstream: &str) -> Vec<(f64, f64)> {
    let tags = timeline_tags(dom, upstream);
    let idle: Vec<f64> = tags
        .iter()
        .filter(|t| t.name == "rect" && t.attr("data-role") == Some("kaproxy-idle"))
        .map(|t| t.number("data-x"))
        .collect();
    let keepalive: Vec<f64> = tags
        .iter()
        .filter(|t| t.name == "line" && t.attr("data-role") == Some("backend-keepalive"))
        .map(|t| t.number("data-x"))
        .collect();
    assert!(!idle.is_empty(), "no kaproxy-idle bar: {tags:#?}");
    assert_eq!(
        idle.len(),
        keepalive.len(),
        "one kaproxy-idle bar and one backend-keepalive line per server: {tags:#?}"
    );
    idle.into_iter().zip(keepalive).collect()
}

#[tokio::test]
async fn status_page_in_chromium_draws_kaproxy_idle_left_of_backend_keepalive() {
    if !chromium::require_chromium() {
        return;
    }
    let (backend, proxy, admin_addr) = proxy_after_one_request(
        "ka2s",
        Duration::from_secs(2),
        "keepalive_timeout = \"2s\"\nidle_timeout = \"1s\"",
    )
    .await;

    let shots = tempfile::Builder::new()
        .prefix("kaproxy-shot-")
        .tempdir()
        .expect("temp dir");
    let png = shots.path().join("status.png");
    let dom = render_status_page(admin_addr, Some(&png)).await;

    let body = chromium::tags(&dom)
        .into_iter()
        .find(|t| t.name == "body")
        .unwrap_or_else(|| panic!("no <body> in\n{dom}"));
    assert_eq!(
        body.attr("data-rendered"),
        Some("yes"),
        "the page did not render /status:\n{dom}"
    );
    let rows = idle_and_keepalive_x(&dom, "web");
    assert_eq!(rows.len(), 1, "one server, one row:\n{dom}");
    let (idle_x, keepalive_x) = rows[0];
    assert!(
        idle_x < keepalive_x,
        "kaproxy's idle bar ends at x={idle_x}, not left of the backend's keep-alive line at \
         x={keepalive_x}:\n{dom}"
    );
    let card = upstream_card(&dom, "web");
    assert!(
        card.contains("data-verdict=\"ok\"") && !card.contains("data-verdict=\"error\""),
        "upstream web's verdict is not OK:\n{card}"
    );
    assert!(
        card.contains(&format!("{} (header)", backend.addr())),
        "the timeout's source (the backend's header) not shown:\n{card}"
    );
    assert!(
        card.contains(&backend.addr().to_string()),
        "server row missing:\n{card}"
    );

    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot {png:?}: {e}"));
    eprintln!("status page screenshot: {} bytes", bytes.len());
    assert_eq!(
        chromium::png_size(&bytes),
        Some((900, 1000)),
        "not a 900x1000 PNG ({} bytes)",
        bytes.len()
    );
    // A blank 900x1000 page is about 5 KB; the drawn page with its text, bars and table
    // is several times that.
    assert!(
        bytes.len() > 15_000,
        "screenshot of {} bytes looks blank",
        bytes.len()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn status_page_draws_kaproxy_deadline_left_of_a_shorter_learned_keepalive() {
    if !chromium::require_chromium() {
        return;
    }
    // Configured for Apache's 5 s, but this backend advertises (and uses) 1 s: kaproxy
    // closes its idle connections after 1 s - 500 ms. The picture must show that ordering.
    let (_backend, proxy, admin_addr) = proxy_after_one_request(
        "ka1s",
        Duration::from_secs(1),
        "keepalive_timeout = \"5s\"\nidle_timeout = \"4s\"",
    )
    .await;
    let st = status(admin_addr).await;
    assert_eq!(
        st["upstreams"][0]["servers"][0]["learned_keepalive_timeout_s"], 1.0,
        "{st:#}"
    );

    let dom = render_status_page(admin_addr, None).await;
    let card = upstream_card(&dom, "web");
    assert!(
        card.contains("data-verdict=\"ok\""),
        "kaproxy honours the learned timeout, the verdict must be OK:\n{card}"
    );
    for (idle_x, keepalive_x) in idle_and_keepalive_x(&dom, "web") {
        assert!(
            idle_x < keepalive_x,
            "kaproxy's bar ends at x={idle_x}, right of the learned keep-alive line at \
             {keepalive_x}, though kaproxy closes at 500 ms:\n{card}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn status_page_in_chromium_shows_a_drained_server_and_a_weight_set_at_run_time() {
    if !chromium::require_chromium() {
        return;
    }
    let a = demo_backend("a", Duration::from_secs(5)).await;
    let b = demo_backend("b", Duration::from_secs(5)).await;
    let proxy = TestProxy::start(&format!(
        "[upstreams.web]\nservers = [\"{}\", \"{}\"]\n",
        a.addr(),
        b.addr()
    ))
    .await;
    let admin = proxy.server.admin_addr().expect("admin listener");
    let post = |path: String| async move {
        let answer = kaproxy::control::admin_client::request(admin, "POST", &path, None)
            .await
            .expect("admin answers");
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    };
    post(format!("/servers/web/{}/drain", a.addr())).await;
    post(format!("/servers/web/{}/weight?value=5", b.addr())).await;

    let dom = render_status_page(admin, None).await;
    let card = upstream_card(&dom, "web");
    let row = |addr: SocketAddr| {
        let marker = format!("data-server=\"{addr}\"");
        let rows: Vec<&str> = card.split("<tr").filter(|r| r.contains(&marker)).collect();
        rows.last()
            .map(|r| r.to_string())
            .unwrap_or_else(|| panic!("no table row {marker}:\n{card}"))
    };
    let (row_a, row_b) = (row(a.addr()), row(b.addr()));
    assert!(
        row_a.contains("data-state=\"drained\"") && row_a.contains("up, drained"),
        "{row_a}"
    );
    assert!(
        row_b.contains("data-state=\"up\"") && row_b.contains("5 (config 1)"),
        "{row_b}"
    );
    proxy.shutdown().await;
}

// Single-threaded: the support client sends back-to-back requests on one connection without
// awaiting hyper's readiness, which only holds when the connection task cannot lag behind.
#[tokio::test]
async fn active_health_marks_a_stopped_server_down_and_up_again() {
    let a = demo_backend("a", Duration::from_secs(5)).await;
    let b = demo_backend("b", Duration::from_secs(5)).await;
    let b_addr = b.addr();
    let proxy = TestProxy::start(&format!(
        "{}\n[upstreams.web.health]\npath = \"/\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n\
         fall = 2\nrise = 1\n",
        upstream_toml("web", &[&a, &b], "")
    ))
    .await;
    let admin_addr = proxy.server.admin_addr().expect("admin listener");
    let up = |m: &Metrics, addr: SocketAddr| {
        m.sum(
            SERVER_UP,
            &[("upstream", "web"), ("server", &addr.to_string())],
        )
    };
    let m = proxy.metrics();
    assert_eq!(up(&m, a.addr()), 1.0, "{}", m.lines_of(SERVER_UP));
    assert_eq!(up(&m, b_addr), 1.0, "{}", m.lines_of(SERVER_UP));

    // No traffic from here on until the verdict: only the probes can notice.
    b.stop().await;
    let stopped = Instant::now();
    let (m, down) = proxy
        .wait_metrics(Duration::from_secs(3), |m| up(m, b_addr) == 0.0)
        .await;
    assert!(
        down,
        "stopped server not marked down by 2 failed probes at 200 ms within 3 s:\n{}",
        m.lines_of(SERVER_UP)
    );
    eprintln!("marked down {:?} after stop", stopped.elapsed());
    assert_eq!(up(&m, a.addr()), 1.0, "{}", m.lines_of(SERVER_UP));
    let st = status(admin_addr).await;
    let servers = st["upstreams"][0]["servers"]
        .as_array()
        .expect("servers")
        .clone();
    let b_status = servers
        .iter()
        .find(|s| s["addr"] == b_addr.to_string())
        .expect("b in /status");
    assert_eq!(b_status["up"], false, "{st:#}");

    let mut client = KeepAliveClient::new(proxy.http(), None);
    for i in 0..20 {
        // Fresh downstream connections too, so nothing depends on one keep-alive connection.
        if i % 5 == 0 {
            client = KeepAliveClient::new(proxy.http(), None);
        }
        let resp = client
            .send(&Request::get("/"))
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(resp.status, 200, "request {i}: {}", resp.body_text());
        assert_eq!(resp.backend().as_deref(), Some("a"), "request {i}");
    }
    let m = scrape(admin_addr).await;
    assert_eq!(
        m.sum(REQUESTS_TOTAL, &[("server", &b_addr.to_string())]),
        0.0,
        "{}",
        m.lines_of(REQUESTS_TOTAL)
    );

    // The server comes back on the same address: one good probe (rise 1) brings it back.
    let b = DemoBackend::start(
        b_addr,
        DemoBackendConfig {
            name: "b".into(),
            ..DemoBackendConfig::default()
        },
    )
    .await
    .expect("restart b on its address");
    let (m, back) = proxy
        .wait_metrics(Duration::from_secs(3), |m| up(m, b_addr) == 1.0)
        .await;
    assert!(
        back,
        "restarted server not marked up within 3 s:\n{}",
        m.lines_of(SERVER_UP)
    );
    let mut seen_b = 0;
    for i in 0..10 {
        let resp = KeepAliveClient::new(proxy.http(), None)
            .send(&Request::get("/"))
            .await
            .unwrap_or_else(|e| panic!("request {i} after recovery: {e}"));
        assert_eq!(resp.status, 200);
        if resp.backend().as_deref() == Some("b") {
            seen_b += 1;
        }
    }
    assert!(seen_b > 0, "b gets traffic again after it is marked up");
    drop(client);
    drop(b);
    proxy.shutdown().await;
}

/// `/history` fetched over HTTP and parsed.
async fn history(addr: SocketAddr) -> serde_json::Value {
    let resp = admin_get(addr, "/history").await;
    serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("/history is not JSON ({e}): {}", resp.body_text()))
}

/// Events over the whole window of a `/history` series: a rate series times each sample's
/// interval (`dt_s`), nulls skipped.
fn window_count(h: &serde_json::Value, series: &serde_json::Value) -> f64 {
    let dt = h["dt_s"].as_array().expect("dt_s");
    let values = series
        .as_array()
        .unwrap_or_else(|| panic!("not a series: {series}"));
    assert_eq!(values.len(), dt.len(), "series not aligned with dt_s: {h}");
    values
        .iter()
        .zip(dt)
        .filter_map(|(v, dt)| Some(v.as_f64()? * dt.as_f64()?))
        .sum()
}

/// The `<svg data-chart="{chart}">` of upstream `upstream` (of one server, or the upstream's
/// own when `server` is None) in `dom`, and the `<path>` series drawn in it.
fn chart_tags(
    dom: &str,
    chart: &str,
    upstream: &str,
    server: Option<&str>,
) -> (chromium::Tag, Vec<chromium::Tag>) {
    let tags = chromium::tags(dom);
    let at = tags
        .iter()
        .position(|t| {
            t.name == "svg"
                && t.attr("data-chart") == Some(chart)
                && t.attr("data-upstream") == Some(upstream)
                && t.attr("data-server") == server
        })
        .unwrap_or_else(|| {
            panic!("no <svg data-chart={chart:?}> for {upstream} {server:?} in\n{dom}")
        });
    let paths = tags[at + 1..]
        .iter()
        .take_while(|t| t.name != "svg")
        .filter(|t| t.name == "path")
        .cloned()
        .collect();
    (tags[at].clone(), paths)
}

#[tokio::test]
async fn status_page_charts_show_the_rates_of_the_traffic_sent() {
    if !chromium::require_chromium() {
        return;
    }
    // 40 requests: 30 answered 200, 10 answered 404 by the backend itself.
    const OK: usize = 30;
    const NOT_FOUND: usize = 10;
    let backend = DemoBackend::named("charts").await;
    let server = backend.addr().to_string();
    let proxy = crate::support::proxy::test_config(&upstream_toml("web", &[&backend], ""))
        .start_with(kaproxy::ServerOptions {
            history_interval: Duration::from_millis(500),
            ..Default::default()
        })
        .await;
    let admin_addr = proxy.server.admin_addr().expect("admin listener");

    let mut client = KeepAliveClient::new(proxy.http(), None);
    for i in 0..OK + NOT_FOUND {
        let path = if i % 4 == 3 { "/status/404" } else { "/" };
        let resp = client.send(&Request::get(path)).await.expect("request");
        assert_eq!(resp.status, if i % 4 == 3 { 404 } else { 200 }, "{path}");
    }

    // Every request shows up in the sampled history, as rates over the samples that cover it.
    let mut last = None;
    let counted = poll_until(Duration::from_secs(10), async || {
        let h = last.insert(history(admin_addr).await);
        let Some(web) = h["upstreams"].as_array().and_then(|u| u.first()) else {
            return false;
        };
        let rates = &web["requests_per_s"];
        (window_count(h, &rates["2xx"]) - OK as f64).abs() < 0.01
            && (window_count(h, &rates["4xx"]) - NOT_FOUND as f64).abs() < 0.01
    })
    .await;
    let last = last.expect("fetched at least once");
    assert!(
        counted,
        "/history does not show {OK} 2xx and {NOT_FOUND} 4xx: {last:#}"
    );
    let web = &last["upstreams"][0];
    assert_eq!(web["name"], "web", "{last:#}");
    assert_eq!(web["servers"][0]["addr"], server.as_str(), "{last:#}");
    let some = |series: &serde_json::Value| {
        series
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x.as_f64().is_some_and(|x| x > 0.0)))
    };
    assert!(some(&web["p99_s"]), "no p99 latency: {last:#}");
    assert!(
        some(&web["reuse_ratio"]),
        "no reuse on one keep-alive client: {last:#}"
    );
    assert!(!some(&web["retries"]), "retries without failures: {last:#}");

    let shots = tempfile::Builder::new()
        .prefix("kaproxy-shot-")
        .tempdir()
        .expect("temp dir");
    let png = shots.path().join("status-history.png");
    let dom = render_status_page(admin_addr, Some(&png)).await;

    // The charts of the upstream and of its one server draw the same traffic, as numbers.
    for who in [None, Some(server.as_str())] {
        let (requests, series) = chart_tags(&dom, "requests", "web", who);
        assert!(requests.number("data-max") > 0.0, "{requests:?}");
        assert_eq!(
            requests.number("data-count").round(),
            (OK + NOT_FOUND) as f64,
            "{requests:?}"
        );
        let class = |name: &str| {
            series
                .iter()
                .find(|t| t.attr("data-series") == Some(name))
                .unwrap_or_else(|| panic!("no {name} series in {series:#?}"))
        };
        assert!(class("4xx").number("data-max") > 0.0, "{series:#?}");
        assert_eq!(class("4xx").number("data-count").round(), NOT_FOUND as f64);
        assert_eq!(class("2xx").number("data-count").round(), OK as f64);
        assert_eq!(class("5xx").number("data-count"), 0.0);
        let (latency, _) = chart_tags(&dom, "latency", "web", who);
        assert!(latency.number("data-max") > 0.0, "{latency:?}");
        let (reuse, _) = chart_tags(&dom, "reuse", "web", who);
        assert!(
            reuse.number("data-max") > 0.0 && reuse.number("data-max") <= 1.0,
            "{reuse:?}"
        );
        let (errors, _) = chart_tags(&dom, "errors", "web", who);
        assert_eq!(errors.number("data-count"), 0.0, "{errors:?}");
    }

    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot {png:?}: {e}"));
    eprintln!("status page with charts: {} bytes", bytes.len());
    assert_eq!(chromium::png_size(&bytes), Some((900, 1000)));
    assert!(
        bytes.len() > 15_000,
        "screenshot of {} bytes looks blank",
        bytes.len()
    );
    drop(client);
    proxy.shutdown().await;
}
