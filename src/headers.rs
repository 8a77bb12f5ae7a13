//! Owns the header names and comma-separated token lists both sides of the proxy read
//! (RFC 9110 §5.6.1): `Keep-Alive`, and the `Connection` and `Upgrade` token helpers, so that
//! a list is parsed one way everywhere. Imports nothing of ours.

use http::header::{HeaderName, CONNECTION};
use http::{HeaderMap, HeaderValue};

/// `Keep-Alive` (not among the `http` crate's constants).
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The tokens of every `name` field of `headers`: comma-separated, trimmed, empty ones left
/// out (RFC 9110 §5.6.1); a value that is not visible ASCII has none.
pub fn tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers.get_all(name).iter().flat_map(value_tokens)
}

/// The tokens of one field value (see [`tokens`]).
pub fn value_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    field_tokens(value.as_bytes())
}

/// The tokens of one field value as received (see [`tokens`]; a head kept as bytes,
/// [`crate::http1::head`]).
pub fn field_tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    visible(value)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A field value as text when it is visible ASCII (and tabs), as `HeaderValue::to_str` reads
/// one; else none.
pub fn visible(value: &[u8]) -> Option<&str> {
    let visible = value.iter().all(|&b| b == b'\t' || (32..127).contains(&b));
    visible.then(|| std::str::from_utf8(value).ok()).flatten()
}

/// True when a `Connection` field names `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    tokens(headers, &CONNECTION).any(|t| t.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Keep-Alive"));
        assert!(!connection_has(&h, "close"));
        assert!(connection_has(&h, "keep-alive"));
        h.append(CONNECTION, HeaderValue::from_static("x-foo, Close"));
        assert!(connection_has(&h, "close"));
        assert!(connection_has(&h, "X-Foo"));
        assert_eq!(tokens(&h, &CONNECTION).count(), 3);
        h.insert(CONNECTION, HeaderValue::from_static(" , ,"));
        assert_eq!(tokens(&h, &CONNECTION).count(), 0);
        h.insert(CONNECTION, HeaderValue::from_bytes(b"close\xff").unwrap());
        assert!(!connection_has(&h, "close"), "not visible ASCII: no tokens");
    }
}
