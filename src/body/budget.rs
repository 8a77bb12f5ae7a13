//! Owns the memory budget that every in-memory body buffer of the process draws from
//! (`[buffering] memory_limit`), and where bodies past it go (`[buffering] temp_dir`).
//!
//! One budget serves every worker, every connection and every HTTP/2 stream, so that many
//! streams of one client cannot hold more memory than the operator allowed: a buffer takes a
//! [`Memory`] reservation before it keeps bytes, and a body that cannot have one goes to a
//! temporary file at once ([`crate::body::spill`]). The reservation is the gauge
//! `kaproxy_body_buffer_bytes{location="memory"}` itself: one atomic add per grant.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::BufferingConfig;
use crate::metrics::BufferMetrics;

/// The process-wide budget, shared by every generation of the configuration (a reload changes
/// its limit; bodies in flight keep counting).
struct Budget {
    limit: AtomicUsize,
    metrics: BufferMetrics,
}

/// What a body buffer needs: the budget, the temp directory and the metrics. Cheap to clone.
#[derive(Clone)]
pub struct Buffering {
    budget: Arc<Budget>,
    /// `temp_dir`, resolved (the system's temp dir when not set).
    dir: Arc<Path>,
}

impl Buffering {
    /// A new budget with `cfg`'s limit and directory.
    pub fn new(cfg: &BufferingConfig, metrics: BufferMetrics) -> Buffering {
        let budget = Arc::new(Budget {
            limit: AtomicUsize::new(0),
            metrics,
        });
        Buffering {
            budget,
            dir: Arc::from(PathBuf::new().as_path()),
        }
        .reconfigured(cfg)
    }

    /// The same budget with `cfg`'s limit and directory (reload): what is held stays counted.
    pub fn reconfigured(&self, cfg: &BufferingConfig) -> Buffering {
        self.budget.limit.store(cfg.memory_limit, Ordering::Relaxed);
        self.budget
            .metrics
            .memory_limit
            .set(cfg.memory_limit as i64);
        let dir = cfg.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
        Buffering {
            budget: self.budget.clone(),
            dir: Arc::from(dir.as_path()),
        }
    }

    /// An empty reservation, to grow with [`Memory::try_grow`].
    pub fn memory(&self) -> Memory {
        Memory {
            budget: self.budget.clone(),
            bytes: 0,
        }
    }

    /// `n` bytes of the budget, if it has them.
    pub fn try_reserve(&self, n: usize) -> Option<Memory> {
        let mut m = self.memory();
        m.try_grow(n).then_some(m)
    }

    /// Where bodies spill.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn metrics(&self) -> &BufferMetrics {
        &self.budget.metrics
    }

    /// Bytes held in memory by every body buffer now.
    pub fn memory_bytes(&self) -> u64 {
        self.budget.metrics.memory.get().max(0) as u64
    }

    /// Bytes held in temporary files now.
    pub fn disk_bytes(&self) -> u64 {
        self.budget.metrics.disk.get().max(0) as u64
    }

    /// `memory_limit` now.
    pub fn memory_limit(&self) -> usize {
        self.budget.limit.load(Ordering::Relaxed)
    }
}

/// Bytes of the budget held by one buffer; given back when dropped.
pub struct Memory {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Memory {
    /// Takes `n` more bytes if the budget has them.
    pub fn try_grow(&mut self, n: usize) -> bool {
        let gauge = &self.budget.metrics.memory;
        let before = gauge.inc_by(n as i64);
        if before.saturating_add(n as i64) > self.budget.limit.load(Ordering::Relaxed) as i64 {
            gauge.dec_by(n as i64);
            return false;
        }
        self.bytes += n;
        true
    }

    /// Takes `n` more bytes whether or not the budget has them: one frame in flight of a
    /// body that could go nowhere else (it streams, as a body without buffering would).
    pub fn force_grow(&mut self, n: usize) {
        self.budget.metrics.memory.inc_by(n as i64);
        self.bytes += n;
    }

    /// Gives `n` bytes back (at most what is held).
    pub fn shrink(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.budget.metrics.memory.dec_by(n as i64);
        self.bytes -= n;
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.metrics.memory.dec_by(self.bytes as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffering(limit: usize) -> Buffering {
        let cfg = BufferingConfig {
            memory_limit: limit,
            temp_dir: None,
        };
        Buffering::new(&cfg, crate::metrics::Metrics::new().buffering())
    }

    #[test]
    fn reservations_stay_within_the_limit_and_are_given_back() {
        let b = buffering(100);
        let mut a = b.try_reserve(60).expect("60 of 100");
        assert!(b.try_reserve(41).is_none(), "60 + 41 > 100");
        let c = b.try_reserve(40).expect("60 + 40 = 100");
        assert_eq!(b.memory_bytes(), 100);
        assert!(!a.try_grow(1), "full");
        drop(c);
        assert!(a.try_grow(40));
        a.shrink(70);
        assert_eq!((a.bytes(), b.memory_bytes()), (30, 30));
        drop(a);
        assert_eq!(b.memory_bytes(), 0, "all given back");
    }

    #[test]
    fn a_reload_changes_the_limit_of_the_same_budget() {
        let b = buffering(100);
        let held = b.try_reserve(80).unwrap();
        let smaller = b.reconfigured(&BufferingConfig {
            memory_limit: 50,
            temp_dir: Some(PathBuf::from("/var/tmp")),
        });
        assert_eq!(smaller.memory_bytes(), 80, "what is held stays counted");
        assert!(smaller.try_reserve(1).is_none(), "80 held > 50");
        assert_eq!(smaller.dir(), Path::new("/var/tmp"));
        drop(held);
        assert!(smaller.try_reserve(50).is_some());
    }

    #[test]
    fn forced_growth_is_counted_and_given_back() {
        let b = buffering(10);
        let mut m = b.memory();
        m.force_grow(25);
        assert_eq!(b.memory_bytes(), 25);
        assert!(b.try_reserve(1).is_none(), "over the limit now");
        drop(m);
        assert_eq!(b.memory_bytes(), 0);
    }
}
