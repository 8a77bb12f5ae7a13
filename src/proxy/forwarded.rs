//! Owns the forwarding-header policy (request filter): hop-by-hop headers out (RFC 9110
//! §7.6.1), X-Forwarded-For / -Proto / -Port / -Host, RFC 7239 Forwarded and X-Real-IP in,
//! trusted proxies, applied while the upstream head is written ([`upstream_head`]) or to a
//! tunnel's header map ([`upstream_request_headers`]); and [`DownstreamInfo`], what kaproxy
//! knows of the client's connection.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};

use crate::config::ForwardedConfig;
use crate::headers::{field_tokens, per_connection, visible, PerConnection, KEEP_ALIVE};
use crate::http1::head::Name;
use crate::upstream::wire::{HeadWriter, OutgoingHead};

use super::fields::RequestFields;
use super::route::origin_form;

pub(super) const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(super) const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub(super) const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

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
            peer_value: ip_value(peer.ip()),
            port_value: per_connection(PerConnection::Port, u64::from(local.port()), || {
                HeaderValue::from(local.port())
            }),
        }
    }
}

/// Where `Upgrade` is in [`HOP_BY_HOP`].
const UPGRADE_AT: usize = 6;

/// `HTTP2-Settings` (RFC 9113 §3.1 retired the h2c upgrade it belongs to): connection-specific,
/// dropped with the `Upgrade` it came with.
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The hop-by-hop headers every message loses, named in `Connection` or not.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named in `Connection` and the
/// standard ones. Most messages carry one or none, so the map is searched only for the ones
/// it holds (one pass over its names, no lookup per standard name).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_hop_by_hop_found(headers);
}

/// What [`strip_hop_by_hop_found`] found on its way.
pub(super) struct Stripped {
    /// The message had an `Upgrade` header (now removed).
    pub(super) upgrade: bool,
}

/// Whether `name` is one of the standard hop-by-hop fields ([`HOP_BY_HOP`]), in any case
/// ([`Name::is_hop_by_hop`]; a head parsed by kaproxy has its names told apart already).
pub(super) fn is_hop_by_hop(name: &[u8]) -> bool {
    Name::of(name).is_hop_by_hop()
}

/// The field names `Connection` values name that [`is_hop_by_hop`] does not already cover
/// (nor `close`, which names none). By bytes, not `to_str`: a value with obs-text in it still
/// names the fields it names.
pub(super) fn connection_named<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"close") && !is_hop_by_hop(t))
}

/// [`connection_named`] as a list, from the `Connection` values `values` gives: the common
/// `keep-alive` and `close`, which name no field, are seen at a glance, with nothing split.
pub(super) fn connection_named_list<'a, I>(values: impl Fn() -> I) -> Vec<&'a [u8]>
where
    I: Iterator<Item = &'a [u8]>,
{
    let plain =
        |v: &[u8]| v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close");
    if values().all(plain) {
        return Vec::new();
    }
    connection_named(values()).collect()
}

/// [`strip_hop_by_hop`], saying whether an `Upgrade` was among them.
pub(super) fn strip_hop_by_hop_found(headers: &mut HeaderMap) -> Stripped {
    // The common `Connection: keep-alive` names no other field: nothing is allocated.
    let named: Vec<HeaderName> = connection_named(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .map(HeaderValue::as_bytes),
    )
    .filter_map(|t| HeaderName::from_bytes(t).ok())
    .collect();
    for name in named {
        headers.remove(name);
    }
    let mut present = [false; 7];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    Stripped {
        upgrade: present[UPGRADE_AT],
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the right-most
/// untrusted address of its X-Forwarded-For chain.
pub(super) fn client_ip(peer: IpAddr, fields: RequestFields<'_>, cfg: &ForwardedConfig) -> IpAddr {
    client_ip_from(peer, fields.values(&X_FORWARDED_FOR), cfg)
}

/// [`client_ip`] from the `X-Forwarded-For` values `xff`.
fn client_ip_from<'a>(
    peer: IpAddr,
    xff: impl Iterator<Item = &'a [u8]>,
    cfg: &ForwardedConfig,
) -> IpAddr {
    let trusted = |ip: &IpAddr| cfg.trusted_proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = xff
        .flat_map(field_tokens)
        .filter_map(|s| s.parse().ok())
        .collect();
    while let Some(ip) = chain.pop() {
        if !trusted(&ip) {
            return ip;
        }
    }
    peer
}

/// RFC 9113 §8.2.3: an HTTP/2 client may split `cookie` into one field per crumb; before the
/// request goes on as HTTP/1.1 they MUST be joined into one, with "; " (nginx and HAProxy do).
pub fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for crumb in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Phase 2's head, one way for a plain request and a tunnel's handshake: an HTTP/2
/// request's cookie crumbs joined ([`join_cookie_crumbs`]), the headers filtered and the
/// forwarding headers set ([`upstream_request_headers`]), the target in origin form.
pub(super) fn filter_head(
    parts: &mut http::request::Parts,
    ds: &DownstreamInfo,
    cfg: &ForwardedConfig,
    host: Option<&HeaderValue>,
) {
    if parts.version == http::Version::HTTP_2 {
        join_cookie_crumbs(&mut parts.headers);
    }
    upstream_request_headers(&mut parts.headers, ds, cfg, host);
    parts.uri = origin_form(&parts.uri);
}

/// Request filter on a header map (a tunnel's handshake, which hyper's client sends): hop-by-hop
/// out (an `Upgrade` with its `HTTP2-Settings`: a tunnel puts back what it tunnels), the
/// forwarding fields in ([`Forwarding`]), `Host` kept, keep-alive asked for.
pub fn upstream_request_headers(
    headers: &mut HeaderMap,
    ds: &DownstreamInfo,
    cfg: &ForwardedConfig,
    host: Option<&HeaderValue>,
) {
    if strip_hop_by_hop_found(headers).upgrade {
        headers.remove(&HTTP2_SETTINGS);
    }
    let forwarding = Forwarding::of(RequestFields::map(headers), &[], ds, cfg, host);
    for (name, value) in forwarding.edits.into_iter().flatten() {
        match value {
            Some(v) => headers.insert(name, v),
            None => headers.remove(name),
        };
    }
}

/// The request filter applied while the upstream head of a `method` request for `uri` is
/// written from its `fields` (read, not edited): the same fields out and in as
/// [`upstream_request_headers`], a field it sets written where the client's first field of
/// that name was (the others of that name left out) or after the client's fields when the
/// client sent none, the target in origin form. Checked against the map's way by the
/// `forwarded` fuzz target and a property test, from a map and from a parsed head.
pub fn upstream_head(
    method: &Method,
    uri: &Uri,
    fields: RequestFields<'_>,
    ds: &DownstreamInfo,
    cfg: &ForwardedConfig,
    host: Option<&HeaderValue>,
) -> OutgoingHead {
    let connection = header::CONNECTION;
    let named = connection_named_list(|| fields.values(&connection));
    let upgrade = fields.contains(&header::UPGRADE);
    let forwarding = Forwarding::of(fields, &named, ds, cfg, host);
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut head = HeadWriter::new(method, target, fields.len() + EDITS);
    let mut written = [false; EDITS];
    for (known, n, value) in fields.entries() {
        if known.is_hop_by_hop()
            || named.iter().any(|d| d.eq_ignore_ascii_case(n))
            || (upgrade && n.eq_ignore_ascii_case(HTTP2_SETTINGS.as_str().as_bytes()))
        {
            continue;
        }
        match forwarding.position(n) {
            Some(i) => {
                if !std::mem::replace(&mut written[i], true) {
                    if let Some((_, Some(v))) = &forwarding.edits[i] {
                        head.field(n, v.as_bytes());
                    }
                }
            }
            None => head.field(n, value),
        }
    }
    for (edit, written) in forwarding.edits.iter().zip(written) {
        if let (Some((name, Some(value))), false) = (edit, written) {
            head.field(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    head.finish()
}

/// How many fields the request filter sets or removes at most.
const EDITS: usize = 8;

/// The forwarding fields of one request, decided once from the client's fields (less those
/// its `Connection` names, which go): each sets (`Some`) or removes (`None`) every field of
/// its name. `X-Forwarded-For`; `X-Forwarded-Proto` / `-Port` / `-Host` (from a trusted
/// proxy, its own win); `Forwarded`; `X-Real-IP`; `Host` from the target's authority;
/// `Connection: keep-alive`. The README's `[forwarded]` says when each is on.
struct Forwarding {
    edits: [Option<(HeaderName, Option<HeaderValue>)>; EDITS],
}

impl Forwarding {
    fn of(
        fields: RequestFields<'_>,
        dropped: &[&[u8]],
        ds: &DownstreamInfo,
        cfg: &ForwardedConfig,
        host: Option<&HeaderValue>,
    ) -> Forwarding {
        // The values of `name`, none when the client's `Connection` named it.
        fn values<'n, 'a: 'n>(
            fields: RequestFields<'a>,
            dropped: &'n [&'n [u8]],
            name: &'n HeaderName,
        ) -> impl Iterator<Item = &'a [u8]> + 'n {
            let kept = !dropped
                .iter()
                .any(|d| d.eq_ignore_ascii_case(name.as_str().as_bytes()));
            fields.values(name).filter(move |_| kept)
        }
        let peer = ds.peer.ip();
        let trusted = cfg.trusted_proxies.iter().any(|n| n.contains(&peer));
        let proto = if ds.tls { "https" } else { "http" };
        let mut edits: [Option<(HeaderName, Option<HeaderValue>)>; EDITS] = Default::default();
        let mut n = 0;
        let mut set = |name: HeaderName, value: Option<HeaderValue>| {
            edits[n] = Some((name, value));
            n += 1;
        };

        let prior: Option<String> = if trusted {
            let parts: Vec<&str> = values(fields, dropped, &X_FORWARDED_FOR)
                .filter_map(visible)
                .collect();
            (!parts.is_empty()).then(|| parts.join(", "))
        } else {
            None
        };
        let xff = match prior {
            Some(p) => header_value(&format!("{p}, {peer}")),
            None => ds.peer_value.clone(),
        };
        set(X_FORWARDED_FOR, Some(xff));
        if cfg.x_forwarded_proto {
            // From a trusted proxy (e.g. a TLS-terminating LB in front) its view wins.
            let keep = |h: &HeaderName| trusted && values(fields, dropped, h).next().is_some();
            if !keep(&X_FORWARDED_PROTO) {
                set(X_FORWARDED_PROTO, Some(HeaderValue::from_static(proto)));
            }
            if !keep(&X_FORWARDED_PORT) {
                set(X_FORWARDED_PORT, Some(ds.port_value.clone()));
            }
            if !keep(&X_FORWARDED_HOST) {
                set(X_FORWARDED_HOST, host.cloned());
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
            let value = match values(fields, dropped, &FORWARDED).next().and_then(visible) {
                Some(prev) if trusted => format!("{prev}, {element}"),
                _ => element,
            };
            set(FORWARDED, Some(header_value(&value)));
        }
        if cfg.x_real_ip {
            let ip = client_ip_from(peer, values(fields, dropped, &X_FORWARDED_FOR), cfg);
            set(X_REAL_IP, Some(header_value(&ip.to_string())));
        }
        // The authority of an HTTP/2 or absolute-form target becomes the backend's `Host`.
        if let Some(h) = host {
            set(header::HOST, Some(h.clone()));
        }
        set(
            header::CONNECTION,
            Some(HeaderValue::from_static("keep-alive")),
        );
        Forwarding { edits }
    }

    /// Which edit, if any, is for `name` (in any case).
    fn position(&self, name: &[u8]) -> Option<usize> {
        self.edits.iter().position(|e| {
            e.as_ref()
                .is_some_and(|(n, _)| name.eq_ignore_ascii_case(n.as_str().as_bytes()))
        })
    }
}

/// `ip` as a header value, in one allocation (the text is made on the stack).
fn ip_value(ip: IpAddr) -> HeaderValue {
    use std::io::Write;
    let mut text = [0u8; 64];
    let mut at = &mut text[..];
    let _ = write!(at, "{ip}");
    let n = 64 - at.len();
    HeaderValue::from_bytes(&text[..n]).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

pub(super) fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_crumbs_are_joined_into_one_field() {
        let mut h = HeaderMap::new();
        for c in ["a=1", "b=2", "c=3"] {
            h.append(header::COOKIE, HeaderValue::from_static(c));
        }
        join_cookie_crumbs(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, vec!["a=1; b=2; c=3"]);
        let mut one = HeaderMap::new();
        one.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookie_crumbs(&mut one);
        assert_eq!(one.get(header::COOKIE).unwrap(), "a=1");
    }

    #[test]
    fn upgrade_at_names_upgrade() {
        assert_eq!(HOP_BY_HOP[UPGRADE_AT], header::UPGRADE);
    }

    #[test]
    fn is_hop_by_hop_knows_the_standard_fields_in_any_case() {
        for h in &HOP_BY_HOP {
            assert!(is_hop_by_hop(h.as_str().as_bytes()), "{h}");
            assert!(is_hop_by_hop(h.as_str().to_uppercase().as_bytes()), "{h}");
        }
        for other in [
            "tex",
            "host",
            "content-length",
            "keep-alivex",
            "upgrades",
            "",
        ] {
            assert!(!is_hop_by_hop(other.as_bytes()), "{other}");
        }
        let named: Vec<&[u8]> = connection_named(
            [&b"keep-alive, X-Foo"[..], b" close ,,Upgrade", b"x-bar\xff"].into_iter(),
        )
        .collect();
        assert_eq!(named, vec![&b"X-Foo"[..], b"x-bar\xff"]);
    }

    #[test]
    fn an_upgrade_that_is_not_tunnelled_goes_with_its_http2_settings() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(
            &HTTP2_SETTINGS,
            HeaderValue::from_static("AAMAAABkAARAAAAAAAIAAAAA"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        let ds = DownstreamInfo::new(
            "192.0.2.1:5000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            false,
        );
        let uri = Uri::from_static("/");
        let fields = RequestFields::map(&h);
        let written = upstream_head(&Method::GET, &uri, fields, &ds, &Default::default(), None);
        let written = String::from_utf8_lossy(written.as_bytes()).to_ascii_lowercase();
        assert!(!written.contains("upgrade") && !written.contains("http2-settings"));
        assert!(written.contains("\r\nx-kept: 1\r\n"), "{written}");
        upstream_request_headers(&mut h, &ds, &ForwardedConfig::default(), None);
        assert!(h.get(header::UPGRADE).is_none() && h.get(&HTTP2_SETTINGS).is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
    }

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
}
