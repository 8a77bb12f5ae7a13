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

/// The field names the proxy reads in every head, told apart once when the head is parsed
/// (as nginx hashes a header's name once, to find its handler), so that what reads them later
/// compares a byte, not the name: the hop-by-hop fields of RFC 9110 §7.6.1 (and
/// `Proxy-Connection`), the framing fields of RFC 9112 §6, and the few a response filter reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    TransferEncoding,
    Upgrade,
    ContentLength,
    ContentType,
    Date,
    /// nginx's response field that turns its buffering off.
    XAccelBuffering,
    /// Any other name.
    Other,
}

impl Name {
    /// The name `name` is, in any case: by its length first, then one or two comparisons.
    pub fn of(name: &[u8]) -> Name {
        let is = |known: &[u8]| same_name(name, known);
        match name.len() {
            2 if is(b"te") => Name::Te,
            4 if is(b"date") => Name::Date,
            7 if is(b"trailer") => Name::Trailer,
            7 if is(b"upgrade") => Name::Upgrade,
            10 if is(b"connection") => Name::Connection,
            10 if is(b"keep-alive") => Name::KeepAlive,
            12 if is(b"content-type") => Name::ContentType,
            14 if is(b"content-length") => Name::ContentLength,
            16 if is(b"proxy-connection") => Name::ProxyConnection,
            17 if is(b"transfer-encoding") => Name::TransferEncoding,
            17 if is(b"x-accel-buffering") => Name::XAccelBuffering,
            _ => Name::Other,
        }
    }

    /// One of the hop-by-hop fields every message loses, named in `Connection` or not
    /// (RFC 9110 §7.6.1, with `Keep-Alive` and `Proxy-Connection`).
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Name::Connection
                | Name::KeepAlive
                | Name::ProxyConnection
                | Name::Te
                | Name::Trailer
                | Name::TransferEncoding
                | Name::Upgrade
        )
    }
}

/// Whether `name` is `known` (lower-case) in any case: a byte is compared with its letter
/// case bit set where `known` has a letter, as is, elsewhere — exact for any byte, and cheaper
/// than [`<[u8]>::eq_ignore_ascii_case`], which lowers both sides.
#[inline(always)]
fn same_name(name: &[u8], known: &[u8]) -> bool {
    name.len() == known.len()
        && name.iter().zip(known).all(|(&b, &k)| {
            if k.is_ascii_lowercase() {
                b | 0x20 == k
            } else {
                b == k
            }
        })
}

/// One field line: its name and value (without the surrounding whitespace), and which name
/// it is.
#[derive(Debug, Clone, Copy)]
struct Field {
    name: Span,
    value: Span,
    known: Name,
    /// The line is `name: value CRLF` exactly: it can be copied whole.
    plain: bool,
}

/// A field on its way out, for a head writer ([`crate::http1::encode::response_head`]):
/// which name it is, its name and value, and, when it came as `name: value CRLF` exactly, that
/// line (copied at once instead of piece by piece).
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    pub known: Name,
    pub name: &'a [u8],
    pub value: &'a [u8],
    pub raw: Option<&'a [u8]>,
}

impl<'a> Line<'a> {
    /// A field not read from a head (a header map's).
    pub fn new(name: &'a [u8], value: &'a [u8]) -> Line<'a> {
        Line {
            known: Name::of(name),
            name,
            value,
            raw: None,
        }
    }
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
            .map(|h| {
                let name = Span::of(base, h.name.as_bytes());
                let value = Span::of(base, h.value);
                let (end, start) = (name.end as usize, value.start as usize);
                let plain = start == end + 2
                    && base.get(end..start) == Some(b": ")
                    && base.get(value.end as usize..value.end as usize + 2) == Some(b"\r\n");
                Field {
                    name,
                    value,
                    known: Name::of(h.name.as_bytes()),
                    plain,
                }
            })
            .collect()
    }

    /// Every field as a [`Line`] to write, in the order received.
    pub fn lines(&self) -> impl Iterator<Item = Line<'_>> + '_ {
        self.fields.iter().map(|f| Line {
            known: f.known,
            name: f.name.get(&self.bytes),
            value: f.value.get(&self.bytes),
            raw: f
                .plain
                .then(|| &self.bytes[f.name.start as usize..f.value.end as usize + 2]),
        })
    }

    /// Every field as (which name, name, value), in the order received.
    pub fn entries(&self) -> impl Iterator<Item = (Name, &[u8], &[u8])> + '_ {
        self.fields
            .iter()
            .map(|f| (f.known, f.name.get(&self.bytes), f.value.get(&self.bytes)))
    }

    /// The values of every field named `name`, in order: a comparison of a byte per field.
    pub fn named(&self, name: Name) -> impl Iterator<Item = &[u8]> + Clone + '_ {
        debug_assert!(name != Name::Other, "Other names no one field");
        self.fields
            .iter()
            .filter(move |f| f.known == name)
            .map(|f| f.value.get(&self.bytes))
    }

    /// The `Transfer-Encoding` and `Content-Length` fields as (name, value), in order: what
    /// [`crate::http1::framing`] reads of a head. Filtered by name before a slice is made (not
    /// through [`Fields::entries`]): it runs on every head.
    pub fn framing(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone + '_ {
        self.fields
            .iter()
            .filter(|f| matches!(f.known, Name::TransferEncoding | Name::ContentLength))
            .map(|f| (f.name.get(&self.bytes), f.value.get(&self.bytes)))
    }

    /// Every field as (name, value), in the order received.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone + '_ {
        self.fields
            .iter()
            .map(|f| (f.name.get(&self.bytes), f.value.get(&self.bytes)))
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// `part` (a name or value of these fields) as bytes shared with the head's.
    pub fn shared(&self, part: &[u8]) -> Bytes {
        self.bytes.slice_ref(part)
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

    impl Fields {
        /// The values of every field named `name` (case-insensitive), in order.
        fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
            self.iter()
                .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v)
        }

        fn get<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
            self.get_all(name).next()
        }
    }

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
    fn field_names_are_told_apart_in_any_case_once() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nCONTENT-length: 2\r\nTransfer-Encoding: chunked\r\nTE: x\r\nDate: d\r\nKeep-Alive: timeout=5\r\nContent-Lengthy: 3\r\nconnection: close\r\nconnection: Upgrade\r\n\r\n"[..],
        );
        let head = parse_response(&mut buf, 1024).unwrap().unwrap();
        let known: Vec<Name> = head.fields.entries().map(|(k, _, _)| k).collect();
        use Name::*;
        assert_eq!(
            known,
            [
                ContentLength,
                TransferEncoding,
                Te,
                Date,
                KeepAlive,
                Other,
                Connection,
                Connection
            ]
        );
        let conn: Vec<&[u8]> = head.fields.named(Connection).collect();
        assert_eq!(conn, [&b"close"[..], b"Upgrade"]);
        let framing: Vec<&[u8]> = head.fields.framing().map(|(n, _)| n).collect();
        assert_eq!(framing, [&b"CONTENT-length"[..], b"Transfer-Encoding"]);
        for (name, hop) in [
            ("connection", true),
            ("Keep-Alive", true),
            ("proxy-connection", true),
            ("te", true),
            ("Trailer", true),
            ("transfer-encoding", true),
            ("UPGRADE", true),
            ("content-length", false),
            ("x-accel-buffering", false),
            ("tex", false),
            ("upgradex", false),
        ] {
            assert_eq!(Name::of(name.as_bytes()).is_hop_by_hop(), hop, "{name}");
        }
    }

    #[test]
    fn a_field_written_plainly_is_one_line_to_copy() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nA: 1\r\nB:2\r\nC:  3 \r\nD: \r\nE: 5\r\n\r\n"[..]);
        let head = parse_response(&mut buf, 1024).unwrap().unwrap();
        let raw: Vec<Option<&[u8]>> = head.fields.lines().map(|l| l.raw).collect();
        assert_eq!(
            raw,
            [
                Some(&b"A: 1\r\n"[..]),
                None,
                None,
                Some(b"D: \r\n"),
                Some(b"E: 5\r\n")
            ]
        );
        let values: Vec<&[u8]> = head.fields.lines().map(|l| l.value).collect();
        assert_eq!(values, [&b"1"[..], b"2", b"3", b"", b"5"]);
    }

    #[test]
    fn same_name_is_eq_ignore_ascii_case_for_every_byte() {
        for known in [&b"content-length"[..], b"te", b"x-accel-buffering"] {
            for at in 0..known.len() {
                for b in 0..=255u8 {
                    let mut name = known.to_vec();
                    name[at] = b;
                    assert_eq!(
                        same_name(&name, known),
                        name.eq_ignore_ascii_case(known),
                        "{name:?}"
                    );
                }
            }
        }
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
