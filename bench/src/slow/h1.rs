//! The HTTP/1.1 side of `kaproxy-bench slow`: slow uploaders and readers over bare sockets,
//! and the legitimate clients served beside them.

use super::*;

pub(super) async fn connect(addr: SocketAddr, rcvbuf: Option<usize>) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(n) = rcvbuf {
        // Before connect, so that the window advertised in the SYN is small already.
        socket.set_recv_buffer_size(n as u32)?;
    }
    let stream = match timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A parsed response head.
pub(super) struct Head {
    pub(super) status: u16,
    pub(super) content_length: Option<u64>,
    /// Body bytes read with the head.
    pub(super) body_start: usize,
}

/// Parses a response head out of `buf` once it holds one.
pub(super) fn parse_head(buf: &[u8]) -> Option<Result<Head, ()>> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let Some(status) = status else {
        return Some(Err(()));
    };
    let content_length = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    });
    Some(Ok(Head {
        status,
        content_length,
        body_start: end + 4,
    }))
}

pub(super) fn is_reset(e: &std::io::Error) -> bool {
    !matches!(e.kind(), std::io::ErrorKind::UnexpectedEof)
}

/// Reads until a response head arrives (or the connection ends).
pub(super) async fn read_head(
    r: &mut (impl AsyncReadExt + Unpin),
    buf: &mut Vec<u8>,
) -> Result<Head, End> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head) = parse_head(buf) {
            return head.map_err(|()| End::Reset);
        }
        if buf.len() > MAX_HEAD {
            return Err(End::Reset);
        }
        match r.read(&mut chunk).await {
            Ok(0) => return Err(End::Eof),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_reset(&e) => return Err(End::Reset),
            Err(_) => return Err(End::Eof),
        }
    }
}

/// One slow upload: the head and the burst, then a byte per interval, while the read side
/// watches for the proxy's answer or close.
pub(super) async fn uploader(cfg: &SlowArgs, target: &Target, addr: SocketAddr, stats: &Attack) {
    let stream = match connect(addr, None).await {
        Ok(s) => s,
        Err(_) => {
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    stats.opened.fetch_add(1, Ordering::Relaxed);
    let (mut r, mut w) = stream.into_split();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\n\r\n",
        cfg.upload_path, target.authority, cfg.upload_length
    );
    let writer = async {
        w.write_all(head.as_bytes()).await?;
        let burst = vec![b'u'; cfg.upload_burst as usize];
        w.write_all(&burst).await?;
        stats.bytes.fetch_add(cfg.upload_burst, Ordering::Relaxed);
        let mut sent = cfg.upload_burst;
        while sent < cfg.upload_length {
            sleep(cfg.upload_interval).await;
            w.write_all(b"u").await?;
            sent += 1;
            stats.bytes.fetch_add(1, Ordering::Relaxed);
        }
        // Sent whole: now only the answer matters.
        std::future::pending::<()>().await;
        Ok::<(), std::io::Error>(())
    };
    let mut buf = Vec::new();
    let end = tokio::select! {
        head = read_head(&mut r, &mut buf) => match head {
            Ok(h) if (200..300).contains(&h.status) => End::Completed,
            Ok(h) => End::Answered(h.status),
            Err(end) => end,
        },
        Err(_) = writer => {
            // The proxy stopped reading and closed; it may have answered first.
            match timeout(Duration::from_secs(1), read_head(&mut r, &mut buf)).await {
                Ok(Ok(h)) => End::Answered(h.status),
                Ok(Err(end)) => end,
                Err(_) => End::Reset,
            }
        }
    };
    end.record(stats);
}

/// One slow download: `--read-bytes` per `--read-interval` through a small receive buffer.
pub(super) async fn reader(cfg: &SlowArgs, target: &Target, addr: SocketAddr, stats: &Attack) {
    let mut stream = match connect(addr, Some(cfg.read_rcvbuf)).await {
        Ok(s) => s,
        Err(_) => {
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    stats.opened.fetch_add(1, Ordering::Relaxed);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        cfg.read_path, target.authority
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        End::Reset.record(stats);
        return;
    }
    let mut tick = tokio::time::interval(cfg.read_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf = vec![0u8; cfg.read_bytes.max(1)];
    let mut head_buf = Vec::new();
    let mut head: Option<Head> = None;
    let mut body = 0u64;
    // The proxy's side of this connection, as /proc/net/tcp lists it.
    let sides = stream
        .local_addr()
        .and_then(|l| Ok((l, stream.peer_addr()?)));
    let end = 'conn: loop {
        tick.tick().await;
        // A proxy that gives up on a slow reader closes its socket with megabytes still queued
        // for it on loopback: its FIN would reach the reader only after minutes of reading.
        if let Ok((local, peer)) = sides {
            if proxy_side_closed(local, peer) {
                break 'conn End::FinQueued;
            }
        }
        let mut budget = cfg.read_bytes.max(1);
        while budget > 0 {
            let n = match stream.read(&mut buf[..budget]).await {
                Ok(0) => break 'conn End::Eof,
                Ok(n) => n,
                Err(e) if is_reset(&e) => break 'conn End::Reset,
                Err(_) => break 'conn End::Eof,
            };
            budget -= n;
            match &head {
                Some(_) => body += n as u64,
                None => {
                    head_buf.extend_from_slice(&buf[..n]);
                    match parse_head(&head_buf) {
                        None if head_buf.len() > MAX_HEAD => break 'conn End::Reset,
                        None => {}
                        Some(Err(())) => break 'conn End::Reset,
                        Some(Ok(h)) if !(200..300).contains(&h.status) => {
                            break 'conn End::Answered(h.status)
                        }
                        Some(Ok(h)) => {
                            body = (head_buf.len() - h.body_start) as u64;
                            head = Some(h);
                        }
                    }
                }
            }
            stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(h) = &head {
                if h.content_length.is_some_and(|len| body >= len) {
                    break 'conn End::Completed;
                }
            }
        }
    };
    end.record(stats);
}

/// Whether the socket at `peer` connected to `local` (the proxy's end of one of our
/// connections) is past ESTABLISHED and has sent or queued its FIN, per /proc/net/tcp(6):
/// FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE or CLOSING. Absent or unreadable: false (a reset
/// shows on our socket anyway).
pub(super) fn proxy_side_closed(local: SocketAddr, peer: SocketAddr) -> bool {
    let file = match peer {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    let Ok(table) = std::fs::read_to_string(file) else {
        return false;
    };
    let (want_local, want_remote) = (proc_net_addr(peer), proc_net_addr(local));
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace().skip(1);
        let (Some(l), Some(r), Some(state)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        l == want_local && r == want_remote && matches!(state, "04" | "05" | "06" | "07" | "0B")
    })
}

/// An address as /proc/net/tcp(6) writes it: the address words in host byte order, in hex,
/// a colon, the port in hex.
pub(super) fn proc_net_addr(addr: SocketAddr) -> String {
    let ip = match addr {
        SocketAddr::V4(a) => format!("{:08X}", u32::from_ne_bytes(a.ip().octets())),
        SocketAddr::V6(a) => a
            .ip()
            .octets()
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect(),
    };
    format!("{ip}:{:04X}", addr.port())
}

/// Outcome of one legitimate GET.
#[derive(Debug, Clone, Copy)]
pub(super) enum LegitOutcome {
    Status(u16, Duration),
    Error,
    Unanswered,
}

pub(super) async fn legit_get(cfg: &SlowArgs, target: &Target, addr: SocketAddr) -> LegitOutcome {
    let started = Instant::now();
    let exchange = async {
        let mut s = connect(addr, None).await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            cfg.legit_path, target.authority
        );
        s.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        let head = read_head(&mut s, &mut buf)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        let mut body = (buf.len() - head.body_start) as u64;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if head.content_length.is_some_and(|len| body >= len) {
                break;
            }
            match s.read(&mut chunk).await? {
                0 if head.content_length.is_none() => break,
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => body += n as u64,
            }
        }
        Ok::<u16, std::io::Error>(head.status)
    };
    match timeout(cfg.legit_timeout, exchange).await {
        Ok(Ok(status)) => LegitOutcome::Status(status, started.elapsed()),
        Ok(Err(_)) => LegitOutcome::Error,
        Err(_) => LegitOutcome::Unanswered,
    }
}

pub(super) fn legit_report(a: &SlowArgs, results: &[(u64, LegitOutcome)]) -> LegitReport {
    let mut r = LegitReport {
        sent: results.len() as u64,
        within_deadline: 0,
        deadline_ms: a.deadline.as_millis() as u64,
        late: 0,
        non_2xx: BTreeMap::new(),
        errors: 0,
        unanswered: 0,
        timeout_ms: a.legit_timeout.as_millis() as u64,
        max_latency_ms: None,
        median_latency_ms: None,
        timeline: String::new(),
    };
    let mut latencies = Vec::new();
    for (_, outcome) in results {
        let c = match *outcome {
            LegitOutcome::Status(status, latency) => {
                latencies.push(latency.as_secs_f64() * 1e3);
                if !(200..300).contains(&status) {
                    *r.non_2xx.entry(status.to_string()).or_default() += 1;
                    'x'
                } else if latency <= a.deadline {
                    r.within_deadline += 1;
                    '.'
                } else {
                    r.late += 1;
                    'L'
                }
            }
            LegitOutcome::Error => {
                r.errors += 1;
                'x'
            }
            LegitOutcome::Unanswered => {
                r.unanswered += 1;
                'T'
            }
        };
        r.timeline.push(c);
    }
    latencies.sort_by(f64::total_cmp);
    r.max_latency_ms = latencies.last().copied();
    r.median_latency_ms = latencies.get(latencies.len() / 2).copied();
    r
}
