//! End to end through the CLI on a tiny generated set: generate, train,
//! eval at another k, refuse to overwrite, resume, same seed same result.

use std::path::Path;
use std::process::{Command, Output};

fn moevqa(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moevqa"))
        .args(args)
        .output()
        .expect("run moevqa")
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn metric_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_train_eval_resume() {
    let root = std::env::temp_dir().join(format!("moevqa-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    let d = data.to_str().unwrap();
    ok(moevqa(&[
        "generate",
        "sort-of-clevr",
        "--out",
        d,
        "--train-images",
        "8",
        "--val-images",
        "2",
    ]));
    let train = |run: &Path, epochs: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            d,
            "--out",
            run.to_str().unwrap(),
            "--epochs",
            epochs,
            "--batch",
            "16",
            "--image-size",
            "48",
            "--g-dim",
            "16",
            "--f-dim",
            "16",
            "--question-dim",
            "16",
            "--lr",
            "1e-3",
        ];
        args.extend_from_slice(extra);
        moevqa(&args)
    };
    let run = root.join("run");
    ok(train(&run, "1", &[]));
    for f in [
        "config.json",
        "vocab.json",
        "metrics.jsonl",
        "checkpoint/model.bpk",
        "checkpoint/optimizer.bpk",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    assert_eq!(metric_lines(&run).len(), 1);

    let r = run.to_str().unwrap();
    let out = ok(moevqa(&[
        "eval", "--run", r, "--data", d, "--k", "3", "--json",
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["k"], 3);
    assert_eq!(v["questions"], 40);
    let acc = v["accuracy"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&acc));
    assert!(v["cnn_macs_per_image"].as_u64().unwrap() > 0);
    let usage = v["expert_usage"].as_array().unwrap();
    assert_eq!(usage.len(), 3);
    let total: u64 = usage[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(total, 40 * 3);
    assert!(
        v["by_family"]
            .as_object()
            .unwrap()
            .contains_key("query_shape")
    );

    // No silent overwrite; a resume extends the run.
    let again = train(&run, "1", &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    ok(train(&run, "2", &["--resume"]));
    let lines = metric_lines(&run);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["epoch"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2]
    );

    // Same seed, same result.
    let twin = root.join("twin");
    ok(train(&twin, "1", &[]));
    assert_eq!(metric_lines(&twin)[0]["train_loss"], lines[0]["train_loss"]);

    // Bad input: a directory that is not in the CLEVR layout.
    let bad = moevqa(&["eval", "--run", r, "--data", root.to_str().unwrap()]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("not a dataset directory") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
