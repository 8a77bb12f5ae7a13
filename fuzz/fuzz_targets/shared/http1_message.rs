//! What the HTTP/1.1 differential targets (`http1_body`, `http1_response`, `http1_request`)
//! share: the fuzzed framing fields and body they write after a start line, how kaproxy's
//! codec reads a request body back (`http1_response` reads through kaproxy's upstream client
//! instead), hyper's server on the same bytes, and the runtime each input runs on.

use arbitrary::Arbitrary;
use bytes::BytesMut;
use kaproxy::http1::chunked::{self, Chunk, ChunkError, Decoder};
use kaproxy::http1::framing::Framing;
use tokio::io::AsyncWriteExt;

#[derive(Arbitrary, Debug)]
pub enum Name {
    ContentLength,
    TransferEncoding,
}

/// The fuzzed part of a message: framing fields, then a body.
#[derive(Arbitrary, Debug)]
pub struct Message {
    pub fields: Vec<(Name, Vec<u8>)>,
    /// When true, the body is a well-formed chunked encoding of `body` (to reach deep into
    /// the decoder), else `body` itself.
    pub encode: bool,
    pub body: Vec<u8>,
}

/// Refused before a body (`None`), or the body read whole (`Ok`) or refused part way (`Err`).
pub type Outcome = Option<Result<Vec<u8>, ()>>;

impl Message {
    /// Appends the fields (at most 4, visible ASCII and spaces only, so that both sides read
    /// the same head), the empty line and the body to `out`, which holds a start line.
    pub fn write(&self, out: &mut Vec<u8>) {
        for (name, value) in self.fields.iter().take(4) {
            out.extend_from_slice(match name {
                Name::ContentLength => b"Content-Length: ",
                Name::TransferEncoding => b"Transfer-Encoding: ",
            });
            out.extend(value.iter().take(24).map(|&b| match b {
                b' ' | b'!'..=b'~' => b,
                _ => b' ',
            }));
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !self.encode {
            out.extend_from_slice(&self.body);
            return;
        }
        let mut encoded = BytesMut::new();
        for piece in self.body.chunks(7) {
            chunked::chunk_start(piece.len(), &mut encoded);
            encoded.extend_from_slice(piece);
            encoded.extend_from_slice(chunked::CHUNK_END);
        }
        encoded.extend_from_slice(chunked::LAST_CHUNK);
        out.extend_from_slice(&encoded);
    }
}

/// The body kaproxy's codec reads from `buf` (what follows the head) as `framing` says, the
/// connection closing after it: `Err(None)` when it is truncated.
#[allow(dead_code)] // http1_body's only
pub fn read_body(framing: Framing, buf: &mut BytesMut) -> Result<Vec<u8>, Option<ChunkError>> {
    match framing {
        Framing::Empty => Ok(Vec::new()),
        Framing::Length(n) if (buf.len() as u64) >= n => Ok(buf[..n as usize].to_vec()),
        Framing::Length(_) => Err(None),
        Framing::UntilClose => Ok(buf.to_vec()),
        Framing::Chunked => {
            let mut d = Decoder::new();
            let mut body = Vec::new();
            loop {
                match d.decode(buf) {
                    Ok(Some(Chunk::Data(b))) => body.extend_from_slice(&b),
                    Ok(Some(Chunk::End { .. })) => return Ok(body),
                    Ok(None) => return Err(None),
                    Err(e) => return Err(Some(e)),
                }
            }
        }
    }
}

/// Runs `future` to its end on a current-thread runtime of its own (I/O and timers on): each
/// input gets a fresh one, so nothing of one run reaches the next.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// hyper's HTTP/1 server on an in-memory connection fed `bytes`, then end of stream,
/// answering with `service`, for at most 5 s.
#[allow(dead_code)] // not http1_response's
pub fn serve_with_hyper<S>(bytes: Vec<u8>, service: S)
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&bytes).await.unwrap();
        client.shutdown().await.unwrap();
        // half_close: the end of the input is the client done sending, not gone.
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
        drop(client);
    });
}
