//! Owns the per-worker pool of HTTP/1 connection buffers, as nginx keeps free buffers per
//! worker: a client connection's read and write buffers while it is served, and a backend
//! connection's read buffer while it carries a response, are taken from the worker's pool and
//! given back when the connection goes idle (parks, or goes back to the upstream pool), so
//! neither a new round on a client connection nor an exchange on a pooled one allocates them.
//! A buffer given back while a piece of its bytes is still in use (a response head or a body
//! chunk not yet written to the client: a backend connection goes back to its pool when the
//! response's last byte is read, before it is written) is kept, and taken again once that piece
//! is gone. Each worker is one thread (`[runtime] worker_threads`,
//! README "Workers"), so the pool is the thread's own; it keeps at most [`KEEP`] buffers of
//! each [`Class`], which bounds what an idle worker holds to 16 × (8 + 16) KiB.

use std::cell::RefCell;

use bytes::BytesMut;

/// The most buffers of one class a worker keeps: enough for the connections a worker serves
/// at once between two idle moments in a keep-alive load, few enough that 10 000 parked
/// clients leave a worker with 384 KiB of them at most.
pub const KEEP: usize = 16;

/// A size of buffer the pool keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 8 KiB: a client connection's read buffer (a request head fits; hyper's first read
    /// buffer was the same).
    Read,
    /// 16 KiB: a backend connection's read buffer, and the response bytes gathered for a
    /// client before they are written.
    Data,
}

impl Class {
    /// The capacity of a buffer of this class.
    pub const fn bytes(self) -> usize {
        match self {
            Class::Read => 8 * 1024,
            Class::Data => 16 * 1024,
        }
    }

    /// Runs `f` on this thread's pool of the class; while the thread exits (its pool
    /// already gone: a connection dropped by a thread-local destructor), the default.
    fn with<R: Default>(self, f: impl FnOnce(&mut Vec<BytesMut>) -> R) -> R {
        thread_local! {
            static READ: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
            static DATA: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
        }
        let pool = match self {
            Class::Read => &READ,
            Class::Data => &DATA,
        };
        pool.try_with(|free| f(&mut free.borrow_mut()))
            .unwrap_or_default()
    }
}

/// An empty buffer of `class`'s capacity: one the worker kept whose bytes are no longer in use
/// anywhere, or a new one.
pub fn take(class: Class) -> BytesMut {
    class
        .with(|free| {
            // `try_reclaim` succeeds when no piece of the buffer's memory is alive any more (or
            // when what is its own alone still has room for a buffer of the class).
            while let Some(at) = free
                .iter_mut()
                .rposition(|buf| buf.try_reclaim(class.bytes()))
            {
                let buf = free.swap_remove(at);
                if buf.capacity() < class.bytes() * 2 {
                    return Some(buf);
                }
                // One that grew for a long head is let go.
            }
            None
        })
        .unwrap_or_else(|| BytesMut::with_capacity(class.bytes()))
}

/// Gives `buf` back to the worker's pool of `class`, emptied, unless the pool is full, `buf`
/// never had memory of its own, or it grew past twice the class's size (for a long head).
pub fn give(class: Class, mut buf: BytesMut) {
    buf.clear();
    let grown = buf.try_reclaim(class.bytes()) && buf.capacity() >= class.bytes() * 2;
    if buf.capacity() == 0 || grown {
        return;
    }
    class.with(|free| {
        if free.len() < KEEP {
            free.push(buf);
        }
    });
}

/// How many buffers of `class` this thread's pool holds.
pub fn kept(class: Class) -> usize {
    class.with(|free| free.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each test runs on its own thread, so starts with an empty pool.

    #[test]
    fn a_buffer_given_back_is_the_next_one_taken() {
        let mut buf = take(Class::Data);
        assert_eq!(buf.capacity(), Class::Data.bytes());
        buf.extend_from_slice(b"a response head");
        // A part split off and gone, as a parsed head is once written.
        drop(buf.split_to(5).freeze());
        let at = buf.as_ptr() as usize - 5;
        give(Class::Data, buf);
        assert_eq!(kept(Class::Data), 1);
        let again = take(Class::Data);
        assert_eq!(
            again.as_ptr() as usize,
            at,
            "the same memory, from its start"
        );
        assert!(again.is_empty());
        assert_eq!(again.capacity(), Class::Data.bytes());
        assert_eq!(kept(Class::Data), 0);
    }

    #[test]
    fn a_buffer_whose_bytes_are_still_in_use_is_taken_again_only_once_they_are_gone() {
        let mut buf = take(Class::Read);
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let at = buf.as_ptr() as usize;
        let head = buf.split().freeze();
        give(Class::Read, buf);
        assert_eq!(kept(Class::Read), 1);
        let other = take(Class::Read);
        assert_ne!(other.as_ptr() as usize, at, "its memory is the head's too");
        assert_eq!(kept(Class::Read), 1, "kept for when the head is gone");
        assert_eq!(&head[..4], b"GET ");
        drop(head);
        let again = take(Class::Read);
        assert_eq!(
            again.as_ptr() as usize,
            at,
            "the same memory, from its start"
        );
        assert_eq!(again.capacity(), Class::Read.bytes());
        assert_eq!(kept(Class::Read), 0);
        drop(other);
    }

    #[test]
    fn a_buffer_grown_past_its_class_or_never_allocated_is_not_taken_again() {
        let mut grown = take(Class::Read);
        grown.reserve(Class::Read.bytes() * 4);
        give(Class::Read, grown);
        give(Class::Read, BytesMut::new());
        assert_eq!(kept(Class::Read), 0);
        // One that grew while a piece of it was in use is let go when it is taken.
        let mut grown = take(Class::Read);
        grown.reserve(Class::Read.bytes() * 4);
        grown.resize(grown.capacity() - 100, b'h'); // a long head
        let head = grown.split().freeze();
        give(Class::Read, grown);
        assert_eq!(kept(Class::Read), 1);
        drop(head);
        let fresh = take(Class::Read);
        assert_eq!(fresh.capacity(), Class::Read.bytes());
        assert_eq!(kept(Class::Read), 0, "the grown one let go");
    }

    #[test]
    fn a_worker_keeps_at_most_keep_buffers_of_a_class() {
        let all: Vec<_> = (0..KEEP + 3).map(|_| take(Class::Read)).collect();
        for buf in all {
            give(Class::Read, buf);
        }
        assert_eq!(kept(Class::Read), KEEP);
        assert_eq!(kept(Class::Data), 0, "classes apart");
    }
}
