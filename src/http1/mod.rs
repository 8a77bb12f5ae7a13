//! Owns kaproxy's own HTTP/1.1 codec (RFC 9112), without I/O: message heads parsed with
//! httparse from a buffer and kept as that buffer's bytes ([`head`]), the rules that say where
//! a message body ends ([`framing`]), the chunked transfer coding ([`chunked`]), and a response
//! written out ([`encode`], with its [`date`]). The connection loops that read and write the
//! sockets are its callers; nothing here builds a header map on the way through. Imports
//! nothing of ours.
//!
//! Its decisions are hyper's (the codec kaproxy served with first), checked by the
//! `chunked` fuzz target against hyper's own decoder, with the exceptions each rule names.

pub mod body;
pub mod buffers;
pub mod chunked;
pub mod date;
pub mod encode;
pub mod framing;
pub mod head;
