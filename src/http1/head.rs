//! Owns parsed HTTP/1.1 message heads (RFC 9112 §2–§5): a request or status line and its
//! fields, parsed by httparse and kept as the head's own bytes with the offsets of each part,
//! so that a proxy reads a field without copying it and writes the head out again from the
//! same bytes.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};

/// At most this many fields in a head (hyper's and kaproxy's limit on HTTP/1 and HTTP/2
/// alike: the README, "Hostile clients"); one more is [`HeadError::TooManyFields`] (431).
pub const MAX_FIELDS: usize = 100;

/// The HTTP/1 minor version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Why a head cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Longer than the caller's limit before its end (431 for a request, 502 for a response).
    #[error("message head over {limit} bytes")]
    TooLarge { limit: usize },
    /// More than [`MAX_FIELDS`] fields.
    #[error("more than {MAX_FIELDS} header fields")]
    TooManyFields,
    /// Not HTTP/1.x syntax: a bad start line, a bad field name, a bare CR, obs-fold (RFC 9112
    /// §5.2: rejected), a NUL or control byte in a value.
    #[error("malformed message head: {0}")]
    Malformed(httparse::Error),
}

/// Where one part lies in the head's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// Where `part`, which httparse took from `base`, lies in it; empty when httparse gave a
    /// slice of its own (an empty reason phrase may be one).
    fn of(base: &[u8], part: &[u8]) -> Span {
        let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
        if start > base.len() || part.len() > base.len() - start {
            return Span { start: 0, end: 0 };
        }
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    fn get<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[self.start as usize..self.end as usize]
    }
}

/// One field line: its name and value (without the surrounding whitespace).
#[derive(Debug, Clone, Copy)]
struct Field {
    name: Span,
    value: Span,
}

/// The fields of a head, in order, over the head's bytes.
#[derive(Debug, Clone)]
pub struct Fields {
    bytes: Bytes,
    fields: Vec<Field>,
}

impl Fields {
    /// The spans of httparse's `parsed` fields of `base`.
    fn spans(base: &[u8], parsed: &[httparse::Header<'_>]) -> Vec<Field> {
        parsed
            .iter()
            .map(|h| Field {
                name: Span::of(base, h.name.as_bytes()),
                value: Span::of(base, h.value),
            })
            .collect()
    }

    /// Every field as (name, value), in the order received.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone + '_ {
        self.fields
            .iter()
            .map(|f| (f.name.get(&self.bytes), f.value.get(&self.bytes)))
    }

    /// The values of every field named `name` (case-insensitive), in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The value of the first field named `name`.
    pub fn get<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.get_all(name).next()
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// A request head: `method SP target SP HTTP/1.x` and its fields.
#[derive(Debug, Clone)]
pub struct RequestHead {
    method: Span,
    target: Span,
    pub version: Version,
    pub fields: Fields,
}

impl RequestHead {
    pub fn method(&self) -> &[u8] {
        self.method.get(&self.fields.bytes)
    }

    pub fn target(&self) -> &[u8] {
        self.target.get(&self.fields.bytes)
    }

    /// The whole head as received, final CRLF included.
    pub fn as_bytes(&self) -> &Bytes {
        &self.fields.bytes
    }
}

/// A response head: `HTTP/1.x SP status SP reason` and its fields.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    reason: Span,
    pub version: Version,
    pub fields: Fields,
}

impl ResponseHead {
    pub fn reason(&self) -> &[u8] {
        self.reason.get(&self.fields.bytes)
    }

    /// The whole head as received, final CRLF included.
    pub fn as_bytes(&self) -> &Bytes {
        &self.fields.bytes
    }
}

fn version(minor: Option<u8>) -> Version {
    match minor {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    }
}

/// What httparse said of the buffer: a head of `len` bytes, or not complete yet.
fn complete(
    status: Result<httparse::Status<usize>, httparse::Error>,
    buffered: usize,
    limit: usize,
) -> Result<Option<usize>, HeadError> {
    match status {
        Ok(httparse::Status::Complete(len)) if len > limit => Err(HeadError::TooLarge { limit }),
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buffered > limit => Err(HeadError::TooLarge { limit }),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyFields),
        Err(e) => Err(HeadError::Malformed(e)),
    }
}

/// Takes a request head off the front of `buf`: `Ok(None)` while it is incomplete (read
/// more), an error once it cannot become a head of at most `limit` bytes. Empty lines before
/// the request line are skipped (RFC 9112 §2.2).
pub fn parse_request(buf: &mut BytesMut, limit: usize) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = req.parse_with_uninit_headers(buf, &mut headers);
    let Some(len) = complete(parsed, buf.len(), limit)? else {
        return Ok(None);
    };
    let base: &[u8] = buf;
    let method = Span::of(base, req.method.unwrap_or_default().as_bytes());
    let target = Span::of(base, req.path.unwrap_or_default().as_bytes());
    let version = version(req.version);
    let fields = Fields::spans(base, req.headers);
    Ok(Some(RequestHead {
        method,
        target,
        version,
        fields: Fields {
            bytes: buf.split_to(len).freeze(),
            fields,
        },
    }))
}

/// Takes a response head off the front of `buf` (see [`parse_request`]). Interim (1xx)
/// responses are heads of their own; the caller reads on past them.
pub fn parse_response(buf: &mut BytesMut, limit: usize) -> Result<Option<ResponseHead>, HeadError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Left uninitialized: httparse writes only the fields it finds (zeroing all 100 slots
    // would cost more than parsing a small head).
    let mut headers = [const { MaybeUninit::uninit() }; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    );
    let Some(len) = complete(parsed, buf.len(), limit)? else {
        return Ok(None);
    };
    let base: &[u8] = buf;
    let status = resp.code.unwrap_or_default();
    let reason = Span::of(base, resp.reason.unwrap_or_default().as_bytes());
    let version = version(resp.version);
    let fields = Fields::spans(base, resp.headers);
    Ok(Some(ResponseHead {
        status,
        reason,
        version,
        fields: Fields {
            bytes: buf.split_to(len).freeze(),
            fields,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_head_keeps_its_bytes_and_leaves_the_body() {
        let mut buf = BytesMut::from(
            &b"\r\nPOST /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Two:  spaced value \r\ncontent-length: 2\r\n\r\nhi"[..],
        );
        let head = parse_request(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(head.method(), b"POST");
        assert_eq!(head.target(), b"/a?b=1");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(head.fields.len(), 3);
        assert_eq!(head.fields.get("host"), Some(&b"x"[..]));
        assert_eq!(head.fields.get("x-two"), Some(&b"spaced value"[..]));
        assert_eq!(head.fields.get("Content-Length"), Some(&b"2"[..]));
        assert_eq!(head.fields.get("absent"), None);
        assert!(head.as_bytes().ends_with(b"\r\n\r\n"));
        assert_eq!(&buf[..], b"hi");
    }

    #[test]
    fn a_response_head_with_an_empty_reason_and_repeated_fields() {
        let mut buf = BytesMut::from(&b"HTTP/1.0 204 \r\nA: 1\r\na: 2\r\n\r\n"[..]);
        let head = parse_response(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((head.status, head.version), (204, Version::Http10));
        assert_eq!(head.reason(), b"");
        let all: Vec<&[u8]> = head.fields.get_all("a").collect();
        assert_eq!(all, [&b"1"[..], b"2"]);
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_oversized_and_malformed_heads() {
        let mut partial = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n"[..]);
        assert!(parse_request(&mut partial, 1024).unwrap().is_none());
        assert_eq!(
            partial.len(),
            25,
            "nothing is taken from an incomplete head"
        );
        assert_eq!(
            parse_request(&mut partial, 10).unwrap_err(),
            HeadError::TooLarge { limit: 10 }
        );
        let mut complete = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
        assert_eq!(
            parse_request(&mut complete, 20).unwrap_err(),
            HeadError::TooLarge { limit: 20 }
        );
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_FIELDS + 1)
        );
        assert_eq!(
            parse_request(&mut BytesMut::from(many.as_bytes()), 1 << 20).unwrap_err(),
            HeadError::TooManyFields
        );
        let exactly = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(MAX_FIELDS));
        assert!(parse_request(&mut BytesMut::from(exactly.as_bytes()), 1 << 20).is_ok());
        for bad in [
            &b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\0c\r\n\r\n",
            b"GET / HTTP/1.1\r\nA b: c\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_request(&mut BytesMut::from(bad), 1024),
                    Err(HeadError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
