//! Workers (README, "Workers"): with `worker_threads = N`, N current-thread runtimes each accept
//! on their own `SO_REUSEPORT` listener and send through their own pool per backend, while what
//! an operator reads stays process-wide: metrics, `/status`, the learned keep-alive timeout,
//! reload (which keeps every worker's warm pool) and drain.

use std::sync::Arc;

use kaproxy::workers::Workers;
use kaproxy_testkit::demo::DemoBackend;

use crate::support::client::{KeepAliveClient, Request};
use crate::support::proxy::{test_config, POOL_IDLE};

const WORKERS: usize = 2;
/// Client connections: the kernel spreads them over the workers' listeners by a hash of the
/// 4-tuple, so that all of them land on one worker has a chance of 2^-23.
const CLIENTS: usize = 24;
const REQUESTS_EACH: usize = 3;

fn upstream_toml(backend: &DemoBackend) -> String {
    format!("[upstreams.web]\nservers = [\"{}\"]\n", backend.addr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_serves_with_its_own_pool_and_the_operator_sees_one_process() {
    let workers = Workers::start(WORKERS, Arc::new(|| {})).expect("worker threads");
    let backend = DemoBackend::named("w").await;
    let cfg = test_config(&upstream_toml(&backend));
    let source = cfg.dir.path().join("kaproxy.toml");
    let proxy = cfg
        .start_with(kaproxy::ServerOptions {
            workers: workers.handles(),
            ..Default::default()
        })
        .await;

    // Each client on its own connection, all at once, so the connections spread.
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let endpoint = proxy.http();
        clients.push(tokio::spawn(async move {
            let mut client = KeepAliveClient::new(endpoint, None);
            for _ in 0..REQUESTS_EACH {
                let resp = client.send(&Request::get("/")).await.expect("request");
                assert_eq!(resp.status, 200);
            }
            client
        }));
    }
    let mut held = Vec::new();
    for c in clients {
        held.push(c.await.expect("client task"));
    }

    let generation = proxy.server.generation();
    let b = &generation.proxy.upstreams()[0].balancer.backends()[0];
    assert_eq!(b.pools().len(), WORKERS, "one pool per worker");
    let idle: Vec<usize> = b.pools().iter().map(|p| p.idle_count()).collect();
    assert!(
        idle.iter().all(|&n| n > 0),
        "every worker sent through its own pool: idle per worker {idle:?}"
    );
    assert_eq!(b.idle_count(), idle.iter().sum::<usize>());

    // Process-wide: the requests of every worker, the idle gauge summed over the pools, the
    // keep-alive timeout one worker learned known to all.
    let m = proxy.metrics();
    assert_eq!(
        m.sum("kaproxy_requests_total", &[]),
        (CLIENTS * REQUESTS_EACH) as f64,
        "{}",
        m.lines_of("kaproxy_requests_total")
    );
    assert_eq!(m.sum(POOL_IDLE, &[]), b.idle_count() as f64, "{}", m.0);
    let learned = b.learned_timeout();
    assert!(learned.is_some(), "the demo backend advertises its timeout");
    assert!(b.pools().iter().all(|p| p.learned_timeout() == learned));
    // At most one connection per client, plus one for each idle connection kaproxy closed to
    // free a backend worker when a fresh connection's first answer was slow (a loaded machine:
    // README, "How the upstream pool keeps the promise", closed as `surplus`).
    let relieved = m.sum(
        "kaproxy_upstream_connections_closed_total",
        &[("reason", "surplus")],
    ) as usize;
    assert!(
        (backend.stats().connections_accepted as usize) <= CLIENTS + relieved,
        "connections were reused, not one per request: {} accepted, {relieved} closed as surplus",
        backend.stats().connections_accepted
    );

    // A reload with the same pool settings keeps every worker's pool and its warm connections.
    let before: Vec<_> = b.pools().iter().map(Arc::as_ptr).collect();
    std::fs::write(&source, std::fs::read_to_string(&source).unwrap()).unwrap();
    proxy.server.reload().await.expect("reload");
    let after_gen = proxy.server.generation();
    let after: Vec<_> = after_gen.proxy.upstreams()[0].balancer.backends()[0]
        .pools()
        .iter()
        .map(Arc::as_ptr)
        .collect();
    assert_eq!(before, after, "reload kept the workers' pools");

    // Drain: idle clients are closed, the server stops, then the workers.
    drop(held);
    proxy.shutdown().await;
    tokio::task::spawn_blocking(move || workers.stop())
        .await
        .expect("workers stop");
}

#[tokio::test]
async fn limits_are_divided_among_the_workers() {
    let workers = Workers::start(WORKERS, Arc::new(|| {})).expect("worker threads");
    let backend = DemoBackend::named("w").await;
    let proxy = test_config(&format!(
        "{}max_idle_per_server = 5\nmax_connections_per_server = 9\n",
        upstream_toml(&backend)
    ))
    .start_with(kaproxy::ServerOptions {
        workers: workers.handles(),
        ..Default::default()
    })
    .await;
    let generation = proxy.server.generation();
    let b = &generation.proxy.upstreams()[0].balancer.backends()[0];
    for p in b.pools() {
        assert_eq!(p.config().max_idle_per_server, 3, "5 / 2 rounded up");
        assert_eq!(p.config().max_connections_per_server, 5, "9 / 2 rounded up");
    }
    assert_eq!(
        b.pool_config().max_connections_per_server,
        9,
        "as configured"
    );
    proxy.shutdown().await;
    tokio::task::spawn_blocking(move || workers.stop())
        .await
        .expect("workers stop");
}

#[test]
fn zero_means_one_worker_per_available_core() {
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(kaproxy::workers::count(0), cores);
    assert_eq!(kaproxy::workers::count(3), 3);
}

#[tokio::test]
async fn a_second_server_on_the_same_address_fails_to_bind_with_workers_too() {
    let workers = Workers::start(WORKERS, Arc::new(|| {})).expect("worker threads");
    let backend = DemoBackend::named("w").await;
    let first = test_config(&upstream_toml(&backend))
        .start_with(kaproxy::ServerOptions {
            workers: workers.handles(),
            ..Default::default()
        })
        .await;
    let taken = first.server.http_addr().expect("http listener");
    // The same address again, with workers (SO_REUSEPORT): refused, not shared.
    let mut again = test_config(&upstream_toml(&backend));
    again.config.listen.http = Some(taken);
    again.config.listen.https = None;
    again.config.admin.listen = None;
    let second = kaproxy::Server::start_with(
        again.config,
        kaproxy::ServerOptions {
            workers: workers.handles(),
            ..Default::default()
        },
    )
    .await;
    match second {
        Err(kaproxy::server::StartError::Bind { addr, .. }) => assert_eq!(addr, taken),
        Err(e) => panic!("expected a bind error for {taken}, got {e}"),
        Ok(_) => panic!("a second server bound {taken} next to the first"),
    }
    first.shutdown().await;
    tokio::task::spawn_blocking(move || workers.stop())
        .await
        .expect("workers stop");
}
