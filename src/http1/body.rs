//! Owns where a message body is in its framing while it is read (RFC 9112 §6.3), without
//! I/O: the bytes of a `Content-Length` body still to come, a chunked body's decoder, a body
//! that ends when the connection does. Both connection loops take a body off their read
//! buffer with it: the upstream client a response's ([`crate::upstream::wire`]), the
//! downstream loop a request's (`src/downstream/h1.rs`).

use bytes::BytesMut;

use crate::http1::chunked::{Chunk, ChunkError, Decoder};
use crate::http1::framing::Framing;

/// Where a body is in its framing.
#[derive(Debug)]
pub enum BodyState {
    /// `Content-Length` bytes still to come.
    Length(u64),
    /// Boxed: most bodies have a length, and the state moves with its message.
    Chunked(Box<Decoder>),
    UntilClose,
    Done,
}

impl BodyState {
    pub fn new(framing: Framing) -> BodyState {
        match framing {
            Framing::Empty | Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(Box::default()),
            Framing::UntilClose => BodyState::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, BodyState::Done)
    }

    /// The bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            BodyState::Length(n) => Some(*n),
            BodyState::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next piece of the body off the front of `buf`: data, or its end (with a
    /// chunked body's trailer section, as received), then its end again on every call;
    /// `Ok(None)` when `buf` holds no more of it yet. What follows the body stays in `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, ChunkError> {
        match self {
            BodyState::Done => Ok(Some(Chunk::End { trailers: None })),
            BodyState::Length(_) | BodyState::UntilClose if buf.is_empty() => Ok(None),
            BodyState::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                let data = buf.split_to(n as usize).freeze();
                if *left == 0 {
                    *self = BodyState::Done;
                }
                Ok(Some(Chunk::Data(data)))
            }
            BodyState::UntilClose => Ok(Some(Chunk::Data(buf.split().freeze()))),
            BodyState::Chunked(decoder) => {
                let piece = decoder.decode(buf)?;
                if matches!(piece, Some(Chunk::End { .. })) {
                    *self = BodyState::Done;
                }
                Ok(piece)
            }
        }
    }

    /// The connection's stream ended here: true when that ends the body (one read until
    /// close), which is then done; false when the body is cut short.
    pub fn at_end_of_stream(&mut self) -> bool {
        match self {
            BodyState::UntilClose | BodyState::Done => {
                *self = BodyState::Done;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn data(piece: Option<Chunk>) -> Bytes {
        match piece {
            Some(Chunk::Data(d)) => d,
            other => panic!("not data: {other:?}"),
        }
    }

    #[test]
    fn a_length_takes_its_bytes_and_leaves_what_follows() {
        let mut state = BodyState::new(Framing::Length(5));
        let mut buf = BytesMut::from(&b"ab"[..]);
        assert_eq!(data(state.decode(&mut buf).unwrap()), "ab");
        assert_eq!(state.decode(&mut buf).unwrap(), None, "more to come");
        assert_eq!(state.remaining(), Some(3));
        buf.extend_from_slice(b"cdeGET");
        assert_eq!(data(state.decode(&mut buf).unwrap()), "cde");
        assert!(state.is_done());
        assert_eq!(
            state.decode(&mut buf).unwrap(),
            Some(Chunk::End { trailers: None })
        );
        assert_eq!(&buf[..], b"GET");
        assert!(!BodyState::new(Framing::Length(1)).at_end_of_stream());
    }

    #[test]
    fn a_chunked_body_ends_with_its_last_chunk() {
        let mut state = BodyState::new(Framing::Chunked);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\nnext"[..]);
        assert_eq!(data(state.decode(&mut buf).unwrap()), "abc");
        assert_eq!(
            state.decode(&mut buf).unwrap(),
            Some(Chunk::End { trailers: None })
        );
        assert!(state.is_done());
        assert_eq!(&buf[..], b"next");
        let mut bad = BodyState::new(Framing::Chunked);
        assert!(bad.decode(&mut BytesMut::from(&b"x\r\n"[..])).is_err());
    }

    #[test]
    fn a_body_until_close_ends_with_the_stream() {
        let mut state = BodyState::new(Framing::UntilClose);
        let mut buf = BytesMut::from(&b"all"[..]);
        assert_eq!(data(state.decode(&mut buf).unwrap()), "all");
        assert_eq!(state.decode(&mut buf).unwrap(), None);
        assert!(state.at_end_of_stream());
        assert!(state.is_done());
    }
}
