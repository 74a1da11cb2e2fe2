//! End to end through the CLI on a tiny generated set: generate, train,
//! eval at another k, refuse to overwrite, resume, same seed same result.

mod common;

use std::path::Path;

use common::{assert_one_line_error, metric_lines, moevqa, ok, stdout_json, stdout_lines};

#[test]
fn generate_train_eval_predict_answer_resume() {
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
    let out = ok(train(&run, "1", &["--json"]));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("(best so far: RUN/best)"), "{said}");
    // --json: this invocation's epochs on stdout, as appended to metrics.jsonl.
    let printed = stdout_lines(&out);
    assert_eq!(printed.len(), 1);
    assert_eq!(printed[0]["epoch"], 1);
    assert_eq!(printed[0]["val"]["questions"], 40);
    for f in [
        "config.json",
        "vocab.json",
        "metrics.jsonl",
        "checkpoint/model.bpk",
        "checkpoint/optimizer.bpk",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    assert_eq!(metric_lines(&run), printed);

    let r = run.to_str().unwrap();
    // report: the recorded epoch as one JSON row and as a Markdown table.
    let rep = ok(moevqa(&["report", "--run", r, "--json"]));
    let row = stdout_json(&rep);
    assert_eq!(row["epoch"], 1);
    assert_eq!(row["val"], printed[0]["val"]["accuracy"]);
    assert_eq!(row["families"], printed[0]["val"]["by_family"]);
    assert!(row["relational"].is_number() && row["non_relational"].is_number());
    let md = String::from_utf8(ok(moevqa(&["report", "--run", r])).stdout).unwrap();
    assert_eq!(md.lines().count(), 3, "{md}");
    assert!(
        md.lines().nth(2).unwrap().starts_with("| run | 12 | 1 |"),
        "{md}"
    );
    let out = ok(moevqa(&[
        "eval", "--run", r, "--data", d, "--k", "3", "--json",
    ]));
    let v = stdout_json(&out);
    assert_eq!(v["k"], 3);
    assert_eq!(v["questions"], 40);
    let acc = v["accuracy"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&acc));
    assert!(v["cnn_macs_per_image"].as_u64().unwrap() > 0);
    let usage = v["expert_usage"].as_array().unwrap();
    assert_eq!(usage.len(), 3);
    // The dead-unit probe: all 40 val questions (fewer than 128), g's four
    // layers and f's two, shares in [0, 1]; the epoch's metrics carry it too.
    let dead = &v["dead_units"];
    assert_eq!(dead["questions"], 40);
    let shares: Vec<f64> = ["g", "f"]
        .iter()
        .flat_map(|l| {
            dead[l]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
        })
        .collect();
    assert_eq!(shares.len(), 6, "{dead}");
    assert!(shares.iter().all(|x| (0.0..=1.0).contains(x)), "{dead}");
    assert_eq!(
        printed[0]["val"]["dead_units"]["g"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let total: u64 = usage[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(total, 40 * 3);
    // The same per question type: the types add up to the whole, and the
    // specialisation of each block is a distance in [0, 1).
    let per_family = v["expert_usage_per_family"].as_object().unwrap();
    assert_eq!(per_family.len(), v["by_family"].as_object().unwrap().len());
    let counts =
        |u: &serde_json::Value| -> Vec<Vec<u64>> { serde_json::from_value(u.clone()).unwrap() };
    let mut summed = vec![vec![0u64; 12]; 3];
    for u in per_family.values() {
        for (s, row) in summed.iter_mut().zip(counts(u)) {
            for (a, c) in s.iter_mut().zip(row) {
                *a += c;
            }
        }
    }
    assert_eq!(summed, counts(&v["expert_usage"]));
    let spec = v["specialisation"].as_array().unwrap();
    assert_eq!(spec.len(), 3, "{spec:?}");
    assert!(
        spec.iter()
            .all(|x| (0.0..1.0).contains(&x.as_f64().unwrap()))
    );
    assert!(
        v["by_family"]
            .as_object()
            .unwrap()
            .contains_key("query_shape")
    );
    // The default engine on the CPU is the fast path; Burn's own ops give
    // the same answers and experts.
    let burn = ok(moevqa(&[
        "eval",
        "--run",
        r,
        "--data",
        d,
        "--k",
        "3",
        "--json",
        "--engine",
        "burn",
        "--confusion",
    ]));
    let b = stdout_json(&burn);
    for key in ["accuracy", "by_family", "expert_usage"] {
        assert_eq!(b[key], v[key], "{key}");
    }
    // --confusion: per question type, right answer against given answer.
    // Every val question lands once, and the right-and-given cells of a
    // type give its accuracy.
    assert!(v.get("confusion").is_none(), "{v}");
    let confusion = b["confusion"].as_object().unwrap();
    assert_eq!(confusion.len(), v["by_family"].as_object().unwrap().len());
    let (mut questions, mut majority_hits) = (0, 0);
    for (family, by_right) in confusion {
        let (mut right, mut all) = (0, 0);
        // Questions per right answer, for the majority baseline.
        let mut with_answer = std::collections::BTreeMap::new();
        for (answer, given) in by_right.as_object().unwrap() {
            for (g, n) in given.as_object().unwrap() {
                let n = n.as_u64().unwrap();
                all += n;
                right += if g == answer { n } else { 0 };
                *with_answer.entry(answer.as_str()).or_insert(0) += n;
            }
        }
        let pct = 100.0 * right as f64 / all as f64;
        let want = v["by_family"][family].as_f64().unwrap();
        assert!((pct - want).abs() < 1e-9, "{family}: {pct} against {want}");
        // The baseline beside it: the type's commonest right answer.
        let most = *with_answer.values().max().unwrap();
        let m = &v["majority_by_family"][family];
        assert_eq!(with_answer[m["answer"].as_str().unwrap()], most, "{family}");
        let share = 100.0 * most as f64 / all as f64;
        assert!(
            (m["accuracy"].as_f64().unwrap() - share).abs() < 1e-9,
            "{family}"
        );
        majority_hits += most;
        questions += all;
    }
    assert_eq!(questions, 40);
    let prior = v["majority_accuracy"].as_f64().unwrap();
    assert!((prior - 100.0 * majority_hits as f64 / 40.0).abs() < 1e-9);
    assert_eq!(
        (v["engine"].as_str(), b["engine"].as_str()),
        (Some("fast"), Some("burn"))
    );
    assert!(v["questions_per_s"].as_f64().unwrap() > 0.0);
    // The CNN's own time is measured on the fast engine only (Burn's ops
    // may run asynchronously on a GPU).
    assert!(v["cnn_ms_per_image"].as_f64().unwrap() > 0.0, "{v}");
    assert!(b.get("cnn_ms_per_image").is_none(), "{b}");
    assert_one_line_error(
        &moevqa(&["eval", "--run", r, "--data", d, "--engine", "gpu"]),
        "--engine",
    );
    // A sweep over k: one JSON line per k, the same report as a single k
    // gives, and fewer CNN MACs at smaller k; as text, a report per k then
    // a table with a row per k.
    let sweep = ok(moevqa(&[
        "eval", "--run", r, "--data", d, "--k", "12", "--k", "3", "--json",
    ]));
    let lines = stdout_lines(&sweep);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["k"].as_u64(), lines[1]["k"].as_u64()),
        (Some(12), Some(3))
    );
    for key in [
        "accuracy",
        "by_family",
        "expert_usage",
        "cnn_macs_per_image",
    ] {
        assert_eq!(lines[1][key], v[key], "{key}");
    }
    assert!(
        lines[0]["cnn_macs_per_image"].as_u64() > lines[1]["cnn_macs_per_image"].as_u64(),
        "{lines:?}"
    );
    let png = root.join("sweep.png");
    let p = png.to_str().unwrap();
    let text = String::from_utf8(
        ok(moevqa(&[
            "eval", "--run", r, "--data", d, "--k", "12", "--k", "6", "--k", "3", "--plot", p,
        ]))
        .stdout,
    )
    .unwrap();
    // The sweep's plot: accuracy against MACs and against measured time.
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1200, 500));
    assert!(text.contains("wrote "), "{text}");
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("by k"))
        .skip(2)
        .take_while(|l| !l.starts_with("wrote "))
        .collect();
    let ks: Vec<&str> = table
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(ks, ["12", "6", "3"], "{text}");
    // Which experts each question type chose: a panel per block.
    let experts = root.join("experts.png");
    let e = experts.to_str().unwrap();
    let said = ok(moevqa(&[
        "eval",
        "--run",
        r,
        "--data",
        d,
        "--k",
        "3",
        "--plot-experts",
        e,
        "--confusion",
    ]));
    let said = String::from_utf8_lossy(&said.stdout);
    assert!(said.contains("wrote "), "{said}");
    assert!(
        said.contains("most frequent wrong answers") || said.contains("no wrong answers"),
        "{said}"
    );
    let img = image::open(&experts).unwrap().to_rgb8();
    assert_eq!(img.width(), 1200);
    assert_one_line_error(
        &moevqa(&[
            "eval",
            "--run",
            r,
            "--data",
            d,
            "--k",
            "6",
            "--k",
            "3",
            "--plot-experts",
            e,
        ]),
        "--plot-experts",
    );
    assert_one_line_error(
        &moevqa(&["eval", "--run", r, "--data", d, "--k", "0"]),
        "--k 0",
    );
    // A plot that cannot be written is refused before the evaluation (no
    // report on stdout).
    std::fs::create_dir_all(root.join("a-folder.png")).unwrap();
    for bad in ["sweep.txt", "no/such/dir/sweep.png", "a-folder.png"] {
        let bad = root.join(bad);
        let b = bad.to_str().unwrap();
        let out = moevqa(&["eval", "--run", r, "--data", d, "--k", "3", "--plot", b]);
        assert_one_line_error(&out, b);
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

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

    // RUN/best holds the end of the first epoch with the highest val
    // accuracy; `--checkpoint best` evaluates it, `last` the last epoch.
    let val = |l: &serde_json::Value| l["val"]["accuracy"].as_f64().unwrap();
    let top = if val(&lines[1]) > val(&lines[0]) {
        1
    } else {
        0
    };
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("best/state.json")).unwrap()).unwrap();
    assert_eq!(kept["epoch"], lines[top]["epoch"]);
    for (which, line) in [("best", &lines[top]), ("last", &lines[1])] {
        let args = ["eval", "--run", r, "--data", d, "--checkpoint", which];
        let out = ok(moevqa(&[&args[..], &["--json"]].concat()));
        assert_eq!(
            stdout_json(&out)["accuracy"],
            line["val"]["accuracy"],
            "{which}"
        );
        // `best` says which epoch it loads.
        let said = String::from_utf8_lossy(&out.stderr);
        let note = format!("best is the end of epoch {}", line["epoch"]);
        assert_eq!(said.contains(&note), which == "best", "{said}");
    }
    assert_one_line_error(
        &moevqa(&["eval", "--run", r, "--data", d, "--checkpoint", "first"]),
        "--checkpoint",
    );
    // Without RUN/best, `--checkpoint best` names it; a resume puts it back
    // (the end of a run's last epoch is its best here: one epoch).
    let tw = twin.to_str().unwrap();
    std::fs::remove_dir_all(twin.join("best")).unwrap();
    let img = data.join("images/val/CLEVR_val_000000.png");
    let answer_best = [
        "answer",
        "--run",
        tw,
        "--image",
        img.to_str().unwrap(),
        "--question",
        "What is the shape of the red object?",
        "--checkpoint",
        "best",
    ];
    assert_one_line_error(&moevqa(&answer_best), &format!("{tw}/best: no checkpoint"));
    ok(train(&twin, "1", &["--resume"]));
    ok(moevqa(&answer_best));

    // A test split without answers or programs still predicts.
    let val_q: serde_json::Value = serde_json::from_slice(
        &std::fs::read(data.join("questions/CLEVR_val_questions.json")).unwrap(),
    )
    .unwrap();
    let test_q: Vec<serde_json::Value> = val_q["questions"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, q)| {
            serde_json::json!({"split": "test", "question_index": i, "image_index": q["image_index"],
                "image_filename": q["image_filename"], "question": q["question"]})
        })
        .collect();
    std::fs::write(
        data.join("questions/CLEVR_test_questions.json"),
        serde_json::to_vec(&serde_json::json!({"info": {}, "questions": test_q})).unwrap(),
    )
    .unwrap();
    let test_images = data.join("images/test");
    std::fs::create_dir_all(&test_images).unwrap();
    for e in std::fs::read_dir(data.join("images/val")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), test_images.join(e.file_name())).unwrap();
    }
    let preds_path = root.join("preds.json");
    let said = ok(moevqa(&[
        "predict",
        "--run",
        r,
        "--data",
        d,
        "--split",
        "test",
        "--out",
        preds_path.to_str().unwrap(),
        "--json",
    ]));
    let said = stdout_json(&said);
    assert_eq!(said["predictions"], 40);
    assert_eq!(said["split"], "test");
    let preds: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&preds_path).unwrap()).unwrap();
    assert_eq!(preds.len(), 40);
    assert_eq!(preds[7]["question_index"], 7);
    assert!(
        preds
            .iter()
            .all(|p| p["answer"].as_str().is_some_and(|a| !a.is_empty()))
    );

    // One question about one image.
    let img = data.join("images/val/CLEVR_val_000000.png");
    let img = img.to_str().unwrap();
    let out = ok(moevqa(&[
        "answer",
        "--run",
        r,
        "--image",
        img,
        "--question",
        "What is the shape of the red object?",
        "--k",
        "6",
        "--json",
    ]));
    let a = stdout_json(&out);
    let p = a["probability"].as_f64().unwrap();
    assert!(p > 0.0 && p <= 1.0);
    let experts = a["experts"].as_array().unwrap();
    assert_eq!(experts.len(), 3);
    assert!(experts.iter().all(|b| b.as_array().unwrap().len() == 6));
    let unknown = moevqa(&[
        "answer",
        "--run",
        r,
        "--image",
        img,
        "--question",
        "xyzzy plugh",
    ]);
    assert!(
        !unknown.status.success()
            && String::from_utf8_lossy(&unknown.stderr).contains("vocabulary")
    );
    let missing = moevqa(&[
        "answer",
        "--run",
        r,
        "--image",
        "/nonexistent.png",
        "--question",
        "What shape?",
    ]);
    assert!(
        !missing.status.success()
            && String::from_utf8_lossy(&missing.stderr).contains("/nonexistent.png")
    );

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

#[test]
fn demo_runs_on_a_tiny_set() {
    let root = std::env::temp_dir().join(format!("moevqa-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let out = ok(moevqa(&[
        "demo",
        "--out",
        root.to_str().unwrap(),
        "--train-images",
        "6",
        "--val-images",
        "2",
        "--epochs",
        "1",
        "--json",
    ]));
    let v = stdout_json(&out);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r["k"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![12, 6]
    );
    assert!(rows[1]["cnn_macs"].as_u64().unwrap() < rows[0]["cnn_macs"].as_u64().unwrap());
    let base = v["majority_baseline"].as_f64().unwrap();
    assert!(base > 0.0 && base <= 100.0);
    assert_eq!(v["val_questions"], 40);
    std::fs::remove_dir_all(&root).unwrap();
}
