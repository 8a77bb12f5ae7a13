//! Owns a request body fed by the connection loop that reads it (kaproxy's own HTTP/1.1 loop,
//! `src/downstream/h1.rs`): [`FedBody`], which the proxy reads, and the loop's [`Feeder`],
//! with a slot of one piece between them. The loop reads the socket for the body only when
//! the slot is empty and the proxy asks for more ([`Feeder::wants`]), so a body comes off the
//! socket as fast as it goes on and no faster, and `Expect: 100-continue` is answered when
//! the body is first wanted, as hyper's server does.
//!
//! Both halves live on the connection's task: the lock is never contended.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::body::ReadError;

/// What the two halves share.
#[derive(Default)]
struct Slot {
    piece: Option<Bytes>,
    /// The body has ended (`Ok`) or failed; the failure goes to the reader once.
    end: Option<Result<(), Option<ReadError>>>,
    /// Bytes of the body not yet taken by the reader, when its framing says.
    left: Option<u64>,
    /// The reader found the slot empty: the loop is to read on.
    wanted: bool,
    waker: Option<Waker>,
}

/// A request body the connection loop feeds.
pub struct FedBody {
    slot: Arc<Mutex<Slot>>,
}

/// The connection loop's half of a [`FedBody`].
pub struct Feeder {
    slot: Arc<Mutex<Slot>>,
}

/// A body and its feeder; `length` is its `Content-Length`, if it has one.
pub fn channel(length: Option<u64>) -> (FedBody, Feeder) {
    let slot = Arc::new(Mutex::new(Slot {
        left: length,
        ..Slot::default()
    }));
    (FedBody { slot: slot.clone() }, Feeder { slot })
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FedBody {
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        let mut slot = lock(&self.slot);
        if let Some(data) = slot.piece.take() {
            if let Some(left) = &mut slot.left {
                *left = left.saturating_sub(data.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match &mut slot.end {
            Some(Ok(())) => Poll::Ready(None),
            Some(Err(failure)) => Poll::Ready(failure.take().map(Err)),
            None => {
                slot.wanted = true;
                match &slot.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => slot.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }

    pub fn is_end_stream(&self) -> bool {
        let slot = lock(&self.slot);
        slot.piece.is_none() && matches!(slot.end, Some(Ok(())))
    }

    pub fn size_hint(&self) -> SizeHint {
        let slot = lock(&self.slot);
        match slot.left {
            Some(left) => SizeHint::with_exact(left),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(slot.piece.as_ref().map_or(0, |p| p.len() as u64));
                hint
            }
        }
    }
}

impl Feeder {
    /// The reader is gone (the proxy dropped the body before its end).
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.slot) == 1
    }

    /// The slot is empty and the reader has asked for more since the last piece.
    pub fn wants(&self) -> bool {
        let slot = lock(&self.slot);
        slot.wanted && slot.piece.is_none()
    }

    /// The slot is empty.
    pub fn has_room(&self) -> bool {
        lock(&self.slot).piece.is_none()
    }

    /// Puts the next piece in the (empty) slot and wakes the reader unless it polls with
    /// `cx`'s waker (the loop then polls it next itself).
    pub fn push(&self, data: Bytes, cx: Option<&Context<'_>>) {
        let mut slot = lock(&self.slot);
        debug_assert!(slot.piece.is_none(), "one piece at a time");
        slot.piece = Some(data);
        wake(&mut slot, cx);
    }

    /// The body ended (`Ok`) or failed.
    pub fn end(&self, result: Result<(), ReadError>, cx: Option<&Context<'_>>) {
        let mut slot = lock(&self.slot);
        slot.end = Some(result.map_err(Some));
        wake(&mut slot, cx);
    }
}

fn wake(slot: &mut Slot, cx: Option<&Context<'_>>) {
    slot.wanted = false;
    if let Some(waker) = slot.waker.take() {
        match cx {
            Some(cx) if waker.will_wake(cx.waker()) => slot.waker = Some(waker),
            _ => waker.wake(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn pieces_go_one_at_a_time_and_the_reader_is_woken() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let (mut body, feeder) = channel(Some(5));
        assert!(!feeder.wants(), "not asked yet");
        assert!(body.poll_frame(&mut cx).is_pending());
        assert!(feeder.wants());
        feeder.push(Bytes::from_static(b"abc"), None);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken");
        assert!(!feeder.wants() && !feeder.has_room());
        let Poll::Ready(Some(Ok(frame))) = body.poll_frame(&mut cx) else {
            panic!("data")
        };
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert_eq!(body.size_hint().exact(), Some(2));
        feeder.push(Bytes::from_static(b"de"), None);
        feeder.end(Ok(()), None);
        assert!(!body.is_end_stream(), "a piece is still there");
        assert!(body.poll_frame(&mut cx).is_ready());
        assert!(body.is_end_stream());
        assert!(matches!(body.poll_frame(&mut cx), Poll::Ready(None)));
    }

    #[test]
    fn a_failure_reaches_the_reader_once_and_a_dropped_reader_is_seen() {
        let (mut body, feeder) = channel(None);
        let mut cx = Context::from_waker(Waker::noop());
        feeder.end(Err(ReadError::Closed), Some(&cx));
        assert!(matches!(
            body.poll_frame(&mut cx),
            Poll::Ready(Some(Err(ReadError::Closed)))
        ));
        assert!(matches!(body.poll_frame(&mut cx), Poll::Ready(None)));
        assert!(!feeder.is_abandoned());
        drop(body);
        assert!(feeder.is_abandoned());
    }
}
