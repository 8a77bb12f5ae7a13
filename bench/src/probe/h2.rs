//! The raw HTTP/2-over-TLS client side of `kaproxy-bench probe`: frames written by hand,
//! header blocks as HPACK literals, of the answer only `:status` decoded.

use super::*;

pub(super) const DATA: u8 = 0x0;
pub(super) const HEADERS: u8 = 0x1;
pub(super) const RST_STREAM: u8 = 0x3;
pub(super) const SETTINGS: u8 = 0x4;
pub(super) const PING: u8 = 0x6;
pub(super) const GOAWAY: u8 = 0x7;
pub(super) const WINDOW_UPDATE: u8 = 0x8;
pub(super) const CONTINUATION: u8 = 0x9;
pub(super) const END_STREAM: u8 = 0x1;
pub(super) const ACK: u8 = 0x1;
pub(super) const END_HEADERS: u8 = 0x4;
pub(super) const PADDED: u8 = 0x8;
pub(super) const PRIORITY: u8 = 0x20;
pub(super) const MAX_FRAME: usize = 16 * 1024;

pub(super) type Tls = tokio_rustls::client::TlsStream<TcpStream>;

pub(super) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub(super) fn error_code(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => return format!("0x{code:x}"),
    };
    name.to_string()
}

pub(super) fn be32(b: &[u8]) -> u32 {
    b.get(..4)
        .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
        .unwrap_or(0)
}

/// An HPACK integer with an N-bit prefix: the value and the bytes it took.
pub(super) fn hpack_int(buf: &[u8], prefix: u8) -> Option<(u64, usize)> {
    let mask = ((1u16 << prefix) - 1) as u8;
    let mut v = u64::from(buf.first()? & mask);
    if v < u64::from(mask) {
        return Some((v, 1));
    }
    let mut shift = 0;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        v += u64::from(b & 0x7f) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            return Some((v, i));
        }
        if shift > 28 {
            return None;
        }
    }
}

pub(super) fn hpack_int_encode(out: &mut Vec<u8>, mut v: usize, prefix: u8, first: u8) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literals without indexing, new names, no Huffman: every field as sent.
pub(super) fn hpack_literal(fields: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int_encode(&mut out, name.len(), 7, 0x00);
        out.extend_from_slice(name.as_bytes());
        hpack_int_encode(&mut out, value.len(), 7, 0x00);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// Huffman-coded digits (RFC 7541 Appendix B: `0`-`2` are the 5-bit codes 0-2, `3`-`9` the
/// 6-bit codes 0x19-0x1f), then fewer than 8 bits of padding ones; `None` for anything else.
pub(super) fn huffman_digits(raw: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &b in raw {
        acc = (acc << 8) | u64::from(b);
        bits += 8;
        if bits > 40 {
            return None;
        }
        loop {
            if bits >= 5 {
                let c5 = (acc >> (bits - 5)) & 0x1f;
                if c5 <= 2 {
                    out.push(char::from(b'0' + c5 as u8));
                    bits -= 5;
                    acc &= (1u64 << bits) - 1;
                    continue;
                }
            }
            if bits >= 6 {
                let c6 = (acc >> (bits - 6)) & 0x3f;
                if (0x19..=0x1f).contains(&c6) {
                    out.push(char::from(b'3' + (c6 - 0x19) as u8));
                    bits -= 6;
                    acc &= (1u64 << bits) - 1;
                    continue;
                }
            }
            break;
        }
    }
    (bits < 8 && acc == (1u64 << bits) - 1).then_some(out)
}

/// `:status` of a response header block, when it is the first field (as servers send it).
pub(super) fn hpack_status(block: &[u8]) -> Option<u16> {
    let mut i = 0;
    // Dynamic table size updates may come first.
    while block.get(i).is_some_and(|b| b & 0xe0 == 0x20) {
        i += hpack_int(&block[i..], 5)?.1;
    }
    let b = *block.get(i)?;
    if b & 0x80 != 0 {
        let (index, _) = hpack_int(&block[i..], 7)?;
        return match index {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    let prefix = if b & 0x40 != 0 { 6 } else { 4 };
    let (name, n) = hpack_int(&block[i..], prefix)?;
    if !(8..=14).contains(&name) {
        return None;
    }
    i += n;
    let huffman = block.get(i)? & 0x80 != 0;
    let (len, n) = hpack_int(&block[i..], 7)?;
    i += n;
    let raw = block.get(i..i + len as usize)?;
    let text = if huffman {
        huffman_digits(raw)?
    } else {
        String::from_utf8(raw.to_vec()).ok()?
    };
    text.parse().ok()
}

/// A frame's payload without padding and priority fields.
pub(super) fn frame_payload(kind: u8, flags: u8, payload: &[u8]) -> &[u8] {
    let mut p = payload;
    if (kind == HEADERS || kind == DATA) && flags & PADDED != 0 {
        let pad = usize::from(*p.first().unwrap_or(&0));
        p = p.get(1..p.len().saturating_sub(pad)).unwrap_or(&[]);
    }
    if kind == HEADERS && flags & PRIORITY != 0 {
        p = p.get(5..).unwrap_or(&[]);
    }
    p
}

pub(super) struct Frame {
    pub(super) kind: u8,
    pub(super) flags: u8,
    pub(super) stream: u32,
    pub(super) payload: Vec<u8>,
}

/// A raw HTTP/2 connection.
pub(super) struct H2<S> {
    pub(super) io: S,
    pub(super) buf: Vec<u8>,
}

/// The answer on one stream.
pub(super) struct H2Resp {
    pub(super) status: Option<u16>,
    pub(super) end: End,
    pub(super) detail: Option<String>,
    pub(super) body_bytes: usize,
}

pub(super) fn tls_config(
    alpn: &[&[u8]],
    cipher_suites: Option<Vec<SupportedCipherSuite>>,
    version: Option<&'static SupportedProtocolVersion>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(s) = cipher_suites {
        provider.cipher_suites = s;
    }
    let provider = Arc::new(provider);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone());
    let builder = match version {
        Some(v) => builder.with_protocol_versions(&[v])?,
        None => builder.with_safe_default_protocol_versions()?,
    };
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate::new(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

pub(super) async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    bound: Duration,
) -> anyhow::Result<Tls> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await.context("connect")?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("localhost").context("server name")?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .context("TLS handshake")
    };
    timeout(bound, connect)
        .await
        .map_err(|_| anyhow::anyhow!("connect and TLS handshake: timeout"))?
}

impl H2<Tls> {
    /// TLS with ALPN h2 only, then the preface, SETTINGS (no push, 1 MiB stream windows) and
    /// a 1 MiB connection window.
    pub(super) async fn connect(addr: SocketAddr, bound: Duration) -> anyhow::Result<H2<Tls>> {
        let tls = tls_connect(addr, tls_config(&[&b"h2"[..]], None, None)?, bound).await?;
        if tls.get_ref().1.alpn_protocol() != Some(&b"h2"[..]) {
            bail!("the server did not select h2 (ALPN)");
        }
        let mut h2 = H2 {
            io: tls,
            buf: Vec::new(),
        };
        let mut start = PREFACE.to_vec();
        let mut settings = Vec::new();
        for (id, value) in [(0x2u16, 0u32), (0x4, 1 << 20)] {
            settings.extend_from_slice(&id.to_be_bytes());
            settings.extend_from_slice(&value.to_be_bytes());
        }
        start.extend(frame(SETTINGS, 0, 0, &settings));
        start.extend(frame(WINDOW_UPDATE, 0, 0, &(1u32 << 20).to_be_bytes()));
        h2.write(&start).await?;
        Ok(h2)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> H2<S> {
    pub(super) async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// HEADERS, then CONTINUATIONs for what does not fit a 16 KiB frame.
    pub(super) async fn send_headers(
        &mut self,
        stream: u32,
        block: &[u8],
        end_stream: bool,
    ) -> std::io::Result<()> {
        let chunks: Vec<&[u8]> = if block.is_empty() {
            vec![&[]]
        } else {
            block.chunks(MAX_FRAME).collect()
        };
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let mut flags = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            if i == 0 {
                if end_stream {
                    flags |= END_STREAM;
                }
                out.extend(frame(HEADERS, flags, stream, c));
            } else {
                out.extend(frame(CONTINUATION, flags, stream, c));
            }
        }
        self.write(&out).await
    }

    /// The next frame, or how the connection ended (cancel-safe: bytes stay in `buf`).
    pub(super) async fn read_frame(
        &mut self,
        deadline: Instant,
    ) -> Result<Frame, (End, Option<String>)> {
        let mut tmp = vec![0u8; 16 * 1024];
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: be32(&self.buf[5..9]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Ok(f);
                }
            }
            match timeout_at(deadline, self.io.read(&mut tmp)).await {
                Err(_) => return Err((End::Timeout, None)),
                Ok(Ok(0)) => return Err((End::Closed, None)),
                Ok(Ok(n)) => self.buf.extend_from_slice(&tmp[..n]),
                Ok(Err(e)) => return Err((io_end(&e), Some(e.kind().to_string()))),
            }
        }
    }

    /// Reads until `stream` is answered whole (with `connect`, a 2xx head: a tunnel), reset, or
    /// the connection ends; answers SETTINGS and PING, keeps the windows open.
    pub(super) async fn response(
        &mut self,
        stream: u32,
        deadline: Instant,
        connect: bool,
    ) -> H2Resp {
        let mut r = H2Resp {
            status: None,
            end: End::Timeout,
            detail: None,
            body_bytes: 0,
        };
        let mut goaway: Option<String> = None;
        let mut block: Vec<u8> = Vec::new();
        let mut block_ends_stream = false;
        let with_goaway = |d: Option<String>, g: &Option<String>| match (g, d) {
            (Some(g), Some(d)) => Some(format!("{g}, {d}")),
            (Some(g), None) => Some(g.clone()),
            (None, d) => d,
        };
        // A turn per frame; bounded by the deadline.
        loop {
            let f = match self.read_frame(deadline).await {
                Ok(f) => f,
                Err((end, d)) => {
                    r.end = end;
                    r.detail = with_goaway(d, &goaway);
                    return r;
                }
            };
            let mut headers_done = false;
            match f.kind {
                SETTINGS if f.flags & ACK == 0 => {
                    let _ = self.write(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                PING if f.flags & ACK == 0 => {
                    let _ = self.write(&frame(PING, ACK, 0, &f.payload)).await;
                }
                GOAWAY => {
                    let last = be32(&f.payload) & 0x7fff_ffff;
                    goaway = Some(format!(
                        "GOAWAY {}",
                        error_code(be32(f.payload.get(4..).unwrap_or(&[])))
                    ));
                    if last < stream {
                        r.end = End::Closed;
                        r.detail = goaway;
                        return r;
                    }
                }
                RST_STREAM if f.stream == stream => {
                    r.end = End::Reset;
                    r.detail = with_goaway(
                        Some(format!("RST_STREAM {}", error_code(be32(&f.payload)))),
                        &goaway,
                    );
                    return r;
                }
                HEADERS if f.stream == stream => {
                    block = frame_payload(f.kind, f.flags, &f.payload).to_vec();
                    block_ends_stream = f.flags & END_STREAM != 0;
                    headers_done = f.flags & END_HEADERS != 0;
                }
                CONTINUATION if f.stream == stream => {
                    block.extend_from_slice(&f.payload);
                    headers_done = f.flags & END_HEADERS != 0;
                }
                DATA if f.stream == stream => {
                    let data = frame_payload(f.kind, f.flags, &f.payload).len();
                    r.body_bytes += data;
                    if !f.payload.is_empty() {
                        let inc = (f.payload.len() as u32).to_be_bytes();
                        let mut w = frame(WINDOW_UPDATE, 0, 0, &inc);
                        w.extend(frame(WINDOW_UPDATE, 0, stream, &inc));
                        let _ = self.write(&w).await;
                    }
                    if f.flags & END_STREAM != 0 {
                        r.end = End::Complete;
                        r.detail = goaway;
                        return r;
                    }
                }
                _ => {}
            }
            if headers_done {
                match hpack_status(&block) {
                    Some(s) if (100..200).contains(&s) => {}
                    Some(s) => r.status = r.status.or(Some(s)),
                    None if r.status.is_none() => {
                        r.detail = Some("HEADERS, :status not decoded".to_string());
                    }
                    None => {}
                }
                if connect && r.status.is_some_and(|s| (200..300).contains(&s)) {
                    r.end = End::Switched;
                    r.detail = with_goaway(r.detail.take(), &goaway);
                    return r;
                }
                if block_ends_stream {
                    r.end = End::Complete;
                    r.detail = with_goaway(r.detail.take(), &goaway);
                    return r;
                }
            }
        }
    }
}

/// `:method`, `:scheme https`, `:authority`, `:path` (each only when given), then `extra`.
pub(super) fn h2_fields(
    method: &str,
    authority: &str,
    path: Option<&str>,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut f = vec![(":method".to_string(), method.to_string())];
    if let Some(p) = path {
        f.push((":scheme".to_string(), "https".to_string()));
        f.push((":authority".to_string(), authority.to_string()));
        f.push((":path".to_string(), p.to_string()));
    } else {
        f.push((":authority".to_string(), authority.to_string()));
    }
    f.extend_from_slice(extra);
    f
}
