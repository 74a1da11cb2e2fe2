//! A training run directory and the loop over epochs.
//!
//! `RUN/config.json` (the settings), `RUN/vocab.json` (word and answer
//! vocabularies of the train split), `RUN/metrics.jsonl` (one JSON line per
//! epoch), `RUN/checkpoint/` (model, optimizer and trainer state after the
//! last completed epoch, swapped in atomically).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::clevr_format::write_json_atomic;
use crate::data::clevr_reader::ClevrSplit;
use crate::data::fingerprint::DataFingerprint;
use crate::kernels::{Engine, EvalCnn};
use crate::metrics::confusion;
use crate::models::RelationNetworkConfig;
use crate::models::relation_network::DeadUnits;
use crate::models::{GatedVqaModel, RelationNetwork};
use crate::moe::BalanceLossConfig;
use crate::train::checkpoint::{
    PartialEpoch, TrainState, copy_checkpoint, has_checkpoint, load_checkpoint, load_train_state,
    save_checkpoint,
};
use crate::train::clevr::{
    Encoded, EpochSettings, EvalReport, MidEpoch, OnBatch, RunVocab, adam, build_model,
    encode_split, evaluate, make_batch, probe_dead_units, train_epoch,
};
use crate::train::{CheckpointChoice, Inference, TrainError};
use burn::module::Module;
use burn::tensor::Device;

/// Settings of a run, saved as `RUN/config.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    pub dataset: String,
    pub data: PathBuf,
    pub k: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub image_size: u32,
    pub balance_weight: f64,
    /// Epochs of linear learning-rate and batch-size warm-up (0: none).
    pub warmup_epochs: usize,
    pub g_dim: usize,
    pub f_dim: usize,
    pub question_dim: usize,
    /// Questions between checkpoints inside an epoch (0: at epoch ends only).
    #[serde(default)]
    pub checkpoint_every: usize,
}

impl RunConfig {
    /// Model settings of this run (vocabulary sizes are filled in later).
    pub fn model(&self) -> RelationNetworkConfig {
        RelationNetworkConfig::new(0, 0, self.k)
            .with_g_dim(self.g_dim)
            .with_f_dim(self.f_dim)
            .with_question_dim(self.question_dim)
    }

    /// Learning rate and batch size of an epoch under warm-up: the batch
    /// doubles up to `batch` and the rate rises linearly to `lr`.
    pub fn schedule(&self, epoch: usize) -> (f64, usize) {
        if epoch >= self.warmup_epochs {
            return (self.lr, self.batch);
        }
        let left = (self.warmup_epochs - epoch) as u32;
        let batch = (self.batch >> left.min(16)).max(1);
        (
            self.lr * (epoch + 1) as f64 / (self.warmup_epochs + 1) as f64,
            batch,
        )
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |flag: &str, msg: &str| Err(TrainError::Input(format!("{flag}: {msg}")));
        if self.epochs == 0 {
            return bad("--epochs", "must be at least 1");
        }
        if self.batch == 0 {
            return bad("--batch", "must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr", "must be a positive number");
        }
        if self.image_size < 32 {
            return bad("--image-size", "must be at least 32 pixels");
        }
        if !(self.balance_weight.is_finite() && self.balance_weight >= 0.0) {
            return bad("--balance-weight", "must be a number >= 0");
        }
        Ok(())
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLine {
    pub epoch: usize,
    pub lr: f64,
    pub batch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub questions_per_s: f64,
    pub seconds: f64,
    pub val: Option<EvalReport>,
}

/// What a progress display shows at the end of an epoch (any model).
#[derive(Debug, Clone)]
pub struct EpochSummary {
    pub epoch: usize,
    pub train_loss: f64,
    /// Percent: accuracy (CLEVR) or mean soft score (VQA).
    pub train_accuracy: f64,
    pub val_accuracy: Option<f64>,
    /// Whether this epoch's validation is the run's best so far (its
    /// checkpoint was copied to `RUN/best`).
    pub best: bool,
    pub questions_per_s: f64,
    pub lr: f64,
    pub batch: usize,
    /// Something the user should act on (printed after the epoch line).
    pub warning: Option<String>,
}

/// Paths inside a run directory.
pub struct RunPaths {
    pub root: PathBuf,
    pub config: PathBuf,
    pub vocab: PathBuf,
    pub metrics: PathBuf,
    pub checkpoint: PathBuf,
    /// The train split's fingerprint ([`check_same_data`]).
    pub data: PathBuf,
    /// The end of the epoch with the best validation ([`keep_best`]).
    pub best: PathBuf,
}

impl RunPaths {
    /// The paths under `root`.
    pub fn new(root: &Path) -> Self {
        RunPaths {
            root: root.to_path_buf(),
            config: root.join("config.json"),
            vocab: root.join("vocab.json"),
            metrics: root.join("metrics.jsonl"),
            checkpoint: root.join("checkpoint"),
            data: root.join("data.json"),
            best: root.join("best"),
        }
    }
}

pub(crate) fn io_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

/// Reads a run's config.
pub fn load_config(path: &Path) -> Result<RunConfig, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| io_err(path, format!("not a run config: {e}")))
}

/// The `checkpoint_every` saved in the run directory `out` (either kind of
/// run; 0 for a run saved before the setting existed), or None where no
/// readable config is there.
pub fn saved_checkpoint_every(out: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(RunPaths::new(out).config).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let every = v.get("checkpoint_every").map_or(Some(0), |e| e.as_u64());
    every.and_then(|e| usize::try_from(e).ok())
}

/// Seconds left in a run at `rate` questions/s, in epoch `epoch` (from 0)
/// of `epochs`, each of `total` questions, `done` of this one done: the rest
/// of this epoch and all later ones. Validation is not counted.
pub fn run_seconds_left(epoch: usize, epochs: usize, total: usize, done: usize, rate: f64) -> f64 {
    let later = epochs.saturating_sub(epoch + 1) * total;
    (total.saturating_sub(done) + later) as f64 / rate.max(1e-9)
}

/// A duration for people: "45 s", "12 min 05 s", "2 h 05 min".
pub fn duration_text(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
    }
}

/// Progress callbacks of [`train`].
pub trait Progress {
    /// Start of an epoch of `total` questions, `done` of them already
    /// (a run resumed from a checkpoint inside the epoch).
    fn start_epoch(&mut self, epoch: usize, epochs: usize, total: usize, done: usize);
    /// After a batch.
    fn batch(&mut self, done: usize, loss: f64, accuracy: f64);
    /// End of an epoch.
    fn end_epoch(&mut self, summary: &EpochSummary);
    /// A resumed run starts from its checkpoint: `epochs` complete, and
    /// `partial` of the next one if the checkpoint was taken inside it.
    fn resumed(&mut self, epochs: usize, partial: Option<&PartialEpoch>) {
        let _ = (epochs, partial);
    }
    /// Something the user should know about this run (one line).
    fn note(&mut self, text: &str) {
        let _ = text;
    }
}

/// Trains (or resumes) a Relation Network run. `device` is the plain device;
/// training uses its autodiff form.
pub fn train(
    cfg: &RunConfig,
    out: &Path,
    resume: bool,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<Vec<EpochLine>, TrainError> {
    cfg.validate()?;
    let paths = RunPaths::new(out);
    let opened = open_run_dir(&paths, resume, cfg, progress)?;
    let resuming = opened.resuming;
    let train_split = ClevrSplit::open(&cfg.data, "train")?;
    let val_split = ClevrSplit::open(&cfg.data, "val").ok();
    let built = RunVocab::from_train(&train_split);
    let vocab = if resuming {
        let saved = RunVocab::load(&paths.vocab)?;
        check_same_vocab(&saved, &built, &cfg.data, &paths.vocab)?;
        saved
    } else {
        built
    };
    check_same_data(&paths, resuming, &train_split.fingerprint(), &cfg.data)?;
    opened.save_config(&paths, cfg)?;
    if !resuming {
        write_json_atomic(&paths.vocab, &vocab)?;
    }
    let items = encode_split(&train_split, &vocab.words, &vocab.answers)?;
    let val_items = match &val_split {
        Some(v) => Some(encode_split(v, &vocab.words, &vocab.answers)?),
        None => None,
    };
    device.seed(cfg.seed);
    let ad = device.clone().autodiff();
    let mut model = build_model(&vocab, cfg.model(), &ad)?;
    let mut optim = adam();
    let mut state = TrainState::default();
    if resuming {
        (model, optim, state) = resume_from(&paths, model, optim, &ad)?;
        progress.resumed(state.epoch, state.partial.as_ref());
    }
    // The last complete epoch's line, kept in mid-epoch checkpoints.
    let mut last_line = state.metrics.clone();
    let mut partial = state.partial.take();
    let mut lines = Vec::new();
    for epoch in state.epoch..cfg.epochs {
        let resume = begin_epoch(&mut partial, cfg.seed, epoch, device);
        let (lr, batch) = cfg.schedule(epoch);
        let settings = EpochSettings {
            k: cfg.k,
            batch,
            lr,
            image_size: cfg.image_size,
            balance: BalanceLossConfig::new().with_weight(cfg.balance_weight),
            seed: cfg.seed,
            epoch,
        };
        progress.start_epoch(
            epoch,
            cfg.epochs,
            items.iter().filter(|e| e.answer.is_some()).count(),
            resume.as_ref().map_or(0, |p| p.seen),
        );
        let mut save = |m: &RelationNetwork, o: &burn::optim::ModuleOptimizer, p: &PartialEpoch| {
            save_mid_epoch(&paths, m, o, cfg.seed, &last_line, p, device)
        };
        let mid = MidEpoch {
            resume,
            every: cfg.checkpoint_every,
            save: Some(&mut save),
        };
        let (m, stats) = train_epoch(
            model,
            &mut optim,
            &items,
            &settings,
            &ad,
            mid,
            |done, _, loss, acc| progress.batch(done, loss, acc),
        )?;
        model = m;
        let val = match &val_items {
            Some(v) => {
                let valid = model.valid();
                let cnn = EvalCnn::new(&valid.cnn, Engine::for_device(device))?;
                let (k, size) = (cfg.k, cfg.image_size);
                let mut report =
                    evaluate(&valid, &cnn, v, k, cfg.batch, size, device, &mut |_, _| {})?;
                report.dead_units = probe_dead_units(&valid, &cnn, v, k, size, device)?;
                Some(report)
            }
            None => None,
        };
        let line = EpochLine {
            epoch: epoch + 1,
            lr,
            batch,
            train_loss: stats.loss,
            train_accuracy: stats.accuracy,
            questions_per_s: stats.questions_per_s,
            seconds: stats.seconds,
            val,
        };
        let best;
        (last_line, best) = record_epoch(&paths, &model, &optim, cfg.seed, &line, line.epoch)?;
        progress.end_epoch(&EpochSummary {
            epoch: line.epoch,
            train_loss: line.train_loss,
            train_accuracy: line.train_accuracy,
            val_accuracy: line.val.as_ref().map(|v| v.accuracy),
            best,
            questions_per_s: line.questions_per_s,
            lr,
            batch,
            warning: line
                .val
                .as_ref()
                .and_then(|v| dead_g_warning(v.dead_units.as_ref()?, cfg.lr)),
        });
        lines.push(line);
    }
    Ok(lines)
}

/// Share of g's last layer dead from which `train` warns.
pub const DEAD_G_WARNING: f64 = 0.5;

/// The warning for a run whose g is dying, if it is.
pub fn dead_g_warning(dead: &DeadUnits, lr: f64) -> Option<String> {
    let last = *dead.g.last()?;
    (last >= DEAD_G_WARNING).then(|| {
        format!(
            "{:.0}% of g's last layer is dead (zero for all {} probe questions of val): the answers \
             barely depend on the image; a lower --lr than {lr:.1e} keeps g alive",
            100.0 * last,
            dead.questions
        )
    })
}

/// The settings that differ between two configs, as `--flag (saved X,
/// given Y)` (each field of a run's config is the flag of that name).
pub fn settings_diff<T: Serialize>(saved: &T, given: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(saved), serde_json::to_value(given))
    else {
        return vec!["(unreadable settings)".into()];
    };
    a.iter()
        .filter(|(key, value)| b.get(*key) != Some(*value))
        .map(|(key, value)| {
            let now = b.get(key).map_or("none".to_string(), |v| v.to_string());
            format!("--{} (saved {value}, given {now})", key.replace('_', "-"))
        })
        .collect()
}

/// What a resume that changes `--checkpoint-every` from `saved` to `given`
/// says (None when it does not change it). Allowed, so that a long run
/// started without mid-epoch checkpoints can get them. Up to its first new
/// checkpoint (or the epoch's end) a run resumed inside an epoch draws from
/// the resumed point's seed, as neither setting's unstopped run would;
/// after it, as a run with the new setting.
pub fn new_checkpoints(saved: usize, given: usize) -> Option<String> {
    (saved != given).then(|| {
        format!(
            "--checkpoint-every changes from {saved} to {given}: from its first new checkpoint \
             (or the next epoch) on, the run draws as one started with --checkpoint-every {given}"
        )
    })
}

/// What a resume that reads its data from `given` instead of `saved` says
/// (None when the path is the same). Allowed, so that a dataset moved (to
/// another disk, another machine) or named another way (relative or
/// absolute) does not strand a run; the trainer then checks that the new
/// train split gives the run's saved vocabularies ([`check_same_vocab`]).
pub fn moved_data(saved: &str, given: &str) -> Option<String> {
    (saved != given).then(|| {
        format!(
            "--data changes from {saved} to {given}: the run goes on if that train split gives \
             the run's saved vocabularies"
        )
    })
}

/// On a resume, the vocabularies built from the given train split (`built`)
/// must be those saved with the run (`saved`, read from `file`, the
/// vocabulary file or the run directory that holds them): the model's
/// embedding and answer layer are sized and indexed by them, and a dataset
/// whose words or answers differ is another dataset.
pub fn check_same_vocab<V: PartialEq>(
    saved: &V,
    built: &V,
    data: &Path,
    file: &Path,
) -> Result<(), TrainError> {
    if saved == built {
        return Ok(());
    }
    Err(TrainError::Input(format!(
        "--data {}: its train split gives other word or answer vocabularies than the run's {}; \
         resume on the data the run was trained on",
        data.display(),
        file.display()
    )))
}

/// The train split's fingerprint (`built`, from the data given) against the
/// one saved with the run in `RUN/data.json`, then saved there. The
/// vocabulary check ([`check_same_vocab`]) is what the model's shape
/// needs; this one tells the data a run was trained on from other data
/// with the same words and answers. A run saved before the file existed
/// has none to compare: its resume saves the given data's.
pub fn check_same_data(
    paths: &RunPaths,
    resuming: bool,
    built: &DataFingerprint,
    data: &Path,
) -> Result<(), TrainError> {
    if resuming && paths.data.exists() {
        let text = std::fs::read_to_string(&paths.data).map_err(|e| io_err(&paths.data, e))?;
        let saved: DataFingerprint = serde_json::from_str(&text)
            .map_err(|e| io_err(&paths.data, format!("not a data fingerprint: {e}")))?;
        if saved != *built {
            return Err(TrainError::Input(format!(
                "--data {}: its train split ({built}) is not the one the run was trained on \
                 ({saved}, in {}); resume on that data, or remove that file to go on with this data",
                data.display(),
                paths.data.display()
            )));
        }
        return Ok(());
    }
    Ok(write_json_atomic(&paths.data, built)?)
}

/// The settings a resume may change: it may extend a run, change how often
/// it checkpoints inside an epoch ([`new_checkpoints`]), or read its data
/// from another place ([`moved_data`]).
const RESUMABLE: [&str; 3] = ["epochs", "checkpoint_every", "data"];

/// Settings read only when a run starts (a VQA run's `--glove` and
/// `--init-cnn`: the checkpoint holds the weights they gave). A resume may
/// give them otherwise (the file moved, or left out) and is told so; the
/// run keeps and records its own.
const START_ONLY: [&str; 2] = ["glove", "init_cnn"];

/// A run directory opened by [`open_run_dir`].
#[derive(Debug)]
pub struct OpenedRun {
    /// Whether a checkpoint is resumed.
    pub resuming: bool,
    /// The saved values of [`START_ONLY`] settings, kept on a resume.
    start_only: serde_json::Map<String, serde_json::Value>,
}

impl OpenedRun {
    /// Writes the run's config: `given`, but for the settings a resumed run
    /// keeps from its start.
    pub fn save_config<C: Serialize>(&self, paths: &RunPaths, given: &C) -> Result<(), TrainError> {
        let mut value =
            serde_json::to_value(given).map_err(|e| io_err(&paths.config, e.to_string()))?;
        if let serde_json::Value::Object(map) = &mut value {
            map.extend(self.start_only.clone());
        }
        Ok(write_json_atomic(&paths.config, &value)?)
    }
}

/// Creates the run directory and checks it: a run already there needs
/// `resume`, and a resumed run's saved config must equal `given` but for
/// [`RESUMABLE`] (else an error naming each flag that differs,
/// [`settings_diff`]) and for [`START_ONLY`] (kept as saved); a changed
/// `checkpoint_every`, `data` or start-only setting, and a `resume` that
/// finds no checkpoint, are told to `progress`.
pub fn open_run_dir<C: Serialize + serde::de::DeserializeOwned>(
    paths: &RunPaths,
    resume: bool,
    given: &C,
    progress: &mut dyn Progress,
) -> Result<OpenedRun, TrainError> {
    let out = &paths.root;
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let resuming = resume && has_checkpoint(&paths.checkpoint);
    let mut start_only = serde_json::Map::new();
    if !resume && (has_checkpoint(&paths.checkpoint) || paths.metrics.exists()) {
        return Err(TrainError::Input(format!(
            "{}: already holds a run; pass --resume to continue it or choose another --out",
            out.display()
        )));
    }
    if resume && !resuming {
        if paths.metrics.exists() {
            // Epochs were recorded but their checkpoint is gone or cut short
            // (a half-copied run directory): starting over would append a
            // new run's lines to the old ones.
            return Err(TrainError::Input(format!(
                "{}: holds {} but no complete checkpoint to resume from; restore {} or choose another --out",
                out.display(),
                paths.metrics.display(),
                paths.checkpoint.display()
            )));
        }
        // Said, not refused: scripts resume-or-start with one command line,
        // but a mistyped --out must not pass for a resumed run.
        progress.note(&format!(
            "{} holds no checkpoint: --resume starts a new run there",
            out.display()
        ));
    }
    if resuming {
        let text = std::fs::read_to_string(&paths.config).map_err(|e| io_err(&paths.config, e))?;
        let not_config = |e: &dyn std::fmt::Display| {
            io_err(&paths.config, format!("not a run config of this kind: {e}"))
        };
        let saved: C = serde_json::from_str(&text).map_err(|e| not_config(&e))?;
        let (serde_json::Value::Object(mut saved), serde_json::Value::Object(mut given)) = (
            serde_json::to_value(&saved).map_err(|e| not_config(&e))?,
            serde_json::to_value(given).map_err(|e| not_config(&e))?,
        ) else {
            return Err(not_config(&"not an object"));
        };
        let every = |m: &serde_json::Map<_, serde_json::Value>| {
            m.get("checkpoint_every")
                .and_then(|v| v.as_u64())
                .unwrap_or(0) as usize
        };
        let data = |m: &serde_json::Map<_, serde_json::Value>| {
            m.get("data")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let mut notes = vec![
            new_checkpoints(every(&saved), every(&given)),
            moved_data(&data(&saved), &data(&given)),
        ];
        for key in START_ONLY {
            let (was, now) = (saved.remove(key), given.remove(key));
            if was != now {
                let show = |v: &Option<serde_json::Value>| match v {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Null) | None => "none".into(),
                    Some(v) => v.to_string(),
                };
                let flag = format!("--{}", key.replace('_', "-"));
                notes.push(Some(format!(
                    "{flag} is read only when a run starts: this run keeps its {} (given {})",
                    show(&was),
                    show(&now)
                )));
            }
            if let Some(v) = was {
                start_only.insert(key.to_string(), v);
            }
        }
        for key in RESUMABLE {
            saved.remove(key);
            given.remove(key);
        }
        let diff = settings_diff(&saved, &given);
        if !diff.is_empty() {
            return Err(TrainError::Input(format!(
                "{}: saved with other settings than given now: {}; resume with the same flags (only --epochs, --checkpoint-every and --data may change)",
                paths.config.display(),
                diff.join(", ")
            )));
        }
        for note in notes.iter().flatten() {
            progress.note(note);
        }
    }
    Ok(OpenedRun {
        resuming,
        start_only,
    })
}

/// After an epoch: the checkpoint (with `line` as its metrics), the
/// metrics line, then `RUN/best` ([`keep_best`]); returns the line as
/// saved and whether the epoch is the run's best so far.
pub fn record_epoch<M: Module + std::fmt::Display>(
    paths: &RunPaths,
    model: &M,
    optim: &burn::optim::ModuleOptimizer,
    seed: u64,
    line: &impl Serialize,
    epoch: usize,
) -> Result<(serde_json::Value, bool), TrainError> {
    let state = TrainState {
        epoch,
        step: 0,
        seed,
        metrics: serde_json::to_value(line).unwrap_or_default(),
        partial: None,
    };
    save_checkpoint(&paths.checkpoint, model, optim, &state)
        .map_err(|e| TrainError::Io(e.to_string()))?;
    append_metrics(&paths.metrics, line)?;
    let best = keep_best(paths, &state)?.is_some();
    Ok((state.metrics, best))
}

/// Keeps `RUN/best` at the run's best epoch so far: when the run's
/// checkpoint (whose state is `state`) is the end of an epoch whose validation accuracy (or VQA
/// score) in `metrics.jsonl` beats every earlier epoch's, and `RUN/best`
/// holds something else, the checkpoint is copied there
/// ([`copy_checkpoint`]: hard links, atomic). Returns that epoch when it
/// copied. Called after each epoch's checkpoint, and on a resume, which
/// also mends a run killed between the two (or saved before runs kept
/// their best: it gets one once its last epoch is its best).
pub fn keep_best(paths: &RunPaths, state: &TrainState) -> Result<Option<u64>, TrainError> {
    if state.partial.is_some() || state.epoch == 0 {
        return Ok(None);
    }
    let best = crate::train::report::RunMetrics::read(&paths.root)?.best();
    match best {
        Some((epoch, _)) if epoch == state.epoch as u64 => {}
        _ => return Ok(None),
    }
    // The same epoch line means the same checkpoint: nothing to copy.
    if load_train_state(&paths.best)
        .is_ok_and(|b| b.partial.is_none() && b.metrics == state.metrics)
    {
        return Ok(None);
    }
    copy_checkpoint(&paths.checkpoint, &paths.best).map_err(|e| TrainError::Io(e.to_string()))?;
    Ok(Some(state.epoch as u64))
}

/// The checkpoint directory inference loads for `choice`, or an error
/// naming it when there is none.
pub fn chosen_checkpoint(paths: &RunPaths, choice: CheckpointChoice) -> Result<&Path, TrainError> {
    let (dir, why) = match choice {
        CheckpointChoice::Last => (&paths.checkpoint, "train at least one epoch first"),
        CheckpointChoice::Best => (
            &paths.best,
            "kept at the end of each epoch whose validation beats every earlier one, so a run \
             without a val split has none; --checkpoint last loads the last checkpoint",
        ),
    };
    if has_checkpoint(dir) {
        Ok(dir)
    } else {
        Err(TrainError::Input(format!(
            "{}: no checkpoint ({why})",
            dir.display()
        )))
    }
}

/// "RUN/best is the end of epoch E (val V%)", for a note before
/// inference from it; None when the run has no best checkpoint.
pub fn best_note(run: &Path) -> Option<String> {
    let paths = RunPaths::new(run);
    let state = load_train_state(&paths.best).ok()?;
    let val = crate::train::report::val_of(&state.metrics)
        .map_or(String::new(), |v| format!(" (val {v:.2}%)"));
    Some(format!(
        "{} is the end of epoch {}{val}",
        paths.best.display(),
        state.epoch
    ))
}

/// Starts `epoch`: takes from `partial` the part of it a mid-epoch
/// checkpoint saved (None if that checkpoint is of another epoch, or
/// there is none) and seeds the device as an unstopped run's is at that
/// point ([`mid_seed`], else [`epoch_seed`]), so a resumed run draws the
/// same dropout masks as an uninterrupted one.
pub fn begin_epoch(
    partial: &mut Option<PartialEpoch>,
    seed: u64,
    epoch: usize,
    device: &Device,
) -> Option<PartialEpoch> {
    let from = partial.take().filter(|p| p.epoch == epoch);
    device.seed(match &from {
        Some(p) => mid_seed(seed, epoch, p.seen),
        None => epoch_seed(seed, epoch),
    });
    from
}

/// Loads the run's checkpoint into `model` and `optim`, trims the
/// metrics to it and mends `RUN/best` ([`keep_best`]); returns them with the saved state (completed epochs, and
/// how far the next one got if the checkpoint was taken inside it).
pub fn resume_from<M: Module + std::fmt::Display>(
    paths: &RunPaths,
    model: M,
    optim: burn::optim::ModuleOptimizer,
    device: &Device,
) -> Result<(M, burn::optim::ModuleOptimizer, TrainState), TrainError> {
    let (m, o, state) = load_checkpoint(&paths.checkpoint, model, optim, device)
        .map_err(|e| TrainError::Io(e.to_string()))?;
    rewrite_metrics(&paths.metrics, &state)?;
    keep_best(paths, &state)?;
    Ok((m, o, state))
}

/// When to take checkpoints inside an epoch: after the batch that reaches
/// each multiple of `every` questions (0: never), except the epoch's last
/// (the end-of-epoch checkpoint follows it).
#[derive(Debug, Clone, Copy)]
pub struct MidEpochSchedule {
    every: usize,
    next: usize,
}

impl MidEpochSchedule {
    /// The schedule of an epoch that starts at `seen` questions done.
    pub fn new(every: usize, seen: usize) -> Self {
        MidEpochSchedule {
            every,
            next: seen
                .checked_div(every)
                .map_or(usize::MAX, |q| (q + 1) * every),
        }
    }

    /// Whether to checkpoint now, `seen` of `total` questions done.
    pub fn due(&mut self, seen: usize, total: usize) -> bool {
        if seen < self.next || seen >= total {
            return false;
        }
        self.next = (seen / self.every + 1) * self.every;
        true
    }
}

/// A checkpoint inside an epoch: the model and optimizer as they are, the
/// last complete epoch's metrics line (`last_line`, kept for a resume),
/// and how far the epoch got. Then the device is reseeded from that point
/// ([`mid_seed`]), as a resumed run reseeds it: the dropout masks after a
/// checkpoint are the same whether or not the run was stopped there.
#[allow(clippy::too_many_arguments)]
pub fn save_mid_epoch<M: Module + std::fmt::Display>(
    paths: &RunPaths,
    model: &M,
    optim: &burn::optim::ModuleOptimizer,
    seed: u64,
    last_line: &serde_json::Value,
    partial: &PartialEpoch,
    device: &Device,
) -> Result<(), TrainError> {
    let state = TrainState {
        epoch: partial.epoch,
        step: 0,
        seed,
        metrics: last_line.clone(),
        partial: Some(partial.clone()),
    };
    save_checkpoint(&paths.checkpoint, model, optim, &state)
        .map_err(|e| TrainError::Io(e.to_string()))?;
    device.seed(mid_seed(seed, partial.epoch, partial.seen));
    Ok(())
}

/// Checks that the epoch a checkpoint stopped in (`partial`) still
/// splits into the same batches: its first `partial.batches` batches of
/// `order` must hold the `partial.seen` questions it had done.
pub fn check_resumed_epoch(
    partial: &PartialEpoch,
    order: &[usize],
    batch: usize,
) -> Result<(), TrainError> {
    let done: usize = order
        .chunks(batch.max(1))
        .take(partial.batches)
        .map(<[usize]>::len)
        .sum();
    if done == partial.seen {
        return Ok(());
    }
    Err(TrainError::Input(format!(
        "checkpoint: epoch {} stopped after {} questions in {} batches, but the training split \
         now gives {done} there: the data changed since; train the run again",
        partial.epoch + 1,
        partial.seen,
        partial.batches
    )))
}

/// The RNG seed from a mid-epoch checkpoint on: `seen` questions into
/// `epoch`.
pub fn mid_seed(seed: u64, epoch: usize, seen: usize) -> u64 {
    epoch_seed(seed, epoch) ^ (seen as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Appends one JSON line to `metrics.jsonl`.
pub fn append_metrics(path: &Path, line: &impl Serialize) -> Result<(), TrainError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    let json = serde_json::to_string(line).map_err(|e| io_err(path, e))?;
    writeln!(f, "{json}").map_err(|e| io_err(path, e))
}

/// The RNG seed of `epoch` (model init uses `seed` itself).
pub fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(epoch as u64 + 1)
}

/// After a resume: keep the metric lines of the epochs the checkpoint holds
/// (a run killed after its checkpoint but before its metric line gets the
/// line back from the checkpoint; one killed the other way round loses the
/// extra line, whose epoch will run again).
pub fn rewrite_metrics(path: &Path, state: &TrainState) -> Result<(), TrainError> {
    #[derive(Deserialize)]
    struct Epoch {
        epoch: usize,
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut kept: Vec<String> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Epoch>(l)
                .map(|e| e.epoch < state.epoch)
                .unwrap_or(false)
        })
        .map(str::to_string)
        .collect();
    if state.epoch > 0 && !state.metrics.is_null() {
        kept.push(state.metrics.to_string());
    }
    let tmp = path.with_extension("jsonl.tmp");
    let body: String = kept.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&tmp, body).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// A trained run ready for inference (eval mode).
pub struct LoadedRun {
    pub config: RunConfig,
    pub vocab: RunVocab,
    pub model: RelationNetwork,
}

/// Loads a run's config, vocabularies and the model of its last (or best)
/// checkpoint.
pub fn load_run(
    run: &Path,
    choice: CheckpointChoice,
    device: &Device,
) -> Result<LoadedRun, TrainError> {
    let paths = RunPaths::new(run);
    let config = load_config(&paths.config)?;
    let vocab = RunVocab::load(&paths.vocab)?;
    let dir = chosen_checkpoint(&paths, choice)?;
    let model = build_model(&vocab, config.model(), device)?;
    let (model, _, _) =
        load_checkpoint(dir, model, adam(), device).map_err(|e| TrainError::Io(e.to_string()))?;
    Ok(LoadedRun {
        config,
        vocab,
        model: model.valid(),
    })
}

/// Runs a trained run over `split` of `data`, sparse at `inf.k` (default the
/// run's); with `probe`, the report carries the dead-unit probe too.
fn run_over_split(
    run: &Path,
    data: &Path,
    split: &str,
    inf: Inference,
    device: &Device,
    probe: bool,
    on_batch: OnBatch<'_>,
) -> Result<(LoadedRun, ClevrSplit, EvalReport), TrainError> {
    let r = load_run(run, inf.checkpoint, device)?;
    let ds = ClevrSplit::open(data, split)?;
    let items = encode_split(&ds, &r.vocab.words, &r.vocab.answers)?;
    let k = inf.k.unwrap_or(r.config.k);
    let size = r.config.image_size;
    let cnn = EvalCnn::new(&r.model.cnn, inf.engine)?;
    let mut report = evaluate(&r.model, &cnn, &items, k, inf.batch, size, device, on_batch)?;
    if probe {
        report.dead_units = probe_dead_units(&r.model, &cnn, &items, k, size, device)?;
    }
    Ok((r, ds, report))
}

/// Evaluates a run on `split` of `data`, sparse at `inf.k` (default the
/// run's); `on_batch(done, questions)` after each batch.
pub fn evaluate_run(
    run: &Path,
    data: &Path,
    split: &str,
    inf: Inference,
    device: &Device,
    on_batch: OnBatch<'_>,
) -> Result<(RunConfig, EvalReport), TrainError> {
    let (r, ds, mut report) = run_over_split(run, data, split, inf, device, true, on_batch)?;
    // Questions without an answer (a test split) have nothing to confuse.
    report.confusion = confusion::count(ds.questions.iter().zip(&report.predictions).filter_map(
        |(q, &p)| {
            Some((
                q.family(),
                q.answer.as_deref()?,
                r.vocab.answers.token(p).unwrap_or(""),
            ))
        },
    ));
    Ok((r.config, report))
}

/// One line of a predictions file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Prediction {
    pub image_filename: String,
    pub question_index: usize,
    pub answer: String,
}

/// Predicts every question of `split` (answers need not be present);
/// `on_batch(done, questions)` after each batch.
pub fn predict_run(
    run: &Path,
    data: &Path,
    split: &str,
    inf: Inference,
    device: &Device,
    on_batch: OnBatch<'_>,
) -> Result<Vec<Prediction>, TrainError> {
    let (r, ds, report) = run_over_split(run, data, split, inf, device, false, on_batch)?;
    Ok(ds
        .questions
        .iter()
        .zip(report.predictions)
        .enumerate()
        .map(|(i, (q, p))| Prediction {
            image_filename: q.image_filename.clone(),
            question_index: q.question_index.unwrap_or(i),
            answer: r.vocab.answers.token(p).unwrap_or("").to_string(),
        })
        .collect())
}

/// The answer to one question about one image.
#[derive(Debug, Clone, Serialize)]
pub struct SingleAnswer {
    pub answer: String,
    pub probability: f64,
    pub k: usize,
    /// Experts chosen in each block, best first, with their gate values.
    pub experts: Vec<Vec<(usize, f64)>>,
}

/// Answers `question` about the image file `image` with a trained run.
pub fn answer_one(
    run: &Path,
    image: &Path,
    question: &str,
    inf: Inference,
    device: &Device,
) -> Result<SingleAnswer, TrainError> {
    let r = load_run(run, inf.checkpoint, device)?;
    let (tokens, known) = r.vocab.words.encode(question);
    if known == 0 {
        return Err(TrainError::Input(format!(
            "--question \"{question}\": no word of it is in the run's vocabulary"
        )));
    }
    let item = Encoded {
        tokens,
        answer: None,
        image: image.to_path_buf(),
        family: String::new(),
    };
    let b = make_batch(&[&item], r.config.image_size, device)?;
    let k = inf.k.unwrap_or(r.config.k);
    let cnn = EvalCnn::new(&r.model.cnn, inf.engine)?;
    let out = r
        .model
        .forward_eval(b.images, b.tokens, &b.lengths, k, &cnn)?;
    let probs = burn::tensor::activation::softmax(out.logits, 1)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| TrainError::Input(format!("logits: {e:?}")))?;
    let (best, p) =
        probs.iter().enumerate().fold(
            (0, f32::MIN),
            |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
        );
    let experts = chosen_experts(&out.gates)?;
    Ok(SingleAnswer {
        answer: r.vocab.answers.token(best).unwrap_or("").to_string(),
        probability: p as f64,
        k,
        experts,
    })
}

/// The experts chosen for the first sample in each block, with their gate
/// values, best first.
pub fn chosen_experts(gates: &[crate::moe::Gates]) -> Result<Vec<Vec<(usize, f64)>>, TrainError> {
    let mut experts = Vec::new();
    for g in gates {
        let values = g
            .values
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| TrainError::Input(format!("gates: {e:?}")))?;
        experts.push(
            g.indices[0]
                .iter()
                .map(|&e| (e, values[e] as f64))
                .collect(),
        );
    }
    Ok(experts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_seconds_left_counts_this_epoch_and_later_ones() {
        // Epoch 16 of 20 (index 15), 58,816 of 196,000 done, 100 questions/s:
        // 137,184 left in it and 4 more epochs.
        let s = run_seconds_left(15, 20, 196_000, 58_816, 100.0);
        assert!((s - (137_184.0 + 4.0 * 196_000.0) / 100.0).abs() < 1e-6);
        // The last epoch: only its rest.
        assert!((run_seconds_left(19, 20, 1000, 400, 10.0) - 60.0).abs() < 1e-9);
        // A finished run has nothing left, and a zero rate does not divide by 0.
        assert_eq!(run_seconds_left(20, 20, 1000, 1000, 10.0), 0.0);
        assert!(run_seconds_left(0, 1, 10, 0, 0.0).is_finite());
    }

    #[test]
    fn duration_text_picks_units() {
        assert_eq!(duration_text(0.4), "0 s");
        assert_eq!(duration_text(59.4), "59 s");
        assert_eq!(duration_text(60.0), "1 min 00 s");
        assert_eq!(duration_text(725.0), "12 min 05 s");
        assert_eq!(duration_text(3599.0), "59 min 59 s");
        assert_eq!(duration_text(7500.0), "2 h 05 min");
        assert_eq!(duration_text(-3.0), "0 s");
    }

    #[test]
    fn a_resumed_epoch_must_split_as_it_did() {
        let order: Vec<usize> = (0..50).collect();
        let at = |batches: usize, seen: usize| PartialEpoch {
            epoch: 2,
            batches,
            seen,
            ..PartialEpoch::default()
        };
        assert!(check_resumed_epoch(&at(3, 48), &order, 16).is_ok());
        assert!(check_resumed_epoch(&at(0, 0), &order, 16).is_ok());
        // The last batch is short: 3 batches of 16 and 2.
        assert!(check_resumed_epoch(&at(4, 50), &order, 16).is_ok());
        let err = check_resumed_epoch(&at(4, 64), &order, 16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("epoch 3 stopped after 64 questions in 4 batches")
                && err.contains("gives 50"),
            "{err}"
        );
    }

    #[test]
    fn settings_diff_names_what_changed() {
        let a = serde_json::json!({"k": 12, "lr": 0.00025, "data": "d", "g_dim": 8});
        let b = serde_json::json!({"k": 6, "lr": 0.00025, "data": "e", "g_dim": 8});
        assert_eq!(
            settings_diff(&a, &b),
            [
                "--data (saved \"d\", given \"e\")",
                "--k (saved 12, given 6)"
            ]
        );
        assert!(settings_diff(&a, &a).is_empty());
    }

    #[test]
    fn mid_epoch_checkpoints_fall_after_each_multiple() {
        // Every 100 questions of 450, in batches of 64: after the batches
        // that reach 128, 256, 320 and 448 questions; not at 450, the
        // epoch's end.
        let due = |every: usize, from: usize| -> Vec<usize> {
            let mut s = MidEpochSchedule::new(every, from);
            (1..=8)
                .map(|b| (b * 64).min(450))
                .filter(|&seen| seen > from && s.due(seen, 450))
                .collect()
        };
        assert_eq!(due(100, 0), [128, 256, 320, 448]);
        // Resumed after the checkpoint at 128: the same ones after it.
        assert_eq!(due(100, 128), [256, 320, 448]);
        assert_eq!(due(0, 0), Vec::<usize>::new());
        // More than the epoch: none.
        assert_eq!(due(1000, 0), Vec::<usize>::new());
        // Different points reseed differently, and apart from the epoch's.
        assert_ne!(mid_seed(1, 0, 128), mid_seed(1, 0, 256));
        assert_ne!(mid_seed(1, 0, 128), mid_seed(1, 1, 128));
        assert_ne!(mid_seed(1, 0, 128), epoch_seed(1, 0));
    }

    #[test]
    fn train_warns_when_g_dies() {
        let dead = |last: f64| DeadUnits {
            questions: 128,
            g: vec![0.0, 0.1, last],
            f: vec![0.5, 0.6],
        };
        let w = dead_g_warning(&dead(0.97), 1e-3).expect("a warning at 97%");
        assert!(
            w.contains("97% of g's last layer") && w.contains("128 probe questions"),
            "{w}"
        );
        assert!(w.contains("--lr than 1.0e-3"), "{w}");
        assert_eq!(dead_g_warning(&dead(0.3), 1e-3), None);
        // f's dead share (structural, see DeadUnits) does not warn.
        assert_eq!(dead_g_warning(&dead(0.0), 1e-3), None);
    }
}
