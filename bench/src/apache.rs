//! `kaproxy-bench apache`: runs one real Apache httpd 2.4 from kaproxy-testkit's launcher
//! (its own ServerRoot in a temp dir, its own process group, loopback only) until SIGTERM or
//! SIGINT, for scripts (`bench/slowclients.sh`) that put proxies in front of it. The address
//! it listens on is written to `--addr-file` (and printed) once it accepts connections.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kaproxy_testkit::apache::{apache_version, Apache, ApacheOptions};
use tokio::signal::unix::{signal, SignalKind};

use crate::args;

#[derive(Args, Debug)]
pub struct ApacheArgs {
    /// The prefork MPM with this many workers (MaxRequestWorkers); 0: mpm_event, 2 children of
    /// 64 threads (the tests' default).
    #[arg(long, default_value_t = 0)]
    prefork: u32,
    /// Apache's KeepAliveTimeout.
    #[arg(long, default_value = "5s", value_parser = args::parse_duration)]
    keepalive: Duration,
    /// Apache's MaxKeepAliveRequests.
    #[arg(long, default_value_t = 100)]
    max_keepalive_requests: u32,
    /// Apache's Timeout (whole seconds).
    #[arg(long, default_value = "300s", value_parser = args::parse_duration)]
    timeout: Duration,
    /// A file NAME=BYTES of pseudo-random content in htdocs (repeatable), served at /NAME for
    /// GET and for POST (the request body is read whole first).
    #[arg(long = "file", value_name = "NAME=BYTES", value_parser = parse_file)]
    files: Vec<(String, u64)>,
    /// A CGI script NAME.cgi=DELAY in htdocs (repeatable) that sleeps DELAY (e.g. 50ms), then
    /// answers: a page whose work holds a worker (bench/balance.sh's slow server).
    #[arg(long = "cgi", value_name = "NAME=DELAY", value_parser = parse_cgi)]
    cgi: Vec<(String, Duration)>,
    /// Sent back as `X-Backend` (and in `GET /`).
    #[arg(long, default_value = "slow")]
    name: String,
    /// Write the address Apache listens on (127.0.0.1:PORT) to this file once it accepts.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

fn parse_file(s: &str) -> Result<(String, u64), String> {
    let (name, len) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=BYTES, got {s:?}"))?;
    let len = len
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: BYTES must be a whole number"))?;
    Ok((name.trim().to_string(), len))
}

fn parse_cgi(s: &str) -> Result<(String, Duration), String> {
    let (name, delay) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME.cgi=DELAY, got {s:?}"))?;
    Ok((name.trim().to_string(), args::parse_duration(delay.trim())?))
}

pub async fn run(a: ApacheArgs) -> anyhow::Result<()> {
    if !kaproxy_testkit::apache::apache_installed() {
        bail!("Apache is not installed (/usr/sbin/apache2): apt-get install -y apache2");
    }
    let mut opts = ApacheOptions::new(&a.name)
        .keep_alive_timeout(a.keepalive)
        .max_keep_alive_requests(a.max_keepalive_requests)
        .timeout(a.timeout);
    if a.prefork > 0 {
        opts = opts.prefork(a.prefork);
    }
    for (name, len) in &a.files {
        opts = opts.file(name, *len);
    }
    for (name, delay) in &a.cgi {
        opts = opts.cgi(name, *delay);
    }
    // Signals are caught before Apache starts, so a SIGTERM during the start is not lost.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut apache = Apache::start(opts).await.context("starting Apache")?;
    let addr = apache.addr();
    if let Some(path) = &a.addr_file {
        std::fs::write(path, format!("{addr}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "{} on {addr} ({}; htdocs {})",
        apache_version(),
        if a.prefork > 0 {
            format!("prefork, MaxRequestWorkers {}", a.prefork)
        } else {
            "event".to_string()
        },
        apache.htdocs().display()
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    apache.stop().await;
    Ok(())
}
