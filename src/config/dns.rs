//! Owns resolving the servers' host names through DNS with hickory-resolver: against the
//! `[resolver] servers` when there are some, else against the system's `/etc/resolv.conf` —
//! once at load ([`resolve_blocking`], for a file that names other DNS servers) and again
//! every `resolve` at run time ([`Dns::lookup`], driven by the control floor).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts,
    ResolverConfig as HickoryConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

/// How long one query may take before it is sent again (twice at most): a DNS server on the
/// local network answers in milliseconds; glibc's resolver waits 5 s, too long for a load.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a name got no address.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
    #[error("cannot resolve {name:?}: {reason}")]
    Lookup { name: String, reason: String },
    #[error("{name:?} resolves to no address")]
    NoAddress { name: String },
}

/// A DNS resolver for server names.
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// Asks `servers` (UDP, then TCP, on each one's port), or the system's name servers when
    /// `servers` is empty. Needs a tokio runtime for its lookups.
    pub fn new(servers: &[SocketAddr]) -> Result<Dns, DnsError> {
        let setup = |e: &dyn std::fmt::Display| DnsError::Setup(e.to_string());
        let mut builder = if servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| setup(&e))?
        } else {
            let name_servers = servers
                .iter()
                .map(|addr| {
                    let on_port = |mut c: ConnectionConfig| {
                        c.port = addr.port();
                        c
                    };
                    let connections = vec![
                        on_port(ConnectionConfig::udp()),
                        on_port(ConnectionConfig::tcp()),
                    ];
                    NameServerConfig::new(addr.ip(), true, connections)
                })
                .collect();
            let mut builder = TokioResolver::builder_with_config(
                HickoryConfig::from_name_servers(name_servers),
                TokioRuntimeProvider::default(),
            );
            // The named servers only: /etc/hosts is the system's business.
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        };
        builder.options_mut().timeout = DNS_TIMEOUT;
        builder.options_mut().attempts = 2;
        // A and AAAA both, every address a backend (README, `servers`).
        builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let resolver = builder.build().map_err(|e| setup(&e))?;
        Ok(Dns { resolver })
    }

    /// Every address `name` resolves to (its A and AAAA records), sorted, each once; no
    /// address at all is an error too.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        let found = self
            .resolver
            .lookup_ip(name)
            .await
            .map_err(|e| DnsError::Lookup {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        let ips = super::expand::sorted(found.iter());
        if ips.is_empty() {
            return Err(DnsError::NoAddress {
                name: name.to_string(),
            });
        }
        Ok(ips)
    }
}

/// Resolves `names` against `servers` from synchronous code (loading a config, at start or
/// on the blocking pool at reload): on a thread of its own with a runtime of its own, so that
/// it works whether or not the caller is inside one. One result per name, in order.
pub fn resolve_blocking(
    servers: &[SocketAddr],
    names: &[String],
) -> Vec<Result<Vec<IpAddr>, String>> {
    let all_failed = |reason: String| names.iter().map(|_| Err(reason.clone())).collect();
    std::thread::scope(|scope| {
        let lookups = scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a runtime for DNS: {e}"))?;
            runtime.block_on(async {
                let dns = Dns::new(servers).map_err(|e| e.to_string())?;
                let mut found = Vec::with_capacity(names.len());
                for name in names {
                    found.push(dns.lookup(name).await.map_err(|e| e.to_string()));
                }
                Ok::<_, String>(found)
            })
        });
        match lookups.join() {
            Ok(Ok(found)) => found,
            Ok(Err(reason)) => all_failed(reason),
            Err(_) => all_failed("the DNS lookup thread panicked".to_string()),
        }
    })
}
