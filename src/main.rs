//! The `moevqa` command line. The only place that names a concrete backend.

// A training step frees and re-allocates the same large activation and
// gradient buffers (tens of MB) every step. glibc's malloc hands those back
// to the kernel and gets fresh zeroed pages next step: a fifth to a third of
// a step went to page faults and TLB shoot-downs. mimalloc, told never to
// return freed memory (`keep_freed_memory`), re-uses them: 1.1-1.9x more
// questions/s (README, "The allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's `mi_option_t` index of `mi_option_purge_delay` (v3 header,
// libmimalloc-sys 0.1.49); `tests::purge_delay_is_the_option_set` checks it.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Tells mimalloc never to give freed memory back to the OS (purge delay
/// -1), unless the user set `MIMALLOC_PURGE_DELAY` themselves. The process
/// then keeps its peak footprint, which a training run reaches every step.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an integer option; mimalloc reads options atomically.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Parser, Subcommand};
use moevqa::bench::{bench_block, block_presets};
use moevqa::cnn::{CnnLayout, GateSettings};
use moevqa::data::sort_of_clevr::GenerateSummary;
use moevqa::flops::{count_macs, paper_flops};
use moevqa::moe::usage::specialisation;
use moevqa::train::{CheckpointChoice, Inference};
use serde::Serialize;

mod vqa_cli;

#[derive(Parser, Debug)]
#[command(
    name = "moevqa",
    version,
    about = "Sparse mixture-of-experts VQA: gated modular ResNeXt, FLOPs and speed"
)]
struct Cli {
    /// Compute device: `flex` (CPU, default) or `vulkan` (GPU, needs the `vulkan` feature).
    #[arg(long, global = true, default_value = "flex")]
    device: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Analytic multiply-add counts per image, shaped like the paper's Tables 1 and 2.
    Flops {
        /// `clevr` (Table 4 CNN, 128x128) or `vqa` (ResNeXt-101 32x4d, 224x224).
        #[arg(long)]
        model: String,
        /// k values to list (repeatable); default P, P/2, P/4.
        #[arg(long = "k")]
        k: Vec<usize>,
        /// Square input size in pixels; default the paper's (128 or 224).
        #[arg(long)]
        input: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Trains a model: `--dataset clevr` (CLEVR v1.0 layout, Relation Network) or `vqa2` (VQA v2 layout, bottom-up top-down).
    Train(TrainArgs),
    /// Scores a VQA v2 results file exactly as the official evaluation script does.
    VqaScore {
        /// Results file: [{"question_id": int, "answer": str}].
        #[arg(long)]
        results: std::path::PathBuf,
        /// Official annotations file (v2_mscoco_*_annotations.json).
        #[arg(long)]
        annotations: std::path::PathBuf,
        /// Official questions file, checked to cover the same questions.
        #[arg(long)]
        questions: Option<std::path::PathBuf>,
        /// Print JSON: {"overall", "per_answer_type", "per_question_type", "questions"}.
        #[arg(long)]
        json: bool,
    },
    /// Maps a torchvision/timm ResNeXt-101 (32x4d or 32x8d) .safetensors state dict into the modular CNN.
    ImportResnext {
        /// The .safetensors file (convert a .pth with safetensors.torch.save_file).
        #[arg(long)]
        from: std::path::PathBuf,
        /// Output CNN file, for `train --init-cnn`.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Layout (`resnext101-32x4d`, `resnext101-32x8d`); default: inferred from the shapes.
        #[arg(long)]
        layout: Option<String>,
        /// Question vector size the gate controllers read (the model's --question-dim).
        #[arg(long, default_value_t = 512)]
        question_dim: usize,
        #[arg(long)]
        json: bool,
    },
    /// Draws learning curves (accuracy per epoch) of one or more runs into a PNG.
    Plot {
        /// A run directory (its metrics.jsonl); repeat for several runs.
        #[arg(long = "run", required = true)]
        runs: Vec<std::path::PathBuf>,
        /// The PNG to write.
        #[arg(long)]
        out: std::path::PathBuf,
        /// One validation line per question type instead of val and train.
        #[arg(long)]
        families: bool,
        #[arg(long, default_value = "accuracy per epoch")]
        title: String,
        /// Print `{"out", "curves": [{"label", "points": [[epoch, percent]]}]}`.
        #[arg(long)]
        json: bool,
    },
    /// Per-epoch table of one or more runs from their metrics.jsonl: train and
    /// val accuracy, val accuracy per question type, Sort-of-CLEVR's
    /// relational / non-relational means, the dead share of g's last layer
    /// (Markdown).
    Report {
        /// A run directory (its metrics.jsonl); repeat for several runs.
        #[arg(long = "run", required = true)]
        runs: Vec<std::path::PathBuf>,
        /// One JSON object per epoch and run: `{"run", "k", "epoch", "train",
        /// "val", "non_relational", "relational", "families": {name: percent},
        /// "dead_units"}`.
        #[arg(long)]
        json: bool,
    },
    /// Evaluates a trained run on a split, at any k.
    Eval {
        /// Run directory written by `train`.
        #[arg(long)]
        run: std::path::PathBuf,
        /// Dataset directory (the layout of the run's dataset).
        #[arg(long)]
        data: std::path::PathBuf,
        /// `clevr` or `vqa2`; must match the run (default: the run's).
        #[arg(long)]
        dataset: Option<String>,
        /// Split: val (CLEVR) / val2014 (VQA v2) by default.
        #[arg(long)]
        split: Option<String>,
        /// Paths kept per block; repeat it to sweep k (a report per k,
        /// then a table of accuracy, MACs and measured time per k);
        /// default the run's k.
        #[arg(long = "k")]
        k: Vec<usize>,
        #[command(flatten)]
        runner: RunnerArgs,
        /// Also draw accuracy against CNN MACs and against the measured
        /// CNN time per image, a point per k, into this PNG.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
        /// Also draw which experts each question type (VQA: answer type)
        /// chose, a panel per block, into this PNG (one k only).
        #[arg(long)]
        plot_experts: Option<std::path::PathBuf>,
        /// Also show which wrong answers each question type gave, for each
        /// right answer (CLEVR runs; `--json`: the whole confusion).
        #[arg(long)]
        confusion: bool,
        /// Print JSON (one object per k, a line each).
        #[arg(long)]
        json: bool,
    },
    /// Generates a small set, trains each k, evaluates (Table 2 shape; `--dataset vqa2`: Table 1 shape).
    Demo {
        /// Working directory (default: a folder in the system temp directory).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// `sort-of-clevr` (default) or `vqa2`.
        #[arg(long, default_value = "sort-of-clevr")]
        dataset: String,
        /// Training images (default 600 for Sort-of-CLEVR, 100 for vqa2).
        #[arg(long)]
        train_images: Option<usize>,
        /// Validation images (default 100 for Sort-of-CLEVR, 40 for vqa2).
        #[arg(long)]
        val_images: Option<usize>,
        #[arg(long, default_value_t = 2)]
        epochs: usize,
        /// vqa2 only: square input size.
        #[arg(long, default_value_t = 32)]
        image_size: u32,
        /// vqa2 only: the k values to train (repeatable; default 32, 16, 8).
        #[arg(long = "k")]
        k: Vec<usize>,
        /// Print the table as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Predicts every question of a split (the test split needs no answers).
    Predict {
        /// Run directory written by `train`.
        #[arg(long)]
        run: std::path::PathBuf,
        /// Dataset directory (the layout of the run's dataset).
        #[arg(long)]
        data: std::path::PathBuf,
        /// `clevr` or `vqa2`; must match the run (default: the run's).
        #[arg(long)]
        dataset: Option<String>,
        /// Split: test (CLEVR) / test2015 (VQA v2) by default.
        #[arg(long)]
        split: Option<String>,
        /// Output JSON file: CLEVR [{"image_filename", "question_index", "answer"}], VQA v2 the official [{"question_id", "answer"}].
        #[arg(long)]
        out: std::path::PathBuf,
        /// Paths kept per block; default the run's k.
        #[arg(long)]
        k: Option<usize>,
        #[command(flatten)]
        runner: RunnerArgs,
        /// Print `{"out", "split", "predictions"}` (the count) instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Answers one question about one image (PNG or JPEG).
    Answer {
        #[arg(long)]
        run: std::path::PathBuf,
        /// `clevr` or `vqa2`; must match the run (default: the run's).
        #[arg(long)]
        dataset: Option<String>,
        #[arg(long)]
        image: std::path::PathBuf,
        #[arg(long)]
        question: String,
        /// Paths kept per block; default the run's k.
        #[arg(long)]
        k: Option<usize>,
        /// How the CNN runs: `fast` (the packed CPU path; default on the CPU) or `burn` (Burn's tensor ops; default on a GPU).
        #[arg(long)]
        engine: Option<String>,
        /// Which checkpoint answers: `last` (RUN/checkpoint) or `best` (RUN/best: the end of the epoch with the best validation).
        #[arg(long, default_value = "last")]
        checkpoint: String,
        #[arg(long)]
        json: bool,
    },
    /// Generates a dataset in the CLEVR v1.0 layout.
    Generate {
        #[command(subcommand)]
        what: GenerateCommand,
    },
    /// Benchmarks: dense against sparse execution.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Dataset kind: `clevr` (any CLEVR-layout directory: CLEVR v1.0, sort-of-clevr, clevr-2d) or `vqa2` (VQA v2 layout).
    #[arg(long, default_value = "clevr")]
    dataset: String,
    /// Dataset directory.
    #[arg(long)]
    data: std::path::PathBuf,
    /// Run directory (config, vocabularies, metrics.jsonl, checkpoint, best).
    #[arg(long)]
    out: std::path::PathBuf,
    /// Paths kept per block; default P (the dense baseline: 12 for clevr, 32 for vqa2).
    #[arg(long)]
    k: Option<usize>,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 2.5e-4)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Continue from the run's last checkpoint, with the same settings; only
    /// --epochs, --checkpoint-every and --data (a moved dataset: the same
    /// train split, checked against RUN/vocab.json and RUN/data.json) may
    /// change, and --glove / --init-cnn (read only at the start) may be
    /// left out.
    #[arg(long)]
    resume: bool,
    /// Model input size (square); default 128 (clevr) or 224 (vqa2).
    #[arg(long)]
    image_size: Option<u32>,
    /// Weight of the load-balancing loss.
    #[arg(long, default_value_t = 0.01)]
    balance_weight: f64,
    /// Epochs of learning-rate and batch-size warm-up.
    #[arg(long, default_value_t = 0)]
    warmup_epochs: usize,
    /// Also checkpoint inside each epoch, every this many questions (0:
    /// at epoch ends only): a killed run then resumes from the last of
    /// them, with the same result as a run never stopped. Default 0, or
    /// on --resume the run's own.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    #[arg(long, default_value_t = 256)]
    g_dim: usize,
    #[arg(long, default_value_t = 256)]
    f_dim: usize,
    /// Question vector size; default 128 (clevr LSTM) or 512 (vqa2 GRU).
    #[arg(long)]
    question_dim: Option<usize>,
    /// vqa2: CNN layout (`resnext101-32x4d`, `resnext101-32x8d`, `clevr`).
    #[arg(long)]
    layout: Option<String>,
    /// vqa2: word embedding size (300 for GloVe 300d).
    #[arg(long, default_value_t = 300)]
    embed_dim: usize,
    /// vqa2: width of the attention and fusion layers.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// vqa2: answers kept in the vocabulary are seen at least this often.
    #[arg(long, default_value_t = 9)]
    min_answer_count: usize,
    /// vqa2: GloVe text file for the word embeddings (read from disk, never downloaded).
    #[arg(long)]
    glove: Option<std::path::PathBuf>,
    /// vqa2: CNN weights written by `moevqa import-resnext`.
    #[arg(long)]
    init_cnn: Option<std::path::PathBuf>,
    /// vqa2: training split.
    #[arg(long, default_value = "train2014")]
    train_split: String,
    /// vqa2: validation split (evaluated after each epoch when present).
    #[arg(long, default_value = "val2014")]
    val_split: String,
    /// When training ends, print this invocation's epochs on stdout, one JSON
    /// object per line (the lines it appended to RUN/metrics.jsonl).
    #[arg(long)]
    json: bool,
}

/// Without a terminal a bar is hidden: plain lines every tenth of the work
/// instead, with the rate and ETA counted from where the work started.
struct TenthLines {
    started: std::time::Instant,
    total: usize,
    /// Done when it started (a resumed epoch starts part-way).
    start_done: usize,
    next_line: usize,
}

impl TenthLines {
    fn new(total: usize, done: usize) -> TenthLines {
        let tenth = (total / 10).max(1);
        TenthLines {
            started: std::time::Instant::now(),
            total,
            start_done: done,
            next_line: (done / tenth + 1) * tenth,
        }
    }

    /// `(rate per second, ETA in seconds)` when `done` has reached the
    /// next tenth (not the end), else None.
    fn due(&mut self, done: usize) -> Option<(f64, f64)> {
        if done < self.next_line || done >= self.total {
            return None;
        }
        let tenth = (self.total / 10).max(1);
        self.next_line = (done / tenth + 1) * tenth;
        let rate = done.saturating_sub(self.start_done) as f64
            / self.started.elapsed().as_secs_f64().max(1e-9);
        Some((rate, (self.total - done) as f64 / rate.max(1e-9)))
    }
}

struct BarProgress {
    bar: Option<indicatif::ProgressBar>,
    lines: TenthLines,
    /// The epoch in progress (from 0) and the run's epochs, for the run's ETA.
    epoch: usize,
    epochs: usize,
}

impl BarProgress {
    /// " (run: about 2 h 05 min left)" while later epochs remain, else nothing.
    fn run_left(&self, done: usize, rate: f64) -> String {
        if self.epoch + 1 >= self.epochs || rate <= 0.0 {
            return String::new();
        }
        let left = moevqa::train::run::run_seconds_left(
            self.epoch,
            self.epochs,
            self.lines.total,
            done,
            rate,
        );
        format!(
            " (run: about {} left)",
            moevqa::train::run::duration_text(left)
        )
    }
}

impl moevqa::train::run::Progress for BarProgress {
    fn start_epoch(&mut self, epoch: usize, epochs: usize, total: usize, done: usize) {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(bar_style(
            "epoch {prefix} [{bar:30}] {pos}/{len} questions, {per_sec}, ETA {eta} {msg}",
        ));
        bar.set_prefix(format!("{}/{}", epoch + 1, epochs));
        // A resumed epoch starts part-way: its rate and ETA count from here.
        bar.set_position(done as u64);
        bar.reset_eta();
        self.lines = TenthLines::new(total, done);
        self.bar = Some(bar);
        (self.epoch, self.epochs) = (epoch, epochs);
    }
    fn batch(&mut self, done: usize, loss: f64, accuracy: f64) {
        let Some(b) = &self.bar else { return };
        b.set_position(done as u64);
        if !b.is_hidden() {
            let run_left = self.run_left(done, b.per_sec());
            b.set_message(format!("loss {loss:.4} acc {accuracy:.1}%{run_left}"));
        } else if let Some((rate, eta)) = self.lines.due(done) {
            eprintln!(
                "  epoch {}/{}: {done}/{} questions, loss {loss:.4}, acc {accuracy:.1}%, {rate:.0} questions/s, ETA {eta:.0} s{}",
                self.epoch + 1,
                self.epochs,
                self.lines.total,
                self.run_left(done, rate)
            );
        }
    }
    fn resumed(
        &mut self,
        epochs: usize,
        partial: Option<&moevqa::train::checkpoint::PartialEpoch>,
    ) {
        match partial {
            Some(p) => eprintln!(
                "resuming after epoch {epochs} and {} questions ({} batches) of epoch {}",
                p.seen,
                p.batches,
                p.epoch + 1
            ),
            None => eprintln!("resuming after epoch {epochs}"),
        }
    }
    fn note(&mut self, text: &str) {
        eprintln!("note: {text}");
    }
    fn end_epoch(&mut self, line: &moevqa::train::run::EpochSummary) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let val = line
            .val_accuracy
            .map_or("no val split".to_string(), |v| format!("val {v:.2}%"));
        let best = if line.best {
            " (best so far: RUN/best)"
        } else {
            ""
        };
        eprintln!(
            "epoch {}: loss {:.4}, train {:.2}%, {val}{best}, {:.0} questions/s, lr {:.2e}, batch {}",
            line.epoch,
            line.train_loss,
            line.train_accuracy,
            line.questions_per_s,
            line.lr,
            line.batch
        );
        if let Some(w) = &line.warning {
            eprintln!("warning: {w}");
        }
    }
}

/// Progress of an evaluation or a prediction on stderr: a bar on a
/// terminal; without one (a log), a line every tenth once it has run 5 s
/// (short evaluations stay quiet).
pub(crate) struct EvalBar {
    what: String,
    bar: Option<indicatif::ProgressBar>,
    lines: Option<TenthLines>,
}

/// A progress bar style from `template` (the default style if it does not
/// parse).
fn bar_style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl EvalBar {
    /// The bar of an evaluation of `split` at `k` (None: the run's k).
    pub(crate) fn eval(split: &str, k: Option<usize>) -> EvalBar {
        EvalBar::new(format!(
            "{split} at k = {}",
            k.map_or("the run's".into(), |k| k.to_string())
        ))
    }

    pub(crate) fn new(what: impl Into<String>) -> EvalBar {
        EvalBar {
            what: what.into(),
            bar: None,
            lines: None,
        }
    }

    pub(crate) fn tick(&mut self, done: usize, total: usize) {
        let what = &self.what;
        let lines = self.lines.get_or_insert_with(|| TenthLines::new(total, 0));
        let bar = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(bar_style(
                "{msg} [{bar:30}] {pos}/{len} questions, {per_sec}, ETA {eta}",
            ));
            bar.set_message(what.clone());
            bar
        });
        bar.set_position(done as u64);
        let long = lines.started.elapsed() >= std::time::Duration::from_secs(5);
        if bar.is_hidden()
            && long
            && let Some((rate, eta)) = lines.due(done)
        {
            eprintln!("  {what}: {done}/{total} questions, {rate:.0} questions/s, ETA {eta:.0} s");
        }
    }
}

impl Drop for EvalBar {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn new_progress() -> BarProgress {
    BarProgress {
        bar: None,
        lines: TenthLines::new(0, 0),
        epoch: 0,
        epochs: 0,
    }
}

fn cmd_train(device: &Device, a: TrainArgs) -> Result<()> {
    // Left out on --resume: the run keeps its own (a resume that changes it
    // is allowed and says so).
    let checkpoint_every = a
        .checkpoint_every
        .or_else(|| {
            a.resume
                .then(|| moevqa::train::run::saved_checkpoint_every(&a.out))
                .flatten()
        })
        .unwrap_or(0);
    match a.dataset.as_str() {
        "clevr" => {}
        "vqa2" => {
            let flags = vqa_cli::VqaTrainFlags {
                data: a.data,
                out: a.out,
                k: a.k,
                epochs: a.epochs,
                batch: a.batch,
                lr: a.lr,
                seed: a.seed,
                resume: a.resume,
                image_size: a.image_size,
                balance_weight: a.balance_weight,
                warmup_epochs: a.warmup_epochs,
                checkpoint_every,
                question_dim: a.question_dim,
                layout: a.layout,
                embed_dim: a.embed_dim,
                hidden: a.hidden,
                min_answer_count: a.min_answer_count,
                glove: a.glove,
                init_cnn: a.init_cnn,
                train_split: a.train_split,
                val_split: a.val_split,
            };
            let lines = vqa_cli::cmd_train_vqa(device, &flags, &mut new_progress())?;
            return print_json_lines(a.json, &lines);
        }
        other => bail!("--dataset '{other}': expected clevr or vqa2"),
    }
    for (flag, given) in [
        ("--layout", a.layout.is_some()),
        ("--glove", a.glove.is_some()),
        ("--init-cnn", a.init_cnn.is_some()),
    ] {
        if given {
            bail!("{flag} applies to --dataset vqa2 only");
        }
    }
    let cfg = moevqa::train::run::RunConfig {
        dataset: a.dataset,
        data: a.data,
        k: a.k.unwrap_or(12),
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        image_size: a.image_size.unwrap_or(128),
        balance_weight: a.balance_weight,
        warmup_epochs: a.warmup_epochs,
        g_dim: a.g_dim,
        f_dim: a.f_dim,
        question_dim: a.question_dim.unwrap_or(128),
        checkpoint_every,
    };
    let lines = moevqa::train::run::train(&cfg, &a.out, a.resume, device, &mut new_progress())?;
    print_json_lines(a.json, &lines)
}

/// The run directory's own name, for titles.
fn run_name(run: &Path) -> String {
    run.file_name().map_or_else(
        || run.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Refuses a plot destination that cannot be written as a PNG before any
/// work is done: its name must end in `.png` and its folder must exist.
fn check_png_out(out: &std::path::Path) -> Result<()> {
    let png = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        bail!("{}: expected a file name ending in .png", out.display());
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{}: the folder {} does not exist",
            out.display(),
            dir.display()
        );
    }
    if out.is_dir() {
        bail!("{}: is a folder; expected a PNG file name", out.display());
    }
    // Writable? Open it without truncating, and remove it again if this
    // made it.
    let existed = out.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(out)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", out.display()))?;
    if !existed {
        let _ = std::fs::remove_file(out);
    }
    Ok(())
}

fn cmd_plot(
    runs: &[std::path::PathBuf],
    out: &std::path::Path,
    families: bool,
    title: &str,
    json: bool,
) -> Result<()> {
    use moevqa::train::plot::{draw, run_curves};
    check_png_out(out)?;
    let mut curves = Vec::new();
    for run in runs {
        curves.extend(run_curves(run, families, curves.len())?);
    }
    if curves.iter().all(|c| c.points.is_empty()) {
        let what = if families {
            "per-type accuracy"
        } else {
            "accuracy"
        };
        bail!("--run: no {what} in the runs' metrics.jsonl to draw");
    }
    draw(&curves, title, out)?;
    if json {
        let rows: Vec<_> = curves
            .iter()
            .map(|c| serde_json::json!({"label": c.label, "points": c.points}))
            .collect();
        let out = out.display().to_string();
        println!("{}", serde_json::json!({"out": out, "curves": rows}));
    } else {
        println!("wrote {} ({} curves)", out.display(), curves.len());
    }
    Ok(())
}

/// With `json`, each item on stdout as one JSON line.
fn print_json_lines<T: Serialize>(json: bool, items: &[T]) -> Result<()> {
    if json {
        for item in items {
            println!("{}", serde_json::to_string(item)?);
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct EvalJson<'a> {
    k: usize,
    questions: usize,
    accuracy: f64,
    by_family: &'a std::collections::BTreeMap<String, f64>,
    cnn_macs_per_image: u64,
    expert_usage: &'a [Vec<u64>],
    expert_usage_per_family: &'a std::collections::BTreeMap<String, Vec<Vec<u64>>>,
    /// Per block, how far the question types' choices of experts are apart.
    specialisation: Vec<f64>,
    engine: moevqa::kernels::Engine,
    questions_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cnn_ms_per_image: Option<f64>,
    dead_units: Option<&'a moevqa::models::relation_network::DeadUnits>,
    /// With `--confusion`: per question type, right answer, given answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    confusion: Option<&'a moevqa::metrics::confusion::Confusion>,
    /// The baseline beside `by_family`: each type's commonest right answer
    /// in the split and its share; empty without answers (a test split).
    majority_by_family: std::collections::BTreeMap<String, moevqa::metrics::confusion::Majority>,
    /// Percent right when every question gets its type's commonest answer.
    majority_accuracy: f64,
}

use moevqa::train::plot::SweepRow;

/// The summary of an `eval` sweep over k: one row per k.
fn print_sweep(split: &str, rows: &[SweepRow]) {
    println!();
    println!(
        "{split}, by k (sparse; CNN time measured during each evaluation, gate controllers included, their MACs not in CNN MACs):"
    );
    println!(
        "{:>4} {:>12} {:>12} {:>10} {:>12}",
        "k", "CNN MACs", "CNN ms/img", "accuracy", "questions/s"
    );
    for r in rows {
        let ms = r
            .cnn_ms_per_image
            .map_or_else(|| "-".to_string(), |ms| format!("{ms:.4}"));
        let acc = r
            .accuracy
            .map_or_else(|| "-".to_string(), |a| format!("{a:.2}%"));
        println!(
            "{:>4} {:>12.3e} {:>12} {:>10} {:>12.1}",
            r.k, r.cnn_macs as f64, ms, acc, r.questions_per_s
        );
    }
}

fn cmd_eval(
    device: &Device,
    run: &std::path::Path,
    data: &std::path::Path,
    split: &str,
    inf: Inference,
    confusion: bool,
    json: bool,
) -> Result<SweepRow> {
    let mut bar = EvalBar::eval(split, inf.k);
    let (cfg, report) =
        moevqa::train::run::evaluate_run(run, data, split, inf, device, &mut |d, n| {
            bar.tick(d, n)
        })?;
    drop(bar);
    let gate = GateSettings::new().with_question_dim(cfg.question_dim);
    let macs = count_macs(
        &CnnLayout::clevr(),
        (cfg.image_size as usize, cfg.image_size as usize),
        Some(report.k),
        &gate,
    )?;
    let (majority_by_family, majority_accuracy) =
        moevqa::metrics::confusion::majority(&report.confusion);
    if json {
        let j = EvalJson {
            k: report.k,
            questions: report.questions,
            accuracy: report.accuracy,
            by_family: &report.by_family,
            cnn_macs_per_image: macs.cnn_macs,
            expert_usage: &report.expert_usage,
            expert_usage_per_family: &report.expert_usage_per_family,
            specialisation: specialisation(&report.expert_usage_per_family),
            engine: report.engine,
            questions_per_s: report.questions_per_s,
            cnn_ms_per_image: report.cnn_ms_per_image,
            dead_units: report.dead_units.as_ref(),
            confusion: confusion.then_some(&report.confusion),
            majority_by_family,
            majority_accuracy,
        };
        println!("{}", serde_json::to_string(&j)?);
    } else {
        print_eval(
            split,
            &report,
            macs.cnn_macs,
            &majority_by_family,
            majority_accuracy,
        );
        if confusion {
            print_mistakes(&report.confusion);
        }
    }
    Ok(SweepRow {
        k: report.k,
        cnn_macs: macs.cnn_macs,
        cnn_ms_per_image: report.cnn_ms_per_image,
        accuracy: Some(report.accuracy),
        questions_per_s: report.questions_per_s,
        usage_by_group: report.expert_usage_per_family,
    })
}

fn print_eval(
    split: &str,
    report: &moevqa::train::clevr::EvalReport,
    cnn_macs: u64,
    majority: &std::collections::BTreeMap<String, moevqa::metrics::confusion::Majority>,
    prior: f64,
) {
    println!(
        "{split}: {} questions, k = {}, accuracy {:.2}%, CNN {:.3e} MACs/image{}, {:.1} questions/s ({} engine)",
        report.questions,
        report.k,
        report.accuracy,
        cnn_macs as f64,
        cnn_time_text(report.cnn_ms_per_image),
        report.questions_per_s,
        report.engine.name()
    );
    for (f, acc) in &report.by_family {
        match majority.get(f) {
            Some(m) => println!(
                "  {f:<20} {acc:6.2}%   (majority answer \"{}\": {:.2}%)",
                m.answer, m.accuracy
            ),
            None => println!("  {f:<20} {acc:6.2}%"),
        }
    }
    if !majority.is_empty() {
        println!("  (each question given its type's majority answer: {prior:.2}%)");
    }
    let spec = specialisation(&report.expert_usage_per_family);
    println!("{}", specialisation_text("question type", &spec));
    if let Some(d) = &report.dead_units {
        println!("{d}");
    }
}

/// The most frequent wrong answers of each question type.
fn print_mistakes(c: &moevqa::metrics::confusion::Confusion) {
    let top = moevqa::metrics::confusion::top_mistakes(c, 3);
    if top.is_empty() {
        println!("no wrong answers (or no answers in this split)");
        return;
    }
    println!(
        "most frequent wrong answers (right -> given: questions, of those with that right answer):"
    );
    for (family, mistakes) in &top {
        let list: Vec<String> = mistakes
            .iter()
            .map(|m| format!("{} -> {}: {} of {}", m.right, m.given, m.count, m.of))
            .collect();
        println!("  {family:<20} {}", list.join("; "));
    }
}

/// One line: the [`specialisation`] of each block, by `group`.
pub(crate) fn specialisation_text(group: &str, per_block: &[f64]) -> String {
    let values: Vec<String> = per_block.iter().map(|v| format!("{v:.3}")).collect();
    format!(
        "expert specialisation by {group}, block 1..{}: {} (total-variation distance of a {group}'s \
         expert shares from all questions'; 0: every {group} picks the same experts)",
        per_block.len(),
        values.join(" ")
    )
}

/// " in X ms measured" (the CNN per image) for an eval line, or nothing
/// when the engine does not time the CNN.
pub(crate) fn cnn_time_text(ms: Option<f64>) -> String {
    ms.map_or_else(String::new, |ms| format!(" in {ms:.4} ms measured"))
}

#[derive(Subcommand, Debug)]
enum GenerateCommand {
    /// A small VQA-v2-layout set from generated scenes: COCO-named JPEGs, questions, ten human answers each.
    Vqa2 {
        /// Output directory (created; existing files of the same names are replaced).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Images of the train split.
        #[arg(long, default_value_t = 2000)]
        train_images: usize,
        /// Images of the validation split.
        #[arg(long, default_value_t = 500)]
        val_images: usize,
        /// Images of test2015 (test-dev2015 asks about the first half of them).
        #[arg(long, default_value_t = 500)]
        test_images: usize,
        /// Questions per image.
        #[arg(long, default_value_t = 5)]
        questions_per_image: usize,
        /// JPEG side in pixels (32 to 1024).
        #[arg(long, default_value_t = 64)]
        image_size: u32,
        /// Random seed: the same seed writes the same files.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// CLEVR-like 2D scenes (3-8 objects, 8 colours, 3 shapes, 2 sizes) with CLEVR's question families.
    #[command(name = "clevr-2d")]
    Clevr2d {
        /// Output directory (created; existing files of the same names are replaced).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Images of the train split.
        #[arg(long, default_value_t = 2000)]
        train_images: usize,
        /// Images of the validation split.
        #[arg(long, default_value_t = 200)]
        val_images: usize,
        /// Questions per image (spread over the question families).
        #[arg(long, default_value_t = 10)]
        questions_per_image: usize,
        /// Image side in pixels (at least 64).
        #[arg(long, default_value_t = 128)]
        image_size: u32,
        /// Random seed: the same seed writes the same files.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sort-of-CLEVR: 75x75 images, six objects, 10 non-relational and 10 relational questions each.
    SortOfClevr {
        /// Output directory (created; existing files of the same names are replaced).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Images of the train split.
        #[arg(long, default_value_t = 9800)]
        train_images: usize,
        /// Images of the validation split.
        #[arg(long, default_value_t = 200)]
        val_images: usize,
        /// Random seed: the same seed writes the same files.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// One block, eval-mode forward, dense and sparse, medians in one process.
    Block {
        /// Block preset (`--preset list` lists them).
        #[arg(long)]
        preset: String,
        /// Batch size.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Paths kept per sample; default P/4.
        #[arg(long)]
        k: Option<usize>,
        /// Timed iterations at least (median reported); short blocks repeat until 250 ms of timed runs.
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Untimed warm-up iterations.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// `burn` (plain Burn tensor ops, what training runs) or `fast` (the eval-mode CPU kernels).
        #[arg(long, default_value = "burn")]
        engine: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The whole CNN, eval-mode forward: the ungated network (dense) against the gated one at k (sparse).
    Cnn {
        /// `clevr` (Table 4) or `vqa` (ResNeXt-101 32x4d, Table 3).
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Paths kept per block; default P/4.
        #[arg(long)]
        k: Option<usize>,
        /// Square input size; default the paper's (128 or 224).
        #[arg(long)]
        input: Option<usize>,
        /// Timed iterations at least (median reported); short runs repeat until 250 ms of timed runs.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// `burn` or `fast`.
        #[arg(long, default_value = "fast")]
        engine: String,
        /// Also show where each network's time goes (stem, gate controllers, each block, head; fast engine).
        #[arg(long)]
        profile: bool,
        #[arg(long)]
        json: bool,
    },
    /// The table of the performance goal: every block preset at batch 1 and 32, k = P/2 and P/4, and both whole CNNs; efficiency per row.
    All {
        /// `burn` or `fast`.
        #[arg(long, default_value = "fast")]
        engine: String,
        /// Timed iterations per row at least (median reported); short rows repeat until 250 ms of timed runs.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Batch of the whole ResNeXt-101 rows (224x224 costs 8 GMACs per image).
        #[arg(long, default_value_t = 2)]
        vqa_batch: usize,
        #[arg(long)]
        json: bool,
    },
    /// Training steps of the Relation Network on random data (full size by default): questions/s of a step.
    Train {
        /// `clevr` (the Relation Network on the CNN of Table 4).
        #[arg(long, default_value = "clevr")]
        model: String,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Paths kept per block; default P = 12.
        #[arg(long, default_value_t = 12)]
        k: usize,
        /// Square input size.
        #[arg(long, default_value_t = 128)]
        image_size: u32,
        /// Timed steps (median reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Width of g's four layers (as `train --g-dim`).
        #[arg(long, default_value_t = 256)]
        g_dim: usize,
        /// Width of f's hidden layer (as `train --f-dim`).
        #[arg(long, default_value_t = 256)]
        f_dim: usize,
        #[arg(long)]
        json: bool,
    },
    /// The image loader alone: decode + resize throughput on a CLEVR-layout directory.
    Loader {
        /// Dataset directory in the CLEVR v1.0 layout.
        #[arg(long)]
        data: std::path::PathBuf,
        #[arg(long, default_value = "train")]
        split: String,
        /// Images per batch (decoded in parallel).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Model input size (square).
        #[arg(long, default_value_t = 128)]
        size: u32,
        /// Batches to time.
        #[arg(long, default_value_t = 20)]
        batches: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct LoaderBench {
    split: String,
    batch: usize,
    size: u32,
    images: usize,
    seconds: f64,
    images_per_s: f64,
    threads: usize,
}

fn cmd_bench_loader(
    data: &std::path::Path,
    split: &str,
    batch: usize,
    size: u32,
    batches: usize,
    json: bool,
) -> Result<()> {
    if batch == 0 || batches == 0 || size == 0 {
        bail!("--batch, --batches and --size must be at least 1");
    }
    let ds = moevqa::data::clevr_reader::ClevrSplit::open(data, split)?;
    // Distinct images, in question order, cycled if the split is small.
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    let mut last = None;
    for q in &ds.questions {
        if last != Some(q.image_index) {
            files.push(ds.image_path(q));
            last = Some(q.image_index);
        }
    }
    if files.is_empty() {
        bail!("{}: the {split} split has no questions", data.display());
    }
    let t0 = std::time::Instant::now();
    let mut images = 0;
    for b in 0..batches {
        let chunk: Vec<_> = (0..batch)
            .map(|i| files[(b * batch + i) % files.len()].clone())
            .collect();
        let buf = moevqa::data::clevr_reader::load_images(&chunk, size)?;
        images += buf.len() / (3 * (size * size) as usize);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let r = LoaderBench {
        split: split.into(),
        batch,
        size,
        images,
        seconds,
        images_per_s: images as f64 / seconds,
        // The loader decodes on rayon's pool, which RAYON_NUM_THREADS may size.
        threads: rayon::current_num_threads(),
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "loader: {} images ({}x{}, batches of {}) in {:.2} s: {:.0} images/s on {} threads",
            r.images, size, size, batch, seconds, r.images_per_s, r.threads
        );
    }
    Ok(())
}

fn pick_device(name: &str) -> Result<Device> {
    match name {
        #[cfg(feature = "flex")]
        "flex" | "cpu" => Ok(Device::flex()),
        #[cfg(feature = "vulkan")]
        "vulkan" | "gpu" => Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)),
        other => {
            let mut known = Vec::new();
            if cfg!(feature = "flex") {
                known.push("flex");
            }
            if cfg!(feature = "vulkan") {
                known.push("vulkan");
            }
            bail!(
                "--device '{other}' is not available in this build: expected one of {} (the `vulkan` feature adds the GPU)",
                known.join(", ")
            )
        }
    }
}

#[derive(Serialize)]
struct FlopsRow {
    k: Option<usize>,
    cnn_macs: u64,
    gate_macs: u64,
    total_macs: u64,
}

#[derive(Serialize)]
struct FlopsReport {
    model: String,
    input: [usize; 2],
    rows: Vec<FlopsRow>,
}

fn cmd_flops(model: &str, ks: &[usize], input: Option<usize>, json: bool) -> Result<()> {
    let layout = CnnLayout::by_model(model)?;
    let input = match input {
        Some(0) => bail!("--input 0 is invalid: expected a size in pixels of at least 1"),
        Some(s) => (s, s),
        None => layout.default_input(),
    };
    let p = layout.paths().context("layout has stages of different P")?;
    let ks: Vec<usize> = if ks.is_empty() {
        let mut v = vec![p, p / 2, p / 4];
        v.retain(|&k| k > 0);
        v.dedup();
        v
    } else {
        ks.to_vec()
    };
    let gate = GateSettings::new();
    let mut rows = vec![];
    for k in std::iter::once(None).chain(ks.iter().map(|&k| Some(k))) {
        let m = count_macs(&layout, input, k, &gate).map_err(|e| anyhow::anyhow!("--k: {e}"))?;
        rows.push(FlopsRow {
            k,
            cnn_macs: m.cnn_macs,
            gate_macs: m.gate_macs,
            total_macs: m.total(),
        });
    }
    if json {
        let r = FlopsReport {
            model: model.into(),
            input: [input.0, input.1],
            rows,
        };
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let table = if model == "vqa" { "Table 1" } else { "Table 2" };
    println!(
        "Multiply-adds per image, model {model} ({}), input {}x{}, P = {p}",
        layout.name, input.0, input.1
    );
    println!(
        "{:<16} {:>14} {:>14} {:>14} {:>20}",
        "k",
        "CNN MACs",
        "gate MACs",
        "total MACs",
        format!("paper FLOPs ({table})")
    );
    let paper_input = input == layout.default_input();
    for r in &rows {
        let label = match r.k {
            None => "baseline".to_string(),
            Some(k) if k == p => format!("{k} (0% sparse)"),
            Some(k) => format!("{k} ({:.0}% sparse)", 100.0 * (1.0 - k as f64 / p as f64)),
        };
        let paper = paper_flops(model, r.k)
            .filter(|_| paper_input)
            .map_or("-".to_string(), |f| format!("{f:.2e}"));
        println!(
            "{label:<16} {:>14.3e} {:>14.3e} {:>14.3e} {paper:>20}",
            r.cnn_macs as f64, r.gate_macs as f64, r.total_macs as f64
        );
    }
    println!(
        "Ours: one MAC = one multiply-add, BN counted, gate controllers apart (README, 'FLOPs convention'). \
         The paper's absolute numbers do not follow from its layouts under any one convention \
         (its k = P row exceeds the baseline by more than the gates can cost here), so compare ratios between rows, not absolute values."
    );
    Ok(())
}

fn print_bench(r: &moevqa::bench::BlockBench) {
    println!(
        "{} [{}] batch {} k {}/{} ({} timed iters, median)\n  dense  {:>9.3} ms  {:>12} MACs/img\n  sparse {:>9.3} ms  {:>12} MACs/img\n  speedup {:.2}x  MAC ratio {:.2}x  efficiency {:.2}  max rel diff {:.1e}",
        r.preset,
        r.engine.name(),
        r.batch,
        r.k,
        r.paths,
        r.iters,
        r.dense_ms,
        r.dense_macs,
        r.sparse_ms,
        r.sparse_macs,
        r.speedup,
        r.flops_ratio,
        r.efficiency,
        r.max_rel_diff
    );
}

fn parse_engine(name: &str) -> Result<moevqa::bench::Engine> {
    name.parse().map_err(|e| anyhow::anyhow!("--engine: {e}"))
}

/// Flags of eval and predict: how a trained run's model runs.
#[derive(clap::Args, Debug)]
struct RunnerArgs {
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// How the CNN runs: `fast` (the packed CPU path; default on the CPU) or `burn` (Burn's tensor ops; default on a GPU).
    #[arg(long)]
    engine: Option<String>,
    /// Which checkpoint answers: `last` (RUN/checkpoint) or `best` (RUN/best: the end of the epoch with the best validation).
    #[arg(long, default_value = "last")]
    checkpoint: String,
}

impl RunnerArgs {
    /// The inference settings at `k` (None: the run's k) for `run`; a
    /// note says which epoch `--checkpoint best` loads.
    fn resolve(&self, run: &Path, k: Option<usize>, device: &Device) -> Result<Inference> {
        if self.batch == 0 {
            bail!("--batch: expected at least 1");
        }
        let engine = match self.engine.as_deref() {
            Some(name) => parse_engine(name)?,
            None => moevqa::kernels::Engine::for_device(device),
        };
        let checkpoint = self
            .checkpoint
            .parse()
            .map_err(|e| anyhow::anyhow!("--checkpoint: {e}"))?;
        if checkpoint == CheckpointChoice::Best
            && let Some(note) = moevqa::train::run::best_note(run)
        {
            eprintln!("note: {note}");
        }
        Ok(Inference {
            k,
            batch: self.batch,
            engine,
            checkpoint,
        })
    }
}

#[allow(clippy::too_many_arguments)] // one parameter per flag
fn cmd_bench_cnn(
    device: &Device,
    model: &str,
    batch: usize,
    k: Option<usize>,
    input: Option<usize>,
    iters: usize,
    engine: &str,
    profile: bool,
    json: bool,
) -> Result<()> {
    let engine = parse_engine(engine)?;
    if profile && engine != moevqa::bench::Engine::Fast {
        bail!("--profile needs --engine fast: it profiles the packed networks");
    }
    let layout = CnnLayout::by_model(model).map_err(|e| anyhow::anyhow!("--model: {e}"))?;
    let p = layout.paths().context("layout has stages of different P")?;
    let input = input.unwrap_or(layout.default_input().0);
    if iters == 0 {
        bail!("--iters 0 is invalid: expected at least 1 timed iteration");
    }
    let k = k.unwrap_or((p / 4).max(1));
    moevqa::moe::check_k(k, p).map_err(|e| anyhow::anyhow!("--k: {e}"))?;
    let r = moevqa::bench::bench_cnn(model, batch, k, input, iters, engine, device)?;
    let prof = profile
        .then(|| moevqa::bench::profile_cnn(model, batch, k, input, iters, device))
        .transpose()?;
    match (json, &prof) {
        (true, None) => println!("{}", serde_json::to_string(&r)?),
        (true, Some(p)) => println!("{}", serde_json::json!({ "bench": r, "profile": p })),
        (false, _) => print_bench(&r),
    }
    if let (false, Some(p)) = (json, &prof) {
        println!(
            "where the time goes (packed networks, the median of {iters} profiled runs, ms over the batch of {batch}):"
        );
        for (name, part) in [("dense ", &p.dense), ("sparse", &p.sparse)] {
            println!(
                "  {name} {:>8.2} = stem {:.2} + gate controllers {:.2} + blocks {:.2} + head {:.2}",
                part.total(),
                part.stem,
                part.gates,
                part.blocks.iter().sum::<f64>(),
                part.head
            );
        }
        let per_block: Vec<String> = p
            .dense
            .blocks
            .iter()
            .zip(&p.sparse.blocks)
            .map(|(d, s)| format!("{d:.2}/{s:.2}"))
            .collect();
        println!("  each block, dense/sparse: {}", per_block.join(" "));
    }
    Ok(())
}

fn cmd_bench_all(
    device: &Device,
    engine: &str,
    iters: usize,
    vqa_batch: usize,
    json: bool,
) -> Result<()> {
    let engine = parse_engine(engine)?;
    if iters == 0 || vqa_batch == 0 {
        bail!("--iters and --vqa-batch must be at least 1");
    }
    let mut rows = Vec::new();
    let mut add = |r: moevqa::bench::BlockBench| {
        if !json {
            println!(
                "{:<20} batch {:>2} k {:>2}/{:<2} dense {:>9.3} ms sparse {:>9.3} ms speedup {:>5.2}x MAC ratio {:>5.2}x efficiency {:.2}",
                r.preset,
                r.batch,
                r.k,
                r.paths,
                r.dense_ms,
                r.sparse_ms,
                r.speedup,
                r.flops_ratio,
                r.efficiency
            );
        }
        rows.push(r);
    };
    for (name, spec) in block_presets() {
        for batch in [1, 32] {
            for k in [spec.paths / 2, spec.paths / 4] {
                let r = match engine {
                    moevqa::bench::Engine::Burn => bench_block(&name, batch, k, iters, 2, device)?,
                    moevqa::bench::Engine::Fast => {
                        moevqa::bench::bench_block_fast(&name, batch, k, iters, 2, device)?
                    }
                };
                add(r);
            }
        }
    }
    for (model, batches, p) in [("clevr", vec![1, 32], 12), ("vqa", vec![1, vqa_batch], 32)] {
        let input = CnnLayout::by_model(model)?.default_input().0;
        for batch in batches {
            for k in [p / 2, p / 4] {
                add(moevqa::bench::bench_cnn(
                    model, batch, k, input, iters, engine, device,
                )?);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string(&rows)?);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one parameter per flag
fn cmd_bench_block(
    device: &Device,
    preset: &str,
    batch: usize,
    k: Option<usize>,
    iters: usize,
    warmup: usize,
    engine: &str,
    json: bool,
) -> Result<()> {
    let engine = parse_engine(engine)?;
    if preset == "list" {
        for (name, b) in block_presets() {
            println!(
                "{name:<18} C_in {:>4} width {:>4} C_out {:>4} P {:>2} stride {} input {}x{}",
                b.in_channels,
                b.inner,
                b.out_channels,
                b.paths,
                b.stride,
                b.input_hw.0,
                b.input_hw.1
            );
        }
        return Ok(());
    }
    if iters == 0 {
        bail!("--iters 0 is invalid: expected at least 1 timed iteration");
    }
    let spec = moevqa::bench::find_preset(preset).map_err(|e| anyhow::anyhow!("--preset: {e}"))?;
    let k = k.unwrap_or((spec.paths / 4).max(1));
    moevqa::moe::check_k(k, spec.paths).map_err(|e| anyhow::anyhow!("--k: {e}"))?;
    if batch == 0 {
        bail!("--batch 0 is invalid: expected at least 1");
    }
    let r = match engine {
        moevqa::bench::Engine::Burn => bench_block(preset, batch, k, iters, warmup, device),
        moevqa::bench::Engine::Fast => {
            moevqa::bench::bench_block_fast(preset, batch, k, iters, warmup, device)
        }
    }?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    print_bench(&r);
    Ok(())
}

fn print_summary(
    name: &str,
    out: &std::path::Path,
    s: &GenerateSummary,
    seconds: f64,
    json: bool,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(s)?);
    } else {
        println!(
            "wrote {name} to {}: {} train images ({} questions), {} val images ({} questions) in {seconds:.1} s",
            out.display(),
            s.train_images,
            s.train_questions,
            s.val_images,
            s.val_questions,
        );
    }
    Ok(())
}

fn cmd_generate(what: GenerateCommand) -> Result<()> {
    let t0 = std::time::Instant::now();
    match what {
        GenerateCommand::Vqa2 {
            out,
            train_images,
            val_images,
            test_images,
            questions_per_image,
            image_size,
            seed,
            json,
        } => vqa_cli::cmd_generate_vqa2(
            &out,
            train_images,
            val_images,
            test_images,
            questions_per_image,
            image_size,
            seed,
            json,
        ),
        GenerateCommand::Clevr2d {
            out,
            train_images,
            val_images,
            questions_per_image,
            image_size,
            seed,
            json,
        } => {
            let cfg = moevqa::data::clevr2d::Clevr2dConfig {
                train_images,
                val_images,
                questions_per_image,
                image_size,
                seed,
            };
            let s = moevqa::data::clevr2d::generate(&out, &cfg)?;
            print_summary("clevr-2d", &out, &s, t0.elapsed().as_secs_f64(), json)
        }
        GenerateCommand::SortOfClevr {
            out,
            train_images,
            val_images,
            seed,
            json,
        } => {
            let cfg = moevqa::data::sort_of_clevr::SortOfClevrConfig {
                train_images,
                val_images,
                seed,
            };
            let s = moevqa::data::sort_of_clevr::generate(&out, &cfg)?;
            print_summary("Sort-of-CLEVR", &out, &s, t0.elapsed().as_secs_f64(), json)
        }
    }
}

#[derive(Serialize)]
struct DemoRow {
    k: usize,
    cnn_macs: u64,
    accuracy: f64,
    relational: f64,
    non_relational: f64,
    images_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cnn_ms_per_image: Option<f64>,
}

#[derive(Serialize)]
struct DemoReport {
    data: std::path::PathBuf,
    train_questions: usize,
    val_questions: usize,
    majority_answer: String,
    majority_baseline: f64,
    rows: Vec<DemoRow>,
}

fn cmd_demo(
    device: &Device,
    out: Option<std::path::PathBuf>,
    train_images: usize,
    val_images: usize,
    epochs: usize,
    json: bool,
) -> Result<()> {
    use moevqa::data::sort_of_clevr::{SortOfClevrConfig, generate, group_means};
    let root = out.unwrap_or_else(|| std::env::temp_dir().join("moevqa-demo"));
    let data = root.join("sort-of-clevr");
    let summary = generate(
        &data,
        &SortOfClevrConfig {
            train_images,
            val_images,
            seed: 1,
        },
    )?;
    eprintln!(
        "generated Sort-of-CLEVR in {}: {} train / {} val questions",
        data.display(),
        summary.train_questions,
        summary.val_questions
    );
    let val = moevqa::data::clevr_reader::ClevrSplit::open(&data, "val")?;
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for q in &val.questions {
        *counts.entry(q.answer.as_deref().unwrap_or("")).or_default() += 1;
    }
    let (majority_answer, majority) = counts
        .iter()
        .max_by_key(|(_, c)| **c)
        .map_or(("", 0), |(a, c)| (*a, *c));
    let p = 12;
    let mut rows = Vec::new();
    for k in [p, p / 2] {
        let run = root.join(format!("run-k{k}"));
        if run.exists() {
            std::fs::remove_dir_all(&run)
                .with_context(|| format!("{}: cannot clear the old demo run", run.display()))?;
        }
        eprintln!("training k = {k} ({epochs} epochs)");
        let cfg = moevqa::train::run::RunConfig {
            dataset: "clevr".into(),
            data: data.clone(),
            k,
            epochs,
            batch: 32,
            lr: 1e-3,
            seed: 1,
            image_size: 64,
            balance_weight: 0.01,
            warmup_epochs: 0,
            checkpoint_every: 0,
            g_dim: 64,
            f_dim: 64,
            question_dim: 64,
        };
        moevqa::train::run::train(&cfg, &run, false, device, &mut new_progress())?;
        let mut bar = EvalBar::new(format!("val at k = {k}"));
        let (_, report) = moevqa::train::run::evaluate_run(
            &run,
            &data,
            "val",
            Inference::at(k, 64, device),
            device,
            &mut |d, n| bar.tick(d, n),
        )?;
        drop(bar);
        let gate = GateSettings::new().with_question_dim(cfg.question_dim);
        let macs = count_macs(&CnnLayout::clevr(), (64, 64), Some(k), &gate)?;
        // NaN (null in --json) only if a val set lacks a whole group.
        let (non_relational, relational) =
            group_means(&report.by_family).unwrap_or((f64::NAN, f64::NAN));
        rows.push(DemoRow {
            k,
            cnn_macs: macs.cnn_macs,
            accuracy: report.accuracy,
            relational,
            non_relational,
            images_per_s: report.questions_per_s,
            cnn_ms_per_image: report.cnn_ms_per_image,
        });
    }
    let report = DemoReport {
        data,
        train_questions: summary.train_questions,
        val_questions: summary.val_questions,
        majority_answer: majority_answer.to_string(),
        majority_baseline: 100.0 * majority as f64 / val.questions.len().max(1) as f64,
        rows,
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "Sort-of-CLEVR demo: {} train / {} val questions, 64x64 input, Relation Network on the modular CNN of Table 4 (P = {p})",
        report.train_questions, report.val_questions
    );
    println!(
        "{:<16} {:>12} {:>11} {:>10} {:>12} {:>15} {:>10}",
        "k", "CNN MACs", "CNN us/img", "val acc %", "relational %", "non-relational %", "images/s"
    );
    for r in &report.rows {
        let cnn_us = r
            .cnn_ms_per_image
            .map_or_else(|| "-".to_string(), |ms| format!("{:.1}", 1e3 * ms));
        println!(
            "{:<16} {:>12.3e} {:>11} {:>10.2} {:>12.2} {:>15.2} {:>10.0}",
            format!(
                "{} ({:.0}% sparse)",
                r.k,
                100.0 * (1.0 - r.k as f64 / p as f64)
            ),
            r.cnn_macs as f64,
            cnn_us,
            r.accuracy,
            r.relational,
            r.non_relational,
            r.images_per_s
        );
    }
    println!(
        "{:<16} {:>12} {:>11} {:>10.2}   (always answering \"{}\")",
        "majority answer", "-", "-", report.majority_baseline, report.majority_answer
    );
    println!(
        "CNN us/img: measured wall time of the CNN alone per image during that evaluation (sparse at k with its gate controllers, whose MACs the CNN MACs column leaves out; fast CPU path, batches of 64). images/s: the whole evaluation, questions answered per second, one image each, images decoded included, model loading excluded. Per-type accuracies are means over the three question types of each kind."
    );
    Ok(())
}

fn cmd_answer(
    device: &Device,
    run: &std::path::Path,
    image: &std::path::Path,
    question: &str,
    inf: Inference,
    json: bool,
) -> Result<()> {
    let a = moevqa::train::run::answer_one(run, image, question, inf, device)?;
    if json {
        println!("{}", serde_json::to_string(&a)?);
        return Ok(());
    }
    println!("{} (p = {:.3}, k = {})", a.answer, a.probability, a.k);
    vqa_cli::print_experts(&a.experts);
    Ok(())
}

/// The run's dataset kind, checked against `--dataset` when given.
fn run_kind(run: &std::path::Path, flag: Option<&str>) -> Result<String> {
    let kind = vqa_cli::run_dataset(run)?;
    if let Some(f) = flag
        && f != kind
    {
        bail!(
            "--dataset {f}: {} is a {kind} run",
            run.join("config.json").display()
        );
    }
    Ok(kind)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate { what } => cmd_generate(what),
        Command::Train(args) => cmd_train(&pick_device(&cli.device)?, args),
        Command::VqaScore {
            results,
            annotations,
            questions,
            json,
        } => vqa_cli::cmd_vqa_score(&results, &annotations, questions.as_deref(), json),
        Command::ImportResnext {
            from,
            out,
            layout,
            question_dim,
            json,
        } => vqa_cli::cmd_import_resnext(&from, &out, layout.as_deref(), question_dim, json),
        Command::Demo {
            out,
            dataset,
            train_images,
            val_images,
            epochs,
            image_size,
            k,
            json,
        } => {
            let device = pick_device(&cli.device)?;
            match dataset.as_str() {
                "sort-of-clevr" | "clevr" => cmd_demo(
                    &device,
                    out,
                    train_images.unwrap_or(600),
                    val_images.unwrap_or(100),
                    epochs,
                    json,
                ),
                "vqa2" => {
                    let flags = vqa_cli::VqaDemoFlags {
                        out,
                        train_images: train_images.unwrap_or(100),
                        val_images: val_images.unwrap_or(40),
                        epochs,
                        image_size,
                        ks: if k.is_empty() { vec![32, 16, 8] } else { k },
                        json,
                    };
                    vqa_cli::cmd_demo_vqa(&device, &flags, &mut new_progress())
                }
                other => bail!("--dataset '{other}': expected sort-of-clevr or vqa2"),
            }
        }
        Command::Predict {
            run,
            data,
            dataset,
            split,
            out,
            k,
            runner,
            json,
        } => {
            let device = pick_device(&cli.device)?;
            let inf = runner.resolve(&run, k, &device)?;
            let (split, n) = if run_kind(&run, dataset.as_deref())? == "vqa2" {
                let split = split.unwrap_or_else(|| "test2015".into());
                let n = vqa_cli::cmd_predict_vqa(&device, &run, &data, &split, &out, inf)?;
                (split, n)
            } else {
                let split = split.unwrap_or_else(|| "test".into());
                let mut bar = EvalBar::new(format!("predicting {split}"));
                let preds = moevqa::train::run::predict_run(
                    &run,
                    &data,
                    &split,
                    inf,
                    &device,
                    &mut |d, n| bar.tick(d, n),
                )?;
                drop(bar);
                moevqa::data::clevr_format::write_json_atomic(&out, &preds)?;
                (split, preds.len())
            };
            if json {
                let out = out.display().to_string();
                let j = serde_json::json!({"out": out, "split": split, "predictions": n});
                println!("{j}");
            } else {
                println!("wrote {n} {split} predictions to {}", out.display());
            }
            Ok(())
        }
        Command::Answer {
            run,
            dataset,
            image,
            question,
            k,
            engine,
            checkpoint,
            json,
        } => {
            let device = pick_device(&cli.device)?;
            let runner = RunnerArgs {
                batch: 1,
                engine,
                checkpoint,
            };
            let inf = runner.resolve(&run, k, &device)?;
            if run_kind(&run, dataset.as_deref())? == "vqa2" {
                vqa_cli::cmd_answer_vqa(&device, &run, &image, &question, inf, json)
            } else {
                cmd_answer(&device, &run, &image, &question, inf, json)
            }
        }
        Command::Plot {
            runs,
            out,
            families,
            title,
            json,
        } => cmd_plot(&runs, &out, families, &title, json),
        Command::Report { runs, json } => {
            let mut rows = Vec::new();
            for run in &runs {
                rows.extend(moevqa::train::report::RunMetrics::read(run)?.rows());
            }
            if json {
                print_json_lines(true, &rows)
            } else {
                print!("{}", moevqa::train::report::markdown(&rows));
                Ok(())
            }
        }
        Command::Eval {
            run,
            data,
            dataset,
            split,
            k,
            runner,
            plot,
            plot_experts,
            confusion,
            json,
        } => {
            let device = pick_device(&cli.device)?;
            let base = runner.resolve(&run, None, &device)?;
            for p in plot.iter().chain(&plot_experts) {
                check_png_out(p)?;
            }
            if plot_experts.is_some() && k.len() > 1 {
                bail!("--plot-experts: draws one k; give at most one --k");
            }
            if let Some(bad) = k.iter().find(|&&k| k == 0) {
                bail!("--k {bad}: expected at least 1 path per block");
            }
            let sweep: Vec<Option<usize>> = if k.is_empty() {
                vec![None]
            } else {
                k.iter().copied().map(Some).collect()
            };
            let vqa = run_kind(&run, dataset.as_deref())? == "vqa2";
            if confusion && vqa {
                bail!(
                    "--confusion: CLEVR runs only (a VQA answer is scored against ten human answers; see per_question_type)"
                );
            }
            let split = split.unwrap_or_else(|| if vqa { "val2014" } else { "val" }.into());
            if plot.is_some() && vqa && !moevqa::data::vqa2::has_annotations(&split) {
                bail!("--plot: {split} has no annotations, so no accuracy to plot (use val2014)");
            }
            let mut rows = Vec::with_capacity(sweep.len());
            for (i, &k) in sweep.iter().enumerate() {
                let inf = Inference { k, ..base };
                if i > 0 && !json {
                    println!();
                }
                rows.push(if vqa {
                    vqa_cli::cmd_eval_vqa(&device, &run, &data, &split, inf, json)?
                } else {
                    cmd_eval(&device, &run, &data, &split, inf, confusion, json)?
                });
            }
            if rows.len() > 1 && !json {
                print_sweep(&split, &rows);
            }
            if let Some(p) = &plot {
                let title = format!(
                    "{}: accuracy against CNN cost, by k ({split})",
                    run_name(&run)
                );
                moevqa::train::plot::draw_sweep(&rows, &title, p)?;
                if !json {
                    println!("wrote {}", p.display());
                }
            }
            if let (Some(p), Some(row)) = (&plot_experts, rows.first()) {
                let group = if vqa { "answer type" } else { "question type" };
                let title = format!(
                    "{}: experts chosen by {group} at k = {} ({split}; shade: share of its questions)",
                    run_name(&run),
                    row.k
                );
                moevqa::train::plot::draw_expert_usage(&row.usage_by_group, row.k, &title, p)?;
                if !json {
                    println!("wrote {}", p.display());
                }
            }
            Ok(())
        }
        Command::Flops {
            model,
            k,
            input,
            json,
        } => cmd_flops(&model, &k, input, json),
        Command::Bench { what } => match what {
            BenchCommand::Block {
                preset,
                batch,
                k,
                iters,
                warmup,
                engine,
                json,
            } => {
                let device = pick_device(&cli.device)?;
                cmd_bench_block(&device, &preset, batch, k, iters, warmup, &engine, json)
            }
            BenchCommand::Cnn {
                model,
                batch,
                k,
                input,
                iters,
                engine,
                profile,
                json,
            } => {
                let device = pick_device(&cli.device)?;
                cmd_bench_cnn(
                    &device, &model, batch, k, input, iters, &engine, profile, json,
                )
            }
            BenchCommand::All {
                engine,
                iters,
                vqa_batch,
                json,
            } => {
                let device = pick_device(&cli.device)?;
                cmd_bench_all(&device, &engine, iters, vqa_batch, json)
            }
            BenchCommand::Train {
                model,
                batch,
                k,
                image_size,
                iters,
                warmup,
                g_dim,
                f_dim,
                json,
            } => {
                if model != "clevr" {
                    bail!("--model '{model}': expected clevr");
                }
                moevqa::moe::check_k(k, CnnLayout::clevr().paths().unwrap_or(12))
                    .map_err(|e| anyhow::anyhow!("--k: {e}"))?;
                let device = pick_device(&cli.device)?;
                let shape = moevqa::train::clevr::TrainStepShape {
                    batch,
                    k,
                    image_size,
                    g_dim,
                    f_dim,
                };
                let r = moevqa::train::clevr::bench_train_step(&shape, iters, warmup, &device)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "train step, Relation Network (g 4x{g_dim}, f {f_dim}) on the CNN of Table 4, batch {batch}, k = {k}, {image_size}x{image_size}: {:.1} ms/step (median of {iters}), {:.1} questions/s",
                        r.step_ms, r.questions_per_s
                    );
                }
                Ok(())
            }
            BenchCommand::Loader {
                data,
                split,
                batch,
                size,
                batches,
                json,
            } => cmd_bench_loader(&data, &split, batch, size, batches, json),
        },
    }
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `println!` into a closed pipe (`moevqa eval
    // --json | head -c 100`) would panic. Ended by the signal instead, like
    // any Unix filter.
    #[cfg(unix)]
    // SAFETY: first thing in main, before any thread exists; SIG_DFL is a
    // valid action for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole chain joined.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    }

    #[test]
    fn purge_delay_is_the_option_set() {
        // SAFETY: reads and sets integer options.
        let before = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) };
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            // 1000 ms is v3's default purge delay; its neighbours default
            // to 1 and 0, so this tells a wrong index.
            Err(_) => assert_eq!(before, 1000),
            Ok(v) => assert_eq!(Some(before), v.parse().ok()),
        }
        keep_freed_memory();
        let after = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(after, -1);
        } else {
            assert_eq!(after, before, "the user's setting is kept");
        }
    }
}
