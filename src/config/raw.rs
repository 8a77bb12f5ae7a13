//! The configuration file as written: serde structs and field deserializers that turn each
//! bad value into a [`Problem`] with the value's line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use rustls_pki_types::ServerName;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{
    default_idle_timeout, AdminConfig, BalanceKind, BufferConfig, BufferingConfig, Config,
    DemoConfig, DownstreamConfig, ForwardedConfig, HealthConfig, HostMatch, ListenConfig,
    LogConfig, PassiveHealth, PoolConfig, Problem, ResolverConfig, RetryConfig, RouteConfig,
    RuntimeConfig, ServerEntry, TlsConfig, UpstreamConfig, UpstreamTlsConfig,
    DEFAULT_ACQUIRE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_IP_HASH_PREFIX_V4,
    DEFAULT_IP_HASH_PREFIX_V6, DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_SERVER,
    DEFAULT_MAX_IDLE_PER_SERVER, DEFAULT_MAX_LIFETIME, DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_MAX_RESPONSE_SPILL_BYTES, DEFAULT_MAX_RETRIES, DEFAULT_REQUEST_BUFFER_BYTES,
    DEFAULT_RESPONSE_BUFFER_BYTES, DEFAULT_RESPONSE_TIMEOUT, DEFAULT_RETRY_BACKOFF,
    DEFAULT_SAFETY_MARGIN, DEFAULT_TUNNEL_IDLE_TIMEOUT, DEFAULT_UPGRADE_PROTOCOLS,
    DEFAULT_UPSTREAM_MAX_REQUESTS, DEFAULT_UPSTREAM_TCP_KEEPALIVE, DEFAULT_WEIGHT,
};

// ---- The file as written ----

/// The whole file; differs from [`Config`] only in `upstreams` being a map by name.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawConfig {
    listen: ListenConfig,
    tls: TlsConfig,
    downstream: DownstreamConfig,
    forwarded: ForwardedConfig,
    upstreams: BTreeMap<String, RawUpstream>,
    routes: Vec<RouteConfig>,
    admin: AdminConfig,
    runtime: RuntimeConfig,
    log: LogConfig,
    buffering: BufferingConfig,
    demo: Option<DemoConfig>,
    resolver: ResolverConfig,
}

/// `[upstreams.NAME]` as written: pool and retry keys sit flat in the table. `servers` has no
/// default; an empty list is reported by validation, with the table's line.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawUpstream {
    balance: BalanceKind,
    servers: Vec<ServerEntry>,
    #[serde(with = "humantime_serde")]
    keepalive_timeout: Duration,
    /// None when the file leaves it out: then derived from keepalive_timeout (see
    /// [`default_idle_timeout`]).
    #[serde(with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    safety_margin: Duration,
    #[serde(with = "humantime_serde")]
    max_lifetime: Duration,
    max_requests_per_connection: u32,
    max_idle_per_server: usize,
    max_connections_per_server: usize,
    #[serde(with = "humantime_serde")]
    acquire_timeout: Duration,
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    response_timeout: Duration,
    upgrade_protocols: Vec<String>,
    #[serde(with = "humantime_serde")]
    tunnel_idle_timeout: Duration,
    #[serde(deserialize_with = "zero_is_none")]
    tcp_keepalive: Option<Duration>,
    retry_idempotent: bool,
    max_retries: u32,
    #[serde(with = "humantime_serde")]
    retry_backoff: Duration,
    ip_hash_prefix_v4: u8,
    ip_hash_prefix_v6: u8,
    #[serde(with = "humantime_serde")]
    slow_start: Duration,
    #[serde(with = "humantime_serde")]
    resolve: Duration,
    request_buffer_bytes: usize,
    response_buffer_bytes: usize,
    request_buffering: bool,
    max_request_body_bytes: u64,
    response_buffering: bool,
    max_response_spill_bytes: u64,
    retry_on_timeout: bool,
    health: Option<HealthConfig>,
    /// TLS to the backends; the `tls_*` keys below count only with `tls = true`. They are
    /// Options so that one written with `tls = false` can be reported (see `tls_problems`).
    tls: bool,
    tls_ca: Option<PathBuf>,
    #[serde(deserialize_with = "server_name")]
    tls_server_name: Option<ServerName<'static>>,
    tls_verify: Option<bool>,
    tls_client_cert: Option<PathBuf>,
    tls_client_key: Option<PathBuf>,
    tls_session_resumption: Option<bool>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            balance: BalanceKind::RoundRobin,
            servers: Vec::new(),
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            idle_timeout: None,
            safety_margin: DEFAULT_SAFETY_MARGIN,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            max_requests_per_connection: DEFAULT_UPSTREAM_MAX_REQUESTS,
            max_idle_per_server: DEFAULT_MAX_IDLE_PER_SERVER,
            max_connections_per_server: DEFAULT_MAX_CONNECTIONS_PER_SERVER,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            upgrade_protocols: DEFAULT_UPGRADE_PROTOCOLS
                .iter()
                .map(|p| p.to_string())
                .collect(),
            tunnel_idle_timeout: DEFAULT_TUNNEL_IDLE_TIMEOUT,
            tcp_keepalive: Some(DEFAULT_UPSTREAM_TCP_KEEPALIVE),
            retry_idempotent: true,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            ip_hash_prefix_v4: DEFAULT_IP_HASH_PREFIX_V4,
            ip_hash_prefix_v6: DEFAULT_IP_HASH_PREFIX_V6,
            slow_start: Duration::ZERO,
            resolve: Duration::ZERO,
            request_buffer_bytes: DEFAULT_REQUEST_BUFFER_BYTES,
            response_buffer_bytes: DEFAULT_RESPONSE_BUFFER_BYTES,
            request_buffering: true,
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            response_buffering: true,
            max_response_spill_bytes: DEFAULT_MAX_RESPONSE_SPILL_BYTES,
            retry_on_timeout: false,
            health: None,
            tls: false,
            tls_ca: None,
            tls_server_name: None,
            tls_verify: None,
            tls_client_cert: None,
            tls_client_key: None,
            tls_session_resumption: None,
        }
    }
}

impl RawUpstream {
    /// The `tls_*` keys written while `tls` is false. nginx ignores `proxy_ssl_*` for an
    /// `http://` upstream and HAProxy a server's `ca-file` without `ssl`; kaproxy refuses them
    /// instead (README, "TLS to the backends"): the likely mistake is a forgotten `tls = true`,
    /// and ignoring it would send the traffic in the clear.
    fn tls_problems(&self, name: &str) -> Vec<Problem> {
        if self.tls {
            return Vec::new();
        }
        let written = [
            ("tls_ca", self.tls_ca.is_some()),
            ("tls_server_name", self.tls_server_name.is_some()),
            ("tls_verify", self.tls_verify.is_some()),
            ("tls_client_cert", self.tls_client_cert.is_some()),
            ("tls_client_key", self.tls_client_key.is_some()),
            (
                "tls_session_resumption",
                self.tls_session_resumption.is_some(),
            ),
        ];
        written
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(key, _)| {
                Problem::new(
                    format!("upstreams.{name}.{key}"),
                    "is set but tls = false: nothing would be encrypted",
                )
                .fix(format!("set tls = true, or remove {key}"))
            })
            .collect()
    }

    /// `tls = true` and its keys, typed; None for `tls = false`.
    fn tls_config(&self) -> Option<UpstreamTlsConfig> {
        let default = UpstreamTlsConfig::new();
        self.tls.then(|| UpstreamTlsConfig {
            ca: self.tls_ca.clone(),
            server_name: self.tls_server_name.clone(),
            verify: self.tls_verify.unwrap_or(default.verify),
            client_cert: self.tls_client_cert.clone(),
            client_key: self.tls_client_key.clone(),
            session_resumption: self
                .tls_session_resumption
                .unwrap_or(default.session_resumption),
        })
    }

    pub(super) fn into_upstream(self, name: String) -> UpstreamConfig {
        let tls = self.tls_config();
        UpstreamConfig {
            name,
            balance: self.balance,
            entries: self.servers,
            // Filled by resolve_names, once the names have addresses.
            servers: Vec::new(),
            pool: PoolConfig {
                keepalive_timeout: self.keepalive_timeout,
                idle_timeout: self.idle_timeout.unwrap_or_else(|| {
                    default_idle_timeout(self.keepalive_timeout, self.safety_margin)
                }),
                safety_margin: self.safety_margin,
                max_lifetime: self.max_lifetime,
                max_requests_per_connection: self.max_requests_per_connection,
                max_idle_per_server: self.max_idle_per_server,
                max_connections_per_server: self.max_connections_per_server,
                acquire_timeout: self.acquire_timeout,
                connect_timeout: self.connect_timeout,
                tcp_keepalive: self.tcp_keepalive,
                learn_keep_alive: true,
            },
            retry: RetryConfig {
                retry_idempotent: self.retry_idempotent,
                max_retries: self.max_retries,
                retry_backoff: self.retry_backoff,
                retry_on_timeout: self.retry_on_timeout,
            },
            response_timeout: self.response_timeout,
            // Tokens are case-insensitive (RFC 9110 §7.8); kept lowercase.
            upgrade_protocols: self
                .upgrade_protocols
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect(),
            tunnel_idle_timeout: self.tunnel_idle_timeout,
            buffers: BufferConfig {
                request_buffer_bytes: self.request_buffer_bytes,
                response_buffer_bytes: self.response_buffer_bytes,
                request_buffering: self.request_buffering,
                // nginx's `client_max_body_size 0`: no limit.
                max_request_body_bytes: Some(self.max_request_body_bytes).filter(|&n| n > 0),
                response_buffering: self.response_buffering,
                max_response_spill_bytes: self.max_response_spill_bytes,
            },
            ip_hash_prefix_v4: self.ip_hash_prefix_v4,
            ip_hash_prefix_v6: self.ip_hash_prefix_v6,
            slow_start: self.slow_start,
            resolve: self.resolve,
            passive: PassiveHealth::of(self.health.as_ref()),
            health: self.health,
            tls,
        }
    }
}

impl RawConfig {
    /// The typed config, and the problems only the file as written shows (a `tls_*` key with
    /// `tls = false`); keys set, lines not yet, as [`mod@super::validate`]'s.
    pub(super) fn into_config(self, path: &Path) -> (Config, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut upstreams: Vec<UpstreamConfig> = self
            .upstreams
            .into_iter()
            .map(|(name, raw)| {
                problems.extend(raw.tls_problems(&name));
                raw.into_upstream(name)
            })
            .collect();
        problems.extend(resolve_names(&mut upstreams, &self.resolver));
        let config = Config {
            source: Some(path.to_path_buf()),
            listen: self.listen,
            tls: self.tls,
            downstream: self.downstream,
            forwarded: self.forwarded,
            upstreams,
            routes: self.routes,
            admin: self.admin,
            runtime: self.runtime,
            log: self.log,
            buffering: self.buffering,
            demo: self.demo,
            resolver: self.resolver,
        };
        (config, problems)
    }
}

/// The servers' host names resolved, each to all its addresses: by the `[resolver] servers`
/// when there are some, else by getaddrinfo; a name that does not resolve is reported with
/// its server's key. Then each upstream's backends are its entries expanded
/// ([`super::expand`]), an address listed twice logged as a warning.
fn resolve_names(upstreams: &mut [UpstreamConfig], resolver: &ResolverConfig) -> Vec<Problem> {
    let mut problems = Vec::new();
    let named: Vec<(usize, usize, String)> = upstreams
        .iter()
        .enumerate()
        .flat_map(|(u, up)| {
            up.entries
                .iter()
                .enumerate()
                .filter_map(move |(s, entry)| Some((u, s, entry.name.clone()?)))
        })
        .collect();
    let found: Vec<Result<Vec<IpAddr>, String>> = if named.is_empty() {
        Vec::new()
    } else if resolver.servers.is_empty() {
        named
            .iter()
            .map(|(u, s, name)| resolve_all(name, upstreams[*u].entries[*s].port))
            .collect()
    } else {
        let names: Vec<String> = named.iter().map(|(_, _, n)| n.clone()).collect();
        super::dns::resolve_blocking(&resolver.servers, &names)
    };
    for ((u, s, _), found) in named.into_iter().zip(found) {
        let upstream = &mut upstreams[u];
        match found {
            Ok(ips) => upstream.entries[s].ips = ips,
            Err(reason) => problems.push(
                Problem::new(format!("upstreams.{}.servers[{s}]", upstream.name), reason)
                    .fix("check the name, or write the server's IP address"),
            ),
        }
    }
    for upstream in upstreams {
        let (servers, duplicates) = super::expand::expand(&upstream.entries);
        for d in duplicates {
            tracing::warn!(upstream = %upstream.name, server = %d.addr, kept = d.kept, dropped = d.dropped,
                "servers: an address listed twice is one backend, the first entry's (servers[kept])");
        }
        upstream.servers = servers;
    }
    problems
}

/// Every address getaddrinfo gives `name` (sorted, each once).
fn resolve_all(name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
    let found = (name, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {name:?}: {e}"))?;
    let ips = super::expand::sorted(found.map(|a| a.ip()));
    if ips.is_empty() {
        return Err(format!("{name:?} resolves to no address"));
    }
    Ok(ips)
}

/// `"host:port"` as a server: an IP address as is; a host name kept for [`resolve_names`]
/// (which decides how: the `[resolver]` table may name other DNS servers) and for `resolve`.
fn server_addr(s: &str) -> Result<(SocketAddr, Option<String>), String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok((addr, None));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!(r#"expected "host:port", got {s:?}"#));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!(r#"expected "host:port", got {s:?}"#));
    };
    if host.is_empty() {
        return Err(format!(r#"expected "host:port", got {s:?}"#));
    }
    Ok((
        SocketAddr::from(([0, 0, 0, 0], port)),
        Some(host.to_string()),
    ))
}

fn server_addr_field<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<(SocketAddr, Option<String>), D::Error> {
    parse_str(d, server_addr)
}

/// The table form of a server, `{ addr = "host:port", weight = N }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServerTable {
    #[serde(deserialize_with = "server_addr_field")]
    addr: (SocketAddr, Option<String>),
    #[serde(default = "default_weight")]
    weight: u32,
}

pub(super) fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// A string or a table; written by hand rather than `#[serde(untagged)]` so that a bad entry
/// gets the real reason (unknown key, unresolvable host) instead of "did not match any variant".
impl<'de> Deserialize<'de> for ServerEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ServerVisitor;
        impl<'de> Visitor<'de> for ServerVisitor {
            type Value = ServerEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""host:port" or { addr = "host:port", weight = N }"#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ServerEntry, E> {
                let addr = server_addr(s).map_err(E::custom)?;
                Ok(entry(addr, DEFAULT_WEIGHT))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ServerEntry, A::Error> {
                let t = RawServerTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(entry(t.addr, t.weight))
            }
        }
        deserializer.deserialize_any(ServerVisitor)
    }
}

/// An entry of `servers`: an IP address stands for itself; a name for nothing until
/// [`resolve_names`] looks it up.
fn entry((addr, name): (SocketAddr, Option<String>), weight: u32) -> ServerEntry {
    let ips = match name {
        Some(_) => Vec::new(),
        None => vec![addr.ip()],
    };
    ServerEntry {
        name,
        port: addr.port(),
        weight,
        ips,
    }
}

// ---- Field deserializers: each error message becomes a Problem with the value's line ----

/// Deserializes a string through `parse`. Failing inside the visitor, not after it, is what
/// gives the error the span of the value (an array element, not the whole array).
pub(super) fn parse_str<'de, D, T>(
    d: D,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct ParseVisitor<T>(fn(&str) -> Result<T, String>);
    impl<T> Visitor<'_> for ParseVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            (self.0)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(ParseVisitor(parse))
}

/// "host:port" → the first address it resolves to.
pub(super) fn resolve(s: &str) -> Result<SocketAddr, String> {
    let has_port = s
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    if !has_port {
        return Err(format!(r#"expected "host:port", got {s:?}"#));
    }
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

pub(super) fn addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse_str(d, resolve)
}

/// "" disables (a listener, the admin endpoint).
pub(super) fn optional_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    parse_str(d, |s| match s {
        "" => Ok(None),
        s => resolve(s).map(Some),
    })
}

/// One address per element, so that an error points at the bad element.
#[derive(Deserialize)]
#[serde(transparent)]
pub(super) struct Addr(#[serde(deserialize_with = "addr")] SocketAddr);

pub(super) fn addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    Ok(Vec::<Addr>::deserialize(d)?
        .into_iter()
        .map(|a| a.0)
        .collect())
}

/// A CIDR, or a bare IP as a /32 or /128.
#[derive(Deserialize)]
#[serde(transparent)]
pub(super) struct Net(#[serde(deserialize_with = "ip_net")] IpNet);

pub(super) fn ip_net<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    parse_str(d, |s| {
        s.parse::<IpNet>()
            .ok()
            .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
            .ok_or_else(|| format!("expected an IP or a CIDR, got {s:?}"))
    })
}

pub(super) fn ip_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Vec::<Net>::deserialize(d)?
        .into_iter()
        .map(|n| n.0)
        .collect())
}

/// `tls_server_name`: a DNS name or an IP address, as rustls verifies it (RFC 6125 names; an
/// IP is checked against the certificate's IP SANs and never sent as SNI, RFC 6066 §3).
pub(super) fn server_name<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<ServerName<'static>>, D::Error> {
    parse_str(d, |s| {
        ServerName::try_from(s.to_string()).map(Some).map_err(|_| {
            format!(
                r#"expected a DNS name or an IP address such as "backend.internal" (no port), got {s:?}"#
            )
        })
    })
}

/// A duration where "0s" means off.
/// A directory path; `""` is None (a default applies).
pub(super) fn optional_dir<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

pub(super) fn zero_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let duration: Duration = humantime_serde::deserialize(d)?;
    Ok(Some(duration).filter(|d| !d.is_zero()))
}

/// "api.example.com" → Exact, "*.example.com" → Suffix(".example.com"), both lowercased.
pub(super) fn host_match<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HostMatch>, D::Error> {
    parse_str(d, |host| {
        let host = host.to_ascii_lowercase();
        let (name, pattern) = match host.strip_prefix("*.") {
            Some(name) => (name, HostMatch::Suffix(format!(".{name}"))),
            None => (host.as_str(), HostMatch::Exact(host.clone())),
        };
        if name.is_empty() || name.contains(['*', '/', ':', ' ']) {
            return Err(format!(
                r#"expected "api.example.com" or "*.example.com", got {host:?}"#
            ));
        }
        Ok(Some(pattern))
    })
}
