//! Owns `header_timeout` for HTTP/2 request heads: a read wrapper (below hyper and the h2
//! crate, above TLS) that follows the client's frame boundaries — only the 9-byte frame
//! headers of RFC 9113 §4.1, never a payload — and ends the connection when a header block
//! (a HEADERS frame through its last CONTINUATION, §4.3) has been open for `header_timeout`.
//! Without it, a block trickled one CONTINUATION at a time is bounded only by the h2 crate's
//! frame count and the keep-alive PING.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The client connection preface (RFC 9113 §3.4), which precedes the first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Where the reader is in the client's byte stream.
#[derive(Debug, Default)]
struct Frames {
    /// Preface bytes still to skip.
    preface_left: usize,
    /// The frame header being read, and how much of it has arrived.
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    payload_left: usize,
}

/// What a frame header meant for the header block.
#[derive(Debug, PartialEq, Eq)]
enum Block {
    Opened,
    Closed,
}

impl Frames {
    fn new() -> Frames {
        Frames {
            preface_left: PREFACE_LEN,
            ..Frames::default()
        }
    }

    /// Follows `bytes`; returns the last change to the header block they made.
    fn feed(&mut self, mut bytes: &[u8]) -> Option<Block> {
        let mut change = None;
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == FRAME_HEADER_LEN {
                    self.header_len = 0;
                    let h = &self.header;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let ends = flags & END_HEADERS != 0;
                    match kind {
                        HEADERS if !ends => change = Some(Block::Opened),
                        HEADERS | CONTINUATION if ends => change = Some(Block::Closed),
                        _ => {}
                    }
                }
            }
        }
        change
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 connection's stream with [`header_timeout`](crate::config::DownstreamConfig)
    /// on every header block: past it, reads fail with `TimedOut` and hyper closes the
    /// connection (nothing can be answered on a stream whose head never arrived).
    pub struct H2HeadWatch<T> {
        #[pin]
        inner: T,
        frames: Frames,
        timeout: Duration,
        // Armed while a header block is open.
        deadline: Option<Pin<Box<Sleep>>>,
    }
}

impl<T> H2HeadWatch<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        H2HeadWatch {
            inner,
            frames: Frames::new(),
            timeout,
            deadline: None,
        }
    }
}

impl<T: AsyncRead> AsyncRead for H2HeadWatch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                match this.frames.feed(&buf.filled()[before..]) {
                    Some(Block::Opened) if this.deadline.is_none() => {
                        *this.deadline = Some(Box::pin(tokio::time::sleep_until(
                            Instant::now() + *this.timeout,
                        )));
                    }
                    Some(Block::Closed) => *this.deadline = None,
                    _ => {}
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "HTTP/2 header block not complete within header_timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for H2HeadWatch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend(std::iter::repeat_n(0xaa, len));
        f
    }

    #[test]
    fn frame_boundaries_are_followed_across_any_split() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend(frame(0x4, 0, 18)); // SETTINGS
        stream.extend(frame(HEADERS, 0, 100)); // opens a block
        stream.extend(frame(CONTINUATION, 0, 50));
        stream.extend(frame(CONTINUATION, END_HEADERS, 7)); // closes it
        stream.extend(frame(0x0, 0x1, 5)); // DATA
        stream.extend(frame(HEADERS, END_HEADERS | 0x1, 3)); // a whole block
        for split in [1, 2, 7, 9, 13, 64, stream.len()] {
            let mut frames = Frames::new();
            let changes: Vec<Block> = stream
                .chunks(split)
                .filter_map(|p| frames.feed(p))
                .collect();
            if split <= FRAME_HEADER_LEN {
                assert_eq!(
                    changes,
                    vec![Block::Opened, Block::Closed, Block::Closed],
                    "split {split}"
                );
            }
            // A read that holds a whole block never arms the deadline.
            assert_eq!(changes.last(), Some(&Block::Closed), "split {split}");
            assert_eq!(frames.payload_left, 0, "split {split}: at a frame boundary");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_header_block_fails_the_read_at_header_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64 * 1024);
        let mut watched = H2HeadWatch::new(server, Duration::from_secs(10));
        let mut client = client;
        let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        start.extend(frame(HEADERS, 0, 10));
        client.write_all(&start).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = watched.read(&mut buf).await.unwrap();
        assert_eq!(n, start.len());
        let t0 = Instant::now();
        // One CONTINUATION every 2 s keeps the block open; the deadline does not move.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let continuation = frame(CONTINUATION, 0, 10);
            client.write_all(&continuation).await.unwrap();
            let n = watched.read(&mut buf).await.unwrap();
            assert_eq!(n, continuation.len());
        }
        let err = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(10),
            "header_timeout after HEADERS"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_block_disarms_the_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut watched = H2HeadWatch::new(server, Duration::from_secs(10));
        let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        start.extend(frame(HEADERS, 0, 10));
        start.extend(frame(CONTINUATION, END_HEADERS, 10));
        client.write_all(&start).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = watched.read(&mut buf).await.unwrap();
        assert_eq!(n, start.len());
        // An idle connection after a whole head: reads just wait.
        let idle = tokio::time::timeout(Duration::from_secs(60), watched.read(&mut buf)).await;
        assert!(idle.is_err(), "still waiting after 60 s: {idle:?}");
    }
}
