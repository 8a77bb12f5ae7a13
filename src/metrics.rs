//! Owns the Prometheus registry and the handles the hot path updates; receives, never calls out.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Why kaproxy let go of an upstream connection (the `reason` label of
/// `kaproxy_upstream_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Idle past `idle_timeout` (or closed idle at shutdown).
    Idle = 0,
    /// Idle past the backend's keep-alive timeout minus `safety_margin`.
    LearnedTimeout = 1,
    /// Older than `max_lifetime`.
    Lifetime = 2,
    /// Served `max_requests_per_connection` or the backend's advertised `max=`.
    MaxRequests = 3,
    /// The backend closed it (`Connection: close`, or EOF while idle).
    ServerClose = 4,
    /// A transport or protocol error, or a response body abandoned half way.
    Error = 5,
    /// Came back idle while `max_idle_per_server` were idle already: more connections than
    /// steady traffic needs (a burst), not an expiry.
    Surplus = 6,
    /// Idle, or back from its last request, while its server was drained (the admin API).
    Drained = 7,
    /// Idle when its pool was let go: its server left the configuration (a reload, `resolve`)
    /// or stayed with other pool settings, and the requests of the old configuration finished.
    Removed = 8,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Idle,
        CloseReason::LearnedTimeout,
        CloseReason::Lifetime,
        CloseReason::MaxRequests,
        CloseReason::ServerClose,
        CloseReason::Error,
        CloseReason::Surplus,
        CloseReason::Drained,
        CloseReason::Removed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::LearnedTimeout => "learned_timeout",
            CloseReason::Lifetime => "lifetime",
            CloseReason::MaxRequests => "max_requests",
            CloseReason::ServerClose => "server_close",
            CloseReason::Error => "error",
            CloseReason::Surplus => "surplus",
            CloseReason::Drained => "drained",
            CloseReason::Removed => "removed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    upstream: String,
    server: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerUpLabels {
    upstream: String,
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    server: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    server: String,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    server: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LocationLabels {
    location: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    server: String,
    source: &'static str,
}

/// Where a backend's keep-alive timeout comes from (the `source` label of
/// `kaproxy_upstream_keepalive_timeout_seconds`; README, "Where a deadline comes from").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAliveSource {
    /// The backend's own `Keep-Alive: timeout=N` header.
    Header,
    /// The shortest idle time at which the backend was seen to close a connection.
    Observed,
    /// The configured `keepalive_timeout`.
    Config,
}

impl KeepAliveSource {
    pub const ALL: [KeepAliveSource; 3] = [
        KeepAliveSource::Header,
        KeepAliveSource::Observed,
        KeepAliveSource::Config,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeepAliveSource::Header => "header",
            KeepAliveSource::Observed => "observed",
            KeepAliveSource::Config => "config",
        }
    }
}

/// Why a request was sent again (the `cause` label of `kaproxy_upstream_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// After this failure, by the retry rule.
    Failed(ErrorKind),
    /// A request on a reused connection that the backend's TCP stack reset without
    /// acknowledging any byte of it: it never reached the backend, whatever its method.
    Unacknowledged,
}

impl RetryCause {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::Failed(kind) => kind.as_str(),
            RetryCause::Unacknowledged => "unacknowledged",
        }
    }
}

/// How an `Upgrade` tunnel ended (the `reason` label of
/// `kaproxy_upstream_tunnels_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// One side closed it.
    Closed = 0,
    /// No byte either way for `tunnel_idle_timeout`.
    Idle = 1,
    /// A read or write failed.
    Error = 2,
}

impl TunnelEnd {
    pub const ALL: [TunnelEnd; 3] = [TunnelEnd::Closed, TunnelEnd::Idle, TunnelEnd::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::Closed => "closed",
            TunnelEnd::Idle => "idle",
            TunnelEnd::Error => "error",
        }
    }
}

/// Which way a buffered body goes (the `direction` label of the spill counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyDirection {
    Request = 0,
    Response = 1,
}

impl BodyDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyDirection::Request => "request",
            BodyDirection::Response => "response",
        }
    }
}

/// Every metric kaproxy exports (names as the README's metrics list gives them; dashboards depend on them).
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<ServerUpLabels, Histogram, fn() -> Histogram>,
    opened: Family<ServerLabels, Counter>,
    reused: Family<ServerLabels, Counter>,
    closed: Family<ReasonLabels, Counter>,
    retries: Family<CauseLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    tls_handshakes: Family<ServerLabels, Counter>,
    tls_resumptions: Family<ServerLabels, Counter>,
    pool_idle: Family<ServerLabels, Gauge>,
    downstream: Family<ListenerLabels, Gauge>,
    downstream_waiting: Family<ListenerLabels, Gauge>,
    downstream_shed: Family<ListenerLabels, Counter>,
    server_up: Family<ServerUpLabels, Gauge>,
    keepalive_timeout: Family<SourceLabels, Gauge<f64, AtomicU64>>,
    tunnels: Family<ServerLabels, Gauge>,
    tunnels_closed: Family<ReasonLabels, Counter>,
    buffer_bytes: Family<LocationLabels, Gauge>,
    buffer_memory_limit: Gauge,
    body_spilled: Family<DirectionLabels, Counter>,
    body_spill_errors: Family<DirectionLabels, Counter>,
    request_body_too_large: Family<UpstreamLabels, Counter>,
}

/// What failed upstream: the `kind` label of `kaproxy_upstream_errors_total` and the `cause`
/// of `kaproxy_upstream_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connecting failed or timed out (nothing was sent).
    Connect = 0,
    /// The backend reset the connection before a response byte.
    Reset = 1,
    /// The backend closed the connection before a response byte.
    ClosedBeforeResponse = 2,
    /// No response within `response_timeout` (or no slot within `acquire_timeout`).
    Timeout = 3,
    /// The TLS handshake with the backend failed (`tls = true`; nothing was sent).
    Tls = 4,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Connect,
        ErrorKind::Reset,
        ErrorKind::ClosedBeforeResponse,
        ErrorKind::Timeout,
        ErrorKind::Tls,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Reset => "reset",
            ErrorKind::ClosedBeforeResponse => "closed_before_response",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Tls => "tls",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kaproxy");
        let requests = Family::<RequestLabels, Counter>::default();
        // 0.25 ms .. ~8 s: loopback hops to slow backends. Labelled by server so that each
        // histogram's lock is per backend, not global.
        let duration =
            Family::<ServerUpLabels, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00025, 2.0, 16))
            });
        let opened = Family::<ServerLabels, Counter>::default();
        let reused = Family::<ServerLabels, Counter>::default();
        let closed = Family::<ReasonLabels, Counter>::default();
        let retries = Family::<CauseLabels, Counter>::default();
        let errors = Family::<KindLabels, Counter>::default();
        let tls_handshakes = Family::<ServerLabels, Counter>::default();
        let tls_resumptions = Family::<ServerLabels, Counter>::default();
        let pool_idle = Family::<ServerLabels, Gauge>::default();
        let downstream = Family::<ListenerLabels, Gauge>::default();
        let downstream_waiting = Family::<ListenerLabels, Gauge>::default();
        let downstream_shed = Family::<ListenerLabels, Counter>::default();
        let server_up = Family::<ServerUpLabels, Gauge>::default();
        let keepalive_timeout = Family::<SourceLabels, Gauge<f64, AtomicU64>>::default();
        let tunnels = Family::<ServerLabels, Gauge>::default();
        let tunnels_closed = Family::<ReasonLabels, Counter>::default();
        let buffer_bytes = Family::<LocationLabels, Gauge>::default();
        let buffer_memory_limit = Gauge::default();
        let body_spilled = Family::<DirectionLabels, Counter>::default();
        let body_spill_errors = Family::<DirectionLabels, Counter>::default();
        let request_body_too_large = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by upstream, server and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head",
            duration.clone(),
        );
        registry.register(
            "upstream_connections_opened",
            "Upstream connections opened",
            opened.clone(),
        );
        registry.register(
            "upstream_connections_reused",
            "Requests sent on a pooled (reused) upstream connection",
            reused.clone(),
        );
        registry.register(
            "upstream_connections_closed",
            "Upstream connections closed, by reason (idle, learned_timeout, lifetime: kaproxy closed first; server_close: the backend did)",
            closed.clone(),
        );
        registry.register(
            "upstream_retries",
            "Upstream request retries, by cause",
            retries.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures, by kind",
            errors.clone(),
        );
        registry.register(
            "upstream_tls_handshakes",
            "TLS handshakes completed with a backend (tls = true), resumed ones included",
            tls_handshakes.clone(),
        );
        registry.register(
            "upstream_tls_resumptions",
            "TLS handshakes with a backend that resumed an earlier session",
            tls_resumptions.clone(),
        );
        registry.register(
            "pool_idle_connections",
            "Idle upstream connections in the pool",
            pool_idle.clone(),
        );
        registry.register(
            "downstream_connections",
            "Open downstream (client) connections",
            downstream.clone(),
        );
        registry.register(
            "downstream_connections_waiting",
            "HTTP/1 client connections parked while they wait for a request (new, or idle \
             between requests), holding no HTTP state",
            downstream_waiting.clone(),
        );
        registry.register(
            "downstream_connections_shed",
            "Idle (parked) HTTP/1 client connections closed to make room for a new one, at \
             max_connections or when out of file descriptors",
            downstream_shed.clone(),
        );
        registry.register(
            "server_up",
            "1 when a backend is considered healthy",
            server_up.clone(),
        );
        registry.register(
            "upstream_keepalive_timeout_seconds",
            "The keep-alive timeout kaproxy holds each backend to, by where it comes from \
             (header: its Keep-Alive header; observed: the shortest idle time it was seen to \
             close at; config: keepalive_timeout); idle connections expire safety_margin before it",
            keepalive_timeout.clone(),
        );
        registry.register(
            "upstream_tunnels",
            "Upgrade (WebSocket) tunnels open to a backend now; each holds one of its \
             max_connections_per_server",
            tunnels.clone(),
        );
        registry.register(
            "upstream_tunnels_closed",
            "Upgrade tunnels ended, by reason (closed: by a side; idle: tunnel_idle_timeout; error)",
            tunnels_closed.clone(),
        );
        registry.register(
            "body_buffer_bytes",
            "Request and response body bytes buffered now, in memory (within [buffering] \
             memory_limit) and in temporary files on disk",
            buffer_bytes.clone(),
        );
        registry.register(
            "body_buffer_memory_limit_bytes",
            "[buffering] memory_limit: the most body bytes held in memory at once",
            buffer_memory_limit.clone(),
        );
        registry.register(
            "body_spilled",
            "Bodies that went to a temporary file, by direction (request, response)",
            body_spilled.clone(),
        );
        registry.register(
            "body_spill_errors",
            "Temporary files that could not be created or written (disk full, temp_dir gone)",
            body_spill_errors.clone(),
        );
        registry.register(
            "request_body_too_large",
            "Requests answered 413: body larger than max_request_body_bytes",
            request_body_too_large.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            opened,
            reused,
            closed,
            retries,
            errors,
            tls_handshakes,
            tls_resumptions,
            pool_idle,
            downstream,
            downstream_waiting,
            downstream_shed,
            server_up,
            keepalive_timeout,
            tunnels,
            tunnels_closed,
            buffer_bytes,
            buffer_memory_limit,
            body_spilled,
            body_spill_errors,
            request_body_too_large,
        }
    }

    /// The handles of every body buffer (`kaproxy_body_*`).
    pub fn buffering(&self) -> BufferMetrics {
        let location = |location| {
            self.buffer_bytes
                .get_or_create(&LocationLabels { location })
                .clone()
        };
        let direction = |family: &Family<DirectionLabels, Counter>| {
            [BodyDirection::Request, BodyDirection::Response].map(|d| {
                family
                    .get_or_create(&DirectionLabels {
                        direction: d.as_str(),
                    })
                    .clone()
            })
        };
        BufferMetrics {
            memory: location("memory"),
            disk: location("disk"),
            memory_limit: self.buffer_memory_limit.clone(),
            spilled: direction(&self.body_spilled),
            spill_errors: direction(&self.body_spill_errors),
        }
    }

    /// The counter of 413 answers of one upstream group.
    pub fn request_body_too_large(&self, upstream: &str) -> Counter {
        self.request_body_too_large
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .clone()
    }

    /// Pre-resolved handles for one backend, so the hot path never builds label strings.
    pub fn server(&self, upstream: &str, addr: SocketAddr) -> Arc<BackendMetrics> {
        let server = addr.to_string();
        let s = ServerLabels {
            server: server.clone(),
        };
        let closed = CloseReason::ALL.map(|reason| {
            self.closed
                .get_or_create(&ReasonLabels {
                    server: server.clone(),
                    reason: reason.as_str(),
                })
                .clone()
        });
        let errors = ErrorKind::ALL.map(|kind| {
            self.errors
                .get_or_create(&KindLabels {
                    server: server.clone(),
                    kind: kind.as_str(),
                })
                .clone()
        });
        Arc::new(BackendMetrics {
            upstream: upstream.to_string(),
            server: server.clone(),
            opened: self.opened.get_or_create(&s).clone(),
            reused: self.reused.get_or_create(&s).clone(),
            tls_handshakes: self.tls_handshakes.get_or_create(&s).clone(),
            tls_resumptions: self.tls_resumptions.get_or_create(&s).clone(),
            idle: self.pool_idle.get_or_create(&s).clone(),
            up: self
                .server_up
                .get_or_create(&ServerUpLabels {
                    upstream: upstream.to_string(),
                    server: server.clone(),
                })
                .clone(),
            tunnels: self.tunnels.get_or_create(&s).clone(),
            tunnels_closed: TunnelEnd::ALL.map(|reason| {
                self.tunnels_closed
                    .get_or_create(&ReasonLabels {
                        server: server.clone(),
                        reason: reason.as_str(),
                    })
                    .clone()
            }),
            closed,
            errors,
            duration: self
                .duration
                .get_or_create(&ServerUpLabels {
                    upstream: upstream.to_string(),
                    server: server.clone(),
                })
                .clone(),
            retries: self.retries.clone(),
            keepalive_timeout: self.keepalive_timeout.clone(),
            requests: self.requests.clone(),
            statuses: (0..STATUS_SLOTS).map(|_| OnceLock::new()).collect(),
            retries_total: Counter::default(),
        })
    }

    /// The gauge of open downstream connections on one listener ("https" or "http").
    pub fn downstream_connections(&self, listener: &'static str) -> Gauge {
        self.downstream
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }

    /// The gauge of parked downstream connections on one listener ("https" or "http").
    pub fn downstream_connections_waiting(&self, listener: &'static str) -> Gauge {
        self.downstream_waiting
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }

    /// The counter of idle connections on one listener closed to make room.
    pub fn downstream_connections_shed(&self, listener: &'static str) -> Counter {
        self.downstream_shed
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The handles of the body buffers: the memory gauge is also the budget's own counter
/// (`body::budget`).
#[derive(Clone)]
pub struct BufferMetrics {
    pub memory: Gauge,
    pub disk: Gauge,
    pub memory_limit: Gauge,
    spilled: [Counter; 2],
    spill_errors: [Counter; 2],
}

impl BufferMetrics {
    pub fn spilled(&self, direction: BodyDirection) {
        self.spilled[direction as usize].inc();
    }

    pub fn spill_failed(&self, direction: BodyDirection) {
        self.spill_errors[direction as usize].inc();
    }

    pub fn spilled_total(&self, direction: BodyDirection) -> u64 {
        self.spilled[direction as usize].get()
    }

    pub fn spill_errors_total(&self, direction: BodyDirection) -> u64 {
        self.spill_errors[direction as usize].get()
    }
}

const STATUS_SLOTS: usize = 600;

/// Metric handles of one backend.
pub struct BackendMetrics {
    pub upstream: String,
    pub server: String,
    pub opened: Counter,
    pub reused: Counter,
    /// `kaproxy_upstream_tls_handshakes_total`: completed TLS handshakes, resumed ones too.
    pub tls_handshakes: Counter,
    /// `kaproxy_upstream_tls_resumptions_total`: handshakes that resumed a session.
    pub tls_resumptions: Counter,
    pub idle: Gauge,
    pub up: Gauge,
    /// `kaproxy_upstream_tunnels`: `Upgrade` tunnels open to this server now.
    pub tunnels: Gauge,
    tunnels_closed: [Counter; TunnelEnd::ALL.len()],
    closed: [Counter; CloseReason::ALL.len()],
    errors: [Counter; ErrorKind::ALL.len()],
    duration: Histogram,
    retries: Family<CauseLabels, Counter>,
    keepalive_timeout: Family<SourceLabels, Gauge<f64, AtomicU64>>,
    requests: Family<RequestLabels, Counter>,
    statuses: Box<[OnceLock<Counter>]>,
    /// All retries of this server, whatever the cause (read by the status history; the
    /// labelled family is what `/metrics` exports).
    retries_total: Counter,
}

impl BackendMetrics {
    /// One tunnel to this server ended, for `reason`.
    pub fn tunnel_closed(&self, reason: TunnelEnd) {
        self.tunnels_closed[reason as usize].inc();
    }

    pub fn tunnels_closed(&self, reason: TunnelEnd) -> u64 {
        self.tunnels_closed[reason as usize].get()
    }

    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].inc();
    }

    /// Closes so far, by reason.
    pub fn closed_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CloseReason::ALL
            .iter()
            .map(|r| (r.as_str(), self.closed[*r as usize].get()))
    }

    /// Counts one completed TLS handshake with this server, and whether it was resumed.
    pub fn tls_handshake(&self, resumed: bool) {
        self.tls_handshakes.inc();
        if resumed {
            self.tls_resumptions.inc();
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].inc();
    }

    /// The keep-alive timeout this server is held to now, and its source (one series).
    pub fn keepalive_timeout(&self, source: KeepAliveSource, timeout: std::time::Duration) {
        let labels = |source: KeepAliveSource| SourceLabels {
            server: self.server.clone(),
            source: source.as_str(),
        };
        for other in KeepAliveSource::ALL.into_iter().filter(|s| *s != source) {
            self.keepalive_timeout.remove(&labels(other));
        }
        self.keepalive_timeout
            .get_or_create(&labels(source))
            .set(timeout.as_secs_f64());
    }

    pub fn retry(&self, cause: RetryCause) {
        self.retries_total.inc();
        self.retries
            .get_or_create(&CauseLabels {
                server: self.server.clone(),
                cause: cause.as_str(),
            })
            .inc();
    }

    /// Time from request head to response head.
    pub fn observe_duration(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    /// Counts one answered request; lock-free once a status has been seen on this server.
    pub fn request(&self, status: u16) {
        let slot = (status as usize).min(STATUS_SLOTS - 1);
        self.statuses[slot]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        upstream: self.upstream.clone(),
                        server: self.server.clone(),
                        status,
                    })
                    .clone()
            })
            .inc();
    }
}

/// Read accessors for sampling (the status history): they read counters and take no lock the
/// request path takes, except the histogram's own read lock, as a `/metrics` scrape does.
impl BackendMetrics {
    /// Requests answered so far by status class: `[1xx, 2xx, 3xx, 4xx, 5xx]`.
    pub fn status_class_counts(&self) -> [u64; 5] {
        let mut out = [0; 5];
        for (status, slot) in self.statuses.iter().enumerate() {
            if let Some(c) = slot.get() {
                out[(status / 100).clamp(1, 5) - 1] += c.get();
            }
        }
        out
    }

    /// Errors so far, by kind (in [`ErrorKind::ALL`] order).
    pub fn error_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ErrorKind::ALL
            .iter()
            .map(|k| (k.as_str(), self.errors[*k as usize].get()))
    }

    /// Retries so far, all causes.
    pub fn retries_count(&self) -> u64 {
        self.retries_total.get()
    }

    /// The request-duration histogram so far: `(upper bound in seconds, cumulative count)`
    /// per bucket, the last bound `f64::INFINITY`. Read through the text encoding, the only
    /// public reader prometheus-client has.
    pub fn duration_buckets(&self) -> Vec<(f64, u64)> {
        let mut registry = Registry::default();
        registry.register("d", "", self.duration.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("d_bucket{le=\"")?;
                let (le, rest) = rest.split_once("\"}")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                let count = rest.split_whitespace().next()?.parse().ok()?;
                Some((bound, count))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_handshakes_resumptions_and_the_tls_error_kind_are_exported_per_server() {
        let metrics = Metrics::new();
        let backend = metrics.server("web", "127.0.0.1:8443".parse().unwrap());
        backend.tls_handshake(false);
        backend.tls_handshake(true);
        backend.error(ErrorKind::Tls);
        let text = metrics.encode();
        for line in [
            r#"kaproxy_upstream_tls_handshakes_total{server="127.0.0.1:8443"} 2"#,
            r#"kaproxy_upstream_tls_resumptions_total{server="127.0.0.1:8443"} 1"#,
            r#"kaproxy_upstream_errors_total{server="127.0.0.1:8443",kind="tls"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let errors: Vec<_> = backend.error_counts().collect();
        assert_eq!(errors.last(), Some(&("tls", 1)));
    }
}
