//! Owns a tunnel once the backend has switched protocols (README, "Upgrade tunnels"): the
//! client's side and the backend's joined, bytes copied both ways until a side closes or
//! nothing has moved either way for `tunnel_idle_timeout`, counted in the backend's tunnel
//! metrics. Which upgrades are tunnelled, and the handshake, are [`super::tunnel`]'s.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::metrics::{BackendMetrics, TunnelEnd};

/// A tunnel the backend switched to (its `101` received), waiting for the client's side of
/// the connection once the `101` is written downstream.
pub struct Switched {
    pub(super) upstream: hyper::upgrade::OnUpgrade,
    pub(super) metrics: Arc<BackendMetrics>,
    pub(super) idle: Duration,
    /// One of the backend's `max_connections_per_server`, held while the tunnel runs.
    pub(super) slot: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl Switched {
    /// Copies between `down`, the client's side, and the backend until the tunnel ends
    /// ([`copy_until_idle`]).
    pub async fn run<D: AsyncRead + AsyncWrite + Unpin>(self, down: D) {
        let Ok(up) = self.upstream.await else {
            return;
        };
        let metrics = self.metrics;
        let end =
            copy_until_idle(down, hyper_util::rt::TokioIo::new(up), self.idle, &metrics).await;
        debug!(server = %metrics.server, end = end.as_str(), "tunnel closed");
        drop(self.slot);
    }
}

/// Copies bytes both ways (half-closes passed on) until both sides are done, one fails, or no
/// byte has arrived from either side for `idle` — which also ends a tunnel whose client (or
/// backend) stopped reading, since nothing more is read once its buffer is full. Counted in
/// `kaproxy_upstream_tunnels` while it runs and `kaproxy_upstream_tunnels_closed_total` after.
pub(super) async fn copy_until_idle<D, U>(
    down: D,
    up: U,
    idle: Duration,
    metrics: &BackendMetrics,
) -> TunnelEnd
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    metrics.tunnels.inc();
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut down = Active {
        io: down,
        start,
        last: last.clone(),
    };
    let mut up = Active {
        io: up,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    let end = loop {
        let quiet_until = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            done = &mut copy => break match done {
                Ok(_) => TunnelEnd::Closed,
                Err(e) => {
                    debug!(error = %e, "tunnel failed");
                    TunnelEnd::Error
                }
            },
            _ = tokio::time::sleep_until(quiet_until) => {
                let moved = start + Duration::from_millis(last.load(Ordering::Relaxed));
                if moved + idle <= Instant::now() {
                    warn!(server = %metrics.server, idle = ?idle, "tunnel idle past tunnel_idle_timeout; closed");
                    break TunnelEnd::Idle;
                }
            }
        }
    };
    metrics.tunnels.dec();
    metrics.tunnel_closed(end);
    end
}

/// One side of a tunnel, recording when bytes last arrived from it (ms since `start`).
struct Active<T> {
    io: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = self.start.elapsed().as_millis() as u64;
            self.last.store(now, Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_with_no_traffic_closes_after_the_idle_timeout_and_traffic_resets_it() {
        let metrics = crate::metrics::Metrics::new();
        let m = metrics.server("web", "127.0.0.1:9".parse().unwrap());
        let (down, mut client) = tokio::io::duplex(1024);
        let (up, mut backend) = tokio::io::duplex(1024);
        let idle = Duration::from_secs(60);
        let started = Instant::now();
        let tunnel = tokio::spawn({
            let m = m.clone();
            async move { copy_until_idle(down, up, idle, &m).await }
        });
        tokio::time::sleep(Duration::from_secs(50)).await;
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        backend.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(m.tunnels.get(), 1);
        let end = tunnel.await.unwrap();
        assert_eq!(end, TunnelEnd::Idle);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(110),
            "60 s after the last byte, which came at 50 s"
        );
        assert_eq!((m.tunnels.get(), m.tunnels_closed(TunnelEnd::Idle)), (0, 1));
    }

    #[tokio::test]
    async fn a_tunnel_closed_by_both_sides_ends_as_closed() {
        let metrics = crate::metrics::Metrics::new();
        let m = metrics.server("web", "127.0.0.1:9".parse().unwrap());
        let (down, mut client) = tokio::io::duplex(1024);
        let (up, mut backend) = tokio::io::duplex(1024);
        let tunnel = tokio::spawn({
            let m = m.clone();
            async move { copy_until_idle(down, up, Duration::from_secs(60), &m).await }
        });
        client.shutdown().await.unwrap();
        backend.shutdown().await.unwrap();
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(tunnel.await.unwrap(), TunnelEnd::Closed);
        assert_eq!(m.tunnels_closed(TunnelEnd::Closed), 1);
    }
}
