//! Owns the admin listener: `/` (status page), `/metrics` (Prometheus text), `/healthz`,
//! `/status` (JSON), `/history` (JSON), `POST /reload`, and `/servers` (per-server control,
//! [`crate::control::servers`]).

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::control::history::History;
use crate::control::reload::Control;
use crate::control::servers;
use crate::downstream::Generation;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// The status page: self-contained (no external assets); it fetches `/status` and draws each
/// hop's keep-alive timeline, and `/history` for its charts.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// Serves admin requests until shutdown.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    history: Arc<History>,
    mut shutdown: Shutdown,
) {
    let mut errors = crate::downstream::limit::AcceptErrors::new("admin");
    loop {
        let accepted = tokio::select! {
            res = listener.accept() => res,
            _ = shutdown.begun() => return,
        };
        let (stream, peer) = match accepted {
            Ok((stream, peer)) => {
                errors.accepted();
                (stream, peer.ip())
            }
            Err(e) => {
                // Out of descriptors the listener stays readable: retrying at once would spin.
                let pause = errors.failed(&e, None);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = shutdown.begun() => return,
                }
            }
        };
        let metrics = metrics.clone();
        let control = control.clone();
        let history = history.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                let control = control.clone();
                let history = history.clone();
                async move { Ok::<_, Infallible>(answer(req, peer, &metrics, &control, &history).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    peer: IpAddr,
    metrics: &Metrics,
    control: &Control,
    history: &History,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if servers::is_servers_path(path) {
        let generation = control.generation();
        let (method, query, headers) = (req.method(), req.uri().query(), req.headers());
        let answer = servers::answer(method, path, query, headers, peer, &generation);
        let mut body = serde_json::to_string_pretty(&answer.body).expect("JSON serializes");
        body.push('\n');
        return text(answer.status, "application/json", body);
    }
    match (req.method(), path) {
        (&Method::POST, "/reload")
            if !servers::authorized(
                peer,
                req.headers(),
                control.generation().config.admin.token.as_deref(),
            ) =>
        {
            tracing::info!(client = %peer, "admin: reload refused (not loopback, no valid token)");
            text(
                StatusCode::FORBIDDEN,
                "text/plain",
                "reload needs a loopback peer or Authorization: Bearer <[admin] token>\n".into(),
            )
        }
        (&Method::POST, "/reload") => match control.reload().await {
            Ok(()) => text(StatusCode::OK, "text/plain", "reloaded\n".into()),
            Err(e) => {
                tracing::error!(error = %e, "reload rejected; the old configuration keeps serving");
                text(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "text/plain",
                    format!("reload rejected; the old configuration keeps serving:\n{e}\n"),
                )
            }
        },
        (_, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (_, "/") => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            STATUS_PAGE.to_string(),
        ),
        (_, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (_, "/status") => text(
            StatusCode::OK,
            "application/json",
            status_json(&control.generation()),
        ),
        (_, "/history") => text(StatusCode::OK, "application/json", history.json()),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Upstreams, servers, health, pool sizes, learned keep-alive timeouts, closes by reason and
/// the timeouts of every hop, as JSON (also what the status page draws).
fn status_json(generation: &Generation) -> String {
    let now = Instant::now();
    let secs = |d: std::time::Duration| d.as_secs_f64();
    let config = &generation.config;
    let ds = &config.downstream;
    let buffering = generation.proxy.buffering();
    let upstreams: Vec<_> = generation
        .proxy
        .upstreams()
        .iter()
        .map(|u| {
            let servers: Vec<_> = u
                .balancer
                .backends()
                .iter()
                .map(|b| {
                    let closed: serde_json::Map<String, serde_json::Value> = b
                        .metrics()
                        .closed_counts()
                        .map(|(reason, n)| (reason.to_string(), n.into()))
                        .collect();
                    let idle = b.idle_count();
                    let (keepalive, source) = b.keepalive();
                    json!({
                        "addr": b.addr.to_string(),
                        "weight": b.weight(),
                        "configured_weight": b.configured_weight(),
                        "effective_weight": servers::effective_weight(b, now),
                        "slow_start_share": b.ramp(now),
                        "drained": b.is_drained(),
                        "in_flight": b.in_flight(),
                        "up": b.health.is_up(now),
                        "idle_connections": idle,
                        "busy_connections": b.open_count().saturating_sub(idle),
                        "learned_keepalive_timeout_s": b.learned_timeout().map(secs),
                        "observed_keepalive_timeout_s": b.observed_timeout().map(secs),
                        "effective_keepalive_timeout_s": secs(keepalive),
                        "keepalive_timeout_source": source.as_str(),
                        "closed": closed,
                    })
                })
                .collect();
            json!({
                "name": u.name,
                "balance": u.balancer.kind().as_str(),
                "idle_timeout_s": secs(u.config.pool.idle_timeout),
                "safety_margin_s": secs(u.config.pool.safety_margin),
                "keepalive_timeout_s": secs(u.config.pool.keepalive_timeout),
                "slow_start_s": secs(u.config.slow_start),
                "request_buffering": u.config.buffers.request_buffering,
                "response_buffering": u.config.buffers.response_buffering,
                "max_request_body_bytes": u.config.buffers.max_request_body_bytes,
                "servers": servers,
            })
        })
        .collect();
    let status = json!({
        "downstream": {
            "idle_timeout_s": secs(ds.idle_timeout),
            "front_idle_timeout_s": secs(ds.front_idle_timeout),
            "header_timeout_s": secs(ds.header_timeout),
            "body_timeout_s": secs(ds.body_timeout),
            "send_timeout_s": secs(ds.send_timeout),
        },
        "upstreams": upstreams,
        "buffering": {
            "memory_bytes": buffering.memory_bytes(),
            "memory_limit_bytes": buffering.memory_limit(),
            "disk_bytes": buffering.disk_bytes(),
            "temp_dir": buffering.dir().display().to_string(),
        },
    });
    let mut text = serde_json::to_string_pretty(&status).expect("JSON values always serialize");
    text.push('\n');
    text
}
