//! Per-server control end to end, with the real binary: a rolling restart of two real Apaches
//! (drain, stop, start, enable, one after the other, each step through `kaproxy server`) under
//! a bounded load costs clients nothing, and `kaproxy server` prints what it did or why not.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kaproxy::control::admin_client;
use kaproxy_testkit::apache::{require_apache, Apache, ApacheOptions};
use kaproxy_testkit::poll_until;

use crate::support::binary::Binary;
use crate::support::client::{Endpoint, KeepAliveClient, Record, Request, Tally};
use crate::support::config_file::ConfigFile;

/// `kaproxy server` must answer within this (it is one request to the admin listener).
const CLI_BOUND: Duration = Duration::from_secs(15);

/// What `kaproxy server ARGS --config CONFIG` did: exit success, stdout, stderr.
async fn kaproxy_server(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        CLI_BOUND,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_kaproxy"))
            .arg("server")
            .args(args)
            .arg("--config")
            .arg(config)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("kaproxy server answered in time")
    .expect("run kaproxy server");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// A free loopback port for the admin listener, so that the config file names it (the CLI
/// reads it from there). Bound and released: a port race with another process is possible
/// but would fail the start loudly, not pass a test.
fn free_admin_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// Writes the config (HTTP and admin listeners, JSON logs, `rest`) and starts the binary;
/// returns it with its HTTP address.
async fn start_binary(files: &ConfigFile, admin: SocketAddr, rest: &str) -> (Binary, SocketAddr) {
    let text = files.text_with(
        "http = \"127.0.0.1:0\"",
        &format!("listen = \"{admin}\"\ntoken = \"rolling-token\"\nshutdown_timeout = \"2s\""),
        "format = \"json\"\naccess_log = false\nlevel = \"info\"",
        rest,
    );
    files.write(&text);
    let mut kaproxy = Binary::spawn(&files.path, &files.file("kaproxy.log"));
    let http = kaproxy.addr("listening", Some("http")).await;
    kaproxy.addr("admin listening", None).await;
    (kaproxy, http)
}

/// `GET /servers/web` from the admin API: each server's JSON by address.
async fn servers(admin: SocketAddr) -> BTreeMap<String, serde_json::Value> {
    let answer = admin_client::request(admin, "GET", "/servers/web", None)
        .await
        .expect("admin answers");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let list: Vec<serde_json::Value> = serde_json::from_str(&answer.body).expect("JSON");
    list.into_iter()
        .map(|s| (s["addr"].as_str().unwrap().to_string(), s))
        .collect()
}

async fn metric_sum(admin: SocketAddr, name: &str, needle: &str) -> f64 {
    let answer = admin_client::request(admin, "GET", "/metrics", None)
        .await
        .expect("admin answers");
    answer
        .body
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A bounded load: `clients` keep-alive connections, each alternating GET / and POST /echo
/// (1000 bytes) every 2 ms until told to stop, at most `max_each` requests or `max_time`.
struct RollingLoad {
    stop: Arc<AtomicBool>,
    /// Responses so far by `X-Backend`, live.
    served: Arc<Mutex<BTreeMap<String, usize>>>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl RollingLoad {
    fn start(endpoint: Endpoint, clients: usize, max_each: usize, max_time: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(BTreeMap::new()));
        let deadline = tokio::time::Instant::now() + max_time;
        let tasks = (0..clients)
            .map(|slot| {
                let (stop, served, endpoint) = (stop.clone(), served.clone(), endpoint.clone());
                tokio::spawn(async move {
                    let mut client = KeepAliveClient::new(endpoint, None);
                    let mut tally = Tally::default();
                    let get = Request::get("/");
                    let post = Request::post("/echo", vec![b'r'; 1000]);
                    for i in 0..max_each {
                        if stop.load(Ordering::Relaxed) || tokio::time::Instant::now() > deadline {
                            break;
                        }
                        let req = if i % 2 == 0 { &get } else { &post };
                        let result = client.send(req).await;
                        if let Ok(resp) = &result {
                            if let Some(b) = resp.backend() {
                                *served.lock().unwrap().entry(b).or_default() += 1;
                            }
                            if i % 2 == 1 && resp.status == 200 {
                                assert_eq!(resp.body.len(), 1000, "the echo came back whole");
                            }
                        }
                        tally.add(Record {
                            slot,
                            source: None,
                            result,
                        });
                        // Pacing between requests (not a wait for anything to happen).
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    tally.connects = client.connects;
                    tally.graceful_closes = client.graceful_closes;
                    tally
                })
            })
            .collect();
        RollingLoad {
            stop,
            served,
            tasks,
        }
    }

    fn served(&self, backend: &str) -> usize {
        self.served
            .lock()
            .unwrap()
            .get(backend)
            .copied()
            .unwrap_or(0)
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for task in self.tasks {
            all.merge(task.await.expect("load task"));
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_two_apaches_through_kaproxy_server_costs_no_request() {
    if !require_apache() {
        return;
    }
    let mut apaches = Vec::new();
    for name in ["roll-a", "roll-b"] {
        let apache = Apache::start(ApacheOptions::new(name).max_keep_alive_requests(100_000))
            .await
            .expect("start apache");
        apaches.push(apache);
    }
    let files = ConfigFile::new();
    let admin = free_admin_addr();
    // Apache's KeepAliveTimeout is 1 s here: 600 ms < 1 s - 300 ms. Round-robin, so that each
    // server is seen serving this light load before and after its turn: `least_request` keeps
    // light traffic on the server whose connections are warm (README, "least_request"), and on
    // a loaded machine the other one may see none for seconds.
    let rest = format!(
        "[upstreams.web]\nbalance = \"round_robin\"\nservers = [\"{}\", \"{}\"]\n\
         keepalive_timeout = \"1s\"\nsafety_margin = \"300ms\"\nidle_timeout = \"600ms\"\n",
        apaches[0].addr(),
        apaches[1].addr()
    );
    let (kaproxy, http) = start_binary(&files, admin, &rest).await;
    let load = RollingLoad::start(Endpoint::plain(http), 6, 20_000, Duration::from_secs(90));

    for apache in apaches.iter_mut() {
        let (name, addr) = (apache.name().to_string(), apache.addr().to_string());
        let before = load.served(&name);
        assert!(
            poll_until(Duration::from_secs(10), async || load.served(&name)
                >= before + 20)
            .await,
            "{name} serves under the load before its turn"
        );

        let (ok, out, err) = kaproxy_server(&files.path, &["drain", "web", &addr]).await;
        assert!(ok, "drain {name}: {out}{err}");
        assert!(out.contains(&addr) && out.contains("drained"), "{out}");
        // Requests in flight finish, then nothing is left open to it.
        let mut last = serde_json::Value::Null;
        let settled = poll_until(Duration::from_secs(5), async || {
            last = servers(admin).await.remove(&addr).unwrap();
            last["in_flight"] == 0 && last["idle_connections"] == 0
        })
        .await;
        assert!(settled, "{name} still busy after the drain: {last}");
        let served_drained = load.served(&name);

        apache.stop().await;
        apache.start_again().await.expect("start apache again");
        assert_eq!(
            load.served(&name),
            served_drained,
            "no request reached {name} while it was drained"
        );

        let (ok, out, err) = kaproxy_server(&files.path, &["enable", "web", &addr]).await;
        assert!(ok, "enable {name}: {out}{err}");
        assert!(out.contains(&addr) && out.contains(" up "), "{out}");
        assert!(
            poll_until(Duration::from_secs(10), async || load.served(&name)
                > served_drained)
            .await,
            "{name} serves again once enabled"
        );
    }
    let drained_closes = metric_sum(
        admin,
        "kaproxy_upstream_connections_closed_total",
        "reason=\"drained\"",
    )
    .await;
    let retries = metric_sum(admin, "kaproxy_upstream_retries_total", "").await;
    let tally = load.finish().await;
    eprintln!(
        "rolling restart: {}; drained closes {drained_closes}",
        tally.summary()
    );

    assert_eq!(tally.error_count(), 0, "{}", tally.summary());
    assert_eq!(
        tally.statuses.get(&200),
        Some(&tally.total()),
        "{}",
        tally.summary()
    );
    assert!(tally.total() >= 200, "{}", tally.summary());
    // Nothing was saved by a retry: no request ever met a stopped Apache.
    assert_eq!(retries, 0.0, "{}", tally.summary());
    assert!(
        drained_closes >= 1.0,
        "connections closed as drained: {drained_closes}"
    );
    let changes = kaproxy.messages("admin: server");
    assert_eq!(
        changes.len(),
        4,
        "two drains and two enables logged: {changes:?}"
    );
    assert!(
        changes.iter().all(|c| c["upstream"] == "web"),
        "{changes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kaproxy_server_lists_changes_and_says_why_it_cannot() {
    let backends = [
        crate::ops::demo_backend("cli-a", Duration::from_secs(5)).await,
        crate::ops::demo_backend("cli-b", Duration::from_secs(5)).await,
    ];
    let (a, b) = (
        backends[0].addr().to_string(),
        backends[1].addr().to_string(),
    );
    let files = ConfigFile::new();
    let admin = free_admin_addr();
    let rest = format!("[upstreams.web]\nservers = [\"{a}\", {{ addr = \"{b}\", weight = 2 }}]\n");
    let (kaproxy, _http) = start_binary(&files, admin, &rest).await;
    let cli = |args: &'static [&'static str]| kaproxy_server(&files.path, args);
    let row = |out: &str, addr: &str| {
        out.lines()
            .find(|l| l.contains(addr))
            .unwrap_or_else(|| panic!("no row for {addr}:\n{out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    let (ok, out, err) = cli(&["list"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("UPSTREAM"), "{out}");
    assert_eq!(row(&out, &a)[..5], ["web", &a, "1", "1", "up"]);
    assert_eq!(row(&out, &b)[..5], ["web", &b, "2", "2", "up"]);

    let (ok, out, err) = kaproxy_server(&files.path, &["weight", "web", &b, "5"]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(row(&out, &b)[2..4], ["5", "2"], "weight 5, configured 2");

    let (ok, out, err) = kaproxy_server(&files.path, &["drain", "web", &a]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(row(&out, &a)[4], "drained");
    let status = admin_client::request(admin, "GET", "/status", None)
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    let shown = &status["upstreams"][0]["servers"];
    assert_eq!(
        (shown[0]["drained"].as_bool(), shown[1]["weight"].as_u64()),
        (Some(true), Some(5))
    );
    let (ok, out, _) = kaproxy_server(&files.path, &["list", "web"]).await;
    assert!(ok && row(&out, &a)[4] == "drained", "{out}");
    let (ok, out, err) = kaproxy_server(&files.path, &["enable", "web", &a]).await;
    assert!(ok && row(&out, &a)[4] == "up", "{out}{err}");

    // Refusals: the exit status and a line that says why.
    let (ok, _, err) = cli(&["drain", "web", "127.0.0.1:1"]).await;
    assert!(
        !ok && err.contains("404") && err.contains("no server"),
        "{err}"
    );
    let (ok, _, err) = kaproxy_server(&files.path, &["drain", "api", &a]).await;
    assert!(!ok && err.contains("no upstream"), "{err}");
    let (ok, _, err) = kaproxy_server(&files.path, &["weight", "web", &a, "0"]).await;
    assert!(!ok && err.contains("400"), "{err}");
    let changes = kaproxy.messages("admin: server");
    assert_eq!(
        changes.len(),
        3,
        "weight, drain, enable logged: {changes:?}"
    );

    // A config without an admin listener, and one whose listener nobody serves.
    let other = ConfigFile::new();
    other.write(&other.text_with("http = \"127.0.0.1:0\"", "listen = \"\"", "", &rest));
    let (ok, _, err) = kaproxy_server(&other.path, &["list"]).await;
    assert!(!ok && err.contains("[admin] listen is disabled"), "{err}");
    let nobody = free_admin_addr();
    other.write(&other.text_with(
        "http = \"127.0.0.1:0\"",
        &format!("listen = \"{nobody}\""),
        "",
        &rest,
    ));
    let (ok, _, err) = kaproxy_server(&other.path, &["list"]).await;
    assert!(
        !ok && err.contains("cannot reach the admin listener"),
        "{err}"
    );
}
