//! Owns the status page's history: a bounded ring of per-upstream and per-server rates sampled from the metrics (`/history`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::time::{Instant, MissedTickBehavior};

use crate::downstream::Generation;
use crate::metrics::{BackendMetrics, CloseReason, ErrorKind};
use crate::shutdown::Shutdown;

/// Samples kept: 15 minutes at the default interval.
pub const SAMPLES: usize = 180;
/// The default sampling interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Cumulative counters of one server (or their deltas over one interval, or the sum of the
/// deltas of an upstream's servers).
#[derive(Clone, Default)]
struct Counts {
    classes: [u64; 5],
    /// Cumulative bucket counts, the bounds in `bounds`.
    buckets: Vec<u64>,
    bounds: Vec<f64>,
    opened: u64,
    reused: u64,
    closed: [u64; CloseReason::ALL.len()],
    retries: u64,
    errors: [u64; ErrorKind::ALL.len()],
}

impl Counts {
    fn read(m: &BackendMetrics) -> Counts {
        let (bounds, buckets) = m.duration_buckets().into_iter().unzip();
        let mut closed = [0; CloseReason::ALL.len()];
        for (slot, (_, n)) in closed.iter_mut().zip(m.closed_counts()) {
            *slot = n;
        }
        let mut errors = [0; ErrorKind::ALL.len()];
        for (slot, (_, n)) in errors.iter_mut().zip(m.error_counts()) {
            *slot = n;
        }
        Counts {
            classes: m.status_class_counts(),
            buckets,
            bounds,
            opened: m.opened.get(),
            reused: m.reused.get(),
            closed,
            retries: m.retries_count(),
            errors,
        }
    }

    /// `self - earlier`, element-wise (a counter never goes down; saturating all the same).
    fn since(&self, earlier: &Counts) -> Counts {
        let sub = |a: &[u64], b: &[u64]| -> Vec<u64> {
            a.iter()
                .enumerate()
                .map(|(i, x)| x.saturating_sub(b.get(i).copied().unwrap_or(0)))
                .collect()
        };
        Counts {
            classes: sub(&self.classes, &earlier.classes).try_into().expect("5"),
            buckets: sub(&self.buckets, &earlier.buckets),
            bounds: self.bounds.clone(),
            opened: self.opened.saturating_sub(earlier.opened),
            reused: self.reused.saturating_sub(earlier.reused),
            closed: sub(&self.closed, &earlier.closed)
                .try_into()
                .expect("one per reason"),
            retries: self.retries.saturating_sub(earlier.retries),
            errors: sub(&self.errors, &earlier.errors)
                .try_into()
                .expect("one per kind"),
        }
    }

    fn add(&mut self, other: &Counts) {
        let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.classes, &other.classes);
        if self.buckets.is_empty() {
            self.buckets = vec![0; other.buckets.len()];
            self.bounds = other.bounds.clone();
        }
        add(&mut self.buckets, &other.buckets);
        self.opened += other.opened;
        self.reused += other.reused;
        add(&mut self.closed, &other.closed);
        self.retries += other.retries;
        add(&mut self.errors, &other.errors);
    }

    /// The `q` quantile of the durations in these (delta) buckets, interpolated linearly in
    /// its bucket as Prometheus' `histogram_quantile` does; None without requests.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total = *self.buckets.last()?;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let (mut lower, mut below) = (0.0, 0u64);
        for (&bound, &count) in self.bounds.iter().zip(&self.buckets) {
            if count as f64 >= rank && count > below {
                if bound.is_infinite() {
                    return Some(lower);
                }
                let inside = (rank - below as f64) / (count - below) as f64;
                return Some(lower + (bound - lower) * inside.clamp(0.0, 1.0));
            }
            lower = bound;
            below = count;
        }
        Some(lower)
    }

    /// One interval as the page draws it.
    fn point(&self, secs: f64) -> Point {
        let used = self.opened + self.reused;
        Point {
            rates: self.classes.map(|n| n as f64 / secs),
            p50: self.quantile(0.5),
            p99: self.quantile(0.99),
            reuse: (used > 0).then(|| self.reused as f64 / used as f64),
            closed: self.closed,
            retries: self.retries,
            errors: self.errors,
        }
    }
}

/// One interval of one server or upstream.
#[derive(Clone)]
struct Point {
    rates: [f64; 5],
    p50: Option<f64>,
    p99: Option<f64>,
    reuse: Option<f64>,
    closed: [u64; CloseReason::ALL.len()],
    retries: u64,
    errors: [u64; ErrorKind::ALL.len()],
}

/// One sample: when, over how long, and a point per upstream and per server.
struct Tick {
    unix_s: f64,
    secs: f64,
    upstreams: HashMap<String, Point>,
    servers: HashMap<(String, String), Point>,
}

#[derive(Default)]
struct Ring {
    ticks: VecDeque<Tick>,
    /// The cumulative counters at the previous sample, per (upstream, server).
    last: HashMap<(String, String), Counts>,
    last_at: Option<Instant>,
    /// Upstreams and their servers at the last sample, in configuration order.
    order: Vec<(String, Vec<String>)>,
}

/// The last [`SAMPLES`] intervals; written by [`History::run`], read by `/history`.
pub struct History {
    interval: Duration,
    ring: Mutex<Ring>,
}

impl History {
    pub fn new(interval: Duration) -> Arc<History> {
        Arc::new(History {
            interval: interval.max(Duration::from_millis(10)),
            ring: Mutex::new(Ring::default()),
        })
    }

    /// Samples the servers of the current generation every interval until shutdown, from a
    /// baseline taken now (so that a request served before the task first runs is counted).
    pub fn start(
        self: Arc<Self>,
        current: Arc<arc_swap::ArcSwap<Generation>>,
        shutdown: Shutdown,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.sample(&current.load());
        self.run(current, shutdown)
    }

    async fn run(
        self: Arc<Self>,
        current: Arc<arc_swap::ArcSwap<Generation>>,
        mut shutdown: Shutdown,
    ) {
        // The baseline was taken by `start`; the first tick is one interval on.
        let mut ticker = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.sample(&current.load()),
                _ = shutdown.begun() => return,
            }
        }
    }

    /// Reads every server's counters and appends one tick (the first sample only sets the
    /// baseline; a server first seen now gets its first point at the next sample).
    fn sample(&self, generation: &Generation) {
        let now = Instant::now();
        let mut ring = crate::sync::lock(&self.ring);
        let secs = ring
            .last_at
            .map(|at| now.duration_since(at).as_secs_f64())
            .filter(|s| *s > 0.0);
        let mut last = HashMap::new();
        let mut order = Vec::new();
        let mut upstreams = HashMap::new();
        let mut servers = HashMap::new();
        for u in generation.proxy.upstreams() {
            let mut sum: Option<Counts> = None;
            let mut names = Vec::new();
            for b in u.balancer.backends() {
                let key = (u.name.clone(), b.addr.to_string());
                let counts = Counts::read(b.metrics());
                if let (Some(secs), Some(before)) = (secs, ring.last.get(&key)) {
                    let delta = counts.since(before);
                    sum.get_or_insert_with(Counts::default).add(&delta);
                    servers.insert(key.clone(), delta.point(secs));
                }
                names.push(key.1.clone());
                last.insert(key, counts);
            }
            if let (Some(secs), Some(sum)) = (secs, sum) {
                upstreams.insert(u.name.clone(), sum.point(secs));
            }
            order.push((u.name.clone(), names));
        }
        ring.last = last;
        ring.last_at = Some(now);
        ring.order = order;
        if let Some(secs) = secs {
            let unix_s = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            if ring.ticks.len() == SAMPLES {
                ring.ticks.pop_front();
            }
            ring.ticks.push_back(Tick {
                unix_s,
                secs,
                upstreams,
                servers,
            });
        }
    }

    /// `/history`: per upstream (its servers summed) and per server, one array per series,
    /// aligned with `t` (sample time, Unix seconds) and `dt_s` (what each sample covers); `null` where a server was not sampled or had no requests.
    pub fn json(&self) -> String {
        let ring = crate::sync::lock(&self.ring);
        let t: Vec<f64> = ring.ticks.iter().map(|k| k.unix_s).collect();
        let dt: Vec<f64> = ring.ticks.iter().map(|k| k.secs).collect();
        let upstreams: Vec<Value> = ring
            .order
            .iter()
            .map(|(name, addrs)| {
                let servers: Vec<Value> = addrs
                    .iter()
                    .map(|addr| {
                        let key = (name.clone(), addr.clone());
                        let mut v = series(ring.ticks.iter().map(|k| k.servers.get(&key)));
                        v["addr"] = addr.clone().into();
                        v
                    })
                    .collect();
                let mut v = series(ring.ticks.iter().map(|k| k.upstreams.get(name)));
                v["name"] = name.clone().into();
                v["servers"] = servers.into();
                v
            })
            .collect();
        let out = json!({
            "interval_s": self.interval.as_secs_f64(),
            "samples": SAMPLES,
            "t": t,
            "dt_s": dt,
            "upstreams": upstreams,
        });
        let mut text = serde_json::to_string(&out).expect("JSON values always serialize");
        text.push('\n');
        text
    }
}

/// The series of one server or upstream over the ticks (`None`: not sampled then).
fn series<'a>(points: impl Iterator<Item = Option<&'a Point>> + Clone) -> Value {
    let col = |f: &dyn Fn(&Point) -> Value| -> Value {
        points
            .clone()
            .map(|p| p.map_or(Value::Null, f))
            .collect::<Vec<_>>()
            .into()
    };
    let round = |x: f64| (x * 1e6).round() / 1e6;
    let opt = |x: Option<f64>| x.map_or(Value::Null, |x| round(x).into());
    let mut requests = Map::new();
    for (i, class) in CLASSES.iter().enumerate() {
        requests.insert(class.to_string(), col(&|p| round(p.rates[i]).into()));
    }
    let mut closed = Map::new();
    for r in CloseReason::ALL {
        closed.insert(r.as_str().into(), col(&|p| p.closed[r as usize].into()));
    }
    let mut errors = Map::new();
    for k in ErrorKind::ALL {
        errors.insert(k.as_str().into(), col(&|p| p.errors[k as usize].into()));
    }
    json!({
        "requests_per_s": requests,
        "p50_s": col(&|p| opt(p.p50)),
        "p99_s": col(&|p| opt(p.p99)),
        "reuse_ratio": col(&|p| opt(p.reuse)),
        "closed": closed,
        "retries": col(&|p| p.retries.into()),
        "errors": errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(counts: &[u64]) -> Counts {
        Counts {
            bounds: vec![0.001, 0.002, 0.004, f64::INFINITY],
            buckets: counts.to_vec(),
            ..Counts::default()
        }
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 10 requests: 4 under 1 ms, 4 more under 2 ms, 2 more under 4 ms.
        let c = buckets(&[4, 8, 10, 10]);
        assert!((c.quantile(0.5).unwrap() - 0.00125).abs() < 1e-9);
        assert!((c.quantile(0.99).unwrap() - 0.0039).abs() < 1e-9);
        assert_eq!(buckets(&[0, 0, 0, 0]).quantile(0.5), None);
        // All beyond the last finite bound: that bound.
        assert_eq!(buckets(&[0, 0, 0, 3]).quantile(0.5), Some(0.004));
    }

    #[test]
    fn deltas_rates_and_reuse() {
        let mut before = buckets(&[1, 1, 1, 1]);
        before.classes = [0, 5, 0, 1, 0];
        before.opened = 1;
        let mut after = buckets(&[3, 5, 5, 5]);
        after.classes = [0, 9, 0, 1, 0];
        after.opened = 2;
        after.reused = 3;
        let p = after.since(&before).point(2.0);
        assert_eq!(p.rates, [0.0, 2.0, 0.0, 0.0, 0.0]);
        assert_eq!(p.reuse, Some(0.75));
        assert!((p.p50.unwrap() - 0.001).abs() < 1e-9);
    }
}
