//! Owns how kaproxy takes a lock, the one way across the crate: every mutex guards plain
//! state (lists, counters, handles) that a panic elsewhere cannot leave half-changed, so a
//! poisoned lock is used as is rather than spreading the panic (and never `unwrap`ped in a
//! `Drop`).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, recovering it if a panic poisoned it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
