//! Owns the configuration: TOML → validated, typed [`Config`], and the keep-alive timeline
//! that `kaproxy check` prints. No sockets, no tasks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

/// The whole validated configuration. Built once at the edge (start, reload); nothing
/// downstream re-parses strings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages (None when built from a string in tests).
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

#[derive(Debug, Clone)]
pub struct ListenConfig {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub session_resumption: bool,
    pub sni: Vec<SniCert>,
}

#[derive(Debug, Clone)]
pub struct SniCert {
    pub server_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct DownstreamConfig {
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
    pub max_requests_per_connection: u64,
    /// None when configured as "0s".
    pub tcp_keepalive: Option<Duration>,
    pub advertise_keep_alive: bool,
    pub front_idle_timeout: Duration,
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct ForwardedConfig {
    pub trusted_proxies: Vec<IpNet>,
    pub x_forwarded_proto: bool,
    pub forwarded: bool,
    pub x_real_ip: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceKind {
    RoundRobin,
    IpHash,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: BalanceKind,
    pub servers: Vec<ServerConfig>,
    pub pool: PoolConfig,
    pub retry: RetryConfig,
    pub ip_hash_prefix_v4: u8,
    pub ip_hash_prefix_v6: u8,
    pub health: Option<HealthConfig>,
}

#[derive(Debug, Clone)]
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
    pub response_timeout: Duration,
    /// None when configured as "0s".
    pub tcp_keepalive: Option<Duration>,
    /// Learn each server's keep-alive timeout/max from its `Keep-Alive` header. Always true
    /// from TOML; tests and `kaproxy-bench race` turn it off to build a naive pool.
    pub learn_keep_alive: bool,
}

#[derive(Debug, Clone)]
pub struct RetryConfig {
    pub retry_idempotent: bool,
    pub max_retries: u32,
    pub retry_backoff: Duration,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` stored as ".example.com".
    Suffix(String),
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    pub path_prefix: Option<String>,
    pub upstream: String,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
}

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub backends: Vec<SocketAddr>,
}
