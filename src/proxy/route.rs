//! Owns routing (phase 1): which upstream group serves a request by host and path prefix,
//! the request's host (absolute-form authority or `Host`), the Host rules of RFC 9112 §3.2,
//! and the origin-form target sent upstream.

use http::header::{self, HeaderValue};
use http::{Request, Uri, Version};

use crate::config::HostMatch;

use super::{Proxy, Upstream};

pub(super) struct Route {
    pub(super) host: Option<HostMatch>,
    pub(super) path_prefix: Option<String>,
    pub(super) upstream: usize,
}

impl Proxy {
    /// Phase 1: which upstream group serves this request.
    pub(super) fn route(&self, host: Option<&str>, path: &str) -> Option<&Upstream> {
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
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or an HTTP/1 request with more than
/// one or an invalid one, gets 400 (nginx and HAProxy do the same). HTTP/2 carries the
/// authority in `:authority`.
pub(super) fn host_problem<B>(req: &Request<B>) -> Option<&'static str> {
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
pub(super) fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => req.headers().get(header::HOST).cloned(),
    }
}

/// The path with `.` and `..` segments resolved, for route matching only (nginx does the
/// same), so that `/public/../admin` cannot slip past a `/admin` route. No allocation
/// unless there is a dot segment.
pub(super) fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
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
