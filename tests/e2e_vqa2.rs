//! VQA v2 end to end through the CLI on a tiny generated set: generate,
//! train (the modular ResNeXt-101), eval, predict test2015 in the official
//! results format, score with `vqa-score`, answer a JPEG, import CNN weights
//! from a torchvision-named safetensors file; and the bad inputs.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::{
    assert_error_after_progress, assert_one_line_error, fresh_dir, kill_when, metric_lines, moevqa,
    ok, saved_config, saved_partial, stdout_json, stdout_lines,
};
use moevqa::cnn::CnnLayout;

fn train_args<'a>(data: &'a str, run: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--dataset",
        "vqa2",
        "--data",
        data,
        "--out",
        run,
        "--epochs",
        "1",
        "--batch",
        "16",
        "--image-size",
        "32",
        "--embed-dim",
        "8",
        "--hidden",
        "16",
        "--question-dim",
        "16",
        "--min-answer-count",
        "1",
        "--k",
        "8",
    ];
    v.extend_from_slice(extra);
    v
}

/// A small generated VQA-v2-layout set at 32x32, 4 questions an image.
fn generate_small(data: &str, train: &str, val: &str, test: &str) {
    ok(moevqa(&[
        "generate",
        "vqa2",
        "--out",
        data,
        "--train-images",
        train,
        "--val-images",
        val,
        "--test-images",
        test,
        "--questions-per-image",
        "4",
        "--image-size",
        "32",
    ]));
}

#[test]
fn generate_train_eval_predict_score_answer() {
    let root = fresh_dir("e2e-vqa2");
    let data = root.join("data");
    let d = data.to_str().unwrap();
    generate_small(d, "6", "3", "2");
    let run = root.join("run");
    let r = run.to_str().unwrap();
    let out = ok(moevqa(&train_args(d, r, &["--json"])));
    let line = stdout_json(&out);
    assert_eq!(line["epoch"], 1);
    assert!(line["train_loss"].as_f64().unwrap().is_finite());
    // report reads a VQA run's val score and answer types from the real line.
    let row = stdout_json(&ok(moevqa(&["report", "--run", r, "--json"])));
    assert_eq!(row["val"], line["val"]["score"]["overall"], "{row}");
    assert!(row["val"].is_number(), "{row}");
    assert_eq!(row["families"], line["val"]["score"]["per_answer_type"]);
    assert!(!row["families"].as_object().unwrap().is_empty(), "{row}");
    assert_eq!(row["train"], line["train_score"]);
    for f in [
        "config.json",
        "vocab.json",
        "answers.json",
        "metrics.jsonl",
        "checkpoint/model.bpk",
        "best/model.bpk",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    // The best epoch so far (the only one) is kept in RUN/best and gives
    // the epoch's val score again.
    let best = stdout_json(&ok(moevqa(&[
        "eval",
        "--run",
        r,
        "--data",
        d,
        "--checkpoint",
        "best",
        "--json",
    ])));
    assert_eq!(best["accuracy"], line["val"]["score"]["overall"], "{best}");

    // Eval at another k: the official metric, MACs, expert usage.
    let ev = stdout_json(&ok(moevqa(&[
        "eval", "--run", r, "--data", d, "--k", "4", "--json",
    ])));
    assert_eq!(ev["k"], 4);
    assert_eq!(ev["questions"], 12);
    assert_eq!(ev["engine"], "fast", "the CPU default");
    assert!(ev["questions_per_s"].as_f64().unwrap() > 0.0);
    assert!(ev["cnn_ms_per_image"].as_f64().unwrap() > 0.0, "{ev}");
    let acc = ev["accuracy"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&acc));
    let usage = ev["expert_usage"].as_array().unwrap();
    assert_eq!(usage.len(), 33, "one row per block of ResNeXt-101");
    let total: u64 = usage[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(total, 12 * 4);
    assert!(ev["per_answer_type"].as_object().unwrap().len() >= 2);
    assert!(
        ev["cnn_macs_per_image_at_224"].as_u64().unwrap()
            > ev["cnn_macs_per_image"].as_u64().unwrap()
    );
    assert!(
        !ev["expert_usage_per_answer_type"]
            .as_object()
            .unwrap()
            .is_empty()
    );
    let spec = ev["specialisation"].as_array().unwrap();
    assert_eq!(spec.len(), 33, "{spec:?}");
    assert!(
        spec.iter()
            .all(|x| (0.0..1.0).contains(&x.as_f64().unwrap()))
    );
    // A sweep over k: a JSON line per k, k = 4 the report above.
    let png = root.join("sweep.png");
    let sweep = ok(moevqa(&[
        "eval",
        "--run",
        r,
        "--data",
        d,
        "--k",
        "8",
        "--k",
        "4",
        "--json",
        "--plot",
        png.to_str().unwrap(),
    ]));
    let lines = stdout_lines(&sweep);
    assert_eq!(lines.len(), 2);
    // --json keeps stdout JSON only; the plot is written beside it.
    assert_eq!(image::open(&png).unwrap().width(), 1200);
    // A split without answers has no accuracy to plot: refused at once.
    let out = moevqa(&[
        "eval",
        "--run",
        r,
        "--data",
        d,
        "--split",
        "test2015",
        "--plot",
        png.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "--plot: test2015 has no annotations");
    assert!(out.stdout.is_empty());
    // The confusion of right and given answers is for CLEVR runs.
    let out = moevqa(&["eval", "--run", r, "--data", d, "--confusion"]);
    assert_one_line_error(&out, "--confusion: CLEVR runs only");
    assert!(out.stdout.is_empty());
    assert_eq!(lines[0]["k"], 8);
    for key in ["k", "accuracy", "expert_usage", "cnn_macs_per_image"] {
        assert_eq!(lines[1][key], ev[key], "{key}");
    }
    assert!(lines[0]["cnn_macs_per_image"].as_u64() > lines[1]["cnn_macs_per_image"].as_u64());

    // predict on val + vqa-score gives eval's number.
    let val_res = root.join("val.json");
    ok(moevqa(&[
        "predict",
        "--run",
        r,
        "--data",
        d,
        "--split",
        "val2014",
        "--k",
        "4",
        "--out",
        val_res.to_str().unwrap(),
    ]));
    let ann = data.join("v2_mscoco_val2014_annotations.json");
    let qs = data.join("v2_OpenEnded_mscoco_val2014_questions.json");
    let sc = stdout_json(&ok(moevqa(&[
        "vqa-score",
        "--results",
        val_res.to_str().unwrap(),
        "--annotations",
        ann.to_str().unwrap(),
        "--questions",
        qs.to_str().unwrap(),
        "--json",
    ])));
    assert_eq!(sc["overall"].as_f64().unwrap(), acc);
    assert_eq!(sc["questions"], 12);
    assert!(sc["per_question_type"].as_object().unwrap().len() >= 2);

    // The test split: official results format, every question once.
    let test_res = root.join("results.json");
    let said = stdout_json(&ok(moevqa(&[
        "predict",
        "--run",
        r,
        "--data",
        d,
        "--out",
        test_res.to_str().unwrap(),
        "--json",
    ])));
    assert_eq!(
        (said["predictions"].as_u64(), said["split"].as_str()),
        (Some(8), Some("test2015"))
    );
    let res: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&test_res).unwrap()).unwrap();
    assert_eq!(res.len(), 8);
    assert!(res.iter().all(|e| e["question_id"].is_u64()
        && e["answer"].as_str().is_some()
        && e.as_object().unwrap().len() == 2));

    // One question about one JPEG.
    let img = data.join("val2014/COCO_val2014_000000000007.jpg");
    assert!(img.is_file());
    let a = stdout_json(&ok(moevqa(&[
        "answer",
        "--run",
        r,
        "--image",
        img.to_str().unwrap(),
        "--question",
        "What color is the circle?",
        "--json",
    ])));
    assert!(a["answer"].as_str().is_some());
    let p = a["probability"].as_f64().unwrap();
    assert!(p > 0.0 && p < 1.0);
    assert_eq!(a["experts"].as_array().unwrap().len(), 33);
    assert_one_line_error(
        &moevqa(&[
            "answer",
            "--run",
            r,
            "--image",
            img.to_str().unwrap(),
            "--question",
            "xyzzy plugh",
        ]),
        "vocabulary",
    );
    assert_one_line_error(
        &moevqa(&["eval", "--run", r, "--data", d, "--dataset", "clevr"]),
        "is a vqa2 run",
    );

    // vqa-score refuses incomplete or inconsistent results.
    let mut results: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&val_res).unwrap()).unwrap();
    let bad = root.join("bad.json");
    let score_bad = |v: &[serde_json::Value]| {
        std::fs::write(&bad, serde_json::to_vec(v).unwrap()).unwrap();
        moevqa(&[
            "vqa-score",
            "--results",
            bad.to_str().unwrap(),
            "--annotations",
            ann.to_str().unwrap(),
        ])
    };
    let first = results[0]["question_id"].as_u64().unwrap().to_string();
    let mut dup = results.clone();
    dup.push(results[0].clone());
    assert_one_line_error(&score_bad(&dup), &first);
    let mut unknown = results.clone();
    unknown.push(serde_json::json!({"question_id": 424242, "answer": "yes"}));
    assert_one_line_error(&score_bad(&unknown), "424242");
    results.remove(0);
    assert_one_line_error(&score_bad(&results), &first);
    std::fs::write(&bad, b"[{\"question_id\": 1,").unwrap();
    assert_one_line_error(
        &moevqa(&[
            "vqa-score",
            "--results",
            bad.to_str().unwrap(),
            "--annotations",
            ann.to_str().unwrap(),
        ]),
        "bad.json",
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_vqa2_inputs_are_named() {
    let root = fresh_dir("vqa2-bad");
    let data = root.join("data");
    let d = data.to_str().unwrap();
    ok(moevqa(&[
        "generate",
        "vqa2",
        "--out",
        d,
        "--train-images",
        "3",
        "--val-images",
        "1",
        "--test-images",
        "1",
        "--questions-per-image",
        "2",
        "--image-size",
        "32",
    ]));
    let run = root.join("run");
    let r = run.to_str().unwrap();
    let fresh = || {
        let _ = std::fs::remove_dir_all(&run);
    };

    // Corrupt and missing JPEGs.
    let img = data.join("train2014/COCO_train2014_000000000002.jpg");
    let jpeg = std::fs::read(&img).unwrap();
    std::fs::write(&img, &jpeg[..jpeg.len() / 2]).unwrap();
    assert_error_after_progress(
        &moevqa(&train_args(d, r, &[])),
        "COCO_train2014_000000000002.jpg",
    );
    std::fs::remove_file(&img).unwrap();
    fresh();
    assert_error_after_progress(
        &moevqa(&train_args(d, r, &[])),
        "COCO_train2014_000000000002.jpg",
    );
    std::fs::write(&img, &jpeg).unwrap();

    // An annotation without ten answers, named by file and question id.
    let ann_path = data.join("v2_mscoco_train2014_annotations.json");
    let text = std::fs::read_to_string(&ann_path).unwrap();
    let mut ann: serde_json::Value = serde_json::from_str(&text).unwrap();
    let qid = ann["annotations"][1]["question_id"].as_u64().unwrap();
    ann["annotations"][1]["answers"]
        .as_array_mut()
        .unwrap()
        .pop();
    std::fs::write(&ann_path, serde_json::to_vec(&ann).unwrap()).unwrap();
    fresh();
    let out = moevqa(&train_args(d, r, &[]));
    assert_one_line_error(&out, "v2_mscoco_train2014_annotations.json");
    assert_one_line_error(&out, &qid.to_string());

    // Malformed JSON: file, line and column.
    std::fs::write(&ann_path, "{\"annotations\": [\n  {\"question_id\": }\n").unwrap();
    fresh();
    assert_one_line_error(
        &moevqa(&train_args(d, r, &[])),
        "v2_mscoco_train2014_annotations.json: line 2",
    );
    std::fs::write(&ann_path, text).unwrap();

    // A missing questions file names the expected path.
    let q = data.join("v2_OpenEnded_mscoco_train2014_questions.json");
    let q_text = std::fs::read(&q).unwrap();
    std::fs::remove_file(&q).unwrap();
    fresh();
    assert_one_line_error(
        &moevqa(&train_args(d, r, &[])),
        "v2_OpenEnded_mscoco_train2014_questions.json",
    );
    std::fs::write(&q, &q_text).unwrap();

    // A GloVe file of the wrong width.
    let glove = root.join("glove.txt");
    std::fs::write(&glove, "what 0.1 0.2\n").unwrap();
    fresh();
    assert_one_line_error(
        &moevqa(&train_args(d, r, &["--glove", glove.to_str().unwrap()])),
        "glove.txt: line 1",
    );

    // A resume on a train split that gives other words than the run's.
    fresh();
    ok(moevqa(&train_args(d, r, &[])));
    let mut qs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&q).unwrap()).unwrap();
    qs["questions"][0]["question"] = "Is there a xylophone?".into();
    std::fs::write(&q, serde_json::to_vec(&qs).unwrap()).unwrap();
    assert_error_after_progress(
        &moevqa(&train_args(d, r, &["--resume"])),
        &format!(
            "--data {d}: its train split gives other word or answer vocabularies than the run's {r}"
        ),
    );
    // Same words and answers, other questions: the words of the first
    // question reversed. The saved fingerprint tells the data apart.
    std::fs::write(&q, &q_text).unwrap();
    fresh();
    ok(moevqa(&train_args(d, r, &[])));
    let mut qs: serde_json::Value = serde_json::from_slice(&q_text).unwrap();
    let first = qs["questions"][0]["question"].as_str().unwrap().to_string();
    let words: Vec<&str> = first.trim_end_matches('?').split(' ').rev().collect();
    assert!(words.len() > 1, "{first}");
    qs["questions"][0]["question"] = format!("{}?", words.join(" ")).into();
    std::fs::write(&q, serde_json::to_vec(&qs).unwrap()).unwrap();
    assert_error_after_progress(
        &moevqa(&train_args(d, r, &["--resume"])),
        &format!("--data {d}: its train split ("),
    );
    assert_eq!(metric_lines(&run).len(), 1);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A torchvision-named state dict for `layout`, random weights.
fn write_state_dict(layout: &CnnLayout, path: &Path) {
    let mut tensors: Vec<(String, Vec<usize>)> = vec![];
    let bn = |name: &str, c: usize, t: &mut Vec<(String, Vec<usize>)>| {
        for f in ["weight", "bias", "running_mean", "running_var"] {
            t.push((format!("{name}.{f}"), vec![c]));
        }
    };
    let s = &layout.stem;
    tensors.push((
        "conv1.weight".into(),
        vec![s.channels, layout.input_channels, s.kernel, s.kernel],
    ));
    bn("bn1", s.channels, &mut tensors);
    let mut c_in = s.channels;
    for (si, st) in layout.stages.iter().enumerate() {
        for b in 0..st.blocks {
            let p = format!("layer{}.{b}", si + 1);
            let stride = if b == 0 { st.stride } else { 1 };
            tensors.push((format!("{p}.conv1.weight"), vec![st.inner, c_in, 1, 1]));
            bn(&format!("{p}.bn1"), st.inner, &mut tensors);
            tensors.push((
                format!("{p}.conv2.weight"),
                vec![st.inner, st.inner / st.paths, 3, 3],
            ));
            bn(&format!("{p}.bn2"), st.inner, &mut tensors);
            tensors.push((format!("{p}.conv3.weight"), vec![st.out, st.inner, 1, 1]));
            bn(&format!("{p}.bn3"), st.out, &mut tensors);
            if b == 0 && (c_in != st.out || stride != 1) {
                tensors.push((format!("{p}.downsample.0.weight"), vec![st.out, c_in, 1, 1]));
                bn(&format!("{p}.downsample.1"), st.out, &mut tensors);
            }
            c_in = st.out;
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let var = name.ends_with("running_var");
            let v: Vec<u8> = (0..n)
                .flat_map(|j| {
                    let x = ((i * 7919 + j * 104_729) % 1000) as f32 / 1000.0;
                    let x = if var { 0.5 + x } else { (x - 0.5) * 0.2 };
                    x.to_le_bytes()
                })
                .collect();
            (name, shape, v)
        })
        .collect();
    let views: HashMap<String, safetensors::tensor::TensorView> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(&views, None, path).unwrap();
}

#[test]
fn import_resnext_then_train_from_it() {
    let root = fresh_dir("vqa2-import");
    std::fs::create_dir_all(&root).unwrap();
    let st = root.join("clevr-cnn.safetensors");
    write_state_dict(&CnnLayout::clevr(), &st);
    let cnn = root.join("cnn.bin");
    let out = stdout_json(&ok(moevqa(&[
        "import-resnext",
        "--from",
        st.to_str().unwrap(),
        "--layout",
        "clevr",
        "--question-dim",
        "16",
        "--out",
        cnn.to_str().unwrap(),
        "--json",
    ])));
    assert!(out["loaded"].as_u64().unwrap() > 50);
    assert!(cnn.is_file());

    let data = root.join("data");
    let d = data.to_str().unwrap();
    ok(moevqa(&[
        "generate",
        "vqa2",
        "--out",
        d,
        "--train-images",
        "3",
        "--val-images",
        "1",
        "--test-images",
        "1",
        "--questions-per-image",
        "2",
        "--image-size",
        "64",
    ]));
    let run = root.join("run");
    let r = run.to_str().unwrap();
    let mut args = train_args(
        d,
        r,
        &["--layout", "clevr", "--init-cnn", cnn.to_str().unwrap()],
    );
    // The CLEVR layout has P = 12.
    let k = args.iter().position(|a| *a == "--k").unwrap();
    args[k + 1] = "6";
    let s = args.iter().position(|a| *a == "--image-size").unwrap();
    args[s + 1] = "64";
    ok(moevqa(&args));
    // A resume need not name the CNN file again (it is read only when the
    // run starts): it is told so, and the run keeps recording its start.
    let saved = |key: &str| saved_config(&run)[key].clone();
    let from = saved("init_cnn");
    assert_eq!(from, cnn.to_str().unwrap());
    let i = args.iter().position(|a| *a == "--init-cnn").unwrap();
    let mut resume = args.clone();
    resume.drain(i..i + 2);
    let e = resume.iter().position(|a| *a == "--epochs").unwrap();
    resume[e + 1] = "2";
    resume.push("--resume");
    let out = ok(moevqa(&resume));
    let said = String::from_utf8_lossy(&out.stderr);
    let note = format!(
        "note: --init-cnn is read only when a run starts: this run keeps its {} (given none)",
        cnn.display()
    );
    assert!(said.contains(&note), "{said}");
    assert_eq!(metric_lines(&run).len(), 2);
    assert_eq!(saved("init_cnn"), from);
    assert_eq!(saved("epochs"), 2);
    // A CNN file of other gate sizes is refused, naming the file.
    let _ = std::fs::remove_dir_all(&run);
    let q = args.iter().position(|a| *a == "--question-dim").unwrap();
    args[q + 1] = "24";
    assert_one_line_error(&moevqa(&args), "cnn.bin");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_vqa_run_resumes_from_a_mid_epoch_checkpoint() {
    let root = fresh_dir("vqa2-mid");
    let data = root.join("data");
    let d = data.to_str().unwrap();
    generate_small(d, "8", "2", "1");
    // 32 questions an epoch in batches of 4, a checkpoint every 8.
    let killed = root.join("killed");
    let whole = root.join("whole");
    let (k, w) = (killed.to_str().unwrap(), whole.to_str().unwrap());
    let args = |run| {
        let mut a = train_args(d, run, &["--checkpoint-every", "8"]);
        let batch = a.iter().position(|s| *s == "--batch").unwrap();
        a[batch + 1] = "4";
        a
    };
    kill_when(&args(k), Duration::ZERO, || {
        saved_partial(&killed).is_some()
    });
    let partial = saved_partial(&killed).expect("killed inside the epoch");
    assert_eq!(partial["epoch"], 0, "{partial}");
    let mut resume = args(k);
    resume.push("--resume");
    ok(moevqa(&resume));
    ok(moevqa(&args(w)));
    let (resumed, straight) = (metric_lines(&killed), metric_lines(&whole));
    assert_eq!(resumed.len(), 1);
    for (a, b) in resumed.iter().zip(&straight) {
        for key in ["train_loss", "train_score"] {
            assert_eq!(a[key], b[key], "{key}: {a} vs {b}");
        }
        assert_eq!(a["val"]["score"], b["val"]["score"]);
    }
    assert_eq!(saved_partial(&killed), None);
    std::fs::remove_dir_all(&root).unwrap();
}
