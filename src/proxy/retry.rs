//! Owns failover and retries: picking a server and connecting with failover to the next one,
//! and the rule for sending a request again after a failure before any response byte.
//!
//! The rule, stated once (it covers the keep-alive race, where a pooled connection is reused
//! just as the backend closes it; README, "When a request is sent again"): a request is sent
//! again only when no response byte came back, its body can be sent again (empty or buffered
//! whole), and either not a byte of it was written (any method), or the method is idempotent with
//! `retry_idempotent`, or — on a reused connection that was reset — the backend's TCP stack
//! acknowledged none of its bytes, so it never reached the backend (any method;
//! [`crate::upstream::delivery`]). A failed *reused* connection is retried once on a fresh
//! connection to the same server, which is not blamed; a connect failure, or a reset or close
//! on a *fresh* connection, blames the server and moves on to a server not tried yet within
//! `max_retries`, at once; only when every server has been tried does the next attempt wait
//! the doubling back-off and start over with them all. Each failure says its part of the rule
//! ([`crate::error::Retry`]): a connect failure allows any method, a reset or close a request
//! that can be sent again, a response timeout only with `retry_on_timeout`, and a client's
//! broken body nothing.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Response, StatusCode};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::body::{SentWhole, UpstreamBody};
use crate::config::RetryConfig;
use crate::error::{RequestError, Retry, Side};
use crate::metrics::{ErrorKind, RetryCause};
use crate::upstream::backend::{
    Backend, RELIEVE_AFTER, RELIEVE_CHECKS, RELIEVE_CLOSES, RELIEVE_PROBE_CHECKS,
};
use crate::upstream::exchange::SendFailure;
use crate::upstream::pool::Pool;
use crate::upstream::wire::OutgoingHead;

use super::answer::{local_response, ProxyBody};
use super::context::{RequestContext, ResponseDeadline};
use super::response::Sent;
use super::UpstreamGroup;

/// The retry back-off doubles up to this (README, `retry_backoff`: "doubling, capped at 1 s").
pub(super) const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// A request's failover state: its group and client (whom the balancer picks for), the
/// servers already tried, what is left of `max_retries`, and the next back-off.
pub(super) struct Failover<'a> {
    group: &'a UpstreamGroup,
    client_ip: IpAddr,
    tried: Vec<Arc<Backend>>,
    retries_left: u32,
    backoff: Duration,
}

pub(super) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl<'a> Failover<'a> {
    pub(super) fn new(ctx: &RequestContext<'a>) -> Self {
        let retry = &ctx.group.config.retry;
        Failover {
            group: ctx.group,
            client_ip: ctx.client_ip,
            tried: Vec::new(),
            retries_left: retry.max_retries,
            backoff: retry.retry_backoff,
        }
    }

    /// Picks a server and connects to it. A connect failure sent nothing, so for any method
    /// kaproxy marks it against the server's health and moves on to the next server, up to
    /// `max_retries` times with a doubling back-off. Errors become the answer to send.
    pub(super) async fn connect<T, F, Fut>(
        &mut self,
        mut connect: F,
    ) -> Result<(Arc<Backend>, T), Response<ProxyBody>>
    where
        F: FnMut(Arc<Pool>) -> Fut,
        Fut: std::future::Future<Output = Result<T, RequestError>>,
    {
        let group = self.group;
        loop {
            let Some(backend) = group
                .balancer
                .pick(self.client_ip, &self.tried, Instant::now())
                .cloned()
            else {
                warn!(upstream = %group.name, tried = self.tried.len(), "every server of the upstream failed; 502");
                return Err(local_response(
                    StatusCode::BAD_GATEWAY,
                    "no upstream server could be reached\n",
                ));
            };
            match connect(backend.pool().clone()).await {
                Ok(conn) => return Ok((backend, conn)),
                Err(err) if err.retry() == Retry::AnyMethod => {
                    if !self.connect_failed(&backend, &err).await {
                        return Err(local_response(err.status(), "upstream unavailable\n"));
                    }
                }
                Err(err) => {
                    err.count_in(backend.metrics());
                    warn!(upstream = %group.name, server = %backend.addr, error = %err,
                        status = err.status().as_u16(), "upstream failed");
                    return Err(local_response(err.status(), "upstream unavailable\n"));
                }
            }
        }
    }

    /// Books a connect failure on `backend`; returns whether another server may be tried
    /// (after the back-off, which it sleeps).
    async fn connect_failed(&mut self, backend: &Arc<Backend>, err: &RequestError) -> bool {
        err.count_in(backend.metrics());
        backend.record_failure();
        self.move_on(backend, err).await
    }

    /// `backend` failed the request (already counted and booked against its health):
    /// returns whether another attempt may be made, within `max_retries`: at once on a server
    /// not tried yet, else — every server tried — after the doubling back-off (which it
    /// sleeps), on them all again. Counted in `kaproxy_upstream_retries_total` with the
    /// failure's kind as cause (`connect` for every connect failure).
    async fn move_on(&mut self, backend: &Arc<Backend>, err: &RequestError) -> bool {
        let group = self.group;
        self.tried.push(backend.clone());
        if self.retries_left == 0 {
            warn!(upstream = %group.name, server = %backend.addr, error = %err, "upstream failed; no retries left");
            return false;
        }
        // Every connect failure (refused, timed out, handshake) is cause `connect`.
        let cause = match (err.retry(), err.kind()) {
            (Retry::AnyMethod, _) => ErrorKind::Connect,
            (_, Some(kind)) => kind,
            (_, None) => return false,
        };
        self.retries_left -= 1;
        backend.metrics().retry(RetryCause::Failed(cause));
        let servers = group.balancer.backends().len();
        if self.tried.len() < servers {
            // Another server is not this one's failure: nginx moves on at once too.
            warn!(upstream = %group.name, server = %backend.addr, error = %err,
                "upstream failed; trying the next server");
            return true;
        }
        warn!(upstream = %group.name, server = %backend.addr, error = %err, backoff = ?self.backoff,
            "upstream failed; every server tried, trying them again after the back-off");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_RETRY_BACKOFF);
        self.tried.clear();
        true
    }
}

/// What a written request is sent again with, when the rule (module doc) allows it: a body
/// that is empty or buffered whole, and either an idempotent method with `retry_idempotent`
/// or proof that the backend never received it.
pub(super) struct Resend {
    /// The body again, when it can be sent again (the head stays with the caller).
    body: Option<UpstreamBody>,
    /// Idempotent, with `retry_idempotent`: may go again after any reset or close.
    idempotent: bool,
}

impl Resend {
    pub(super) fn new(retry: &RetryConfig, method: &Method, body: &UpstreamBody) -> Resend {
        Resend {
            body: body.replay(),
            idempotent: is_idempotent(method) && retry.retry_idempotent,
        }
    }

    /// Whether its body can be sent again (empty or buffered whole).
    fn replayable(&self) -> bool {
        self.body.is_some()
    }

    /// The body again (the rule decided the request may go).
    fn again(&self) -> Option<UpstreamBody> {
        self.body.as_ref()?.replay()
    }
}

/// What may let a failed request be sent again, as far as the rule needs to know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Resendable {
    /// Not a byte of it was written.
    pub(super) unsent: bool,
    /// Idempotent with `retry_idempotent`, and its body can be sent again.
    pub(super) idempotent: bool,
    /// Its body can be sent again, and the backend provably never received it.
    pub(super) unreceived: bool,
}

/// A failure before any response byte, as the rule sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Failure {
    /// The failure's part of the rule.
    pub(super) retry: Retry,
    pub(super) kind: Option<ErrorKind>,
    /// On a pooled connection that had served a request before.
    pub(super) reused: bool,
    /// This request was already sent again once on a fresh connection.
    pub(super) retried_reused: bool,
}

/// What the rule says to do after a [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Once, on a fresh connection to the same server, which is not blamed.
    FreshSameServer(RetryCause),
    /// On another server, within `max_retries`; `blame`: booked against this server's health.
    NextServer { blame: bool },
    /// Answer the failure.
    GiveUp { blame: bool },
}

impl Failure {
    /// The keep-alive race: a pooled connection reset or closed as it was reused.
    fn is_race(&self) -> bool {
        self.reused && !self.retried_reused && self.retry == Retry::IfResendable
    }

    /// Whether the step depends on proof that the backend never received the request (worth
    /// the wait for it only then).
    pub(super) fn needs_proof(&self, again: Resendable) -> bool {
        self.is_race() && !again.unsent && !again.idempotent
    }

    /// The rule of the module doc, as a decision.
    pub(super) fn next_step(&self, again: Resendable, retry_on_timeout: bool) -> Step {
        let may_resend = match self.retry {
            Retry::Never => false,
            Retry::AnyMethod | Retry::IfResendable => again.unsent || again.idempotent,
            Retry::IfTimeoutsRetried => retry_on_timeout && again.idempotent,
        };
        if self.is_race() {
            let cause = RetryCause::Failed(self.kind.unwrap_or(ErrorKind::ClosedBeforeResponse));
            return if may_resend {
                Step::FreshSameServer(cause)
            } else if again.unreceived {
                Step::FreshSameServer(RetryCause::Unacknowledged)
            } else {
                Step::GiveUp { blame: false }
            };
        }
        // A fresh connection reset or closed before any response byte (a crashed worker, a
        // backend going down), or a response timeout: the server is blamed.
        let blame = !self.reused || self.retry == Retry::IfTimeoutsRetried;
        if may_resend {
            Step::NextServer { blame }
        } else {
            Step::GiveUp { blame }
        }
    }
}

/// An exchange bounded by `response_timeout` (`deadline`) the careful way, for the two rare
/// cases (the common one, a reused connection and a body read whole, is a plain timeout):
/// - a body that streams from the client (`sent`): the timeout counts from the end of the
///   body (its gaps are bounded by `body_timeout` meanwhile), since the time to the first
///   response byte starts when the request has been sent whole;
/// - a fresh connection (`relieve`): an answer that has not come after [`RELIEVE_AFTER`] may
///   be waiting in the backend's listen backlog for a worker that one of kaproxy's own idle
///   connections holds, and [`Backend::relieve`] closes one (again every `RELIEVE_AFTER`).
async fn exchange_with_care<F: std::future::Future>(
    exchange: F,
    deadline: ResponseDeadline,
    sent: Option<SentWhole>,
    relieve: Option<&Backend>,
) -> Result<F::Output, RequestError> {
    tokio::pin!(exchange);
    if let Some(sent) = sent {
        tokio::select! {
            done = &mut exchange => return Ok(done),
            () = sent.wait() => {}
        }
    }
    let until = Instant::now() + deadline.limit;
    if let Some(backend) = relieve {
        // Every RELIEVE_AFTER for a while, since a worker the backend frees may go to another
        // connection in its backlog first.
        let (mut checks, mut closed) = (0, 0);
        while checks < RELIEVE_CHECKS && closed < RELIEVE_CLOSES {
            let check = (Instant::now() + RELIEVE_AFTER).min(until);
            match tokio::time::timeout_at(check, &mut exchange).await {
                Ok(done) => return Ok(done),
                Err(_) if check >= until => return Err(deadline.elapsed()),
                Err(_) => {
                    checks += 1;
                    if backend.relieve(checks >= RELIEVE_PROBE_CHECKS) {
                        closed += 1;
                        debug!(server = %backend.addr, "fresh connection unanswered: closed an idle one to free a backend worker");
                    }
                }
            }
        }
    }
    tokio::time::timeout_at(until, exchange)
        .await
        .map_err(|_| deadline.elapsed())
}

/// Why no response came back.
pub(super) enum Failed {
    /// The client's request body broke while it streamed upstream (`Side::Downstream`; a body error in the
    /// chain): the client's fault. Its upstream connection was closed (reason `error`).
    Client(RequestError),
    /// This backend failed it (already counted and booked against its health).
    Server(Arc<Backend>, RequestError),
    /// kaproxy's answer: no server could be picked or reached.
    Answer(Box<Response<ProxyBody>>),
}

impl Failover<'_> {
    /// Picks a server, connects and sends the request of `head` and `body`, until a response
    /// head comes back or the rule of this module says stop. The same head goes on every
    /// attempt (written once by the request filter); only the body is made again.
    pub(super) async fn send(
        mut self,
        head: OutgoingHead,
        body: UpstreamBody,
        resend: Resend,
    ) -> Result<Sent, Failed> {
        let upstream = self.group;
        let mut request = Some(body);
        let mut fresh_on: Option<Arc<Backend>> = None;
        let mut retried_reused = false;
        loop {
            let fresh = match fresh_on.take() {
                Some(backend) => match backend.pool().acquire_fresh().await {
                    Ok(conn) => Some((backend, conn)),
                    Err(err) => {
                        self.connect_failed(&backend, &err).await;
                        None
                    }
                },
                None => None,
            };
            let (backend, mut conn) = match fresh {
                Some(pair) => pair,
                None => self
                    .connect(|p| async move { p.acquire().await })
                    .await
                    .map_err(|answer| Failed::Answer(Box::new(answer)))?,
            };
            let pool = backend.pool();
            let Some(body) = request.take() else {
                unreachable!("an attempt is only made with a request to send");
            };
            let deadline = ResponseDeadline {
                addr: pool.addr(),
                limit: upstream.config.response_timeout,
            };
            let streaming = body.streaming_sent();
            let relieve = (!conn.is_reused()).then_some(&*backend);
            let sent = if streaming.is_none() && relieve.is_none() {
                deadline.bound(conn.send(&head, body)).await
            } else {
                // Rare: boxed, to keep every request's future small.
                let exchange =
                    exchange_with_care(conn.send(&head, body), deadline, streaming, relieve);
                Box::pin(exchange).await
            };
            let (error, unsent, written) = match sent {
                Ok(Ok(response)) => {
                    backend.record_success();
                    return Ok(Sent {
                        backend,
                        response,
                        conn,
                    });
                }
                Err(elapsed) => (elapsed, None, None),
                Ok(Err(SendFailure {
                    error,
                    unsent,
                    written,
                })) => (error, unsent, written),
            };
            let reused = conn.is_reused();
            if error.retry() == Retry::IfResendable && error.side() == Side::Upstream {
                conn.closed_on_reuse();
            }
            // Dropping the connection closes it (reason `error`), and settles what its socket
            // had acknowledged (`written`).
            drop(conn);
            if error.side() == Side::Downstream {
                // The client's body broke on its way upstream: the backend is not blamed.
                return Err(Failed::Client(error));
            }
            error.count_in(pool.metrics());
            let failure = Failure {
                retry: error.retry(),
                kind: error.kind(),
                reused,
                retried_reused,
            };
            let mut again = Resendable {
                unsent: unsent.is_some(),
                idempotent: resend.idempotent && resend.replayable(),
                unreceived: false,
            };
            if failure.needs_proof(again) && resend.replayable() {
                if let Some(written) = written {
                    again.unreceived = written.never_received().await;
                }
            }
            let step = failure.next_step(again, upstream.config.retry.retry_on_timeout);
            let blame = match step {
                Step::FreshSameServer(_) => false,
                Step::NextServer { blame } | Step::GiveUp { blame } => blame,
            };
            if blame {
                backend.record_failure();
            }
            let next = match step {
                Step::GiveUp { .. } => None,
                _ => unsent.or_else(|| resend.again()),
            };
            let Some(req) = next else {
                return Err(Failed::Server(backend, error));
            };
            match step {
                Step::FreshSameServer(cause) => {
                    // The keep-alive race: a pooled connection the backend closed just as it
                    // was reused.
                    pool.metrics().retry(cause);
                    warn!(upstream = %upstream.name, server = %pool.addr(), cause = cause.as_str(), error = %error,
                        "reused upstream connection failed before responding; retrying on a fresh connection");
                    fresh_on = Some(backend);
                    retried_reused = true;
                }
                _ if self.move_on(&backend, &error).await => {}
                _ => return Err(Failed::Server(backend, error)),
            }
            request = Some(req);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOSED: Option<ErrorKind> = Some(ErrorKind::ClosedBeforeResponse);
    const RESET: Option<ErrorKind> = Some(ErrorKind::Reset);
    const TIMEOUT: Option<ErrorKind> = Some(ErrorKind::Timeout);
    const CONNECT: Option<ErrorKind> = Some(ErrorKind::Connect);

    /// The request's side of a row.
    const NOTHING: Resendable = Resendable {
        unsent: false,
        idempotent: false,
        unreceived: false,
    };
    const UNSENT: Resendable = Resendable {
        unsent: true,
        ..NOTHING
    };
    const IDEMPOTENT: Resendable = Resendable {
        idempotent: true,
        ..NOTHING
    };
    const UNRECEIVED: Resendable = Resendable {
        unreceived: true,
        ..NOTHING
    };

    /// What, the failure's retry, its kind, reused, retried already, the request's side,
    /// `retry_on_timeout`, and the step the rule gives.
    type Row = (
        &'static str,
        Retry,
        Option<ErrorKind>,
        bool,
        bool,
        Resendable,
        bool,
        Step,
    );

    fn race(cause: Option<ErrorKind>) -> Step {
        Step::FreshSameServer(RetryCause::Failed(cause.unwrap()))
    }

    /// Every row of the README's "When a request is sent again", and the failures around it.
    #[test]
    fn the_retry_rule_row_by_row() {
        use Retry::*;
        let next = |blame| Step::NextServer { blame };
        let give_up = |blame| Step::GiveUp { blame };
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // what,                                    retry,  kind,   reused, retried, request, on_timeout, step
            ("reused, closed, GET buffered",            IfResendable, CLOSED, true, false, IDEMPOTENT, false, race(CLOSED)),
            ("reused, reset, GET",                      IfResendable, RESET,  true, false, IDEMPOTENT, false, race(RESET)),
            ("reused, closed, never written (POST)",    IfResendable, CLOSED, true, false, UNSENT,     false, race(CLOSED)),
            ("reused, reset, POST never received",      IfResendable, RESET,  true, false, UNRECEIVED, false, Step::FreshSameServer(RetryCause::Unacknowledged)),
            ("reused, reset, POST acknowledged",        IfResendable, RESET,  true, false, NOTHING,    false, give_up(false)),
            ("reused, closed, GET, retry_idempotent off", IfResendable, CLOSED, true, false, NOTHING, false, give_up(false)),
            ("retried once already: fresh, GET",        IfResendable, CLOSED, false, true, IDEMPOTENT, false, next(true)),
            ("fresh, reset, GET",                       IfResendable, RESET,  false, false, IDEMPOTENT, false, next(true)),
            ("fresh, reset, POST",                      IfResendable, RESET,  false, false, NOTHING,   false, give_up(true)),
            ("fresh, reset, POST never received",       IfResendable, RESET,  false, false, UNRECEIVED, false, give_up(true)),
            ("fresh, never written (POST)",             IfResendable, CLOSED, false, false, UNSENT,    false, next(true)),
            ("connect failure, POST",                   AnyMethod,    CONNECT, false, false, UNSENT,   false, next(true)),
            ("timeout, GET, retry_on_timeout off",      IfTimeoutsRetried, TIMEOUT, true, false, IDEMPOTENT, false, give_up(true)),
            ("timeout, GET, retry_on_timeout on",       IfTimeoutsRetried, TIMEOUT, false, false, IDEMPOTENT, true, next(true)),
            ("timeout, POST never received",            IfTimeoutsRetried, TIMEOUT, true, false, UNRECEIVED, true, give_up(true)),
            ("timeout, never written",                  IfTimeoutsRetried, TIMEOUT, false, false, UNSENT, true, give_up(true)),
            ("a failure that allows nothing, reused",   Never,        None,   true, false, IDEMPOTENT, true, give_up(false)),
            ("a failure that allows nothing, fresh",    Never,        None,   false, false, UNSENT,    true, give_up(true)),
        ];
        for (what, retry, kind, reused, retried_reused, again, on_timeout, step) in rows {
            let failure = Failure {
                retry: *retry,
                kind: *kind,
                reused: *reused,
                retried_reused: *retried_reused,
            };
            assert_eq!(failure.next_step(*again, *on_timeout), *step, "{what}");
        }
    }

    #[test]
    fn proof_is_waited_for_only_where_it_decides() {
        let race = Failure {
            retry: Retry::IfResendable,
            kind: RESET,
            reused: true,
            retried_reused: false,
        };
        assert!(race.needs_proof(NOTHING), "a POST on a reused connection");
        assert!(!race.needs_proof(IDEMPOTENT), "a GET goes again anyway");
        assert!(
            !race.needs_proof(UNSENT),
            "never written: goes again anyway"
        );
        let fresh = Failure {
            reused: false,
            ..race
        };
        assert!(
            !fresh.needs_proof(NOTHING),
            "only the race of a reused connection"
        );
        let timeout = Failure {
            retry: Retry::IfTimeoutsRetried,
            kind: TIMEOUT,
            ..race
        };
        assert!(!timeout.needs_proof(NOTHING), "a timeout proves nothing");
    }
}
