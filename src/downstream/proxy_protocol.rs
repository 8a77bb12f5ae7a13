//! Owns the PROXY protocol header (v1 text, v2 binary) that a TCP load balancer in front of
//! kaproxy sends first: reads exactly the header and returns the client address it carries.

use std::io;
use std::net::SocketAddr;

use tokio::io::AsyncReadExt;

/// The v2 signature (PROXY protocol spec, section 2.2).
const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
const PROXY_V1_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
    #[error("the connection does not start with a PROXY protocol v1 or v2 header")]
    Missing,
    #[error("malformed PROXY protocol v1 header: {0}")]
    MalformedV1(#[source] ppp::v1::BinaryParseError),
    #[error("malformed PROXY protocol v2 header: {0}")]
    MalformedV2(#[source] ppp::v2::ParseError),
    #[error("malformed PROXY protocol v1 header: longer than {PROXY_V1_MAX} bytes")]
    V1TooLong,
}

/// Reads exactly one PROXY protocol v1 or v2 header (nothing past it, so TLS or HTTP bytes
/// that follow stay in the socket) and returns the client address it carries; `None` for
/// `LOCAL`/`UNKNOWN` headers (a load balancer's own health check), which keep the peer.
pub async fn read_proxy_header<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // Both versions are at least 15 bytes long ("PROXY UNKNOWN\r\n").
    let mut buf = vec![0u8; 12];
    stream.read_exact(&mut buf).await?;
    if buf.as_slice() == PROXY_V2_SIGNATURE {
        let mut rest = [0u8; 4];
        stream.read_exact(&mut rest).await?;
        buf.extend_from_slice(&rest);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let start = buf.len();
        buf.resize(start + len, 0);
        stream.read_exact(&mut buf[start..]).await?;
        let header =
            ppp::v2::Header::try_from(buf.as_slice()).map_err(ProxyHeaderError::MalformedV2)?;
        if header.command == ppp::v2::Command::Local {
            return Ok(None);
        }
        return Ok(match header.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v2::Addresses::IPv6(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            _ => None,
        });
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    // v1: read up to CRLF, a byte at a time, so that nothing after the header is consumed.
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= PROXY_V1_MAX {
            return Err(ProxyHeaderError::V1TooLong);
        }
        let byte = stream.read_u8().await?;
        buf.push(byte);
    }
    let header =
        ppp::v1::Header::try_from(buf.as_slice()).map_err(ProxyHeaderError::MalformedV1)?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// Sends `bytes` then "after" on a real socket; returns what read_proxy_header made of
    /// it and what remained readable.
    async fn parse(bytes: Vec<u8>) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            s.write_all(b"after").await.unwrap();
            s.shutdown().await.unwrap();
            s
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let res = read_proxy_header(&mut stream)
            .await
            .map_err(|e| e.to_string());
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        drop(writer.await);
        (res, rest)
    }

    #[tokio::test]
    async fn v1_header_gives_the_client_address_and_consumes_only_itself() {
        let (res, rest) = parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n".to_vec()).await;
        assert_eq!(res.unwrap(), Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(rest, b"after");
        let (res, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n".to_vec()).await;
        assert_eq!(res.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        let (res, _) = parse(b"PROXY UNKNOWN\r\n".to_vec()).await;
        assert_eq!(res.unwrap(), None);
    }

    #[tokio::test]
    async fn v2_header_gives_the_client_address_and_consumes_only_itself() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "198.51.100.9:40000".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .write_tlv(ppp::v2::Type::NoOp, b"pad")
        .unwrap()
        .build()
        .unwrap();
        let (res, rest) = parse(header).await;
        assert_eq!(res.unwrap(), Some("198.51.100.9:40000".parse().unwrap()));
        assert_eq!(rest, b"after");
    }

    #[tokio::test]
    async fn missing_or_garbage_header_is_an_error() {
        let (res, _) = parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(res.unwrap_err().contains("does not start with"));
        let (res, _) = parse(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n".to_vec()).await;
        assert!(res.unwrap_err().contains("malformed"));
        let (res, _) = parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 and it goes on and on and on and on and on and on and on and on and on and on and on\r\n".to_vec()).await;
        assert!(res.is_err());
    }
}
