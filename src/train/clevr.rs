//! Training and evaluation of the Relation Network on a CLEVR-layout
//! dataset (the real CLEVR v1.0, Sort-of-CLEVR or clevr-2d).
//!
//! Loss = cross-entropy + balance weight * sum of the blocks' CV^2 (paper
//! appendix C). Training runs the CNN dense (all paths, unselected gates
//! zeroed, BN in train mode); evaluation runs it sparse with any k.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::cnn::Execution;
use crate::data::clevr_reader::{ClevrSplit, load_images};
use crate::kernels::{Engine, EvalCnn};
use crate::metrics::confusion::Confusion;
use crate::models::relation_network::DeadUnits;
use crate::models::{GatedVqaModel, RelationNetwork, RelationNetworkConfig, RnOutput};
use crate::moe::BalanceLossConfig;
use crate::moe::usage::{Usage, add_selections};
use crate::text::{PAD, Vocab};
use crate::train::TrainError;
use crate::train::checkpoint::PartialEpoch;
use crate::train::run::{MidEpochSchedule, check_resumed_epoch};

/// A question ready for batching.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub tokens: Vec<usize>,
    pub answer: Option<usize>,
    pub image: PathBuf,
    pub family: String,
}

/// Encodes a split with the run's vocabularies. A question with no known
/// word is an error naming it; an answer outside the vocabulary counts as
/// `None` (it can never be right, and is counted as wrong in accuracy).
pub fn encode_split(
    split: &ClevrSplit,
    words: &Vocab,
    answers: &Vocab,
) -> Result<Vec<Encoded>, TrainError> {
    split
        .questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let (tokens, known) = words.encode(&q.question);
            if known == 0 {
                return Err(TrainError::Input(format!(
                    "{} split, question {i} (\"{}\"): no word of it is in the vocabulary",
                    split.split, q.question
                )));
            }
            Ok(Encoded {
                tokens,
                answer: q.answer.as_deref().and_then(|a| answers.get(a)),
                image: split.image_path(q),
                family: q.family().to_string(),
            })
        })
        .collect()
}

/// Tensors of one batch.
pub struct Batch {
    pub images: Tensor<4>,
    pub tokens: Tensor<2, Int>,
    pub lengths: Vec<usize>,
    /// Answer index per question, -1 where unknown.
    pub answers: Vec<i64>,
}

/// Loads and pads one batch.
pub fn make_batch(
    items: &[&Encoded],
    image_size: u32,
    device: &Device,
) -> Result<Batch, TrainError> {
    let n = items.len();
    let paths: Vec<PathBuf> = items.iter().map(|e| e.image.clone()).collect();
    let pixels = load_images(&paths, image_size)?;
    let s = image_size as usize;
    let images = Tensor::from_data(TensorData::new(pixels, [n, 3, s, s]), device);
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
    Ok(Batch {
        images,
        tokens: Tensor::from_data(TensorData::new(tok, [n, t]), device),
        lengths: items.iter().map(|e| e.tokens.len().max(1)).collect(),
        answers: items
            .iter()
            .map(|e| e.answer.map_or(-1, |a| a as i64))
            .collect(),
    })
}

/// Index of the largest logit per row.
pub fn argmax_rows(logits: Tensor<2>) -> Result<Vec<usize>, TrainError> {
    let [n, a] = logits.dims();
    let v = logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| TrainError::Input(format!("logits: {e:?}")))?;
    Ok((0..n)
        .map(|r| {
            let row = &v[r * a..(r + 1) * a];
            // First maximum, as numpy's argmax.
            (0..a).fold(0, |best, i| if row[i] > row[best] { i } else { best })
        })
        .collect())
}

/// Evaluation of one split at one k.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub k: usize,
    pub questions: usize,
    /// Percent.
    pub accuracy: f64,
    /// Percent per question type.
    pub by_family: BTreeMap<String, f64>,
    /// Per block, how many questions chose each expert.
    pub expert_usage: Vec<Vec<u64>>,
    /// The same per question type ([`specialisation`](crate::moe::usage::specialisation)
    /// compares them).
    #[serde(default)]
    pub expert_usage_per_family: BTreeMap<String, Vec<Vec<u64>>>,
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
    /// Dead ReLU units of g and f on a probe of the split's questions
    /// ([`probe_dead_units`]); set by `train` and `eval`, not `evaluate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_units: Option<DeadUnits>,
    /// Per question type, right answer against given answer; filled by
    /// [`evaluate_run`](crate::train::run::evaluate_run) (`eval`), empty in
    /// training's validation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub confusion: Confusion,
    /// Predicted answer index per question, in order.
    #[serde(skip)]
    pub predictions: Vec<usize>,
}

/// Questions in the dead-unit probe ([`probe_dead_units`]).
pub const PROBE_QUESTIONS: usize = 128;

/// The dead units of `model` (eval mode) on [`PROBE_QUESTIONS`] of `items`
/// (all of them when fewer), drawn with a fixed seed so that the probe
/// covers the split and does not alias with a generator's order of question
/// types; its CNN run by `cnn` (built from `model.cnn`) at `k`. 16
/// questions at a time, since g holds every pair's activations (4,096 pairs
/// a question at 128x128).
pub fn probe_dead_units(
    model: &RelationNetwork,
    cnn: &EvalCnn,
    items: &[Encoded],
    k: usize,
    image_size: u32,
    device: &Device,
) -> Result<Option<DeadUnits>, TrainError> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut picked =
        rand::seq::index::sample(&mut rng, items.len(), PROBE_QUESTIONS.min(items.len()))
            .into_vec();
    picked.sort_unstable();
    let probe: Vec<&Encoded> = picked.iter().map(|&i| &items[i]).collect();
    let mut maxima: Vec<Vec<f32>> = Vec::new();
    for chunk in probe.chunks(16) {
        let b = make_batch(chunk, image_size, device)?;
        let q = model.encode_question(b.tokens, &b.lengths)?;
        let features = cnn.forward_k(b.images, Some(q.clone()), k)?;
        let m = model.relu_maxima(features, q)?;
        if maxima.is_empty() {
            maxima = m;
        } else {
            for (acc, layer) in maxima.iter_mut().zip(m) {
                for (a, x) in acc.iter_mut().zip(layer) {
                    *a = a.max(x);
                }
            }
        }
    }
    Ok((!probe.is_empty()).then(|| DeadUnits::from_maxima(&maxima, probe.len())))
}

/// Reports an evaluation's progress: `(questions done, questions)` after
/// each batch.
pub type OnBatch<'a> = &'a mut dyn FnMut(usize, usize);

/// Evaluates `model` (eval mode: give it `model.valid()`) sparse at `k`,
/// its CNN run by `cnn` (built from `model.cnn`); `on_batch` after each
/// batch.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &RelationNetwork,
    cnn: &EvalCnn,
    items: &[Encoded],
    k: usize,
    batch: usize,
    image_size: u32,
    device: &Device,
    on_batch: OnBatch<'_>,
) -> Result<EvalReport, TrainError> {
    let engine = cnn.engine();
    let t0 = Instant::now();
    let clock0 = cnn.clock();
    let mut right = 0usize;
    let mut fam: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut usage = Usage::new();
    let mut by_family: BTreeMap<String, Usage> = BTreeMap::new();
    let mut predictions = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let b = make_batch(&refs, image_size, device)?;
        let out = model.forward_eval(b.images, b.tokens, &b.lengths, k, cnn)?;
        for (i, e) in chunk.iter().enumerate() {
            let by = by_family.entry(e.family.clone()).or_default();
            for (bi, g) in out.gates.iter().enumerate() {
                let paths = g.values.dims()[1];
                add_selections(&mut usage, bi, paths, &g.indices[i]);
                add_selections(by, bi, paths, &g.indices[i]);
            }
        }
        let pred = argmax_rows(out.logits)?;
        for ((p, &a), e) in pred.iter().zip(&b.answers).zip(chunk) {
            let ok = a >= 0 && *p == a as usize;
            right += ok as usize;
            let f = fam.entry(e.family.clone()).or_default();
            f.0 += ok as usize;
            f.1 += 1;
        }
        predictions.extend(pred);
        on_batch(predictions.len(), items.len());
    }
    let pct = |r: usize, n: usize| {
        if n == 0 {
            0.0
        } else {
            100.0 * r as f64 / n as f64
        }
    };
    let questions_per_s = items.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    let cnn_ms_per_image = cnn.ms_per_image_since(clock0);
    Ok(EvalReport {
        k,
        questions: items.len(),
        accuracy: pct(right, items.len()),
        by_family: fam.into_iter().map(|(k, (r, n))| (k, pct(r, n))).collect(),
        expert_usage: usage,
        expert_usage_per_family: by_family,
        engine,
        questions_per_s,
        cnn_ms_per_image,
        dead_units: None,
        confusion: Confusion::new(),
        predictions,
    })
}

/// Statistics of one training epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochStats {
    pub loss: f64,
    /// Percent, on the training batches as seen (dropout on).
    pub accuracy: f64,
    pub questions: usize,
    pub seconds: f64,
    pub questions_per_s: f64,
}

/// Settings of one epoch.
pub struct EpochSettings {
    pub k: usize,
    pub batch: usize,
    pub lr: f64,
    pub image_size: u32,
    pub balance: BalanceLossConfig,
    pub seed: u64,
    pub epoch: usize,
}

/// A checkpoint writer for inside an epoch: the model, the optimizer and
/// the epoch so far.
pub type SaveMidEpoch<'a> = &'a mut dyn FnMut(
    &RelationNetwork,
    &burn::optim::ModuleOptimizer,
    &PartialEpoch,
) -> Result<(), TrainError>;

/// Where [`train_epoch`] starts, and its checkpoints inside the epoch.
#[derive(Default)]
pub struct MidEpoch<'a> {
    /// The epoch so far, when a run resumes from a checkpoint taken in it
    /// (its batches are skipped, its sums carried on).
    pub resume: Option<PartialEpoch>,
    /// Questions between checkpoints ([`MidEpochSchedule`]); none without
    /// `save`.
    pub every: usize,
    pub save: Option<SaveMidEpoch<'a>>,
}

/// One epoch of training over `items` (shuffled by seed and epoch), from
/// `mid.resume` on, with `mid`'s checkpoints inside it.
/// `on_batch(done, total, loss, acc)` reports progress.
pub fn train_epoch(
    model: RelationNetwork,
    optim: &mut burn::optim::ModuleOptimizer,
    items: &[Encoded],
    s: &EpochSettings,
    device: &Device,
    mut mid: MidEpoch<'_>,
    mut on_batch: impl FnMut(usize, usize, f64, f64),
) -> Result<(RelationNetwork, EpochStats), TrainError> {
    let mut order: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].answer.is_some())
        .collect();
    let mut rng =
        ChaCha8Rng::seed_from_u64(s.seed.wrapping_mul(1_000_003).wrapping_add(s.epoch as u64));
    order.shuffle(&mut rng);
    let t0 = Instant::now();
    let from = mid.resume.take().unwrap_or_default();
    check_resumed_epoch(&from, &order, s.batch)?;
    let (mut model, mut loss_sum, mut right, mut seen) =
        (model, from.loss_sum, from.score_sum, from.seen);
    let total = order.len();
    let mut schedule = MidEpochSchedule::new(if mid.save.is_some() { mid.every } else { 0 }, seen);
    for (step, chunk) in order.chunks(s.batch.max(1)).enumerate().skip(from.batches) {
        let refs: Vec<&Encoded> = chunk.iter().map(|&i| &items[i]).collect();
        let b = make_batch(&refs, s.image_size, device)?;
        let n = refs.len();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(b.answers.clone(), [n]), device);
        let out = model.forward(b.images, b.tokens, &b.lengths, s.k, Execution::Dense)?;
        let loss = rn_loss(&out, targets, &s.balance);
        let value = loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            return Err(TrainError::Diverged {
                epoch: s.epoch + 1,
                step,
                value,
            });
        }
        let pred = argmax_rows(out.logits.inner())?;
        right += pred
            .iter()
            .zip(&b.answers)
            .filter(|(p, a)| **p as i64 == **a)
            .count() as f64;
        seen += n;
        loss_sum += value * n as f64;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(s.lr, model, grads);
        on_batch(
            seen,
            total,
            loss_sum / seen as f64,
            100.0 * right / seen as f64,
        );
        if schedule.due(seen, total)
            && let Some(save) = mid.save.as_mut()
        {
            save(
                &model,
                optim,
                &PartialEpoch {
                    epoch: s.epoch,
                    batches: step + 1,
                    seen,
                    loss_sum,
                    score_sum: right,
                    seconds: from.seconds + t0.elapsed().as_secs_f64(),
                },
            )?;
        }
    }
    let seconds = from.seconds + t0.elapsed().as_secs_f64();
    Ok((
        model,
        EpochStats {
            loss: if seen > 0 {
                loss_sum / seen as f64
            } else {
                0.0
            },
            accuracy: if seen > 0 {
                100.0 * right / seen as f64
            } else {
                0.0
            },
            questions: seen,
            seconds,
            questions_per_s: seen as f64 / seconds.max(1e-9),
        },
    ))
}

/// The RN's training loss (paper appendix C): cross-entropy of `out`'s
/// logits against `targets`, plus `balance`'s weighted CV^2 of every block's
/// gate values.
pub fn rn_loss(out: &RnOutput, targets: Tensor<1, Int>, balance: &BalanceLossConfig) -> Tensor<1> {
    let ce = CrossEntropyLossConfig::new().init(&out.logits.device());
    balance.add_to(ce.forward(out.logits.clone(), targets), &out.gates)
}

/// A fresh Adam optimizer (every model's).
pub fn adam() -> burn::optim::ModuleOptimizer {
    // epsilon 1e-8 as in PyTorch (and the RN paper's TensorFlow): Burn's
    // default 1e-5 damps the updates of parameters whose gradients are small.
    AdamConfig::new().with_epsilon(1e-8).init()
}

/// Vocabularies of a run: words and answers from the train split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunVocab {
    pub words: Vocab,
    pub answers: Vocab,
}

impl RunVocab {
    /// Builds both vocabularies from a train split.
    pub fn from_train(split: &ClevrSplit) -> Self {
        RunVocab {
            words: Vocab::words(split.questions.iter().map(|q| q.question.as_str()), 1),
            answers: Vocab::answers(split.questions.iter().filter_map(|q| q.answer.as_deref())),
        }
    }

    /// Reads `vocab.json` of a run.
    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        let v: RunVocab = serde_json::from_str(&text)
            .map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
        Ok(RunVocab {
            words: v.words.reindex(),
            answers: v.answers.reindex(),
        })
    }
}

/// The model for a run's vocabularies.
pub fn build_model(
    vocab: &RunVocab,
    cfg: RelationNetworkConfig,
    device: &Device,
) -> Result<RelationNetwork, TrainError> {
    let cfg = RelationNetworkConfig {
        vocab_size: vocab.words.len(),
        num_answers: vocab.answers.len().max(1),
        ..cfg
    };
    Ok(cfg.init(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sort_of_clevr::{SortOfClevrConfig, generate};
    use burn::module::Module;

    #[test]
    fn a_tiny_run_lowers_the_loss_and_evaluates_at_any_k() {
        let dir = std::env::temp_dir().join(format!("moevqa-train-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        generate(
            &dir,
            &SortOfClevrConfig {
                train_images: 24,
                val_images: 4,
                seed: 3,
            },
        )
        .unwrap();
        let train = ClevrSplit::open(&dir, "train").unwrap();
        let val = ClevrSplit::open(&dir, "val").unwrap();
        let vocab = RunVocab::from_train(&train);
        let items = encode_split(&train, &vocab.words, &vocab.answers).unwrap();
        let val_items = encode_split(&val, &vocab.words, &vocab.answers).unwrap();
        let base = Device::default();
        base.seed(1);
        let ad = base.clone().autodiff();
        let cfg = RelationNetworkConfig::new(0, 0, 12)
            .with_g_dim(32)
            .with_f_dim(32)
            .with_question_dim(32)
            .with_gate_hidden(16);
        let mut model = build_model(&vocab, cfg, &ad).unwrap();
        let mut optim = adam();
        let mut losses = vec![];
        for epoch in 0..3 {
            let s = EpochSettings {
                k: 12,
                batch: 32,
                lr: 2e-3,
                image_size: 64,
                balance: BalanceLossConfig::new(),
                seed: 1,
                epoch,
            };
            let (m, stats) = train_epoch(
                model,
                &mut optim,
                &items,
                &s,
                &ad,
                MidEpoch::default(),
                |_, _, _, _| {},
            )
            .unwrap();
            model = m;
            assert_eq!(stats.questions, 480);
            losses.push(stats.loss);
        }
        assert!(losses[2] < losses[0], "loss did not fall: {losses:?}");
        let eval = model.valid();
        for k in [12, 6, 3] {
            let burn = EvalCnn::new(&eval.cnn, Engine::Burn).unwrap();
            let r = evaluate(&eval, &burn, &val_items, k, 16, 64, &base, &mut |_, _| {}).unwrap();
            // The fast CPU path gives the same answers and the same experts.
            let packed = EvalCnn::new(&eval.cnn, Engine::Fast).unwrap();
            let mut ticks = Vec::new();
            let fast = evaluate(&eval, &packed, &val_items, k, 16, 64, &base, &mut |d, n| {
                ticks.push((d, n))
            })
            .unwrap();
            // Progress after each batch of 16, to all 80 questions.
            assert_eq!(ticks, (1..=5).map(|b| (16 * b, 80)).collect::<Vec<_>>());
            assert_eq!(fast.predictions, r.predictions, "k {k}");
            assert_eq!(fast.expert_usage, r.expert_usage, "k {k}");
            // The CNN is timed on the fast engine only; a second
            // evaluation with the same EvalCnn times its own calls.
            assert_eq!(r.cnn_ms_per_image, None);
            let ms = fast.cnn_ms_per_image.unwrap();
            assert!(
                ms > 0.0 && ms < 1e3 / fast.questions_per_s,
                "k {k}: {ms} ms"
            );
            let again = evaluate(
                &eval,
                &packed,
                &val_items[..16],
                k,
                16,
                64,
                &base,
                &mut |_, _| {},
            )
            .unwrap();
            assert!(again.cnn_ms_per_image.is_some_and(|m| m > 0.0));
            assert_eq!(packed.clock().unwrap().images, 96);
            assert_eq!(r.questions, 80);
            assert_eq!(r.expert_usage.len(), 3);
            assert!(
                r.expert_usage
                    .iter()
                    .all(|u| u.iter().sum::<u64>() == 80 * k as u64)
            );
            assert!(r.by_family.len() >= 5);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Timing of training steps (`moevqa bench train`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainStepBench {
    pub model: String,
    pub batch: usize,
    pub k: usize,
    pub image_size: u32,
    pub g_dim: usize,
    pub f_dim: usize,
    pub iters: usize,
    /// Median milliseconds of one step (forward, loss, backward, Adam).
    pub step_ms: f64,
    pub questions_per_s: f64,
}

/// What `bench_train_step` trains: batch, k, input size and the widths
/// of g and f (the full-size model is g 4x256, f 256).
#[derive(Debug, Clone)]
pub struct TrainStepShape {
    pub batch: usize,
    pub k: usize,
    pub image_size: u32,
    pub g_dim: usize,
    pub f_dim: usize,
}

/// Times `iters` training steps (after `warmup` untimed ones) of the
/// Relation Network of `shape` (LSTM 128) on random images and questions
/// of 10 words: the cost of a step, without data loading.
pub fn bench_train_step(
    shape: &TrainStepShape,
    iters: usize,
    warmup: usize,
    device: &Device,
) -> Result<TrainStepBench, TrainError> {
    use burn::tensor::Distribution;
    let TrainStepShape {
        batch,
        k,
        image_size,
        g_dim,
        f_dim,
    } = *shape;
    if batch == 0 || iters == 0 {
        return Err(TrainError::Input(
            "--batch and --iters must be at least 1".into(),
        ));
    }
    if g_dim == 0 || f_dim == 0 {
        return Err(TrainError::Input(
            "--g-dim and --f-dim must be at least 1".into(),
        ));
    }
    let ad = device.clone().autodiff();
    ad.seed(1);
    let mut model = RelationNetworkConfig::new(80, 10, k)
        .with_g_dim(g_dim)
        .with_f_dim(f_dim)
        .init(&ad)?;
    let mut optim = adam();
    let s = image_size as usize;
    let images = Tensor::<4>::random([batch, 3, s, s], Distribution::Normal(0.0, 1.0), &ad);
    let tokens = Tensor::<2, Int>::random([batch, 10], Distribution::Uniform(2.0, 79.0), &ad);
    let lengths = vec![10; batch];
    let targets = Tensor::<1, Int>::random([batch], Distribution::Uniform(0.0, 9.0), &ad);
    let balance = BalanceLossConfig::new();
    let mut times = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let t0 = Instant::now();
        let out = model.forward(
            images.clone(),
            tokens.clone(),
            &lengths,
            k,
            Execution::Dense,
        )?;
        let loss = rn_loss(&out, targets.clone(), &balance);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-4, model, grads);
        ad.sync()
            .map_err(|e| TrainError::Input(format!("device sync: {e:?}")))?;
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let step_ms = times[times.len() / 2];
    Ok(TrainStepBench {
        model: "clevr".into(),
        batch,
        k,
        image_size,
        g_dim,
        f_dim,
        iters,
        step_ms,
        questions_per_s: batch as f64 / (step_ms / 1e3),
    })
}
