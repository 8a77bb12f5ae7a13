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
//! written (serde), [`error`] problems with file/line/key, [`validate`] the semantic checks,
//! [`timeline`] what `kaproxy check` prints.

mod error;
mod raw;
mod timeline;
mod validate;

pub use error::{ConfigError, Problem};
pub use timeline::Timeline;

use error::*;
use raw::*;
use validate::*;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
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
pub const DEFAULT_PASSIVE_COOLDOWN: Duration = Duration::from_secs(10);
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
    /// `[demo]`: built-in Apache-like backends started before serving (development only).
    pub demo: Option<DemoConfig>,
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
}

/// One backend of an upstream group: `"host:port"` or `{ addr = "host:port", weight = N }`
/// in the file; the host name is resolved at load time (first address).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// `[upstreams.NAME]`: one named group of backends and how kaproxy pools connections to them.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: BalanceKind,
    pub servers: Vec<ServerConfig>,
    pub pool: PoolConfig,
    pub retry: RetryConfig,
    pub buffers: BufferConfig,
    /// Time to the response head (and to a read-ahead body); then 504. Not a pool setting:
    /// the proxy bounds each exchange with it.
    pub response_timeout: Duration,
    pub ip_hash_prefix_v4: u8,
    pub ip_hash_prefix_v6: u8,
    pub health: Option<HealthConfig>,
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
    /// from TOML; tests and `kaproxy-bench race` turn it off to build a naive pool.
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

/// The buffering keys of `[upstreams.NAME]`: how much of a request body is read before an
/// upstream connection is taken, and how much of a response is read ahead from the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferConfig {
    pub request_buffer_bytes: usize,
    pub response_buffer_bytes: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            request_buffer_bytes: DEFAULT_REQUEST_BUFFER_BYTES,
            response_buffer_bytes: DEFAULT_RESPONSE_BUFFER_BYTES,
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

/// The naive pool's belief about the backend: Apache-like 10 s, whatever the backend says.
pub const NAIVE_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The naive pool's idle timeout: 9 s, longer than a short real keep-alive timeout.
pub const NAIVE_IDLE_TIMEOUT: Duration = Duration::from_secs(9);

impl UpstreamConfig {
    /// Turns this group's pool into a naive one, the control experiment of the keep-alive race
    /// (the race tests and `kaproxy-bench race`): it believes the backend keeps connections
    /// [`NAIVE_KEEPALIVE_TIMEOUT`], evicts after [`NAIVE_IDLE_TIMEOUT`] with no safety margin,
    /// learns nothing from `Keep-Alive`, and re-sends written requests only when
    /// `retry_idempotent`. No config file can say this (`check` refuses it).
    pub fn make_naive(&mut self, retry_idempotent: bool) {
        self.pool.keepalive_timeout = NAIVE_KEEPALIVE_TIMEOUT;
        self.pool.idle_timeout = NAIVE_IDLE_TIMEOUT;
        self.pool.safety_margin = Duration::ZERO;
        self.pool.learn_keep_alive = false;
        self.retry.retry_idempotent = retry_idempotent;
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
    let config = raw.into_config(path);
    let timeline = Some(config.timeline());
    let mut problems = validate(&config);
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
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[listen]
http = "127.0.0.1:8080"

[upstreams.web]
servers = ["127.0.0.1:8081"]
"#;

    /// The product specification's configuration block, verbatim: every key with its default.
    const SPEC_EXAMPLE: &str = r##"[listen]
https = "0.0.0.0:8443"        # TLS listener, ALPN h2 + http/1.1; omit to disable
http  = "0.0.0.0:8080"        # plain HTTP listener; omit to disable (at least one listener)
proxy_protocol = false        # expect a PROXY v1/v2 header first (when behind a TCP load balancer)

[tls]
cert = "certs/dev-cert.pem"   # PEM chain
key  = "certs/dev-key.pem"    # PEM key (PKCS#8, RSA or EC)
session_resumption = true     # TLS 1.3 tickets / 1.2 session cache; false forces full handshakes
# [[tls.sni]]                 # more certificates chosen by SNI
# server_name = "api.example.com"
# cert = "..."
# key = "..."

[downstream]                  # client-facing connections
idle_timeout = "75s"          # close a keep-alive client connection idle this long
header_timeout = "10s"        # time allowed to receive a full request head (slowloris)
max_requests_per_connection = 10000
tcp_keepalive = "60s"         # SO_KEEPALIVE idle time on accepted sockets; "0s" disables
advertise_keep_alive = true   # send `Keep-Alive: timeout=<idle_timeout>` on HTTP/1.1 responses
front_idle_timeout = "0s"     # idle timeout of a load balancer in front of kaproxy, if any:
                              # `check` errors unless idle_timeout > front_idle_timeout
max_header_bytes = 65536
body_timeout = "60s"          # longest gap between two reads of a request body (nginx client_body_timeout)
send_timeout = "60s"          # longest time a write to the client (or an HTTP/2 stream's window)
                              # makes no progress (nginx send_timeout)
max_connections = 0           # open client connections; 0 = derived from the open-file limit.
                              # At the cap the longest-idle keep-alive connections are closed first

[forwarded]
trusted_proxies = []          # CIDRs whose X-Forwarded-For is kept and appended to;
                              # from any other peer an incoming X-Forwarded-For is replaced
x_forwarded_proto = true      # also set X-Forwarded-Proto / X-Forwarded-Port / X-Forwarded-Host
forwarded = false             # also set RFC 7239 Forwarded
x_real_ip = false

[upstreams.web]               # one or more named upstream groups
balance = "round_robin"       # "round_robin" (smooth weighted) or "ip_hash" (consistent)
servers = ["127.0.0.1:8081", { addr = "127.0.0.1:8082", weight = 2 }]
keepalive_timeout = "5s"      # the backend's own keep-alive timeout (Apache KeepAliveTimeout);
                              # a `Keep-Alive: timeout=N` response header overrides it per server
idle_timeout = "4s"           # evict pooled connections idle this long; must be
                              # < keepalive_timeout - safety_margin, else the config is rejected
safety_margin = "500ms"       # the least gap kept between kaproxy's deadline and the backend's
max_lifetime = "60s"          # retire a connection this old after its current request
max_requests_per_connection = 100   # Apache MaxKeepAliveRequests; `Keep-Alive: max=M` overrides
max_idle_per_server = 32
max_connections_per_server = 1024
acquire_timeout = "5s"        # wait for a free slot at max_connections_per_server, then 503
                              # (Reactor Netty's pendingAcquireTimeout)
connect_timeout = "2s"
response_timeout = "60s"      # time to first response byte
tcp_keepalive = "30s"
retry_idempotent = true       # retry GET/HEAD/OPTIONS/PUT/DELETE/TRACE once, on a fresh
                              # connection, when a reused one fails before any response byte
max_retries = 2               # further attempts on other servers after connect failures
retry_backoff = "100ms"       # first back-off between attempts, doubling, capped at 1 s
ip_hash_prefix_v4 = 32        # hash the whole address (24 = nginx ip_hash's /24 behaviour)
ip_hash_prefix_v6 = 64
request_buffer_bytes = 65536  # a request body up to this size is read whole before an upstream
                              # connection is taken (slow uploads never hold Apache); larger ones stream
response_buffer_bytes = 65536 # read a response ahead from the backend up to this much, so a small
                              # response frees its upstream connection however slowly the client reads
retry_on_timeout = false      # an idempotent request that hits response_timeout moves to the next server

[upstreams.web.health]        # optional active checks; passive checks are always on
path = "/"
interval = "5s"
timeout = "1s"
rise = 2                      # consecutive successes to mark a server up
fall = 3                      # consecutive failures to mark it down

# [[routes]]                  # optional; with one upstream and no routes, all traffic goes to it
# host = "api.example.com"    # exact host or "*.example.com"; omit for any
# path_prefix = "/api"
# upstream = "web"

[admin]
listen = "127.0.0.1:9901"     # /metrics (Prometheus text), /healthz, /status (JSON), / (status page)
shutdown_timeout = "30s"      # on SIGTERM/SIGINT, how long in-flight requests may finish

[runtime]
worker_threads = 0            # tokio worker threads; 0 = one per core available to the process

[log]
level = "info"                # or RUST_LOG
format = "text"               # or "json"
access_log = true
"##;

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(src, Path::new("config.toml"))
    }

    fn problems(src: &str) -> Vec<Problem> {
        match parse(src) {
            Err(ConfigError::Invalid(problems)) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    /// The timeline line that starts with `label`.
    fn row<'a>(text: &'a str, label: &str) -> &'a str {
        let found = text.lines().find(|l| l.trim_start().starts_with(label));
        found.unwrap_or_else(|| panic!("no {label:?} in {text}"))
    }

    /// MINIMAL with `extra` appended to `[upstreams.web]` (line 7 on).
    fn with_upstream(extra: &str) -> String {
        format!("{MINIMAL}{extra}")
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen.http, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.listen.https, None);
        assert_eq!(c.tls.cert, PathBuf::from(DEFAULT_TLS_CERT));
        assert!(c.tls.session_resumption);
        assert_eq!(c.downstream.idle_timeout, Duration::from_secs(75));
        assert_eq!(c.downstream.tcp_keepalive, Some(Duration::from_secs(60)));
        assert_eq!(c.downstream.max_header_bytes, 65_536);
        assert!(c.forwarded.x_forwarded_proto && !c.forwarded.forwarded);
        let web = &c.upstreams[0];
        assert_eq!(
            (web.name.as_str(), web.balance),
            ("web", BalanceKind::RoundRobin)
        );
        assert_eq!(web.servers[0].weight, 1);
        assert_eq!(web.pool.keepalive_timeout, Duration::from_secs(5));
        assert_eq!(web.pool.idle_timeout, Duration::from_secs(4));
        assert_eq!(web.pool.safety_margin, Duration::from_millis(500));
        assert_eq!(web.pool.max_requests_per_connection, 100);
        assert_eq!(web.pool.tcp_keepalive, Some(Duration::from_secs(30)));
        assert!(web.pool.learn_keep_alive);
        assert_eq!(web.retry.retry_backoff, Duration::from_millis(100));
        assert_eq!((web.ip_hash_prefix_v4, web.ip_hash_prefix_v6), (32, 64));
        assert!(web.health.is_none());
        assert_eq!(c.admin.listen, Some("127.0.0.1:9901".parse().unwrap()));
        assert_eq!(c.admin.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(
            (c.log.level.as_str(), c.log.format),
            ("info", LogFormat::Text)
        );
        assert!(c.demo.is_none());
        assert_eq!(PoolConfig::default().idle_timeout, web.pool.idle_timeout);
    }

    #[test]
    fn spec_example_parses() {
        let c = parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(c.listen.https, Some("0.0.0.0:8443".parse().unwrap()));
        let web = &c.upstreams[0];
        assert_eq!(web.servers.len(), 2);
        assert_eq!(web.servers[1].weight, 2);
        let health = web.health.as_ref().unwrap();
        assert_eq!(
            (health.path.as_str(), health.rise, health.fall),
            ("/", 2, 3)
        );
        assert_eq!(health.interval, Duration::from_secs(5));
    }

    #[test]
    fn repo_config_parses_and_its_timeline_is_ok() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.listen.https, Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(c.demo.unwrap().backends.len(), 2);
        let report = check(&path);
        let text = report.to_string();
        assert!(report.is_ok(), "{text}");
        assert!(
            row(&text, "backend keepalive_timeout").contains("OK     4s + 500ms < 5s"),
            "{text}"
        );
        assert!(text.contains("WARN") && !text.contains("ERROR  "), "{text}");
    }

    #[test]
    fn servers_addresses_and_hosts() {
        let src = r#"
[listen]
https = "localhost:8443"
[forwarded]
trusted_proxies = ["10.0.0.0/8", "192.168.1.7", "::1"]
[downstream]
tcp_keepalive = "0s"
[upstreams.b]
balance = "ip_hash"
servers = [{ addr = "127.0.0.1:9002", weight = 3 }]
[upstreams.a]
servers = ["127.0.0.1:9001"]
[[routes]]
host = "API.Example.com"
upstream = "a"
[[routes]]
host = "*.example.com"
path_prefix = "/b"
upstream = "b"
"#;
        let c = parse(src).unwrap();
        assert!(c.listen.https.unwrap().ip().is_loopback());
        assert_eq!(
            c.forwarded.trusted_proxies[1],
            "192.168.1.7/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            c.forwarded.trusted_proxies[2],
            "::1/128".parse::<IpNet>().unwrap()
        );
        assert_eq!(c.downstream.tcp_keepalive, None);
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(c.upstreams[1].balance, BalanceKind::IpHash);
        assert_eq!(c.upstreams[1].servers[0].weight, 3);
        assert_eq!(
            c.routes[0].host,
            Some(HostMatch::Exact("api.example.com".into()))
        );
        assert_eq!(
            c.routes[1].host,
            Some(HostMatch::Suffix(".example.com".into()))
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let p = problems(&with_upstream("idle_timout = \"4s\"\n"));
        assert_eq!(
            (p[0].line, p[0].key.as_str()),
            (Some(7), "upstreams.web.idle_timout")
        );
        let text = p[0].to_string();
        assert!(
            text.starts_with("config.toml:7: upstreams.web.idle_timout: unknown key `idle_timout`"),
            "{text}"
        );
    }

    #[test]
    fn bad_values_name_key_and_line() {
        let p = problems(&with_upstream("keepalive_timeout = \"5 sekunden\"\n"));
        assert_eq!(
            (p[0].line, p[0].key.as_str()),
            (Some(7), "upstreams.web.keepalive_timeout")
        );
        assert!(p[0].message.contains("expected a duration"), "{}", p[0]);

        let src = "[upstreams.web]\nservers = [\"127.0.0.1:8081\",\n  { addr = \"127.0.0.1\" }]\n";
        let p = problems(src);
        let key = "upstreams.web.servers[1].addr";
        assert_eq!((p[0].line, p[0].key.as_str()), (Some(3), key));
        assert!(p[0].message.contains(r#"expected "host:port""#), "{}", p[0]);

        let p = problems("[forwarded]\ntrusted_proxies = [\n  \"10.0.0.0/8\",\n  \"bogus\",\n]\n");
        assert_eq!(
            (p[0].line, p[0].key.as_str()),
            (Some(4), "forwarded.trusted_proxies[1]")
        );

        let p = problems("[log]\nformat = \"xml\"\n");
        assert_eq!((p[0].line, p[0].key.as_str()), (Some(2), "log.format"));
    }

    #[test]
    fn syntax_error_and_missing_file() {
        let p = problems("[listen\nhttp = 1\n");
        assert_eq!(p[0].line, Some(1));
        let err = Config::load(Path::new("/nonexistent/kaproxy.toml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/nonexistent/kaproxy.toml: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn unset_idle_timeout_follows_a_short_keepalive_timeout() {
        let c = Config::from_toml_str(
            &with_upstream("keepalive_timeout = \"1s\"\n"),
            Path::new("config.toml"),
        )
        .expect("a short keepalive_timeout alone is a valid config");
        assert_eq!(c.upstreams[0].pool.idle_timeout, Duration::from_millis(400));
        let c = Config::from_toml_str(
            &with_upstream("keepalive_timeout = \"2s\"\nsafety_margin = \"1s\"\n"),
            Path::new("config.toml"),
        )
        .unwrap();
        assert_eq!(c.upstreams[0].pool.idle_timeout, Duration::from_millis(800));
        // The default stays 4 s wherever it fits.
        let c = Config::from_toml_str(&with_upstream(""), Path::new("config.toml")).unwrap();
        assert_eq!(c.upstreams[0].pool.idle_timeout, Duration::from_secs(4));
    }

    #[test]
    fn upstream_idle_timeout_must_leave_the_safety_margin() {
        let src = with_upstream("keepalive_timeout = \"5s\"\nidle_timeout = \"6s\"\n");
        let p = problems(&src);
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].to_string(),
            r#"config.toml:8: upstreams.web.idle_timeout: must be less than keepalive_timeout - safety_margin (5s - 500ms = 4.5s), got 6s; set idle_timeout = "4s""#
        );
        // Equal to the limit is still a race: the ordering is strict.
        assert_eq!(
            problems(&with_upstream("idle_timeout = \"4500ms\"\n")).len(),
            1
        );
        let p = problems(&with_upstream("safety_margin = \"5s\"\n"));
        assert_eq!(p[0].key, "upstreams.web.keepalive_timeout");
    }

    #[test]
    fn front_idle_timeout_must_be_below_downstream_idle_timeout() {
        let src = format!(
            "{MINIMAL}[downstream]\nfront_idle_timeout = \"60s\"\nidle_timeout = \"60s\"\n"
        );
        let p = problems(&src);
        assert_eq!(
            (p[0].line, p[0].key.as_str()),
            (Some(9), "downstream.idle_timeout")
        );
        assert_eq!(p[0].fix.as_deref(), Some(r#"set idle_timeout = "65s""#));
    }

    #[test]
    fn routes_must_name_an_upstream() {
        let p = problems(&format!(
            "{MINIMAL}[[routes]]\npath_prefix = \"/api\"\nupstream = \"api\"\n"
        ));
        assert_eq!(
            (p[0].line, p[0].key.as_str()),
            (Some(9), "routes[0].upstream")
        );
        assert_eq!(p[0].fix.as_deref(), Some("use one of: web"));
    }

    #[test]
    fn health_path_must_be_a_valid_request_target() {
        let p = problems(&format!(
            "{MINIMAL}[upstreams.web.health]\npath = \"/he alth\"\n"
        ));
        assert_eq!(p[0].key, "upstreams.web.health.path");
        assert!(
            p[0].message.contains("not a valid request target"),
            "{}",
            p[0]
        );
        let p = problems(&format!(
            "{MINIMAL}[upstreams.web.health]\npath = \"health\"\n"
        ));
        assert!(p[0].message.contains("must start with"), "{}", p[0]);
    }

    #[test]
    fn several_upstreams_need_routes() {
        let p = problems(&format!(
            "{MINIMAL}[upstreams.api]\nservers = [\"127.0.0.1:9000\"]\n"
        ));
        assert_eq!(p[0].key, "routes");
        assert!(p[0].message.contains("2 upstream groups"), "{}", p[0]);
    }

    #[test]
    fn all_problems_are_reported_together() {
        let src = r#"
[downstream]
max_header_bytes = 1024

[upstreams.web]
servers = [{ addr = "127.0.0.1:8081", weight = 0 }]
idle_timeout = "5s"
max_idle_per_server = 10
max_connections_per_server = 5
ip_hash_prefix_v4 = 33

[upstreams.web.health]
rise = 0
"#;
        let p = problems(src);
        let got: Vec<(Option<usize>, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(3), "downstream.max_header_bytes"),
                (Some(6), "upstreams.web.servers[0].weight"),
                (Some(7), "upstreams.web.idle_timeout"),
                (Some(8), "upstreams.web.max_idle_per_server"),
                (Some(10), "upstreams.web.ip_hash_prefix_v4"),
                (Some(13), "upstreams.web.health.rise"),
                (None, "listen"),
            ]
        );
        let err = parse(src).unwrap_err().to_string();
        assert_eq!(err.lines().count(), 7, "{err}");
    }

    #[test]
    fn timeline_lists_the_client_deadlines() {
        let src = "[listen]\nhttp = \"127.0.0.1:8080\"\n[downstream]\nbody_timeout = \"5s\"\nmax_connections = 500\n[upstreams.web]\nservers = [\"127.0.0.1:8081\"]\nrequest_buffer_bytes = 1000\n";
        let text = parse(src).unwrap().timeline().to_string();
        assert!(row(&text, "body_timeout").contains("5s"), "{text}");
        assert!(row(&text, "send_timeout").contains("60s"), "{text}");
        assert!(row(&text, "max_connections").contains("500"), "{text}");
        assert!(row(&text, "web buffers").contains("1000 / 64KiB"), "{text}");
        let auto = parse(MINIMAL).unwrap().timeline().to_string();
        assert!(row(&auto, "max_connections").contains("auto"), "{auto}");
    }

    #[test]
    fn timeline_marks_broken_orderings() {
        let c = parse(MINIMAL).unwrap();
        assert!(!c.timeline().has_errors());
        let text = c.timeline().to_string();
        assert!(row(&text, "backend keepalive_timeout").contains("OK     4s + 500ms < 5s"));

        let src = with_upstream("idle_timeout = \"6s\"\nmax_requests_per_connection = 1000\n");
        let src = format!("{src}[downstream]\nfront_idle_timeout = \"90s\"\n[demo]\nbackends = [\"127.0.0.1:8081\"]\n");
        let report = check_str(&src, Path::new("config.toml"));
        assert!(!report.is_ok());
        let timeline = report.timeline.as_ref().unwrap();
        assert!(timeline.has_errors() && timeline.has_warnings());
        let text = report.to_string();
        let errors = text.lines().filter(|l| l.contains("ERROR  ")).count();
        assert_eq!(errors, 2, "{text}");
        assert!(text.contains(r#"fix: set idle_timeout = "4s""#), "{text}");
        assert!(text.contains(r#"fix: set idle_timeout = "95s""#), "{text}");
        assert!(text.contains("delete the [demo] table"), "{text}");
        assert!(text.contains("config.toml: 2 problems"), "{text}");
    }

    #[test]
    fn fixes_suggest_round_values() {
        let ms = Duration::from_millis;
        assert_eq!(round_below(ms(4500)), ms(4000));
        assert_eq!(round_below(ms(5000)), ms(4000));
        assert_eq!(round_below(ms(800)), ms(700));
        assert_eq!(round_below(ms(1000)), ms(900));
        assert_eq!(
            [human(ms(4500)), human(ms(500)), human(ms(75_000))],
            ["4.5s", "500ms", "75s"]
        );
    }
}
