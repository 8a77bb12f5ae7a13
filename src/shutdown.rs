//! Owns how a running kaproxy tells its tasks to stop (mini-redis's `Shutdown`): the server
//! holds the one [`ShutdownSignal`]; every accept loop, connection, admin listener and the
//! history hold a [`Shutdown`] and stop, or drain, once it has begun.

use tokio::sync::watch;

/// The server's side: begins the shutdown every [`Shutdown`] it handed out waits for.
#[derive(Debug)]
pub struct ShutdownSignal(watch::Sender<bool>);

/// A task's side: whether the server shuts down, and a future that resolves once it does.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl ShutdownSignal {
    pub fn new() -> Self {
        ShutdownSignal(watch::channel(false).0)
    }

    /// A handle for one more task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }

    /// Begins the shutdown: every [`Shutdown::begun`] resolves, now and later.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }
}

impl Default for ShutdownSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// True once the shutdown has begun.
    pub fn is_begun(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the shutdown has begun (at once if it already has), or the signal is
    /// gone: a server that no longer exists is shutting down too.
    pub async fn begun(&mut self) {
        let _ = self.0.wait_for(|begun| *begun).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_handle_sees_the_shutdown_even_one_subscribed_after_it_began() {
        let signal = ShutdownSignal::new();
        let mut early = signal.subscribe();
        assert!(!early.is_begun());
        let waiting = tokio::spawn(async move { early.begun().await });
        signal.begin();
        waiting.await.expect("the waiting task resolves");
        let mut late = signal.subscribe();
        assert!(late.is_begun());
        late.begun().await;
    }

    #[tokio::test]
    async fn a_dropped_signal_counts_as_shutdown() {
        let signal = ShutdownSignal::new();
        let mut handle = signal.subscribe();
        drop(signal);
        handle.begun().await;
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_resolves_before_the_shutdown_begins() {
        let signal = ShutdownSignal::new();
        let mut handle = signal.subscribe();
        let waited = tokio::time::timeout(std::time::Duration::from_secs(60), handle.begun()).await;
        assert!(waited.is_err(), "begun() resolved with no shutdown");
    }
}
