//! Owns the HTTP/1.1 exchange on a pooled connection: sending a request and reading the
//! response head (and what it tells the pool of the backend's keep-alive), the response body
//! that gives the connection back when it ends, and the dedicated connection of an `Upgrade`
//! tunnel. The pool itself knows no HTTP: it is generic over its connector, as Pingora's
//! connection pool is.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Method;
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use tokio::sync::OwnedSemaphorePermit;

use crate::body::{BodyError, UpstreamBody};
use crate::error::{RequestError, WireError};
use crate::http1::body::BodyState;
use crate::http1::head::Name;
use crate::http1::head::ResponseHead;
use crate::metrics::CloseReason;
use crate::upstream::connect::{http1_handshake, Http1, Http1Conn};
use crate::upstream::delivery::Written;
use crate::upstream::keep_alive::KeepAliveHint;
use crate::upstream::pool::{Pool, PooledConn};
use crate::upstream::wire::{poll_head, read_head, Outgoing, OutgoingHead, Received, WriteError};

/// A send that failed before any response arrived.
pub struct SendFailure {
    pub error: RequestError,
    /// The request's body, when not a byte of the request was written: safe to send again,
    /// whatever the method.
    pub unsent: Option<UpstreamBody>,
    /// What of the request went to the socket, to ask whether the backend ever received it
    /// (once the connection is dropped; see [`crate::upstream::delivery`]).
    pub written: Option<Written>,
}

impl PooledConn<Http1> {
    /// Sends one request and waits for the response head, learning the backend's keep-alive
    /// settings from it. The caller bounds the wait with `response_timeout`. The request is
    /// written and the response read by the calling task ([`crate::upstream::wire`]); a body
    /// the backend answered before having all of it is written on as the response is read.
    /// The head is borrowed: the caller keeps it for a retry, and only the body moves.
    pub async fn send(
        &mut self,
        head: &OutgoingHead,
        body: UpstreamBody,
    ) -> Result<Received<ResponseBody>, SendFailure> {
        let addr = self.addr();
        let to_head = head.method() == Method::HEAD;
        let (conn, requests) = self.connection();
        *requests += 1;
        let written = Written::from_now(&conn.delivery);
        conn.outgoing = Some(Box::new(Outgoing::new(head, body)));
        let mut write_failed = None;
        let head = poll_fn(|cx| exchange(conn, &mut write_failed, cx)).await;
        let failed = match head {
            Ok(head) => match read_head(head, to_head) {
                Ok((resp, ends)) => {
                    self.observe(&resp.head, ends);
                    return Ok(resp.map(|state| ResponseBody { state }));
                }
                Err(e) => RequestError::from_wire(addr, e),
            },
            Err(failed) => failed.into_error(addr),
        };
        let unsent = conn_unsent(self);
        Err(SendFailure {
            error: failed,
            written: unsent.is_none().then_some(written),
            unsent,
        })
    }

    /// Tells the pool what the response head says of the backend's keep-alive, and whether
    /// the connection ends with this response.
    fn observe(&mut self, head: &ResponseHead, ends: bool) {
        let hint = head
            .fields
            .named(Name::KeepAlive)
            .next()
            .map(KeepAliveHint::parse)
            .unwrap_or_default();
        self.advertised(&hint, ends);
    }

    /// Wraps a response body so that the connection returns to the pool when the body ends.
    pub fn attach(self, body: ResponseBody) -> PooledBody {
        PooledBody {
            state: body.state,
            conn: Some(self),
        }
    }
}

/// The request's body, when nothing of it reached the socket.
fn conn_unsent(pooled: &mut PooledConn<Http1>) -> Option<UpstreamBody> {
    let (conn, _) = pooled.connection();
    conn.outgoing.take().and_then(|out| out.into_unsent())
}

/// Why no response head came.
enum Failed {
    /// The client's body broke while it was written.
    Body(BodyError),
    /// The connection: a write that failed is reported when reading found no answer either.
    Wire(WireError),
}

impl Failed {
    fn into_error(self, addr: std::net::SocketAddr) -> RequestError {
        match self {
            Failed::Body(e) => RequestError::BodyStreamed {
                addr,
                source: Box::new(e),
            },
            Failed::Wire(e) => RequestError::from_wire(addr, e),
        }
    }
}

/// Writes the request and reads the response head at once, as a backend may answer before
/// it has read the whole body (RFC 9112 §9.5). A write that fails does not end the exchange
/// while a response may still be read (a backend that answered, then closed); one that fails
/// before any byte went out does, the request being given back unsent.
fn exchange(
    conn: &mut Http1Conn,
    write_failed: &mut Option<std::io::Error>,
    cx: &mut Context<'_>,
) -> Poll<Result<ResponseHead, Failed>> {
    if let Some(out) = conn.outgoing.as_mut() {
        match out.poll_write(&mut conn.wire, cx) {
            Poll::Ready(Ok(())) => conn.outgoing = None,
            Poll::Ready(Err(WriteError::Body(e))) => return Poll::Ready(Err(Failed::Body(e))),
            Poll::Ready(Err(WriteError::Io(e))) => {
                if !out.wrote_any() {
                    return Poll::Ready(Err(Failed::Wire(e.into())));
                }
                conn.outgoing = None;
                *write_failed = Some(e);
            }
            Poll::Pending => {}
        }
    }
    match poll_head(&mut conn.wire, cx) {
        Poll::Ready(Err(read)) => Poll::Ready(Err(Failed::Wire(match write_failed.take() {
            Some(e) => e.into(),
            None => read,
        }))),
        other => other.map_err(Failed::Wire),
    }
}

/// A response body as its head said it is framed, until attached to its connection.
pub struct ResponseBody {
    state: BodyState,
}

/// A response body streaming from a pooled connection; the connection goes back to the pool
/// at end of stream (kaproxy's idle clock starts only when the whole response has arrived,
/// which is never before the backend's own clock starts).
pub struct PooledBody {
    state: BodyState,
    conn: Option<PooledConn>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        let this = &mut *self;
        let Some(pooled) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let Some(conn) = pooled.live() else {
            return Poll::Ready(None);
        };
        // The rest of a request the backend answered early goes on being written; if it
        // cannot be, the connection is not reused.
        if conn.outgoing.is_some() && conn.poll_outgoing(cx) == Poll::Ready(false) {
            pooled.retire_after(CloseReason::Error);
        }
        let Some(conn) = pooled.live() else {
            return Poll::Ready(None);
        };
        let res = conn.wire.poll_body(&mut this.state, cx);
        match &res {
            Poll::Ready(Some(Err(_))) => drop(this.conn.take()),
            Poll::Ready(_) if this.state.is_done() => {
                if let Some(conn) = this.conn.take() {
                    conn.release();
                }
            }
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.state.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.state.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, Content-Length: 0) may never be polled.
        if let Some(conn) = self.conn.take() {
            if self.state.is_done() {
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
