//! A recording upstream for header tests: a hyper HTTP/1.1 server that keeps every request head
//! it receives and answers 200 with configurable extra response headers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: SocketAddr,
}

impl RecordedRequest {
    /// All values of a header joined with ", " ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A running recording upstream; stops when dropped.
pub struct RecordingBackend {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    task: JoinHandle<()>,
}

impl RecordingBackend {
    /// Starts on 127.0.0.1:0; every response carries `X-Backend: name` plus `extra_headers`.
    pub async fn start(name: &str, extra_headers: &[(&str, &str)]) -> RecordingBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recording backend");
        let addr = listener.local_addr().expect("local addr");
        let requests: Arc<Mutex<Vec<RecordedRequest>>> = Arc::default();
        let name: Arc<str> = name.into();
        let extra: Arc<Vec<(String, String)>> = Arc::new(
            extra_headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let log = requests.clone();
        let task = tokio::spawn(async move {
            // Bounded by the test: the task is aborted when the backend is dropped.
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    // E.g. EMFILE: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                };
                let log = log.clone();
                let name = name.clone();
                let extra = extra.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        let name = name.clone();
                        let extra = extra.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            log.lock().unwrap().push(RecordedRequest {
                                method: parts.method,
                                uri: parts.uri,
                                version: parts.version,
                                headers: parts.headers,
                                body,
                                peer,
                            });
                            let mut builder = http::Response::builder()
                                .status(200)
                                .header("x-backend", name.as_ref())
                                .header("content-type", "text/plain");
                            for (k, v) in extra.iter() {
                                builder = builder.header(k.as_str(), v.as_str());
                            }
                            let resp = builder
                                .body(Full::new(Bytes::from(format!("hello from {name}\n"))))
                                .expect("response");
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        RecordingBackend {
            addr,
            requests,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// The paths of the requests received so far, in order.
    pub fn paths(&self) -> Vec<String> {
        let requests = self.requests.lock().unwrap();
        requests.iter().map(|r| r.uri.path().to_string()).collect()
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
