//! Owns the HTTP/1.1 exchange on a pooled connection: sending a request and reading the
//! response head (and what it tells the pool of the backend's keep-alive), the response body
//! that gives the connection back when it ends, and the dedicated connection of an `Upgrade`
//! tunnel. The pool itself knows no HTTP: it is generic over its connector, as Pingora's
//! connection pool is.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::sync::OwnedSemaphorePermit;

use crate::body::UpstreamBody;
use crate::error::RequestError;
use crate::headers::{connection_has, KEEP_ALIVE};
use crate::metrics::CloseReason;
use crate::upstream::connect::{http1_handshake, Http1, Http1Conn};
use crate::upstream::delivery::Written;
use crate::upstream::keep_alive::KeepAliveHint;
use crate::upstream::pool::{Pool, PooledConn};

/// A send that failed before any response arrived.
pub struct SendFailure {
    pub error: RequestError,
    /// The request, when hyper gave it back unsent: safe to send again whatever the method.
    pub unsent: Option<Request<UpstreamBody>>,
    /// What of the request went to the socket, to ask whether the backend ever received it
    /// (once the connection is dropped; see [`crate::upstream::delivery`]).
    pub written: Option<Written>,
}

impl PooledConn<Http1> {
    /// Sends one request and waits for the response head, learning the backend's keep-alive
    /// settings from it. The caller bounds the wait with `response_timeout`. The connection is
    /// driven by the calling task (see [`crate::upstream::connect::Driver`]).
    pub async fn send(
        &mut self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, SendFailure> {
        let addr = self.addr();
        let (conn, requests) = self.connection();
        let Http1Conn {
            sender,
            driver,
            delivery,
        } = conn;
        if let Err(e) = driver
            .drive(std::future::poll_fn(|cx| sender.poll_ready(cx)))
            .await
        {
            self.retire_after(CloseReason::ServerClose);
            return Err(SendFailure {
                error: RequestError::from_send(addr, e),
                unsent: Some(req),
                written: None,
            });
        }
        *requests += 1;
        let written = Written::from_now(delivery);
        let sent = sender.try_send_request(req);
        match driver.drive(sent).await {
            Ok(resp) => {
                self.observe(resp.headers());
                Ok(resp)
            }
            Err(mut e) => {
                let unsent = e.take_message();
                Err(SendFailure {
                    error: RequestError::from_send(addr, e.into_error()),
                    unsent,
                    written: Some(written),
                })
            }
        }
    }

    /// Tells the pool what the response head says of the backend's keep-alive.
    fn observe(&mut self, headers: &HeaderMap) {
        let hint = headers
            .get(KEEP_ALIVE)
            .map(|v| KeepAliveHint::parse(v.as_bytes()))
            .unwrap_or_default();
        self.advertised(&hint, connection_has(headers, "close"));
    }

    /// Wraps a response body so that the connection returns to the pool when the body ends.
    pub fn attach(self, body: Incoming) -> PooledBody {
        PooledBody {
            inner: body,
            conn: Some(self),
        }
    }
}

/// A response body streaming from a pooled connection; the connection goes back to the pool
/// at end of stream (kaproxy's idle clock starts only when the whole response has arrived,
/// which is never before the backend's own clock starts).
pub struct PooledBody {
    inner: Incoming,
    conn: Option<PooledConn>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // This task drives the connection the body comes from (connect.rs, `Driver`).
        if let Some(conn) = self.conn.as_mut().and_then(PooledConn::live) {
            let _ = conn.driver.poll(cx);
        }
        let res = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match stream_end(&res, &self.inner) {
            Some(true) => {
                if let Some(conn) = self.conn.take() {
                    conn.release();
                }
            }
            Some(false) => drop(self.conn.take()),
            None => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether the poll that gave `res` ended the body `inner`: `Some(true)` cleanly (its last
/// frame, or the end), `Some(false)` with an error, `None` not yet.
fn stream_end(
    res: &Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
    inner: &Incoming,
) -> Option<bool> {
    match res {
        Poll::Ready(None) => Some(true),
        Poll::Ready(Some(Err(_))) => Some(false),
        Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => Some(true),
        _ => None,
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, Content-Length: 0) may never be polled.
        if let Some(conn) = self.conn.take() {
            if self.inner.is_end_stream() {
                conn.release();
            }
        }
    }
}

impl Pool<Http1> {
    /// A dedicated, never pooled, upgrade-capable connection for a tunnel, with the slot of
    /// `max_connections_per_server` it holds while it lives (see [`Pool::unpooled_slot`]).
    pub async fn tunnel_connect(
        self: &Arc<Self>,
    ) -> Result<(SendRequest<UpstreamBody>, Arc<OwnedSemaphorePermit>), RequestError> {
        let slot = Arc::new(self.unpooled_slot().await?);
        let addr = self.addr();
        let stream = self.connector().open(addr, self.config()).await?;
        let (sender, conn) = http1_handshake::<_, UpstreamBody>(stream)
            .await
            .map_err(|source| RequestError::Handshake { addr, source })?;
        // Until upgraded (or done), the connection holds the slot; then the tunnel does.
        let held = slot.clone();
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
            drop(held);
        });
        Ok((sender, slot))
    }
}
