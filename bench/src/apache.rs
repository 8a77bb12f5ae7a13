//! Runs a real Apache httpd 2.4 (Debian's `/usr/sbin/apache2`) on loopback ports, with its own
//! configuration in a temporary directory, for `kaproxy-bench race --apache`. The process group
//! it starts is killed when the value is dropped.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub const APACHE_BIN: &str = "/usr/sbin/apache2";
const APACHE_MODULES: &str = "/usr/lib/apache2/modules";
/// How long Apache gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One Apache process group listening on `addrs`.
pub struct Apache {
    root: PathBuf,
    child: Option<Child>,
    addrs: Vec<SocketAddr>,
}

impl Apache {
    pub fn installed() -> bool {
        Path::new(APACHE_BIN).exists()
    }

    /// Starts Apache with `KeepAliveTimeout keepalive` on `ports` fresh loopback ports. GET /
    /// serves a small file; POST /echo echoes the body (mod_reflector).
    pub fn start(ports: usize, keepalive: Duration) -> anyhow::Result<Apache> {
        if !Apache::installed() {
            bail!("{APACHE_BIN} not found: apt-get install apache2");
        }
        let addrs = (0..ports)
            .map(|_| free_port())
            .collect::<std::io::Result<Vec<_>>>()?;
        let root = std::env::temp_dir().join(format!(
            "kaproxy-bench-apache-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let mut apache = Apache {
            root,
            child: None,
            addrs,
        };
        let conf = apache.write_config(keepalive)?;
        let child = Command::new(APACHE_BIN)
            .arg("-f")
            .arg(&conf)
            .arg("-DFOREGROUND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {APACHE_BIN}"))?;
        apache.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        for addr in apache.addrs.clone() {
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Some(status) = apache
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    let log =
                        std::fs::read_to_string(apache.root.join("error.log")).unwrap_or_default();
                    bail!("apache2 exited with {status} before listening on {addr}:\n{log}");
                }
                if Instant::now() > deadline {
                    bail!("apache2 did not listen on {addr} within {START_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(apache)
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn version() -> String {
        Command::new(APACHE_BIN)
            .arg("-v")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| "apache2 (unknown version)".to_string())
    }

    fn write_config(&self, keepalive: Duration) -> anyhow::Result<PathBuf> {
        let r = &self.root;
        let htdocs = r.join("htdocs");
        let run = r.join("run");
        std::fs::create_dir_all(&htdocs)?;
        std::fs::create_dir_all(&run)?;
        std::fs::write(
            htdocs.join("index.html"),
            "<html><body>hello from apache</body></html>\n",
        )?;
        // Apache's children run as www-data when started by root and must read these.
        for (path, mode) in [
            (r.clone(), 0o755),
            (htdocs.clone(), 0o755),
            (run.clone(), 0o755),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        }
        std::fs::set_permissions(
            htdocs.join("index.html"),
            std::fs::Permissions::from_mode(0o644),
        )?;
        let keepalive = if keepalive.subsec_millis() == 0 {
            format!("{}", keepalive.as_secs())
        } else {
            format!("{}ms", keepalive.as_millis())
        };
        let root = r.display();
        let mut conf = String::new();
        let _ = writeln!(conf, "ServerRoot \"{root}\"\nServerName localhost");
        for addr in &self.addrs {
            let _ = writeln!(conf, "Listen {addr}");
        }
        let _ = writeln!(conf, "PidFile \"{root}/run/httpd.pid\"");
        let _ = writeln!(conf, "DefaultRuntimeDir \"{root}/run\"");
        let _ = writeln!(conf, "ErrorLog \"{root}/error.log\"\nLogLevel warn");
        for module in ["mpm_event", "authz_core", "mime", "dir", "reflector"] {
            let _ = writeln!(
                conf,
                "LoadModule {module}_module {APACHE_MODULES}/mod_{module}.so"
            );
        }
        if is_root() {
            let _ = writeln!(conf, "User www-data\nGroup www-data");
        }
        let _ = write!(
            conf,
            r#"StartServers 1
ServerLimit 2
ThreadsPerChild 128
MaxRequestWorkers 256
MinSpareThreads 16
MaxSpareThreads 256
Timeout 30
KeepAlive On
KeepAliveTimeout {keepalive}
MaxKeepAliveRequests 100
DocumentRoot "{root}/htdocs"
<Directory "{root}/htdocs">
    Require all granted
</Directory>
DirectoryIndex index.html
TypesConfig /etc/mime.types
<Location "/echo">
    SetHandler reflector
</Location>
"#
        );
        let path = r.join("httpd.conf");
        std::fs::write(&path, conf)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(path)
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The group leader is our own child; its workers share its process group.
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .stderr(Stdio::null())
                    .status();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
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
