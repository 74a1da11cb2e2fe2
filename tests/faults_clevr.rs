//! Bad input and faults of the CLEVR path, through the CLI: broken files give
//! one-line errors naming them, a run killed mid-epoch resumes without
//! losing a completed epoch (and ends where an uninterrupted run ends), a
//! diverging run stops with a message.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    assert_error_after_progress, assert_one_line_error, fresh_dir, kill_when, metric_lines, moevqa,
    ok, saved_config, saved_partial,
};

fn generate(data: &Path, train_images: &str) {
    ok(moevqa(&[
        "generate",
        "sort-of-clevr",
        "--out",
        data.to_str().unwrap(),
        "--train-images",
        train_images,
        "--val-images",
        "2",
    ]));
}

/// A small, fast training command line.
fn train_args<'a>(data: &'a str, run: &'a str, epochs: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--out",
        run,
        "--epochs",
        epochs,
        "--batch",
        "16",
        "--image-size",
        "32",
        "--g-dim",
        "16",
        "--f-dim",
        "16",
        "--question-dim",
        "16",
    ]
}

#[test]
fn broken_dataset_files_are_named() {
    let root = fresh_dir("faults-files");
    let data = root.join("data");
    generate(&data, "3");
    let d = data.to_str().unwrap();
    let run = root.join("run");
    let r = run.to_str().unwrap();

    // Missing image.
    let img = data.join("images/train/CLEVR_train_000001.png");
    let png = std::fs::read(&img).unwrap();
    std::fs::remove_file(&img).unwrap();
    assert_one_line_error(&moevqa(&train_args(d, r, "1")), "CLEVR_train_000001.png");

    // Corrupt PNG.
    std::fs::write(&img, &png[..png.len() / 3]).unwrap();
    let _ = std::fs::remove_dir_all(&run);
    assert_one_line_error(&moevqa(&train_args(d, r, "1")), "CLEVR_train_000001.png");
    std::fs::write(&img, &png).unwrap();

    // Malformed JSON: the file, line and column.
    let q = data.join("questions/CLEVR_train_questions.json");
    let text = std::fs::read_to_string(&q).unwrap();
    std::fs::write(&q, "{\n  \"questions\": [\n    {\"split\": }\n").unwrap();
    let _ = std::fs::remove_dir_all(&run);
    assert_one_line_error(
        &moevqa(&train_args(d, r, "1")),
        "CLEVR_train_questions.json: line 3",
    );
    std::fs::write(&q, text).unwrap();

    // An output directory that cannot be created (its parent is a file).
    let file = root.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("run");
    assert_one_line_error(
        &moevqa(&train_args(d, under_file.to_str().unwrap(), "1")),
        under_file.to_str().unwrap(),
    );
    let preds = file.join("preds.json");

    // With the data repaired, a run trains; then a prediction file that cannot
    // be written is named too.
    let _ = std::fs::remove_dir_all(&run);
    ok(moevqa(&train_args(d, r, "1")));
    assert_one_line_error(
        &moevqa(&[
            "predict",
            "--run",
            r,
            "--data",
            d,
            "--split",
            "val",
            "--out",
            preds.to_str().unwrap(),
        ]),
        "preds.json",
    );

    // A checkpoint from another configuration: resume with other flags, and
    // a config.json edited under a checkpoint.
    let mut other = train_args(d, r, "2");
    other.extend(["--k", "6", "--resume"]);
    assert_one_line_error(
        &moevqa(&other),
        "other settings than given now: --k (saved 12, given 6)",
    );
    let cfg_path = run.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["g_dim"] = serde_json::json!(24);
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_one_line_error(&moevqa(&["eval", "--run", r, "--data", d]), "checkpoint");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_diverging_run_stops_with_a_message() {
    let root = fresh_dir("faults-nan");
    let data = root.join("data");
    generate(&data, "4");
    let run = root.join("run");
    let mut args = train_args(data.to_str().unwrap(), run.to_str().unwrap(), "3");
    args.extend(["--lr", "1e30", "--warmup-epochs", "0"]);
    let out = moevqa(&args);
    assert_error_after_progress(&out, "training diverged");
    // No epoch was recorded as if it had succeeded.
    assert!(!run.join("checkpoint/model.bpk").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

fn saved_epoch(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("checkpoint/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["epoch"].as_u64()
}

#[test]
fn a_run_killed_mid_epoch_resumes_from_its_last_checkpoint() {
    let root = fresh_dir("faults-kill");
    let data = root.join("data");
    generate(&data, "24");
    let d = data.to_str().unwrap();
    let killed = root.join("killed");
    let k = killed.to_str().unwrap();

    // Into epoch 2, then SIGKILL.
    kill_when(&train_args(d, k, "3"), Duration::from_millis(150), || {
        saved_epoch(&killed) == Some(1)
    });
    assert_eq!(
        saved_epoch(&killed),
        Some(1),
        "epoch 2 finished before the kill: the test did not kill mid-epoch"
    );

    let mut resume = train_args(d, k, "3");
    resume.push("--resume");
    let out = ok(moevqa(&resume));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("resuming after epoch 1\n"), "{said}");
    let resumed = metric_lines(&killed);
    assert_eq!(
        resumed
            .iter()
            .map(|l| l["epoch"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    // The interruption changes nothing: same losses as a run never killed.
    let whole = root.join("whole");
    ok(moevqa(&train_args(d, whole.to_str().unwrap(), "3")));
    let straight = metric_lines(&whole);
    eprintln!(
        "{:?}",
        resumed
            .iter()
            .map(|l| l["train_loss"].clone())
            .collect::<Vec<_>>()
    );
    eprintln!(
        "{:?}",
        straight
            .iter()
            .map(|l| l["train_loss"].clone())
            .collect::<Vec<_>>()
    );
    for (a, b) in resumed.iter().zip(&straight) {
        assert_eq!(a["train_loss"], b["train_loss"]);
        assert_eq!(a["val"]["accuracy"], b["val"]["accuracy"]);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// [`train_args`] for 2 epochs with a checkpoint every 64 questions.
fn mid_args<'a>(data: &'a str, run: &'a str) -> Vec<&'a str> {
    let mut a = train_args(data, run, "2");
    a.extend(["--checkpoint-every", "64"]);
    a
}

#[test]
fn a_run_killed_after_a_mid_epoch_checkpoint_resumes_from_it() {
    let root = fresh_dir("faults-mid");
    let data = root.join("data");
    generate(&data, "24");
    let d = data.to_str().unwrap();
    let killed = root.join("killed");
    let k = killed.to_str().unwrap();
    // 480 questions an epoch in batches of 16, a checkpoint every 64.
    // Stop it inside epoch 1, after its first checkpoint there.
    kill_when(&mid_args(d, k), Duration::ZERO, || {
        saved_partial(&killed).is_some()
    });
    let partial = saved_partial(&killed).expect("killed inside the epoch");
    assert_eq!(partial["epoch"], 0, "{partial}");
    let seen = partial["seen"].as_u64().unwrap();
    assert!(
        (64..480).contains(&seen) && seen.is_multiple_of(16),
        "{partial}"
    );
    assert_eq!(saved_epoch(&killed), Some(0));

    let mut resume = mid_args(d, k);
    resume.push("--resume");
    let out = ok(moevqa(&resume));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("resuming after epoch 0 and {seen} questions")),
        "{said}"
    );
    let resumed = metric_lines(&killed);
    assert_eq!(resumed.len(), 2);
    // Nothing is lost or repeated: the epoch's questions and sums, and what
    // follows, are those of a run never stopped (same flags).
    let whole = root.join("whole");
    ok(moevqa(&mid_args(d, whole.to_str().unwrap())));
    let straight = metric_lines(&whole);
    for (a, b) in resumed.iter().zip(&straight) {
        for key in ["train_loss", "train_accuracy"] {
            assert_eq!(a[key], b[key], "{key}: {a} vs {b}");
        }
        assert_eq!(a["val"]["accuracy"], b["val"]["accuracy"]);
        assert_eq!(a["val"]["by_family"], b["val"]["by_family"]);
    }
    // The end of an epoch clears the mid-epoch state.
    assert_eq!(saved_partial(&killed), None);
    assert_eq!(saved_epoch(&killed), Some(2));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_resume_may_add_mid_epoch_checkpoints() {
    let root = fresh_dir("faults-add-mid");
    let data = root.join("data");
    generate(&data, "24");
    let d = data.to_str().unwrap();
    let run = root.join("run");
    let r = run.to_str().unwrap();
    let saved_every = || saved_config(&run)["checkpoint_every"].clone();
    let resume = |epochs: &'static str, extra: &[&'static str]| {
        let mut a = train_args(d, r, epochs);
        a.push("--resume");
        a.extend(extra);
        a
    };
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    // A run started without mid-epoch checkpoints, resumed with them: said
    // on stderr and kept in the config.
    ok(moevqa(&train_args(d, r, "1")));
    let said = stderr(&ok(moevqa(&resume("2", &["--checkpoint-every", "64"]))));
    assert!(
        said.contains("note: --checkpoint-every changes from 0 to 64"),
        "{said}"
    );
    assert_eq!(saved_every(), 64);
    // Left out on the next resume, the run keeps its own: it checkpoints
    // inside epoch 3 (seen by stopping it there).
    kill_when(&resume("3", &[]), Duration::ZERO, || {
        saved_partial(&run).is_some()
    });
    let partial = saved_partial(&run).expect("a checkpoint inside epoch 3");
    assert_eq!(partial["epoch"], 2, "{partial}");
    // Changed again on a resume inside the epoch: said, and the run ends.
    let said = stderr(&ok(moevqa(&resume("3", &["--checkpoint-every", "96"]))));
    assert!(
        said.contains("note: --checkpoint-every changes from 64 to 96")
            && said.contains("resuming after epoch 2 and"),
        "{said}"
    );
    assert_eq!(metric_lines(&run).len(), 3);
    assert_eq!(saved_every(), 96);
    // The same again: no note.
    let said = stderr(&ok(moevqa(&resume("4", &[]))));
    assert!(!said.contains("note:"), "{said}");
    assert_eq!((metric_lines(&run).len(), saved_every()), (4, 96.into()));
    // Any other setting still has to match.
    assert_error_after_progress(
        &moevqa(&resume("5", &["--k", "6"])),
        "--k (saved 12, given 6)",
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_resume_may_start_a_run_or_read_its_data_from_elsewhere() {
    let root = fresh_dir("faults-moved-data");
    let data = root.join("data");
    generate(&data, "3");
    let run = root.join("run");
    let r = run.to_str().unwrap();
    // --resume where no run is yet starts one, and says so (a mistyped
    // --out must not pass for a resumed run).
    let mut first = train_args(data.to_str().unwrap(), r, "1");
    first.push("--resume");
    let out = ok(moevqa(&first));
    let said = String::from_utf8_lossy(&out.stderr);
    let fresh = format!("note: {r} holds no checkpoint: --resume starts a new run there");
    assert!(said.contains(&fresh), "{said}");
    // The dataset moved: the run goes on from it, says so, and keeps the
    // new place for its next resume.
    let moved = root.join("moved");
    std::fs::rename(&data, &moved).unwrap();
    let m = moved.to_str().unwrap();
    let mut resume = train_args(m, r, "2");
    resume.push("--resume");
    let out = ok(moevqa(&resume));
    let said = String::from_utf8_lossy(&out.stderr);
    let note = format!("note: --data changes from {} to {m}", data.display());
    assert!(
        said.contains(&note) && !said.contains("holds no checkpoint"),
        "{said}"
    );
    assert_eq!(metric_lines(&run).len(), 2);
    let cfg = saved_config(&run);
    assert_eq!(cfg["data"], m);
    // Another dataset (other words and answers) is refused, and the run is
    // left as it was.
    let other = root.join("other");
    ok(moevqa(&[
        "generate",
        "clevr-2d",
        "--out",
        other.to_str().unwrap(),
        "--train-images",
        "3",
        "--val-images",
        "2",
    ]));
    let mut elsewhere = train_args(other.to_str().unwrap(), r, "3");
    elsewhere.push("--resume");
    let needle = format!(
        "--data {}: its train split gives other word or answer vocabularies than the run's {}",
        other.display(),
        run.join("vocab.json").display()
    );
    assert_error_after_progress(&moevqa(&elsewhere), &needle);
    assert_eq!(metric_lines(&run).len(), 2);
    assert_eq!(saved_config(&run), cfg);
    // Same words and answers, other data: the questions in another order
    // (the run's batches would differ) are told from the run's data by the
    // fingerprint saved in data.json, not by the vocabularies.
    let fingerprint = run.join("data.json");
    let saved_fp = std::fs::read_to_string(&fingerprint).unwrap();
    let questions = moved.join("questions/CLEVR_train_questions.json");
    let mut qs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&questions).unwrap()).unwrap();
    qs["questions"].as_array_mut().unwrap().reverse();
    std::fs::write(&questions, serde_json::to_vec(&qs).unwrap()).unwrap();
    let mut reordered = train_args(m, r, "3");
    reordered.push("--resume");
    let needle = format!("--data {m}: its train split (60 questions, crc32 ");
    let refused = moevqa(&reordered);
    assert_error_after_progress(&refused, &needle);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("is not the one the run was trained on (60 questions, crc32 ")
            && said.contains(&format!("in {}); ", fingerprint.display())),
        "{said}"
    );
    assert_eq!(metric_lines(&run).len(), 2);
    assert_eq!(std::fs::read_to_string(&fingerprint).unwrap(), saved_fp);
    // The user may accept the new data by removing the file: the run goes
    // on and records the new fingerprint.
    std::fs::remove_file(&fingerprint).unwrap();
    ok(moevqa(&reordered));
    assert_eq!(metric_lines(&run).len(), 3);
    assert_ne!(std::fs::read_to_string(&fingerprint).unwrap(), saved_fp);
    // A run whose checkpoint is gone but whose epochs are recorded is not
    // started over on --resume.
    std::fs::remove_dir_all(run.join("checkpoint")).unwrap();
    assert_one_line_error(&moevqa(&resume), "metrics.jsonl but no complete checkpoint");
    assert_eq!(metric_lines(&run).len(), 3);
    std::fs::remove_dir_all(&root).unwrap();
}
