//! Owns per-server control through the admin listener, as HAProxy's runtime API (`show
//! servers state`, `set server ... state drain|ready`, `set server ... weight`) does it:
//! `GET /servers[/UPSTREAM]`, `POST /servers/UPSTREAM/ADDR/drain|enable` and
//! `POST /servers/UPSTREAM/ADDR/weight?value=N`; who may call the mutating ones (a loopback
//! peer, or one that carries `[admin] token`), and the log line of every change.

use std::net::IpAddr;

use http::{header, HeaderMap, Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::info;

use crate::downstream::Generation;
use crate::upstream::backend::Backend;
use crate::upstream::group::UpstreamGroup;

/// The largest weight the API sets: far above any useful ratio, small enough that the
/// balancers' sums of weights cannot overflow.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// An answer of this API: its status and JSON body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    fn ok(body: Value) -> Answer {
        Answer {
            status: StatusCode::OK,
            body,
        }
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Answer {
        Answer {
            status,
            body: json!({ "error": message.into() }),
        }
    }
}

/// Whether a request that changes state may: from a loopback peer always (whoever can reach
/// 127.0.0.1 already runs on the host), from any other only with `Authorization: Bearer
/// <token>` matching the configured `[admin] token`, and never when none is configured.
pub fn authorized(peer: IpAddr, headers: &HeaderMap, token: Option<&str>) -> bool {
    if peer.to_canonical().is_loopback() {
        return true;
    }
    let Some(token) = token else {
        return false;
    };
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.strip_prefix("Bearer "))
        .any(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// Compares without stopping at the first difference, so that timing tells nothing of how
/// much of a guess was right (the length may show).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `path` is this API's (`/servers` and below).
pub fn is_servers_path(path: &str) -> bool {
    path == "/servers" || path.starts_with("/servers/")
}

/// Answers a request to `/servers...` against the backends of `generation`.
pub fn answer(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    peer: IpAddr,
    generation: &Generation,
) -> Answer {
    let segments: Vec<String> = path
        .trim_start_matches("/servers")
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let upstreams = generation.proxy.upstreams();
    let find_group = |name: &str| upstreams.iter().find(|u| u.name == name);
    match (method, segments.as_slice()) {
        (&Method::GET, []) => Answer::ok(Value::Array(
            upstreams.iter().flat_map(group_json).collect(),
        )),
        (&Method::GET, [upstream]) => match find_group(upstream) {
            Some(group) => Answer::ok(Value::Array(group_json(group))),
            None => Answer::error(StatusCode::NOT_FOUND, format!("no upstream {upstream:?}")),
        },
        (&Method::POST, [upstream, addr, action]) => {
            let token = generation.config.admin.token.as_deref();
            if !authorized(peer, headers, token) {
                info!(client = %peer, upstream = %upstream, server = %addr, action = %action,
                    "admin: server change refused (not loopback, no valid token)");
                return Answer::error(
                    StatusCode::FORBIDDEN,
                    "changes need a loopback peer or Authorization: Bearer <[admin] token>",
                );
            }
            let Some(group) = find_group(upstream) else {
                return Answer::error(StatusCode::NOT_FOUND, format!("no upstream {upstream:?}"));
            };
            let Some(backend) = group
                .balancer
                .backends()
                .iter()
                .find(|b| b.addr.to_string() == *addr)
            else {
                return Answer::error(
                    StatusCode::NOT_FOUND,
                    format!("upstream {upstream} has no server {addr:?}"),
                );
            };
            change(group, backend, action, query, peer)
        }
        (_, [] | [_]) => Answer::error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (_, [_, _, _]) => Answer::error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        _ => Answer::error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Applies `action` to `backend` and logs it.
fn change(
    group: &UpstreamGroup,
    backend: &Backend,
    action: &str,
    query: Option<&str>,
    peer: IpAddr,
) -> Answer {
    let (upstream, server) = (&group.name, backend.addr);
    match action {
        "drain" => {
            let changed = backend.drain();
            info!(client = %peer, upstream = %upstream, server = %server, changed,
                in_flight = backend.in_flight(), "admin: server drained; no new requests, idle connections closed");
        }
        "enable" => {
            let changed = backend.enable();
            info!(client = %peer, upstream = %upstream, server = %server, changed,
                "admin: server enabled; it takes requests again");
        }
        "weight" => {
            let value = query
                .unwrap_or("")
                .split('&')
                .find_map(|kv| kv.strip_prefix("value="));
            let weight = match value.map(str::parse::<u32>) {
                Some(Ok(w)) if (1..=MAX_WEIGHT).contains(&w) => w,
                _ => {
                    return Answer::error(
                        StatusCode::BAD_REQUEST,
                        format!("weight needs ?value=N with N from 1 to {MAX_WEIGHT} (drain takes a server out)"),
                    )
                }
            };
            let old = backend.set_weight(weight);
            info!(client = %peer, upstream = %upstream, server = %server, old, weight,
                configured = backend.configured_weight(), "admin: server weight set");
        }
        other => {
            return Answer::error(
                StatusCode::NOT_FOUND,
                format!("no action {other:?}: drain, enable or weight"),
            )
        }
    }
    Answer::ok(server_json(upstream, backend, Instant::now()))
}

fn group_json(group: &UpstreamGroup) -> Vec<Value> {
    let now = Instant::now();
    group
        .balancer
        .backends()
        .iter()
        .map(|b| server_json(&group.name, b, now))
        .collect()
}

/// One server as this API shows it.
pub fn server_json(upstream: &str, b: &Backend, now: Instant) -> Value {
    json!({
        "upstream": upstream,
        "addr": b.addr.to_string(),
        "weight": b.weight(),
        "configured_weight": b.configured_weight(),
        "effective_weight": effective_weight(b, now),
        "slow_start_share": b.ramp(now),
        "drained": b.is_drained(),
        "up": b.health.is_up(now),
        "in_flight": b.in_flight(),
        "idle_connections": b.idle_count(),
    })
}

/// The weight the balancer uses now (below `weight` while it ramps over `slow_start`).
pub fn effective_weight(b: &Backend, now: Instant) -> f64 {
    b.effective_weight(now) as f64 / crate::upstream::backend::WEIGHT_SCALE as f64
}

/// `%XX` escapes decoded (an IPv6 server is `%5B::1%5D:8080` in a path); anything that does
/// not decode is kept as written.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| segment.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        headers.insert(header::AUTHORIZATION, value);
        headers
    }

    const REMOTE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));

    #[test]
    fn loopback_peers_need_no_token() {
        for peer in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            let peer: IpAddr = peer.parse().unwrap();
            assert!(authorized(peer, &HeaderMap::new(), None), "{peer}");
            assert!(
                authorized(peer, &HeaderMap::new(), Some("s3cret")),
                "{peer}"
            );
        }
    }

    #[test]
    fn other_peers_need_the_configured_token() {
        assert!(!authorized(REMOTE, &HeaderMap::new(), None));
        assert!(
            !authorized(REMOTE, &bearer("anything"), None),
            "no token configured"
        );
        assert!(!authorized(REMOTE, &HeaderMap::new(), Some("s3cret")));
        assert!(!authorized(REMOTE, &bearer("s3cre"), Some("s3cret")));
        assert!(!authorized(REMOTE, &bearer("s3cretx"), Some("s3cret")));
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic s3cret"),
        );
        assert!(!authorized(REMOTE, &basic, Some("s3cret")));
        assert!(authorized(REMOTE, &bearer("s3cret"), Some("s3cret")));
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(authorized(v6, &bearer("s3cret"), Some("s3cret")));
        assert!(!authorized(v6, &bearer("nope"), Some("s3cret")));
    }

    const CONFIG: &str = "[listen]\nhttp = \"127.0.0.1:0\"\n[admin]\ntoken = \"s3cret\"\n\
        [upstreams.web]\nservers = [\"127.0.0.1:9\", { addr = \"127.0.0.1:10\", weight = 2 }]\n";

    fn generation(src: &str, previous: Option<&Generation>) -> Generation {
        let config =
            crate::config::Config::from_toml_str(src, std::path::Path::new("t.toml")).unwrap();
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let workers: std::sync::Arc<[tokio::runtime::Handle]> =
            [tokio::runtime::Handle::current()].into();
        let previous = previous.map(|g| &*g.proxy);
        crate::control::generation::build(&config, &metrics, &workers, previous).unwrap()
    }

    fn post(
        g: &Generation,
        path: &str,
        query: Option<&str>,
        peer: IpAddr,
        h: &HeaderMap,
    ) -> Answer {
        answer(&Method::POST, path, query, h, peer, g)
    }

    fn backend(g: &Generation, i: usize) -> &Backend {
        &g.proxy.upstreams()[0].balancer.backends()[i]
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn a_remote_change_without_the_token_is_refused_and_changes_nothing() {
        let g = generation(CONFIG, None);
        let path = "/servers/web/127.0.0.1:9/drain";
        let refused = post(&g, path, None, REMOTE, &HeaderMap::new());
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(!backend(&g, 0).is_drained());
        let refused = post(&g, path, None, REMOTE, &bearer("guess"));
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(!backend(&g, 0).is_drained());
        // Reading needs nothing.
        let list = answer(
            &Method::GET,
            "/servers",
            None,
            &HeaderMap::new(),
            REMOTE,
            &g,
        );
        assert_eq!(list.status, StatusCode::OK);
        assert_eq!(list.body.as_array().unwrap().len(), 2);

        let done = post(&g, path, None, REMOTE, &bearer("s3cret"));
        assert_eq!(done.status, StatusCode::OK, "{}", done.body);
        assert_eq!(done.body["drained"], true);
        assert!(backend(&g, 0).is_drained());
    }

    #[tokio::test]
    async fn drain_enable_and_weight_answer_with_the_server() {
        let g = generation(CONFIG, None);
        let h = HeaderMap::new();
        let a = post(
            &g,
            "/servers/web/127.0.0.1:10/weight",
            Some("value=7"),
            LOCAL,
            &h,
        );
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(
            (
                a.body["weight"].as_u64(),
                a.body["configured_weight"].as_u64()
            ),
            (Some(7), Some(2))
        );
        assert_eq!(backend(&g, 1).weight(), 7);
        for bad in [
            None,
            Some("value=0"),
            Some("value=x"),
            Some("value=1000001"),
        ] {
            let a = post(&g, "/servers/web/127.0.0.1:10/weight", bad, LOCAL, &h);
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
        assert_eq!(
            backend(&g, 1).weight(),
            7,
            "a refused weight changes nothing"
        );

        assert_eq!(
            post(&g, "/servers/web/127.0.0.1:9/drain", None, LOCAL, &h).status,
            StatusCode::OK
        );
        assert!(backend(&g, 0).is_drained());
        let a = post(&g, "/servers/web/127.0.0.1:9/enable", None, LOCAL, &h);
        assert_eq!(
            (a.status, a.body["drained"].as_bool()),
            (StatusCode::OK, Some(false))
        );

        let missing = post(&g, "/servers/web/127.0.0.1:11/drain", None, LOCAL, &h);
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        let missing = post(&g, "/servers/api/127.0.0.1:9/drain", None, LOCAL, &h);
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        let unknown = post(&g, "/servers/web/127.0.0.1:9/pause", None, LOCAL, &h);
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        let get = answer(
            &Method::GET,
            "/servers/web/127.0.0.1:9/drain",
            None,
            &h,
            LOCAL,
            &g,
        );
        assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn admin_changes_survive_a_reload_of_unchanged_servers() {
        let g = generation(CONFIG, None);
        backend(&g, 0).drain();
        backend(&g, 1).set_weight(9);
        let reloaded = generation(CONFIG, Some(&g));
        assert!(
            !std::ptr::eq(backend(&g, 0), backend(&reloaded, 0)),
            "new backends"
        );
        assert!(backend(&reloaded, 0).is_drained());
        assert_eq!(backend(&reloaded, 1).weight(), 9);
        assert!(
            backend(&reloaded, 0).pools()[0].is_draining(),
            "its pool stays drained"
        );

        // A weight edited in the file wins over the one set by the API; the drain stays.
        let edited = CONFIG.replace("weight = 2", "weight = 3");
        let reloaded = generation(&edited, Some(&reloaded));
        assert_eq!(backend(&reloaded, 1).weight(), 3);
        assert!(backend(&reloaded, 0).is_drained());
    }

    #[test]
    fn paths_and_escapes() {
        assert!(is_servers_path("/servers"));
        assert!(is_servers_path("/servers/web/127.0.0.1:8081/drain"));
        assert!(!is_servers_path("/serversx"));
        assert_eq!(percent_decode("%5B::1%5D:8080"), "[::1]:8080");
        assert_eq!(percent_decode("127.0.0.1%3A80"), "127.0.0.1:80");
        assert_eq!(percent_decode("a%zzb%4"), "a%zzb%4");
    }
}
