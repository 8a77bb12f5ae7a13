//! Differential: where a request body ends, by kaproxy's HTTP/1.1 codec (`kaproxy::http1`)
//! and by hyper's server (the codec kaproxy served with first), on the same bytes: a request
//! head with fuzzed `Content-Length` / `Transfer-Encoding` fields, then fuzzed body bytes.
//! Both must accept or refuse the framing alike and, when both accept, read the same body;
//! the only differences allowed are the ones `kaproxy::http1` documents as stricter (a
//! request with both fields, `chunked` named twice, a bare LF inside a trailer line).
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use kaproxy::http1::chunked::{Chunk, ChunkError, Decoder};
use kaproxy::http1::framing::{self, Framing, FramingError};
use kaproxy::http1::head::parse_request;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

#[derive(Arbitrary, Debug)]
enum Name {
    ContentLength,
    TransferEncoding,
}

#[derive(Arbitrary, Debug)]
struct Input {
    fields: Vec<(Name, Vec<u8>)>,
    /// When true, the body is a well-formed chunked encoding of `body` (to reach deep into
    /// the decoder), else `body` itself.
    encode: bool,
    body: Vec<u8>,
}

/// What one side made of the request: refused before a body (`None`), or the body read whole
/// (`Ok`) or refused part way (`Err`).
type Outcome = Option<Result<Vec<u8>, ()>>;

fn request_bytes(input: &Input) -> Vec<u8> {
    let mut out = b"POST / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for (name, value) in input.fields.iter().take(4) {
        out.extend_from_slice(match name {
            Name::ContentLength => b"Content-Length: ",
            Name::TransferEncoding => b"Transfer-Encoding: ",
        });
        // Visible ASCII and spaces only, so that both read the same head.
        out.extend(value.iter().take(24).map(|&b| match b {
            b' ' | b'!'..=b'~' => b,
            _ => b' ',
        }));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if input.encode {
        for piece in input.body.chunks(7) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        out.extend_from_slice(&input.body);
    }
    out
}

/// kaproxy's codec: the framing decision, then the body from what follows the head.
fn ours(bytes: &[u8]) -> (Outcome, Option<FramingError>, Option<ChunkError>) {
    let mut buf = BytesMut::from(bytes);
    let head = parse_request(&mut buf, 64 * 1024)
        .expect("the fuzzer writes valid heads")
        .expect("and complete ones");
    let framing = match framing::request(head.version, head.fields.iter().collect::<Vec<_>>()) {
        Ok(f) => f,
        Err(e) => return (None, Some(e), None),
    };
    let body = match framing {
        Framing::Empty => Ok(Vec::new()),
        Framing::Length(n) if (buf.len() as u64) >= n => Ok(buf[..n as usize].to_vec()),
        Framing::Length(_) | Framing::UntilClose => Err(None),
        Framing::Chunked => {
            let mut d = Decoder::new();
            let mut body = Vec::new();
            loop {
                match d.decode(&mut buf) {
                    Ok(Some(Chunk::Data(b))) => body.extend_from_slice(&b),
                    Ok(Some(Chunk::End { .. })) => break Ok(body),
                    Ok(None) => break Err(None),
                    Err(e) => break Err(Some(e)),
                }
            }
        }
    };
    match body {
        Ok(b) => (Some(Ok(b)), None, None),
        Err(e) => (Some(Err(())), None, e),
    }
}

/// hyper's server on an in-memory connection fed `bytes`, then end of stream.
fn hypers(bytes: &[u8]) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen: Arc<Mutex<Outcome>> = Arc::default();
    let record = seen.clone();
    let bytes = bytes.to_vec();
    rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let record = record.clone();
            async move {
                let body = req.into_body().collect().await.map(|c| c.to_bytes().to_vec());
                let mut seen = record.lock().unwrap();
                if seen.is_none() {
                    *seen = Some(body.map_err(|_| ()));
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new()))
            }
        });
        // half_close: the end of the input is the client done sending, not gone.
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
        drop(client);
    });
    let outcome = seen.lock().unwrap().take();
    outcome
}

fn chunked_twice(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    text.matches("chunked").count() > 1
}

fuzz_target!(|input: Input| {
    let bytes = request_bytes(&input);
    let (mine, framing_error, chunk_error) = ours(&bytes);
    let theirs = hypers(&bytes);
    match (&mine, &theirs) {
        (a, b) if a == b => {}
        // Stricter here by design (kaproxy::http1::framing).
        (None, Some(_))
            if matches!(
                framing_error,
                Some(FramingError::LengthAndTransferEncoding)
            ) || (framing_error == Some(FramingError::NotChunked) && chunked_twice(&bytes)) => {}
        (Some(Err(())), Some(Ok(_))) if chunk_error == Some(ChunkError::TrailerBareLf) => {}
        _ => panic!(
            "kaproxy {mine:?} ({framing_error:?}, {chunk_error:?}) vs hyper {theirs:?} on {:?}",
            String::from_utf8_lossy(&bytes)
        ),
    }
});
