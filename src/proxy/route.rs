//! Owns routing (phase 1): what kaproxy refuses before any backend is involved (CONNECT, a
//! request target in the wrong form, an invalid `Host` or `:authority`, an ambiguous path),
//! the normalized path that routes match and the backend gets, which upstream group serves a
//! request by host and path prefix, the request's host (absolute-form authority or `Host`),
//! and the origin-form target sent upstream.

use std::borrow::Cow;
use std::net::Ipv6Addr;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Response, StatusCode, Uri, Version};

use crate::config::HostMatch;

use super::answer::{closing, local_response, ProxyBody};
use super::fields::RequestFields;
use super::{Proxy, UpstreamGroup};

pub(super) struct Route {
    pub(super) host: Option<HostMatch>,
    pub(super) path_prefix: Option<String>,
    pub(super) upstream: usize,
}

impl Proxy {
    /// Phase 1: which upstream group serves this request. `path` is the normalized path
    /// ([`admit`] put it in the request).
    pub(super) fn route(&self, host: Option<&str>, path: &str) -> Option<&UpstreamGroup> {
        if self.routes.is_empty() {
            return self.upstreams.first();
        }
        // The host without port or trailing dot; patterns are lower case (config).
        let host = host.map(|h| strip_port(h).trim_end_matches('.'));
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
                host_ok
                    && r.path_prefix
                        .as_deref()
                        .is_none_or(|p| prefix_matches(path, p))
            })
            .map(|r| &self.upstreams[r.upstream])
    }
}

/// A configured prefix matches the normalized path in its own normal form, so that
/// `/%7Euser` in a config matches `/~user` in a request. A prefix that cannot be normalized
/// (`%2F` in it) matches nothing: such a path is refused before routing.
fn prefix_matches(path: &str, prefix: &str) -> bool {
    normalize_path(prefix).is_ok_and(|p| path.starts_with(&*p))
}

/// Why phase 1 refuses a request: kaproxy's own answer, before any backend is involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refused {
    pub(super) status: StatusCode,
    /// One line for the client (the body) and the log.
    pub(super) reason: &'static str,
}

/// `Allow` of the 405 to CONNECT and TRACE: the methods kaproxy passes on to backends (any
/// method but those two is forwarded; these are the ones worth naming).
pub(super) const ALLOW: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH";

impl Refused {
    fn bad_request(reason: &'static str) -> Refused {
        Refused {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }

    /// The answer, with `Connection: close` over HTTP/1: what follows a refused request on
    /// the same connection (a CONNECT's tunnel bytes, say) is not to be read as a request.
    pub(super) fn response(&self, version: Version) -> Response<ProxyBody> {
        let mut resp = local_response(self.status, self.reason);
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(ALLOW));
        }
        closing(resp, version)
    }
}

/// Phase 1's checks, in order: CONNECT gets 405 (kaproxy is no forward proxy; nginx answers
/// it 405 too); a request target in a form its method may not use (authority form is
/// CONNECT's, asterisk form OPTIONS's: RFC 9112 §3.2.3, §3.2.4) and the Host rules
/// ([`host_problem`]) get 400; then the path is normalized in the request itself
/// ([`normalize_path`]; an ambiguous one gets 400), so that what the routes match is exactly
/// what the backend gets. Allocates only for a path that changes.
pub(super) fn admit(
    method: &Method,
    version: Version,
    uri: &mut Uri,
    fields: RequestFields<'_>,
) -> Result<(), Refused> {
    if method == Method::CONNECT {
        return Err(Refused {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "CONNECT is not supported: kaproxy is a reverse proxy, not a forward proxy\n",
        });
    }
    // TRACE makes Apache (`TraceEnable On`, its default) echo the request back, cookies and
    // credentials included (cross-site tracing); nginx answers it 405 as well.
    if method == Method::TRACE {
        return Err(Refused {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "TRACE is not passed on: the backend would echo the request's credentials\n",
        });
    }
    if uri.scheme().is_none() && uri.authority().is_some() {
        return Err(Refused::bad_request(
            "an authority-form request target is for CONNECT only\n",
        ));
    }
    if uri.path() == "*" && method != Method::OPTIONS {
        return Err(Refused::bad_request(
            "an asterisk-form request target is for OPTIONS only\n",
        ));
    }
    if let Some(problem) = host_problem(version, uri, fields) {
        return Err(Refused::bad_request(problem));
    }
    normalize_target(uri).map_err(Refused::bad_request)
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or an HTTP/1 request with more than
/// one, gets 400 (nginx and HAProxy do the same); so does, in any version, a `Host` or a
/// target authority (HTTP/2 `:authority`, an absolute-form target) that is not a valid
/// `host[:port]` ([`valid_host_port`]: no userinfo, RFC 9110 §4.2.4, RFC 9113 §8.3.1).
pub(super) fn host_problem(
    version: Version,
    uri: &Uri,
    fields: RequestFields<'_>,
) -> Option<&'static str> {
    let host = header::HOST;
    let mut hosts = fields.values(&host);
    let first = hosts.next();
    if matches!(
        version,
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    ) {
        if first.is_none() && version == Version::HTTP_11 {
            return Some("HTTP/1.1 request without Host\n");
        }
        if hosts.next().is_some() {
            return Some("more than one Host header\n");
        }
    }
    if let Some(authority) = uri.authority() {
        if !valid_host_port(authority.as_str().as_bytes()) {
            return Some(
                "invalid Host in the request target or :authority (host[:port], no userinfo)\n",
            );
        }
    }
    // An empty `Host` is what RFC 9112 §3.2 has a client send for a target without an
    // authority; it matches no host route.
    let invalid = first
        .into_iter()
        .chain(hosts)
        .any(|h| !h.is_empty() && !valid_host_port(h));
    invalid.then_some("invalid Host header (host[:port], no userinfo)\n")
}

/// `uri-host [ ":" port ]` (RFC 9110 §4.2.4, §7.2; RFC 3986 §3.2.2, §3.2.3), strictly: an IPv6
/// address in brackets, or a name (an IPv4 address is one) of unreserved characters —
/// letters, digits, `-`, `.`, `_`, `~`; then an optional port of at most five digits, at most
/// 65535 (RFC 3986 allows it empty). Not accepted, although RFC 3986's `reg-name` has them:
/// percent-encodings (a host kaproxy would have to decode to route) and sub-delimiters
/// (`,` `;` `=` `!` ...: list and parameter separators in `X-Forwarded-Host` and
/// `Forwarded`; Apache's strict host check refuses them too); nor IPvFuture or IPv6 zones.
pub(super) fn valid_host_port(b: &[u8]) -> bool {
    let port = if let Some(rest) = b.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&c| c == b']') else {
            return false;
        };
        let address = std::str::from_utf8(&rest[..end]).ok();
        if address.and_then(|a| a.parse::<Ipv6Addr>().ok()).is_none() {
            return false;
        }
        match &rest[end + 1..] {
            [] => return true,
            [b':', port @ ..] => port,
            _ => return false,
        }
    } else {
        let mut name = 0;
        while name < b.len() && UNRESERVED[b[name] as usize] {
            name += 1;
        }
        match b.get(name) {
            _ if name == 0 => return false,
            None => return true,
            Some(b':') => &b[name + 1..],
            Some(_) => return false,
        }
    };
    if port.len() > 5 {
        return false;
    }
    let mut number = 0u32;
    for &digit in port {
        if !digit.is_ascii_digit() {
            return false;
        }
        number = number * 10 + u32::from(digit - b'0');
    }
    number <= 65535
}

/// RFC 3986's unreserved characters: `ALPHA / DIGIT / "-" / "." / "_" / "~"`.
static UNRESERVED: [bool; 256] = {
    let mut class = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        class[c] = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        c += 1;
    }
    class
};

/// The path bytes [`normalize_path`] passes over without a second look: all but `%`, `/`, `\`
/// and control bytes.
static PATH_PLAIN: [bool; 256] = {
    let mut class = [false; 256];
    let mut c = 0;
    while c < 256 {
        class[c] = !matches!(c as u8, b'%' | b'/' | b'\\' | 0x00..=0x1f | 0x7f);
        c += 1;
    }
    class
};

/// The upstream request target: path and query only.
pub(super) fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(_) if uri.scheme().is_none() && uri.authority().is_none() => uri.clone(),
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

/// The request's host: the URI authority when the target has one (HTTP/2, or an absolute-form
/// target, where RFC 9112 §3.2.2 says `Host` is ignored), else the `Host` header.
pub(super) fn request_host(uri: &Uri, fields: RequestFields<'_>) -> Option<HeaderValue> {
    match uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => fields.first(&header::HOST),
    }
}

/// Replaces the path of `uri` with its normal form ([`normalize_path`]), keeping the scheme,
/// the authority and the query (byte for byte). Nothing is allocated when the path is
/// already normal.
pub(super) fn normalize_target(uri: &mut Uri) -> Result<(), &'static str> {
    let mut target = match normalize_path(uri.path())? {
        Cow::Borrowed(_) => return Ok(()),
        Cow::Owned(path) => path,
    };
    if let Some(query) = uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query =
        Some(PathAndQuery::from_maybe_shared(Bytes::from(target)).map_err(|_| INVALID_PATH)?);
    *uri = Uri::from_parts(parts).map_err(|_| INVALID_PATH)?;
    Ok(())
}

const INVALID_PATH: &str = "invalid path\n";
const ENCODED_SEPARATOR: &str = "ambiguous path: an encoded '/' or '\\' (%2F, %5C)\n";
const BACKSLASH: &str = "ambiguous path: a '\\'\n";
const CONTROL: &str = "ambiguous path: NUL or a control character (raw or %00-%1F, %7F)\n";
const BAD_ESCAPE: &str = "malformed percent-encoding in the path (% and two hex digits)\n";

/// The path in the normal form that routes match and the backend gets (RFC 3986 §6.2.2, as
/// nginx resolves a path before its locations match and forwards it with `proxy_pass` and a
/// URI; Apache, with `MergeSlashes On`, serves the same resource):
///
/// - percent-encoded unreserved characters (`ALPHA DIGIT - . _ ~`, either case of hex) are
///   decoded (§6.2.2.2); every other percent-encoding is kept, its hex digits upper-cased
///   (§6.2.2.1: `%3f` → `%3F`, `%c3%a9` → `%C3%A9`);
/// - dot segments are removed (§5.2.4), also those that were encoded (`%2e%2E`, `.%2e`);
/// - repeated slashes are merged (`//admin` → `/admin`);
///
/// and refused (`Err`, 400) when how the path decodes is a matter of who decodes it: an
/// encoded `/` or `\` (`%2F`, `%5C`), a raw `\`, a NUL or other control byte raw or encoded
/// (`%00`-`%1F`, `%7F`), a malformed escape (`%zz`, `%4`). `*` (asterisk form) passes as is.
/// Borrowed, without allocation, when the path is already normal — the common case, found
/// in one pass over its bytes.
pub(super) fn normalize_path(path: &str) -> Result<Cow<'_, str>, &'static str> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        // The http crate gives every origin-form and absolute-form target a leading `/`.
        return if path == "*" {
            Ok(Cow::Borrowed(path))
        } else {
            Err(INVALID_PATH)
        };
    }
    let mut changes = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        i += 1;
        if PATH_PLAIN[c as usize] {
            continue;
        }
        match c {
            b'/' => {
                changes |= match &b[i..] {
                    [b'/', ..] => true,
                    [b'.', rest @ ..] => {
                        matches!(rest, [] | [b'/', ..] | [b'.'] | [b'.', b'/', ..])
                    }
                    _ => false,
                };
            }
            b'%' => {
                let (hi, lo) = escape_at(b, i - 1).ok_or(BAD_ESCAPE)?;
                let byte = hi << 4 | lo;
                if byte == b'/' || byte == b'\\' {
                    return Err(ENCODED_SEPARATOR);
                }
                if byte < 0x20 || byte == 0x7f {
                    return Err(CONTROL);
                }
                changes |= UNRESERVED[byte as usize]
                    || b[i].is_ascii_lowercase()
                    || b[i + 1].is_ascii_lowercase();
                i += 2;
            }
            b'\\' => return Err(BACKSLASH),
            _ => return Err(CONTROL),
        }
    }
    if !changes {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(normalized(b)))
}

/// The two hex digits' values of the escape at `b[i] == b'%'`.
fn escape_at(b: &[u8], i: usize) -> Option<(u8, u8)> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    Some((hex(*b.get(i + 1)?)?, hex(*b.get(i + 2)?)?))
}

fn is_unreserved(c: u8) -> bool {
    UNRESERVED[c as usize]
}

/// The normal form of a path that [`normalize_path`] found valid and not yet normal.
fn normalized(b: &[u8]) -> String {
    // Escapes first: a decoded `.` can make a dot segment, nothing decoded makes a `/`.
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], escape_at(b, i)) {
            (b'%', Some((hi, lo))) => {
                let byte = hi << 4 | lo;
                if is_unreserved(byte) {
                    decoded.push(byte);
                } else {
                    decoded.extend_from_slice(&[
                        b'%',
                        b[i + 1].to_ascii_uppercase(),
                        b[i + 2].to_ascii_uppercase(),
                    ]);
                }
                i += 3;
            }
            (c, _) => {
                decoded.push(c);
                i += 1;
            }
        }
    }
    // Then the segments: `.` and empty ones dropped, `..` takes the one before it away; a
    // path whose last segment is one of those ends with `/` (RFC 3986 §5.2.4: `/a/b/..` is
    // `/a/`).
    let mut out = Vec::with_capacity(decoded.len());
    let mut directory = false;
    for segment in decoded[1..].split(|&c| c == b'/') {
        directory = matches!(segment, b"" | b"." | b"..");
        match segment {
            b"" | b"." => {}
            b".." => {
                let parent = out.iter().rposition(|&c| c == b'/').unwrap_or(0);
                out.truncate(parent);
            }
            name => {
                out.push(b'/');
                out.extend_from_slice(name);
            }
        }
    }
    if directory || out.is_empty() {
        out.push(b'/');
    }
    // Only ASCII was replaced by ASCII in a `str`: still UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

pub(super) fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn origin_form_drops_scheme_and_authority() {
        let u: Uri = "https://example.com:8443/a/b?c=d".parse().unwrap();
        assert_eq!(origin_form(&u), "/a/b?c=d");
        let u: Uri = "/x".parse().unwrap();
        assert_eq!(origin_form(&u), "/x");
    }

    /// (path, its normal form, or `Err` for 400).
    const NORMAL_FORMS: &[(&str, Result<&str, &str>)] = &[
        // Already normal: borrowed as is.
        ("/", Ok("/")),
        ("/a/b", Ok("/a/b")),
        ("/a/b/", Ok("/a/b/")),
        ("/.well-known/x", Ok("/.well-known/x")),
        ("/a/..b/c.", Ok("/a/..b/c.")),
        ("/a%20b%3F%25%C3%A9", Ok("/a%20b%3F%25%C3%A9")),
        ("/caf\u{e9}", Ok("/caf\u{e9}")),
        ("*", Ok("*")),
        // Dot segments (RFC 3986 §5.2.4).
        ("/alpha/../beta/", Ok("/beta/")),
        ("/a/./b", Ok("/a/b")),
        ("/../../x", Ok("/x")),
        ("/a/..", Ok("/")),
        ("/a/b/.", Ok("/a/b/")),
        ("/a/b/..", Ok("/a/")),
        ("/..", Ok("/")),
        ("/.", Ok("/")),
        // Encoded dot segments.
        ("/public/%2e%2e/admin/x", Ok("/admin/x")),
        ("/public/%2E%2e/admin/x", Ok("/admin/x")),
        ("/public/.%2e/admin", Ok("/admin")),
        ("/public/%2e./admin", Ok("/admin")),
        ("/a/%2e/b", Ok("/a/b")),
        ("/a/%2e", Ok("/a/")),
        // Encoded unreserved characters, either case of hex.
        ("/%61dmin/x", Ok("/admin/x")),
        ("/%41%5a%30%39%2D%2e%5F%7e", Ok("/AZ09-._~")),
        // Others stay encoded, hex upper-cased (RFC 3986 §6.2.2.1).
        ("/a%3fb%2a%c3%a9", Ok("/a%3Fb%2A%C3%A9")),
        ("/%252e%252e/admin", Ok("/%252e%252e/admin")),
        ("/%2561dmin", Ok("/%2561dmin")),
        // Repeated slashes merged.
        ("//admin/x", Ok("/admin/x")),
        ("/a//b///c//", Ok("/a/b/c/")),
        ("//", Ok("/")),
        ("/a/.//../b", Ok("/b")),
        // Ambiguous: 400.
        ("/a%2Fb", Err(ENCODED_SEPARATOR)),
        ("/a%2fb", Err(ENCODED_SEPARATOR)),
        ("/a/..%2F", Err(ENCODED_SEPARATOR)),
        ("/a%5Cb", Err(ENCODED_SEPARATOR)),
        ("/a%5cb", Err(ENCODED_SEPARATOR)),
        ("/a\\b", Err(BACKSLASH)),
        ("/a%00", Err(CONTROL)),
        ("/a%0D%0Ab", Err(CONTROL)),
        ("/a%1f", Err(CONTROL)),
        ("/a%7F", Err(CONTROL)),
        ("/a\u{1}b", Err(CONTROL)),
        ("/a\u{7f}", Err(CONTROL)),
        ("/a%zz", Err(BAD_ESCAPE)),
        ("/a%4", Err(BAD_ESCAPE)),
        ("/a%", Err(BAD_ESCAPE)),
        ("/a%4g", Err(BAD_ESCAPE)),
        ("/a%%61", Err(BAD_ESCAPE)),
        ("/a%\u{e9}", Err(BAD_ESCAPE)),
        ("", Err(INVALID_PATH)),
        ("a/b", Err(INVALID_PATH)),
    ];

    #[test]
    fn paths_are_normalized_or_refused() {
        for &(path, expected) in NORMAL_FORMS {
            let got = normalize_path(path);
            assert_eq!(got.as_deref().map_err(|e| *e), expected, "{path:?}");
            if let Ok(normal) = got {
                assert_eq!(
                    matches!(normal, Cow::Borrowed(_)),
                    normal == path,
                    "{path:?}: borrowed exactly when already normal"
                );
                assert_eq!(normalize_path(&normal).as_deref(), Ok(&*normal), "{path:?}");
            }
        }
    }

    #[test]
    fn the_target_keeps_scheme_authority_and_query() {
        for (before, after) in [
            ("/a", "/a"),
            ("/%61/./b?x=%2e%2e/..//&y", "/a/b?x=%2e%2e/..//&y"),
            ("//a?", "/a?"),
            (
                "https://route.test//admin/%2e%2e/x?q",
                "https://route.test/x?q",
            ),
            ("http://route.test:80/%7E", "http://route.test:80/~"),
        ] {
            let mut uri: Uri = before.parse().unwrap();
            normalize_target(&mut uri).unwrap();
            assert_eq!(uri.to_string(), after, "{before}");
        }
        let mut uri: Uri = "/a%2Fb?c".parse().unwrap();
        assert_eq!(normalize_target(&mut uri), Err(ENCODED_SEPARATOR));
    }

    #[test]
    fn route_prefixes_match_in_normal_form() {
        assert!(prefix_matches("/admin/x", "/admin"));
        assert!(prefix_matches("/~user/x", "/%7Euser"));
        assert!(prefix_matches("/a%3Fb", "/a%3fb"));
        assert!(prefix_matches("/a/b", "//a/./b"));
        assert!(!prefix_matches("/admin", "/admin/"));
        assert!(!prefix_matches("/a/b", "/a%2Fb"), "a prefix never met");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 2000,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]

        /// Anything at all is normalized or refused, never a panic; the normal form starts
        /// with `/` (or is `*`) and has nothing [`normalize_path`] refuses.
        #[test]
        fn any_path_is_normalized_or_refused(
            raw in proptest::prelude::any::<String>(),
            slash in proptest::prelude::any::<bool>(),
        ) {
            let path = if slash { format!("/{raw}") } else { raw };
            if let Ok(normal) = normalize_path(&path) {
                proptest::prop_assert!(normal.starts_with('/') || normal == "*");
                let refused = |c: u8| c < 0x20 || c == 0x7f || c == b'\\';
                proptest::prop_assert!(!normal.bytes().any(refused), "{normal:?}");
            }
        }

        /// Normalizing is idempotent, and the normal form has no empty or dot segment, no
        /// encoded unreserved character, no lower-case hex and nothing refused.
        #[test]
        fn normal_forms_are_normal(
            path in "/(a|B|0|-|_|~|\\.|\\.\\.|/|//|%2e|%2E|%61|%41|%7e|%3f|%3F|%25|%20|%c3%a9\
                     |%[0-9a-fA-F]{2})*"
        ) {
            if let Ok(normal) = normalize_path(&path) {
                let again = normalize_path(&normal);
                proptest::prop_assert_eq!(again.as_deref(), Ok(&*normal));
                proptest::prop_assert!(matches!(normalize_path(&normal), Ok(Cow::Borrowed(_))));
                proptest::prop_assert!(normal.starts_with('/'));
                for bad in ["//", "/./", "/../"] {
                    proptest::prop_assert!(!normal.contains(bad), "{normal:?} has {bad}");
                }
                proptest::prop_assert!(!normal.ends_with("/.") && !normal.ends_with("/.."));
                for (i, _) in normal.match_indices('%') {
                    let hex = &normal.as_bytes()[i + 1..i + 3];
                    let upper = |c: &u8| c.is_ascii_digit() || c.is_ascii_uppercase();
                    proptest::prop_assert!(hex.iter().all(upper), "{normal:?}");
                    let byte = escape_at(normal.as_bytes(), i).map(|(hi, lo)| hi << 4 | lo);
                    proptest::prop_assert!(!byte.is_some_and(is_unreserved), "{normal:?}");
                }
                proptest::prop_assert!(!normal.contains('\\'));
            }
        }
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
            host_problem(r.version(), r.uri(), RequestFields::map(r.headers()))
        };
        assert_eq!(req(Version::HTTP_11, &["a.example"]), None);
        assert_eq!(req(Version::HTTP_11, &["a.example:8080"]), None);
        assert_eq!(req(Version::HTTP_11, &["[::1]:8080"]), None);
        assert_eq!(req(Version::HTTP_11, &[""]), None, "empty: no authority");
        assert!(req(Version::HTTP_11, &[]).is_some(), "HTTP/1.1 needs Host");
        assert_eq!(req(Version::HTTP_10, &[]), None, "HTTP/1.0 may omit it");
        assert!(req(Version::HTTP_11, &["a", "b"]).is_some());
        assert!(req(Version::HTTP_10, &["a", "a"]).is_some());
        assert!(req(Version::HTTP_11, &["a b"]).is_some(), "invalid");
        assert!(req(Version::HTTP_11, &["a/b"]).is_some(), "invalid");
        assert!(
            req(Version::HTTP_11, &["probe@a.example"]).is_some(),
            "userinfo"
        );
        assert_eq!(req(Version::HTTP_2, &[]), None, "HTTP/2 has :authority");
        assert!(
            req(Version::HTTP_2, &["u@a.example"]).is_some(),
            "any version"
        );

        let authority = |uri: &str| {
            let mut r = Request::new(());
            *r.version_mut() = Version::HTTP_2;
            *r.uri_mut() = uri.parse().unwrap();
            host_problem(r.version(), r.uri(), RequestFields::map(r.headers()))
        };
        assert_eq!(authority("https://a.example/x"), None);
        assert_eq!(authority("https://[::1]:8443/x"), None);
        assert!(authority("https://probe.test@a.example/x").is_some());
        assert!(authority("https://u:p@a.example:8443/x").is_some());
    }

    #[test]
    fn uri_host_and_port() {
        for good in [
            "a",
            "a.example",
            "A.Example.",
            "a.example:8443",
            "a.example:",
            "a.example:65535",
            "127.0.0.1",
            "127.0.0.1:80",
            "under_score.test",
            "tilde~.test",
            "[::1]",
            "[::1]:8443",
            "[2001:db8::ffff:10.0.0.1]:80",
        ] {
            assert!(valid_host_port(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            ":80",
            "u@a.example",
            "@a.example",
            "u:p@a.example:80",
            "a.example:65536",
            "a.example:123456",
            "a.example:8o",
            "a.example:80:80",
            "a.example:-1",
            "a,b",
            "a;b=c",
            "a!b",
            "a%2Eb",
            "a b",
            "a/b",
            "a\\b",
            "caf\u{e9}.test",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:x",
            "[a.example]",
            "[fe80::1%25eth0]",
            "[v1.x]",
        ] {
            assert!(!valid_host_port(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn phase_1_refuses_connect_and_targets_in_the_wrong_form() {
        let req = |method: Method, uri: &str| {
            let mut r = Request::new(());
            *r.method_mut() = method;
            *r.uri_mut() = uri.parse().unwrap();
            r.headers_mut()
                .insert(header::HOST, HeaderValue::from_static("route.test"));
            let (mut p, ()) = r.into_parts();
            let fields = RequestFields::map(&p.headers);
            admit(&p.method, p.version, &mut p.uri, fields)
                .map(|()| p.uri.to_string())
                .map_err(|e| e.status)
        };
        assert_eq!(req(Method::GET, "/%61/b"), Ok("/a/b".into()));
        assert_eq!(
            req(Method::GET, "http://route.test//a"),
            Ok("http://route.test/a".into())
        );
        assert_eq!(req(Method::OPTIONS, "*"), Ok("*".into()));
        assert_eq!(
            req(Method::CONNECT, "route.test:443"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(
            req(Method::CONNECT, "/x"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(req(Method::TRACE, "/"), Err(StatusCode::METHOD_NOT_ALLOWED));
        assert_eq!(
            req(Method::GET, "route.test:80"),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            req(Method::OPTIONS, "route.test:80"),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(req(Method::GET, "*"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(req(Method::GET, "/a%2fb"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(
            req(Method::GET, "http://u@route.test/"),
            Err(StatusCode::BAD_REQUEST)
        );

        let connect = Refused {
            status: StatusCode::METHOD_NOT_ALLOWED,
            reason: "x\n",
        }
        .response(Version::HTTP_11);
        assert_eq!(connect.headers()[header::ALLOW], ALLOW);
        assert_eq!(connect.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn host_port_is_stripped_for_routing() {
        assert_eq!(strip_port("api.example.com:8443"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:8443"), "[::1]");
    }
}
