//! Owns where an HTTP/1.1 message body ends (RFC 9112 §6): the rules that read
//! `Transfer-Encoding` and `Content-Length` for a request and for a response, strictly enough
//! that kaproxy and the backend behind it never disagree about where a message ends (request
//! smuggling, RFC 9112 §11.2).

use crate::http1::head::Version;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a request without either field; HEAD, 1xx, 204 and 304 responses).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// The chunked transfer coding ([`crate::http1::chunked`]).
    Chunked,
    /// Everything until the connection closes (a response only, RFC 9112 §6.3 point 8).
    UntilClose,
}

/// Why a message's framing is refused: 400 for a request, 502 for a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A value that is not a list of digits (signed, empty, hex, over 2^64 - 1).
    #[error("Content-Length is not a decimal length")]
    BadContentLength,
    /// Two lengths that differ (`5, 6`, or two fields); equal ones are one length (RFC 9112
    /// §6.3 point 5).
    #[error("conflicting Content-Length values")]
    ConflictingContentLength,
    /// A request with both fields (RFC 9112 §6.3 point 3: "ought to be handled as an error").
    #[error("a request with both Transfer-Encoding and Content-Length")]
    LengthAndTransferEncoding,
    /// A request whose transfer codings do not end with `chunked`, or name it twice (RFC 9112
    /// §6.3 point 4: its length cannot be known).
    #[error("a request's Transfer-Encoding does not end with chunked, once")]
    NotChunked,
    /// `Transfer-Encoding` in an HTTP/1.0 request (RFC 9112 §6.1: faulty framing).
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
}

/// What a response's fields say of its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFraming {
    pub framing: Framing,
    /// True when a `Content-Length` came with `Transfer-Encoding` and was overridden (RFC 9112
    /// §6.3 point 3): the body is forwarded without it and the connection is not reused
    /// (the README, "Framing from backends").
    pub length_overridden: bool,
}

/// The transfer codings of every `Transfer-Encoding` field: whether any was present, and
/// whether `chunked` is the last one (and, with `once`, the only `chunked`: a request's rule
/// here; a response naming it twice is read as chunked, as hyper's client reads it).
fn transfer_codings<'a>(values: impl Iterator<Item = &'a [u8]>, once: bool) -> Option<bool> {
    let mut present = false;
    let mut chunked_count = 0;
    let mut last_is_chunked = false;
    for value in values {
        present = true;
        for coding in value.split(|&b| b == b',') {
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue;
            }
            last_is_chunked = coding.eq_ignore_ascii_case(b"chunked");
            chunked_count += usize::from(last_is_chunked);
        }
    }
    present.then_some(last_is_chunked && (chunked_count == 1 || !once))
}

/// The one length every `Content-Length` field agrees on, if any field. A request's field is
/// one number (hyper's server and nginx refuse `5, 5`); a response's may be a list of equal
/// ones (RFC 9110 §8.6, as hyper's client reads it).
fn content_length<'a>(
    values: impl Iterator<Item = &'a [u8]>,
    lists: bool,
) -> Result<Option<u64>, FramingError> {
    let mut length = None;
    for value in values {
        for element in value.split(|&b| lists && b == b',') {
            let n = decimal(element.trim_ascii()).ok_or(FramingError::BadContentLength)?;
            match length {
                Some(prior) if prior != n => return Err(FramingError::ConflictingContentLength),
                _ => length = Some(n),
            }
        }
    }
    Ok(length)
}

/// A non-empty run of ASCII digits that fits in a u64.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then_some(())
            .and_then(|_| n.checked_mul(10))
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
    })
}

/// The values of the fields named `name` among (name, value) pairs.
fn named<'a, I>(fields: I, name: &'static str) -> impl Iterator<Item = &'a [u8]>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
{
    fields
        .into_iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v)
}

/// How a request's body is delimited (RFC 9112 §6.3 points 3, 4, 5 and 7).
pub fn request<'a, I>(version: Version, fields: I) -> Result<Framing, FramingError>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone,
{
    let chunked = transfer_codings(named(fields.clone(), "transfer-encoding"), true);
    let length = content_length(named(fields, "content-length"), false)?;
    match (chunked, length) {
        (Some(_), _) if version == Version::Http10 => Err(FramingError::TransferEncodingInHttp10),
        (Some(_), Some(_)) => Err(FramingError::LengthAndTransferEncoding),
        (Some(true), None) => Ok(Framing::Chunked),
        (Some(false), None) => Err(FramingError::NotChunked),
        (None, length) => Ok(by_length(length, Framing::Empty)),
    }
}

/// A body of `length` bytes; `absent` when no `Content-Length` says.
fn by_length(length: Option<u64>, absent: Framing) -> Framing {
    match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => absent,
    }
}

/// How a response's body is delimited (RFC 9112 §6.3 points 1, 3, 4, 5 and 8), given the
/// status and whether it answers a HEAD request. Responses to CONNECT do not occur: kaproxy
/// answers CONNECT itself (405).
pub fn response<'a, I>(
    status: u16,
    to_head: bool,
    fields: I,
) -> Result<ResponseFraming, FramingError>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone,
{
    let untouched = |framing| ResponseFraming {
        framing,
        length_overridden: false,
    };
    if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(untouched(Framing::Empty));
    }
    let Some(chunked) = transfer_codings(named(fields.clone(), "transfer-encoding"), false) else {
        let length = content_length(named(fields, "content-length"), true)?;
        return Ok(untouched(by_length(length, Framing::UntilClose)));
    };
    Ok(ResponseFraming {
        framing: if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        },
        length_overridden: named(fields, "content-length").next().is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fields<'a> = &'a [(&'a str, &'a str)];

    fn pairs<'a>(fields: Fields<'a>) -> Vec<(&'a [u8], &'a [u8])> {
        fields
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect()
    }

    #[test]
    fn request_framing_table() {
        use Framing::*;
        use FramingError::*;
        let v11 = Version::Http11;
        let rows: &[(Version, Fields, Result<Framing, FramingError>)] = &[
            (v11, &[], Ok(Empty)),
            (v11, &[("Content-Length", "0")], Ok(Empty)),
            (v11, &[("content-length", "42")], Ok(Length(42))),
            (v11, &[("Content-Length", "5, 5")], Err(BadContentLength)),
            (
                v11,
                &[("Content-Length", "5"), ("Content-Length", "5")],
                Ok(Length(5)),
            ),
            (
                v11,
                &[("Content-Length", "5"), ("Content-Length", "6")],
                Err(ConflictingContentLength),
            ),
            (v11, &[("Content-Length", "5,6")], Err(BadContentLength)),
            (v11, &[("Content-Length", "+5")], Err(BadContentLength)),
            (v11, &[("Content-Length", "-5")], Err(BadContentLength)),
            (v11, &[("Content-Length", "")], Err(BadContentLength)),
            (v11, &[("Content-Length", "5,")], Err(BadContentLength)),
            (v11, &[("Content-Length", "0x5")], Err(BadContentLength)),
            (v11, &[("Content-Length", "5 5")], Err(BadContentLength)),
            (
                v11,
                &[("Content-Length", "18446744073709551616")],
                Err(BadContentLength),
            ),
            (
                v11,
                &[("Content-Length", "18446744073709551615")],
                Ok(Length(u64::MAX)),
            ),
            (v11, &[("Transfer-Encoding", "chunked")], Ok(Chunked)),
            (v11, &[("Transfer-Encoding", "Chunked")], Ok(Chunked)),
            (v11, &[("Transfer-Encoding", "gzip, chunked")], Ok(Chunked)),
            (
                v11,
                &[
                    ("Transfer-Encoding", "gzip"),
                    ("Transfer-Encoding", "chunked"),
                ],
                Ok(Chunked),
            ),
            (
                v11,
                &[("Transfer-Encoding", "chunked, gzip")],
                Err(NotChunked),
            ),
            (
                v11,
                &[("Transfer-Encoding", "chunked, chunked")],
                Err(NotChunked),
            ),
            (v11, &[("Transfer-Encoding", "gzip")], Err(NotChunked)),
            (v11, &[("Transfer-Encoding", "")], Err(NotChunked)),
            (v11, &[("Transfer-Encoding", "xchunked")], Err(NotChunked)),
            (
                v11,
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
                Err(LengthAndTransferEncoding),
            ),
            (
                Version::Http10,
                &[("Transfer-Encoding", "chunked")],
                Err(TransferEncodingInHttp10),
            ),
            (Version::Http10, &[("Content-Length", "3")], Ok(Length(3))),
        ];
        for (version, fields, want) in rows {
            assert_eq!(request(*version, pairs(fields)), *want, "{fields:?}");
        }
    }

    #[test]
    fn response_framing_table() {
        use Framing::*;
        let ok = |framing, length_overridden| {
            Ok(ResponseFraming {
                framing,
                length_overridden,
            })
        };
        let rows: &[(u16, bool, Fields, Result<ResponseFraming, FramingError>)] = &[
            (200, false, &[], ok(UntilClose, false)),
            (200, false, &[("Content-Length", "0")], ok(Empty, false)),
            (200, false, &[("Content-Length", "7")], ok(Length(7), false)),
            (
                200,
                false,
                &[("Content-Length", "7, 7")],
                ok(Length(7), false),
            ),
            (
                200,
                false,
                &[("Content-Length", "7, 8")],
                Err(FramingError::ConflictingContentLength),
            ),
            (200, true, &[("Content-Length", "7")], ok(Empty, false)),
            (204, false, &[("Content-Length", "7")], ok(Empty, false)),
            (
                304,
                false,
                &[("Transfer-Encoding", "chunked")],
                ok(Empty, false),
            ),
            (101, false, &[], ok(Empty, false)),
            (103, false, &[], ok(Empty, false)),
            (
                200,
                false,
                &[("Transfer-Encoding", "chunked")],
                ok(Chunked, false),
            ),
            (
                200,
                false,
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "7")],
                ok(Chunked, true),
            ),
            (
                200,
                false,
                &[("Transfer-Encoding", "gzip")],
                ok(UntilClose, false),
            ),
            (
                200,
                false,
                &[("Content-Length", "7"), ("Content-Length", "8")],
                Err(FramingError::ConflictingContentLength),
            ),
            (
                200,
                false,
                &[("Content-Length", "x")],
                Err(FramingError::BadContentLength),
            ),
            (404, true, &[("Content-Length", "x")], ok(Empty, false)),
        ];
        for (status, to_head, fields, want) in rows {
            assert_eq!(
                response(*status, *to_head, pairs(fields)),
                *want,
                "{status} head={to_head} {fields:?}"
            );
        }
    }
}
