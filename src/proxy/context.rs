//! Owns one routed request's context — its upstream group, the client's IP, its version, its
//! start, its access record — and kaproxy's answers to its failures (a client fault 400/408/413,
//! an upstream failure 502/503/504), each counted, logged and access-logged one way.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{Response, Version};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::body::BodyError;
use crate::error::RequestError;
use crate::upstream::group::UpstreamGroup;
use crate::upstream::pool::Pool;

use super::answer::{closing, local_response, ProxyBody};
use super::log::AccessRecord;

/// What every phase after routing needs to know of the request, passed as one value.
pub(super) struct RequestContext<'a> {
    pub(super) group: &'a UpstreamGroup,
    /// The client, as `[forwarded]` resolves it (ip-hash and the logs use it).
    pub(super) client_ip: IpAddr,
    /// The downstream request's version (an HTTP/1 connection is closed after a fault).
    pub(super) version: Version,
    pub(super) start: Instant,
    /// None with `access_log = false`.
    pub(super) log: Option<Box<AccessRecord>>,
}

impl RequestContext<'_> {
    /// kaproxy's answer when the client's request body failed (timeout, bad framing, gone, too
    /// large: counted as a 413 of the group) or could not be kept (no temporary file): never
    /// the backend's fault, so no backend is counted or blamed for it (README, "Hostile
    /// clients").
    pub(super) fn client_failed(self, err: &BodyError) -> Response<ProxyBody> {
        if matches!(err, BodyError::TooLarge(_)) {
            self.group.too_large.inc();
        }
        let status = err.status();
        let text = match err {
            BodyError::Timeout(_) => "request body timed out\n",
            BodyError::Malformed(_) => "malformed request body\n",
            BodyError::TooLarge(_) => "request body too large\n",
            BodyError::Spill(_) => "the request body could not be buffered\n",
        };
        match err {
            BodyError::Spill(e) => {
                warn!(client = %self.client_ip, dir = %e.dir.display(), error = %e.source, status = status.as_u16(),
                    "cannot buffer a request body in [buffering] temp_dir; no backend contacted")
            }
            _ => {
                info!(client = %self.client_ip, error = %err, status = status.as_u16(), "request body failed")
            }
        }
        let version = self.version;
        self.answer(closing(local_response(status, text), version))
    }

    /// kaproxy's answer when the picked server failed the request (the caller has counted the
    /// error): counted as an answer of that server, logged with its cause, access-logged.
    pub(super) fn server_failed(self, pool: &Pool, err: &RequestError) -> Response<ProxyBody> {
        let status = err.status();
        pool.metrics().request(status.as_u16());
        warn!(upstream = %self.group.name, server = %pool.addr(), error = %err, status = status.as_u16(), "upstream failed");
        let text = match err {
            RequestError::ResponseTimeout { .. } => "upstream timed out\n",
            _ => "upstream failed\n",
        };
        self.answer(local_response(status, text))
    }

    /// A response kaproxy made itself, with the access record attached (errors are logged too).
    pub(super) fn answer(self, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
        if let Some(mut log) = self.log {
            log.status = resp.status().as_u16();
            resp.body_mut().log = Some(log);
        }
        resp
    }
}

/// `response_timeout` for one server's answer, and what its passing is: the one mapping of
/// an elapsed response deadline to the 504's error, for the head (plain and tunnelled) and
/// for a body read ahead or relayed.
#[derive(Debug, Clone, Copy)]
pub(super) struct ResponseDeadline {
    pub(super) addr: SocketAddr,
    pub(super) limit: Duration,
}

impl ResponseDeadline {
    /// The error of a response that did not come within the limit.
    pub(super) fn elapsed(&self) -> RequestError {
        RequestError::ResponseTimeout {
            addr: self.addr,
            timeout: self.limit,
        }
    }

    /// `work` within the limit, counted from now.
    pub(super) async fn bound<F: std::future::Future>(
        &self,
        work: F,
    ) -> Result<F::Output, RequestError> {
        tokio::time::timeout(self.limit, work)
            .await
            .map_err(|_| self.elapsed())
    }
}
