//! The forwarding-header policy (`upstream_request_headers`) on arbitrary request headers, peers
//! and `[forwarded]` settings. Never panics; the client cannot forge X-Forwarded-For or
//! X-Forwarded-Proto unless its peer is trusted; hop-by-hop headers never reach the backend;
//! and the head kaproxy writes upstream with the policy applied on the way (`upstream_head`)
//! has exactly the fields of the map the policy edited.
#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use kaproxy::config::ForwardedConfig;
use kaproxy::proxy::{upstream_head, upstream_request_headers, DownstreamInfo, RequestFields};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Names the policy cares about, so that the fuzzer need not guess them byte by byte.
const NAMES: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
    "host",
    "x-custom",
    "content-length",
];

const HOP_BY_HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers kaproxy itself sets after stripping, so a `Connection` token naming them does
/// not keep them out.
const SET_BY_KAPROXY: &[&str] = &[
    "connection",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
    "host",
];

#[derive(Debug, Arbitrary)]
enum Name {
    Known(u8),
    Raw(Vec<u8>),
}

impl Name {
    fn header_name(&self) -> Option<HeaderName> {
        match self {
            Name::Known(i) => Some(HeaderName::from_static(NAMES[*i as usize % NAMES.len()])),
            Name::Raw(b) => HeaderName::from_bytes(b).ok(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Value {
    /// A comma-separated list of known names (for `Connection`) or IPs (for X-Forwarded-For).
    Tokens(Vec<u8>, Vec<[u8; 4]>),
    Raw(Vec<u8>),
}

impl Value {
    fn header_value(&self) -> Option<HeaderValue> {
        match self {
            Value::Tokens(names, ips) => {
                let mut parts: Vec<String> = names
                    .iter()
                    .map(|i| NAMES[*i as usize % NAMES.len()].to_ascii_uppercase())
                    .collect();
                parts.extend(ips.iter().map(|ip| Ipv4Addr::from(*ip).to_string()));
                HeaderValue::from_str(&parts.join(" , ")).ok()
            }
            Value::Raw(b) => HeaderValue::from_bytes(b).ok(),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    peer: [u8; 16],
    peer_v6: bool,
    peer_port: u16,
    local_port: u16,
    tls: bool,
    /// (address, prefix length); the peer itself when the bool is set.
    trusted: Vec<([u8; 16], bool, u8, bool)>,
    x_forwarded_proto: bool,
    forwarded: bool,
    x_real_ip: bool,
    headers: Vec<(Name, Value)>,
    host: Option<Value>,
}

fn ip(b: &[u8; 16], v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::from(*b).into()
    } else {
        Ipv4Addr::new(b[0], b[1], b[2], b[3]).into()
    }
}

fuzz_target!(|input: Input| {
    let peer_ip = ip(&input.peer, input.peer_v6);
    let peer = SocketAddr::new(peer_ip, input.peer_port);
    let local = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), input.local_port);
    let ds = DownstreamInfo::new(peer, local, input.tls);
    let cfg = ForwardedConfig {
        trusted_proxies: input
            .trusted
            .iter()
            .take(4)
            .filter_map(|(b, v6, len, is_peer)| {
                let addr = if *is_peer { peer_ip } else { ip(b, *v6) };
                let max = if addr.is_ipv4() { 32 } else { 128 };
                IpNet::new(addr, len % (max + 1)).ok()
            })
            .collect(),
        x_forwarded_proto: input.x_forwarded_proto,
        forwarded: input.forwarded,
        x_real_ip: input.x_real_ip,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in input.headers.iter().take(32) {
        if let (Some(n), Some(v)) = (name.header_name(), value.header_value()) {
            headers.append(n, v);
        }
    }
    let host = input.host.as_ref().and_then(Value::header_value);
    let before = headers.clone();

    let uri = http::Uri::from_static("/");
    let head_of =
        |fields| upstream_head(&http::Method::GET, &uri, fields, &ds, &cfg, host.as_ref());
    let written = head_of(RequestFields::map(&before));

    // The same fields as a client writes them, read in place from the head the own loop
    // parses, give the head their map gives.
    let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
    for (name, value) in before.iter() {
        raw.extend_from_slice(name.as_str().as_bytes());
        raw.extend_from_slice(b": ");
        raw.extend_from_slice(value.as_bytes());
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    if let Ok(Some(head)) =
        kaproxy::http1::head::parse_request(&mut bytes::BytesMut::from(&raw[..]), usize::MAX)
    {
        let parsed = RequestFields::parsed(&head.fields);
        let map = parsed.to_map();
        let in_place = head_of(parsed);
        let from_map = head_of(RequestFields::map(&map));
        assert_eq!(
            in_place.as_bytes(),
            from_map.as_bytes(),
            "the head written from a parsed head and from its map differ for {before:?}"
        );
    } else {
        panic!("a map's fields written out do not parse: {before:?}");
    }

    upstream_request_headers(&mut headers, &ds, &cfg, host.as_ref());

    // The same fields, whatever their order (names in any case, values as a backend trims them).
    let parsed = written.parse().expect("a valid head");
    let key = |n: &[u8], v: &[u8]| (n.to_ascii_lowercase(), v.trim_ascii().to_vec());
    let mut got: Vec<_> = parsed.fields.iter().map(|(n, v)| key(n, v)).collect();
    let mut want: Vec<_> = headers
        .iter()
        .map(|(n, v)| key(n.as_ref(), v.as_bytes()))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "the head written upstream and the policy's map differ for {before:?}"
    );

    let trusted = cfg.trusted_proxies.iter().any(|n| n.contains(&peer_ip));
    let one = |name: &str| -> Option<String> {
        let all: Vec<_> = headers.get_all(name).iter().collect();
        assert!(
            all.len() <= 1,
            "{name} appears {} times: {headers:?}",
            all.len()
        );
        all.first()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let peer_s = peer_ip.to_string();

    // X-Forwarded-For: the peer, appended to a trusted proxy's chain, never a forged value.
    let xff = one("x-forwarded-for").expect("X-Forwarded-For is always set");
    if trusted {
        assert!(
            xff == peer_s || xff.ends_with(&format!(", {peer_s}")),
            "{xff}"
        );
    } else {
        assert_eq!(xff, peer_s, "{before:?}");
    }

    // Hop-by-hop: gone, except the keep-alive kaproxy asks for.
    assert_eq!(one("connection").as_deref(), Some("keep-alive"));
    for name in HOP_BY_HOP {
        assert!(
            !headers.contains_key(*name),
            "{name} survived: {before:?} -> {headers:?}"
        );
    }
    // Whatever a (readable) Connection header named is gone too, unless kaproxy set it again.
    for v in before.get_all("connection") {
        let Ok(s) = v.to_str() else { continue };
        for token in s.split(',') {
            let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes()) else {
                continue;
            };
            if !SET_BY_KAPROXY.contains(&name.as_str()) {
                assert!(!headers.contains_key(&name), "{name} survived: {before:?}");
            }
        }
    }

    if cfg.x_forwarded_proto && !trusted {
        let proto = if input.tls { "https" } else { "http" };
        assert_eq!(one("x-forwarded-proto").as_deref(), Some(proto));
        assert_eq!(one("x-forwarded-port"), Some(input.local_port.to_string()));
        assert_eq!(headers.get("x-forwarded-host"), host.as_ref());
    }
    if cfg.x_real_ip && !trusted {
        assert_eq!(one("x-real-ip"), Some(peer_s.clone()));
    }
    if cfg.forwarded {
        let fwd = one("forwarded").expect("Forwarded is set when enabled");
        if !trusted && fwd != "invalid" {
            let node = if peer_ip.is_ipv4() {
                peer_s.clone()
            } else {
                format!("\"[{peer_s}]\"")
            };
            assert!(fwd.starts_with(&format!("for={node};proto=")), "{fwd}");
        }
    }
    if let Some(h) = &host {
        assert_eq!(headers.get("host"), Some(h));
    }
});
