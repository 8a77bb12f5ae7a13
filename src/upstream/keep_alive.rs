//! Owns the backend's `Keep-Alive: timeout=N, max=M` header (parsed leniently): what kaproxy
//! learns each backend's keep-alive limits from, and the `Connection: keep-alive` that asks
//! for it.

use std::time::Duration;

use http::header::CONNECTION;
use http::{HeaderMap, HeaderValue};

/// What a backend said in `Keep-Alive: timeout=N, max=M`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepAliveHint {
    pub timeout: Option<Duration>,
    pub max: Option<u32>,
}

impl KeepAliveHint {
    /// Parses a `Keep-Alive` header value leniently: parameters in any order and case, with
    /// odd spacing; unknown parameters and malformed values are ignored.
    pub fn parse(value: &[u8]) -> KeepAliveHint {
        let mut hint = KeepAliveHint::default();
        let Ok(text) = std::str::from_utf8(value) else {
            return hint;
        };
        for param in text.split(',') {
            let Some((name, val)) = param.split_once('=') else {
                continue;
            };
            let val = val.trim().trim_matches('"');
            match name.trim().to_ascii_lowercase().as_str() {
                "timeout" => {
                    if let Ok(secs) = val.parse::<u64>() {
                        hint.timeout = Some(Duration::from_secs(secs));
                    }
                }
                "max" => {
                    if let Ok(max) = val.parse::<u32>() {
                        hint.max = Some(max);
                    }
                }
                _ => {}
            }
        }
        hint
    }
}

/// Marks a request as asking for keep-alive: Apache only advertises `Keep-Alive:
/// timeout=N, max=M` to requests that ask, and without it there is nothing to learn.
pub fn ask_keep_alive(headers: &mut HeaderMap) {
    headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_header_parsing() {
        let p = |s: &str| KeepAliveHint::parse(s.as_bytes());
        assert_eq!(
            p("timeout=5, max=100"),
            KeepAliveHint {
                timeout: Some(Duration::from_secs(5)),
                max: Some(100)
            }
        );
        assert_eq!(
            p("  MAX = 7 ,TIMEOUT=1"),
            KeepAliveHint {
                timeout: Some(Duration::from_secs(1)),
                max: Some(7)
            }
        );
        assert_eq!(p("timeout=15").max, None);
        assert_eq!(p("timeout=15").timeout, Some(Duration::from_secs(15)));
        assert_eq!(p("max=3").timeout, None);
        assert_eq!(p("timeout=\"2\"").timeout, Some(Duration::from_secs(2)));
        assert_eq!(p(""), KeepAliveHint::default());
        assert_eq!(p("garbage"), KeepAliveHint::default());
        assert_eq!(p("timeout=abc, max=-1"), KeepAliveHint::default());
        assert_eq!(p("timeout=, max"), KeepAliveHint::default());
        assert_eq!(
            KeepAliveHint::parse(&[0xff, 0xfe]),
            KeepAliveHint::default()
        );
    }
}
