//! The HTTP/2 side of `kaproxy-bench slow`: streams whose body stalls, over TLS.

use super::*;

/// A request body that yields `first` at once, then (optionally) one byte per `trickle`, and
/// otherwise never ends: the stream stays open, its announced length never reached.
pub(super) struct StallBody {
    pub(super) first: Option<Bytes>,
    pub(super) trickle: Option<tokio::time::Interval>,
    /// Bytes left before the announced length.
    pub(super) left: u64,
    pub(super) announced: u64,
    pub(super) stats: Arc<H2Attack>,
}

impl Body for StallBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(first) = self.first.take() {
            let n = first.len() as u64;
            self.left -= n;
            self.stats.streams.bytes.fetch_add(n, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if self.left > 1 {
            if let Some(tick) = self.trickle.as_mut() {
                if tick.poll_tick(cx).is_ready() {
                    self.left -= 1;
                    self.stats.streams.bytes.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"s")))));
                }
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.announced)
    }
}

/// One HTTP/2 connection with `--h2-streams` stalled streams, each opened again when it is
/// answered or reset; returns when the connection ends.
pub(super) async fn h2_connection(
    cfg: &Arc<SlowArgs>,
    target: &Target,
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    stats: &Arc<H2Attack>,
) {
    let handshake = async {
        let tcp = connect(addr, None).await?;
        let name = rustls::pki_types::ServerName::try_from(target.host.clone())?;
        let stream = tls.connect(name, tcp).await?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err::<_, crate::conn::BoxError>("the server did not negotiate h2".into());
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake::<_, StallBody>(TokioIo::new(stream))
            .await?;
        Ok((sender, conn))
    };
    let (sender, conn) = match timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok(pair)) => pair,
        _ => {
            stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    stats.connections_opened.fetch_add(1, Ordering::Relaxed);
    let mut streams = JoinSet::new();
    for _ in 0..cfg.h2_streams {
        let (mut sender, cfg, stats, uri) =
            (sender.clone(), cfg.clone(), stats.clone(), target.url());
        streams.spawn(async move {
            loop {
                if sender.ready().await.is_err() {
                    return;
                }
                let body = StallBody {
                    first: Some(Bytes::from(vec![b's'; cfg.h2_bytes as usize])),
                    trickle: (!cfg.h2_trickle.is_zero()).then(|| {
                        let mut t = tokio::time::interval_at(
                            Instant::now() + cfg.h2_trickle,
                            cfg.h2_trickle,
                        );
                        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        t
                    }),
                    left: cfg.h2_content_length,
                    announced: cfg.h2_content_length,
                    stats: stats.clone(),
                };
                let request = Request::builder()
                    .method(Method::POST)
                    .uri(&uri)
                    .header(http::header::CONTENT_LENGTH, cfg.h2_content_length)
                    .header(http::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body)
                    .expect("a valid request");
                stats.streams.opened.fetch_add(1, Ordering::Relaxed);
                match sender.send_request(request).await {
                    Ok(response) => stats.streams.answered(response.status().as_u16()),
                    Err(e) => {
                        let closed = sender.is_closed();
                        if e.is_canceled() || closed {
                            // The connection went away under the stream.
                            stats.streams.eof.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.streams.reset.fetch_add(1, Ordering::Relaxed);
                        }
                        if closed {
                            return;
                        }
                    }
                }
                sleep(cfg.reconnect_delay).await;
            }
        });
    }
    let _ = conn.await;
    stats.connections_closed.fetch_add(1, Ordering::Relaxed);
    streams.abort_all();
    while streams.join_next().await.is_some() {}
}
