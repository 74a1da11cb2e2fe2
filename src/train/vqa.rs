//! VQA v2: training, evaluation with the official metric, prediction in the
//! official results format, for the bottom-up top-down model over the
//! modular ResNeXt (the paper's section 3.1).
//!
//! A run directory holds `config.json` ([`VqaRunConfig`]), `vocab.json`
//! (question words), `answers.json` (the answer vocabulary),
//! `metrics.jsonl` and `checkpoint/`, like a CLEVR run.
//!
//! Images are normalised with the ImageNet mean and standard deviation, the
//! statistics torchvision's ResNeXt weights expect (`--init-cnn`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::cnn::{CnnLayout, Execution};
use crate::data::clevr_format::write_json_atomic;
use crate::data::clevr_reader::load_images;
use crate::data::vqa2::{AnswerCounting, AnswerVocab, Vqa2Split, annotation_file};
use crate::kernels::{Engine, EvalCnn};
use crate::metrics::vqa::{VqaScore, read_annotations, score};
use crate::models::GatedVqaModel;
use crate::models::butd::{Butd, ButdConfig, soft_bce};
use crate::moe::BalanceLossConfig;
use crate::moe::usage::add_selections;
use crate::text::{PAD, Vocab};
use crate::train::checkpoint::{PartialEpoch, TrainState, load_checkpoint};
use crate::train::clevr::{OnBatch, adam, argmax_rows};
use crate::train::run::{
    EpochSummary, MidEpochSchedule, Progress, RunPaths, begin_epoch, check_resumed_epoch,
    check_same_data, check_same_vocab, chosen_checkpoint, epoch_seed, io_err, open_run_dir,
    record_epoch, resume_from, save_mid_epoch,
};
use crate::train::{CheckpointChoice, Inference, TrainError};

/// ImageNet channel means and standard deviations (RGB).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Settings of a VQA v2 run, saved as `RUN/config.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VqaRunConfig {
    /// Always `vqa2`.
    pub dataset: String,
    pub data: PathBuf,
    pub train_split: String,
    pub val_split: String,
    /// CNN layout name (`resnext101-32x4d`, `resnext101-32x8d`, `clevr`).
    pub layout: String,
    pub k: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub image_size: u32,
    pub balance_weight: f64,
    pub warmup_epochs: usize,
    pub embed_dim: usize,
    pub question_dim: usize,
    pub hidden: usize,
    /// Answers kept in the vocabulary: seen at least this often.
    pub min_answer_count: usize,
    /// GloVe text file the word embeddings start from.
    pub glove: Option<PathBuf>,
    /// CNN weights file (`moevqa import-resnext`) the CNN starts from.
    pub init_cnn: Option<PathBuf>,
    /// Questions between checkpoints inside an epoch (0: at epoch ends only).
    #[serde(default)]
    pub checkpoint_every: usize,
}

impl VqaRunConfig {
    /// Checks the values (one line naming the flag).
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |flag: &str, msg: &str| Err(TrainError::Input(format!("{flag}: {msg}")));
        for (flag, v) in [
            ("--epochs", self.epochs),
            ("--batch", self.batch),
            ("--embed-dim", self.embed_dim),
            ("--question-dim", self.question_dim),
            ("--hidden", self.hidden),
            ("--min-answer-count", self.min_answer_count),
        ] {
            if v == 0 {
                return bad(flag, "must be at least 1");
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr", "must be a positive number");
        }
        if !(self.balance_weight.is_finite() && self.balance_weight >= 0.0) {
            return bad("--balance-weight", "must be a number >= 0");
        }
        if self.image_size < 32 {
            return bad("--image-size", "must be at least 32 pixels");
        }
        CnnLayout::by_model(&self.layout)?;
        Ok(())
    }

    /// The CNN layout.
    pub fn cnn_layout(&self) -> Result<CnnLayout, TrainError> {
        Ok(CnnLayout::by_model(&self.layout)?)
    }

    /// Model settings for the given vocabulary sizes.
    pub fn model(&self, words: usize, answers: usize) -> Result<ButdConfig, TrainError> {
        Ok(ButdConfig::new(words, answers.max(1), self.k)
            .with_layout(self.cnn_layout()?)
            .with_embed_dim(self.embed_dim)
            .with_question_dim(self.question_dim)
            .with_hidden(self.hidden))
    }

    /// Learning rate and batch size of an epoch (linear warm-up, as CLEVR).
    pub fn schedule(&self, epoch: usize) -> (f64, usize) {
        if epoch >= self.warmup_epochs {
            return (self.lr, self.batch);
        }
        let left = (self.warmup_epochs - epoch) as u32;
        (
            self.lr * (epoch + 1) as f64 / (self.warmup_epochs + 1) as f64,
            (self.batch >> left.min(16)).max(1),
        )
    }
}

/// One question ready for batching.
#[derive(Debug, Clone)]
pub struct VqaItem {
    pub question_id: u64,
    pub image: PathBuf,
    pub tokens: Vec<usize>,
    /// (answer index, soft score), empty for the test splits.
    pub targets: Vec<(usize, f32)>,
    /// `yes/no`, `number`, `other` (empty without annotations).
    pub answer_type: String,
}

/// Encodes a split with the run's vocabularies.
pub fn encode_vqa_split(split: &Vqa2Split, words: &Vocab, answers: &AnswerVocab) -> Vec<VqaItem> {
    split
        .questions
        .iter()
        .map(|q| VqaItem {
            question_id: q.question_id,
            image: split.image_path(q),
            tokens: words.encode(&q.question).0,
            targets: split.soft_targets(q, answers),
            answer_type: split.answer_type(q).unwrap_or_default().to_string(),
        })
        .collect()
}

/// A batch on a device.
pub struct VqaBatch {
    pub images: Tensor<4>,
    pub tokens: Tensor<2, Int>,
    pub lengths: Vec<usize>,
    /// Soft scores [N, answers].
    pub targets: Tensor<2>,
}

/// Loads, normalises and stacks a batch.
pub fn make_vqa_batch(
    items: &[&VqaItem],
    answers: usize,
    image_size: u32,
    device: &Device,
) -> Result<VqaBatch, TrainError> {
    let n = items.len();
    let paths: Vec<PathBuf> = items.iter().map(|e| e.image.clone()).collect();
    let mut pixels = load_images(&paths, image_size)?;
    let s = image_size as usize;
    for (i, p) in pixels.iter_mut().enumerate() {
        let c = (i / (s * s)) % 3;
        *p = (*p - MEAN[c]) / STD[c];
    }
    let t = items
        .iter()
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut tok = vec![PAD as i64; n * t];
    for (r, e) in items.iter().enumerate() {
        for (c, &id) in e.tokens.iter().enumerate() {
            tok[r * t + c] = id as i64;
        }
    }
    let mut targets = vec![0f32; n * answers];
    for (r, e) in items.iter().enumerate() {
        for &(a, score) in &e.targets {
            if a < answers {
                targets[r * answers + a] = score;
            }
        }
    }
    Ok(VqaBatch {
        images: Tensor::from_data(TensorData::new(pixels, [n, 3, s, s]), device),
        tokens: Tensor::from_data(TensorData::new(tok, [n, t]), device),
        lengths: items.iter().map(|e| e.tokens.len().max(1)).collect(),
        targets: Tensor::from_data(TensorData::new(targets, [n, answers]), device),
    })
}

/// Evaluation of a run on a split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VqaEvalReport {
    pub k: usize,
    pub questions: usize,
    /// The official VQA accuracy (percent); None without annotations.
    pub score: Option<VqaScore>,
    /// Times each expert was chosen, per block.
    pub expert_usage: Vec<Vec<u64>>,
    /// The same per answer type.
    pub expert_usage_per_answer_type: BTreeMap<String, Vec<Vec<u64>>>,
    /// What ran the CNN.
    #[serde(default)]
    pub engine: Engine,
    /// Questions answered per second (images read and decoded, model run).
    #[serde(default)]
    pub questions_per_s: f64,
    /// Measured wall time of the CNN alone per image (one image per
    /// question), milliseconds, on the fast engine ([`EvalCnn::clock`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnn_ms_per_image: Option<f64>,
    /// (question id, answer) per question, in split order.
    #[serde(skip)]
    pub predictions: Vec<(u64, String)>,
}

/// How to evaluate: sparse at `k`, in batches, at an input size.
#[derive(Debug, Clone, Copy)]
pub struct EvalSettings {
    pub k: usize,
    pub batch: usize,
    pub image_size: u32,
    pub engine: Engine,
}

/// Runs `model` (eval mode) sparse over `items`; scores against the
/// official annotations at `annotations` when given.
pub fn evaluate_vqa(
    model: &Butd,
    items: &[VqaItem],
    answers: &AnswerVocab,
    s: EvalSettings,
    annotations: Option<&Path>,
    device: &Device,
    on_batch: OnBatch<'_>,
) -> Result<VqaEvalReport, TrainError> {
    let EvalSettings {
        k,
        batch,
        image_size,
        engine,
    } = s;
    let cnn = EvalCnn::new(&model.cnn, engine)?;
    let t0 = Instant::now();
    let blocks = model.cnn.blocks.len();
    let paths = model.cnn.blocks.first().map_or(0, |b| b.paths());
    let mut usage = vec![vec![0u64; paths]; blocks];
    let mut by_type: BTreeMap<String, Vec<Vec<u64>>> = BTreeMap::new();
    let mut predictions = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch.max(1)) {
        let refs: Vec<&VqaItem> = chunk.iter().collect();
        let b = make_vqa_batch(&refs, answers.len().max(1), image_size, device)?;
        let out = model.forward_eval(b.images, b.tokens, &b.lengths, k, &cnn)?;
        let best = argmax_rows(out.logits)?;
        for (item, &a) in chunk.iter().zip(&best) {
            predictions.push((item.question_id, answers.answer(a).to_string()));
        }
        on_batch(predictions.len(), items.len());
        for (i, item) in chunk.iter().enumerate() {
            let typed = by_type.entry(item.answer_type.clone()).or_default();
            for (bi, g) in out.gates.iter().enumerate() {
                add_selections(&mut usage, bi, paths, &g.indices[i]);
                add_selections(typed, bi, paths, &g.indices[i]);
            }
        }
    }
    let questions_per_s = items.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    let cnn_ms_per_image = cnn.ms_per_image_since(None);
    let score = match annotations {
        Some(path) => Some(score_predictions(path, &predictions)?),
        None => None,
    };
    Ok(VqaEvalReport {
        k,
        questions: items.len(),
        score,
        expert_usage: usage,
        expert_usage_per_answer_type: by_type,
        engine,
        questions_per_s,
        cnn_ms_per_image,
        predictions,
    })
}

/// The official metric of `predictions` against the annotation file,
/// restricted to the predicted questions (a split may use a subset of its
/// questions file).
fn score_predictions(path: &Path, predictions: &[(u64, String)]) -> Result<VqaScore, TrainError> {
    let wanted: std::collections::HashSet<i64> =
        predictions.iter().map(|(q, _)| *q as i64).collect();
    let anns: Vec<_> = read_annotations(path)
        .map_err(|e| TrainError::Input(e.to_string()))?
        .into_iter()
        .filter(|a| wanted.contains(&a.question_id))
        .collect();
    let results: Vec<(i64, String)> = predictions
        .iter()
        .map(|(q, a)| (*q as i64, a.clone()))
        .collect();
    score(&results, &anns).map_err(|e| TrainError::Input(e.to_string()))
}

/// One line of a VQA run's `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VqaEpochLine {
    pub epoch: usize,
    pub lr: f64,
    pub batch: usize,
    pub train_loss: f64,
    /// Mean soft score of the predicted answer on the training batches (%).
    pub train_score: f64,
    pub questions_per_s: f64,
    pub seconds: f64,
    pub val: Option<VqaEvalReport>,
}

/// The run's word vocabulary, `vocab.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WordsFile {
    words: Vocab,
}

fn answers_path(run: &Path) -> PathBuf {
    run.join("answers.json")
}

/// Sets the rows of `embed`'s weight for the words found in a GloVe file.
fn init_glove(model: Butd, words: &Vocab, path: &Path) -> Result<Butd, TrainError> {
    let weight = model.embed.weight.val();
    let [v, d] = weight.dims();
    let device = weight.device();
    let mut values = weight
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| TrainError::Input(format!("embedding: {e:?}")))?;
    let found = crate::text::glove::read_glove(path, words, d)?;
    for (row, vec) in &found {
        values[row * d..(row + 1) * d].copy_from_slice(vec);
    }
    tracing::info!(
        "{}: {} of {v} words initialised",
        path.display(),
        found.len()
    );
    let t = Tensor::<2>::from_data(TensorData::new(values, [v, d]), &device);
    let mut model = model;
    let id = model.embed.weight.id;
    // A fresh parameter that requires grad (a mapped tensor would not).
    model.embed.weight = Param::initialized(id, t.require_grad());
    Ok(model)
}

/// Trains (or resumes) a VQA v2 run.
pub fn train_vqa(
    cfg: &VqaRunConfig,
    out: &Path,
    resume: bool,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<Vec<VqaEpochLine>, TrainError> {
    cfg.validate()?;
    let paths = RunPaths::new(out);
    let opened = open_run_dir(&paths, resume, cfg, progress)?;
    let resuming = opened.resuming;
    let train_split = Vqa2Split::open(&cfg.data, &cfg.train_split)?;
    let val_split = Vqa2Split::open(&cfg.data, &cfg.val_split).ok();
    let built = (
        Vocab::words(train_split.questions.iter().map(|q| q.question.as_str()), 1),
        AnswerVocab::build(
            &[&train_split],
            cfg.min_answer_count,
            AnswerCounting::HumanPerQuestion,
        ),
    );
    let (words, answers) = if resuming {
        let saved = load_vocab(out)?;
        check_same_vocab(&saved, &built, &cfg.data, out)?;
        saved
    } else {
        if built.1.is_empty() {
            return Err(TrainError::Input(format!(
                "--min-answer-count {}: no answer of {} is that frequent",
                cfg.min_answer_count, cfg.train_split
            )));
        }
        built
    };
    check_same_data(&paths, resuming, &train_split.fingerprint(), &cfg.data)?;
    opened.save_config(&paths, cfg)?;
    if !resuming {
        write_json_atomic(
            &paths.vocab,
            &WordsFile {
                words: words.clone(),
            },
        )?;
        answers.save(&answers_path(out))?;
    }
    let items = encode_vqa_split(&train_split, &words, &answers);
    let val_items = val_split
        .as_ref()
        .map(|v| encode_vqa_split(v, &words, &answers));
    let val_annotations = val_split
        .as_ref()
        .filter(|v| v.has_annotations())
        .map(|_| annotation_file(&cfg.data, &cfg.val_split));

    device.seed(cfg.seed);
    let ad = device.clone().autodiff();
    let mut model = cfg.model(words.len(), answers.len())?.init(&ad)?;
    if !resuming {
        if let Some(g) = &cfg.glove {
            model = init_glove(model, &words, g)?;
        }
        if let Some(file) = &cfg.init_cnn {
            let cnn_cfg = model_cnn_config(cfg)?;
            let cnn = crate::cnn::import::load_cnn(file, &cnn_cfg, &ad)
                .map_err(|e| TrainError::Input(e.to_string()))?;
            model.cnn = cnn;
        }
    }
    let mut optim = adam();
    let mut state = TrainState::default();
    if resuming {
        (model, optim, state) = resume_from(&paths, model, optim, &ad)?;
        progress.resumed(state.epoch, state.partial.as_ref());
    }
    let num_answers = answers.len().max(1);
    let balance = BalanceLossConfig::new().with_weight(cfg.balance_weight);
    // The last complete epoch's line, kept in mid-epoch checkpoints.
    let mut last_line = state.metrics.clone();
    let mut partial = state.partial.take();
    let mut lines = Vec::new();
    for epoch in state.epoch..cfg.epochs {
        let from = begin_epoch(&mut partial, cfg.seed, epoch, device).unwrap_or_default();
        let (lr, batch) = cfg.schedule(epoch);
        let mut order: Vec<usize> = (0..items.len())
            .filter(|&i| !items[i].targets.is_empty() || train_split.has_annotations())
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(epoch_seed(cfg.seed, epoch));
        order.shuffle(&mut rng);
        check_resumed_epoch(&from, &order, batch)?;
        progress.start_epoch(epoch, cfg.epochs, order.len(), from.seen);
        let t0 = Instant::now();
        let (mut loss_sum, mut score_sum, mut seen) = (from.loss_sum, from.score_sum, from.seen);
        let mut schedule = MidEpochSchedule::new(cfg.checkpoint_every, seen);
        for (step, chunk) in order.chunks(batch.max(1)).enumerate().skip(from.batches) {
            let refs: Vec<&VqaItem> = chunk.iter().map(|&i| &items[i]).collect();
            let b = make_vqa_batch(&refs, num_answers, cfg.image_size, &ad)?;
            let out = model.forward(b.images, b.tokens, &b.lengths, cfg.k, Execution::Dense)?;
            let loss = balance.add_to(soft_bce(out.logits.clone(), b.targets), &out.gates);
            let value = loss.clone().into_scalar::<f32>() as f64;
            if !value.is_finite() {
                return Err(TrainError::Diverged {
                    epoch: epoch + 1,
                    step,
                    value,
                });
            }
            let best = argmax_rows(out.logits.inner())?;
            for (item, &a) in refs.iter().zip(&best) {
                score_sum += item
                    .targets
                    .iter()
                    .find(|(i, _)| *i == a)
                    .map_or(0.0, |(_, s)| *s as f64);
            }
            seen += refs.len();
            loss_sum += value * refs.len() as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            progress.batch(
                seen,
                loss_sum / seen as f64,
                100.0 * score_sum / seen as f64,
            );
            if schedule.due(seen, order.len()) {
                let p = PartialEpoch {
                    epoch,
                    batches: step + 1,
                    seen,
                    loss_sum,
                    score_sum,
                    seconds: from.seconds + t0.elapsed().as_secs_f64(),
                };
                save_mid_epoch(&paths, &model, &optim, cfg.seed, &last_line, &p, device)?;
            }
        }
        let seconds = from.seconds + t0.elapsed().as_secs_f64();
        let val = match &val_items {
            Some(v) => Some(evaluate_vqa(
                &model.valid(),
                v,
                &answers,
                EvalSettings {
                    k: cfg.k,
                    batch: cfg.batch,
                    image_size: cfg.image_size,
                    engine: Engine::for_device(device),
                },
                val_annotations.as_deref(),
                device,
                &mut |_, _| {},
            )?),
            None => None,
        };
        let seen_f = seen.max(1) as f64;
        let line = VqaEpochLine {
            epoch: epoch + 1,
            lr,
            batch,
            train_loss: loss_sum / seen_f,
            train_score: 100.0 * score_sum / seen_f,
            questions_per_s: seen as f64 / seconds.max(1e-9),
            seconds,
            val,
        };
        let best;
        (last_line, best) = record_epoch(&paths, &model, &optim, cfg.seed, &line, line.epoch)?;
        progress.end_epoch(&EpochSummary {
            epoch: line.epoch,
            train_loss: line.train_loss,
            train_accuracy: line.train_score,
            val_accuracy: line
                .val
                .as_ref()
                .and_then(|v| v.score.as_ref().map(|s| s.overall)),
            best,
            questions_per_s: line.questions_per_s,
            lr,
            batch,
            warning: None,
        });
        lines.push(line);
    }
    Ok(lines)
}

fn model_cnn_config(cfg: &VqaRunConfig) -> Result<crate::cnn::ModularResNeXtConfig, TrainError> {
    let gate = crate::cnn::GateSettings::new().with_question_dim(cfg.question_dim);
    Ok(crate::cnn::ModularResNeXtConfig::new(cfg.cnn_layout()?, cfg.k).with_gate(gate))
}

fn load_vocab(run: &Path) -> Result<(Vocab, AnswerVocab), TrainError> {
    let paths = RunPaths::new(run);
    let text = std::fs::read_to_string(&paths.vocab).map_err(|e| io_err(&paths.vocab, e))?;
    let w: WordsFile = serde_json::from_str(&text).map_err(|e| io_err(&paths.vocab, e))?;
    let answers = AnswerVocab::load(&answers_path(run))?;
    Ok((w.words.reindex(), answers))
}

/// A trained VQA run ready for inference.
pub struct LoadedVqaRun {
    pub config: VqaRunConfig,
    pub words: Vocab,
    pub answers: AnswerVocab,
    pub model: Butd,
}

/// Loads a VQA run's config, vocabularies and last (or best) checkpoint
/// (eval mode).
pub fn load_vqa_run(
    run: &Path,
    choice: CheckpointChoice,
    device: &Device,
) -> Result<LoadedVqaRun, TrainError> {
    let paths = RunPaths::new(run);
    let text = std::fs::read_to_string(&paths.config).map_err(|e| io_err(&paths.config, e))?;
    let config: VqaRunConfig = serde_json::from_str(&text)
        .map_err(|e| io_err(&paths.config, format!("not a VQA run config: {e}")))?;
    let (words, answers) = load_vocab(run)?;
    let dir = chosen_checkpoint(&paths, choice)?;
    let model = config.model(words.len(), answers.len())?.init(device)?;
    let (model, _, _) =
        load_checkpoint(dir, model, adam(), device).map_err(|e| TrainError::Io(e.to_string()))?;
    Ok(LoadedVqaRun {
        config,
        words,
        answers,
        model: model.valid(),
    })
}

/// Evaluates (or, without annotations, only predicts) a run on a split of
/// `data`, sparse at `k` (default the run's).
pub fn evaluate_vqa_run(
    run: &Path,
    data: &Path,
    split: &str,
    inf: Inference,
    device: &Device,
    on_batch: OnBatch<'_>,
) -> Result<(VqaRunConfig, VqaEvalReport), TrainError> {
    let r = load_vqa_run(run, inf.checkpoint, device)?;
    let ds = Vqa2Split::open(data, split)?;
    let items = encode_vqa_split(&ds, &r.words, &r.answers);
    let ann = ds.has_annotations().then(|| annotation_file(data, split));
    let report = evaluate_vqa(
        &r.model,
        &items,
        &r.answers,
        EvalSettings {
            k: inf.k.unwrap_or(r.config.k),
            batch: inf.batch,
            image_size: r.config.image_size,
            engine: inf.engine,
        },
        ann.as_deref(),
        device,
        on_batch,
    )?;
    Ok((r.config, report))
}

/// One entry of the official results file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VqaResult {
    pub question_id: u64,
    pub answer: String,
}

/// The answer to one question about one image, with the chosen experts.
#[derive(Debug, Clone, Serialize)]
pub struct VqaSingleAnswer {
    pub answer: String,
    /// Sigmoid score of the answer.
    pub probability: f64,
    pub k: usize,
    /// Experts chosen in each block with their gate values, best first.
    pub experts: Vec<Vec<(usize, f64)>>,
}

/// Answers `question` about the image file `image` with a VQA run.
pub fn answer_vqa(
    run: &Path,
    image: &Path,
    question: &str,
    inf: Inference,
    device: &Device,
) -> Result<VqaSingleAnswer, TrainError> {
    let r = load_vqa_run(run, inf.checkpoint, device)?;
    let (tokens, known) = r.words.encode(question);
    if known == 0 {
        return Err(TrainError::Input(format!(
            "--question \"{question}\": no word of it is in the run's vocabulary"
        )));
    }
    let item = VqaItem {
        question_id: 0,
        image: image.to_path_buf(),
        tokens,
        targets: vec![],
        answer_type: String::new(),
    };
    let b = make_vqa_batch(
        &[&item],
        r.answers.len().max(1),
        r.config.image_size,
        device,
    )?;
    let k = inf.k.unwrap_or(r.config.k);
    let cnn = EvalCnn::new(&r.model.cnn, inf.engine)?;
    let out = r
        .model
        .forward_eval(b.images, b.tokens, &b.lengths, k, &cnn)?;
    let best = argmax_rows(out.logits.clone())?[0];
    let logit = out
        .logits
        .slice([0..1, best..best + 1])
        .into_scalar::<f32>() as f64;
    let experts = crate::train::run::chosen_experts(&out.gates)?;
    Ok(VqaSingleAnswer {
        answer: r.answers.answer(best).to_string(),
        probability: 1.0 / (1.0 + (-logit).exp()),
        k,
        experts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glove_rows_are_set_and_still_train() {
        let dir = crate::data::test_dir("vqa-glove");
        std::fs::create_dir_all(&dir).unwrap();
        let glove = dir.join("glove.txt");
        std::fs::write(&glove, "red 1 2 3 4\nzebra 5 6 7 8\n").unwrap();
        let words = Vocab::words(["what is red"], 1);
        let device = Device::default().autodiff();
        let model = ButdConfig::new(words.len(), 3, 12)
            .with_layout(CnnLayout::clevr())
            .with_embed_dim(4)
            .with_question_dim(8)
            .with_hidden(8)
            .init(&device)
            .unwrap();
        let model = init_glove(model, &words, &glove).unwrap();
        let red = words.get("red").unwrap();
        let w = model.embed.weight.val();
        let row = w
            .clone()
            .slice([red..red + 1, 0..4])
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(row, vec![1.0, 2.0, 3.0, 4.0]);
        // The replaced parameter still requires grad.
        let grads = (w * 2.0).sum().backward();
        assert!(model.embed.weight.grad(&grads).is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
