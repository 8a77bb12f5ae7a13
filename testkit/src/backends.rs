//! Owns the launcher of real HTTP/1.1 backend servers other than Apache — nginx, Gunicorn
//! (gthread worker), Node's `http` module and Go's `net/http` — each started as its own
//! process on a free 127.0.0.1 port, with its config or code in its own temp dir and a short
//! idle keep-alive timeout, so that the keep-alive race can be run against servers that (all
//! but Node) send no `Keep-Alive: timeout=N` header the proxy could learn the timeout from.
//!
//! Every kind serves any path: `GET` answers `200` with `ok <name>\n`; `POST` and `PUT` read
//! the whole request body and answer `200` with `got <N> bytes\n`; every response has a
//! `Content-Length`. Connections are kept alive between requests (HTTP/1.1's default) and the
//! server itself closes (a FIN) one that stays idle longer than its timeout. Every kind but
//! nginx also answers `GET /__count` with how many POST and PUT requests it has served (see
//! [`RealBackend::post_count`]).

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::poll_until;

/// Debian's nginx binary (package `nginx`).
pub const NGINX_BIN: &str = "/usr/sbin/nginx";
/// Debian's Gunicorn launcher (package `gunicorn`, Python 3).
pub const GUNICORN_BIN: &str = "/usr/bin/gunicorn";
/// The env var that turns a missing backend from a skip into a failure (CI sets it).
pub const REQUIRE_BACKENDS_ENV: &str = "KAPROXY_REQUIRE_BACKENDS";
/// How long a backend may take, once spawned, to answer a `GET` (Go's compile comes before).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `go build` of the Go backend may take (a cold build cache compiles `net/http`).
pub const GO_BUILD_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a start is retried on a fresh port when the server exits at once (a free port is
/// picked and released before the server binds it, so another process may take it between).
pub const START_ATTEMPTS: usize = 3;

/// One kind of real backend server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// nginx (`/usr/sbin/nginx`), `keepalive_timeout <ms>ms;` with one parameter, so no
    /// `Keep-Alive` header. The request body is read off the socket and discarded, and the
    /// `got <N> bytes` answer reports the request's `Content-Length`; no `/__count`.
    Nginx,
    /// Gunicorn's gthread worker (`--workers 1 --threads 8`, the sync worker does no
    /// keep-alive) with a WSGI app, `--keep-alive` in whole seconds (rounded up, at least
    /// 1 s). No `Keep-Alive` header. Its worker checks idle connections once per turn of its
    /// event loop, which waits up to 1 s, so it closes between the timeout and about 1 s later.
    /// The timeout only starts after a response: a new connection is handed to one of the 8
    /// threads at once, which waits for its first request with no timeout at all.
    Gunicorn,
    /// Node's `http.createServer` (`node` on PATH), `server.keepAliveTimeout` in ms. The one
    /// kind that sends `Keep-Alive: timeout=N` (N the timeout in whole seconds, rounded down).
    /// Node (20.20 among others) closes an idle connection later than it advertises: it sets
    /// the socket's timeout to `keepAliveTimeout` plus a buffer (a fixed 1 s, configurable as
    /// `server.keepAliveTimeoutBuffer` in newer releases) to spare clients that reuse the
    /// connection just at the advertised timeout; [`RealBackend::closes_idle_after`] reports
    /// the timeout the running Node really applies.
    Node,
    /// Go's `net/http` (`go` on PATH, stdlib only, built with `GO111MODULE=off`),
    /// `http.Server{IdleTimeout}`. No `Keep-Alive` header.
    Go,
}

impl BackendKind {
    /// Every kind.
    pub const ALL: [BackendKind; 4] = [
        BackendKind::Nginx,
        BackendKind::Gunicorn,
        BackendKind::Node,
        BackendKind::Go,
    ];

    /// Its lower-case name, as in the `ok <name>\n` body of a `GET`.
    pub fn name(&self) -> &'static str {
        match self {
            BackendKind::Nginx => "nginx",
            BackendKind::Gunicorn => "gunicorn",
            BackendKind::Node => "node",
            BackendKind::Go => "go",
        }
    }

    /// Whether its responses carry a `Keep-Alive: timeout=N` header (only Node's do).
    pub fn sends_keep_alive_header(&self) -> bool {
        matches!(self, BackendKind::Node)
    }

    /// Whether [`RealBackend::post_count`] answers (every kind but nginx).
    pub fn counts_posts(&self) -> bool {
        !matches!(self, BackendKind::Nginx)
    }

    /// Whether what it needs is on this machine.
    pub fn installed(&self) -> bool {
        self.program().is_some()
    }

    /// The idle keep-alive timeout it really gets when asked for `idle`: nginx and Node take
    /// milliseconds (at least 1 ms), Gunicorn whole seconds (rounded up, at least 1 s), Go any
    /// duration (at least 1 ns: zero would mean "no idle timeout" to all of them).
    pub fn effective_idle(&self, idle: Duration) -> Duration {
        match self {
            BackendKind::Nginx | BackendKind::Node => {
                Duration::from_millis((idle.as_nanos().div_ceil(1_000_000) as u64).max(1))
            }
            BackendKind::Gunicorn => {
                Duration::from_secs((idle.as_nanos().div_ceil(1_000_000_000) as u64).max(1))
            }
            BackendKind::Go => idle.max(Duration::from_nanos(1)),
        }
    }

    /// The first line its program prints about its version ("(unknown version)" if none).
    pub fn version(&self) -> String {
        let Some(program) = self.program() else {
            return format!("{} (not installed)", self.name());
        };
        let arg = match self {
            BackendKind::Nginx => "-v",
            BackendKind::Go => "version",
            BackendKind::Gunicorn | BackendKind::Node => "--version",
        };
        Command::new(program)
            .arg(arg)
            .output()
            .ok()
            .and_then(|o| {
                // nginx prints its version to stderr.
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .map(|l| l.trim().to_string())
            })
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| format!("{} (unknown version)", self.name()))
    }

    /// What its program is: a Debian path for nginx and Gunicorn, PATH for `node` and `go`.
    fn program(&self) -> Option<PathBuf> {
        match self {
            BackendKind::Nginx => Some(PathBuf::from(NGINX_BIN)).filter(|p| p.is_file()),
            BackendKind::Gunicorn => Some(PathBuf::from(GUNICORN_BIN)).filter(|p| p.is_file()),
            BackendKind::Node => on_path("node"),
            BackendKind::Go => on_path("go"),
        }
    }

    /// How to install it (for skip and failure messages).
    fn install_hint(&self) -> &'static str {
        match self {
            BackendKind::Nginx => "apt-get install -y nginx",
            BackendKind::Gunicorn => "apt-get install -y gunicorn",
            BackendKind::Node => "apt-get install -y nodejs",
            BackendKind::Go => "apt-get install -y golang-go",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// True when `kind` is installed; when it is not, panics if `KAPROXY_REQUIRE_BACKENDS=1`,
/// else prints a loud skip notice and returns false (as `require_apache` does).
pub fn require_backend(kind: BackendKind) -> bool {
    if kind.installed() {
        return true;
    }
    if std::env::var(REQUIRE_BACKENDS_ENV).as_deref() == Ok("1") {
        panic!(
            "{REQUIRE_BACKENDS_ENV}=1 but {kind} is not installed: install it with `{}`",
            kind.install_hint()
        );
    }
    eprintln!(
        "SKIPPED: {kind} not installed (set {REQUIRE_BACKENDS_ENV}=1 to fail instead); \
         install it with `{}`",
        kind.install_hint()
    );
    false
}

/// A running backend server: its own process (in its own process group, as Gunicorn forks
/// a worker) on a loopback port, its files in a temp dir, killed on drop.
pub struct RealBackend {
    kind: BackendKind,
    idle: Duration,
    idle_close: Duration,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RealBackend {
    /// Starts `kind` on a free 127.0.0.1 port with idle keep-alive timeout `idle` (as
    /// [`BackendKind::effective_idle`] rounds it) and waits, polling, until it answers a `GET`
    /// with its `ok <name>` body (at most [`START_TIMEOUT`], after Go's build).
    pub async fn start(kind: BackendKind, idle: Duration) -> std::io::Result<RealBackend> {
        let Some(program) = kind.program() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{kind} not found: {}", kind.install_hint()),
            ));
        };
        let idle = kind.effective_idle(idle);
        let dir = tempfile::Builder::new()
            .prefix(&format!("kaproxy-{}-", kind.name()))
            .tempdir()?;
        // What runs: the program itself, or the Go server built from its source.
        let program = match kind {
            BackendKind::Go => build_go(&program, dir.path()).await?,
            _ => {
                write_files(kind, dir.path())?;
                program
            }
        };
        let mut backend = RealBackend {
            kind,
            idle,
            idle_close: idle,
            addr: free_port()?,
            dir,
            child: None,
        };
        let mut last_err = None;
        for attempt in 0..START_ATTEMPTS {
            if attempt > 0 {
                backend.addr = free_port()?;
            }
            match backend.spawn_and_wait(&program).await {
                Ok(()) => {
                    if kind == BackendKind::Node {
                        backend.idle_close = backend.node_idle_close().await?;
                    }
                    return Ok(backend);
                }
                Err((e, exited)) => {
                    last_err = Some(e);
                    if !exited {
                        break;
                    }
                }
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other(format!("{kind} did not start"))))
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Its idle keep-alive timeout as configured ([`BackendKind::effective_idle`]), and as
    /// Node advertises it in `Keep-Alive: timeout=N`.
    pub fn idle_timeout(&self) -> Duration {
        self.idle
    }

    /// How long after a response it closes a connection that stays idle: its
    /// [`idle_timeout`](Self::idle_timeout), but for Node, which applies its keep-alive buffer
    /// on top (the socket timeout the running Node set, as it reported it at start). That is
    /// at the earliest for Gunicorn, which closes up to about 1 s later (see
    /// [`BackendKind::Gunicorn`]); nginx, Node and Go close on a per-connection timer.
    pub fn closes_idle_after(&self) -> Duration {
        self.idle_close
    }

    /// How many POST and PUT requests it has served so far (each counted once its body was
    /// read), from `GET /__count` on a fresh connection; `None` for nginx, which has no count.
    ///
    /// # Panics
    /// When the server does not answer the count (with its log in the message).
    pub async fn post_count(&self) -> Option<u64> {
        if !self.kind.counts_posts() {
            return None;
        }
        let count = get_close(self.addr, "/__count")
            .await
            .and_then(|(status, body)| {
                if status != 200 {
                    return Err(std::io::Error::other(format!("status {status}")));
                }
                body.trim()
                    .parse()
                    .map_err(|e| std::io::Error::other(format!("body {body:?}: {e}")))
            });
        match count {
            Ok(n) => Some(n),
            Err(e) => panic!(
                "{} on {}: GET /__count failed: {e}; log:\n{}",
                self.kind,
                self.addr,
                self.log()
            ),
        }
    }

    /// Node's real idle socket timeout, from `GET /__idle_ms`.
    async fn node_idle_close(&self) -> std::io::Result<Duration> {
        let (status, body) = get_close(self.addr, "/__idle_ms").await?;
        match body.trim().parse() {
            Ok(ms) if status == 200 => Ok(Duration::from_millis(ms)),
            _ => Err(std::io::Error::other(format!(
                "node on {} did not report its idle socket timeout: {status} {body:?}; log:\n{}",
                self.addr,
                self.log()
            ))),
        }
    }

    /// What it printed (stdout and stderr, and nginx's error log), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(LOG_FILE)).unwrap_or_default()
    }

    /// Spawns the server on `self.addr` and waits until it answers; on failure, whether the
    /// process had exited (then another port may do).
    async fn spawn_and_wait(&mut self, program: &Path) -> Result<(), (std::io::Error, bool)> {
        let child = self.command(program).and_then(|mut c| c.spawn());
        let child = child.map_err(|e| (e, false))?;
        self.child = Some(child);
        let mut exited = None;
        let (addr, expected) = (self.addr, format!("ok {}\n", self.kind.name()));
        let child = &mut self.child;
        let answered = poll_until(START_TIMEOUT, async || {
            if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
                exited = Some(status);
                return true;
            }
            matches!(get_close(addr, "/").await, Ok((200, body)) if body == expected)
        })
        .await;
        if let Some(status) = exited {
            self.child = None;
            let e = std::io::Error::other(format!(
                "{} on {} exited with {status} on start; log:\n{}",
                self.kind,
                self.addr,
                self.log()
            ));
            return Err((e, true));
        }
        if !answered {
            self.kill();
            let e = std::io::Error::other(format!(
                "{} on {} did not answer GET / with {expected:?} within {START_TIMEOUT:?}; \
                 log:\n{}",
                self.kind,
                self.addr,
                self.log()
            ));
            return Err((e, false));
        }
        Ok(())
    }

    /// The command line of the server on `self.addr`, its output appended to the log.
    fn command(&self, program: &Path) -> std::io::Result<Command> {
        let dir = self.dir.path();
        let port = self.addr.port().to_string();
        let mut cmd = Command::new(program);
        match self.kind {
            BackendKind::Nginx => {
                let conf = nginx_conf(dir, self.addr, self.idle);
                std::fs::write(dir.join("nginx.conf"), conf)?;
                cmd.arg("-p")
                    .arg(dir)
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .arg("-e")
                    .arg("stderr")
                    .arg("-g")
                    .arg("daemon off;");
            }
            BackendKind::Gunicorn => {
                cmd.arg("--bind")
                    .arg(self.addr.to_string())
                    .args(["--worker-class", "gthread", "--threads", "8"])
                    .args(["--workers", "1", "--keep-alive"])
                    .arg(self.idle.as_secs().to_string())
                    .arg("--worker-tmp-dir")
                    .arg(dir)
                    .args(["--error-logfile", "-", "--timeout", "30"])
                    .args(["--graceful-timeout", "1", "app:app"])
                    .env_remove("GUNICORN_CMD_ARGS")
                    .env("PYTHONDONTWRITEBYTECODE", "1");
            }
            BackendKind::Node => {
                cmd.arg(dir.join("server.js"))
                    .arg(&port)
                    .arg(self.idle.as_millis().to_string());
            }
            BackendKind::Go => {
                cmd.arg(&port).arg(self.idle.as_nanos().to_string());
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG_FILE))?;
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        Ok(cmd)
    }

    /// Kills the server's process group (which this launcher created, led by the child) and
    /// the child itself, and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--"])
                .arg(format!("-{}", child.id()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RealBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for RealBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealBackend")
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .field("idle", &self.idle)
            .field("idle_close", &self.idle_close)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// The file in the temp dir that gets the server's stdout and stderr.
const LOG_FILE: &str = "server.log";

/// nginx: one server, `return` for every request (which reads and discards the body), every
/// path it writes under `dir`.
fn nginx_conf(dir: &Path, addr: SocketAddr, idle: Duration) -> String {
    let d = dir.display();
    format!(
        r#"master_process off;
worker_processes 1;
pid "{d}/nginx.pid";
error_log stderr warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path "{d}/client_body";
    proxy_temp_path "{d}/proxy";
    fastcgi_temp_path "{d}/fastcgi";
    uwsgi_temp_path "{d}/uwsgi";
    scgi_temp_path "{d}/scgi";
    default_type text/plain;
    keepalive_timeout {ms}ms;
    keepalive_requests 10000;
    server {{
        listen {addr};
        location / {{
            if ($request_method ~ ^(POST|PUT)$) {{
                return 200 "got $content_length bytes\n";
            }}
            return 200 "ok nginx\n";
        }}
    }}
}}
"#,
        ms = idle.as_millis(),
    )
}

/// Gunicorn's WSGI app (one worker process, so a module-level count is the server's).
const GUNICORN_APP: &str = r#"import threading

_lock = threading.Lock()
_posts = 0


def app(environ, start_response):
    global _posts
    method = environ["REQUEST_METHOD"]
    if method in ("POST", "PUT"):
        n = len(environ["wsgi.input"].read())
        with _lock:
            _posts += 1
        body = "got %d bytes\n" % n
    elif environ.get("PATH_INFO") == "/__count":
        with _lock:
            body = "%d\n" % _posts
    else:
        body = "ok gunicorn\n"
    data = body.encode()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))],
    )
    return [data]
"#;

/// Node's server: `node server.js PORT KEEP_ALIVE_MS`. Once listening it sends itself one
/// keep-alive `GET` and records the socket timeout Node then set on that connection (its real
/// idle close), served as `GET /__idle_ms`; until then every request gets a `503`.
const NODE_SERVER: &str = r#"'use strict';
const http = require('http');
const [port, ms] = process.argv.slice(2).map(Number);
let posts = 0;
let ready = false;
let idleCloseMs = null;
const server = http.createServer((req, res) => {
  // Node's own 'finish' listener, which arms the keep-alive timeout, was added before this one.
  res.on('finish', () => {
    if (res.shouldKeepAlive && req.socket.timeout !== undefined) {
      idleCloseMs = req.socket.timeout;
    }
  });
  let n = 0;
  req.on('data', (chunk) => { n += chunk.length; });
  req.on('end', () => {
    const path = req.url.split('?')[0];
    let status = 200;
    let body;
    if (path === '/__self') {
      body = 'self\n';
    } else if (!ready) {
      status = 503;
      body = 'starting\n';
    } else if (req.method === 'POST' || req.method === 'PUT') {
      posts += 1;
      body = `got ${n} bytes\n`;
    } else if (path === '/__count') {
      body = `${posts}\n`;
    } else if (path === '/__idle_ms') {
      body = `${idleCloseMs}\n`;
    } else {
      body = 'ok node\n';
    }
    res.writeHead(status, {
      'Content-Type': 'text/plain',
      'Content-Length': Buffer.byteLength(body),
    });
    res.end(body);
  });
});
server.keepAliveTimeout = ms;
server.on('error', (e) => { console.error(e); process.exit(1); });
server.listen(port, '127.0.0.1', () => {
  const agent = new http.Agent({ keepAlive: true });
  http.get({ host: '127.0.0.1', port, path: '/__self', agent }, (res) => {
    res.resume();
    res.on('end', () => {
      // Node arms the timeout in the same tick as it finishes the response.
      setImmediate(() => {
        agent.destroy();
        ready = true;
        console.error(`node ${process.version} on 127.0.0.1:${port}, keepAliveTimeout ${ms} ms, ` +
          `idle keep-alive socket timeout ${idleCloseMs} ms`);
      });
    });
  }).on('error', (e) => { console.error(e); process.exit(1); });
});
"#;

/// Go's server: `server PORT IDLE_NANOS`.
const GO_SERVER: &str = r#"package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"
)

var posts int64

func handle(w http.ResponseWriter, r *http.Request) {
	var body string
	switch {
	case r.Method == "POST" || r.Method == "PUT":
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		atomic.AddInt64(&posts, 1)
		body = fmt.Sprintf("got %d bytes\n", n)
	case r.URL.Path == "/__count":
		body = fmt.Sprintf("%d\n", atomic.LoadInt64(&posts))
	default:
		body = "ok go\n"
	}
	w.Header().Set("Content-Type", "text/plain")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	io.WriteString(w, body)
}

func main() {
	idle, err := strconv.ParseInt(os.Args[2], 10, 64)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	srv := &http.Server{
		Addr:              "127.0.0.1:" + os.Args[1],
		Handler:           http.HandlerFunc(handle),
		IdleTimeout:       time.Duration(idle),
		ReadHeaderTimeout: 30 * time.Second,
	}
	fmt.Fprintf(os.Stderr, "%s on %s, IdleTimeout %v\n", runtime.Version(), srv.Addr, srv.IdleTimeout)
	fmt.Fprintln(os.Stderr, srv.ListenAndServe())
	os.Exit(1)
}
"#;

/// Writes the code a kind runs from its temp dir (nginx's config is written per port).
fn write_files(kind: BackendKind, dir: &Path) -> std::io::Result<()> {
    match kind {
        BackendKind::Nginx => Ok(()),
        BackendKind::Gunicorn => std::fs::write(dir.join("app.py"), GUNICORN_APP),
        BackendKind::Node => std::fs::write(dir.join("server.js"), NODE_SERVER),
        BackendKind::Go => std::fs::write(dir.join("main.go"), GO_SERVER),
    }
}

/// Writes main.go to `dir` and builds it there (`GO111MODULE=off`, stdlib only), with a build
/// cache that outlives the temp dir; returns the binary.
async fn build_go(go: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    write_files(BackendKind::Go, dir)?;
    let cache = std::env::temp_dir().join("kaproxy-testkit-go-cache");
    std::fs::create_dir_all(&cache)?;
    let bin = dir.join("server");
    let build = tokio::process::Command::new(go)
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg("main.go")
        .current_dir(dir)
        .env("GO111MODULE", "off")
        .env("GOCACHE", cache.join("build"))
        .env("GOPATH", cache.join("gopath"))
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(GO_BUILD_TIMEOUT, build)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("go build did not finish within {GO_BUILD_TIMEOUT:?}"),
            )
        })??;
    // Kept for log(): the build's own output, if any.
    std::fs::write(
        dir.join(LOG_FILE),
        [&out.stdout[..], &out.stderr[..]].concat(),
    )?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "go build failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(bin)
}

/// One `GET path` with `Connection: close` on a fresh connection, at most 2 s; returns the
/// status and the body.
async fn get_close(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2 s"))??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no response head in {text:?}")))?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_string()))
}

/// `name` in a directory of PATH, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A loopback port that was free a moment ago.
fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timeouts_are_rounded_the_way_each_server_takes_them() {
        let ms = Duration::from_millis;
        assert_eq!(BackendKind::Gunicorn.effective_idle(ms(1)), ms(1000));
        assert_eq!(BackendKind::Gunicorn.effective_idle(ms(1001)), ms(2000));
        assert_eq!(BackendKind::Gunicorn.effective_idle(ms(0)), ms(1000));
        assert_eq!(BackendKind::Nginx.effective_idle(ms(1500)), ms(1500));
        assert_eq!(
            BackendKind::Node.effective_idle(Duration::from_micros(1)),
            ms(1)
        );
        assert_eq!(BackendKind::Go.effective_idle(ms(250)), ms(250));
        let conf = nginx_conf(Path::new("/t"), "127.0.0.1:9".parse().unwrap(), ms(1000));
        assert!(conf.contains("keepalive_timeout 1000ms;\n"), "{conf}");
        assert!(conf.contains("listen 127.0.0.1:9;") && conf.contains("access_log off;"));
    }
}
