//! The VQA v2 commands of the binary: `vqa-score`, `generate vqa2`,
//! `import-resnext`, and the VQA side of train / eval / predict / answer /
//! demo.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use moevqa::cnn::{CnnLayout, GateSettings, ModularResNeXtConfig};
use moevqa::flops::count_macs;
use moevqa::kernels::Engine;
use moevqa::moe::usage::specialisation;
use moevqa::train::Inference;
use moevqa::train::run::Progress;
use moevqa::train::vqa::{VqaEvalReport, VqaResult, VqaRunConfig};
use serde::Serialize;

/// `moevqa vqa-score`: the official metric of a results file.
pub fn cmd_vqa_score(
    results: &Path,
    annotations: &Path,
    questions: Option<&Path>,
    json: bool,
) -> Result<()> {
    use moevqa::metrics::vqa::{read_annotations, read_question_ids, read_results, score};
    let anns = read_annotations(annotations)?;
    if let Some(q) = questions {
        // The questions file and the annotations must describe the same set.
        let ids: std::collections::HashSet<i64> = read_question_ids(q)?.into_iter().collect();
        let annotated: std::collections::HashSet<i64> =
            anns.iter().map(|a| a.question_id).collect();
        if let Some(missing) = annotated.iter().find(|i| !ids.contains(i)) {
            bail!(
                "{}: question_id {missing} of {} is not in the questions file",
                q.display(),
                annotations.display()
            );
        }
        if let Some(extra) = ids.iter().find(|i| !annotated.contains(i)) {
            bail!(
                "{}: question_id {extra} has no annotation in {}",
                q.display(),
                annotations.display()
            );
        }
    }
    let res = read_results(results)?;
    let s = score(&res, &anns).with_context(|| results.display().to_string())?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    println!(
        "Overall Accuracy is: {:.2} ({} questions)",
        s.overall, s.questions
    );
    println!("Per Answer Type Accuracy is the following:");
    for (t, a) in &s.per_answer_type {
        println!("{t} : {a:.2}");
    }
    println!("Per Question Type Accuracy is the following:");
    for (t, a) in &s.per_question_type {
        println!("{t} : {a:.2}");
    }
    Ok(())
}

/// `moevqa generate vqa2`.
#[allow(clippy::too_many_arguments)]
pub fn cmd_generate_vqa2(
    out: &Path,
    train_images: usize,
    val_images: usize,
    test_images: usize,
    questions_per_image: usize,
    image_size: u32,
    seed: u64,
    json: bool,
) -> Result<()> {
    use moevqa::data::vqa2_gen::{Vqa2GenConfig, generate_vqa2};
    let t0 = std::time::Instant::now();
    let s = generate_vqa2(
        out,
        &Vqa2GenConfig {
            train_images,
            val_images,
            test_images,
            questions_per_image,
            image_size,
            seed,
        },
    )?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "wrote a VQA-v2-layout set to {}: {} train / {} val / {} test images ({} / {} / {} questions) in {:.1} s",
            out.display(),
            s.train_images,
            s.val_images,
            s.test_images,
            s.train_questions,
            s.val_questions,
            s.test_questions,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `moevqa import-resnext`.
pub fn cmd_import_resnext(
    from: &Path,
    out: &Path,
    layout: Option<&str>,
    question_dim: usize,
    json: bool,
) -> Result<()> {
    use moevqa::cnn::import::{import_resnext, infer_layout, save_cnn};
    let layout = match layout {
        Some(name) => CnnLayout::by_model(name)?,
        None => infer_layout(from)?,
    };
    let cfg = ModularResNeXtConfig::new(layout.clone(), layout.paths().unwrap_or(1))
        .with_gate(GateSettings::new().with_question_dim(question_dim));
    let (cnn, report) = import_resnext(from, &cfg, &Device::default())?;
    save_cnn(&cnn, &cfg, out)?;
    #[derive(Serialize)]
    struct Out<'a> {
        from: &'a Path,
        out: &'a Path,
        layout: &'a str,
        question_dim: usize,
        loaded: usize,
        skipped: usize,
    }
    if json {
        let o = Out {
            from,
            out,
            layout: &layout.name,
            question_dim,
            loaded: report.loaded,
            skipped: report.skipped.len(),
        };
        println!("{}", serde_json::to_string(&o)?);
    } else {
        println!("{report}");
        println!(
            "wrote {} (layout {}, gate question_dim {question_dim}: train with the same --question-dim and --init-cnn {})",
            out.display(),
            layout.name,
            out.display()
        );
    }
    Ok(())
}

/// Flags of `train` that matter for VQA v2 (defaults resolved here).
pub struct VqaTrainFlags {
    pub data: PathBuf,
    pub out: PathBuf,
    pub k: Option<usize>,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub resume: bool,
    pub image_size: Option<u32>,
    pub balance_weight: f64,
    pub warmup_epochs: usize,
    pub checkpoint_every: usize,
    pub question_dim: Option<usize>,
    pub layout: Option<String>,
    pub embed_dim: usize,
    pub hidden: usize,
    pub min_answer_count: usize,
    pub glove: Option<PathBuf>,
    pub init_cnn: Option<PathBuf>,
    pub train_split: String,
    pub val_split: String,
}

impl VqaTrainFlags {
    /// The run config, with the VQA defaults (ResNeXt-101 32x4d, k = 32,
    /// 224x224, question vector 512).
    pub fn config(&self) -> Result<VqaRunConfig> {
        let layout = self
            .layout
            .clone()
            .unwrap_or_else(|| "resnext101-32x4d".into());
        let p = CnnLayout::by_model(&layout)?.paths().unwrap_or(1);
        Ok(VqaRunConfig {
            dataset: "vqa2".into(),
            data: self.data.clone(),
            train_split: self.train_split.clone(),
            val_split: self.val_split.clone(),
            layout,
            k: self.k.unwrap_or(p),
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            seed: self.seed,
            image_size: self.image_size.unwrap_or(224),
            balance_weight: self.balance_weight,
            warmup_epochs: self.warmup_epochs,
            embed_dim: self.embed_dim,
            question_dim: self.question_dim.unwrap_or(512),
            hidden: self.hidden,
            min_answer_count: self.min_answer_count,
            glove: self.glove.clone(),
            init_cnn: self.init_cnn.clone(),
            checkpoint_every: self.checkpoint_every,
        })
    }
}

/// `moevqa train --dataset vqa2`.
pub fn cmd_train_vqa(
    device: &Device,
    f: &VqaTrainFlags,
    progress: &mut dyn Progress,
) -> Result<Vec<moevqa::train::vqa::VqaEpochLine>> {
    let cfg = f.config()?;
    Ok(moevqa::train::vqa::train_vqa(
        &cfg, &f.out, f.resume, device, progress,
    )?)
}

/// CNN multiply-adds per image of a VQA run at `k`.
fn vqa_macs(cfg: &VqaRunConfig, k: usize, size: u32) -> Result<u64> {
    let gate = GateSettings::new().with_question_dim(cfg.question_dim);
    let layout = CnnLayout::by_model(&cfg.layout)?;
    Ok(count_macs(&layout, (size as usize, size as usize), Some(k), &gate)?.cnn_macs)
}

#[derive(Serialize)]
struct VqaEvalJson<'a> {
    k: usize,
    questions: usize,
    /// Official VQA accuracy, percent (null without annotations).
    accuracy: Option<f64>,
    per_answer_type: Option<&'a std::collections::BTreeMap<String, f64>>,
    per_question_type: Option<&'a std::collections::BTreeMap<String, f64>>,
    cnn_macs_per_image: u64,
    cnn_macs_per_image_at_224: u64,
    expert_usage: &'a [Vec<u64>],
    expert_usage_per_answer_type: &'a std::collections::BTreeMap<String, Vec<Vec<u64>>>,
    /// Per block, how far the answer types' choices of experts are apart.
    specialisation: Vec<f64>,
    engine: Engine,
    questions_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cnn_ms_per_image: Option<f64>,
}

/// `moevqa eval` on a VQA run.
pub fn cmd_eval_vqa(
    device: &Device,
    run: &Path,
    data: &Path,
    split: &str,
    inf: Inference,
    json: bool,
) -> Result<crate::SweepRow> {
    let mut bar = crate::EvalBar::eval(split, inf.k);
    let (cfg, r) =
        moevqa::train::vqa::evaluate_vqa_run(run, data, split, inf, device, &mut |d, n| {
            bar.tick(d, n)
        })?;
    drop(bar);
    let macs = vqa_macs(&cfg, r.k, cfg.image_size)?;
    let macs224 = vqa_macs(&cfg, r.k, 224)?;
    if json {
        let j = VqaEvalJson {
            k: r.k,
            questions: r.questions,
            accuracy: r.score.as_ref().map(|s| s.overall),
            per_answer_type: r.score.as_ref().map(|s| &s.per_answer_type),
            per_question_type: r.score.as_ref().map(|s| &s.per_question_type),
            cnn_macs_per_image: macs,
            cnn_macs_per_image_at_224: macs224,
            expert_usage: &r.expert_usage,
            expert_usage_per_answer_type: &r.expert_usage_per_answer_type,
            specialisation: specialisation(&r.expert_usage_per_answer_type),
            engine: r.engine,
            questions_per_s: r.questions_per_s,
            cnn_ms_per_image: r.cnn_ms_per_image,
        };
        println!("{}", serde_json::to_string(&j)?);
    } else {
        print_vqa_eval(split, &r, macs, cfg.image_size);
    }
    Ok(crate::SweepRow {
        k: r.k,
        cnn_macs: macs,
        cnn_ms_per_image: r.cnn_ms_per_image,
        accuracy: r.score.as_ref().map(|s| s.overall),
        questions_per_s: r.questions_per_s,
        usage_by_group: r.expert_usage_per_answer_type,
    })
}

fn print_vqa_eval(split: &str, r: &VqaEvalReport, macs: u64, size: u32) {
    match &r.score {
        Some(s) => {
            println!(
                "{split}: {} questions, k = {}, VQA accuracy {:.2}%, CNN {:.3e} MACs/image at {size}x{size}{}, {:.1} questions/s ({} engine)",
                r.questions,
                r.k,
                s.overall,
                macs as f64,
                crate::cnn_time_text(r.cnn_ms_per_image),
                r.questions_per_s,
                r.engine.name()
            );
            for (t, a) in &s.per_answer_type {
                println!("  {t:<10} {a:6.2}%");
            }
            let spec = specialisation(&r.expert_usage_per_answer_type);
            println!("{}", crate::specialisation_text("answer type", &spec));
        }
        None => println!(
            "{split}: {} questions predicted (no annotations to score), k = {}",
            r.questions, r.k
        ),
    }
}

/// `moevqa predict` on a VQA run: writes the official results file
/// (`[{"question_id", "answer"}]`); returns how many results.
pub fn cmd_predict_vqa(
    device: &Device,
    run: &Path,
    data: &Path,
    split: &str,
    out: &Path,
    inf: Inference,
) -> Result<usize> {
    let mut bar = crate::EvalBar::new(format!("predicting {split}"));
    let (_, r) =
        moevqa::train::vqa::evaluate_vqa_run(run, data, split, inf, device, &mut |d, n| {
            bar.tick(d, n)
        })?;
    drop(bar);
    let results: Vec<VqaResult> = r
        .predictions
        .iter()
        .map(|(q, a)| VqaResult {
            question_id: *q,
            answer: a.clone(),
        })
        .collect();
    moevqa::data::clevr_format::write_json_atomic(out, &results)?;
    Ok(results.len())
}

/// `moevqa answer` on a VQA run.
pub fn cmd_answer_vqa(
    device: &Device,
    run: &Path,
    image: &Path,
    question: &str,
    inf: Inference,
    json: bool,
) -> Result<()> {
    let a = moevqa::train::vqa::answer_vqa(run, image, question, inf, device)?;
    if json {
        println!("{}", serde_json::to_string(&a)?);
        return Ok(());
    }
    println!("{} (score {:.3}, k = {})", a.answer, a.probability, a.k);
    print_experts(&a.experts);
    Ok(())
}

/// The experts chosen in each block, with their gate values.
pub fn print_experts(experts: &[Vec<(usize, f64)>]) {
    for (i, block) in experts.iter().enumerate() {
        let list: Vec<String> = block.iter().map(|(e, g)| format!("{e} ({g:.3})")).collect();
        println!("  block {}: experts {}", i + 1, list.join(", "));
    }
}

#[derive(Serialize)]
struct VqaDemoRow {
    k: usize,
    cnn_macs_at_224: u64,
    cnn_macs: u64,
    accuracy: f64,
    per_answer_type: std::collections::BTreeMap<String, f64>,
    images_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cnn_ms_per_image: Option<f64>,
}

#[derive(Serialize)]
struct VqaDemoReport {
    data: PathBuf,
    image_size: u32,
    train_questions: usize,
    val_questions: usize,
    rows: Vec<VqaDemoRow>,
}

/// Settings of the VQA demo.
pub struct VqaDemoFlags {
    pub out: Option<PathBuf>,
    pub train_images: usize,
    pub val_images: usize,
    pub epochs: usize,
    pub image_size: u32,
    pub ks: Vec<usize>,
    pub json: bool,
}

/// `moevqa demo --dataset vqa2`: generated VQA-v2-layout set, BUTD on the
/// modular ResNeXt-101 at each k, Table 1 shape.
pub fn cmd_demo_vqa(device: &Device, f: &VqaDemoFlags, progress: &mut dyn Progress) -> Result<()> {
    use moevqa::data::vqa2_gen::{Vqa2GenConfig, generate_vqa2};
    let root = f
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("moevqa-demo-vqa2"));
    let data = root.join("vqa2");
    let summary = generate_vqa2(
        &data,
        &Vqa2GenConfig {
            train_images: f.train_images,
            val_images: f.val_images,
            test_images: 2,
            questions_per_image: 5,
            image_size: f.image_size.max(32),
            seed: 1,
        },
    )?;
    eprintln!(
        "generated a VQA-v2-layout set in {}: {} train / {} val questions",
        data.display(),
        summary.train_questions,
        summary.val_questions
    );
    let mut rows = Vec::new();
    for &k in &f.ks {
        let run = root.join(format!("run-k{k}"));
        if run.exists() {
            std::fs::remove_dir_all(&run)
                .with_context(|| format!("{}: cannot clear the old demo run", run.display()))?;
        }
        eprintln!("training k = {k} ({} epochs)", f.epochs);
        let flags = VqaTrainFlags {
            data: data.clone(),
            out: run.clone(),
            k: Some(k),
            epochs: f.epochs,
            batch: 32,
            lr: 1e-3,
            seed: 1,
            resume: false,
            image_size: Some(f.image_size),
            balance_weight: 0.01,
            warmup_epochs: 0,
            checkpoint_every: 0,
            question_dim: Some(128),
            layout: None,
            embed_dim: 64,
            hidden: 128,
            min_answer_count: 3,
            glove: None,
            init_cnn: None,
            train_split: "train2014".into(),
            val_split: "val2014".into(),
        };
        let cfg = flags.config()?;
        moevqa::train::vqa::train_vqa(&cfg, &run, false, device, progress)?;
        let mut bar = crate::EvalBar::new(format!("val2014 at k = {k}"));
        let (_, r) = moevqa::train::vqa::evaluate_vqa_run(
            &run,
            &data,
            "val2014",
            Inference::at(k, 32, device),
            device,
            &mut |d, n| bar.tick(d, n),
        )?;
        drop(bar);
        let s = r.score.context("the generated val split has annotations")?;
        rows.push(VqaDemoRow {
            k,
            cnn_macs_at_224: vqa_macs(&cfg, k, 224)?,
            cnn_macs: vqa_macs(&cfg, k, f.image_size)?,
            accuracy: s.overall,
            per_answer_type: s.per_answer_type,
            images_per_s: r.questions_per_s,
            cnn_ms_per_image: r.cnn_ms_per_image,
        });
    }
    let report = VqaDemoReport {
        data,
        image_size: f.image_size,
        train_questions: summary.train_questions,
        val_questions: summary.val_questions,
        rows,
    };
    if f.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "VQA v2 demo (generated scenes in the official layout): {} train / {} val questions, {}x{} input, bottom-up top-down on the modular ResNeXt-101 32x4d of Table 3 (P = 32)",
        report.train_questions, report.val_questions, f.image_size, f.image_size
    );
    println!(
        "{:<16} {:>16} {:>12} {:>11} {:>10} {:>8} {:>8} {:>8} {:>10}",
        "k",
        "CNN MACs @224",
        "@input",
        "CNN ms/img",
        "VQA acc",
        "yes/no",
        "number",
        "other",
        "images/s"
    );
    for r in &report.rows {
        let t = |name: &str| r.per_answer_type.get(name).copied().unwrap_or(f64::NAN);
        let cnn_ms = r
            .cnn_ms_per_image
            .map_or_else(|| "-".to_string(), |ms| format!("{ms:.2}"));
        println!(
            "{:<16} {:>16.3e} {:>12.3e} {:>11} {:>10.2} {:>8.2} {:>8.2} {:>8.2} {:>10.1}",
            format!("{} ({:.0}% sparse)", r.k, 100.0 * (1.0 - r.k as f64 / 32.0)),
            r.cnn_macs_at_224 as f64,
            r.cnn_macs as f64,
            cnn_ms,
            r.accuracy,
            t("yes/no"),
            t("number"),
            t("other"),
            r.images_per_s
        );
    }
    println!(
        "CNN ms/img: measured wall time of the CNN alone per image during that evaluation (sparse at k with its gate controllers, at the input size, fast CPU path). VQA accuracy: the official metric (moevqa vqa-score). Real VQA v2 numbers need the real data (and a GPU); these rows show the path end to end and the cost of each k."
    );
    Ok(())
}

/// The dataset kind of a run directory (`clevr` or `vqa2`), from its config.
pub fn run_dataset(run: &Path) -> Result<String> {
    let path = run.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: no run here", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a run config", path.display()))?;
    Ok(v["dataset"].as_str().unwrap_or("clevr").to_string())
}
