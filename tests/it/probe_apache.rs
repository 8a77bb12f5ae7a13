//! `kaproxy probe` against real Apache: the measured idle close and the advertised
//! `Keep-Alive: timeout` match Apache's KeepAliveTimeout (1 s and 2 s), and the recommended
//! settings give up on idle connections before Apache does.

use std::path::Path;
use std::time::Duration;

use kaproxy::config::Config;
use kaproxy::control::probe::probe;

use kaproxy_testkit::apache::{require_apache, Apache, ApacheOptions};

/// How long the probe waits for Apache's close; far above the timeouts under test.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// Starts Apache with `keep_alive`, probes it, and checks the report.
async fn probe_apache_with(keep_alive: Duration) {
    let apache = Apache::start(
        ApacheOptions::new(&format!("probe-{}s", keep_alive.as_secs()))
            .keep_alive_timeout(keep_alive),
    )
    .await
    .expect("start apache");
    let report = probe(&apache.addr().to_string(), false, MAX_WAIT)
        .await
        .unwrap_or_else(|e| panic!("probe: {e}\n{}", apache.error_log()));
    let text = report.to_string();
    eprintln!("{text}");
    assert_eq!(report.status, 200, "{text}");
    assert_eq!(
        report.hint.timeout,
        Some(keep_alive),
        "Apache's Keep-Alive header: {text}"
    );
    assert!(
        report
            .keep_alive_header
            .as_deref()
            .is_some_and(|h| h.contains(&format!("timeout={}", keep_alive.as_secs()))),
        "{text}"
    );
    let observed = report
        .observed_close
        .unwrap_or_else(|| panic!("Apache did not close within {MAX_WAIT:?}: {text}"));
    let (low, high) = (keep_alive.mul_f64(0.8), keep_alive.mul_f64(1.2));
    assert!(
        observed >= low && observed <= high,
        "observed close after {observed:?}, not within ±20% of KeepAliveTimeout {keep_alive:?}: \
         {text}"
    );
    let rec = report
        .recommendation()
        .unwrap_or_else(|| panic!("no recommendation for {keep_alive:?}: {text}"));
    assert!(
        rec.idle_timeout + rec.safety_margin <= rec.keepalive_timeout
            && rec.keepalive_timeout <= keep_alive
            && rec.keepalive_timeout >= low,
        "recommendation {rec:?} is not just below Apache's {keep_alive:?}: {text}"
    );
    assert!(
        text.contains("keepalive_timeout = \"") && text.contains("idle_timeout = \""),
        "{text}"
    );
    // What the probe prints must be accepted as is in config.toml.
    let toml = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\n\n[upstreams.web]\nservers = [\"{}\"]\n\
         keepalive_timeout = \"{}ms\"\nsafety_margin = \"{}ms\"\nidle_timeout = \"{}ms\"\n",
        apache.addr(),
        rec.keepalive_timeout.as_millis(),
        rec.safety_margin.as_millis(),
        rec.idle_timeout.as_millis()
    );
    if let Err(e) = Config::from_toml_str(&toml, Path::new("recommended.toml")) {
        panic!("the recommended settings do not validate: {e}\n{toml}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_apache_keepalive_timeout_1s_and_2s_within_20_percent() {
    if !require_apache() {
        return;
    }
    tokio::join!(
        probe_apache_with(Duration::from_secs(1)),
        probe_apache_with(Duration::from_secs(2)),
    );
}
