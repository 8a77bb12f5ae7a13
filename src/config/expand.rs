//! Owns turning `servers` as written ([`ServerEntry`]) into the backends kaproxy balances over
//! ([`ServerConfig`]): one per address an entry stands for, each with the entry's weight and
//! name, in a fixed order — entries as written, each one's addresses sorted — so that the same
//! DNS records give the same backends, and the same `ip_hash` choices, on every instance. An
//! address listed twice (two names with one record, or a name and the IP written too) is one
//! backend: the first entry's, with its weight; the later ones are reported as [`Duplicate`].

use std::net::{IpAddr, SocketAddr};

use super::{ServerConfig, ServerEntry};

/// A backend address a later entry also stood for, left out of the backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub addr: SocketAddr,
    /// The index in `servers` of the entry whose backend it is.
    pub kept: usize,
    /// The index in `servers` of the entry it was dropped from.
    pub dropped: usize,
}

/// The addresses a lookup found, in the order an entry keeps them: sorted (IPv4 before IPv6),
/// each once (a resolver may answer a record twice, getaddrinfo once per socket type).
pub fn sorted(found: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = found.into_iter().collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// The backends of `entries`, and the addresses left out because an earlier entry had them.
pub fn expand(entries: &[ServerEntry]) -> (Vec<ServerConfig>, Vec<Duplicate>) {
    let mut servers: Vec<ServerConfig> = Vec::new();
    let mut from: Vec<usize> = Vec::new();
    let mut duplicates = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        for ip in sorted(entry.ips.iter().copied()) {
            let addr = SocketAddr::new(ip, entry.port);
            if let Some(at) = servers.iter().position(|s| s.addr == addr) {
                duplicates.push(Duplicate {
                    addr,
                    kept: from[at],
                    dropped: i,
                });
                continue;
            }
            servers.push(ServerConfig {
                addr,
                weight: entry.weight,
                name: entry.name.clone(),
            });
            from.push(i);
        }
    }
    (servers, duplicates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: Option<&str>, port: u16, weight: u32, ips: &[&str]) -> ServerEntry {
        ServerEntry {
            name: name.map(str::to_string),
            port,
            weight,
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        }
    }

    fn addrs(servers: &[ServerConfig]) -> Vec<String> {
        servers.iter().map(|s| s.addr.to_string()).collect()
    }

    #[test]
    fn a_name_with_several_addresses_is_one_backend_each_with_its_weight_and_name() {
        let entries = [
            entry(None, 80, 1, &["127.0.0.9"]),
            entry(
                Some("web.test"),
                8080,
                3,
                &["127.0.0.3", "::1", "127.0.0.2"],
            ),
        ];
        let (servers, duplicates) = expand(&entries);
        assert_eq!(
            addrs(&servers),
            [
                "127.0.0.9:80",
                "127.0.0.2:8080",
                "127.0.0.3:8080",
                "[::1]:8080"
            ]
        );
        assert!(servers[1..]
            .iter()
            .all(|s| s.weight == 3 && s.name.as_deref() == Some("web.test")));
        assert_eq!((servers[0].weight, servers[0].name.as_deref()), (1, None));
        assert!(duplicates.is_empty());
    }

    #[test]
    fn the_same_records_in_any_order_give_the_same_backends() {
        let a = entry(Some("web.test"), 80, 1, &["127.0.0.3", "127.0.0.2", "::2"]);
        let b = entry(Some("web.test"), 80, 1, &["::2", "127.0.0.2", "127.0.0.3"]);
        assert_eq!(expand(&[a]).0, expand(&[b]).0);
        let ips = ["127.0.0.3", "::1", "127.0.0.2", "127.0.0.3"].map(|s| s.parse().unwrap());
        assert_eq!(
            sorted(ips),
            ["127.0.0.2", "127.0.0.3", "::1"].map(|s| s.parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn an_address_listed_twice_is_the_first_entrys_backend_and_the_rest_are_reported() {
        let entries = [
            entry(Some("a.test"), 80, 2, &["127.0.0.2", "127.0.0.3"]),
            entry(None, 80, 5, &["127.0.0.3"]),
            entry(Some("b.test"), 80, 1, &["127.0.0.3", "127.0.0.4"]),
            // Another port: another backend.
            entry(None, 81, 1, &["127.0.0.3"]),
        ];
        let (servers, duplicates) = expand(&entries);
        assert_eq!(
            addrs(&servers),
            [
                "127.0.0.2:80",
                "127.0.0.3:80",
                "127.0.0.4:80",
                "127.0.0.3:81"
            ]
        );
        assert_eq!(servers[1].weight, 2, "the first entry's weight");
        assert_eq!(servers[1].name.as_deref(), Some("a.test"));
        let at = "127.0.0.3:80".parse().unwrap();
        assert_eq!(
            duplicates,
            [
                Duplicate {
                    addr: at,
                    kept: 0,
                    dropped: 1
                },
                Duplicate {
                    addr: at,
                    kept: 0,
                    dropped: 2
                },
            ]
        );
    }
}
