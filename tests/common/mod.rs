//! Helpers shared by the CLI tests: run the binary, check success or a
//! one-line error.
#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs the built `moevqa` binary with `args`.
pub fn moevqa(args: &[&str]) -> Output {
    moevqa_env(args, &[])
}

/// Runs the built `moevqa` binary with `args` and extra environment `vars`.
pub fn moevqa_env(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moevqa"))
        .args(args)
        .envs(vars.iter().copied())
        .output()
        .expect("run moevqa")
}

/// Asserts success and returns the output.
pub fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts a non-zero exit with one `error: ...` line containing `needle`.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(
        !out.status.success(),
        "expected failure, got {:?}",
        out.status
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{err:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Asserts a non-zero exit whose last stderr line is one `error: ...` line
/// containing `needle` (progress lines of a long job may come before it).
pub fn assert_error_after_progress(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: ") && last.contains(needle),
        "{err:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Each line of `text` parsed as JSON.
pub fn parse_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The one JSON document a command printed on stdout.
pub fn stdout_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// The JSON lines a command printed on stdout.
pub fn stdout_lines(out: &Output) -> Vec<serde_json::Value> {
    parse_lines(&String::from_utf8_lossy(&out.stdout))
}

/// The JSON lines of a run's `metrics.jsonl`.
pub fn metric_lines(run: &Path) -> Vec<serde_json::Value> {
    parse_lines(&std::fs::read_to_string(run.join("metrics.jsonl")).unwrap())
}

/// A run's `config.json`.
pub fn saved_config(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap()
}

/// A fresh, empty directory for a test.
pub fn fresh_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moevqa-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs moevqa with `args` until `ready` holds (checked every 2 ms; the
/// run must not end first), waits `after`, then kills it (SIGKILL).
pub fn kill_when<S: AsRef<std::ffi::OsStr>>(args: &[S], after: Duration, ready: impl Fn() -> bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moevqa"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "run ended before it was killed"
        );
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(after);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The `partial` of a run's checkpoint state (set by a checkpoint taken
/// inside an epoch), if any; from `checkpoint.old` when a save was
/// stopped between its two renames (as `--resume` reads it then).
pub fn saved_partial(run: &Path) -> Option<serde_json::Value> {
    let state = ["checkpoint/state.json", "checkpoint.old/state.json"]
        .iter()
        .find_map(|f| std::fs::read_to_string(run.join(f)).ok())?;
    let v: serde_json::Value = serde_json::from_str(&state).ok()?;
    v.get("partial").filter(|p| !p.is_null()).cloned()
}
