//! Owns the admin listener: `/metrics` (Prometheus text), `/healthz`, `/status` (JSON) and
//! `POST /reload`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::server::{Control, Generation};

/// Serves admin requests until shutdown.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            res = listener.accept() => match res {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let metrics = metrics.clone();
        let control = control.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                let control = control.clone();
                async move { Ok::<_, Infallible>(answer(req, &metrics, &control).await) }
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
    metrics: &Metrics,
    control: &Control,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
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
        (_, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (_, "/status") => text(
            StatusCode::OK,
            "application/json",
            status_json(&control.generation()),
        ),
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

/// Upstreams, servers, health, pool sizes and learned keep-alive timeouts as JSON.
fn status_json(generation: &Generation) -> String {
    let now = Instant::now();
    let mut out = String::from("{\"upstreams\":[");
    for (i, u) in generation.proxy.upstreams().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"name\":{:?},\"servers\":[", u.name);
        for (j, (b, p)) in u.balancer.backends().iter().zip(&u.pools).enumerate() {
            if j > 0 {
                out.push(',');
            }
            let learned = p
                .learned_timeout()
                .map_or("null".to_string(), |t| format!("{}", t.as_secs_f64()));
            let _ = write!(
                out,
                "{{\"addr\":\"{}\",\"weight\":{},\"up\":{},\"idle_connections\":{},\"learned_keepalive_timeout_s\":{},\"effective_keepalive_timeout_s\":{}}}",
                b.addr,
                b.weight,
                b.health.is_up(now),
                p.idle_count(),
                learned,
                p.effective_keepalive().as_secs_f64()
            );
        }
        out.push_str("]}");
    }
    out.push_str("]}\n");
    out
}
