//! The command line: JSON shapes, and one-line errors with a non-zero exit.

mod common;

use common::{assert_one_line_error, moevqa, moevqa_env, ok, stdout_json};

#[test]
fn flops_json_has_the_documented_shape() {
    let out = moevqa(&["flops", "--model", "clevr", "--json"]);
    assert!(out.status.success());
    let v = stdout_json(&out);
    assert_eq!(v["model"], "clevr");
    assert_eq!(v["input"], serde_json::json!([128, 128]));
    let rows = v["rows"].as_array().unwrap();
    let ks: Vec<_> = rows.iter().map(|r| r["k"].clone()).collect();
    assert_eq!(
        ks,
        vec![serde_json::Value::Null, 12.into(), 6.into(), 3.into()]
    );
    for r in rows {
        let (c, g, t) = (
            r["cnn_macs"].as_u64().unwrap(),
            r["gate_macs"].as_u64().unwrap(),
            r["total_macs"].as_u64().unwrap(),
        );
        assert_eq!(c + g, t);
    }
    assert_eq!(rows[0]["gate_macs"], 0);
    let custom = moevqa(&["flops", "--model", "vqa", "--k", "4", "--k", "2", "--json"]);
    let v = stdout_json(&custom);
    assert_eq!(v["rows"].as_array().unwrap().len(), 3);
    assert_eq!(v["input"], serde_json::json!([224, 224]));
}

#[test]
fn flops_table_names_the_paper() {
    let out = moevqa(&["flops", "--model", "vqa"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("baseline") && s.contains("1.56e11") && s.contains("4.59e10"),
        "{s}"
    );
}

#[test]
fn bench_block_json_has_the_documented_keys() {
    let out = moevqa(&[
        "bench",
        "block",
        "--preset",
        "clevr-conv4",
        "--batch",
        "2",
        "--k",
        "3",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    let v = stdout_json(&ok(out));
    for key in [
        "preset",
        "batch",
        "k",
        "dense_ms",
        "sparse_ms",
        "speedup",
        "flops_ratio",
        "efficiency",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["k"], 3);
    let ratio = v["flops_ratio"].as_f64().unwrap();
    assert!(ratio > 1.0 && ratio < 4.0, "{ratio}");
    assert!(v["max_rel_diff"].as_f64().unwrap() < 1e-4);
    let list = moevqa(&["bench", "block", "--preset", "list"]);
    let s = String::from_utf8_lossy(&list.stdout);
    assert!(s.contains("resnext101-conv3") && s.contains("clevr-conv2"));
}

#[test]
fn bad_input_gives_one_line_errors() {
    assert_one_line_error(
        &moevqa(&["flops", "--model", "alexnet"]),
        "unknown model 'alexnet'",
    );
    assert_one_line_error(&moevqa(&["flops", "--model", "clevr", "--k", "0"]), "k = 0");
    assert_one_line_error(
        &moevqa(&["flops", "--model", "clevr", "--k", "13"]),
        "k = 13",
    );
    assert_one_line_error(
        &moevqa(&["flops", "--model", "clevr", "--input", "0"]),
        "--input",
    );
    assert_one_line_error(
        &moevqa(&["bench", "block", "--preset", "nope"]),
        "unknown preset 'nope'",
    );
    assert_one_line_error(
        &moevqa(&["bench", "block", "--preset", "clevr-conv2", "--k", "0"]),
        "k = 0",
    );
    assert_one_line_error(
        &moevqa(&["bench", "block", "--preset", "clevr-conv2", "--k", "99"]),
        "--k: k = 99",
    );
    assert_one_line_error(
        &moevqa(&["bench", "cnn", "--model", "clevr", "--k", "13"]),
        "--k: k = 13",
    );
    assert_one_line_error(
        &moevqa(&["bench", "cnn", "--model", "alexnet"]),
        "--model: unknown model 'alexnet'",
    );
    assert_one_line_error(&moevqa(&["bench", "train", "--k", "0"]), "--k: k = 0");
    assert_one_line_error(
        &moevqa(&["bench", "train", "--g-dim", "0"]),
        "--g-dim and --f-dim must be at least 1",
    );
    assert_one_line_error(
        &moevqa(&["plot", "--run", "/nonexistent/run", "--out", "/tmp/x.png"]),
        "/nonexistent/run/metrics.jsonl",
    );
    let run = common::fresh_dir("plot-empty");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"epoch\":1,\"val\":null}\n").unwrap();
    let r = run.to_str().unwrap();
    let png = run.join("x.png");
    assert_one_line_error(
        &moevqa(&["plot", "--run", r, "--out", png.to_str().unwrap()]),
        "--run: no accuracy",
    );
    assert!(!png.exists());
    assert_one_line_error(
        &moevqa(&["bench", "block", "--preset", "clevr-conv2", "--batch", "0"]),
        "--batch 0 is invalid",
    );
    assert_one_line_error(
        &moevqa(&["bench", "block", "--preset", "clevr-conv2", "--iters", "0"]),
        "--iters",
    );
    assert_one_line_error(
        &moevqa(&[
            "--device",
            "tpu",
            "bench",
            "block",
            "--preset",
            "clevr-conv2",
        ]),
        "--device 'tpu'",
    );
}

#[test]
fn generate_sort_of_clevr_writes_the_layout_and_reports_errors() {
    let dir = std::env::temp_dir().join(format!("moevqa-cli-soc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let out = moevqa(&[
        "generate",
        "sort-of-clevr",
        "--out",
        d,
        "--train-images",
        "4",
        "--val-images",
        "2",
        "--json",
    ]);
    let v = stdout_json(&ok(out));
    assert_eq!(v["train_questions"], 80);
    assert_eq!(v["val_questions"], 40);
    for f in [
        "questions/CLEVR_train_questions.json",
        "questions/CLEVR_val_questions.json",
        "scenes/CLEVR_val_scenes.json",
        "images/train/CLEVR_train_000003.png",
        "images/val/CLEVR_val_000001.png",
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    // RAYON_NUM_THREADS=3: the thread count reported is the pool's that
    // decoded, not the machine's.
    let out = moevqa_env(
        &[
            "bench",
            "loader",
            "--data",
            d,
            "--batch",
            "3",
            "--batches",
            "2",
            "--size",
            "32",
            "--json",
        ],
        &[("RAYON_NUM_THREADS", "3")],
    );
    let v = stdout_json(&ok(out));
    assert_eq!(v["images"], 6);
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["threads"], 3);
    assert_one_line_error(
        &moevqa(&["bench", "loader", "--data", d, "--split", "test"]),
        "not a dataset directory",
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // A file where the directory should go.
    let file = std::env::temp_dir().join(format!("moevqa-cli-file-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let f = file.to_str().unwrap();
    assert_one_line_error(
        &moevqa(&[
            "generate",
            "sort-of-clevr",
            "--out",
            f,
            "--train-images",
            "1",
        ]),
        f,
    );
    std::fs::remove_file(file).unwrap();
}

#[test]
fn bench_fast_engine_and_whole_cnn_json() {
    let out = moevqa(&[
        "bench",
        "block",
        "--preset",
        "clevr-conv3",
        "--batch",
        "2",
        "--k",
        "6",
        "--iters",
        "1",
        "--engine",
        "fast",
        "--json",
    ]);
    let v = stdout_json(&ok(out));
    assert_eq!(v["engine"], "fast");
    assert!(v["max_rel_diff"].as_f64().unwrap() < 1e-4);
    let out = moevqa(&[
        "bench", "cnn", "--model", "clevr", "--batch", "2", "--k", "6", "--input", "64", "--iters",
        "1", "--json",
    ]);
    let v = stdout_json(&ok(out));
    for key in [
        "dense_ms",
        "sparse_ms",
        "efficiency",
        "dense_macs",
        "sparse_macs",
        "max_rel_diff",
    ] {
        assert!(v[key].as_f64().is_some(), "missing {key}");
    }
    assert!(v["max_rel_diff"].as_f64().unwrap() < 1e-4);
    // The JSON's iteration count is what was timed: at least --iters.
    assert!(v["iters"].as_u64().unwrap() >= 1);
    assert_one_line_error(
        &moevqa(&[
            "bench",
            "block",
            "--preset",
            "clevr-conv3",
            "--engine",
            "gpu",
        ]),
        "--engine",
    );
    // --profile: the bench row plus, per network, every block's time.
    let out = moevqa(&[
        "bench",
        "cnn",
        "--model",
        "clevr",
        "--batch",
        "2",
        "--k",
        "3",
        "--input",
        "64",
        "--iters",
        "2",
        "--profile",
        "--json",
    ]);
    let v = stdout_json(&ok(out));
    assert!(v["bench"]["efficiency"].as_f64().is_some());
    for (net, gated) in [("dense", false), ("sparse", true)] {
        let p = &v["profile"][net];
        let blocks = p["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 3, "the CLEVR CNN has 3 blocks");
        assert!(blocks.iter().all(|t| t.as_f64().unwrap() > 0.0));
        assert!(p["stem"].as_f64().unwrap() > 0.0);
        assert_eq!(p["gates"].as_f64().unwrap() > 0.0, gated, "{net}: {p}");
    }
    assert_one_line_error(
        &moevqa(&[
            "bench",
            "cnn",
            "--model",
            "clevr",
            "--engine",
            "burn",
            "--profile",
        ]),
        "--profile",
    );
    // bench train: the widths asked for are the widths timed (and echoed).
    let out = moevqa(&[
        "bench",
        "train",
        "--batch",
        "2",
        "--k",
        "6",
        "--image-size",
        "32",
        "--g-dim",
        "16",
        "--f-dim",
        "8",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    let t = stdout_json(&ok(out));
    assert_eq!(
        (t["g_dim"].as_u64(), t["f_dim"].as_u64()),
        (Some(16), Some(8))
    );
    assert!(t["questions_per_s"].as_f64().unwrap() > 0.0);
}

/// A reader that closes the pipe early (`moevqa ... | head -c 10`) ends the
/// command by SIGPIPE, as with any Unix filter, not by a panic.
#[cfg(unix)]
#[test]
fn a_closed_stdout_pipe_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let (reader, writer) = std::io::pipe().unwrap();
    // Closed before the child writes its first byte: deterministic EPIPE.
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_moevqa"))
        .args(["flops", "--model", "vqa", "--json"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}
