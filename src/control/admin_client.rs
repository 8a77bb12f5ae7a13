//! Owns the client side of the admin API that `kaproxy server` uses: one HTTP/1.1 request
//! to the admin listener of a configuration (`[admin] listen`, with its `token`), over a
//! plain `TcpStream`, and its answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one admin request may take, connect to last byte: the admin API answers from
/// memory at once.
pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers larger than this are cut (the biggest, `GET /servers`, is a few hundred bytes a
/// server).
const MAX_ANSWER_BYTES: u64 = 4 << 20;

/// Why an admin request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("cannot reach the admin listener at {addr}: {source} (is kaproxy running with this config?)")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin listener at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin listener at {addr}: no answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("admin listener at {addr}: not an HTTP answer: {head:?}")]
    Malformed { addr: SocketAddr, head: String },
}

/// The admin listener's answer: status code and body.
#[derive(Debug)]
pub struct AdminAnswer {
    pub status: u16,
    pub body: String,
}

/// Where to reach an admin listener bound to `listen`: a wildcard address (`0.0.0.0`, `::`)
/// is reached on loopback of its family.
pub fn dial_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

/// Sends `method path` (no body) to the admin listener at `addr`, with `Authorization:
/// Bearer <token>` when a token is given, and reads the whole answer (`Connection: close`).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<AdminAnswer, AdminClientError> {
    let timeout = ADMIN_REQUEST_TIMEOUT;
    tokio::time::timeout(timeout, exchange(addr, method, path, token))
        .await
        .map_err(|_| AdminClientError::Timeout { addr, timeout })?
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<AdminAnswer, AdminClientError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| AdminClientError::Connect { addr, source })?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kaproxy-server\r\n{auth}\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let io = |source| AdminClientError::Io { addr, source };
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut raw)
        .await
        .map_err(io)?;
    parse_answer(&raw).ok_or_else(|| AdminClientError::Malformed {
        addr,
        head: String::from_utf8_lossy(&raw[..raw.len().min(80)]).into_owned(),
    })
}

/// The status and body of a whole HTTP/1.1 answer whose body ends with the connection (the
/// admin listener sends a `Content-Length`; nothing is chunked).
fn parse_answer(raw: &[u8]) -> Option<AdminAnswer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    let body = String::from_utf8_lossy(&raw[end + 4..]).into_owned();
    Some(AdminAnswer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        let a = parse_answer(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 3\r\n\r\nno\n").unwrap();
        assert_eq!((a.status, a.body.as_str()), (403, "no\n"));
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_none());
        assert!(
            parse_answer(b"HTTP/1.1 200 OK\r\n").is_none(),
            "head not ended"
        );
    }

    #[test]
    fn wildcard_listeners_are_dialled_on_loopback() {
        let d = |s: &str| dial_addr(s.parse().unwrap()).to_string();
        assert_eq!(d("0.0.0.0:9901"), "127.0.0.1:9901");
        assert_eq!(d("[::]:9901"), "[::1]:9901");
        assert_eq!(d("10.1.2.3:9901"), "10.1.2.3:9901");
    }
}
