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

/// The header values made for every connection from one of few keys — a listener's port
/// (`X-Forwarded-Port`), the advertised `Keep-Alive: timeout=N` — made once per worker thread
/// and key, and cloned (sharing their bytes) for each connection after: an idle connection
/// holds no copy of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerConnection {
    Port,
    KeepAlive,
}

/// The value of `kind` for `key`, made by `make` the first time a thread asks.
pub fn per_connection(
    kind: PerConnection,
    key: u64,
    make: impl FnOnce() -> HeaderValue,
) -> HeaderValue {
    use std::cell::RefCell;
    /// Enough for every listener port and timeout a configuration has; past it, values are
    /// made each time.
    const KEEP: usize = 16;
    thread_local! {
        static MADE: RefCell<Vec<(PerConnection, u64, HeaderValue)>> = const { RefCell::new(Vec::new()) };
    }
    let found = MADE
        .try_with(|made| {
            made.borrow()
                .iter()
                .find(|(k, n, _)| *k == kind && *n == key)
                .map(|(_, _, v)| v.clone())
        })
        .ok()
        .flatten();
    if let Some(value) = found {
        return value;
    }
    let value = make();
    let _ = MADE.try_with(|made| {
        let mut made = made.borrow_mut();
        if made.len() < KEEP {
            made.push((kind, key, value.clone()));
        }
    });
    value
}

/// True when a `Connection` field names `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    tokens(headers, &CONNECTION).any(|t| t.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_per_connection_value_is_made_once_per_key_and_shared() {
        let mut made = 0;
        let mut make = |s: &'static str| {
            made += 1;
            HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(s.as_bytes())).unwrap()
        };
        let a = per_connection(PerConnection::Port, 8080, || make("8080"));
        let b = per_connection(PerConnection::Port, 8080, || make("never"));
        let c = per_connection(PerConnection::KeepAlive, 8080, || make("timeout=8080"));
        assert_eq!(
            (a.as_bytes(), b.as_bytes(), c.as_bytes()),
            (&b"8080"[..], &b"8080"[..], &b"timeout=8080"[..])
        );
        assert_eq!(made, 2, "the second ask for the same key made nothing");
        assert_eq!(
            a.as_bytes().as_ptr(),
            b.as_bytes().as_ptr(),
            "the bytes are shared"
        );
    }

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
