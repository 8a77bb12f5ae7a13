//! Owns the chunked transfer coding (RFC 9112 §7.1): an incremental decoder that takes chunks
//! off a read buffer as they arrive, and the encoder's few bytes. The decoder's rules and
//! limits are hyper's (`proto/h1/decode.rs`), so that what kaproxy accepted before it had a
//! codec of its own it accepts still, with one exception: a bare LF inside a trailer line is
//! refused here, where hyper reads on to the next CR.

use std::fmt::Write;

use bytes::{Buf, Bytes, BytesMut};

/// Chunk extensions (`;name=value`, which kaproxy does not forward) are bounded over a
/// whole body: 16 KiB, as hyper's `CHUNKED_EXTENSIONS_LIMIT`.
pub const EXTENSIONS_LIMIT: usize = 16 * 1024;

/// A trailer section is bounded: 16 KiB and [`crate::http1::head::MAX_FIELDS`] lines, as
/// hyper's `TRAILER_LIMIT` and its field count.
pub const TRAILERS_LIMIT: usize = 16 * 1024;

/// Why a chunked body is refused (400 from a client, 502 from a backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk size that is not hex digits (`x5`, `-5`, an empty size).
    #[error("invalid chunk size line")]
    Size,
    /// A size over 2^64 - 1.
    #[error("chunk size overflows")]
    Overflow,
    /// A CR not followed by LF, or a bare LF, where a chunk line or a chunk's data ends.
    #[error("a chunk line or chunk data not ended by CRLF")]
    LineEnd,
    /// A bare LF inside a trailer line: refused here, where hyper reads on to the next CR
    /// (RFC 9112 §2.2 lets a recipient take a bare LF as a line end; either reading would let
    /// two parsers disagree on where the section ends, so neither is taken).
    #[error("a bare LF in a trailer line")]
    TrailerBareLf,
    /// More than [`EXTENSIONS_LIMIT`] bytes of extensions.
    #[error("chunk extensions over {EXTENSIONS_LIMIT} bytes")]
    Extensions,
    /// More than [`TRAILERS_LIMIT`] bytes or too many fields in the trailer section.
    #[error("trailer section over its limit")]
    TrailersTooLarge,
    /// A trailer line that is not a field (`name: value`).
    #[error("malformed trailer field")]
    Trailer,
}

/// What the decoder took off the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Body bytes (part of a chunk's data, or all of it).
    Data(Bytes),
    /// The last chunk and its trailer section, if it had fields (as received, each line
    /// with its CRLF, without the final empty line).
    End { trailers: Option<Bytes> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first hex digit of a chunk size.
    Start,
    /// More hex digits, whitespace, `;` or CR.
    Size,
    /// Whitespace after the size: more of it, `;` or CR.
    SizeLws,
    /// Inside the extensions, until CR.
    Extension,
    /// The LF after a size line's CR.
    SizeLf,
    /// Data, `remaining` bytes of this chunk left.
    Data,
    /// The CR after a chunk's data.
    DataCr,
    /// The LF after a chunk's data.
    DataLf,
    /// The start of a trailer line, or the final CR.
    EndCr,
    /// The final LF.
    EndLf,
    /// Inside a trailer line, until its CR.
    Trailer,
    /// The LF after a trailer line.
    TrailerLf,
    /// The body has ended.
    Done,
}

/// Decodes one chunked body, incrementally: feed it the connection's read buffer each time
/// more bytes arrive; it takes off what it decodes and leaves what follows the body.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// The size of the chunk being read; then its data still to come.
    remaining: u64,
    extensions: usize,
    trailers: Option<BytesMut>,
    trailer_lines: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            state: State::Start,
            remaining: 0,
            extensions: 0,
            trailers: None,
            trailer_lines: 0,
        }
    }

    /// True once the last chunk and its trailers have been taken.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes the next piece of the body off the front of `buf`: `Ok(None)` when `buf` holds
    /// no more of it yet (read more; at end of stream that is a truncated body). After
    /// [`Chunk::End`], `buf` starts with whatever follows the body.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, ChunkError> {
        loop {
            if self.state == State::Done {
                return Ok(None);
            }
            if self.state == State::Data {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Some(Chunk::Data(buf.split_to(n).freeze())));
            }
            let Some(&byte) = buf.first() else {
                return Ok(None);
            };
            buf.advance(1);
            if let Some(end) = self.step(byte)? {
                return Ok(Some(end));
            }
        }
    }

    /// One byte of a size line, the CRLF after data, or the trailer section.
    fn step(&mut self, byte: u8) -> Result<Option<Chunk>, ChunkError> {
        use State::*;
        self.state = match (self.state, byte) {
            (Start, _) => {
                self.add_digit(byte, ChunkError::Size)?;
                Size
            }
            (Size, b'\t' | b' ') => SizeLws,
            (Size | SizeLws, b';') => Extension,
            (Size | SizeLws | Extension, b'\r') => SizeLf,
            (Size | SizeLws, b'\n') => return Err(ChunkError::LineEnd),
            (Size, _) => {
                self.add_digit(byte, ChunkError::Size)?;
                Size
            }
            (SizeLws, b'\t' | b' ') => SizeLws,
            (SizeLws, _) => return Err(ChunkError::Size),
            (Extension, b'\n') => return Err(ChunkError::LineEnd),
            (Extension, _) => {
                self.extensions += 1;
                if self.extensions >= EXTENSIONS_LIMIT {
                    return Err(ChunkError::Extensions);
                }
                Extension
            }
            (SizeLf, b'\n') if self.remaining == 0 => EndCr,
            (SizeLf, b'\n') => Data,
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Start,
            (SizeLf | DataCr | DataLf, _) => return Err(ChunkError::LineEnd),
            (EndCr, b'\r') => EndLf,
            (EndCr, _) => {
                self.push_trailer(byte)?;
                Trailer
            }
            (EndLf, b'\n') => {
                self.state = Done;
                let trailers = self.trailers.take().map(BytesMut::freeze);
                if let Some(t) = &trailers {
                    check_trailers(t)?;
                }
                return Ok(Some(Chunk::End { trailers }));
            }
            (EndLf, _) => return Err(ChunkError::LineEnd),
            (Trailer, b'\n') => return Err(ChunkError::TrailerBareLf),
            (Trailer, b'\r') => {
                self.push_trailer(byte)?;
                TrailerLf
            }
            (Trailer, _) => {
                self.push_trailer(byte)?;
                Trailer
            }
            (TrailerLf, b'\n') => {
                self.trailer_lines += 1;
                if self.trailer_lines > crate::http1::head::MAX_FIELDS {
                    return Err(ChunkError::TrailersTooLarge);
                }
                self.push_trailer(byte)?;
                EndCr
            }
            (TrailerLf, _) => return Err(ChunkError::LineEnd),
            (Data | Done, _) => unreachable!("handled by decode"),
        };
        Ok(None)
    }

    fn add_digit(&mut self, byte: u8, not_hex: ChunkError) -> Result<(), ChunkError> {
        let digit = char::from(byte).to_digit(16).ok_or(not_hex)?;
        self.remaining = self
            .remaining
            .checked_mul(16)
            .and_then(|n| n.checked_add(u64::from(digit)))
            .ok_or(ChunkError::Overflow)?;
        Ok(())
    }

    fn push_trailer(&mut self, byte: u8) -> Result<(), ChunkError> {
        let trailers = self
            .trailers
            .get_or_insert_with(|| BytesMut::with_capacity(64));
        trailers.extend_from_slice(&[byte]);
        if trailers.len() >= TRAILERS_LIMIT {
            return Err(ChunkError::TrailersTooLarge);
        }
        Ok(())
    }
}

/// Every trailer line must be a field, as httparse reads header fields.
fn check_trailers(trailers: &[u8]) -> Result<(), ChunkError> {
    let mut fields = [httparse::EMPTY_HEADER; crate::http1::head::MAX_FIELDS];
    let mut section = Vec::with_capacity(trailers.len() + 2);
    section.extend_from_slice(trailers);
    section.extend_from_slice(b"\r\n");
    match httparse::parse_headers(&section, &mut fields) {
        Ok(httparse::Status::Complete((n, _))) if n == section.len() => Ok(()),
        _ => Err(ChunkError::Trailer),
    }
}

/// The line that starts a chunk of `len` bytes (`len` must not be 0: that is [`LAST_CHUNK`]),
/// its size in upper-case hex as hyper writes it.
pub fn chunk_start(len: usize, out: &mut BytesMut) {
    debug_assert!(len > 0);
    // Writing to a BytesMut cannot fail.
    let _ = write!(out, "{len:X}\r\n");
}

/// What ends a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";

/// The last chunk of a body without trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` whole: the body, the trailers, and what was left after it; or the
    /// error; `Ok(None)` when it is truncated.
    /// A whole body: its bytes, its trailers, and what followed it.
    type Decoded = (Vec<u8>, Option<Bytes>, Vec<u8>);

    fn decode_all(input: &[u8]) -> Result<Option<Decoded>, ChunkError> {
        let mut buf = BytesMut::from(input);
        let mut d = Decoder::new();
        let mut body = Vec::new();
        loop {
            match d.decode(&mut buf)? {
                Some(Chunk::Data(b)) => body.extend_from_slice(&b),
                Some(Chunk::End { trailers }) => return Ok(Some((body, trailers, buf.to_vec()))),
                None => return Ok(None),
            }
        }
    }

    fn body(input: &[u8]) -> Result<Option<Vec<u8>>, ChunkError> {
        decode_all(input).map(|r| r.map(|(b, _, _)| b))
    }

    #[test]
    fn well_formed_bodies_decode() {
        let rows: &[(&[u8], &[u8])] = &[
            (b"0\r\n\r\n", b""),
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
            (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (b"005\r\nhello\r\n000\r\n\r\n", b"hello"),
            (b"5;name=value\r\nhello\r\n0;x\r\n\r\n", b"hello"),
            (b"5 ;x\r\nhello\r\n0\t\r\n\r\n", b"hello"),
            (b"4\r\n\r\n\r\n\r\n0\r\n\r\n", b"\r\n\r\n"),
        ];
        for (input, want) in rows {
            assert_eq!(
                body(input),
                Ok(Some(want.to_vec())),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        use ChunkError::*;
        let long_ext = [
            b"5;".as_slice(),
            &[b'x'; EXTENSIONS_LIMIT],
            b"\r\nhello\r\n0\r\n\r\n",
        ]
        .concat();
        let rows: &[(&[u8], ChunkError)] = &[
            (b"x5\r\nhello\r\n0\r\n\r\n", Size),
            (b"-5\r\nhello\r\n0\r\n\r\n", Size),
            (b"\r\nhello\r\n0\r\n\r\n", Size),
            (b"5 5\r\nhello\r\n0\r\n\r\n", Size),
            (b"ffffffffffffffffff\r\n", Overflow),
            (b"5\nhello\n0\n\n", LineEnd),
            (b"5\r\nhello\n0\r\n\r\n", LineEnd),
            (b"5\r\nhelloX\r\n0\r\n\r\n", LineEnd),
            (b"5\rhello\r\n", LineEnd),
            (b"5;a\nb\r\nhello\r\n0\r\n\r\n", LineEnd),
            (b"0\r\n\r\r", LineEnd),
            (b"0\r\nName: v\nx\r\n\r\n", TrailerBareLf),
            (b"0\r\nName: v\rx", LineEnd),
            (b"0\r\nno colon\r\n\r\n", Trailer),
            (&long_ext, Extensions),
        ];
        for (input, want) in rows {
            assert_eq!(
                body(input),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn trailers_and_what_follows_the_body_are_kept() {
        let input = b"3\r\nabc\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let (decoded, trailers, rest) = decode_all(input).unwrap().unwrap();
        assert_eq!(decoded, b"abc");
        assert_eq!(
            trailers.as_deref(),
            Some(&b"Expires: never\r\nX-Sum: 1\r\n"[..])
        );
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let many: Vec<u8> = [b"0\r\n".as_slice()]
            .into_iter()
            .chain(std::iter::repeat_n(b"a: b\r\n".as_slice(), 101))
            .chain([b"\r\n".as_slice()])
            .collect::<Vec<_>>()
            .concat();
        assert_eq!(body(&many), Err(ChunkError::TrailersTooLarge));
    }

    #[test]
    fn a_body_split_anywhere_decodes_the_same() {
        let input = b"5;e=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nT: v\r\n\r\nNEXT";
        let whole = decode_all(input).unwrap().unwrap();
        for split in 0..input.len() {
            let mut d = Decoder::new();
            let mut buf = BytesMut::from(&input[..split]);
            let mut body = Vec::new();
            let mut trailers = None;
            let mut fed_rest = false;
            while !d.is_done() {
                match d.decode(&mut buf).unwrap() {
                    Some(Chunk::Data(b)) => body.extend_from_slice(&b),
                    Some(Chunk::End { trailers: t }) => trailers = t,
                    None => {
                        assert!(!fed_rest, "split {split}: stuck with the whole input");
                        buf.extend_from_slice(&input[split..]);
                        fed_rest = true;
                    }
                }
            }
            if !fed_rest {
                buf.extend_from_slice(&input[split..]);
            }
            assert_eq!((body, trailers, buf.to_vec()), whole, "split at {split}");
        }
    }

    #[test]
    fn truncated_bodies_ask_for_more() {
        for input in [
            &b""[..],
            b"5",
            b"5\r\nhel",
            b"5\r\nhello\r\n",
            b"0\r\n",
            b"0\r\nT: v\r\n",
        ] {
            assert_eq!(
                body(input),
                Ok(None),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn encoded_chunks_decode_to_the_same_bytes() {
        let mut out = BytesMut::new();
        for piece in [&b"hello"[..], &[7u8; 300], b"\r\n0\r\n"] {
            chunk_start(piece.len(), &mut out);
            out.extend_from_slice(piece);
            out.extend_from_slice(CHUNK_END);
        }
        out.extend_from_slice(LAST_CHUNK);
        let want = [&b"hello"[..], &[7u8; 300], b"\r\n0\r\n"].concat();
        assert_eq!(body(&out), Ok(Some(want)));
    }
}
