//! Collects what a run measured (latency HDR histogram, status classes, error classes, bytes)
//! and turns it into the final report, as text or as one JSON object.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use kaproxy_testkit::client::ErrorClass;

/// Latencies are recorded in microseconds, from 1 µs to one hour, 3 significant figures.
const LATENCY_MAX_US: u64 = 3_600_000_000;
/// How many distinct error messages a report keeps as examples.
const ERROR_SAMPLES: usize = 5;

/// What one worker (or, merged, the whole run) measured.
#[derive(Debug, Clone)]
pub struct Stats {
    latency: Histogram<u64>,
    /// Responses by status class: index 0 = other (1xx, invalid), 1..=5 = 1xx..5xx.
    status: [u64; 6],
    errors: [u64; ErrorClass::ALL.len()],
    body_bytes: u64,
    error_samples: Vec<String>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            latency: Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid HDR bounds"),
            status: [0; 6],
            errors: [0; ErrorClass::ALL.len()],
            body_bytes: 0,
            error_samples: Vec::new(),
        }
    }

    pub fn record_response(&mut self, status: u16, latency: Duration, body_bytes: u64) {
        let class = (status / 100) as usize;
        self.status[if (2..=5).contains(&class) { class } else { 0 }] += 1;
        self.record_latency(latency);
        self.body_bytes += body_bytes;
    }

    pub fn record_latency(&mut self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, LATENCY_MAX_US);
        self.latency.record(us).expect("clamped into bounds");
    }

    pub fn record_error(&mut self, class: ErrorClass, message: impl FnOnce() -> String) {
        self.errors[class.index()] += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            let m = format!("{}: {}", class.label(), message());
            if !self.error_samples.contains(&m) {
                self.error_samples.push(m);
            }
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        self.latency.add(&other.latency).expect("same bounds");
        for (a, b) in self.status.iter_mut().zip(other.status) {
            *a += b;
        }
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        self.body_bytes += other.body_bytes;
        for m in &other.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES && !self.error_samples.contains(m) {
                self.error_samples.push(m.clone());
            }
        }
    }

    pub fn responses(&self) -> u64 {
        self.status.iter().sum()
    }

    pub fn error_count(&self) -> u64 {
        self.errors.iter().sum()
    }

    pub fn errors_of(&self, class: ErrorClass) -> u64 {
        self.errors[class.index()]
    }

    /// The latency at quantile `q` (0.0..=1.0).
    pub fn percentile(&self, q: f64) -> Duration {
        Duration::from_micros(self.latency.value_at_quantile(q))
    }

    pub fn max_latency(&self) -> Duration {
        Duration::from_micros(self.latency.max())
    }

    pub fn report(&self, elapsed: Duration) -> Report {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let responses = self.responses();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let has = responses > 0;
        let pick = |q: f64| if has { ms(self.percentile(q)) } else { 0.0 };
        Report {
            elapsed_s: secs,
            requests: responses + self.error_count(),
            responses,
            req_per_s: responses as f64 / secs,
            bytes_per_s: self.body_bytes as f64 / secs,
            body_bytes: self.body_bytes,
            latency_ms: Latency {
                mean: if has { self.latency.mean() / 1e3 } else { 0.0 },
                p50: pick(0.50),
                p90: pick(0.90),
                p99: pick(0.99),
                p999: pick(0.999),
                max: if has { ms(self.max_latency()) } else { 0.0 },
            },
            status: StatusClasses {
                s2xx: self.status[2],
                s3xx: self.status[3],
                s4xx: self.status[4],
                s5xx: self.status[5],
                other: self.status[0] + self.status[1],
            },
            errors: Errors {
                connect_refused: self.errors_of(ErrorClass::ConnectRefused),
                reset_by_peer: self.errors_of(ErrorClass::ResetByPeer),
                closed_before_response: self.errors_of(ErrorClass::ClosedBeforeResponse),
                timeout: self.errors_of(ErrorClass::Timeout),
                other: self.errors_of(ErrorClass::Other),
                total: self.error_count(),
            },
            client_visible_errors: self.error_count() + self.status[5],
            error_samples: self.error_samples.clone(),
        }
    }
}

/// The final report; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub elapsed_s: f64,
    /// Responses plus errors.
    pub requests: u64,
    pub responses: u64,
    pub req_per_s: f64,
    /// Response body bytes per second.
    pub bytes_per_s: f64,
    pub body_bytes: u64,
    pub latency_ms: Latency,
    pub status: StatusClasses,
    pub errors: Errors,
    /// Transport errors plus 5xx responses: what an application would log as a failure.
    pub client_visible_errors: u64,
    pub error_samples: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusClasses {
    #[serde(rename = "2xx")]
    pub s2xx: u64,
    #[serde(rename = "3xx")]
    pub s3xx: u64,
    #[serde(rename = "4xx")]
    pub s4xx: u64,
    #[serde(rename = "5xx")]
    pub s5xx: u64,
    pub other: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Errors {
    pub connect_refused: u64,
    pub reset_by_peer: u64,
    pub closed_before_response: u64,
    pub timeout: u64,
    pub other: u64,
    pub total: u64,
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let l = &self.latency_ms;
        let _ = writeln!(
            out,
            "requests   {} in {:.2} s: {:.1} req/s, {}/s body",
            self.requests,
            self.elapsed_s,
            self.req_per_s,
            human_bytes(self.bytes_per_s)
        );
        let _ = writeln!(
            out,
            "latency    p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  (mean {:.3} ms)",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        let s = &self.status;
        let _ = writeln!(
            out,
            "status     2xx {}  3xx {}  4xx {}  5xx {}{}",
            s.s2xx,
            s.s3xx,
            s.s4xx,
            s.s5xx,
            if s.other > 0 {
                format!("  other {}", s.other)
            } else {
                String::new()
            }
        );
        let e = &self.errors;
        let _ = writeln!(
            out,
            "errors     connect refused {}  reset by peer {}  closed before response {}  timeout {}  other {}",
            e.connect_refused, e.reset_by_peer, e.closed_before_response, e.timeout, e.other
        );
        for m in &self.error_samples {
            let _ = writeln!(out, "  e.g.     {m}");
        }
        out
    }
}

pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn percentiles_of_one_to_a_thousand() {
        let mut s = Stats::new();
        for i in 1..=1000 {
            s.record_response(200, us(i), 10);
        }
        // Below 2048 µs the histogram is exact at 3 significant figures.
        assert_eq!(s.percentile(0.50), us(500));
        assert_eq!(s.percentile(0.90), us(900));
        assert_eq!(s.percentile(0.99), us(990));
        assert_eq!(s.percentile(0.999), us(999));
        assert_eq!(s.max_latency(), us(1000));
        let r = s.report(Duration::from_secs(2));
        assert_eq!(r.requests, 1000);
        assert_eq!(r.req_per_s, 500.0);
        assert_eq!(r.bytes_per_s, 5000.0);
        assert!((r.latency_ms.mean - 0.5005).abs() < 1e-3);
    }

    #[test]
    fn a_tail_shows_at_p99_9_only() {
        let mut s = Stats::new();
        for _ in 0..999 {
            s.record_latency(Duration::from_millis(1));
        }
        s.record_latency(Duration::from_secs(2));
        let within = |d: Duration, want: Duration| {
            let (d, w) = (d.as_secs_f64(), want.as_secs_f64());
            (d - w).abs() <= w * 1e-3
        };
        assert!(within(s.percentile(0.99), Duration::from_millis(1)));
        assert!(within(s.percentile(0.999), Duration::from_millis(1)));
        assert!(within(s.percentile(0.9999), Duration::from_secs(2)));
        assert!(within(s.max_latency(), Duration::from_secs(2)));
    }

    #[test]
    fn merge_adds_counts_and_histograms() {
        let mut a = Stats::new();
        let mut b = Stats::new();
        a.record_response(200, us(100), 1);
        b.record_response(502, us(300), 2);
        b.record_response(404, us(200), 0);
        b.record_error(ErrorClass::ResetByPeer, || "reset".into());
        b.record_error(ErrorClass::ResetByPeer, || "reset".into());
        a.merge(&b);
        let r = a.report(Duration::from_secs(1));
        assert_eq!(r.responses, 3);
        assert_eq!(r.requests, 5);
        assert_eq!((r.status.s2xx, r.status.s4xx, r.status.s5xx), (1, 1, 1));
        assert_eq!(r.errors.reset_by_peer, 2);
        assert_eq!(r.client_visible_errors, 3);
        assert_eq!(r.error_samples, vec!["reset by peer: reset".to_string()]);
        assert_eq!(a.percentile(0.5), us(200));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["status"]["5xx"], 1);
        assert_eq!(json["errors"]["reset_by_peer"], 2);
        assert!(json["latency_ms"]["p99.9"].is_number());
    }

    #[test]
    fn empty_run_reports_zeros() {
        let r = Stats::new().report(Duration::from_secs(1));
        assert_eq!(r.requests, 0);
        assert_eq!(r.latency_ms.p99, 0.0);
        assert!(r.to_text().contains("req/s"));
    }
}
