//! Differential: where a response body ends, by kaproxy's HTTP/1.1 codec (`kaproxy::http1`)
//! and by hyper's client (which reads backends today), on the same bytes from a backend: a
//! status line, fuzzed `Content-Length` / `Transfer-Encoding` fields, then fuzzed body bytes,
//! then the connection closes. Both must take or refuse the response alike and, when both
//! take it, read the same body. Interim (1xx) responses are left out: hyper's client skips
//! them itself.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use kaproxy::http1::framing;
use kaproxy::http1::head::parse_response;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "shared/http1_message.rs"]
mod message;
use message::{read_body, Message, Outcome};

#[derive(Arbitrary, Debug)]
struct Input {
    status: u16,
    head_request: bool,
    message: Message,
}

fn response_bytes(message: &Message, status: u16) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} X\r\n").into_bytes();
    message.write(&mut out);
    out
}

/// kaproxy's codec; the connection closes after `bytes`.
fn ours(bytes: &[u8], to_head: bool) -> Outcome {
    let mut buf = BytesMut::from(bytes);
    let head = parse_response(&mut buf, 64 * 1024).ok()??;
    let framing = framing::response(head.status, to_head, head.fields.iter().collect::<Vec<_>>())
        .ok()?
        .framing;
    Some(read_body(framing, &mut buf).map_err(|_| ()))
}

/// hyper's client on an in-memory connection whose backend writes `bytes` and closes.
fn hypers(bytes: &[u8], to_head: bool) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bytes = bytes.to_vec();
    rt.block_on(async move {
        let (client, mut backend) = tokio::io::duplex(1 << 20);
        let serve = tokio::spawn(async move {
            // Read the request head first, as a backend would, then answer and close.
            let mut seen = Vec::new();
            let mut chunk = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match backend.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = backend.write_all(&bytes).await;
            let _ = backend.shutdown().await;
            // Drain whatever else the client writes until it goes.
            while let Ok(n) = backend.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
            }
        });
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<Bytes>,
        >(hyper_util::rt::TokioIo::new(client))
        .await
        .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let method = if to_head {
            http::Method::HEAD
        } else {
            http::Method::GET
        };
        let req = http::Request::builder()
            .method(method)
            .uri("/")
            .header("host", "a")
            .body(http_body_util::Empty::new())
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            let resp = sender.send_request(req).await.ok()?;
            Some(
                resp.into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes().to_vec())
                    .map_err(|_| ()),
            )
        })
        .await
        .expect("hyper's client finishes on a closed connection");
        drop(sender);
        let _ = serve.await;
        outcome
    })
}

fuzz_target!(|input: Input| {
    // 200-599; interim responses are hyper's to skip.
    let status = 200 + input.status % 400;
    let bytes = response_bytes(&input.message, status);
    let mine = ours(&bytes, input.head_request);
    let theirs = hypers(&bytes, input.head_request);
    assert_eq!(
        mine,
        theirs,
        "kaproxy vs hyper on {:?} (HEAD: {})",
        String::from_utf8_lossy(&bytes),
        input.head_request
    );
});
