//! Owns `send_timeout` for HTTP/2 streams: a response body that hyper stops asking for (the
//! client's flow-control window stays closed) is cut off after `send_timeout`, so the
//! upstream connection it streams from is closed instead of held (nginx resets the stream at
//! send_timeout, HAProxy at `timeout client`).
//!
//! hyper cannot be made to reset a stream whose body it does not poll, so a cut-off stream
//! also ends its connection: the `on_stall` notification tells the connection's driver to
//! close it (the client sees the connection closed; its other streams end with it).
//!
//! A full socket is caught below, by the connection's write deadline
//! ([`crate::downstream::socket::LingeringTcp`]); a closed HTTP/2 window is not a full socket: hyper
//! simply stops polling the stream's body, so no poll can notice. A small task per streamed
//! HTTP/2 response watches the time since hyper last asked for data; a body whose last poll
//! was answered "pending" waits on its backend, not on the client, and is never cut.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;
use tracing::debug;

/// A response body whose consumer must poll it at least every `send_timeout`.
pub struct SendWatch<B> {
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    origin: Instant,
    /// Taken and dropped by the watchdog when the stream stalls.
    body: Mutex<Option<B>>,
    /// When hyper last polled, in ms since `origin`.
    last_poll_ms: AtomicU64,
    /// The last poll returned `Pending`: the body waits for its backend.
    waiting_upstream: AtomicBool,
    expired: AtomicBool,
    waker: AtomicWaker,
    /// Told when the body is cut off, so the connection can be closed.
    on_stall: Option<Arc<tokio::sync::Notify>>,
}

/// The error a cut-off body ends with (hyper resets the stream with it).
#[derive(Debug, thiserror::Error)]
#[error("send_timeout: the HTTP/2 stream's window stayed closed for {0:?}")]
pub struct Stalled(pub Duration);

impl<B> SendWatch<B>
where
    B: Send + 'static,
{
    /// Wraps `body` and starts its watchdog; `on_stall` is notified if it cuts the body off.
    pub fn new(
        body: B,
        send_timeout: Duration,
        on_stall: Option<Arc<tokio::sync::Notify>>,
    ) -> Self {
        let origin = Instant::now();
        let shared = Arc::new(Shared {
            origin,
            body: Mutex::new(Some(body)),
            last_poll_ms: AtomicU64::new(0),
            waiting_upstream: AtomicBool::new(false),
            expired: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            on_stall,
        });
        tokio::spawn(watchdog(Arc::downgrade(&shared), send_timeout));
        SendWatch { shared }
    }
}

/// Sleeps until `send_timeout` after the last poll; cuts the body off if hyper has not
/// polled since (and the body was not waiting for its backend). Ends with the body.
async fn watchdog<B>(shared: Weak<Shared<B>>, send_timeout: Duration) {
    let mut at = Instant::now() + send_timeout;
    loop {
        tokio::time::sleep_until(at).await;
        let Some(s) = shared.upgrade() else { return };
        let last = s.origin + Duration::from_millis(s.last_poll_ms.load(Ordering::Acquire));
        let now = Instant::now();
        if s.waiting_upstream.load(Ordering::Acquire) || last + send_timeout > now {
            at = (last + send_timeout).max(now + send_timeout / 4);
            continue;
        }
        let body = crate::sync::lock(&s.body).take();
        if body.is_some() {
            debug!(
                ?send_timeout,
                "HTTP/2 stream made no progress; cutting its response off"
            );
            s.expired.store(true, Ordering::Release);
            // Dropped here: a pooled upstream connection it streamed from is closed.
            drop(body);
            s.waker.wake();
            if let Some(notify) = &s.on_stall {
                notify.notify_one();
            }
        }
        return;
    }
}

impl<B> Body for SendWatch<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        let s = &self.shared;
        let ms = s.origin.elapsed().as_millis() as u64;
        s.last_poll_ms.store(ms, Ordering::Release);
        let mut guard = crate::sync::lock(&s.body);
        let Some(body) = guard.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(Stalled(Duration::ZERO)))));
        };
        s.waker.register(cx.waker());
        let res = Pin::new(body).poll_frame(cx);
        s.waiting_upstream
            .store(res.is_pending(), Ordering::Release);
        res.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        if self.shared.expired.load(Ordering::Acquire) {
            return false;
        }
        let guard = crate::sync::lock(&self.shared.body);
        guard.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let guard = crate::sync::lock(&self.shared.body);
        guard
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};

    /// A body that records whether it was dropped.
    struct Tracked {
        dropped: Arc<AtomicBool>,
        frames: std::vec::IntoIter<Bytes>,
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::Release);
        }
    }

    impl Body for Tracked {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.frames.next().map(|b| Ok(Frame::data(b))))
        }
    }

    fn tracked(n: usize) -> (Tracked, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        let frames = vec![Bytes::from_static(b"x"); n].into_iter();
        (
            Tracked {
                dropped: dropped.clone(),
                frames,
            },
            dropped,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_nobody_polls_is_dropped_after_send_timeout() {
        let (body, dropped) = tracked(3);
        let mut watched = SendWatch::new(body, Duration::from_secs(2), None);
        // One frame goes out, then the window closes: nobody polls.
        assert!(watched.frame().await.is_some());
        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert!(!dropped.load(Ordering::Acquire), "cut off too early");
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::task::yield_now().await;
        assert!(
            dropped.load(Ordering::Acquire),
            "not cut off after send_timeout"
        );
        let next = watched.frame().await.expect("an error frame");
        assert!(next.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_polled_in_time_or_waiting_upstream_is_kept() {
        let (body, dropped) = tracked(10);
        let mut watched = SendWatch::new(body, Duration::from_secs(1), None);
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(900)).await;
            assert!(watched.frame().await.unwrap().is_ok());
        }
        assert!(!dropped.load(Ordering::Acquire));

        // A body that waits for its backend (pending) for longer than send_timeout is kept.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let stream = StreamBody::new(tokio_stream_from(rx));
        let mut watched = SendWatch::new(stream, Duration::from_secs(1), None);
        let waiting = tokio::spawn(async move { watched.frame().await.map(|r| r.is_ok()) });
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
            .await
            .unwrap();
        assert_eq!(waiting.await.unwrap(), Some(true));
    }

    /// An mpsc receiver as a `Stream` (no tokio-stream dependency).
    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
