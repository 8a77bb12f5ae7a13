//! Owns re-resolving the servers' host names at run time (`resolve`): one task that looks the
//! names of each upstream with `resolve` above zero up again that often ([`crate::config::dns`])
//! and, when the set of addresses of a name changed, swaps in the running configuration with
//! the backends the new answers make ([`crate::config::expand`]), as a reload does — the
//! backends whose address stays keep their pools, health and admin state; one whose address
//! is gone is no longer chosen, its requests in flight finish. A lookup that fails or finds no
//! address keeps the name's last addresses (nginx's `resolve` does the same), logged once per
//! failure streak and once when it ends.

use std::collections::{HashMap, HashSet};
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

/// One entry of `servers` whose name now stands for other addresses.
struct Change {
    upstream: usize,
    entry: usize,
    to: Vec<IpAddr>,
}

/// The names whose lookups are failing, so that a failure streak is logged when it starts and
/// when it ends, not at every `resolve`.
#[derive(Default)]
struct Streaks {
    failing: HashSet<String>,
}

impl Streaks {
    /// A lookup of `name` failed: whether that starts a streak (log it).
    fn failed(&mut self, name: &str) -> bool {
        self.failing.insert(name.to_string())
    }

    /// A lookup of `name` succeeded: whether that ends a streak (log it).
    fn succeeded(&mut self, name: &str) -> bool {
        self.failing.remove(name)
    }
}

async fn run(control: Weak<Control>) {
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut dns: Option<(Vec<SocketAddr>, Dns)> = None;
    let mut streaks = Streaks::default();
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
        // One lookup per name a round, however many entries or upstreams name it.
        let mut answers: HashMap<String, Option<Vec<IpAddr>>> = HashMap::new();
        for (u, upstream) in config.upstreams.iter().enumerate() {
            if upstream.resolve.is_zero() || upstream.entries.iter().all(|e| e.name.is_none()) {
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
            for (e, entry) in upstream.entries.iter().enumerate() {
                let Some(name) = &entry.name else { continue };
                if !answers.contains_key(name) {
                    let found = match resolver.lookup(name).await {
                        Ok(ips) => {
                            if streaks.succeeded(name) {
                                info!(%name, addrs = ?ips, "resolve: the name resolves again");
                            }
                            Some(ips)
                        }
                        Err(err) => {
                            if streaks.failed(name) {
                                warn!(%name, error = %err, "resolve: lookup failed; the servers keep their last addresses (logged again when it resolves)");
                            }
                            None
                        }
                    };
                    answers.insert(name.clone(), found);
                }
                match &answers[name] {
                    Some(ips) if *ips != entry.ips => changes.push(Change {
                        upstream: u,
                        entry: e,
                        to: ips.clone(),
                    }),
                    _ => {}
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
    let config = changed(looked_up, changes);
    if let Err(e) = control.apply(config) {
        warn!(error = %e, "resolve: the configuration with the new addresses was refused");
    }
}

/// `config` with the entries of `changes` standing for their new addresses, and the backends
/// of the upstreams they are in made again from the entries.
fn changed(config: &Config, changes: Vec<Change>) -> Config {
    let mut config = config.clone();
    let mut touched = Vec::new();
    for c in changes {
        let upstream = &mut config.upstreams[c.upstream];
        let entry = &mut upstream.entries[c.entry];
        info!(upstream = %upstream.name, name = entry.name.as_deref().unwrap_or_default(),
            from = ?entry.ips, to = ?c.to, "resolve: server addresses changed");
        entry.ips = c.to;
        touched.push(c.upstream);
    }
    touched.dedup();
    for u in touched {
        let upstream = &mut config.upstreams[u];
        let (servers, duplicates) = crate::config::expand::expand(&upstream.entries);
        for d in duplicates {
            warn!(upstream = %upstream.name, server = %d.addr, kept = d.kept, dropped = d.dropped,
                "resolve: an address listed twice is one backend, the first entry's (servers[kept])");
        }
        upstream.servers = servers;
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_streak_is_logged_when_it_starts_and_when_it_ends() {
        let mut s = Streaks::default();
        assert!(!s.succeeded("a.test"), "no streak to end");
        assert!(s.failed("a.test"), "the first failure is logged");
        assert!(!s.failed("a.test"), "the next ones are not");
        assert!(!s.failed("a.test"));
        assert!(s.failed("b.test"), "another name has a streak of its own");
        assert!(s.succeeded("a.test"), "the recovery is logged");
        assert!(!s.succeeded("a.test"), "once");
        assert!(s.failed("a.test"), "a new streak is logged again");
        assert!(!s.failed("b.test"), "b's streak went on all along");
    }

    #[test]
    fn a_changed_answer_remakes_the_backends_of_its_upstream_only() {
        let src = "[listen]\nhttp = \"127.0.0.1:0\"\n\
                   [upstreams.a]\nservers = [\"127.0.0.5:80\", \"127.0.0.6:80\"]\n\
                   [upstreams.b]\nservers = [\"127.0.0.7:80\"]\n\
                   [[routes]]\nupstream = \"a\"\n";
        let config = Config::from_toml_str(src, std::path::Path::new("t.toml")).unwrap();
        let a = config.upstreams.iter().position(|u| u.name == "a").unwrap();
        let ips = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<IpAddr>>()
        };
        let to = changed(
            &config,
            vec![Change {
                upstream: a,
                entry: 1,
                to: ips(&["127.0.0.8", "127.0.0.5"]),
            }],
        );
        let addrs = |u: &crate::config::UpstreamConfig| {
            u.servers
                .iter()
                .map(|s| s.addr.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            addrs(&to.upstreams[a]),
            ["127.0.0.5:80", "127.0.0.8:80"],
            "sorted, the repeat of 127.0.0.5 kept once"
        );
        assert_eq!(addrs(&to.upstreams[1 - a]), addrs(&config.upstreams[1 - a]));
    }
}
