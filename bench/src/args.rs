//! Parses the command-line values clap cannot: durations, `MIN..MAX` ranges, source address
//! ranges, `Name: value` headers and case lists (`probe --only 1-3,9`). Only parsing and
//! validation; nothing here opens a socket.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Parses `"250ms"`, `"1.5s"`, `"2m"`, `"300us"`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("expected a duration like 250ms, 1s or 2m, got {s:?}"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses `--idle-gap`: `"900ms..1100ms"`, or one duration for a fixed gap.
pub fn parse_gap(s: &str) -> Result<(Duration, Duration), String> {
    let (min, max) = match s.split_once("..") {
        Some((a, b)) => (parse_duration(a)?, parse_duration(b)?),
        None => {
            let d = parse_duration(s)?;
            (d, d)
        }
    };
    if min > max {
        return Err(format!("idle gap {s:?}: MIN is greater than MAX"));
    }
    Ok((min, max))
}

/// An inclusive range of IPv4 source addresses (`127.0.0.2-127.0.0.250`), or a single one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceIps {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl SourceIps {
    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// The `i`-th address, wrapping around the range.
    pub fn nth(&self, i: u64) -> Ipv4Addr {
        let offset = (i % u64::from(self.len())) as u32;
        Ipv4Addr::from(u32::from(self.first) + offset)
    }
}

pub fn parse_source_ips(s: &str) -> Result<SourceIps, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let parse = |x: &str| {
        x.trim().parse::<Ipv4Addr>().map_err(|_| {
            format!("expected an IPv4 address range like 127.0.0.2-127.0.0.250, got {s:?}")
        })
    };
    let (first, last) = (parse(a)?, parse(b)?);
    if u32::from(first) > u32::from(last) {
        return Err(format!(
            "source range {s:?}: first address is after the last"
        ));
    }
    if !first.is_loopback() || !last.is_loopback() {
        return Err(format!(
            "source range {s:?}: only loopback addresses (127.0.0.0/8) are allowed"
        ));
    }
    Ok(SourceIps { first, last })
}

/// Parses `-H "Name: value"`.
pub fn parse_header(s: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("expected a header like \"Name: value\", got {s:?}"))?;
    let name = http::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("header name {name:?}: {e}"))?;
    let value = http::HeaderValue::from_str(value.trim())
        .map_err(|e| format!("header value {value:?}: {e}"))?;
    Ok((name, value))
}

/// Parses `probe --only`: case numbers 1-15, comma-separated, with ranges (`1-3,9,13`).
pub fn parse_cases(s: &str) -> Result<BTreeSet<u8>, String> {
    let number = |x: &str| -> Result<u8, String> {
        match x.trim().parse::<u8>() {
            Ok(n) if (1..=15).contains(&n) => Ok(n),
            _ => Err(format!(
                "expected case numbers 1-15 like 1,2,13 or 1-6, got {s:?}"
            )),
        }
    };
    let mut cases = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    return Err(format!("case range {part:?}: the first is after the last"));
                }
                cases.extend(a..=b);
            }
            None => {
                cases.insert(number(part)?);
            }
        }
    }
    if cases.is_empty() {
        return Err("--only needs at least one case".to_string());
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn gaps() {
        assert_eq!(
            parse_gap("900ms..1100ms"),
            Ok((Duration::from_millis(900), Duration::from_millis(1100)))
        );
        assert_eq!(
            parse_gap("1s"),
            Ok((Duration::from_secs(1), Duration::from_secs(1)))
        );
        assert!(parse_gap("2s..1s").is_err());
    }

    #[test]
    fn source_ips() {
        let r = parse_source_ips("127.0.0.2-127.0.0.250").unwrap();
        assert_eq!(r.len(), 249);
        assert_eq!(r.nth(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(r.nth(248), Ipv4Addr::new(127, 0, 0, 250));
        assert_eq!(r.nth(249), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(parse_source_ips("127.0.0.9").unwrap().len(), 1);
        assert!(parse_source_ips("10.0.0.1-10.0.0.2").is_err());
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
    }

    #[test]
    fn headers() {
        let (n, v) = parse_header("X-Foo:  bar baz").unwrap();
        assert_eq!(n.as_str(), "x-foo");
        assert_eq!(v, "bar baz");
        assert!(parse_header("nocolon").is_err());
    }

    #[test]
    fn cases() {
        assert_eq!(
            parse_cases("1-3,9, 13")
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            [1, 2, 3, 9, 13]
        );
        assert!(parse_cases("0").is_err());
        assert!(parse_cases("16").is_err());
        assert!(parse_cases("3-1").is_err());
        assert!(parse_cases("").is_err());
        assert!(parse_cases("x").is_err());
    }
}
