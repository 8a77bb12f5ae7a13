//! A kaproxy configuration kept in a real file in a temp dir: written (atomically) and rewritten
//! by a test, loaded with `Config::load` so that `source` is set and reload re-reads it, and
//! started in-process or handed to the `kaproxy` binary.

use std::path::{Path, PathBuf};

use kaproxy::config::Config;

/// A config file and the temp dir it lives in (with the dev certificate, once generated).
pub struct ConfigFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigFile {
    /// A fresh temp dir; nothing written yet.
    pub fn new() -> ConfigFile {
        let dir = tempfile::Builder::new()
            .prefix("kaproxy-ops-")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("kaproxy.toml");
        ConfigFile { dir, path }
    }

    /// Where the dev certificate of `[tls]` is (generated on the first start when absent).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("dev-cert.pem")
    }

    /// The dev certificate's key.
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("dev-key.pem")
    }

    /// A file path inside the temp dir.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A whole config: `[listen]` with `listen` as its body, `[tls]` pointing at the dev
    /// certificate of this dir, an admin listener on 127.0.0.1:0 with a 2 s shutdown timeout,
    /// no access log, then `rest` (upstreams, `[downstream]`, `[[tls.sni]]`, ...).
    pub fn text(&self, listen: &str, rest: &str) -> String {
        self.text_with(
            listen,
            "listen = \"127.0.0.1:0\"\nshutdown_timeout = \"2s\"",
            "access_log = false",
            rest,
        )
    }

    /// Like [`text`](Self::text) with the bodies of `[admin]` and `[log]` given too.
    pub fn text_with(&self, listen: &str, admin: &str, log: &str, rest: &str) -> String {
        format!(
            "[listen]\n{listen}\n\n[tls]\ncert = {cert:?}\nkey = {key:?}\n\n[admin]\n{admin}\n\n\
             [log]\n{log}\n\n{rest}\n",
            cert = self.cert_path().display().to_string(),
            key = self.key_path().display().to_string(),
        )
    }

    /// Replaces the file's content atomically (write aside, then rename), so that a reload
    /// running at the same moment reads the old or the new file, never half of one.
    pub fn write(&self, text: &str) {
        write_atomically(&self.path, text.as_bytes());
    }

    /// `Config::load` of the file; panics with the config error.
    pub fn load(&self) -> Config {
        Config::load(&self.path).unwrap_or_else(|e| {
            panic!(
                "config does not load: {e}\n---\n{}",
                std::fs::read_to_string(&self.path).unwrap_or_default()
            )
        })
    }

    /// Loads the file and starts kaproxy in-process with it.
    pub async fn start(&self) -> kaproxy::Server {
        kaproxy::Server::start(self.load())
            .await
            .unwrap_or_else(|e| panic!("kaproxy did not start: {e:?}"))
    }
}

/// Writes `contents` to a sibling temp file and renames it over `path`.
pub fn write_atomically(path: &Path, contents: &[u8]) {
    let aside = path.with_extension("tmp-write");
    std::fs::write(&aside, contents).unwrap_or_else(|e| panic!("write {}: {e}", aside.display()));
    std::fs::rename(&aside, path)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", aside.display(), path.display()));
}

/// The 1-based line of the first line of `text` that starts with `prefix` (after indentation).
pub fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in\n{text}"))
        + 1
}
