//! The raw HTTP/1.1 client side of `kaproxy-bench probe`: fresh TCP connections, requests
//! written as bytes, answers read with a bound.

use super::*;

/// A response read byte by byte.
pub(super) struct H1 {
    pub(super) status: Option<u16>,
    pub(super) body: Vec<u8>,
    pub(super) raw_bytes: usize,
    pub(super) end: End,
    pub(super) detail: Option<String>,
    pub(super) took: Duration,
    /// After a 101: the bytes that came with the head.
    pub(super) rest: Vec<u8>,
}

impl H1 {
    pub(super) fn failed(what: String, took: Duration) -> H1 {
        H1 {
            status: None,
            body: Vec::new(),
            raw_bytes: 0,
            end: End::Failed,
            detail: Some(what),
            took,
            rest: Vec::new(),
        }
    }
}

pub(super) fn parse_status_head(head: &[u8]) -> (Option<u16>, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok());
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    (status, headers)
}

/// A complete chunked body at the start of `data`, or `None` while incomplete or malformed.
pub(super) fn decode_chunked(data: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut pos = 0;
    // Every turn consumes a size line: bounded by `data.len()`.
    loop {
        let line_end = pos + find(&data[pos..], b"\r\n")?;
        let line = std::str::from_utf8(&data[pos..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            loop {
                let end = pos + find(&data[pos..], b"\r\n")?;
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return Some(body);
                }
            }
        }
        if data.len() < pos + size + 2 {
            return None;
        }
        body.extend_from_slice(&data[pos..pos + size]);
        pos += size + 2;
    }
}

/// Reads one response for at most `bound`: framed by chunked, `Content-Length` or EOF; a 101
/// (or, with `connect`, a 2xx) ends it at the head. Informational 1xx heads are skipped.
pub(super) async fn read_h1<S: AsyncRead + Unpin>(s: &mut S, bound: Duration, connect: bool) -> H1 {
    let started = Instant::now();
    let deadline = started + bound;
    let mut got: Vec<u8> = Vec::new();
    let mut raw = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let finish = |got: &[u8], raw: usize, end: End, detail: Option<String>| {
        let (status, body, end) = match head_end(got) {
            Some(h) => {
                let (status, headers) = parse_status_head(&got[..h]);
                let rest = &got[h..];
                let chunked = headers.iter().any(|(k, v)| {
                    k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked")
                });
                let delimited = !chunked && !headers.iter().any(|(k, _)| k == "content-length");
                let body = if chunked {
                    decode_chunked(rest).unwrap_or_else(|| rest.to_vec())
                } else {
                    rest.to_vec()
                };
                // A close-delimited body ends with the close.
                let end = if end == End::Closed && delimited {
                    End::Complete
                } else {
                    end
                };
                (status, body, end)
            }
            None => (None, Vec::new(), end),
        };
        H1 {
            status,
            body,
            raw_bytes: raw,
            end,
            detail,
            took: started.elapsed(),
            rest: Vec::new(),
        }
    };
    // A turn per read; bounded by the deadline.
    loop {
        if let Some(h) = head_end(&got) {
            let (status, headers) = parse_status_head(&got[..h]);
            let tunnel =
                status == Some(101) || (connect && status.is_some_and(|s| (200..300).contains(&s)));
            if tunnel {
                let mut r = finish(&got[..h], raw, End::Switched, None);
                r.rest = got[h..].to_vec();
                r.body.clear();
                return r;
            }
            if status.is_some_and(|s| (100..200).contains(&s)) {
                got.drain(..h);
                continue;
            }
            let rest = &got[h..];
            let chunked = headers.iter().any(|(k, v)| {
                k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked")
            });
            let length = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse::<usize>().ok());
            let complete = if chunked {
                decode_chunked(rest).is_some()
            } else {
                length.is_some_and(|len| rest.len() >= len)
            };
            if complete {
                if let (false, Some(len)) = (chunked, length) {
                    got.truncate(h + len);
                }
                return finish(&got, raw, End::Complete, None);
            }
        }
        match timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return finish(&got, raw, End::Timeout, None),
            Ok(Ok(0)) => return finish(&got, raw, End::Closed, None),
            Ok(Ok(n)) => {
                raw += n;
                if got.len() < MAX_KEPT {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            Ok(Err(e)) => return finish(&got, raw, io_end(&e), Some(e.kind().to_string())),
        }
    }
}

pub(super) async fn connect_tcp(addr: SocketAddr, bound: Duration) -> Result<TcpStream, String> {
    match timeout(bound, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect: timeout".to_string()),
    }
}

/// Sends `request` on a fresh connection while reading the answer (no FIN from our side).
pub(super) async fn h1_exchange(
    addr: SocketAddr,
    request: &[u8],
    bound: Duration,
    connect: bool,
) -> H1 {
    let started = Instant::now();
    let mut stream = match connect_tcp(addr, bound).await {
        Ok(s) => s,
        Err(e) => return H1::failed(e, started.elapsed()),
    };
    let (mut rd, mut wr) = stream.split();
    let write = async {
        let _ = wr.write_all(request).await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        r = read_h1(&mut rd, bound, connect) => r,
        () = write => unreachable!("the write future never completes"),
    }
}

pub(super) fn get(target: &str, host: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}
