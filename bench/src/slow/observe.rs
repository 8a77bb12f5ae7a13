//! What `kaproxy-bench slow` reads of the proxy while it runs: RSS from `/proc` and its
//! `/metrics`.

use super::*;

#[derive(Default)]
pub(super) struct RssState {
    pub(super) before: u64,
    pub(super) peak: u64,
    pub(super) peak_procs: usize,
    pub(super) samples: u64,
}

impl RssState {
    pub(super) fn observe(&mut self, (kib, procs): (u64, usize)) {
        self.samples += 1;
        if kib >= self.peak {
            self.peak = kib;
            self.peak_procs = procs;
        }
    }
}

/// VmRSS (KiB) of these processes and their descendants, summed, and how many processes.
pub(super) fn rss_kib(pids: &[u32]) -> (u64, usize) {
    let mut seen = std::collections::BTreeSet::new();
    let mut todo: Vec<u32> = pids.to_vec();
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    let mut total = 0;
    let mut procs = 0;
    for pid in seen {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if let Some(kib) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            total += kib;
            procs += 1;
        }
    }
    (total, procs)
}

// ---- /metrics ----

pub(super) async fn fetch_metrics(url: &str, prefixes: &[String]) -> anyhow::Result<Vec<String>> {
    let target = Target::parse(url)?;
    if target.tls {
        bail!("--metrics must be http://");
    }
    let addr = loopback_addr(&target).await?;
    let fetch = async {
        let mut s = connect(addr, None).await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            target.path_and_query, target.authority
        );
        s.write_all(request.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = timeout(METRICS_TIMEOUT, fetch)
        .await
        .context("the metrics page did not come in time")?
        .context("fetching the metrics page")?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{}", head.lines().next().unwrap_or(""));
    }
    Ok(body
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p.as_str())))
        .map(str::to_string)
        .collect())
}
