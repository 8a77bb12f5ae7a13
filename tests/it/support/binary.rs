//! The real `kaproxy` binary run by a test: spawned on a config file with JSON logs to a file,
//! its listener addresses read from its own log lines, what the kernel says of its process
//! (peak memory, open files), and killed by its pid if the test ends first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kaproxy_testkit::poll_until;

use super::config_file::ConfigFile;

/// How long the binary may take to start and log its listeners.
pub const START_BOUND: Duration = Duration::from_secs(10);

pub struct Binary {
    pub child: tokio::process::Child,
    log: PathBuf,
}

impl Binary {
    /// `kaproxy run --config CONFIG`, stdout and stderr to `log`. The config should set
    /// `[log] format = "json"` for [`Binary::messages`] and [`Binary::addr`].
    pub fn spawn(config: &Path, log: &Path) -> Binary {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kaproxy"));
        command.arg("run").arg("--config").arg(config);
        Binary::spawn_command(command, log)
    }

    /// [`Binary::spawn`] under `ulimit -n nofile` (a shell that `exec`s kaproxy, so the pid is
    /// kaproxy's).
    pub fn spawn_limited(nofile: u32, config: &Path, log: &Path) -> Binary {
        let mut command = tokio::process::Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "ulimit -n {nofile} && exec \"$0\" run --config \"$1\""
            ))
            .arg(env!("CARGO_BIN_EXE_kaproxy"))
            .arg(config);
        Binary::spawn_command(command, log)
    }

    fn spawn_command(mut command: tokio::process::Command, log: &Path) -> Binary {
        let out = std::fs::File::create(log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kaproxy binary");
        Binary {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("kaproxy is running")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The fields of every JSON log line whose message starts with `prefix`.
    pub fn messages(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v.get("fields").cloned().unwrap_or(v))
            .filter(|f| f["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .collect()
    }

    /// The `addr` of the first log line with `message` (and `listener`, when given), polled
    /// for at most [`START_BOUND`]; panics with the log if kaproxy exits first.
    pub async fn addr(&mut self, message: &str, listener: Option<&str>) -> SocketAddr {
        let mut found = None;
        let logged = poll_until(START_BOUND, async || {
            found = self.messages(message).into_iter().find_map(|f| {
                if listener.is_some_and(|l| f["listener"] != l) {
                    return None;
                }
                f["addr"].as_str().and_then(|a| a.parse().ok())
            });
            if found.is_none() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("kaproxy exited with {status}:\n{}", self.log());
                }
            }
            found.is_some()
        })
        .await;
        assert!(
            logged,
            "no {message:?} within {START_BOUND:?}:\n{}",
            self.log()
        );
        found.expect("logged")
    }

    /// The process's peak resident memory (VmHWM) in bytes.
    pub fn peak_rss(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:") * 1024
    }

    /// The process's resident memory now (VmRSS) in bytes.
    pub fn rss(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:") * 1024
    }

    /// Writes `files`' `kaproxy.toml` — a plain HTTP and an admin listener on 127.0.0.1:0,
    /// JSON logs without the access log, then `rest` (the upstreams and other tables) — starts
    /// the binary on it and returns it with its HTTP and admin addresses once it listens.
    pub async fn start(files: &ConfigFile, rest: &str) -> (Binary, SocketAddr, SocketAddr) {
        let config = files.file("kaproxy.toml");
        let text = files.text_with(
            "http = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"",
            "format = \"json\"\naccess_log = false",
            rest,
        );
        std::fs::write(&config, text).expect("write config");
        let mut kaproxy = Binary::spawn(&config, &files.file("kaproxy.log"));
        let http = kaproxy.addr("listening", Some("http")).await;
        let admin = kaproxy.addr("admin listening", None).await;
        (kaproxy, http, admin)
    }

    /// How many descriptors the process has open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Open files of the process under `dir` (unlinked temporary files included).
    pub fn open_files_in(&self, dir: &Path) -> Vec<String> {
        open_files_in(&format!("/proc/{}/fd", self.pid()), dir)
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The targets of the descriptors in `fd_dir` (`/proc/PID/fd`) that are files under `dir`:
/// an unlinked temporary file shows as `DIR/#INODE (deleted)`.
pub fn open_files_in(fd_dir: &str, dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(fd_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .map(|target| target.display().to_string())
        .collect()
}
