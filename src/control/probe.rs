//! Owns `kaproxy probe`: asks a backend for its `Keep-Alive` header, measures when it really
//! closes an idle keep-alive connection, and recommends the upstream settings that outlast it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, SERVER, USER_AGENT};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::headers::{connection_has, KEEP_ALIVE};
use crate::upstream::keep_alive::KeepAliveHint;

/// How long `probe` waits for the backend to close an idle connection: a little over a
/// minute, which covers Apache's 5 s default and the 60 s many backends use.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(65);
/// The margin never exceeds the config default, and is never below this.
const MIN_MARGIN: Duration = Duration::from_millis(100);
const MAX_MARGIN: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("{target}: HTTP exchange failed: {source}")]
    Http {
        target: String,
        source: hyper::Error,
    },
    #[error("{target}: no response within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
}

/// What the probe found.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub target: String,
    pub tls: bool,
    pub status: u16,
    pub server: Option<String>,
    /// The raw `Keep-Alive` header, if any.
    pub keep_alive_header: Option<String>,
    pub hint: KeepAliveHint,
    pub connection_close: bool,
    /// Time from the end of the response to the backend's FIN; None if it kept the
    /// connection open for all of `waited`.
    pub observed_close: Option<Duration>,
    pub waited: Duration,
}

/// Settings that keep kaproxy's deadline ahead of the backend's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommendation {
    pub keepalive_timeout: Duration,
    pub safety_margin: Duration,
    pub idle_timeout: Duration,
}

impl ProbeReport {
    /// The backend's keep-alive timeout: the shorter of the measured and the advertised one
    /// (the header is rounded down to whole seconds, so it is a safe lower bound).
    pub fn keepalive_timeout(&self) -> Option<Duration> {
        match (self.observed_close, self.hint.timeout) {
            (Some(o), Some(h)) => Some(o.min(h)),
            (o, h) => o.or(h),
        }
    }

    pub fn recommendation(&self) -> Option<Recommendation> {
        recommend(self.keepalive_timeout()?)
    }

    /// With `--tls`, the `[upstreams.NAME]` TLS keys for this backend (README, "TLS to the
    /// backends"): `tls = true`; `tls_server_name` when the target is a DNS name (servers are
    /// resolved at load, so the default name would be the IP); and `tls_ca` as a comment, as
    /// the probe accepted the certificate without verifying it.
    pub fn tls_settings(&self) -> Vec<String> {
        if !self.tls {
            return Vec::new();
        }
        let host = self
            .target
            .rsplit_once(':')
            .map_or(self.target.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let name = if host.parse::<std::net::IpAddr>().is_ok() {
            format!(
                "# tls_server_name = \"...\"   default: the server's IP ({host}), checked against an IP SAN; set the certificate's DNS name if it has none"
            )
        } else {
            format!("tls_server_name = \"{host}\"")
        };
        vec![
            "tls = true".to_string(),
            name,
            "# tls_ca = \"ca.pem\"   the CA that signs the backend's certificate (the probe did not verify it); unset: the built-in webpki-roots".to_string(),
        ]
    }
}

/// keepalive_timeout = the backend's, rounded down to 100 ms; safety_margin = a quarter of it,
/// between 100 ms and 500 ms; idle_timeout = 90 % of what is left, rounded down to 100 ms.
pub fn recommend(backend: Duration) -> Option<Recommendation> {
    let keepalive_timeout = round_down(backend, Duration::from_millis(100));
    let safety_margin = (keepalive_timeout / 4).clamp(MIN_MARGIN, MAX_MARGIN);
    let room = keepalive_timeout.checked_sub(safety_margin)?;
    let idle_timeout = round_down(room.mul_f64(0.9), Duration::from_millis(100));
    (!idle_timeout.is_zero()).then_some(Recommendation {
        keepalive_timeout,
        safety_margin,
        idle_timeout,
    })
}

fn round_down(d: Duration, step: Duration) -> Duration {
    step * (d.as_nanos() / step.as_nanos()) as u32
}

fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls {
            "https (certificate not verified)"
        } else {
            "http"
        };
        writeln!(f, "probe of {} over {scheme}", self.target)?;
        writeln!(f, "  response status          {}", self.status)?;
        if let Some(s) = &self.server {
            writeln!(f, "  server                   {s}")?;
        }
        match &self.keep_alive_header {
            Some(h) => writeln!(f, "  Keep-Alive header        {h}")?,
            None => writeln!(
                f,
                "  Keep-Alive header        (none: kaproxy cannot learn the timeout at run time)"
            )?,
        }
        if self.connection_close {
            writeln!(
                f,
                "  Connection: close        the backend does not keep connections alive"
            )?;
        }
        match self.observed_close {
            Some(d) => writeln!(f, "  idle connection closed   after {:.2}s", d.as_secs_f64())?,
            None => writeln!(
                f,
                "  idle connection closed   not within {:.0}s (the backend keeps idle connections longer)",
                self.waited.as_secs_f64()
            )?,
        }
        match self.recommendation() {
            Some(r) => {
                writeln!(f, "\nrecommended [upstreams.NAME] settings:")?;
                writeln!(
                    f,
                    "  keepalive_timeout = \"{}\"",
                    human(r.keepalive_timeout)
                )?;
                writeln!(f, "  safety_margin = \"{}\"", human(r.safety_margin))?;
                writeln!(f, "  idle_timeout = \"{}\"", human(r.idle_timeout))?;
                for line in self.tls_settings() {
                    writeln!(f, "  {line}")?;
                }
            }
            None if self.keepalive_timeout().is_some() => {
                writeln!(
                    f,
                    "\nthe backend's keep-alive timeout is too short to reuse connections safely;"
                )?;
                writeln!(f, "raise it (Apache: KeepAliveTimeout) to at least 1s")?;
            }
            None => {
                writeln!(
                    f,
                    "\nno keep-alive timeout observed; keep the defaults and set"
                )?;
                writeln!(f, "keepalive_timeout to the backend's documented value")?;
            }
        }
        if self.recommendation().is_none() && self.tls {
            writeln!(f, "\nrecommended [upstreams.NAME] TLS settings:")?;
            for line in self.tls_settings() {
                writeln!(f, "  {line}")?;
            }
        }
        Ok(())
    }
}

/// Probes `target` (HOST:PORT): one keep-alive request, then waits up to `max_wait` for the
/// backend to close the idle connection.
pub async fn probe(target: &str, tls: bool, max_wait: Duration) -> Result<ProbeReport, ProbeError> {
    let err = |reason: String| ProbeError::Connect {
        target: target.to_string(),
        reason,
    };
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target))
        .await
        .map_err(|_| err("connect timed out after 5s".into()))?
        .map_err(|e| err(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let host = target
        .rsplit_once(':')
        .map_or(target, |(h, _)| h)
        .to_string();
    if tls {
        let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
            .map_err(|e| err(format!("bad server name: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::upstream::tls::AnyCertificate::new(
                provider,
            )))
            .with_no_client_auth();
        let tls_stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|e| err(format!("TLS handshake: {e}")))?;
        exchange(tls_stream, target, &host, tls, max_wait).await
    } else {
        exchange(stream, target, &host, tls, max_wait).await
    }
}

async fn exchange<S>(
    io: S,
    target: &str,
    host: &str,
    tls: bool,
    max_wait: Duration,
) -> Result<ProbeReport, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = |source| ProbeError::Http {
        target: target.to_string(),
        source,
    };
    let (mut sender, conn) = crate::upstream::connect::http1_handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(http)?;
    let mut conn = tokio::spawn(conn);
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = "/".parse().expect("static URI");
    let headers = req.headers_mut();
    headers.insert(
        HOST,
        HeaderValue::from_str(host).unwrap_or(HeaderValue::from_static("localhost")),
    );
    headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    headers.insert(USER_AGENT, HeaderValue::from_static("kaproxy-probe"));
    let timeout = Duration::from_secs(10);
    let resp = tokio::time::timeout(timeout, sender.send_request(req))
        .await
        .map_err(|_| ProbeError::Timeout {
            target: target.to_string(),
            timeout,
        })?
        .map_err(http)?;
    let status = resp.status().as_u16();
    let text = |v: Option<&HeaderValue>| v.and_then(|v| v.to_str().ok()).map(str::to_string);
    let keep_alive_header = text(resp.headers().get(KEEP_ALIVE));
    let server = text(resp.headers().get(SERVER));
    let connection_close = connection_has(resp.headers(), "close");
    let hint = keep_alive_header
        .as_deref()
        .map(|h| KeepAliveHint::parse(h.as_bytes()))
        .unwrap_or_default();
    resp.into_body().collect().await.map_err(http)?;
    // The idle clock of the backend starts now; hyper's connection task ends at its FIN.
    let idle_from = Instant::now();
    let observed_close = match tokio::time::timeout(max_wait, &mut conn).await {
        Ok(_) => Some(idle_from.elapsed()),
        Err(_) => {
            conn.abort();
            None
        }
    };
    drop(sender);
    Ok(ProbeReport {
        target: target.to_string(),
        tls,
        status,
        server,
        keep_alive_header,
        hint,
        connection_close,
        observed_close,
        waited: idle_from.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaproxy_demo::{DemoBackend, DemoBackendConfig};

    #[test]
    fn recommendations_leave_a_margin() {
        let r = recommend(Duration::from_secs(5)).unwrap();
        assert_eq!(r.keepalive_timeout, Duration::from_secs(5));
        assert_eq!(r.safety_margin, Duration::from_millis(500));
        assert_eq!(r.idle_timeout, Duration::from_secs(4));
        let r = recommend(Duration::from_millis(1040)).unwrap();
        assert_eq!(r.keepalive_timeout, Duration::from_secs(1));
        assert_eq!(r.safety_margin, Duration::from_millis(250));
        assert_eq!(r.idle_timeout, Duration::from_millis(600));
        assert!(r.idle_timeout < r.keepalive_timeout - r.safety_margin);
        assert_eq!(recommend(Duration::from_millis(50)), None);
    }

    fn tls_report(target: &str, observed_close: Option<Duration>) -> ProbeReport {
        ProbeReport {
            target: target.to_string(),
            tls: true,
            status: 200,
            server: None,
            keep_alive_header: None,
            hint: KeepAliveHint::default(),
            connection_close: false,
            observed_close,
            waited: Duration::from_secs(65),
        }
    }

    #[test]
    fn with_tls_the_recommendation_names_the_upstream_tls_keys() {
        let by_name = tls_report("backend.internal:443", Some(Duration::from_secs(5)));
        let text = by_name.to_string();
        let settings = text
            .split_once("recommended [upstreams.NAME] settings:\n")
            .unwrap_or_else(|| panic!("{text}"))
            .1;
        for line in [
            "  tls = true\n",
            "  tls_server_name = \"backend.internal\"\n",
            "  # tls_ca = \"ca.pem\"",
        ] {
            assert!(settings.contains(line), "no {line:?} in\n{text}");
        }
        // What it prints is a valid [upstreams.NAME] body as is.
        let toml = format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.web]\nservers = [\"127.0.0.1:443\"]\n{settings}"
        );
        let config = crate::config::Config::from_toml_str(&toml, std::path::Path::new("p.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        let tls = config.upstreams[0].tls.clone().expect("tls = true");
        assert_eq!(
            tls.server_name.map(|n| n.to_str().into_owned()).as_deref(),
            Some("backend.internal")
        );
        // An IP target: the default name is that IP; no keep-alive seen: TLS keys alone.
        let text = tls_report("10.0.0.5:443", None).to_string();
        assert!(
            text.contains("recommended [upstreams.NAME] TLS settings:\n  tls = true\n"),
            "{text}"
        );
        assert!(
            text.contains("# tls_server_name = \"...\"   default: the server's IP (10.0.0.5)"),
            "{text}"
        );
        let plain = ProbeReport {
            tls: false,
            ..tls_report("10.0.0.5:80", Some(Duration::from_secs(5)))
        };
        assert!(!plain.to_string().contains("tls"), "{plain}");
    }

    #[tokio::test]
    async fn measures_a_demo_backends_idle_close() {
        let backend = DemoBackend::start(
            "127.0.0.1:0".parse().unwrap(),
            DemoBackendConfig {
                keepalive_timeout: Duration::from_secs(1),
                ..DemoBackendConfig::default()
            },
        )
        .await
        .unwrap();
        let report = probe(&backend.addr().to_string(), false, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(report.status, 200);
        assert_eq!(report.hint.timeout, Some(Duration::from_secs(1)));
        let observed = report
            .observed_close
            .expect("the backend closes idle connections");
        assert!(
            observed >= Duration::from_millis(900) && observed <= Duration::from_millis(1300),
            "observed {observed:?}"
        );
        let text = report.to_string();
        assert!(text.contains("keepalive_timeout = \"1s\""), "{text}");
        assert!(text.contains("idle_timeout = \"600ms\""), "{text}");
    }
}
