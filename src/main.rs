//! The `moevqa` command line. The only place that names a concrete backend.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Parser, Subcommand};
use moevqa::bench::{bench_block, block_presets};
use moevqa::cnn::{CnnLayout, GateSettings};
use moevqa::flops::{count_macs, paper_flops};
use serde::Serialize;

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

#[derive(Subcommand, Debug)]
enum GenerateCommand {
    /// Sort-of-CLEVR: 75x75 images, six objects, 10 non-relational and 10 relational questions each.
    SortOfClevr {
        /// Output directory (created; existing files of the same names are replaced).
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 9800)]
        train_images: usize,
        #[arg(long, default_value_t = 200)]
        val_images: usize,
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
        /// Timed iterations (median reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Untimed warm-up iterations.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Print JSON instead of a table.
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
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
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

fn cmd_bench_block(
    device: &Device,
    preset: &str,
    batch: usize,
    k: Option<usize>,
    iters: usize,
    warmup: usize,
    json: bool,
) -> Result<()> {
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
    let r = bench_block(preset, batch, k, iters, warmup, device)
        .map_err(|e| anyhow::anyhow!("--k/--batch: {e}"))?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "block {} batch {} k {}/{} ({} timed iters, median)\n  dense  {:>9.3} ms  {:>12} MACs/img\n  sparse {:>9.3} ms  {:>12} MACs/img\n  speedup {:.2}x  MAC ratio {:.2}x  efficiency {:.2}  max rel diff {:.1e}",
        r.preset,
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
    Ok(())
}

fn cmd_generate(what: GenerateCommand) -> Result<()> {
    match what {
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
            let t0 = std::time::Instant::now();
            let s = moevqa::data::sort_of_clevr::generate(&out, &cfg)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "wrote Sort-of-CLEVR to {}: {} train images ({} questions), {} val images ({} questions) in {:.1} s",
                    out.display(),
                    s.train_images,
                    s.train_questions,
                    s.val_images,
                    s.val_questions,
                    t0.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate { what } => cmd_generate(what),
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
                json,
            } => {
                let device = pick_device(&cli.device)?;
                cmd_bench_block(&device, &preset, batch, k, iters, warmup, json)
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
