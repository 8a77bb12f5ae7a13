//! Owns the configuration: TOML → validated, typed [`Config`], and the keep-alive timeline
//! that `kaproxy check` prints. No sockets, no tasks.
//!
//! Two steps, as ripgrep parses its arguments: serde reads the file (resolving addresses and
//! rejecting unknown keys, with the line), then [`check_str`] validates the typed [`Config`]
//! and collects every [`Problem`] with its file, line, dotted key and fix.
//! [`Config::load`] is what start and reload call; [`check`] is what `kaproxy check` prints.
//!
//! Typed structs that the TOML maps onto as is derive `Deserialize` themselves; private
//! `Raw*` structs exist only where the TOML has another shape (the `[upstreams.NAME]` map,
//! its flat keys, a server written as a string or a table).
//!
//! Files: this one holds the typed structs, their defaults and loading; [`raw`] the file as
//! written (serde), [`error`] problems with file/line/key, [`mod@validate`] the semantic checks,
//! [`pem`] the PEM files upstream TLS names (read at load time, so a bad file is a problem
//! with its line), [`timeline`] what `kaproxy check` prints.

pub mod dns;
mod error;
pub mod expand;
pub mod pem;
mod raw;
mod timeline;
mod validate;

pub use error::{ConfigError, Problem};
pub use timeline::Timeline;

use error::{line_at, locate, toml_problem};
use raw::{
    addrs, host_match, ip_nets, optional_addr, optional_dir, zero_is_none, RawConfig, RawUpstream,
};
use validate::validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use rustls_pki_types::ServerName;
use serde::Deserialize;
use toml_edit::ImDocument;

// Defaults, one per key of the README's configuration reference, each with where it comes from.

/// The development certificate, generated on first start if absent.
const DEFAULT_TLS_CERT: &str = "certs/dev-cert.pem";
/// The key of the development certificate.
const DEFAULT_TLS_KEY: &str = "certs/dev-key.pem";
/// nginx's keepalive_timeout 75 s: longer than the idle timeout of common client pools.
const DEFAULT_DOWNSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// HAProxy's recommended `timeout http-request 10s` against slowloris.
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// 10 × nginx's keepalive_requests 1000: bounds a connection without costing handshakes.
const DEFAULT_DOWNSTREAM_MAX_REQUESTS: u64 = 10_000;
/// Notices dead clients in a minute, not Linux's 2 h; below AWS NLB's 350 s idle timeout.
const DEFAULT_DOWNSTREAM_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// No load balancer in front unless the operator says so.
const DEFAULT_FRONT_IDLE_TIMEOUT: Duration = Duration::ZERO;
/// 64 KiB: above nginx's 4 × 8 KiB large_client_header_buffers, below hyper's ~400 KiB.
const DEFAULT_MAX_HEADER_BYTES: usize = 65_536;
/// hyper's MINIMUM_MAX_BUFFER_SIZE: it refuses a smaller read buffer.
const MIN_MAX_HEADER_BYTES: usize = 8192;
/// nginx's client_body_timeout 60 s: the longest gap between two reads of a request body.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// nginx's send_timeout 60 s: the longest a write to the client may make no progress.
const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// 0: derived at start from the open-file limit (see `limit::derived_max_connections`),
/// as HAProxy derives its `maxconn`.
const DEFAULT_MAX_CONNECTIONS: usize = 0;
/// nginx's client_body_buffer_size is 8–16 KiB before it spills to disk; kaproxy keeps small
/// bodies in memory up to 64 KiB so a slow upload of a form never holds an Apache worker.
pub const DEFAULT_REQUEST_BUFFER_BYTES: usize = 65_536;
/// nginx's proxy_buffers 8 × 8 KiB = 64 KiB read ahead from the backend.
pub const DEFAULT_RESPONSE_BUFFER_BYTES: usize = 65_536;
/// nginx's proxy_read_timeout 60 s, which is what ends an idle WebSocket behind nginx.
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Upgrades tunnelled unless a group lists others: WebSocket (RFC 6455) only.
pub const DEFAULT_UPGRADE_PROTOCOLS: &[&str] = &["websocket"];
/// 1 GiB: Apache's own `LimitRequestBody` default since 2.4.54, so kaproxy refuses no body the
/// Apache behind it would accept; nginx's 1 MiB `client_max_body_size` breaks ordinary uploads
/// (photos, videos, backups), and a cap is needed at all because a buffered body takes disk.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 1 << 30;
/// nginx's `proxy_max_temp_file_size` 1 GiB: how much of one response may wait on disk for a
/// slow client before the backend is made to wait instead.
pub const DEFAULT_MAX_RESPONSE_SPILL_BYTES: u64 = 1 << 30;
/// 128 MiB for every in-memory body buffer together: 2 048 bodies at the default 64 KiB
/// buffers; past it bodies go to disk at once (slower, never lost). A fixed figure rather than
/// a share of RAM, so that what kaproxy may hold does not change with the machine.
pub const DEFAULT_BUFFER_MEMORY_LIMIT: usize = 128 << 20;
/// Apache httpd's default KeepAliveTimeout 5 s.
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Apache's 5 s minus the 500 ms safety margin, rounded down to whole seconds.
const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// The upstream `idle_timeout` when the file does not set it: the default 4 s when that leaves
/// the safety margin before `keepalive_timeout`, else four fifths of what the margin leaves.
/// So a config that only says `keepalive_timeout = "1s"` (Apache at 1 s) gets 400 ms instead
/// of being refused; an `idle_timeout` written in the file is checked, never changed.
pub(super) fn default_idle_timeout(keepalive: Duration, margin: Duration) -> Duration {
    let room = keepalive.saturating_sub(margin);
    if DEFAULT_UPSTREAM_IDLE_TIMEOUT < room {
        DEFAULT_UPSTREAM_IDLE_TIMEOUT
    } else {
        room * 4 / 5
    }
}

/// A LAN round trip plus timer slack on a busy host, with room to spare.
const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_millis(500);
/// A minute amortises the handshake, yet traffic rebalances soon after a backend joins.
const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(60);
/// Apache httpd's default MaxKeepAliveRequests 100.
const APACHE_MAX_KEEPALIVE_REQUESTS: u32 = 100;
/// Apache's MaxKeepAliveRequests, so kaproxy retires a connection when Apache would.
const DEFAULT_UPSTREAM_MAX_REQUESTS: u32 = APACHE_MAX_KEEPALIVE_REQUESTS;
/// nginx's documented `keepalive 32` for an upstream block.
const DEFAULT_MAX_IDLE_PER_SERVER: usize = 32;
/// nginx's default worker_connections 1024.
const DEFAULT_MAX_CONNECTIONS_PER_SERVER: usize = 1024;
/// Fail fast with 503 when saturated (Reactor Netty's pendingAcquireTimeout, 45 s there).
const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// A LAN connect takes milliseconds; nginx's 60 s proxy_connect_timeout fails over too late.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// nginx's default proxy_read_timeout 60 s.
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Below the idle limits of common firewalls and conntrack tables on the way to backends.
const DEFAULT_UPSTREAM_TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// Two more servers after a connect failure, as nginx's proxy_next_upstream moves on.
const DEFAULT_MAX_RETRIES: u32 = 2;
/// First back-off between attempts; the proxy doubles it up to 1 s.
const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// The whole IPv4 address (24 gives nginx ip_hash's /24 behaviour).
const DEFAULT_IP_HASH_PREFIX_V4: u8 = 32;
/// One IPv6 subnet, which is usually one client.
const DEFAULT_IP_HASH_PREFIX_V6: u8 = 64;
/// nginx's server weight=1 for a server written as a bare "host:port".
const DEFAULT_WEIGHT: u32 = 1;
/// The document root answers on any Apache.
const DEFAULT_HEALTH_PATH: &str = "/";
/// nginx Plus's health_check interval=5.
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// A healthy LAN backend answers a probe well within a second.
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// HAProxy's default `rise 2`.
const DEFAULT_HEALTH_RISE: u32 = 2;
/// nginx's `fail_timeout` default (10 s): how long passive health keeps a failing server out.
const DEFAULT_PASSIVE_COOLDOWN: Duration = Duration::from_secs(10);
/// HAProxy's default `fall 3`.
const DEFAULT_HEALTH_FALL: u32 = 3;
/// Envoy's conventional admin port, on loopback only.
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Kubernetes' default terminationGracePeriodSeconds 30.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// 0 = one worker per core available to the process, tokio's own default.
const DEFAULT_WORKER_THREADS: usize = 0;
/// The usual production log level.
const DEFAULT_LOG_LEVEL: &str = "info";

/// The whole validated configuration. Built once at the edge (start, reload); nothing
/// downstream re-parses strings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages.
    pub source: Option<PathBuf>,
    pub listen: ListenConfig,
    pub tls: TlsConfig,
    pub downstream: DownstreamConfig,
    pub forwarded: ForwardedConfig,
    /// Upstream groups, sorted by name.
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub admin: AdminConfig,
    pub runtime: RuntimeConfig,
    pub log: LogConfig,
    /// `[buffering]`: the memory budget and temp directory of every body buffer.
    pub buffering: BufferingConfig,
    /// `[demo]`: built-in Apache-like backends started before serving (development only).
    pub demo: Option<DemoConfig>,
    /// `[resolver]`: the DNS servers that resolve server names.
    pub resolver: ResolverConfig,
}

/// `[resolver]`: which DNS servers resolve the names in `servers` (at load and, with
/// `resolve`, at run time); empty: the system's (getaddrinfo at load, `/etc/resolv.conf` at
/// run time).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResolverConfig {
    pub servers: Vec<SocketAddr>,
}

/// `[listen]`. An address written as "" or left out disables that listener.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    #[serde(deserialize_with = "optional_addr")]
    pub https: Option<SocketAddr>,
    #[serde(deserialize_with = "optional_addr")]
    pub http: Option<SocketAddr>,
    pub proxy_protocol: bool,
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub session_resumption: bool,
    pub sni: Vec<SniCert>,
}

/// `[[tls.sni]]`: a further certificate, chosen by SNI.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    pub server_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[downstream]`: client-facing connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownstreamConfig {
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    pub max_requests_per_connection: u64,
    /// None when configured as "0s".
    #[serde(deserialize_with = "zero_is_none")]
    pub tcp_keepalive: Option<Duration>,
    pub advertise_keep_alive: bool,
    #[serde(with = "humantime_serde")]
    pub front_idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// The longest gap between two reads of a request body: then 408 (or, once the response
    /// has started, the connection is closed).
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// The longest a write to the client, or an HTTP/2 stream's flow-control window, may make
    /// no progress: then the connection is closed (and the upstream connection behind it).
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Open client connections at most; 0 = derived from the open-file limit at start.
    pub max_connections: usize,
}

/// `[forwarded]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardedConfig {
    /// A bare IP in the file becomes a /32 or /128.
    #[serde(deserialize_with = "ip_nets")]
    pub trusted_proxies: Vec<IpNet>,
    pub x_forwarded_proto: bool,
    pub forwarded: bool,
    pub x_real_ip: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceKind {
    RoundRobin,
    IpHash,
    /// Power of two choices over in-flight requests (Envoy's `LEAST_REQUEST`).
    LeastRequest,
}

impl BalanceKind {
    /// The name written in the file (`balance = "..."`).
    pub fn as_str(self) -> &'static str {
        match self {
            BalanceKind::RoundRobin => "round_robin",
            BalanceKind::IpHash => "ip_hash",
            BalanceKind::LeastRequest => "least_request",
        }
    }
}

/// One backend of an upstream group: one address of a [`ServerEntry`] (a name with several
/// A/AAAA records is several backends, see [`expand::expand`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The host name of its entry, when that is not an IP address.
    pub name: Option<String>,
}

/// One entry of `servers` as written: `"host:port"` or `{ addr = "host:port", weight = N }`,
/// with the addresses its host stands for — the IP address written, or every address the name
/// resolved to last (at load, then every `resolve`), sorted and without repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    /// The host name as written, when it is not an IP address: what `resolve` looks up again.
    pub name: Option<String>,
    pub port: u16,
    pub weight: u32,
    pub ips: Vec<IpAddr>,
}

/// `[upstreams.NAME]`: one named group of backends and how kaproxy pools connections to them.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: BalanceKind,
    /// `servers` as written, each with its addresses.
    pub entries: Vec<ServerEntry>,
    /// The backends: [`expand::expand`] of `entries` (one per address, first of repeats kept).
    pub servers: Vec<ServerConfig>,
    pub pool: PoolConfig,
    pub retry: RetryConfig,
    pub buffers: BufferConfig,
    /// Time to the response head (and to a read-ahead body); then 504. Not a pool setting:
    /// the proxy bounds each exchange with it.
    pub response_timeout: Duration,
    /// `Upgrade` tokens tunnelled (lowercase; `websocket` by default; never `h2c` or `h2`).
    pub upgrade_protocols: Vec<String>,
    /// A tunnel with no byte either way for this long is closed (nginx's proxy_read_timeout).
    pub tunnel_idle_timeout: Duration,
    pub ip_hash_prefix_v4: u8,
    pub ip_hash_prefix_v6: u8,
    /// A server that comes back up or is enabled ramps to its full weight over this; zero:
    /// at once (nginx's `slow_start`, HAProxy's `slowstart`).
    pub slow_start: Duration,
    /// How often the servers' names are resolved again at run time; zero: once, at load.
    pub resolve: Duration,
    pub health: Option<HealthConfig>,
    /// Passive health, resolved at load from `health` or the defaults.
    pub passive: PassiveHealth,
    /// TLS to the backends (`tls = true` and the `tls_*` keys); None: plain HTTP/1.1.
    pub tls: Option<UpstreamTlsConfig>,
}

/// How request failures take a server out of rotation (README, passive health): `fall`
/// consecutive ones, for `cooldown`. From `[upstreams.NAME.health]` when it is there (its `fall`
/// and `passive_cooldown`), else HAProxy's `fall 3` and nginx's `fail_timeout` 10 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    pub fall: u32,
    pub cooldown: Duration,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            fall: DEFAULT_HEALTH_FALL,
            cooldown: DEFAULT_PASSIVE_COOLDOWN,
        }
    }
}

impl PassiveHealth {
    /// What `health` says, or the defaults.
    pub fn of(health: Option<&HealthConfig>) -> PassiveHealth {
        health.map_or_else(PassiveHealth::default, |h| PassiveHealth {
            fall: h.fall,
            cooldown: h.passive_cooldown,
        })
    }
}

/// The `tls_*` keys of `[upstreams.NAME]` when `tls = true` (README, "TLS to the backends").
/// Every file named here was read and checked when the config was loaded; `upstream::tls`
/// builds the rustls client configuration from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// `tls_ca`: a PEM bundle of the CAs that sign the backends' certificates. None: the
    /// webpki-roots bundle (Mozilla's CA set, compiled in).
    pub ca: Option<PathBuf>,
    /// `tls_server_name`: sent as SNI (when a DNS name) and verified against the certificate.
    /// None: each server's IP address, verified against an IP SAN, and no SNI.
    pub server_name: Option<ServerName<'static>>,
    /// `tls_verify`: false accepts any certificate (logged and shown by `check` as a warning).
    pub verify: bool,
    /// `tls_client_cert`: the PEM chain presented for mutual TLS; set with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// `tls_client_key`: its PEM private key; set with `client_cert`.
    pub client_key: Option<PathBuf>,
    /// `tls_session_resumption`: resume TLS 1.3 / 1.2 sessions to each server.
    pub session_resumption: bool,
}

impl UpstreamTlsConfig {
    /// `tls = true` alone: webpki-roots, each server's IP as the name, verification on, no
    /// client certificate, resumption on.
    pub fn new() -> Self {
        UpstreamTlsConfig {
            ca: None,
            server_name: None,
            verify: true,
            client_cert: None,
            client_key: None,
            session_resumption: true,
        }
    }
}

impl Default for UpstreamTlsConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// The pool keys of `[upstreams.NAME]`. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub keepalive_timeout: Duration,
    pub idle_timeout: Duration,
    pub safety_margin: Duration,
    pub max_lifetime: Duration,
    pub max_requests_per_connection: u32,
    pub max_idle_per_server: usize,
    pub max_connections_per_server: usize,
    pub acquire_timeout: Duration,
    pub connect_timeout: Duration,
    /// None when configured as "0s".
    pub tcp_keepalive: Option<Duration>,
    /// Learn each server's keep-alive timeout/max from its `Keep-Alive` header. Always true
    /// from TOML; kaproxy-testkit's naive pool (the control experiment) turns it off.
    pub learn_keep_alive: bool,
}

/// The retry keys of `[upstreams.NAME]`. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub retry_idempotent: bool,
    pub max_retries: u32,
    pub retry_backoff: Duration,
    /// An idempotent request that hits `response_timeout` moves on to the next server.
    pub retry_on_timeout: bool,
}

/// The buffering keys of `[upstreams.NAME]` (README, "Buffering"): whether a request body is
/// read whole (memory, then a temporary file) before an upstream connection is taken, whether
/// a response is read as fast as the backend sends it, and the limits of both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferConfig {
    /// Bytes of one request body kept in memory; past it the body goes to a temporary file
    /// (or, with `request_buffering = false`, streams).
    pub request_buffer_bytes: usize,
    /// Bytes of one response kept in memory ahead of the client; past it, a temporary file.
    pub response_buffer_bytes: usize,
    /// `request_buffering`: the whole body is read before a backend is picked.
    pub request_buffering: bool,
    /// `max_request_body_bytes`: larger bodies get 413. None: no limit (`0` in the file).
    pub max_request_body_bytes: Option<u64>,
    /// `response_buffering`: responses are read as fast as the backend sends them.
    pub response_buffering: bool,
    /// `max_response_spill_bytes`: the most of one response on disk; past it the backend
    /// waits for the client. 0: responses never go to disk.
    pub max_response_spill_bytes: u64,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            request_buffer_bytes: DEFAULT_REQUEST_BUFFER_BYTES,
            response_buffer_bytes: DEFAULT_RESPONSE_BUFFER_BYTES,
            request_buffering: true,
            max_request_body_bytes: Some(DEFAULT_MAX_REQUEST_BODY_BYTES),
            response_buffering: true,
            max_response_spill_bytes: DEFAULT_MAX_RESPONSE_SPILL_BYTES,
        }
    }
}

/// `[buffering]`: what every body buffer of the process shares.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BufferingConfig {
    /// Bytes of every in-memory body buffer together (requests and responses, HTTP/1 and
    /// every HTTP/2 stream); past it new bodies go to disk at once.
    pub memory_limit: usize,
    /// Where bodies spill. None (`""`): the system's temp dir (`TMPDIR`, else `/tmp`).
    #[serde(deserialize_with = "optional_dir")]
    pub temp_dir: Option<PathBuf>,
}

impl Default for BufferingConfig {
    fn default() -> Self {
        BufferingConfig {
            memory_limit: DEFAULT_BUFFER_MEMORY_LIMIT,
            temp_dir: None,
        }
    }
}

/// `[upstreams.NAME.health]`: optional active checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    pub path: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// How long `fall` consecutive request failures keep a server out of rotation before one
    /// request is let through again (nginx's `fail_timeout`).
    #[serde(with = "humantime_serde")]
    pub passive_cooldown: Duration,
}

/// A route's `host`, lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` stored as ".example.com".
    Suffix(String),
}

/// `[[routes]]`: the first route whose host and path prefix match picks the upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default, deserialize_with = "host_match")]
    pub host: Option<HostMatch>,
    pub path_prefix: Option<String>,
    pub upstream: String,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// None when configured as "" (no admin listener).
    #[serde(deserialize_with = "optional_addr")]
    pub listen: Option<SocketAddr>,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Required by the admin API's changes (`/servers/...`, `/reload`) from a peer that is
    /// not loopback, as `Authorization: Bearer <token>`; None: only loopback may change.
    pub token: Option<String>,
}

/// `[runtime]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// 0 = one per core available to the process.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// When log lines carry ANSI colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogColor {
    /// Only when stderr is a terminal: never in a file, journald or a pipe.
    Auto,
    Always,
    Never,
}

/// `[log]`. `level` is passed to tracing's `EnvFilter` as written. Logs go to stderr.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
    /// ANSI colour for the text format (the JSON format is never coloured).
    pub color: LogColor,
}

/// `[demo]`: built-in demo backends, for development only.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    #[serde(deserialize_with = "addrs")]
    pub backends: Vec<SocketAddr>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: DEFAULT_TLS_CERT.into(),
            key: DEFAULT_TLS_KEY.into(),
            session_resumption: true,
            sni: Vec::new(),
        }
    }
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        DownstreamConfig {
            idle_timeout: DEFAULT_DOWNSTREAM_IDLE_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_requests_per_connection: DEFAULT_DOWNSTREAM_MAX_REQUESTS,
            tcp_keepalive: Some(DEFAULT_DOWNSTREAM_TCP_KEEPALIVE),
            advertise_keep_alive: true,
            front_idle_timeout: DEFAULT_FRONT_IDLE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl Default for ForwardedConfig {
    fn default() -> Self {
        ForwardedConfig {
            trusted_proxies: Vec::new(),
            x_forwarded_proto: true,
            forwarded: false,
            x_real_ip: false,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        RawUpstream::default().into_upstream(String::new()).pool
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RawUpstream::default().into_upstream(String::new()).retry
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: DEFAULT_HEALTH_PATH.into(),
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_HEALTH_RISE,
            fall: DEFAULT_HEALTH_FALL,
            passive_cooldown: DEFAULT_PASSIVE_COOLDOWN,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: DEFAULT_ADMIN_LISTEN.parse().ok(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            token: None,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: DEFAULT_WORKER_THREADS,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: DEFAULT_LOG_LEVEL.into(),
            format: LogFormat::Text,
            access_log: true,
            color: LogColor::Auto,
        }
    }
}

// ---- Loading ----

impl Config {
    /// Reads, parses and validates `path`. Start and reload call this; on error nothing is
    /// half-applied and the error lists every problem with its line.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        check(path).result
    }

    /// Parses and validates `src`; `path` is only used to name the file in messages.
    pub fn from_toml_str(src: &str, path: &Path) -> Result<Config, ConfigError> {
        check_str(src, path).result
    }
}

/// Reads `path` and checks it: what `kaproxy check` prints and what [`Config::load`] returns.
pub fn check(path: &Path) -> CheckReport {
    match std::fs::read_to_string(path) {
        Ok(src) => check_str(&src, path),
        Err(source) => CheckReport {
            file: path.to_path_buf(),
            timeline: None,
            result: Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        },
    }
}

/// Parses and validates `src` (named `path` in messages) and builds its keep-alive timeline.
pub fn check_str(src: &str, path: &Path) -> CheckReport {
    let file = path.to_path_buf();
    let raw: RawConfig = match toml::from_str(src) {
        Ok(raw) => raw,
        Err(err) => {
            let problems = vec![toml_problem(&err, src, path)];
            let result = Err(ConfigError::Invalid(problems));
            return CheckReport {
                file,
                timeline: None,
                result,
            };
        }
    };
    let (config, mut problems) = raw.into_config(path);
    let timeline = Some(config.timeline());
    problems.extend(validate(&config));
    if problems.is_empty() {
        return CheckReport {
            file,
            timeline,
            result: Ok(config),
        };
    }
    // toml accepted the source, so toml_edit parses it too.
    let doc = ImDocument::parse(src).ok();
    for problem in &mut problems {
        problem.file = file.clone();
        let at = doc.as_ref().and_then(|doc| locate(doc, &problem.key));
        problem.line = at.map(|at| line_at(src, at));
    }
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    let result = Err(ConfigError::Invalid(problems));
    CheckReport {
        file,
        timeline,
        result,
    }
}

/// The outcome of checking a config file, ready to print: `kaproxy check` does
/// `print!("{report}")` and exits with 1 unless [`CheckReport::is_ok`].
#[derive(Debug)]
pub struct CheckReport {
    file: PathBuf,
    /// The keep-alive timeline; None when the file could not be read or parsed.
    pub timeline: Option<Timeline>,
    /// The validated configuration, or every problem found.
    pub result: Result<Config, ConfigError>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }

    /// The configuration with its timeline, or the error.
    pub fn into_result(self) -> Result<(Config, Timeline), ConfigError> {
        let config = self.result?;
        let timeline = self.timeline.unwrap_or_else(|| config.timeline());
        Ok((config, timeline))
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if let Some(timeline) = &self.timeline {
            writeln!(f, "{timeline}")?;
        }
        match &self.result {
            Ok(_) => writeln!(f, "{}: OK", self.file.display()),
            Err(ConfigError::Invalid(problems)) => {
                let n = problems.len();
                let s = if n == 1 { "" } else { "s" };
                writeln!(f, "{}: {n} problem{s}", self.file.display())?;
                problems.iter().try_for_each(|p| writeln!(f, "  {p}"))
            }
            Err(err) => writeln!(f, "{err}"),
        }
    }
}

#[cfg(test)]
mod tests;
