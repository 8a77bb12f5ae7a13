//! Where the real binary's logs go and what they look like in a file: stderr, no ANSI escape
//! codes unless asked, stdout left to command output.

use std::process::Stdio;
use std::time::Duration;

use kaproxy_testkit::poll_until;

use crate::support::config_file::ConfigFile;

const BOUND: Duration = Duration::from_secs(10);

/// Runs `kaproxy run` with `log_table` until it logs "listening", stdout and stderr each to
/// its own file; returns (stdout, stderr).
async fn run_until_listening(log_table: &str) -> (String, String) {
    let files = ConfigFile::new();
    let config = files.file("kaproxy.toml");
    let text = files.text_with(
        "http = \"127.0.0.1:0\"",
        "listen = \"\"",
        log_table,
        "[upstreams.web]\nservers = [\"127.0.0.1:9\"]\n",
    );
    std::fs::write(&config, text).expect("write config");
    let (out_path, err_path) = (files.file("stdout.log"), files.file("stderr.log"));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kaproxy"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kaproxy");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let started = poll_until(BOUND, async || read(&err_path).contains("listening")).await;
    let _ = child.kill().await;
    let (out, err) = (read(&out_path), read(&err_path));
    assert!(
        started,
        "kaproxy did not log 'listening' within {BOUND:?}\nstderr:\n{err}\nstdout:\n{out}"
    );
    (out, err)
}

#[tokio::test]
async fn logs_go_to_stderr_without_escape_codes_in_a_file() {
    let (out, err) = run_until_listening("").await;
    assert!(err.contains("INFO"), "text log lines on stderr: {err}");
    assert!(!err.contains('\u{1b}'), "no ANSI escape in a file: {err:?}");
    assert!(out.is_empty(), "nothing logged on stdout: {out}");
}

#[tokio::test]
async fn color_always_is_honoured_and_json_is_never_coloured() {
    let (_, err) = run_until_listening("color = \"always\"").await;
    assert!(
        err.contains('\u{1b}'),
        "color = always colours even a file: {err:?}"
    );
    let (_, err) = run_until_listening("format = \"json\"\ncolor = \"always\"").await;
    assert!(!err.contains('\u{1b}'), "JSON is never coloured: {err:?}");
    assert!(err.lines().all(|l| l.starts_with('{')), "JSON lines: {err}");
}
