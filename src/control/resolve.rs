//! Owns re-resolving the servers' host names at run time (`resolve`): one task that looks the
//! names of each upstream with `resolve` above zero up again that often ([`crate::config::dns`])
//! and, when an address changed, swaps in the running configuration with the new address, as
//! a reload does — the pools, health and admin state of the servers that did not change stay.
//! A name that fails to resolve keeps its last address (nginx's `resolve` does the same).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::dns::Dns;
use crate::config::Config;
use crate::control::reload::Control;

/// How often the task looks at the configuration when no upstream re-resolves (a reload may
/// turn `resolve` on).
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// Starts the task on the current runtime; it ends with `control` or when aborted.
pub fn spawn(control: &Arc<Control>) -> AbortHandle {
    tokio::spawn(run(Arc::downgrade(control))).abort_handle()
}

/// One address to change: upstream, server index, the name, the new address.
struct Change {
    upstream: usize,
    server: usize,
    name: String,
    from: SocketAddr,
    to: IpAddr,
}

async fn run(control: Weak<Control>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut dns: Option<(Vec<SocketAddr>, Dns)> = None;
    loop {
        let Some(strong) = control.upgrade() else {
            return;
        };
        let generation = strong.generation();
        drop(strong);
        let config = &generation.config;
        let now = Instant::now();
        let mut wake = now + IDLE_LOOK;
        let mut changes = Vec::new();
        for (u, upstream) in config.upstreams.iter().enumerate() {
            if upstream.resolve.is_zero() || upstream.servers.iter().all(|s| s.name.is_none()) {
                due.remove(&upstream.name);
                continue;
            }
            let at = *due
                .entry(upstream.name.clone())
                .or_insert(now + upstream.resolve);
            if now < at {
                wake = wake.min(at);
                continue;
            }
            let next = now + upstream.resolve;
            due.insert(upstream.name.clone(), next);
            wake = wake.min(next);
            let servers = &config.resolver.servers;
            if dns
                .as_ref()
                .is_none_or(|(for_servers, _)| for_servers != servers)
            {
                match Dns::new(servers) {
                    Ok(d) => dns = Some((servers.clone(), d)),
                    Err(e) => {
                        warn!(error = %e, "resolve: no DNS resolver; server addresses stay");
                        continue;
                    }
                }
            }
            let (_, resolver) = dns.as_ref().expect("set above");
            for (s, server) in upstream.servers.iter().enumerate() {
                let Some(name) = &server.name else { continue };
                match resolver.lookup(name).await {
                    Ok(ip) if ip != server.addr.ip() => changes.push(Change {
                        upstream: u,
                        server: s,
                        name: name.clone(),
                        from: server.addr,
                        to: ip,
                    }),
                    Ok(_) => {}
                    Err(e) => warn!(upstream = %upstream.name, server = %server.addr, error = %e,
                        "resolve: lookup failed; the server keeps its address"),
                }
            }
        }
        if !changes.is_empty() {
            apply(&control, &generation.config, changes);
        }
        drop(generation);
        tokio::time::sleep_until(wake).await;
    }
}

/// Swaps in `config` with `changes`, unless another configuration was swapped in while the
/// names were looked up (a reload: its own load resolved them).
fn apply(control: &Weak<Control>, looked_up: &Arc<Config>, changes: Vec<Change>) {
    let Some(control) = control.upgrade() else {
        return;
    };
    if !Arc::ptr_eq(&control.generation().config, looked_up) {
        return;
    }
    let mut config = (**looked_up).clone();
    for c in &changes {
        let upstream = &mut config.upstreams[c.upstream];
        upstream.servers[c.server].addr.set_ip(c.to);
        info!(upstream = %upstream.name, name = %c.name, from = %c.from,
            to = %upstream.servers[c.server].addr, "resolve: server address changed");
    }
    if let Err(e) = control.apply(config) {
        warn!(error = %e, "resolve: the configuration with the new addresses was refused");
    }
}
