//! Owns the per-request phases: route → forwarding headers → pick a backend → send through the
//! pool → retry → response filter → access log. The only module that sees both downstream and
//! upstream.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::body::{buffer_request, BodyDone, BodyError, Collected, RequestBody, UpstreamBody};
use crate::config::{BufferConfig, Config, ForwardedConfig, HostMatch, RetryConfig};
use crate::error::UpstreamError;
use crate::ops::metrics::CloseReason;
use crate::ops::metrics::Metrics;
use crate::upstream::backend::Backend;
use crate::upstream::balancer::Balancer;
use crate::upstream::keep_alive::KEEP_ALIVE;
use crate::upstream::pool::{PooledBody, PooledConn, SendFailure, ServerPool};

/// The retry back-off doubles up to this (SPEC.md: "doubling, capped at 1 s").
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(1);

const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// What kaproxy knows about the downstream connection a request arrived on.
#[derive(Debug, Clone)]
pub struct DownstreamInfo {
    /// The client address: the socket peer, or the PROXY header's source.
    pub peer: SocketAddr,
    /// The listener's local address (for X-Forwarded-Port).
    pub local: SocketAddr,
    pub tls: bool,
    /// The peer IP and local port as header values, made once per connection.
    peer_value: HeaderValue,
    port_value: HeaderValue,
}

impl DownstreamInfo {
    pub fn new(peer: SocketAddr, local: SocketAddr, tls: bool) -> Self {
        DownstreamInfo {
            peer,
            local,
            tls,
            peer_value: header_value(&peer.ip().to_string()),
            port_value: HeaderValue::from(local.port()),
        }
    }
}

/// One named upstream group: its balancer and one pool per backend (same index).
pub struct Upstream {
    pub name: String,
    pub balancer: Balancer,
    pub pools: Vec<Arc<ServerPool>>,
    retry: RetryConfig,
    buffers: BufferConfig,
    response_timeout: Duration,
}

struct Route {
    host: Option<HostMatch>,
    path_prefix: Option<String>,
    upstream: usize,
}

/// The request-handling half of a loaded configuration. Swapped whole on reload.
pub struct Proxy {
    upstreams: Vec<Upstream>,
    routes: Vec<Route>,
    forwarded: ForwardedConfig,
    access_log: bool,
    /// `[downstream] body_timeout`: the longest gap between two reads of a request body.
    body_timeout: Duration,
}

impl Proxy {
    /// Builds balancers and pools from a validated config. Must run inside a tokio runtime
    /// (each pool starts its sweep task).
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Proxy {
        Self::reusing(cfg, metrics, None)
    }

    /// Like [`Proxy::new`], keeping the pools (and their warm connections) of `previous` for
    /// servers that stay in the same upstream with the same pool settings (reload).
    pub fn reusing(cfg: &Config, metrics: Arc<Metrics>, previous: Option<&Proxy>) -> Proxy {
        let kept = |upstream: &str, addr: SocketAddr, pool_cfg: &crate::config::PoolConfig| {
            let old = previous?.upstreams.iter().find(|u| u.name == upstream)?;
            old.pools
                .iter()
                .find(|p| p.addr() == addr && p.config() == pool_cfg)
                .cloned()
        };
        let upstreams: Vec<Upstream> = cfg
            .upstreams
            .iter()
            .map(|u| {
                let balancer = Balancer::new(u);
                // Keep the probes' verdict across a reload (only while probes run to clear it).
                if u.health.is_some() {
                    if let Some(old) =
                        previous.and_then(|p| p.upstreams.iter().find(|o| o.name == u.name))
                    {
                        for b in balancer.backends() {
                            if let Some(ob) =
                                old.balancer.backends().iter().find(|ob| ob.addr == b.addr)
                            {
                                b.health.inherit_active(&ob.health);
                            }
                        }
                    }
                }
                let pools = balancer
                    .backends()
                    .iter()
                    .map(|b| {
                        kept(&u.name, b.addr, &u.pool).unwrap_or_else(|| {
                            let m = metrics.server(&u.name, b.addr);
                            m.up.set(1);
                            ServerPool::new(b.addr, u.pool.clone(), m)
                        })
                    })
                    .collect();
                Upstream {
                    name: u.name.clone(),
                    balancer,
                    pools,
                    retry: u.retry.clone(),
                    buffers: u.buffers,
                    response_timeout: u.pool.response_timeout,
                }
            })
            .collect();
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
        Proxy {
            upstreams,
            routes,
            forwarded: cfg.forwarded.clone(),
            access_log: cfg.log.access_log,
            body_timeout: cfg.downstream.body_timeout,
        }
    }

    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// Closes every idle upstream connection (shutdown).
    pub fn close_idle(&self) {
        for u in &self.upstreams {
            for p in &u.pools {
                p.close_idle();
            }
        }
    }

    /// Phase 1: which upstream group serves this request.
    fn route(&self, host: Option<&str>, path: &str) -> Option<&Upstream> {
        if self.routes.is_empty() {
            return self.upstreams.first();
        }
        // The host without port or trailing dot; patterns are lower case (config).
        let host = host.map(|h| strip_port(h).trim_end_matches('.'));
        let path = normalize_path(path);
        self.routes
            .iter()
            .find(|r| {
                let host_ok = match (&r.host, host) {
                    (None, _) => true,
                    (Some(HostMatch::Exact(h)), Some(req)) => h.eq_ignore_ascii_case(req),
                    (Some(HostMatch::Suffix(s)), Some(req)) => {
                        req.len() > s.len()
                            && req.is_char_boundary(req.len() - s.len())
                            && req[req.len() - s.len()..].eq_ignore_ascii_case(s)
                    }
                    (Some(_), None) => false,
                };
                host_ok && r.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
            })
            .map(|r| &self.upstreams[r.upstream])
    }

    /// Handles one downstream request end to end. Never fails: errors become 4xx/5xx answers.
    pub async fn handle(&self, req: Request<Incoming>, ds: &DownstreamInfo) -> Response<ProxyBody> {
        let start = Instant::now();
        if let Some(problem) = host_problem(&req) {
            info!(client = %ds.peer.ip(), problem, "bad Host header; 400");
            return closing(
                local_response(StatusCode::BAD_REQUEST, problem),
                req.version(),
            );
        }
        let host = request_host(&req);
        let host_str = host.as_ref().and_then(|h| h.to_str().ok());
        let Some(upstream) = self.route(host_str, req.uri().path()) else {
            warn!(client = %ds.peer.ip(), host = ?host, path = %req.uri().path(), "no route matches; 404");
            return local_response(StatusCode::NOT_FOUND, "no route for this host and path\n");
        };
        let client_ip = client_ip(ds.peer.ip(), req.headers(), &self.forwarded);
        let log = self.access_log.then(|| {
            Box::new(AccessRecord {
                client: client_ip,
                method: req.method().clone(),
                path: req.uri().path().to_string(),
                upstream: upstream.name.clone(),
                start,
                ..AccessRecord::default()
            })
        });
        if is_upgrade(&req) {
            // Rare: boxed so its state does not enlarge every request's future.
            return Box::pin(self.tunnel(req, ds, upstream, client_ip, host, log)).await;
        }

        let (mut parts, body) = req.into_parts();
        let version = parts.version;
        let mut headers = parts.headers;
        upstream_request_headers(&mut headers, ds, &self.forwarded, host.as_ref());
        let method = parts.method;
        let uri = origin_form(&parts.uri);
        let body = if body.is_end_stream() {
            UpstreamBody::Empty
        } else {
            let done = parts.extensions.remove::<BodyDone>();
            let body = RequestBody::new(body, done, self.body_timeout);
            // A small body is read whole before any backend is involved, so a slow client
            // never holds an upstream connection (and the body can be sent again on retry).
            match Box::pin(buffer_request(body, upstream.buffers.request_buffer_bytes)).await {
                Ok(body) => body,
                Err(err) => return client_failed(&err, client_ip, version, log),
            }
        };
        // Kept only when sending again after a written request could happen at all.
        let template = (is_idempotent(&method) && upstream.retry.retry_idempotent)
            .then(|| Some((method.clone(), uri.clone(), headers.clone(), body.replay()?)))
            .flatten();
        let again = || {
            let (m, u, h, b) = template.as_ref()?;
            Some(build_request(m.clone(), u.clone(), h.clone(), b.replay()?))
        };
        let mut request = Some(build_request(method, uri, headers, body));

        let mut attempts = Attempts::new(&upstream.retry);
        let mut fresh_on: Option<usize> = None;
        let mut retried_reused = false;
        loop {
            let connected = match fresh_on.take() {
                Some(idx) => match upstream.pools[idx].acquire_fresh().await {
                    Ok(conn) => Ok((idx, conn)),
                    Err(err) => {
                        self.connect_failed(upstream, idx, &err, &mut attempts)
                            .await;
                        self.connect(upstream, client_ip, &mut attempts, |p| async move {
                            p.acquire().await
                        })
                        .await
                    }
                },
                None => {
                    self.connect(upstream, client_ip, &mut attempts, |p| async move {
                        p.acquire().await
                    })
                    .await
                }
            };
            let (idx, mut conn) = match connected {
                Ok(pair) => pair,
                Err(resp) => return with_log(resp, log),
            };
            let pool = &upstream.pools[idx];
            let backend = &upstream.balancer.backends()[idx];
            let Some(req) = request.take().or_else(|| again()) else {
                unreachable!("an attempt is only made with a request to send");
            };
            let sent = tokio::time::timeout(upstream.response_timeout, conn.send(req)).await;
            match sent {
                Ok(Ok(resp)) => {
                    record_success(backend, pool);
                    return self.respond(resp, conn, upstream, pool, log, start).await;
                }
                Err(_elapsed) => {
                    let err = UpstreamError::ResponseTimeout {
                        addr: pool.addr(),
                        timeout: upstream.response_timeout,
                    };
                    pool.metrics().error(err.kind());
                    record_failure(backend, pool);
                    drop(conn);
                    if upstream.retry.retry_on_timeout {
                        if let Some(req) = again() {
                            if self.move_on(upstream, idx, &err, &mut attempts).await {
                                request = Some(req);
                                continue;
                            }
                        }
                    }
                    return server_failed(upstream, pool, &err, log);
                }
                Ok(Err(SendFailure { error, unsent })) => {
                    if let Some(fault) = BodyError::in_chain(&error) {
                        // The client's body broke while it streamed upstream: the upstream
                        // connection is closed (reason `error`), the backend is not blamed.
                        drop(conn);
                        return client_failed(fault, client_ip, version, log);
                    }
                    pool.metrics().error(error.kind());
                    let reused = conn.is_reused();
                    drop(conn);
                    let next = unsent.or_else(|| again());
                    // The keep-alive race: a pooled connection the backend closed just as we
                    // reused it fails before any response byte. A request hyper never wrote
                    // goes again whatever its method; a written one only when idempotent with
                    // a replayable body (`template`). Once, on a fresh connection to the same
                    // server, which is not blamed for it.
                    if reused && !retried_reused {
                        if let Some(req) = next {
                            pool.metrics().retry(error.kind());
                            warn!(upstream = %upstream.name, server = %pool.addr(), cause = error.kind(), error = %error,
                                "reused upstream connection failed before responding; retrying on a fresh connection");
                            fresh_on = Some(idx);
                            retried_reused = true;
                            request = Some(req);
                            continue;
                        }
                        return server_failed(upstream, pool, &error, log);
                    }
                    // A fresh connection reset or closed before any response byte (a crashed
                    // worker, a backend going down): the server is blamed, and the request
                    // moves on to the next server like after a connect failure.
                    if !reused {
                        record_failure(backend, pool);
                    }
                    if let Some(req) = next {
                        if self.move_on(upstream, idx, &error, &mut attempts).await {
                            request = Some(req);
                            continue;
                        }
                    }
                    return server_failed(upstream, pool, &error, log);
                }
            }
        }
    }

    /// Picks a server and connects to it. A connect failure sent nothing, so for any method
    /// kaproxy marks it against the server's health and moves on to the next server, up to
    /// `max_retries` times with a doubling back-off. Errors become the answer to send.
    async fn connect<T, F, Fut>(
        &self,
        upstream: &Upstream,
        client_ip: IpAddr,
        attempts: &mut Attempts,
        mut connect: F,
    ) -> Result<(usize, T), Response<ProxyBody>>
    where
        F: FnMut(Arc<ServerPool>) -> Fut,
        Fut: std::future::Future<Output = Result<T, UpstreamError>>,
    {
        loop {
            let Some(idx) = upstream
                .balancer
                .pick(client_ip, &attempts.tried, Instant::now())
            else {
                warn!(upstream = %upstream.name, tried = attempts.tried.len(), "every server of the upstream failed; 502");
                return Err(local_response(
                    StatusCode::BAD_GATEWAY,
                    "no upstream server could be reached\n",
                ));
            };
            match connect(upstream.pools[idx].clone()).await {
                Ok(conn) => return Ok((idx, conn)),
                Err(err) if err.is_connect() => {
                    if !self.connect_failed(upstream, idx, &err, attempts).await {
                        return Err(local_response(err.status(), "upstream unavailable\n"));
                    }
                }
                Err(err) => {
                    upstream.pools[idx].metrics().error(err.kind());
                    warn!(upstream = %upstream.name, server = %upstream.pools[idx].addr(), error = %err,
                        status = err.status().as_u16(), "upstream failed");
                    return Err(local_response(err.status(), "upstream unavailable\n"));
                }
            }
        }
    }

    /// Books a connect failure on server `idx`; returns whether another server may be tried
    /// (after the back-off, which it sleeps).
    async fn connect_failed(
        &self,
        upstream: &Upstream,
        idx: usize,
        err: &UpstreamError,
        attempts: &mut Attempts,
    ) -> bool {
        let pool = &upstream.pools[idx];
        pool.metrics().error(err.kind());
        record_failure(&upstream.balancer.backends()[idx], pool);
        self.move_on(upstream, idx, err, attempts).await
    }

    /// Server `idx` failed the request (already counted and booked against its health):
    /// returns whether the next server may be tried, within `max_retries`, after the
    /// doubling back-off (which it sleeps). Counted in `kaproxy_upstream_retries_total` with
    /// the failure's kind as cause (`connect` for every connect failure).
    async fn move_on(
        &self,
        upstream: &Upstream,
        idx: usize,
        err: &UpstreamError,
        attempts: &mut Attempts,
    ) -> bool {
        let pool = &upstream.pools[idx];
        attempts.tried.push(idx);
        if attempts.retries_left == 0 || attempts.tried.len() >= upstream.pools.len() {
            warn!(upstream = %upstream.name, server = %pool.addr(), error = %err, "upstream failed; no retries or servers left");
            return false;
        }
        attempts.retries_left -= 1;
        let cause = if err.is_connect() {
            "connect"
        } else {
            err.kind()
        };
        pool.metrics().retry(cause);
        warn!(upstream = %upstream.name, server = %pool.addr(), error = %err, backoff = ?attempts.backoff,
            "upstream failed; trying the next server");
        tokio::time::sleep(attempts.backoff).await;
        attempts.backoff = (attempts.backoff * 2).min(MAX_RETRY_BACKOFF);
        true
    }

    /// Response filter: framing checked, hop-by-hop headers out, a small body read ahead (so
    /// the upstream connection is free however slowly the client reads), metrics, the body
    /// tied to its pooled connection.
    async fn respond(
        &self,
        resp: Response<Incoming>,
        mut conn: PooledConn,
        upstream: &Upstream,
        pool: &ServerPool,
        mut log: Option<Box<AccessRecord>>,
        start: Instant,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        // RFC 9112 §6.3: with Transfer-Encoding, Content-Length is ignored and must not be
        // forwarded; a backend that sends both is not trusted with the connection afterwards.
        if parts.headers.contains_key(header::TRANSFER_ENCODING)
            && parts.headers.remove(header::CONTENT_LENGTH).is_some()
        {
            warn!(upstream = %upstream.name, server = %pool.addr(),
                "response has both Transfer-Encoding and Content-Length; Content-Length removed, upstream connection closed after it (RFC 9112 §6.3)");
            conn.retire_after(CloseReason::Error);
        }
        strip_hop_by_hop(&mut parts.headers);
        let (age, requests) = conn.age_and_requests();
        let reused = conn.is_reused();
        let body = conn.attach(body);
        let inner = match read_ahead(
            body,
            upstream.buffers.response_buffer_bytes,
            upstream.response_timeout,
        )
        .await
        {
            Ok(inner) => inner,
            Err(err) => {
                let err = match err {
                    Some(e) => UpstreamError::from_send(pool.addr(), e),
                    None => UpstreamError::ResponseTimeout {
                        addr: pool.addr(),
                        timeout: upstream.response_timeout,
                    },
                };
                pool.metrics().error(err.kind());
                return server_failed(upstream, pool, &err, log);
            }
        };
        pool.metrics().request(parts.status.as_u16());
        pool.metrics()
            .observe_duration(start.elapsed().as_secs_f64());
        if let Some(log) = log.as_mut() {
            log.status = parts.status.as_u16();
            log.server = Some(pool.addr());
            log.reused = reused;
            log.conn_age = age;
            log.conn_requests = requests;
        }
        parts.version = Version::HTTP_11;
        Response::from_parts(
            parts,
            ProxyBody {
                inner,
                bytes: 0,
                log,
            },
        )
    }

    /// WebSocket / `Upgrade`: a dedicated upstream connection, then bytes both ways.
    async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        ds: &DownstreamInfo,
        upstream: &Upstream,
        client_ip: IpAddr,
        host: Option<HeaderValue>,
        mut log: Option<Box<AccessRecord>>,
    ) -> Response<ProxyBody> {
        let downstream_upgrade = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        let mut headers = parts.headers;
        upstream_request_headers(&mut headers, ds, &self.forwarded, host.as_ref());
        if let Some(u) = upgrade {
            headers.insert(header::UPGRADE, u);
        }
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let body = if body.is_end_stream() {
            UpstreamBody::Empty
        } else {
            let done = parts.extensions.remove::<BodyDone>();
            UpstreamBody::Stream {
                prefix: None,
                rest: RequestBody::new(body, done, self.body_timeout),
            }
        };
        let req = build_request(parts.method, origin_form(&parts.uri), headers, body);
        let mut attempts = Attempts::new(&upstream.retry);
        let (idx, mut sender) = match self
            .connect(upstream, client_ip, &mut attempts, |p| async move {
                p.tunnel_connect().await
            })
            .await
        {
            Ok(pair) => pair,
            Err(resp) => return with_log(resp, log),
        };
        let pool = &upstream.pools[idx];
        let sent = tokio::time::timeout(upstream.response_timeout, sender.send_request(req)).await;
        let mut resp = match sent {
            Ok(Ok(resp)) => {
                record_success(&upstream.balancer.backends()[idx], pool);
                resp
            }
            Ok(Err(e)) => {
                let err = UpstreamError::from_send(pool.addr(), e);
                pool.metrics().error(err.kind());
                return server_failed(upstream, pool, &err, log);
            }
            Err(_) => {
                let err = UpstreamError::ResponseTimeout {
                    addr: pool.addr(),
                    timeout: upstream.response_timeout,
                };
                pool.metrics().error(err.kind());
                return server_failed(upstream, pool, &err, log);
            }
        };
        pool.metrics().request(resp.status().as_u16());
        if let Some(log) = log.as_mut() {
            log.status = resp.status().as_u16();
            log.server = Some(pool.addr());
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(down), Ok(up)) = tokio::join!(downstream_upgrade, upstream_upgrade) else {
                    return;
                };
                let mut down = hyper_util::rt::TokioIo::new(down);
                let mut up = hyper_util::rt::TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, ProxyBody::empty(log));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(
            parts,
            ProxyBody {
                inner: Inner::Tunnel(body),
                bytes: 0,
                log,
            },
        )
    }
}

impl ServerPool {
    /// A dedicated, never pooled, upgrade-capable connection for a tunnel.
    async fn tunnel_connect(&self) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        let addr = self.addr();
        let stream = self.dial().await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, UpstreamBody>(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender)
    }
}

/// Reads a small response body whole from the backend (nginx's proxy buffering), so that its
/// upstream connection goes back to the pool before the client has read a byte. Only a body
/// whose Content-Length is at most `limit` is read ahead, within `timeout`; a larger or
/// chunked one streams (and `send_timeout` bounds a client that stops reading it).
/// `Err(None)` is the timeout, `Err(Some(e))` a broken body.
async fn read_ahead(
    mut body: PooledBody,
    limit: usize,
    timeout: Duration,
) -> Result<Inner, Option<hyper::Error>> {
    match body.size_hint().exact() {
        Some(n) if n > 0 && n <= limit as u64 && !body.is_end_stream() => {}
        _ => return Ok(Inner::Upstream(body)),
    }
    let read = tokio::time::timeout(timeout, async {
        let mut read = Collected::default();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                read.push(data);
            }
        }
        Ok(read.into_bytes())
    })
    .await;
    match read {
        Ok(Ok(bytes)) => Ok(Inner::Local(Full::new(bytes))),
        Ok(Err(e)) => Err(Some(e)),
        Err(_) => Err(None),
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or an HTTP/1 request with more than
/// one or an invalid one, gets 400 (nginx and HAProxy do the same). HTTP/2 carries the
/// authority in `:authority`.
fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
    if !matches!(
        req.version(),
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    ) {
        return None;
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == Version::HTTP_11 => Some("HTTP/1.1 request without Host\n"),
        (Some(_), Some(_)) => Some("more than one Host header\n"),
        (Some(h), None)
            if !h.is_empty() && http::uri::Authority::try_from(h.as_bytes()).is_err() =>
        {
            Some("invalid Host header\n")
        }
        _ => None,
    }
}

/// Marks kaproxy's own answer to a broken request as the last on an HTTP/1 connection.
fn closing(mut resp: Response<ProxyBody>, version: Version) -> Response<ProxyBody> {
    if matches!(version, Version::HTTP_10 | Version::HTTP_11) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// kaproxy's answer when the client's request body failed (timeout, bad framing, gone): the
/// client's fault, so no backend is counted or blamed for it (README, "Hostile clients").
fn client_failed(
    err: &BodyError,
    client: IpAddr,
    version: Version,
    log: Option<Box<AccessRecord>>,
) -> Response<ProxyBody> {
    let status = err.status();
    info!(client = %client, error = %err, status = status.as_u16(), "request body failed");
    let text = match err {
        BodyError::Timeout(_) => "request body timed out\n",
        BodyError::Malformed(_) => "malformed request body\n",
    };
    with_log(closing(local_response(status, text), version), log)
}

/// What is left of a request's connect retries, and the servers already tried.
struct Attempts {
    tried: Vec<usize>,
    retries_left: u32,
    backoff: Duration,
}

impl Attempts {
    fn new(retry: &RetryConfig) -> Self {
        Attempts {
            tried: Vec::new(),
            retries_left: retry.max_retries,
            backoff: retry.retry_backoff,
        }
    }
}

fn record_failure(backend: &Backend, pool: &ServerPool) {
    if backend.health.record_failure(Instant::now()) {
        warn!(server = %backend.addr, "passive health: server marked down after consecutive failures");
    }
    pool.metrics()
        .up
        .set(backend.health.is_up(Instant::now()) as i64);
}

fn record_success(backend: &Backend, pool: &ServerPool) {
    backend.health.record_success();
    pool.metrics()
        .up
        .set(i64::from(backend.health.is_up(Instant::now())));
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

/// The upstream request target: path and query only.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(_) if uri.scheme().is_none() && uri.authority().is_none() => uri.clone(),
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

/// The request's host: the URI authority when the target has one (HTTP/2, or an absolute-form
/// target, where RFC 9112 §3.2.2 says `Host` is ignored), else the `Host` header.
fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    }
}

/// The path with `.` and `..` segments resolved, for route matching only (nginx does the
/// same), so that `/public/../admin` cannot slip past a `/admin` route. No allocation
/// unless there is a dot segment.
fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains("/.") {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = path.ends_with("/.") || path.ends_with("/..");
    let mut joined = String::with_capacity(path.len());
    for seg in &out {
        joined.push('/');
        joined.push_str(seg);
    }
    if trailing || joined.is_empty() {
        joined.push('/');
    }
    std::borrow::Cow::Owned(joined)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named in `Connection` and the
/// standard ones.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // By bytes, not `to_str`: a value with obs-text in it still names the headers it names.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the right-most
/// untrusted address of its X-Forwarded-For chain.
fn client_ip(peer: IpAddr, headers: &HeaderMap, cfg: &ForwardedConfig) -> IpAddr {
    let trusted = |ip: &IpAddr| cfg.trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    while let Some(ip) = chain.pop() {
        if !trusted(&ip) {
            return ip;
        }
    }
    peer
}

/// Request filter: hop-by-hop out, forwarding headers in, `Host` kept, keep-alive asked for.
pub fn upstream_request_headers(
    headers: &mut HeaderMap,
    ds: &DownstreamInfo,
    cfg: &ForwardedConfig,
    host: Option<&HeaderValue>,
) {
    strip_hop_by_hop(headers);
    let peer = ds.peer.ip();
    let trusted = cfg.trusted_proxies.iter().any(|n| n.contains(&peer));
    let proto = if ds.tls { "https" } else { "http" };

    let prior: Option<String> = if trusted {
        let parts: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    } else {
        None
    };
    let xff = match prior {
        Some(p) => header_value(&format!("{p}, {peer}")),
        None => ds.peer_value.clone(),
    };
    headers.insert(X_FORWARDED_FOR, xff);
    if cfg.x_forwarded_proto {
        // From a trusted proxy (e.g. a TLS-terminating LB in front) its view wins.
        let keep = |headers: &HeaderMap, h: &HeaderName| trusted && headers.contains_key(h);
        if !keep(headers, &X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if !keep(headers, &X_FORWARDED_PORT) {
            headers.insert(X_FORWARDED_PORT, ds.port_value.clone());
        }
        if !keep(headers, &X_FORWARDED_HOST) {
            match host {
                Some(h) => headers.insert(X_FORWARDED_HOST, h.clone()),
                None => headers.remove(X_FORWARDED_HOST),
            };
        }
    }
    if cfg.forwarded {
        let node = match peer {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let mut element = format!("for={node};proto={proto}");
        if let Some(h) = host.and_then(|h| h.to_str().ok()) {
            // A quoted-string (RFC 7239 §4, RFC 9110 §5.6.4): `"` and `\` escaped, so a
            // client's Host cannot close the quote and add elements of its own.
            element.push_str(";host=\"");
            for c in h.chars() {
                if c == '"' || c == '\\' {
                    element.push('\\');
                }
                element.push(c);
            }
            element.push('"');
        }
        let value = match headers.get(&FORWARDED).and_then(|v| v.to_str().ok()) {
            Some(prev) if trusted => format!("{prev}, {element}"),
            _ => element,
        };
        headers.insert(FORWARDED, header_value(&value));
    }
    if cfg.x_real_ip {
        let ip = client_ip(peer, headers, cfg);
        headers.insert(X_REAL_IP, header_value(&ip.to_string()));
    }
    // The authority of an HTTP/2 or absolute-form target becomes the backend's `Host`.
    if let Some(h) = host {
        headers.insert(header::HOST, h.clone());
    }
    crate::upstream::keep_alive::ask_keep_alive(headers);
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// kaproxy's answer when the picked server failed the request (the caller has counted the
/// error): counted as an answer of that server, logged with its cause, access-logged.
fn server_failed(
    upstream: &Upstream,
    pool: &ServerPool,
    err: &UpstreamError,
    log: Option<Box<AccessRecord>>,
) -> Response<ProxyBody> {
    let status = err.status();
    pool.metrics().request(status.as_u16());
    warn!(upstream = %upstream.name, server = %pool.addr(), error = %err, status = status.as_u16(), "upstream failed");
    let text = match err {
        UpstreamError::ResponseTimeout { .. } => "upstream timed out\n",
        _ => "upstream failed\n",
    };
    with_log(local_response(status, text), log)
}

/// Attaches the access log record to a response kaproxy made itself, so errors are logged too.
fn with_log(mut resp: Response<ProxyBody>, log: Option<Box<AccessRecord>>) -> Response<ProxyBody> {
    if let Some(mut log) = log {
        log.status = resp.status().as_u16();
        resp.body_mut().log = Some(log);
    }
    resp
}

/// A response kaproxy makes itself (errors).
pub fn local_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody {
        inner: Inner::Local(Full::new(Bytes::from_static(text.as_bytes()))),
        bytes: 0,
        log: None,
    });
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// One access log line, written when the response body is finished (or abandoned).
#[derive(Debug)]
struct AccessRecord {
    client: IpAddr,
    method: Method,
    path: String,
    status: u16,
    upstream: String,
    server: Option<SocketAddr>,
    reused: bool,
    conn_age: Duration,
    conn_requests: u32,
    start: Instant,
}

impl Default for AccessRecord {
    fn default() -> Self {
        AccessRecord {
            client: IpAddr::from([0, 0, 0, 0]),
            method: Method::GET,
            path: String::new(),
            status: 0,
            upstream: String::new(),
            server: None,
            reused: false,
            conn_age: Duration::ZERO,
            conn_requests: 0,
            start: Instant::now(),
        }
    }
}

enum Inner {
    Upstream(PooledBody),
    Tunnel(Incoming),
    Local(Full<Bytes>),
    Empty,
}

/// The body of every response kaproxy sends downstream.
pub struct ProxyBody {
    inner: Inner,
    bytes: u64,
    log: Option<Box<AccessRecord>>,
}

impl ProxyBody {
    /// Whether this body streams from a pooled upstream connection (which a client that stops
    /// reading would hold): the downstream puts such bodies under `send_timeout`.
    pub fn streams_from_upstream(&self) -> bool {
        matches!(&self.inner, Inner::Upstream(b) if !b.is_end_stream())
    }

    fn empty(log: Option<Box<AccessRecord>>) -> Self {
        ProxyBody {
            inner: Inner::Empty,
            bytes: 0,
            log,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let res = match &mut this.inner {
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Tunnel(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            Inner::Empty => Poll::Ready(None),
        };
        if let Poll::Ready(Some(Ok(frame))) = &res {
            if let Some(data) = frame.data_ref() {
                this.bytes += data.len() as u64;
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Tunnel(b) => b.is_end_stream(),
            Inner::Local(b) => b.is_end_stream(),
            Inner::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Tunnel(b) => b.size_hint(),
            Inner::Local(b) => b.size_hint(),
            Inner::Empty => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(r) = self.log.take() {
            info!(target: "kaproxy::access",
                client = %r.client,
                method = %r.method,
                path = %r.path,
                status = r.status,
                upstream = %r.upstream,
                server = %r.server.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                bytes = self.bytes,
                duration_ms = r.start.elapsed().as_secs_f64() * 1000.0,
                reused = r.reused,
                conn_age_ms = r.conn_age.as_millis() as u64,
                conn_requests = r.conn_requests,
                "access");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(trusted: &[&str]) -> ForwardedConfig {
        ForwardedConfig {
            trusted_proxies: trusted.iter().map(|s| s.parse().unwrap()).collect(),
            x_forwarded_proto: true,
            forwarded: true,
            x_real_ip: true,
        }
    }

    fn ds(peer: &str) -> DownstreamInfo {
        DownstreamInfo::new(
            peer.parse().unwrap(),
            "127.0.0.1:8443".parse().unwrap(),
            true,
        )
    }

    #[test]
    fn untrusted_peer_replaces_x_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        let host = HeaderValue::from_static("example.com");
        upstream_request_headers(&mut h, &ds("10.1.2.3:5555"), &fwd(&[]), Some(&host));
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(h[&X_REAL_IP], "10.1.2.3");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_PORT], "8443");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com");
        assert_eq!(
            h[&FORWARDED],
            "for=10.1.2.3;proto=https;host=\"example.com\""
        );
        assert_eq!(h[header::HOST], "example.com");
        assert_eq!(h[header::CONNECTION], "keep-alive");
    }

    #[test]
    fn trusted_peer_appends_to_x_forwarded_for() {
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("1.2.3.4, 10.0.0.9"),
        );
        upstream_request_headers(&mut h, &ds("10.0.0.1:5555"), &fwd(&["10.0.0.0/8"]), None);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 10.0.0.9, 10.0.0.1");
        // The right-most untrusted address is the client.
        assert_eq!(h[&X_REAL_IP], "1.2.3.4");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("X-Foo, close"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("x-bar", HeaderValue::from_static("2"));
        h.insert(PROXY_CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-foo"));
        assert!(h.contains_key("x-bar"));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn origin_form_drops_scheme_and_authority() {
        let u: Uri = "https://example.com:8443/a/b?c=d".parse().unwrap();
        assert_eq!(origin_form(&u), "/a/b?c=d");
        let u: Uri = "/x".parse().unwrap();
        assert_eq!(origin_form(&u), "/x");
    }

    #[test]
    fn dot_segments_are_resolved_for_routing() {
        assert_eq!(normalize_path("/a/b"), "/a/b");
        assert_eq!(normalize_path("/alpha/../beta/"), "/beta/");
        assert_eq!(normalize_path("/a/./b"), "/a/b");
        assert_eq!(normalize_path("/../../x"), "/x");
        assert_eq!(normalize_path("/a/.."), "/");
        assert_eq!(normalize_path("/a/b/."), "/a/b/");
        assert_eq!(normalize_path("/.well-known/x"), "/.well-known/x");
    }

    #[test]
    fn host_rules_of_rfc_9112() {
        let req = |version: Version, hosts: &[&'static str]| {
            let mut r = Request::new(());
            *r.version_mut() = version;
            for h in hosts {
                r.headers_mut()
                    .append(header::HOST, HeaderValue::from_static(h));
            }
            host_problem(&r)
        };
        assert_eq!(req(Version::HTTP_11, &["a.example"]), None);
        assert_eq!(req(Version::HTTP_11, &["a.example:8080"]), None);
        assert_eq!(req(Version::HTTP_11, &["[::1]:8080"]), None);
        assert!(req(Version::HTTP_11, &[]).is_some(), "HTTP/1.1 needs Host");
        assert_eq!(req(Version::HTTP_10, &[]), None, "HTTP/1.0 may omit it");
        assert!(req(Version::HTTP_11, &["a", "b"]).is_some());
        assert!(req(Version::HTTP_10, &["a", "a"]).is_some());
        assert!(req(Version::HTTP_11, &["a b"]).is_some(), "invalid");
        assert!(req(Version::HTTP_11, &["a/b"]).is_some(), "invalid");
        assert_eq!(req(Version::HTTP_2, &[]), None, "HTTP/2 has :authority");
    }

    #[test]
    fn host_port_is_stripped_for_routing() {
        assert_eq!(strip_port("api.example.com:8443"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:8443"), "[::1]");
    }
}
