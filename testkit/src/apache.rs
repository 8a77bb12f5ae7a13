//! Owns the one launcher of a real Apache httpd 2.4 (Debian's `/usr/sbin/apache2`) on loopback
//! ports, used by the integration tests and `kaproxy-bench race --apache`: the free ports, the
//! httpd.conf in a temporary ServerRoot, the process group it runs in, start, stop, hard restart,
//! and, when asked, TLS with mod_ssl (a certificate, a required client certificate, a session
//! cache so that sessions resume), the prefork MPM with a fixed number of workers (as with
//! mod_php), and large files of deterministic pseudo-random content to download and checksum.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::poll_until;

/// Debian's Apache binary.
pub const APACHE_BIN: &str = "/usr/sbin/apache2";
/// Debian's Apache module directory.
pub const APACHE_MODULES: &str = "/usr/lib/apache2/modules";
/// How long Apache may take to accept connections on every port after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a graceful stop may take before the process group is killed, and how long the
/// ports may keep accepting after it is gone.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a start is retried on fresh ports: a free port is picked and released before
/// Apache binds it, so another process may take it in between.
pub const START_ATTEMPTS: usize = 3;
/// Size of `/slow.txt`: two mod_ratelimit chunks at 1 KiB/s, so about 200 ms per response.
pub const SLOW_BODY_LEN: usize = 300;
/// The env var that turns a missing Apache from a skip into a failure (CI sets it).
pub const REQUIRE_APACHE_ENV: &str = "KAPROXY_REQUIRE_APACHE";
/// Apache's `Timeout` unless [`ApacheOptions::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// True when Apache's binary and module directory are there.
pub fn apache_installed() -> bool {
    Path::new(APACHE_BIN).is_file() && Path::new(APACHE_MODULES).is_dir()
}

/// True when Apache is installed; when it is not, panics if `KAPROXY_REQUIRE_APACHE=1`,
/// else prints a loud skip notice and returns false.
pub fn require_apache() -> bool {
    if apache_installed() {
        return true;
    }
    if std::env::var(REQUIRE_APACHE_ENV).as_deref() == Ok("1") {
        panic!(
            "{REQUIRE_APACHE_ENV}=1 but Apache is not installed ({APACHE_BIN} / {APACHE_MODULES} \
             missing): install it with `apt-get install -y apache2`"
        );
    }
    eprintln!(
        "SKIPPED: apache2 not installed (set {REQUIRE_APACHE_ENV}=1 to fail instead); \
         expected {APACHE_BIN}"
    );
    false
}

/// The first line of `apache2 -v`.
pub fn apache_version() -> String {
    Command::new(APACHE_BIN)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "apache2 (unknown version)".to_string())
}

/// What one Apache instance looks like.
#[derive(Debug, Clone)]
pub struct ApacheOptions {
    /// Sent back in every response as `X-Backend`, and in the body of `GET /`.
    pub name: String,
    /// Apache's `KeepAliveTimeout`; whole seconds are written as such, anything else in ms.
    pub keep_alive_timeout: Duration,
    /// Apache's `MaxKeepAliveRequests`.
    pub max_keep_alive_requests: u32,
    /// How many loopback ports it listens on (one `Listen` each).
    pub ports: usize,
    /// Apache's `ThreadsPerChild`; up to two children (`MaxRequestWorkers` is twice this).
    pub threads_per_child: u32,
    /// Serve TLS (mod_ssl) on every port with this PEM certificate chain and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With `tls`: require a client certificate signed by a CA of this PEM bundle
    /// (`SSLVerifyClient require`).
    pub client_ca: Option<PathBuf>,
    /// `Some(n)`: the prefork MPM with exactly `n` single-threaded children
    /// (`MaxRequestWorkers n`), as with mod_php; `threads_per_child` is then unused.
    /// `None` (the default): mpm_event with `threads_per_child`.
    pub prefork_workers: Option<u32>,
    /// Apache's `Timeout` (whole seconds, at least 1): how long a read from or a write to a
    /// client may wait. Default 30 s (Debian's apache2.conf says 300).
    pub timeout: Duration,
    /// Files written into htdocs besides the built-in ones: (name, length in bytes), each with
    /// the content of [`file_content`] (see [`ApacheOptions::file`]).
    pub files: Vec<(String, u64)>,
    /// CGI scripts written into htdocs: (name ending in `.cgi`, how long each run sleeps before
    /// it answers) (see [`ApacheOptions::cgi`]).
    pub cgi: Vec<(String, Duration)>,
}

impl ApacheOptions {
    /// One port, `KeepAliveTimeout 1`, `MaxKeepAliveRequests 100`, 64 threads per child.
    pub fn new(name: &str) -> Self {
        ApacheOptions {
            name: name.to_string(),
            keep_alive_timeout: Duration::from_secs(1),
            max_keep_alive_requests: 100,
            ports: 1,
            threads_per_child: 64,
            tls: None,
            client_ca: None,
            prefork_workers: None,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            files: Vec::new(),
            cgi: Vec::new(),
        }
    }

    /// A CGI script at `/NAME` (NAME ends in `.cgi`) that sleeps `delay`, then answers 200
    /// with a short text body: a page whose work holds one of Apache's workers for `delay`, as
    /// a slow PHP or CGI page does (mod_cgi under prefork, mod_cgid under event).
    pub fn cgi(mut self, name: &str, delay: Duration) -> Self {
        self.cgi.push((name.to_string(), delay));
        self
    }

    /// The prefork MPM (`LoadModule mpm_prefork_module`, as Debian runs Apache with mod_php)
    /// with exactly `max_request_workers` children, all started at once and kept:
    /// `StartServers`, `MaxSpareServers`, `ServerLimit` and `MaxRequestWorkers` are all
    /// `max_request_workers` (at least 1), `MinSpareServers 1`, `MaxConnectionsPerChild 0`.
    /// Each child serves one connection at a time, keep-alive included; connections beyond
    /// that wait in the listen backlog.
    pub fn prefork(mut self, max_request_workers: u32) -> Self {
        self.prefork_workers = Some(max_request_workers.max(1));
        self
    }

    /// Apache's `Timeout`, in whole seconds (rounded down, at least 1 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Puts `htdocs/NAME` of `len` bytes, the content of [`file_content`], so that a client
    /// can download `GET /NAME` and compare [`file_digest`]`(len)` with a [`Digest`] of what it
    /// received. `name` is a plain file name (no `/`). Apache serves it for GET and HEAD, and
    /// for POST too: the core handler reads (and discards) the whole request body before it
    /// answers with the file, as a script that reads its input would.
    pub fn file(mut self, name: &str, len: u64) -> Self {
        self.files.push((name.to_string(), len));
        self
    }

    /// Serves TLS on every port (`SSLEngine on`) with this PEM certificate chain and key,
    /// with a shared-memory session cache so that sessions resume.
    pub fn tls(mut self, cert_pem: impl Into<PathBuf>, key_pem: impl Into<PathBuf>) -> Self {
        self.tls = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// With [`Self::tls`]: refuses clients without a certificate signed by a CA of this PEM
    /// bundle (`SSLVerifyClient require`, `SSLCACertificateFile`).
    pub fn require_client_cert(mut self, ca_pem: impl Into<PathBuf>) -> Self {
        self.client_ca = Some(ca_pem.into());
        self
    }

    pub fn keep_alive_timeout(mut self, t: Duration) -> Self {
        self.keep_alive_timeout = t;
        self
    }

    pub fn max_keep_alive_requests(mut self, n: u32) -> Self {
        self.max_keep_alive_requests = n;
        self
    }

    pub fn ports(mut self, n: usize) -> Self {
        self.ports = n.max(1);
        self
    }

    pub fn threads_per_child(mut self, n: u32) -> Self {
        self.threads_per_child = n.max(1);
        self
    }
}

/// A running Apache: its own ServerRoot in a temp dir, its own process group, killed on drop.
///
/// Serves `GET /` (index.html), `POST /echo` (mod_reflector echoes the body), and slow variants
/// for overlapping requests: `GET /slow.txt` (300 bytes trickled by mod_ratelimit at 1 KiB/s,
/// about 200 ms) and `POST /echo-slow` (the echo, trickled the same way). Every response
/// carries `X-Backend`, `X-Seen-Forwarded-For`, `X-Seen-X-Foo`, `X-Seen-Proxy-Connection`,
/// `X-Seen-Connection` (what it received, via mod_headers). The files of
/// [`ApacheOptions::file`] are served at `/NAME` (GET, and POST with the body read whole).
///
/// Only loopback, only this launcher's processes: the instance runs in its own process group,
/// which is what `stop`, `hard_restart` and drop signal.
pub struct Apache {
    opts: ApacheOptions,
    dir: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    child: Option<Child>,
}

impl Apache {
    /// Starts an instance on free 127.0.0.1 ports and waits until every one accepts.
    pub async fn start(opts: ApacheOptions) -> std::io::Result<Apache> {
        if !apache_installed() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{APACHE_BIN} not found: apt-get install -y apache2"),
            ));
        }
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let addrs = (0..opts.ports.max(1))
                .map(|_| free_port())
                .collect::<std::io::Result<Vec<_>>>()?;
            let mut apache = Apache {
                opts: opts.clone(),
                dir: tempfile::Builder::new()
                    .prefix("kaproxy-apache-")
                    .tempdir()?,
                addrs,
                child: None,
            };
            match apache.spawn_and_wait().await {
                Ok(()) => return Ok(apache),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("apache did not start")))
    }

    /// The (first) address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every address it listens on.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Its `X-Backend` name.
    pub fn name(&self) -> &str {
        &self.opts.name
    }

    /// Whether it serves TLS ([`ApacheOptions::tls`]).
    pub fn is_tls(&self) -> bool {
        self.opts.tls.is_some()
    }

    /// Its DocumentRoot (where [`ApacheOptions::file`] files are).
    pub fn htdocs(&self) -> PathBuf {
        self.dir.path().join("htdocs")
    }

    /// The content of its error log (for failure messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Graceful stop (SIGTERM to the parent, which closes every connection), then waits until
    /// the ports refuse connections; kills the process group if that takes too long.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal_group(child.id(), "TERM");
        poll_until(STOP_TIMEOUT, async || {
            matches!(child.try_wait(), Ok(Some(_)))
        })
        .await;
        signal_group(child.id(), "KILL");
        let _ = child.wait();
        self.wait_ports_closed().await;
    }

    /// Starts it again on the same ports after [`Apache::stop`] (a restart in two steps, as a
    /// rolling upgrade does one); does nothing if it is running.
    pub async fn start_again(&mut self) -> std::io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn_and_wait().await
    }

    /// Kills the whole process tree at once with SIGKILL (every pooled connection dies with
    /// it, as in a crash or a container restart) and starts Apache again on the same ports.
    pub async fn hard_restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.wait_ports_closed().await;
        self.spawn_and_wait().await
    }

    /// Writes the config, spawns `apache2 -DFOREGROUND` in its own process group and waits
    /// until every port accepts.
    async fn spawn_and_wait(&mut self) -> std::io::Result<()> {
        let conf = self.write_config()?;
        let child = Command::new(APACHE_BIN)
            .arg("-DFOREGROUND")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        self.child = Some(child);
        let mut exited = None;
        let addrs = self.addrs.clone();
        let child = &mut self.child;
        let listening = poll_until(START_TIMEOUT, async || {
            if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
                exited = Some(status);
                return true;
            }
            for addr in &addrs {
                if tokio::net::TcpStream::connect(addr).await.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        if let Some(status) = exited {
            self.child = None;
            return Err(std::io::Error::other(format!(
                "apache {} exited with {status} on start; error log:\n{}",
                self.opts.name,
                self.error_log()
            )));
        }
        if !listening {
            self.kill();
            return Err(std::io::Error::other(format!(
                "apache {} did not accept on {:?} within {START_TIMEOUT:?}; error log:\n{}",
                self.opts.name,
                self.addrs,
                self.error_log()
            )));
        }
        Ok(())
    }

    /// Waits (bounded by [`STOP_TIMEOUT`]) until nothing accepts on its ports any more.
    async fn wait_ports_closed(&self) {
        let closed = poll_until(STOP_TIMEOUT, async || {
            for addr in &self.addrs {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return false;
                }
            }
            true
        })
        .await;
        if !closed {
            eprintln!(
                "apache {}: {:?} still accepts after {STOP_TIMEOUT:?}",
                self.opts.name, self.addrs
            );
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), "KILL");
            let _ = child.wait();
        }
    }

    fn write_config(&self) -> std::io::Result<PathBuf> {
        if self.opts.client_ca.is_some() && self.opts.tls.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "require_client_cert needs tls(cert, key) too",
            ));
        }
        let root = self.dir.path();
        let htdocs = root.join("htdocs");
        let run = root.join("run");
        std::fs::create_dir_all(&htdocs)?;
        std::fs::create_dir_all(&run)?;
        std::fs::write(
            htdocs.join("index.html"),
            format!("<html><body>hello from {}</body></html>\n", self.opts.name),
        )?;
        std::fs::write(htdocs.join("slow.txt"), [b's'; SLOW_BODY_LEN])?;
        for (name, len) in &self.opts.files {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("file name {name:?}: a plain file name is expected"),
                ));
            }
            let path = htdocs.join(name);
            // A hard restart writes the config again; the file is already there.
            if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(*len) {
                write_file_content(&path, *len)?;
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        }
        for (name, delay) in &self.opts.cgi {
            if !name.ends_with(".cgi") || name.contains('/') || name.starts_with('.') {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("CGI name {name:?}: a plain file name ending in .cgi is expected"),
                ));
            }
            let path = htdocs.join(name);
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\nsleep {:.3}\nprintf 'Content-Type: text/plain\\r\\n\\r\\n{} done\\n'\n",
                    delay.as_secs_f64(),
                    self.opts.name
                ),
            )?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        // Apache's children run as www-data when started by root and must read these.
        for (path, mode) in [
            (root.to_path_buf(), 0o755),
            (htdocs.clone(), 0o755),
            (run.clone(), 0o755),
            (htdocs.join("index.html"), 0o644),
            (htdocs.join("slow.txt"), 0o644),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        }
        let ka = &self.opts.keep_alive_timeout;
        let keep_alive_timeout = if ka.subsec_millis() == 0 {
            format!("{}", ka.as_secs())
        } else {
            format!("{}ms", ka.as_millis())
        };
        let mut conf = String::new();
        let r = root.display();
        let m = APACHE_MODULES;
        writeln!(conf, "ServerRoot \"{r}\"").unwrap();
        writeln!(conf, "ServerName localhost").unwrap();
        for addr in &self.addrs {
            writeln!(conf, "Listen {addr}").unwrap();
        }
        writeln!(conf, "PidFile \"{r}/run/httpd.pid\"").unwrap();
        writeln!(conf, "DefaultRuntimeDir \"{r}/run\"").unwrap();
        writeln!(conf, "ErrorLog \"{r}/error.log\"").unwrap();
        writeln!(conf, "LogLevel warn").unwrap();
        let mpm = match self.opts.prefork_workers {
            Some(_) => "mpm_prefork",
            None => "mpm_event",
        };
        for module in [
            mpm,
            "authz_core",
            "headers",
            "mime",
            "dir",
            "reflector",
            "ratelimit",
            "env",
        ] {
            writeln!(conf, "LoadModule {module}_module {m}/mod_{module}.so").unwrap();
        }
        if !self.opts.cgi.is_empty() {
            // mod_cgid (a daemon that forks the scripts) is the one for threaded MPMs.
            let cgi = if self.opts.prefork_workers.is_some() {
                "cgi"
            } else {
                "cgid"
            };
            writeln!(conf, "LoadModule {cgi}_module {m}/mod_{cgi}.so").unwrap();
            if cgi == "cgid" {
                writeln!(conf, "ScriptSock \"{r}/run/cgisock\"").unwrap();
            }
            writeln!(conf, "AddHandler cgi-script .cgi").unwrap();
        }
        if let Some((cert, key)) = &self.opts.tls {
            // mod_ssl reads the certificate and key in the parent, before it drops to
            // www-data; the session cache is what lets TLS 1.2 session IDs resume (TLS 1.3
            // tickets resume with SSLSessionTickets, on by default).
            for module in ["socache_shmcb", "ssl"] {
                writeln!(conf, "LoadModule {module}_module {m}/mod_{module}.so").unwrap();
            }
            writeln!(conf, "SSLEngine on").unwrap();
            writeln!(conf, "SSLCertificateFile \"{}\"", cert.display()).unwrap();
            writeln!(conf, "SSLCertificateKeyFile \"{}\"", key.display()).unwrap();
            writeln!(conf, "SSLSessionCache \"shmcb:{r}/ssl_scache(512000)\"").unwrap();
            writeln!(conf, "SSLSessionCacheTimeout 300").unwrap();
            if let Some(ca) = &self.opts.client_ca {
                writeln!(conf, "SSLVerifyClient require").unwrap();
                writeln!(conf, "SSLVerifyDepth 2").unwrap();
                writeln!(conf, "SSLCACertificateFile \"{}\"", ca.display()).unwrap();
            }
        }
        if is_root() {
            writeln!(conf, "User www-data\nGroup www-data").unwrap();
        }
        match self.opts.prefork_workers {
            None => {
                let threads = self.opts.threads_per_child;
                write!(
                    conf,
                    r#"StartServers 1
ServerLimit 2
ThreadsPerChild {threads}
MaxRequestWorkers {workers}
MinSpareThreads 16
MaxSpareThreads {workers}
"#,
                    workers = threads * 2,
                )
                .unwrap();
            }
            Some(n) => write!(
                conf,
                r#"StartServers {n}
MinSpareServers 1
MaxSpareServers {n}
ServerLimit {n}
MaxRequestWorkers {n}
MaxConnectionsPerChild 0
"#
            )
            .unwrap(),
        }
        write!(
            conf,
            r#"Timeout {timeout}
KeepAlive On
KeepAliveTimeout {keep_alive_timeout}
MaxKeepAliveRequests {max}
DocumentRoot "{r}/htdocs"
<Directory "{r}/htdocs">
    Require all granted
{options}</Directory>
DirectoryIndex index.html
TypesConfig /etc/mime.types
Header always set X-Backend "{name}"
Header always set X-Seen-Forwarded-For "expr=%{{req:X-Forwarded-For}}"
Header always set X-Seen-X-Foo "expr=%{{req:X-Foo}}"
Header always set X-Seen-Proxy-Connection "expr=%{{req:Proxy-Connection}}"
Header always set X-Seen-Connection "expr=%{{req:Connection}}"
<Location "/echo">
    SetHandler reflector
</Location>
<Location "/echo-slow">
    SetHandler reflector
    SetOutputFilter RATE_LIMIT
    SetEnv rate-limit 1
</Location>
<Location "/slow.txt">
    SetOutputFilter RATE_LIMIT
    SetEnv rate-limit 1
</Location>
"#,
            timeout = self.opts.timeout.as_secs().max(1),
            max = self.opts.max_keep_alive_requests,
            name = self.opts.name,
            options = if self.opts.cgi.is_empty() {
                ""
            } else {
                "    Options +ExecCGI\n"
            },
        )
        .unwrap();
        let path = root.join("httpd.conf");
        std::fs::write(&path, conf)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(path)
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fills `buf` with bytes `offset..offset + buf.len()` of the content every
/// [`ApacheOptions::file`] has: a pseudo-random stream (SplitMix64 of the 8-byte block index,
/// little-endian) that depends on the offset only, so any range can be checked on its own and
/// files of different lengths share their prefix.
pub fn fill_file_content(offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let block = splitmix64(pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&block[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// The first `len` bytes of the content of [`ApacheOptions::file`] files.
pub fn file_content(len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    fill_file_content(0, &mut buf);
    buf
}

/// The [`Digest`] of a whole [`ApacheOptions::file`] file of `len` bytes.
pub fn file_digest(len: u64) -> u64 {
    let mut digest = Digest::new();
    let mut buf = vec![0; CONTENT_CHUNK];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(CONTENT_CHUNK as u64) as usize;
        fill_file_content(offset, &mut buf[..n]);
        digest.update(&buf[..n]);
        offset += n as u64;
    }
    digest.finish()
}

/// A streaming FNV-1a 64-bit digest of downloaded bytes, to compare with [`file_digest`]
/// (a checksum against corruption and truncation, not a cryptographic hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    state: u64,
    len: u64,
}

impl Digest {
    pub fn new() -> Self {
        Digest {
            state: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.state ^= u64::from(b);
            self.state = self.state.wrapping_mul(0x0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }

    /// How many bytes went in.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(&self) -> u64 {
        self.state
    }
}

impl Default for Digest {
    fn default() -> Self {
        Digest::new()
    }
}

/// Chunk in which file content is generated and written.
const CONTENT_CHUNK: usize = 1 << 20;

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn write_file_content(path: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0; CONTENT_CHUNK];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(CONTENT_CHUNK as u64) as usize;
        fill_file_content(offset, &mut buf[..n]);
        out.write_all(&buf[..n])?;
        offset += n as u64;
    }
    out.flush()
}

/// Sends a signal to the process group led by `pgid` (a group this launcher created).
fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A loopback port that was free a moment ago.
fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn file_content_depends_on_the_offset_only() {
        let whole = file_content(1000);
        let mut part = vec![0; 101];
        fill_file_content(333, &mut part);
        assert_eq!(&whole[333..434], &part[..]);
        assert_eq!(&file_content(10)[..], &whole[..10]);
        // Not a constant pattern.
        assert!(whole.windows(8).any(|w| w != &whole[..8]));
        let mut d = Digest::new();
        d.update(&whole[..500]);
        d.update(&whole[500..]);
        assert_eq!(d.finish(), file_digest(1000));
        assert_eq!(d.len(), 1000);
        assert_ne!(file_digest(1000), file_digest(999));
    }

    /// One request on a fresh connection (`Connection: close`); returns the head and the body.
    async fn request(addr: SocketAddr, req: &[u8]) -> (String, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&out[..end]).to_string();
        (head, out[end + 4..].to_vec())
    }

    #[tokio::test]
    async fn prefork_serves_a_file_for_get_and_post() {
        if !require_apache() {
            return;
        }
        const LEN: u64 = 300_001;
        let apache = Apache::start(
            ApacheOptions::new("prefork")
                .prefork(2)
                .timeout(Duration::from_secs(5))
                .file("f.bin", LEN),
        )
        .await
        .expect("apache starts");
        let conf = std::fs::read_to_string(apache.dir.path().join("httpd.conf")).unwrap();
        assert!(conf.contains("mod_mpm_prefork.so") && conf.contains("MaxRequestWorkers 2"));
        assert!(!conf.contains("ThreadsPerChild") && conf.contains("Timeout 5\n"));
        let (head, body) = request(
            apache.addr(),
            b"GET /f.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut d = Digest::new();
        d.update(&body);
        assert_eq!((d.len(), d.finish()), (LEN, file_digest(LEN)));
        // POST: the body is read whole before the file is sent.
        let mut post = b"POST /f.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                         Content-Length: 100000\r\n\r\n"
            .to_vec();
        post.extend(std::iter::repeat_n(b'p', 100_000));
        let (head, body) = request(apache.addr(), &post).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body.len() as u64, LEN);
        // The default stays mpm_event.
        let opts = ApacheOptions::new("event");
        assert_eq!((opts.prefork_workers, opts.files.len()), (None, 0));
    }
}
