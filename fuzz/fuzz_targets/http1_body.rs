//! Differential: where a request body ends, by kaproxy's HTTP/1.1 codec (`kaproxy::http1`)
//! and by hyper's server (the codec kaproxy served with first), on the same bytes: a request
//! head with fuzzed `Content-Length` / `Transfer-Encoding` fields, then fuzzed body bytes.
//! Both must accept or refuse the framing alike and, when both accept, read the same body;
//! the only differences allowed are the ones `kaproxy::http1` documents as stricter (a
//! request with both fields, `chunked` named twice, a bare LF inside a trailer line).
#![no_main]

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use kaproxy::http1::chunked::ChunkError;
use kaproxy::http1::framing::{self, FramingError};
use kaproxy::http1::head::parse_request;
use libfuzzer_sys::fuzz_target;

#[path = "shared/http1_message.rs"]
mod message;
use message::{read_body, serve_with_hyper, Message, Outcome};

fn request_bytes(message: &Message) -> Vec<u8> {
    let mut out = b"POST / HTTP/1.1\r\nHost: a\r\n".to_vec();
    message.write(&mut out);
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
    match read_body(framing, &mut buf) {
        Ok(b) => (Some(Ok(b)), None, None),
        Err(e) => (Some(Err(())), None, e),
    }
}

/// hyper's server on an in-memory connection fed `bytes`, then end of stream.
fn hypers(bytes: &[u8]) -> Outcome {
    let seen: Arc<Mutex<Outcome>> = Arc::default();
    let record = seen.clone();
    let bytes = bytes.to_vec();
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes().to_vec());
            let mut seen = record.lock().unwrap();
            if seen.is_none() {
                *seen = Some(body.map_err(|_| ()));
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Empty::<Bytes>::new(),
            ))
        }
    });
    serve_with_hyper(bytes, service);
    let outcome = seen.lock().unwrap().take();
    outcome
}

fn chunked_twice(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    text.matches("chunked").count() > 1
}

fuzz_target!(|message: Message| {
    let bytes = request_bytes(&message);
    let (mine, framing_error, chunk_error) = ours(&bytes);
    let theirs = hypers(&bytes);
    match (&mine, &theirs) {
        (a, b) if a == b => {}
        // Stricter here by design (kaproxy::http1::framing).
        (None, Some(_))
            if matches!(framing_error, Some(FramingError::LengthAndTransferEncoding))
                || (framing_error == Some(FramingError::NotChunked) && chunked_twice(&bytes)) => {}
        (Some(Err(())), Some(Ok(_))) if chunk_error == Some(ChunkError::TrailerBareLf) => {}
        _ => panic!(
            "kaproxy {mine:?} ({framing_error:?}, {chunk_error:?}) vs hyper {theirs:?} on {:?}",
            String::from_utf8_lossy(&bytes)
        ),
    }
});
