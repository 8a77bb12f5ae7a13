//! Owns response buffering (`response_buffering`, nginx's `proxy_buffering on`): a relay task
//! reads a response body from the backend as fast as the backend sends it — into memory up to
//! `response_buffer_bytes` (within the process-wide budget), then into a temporary file up to
//! `max_response_spill_bytes` — while the client takes it from [`RelayBody`] as fast as the
//! client reads. The two sides are decoupled, never delayed: a byte that arrived is readable at
//! once. So the upstream connection returns to the pool when the backend has sent the last
//! byte, however slowly the client reads.
//!
//! Order is kept by one rule: once a byte went to the file, every later byte goes there too
//! until the client has read the file to its end; then the file is rewound (truncated) and
//! memory is used again, so a client that keeps up never touches the disk. When neither memory
//! nor the file has room, the relay stops reading (back-pressure to the backend, as without
//! buffering). Between two reads from the backend the relay waits at most `read_timeout`
//! (nginx's `proxy_read_timeout`); when the client goes away, it stops at once and the
//! upstream connection is closed.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::warn;

use super::budget::{Buffering, Memory};
use super::spill::{Direction, SpillFile, READ_CHUNK};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a relayed body ended early; the client's connection is closed (the head is sent).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("backend sent no body data for {0:?}")]
    ReadTimeout(Duration),
    #[error("backend body failed: {0}")]
    Upstream(#[source] BoxError),
    #[error("reading the temporary file back: {0}")]
    Read(#[source] std::io::Error),
}

/// How much one relay may hold.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// `response_buffer_bytes`: bytes in memory.
    pub memory: usize,
    /// `max_response_spill_bytes`: bytes in the temporary file (0: never to disk).
    pub spill: u64,
    /// The longest wait between two reads from the backend.
    pub read_timeout: Duration,
}

struct Shared {
    state: Mutex<State>,
    /// Told when the client took something (room for the relay) or went away.
    room: Notify,
    /// Told when the client went away.
    gone: Notify,
}

struct State {
    /// Bytes in memory, in order, before anything in the file.
    memory: VecDeque<Bytes>,
    queued: usize,
    held: Memory,
    spill: Option<SpillFile>,
    /// How far the client has read the file.
    read: u64,
    /// The relay is writing past `spill.len()` now (so the file may not be rewound).
    writing: bool,
    /// How the body ended, once it has: its trailers, or the failure.
    end: Option<Result<Option<HeaderMap>, RelayError>>,
    reader: Option<Waker>,
    gone: bool,
}

impl State {
    fn wake_reader(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    /// Bytes in the file the client has not read yet (or being written).
    fn file_active(&self) -> bool {
        self.writing || self.spill.as_ref().is_some_and(|s| self.read < s.len())
    }
}

/// Starts relaying `body` on the current runtime; the returned body is what the client reads.
pub fn relay<B>(body: B, buffering: &Buffering, limits: RelayLimits) -> RelayBody
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    let hint = body.size_hint();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            memory: VecDeque::new(),
            queued: 0,
            held: buffering.memory(),
            spill: None,
            read: 0,
            writing: false,
            end: None,
            reader: None,
            gone: false,
        }),
        room: Notify::new(),
        gone: Notify::new(),
    });
    tokio::spawn(pump(body, shared.clone(), buffering.clone(), limits));
    RelayBody {
        shared,
        pending: None,
        hint,
        delivered: 0,
        done: false,
    }
}

/// What the relay does with one chunk of data.
enum Place {
    Placed,
    CreateFile,
    Write(u64),
    Wait,
}

async fn pump<B>(mut body: B, shared: Arc<Shared>, buffering: Buffering, limits: RelayLimits)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    let mut spill_failed = false;
    loop {
        let frame = tokio::select! {
            biased;
            _ = shared.gone.notified() => return,
            frame = tokio::time::timeout(limits.read_timeout, body.frame()) => frame,
        };
        let data = match frame {
            Err(_elapsed) => {
                return finish(&shared, Err(RelayError::ReadTimeout(limits.read_timeout)))
            }
            Ok(None) => return finish(&shared, Ok(None)),
            Ok(Some(Err(e))) => return finish(&shared, Err(RelayError::Upstream(e.into()))),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    // Trailers come last.
                    return finish(&shared, Ok(frame.into_trailers().ok()));
                }
            },
        };
        if data.is_empty() {
            continue;
        }
        let n = data.len();
        loop {
            let place = {
                let mut st = crate::sync::lock(&shared.state);
                if st.gone {
                    return;
                }
                let file_active = st.file_active();
                let may_spill = limits.spill > 0 && !spill_failed;
                if !file_active && st.queued + n <= limits.memory && st.held.try_grow(n) {
                    st.queued += n;
                    st.memory.push_back(data.clone());
                    st.wake_reader();
                    Place::Placed
                } else if may_spill && st.spill.is_none() {
                    Place::CreateFile
                } else if may_spill
                    && st
                        .spill
                        .as_ref()
                        .is_some_and(|s| s.len() + n as u64 <= limits.spill)
                {
                    st.writing = true;
                    Place::Write(st.spill.as_ref().expect("checked").len())
                } else if !file_active && st.queued == 0 {
                    // Nothing is buffered and it fits nowhere: one chunk in flight, as
                    // without buffering.
                    st.held.force_grow(n);
                    st.queued += n;
                    st.memory.push_back(data.clone());
                    st.wake_reader();
                    Place::Placed
                } else {
                    Place::Wait
                }
            };
            match place {
                Place::Placed => break,
                Place::CreateFile => match SpillFile::create(&buffering, Direction::Response).await
                {
                    Ok(file) => crate::sync::lock(&shared.state).spill = Some(file),
                    Err(err) => {
                        warn!(dir = %err.dir.display(), error = %err.source,
                            "cannot spill a response to disk; the backend waits for the client instead");
                        spill_failed = true;
                    }
                },
                Place::Write(at) => {
                    let write = {
                        let mut st = crate::sync::lock(&shared.state);
                        let spill = st.spill.as_mut().expect("created before writing");
                        spill.write_at(data.clone(), at)
                    };
                    let written = write.await;
                    let mut st = crate::sync::lock(&shared.state);
                    st.writing = false;
                    match written {
                        Ok(()) => {
                            st.spill.as_mut().expect("still there").commit(n as u64);
                            st.wake_reader();
                            break;
                        }
                        Err(err) => {
                            warn!(dir = %err.dir.display(), error = %err.source,
                                "cannot write a response to disk; the backend waits for the client instead");
                            spill_failed = true;
                        }
                    }
                }
                Place::Wait => shared.room.notified().await,
            }
        }
    }
}

fn finish(shared: &Shared, end: Result<Option<HeaderMap>, RelayError>) {
    let mut st = crate::sync::lock(&shared.state);
    st.end = Some(end);
    st.wake_reader();
}

/// The client's side of a relay: what the backend sent, in order, as fast as the client reads.
pub struct RelayBody {
    shared: Arc<Shared>,
    /// A read of the temporary file in flight.
    pending: Option<JoinHandle<std::io::Result<Bytes>>>,
    /// The backend body's size hint (its Content-Length, when it had one).
    hint: SizeHint,
    delivered: u64,
    done: bool,
}

impl RelayBody {
    /// Waits until the backend's body has begun — a first byte, or its end — so that a body
    /// that fails before any byte (a broken first chunk, a timeout) can still be answered
    /// 502/504 instead of a response head followed by a cut. The error, if that is how the
    /// body began, is taken: the body is then over.
    pub async fn started(&mut self) -> Result<(), RelayError> {
        std::future::poll_fn(|cx| {
            let mut st = crate::sync::lock(&self.shared.state);
            let buffered =
                st.queued > 0 || st.writing || st.spill.as_ref().is_some_and(|s| !s.is_empty());
            if buffered {
                return Poll::Ready(Ok(()));
            }
            match st.end.take() {
                Some(Err(e)) => {
                    self.done = true;
                    Poll::Ready(Err(e))
                }
                Some(Ok(trailers)) => {
                    st.end = Some(Ok(trailers));
                    Poll::Ready(Ok(()))
                }
                None => {
                    st.reader = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    fn take(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        self.delivered += data.len() as u64;
        self.shared.room.notify_one();
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = RelayError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RelayError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(pending) = &mut this.pending {
                let read = ready!(Pin::new(pending).poll(cx))
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                this.pending = None;
                let data = match read {
                    Ok(data) => data,
                    Err(e) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(RelayError::Read(e))));
                    }
                };
                {
                    let mut st = crate::sync::lock(&this.shared.state);
                    st.read += data.len() as u64;
                    let drained = st.spill.as_ref().is_some_and(|s| st.read == s.len());
                    if drained && !st.writing {
                        st.spill.as_mut().expect("checked").rewind();
                        st.read = 0;
                    }
                }
                return this.take(data);
            }
            let mut st = crate::sync::lock(&this.shared.state);
            if let Some(data) = st.memory.pop_front() {
                st.queued -= data.len();
                st.held.shrink(data.len());
                drop(st);
                return this.take(data);
            }
            if let Some(spill) = &st.spill {
                if st.read < spill.len() {
                    let max = (spill.len() - st.read).min(READ_CHUNK as u64) as usize;
                    this.pending = Some(spill.read_at(st.read, max));
                    continue;
                }
            }
            if !st.writing {
                if let Some(end) = st.end.take() {
                    drop(st);
                    this.done = true;
                    return match end {
                        Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                        Ok(None) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
            }
            st.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.hint.exact() {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.delivered)),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        crate::sync::lock(&self.shared.state).gone = true;
        self.shared.gone.notify_one();
        self.shared.room.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::spill::tests::buffering_in;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::mpsc;

    /// The backend's side: chunks the test sends, and whether the relay dropped the body.
    struct Backend {
        rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
        dropped: Arc<AtomicBool>,
    }

    impl futures_util::Stream for Backend {
        type Item = Result<Frame<Bytes>, std::io::Error>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.rx.poll_recv(cx)
        }
    }

    impl Drop for Backend {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    type Sender = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

    fn backend() -> (Sender, StreamBody<Backend>, Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(1024);
        let dropped = Arc::new(AtomicBool::new(false));
        let body = StreamBody::new(Backend {
            rx,
            dropped: dropped.clone(),
        });
        (tx, body, dropped)
    }

    fn limits(memory: usize, spill: u64) -> RelayLimits {
        RelayLimits {
            memory,
            spill,
            read_timeout: Duration::from_secs(60),
        }
    }

    fn chunk(i: usize, len: usize) -> Bytes {
        Bytes::from(vec![(i % 251) as u8; len])
    }

    /// Waits (a few seconds at most) for the relay task, whose file writes run on the blocking
    /// pool, to reach what `cond` says.
    async fn until(what: &str, cond: impl FnMut() -> bool) {
        kaproxy_testkit::eventually(what, Duration::from_secs(5), cond).await;
    }

    #[tokio::test]
    async fn the_backend_is_read_whole_while_the_client_reads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 1 << 20);
        let (tx, body, dropped) = backend();
        let mut client = relay(body, &b, limits(64 * 1024, 1 << 30));
        let mut sent = Vec::new();
        for i in 0..40 {
            let c = chunk(i, 16 * 1024);
            sent.extend_from_slice(&c);
            tx.send(Ok(Frame::data(c))).await.unwrap();
        }
        drop(tx);
        // The backend's body ended (the relay dropped it) before the client read a byte.
        until("backend read to its end", || dropped.load(Ordering::SeqCst)).await;
        assert!(
            b.memory_bytes() <= 64 * 1024,
            "memory within response_buffer_bytes"
        );
        assert_eq!(
            b.disk_bytes() + b.memory_bytes(),
            sent.len() as u64,
            "the rest on disk"
        );
        let mut got = Vec::new();
        while let Some(frame) = client.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(got, sent, "in order, whole");
        assert_eq!((b.memory_bytes(), b.disk_bytes()), (0, 0), "all given back");
    }

    #[tokio::test]
    async fn a_client_that_keeps_up_never_touches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 1 << 20);
        let (tx, body, _) = backend();
        let mut client = relay(body, &b, limits(64 * 1024, 1 << 30));
        for i in 0..100 {
            tx.send(Ok(Frame::data(chunk(i, 8 * 1024)))).await.unwrap();
            let got = client.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(got, chunk(i, 8 * 1024));
        }
        assert_eq!(b.metrics().spilled_total(Direction::Response), 0, "no file");
    }

    #[tokio::test]
    async fn order_is_kept_across_memory_file_and_memory_again() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 1 << 20);
        let (tx, body, _) = backend();
        let mut client = relay(body, &b, limits(20_000, 1 << 30));
        let mut sent = Vec::new();
        let mut got = Vec::new();
        // Bursts larger than memory, then reads that drain everything, three times.
        for round in 0..3 {
            for i in 0..10 {
                let c = chunk(round * 10 + i, 7_000);
                sent.extend_from_slice(&c);
                tx.send(Ok(Frame::data(c))).await.unwrap();
            }
            until("all of the burst held", || {
                b.memory_bytes() + b.disk_bytes() == 70_000
            })
            .await;
            assert!(b.disk_bytes() > 0, "round {round}: past memory, on disk");
            while got.len() < sent.len() {
                got.extend_from_slice(&client.frame().await.unwrap().unwrap().into_data().unwrap());
            }
            assert_eq!(
                b.disk_bytes(),
                0,
                "round {round}: the file was rewound once read"
            );
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        tx.send(Ok(Frame::trailers(trailers.clone())))
            .await
            .unwrap();
        let last = client.frame().await.unwrap().unwrap();
        assert_eq!(last.into_trailers().unwrap(), trailers, "trailers last");
        assert!(client.frame().await.is_none());
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn past_the_spill_limit_the_backend_waits() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 1 << 20);
        let (tx, body, _) = backend();
        let mut client = relay(body, &b, limits(10_000, 30_000));
        for i in 0..20 {
            tx.send(Ok(Frame::data(chunk(i, 10_000)))).await.unwrap();
        }
        // Memory full, the file at max_response_spill_bytes, a fifth chunk taken and held.
        until("memory and file full", || {
            (b.memory_bytes(), b.disk_bytes(), tx.capacity()) == (10_000, 30_000, 1024 - 15)
        })
        .await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        // ... and no further: the channel keeps the rest.
        assert_eq!(
            tx.capacity(),
            1024 - 15,
            "the rest not taken from the backend"
        );
        drop(tx);
        let mut got = 0;
        while let Some(frame) = client.frame().await {
            got += frame.unwrap().into_data().unwrap().len();
        }
        assert_eq!(got, 200_000, "everything arrives once the client reads");
    }

    #[tokio::test]
    async fn the_budget_sends_bodies_to_disk_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 15_000);
        let (tx1, body1, _) = backend();
        let (tx2, body2, _) = backend();
        let _c1 = relay(body1, &b, limits(64 * 1024, 1 << 30));
        let _c2 = relay(body2, &b, limits(64 * 1024, 1 << 30));
        for i in 0..4 {
            tx1.send(Ok(Frame::data(chunk(i, 4_000)))).await.unwrap();
        }
        until("the first body held", || {
            b.memory_bytes() + b.disk_bytes() == 16_000
        })
        .await;
        for i in 0..4 {
            tx2.send(Ok(Frame::data(chunk(i, 4_000)))).await.unwrap();
        }
        until("both held", || b.memory_bytes() + b.disk_bytes() == 32_000).await;
        assert_eq!(b.memory_bytes(), 12_000, "three chunks of the first body");
        assert_eq!(
            b.disk_bytes(),
            4_000 + 16_000,
            "the first body's fourth chunk, and all of the second"
        );
    }

    #[tokio::test]
    async fn a_client_that_goes_away_stops_the_relay_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 1 << 20);
        let (tx, body, dropped) = backend();
        let client = relay(body, &b, limits(64 * 1024, 1 << 30));
        tx.send(Ok(Frame::data(chunk(0, 100)))).await.unwrap();
        until("a chunk held", || b.memory_bytes() == 100).await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(client);
        // The backend body is dropped (its connection closed) though it never ended.
        until("the backend body dropped", || {
            dropped.load(Ordering::SeqCst)
        })
        .await;
        assert_eq!(b.memory_bytes(), 0);
    }

    #[tokio::test]
    async fn a_body_that_fails_before_its_first_byte_is_reported_by_started() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 1 << 20);
        let (tx, body, _) = backend();
        let mut client = relay(body, &b, limits(1000, 0));
        tx.send(Err(std::io::Error::other("bad chunk")))
            .await
            .unwrap();
        let err = client.started().await.expect_err("failed first");
        assert!(matches!(err, RelayError::Upstream(_)), "{err}");
        assert!(client.is_end_stream());

        let (tx, body, _) = backend();
        let mut client = relay(body, &b, limits(1000, 0));
        tx.send(Ok(Frame::data(chunk(0, 10)))).await.unwrap();
        client.started().await.expect("a first byte");
        tx.send(Err(std::io::Error::other("later"))).await.unwrap();
        let first = client.frame().await.unwrap().unwrap();
        assert_eq!(
            first.into_data().unwrap().len(),
            10,
            "the byte is still delivered"
        );
        assert!(client.frame().await.unwrap().is_err(), "then the failure");
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_stops_sending_ends_the_body_after_read_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let b = buffering_in(dir.path(), 1 << 20);
        let (tx, body, _) = backend();
        let mut client = relay(
            body,
            &b,
            RelayLimits {
                read_timeout: Duration::from_secs(5),
                ..limits(1000, 0)
            },
        );
        tx.send(Ok(Frame::data(chunk(0, 10)))).await.unwrap();
        assert_eq!(
            client
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap()
                .len(),
            10
        );
        let started = tokio::time::Instant::now();
        let err = client.frame().await.unwrap().expect_err("timed out");
        assert!(matches!(err, RelayError::ReadTimeout(_)), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        drop(tx);
    }
}
