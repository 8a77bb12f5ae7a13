//! The keep-alive timeline `kaproxy check` prints: every hop's timeouts in order, each
//! ordering marked OK, WARN or ERROR with its fix.

use std::fmt;
use std::path::PathBuf;

use rustls_pki_types::ServerName;

use super::validate::{downstream_order, human, upstream_order};
use super::{
    BufferingConfig, Config, DownstreamConfig, Problem, UpstreamConfig, UpstreamTlsConfig,
    APACHE_MAX_KEEPALIVE_REQUESTS,
};

// ---- The keep-alive timeline ----

pub(super) const RULE: &str =
    "rule: the side that reuses a connection must give up on it before the side that accepts it does";

/// What `kaproxy check` explains: every hop in order, from the side that reuses a connection
/// to the side that accepts it, each ordering marked OK, WARN or ERROR with its fix.
#[derive(Debug, Clone)]
pub struct Timeline {
    source: Option<PathBuf>,
    sections: Vec<Section>,
}

/// How one ordering holds up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Ok,
    Warn,
    Error,
}

#[derive(Debug, Clone)]
pub(super) struct Section {
    title: String,
    rows: Vec<Row>,
}

/// `label  value  VERDICT  note`, then `fix: ...` on its own line.
#[derive(Debug, Clone)]
pub(super) struct Row {
    label: String,
    value: String,
    verdict: Option<Verdict>,
    note: String,
    fix: Option<String>,
}

impl Row {
    pub(super) fn info(
        label: impl Into<String>,
        value: impl Into<String>,
        note: impl Into<String>,
    ) -> Row {
        Row {
            label: label.into(),
            value: value.into(),
            verdict: None,
            note: note.into(),
            fix: None,
        }
    }

    /// OK with `ok_note`, or ERROR with the problem's message and fix.
    pub(super) fn judged(self, problem: Option<Problem>, ok_note: String) -> Row {
        match problem {
            None => self.verdict(Verdict::Ok, ok_note, None),
            Some(p) => {
                let leaf = p.key.rsplit('.').next().unwrap_or_default();
                self.verdict(Verdict::Error, format!("{leaf} {}", p.message), p.fix)
            }
        }
    }

    pub(super) fn verdict(mut self, verdict: Verdict, note: String, fix: Option<String>) -> Row {
        (self.verdict, self.note, self.fix) = (Some(verdict), note, fix);
        self
    }
}

impl Config {
    /// The keep-alive timeline of this config, downstream first, then each upstream.
    pub fn timeline(&self) -> Timeline {
        let mut sections = vec![downstream_section(&self.downstream)];
        sections.push(deadlines_section(
            &self.downstream,
            &self.upstreams,
            &self.buffering,
        ));
        sections.extend(self.upstreams.iter().map(upstream_section));
        if let Some(demo) = &self.demo {
            let backends: Vec<String> = demo.backends.iter().map(|a| a.to_string()).collect();
            let row = Row::info("[demo] backends", backends.len().to_string(), "").verdict(
                Verdict::Warn,
                format!(
                    "{}: built-in demo backends are for development",
                    backends.join(", ")
                ),
                Some("delete the [demo] table in production".into()),
            );
            let title = "development".into();
            sections.push(Section {
                title,
                rows: vec![row],
            });
        }
        Timeline {
            source: self.source.clone(),
            sections,
        }
    }
}

pub(super) fn downstream_section(d: &DownstreamConfig) -> Section {
    let (idle, front) = (d.idle_timeout, d.front_idle_timeout);
    let (front_note, ok_note) = if front.is_zero() {
        (
            "none configured",
            "no front load balancer to outlast".to_string(),
        )
    } else {
        (
            "it pools connections to kaproxy",
            format!("> front {}", human(front)),
        )
    };
    // Behind a load balancer, clients reuse connections to it, not to kaproxy.
    let client_limit = if front.is_zero() { idle } else { front };
    let secs = idle.as_secs();
    let advertised = if d.advertise_keep_alive {
        let note = format!("Keep-Alive: timeout={secs} on HTTP/1.1 responses");
        Row::info("advertised to clients", format!("{secs}s"), note)
    } else {
        Row::info(
            "advertised to clients",
            "-",
            "nothing (advertise_keep_alive = false)",
        )
    };
    let rows = vec![
        Row::info(
            "client pools' idle timeout",
            format!("< {}", human(client_limit)),
            "set in each client (Reactor Netty maxIdleTime, Go IdleConnTimeout, ...)",
        ),
        Row::info("front load balancer idle timeout", human(front), front_note),
        Row::info("kaproxy downstream idle_timeout", human(idle), "")
            .judged(downstream_order(d), ok_note),
        advertised,
        Row::info(
            "max_requests_per_connection",
            d.max_requests_per_connection.to_string(),
            "then Connection: close",
        ),
    ];
    let title = "downstream: clients (and any front load balancer) reuse, kaproxy accepts".into();
    Section { title, rows }
}

/// The deadlines a slow or hostile client meets (README, "Hostile clients"), and what each
/// upstream group buffers so that such a client never holds a backend connection.
pub(super) fn deadlines_section(
    d: &DownstreamConfig,
    upstreams: &[UpstreamConfig],
    buffering: &BufferingConfig,
) -> Section {
    let cap = if d.max_connections == 0 {
        Row::info(
            "max_connections",
            "auto",
            "derived at start from the open-file limit; the longest-idle are closed at the cap",
        )
    } else {
        Row::info(
            "max_connections",
            d.max_connections.to_string(),
            "the longest-idle keep-alive connections are closed at the cap",
        )
    };
    let mut rows = vec![
        Row::info(
            "header_timeout",
            human(d.header_timeout),
            "a partial request head: 408; a silent new connection: closed",
        ),
        Row::info(
            "body_timeout",
            human(d.body_timeout),
            "between two reads of a request body: 408, or the connection closed",
        ),
        Row::info(
            "send_timeout",
            human(d.send_timeout),
            "a write (or an HTTP/2 window) without progress: connection closed / stream cut",
        ),
        cap,
    ];
    for u in upstreams {
        rows.extend(buffer_rows(u));
    }
    let dir = match &buffering.temp_dir {
        Some(dir) => dir.display().to_string(),
        None => "the system temp dir".to_string(),
    };
    rows.push(Row::info(
        "buffering memory_limit",
        bytes(buffering.memory_limit as u64),
        format!("every in-memory body buffer together; then files in {dir}, unlinked at creation"),
    ));
    let title = "client deadlines: no slow or hostile client holds a backend connection".into();
    Section { title, rows }
}

/// A byte count as the config's readers think of it: whole KiB as "64KiB".
/// What one upstream group buffers (README, "Buffering"): a request body whole before a
/// backend is involved, a response as fast as the backend sends it, and the limits.
fn buffer_rows(u: &UpstreamConfig) -> [Row; 2] {
    let b = &u.buffers;
    let cap = match b.max_request_body_bytes {
        Some(max) => format!("larger bodies: 413 (max_request_body_bytes {})", bytes(max)),
        None => "no size limit (max_request_body_bytes = 0)".to_string(),
    };
    let request = if b.request_buffering {
        Row::info(
            format!("{} request bodies", u.name),
            kib(b.request_buffer_bytes),
            format!("in memory, then on disk: read whole before a backend is picked; {cap}"),
        )
    } else {
        Row::info(
            format!("{} request bodies", u.name),
            kib(b.request_buffer_bytes),
            format!(
                "in memory, then streams (request_buffering = false: a slow upload holds its \
                 backend connection); {cap}"
            ),
        )
    };
    let response = if !b.response_buffering {
        Row::info(
            format!("{} responses", u.name),
            format!("{} read ahead", kib(b.response_buffer_bytes)),
            "response_buffering = false: a slow reader holds its backend connection",
        )
    } else if b.max_response_spill_bytes == 0 {
        Row::info(
            format!("{} responses", u.name),
            kib(b.response_buffer_bytes),
            "in memory, read as fast as the backend sends; never to disk (max_response_spill_bytes = 0)",
        )
    } else {
        Row::info(
            format!("{} responses", u.name),
            kib(b.response_buffer_bytes),
            format!(
                "in memory, then up to {} on disk: read as fast as the backend sends; event \
                 streams pass through",
                bytes(b.max_response_spill_bytes)
            ),
        )
    };
    [request, response]
}

/// A byte count in the largest binary unit that divides it.
fn bytes(n: u64) -> String {
    for (unit, name) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{}{name}", n / unit);
        }
    }
    n.to_string()
}

fn kib(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{}KiB", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

pub(super) fn upstream_section(u: &UpstreamConfig) -> Section {
    let pool = &u.pool;
    let balance = u.balance.as_str();
    let n = u.servers.len();
    let title = format!(
        "upstream {}  ({balance}, {n} server{}): kaproxy reuses, the backends accept",
        u.name,
        if n == 1 { "" } else { "s" }
    );
    let (idle, margin, keepalive) = (
        pool.idle_timeout,
        pool.safety_margin,
        pool.keepalive_timeout,
    );
    let order = format!("{} + {} < {}", human(idle), human(margin), human(keepalive));
    let max = pool.max_requests_per_connection;
    let max_row = Row::info("max_requests_per_connection", max.to_string(), "");
    let max_row = if max <= APACHE_MAX_KEEPALIVE_REQUESTS {
        let note =
            format!("<= Apache's default MaxKeepAliveRequests {APACHE_MAX_KEEPALIVE_REQUESTS}");
        max_row.verdict(Verdict::Ok, note, None)
    } else {
        let note = format!(
            "> Apache's default MaxKeepAliveRequests {APACHE_MAX_KEEPALIVE_REQUESTS} (a `Keep-Alive: max=` header overrides it at run time)"
        );
        let fix = format!(
            "set max_requests_per_connection = {APACHE_MAX_KEEPALIVE_REQUESTS} unless the backends raised MaxKeepAliveRequests"
        );
        max_row.verdict(Verdict::Warn, note, Some(fix))
    };
    let mut rows = vec![
        Row::info("kaproxy idle_timeout", human(idle), ""),
        Row::info(
            "+ safety_margin",
            human(margin),
            format!("= {}", human(idle + margin)),
        ),
        Row::info("backend keepalive_timeout", human(keepalive), "")
            .judged(upstream_order(u), order),
        max_row,
        Row::info(
            "max_lifetime",
            human(pool.max_lifetime),
            "retired after its current request",
        ),
        Row::info(
            "at run time a server's `Keep-Alive: timeout=N, max=M` header, else the shortest idle time it was seen to close at, replaces keepalive_timeout per server",
            "",
            "",
        ),
    ];
    rows.extend(tls_rows(u.tls.as_ref()));
    Section { title, rows }
}

/// The upstream TLS line of `check` (README, "TLS to the backends"), and a WARN line when
/// certificates are not verified.
pub(super) fn tls_rows(tls: Option<&UpstreamTlsConfig>) -> Vec<Row> {
    let Some(tls) = tls else {
        return vec![Row::info("tls", "off", "plain HTTP/1.1 to the backends")];
    };
    let ca = match &tls.ca {
        _ if !tls.verify => "no CA check".to_string(),
        Some(path) => format!("CA {}", path.display()),
        None => "CA webpki-roots (built in)".to_string(),
    };
    let name = match &tls.server_name {
        Some(name @ ServerName::DnsName(_)) => format!("name {} (SNI)", name.to_str()),
        Some(name) => format!("name {} (no SNI)", name.to_str()),
        None => "name each server's IP (no SNI)".to_string(),
    };
    let verify = if tls.verify {
        "verify on"
    } else {
        "verify OFF"
    };
    let mtls = match &tls.client_cert {
        Some(cert) => format!("mTLS {}", cert.display()),
        None => "mTLS off".to_string(),
    };
    let resumption = if tls.session_resumption {
        "resumption on"
    } else {
        "resumption off"
    };
    let mut rows = vec![Row::info(
        "tls",
        "on",
        format!("{ca}, {name}, {verify}, {mtls}, {resumption}"),
    )];
    if !tls.verify {
        rows.push(Row::info("tls_verify", "false", "").verdict(
            Verdict::Warn,
            "WARNING: backend certificates are NOT verified; anyone on the path can impersonate the backends".into(),
            Some("set tls_verify = true, and tls_ca to the CA that signs the backends' certificates".into()),
        ));
    }
    rows
}

impl Timeline {
    /// Some ordering is broken; the config is refused.
    pub fn has_errors(&self) -> bool {
        self.count(Verdict::Error) > 0
    }

    pub fn has_warnings(&self) -> bool {
        self.count(Verdict::Warn) > 0
    }

    pub(super) fn count(&self, verdict: Verdict) -> usize {
        let rows = self.sections.iter().flat_map(|s| &s.rows);
        rows.filter(|r| r.verdict == Some(verdict)).count()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.pad(match self {
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Error => "ERROR",
        })
    }
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "keep-alive timeline")?;
        if let Some(source) = &self.source {
            write!(f, " of {}", source.display())?;
        }
        writeln!(f)?;
        writeln!(f, "{RULE}")?;
        for section in &self.sections {
            writeln!(f, "\n{}", section.title)?;
            for row in &section.rows {
                let verdict = row.verdict.map(|v| v.to_string()).unwrap_or_default();
                let line = format!(
                    "  {:<34} {:<8} {verdict:<5}  {}",
                    row.label, row.value, row.note
                );
                writeln!(f, "{}", line.trim_end())?;
                if let Some(fix) = &row.fix {
                    writeln!(f, "  {:<34} {:<8} {:<5}  fix: {fix}", "", "", "")?;
                }
            }
        }
        let [ok, warn, error] = [Verdict::Ok, Verdict::Warn, Verdict::Error].map(|v| self.count(v));
        write!(f, "\n{ok} OK, {warn} WARN, {error} ERROR")
    }
}
