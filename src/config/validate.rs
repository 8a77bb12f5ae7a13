//! Semantic checks of a parsed configuration; every problem is collected, none stops early.

use std::time::Duration;

use super::{
    pem, BufferingConfig, Config, DownstreamConfig, Problem, UpstreamConfig, UpstreamTlsConfig,
    DEFAULT_MAX_HEADER_BYTES, MIN_MAX_HEADER_BYTES,
};

// ---- Validation ----

/// Every problem of a parsed config, keys set, lines not yet.
pub(super) fn validate(c: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    if c.listen.https.is_none() && c.listen.http.is_none() {
        out.push(
            Problem::new("listen", "no listener is configured")
                .fix(r#"set https or http (or both), e.g. http = "127.0.0.1:8080""#),
        );
    }
    validate_downstream(&c.downstream, &mut out);
    if c.upstreams.is_empty() {
        out.push(
            Problem::new("upstreams", "no upstream group")
                .fix(r#"add [upstreams.web] with servers = ["127.0.0.1:8081"]"#),
        );
    }
    for upstream in &c.upstreams {
        validate_upstream(upstream, &mut out);
    }
    validate_routes(c, &mut out);
    validate_buffering(&c.buffering, &mut out);
    if let Some(token) = &c.admin.token {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            out.push(
                Problem::new("admin.token", "must be printable ASCII without spaces")
                .fix("set a long random token, e.g. the output of `openssl rand -hex 32`, or remove the key"),
            );
        }
    }
    out
}

/// `[buffering]`: the temp directory must exist now, so that the first body to spill does
/// not find out (a directory that disappears later gives that request a 500 and a log line).
pub(super) fn validate_buffering(b: &BufferingConfig, out: &mut Vec<Problem>) {
    if let Some(dir) = &b.temp_dir {
        if !dir.is_dir() {
            out.push(
                Problem::new(
                    "buffering.temp_dir",
                    format!("{} is not a directory", dir.display()),
                )
                .fix(r#"create it, or set temp_dir = "" for the system's temp dir"#),
            );
        }
    }
}

pub(super) fn validate_downstream(d: &DownstreamConfig, out: &mut Vec<Problem>) {
    out.extend(downstream_order(d));
    positive(out, "downstream.idle_timeout", d.idle_timeout);
    positive(out, "downstream.header_timeout", d.header_timeout);
    positive(out, "downstream.body_timeout", d.body_timeout);
    positive(out, "downstream.send_timeout", d.send_timeout);
    at_least_one(
        out,
        "downstream.max_requests_per_connection",
        d.max_requests_per_connection,
    );
    if d.max_header_bytes < MIN_MAX_HEADER_BYTES {
        out.push(
            Problem::new(
                "downstream.max_header_bytes",
                format!(
                    "must be at least {MIN_MAX_HEADER_BYTES} (hyper's smallest buffer), got {}",
                    d.max_header_bytes
                ),
            )
            .fix(format!("set max_header_bytes = {DEFAULT_MAX_HEADER_BYTES}")),
        );
    }
}

pub(super) fn validate_upstream(u: &UpstreamConfig, out: &mut Vec<Problem>) {
    let key = |k: &str| format!("upstreams.{}.{k}", u.name);
    if u.entries.is_empty() {
        out.push(
            Problem::new(key("servers"), "needs at least one server")
                .fix(r#"set servers = ["127.0.0.1:8081"]"#),
        );
    }
    for (i, entry) in u.entries.iter().enumerate() {
        if entry.weight == 0 {
            out.push(
                Problem::new(
                    key(&format!("servers[{i}].weight")),
                    "must be at least 1, got 0",
                )
                .fix("remove the server to take it out of rotation"),
            );
        }
    }
    out.extend(upstream_order(u));
    let pool = &u.pool;
    at_least_one(
        out,
        &key("max_connections_per_server"),
        pool.max_connections_per_server as u64,
    );
    if pool.max_idle_per_server > pool.max_connections_per_server {
        let max = pool.max_connections_per_server;
        out.push(
            Problem::new(
                key("max_idle_per_server"),
                format!(
                    "must be at most max_connections_per_server ({max}), got {}",
                    pool.max_idle_per_server
                ),
            )
            .fix(format!("set max_idle_per_server = {max}")),
        );
    }
    at_least_one(
        out,
        &key("max_requests_per_connection"),
        pool.max_requests_per_connection.into(),
    );
    positive(out, &key("connect_timeout"), pool.connect_timeout);
    positive(out, &key("response_timeout"), u.response_timeout);
    positive(out, &key("tunnel_idle_timeout"), u.tunnel_idle_timeout);
    for (i, token) in u.upgrade_protocols.iter().enumerate() {
        let k = key(&format!("upgrade_protocols[{i}]"));
        if token == "h2c" || token == "h2" {
            out.push(
                Problem::new(
                    k,
                    format!("{token:?} is never tunnelled: an HTTP/2 upgrade would carry the \
                             client's own streams past routes and headers (RFC 9113 §3.1 retired it)"),
                )
                .fix("remove it; clients reach HTTP/2 through TLS with ALPN h2"),
            );
        } else if token.is_empty() || !token.bytes().all(is_token_char) {
            out.push(
                Problem::new(
                    k,
                    format!("{token:?} is not a protocol token (RFC 9110 §7.8)"),
                )
                .fix(r#"e.g. upgrade_protocols = ["websocket"]"#),
            );
        }
    }
    for (name, prefix, bits) in [
        ("v4", u.ip_hash_prefix_v4, 32),
        ("v6", u.ip_hash_prefix_v6, 128),
    ] {
        if prefix > bits {
            out.push(
                Problem::new(
                    key(&format!("ip_hash_prefix_{name}")),
                    format!("must be at most {bits}, got {prefix}"),
                )
                .fix(format!(
                    "set ip_hash_prefix_{name} = {bits} to hash the whole address"
                )),
            );
        }
    }
    if let Some(health) = &u.health {
        let key = |k: &str| format!("upstreams.{}.health.{k}", u.name);
        if !health.path.starts_with('/') {
            let message = format!(r#"must start with "/", got {:?}"#, health.path);
            out.push(Problem::new(key("path"), message).fix(r#"set path = "/""#));
        } else if health.path.parse::<http::uri::PathAndQuery>().is_err() {
            let message = format!("is not a valid request target: {:?}", health.path);
            out.push(
                Problem::new(key("path"), message)
                    .fix("percent-encode spaces and other special characters"),
            );
        }
        positive(out, &key("interval"), health.interval);
        positive(out, &key("timeout"), health.timeout);
        at_least_one(out, &key("rise"), health.rise.into());
        at_least_one(out, &key("fall"), health.fall.into());
        positive(out, &key("passive_cooldown"), health.passive_cooldown);
    }
    if let Some(tls) = &u.tls {
        validate_upstream_tls(&u.name, tls, out);
    }
}

/// A `tchar` of RFC 9110 §5.6.2 (a protocol name may also carry `/version`).
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b)
}

/// The `tls_*` keys of one upstream group: mutual TLS needs both files, and every file named
/// is read now (README, "TLS to the backends"), so a missing or unusable one stops `run`,
/// `check` and a reload with its line instead of failing the first handshake.
pub(super) fn validate_upstream_tls(name: &str, tls: &UpstreamTlsConfig, out: &mut Vec<Problem>) {
    let key = |k: &str| format!("upstreams.{name}.{k}");
    if let Some(ca) = &tls.ca {
        if let Err(e) = pem::read_roots(ca) {
            out.push(
                Problem::new(key("tls_ca"), e.to_string())
                    .fix("point tls_ca at a PEM bundle of the CA certificates that sign the backends' certificates"),
            );
        }
    }
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key_path)) => {
            let chain = pem::read_certificates(cert).map_err(|e| {
                out.push(
                    Problem::new(key("tls_client_cert"), e.to_string())
                        .fix("point tls_client_cert at the PEM certificate chain kaproxy presents"),
                )
            });
            let private = pem::read_private_key(key_path).map_err(|e| {
                out.push(
                    Problem::new(key("tls_client_key"), e.to_string())
                        .fix("point tls_client_key at the PEM private key of tls_client_cert"),
                )
            });
            if chain.is_ok() && private.is_ok() {
                if let Err(e) = pem::read_client_identity(cert, key_path) {
                    out.push(
                        Problem::new(key("tls_client_key"), e.to_string())
                            .fix("use the key that belongs to tls_client_cert"),
                    );
                }
            }
        }
        (Some(_), None) => out.push(
            Problem::new(
                key("tls_client_cert"),
                "is set without tls_client_key: mutual TLS needs both",
            )
            .fix(r#"set tls_client_key = "client-key.pem", or remove tls_client_cert"#),
        ),
        (None, Some(_)) => out.push(
            Problem::new(
                key("tls_client_key"),
                "is set without tls_client_cert: mutual TLS needs both",
            )
            .fix(r#"set tls_client_cert = "client.pem", or remove tls_client_key"#),
        ),
        (None, None) => {}
    }
}

pub(super) fn validate_routes(c: &Config, out: &mut Vec<Problem>) {
    let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
    for (i, route) in c.routes.iter().enumerate() {
        if !names.contains(&route.upstream.as_str()) {
            let message = format!("no upstream named {:?}", route.upstream);
            let problem = Problem::new(format!("routes[{i}].upstream"), message);
            out.push(if names.is_empty() {
                problem // the missing [upstreams] is reported on its own
            } else {
                problem.fix(format!("use one of: {}", names.join(", ")))
            });
        }
        if let Some(prefix) = route.path_prefix.as_ref().filter(|p| !p.starts_with('/')) {
            let message = format!(r#"must start with "/", got {prefix:?}"#);
            out.push(Problem::new(format!("routes[{i}].path_prefix"), message));
        }
    }
    if names.len() > 1 && c.routes.is_empty() {
        let message = format!(
            "{} upstream groups but no [[routes]] to choose one",
            names.len()
        );
        let fix = format!(
            r#"add [[routes]] with upstream = "{}" and a host or path_prefix; a route with neither matches everything"#,
            names[0]
        );
        out.push(Problem::new("routes", message).fix(fix));
    }
}

pub(super) fn positive(out: &mut Vec<Problem>, key: &str, value: Duration) {
    if value.is_zero() {
        out.push(Problem::new(key, "must be greater than 0s"));
    }
}

pub(super) fn at_least_one(out: &mut Vec<Problem>, key: &str, value: u64) {
    if value == 0 {
        out.push(Problem::new(key, "must be at least 1, got 0"));
    }
}

/// Upstream half of the rule: kaproxy gives up on a pooled connection before the backend
/// does, with `safety_margin` to spare: `idle_timeout + safety_margin < keepalive_timeout`.
pub(super) fn upstream_order(u: &UpstreamConfig) -> Option<Problem> {
    let pool = &u.pool;
    let key = |k: &str| format!("upstreams.{}.{k}", u.name);
    let (keepalive, margin) = (pool.keepalive_timeout, pool.safety_margin);
    let limit = keepalive.saturating_sub(margin);
    if limit.is_zero() {
        let message = format!(
            "must be greater than safety_margin ({}), got {}",
            human(margin),
            human(keepalive)
        );
        let fix = "set it to the backends' KeepAliveTimeout (Apache's default is 5s) or lower safety_margin";
        return Some(Problem::new(key("keepalive_timeout"), message).fix(fix));
    }
    (pool.idle_timeout >= limit).then(|| {
        let message = format!(
            "must be less than keepalive_timeout - safety_margin ({} - {} = {}), got {}",
            human(keepalive),
            human(margin),
            human(limit),
            human(pool.idle_timeout)
        );
        let fix = format!(r#"set idle_timeout = "{}""#, human(round_below(limit)));
        Problem::new(key("idle_timeout"), message).fix(fix)
    })
}

/// Downstream half of the rule: a load balancer in front (which pools connections to
/// kaproxy) gives up before kaproxy does: `front_idle_timeout < idle_timeout`.
pub(super) fn downstream_order(d: &DownstreamConfig) -> Option<Problem> {
    let front = d.front_idle_timeout;
    (!front.is_zero() && d.idle_timeout <= front).then(|| {
        let message = format!(
            "must be greater than front_idle_timeout ({}), got {}",
            human(front),
            human(d.idle_timeout)
        );
        let fix = format!(r#"set idle_timeout = "{}s""#, front.as_secs() + 5);
        Problem::new("downstream.idle_timeout", message).fix(fix)
    })
}

/// The roundest duration strictly below `limit`, for a fix: 4.5s → 4s, 5s → 4s, 800ms → 700ms.
pub(super) fn round_below(limit: Duration) -> Duration {
    let units = [1_000_000_000, 100_000_000, 10_000_000, 1_000_000]; // 1s, 100ms, 10ms, 1ms
    let below = |unit: u128| (limit.as_nanos().saturating_sub(1) / unit) * unit;
    let nanos = units.into_iter().map(below).find(|&n| n > 0);
    nanos.map_or(limit / 2, |n| Duration::from_nanos(n as u64))
}

/// Short, humantime-style: "75s", "500ms", "4.5s" (the last only in explanations).
pub(super) fn human(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if nanos == 0 {
        format!("{secs}s")
    } else if nanos % 1_000_000 != 0 {
        humantime::format_duration(d).to_string()
    } else if secs == 0 {
        format!("{}ms", nanos / 1_000_000)
    } else {
        format!("{}s", d.as_millis() as f64 / 1000.0)
    }
}
