//! Owns the worker runtimes: `[runtime] worker_threads` independent current-thread tokio
//! runtimes, one thread each (nginx's worker processes, Pingora's no-steal runtime). A client
//! connection is accepted by one worker's `SO_REUSEPORT` listener and lives its whole life on
//! that thread, with that worker's upstream pools; nothing is stolen across threads. Code
//! running on a worker asks [`index`] which one it is.

use std::cell::Cell;
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Threads of each runtime's blocking pool, where the temporary files of spilled bodies are
/// written and read (`body::spill`) and a reload reads its file. One frame's write takes
/// microseconds, so a few threads keep up with any network (nginx writes its temp files on
/// the event loop itself); tokio's default of 512 turned 2 400 spilling HTTP/2 streams into
/// 390 threads and 200 MiB of stacks and allocator heaps (bench/SLOW_CLIENTS.md).
pub const MAX_BLOCKING_THREADS: usize = 8;

/// The index of the worker running the caller (0 outside the worker threads: the one runtime
/// of a single-worker server, or a test's).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers `worker_threads = n` means: n, or with 0 one per core available to the
/// process (its CPU affinity included, as nginx's `worker_processes auto`).
pub fn count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Running worker threads, each blocked on its current-thread runtime until [`Workers::stop`].
pub struct Workers {
    handles: Arc<[Handle]>,
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Workers {
    /// Starts `n` workers; `on_park` runs on a worker each time its runtime goes idle.
    pub fn start(n: usize, on_park: Arc<dyn Fn() + Send + Sync>) -> io::Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let park = on_park.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(MAX_BLOCKING_THREADS)
                .on_thread_park(move || park())
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("kaproxy-worker-{i}"))
                .spawn(move || {
                    INDEX.with(|c| c.set(i));
                    let _ = runtime.block_on(stopped);
                    // Lingering closes must not hold the exit.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })?;
            threads.push((stop, thread));
        }
        Ok(Workers {
            handles: handles.into(),
            threads,
        })
    }

    /// One handle per worker, in index order.
    pub fn handles(&self) -> Arc<[Handle]> {
        self.handles.clone()
    }

    /// Stops every worker's runtime (its tasks are dropped) and waits for the threads.
    pub fn stop(self) {
        for (stop, thread) in self.threads {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
