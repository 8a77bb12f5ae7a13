//! Owns the per-request phases, each a step in its own file: [`route`] → [`forwarded`]
//! (request filter) → pick and connect ([`retry`]) → send → retry → [`response`] (response
//! filter) → [`log`]; [`tunnel`] for `Upgrade`. Every phase reads the request's fields
//! through [`fields`] (hyper's map, or the head the own HTTP/1.1 loop parsed, in place).
//! After routing, one [`context`] travels through the phases (group, client IP, version,
//! start, access record) and gives kaproxy's own answers. The only module that sees both downstream and upstream; [`Proxy::handle`]
//! reads as the sequence of phases.

mod answer;
mod context;
mod fields;
mod forwarded;
mod log;
mod response;
mod retry;
mod route;
mod switched;
mod tunnel;

pub use answer::{forwarded_into_map, local_response, ForwardedHead, ProxyBody};
pub use forwarded::{strip_hop_by_hop, upstream_head, upstream_request_headers, DownstreamInfo};
pub use switched::Switched;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::body::{
    buffer_request, read_whole, BodyDone, BodyError, Buffering, ClientBody, RequestBody,
    UpstreamBody,
};
use crate::config::{Config, ForwardedConfig};
use crate::http1::head::Fields;
use crate::metrics::Metrics;
use crate::upstream::group::{GroupError, UpstreamGroup};
use context::RequestContext;
pub use fields::RequestFields;
use forwarded::{client_ip, join_cookie_crumbs};
use log::AccessRecord;
use retry::{Failed, Failover, Resend};
use route::{admit, request_host, Route};
use tunnel::tunnelled_upgrade;

/// Why a configuration's proxy could not be built (a reload keeps the old one).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Group(#[from] GroupError),
}

/// The request-handling half of a loaded configuration. Swapped whole on reload.
pub struct Proxy {
    upstreams: Vec<UpstreamGroup>,
    routes: Vec<Route>,
    forwarded: ForwardedConfig,
    access_log: bool,
    /// `[downstream] body_timeout`: the longest gap between two reads of a request body.
    body_timeout: Duration,
    /// The workers' runtimes, one pool per backend on each (see [`crate::workers`]).
    workers: Arc<[Handle]>,
    /// The memory budget and temp directory of every body buffer (shared across reloads).
    buffering: Buffering,
}

impl Proxy {
    /// Builds balancers and pools from a validated config, with one worker: the current tokio
    /// runtime (each pool starts its sweep task there).
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Result<Proxy, ProxyError> {
        Self::reusing(cfg, metrics, &[Handle::current()].into(), None)
    }

    /// Builds balancers and one pool per backend on each of `workers`, keeping the pools
    /// (and their warm connections) of `previous` for servers that stay in the same upstream
    /// with the same pool and TLS settings (reload; their TLS files are read again and apply
    /// to the connections they open from now on).
    pub fn reusing(
        cfg: &Config,
        metrics: Arc<Metrics>,
        workers: &Arc<[Handle]>,
        previous: Option<&Proxy>,
    ) -> Result<Proxy, ProxyError> {
        let upstreams = cfg
            .upstreams
            .iter()
            .map(|u| {
                let old = previous.and_then(|p| p.upstreams.iter().find(|o| o.name == u.name));
                UpstreamGroup::build(u, &metrics, workers, old)
            })
            .collect::<Result<Vec<UpstreamGroup>, GroupError>>()?;
        let routes = cfg
            .routes
            .iter()
            .filter_map(|r| {
                let upstream = upstreams.iter().position(|u| u.name == r.upstream)?;
                Some(Route {
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    upstream,
                })
            })
            .collect();
        // One budget for the process: a reload changes its limit, bodies in flight keep
        // counting in it.
        let buffering = match previous {
            Some(p) => p.buffering.reconfigured(&cfg.buffering),
            None => Buffering::new(&cfg.buffering, metrics.buffering()),
        };
        Ok(Proxy {
            upstreams,
            buffering,
            routes,
            forwarded: cfg.forwarded.clone(),
            access_log: cfg.log.access_log,
            body_timeout: cfg.downstream.body_timeout,
            workers: workers.clone(),
        })
    }

    /// The workers' runtimes this proxy's pools live on.
    pub fn workers(&self) -> &Arc<[Handle]> {
        &self.workers
    }

    pub fn upstreams(&self) -> &[UpstreamGroup] {
        &self.upstreams
    }

    /// The body buffers' budget and temp directory (`/status` reads it).
    pub fn buffering(&self) -> &Buffering {
        &self.buffering
    }

    /// Closes every idle upstream connection (shutdown).
    pub fn close_idle(&self) {
        for u in &self.upstreams {
            for b in u.balancer.backends() {
                b.close_idle();
            }
        }
    }

    /// Handles one downstream request end to end, phase by phase. Never fails: errors become
    /// 4xx/5xx answers. `parsed`: the fields of the head kaproxy's own HTTP/1.1 loop parsed,
    /// which the phases read in place of the request's map (left empty by the loop).
    pub async fn handle(
        &self,
        req: Request<ClientBody>,
        parsed: Option<&Fields>,
        ds: &DownstreamInfo,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        if parts.version == Version::HTTP_2 {
            join_cookie_crumbs(&mut parts.headers);
        }
        let mut fields = match parsed {
            Some(parsed) => RequestFields::parsed(parsed),
            None => RequestFields::map(&parts.headers),
        };
        // Phase 1: route (route.rs), after what is refused before any backend (CONNECT, a
        // target in the wrong form, the Host rules of RFC 9112 §3.2, an ambiguous path); the
        // path is normalized in the request, so the backend gets the path the route matched.
        if let Err(refused) = admit(&parts.method, parts.version, &mut parts.uri, fields) {
            info!(client = %ds.peer.ip(), method = %parts.method, target = %parts.uri,
                problem = refused.reason.trim_end(), "request refused; {}", refused.status.as_u16());
            return refused.response(parts.version);
        }
        let host = request_host(&parts.uri, fields);
        let host_str = host.as_ref().and_then(|h| h.to_str().ok());
        let Some(upstream) = self.route(host_str, parts.uri.path()) else {
            warn!(client = %ds.peer.ip(), host = ?host, path = %parts.uri.path(), "no route matches; 404");
            return local_response(StatusCode::NOT_FOUND, "no route for this host and path\n");
        };
        let client_ip = client_ip(ds.peer.ip(), fields, &self.forwarded);
        let log = self.access_log.then(|| {
            Box::new(AccessRecord {
                client: client_ip,
                method: parts.method.clone(),
                path: parts.uri.path().to_string(),
                upstream: upstream.name.clone(),
                start,
                ..AccessRecord::default()
            })
        });
        let ctx = RequestContext {
            group: upstream,
            client_ip,
            version: parts.version,
            start,
            log,
        };
        if let Some(offered) =
            tunnelled_upgrade(parts.version, fields, &upstream.config.upgrade_protocols)
        {
            // Rare: boxed so its state does not enlarge every request's future. The handshake
            // goes through hyper's client, which takes a map.
            if parsed.is_some() {
                parts.headers = fields.to_map();
            }
            let req = Request::from_parts(parts, body);
            let tunnel = self.tunnel(ctx, req, ds, host, offered);
            return Box::pin(tunnel).await;
        }

        // Phase 2: the body is read whole first (body.rs), so a slow client never holds an
        // upstream connection and the body can be sent again; then the request filter
        // (forwarded.rs) writes the head that goes upstream.
        let buffers = &upstream.config.buffers;
        let body = if body.is_end_stream() {
            UpstreamBody::Empty
        } else {
            // Refused by its Content-Length before a byte is read (so a client that sent
            // `Expect: 100-continue` gets the 413 instead of a 100).
            if let Some(max) = buffers.max_request_body_bytes {
                if body.size_hint().lower() > max {
                    return ctx.client_failed(&BodyError::TooLarge(max));
                }
            }
            let body = self.request_body(body, &mut parts.extensions, upstream);
            let limit = buffers.request_buffer_bytes;
            let read = if buffers.request_buffering {
                Box::pin(read_whole(body, limit, &self.buffering)).await
            } else {
                Box::pin(buffer_request(body, limit, &self.buffering)).await
            };
            // hyper, or the own loop, answered `Expect: 100-continue` when the body was first
            // read; the backend gets the body without being asked (as behind nginx).
            fields = fields.without_expect();
            match read {
                Ok(body) => body,
                Err(err) => return ctx.client_failed(&err),
            }
        };
        let head = upstream_head(
            &parts.method,
            &parts.uri,
            fields,
            ds,
            &self.forwarded,
            host.as_ref(),
        );
        drop(parts);
        let resend = Resend::new(&upstream.config.retry, head.method(), &body);

        // Phase 3: pick a server, connect, send; fail over and retry (retry.rs).
        match Failover::new(&ctx).send(head, body, resend).await {
            // Phase 4: response filter (response.rs); the access log line (log.rs) is written
            // when the body ends.
            Ok(sent) => self.respond(ctx, sent).await,
            Err(Failed::Client(err)) => match err.body_error() {
                Some(fault) => ctx.client_failed(fault),
                None => unreachable!("Failed::Client carries a body error"),
            },
            Err(Failed::Server(backend, err)) => ctx.server_failed(backend.pool(), &err),
            Err(Failed::Answer(answer)) => ctx.answer(*answer),
        }
    }

    /// A request body as it is read from the client: each gap bounded by `body_timeout`, its
    /// size by the group's `max_request_body_bytes`, and its end told to the downstream
    /// connection ([`BodyDone`], taken from the request's extensions).
    fn request_body(
        &self,
        body: ClientBody,
        extensions: &mut http::Extensions,
        group: &UpstreamGroup,
    ) -> RequestBody {
        let done = extensions.remove::<BodyDone>();
        RequestBody::new(
            body,
            done,
            self.body_timeout,
            group.config.buffers.max_request_body_bytes,
        )
    }
}

fn build_request(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn passive_cooldown_comes_from_the_health_table() {
        let src =
            "[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.web]\nservers = [\"127.0.0.1:9\"]\n\
                   [upstreams.web.health]\nfall = 1\npassive_cooldown = \"2s\"\n";
        let cfg = Config::from_toml_str(src, std::path::Path::new("t.toml")).unwrap();
        let proxy = Proxy::new(&cfg, Arc::new(Metrics::new())).unwrap();
        let backend = &proxy.upstreams()[0].balancer.backends()[0];
        backend.record_failure();
        assert!(
            !backend.is_up(Instant::now()),
            "fall = 1: down after one failure"
        );
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!backend.is_up(Instant::now()), "still cooling down");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            backend.is_up(Instant::now()),
            "tried again after passive_cooldown"
        );
    }
}
