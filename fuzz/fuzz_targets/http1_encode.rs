//! Differential: a response head and body written by kaproxy's HTTP/1.1 encoder
//! (`kaproxy::http1::encode`, what the own loop writes) against hyper's server writing the
//! same response to the same request (GET or HEAD, keep-alive or `Connection: close`): the
//! same bytes, but for the `date` kaproxy or hyper adds (its value is the time), and a HEAD
//! response with a repeated length, which hyper refuses and kaproxy writes with one.
#![no_main]

use std::convert::Infallible;

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Either, Empty, Full, StreamBody};
use kaproxy::http1::encode::{response_head, BodySize};
use kaproxy::http1::head::Line;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "shared/http1_message.rs"]
#[allow(dead_code)] // only its runtime is used here
mod message;
use message::block_on;

/// Fields a proxied response carries (hop-by-hop ones never reach the encoder but kaproxy's
/// own `connection: close`).
#[derive(Arbitrary, Debug)]
enum Field {
    Server,
    ContentType,
    SetCookie,
    Date,
    KeepAlive,
    ConnectionClose,
    /// A `content-length` equal to the body's length (the framing kaproxy read says so).
    ContentLength,
    Other(u8),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Empty,
    /// Known length.
    Exact(Vec<u8>),
    /// Chunks, length unknown until the end.
    Chunks(Vec<Vec<u8>>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    status: u16,
    head_request: bool,
    client_close: bool,
    fields: Vec<(Field, u8)>,
    body: Body,
}

impl Input {
    fn status(&self) -> StatusCode {
        StatusCode::from_u16(200 + self.status % 400).unwrap()
    }

    fn headers(&self) -> HeaderMap {
        let length = match &self.body {
            Body::Empty => 0,
            Body::Exact(b) => b.len(),
            Body::Chunks(c) => c.iter().take(6).map(Vec::len).sum(),
        };
        let mut headers = HeaderMap::new();
        for (field, v) in self.fields.iter().take(8) {
            let (name, value) = match field {
                Field::Server => ("server", format!("s{v}")),
                Field::ContentType => ("content-type", "text/plain".to_string()),
                Field::SetCookie => ("set-cookie", format!("c={v}")),
                Field::Date => ("date", "Sun, 06 Nov 1994 08:49:37 GMT".to_string()),
                Field::KeepAlive => ("keep-alive", format!("timeout={v}")),
                Field::ConnectionClose => ("connection", "close".to_string()),
                Field::ContentLength => ("content-length", length.to_string()),
                Field::Other(n) => {
                    headers.append(
                        HeaderName::from_bytes(format!("x-{n}").as_bytes()).unwrap(),
                        HeaderValue::from_str(&format!("{v}")).unwrap(),
                    );
                    continue;
                }
            };
            // One `connection`, as kaproxy gives it (hyper joins repeated values); repeated
            // (equal) lengths come from backends.
            if name == "connection" && headers.contains_key(name) {
                continue;
            }
            headers.append(name, HeaderValue::from_str(&value).unwrap());
        }
        headers
    }

    fn chunks(&self) -> Vec<Bytes> {
        match &self.body {
            Body::Empty => Vec::new(),
            Body::Exact(b) => vec![Bytes::copy_from_slice(b)],
            Body::Chunks(c) => c
                .iter()
                .take(6)
                .map(|c| Bytes::copy_from_slice(c))
                .collect(),
        }
    }
}

/// kaproxy's encoder: head, then each frame, then the end.
fn ours(input: &Input) -> Vec<u8> {
    let headers = input.headers();
    let chunks = input.chunks();
    // As the own loop asks the body: at its end already (an empty whole body is), its exact
    // size, or unknown.
    let size = match &input.body {
        Body::Empty => BodySize::Empty,
        Body::Exact(b) if b.is_empty() => BodySize::Empty,
        Body::Exact(b) => BodySize::Exact(b.len() as u64),
        Body::Chunks(_) => BodySize::Unknown,
    };
    let mut keep_alive = !input.client_close;
    let mut out = BytesMut::new();
    let fields = headers
        .iter()
        .map(|(n, v)| Line::new(n.as_str().as_bytes(), v.as_bytes()));
    let mut enc = response_head(
        input.status(),
        fields,
        input.head_request,
        size,
        &mut keep_alive,
        &mut out,
    );
    if !enc.is_done() {
        for c in &chunks {
            let n = enc.start_frame(c.len(), &mut out);
            out.extend_from_slice(&c[..n]);
            enc.end_frame(n, &mut out);
        }
        enc.finish(&mut out);
    }
    out.to_vec()
}

/// hyper's server answering one request with the same response.
fn hypers(input: &Input) -> Vec<u8> {
    let status = input.status();
    let headers = input.headers();
    let chunks = input.chunks();
    let (empty, exact) = (
        matches!(input.body, Body::Empty),
        matches!(input.body, Body::Exact(_)),
    );
    let mut request = format!(
        "{} / HTTP/1.1\r\nHost: a\r\n",
        if input.head_request { "HEAD" } else { "GET" }
    );
    if input.client_close {
        request.push_str("Connection: close\r\n");
    }
    request.push_str("\r\n");
    block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(request.as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        let service = hyper::service::service_fn(move |_req| {
            let (headers, chunks) = (headers.clone(), chunks.clone());
            async move {
                type Frames = std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>;
                let body: Either<
                    Either<Empty<Bytes>, Full<Bytes>>,
                    StreamBody<futures_util::stream::Iter<Frames>>,
                > = if empty {
                    Either::Left(Either::Left(Empty::new()))
                } else if exact {
                    Either::Left(Either::Right(Full::new(chunks[0].clone())))
                } else {
                    let frames: Vec<_> = chunks
                        .into_iter()
                        .map(|c| Ok(http_body::Frame::data(c)))
                        .collect();
                    Either::Right(StreamBody::new(futures_util::stream::iter(frames)))
                };
                let mut resp = http::Response::new(body.boxed());
                *resp.status_mut() = status;
                *resp.headers_mut() = headers;
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let read = async {
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::join!(
            tokio::time::timeout(std::time::Duration::from_secs(5), conn),
            tokio::time::timeout(std::time::Duration::from_secs(5), read)
        );
        out.unwrap_or_default()
    })
}

/// The bytes with every `date` value blanked.
fn undated(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split("\r\n")
        .map(|l| {
            if l.starts_with("date: ") {
                "date: X"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

fuzz_target!(|input: Input| {
    let mine = undated(&ours(&input));
    let theirs = undated(&hypers(&input));
    // The one exception, by design: hyper refuses (writes nothing of) a HEAD response with a
    // repeated length, which kaproxy writes with the length once.
    let lengths = input
        .fields
        .iter()
        .take(8)
        .filter(|(f, _)| matches!(f, Field::ContentLength))
        .count();
    if theirs.is_empty() && input.head_request && lengths > 1 {
        return;
    }
    assert_eq!(mine, theirs, "for {input:?}");
});
