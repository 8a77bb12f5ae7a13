//! The two recording HTTP/1.1 backends `kaproxy-bench probe` runs itself (`adm` and `web`):
//! what each request that reached them looked like, and how the routes should have sent it.

use super::*;

/// One request as a backend read it, and the tunnel that followed, if any.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub(super) backend: &'static str,
    pub(super) method: String,
    pub(super) target: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body_len: usize,
    pub(super) switched_at: Option<Instant>,
    pub(super) tunnel: Vec<u8>,
    pub(super) tunnel_total: usize,
    pub(super) tunnel_last_byte: Option<Instant>,
    pub(super) tunnel_closed: Option<Instant>,
}

pub(super) type Log = Arc<Mutex<Vec<Record>>>;

pub(super) fn update(log: &Log, index: usize, f: impl FnOnce(&mut Record)) {
    if let Some(r) = log.lock().unwrap().get_mut(index) {
        f(r);
    }
}

/// `adm` and `web`, one log in arrival order. Dropping it stops both and every connection.
pub(super) struct Backends {
    pub(super) log: Log,
    pub(super) _tasks: JoinSet<()>,
}

impl Backends {
    pub(super) async fn start(adm: SocketAddr, web: SocketAddr) -> anyhow::Result<Backends> {
        let log: Log = Arc::default();
        let mut tasks = JoinSet::new();
        for (name, addr) in [("adm", adm), ("web", web)] {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the backend {name} on {addr}"))?;
            tasks.spawn(accept_loop(name, listener, log.clone()));
        }
        Ok(Backends { log, _tasks: tasks })
    }

    pub(super) fn mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// What reached a backend since `mark`, after [`SETTLE`].
    pub(super) async fn since(&self, mark: usize) -> Vec<Seen> {
        sleep(SETTLE).await;
        self.log.lock().unwrap()[mark..]
            .iter()
            .map(Seen::from)
            .collect()
    }
}

/// Accepts until aborted (with [`Backends`]); each connection on a task of the set.
pub(super) async fn accept_loop(name: &'static str, listener: TcpListener, log: Log) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(backend_conn(name, stream, log.clone()));
                }
                // E.g. EMFILE: back off instead of spinning.
                Err(_) => sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// A request head as a backend read it.
pub(super) struct ReqHead {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) version: String,
    pub(super) headers: Vec<(String, String)>,
}

impl ReqHead {
    pub(super) fn parse(raw: &[u8]) -> ReqHead {
        let text = String::from_utf8_lossy(raw);
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or_default();
        let mut parts = start.splitn(3, ' ');
        let method = parts.next().unwrap_or_default().to_string();
        let target = parts.next().unwrap_or_default().to_string();
        let version = parts.next().unwrap_or_default().to_string();
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect();
        ReqHead {
            method,
            target,
            version,
            headers,
        }
    }

    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub(super) fn chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }

    pub(super) fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.parse().ok()
    }

    pub(super) fn wants_close(&self) -> bool {
        self.has_token("connection", "close")
            || (self.version == "HTTP/1.0" && !self.has_token("connection", "keep-alive"))
    }
}

pub(super) fn find(buf: &[u8], what: &[u8]) -> Option<usize> {
    buf.windows(what.len()).position(|w| w == what)
}

pub(super) fn head_end(buf: &[u8]) -> Option<usize> {
    find(buf, b"\r\n\r\n").map(|i| i + 4)
}

/// Reads more bytes into `pending`; false on EOF, an error or [`BACKEND_IDLE`] of silence.
pub(super) async fn read_more(stream: &mut TcpStream, pending: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 16 * 1024];
    match timeout(BACKEND_IDLE, stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {
            pending.extend_from_slice(&buf[..n]);
            true
        }
        _ => false,
    }
}

/// One backend connection: a turn per request until the peer closes (or a tunnel took it).
pub(super) async fn backend_conn(name: &'static str, mut stream: TcpStream, log: Log) {
    let _ = stream.set_nodelay(true);
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = head_end(&pending) {
                break end;
            }
            if pending.len() > MAX_BACKEND_HEAD || !read_more(&mut stream, &mut pending).await {
                return;
            }
        };
        let head = ReqHead::parse(&pending[..end]);
        pending.drain(..end);
        let index = {
            let mut l = log.lock().unwrap();
            l.push(Record {
                backend: name,
                method: head.method.clone(),
                target: head.target.clone(),
                headers: head.headers.clone(),
                body_len: 0,
                switched_at: None,
                tunnel: Vec::new(),
                tunnel_total: 0,
                tunnel_last_byte: None,
                tunnel_closed: None,
            });
            l.len() - 1
        };
        let upgrade = head.header("upgrade").is_some();
        let path = head.target.as_str();
        let switch = if path.starts_with("/_be/ws") && upgrade {
            Some("websocket")
        } else if path.starts_with("/_be/101") || (path.starts_with("/_be/upgrade") && upgrade) {
            Some("h2c")
        } else {
            None
        };
        if let Some(protocol) = switch {
            let mut resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n"
            );
            if protocol == "websocket" {
                resp.push_str(&format!("Sec-WebSocket-Accept: {WS_ACCEPT}\r\n"));
            }
            resp.push_str("\r\n");
            update(&log, index, |r| r.switched_at = Some(Instant::now()));
            if stream.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            tunnel(&mut stream, pending, &log, index, protocol == "websocket").await;
            return;
        }
        if !read_body(&mut stream, &mut pending, &head, &log, index).await {
            return;
        }
        let written = if path.starts_with("/_be/badchunk") {
            stream.write_all(&bad_chunk_response()).await
        } else {
            let body = format!("hello from {name}\n");
            let close = if head.wants_close() {
                "Connection: close\r\n"
            } else {
                ""
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nX-Backend: {name}\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\n{close}\r\n{body}",
                body.len()
            );
            stream.write_all(resp.as_bytes()).await
        };
        if written.is_err() {
            return;
        }
        if head.wants_close() {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Reads the request body (chunked or by `Content-Length`), counting it into the record as it
/// arrives; false when the connection ended first.
pub(super) async fn read_body(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    head: &ReqHead,
    log: &Log,
    index: usize,
) -> bool {
    if head.chunked() {
        // A turn per chunk; bounded by what the peer sends and BACKEND_IDLE.
        loop {
            let line = loop {
                if let Some(p) = find(pending, b"\r\n") {
                    break p;
                }
                if pending.len() > 64 * 1024 || !read_more(stream, pending).await {
                    return false;
                }
            };
            let text = String::from_utf8_lossy(&pending[..line]).into_owned();
            let Ok(size) = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
            else {
                return false;
            };
            pending.drain(..line + 2);
            if size == 0 {
                loop {
                    let p = loop {
                        if let Some(p) = find(pending, b"\r\n") {
                            break p;
                        }
                        if pending.len() > 64 * 1024 || !read_more(stream, pending).await {
                            return false;
                        }
                    };
                    pending.drain(..p + 2);
                    if p == 0 {
                        return true;
                    }
                }
            }
            while pending.len() < size + 2 {
                if !read_more(stream, pending).await {
                    return false;
                }
            }
            pending.drain(..size + 2);
            update(log, index, |r| r.body_len += size);
        }
    }
    let mut left = head.content_length().unwrap_or(0);
    loop {
        let take = left.min(pending.len());
        pending.drain(..take);
        left -= take;
        update(log, index, |r| r.body_len += take);
        if left == 0 {
            return true;
        }
        if !read_more(stream, pending).await {
            return false;
        }
    }
}

/// After a 101: records (and with `echo`, echoes) every byte until the peer closes.
pub(super) async fn tunnel(
    stream: &mut TcpStream,
    early: Vec<u8>,
    log: &Log,
    index: usize,
    echo: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut data = early;
    loop {
        if !data.is_empty() {
            let now = Instant::now();
            update(log, index, |r| {
                r.tunnel_total += data.len();
                let room = TUNNEL_KEPT.saturating_sub(r.tunnel.len());
                r.tunnel.extend_from_slice(&data[..data.len().min(room)]);
                r.tunnel_last_byte = Some(now);
            });
            if echo && stream.write_all(&data).await.is_err() {
                break;
            }
        }
        match timeout(BACKEND_IDLE, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => data = buf[..n].to_vec(),
            _ => break,
        }
    }
    update(log, index, |r| r.tunnel_closed = Some(Instant::now()));
}

/// What reached a backend, as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Seen {
    pub(super) backend: &'static str,
    pub(super) method: String,
    pub(super) target: String,
    /// Every `Host` value, in order.
    pub(super) host: Vec<String>,
    /// Header fields in the head.
    pub(super) fields: usize,
    /// Every `Cookie` line.
    pub(super) cookie: Vec<String>,
    pub(super) body_len: usize,
    pub(super) upgrade: Option<String>,
    pub(super) http2_settings: bool,
    /// The backend answered 101.
    pub(super) switched: bool,
    pub(super) tunnel_bytes: usize,
    pub(super) tunnel_http2_preface: bool,
    pub(super) tunnel_secret: bool,
    /// From the last byte through the tunnel (or the 101) to the proxy's close of the backend's
    /// side; none while it is open.
    pub(super) tunnel_closed_after_ms: Option<f64>,
}

impl From<&Record> for Seen {
    fn from(r: &Record) -> Seen {
        let all = |name: &str| -> Vec<String> {
            r.headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .collect()
        };
        let last = r.tunnel_last_byte.or(r.switched_at);
        Seen {
            backend: r.backend,
            method: r.method.clone(),
            target: r.target.clone(),
            host: all("host"),
            fields: r.headers.len(),
            cookie: all("cookie"),
            body_len: r.body_len,
            upgrade: all("upgrade").into_iter().next(),
            http2_settings: !all("http2-settings").is_empty(),
            switched: r.switched_at.is_some(),
            tunnel_bytes: r.tunnel_total,
            tunnel_http2_preface: r.tunnel.starts_with(PREFACE),
            tunnel_secret: find(&r.tunnel, SECRET.as_bytes()).is_some(),
            tunnel_closed_after_ms: match (r.tunnel_closed, last) {
                (Some(c), Some(l)) => Some(c.saturating_duration_since(l).as_secs_f64() * 1e3),
                _ => None,
            },
        }
    }
}

/// How a request reached a backend, against the routes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Routing {
    /// The backend the routes give to what this backend reads (normalized path, host after any
    /// userinfo), forwarded in normal form.
    Normal,
    /// The right backend, but forwarded as sent: the backend normalizes it again.
    Unnormalized,
    /// Reached `backend`; the routes give what it reads to `expected`.
    Bypass {
        expected: &'static str,
        host: String,
        path: String,
    },
    /// A target that is neither origin form, absolute form nor `*`.
    OddTarget,
}

impl Seen {
    pub(super) fn routing(&self) -> Routing {
        let (host, path) = if self.target.starts_with('/') {
            (
                self.host.first().cloned().unwrap_or_default(),
                self.target.clone(),
            )
        } else if self.target == "*" {
            return Routing::Normal;
        } else if let Some(rest) = strip_prefix_ci(&self.target, "http://")
            .or_else(|| strip_prefix_ci(&self.target, "https://"))
        {
            match rest.find('/') {
                Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
                None => (rest.to_string(), "/".to_string()),
            }
        } else {
            return Routing::OddTarget;
        };
        let raw_path = path.split('?').next().unwrap_or("").to_string();
        let normal = normalize(&raw_path);
        let expected = route_for(&host, &normal);
        if expected != self.backend {
            Routing::Bypass {
                expected,
                host: lenient_host(&host),
                path: normal,
            }
        } else if raw_path != normal || !self.target.starts_with('/') {
            Routing::Unnormalized
        } else {
            Routing::Normal
        }
    }

    pub(super) fn short(&self) -> String {
        let mut s = format!(
            "{}: {} {}",
            self.backend,
            self.method,
            shorten(&self.target, 60)
        );
        match self.host.len() {
            0 => s.push_str(" (no Host)"),
            1 => s.push_str(&format!(" (Host {})", self.host[0])),
            n => s.push_str(&format!(" ({n} Host lines: {})", self.host.join(", "))),
        }
        if self.fields > 50 {
            s.push_str(&format!(", {} header fields", self.fields));
        }
        if !self.cookie.is_empty() {
            let lines: Vec<String> = self.cookie.iter().map(|c| format!("\"{c}\"")).collect();
            s.push_str(&format!(
                ", {} Cookie line{}: {}",
                self.cookie.len(),
                if self.cookie.len() == 1 { "" } else { "s" },
                lines.join(" + ")
            ));
        }
        if self.body_len > 0 {
            s.push_str(&format!(", body {} bytes", self.body_len));
        }
        if let Some(u) = &self.upgrade {
            s.push_str(&format!(
                ", Upgrade: {u}{}",
                if self.http2_settings {
                    " + HTTP2-Settings"
                } else {
                    ""
                }
            ));
        }
        if self.switched {
            s.push_str(", answered 101");
            if self.tunnel_bytes > 0 {
                let what = match (self.tunnel_http2_preface, self.tunnel_secret) {
                    (true, true) => " (the HTTP/2 preface and a HEADERS for /admin/secret)",
                    (true, false) => " (the HTTP/2 preface)",
                    (false, true) => " (a request for /admin/secret)",
                    (false, false) => "",
                };
                s.push_str(&format!(
                    ", read {} bytes through the tunnel{what}",
                    self.tunnel_bytes
                ));
            }
            match self.tunnel_closed_after_ms {
                Some(ms) => s.push_str(&format!(
                    ", its side closed {:.1} s after the last byte",
                    ms / 1e3
                )),
                None => s.push_str(", its side still open"),
            }
        }
        s
    }
}

pub(super) fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

pub(super) fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// A path as a lenient backend resolves it (Apache, a framework's router): percent-encoded
/// unreserved characters decoded, repeated slashes merged, dot segments removed.
pub(super) fn normalize(path: &str) -> String {
    let b = path.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut decoded: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let v = (h * 16 + l) as u8;
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    decoded.push(v);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(b[i]);
        i += 1;
    }
    let text = String::from_utf8_lossy(&decoded).into_owned();
    let last = text.rsplit('/').next().unwrap_or("");
    let trailing = text.ends_with('/') || last == "." || last == "..";
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = format!("/{}", out.join("/"));
    if trailing && !out.is_empty() {
        s.push('/');
    }
    s
}

/// A Host as a lenient parser reads it: the part after any userinfo, without the port,
/// lower-case, without a trailing dot.
pub(super) fn lenient_host(host: &str) -> String {
    let h = host.rsplit('@').next().unwrap_or("");
    let h = if h.starts_with('[') {
        h.split(']')
            .next()
            .map(|x| format!("{x}]"))
            .unwrap_or_default()
    } else {
        h.split(':').next().unwrap_or("").to_string()
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// The routes every proxy is configured with.
pub(super) fn route_for(host: &str, normal_path: &str) -> &'static str {
    if lenient_host(host) == "route.test" && normal_path.starts_with("/admin") {
        "adm"
    } else {
        "web"
    }
}
