//! Owns writing a response as HTTP/1.1 (RFC 9112 §4, §6.1–§6.3, §7.1): the status line and
//! fields of an `http` response head, the framing its body gets, and the body's encoding
//! (`Content-Length` bytes or chunks). The rules are hyper's server's, which kaproxy served
//! every HTTP/1.1 response with before its own loop, so a client sees the same bytes from
//! either: the fields in the order given, a `date` when none came, `content-length` when the
//! body's size is known, else `transfer-encoding: chunked`, no body (and no length but a HEAD
//! response's) for HEAD, 1xx, 204 and 304, and `connection: close` on the last response.

use bytes::BytesMut;
use http::StatusCode;

use crate::http1::chunked::{chunk_start, CHUNK_END, LAST_CHUNK};
use crate::http1::date;
use crate::http1::head::{Line, Name};

/// What a response body says of its size before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySize {
    /// Already at its end.
    Empty,
    /// Exactly this many bytes.
    Exact(u64),
    /// Not known until it ends.
    Unknown,
}

/// How the body of a response whose head [`response_head`] wrote is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoder {
    /// At most this many more bytes (0: no body at all).
    Length(u64),
    /// Chunks, then the last chunk.
    Chunked,
}

impl Encoder {
    /// Whether no body byte may follow the head.
    pub fn is_done(&self) -> bool {
        *self == Encoder::Length(0)
    }

    /// Starts a data frame of `len` bytes: writes its chunk-size line (chunked) and returns
    /// how many of its bytes may go, fewer only past a `Content-Length`.
    pub fn start_frame(&mut self, len: usize, dst: &mut BytesMut) -> usize {
        match self {
            Encoder::Length(left) => {
                let n = (len as u64).min(*left);
                *left -= n;
                n as usize
            }
            Encoder::Chunked => {
                if len > 0 {
                    chunk_start(len, dst);
                }
                len
            }
        }
    }

    /// Ends a data frame of `len` bytes (a chunk's CRLF).
    pub fn end_frame(&self, len: usize, dst: &mut BytesMut) {
        if *self == Encoder::Chunked && len > 0 {
            dst.extend_from_slice(CHUNK_END);
        }
    }

    /// Ends the body: the last chunk. False when the body ended short of its
    /// `Content-Length`: the connection cannot be reused (hyper closes it too).
    pub fn finish(&self, dst: &mut BytesMut) -> bool {
        match self {
            Encoder::Length(left) => *left == 0,
            Encoder::Chunked => {
                dst.extend_from_slice(LAST_CHUNK);
                true
            }
        }
    }
}

/// Whether a response with `status` to a HEAD request (`head`) or not can carry a body
/// (RFC 9112 §6.3 point 1; hyper's `can_chunked` and `can_have_body`).
fn can_have_body(head: bool, status: StatusCode) -> bool {
    !(head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Whether kaproxy writes a `Content-Length` of its own (RFC 9110 §8.6: never on 1xx and 204;
/// hyper writes none on a 304 either, whose length would be another response's).
fn can_have_content_length(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// Whether a `Connection` value names `close` (a value that is not visible ASCII names
/// nothing, as for hyper).
fn names_close(value: &[u8]) -> bool {
    std::str::from_utf8(value)
        .is_ok_and(|v| v.is_ascii() && v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
}

/// Writes the head of a response with `fields` (written as they are: a line as received when
/// it came plain, else name and value) to a HEAD
/// request (`head`) or not into `dst`, for a body of `size`, and returns its body's encoder.
/// `keep_alive` false writes `connection: close` (unless a `Connection: close` is there
/// already); a `Connection: close` among `fields` turns it false.
pub fn response_head<'a>(
    status: StatusCode,
    fields: impl Iterator<Item = Line<'a>>,
    head: bool,
    size: BodySize,
    keep_alive: &mut bool,
    dst: &mut BytesMut,
) -> Encoder {
    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.extend_from_slice(b" ");
    dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    dst.extend_from_slice(b"\r\n");
    let body_allowed = can_have_body(head, status);
    let mut encoder = None;
    let mut wrote_close = false;
    let mut wrote_date = false;
    let mut wrote_length = false;
    for line in fields {
        let Line {
            known,
            name,
            value,
            raw,
        } = line;
        if known == Name::ContentLength {
            if (size == BodySize::Empty && !head) || wrote_length {
                // No body follows, and only a HEAD response's length describes another one:
                // left out (hyper did the same), a `content-length: 0` put after the fields
                // where one may stand. A repeated (equal) length goes once, as with hyper.
                continue;
            }
            wrote_length = true;
            if encoder.is_none() {
                encoder = Some(Encoder::Length(match size {
                    BodySize::Exact(n) => n,
                    // The field says, as hyper trusts it; a value that is not a length
                    // frames no body.
                    BodySize::Unknown => std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0),
                    BodySize::Empty => 0,
                }));
            }
        } else if known == Name::TransferEncoding {
            if !body_allowed {
                continue;
            }
            encoder.get_or_insert(Encoder::Chunked);
        } else if known == Name::Connection {
            if names_close(value) {
                *keep_alive = false;
                wrote_close = true;
            }
        } else if known == Name::Date {
            wrote_date = true;
        }
        match raw {
            Some(raw) => dst.extend_from_slice(raw),
            None => {
                dst.extend_from_slice(name);
                dst.extend_from_slice(b": ");
                dst.extend_from_slice(value);
                dst.extend_from_slice(b"\r\n");
            }
        }
    }
    // hyper's order: the connection's end, then the framing it adds, then the date.
    if !*keep_alive && !wrote_close {
        dst.extend_from_slice(b"connection: close\r\n");
    }
    let encoder = match encoder {
        Some(e) => e,
        None => match size {
            BodySize::Unknown if body_allowed => {
                dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Encoder::Chunked
            }
            BodySize::Unknown => Encoder::Length(0),
            BodySize::Empty | BodySize::Exact(0) => {
                if can_have_content_length(status) && !head {
                    dst.extend_from_slice(b"content-length: 0\r\n");
                }
                Encoder::Length(0)
            }
            BodySize::Exact(n) => {
                if can_have_content_length(status) {
                    dst.extend_from_slice(b"content-length: ");
                    dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    dst.extend_from_slice(b"\r\n");
                    Encoder::Length(n)
                } else {
                    Encoder::Length(0)
                }
            }
        },
    };
    let encoder = if body_allowed {
        encoder
    } else {
        Encoder::Length(0)
    };
    if !wrote_date {
        dst.extend_from_slice(b"date: ");
        date::extend(dst);
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    encoder
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(
        status: u16,
        fields: &[(&'static str, &'static str)],
        head: bool,
        size: BodySize,
        keep_alive: bool,
    ) -> (String, Encoder, bool) {
        let mut dst = BytesMut::new();
        let mut keep = keep_alive;
        let enc = response_head(
            StatusCode::from_u16(status).unwrap(),
            fields
                .iter()
                .map(|(n, v)| Line::new(n.as_bytes(), v.as_bytes())),
            head,
            size,
            &mut keep,
            &mut dst,
        );
        let text = String::from_utf8(dst.to_vec()).unwrap();
        // The date kaproxy writes changes: keep its name, drop its value.
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("date: ") && l.len() == 6 + 29 {
                    "date: X"
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        (text, enc, keep)
    }

    #[test]
    fn a_known_size_gets_a_content_length_and_a_date_last() {
        let (text, enc, keep) = head_of(200, &[("x-a", "1")], false, BodySize::Exact(5), true);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\nx-a: 1\ncontent-length: 5\ndate: X\n"
        );
        assert_eq!((enc, keep), (Encoder::Length(5), true));
    }

    #[test]
    fn an_unknown_size_is_chunked_and_a_given_length_is_kept_in_place() {
        let (text, enc, _) = head_of(200, &[], false, BodySize::Unknown, true);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\ntransfer-encoding: chunked\ndate: X\n"
        );
        assert_eq!(enc, Encoder::Chunked);
        let (text, enc, _) = head_of(
            200,
            &[("content-length", "7"), ("date", "D")],
            false,
            BodySize::Unknown,
            true,
        );
        assert_eq!(text, "HTTP/1.1 200 OK\ncontent-length: 7\ndate: D\n");
        assert_eq!(enc, Encoder::Length(7));
    }

    #[test]
    fn head_204_and_304_responses_have_no_body() {
        let (text, enc, _) = head_of(200, &[("content-length", "9")], true, BodySize::Empty, true);
        assert_eq!(text, "HTTP/1.1 200 OK\ncontent-length: 9\ndate: X\n");
        assert!(enc.is_done());
        let (text, enc, _) = head_of(204, &[], false, BodySize::Unknown, true);
        assert_eq!(text, "HTTP/1.1 204 No Content\ndate: X\n");
        assert!(enc.is_done());
        let (text, enc, _) = head_of(304, &[], false, BodySize::Empty, true);
        assert_eq!(text, "HTTP/1.1 304 Not Modified\ndate: X\n");
        assert!(enc.is_done());
        let (_, enc, _) = head_of(200, &[], true, BodySize::Exact(3), true);
        assert!(enc.is_done(), "HEAD: the length is told, no body follows");
    }

    #[test]
    fn a_length_with_no_body_after_it_goes_unless_it_answers_head() {
        let cl = [("content-length", "1234")];
        let (text, _, _) = head_of(304, &cl, false, BodySize::Empty, true);
        assert_eq!(text, "HTTP/1.1 304 Not Modified\ndate: X\n");
        let (text, _, _) = head_of(204, &cl, false, BodySize::Empty, true);
        assert_eq!(text, "HTTP/1.1 204 No Content\ndate: X\n");
        let (text, _, _) = head_of(200, &cl, true, BodySize::Empty, true);
        assert_eq!(text, "HTTP/1.1 200 OK\ncontent-length: 1234\ndate: X\n");
    }

    #[test]
    fn a_repeated_length_goes_once() {
        let cl = [("content-length", "2"), ("x", "y"), ("content-length", "2")];
        let (text, enc, _) = head_of(200, &cl, false, BodySize::Exact(2), true);
        assert_eq!(text, "HTTP/1.1 200 OK\ncontent-length: 2\nx: y\ndate: X\n");
        assert_eq!(enc, Encoder::Length(2));
    }

    #[test]
    fn the_last_response_says_connection_close_once() {
        let (text, _, keep) = head_of(200, &[], false, BodySize::Empty, false);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\nconnection: close\ncontent-length: 0\ndate: X\n"
        );
        assert!(!keep);
        let (text, _, keep) = head_of(
            400,
            &[("connection", "close")],
            false,
            BodySize::Empty,
            true,
        );
        assert_eq!(
            text,
            "HTTP/1.1 400 Bad Request\nconnection: close\ncontent-length: 0\ndate: X\n"
        );
        assert!(
            !keep,
            "a Connection: close of the response ends the connection"
        );
    }

    #[test]
    fn frames_are_chunked_or_cut_at_the_length() {
        let mut dst = BytesMut::new();
        let mut enc = Encoder::Chunked;
        assert_eq!(enc.start_frame(3, &mut dst), 3);
        dst.extend_from_slice(b"abc");
        enc.end_frame(3, &mut dst);
        assert!(enc.finish(&mut dst));
        assert_eq!(&dst[..], b"3\r\nabc\r\n0\r\n\r\n");
        let mut enc = Encoder::Length(4);
        assert_eq!(enc.start_frame(3, &mut dst), 3);
        assert!(!enc.finish(&mut dst), "one byte short");
        assert_eq!(enc.start_frame(3, &mut dst), 1, "cut at the length");
        assert!(enc.finish(&mut dst));
    }
}
