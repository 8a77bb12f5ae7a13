//! Owns WebSocket / `Upgrade` tunnels: a dedicated upstream connection per tunnel, the
//! upgrade handshake forwarded, then bytes copied both ways.

use std::net::IpAddr;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use crate::body::{BodyDone, RequestBody, Streamed, UpstreamBody};
use crate::error::RequestError;
use crate::upstream::pool::Pool;

use super::forwarded::*;
use super::log::*;
use super::response::*;
use super::retry::*;
use super::route::*;
use super::{build_request, Proxy, Upstream};

pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

impl Proxy {
    /// WebSocket / `Upgrade`: a dedicated upstream connection, then bytes both ways.
    pub(super) async fn tunnel(
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
            UpstreamBody::Stream(Box::new(Streamed {
                prefix: None,
                rest: RequestBody::new(
                    body,
                    done,
                    self.body_timeout,
                    upstream.config.buffers.max_request_body_bytes,
                ),
            }))
        };
        let req = build_request(parts.method, origin_form(&parts.uri), headers, body);
        let mut attempts = Attempts::new(&upstream.config.retry);
        let (backend, mut sender) = match self
            .connect(upstream, client_ip, &mut attempts, |p| async move {
                p.tunnel_connect().await
            })
            .await
        {
            Ok(pair) => pair,
            Err(resp) => return with_log(resp, log),
        };
        let pool = backend.pool();
        let sent =
            tokio::time::timeout(upstream.config.response_timeout, sender.send_request(req)).await;
        let mut resp = match sent {
            Ok(Ok(resp)) => {
                backend.record_success();
                resp
            }
            Ok(Err(e)) => {
                let err = RequestError::from_send(pool.addr(), e);
                err.count_in(pool.metrics());
                return server_failed(upstream, pool, &err, log);
            }
            Err(_) => {
                let err = RequestError::ResponseTimeout {
                    addr: pool.addr(),
                    timeout: upstream.config.response_timeout,
                };
                err.count_in(pool.metrics());
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

impl Pool {
    /// A dedicated, never pooled, upgrade-capable connection for a tunnel.
    pub(super) async fn tunnel_connect(&self) -> Result<SendRequest<UpstreamBody>, RequestError> {
        let addr = self.addr();
        let stream = self.connector().open(addr, self.config()).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, UpstreamBody>(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|source| RequestError::Handshake { addr, source })?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender)
    }
}
