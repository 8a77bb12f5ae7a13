//! Owns the one launcher of a real Apache httpd 2.4 (Debian's `/usr/sbin/apache2`) on loopback
//! ports, used by the integration tests and `kaproxy-bench race --apache`: the free ports, the
//! httpd.conf in a temporary ServerRoot, the process group it runs in, start, stop, hard restart,
//! and, when asked, TLS with mod_ssl (a certificate, a required client certificate, a session
//! cache so that sessions resume).

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
        }
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
/// `X-Seen-Connection` (what it received, via mod_headers).
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
        for module in [
            "mpm_event",
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
        let threads = self.opts.threads_per_child;
        write!(
            conf,
            r#"StartServers 1
ServerLimit 2
ThreadsPerChild {threads}
MaxRequestWorkers {workers}
MinSpareThreads 16
MaxSpareThreads {workers}
Timeout 30
KeepAlive On
KeepAliveTimeout {keep_alive_timeout}
MaxKeepAliveRequests {max}
DocumentRoot "{r}/htdocs"
<Directory "{r}/htdocs">
    Require all granted
</Directory>
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
            workers = threads * 2,
            max = self.opts.max_keep_alive_requests,
            name = self.opts.name,
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
