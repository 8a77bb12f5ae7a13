//! Owns `Upgrade` tunnels (README, "Upgrade tunnels"): which upgrades are tunnelled (the
//! group's `upgrade_protocols`, `websocket` by default; never `h2c`), a dedicated upstream
//! connection per tunnel that holds one of the backend's `max_connections_per_server`, the
//! handshake forwarded and the backend's `101` checked against what the client offered
//! (RFC 9110 §15.2.2), then the tunnel ([`super::switched`]) started with the client's side
//! of the connection.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::Body;

use crate::body::{ClientBody, Streamed, UpstreamBody};
use crate::error::RequestError;
use crate::headers::field_tokens;

use super::answer::{Inner, ProxyBody};
use super::context::{RequestContext, ResponseDeadline};
use super::fields::RequestFields;
use super::forwarded::{filter_head, strip_hop_by_hop, DownstreamInfo};
use super::retry::Failover;
use super::switched::Switched;
use super::{build_request, Proxy};

/// The `Upgrade` tokens of `headers` (comma-separated, trimmed).
fn upgrade_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    crate::headers::tokens(headers, &header::UPGRADE)
}

/// A token's protocol name, without its `/version` (RFC 9110 §7.8), for comparison.
fn protocol_name(token: &str) -> &str {
    token.split('/').next().unwrap_or(token)
}

/// What of the request's `Upgrade` this group tunnels, as the header value to send on: the
/// offered protocols named in `allowed` (`upgrade_protocols`), in the client's order. None
/// when there are none (or the request is no HTTP/1.1 upgrade): it is then served as a plain
/// request, and `Upgrade` goes with the other hop-by-hop headers — an `h2c` upgrade would
/// carry the client's own HTTP/2 streams past the routes and the forwarding headers.
pub(super) fn tunnelled_upgrade(
    version: Version,
    fields: RequestFields<'_>,
    allowed: &[String],
) -> Option<HeaderValue> {
    if version != Version::HTTP_11
        || !fields
            .values(&header::CONNECTION)
            .flat_map(field_tokens)
            .any(|t| t.eq_ignore_ascii_case("upgrade"))
    {
        return None;
    }
    let upgrade = header::UPGRADE;
    let offered: Vec<&str> = fields
        .values(&upgrade)
        .flat_map(field_tokens)
        .filter(|t| {
            let name = protocol_name(t);
            allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
        })
        .collect();
    if offered.is_empty() {
        return None;
    }
    HeaderValue::from_str(&offered.join(", ")).ok()
}

/// Whether the backend's `101` switches to a protocol the request offered: its `Upgrade`
/// names exactly one, and `offered` has it (RFC 9110 §15.2.2).
fn switched_to_offered(response: &HeaderMap, offered: &HeaderValue) -> bool {
    let mut chosen = upgrade_tokens(response);
    match (chosen.next(), chosen.next()) {
        (Some(c), None) => crate::headers::value_tokens(offered)
            .any(|o| protocol_name(o).eq_ignore_ascii_case(protocol_name(c))),
        _ => false,
    }
}

impl Proxy {
    /// An upgrade this group tunnels (`offered`, see [`tunnelled_upgrade`]): a dedicated
    /// upstream connection, the handshake, then bytes both ways.
    pub(super) async fn tunnel(
        &self,
        mut ctx: RequestContext<'_>,
        mut req: Request<ClientBody>,
        ds: &DownstreamInfo,
        host: Option<HeaderValue>,
        offered: HeaderValue,
    ) -> Response<ProxyBody> {
        let upstream = ctx.group;
        // hyper's server gives the client side of a request it read once the 101 is written;
        // kaproxy's own loop hands it over itself (`Switched`).
        let downstream_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
        let (mut parts, body) = req.into_parts();
        filter_head(&mut parts, ds, &self.forwarded, host.as_ref());
        parts.headers.insert(header::UPGRADE, offered.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let body = if body.is_end_stream() {
            UpstreamBody::Empty
        } else {
            let body = self.request_body(body, &mut parts.extensions, upstream);
            UpstreamBody::Stream(Box::new(Streamed::new(None, body)))
        };
        let req = build_request(parts.method, parts.uri, parts.headers, body);
        let connected = Failover::new(&ctx)
            .connect(|p| async move { p.tunnel_connect().await })
            .await;
        let (backend, (mut sender, slot)) = match connected {
            Ok(pair) => pair,
            Err(resp) => return ctx.answer(resp),
        };
        let pool = backend.pool();
        let deadline = ResponseDeadline {
            addr: pool.addr(),
            limit: upstream.config.response_timeout,
        };
        let sent = match deadline.bound(sender.send_request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RequestError::from_send(pool.addr(), e)),
            Err(elapsed) => Err(elapsed),
        };
        let mut resp = match sent {
            Ok(resp) => {
                backend.record_success();
                resp
            }
            Err(err) => {
                err.count_in(pool.metrics());
                return ctx.server_failed(pool, &err);
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && !switched_to_offered(resp.headers(), &offered)
        {
            let err = RequestError::UnexpectedUpgrade { addr: pool.addr() };
            return ctx.server_failed(pool, &err);
        }
        pool.metrics().request(resp.status().as_u16());
        if let Some(log) = ctx.log.as_mut() {
            log.status = resp.status().as_u16();
            log.server = Some(pool.addr());
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let switched = Switched {
                upstream: hyper::upgrade::on(&mut resp),
                metrics: pool.metrics().clone(),
                idle: upstream.config.tunnel_idle_timeout,
                slot,
            };
            let (parts, _) = resp.into_parts();
            let mut body = ProxyBody::empty(ctx.log);
            match downstream_upgrade {
                Some(down) => {
                    tokio::spawn(async move {
                        if let Ok(down) = down.await {
                            switched.run(hyper_util::rt::TokioIo::new(down)).await;
                        }
                    });
                }
                None => body.inner = Inner::Switched(Box::new(switched)),
            }
            return Response::from_parts(parts, body);
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(
            parts,
            ProxyBody {
                inner: Inner::Tunnel(body),
                bytes: 0,
                log: ctx.log,
                forwarded: None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_of(req: Request<()>, allowed: &[String]) -> Option<HeaderValue> {
        tunnelled_upgrade(req.version(), RequestFields::map(req.headers()), allowed)
    }

    fn request(upgrade: &str, connection: &str) -> Request<()> {
        Request::builder()
            .header(header::UPGRADE, upgrade)
            .header(header::CONNECTION, connection)
            .body(())
            .unwrap()
    }

    #[test]
    fn only_the_allowed_upgrades_are_tunnelled_and_never_h2c() {
        let allowed = vec!["websocket".to_string()];
        let ws = upgrade_of(request("WebSocket", "Upgrade"), &allowed);
        assert_eq!(ws.unwrap(), "WebSocket");
        let h2c = upgrade_of(request("h2c", "Upgrade, HTTP2-Settings"), &allowed);
        assert!(h2c.is_none(), "h2c is served as plain HTTP/1.1");
        let both = upgrade_of(request("h2c, websocket", "upgrade"), &allowed);
        assert_eq!(both.unwrap(), "websocket", "only what is allowed goes on");
        assert!(
            upgrade_of(request("websocket", "keep-alive"), &allowed).is_none(),
            "no upgrade without Connection: upgrade"
        );
        let versioned = vec!["websocket".to_string(), "foo".to_string()];
        let foo = upgrade_of(request("foo/2", "upgrade"), &versioned);
        assert_eq!(foo.unwrap(), "foo/2");
    }

    #[test]
    fn a_101_must_name_one_protocol_the_request_offered() {
        let offered = HeaderValue::from_static("websocket");
        let answer = |upgrade: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(u) = upgrade {
                h.insert(header::UPGRADE, HeaderValue::from_str(u).unwrap());
            }
            switched_to_offered(&h, &offered)
        };
        assert!(answer(Some("websocket")));
        assert!(answer(Some("WebSocket")));
        assert!(!answer(Some("h2c")), "not offered");
        assert!(!answer(None), "no protocol named");
        assert!(!answer(Some("websocket, h2c")), "one protocol only");
    }
}
