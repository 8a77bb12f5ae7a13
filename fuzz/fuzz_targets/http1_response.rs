//! Differential: where a response body ends, by kaproxy's upstream HTTP/1.1 client
//! (`kaproxy::upstream::wire` on the codec of `kaproxy::http1`, which reads pooled backend
//! connections) and by hyper's client (which read them before), on the same bytes from a
//! backend over a socket: a status line, fuzzed `Content-Length` / `Transfer-Encoding`
//! fields, then fuzzed body bytes, then the connection closes. Both must take or refuse the response alike and, when both
//! take it, read the same body. Interim (1xx) responses are left out: hyper's client skips
//! them itself.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use std::future::poll_fn;

use bytes::Bytes;
use http_body_util::BodyExt;
use kaproxy::upstream::delivery::Tracked;
use kaproxy::upstream::stream::UpstreamStream;
use kaproxy::upstream::wire::{poll_head, read_head, Wire};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "shared/http1_message.rs"]
mod message;
use message::{block_on, Message, Outcome};

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

/// kaproxy's upstream client, as it reads a pooled connection (`kaproxy::upstream::wire`:
/// the head, then the body by its framing, from a socket), on a loopback connection whose
/// backend writes `bytes` and closes.
fn ours(bytes: &[u8], to_head: bool) -> Outcome {
    let bytes = bytes.to_vec();
    block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut backend = accepted.unwrap().0;
        let serve = tokio::spawn(async move {
            let _ = backend.write_all(&bytes).await;
            let _ = backend.shutdown().await;
        });
        let mut wire = Wire::new(UpstreamStream::Plain(Tracked::new(client.unwrap())));
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            let head = poll_fn(|cx| poll_head(&mut wire, cx)).await.ok()?;
            let (resp, _ends) = read_head(head, to_head).ok()?;
            let mut state = resp.body;
            let mut body = Vec::new();
            while let Some(frame) = poll_fn(|cx| wire.poll_body(&mut state, cx)).await {
                match frame {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data() {
                            body.extend_from_slice(&data);
                        }
                    }
                    Err(_) => return Some(Err(())),
                }
            }
            Some(Ok(body))
        })
        .await
        .expect("kaproxy's client finishes on a closed connection");
        let _ = serve.await;
        outcome
    })
}

/// hyper's client on an in-memory connection whose backend writes `bytes` and closes.
fn hypers(bytes: &[u8], to_head: bool) -> Outcome {
    let bytes = bytes.to_vec();
    block_on(async move {
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
