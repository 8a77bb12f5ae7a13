//! kaproxy-bench: the load generator (`kaproxy-bench [OPTIONS] URL`), the keep-alive race
//! reproducer (`kaproxy-bench race`), slow clients against a proxy (`kaproxy-bench slow`),
//! issue 17's hostile inputs against a proxy (`kaproxy-bench probe`) and a real Apache for
//! scripts (`kaproxy-bench apache`). This file only parses arguments and prints; the work is in
//! the modules.
//!
//! # Layout
//!
//! - [`args`]: parsing of durations, ranges, source addresses, headers.
//! - [`conn`]: target URL, connect (source address, TLS, HTTP/1.1 or HTTP/2), one exchange.
//! - [`load`]: the workers: closed or open loop, idle gaps, new connection per request.
//! - error classes (connect refused, reset, closed before response, timeout) and the connect
//!   from a source address: kaproxy-testkit's `client`, shared with the integration tests.
//! - [`stats`]: HDR latency histogram, status classes, the report (text and JSON).
//! - [`race`]: `kaproxy-bench race`, naive pool vs kaproxy against Apache-like backends.
//! - [`slow`]: `kaproxy-bench slow`, slow uploaders, slow readers and stalled HTTP/2 streams
//!   beside a legitimate client (issue 16).
//! - [`probe`]: `kaproxy-bench probe`, issue 17's fifteen hostile inputs against a proxy in
//!   front of two recording backends it runs itself, with a grade per case.
//! - [`apache`]: `kaproxy-bench apache`, one testkit Apache (e.g. prefork) until SIGTERM.
//!
//! The backends `race` runs against (demo backends, the delay relay, real Apache) come from
//! `kaproxy-testkit`.
#![forbid(unsafe_code)]

mod apache;
mod args;
mod conn;
mod load;
mod probe;
mod race;
mod slow;
mod stats;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};

use crate::args::SourceIps;
use crate::conn::{Connector, HttpVersion, RequestTemplate, Target, TlsOptions};
use crate::load::LoadPlan;

/// Used when neither `-d` nor `-n` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "kaproxy-bench",
    version,
    about = "HTTP/1.1 and HTTP/2 load generator, and the keep-alive race reproducer for kaproxy",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reproduce the keep-alive race on loopback: a naive pool vs kaproxy's, side by side.
    Race(race::RaceArgs),
    /// Slow uploaders, slow readers and stalled HTTP/2 streams against a proxy, beside a
    /// legitimate client whose answers within 1 s are counted (issue 16).
    Slow(Box<slow::SlowArgs>),
    /// Issue 17's hostile inputs, sent to a proxy as an attacker would, with what it answered
    /// and what reached which of the two recording backends this command runs (bench/hostile.sh).
    Probe(Box<probe::ProbeArgs>),
    /// Run a real Apache httpd (testkit's launcher, e.g. --prefork 8) on loopback until
    /// SIGTERM, writing its address to --addr-file (for bench/slowclients.sh).
    Apache(apache::ApacheArgs),
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// http://host:port/path or https://host:port/path
    #[arg(required = true)]
    url: Option<String>,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 16)]
    connections: usize,
    /// Run this long (e.g. 10s, 1m); the default when -n is not given is 10s.
    #[arg(short = 'd', long, value_parser = args::parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many requests (responses plus errors).
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Open loop: this many requests per second in total, latency measured from each request's
    /// intended send time (no coordinated omission).
    #[arg(long)]
    rate: Option<f64>,
    /// A new connection (and TLS handshake) for every request.
    #[arg(long)]
    new_conn: bool,
    /// Sleep MIN..MAX (uniform) between two requests on a connection, e.g. 900ms..1100ms.
    #[arg(long, value_name = "MIN..MAX", value_parser = args::parse_gap)]
    idle_gap: Option<(Duration, Duration)>,
    /// Spread client sockets over these loopback source addresses, e.g. 127.0.0.2-127.0.0.250.
    #[arg(long, value_name = "FIRST-LAST", value_parser = args::parse_source_ips)]
    source_ips: Option<SourceIps>,
    /// Request method.
    #[arg(short = 'm', long, default_value = "GET")]
    method: String,
    /// Extra request header "Name: value" (repeatable).
    #[arg(short = 'H', long = "header", value_parser = args::parse_header)]
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Request body of this many bytes (for POST/PUT).
    #[arg(long, default_value_t = 0)]
    body_size: usize,
    /// Speak HTTP/2 (ALPN h2 over TLS, prior knowledge over plain TCP).
    #[arg(short = '2', long)]
    http2: bool,
    /// Concurrent requests per HTTP/2 connection (like h2load -m).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Accept any TLS certificate.
    #[arg(short = 'k', long)]
    insecure: bool,
    /// Trust the CA certificates in this PEM file.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// No TLS session resumption: every new connection is a full handshake.
    #[arg(long)]
    no_resume: bool,
    /// Give up on a request (connect included) after this long.
    #[arg(long, default_value = "10s", value_parser = args::parse_duration)]
    timeout: Duration,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Some(Command::Race(args)) => {
            let clean = runtime.block_on(race::run(args))?;
            if !clean {
                std::process::exit(1);
            }
            Ok(())
        }
        Some(Command::Slow(args)) => runtime.block_on(slow::run(*args)),
        Some(Command::Probe(args)) => runtime.block_on(probe::run(*args)),
        Some(Command::Apache(args)) => runtime.block_on(apache::run(args)),
        None => runtime.block_on(load_command(cli.load)),
    }
}

async fn load_command(a: LoadArgs) -> anyhow::Result<()> {
    let url = a.url.as_deref().context("a URL is required")?;
    let target = Target::parse(url)?;
    let version = if a.http2 {
        HttpVersion::Http2
    } else {
        HttpVersion::Http1
    };
    if a.connections == 0 || a.streams == 0 {
        bail!("-c and --streams must be at least 1");
    }
    if a.streams > 1 && version != HttpVersion::Http2 {
        bail!("--streams needs --http2 (HTTP/1.1 has one request in flight per connection)");
    }
    if a.rate.is_some() && a.idle_gap.is_some() {
        bail!("--rate and --idle-gap cannot be combined: the rate already sets the gaps");
    }
    if a.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of requests per second");
    }
    let method: http::Method = a
        .method
        .to_uppercase()
        .parse()
        .with_context(|| format!("bad method {:?}", a.method))?;
    let tls = TlsOptions {
        insecure: a.insecure,
        cacert: a.cacert.clone(),
        no_resume: a.no_resume,
    };
    let connector = Connector::new(&target, version, &tls, a.source_ips).await?;
    let template = RequestTemplate::new(
        &target,
        version,
        method,
        &a.headers,
        Bytes::from(vec![b'x'; a.body_size]),
    )?;
    let duration = match (a.duration, a.requests) {
        (None, None) => Some(DEFAULT_DURATION),
        (d, _) => d,
    };
    let plan = LoadPlan {
        connections: a.connections,
        streams: a.streams,
        duration,
        requests: a.requests,
        rate: a.rate,
        new_conn: a.new_conn,
        idle_gap: a.idle_gap,
        timeout: a.timeout,
        progress: !a.json && std::io::stderr().is_terminal(),
    };
    if !a.json {
        println!("{}", describe(&target, version, &plan, &a));
    }
    let result = load::run(plan, Arc::new(connector), Arc::new(template)).await;
    let report = result.stats.report(result.elapsed);
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn describe(target: &Target, version: HttpVersion, plan: &LoadPlan, a: &LoadArgs) -> String {
    let mut parts = vec![
        format!("{} {}", a.method.to_uppercase(), target.url()),
        format!(
            "{}{}",
            version.label(),
            if target.tls { " over TLS" } else { "" }
        ),
        format!("{} connections", plan.connections),
    ];
    if plan.streams > 1 {
        parts.push(format!("{} streams each", plan.streams));
    }
    parts.push(if plan.new_conn {
        "new connection per request".to_string()
    } else {
        "keep-alive".to_string()
    });
    if let Some(d) = plan.duration {
        parts.push(format!("for {d:?}"));
    }
    if let Some(n) = plan.requests {
        parts.push(format!("{n} requests"));
    }
    if let Some(r) = plan.rate {
        parts.push(format!("open loop at {r} req/s"));
    }
    if let Some((min, max)) = plan.idle_gap {
        parts.push(format!("idle gap {min:?}..{max:?}"));
    }
    if let Some(ips) = a.source_ips {
        parts.push(format!("from {}-{}", ips.first, ips.last));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_load_and_race() {
        let cli = Cli::try_parse_from([
            "kaproxy-bench",
            "-c",
            "8",
            "-d",
            "2s",
            "--idle-gap",
            "900ms..1100ms",
            "-H",
            "X-A: b",
            "http://127.0.0.1:8080/",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.load.connections, 8);
        assert_eq!(cli.load.duration, Some(Duration::from_secs(2)));
        let cli = Cli::try_parse_from(["kaproxy-bench", "race", "--requests", "100"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Race(_))));
        let cli = Cli::try_parse_from([
            "kaproxy-bench",
            "slow",
            "--h2-conns",
            "2",
            "--h2-url",
            "https://127.0.0.1:8443/u",
            "http://127.0.0.1:8080",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::Slow(_))));
        let cli = Cli::try_parse_from([
            "kaproxy-bench",
            "probe",
            "--http",
            "127.0.0.1:19381",
            "--https",
            "127.0.0.1:19741",
            "--only",
            "1-3,13",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::Probe(_))));
        assert!(Cli::try_parse_from(["kaproxy-bench"]).is_err());
    }
}
