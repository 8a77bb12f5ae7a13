//! Differential: the requests kaproxy's own HTTP/1.1 loop takes (`kaproxy::downstream::h1`:
//! the head parsed by `kaproxy::http1::head`, then `take`) against what hyper's server (which
//! answers every request the loop does not take) reads from the same bytes. Pipelined
//! requests with fuzzed methods, targets, versions, field names and values (framing fields
//! among them), line ends, bodies, then any bytes. Every request the loop takes must be the
//! request hyper reads there, field for field and body byte for byte; where the loop stops (a request it hands over, a head that does not parse), hyper
//! goes on from the same byte, so nothing else needs to agree.
#![no_main]

use std::sync::{Arc, Mutex};
use std::task::Poll;

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use kaproxy::downstream::h1::{take, Fill};
use kaproxy::http1::head::parse_request;
use kaproxy::proxy::RequestFields;
use libfuzzer_sys::fuzz_target;

// Only hyper's server is used here.
#[allow(dead_code)]
#[path = "shared/http1_message.rs"]
mod message;
use message::{block_on, serve_with_hyper};

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Head,
    Post,
    Options,
    Connect,
    Other(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Name {
    ContentLength,
    TransferEncoding,
    Host,
    Other(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Req {
    method: Method,
    target: Vec<u8>,
    minor: u8,
    fields: Vec<(Name, Vec<u8>)>,
    /// Written after the head as they are (a body, or the start of the next request).
    body: Vec<u8>,
    /// Bare LF line ends instead of CRLF.
    lf: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    requests: Vec<Req>,
    tail: Vec<u8>,
}

impl Req {
    fn write(&self, out: &mut Vec<u8>) {
        let eol: &[u8] = if self.lf { b"\n" } else { b"\r\n" };
        out.extend_from_slice(match &self.method {
            Method::Get => b"GET",
            Method::Head => b"HEAD",
            Method::Post => b"POST",
            Method::Options => b"OPTIONS",
            Method::Connect => b"CONNECT",
            Method::Other(m) => &m[..m.len().min(12)],
        });
        out.push(b' ');
        out.extend_from_slice(&self.target[..self.target.len().min(48)]);
        out.extend_from_slice(b" HTTP/1.");
        out.push(b'0' + self.minor % 3);
        out.extend_from_slice(eol);
        for (name, value) in self.fields.iter().take(8) {
            out.extend_from_slice(match name {
                Name::ContentLength => b"Content-Length",
                Name::TransferEncoding => b"Transfer-Encoding",
                Name::Host => b"Host",
                Name::Other(n) => &n[..n.len().min(24)],
            });
            out.extend_from_slice(b": ");
            out.extend_from_slice(&value[..value.len().min(32)]);
            out.extend_from_slice(eol);
        }
        out.extend_from_slice(eol);
        out.extend_from_slice(&self.body[..self.body.len().min(64)]);
    }
}

/// What a server read of one request: method, target, version, fields in order, and its
/// body (None: it failed).
type Seen = (
    String,
    String,
    http::Version,
    Vec<(String, Vec<u8>)>,
    Option<Vec<u8>>,
);

/// A request and its body as `Seen`, the body read to its end.
async fn seen<B: http_body::Body>(req: http::Request<B>) -> Seen
where
    B::Error: std::fmt::Debug,
{
    let head = (
        req.method().to_string(),
        req.uri().to_string(),
        req.version(),
        req.headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
    );
    let body = req
        .into_body()
        .collect()
        .await
        .ok()
        .map(|b| b.to_bytes().to_vec());
    (head.0, head.1, head.2, head.3, body)
}

/// The requests the own loop takes, in order, until it stops: a body still to come is fed
/// from the bytes that follow as the loop feeds it, then cut short where they end.
fn ours(bytes: &[u8]) -> Vec<Seen> {
    let mut buf = BytesMut::from(bytes);
    let mut taken = Vec::new();
    while let Ok(Some(head)) = parse_request(&mut buf, 64 * 1024) {
        let Some(t) = take(&head, &mut buf) else {
            break;
        };
        let (mut req, close, feed) = (t.req, t.close, t.feed);
        // The proxy reads the fields in the parsed head; as a map they are what hyper's are.
        *req.headers_mut() = RequestFields::parsed(&head.fields).to_map();
        let whole = match feed {
            None => {
                taken.push(block_on(seen(req)));
                true
            }
            Some(mut feed) => {
                let (parts, mut body) = req.into_parts();
                let mut data = Vec::new();
                let read = block_on(std::future::poll_fn(|cx| loop {
                    match std::pin::Pin::new(&mut body).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Ok(d) = frame.into_data() {
                                data.extend_from_slice(&d);
                            }
                        }
                        Poll::Ready(Some(Err(_))) => return Poll::Ready(false),
                        Poll::Ready(None) => return Poll::Ready(true),
                        Poll::Pending => {
                            if feed.fill(&mut buf, Some(cx)) == Fill::Empty {
                                feed.cut_short(Some(cx));
                            }
                        }
                    }
                }));
                let req = http::Request::from_parts(parts, http_body_util::Empty::<Bytes>::new());
                let mut s = block_on(seen(req));
                s.4 = read.then_some(data);
                taken.push(s);
                read
            }
        };
        if close || !whole {
            break;
        }
    }
    taken
}

/// The requests hyper's server reads from `bytes`, then end of stream.
fn hypers(bytes: &[u8]) -> Vec<Seen> {
    let all: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = all.clone();
    let bytes = bytes.to_vec();
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let seen = seen(req).await;
            record.lock().unwrap().push(seen);
            Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Empty::<Bytes>::new(),
            ))
        }
    });
    serve_with_hyper(bytes, service);
    let all = all.lock().unwrap().clone();
    all
}

fuzz_target!(|input: Input| {
    let mut bytes = Vec::new();
    for req in input.requests.iter().take(4) {
        req.write(&mut bytes);
    }
    bytes.extend_from_slice(&input.tail[..input.tail.len().min(64)]);
    let mine = ours(&bytes);
    if mine.is_empty() {
        return;
    }
    let theirs = hypers(&bytes);
    assert!(
        theirs.len() >= mine.len() && theirs[..mine.len()] == mine[..],
        "the own loop took {mine:?}\nwhere hyper read {theirs:?}\nfrom {:?}",
        String::from_utf8_lossy(&bytes)
    );
});
