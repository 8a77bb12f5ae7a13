//! Headless Chromium (Debian's `chromium` package) for the status page tests: skip or require
//! it, run one bounded headless session (DOM dump or screenshot) in its own process group, and
//! read the tags and attributes of the dumped DOM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Debian's Chromium launcher.
pub const CHROMIUM_BIN: &str = "/usr/bin/chromium";
/// The env var that turns a missing Chromium from a skip into a failure (CI sets it).
pub const REQUIRE_CHROMIUM_ENV: &str = "KAPROXY_REQUIRE_CHROMIUM";
/// Bound on one headless run: a cold start on a busy 2-core machine takes a few seconds.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Virtual time the page gets to fetch `/status` and render before the dump or screenshot.
const VIRTUAL_TIME_BUDGET_MS: u32 = 3000;

/// True when Chromium is installed; when it is not, panics if `KAPROXY_REQUIRE_CHROMIUM=1`,
/// else prints a loud skip notice and returns false.
pub fn require_chromium() -> bool {
    if Path::new(CHROMIUM_BIN).is_file() {
        return true;
    }
    if std::env::var(REQUIRE_CHROMIUM_ENV).as_deref() == Ok("1") {
        panic!(
            "{REQUIRE_CHROMIUM_ENV}=1 but Chromium is not installed ({CHROMIUM_BIN} missing): \
             install it with `apt-get install -y chromium`"
        );
    }
    eprintln!(
        "SKIPPED: chromium not installed (set {REQUIRE_CHROMIUM_ENV}=1 to fail instead); \
         expected {CHROMIUM_BIN}"
    );
    false
}

/// What a headless run produces.
pub enum Output {
    /// `--dump-dom`: the serialized DOM after the virtual time budget.
    Dom,
    /// `--screenshot=PATH` of a `width`×`height` window.
    Screenshot {
        path: PathBuf,
        width: u32,
        height: u32,
    },
}

/// Runs headless Chromium on `url` with a fresh profile in `profile_dir`; returns its stdout
/// (the DOM for [`Output::Dom`]). Only loopback: every background service is switched off.
/// Panics with Chromium's stderr when it fails or exceeds [`RUN_TIMEOUT`] (then its whole
/// process group, which this function created, is killed).
pub async fn headless(url: &str, output: Output, profile_dir: &Path) -> String {
    let mut cmd = Command::new(CHROMIUM_BIN);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-crash-reporter",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile_dir.display()))
    .arg(format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}"));
    match &output {
        Output::Dom => {
            cmd.arg("--dump-dom");
        }
        Output::Screenshot {
            path,
            width,
            height,
        } => {
            cmd.arg(format!("--screenshot={}", path.display()))
                .arg(format!("--window-size={width},{height}"));
        }
    }
    cmd.arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {CHROMIUM_BIN}: {e}"));
    let pgid = child.id().expect("a freshly spawned child has a pid");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let run = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (status, _, _) = tokio::join!(
            child.wait(),
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err)
        );
        (status, out, err)
    };
    let result = tokio::time::timeout(RUN_TIMEOUT, run).await;
    // Helpers Chromium forked into its group must not outlive the run.
    kill_group(pgid);
    let (status, out, err) =
        result.unwrap_or_else(|_| panic!("chromium did not finish {url} within {RUN_TIMEOUT:?}"));
    let status = status.expect("wait for chromium");
    let err = String::from_utf8_lossy(&err);
    assert!(
        status.success(),
        "chromium {url} exited with {status}; stderr:\n{err}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// SIGKILL to the process group `pgid`, which [`headless`] created for its Chromium.
fn kill_group(pgid: u32) {
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Width and height from a PNG's IHDR chunk; None when `bytes` is not a PNG.
pub fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if bytes.len() < 24 || !bytes.starts_with(SIGNATURE) || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&bytes[16..20]), be(&bytes[20..24])))
}

/// One start tag of a serialized DOM.
#[derive(Debug, Clone)]
pub struct Tag {
    pub name: String,
    pub attrs: Vec<(String, String)>,
}

impl Tag {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// An attribute parsed as a number; panics with the tag when it is missing or not one.
    pub fn number(&self, name: &str) -> f64 {
        self.attr(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{self:?} has no numeric {name}"))
    }
}

/// Every start tag in `html`, in document order (comments and closing tags skipped). Enough
/// for Chromium's `--dump-dom` serialization: attribute values are double-quoted.
pub fn tags(html: &str) -> Vec<Tag> {
    let bytes = html.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    // Every turn advances `i`.
    while let Some(off) = html[i..].find('<') {
        let start = i + off + 1;
        i = start;
        if !bytes.get(start).is_some_and(u8::is_ascii_alphabetic) {
            continue;
        }
        let mut j = start;
        while j < bytes.len() && !bytes[j].is_ascii_whitespace() && bytes[j] != b'>' {
            j += 1;
        }
        let name = html[start..j].trim_end_matches('/').to_ascii_lowercase();
        let mut attrs = Vec::new();
        loop {
            while j < bytes.len() && (bytes[j].is_ascii_whitespace() || bytes[j] == b'/') {
                j += 1;
            }
            if j >= bytes.len() || bytes[j] == b'>' {
                break;
            }
            let key_start = j;
            while j < bytes.len()
                && !bytes[j].is_ascii_whitespace()
                && !matches!(bytes[j], b'=' | b'>' | b'/')
            {
                j += 1;
            }
            let key = html[key_start..j].to_ascii_lowercase();
            let mut value = String::new();
            if bytes.get(j) == Some(&b'=') {
                j += 1;
                if bytes.get(j) == Some(&b'"') {
                    let end = html[j + 1..].find('"').map_or(bytes.len(), |e| j + 1 + e);
                    value = unescape(&html[j + 1..end]);
                    j = (end + 1).min(bytes.len());
                } else {
                    let value_start = j;
                    while j < bytes.len() && !bytes[j].is_ascii_whitespace() && bytes[j] != b'>' {
                        j += 1;
                    }
                    value = unescape(&html[value_start..j]);
                }
            }
            if key.is_empty() {
                j += 1;
                continue;
            }
            attrs.push((key, value));
        }
        out.push(Tag { name, attrs });
        i = j.max(start);
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}
