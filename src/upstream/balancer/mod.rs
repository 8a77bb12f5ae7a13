//! Owns backend selection for one upstream group: smooth weighted round-robin, consistent
//! ip-hash and least-request (power of two choices) over its [`Backend`]s, skipping down ones;
//! pure selection, no I/O.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::config::{BalanceKind, UpstreamConfig};
use crate::upstream::backend::Backend;

/// Chooses a backend of one upstream group for each attempt of a request.
#[derive(Debug)]
pub struct Balancer {
    kind: BalanceKind,
    backends: Vec<Arc<Backend>>,
    /// nginx's `current_weight` per backend, for [`BalanceKind::RoundRobin`]. A per-upstream
    /// lock held for a few additions; never held across anything else.
    current_weights: Mutex<Vec<i64>>,
    /// [`server_hash`] of each backend, for [`BalanceKind::IpHash`].
    server_hashes: Vec<u64>,
    ip_hash_prefix_v4: u8,
    ip_hash_prefix_v6: u8,
}

impl Balancer {
    /// A balancer over `backends` (the servers of `cfg`, in its order) as `cfg` says.
    pub fn new(cfg: &UpstreamConfig, backends: Vec<Arc<Backend>>) -> Balancer {
        Balancer {
            kind: cfg.balance,
            current_weights: Mutex::new(vec![0; backends.len()]),
            server_hashes: backends.iter().map(|b| server_hash(b.addr)).collect(),
            backends,
            ip_hash_prefix_v4: cfg.ip_hash_prefix_v4,
            ip_hash_prefix_v6: cfg.ip_hash_prefix_v6,
        }
    }

    pub fn kind(&self) -> BalanceKind {
        self.kind
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Picks a backend for this downstream client, skipping those in `tried` (already
    /// attempted for this request) and down ones. If every untried backend is down, picks
    /// among the untried ones anyway (fail open): a server that may have recovered beats a
    /// certain 502. None only when all were tried.
    pub fn pick(
        &self,
        client_ip: IpAddr,
        tried: &[Arc<Backend>],
        now: Instant,
    ) -> Option<&Arc<Backend>> {
        let tried: Vec<usize> = (0..self.backends.len())
            .filter(|&i| tried.iter().any(|t| Arc::ptr_eq(t, &self.backends[i])))
            .collect();
        self.pick_index(client_ip, &tried, now)
            .map(|i| &self.backends[i])
    }

    /// [`Self::pick`] by position in [`Self::backends`]: what the selection works on.
    fn pick_index(&self, client_ip: IpAddr, tried: &[usize], now: Instant) -> Option<usize> {
        // A drained server gets no new request, even when every other one is down: draining
        // is the operator's promise that it can be stopped.
        let untried = |i: usize| !tried.contains(&i) && !self.backends[i].is_drained();
        let healthy = |i: usize| untried(i) && self.backends[i].health.is_up(now);
        match self.kind {
            BalanceKind::RoundRobin => self
                .round_robin(healthy, now)
                .or_else(|| self.round_robin(untried, now)),
            BalanceKind::IpHash => {
                let key = self.client_key(client_ip);
                self.ip_hash(key, healthy, now)
                    .or_else(|| self.ip_hash(key, untried, now))
            }
            BalanceKind::LeastRequest => self
                .least_request(healthy, now, next_random)
                .or_else(|| self.least_request(untried, now, next_random)),
        }
    }

    /// Power of two choices (Mitzenmacher 2001; Envoy's `LEAST_REQUEST`, HAProxy's
    /// `leastconn` compares all servers instead): two distinct eligible backends drawn at
    /// random in proportion to their weights, and the one with fewer requests in flight per
    /// unit of weight (every worker's requests: [`Backend::in_flight`]) wins. Comparing two
    /// rather than all keeps a pick O(1) in the comparisons and avoids the herd that always
    /// picking the global minimum sends to one server between two updates of the counts.
    ///
    /// Even loads (idle traffic above all: both have 0 in flight) go to the one with an idle
    /// pooled connection on this worker, so a warm connection is reused rather than a new one
    /// opened; else to the first drawn, so that at low load traffic follows the weights.
    fn least_request(
        &self,
        eligible: impl Fn(usize) -> bool,
        now: Instant,
        mut random: impl FnMut() -> u64,
    ) -> Option<usize> {
        let weight = |i: usize| self.backends[i].effective_weight(now);
        let total: u64 = (0..self.backends.len())
            .filter(|&i| eligible(i))
            .map(weight)
            .sum();
        let first = self.draw(total, random(), now, &eligible)?;
        let rest = total - weight(first);
        let Some(second) = self.draw(rest, random(), now, |i| i != first && eligible(i)) else {
            return Some(first);
        };
        Some(self.less_loaded(first, second, now))
    }

    /// The eligible backend at `r % total` along the weights of the eligible ones (a draw in
    /// proportion to weight); None when nothing is eligible.
    fn draw(
        &self,
        total: u64,
        r: u64,
        now: Instant,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        if total == 0 {
            return None;
        }
        let mut point = r % total;
        for (i, backend) in self.backends.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let weight = backend.effective_weight(now);
            if point < weight {
                return Some(i);
            }
            point -= weight;
        }
        None
    }

    /// Of `a` and `b`, the one with fewer requests in flight per unit of weight
    /// (`in_flight_a / weight_a < in_flight_b / weight_b`, cross-multiplied); on even loads
    /// the one with an idle pooled connection here, else `a`.
    fn less_loaded(&self, a: usize, b: usize, now: Instant) -> usize {
        let (ba, bb) = (&self.backends[a], &self.backends[b]);
        let load_a = ba.in_flight() as u128 * u128::from(bb.effective_weight(now));
        let load_b = bb.in_flight() as u128 * u128::from(ba.effective_weight(now));
        match load_a.cmp(&load_b) {
            std::cmp::Ordering::Less => a,
            std::cmp::Ordering::Greater => b,
            std::cmp::Ordering::Equal if !ba.has_idle_here() && bb.has_idle_here() => b,
            std::cmp::Ordering::Equal => a,
        }
    }

    /// nginx's smooth weighted round-robin (`ngx_http_upstream_get_peer`): every eligible
    /// backend gains its weight, the one with the most wins (the first on ties) and pays back
    /// the total. Weights 5:1:1 give a,a,b,a,c,a,a rather than a burst of five a's. Ineligible
    /// backends keep their `current_weight` untouched, as in nginx.
    fn round_robin(&self, eligible: impl Fn(usize) -> bool, now: Instant) -> Option<usize> {
        // The state is plain numbers: a panic elsewhere can't leave it inconsistent.
        let mut current = crate::sync::lock(&self.current_weights);
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (i, backend) in self.backends.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let weight = backend.effective_weight(now) as i64;
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }

    /// Weighted rendezvous hashing (highest random weight): each backend scores
    /// `weight / -ln(u)`, with `u` in (0, 1) drawn from a fixed hash of (client key, backend
    /// address), and the highest eligible score wins. Why HRW rather than a ring or a Maglev
    /// table:
    /// - no table to build or rebuild on reload, and nothing to size: a pick scores every
    ///   backend, which for an upstream group of a handful of servers is a few dozen
    ///   nanoseconds;
    /// - minimal remapping: removing a server (or marking it down, or having tried it) moves
    ///   only its own clients, each to its next-highest score; the others keep theirs;
    /// - weights are exact in expectation (the scores are exponential races, so a backend wins
    ///   with probability `weight / Σ weights`);
    /// - deterministic: the hash is our own (FNV-1a + splitmix64, see [`fnv1a`]), not std's
    ///   `DefaultHasher`, so every instance with the same config maps a client the same way,
    ///   across restarts and builds. (`ln` comes from the platform's libm; instances on
    ///   different platforms could disagree only when two scores are within an ulp.)
    ///
    /// `slow_start`: a ramping backend at a share `r` of its weight takes only the clients
    /// whose [`ramp_point`] (a second fixed hash of client and backend, uniform in [0, 1)) is
    /// below `r`; its other clients stay on their next choice until `r` passes their point.
    /// So each client moves back once, and stays: none flaps between two backends while the
    /// share grows. (Scaling the HRW weight instead would move clients to and from the
    /// backends of the rest of the group as the scores cross.)
    fn ip_hash(&self, key: u64, eligible: impl Fn(usize) -> bool, now: Instant) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        // The best one whose ramp does not take this client yet, if nothing else is eligible.
        let mut held_back: Option<(usize, f64)> = None;
        for (i, backend) in self.backends.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let score = hrw_score(key, self.server_hashes[i], backend.weight());
            let slot = match backend.ramp(now) {
                Some(share) if ramp_point(key, self.server_hashes[i]) >= share => &mut held_back,
                _ => &mut best,
            };
            if slot.is_none_or(|(_, best_score)| score > best_score) {
                *slot = Some((i, score));
            }
        }
        best.or(held_back).map(|(i, _)| i)
    }

    /// Hash of the client address masked to the configured prefix (24 for IPv4 = nginx's
    /// ip_hash, which hashes only the first three octets). An IPv4-mapped IPv6 address (a
    /// dual-stack listener) counts as the IPv4 address it carries.
    fn client_key(&self, client_ip: IpAddr) -> u64 {
        match client_ip.to_canonical() {
            IpAddr::V4(v4) => {
                let masked = u32::from(v4) & prefix_mask_v4(self.ip_hash_prefix_v4);
                let mut bytes = [0u8; 5];
                bytes[0] = 4;
                bytes[1..].copy_from_slice(&masked.to_be_bytes());
                splitmix64(fnv1a(&bytes))
            }
            IpAddr::V6(v6) => {
                let masked = u128::from(v6) & prefix_mask_v6(self.ip_hash_prefix_v6);
                let mut bytes = [0u8; 17];
                bytes[0] = 6;
                bytes[1..].copy_from_slice(&masked.to_be_bytes());
                splitmix64(fnv1a(&bytes))
            }
        }
    }
}

/// A random number from this thread's generator: splitmix64 over a counter seeded once per
/// thread from std's randomly keyed hasher. Not for secrets; per thread so that workers share
/// no state for it.
fn next_random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().build_hasher().finish(),
        );
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        splitmix64(next)
    })
}

fn prefix_mask_v4(prefix: u8) -> u32 {
    match u32::from(prefix.min(32)) {
        0 => 0,
        p => u32::MAX << (32 - p),
    }
}

fn prefix_mask_v6(prefix: u8) -> u128 {
    match u32::from(prefix.min(128)) {
        0 => 0,
        p => u128::MAX << (128 - p),
    }
}

/// Hash of a backend's address: a family tag, the IP octets and the port (big-endian). Raw
/// bytes rather than the `Display` string, whose IPv6 formatting std does not promise to keep.
fn server_hash(addr: SocketAddr) -> u64 {
    let mut bytes = Vec::with_capacity(19);
    match addr.ip() {
        IpAddr::V4(v4) => {
            bytes.push(4);
            bytes.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            bytes.push(6);
            bytes.extend_from_slice(&v6.octets());
        }
    }
    bytes.extend_from_slice(&addr.port().to_be_bytes());
    splitmix64(fnv1a(&bytes))
}

/// `weight / -ln(u)` with `u` in (0, 1) from `splitmix64(client_key ^ server_hash)`: the top
/// 53 bits, offset by half a step so that neither 0 nor 1 can occur.
fn hrw_score(client_key: u64, server_hash: u64, weight: u32) -> f64 {
    let h = splitmix64(client_key ^ server_hash);
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight) / -u.ln()
}

/// Where a client falls in a ramping backend's share: in [0, 1), from a hash of (client key,
/// backend) other than [`hrw_score`]'s, so that it does not favour the backend's best clients.
fn ramp_point(client_key: u64, server_hash: u64) -> f64 {
    let h = splitmix64(splitmix64(client_key ^ server_hash.rotate_left(32)));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3). Fixed forever: changing
/// it remaps every ip_hash client.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finalizer (Steele, Lea, Flood 2014): FNV-1a alone mixes its last bytes poorly
/// into the high bits, which `hrw_score` reads.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests;
