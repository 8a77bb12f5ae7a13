//! A kaproxy instance started in-process for one test: its config on 127.0.0.1:0 listeners, its
//! temp dir (where the dev certificate is generated), its endpoints and its metrics.

use std::path::PathBuf;
use std::time::Duration;

use kaproxy::config::Config;
use kaproxy_testkit::poll_until;

use super::client::{tls_config, Endpoint};

/// Metric names from SPEC.md that the tests read.
pub const CLOSED_TOTAL: &str = "kaproxy_upstream_connections_closed_total";
pub const POOL_IDLE: &str = "kaproxy_pool_idle_connections";
pub const RETRIES_TOTAL: &str = "kaproxy_upstream_retries_total";

/// A parsed test config and the temp dir its certificate paths point into.
pub struct TestConfig {
    pub config: Config,
    pub dir: tempfile::TempDir,
}

/// Parses `extra` (upstreams, `[downstream]`, `[forwarded]`, ...) after a base that puts every
/// listener on 127.0.0.1:0 and the TLS certificate in a fresh temp dir. Panics with the
/// config error: a test config that does not parse is a test bug or a config regression.
pub fn test_config(extra: &str) -> TestConfig {
    let dir = tempfile::Builder::new()
        .prefix("kaproxy-test-")
        .tempdir()
        .expect("temp dir");
    let cert = dir.path().join("dev-cert.pem");
    let key = dir.path().join("dev-key.pem");
    let src = format!(
        r#"[listen]
https = "127.0.0.1:0"
http = "127.0.0.1:0"

[tls]
cert = {cert:?}
key = {key:?}

[admin]
listen = "127.0.0.1:0"
shutdown_timeout = "2s"

[log]
access_log = false

{extra}
"#,
        cert = cert.display().to_string(),
        key = key.display().to_string(),
    );
    let path = dir.path().join("kaproxy.toml");
    std::fs::write(&path, &src).expect("write test config");
    let config = Config::from_toml_str(&src, &path)
        .unwrap_or_else(|e| panic!("test config does not parse: {e}\n---\n{src}"));
    TestConfig { config, dir }
}

impl TestConfig {
    /// The first (and in these tests usually only) upstream group, for the test hooks.
    pub fn upstream(&mut self) -> &mut kaproxy::config::UpstreamConfig {
        self.config
            .upstreams
            .first_mut()
            .expect("test config has an upstream")
    }

    /// The internal test hook for the control experiments (`check` forbids this in a file):
    /// a pool that trusts connections for 9 s, never learns the backend's `Keep-Alive` and
    /// retries nothing unless `retry_idempotent`.
    pub fn naive_pool(&mut self, retry_idempotent: bool) -> &mut Self {
        kaproxy_testkit::naive::make_naive(self.upstream(), retry_idempotent);
        self
    }

    pub async fn start(self) -> TestProxy {
        self.start_with(kaproxy::ServerOptions::default()).await
    }

    /// [`TestConfig::start`] with options that are not configuration keys.
    pub async fn start_with(self, options: kaproxy::ServerOptions) -> TestProxy {
        let server = kaproxy::Server::start_with(self.config, options)
            .await
            .unwrap_or_else(|e| panic!("kaproxy did not start: {e:?}"));
        TestProxy {
            server,
            dir: self.dir,
        }
    }
}

/// A running kaproxy.
pub struct TestProxy {
    pub server: kaproxy::Server,
    dir: tempfile::TempDir,
}

impl TestProxy {
    /// Parses `extra` on top of the base config and starts kaproxy with it.
    pub async fn start(extra: &str) -> TestProxy {
        test_config(extra).start().await
    }

    /// The plain HTTP listener.
    pub fn http(&self) -> Endpoint {
        Endpoint::plain(self.server.http_addr().expect("http listener"))
    }

    /// The TLS listener, trusting the generated dev certificate and offering `alpn`.
    pub fn https(&self, alpn: &[&str]) -> Endpoint {
        Endpoint::tls(
            self.server.https_addr().expect("https listener"),
            tls_config(&self.cert_path(), alpn),
        )
    }

    /// Where the dev certificate is (generated on start when absent).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("dev-cert.pem")
    }

    /// The Prometheus text of the running proxy.
    pub fn metrics(&self) -> Metrics {
        Metrics(self.server.metrics())
    }

    /// Polls the metrics (bounded by `within`) until `pred` holds; returns the last snapshot and
    /// whether it held.
    pub async fn wait_metrics(
        &self,
        within: Duration,
        pred: impl Fn(&Metrics) -> bool,
    ) -> (Metrics, bool) {
        let mut last = None;
        let held = poll_until(within, async || pred(last.insert(self.metrics()))).await;
        (last.expect("checked at least once"), held)
    }

    pub async fn shutdown(self) {
        let done = tokio::time::timeout(Duration::from_secs(10), self.server.shutdown()).await;
        assert!(done.is_ok(), "kaproxy shutdown took longer than 10 s");
    }
}

/// Prometheus text with a tiny reader for the sums the tests assert on.
#[derive(Debug, Clone)]
pub struct Metrics(pub String);

impl Metrics {
    /// Sum of every sample named `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|(sample_labels, _)| {
                labels
                    .iter()
                    .all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// True when at least one sample named `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples(name).next().is_some()
    }

    /// Every sample of `name`: its labels and value.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (Vec<(String, String)>, f64)> + 'a {
        self.0.lines().filter_map(move |line| {
            let line = line.trim();
            if line.starts_with('#') || line.is_empty() {
                return None;
            }
            let (head, rest) = match line.find('{') {
                Some(i) if line[..i].trim() == name => {
                    let close = line.rfind('}')?;
                    (&line[i + 1..close], &line[close + 1..])
                }
                Some(_) => return None,
                None => {
                    let mut parts = line.splitn(2, ' ');
                    if parts.next()? != name {
                        return None;
                    }
                    ("", parts.next()?)
                }
            };
            let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((parse_labels(head), value))
        })
    }

    /// The lines mentioning `name`, for assertion messages.
    pub fn lines_of(&self, name: &str) -> String {
        self.0
            .lines()
            .filter(|l| l.contains(name))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = s;
    // Bounded by the input length: every turn consumes at least one label.
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key, value));
        rest = &after[end..];
    }
    labels
}
