//! Owns answering one request of a downstream connection, on either protocol and from either
//! HTTP/1.1 loop ([`super::h1`], or hyper's in [`super::conn`]): the proxy of the configuration
//! current when it arrives, the `Keep-Alive` or `Connection: close` of the response, the
//! in-flight guard its body carries ([`TrackedBody`]), and `send_timeout` on an HTTP/2 stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tracing::debug;

use crate::body::{BodyDone, ClientBody};
use crate::config::DownstreamConfig;
use crate::downstream::send_watch::SendWatch;
use crate::downstream::timers::{ConnState, InFlight};
use crate::downstream::Generation;
use crate::http1::head::Fields;
use crate::proxy::{forwarded_into_map, DownstreamInfo, ForwardedHead, ProxyBody, Switched};

/// The most header fields a request may have, on either protocol: hyper's HTTP/1 parser
/// answers 431 past 100 fields, and Apache's `LimitRequestFields` is 100 too; HTTP/2 requests
/// are held to the same (their bytes are bounded by `max_header_bytes` in both).
pub const MAX_HEADER_FIELDS: usize = 100;

/// The response body downstream: kaproxy's body plus the in-flight guard.
pub struct TrackedBody<B> {
    inner: B,
    _guard: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body of a response downstream: kaproxy's, under `send_timeout` on an HTTP/2 stream
/// when it streams from a pooled upstream connection, with the in-flight guard.
pub(super) type ResponseBody = TrackedBody<Either<ProxyBody, SendWatch<ProxyBody>>>;

/// What answering a request on this connection needs, shared by its requests.
pub(super) struct Requests {
    /// The configuration generation current now: each request uses the one current when it
    /// arrives (reload).
    current: Arc<ArcSwap<Generation>>,
    info: DownstreamInfo,
    cfg: Arc<DownstreamConfig>,
    state: Arc<ConnState>,
    http2: bool,
    /// `Keep-Alive: timeout=N` (`advertise_keep_alive`), shared by the worker's connections.
    keep_alive: HeaderValue,
}

/// `timeout=N` for `Keep-Alive`, made once per worker for each `idle_timeout` (of `secs`).
fn advertised(secs: u64) -> HeaderValue {
    crate::headers::per_connection(crate::headers::PerConnection::KeepAlive, secs, || {
        HeaderValue::from_str(&format!("timeout={secs}")).expect("digits are a valid header value")
    })
}

impl Requests {
    pub(super) fn new(
        info: DownstreamInfo,
        current: Arc<ArcSwap<Generation>>,
        cfg: &Arc<DownstreamConfig>,
        state: Arc<ConnState>,
        http2: bool,
    ) -> Self {
        Requests {
            current,
            info,
            cfg: cfg.clone(),
            state,
            http2,
            keep_alive: advertised(cfg.idle_timeout.as_secs()),
        }
    }

    /// The hyper service answering this connection's requests.
    pub(super) fn service(
        self: Arc<Self>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<ResponseBody>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<ResponseBody>, Infallible>>
                     + Send
                     + 'static,
    > + Clone
           + Send
           + 'static {
        service_fn(move |req| {
            let requests = self.clone();
            async move { Ok(requests.answer(req.map(ClientBody::Hyper), None).await.resp) }
        })
    }

    /// Answers one request (from hyper, or from kaproxy's own loop, [`super::h1`]: `own`, the
    /// fields of the head it parsed, which the proxy reads in place of the request's map),
    /// with the `Keep-Alive` or `Connection: close` of its connection's HTTP/1.1 response. For
    /// the own loop a backend's head comes apart, as received, its fields not in the header
    /// map, and so does the tunnel of a `101`; for hyper the fields are moved into the map.
    pub(super) async fn answer(
        &self,
        mut req: Request<ClientBody>,
        own: Option<&Fields>,
    ) -> Answered {
        let (state, cfg, http2) = (&self.state, &self.cfg, self.http2);
        let (guard, n) = state.request_started();
        if !req.body().is_end_stream() {
            let done: BodyDone = Arc::new(state.body_started());
            req.extensions_mut().insert(done);
        }
        let mut resp = if http2 && req.headers().len() > MAX_HEADER_FIELDS {
            // The limit HTTP/1 requests meet in hyper's parser, for HTTP/2 too.
            debug!(
                fields = req.headers().len(),
                "HTTP/2 request with too many header fields; 431"
            );
            crate::proxy::local_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields\n",
            )
        } else {
            let proxy = self.current.load().proxy.clone();
            proxy.handle(req, own, &self.info).await
        };
        let (forwarded, switched) = if own.is_some() {
            let body = resp.body_mut();
            (body.take_forwarded(), body.take_switched())
        } else {
            forwarded_into_map(&mut resp);
            (None, None)
        };
        let last = n >= cfg.max_requests_per_connection;
        if http2 && n == cfg.max_requests_per_connection {
            state.goaway().notify_one();
        }
        let mut keep_alive = None;
        if !http2 && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let headers = resp.headers_mut();
            if last {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            } else if cfg.advertise_keep_alive && !headers.contains_key(header::CONNECTION) {
                if own.is_some() {
                    // Written after the map's fields, where the map would have it: no map
                    // grown for the one field every answer gets.
                    keep_alive = Some(self.keep_alive.clone());
                } else {
                    headers.insert(crate::headers::KEEP_ALIVE, self.keep_alive.clone());
                }
            }
        }
        // A body streaming from a pooled upstream connection goes under send_timeout on an
        // HTTP/2 stream, whose closed window the socket's write deadline cannot see.
        let watch = http2 && resp.body().streams_from_upstream();
        let resp = resp.map(|body| TrackedBody {
            inner: if watch {
                Either::Right(SendWatch::new(
                    body,
                    cfg.send_timeout,
                    Some(state.stalled().clone()),
                ))
            } else {
                Either::Left(body)
            },
            _guard: guard,
        });
        Answered {
            resp,
            forwarded,
            switched,
            keep_alive,
        }
    }
}

/// A request's answer, as [`Requests::answer`] gives it.
pub(super) struct Answered {
    pub resp: Response<ResponseBody>,
    /// The backend's head, for the own loop to write from its bytes.
    pub forwarded: Option<Box<ForwardedHead>>,
    /// The tunnel of a `101`, for the own loop to hand the connection to once it is written.
    pub switched: Option<Box<Switched>>,
    /// For the own loop: the `Keep-Alive` field to write after the response's map's fields
    /// (hyper's responses have it in the map).
    pub keep_alive: Option<HeaderValue>,
}
