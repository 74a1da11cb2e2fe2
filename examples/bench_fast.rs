//! Measures the block presets and whole CNNs on both engines (Burn and the
//! fast CPU path) and prints one JSON line per row, then a table.
//!
//! `cargo run --release --example bench_fast -- [WHAT] [--iters N] [--engine burn|fast|both] [--preset NAME] [--batch B] [--threads T]`
//!
//! WHAT: `blocks` (every preset, batch 1 and 32, k = P/2 and P/4), `cnn`
//! (CLEVR at batch 32 and 1, ResNeXt-101 at batch 2), `all` (both, the
//! default), `profile` (the fast block's phases, split over `--threads`
//! threads, 1 by default, plus its time with and without a fresh output
//! buffer), `cnnprof` (where the Burn
//! CNN's time goes: stem, pool, gate controllers, blocks), `cnnloop` (the
//! packed CNN in a loop, for `perf`, then where its time goes, part by
//! part; `MODEL=vqa` for ResNeXt-101, `K=..`, `DENSE=1` for the ungated
//! network).

use std::str::FromStr;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use burn::tensor::{Distribution, Tensor};
use moevqa::bench::{BlockBench, Engine, bench_block, bench_block_fast, bench_cnn, block_presets};
use moevqa::bench::{random_gates, random_selection, time_ms};
use moevqa::cnn::BlockSpec;
use moevqa::kernels::{BlockProfile, PackedBottleneck};
use moevqa::moe::BottleneckConfig;

fn main() -> Result<()> {
    let mut what = "all".to_string();
    let mut iters = 5;
    let mut engines = vec![Engine::Burn, Engine::Fast];
    let mut only_preset: Option<String> = None;
    let mut batches = vec![1, 32];
    // Threads of `profile`'s phase-by-phase run (1: the calling thread).
    let mut threads = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--iters" => iters = val()?.parse()?,
            "--engine" => {
                let v = val()?;
                engines = match v.as_str() {
                    "both" => vec![Engine::Burn, Engine::Fast],
                    e => vec![Engine::from_str(e)?],
                }
            }
            "--preset" => only_preset = Some(val()?),
            "--batch" => batches = vec![val()?.parse()?],
            "--threads" => threads = val()?.parse()?,
            "blocks" | "cnn" | "all" | "profile" | "cnnprof" | "cnnloop" => what = a,
            other => bail!("unknown argument {other}"),
        }
    }
    let last_batch = batches[batches.len() - 1];
    match what.as_str() {
        "cnnprof" => return cnn_profile(last_batch, iters),
        "cnnloop" => return cnn_loop(last_batch, iters),
        _ => {}
    }
    let device = Device::default();
    let mut rows: Vec<BlockBench> = Vec::new();
    let mut emit = |r: BlockBench| -> Result<()> {
        println!("{}", serde_json::to_string(&r)?);
        rows.push(r);
        Ok(())
    };
    if what == "blocks" || what == "all" {
        for (name, spec) in block_presets() {
            if only_preset.as_ref().is_some_and(|p| p != &name) {
                continue;
            }
            for &batch in &batches {
                for k in [spec.paths / 2, spec.paths / 4] {
                    for &engine in &engines {
                        // Burn is slow on the big maps: fewer iterations there.
                        let it = if engine == Engine::Burn && batch > 1 {
                            iters.min(3)
                        } else {
                            iters
                        };
                        let r = match engine {
                            Engine::Burn => bench_block(&name, batch, k, it, 1, &device)?,
                            Engine::Fast => bench_block_fast(&name, batch, k, it, 2, &device)?,
                        };
                        emit(r)?;
                    }
                }
            }
        }
    }
    if what == "cnn" || what == "all" {
        for (model, input, batch, ks) in [
            ("clevr", 128, 32, [6, 3]),
            ("clevr", 128, 1, [6, 3]),
            ("vqa", 224, 2, [16, 8]),
        ] {
            for k in ks {
                for &engine in &engines {
                    let it = if model == "vqa" { iters.min(3) } else { iters };
                    emit(bench_cnn(model, batch, k, input, it, engine, &device)?)?;
                }
            }
        }
    }
    if what == "profile" {
        for (name, spec) in block_presets() {
            if only_preset.as_ref().is_some_and(|p| p != &name) {
                continue;
            }
            for &batch in &batches {
                profile(&name, &spec, batch, iters, threads, &device)?;
            }
        }
        return Ok(());
    }
    println!();
    println!(
        "| preset | batch | k | engine | dense ms | sparse ms | speedup | MAC ratio | efficiency | max rel diff |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} | {:.1e} |",
            r.preset,
            r.batch,
            r.k,
            r.engine.name(),
            r.dense_ms,
            r.sparse_ms,
            r.speedup,
            r.flops_ratio,
            r.efficiency,
            r.max_rel_diff
        );
    }
    Ok(())
}

fn host<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Phase profile (one thread, summed over the batch) of dense (all paths)
/// and sparse at P/2 and P/4, plus the multi-threaded time with and without
/// a fresh output allocation per call.
fn profile(
    name: &str,
    spec: &BlockSpec,
    batch: usize,
    iters: usize,
    threads: usize,
    device: &Device,
) -> Result<()> {
    device.seed(7);
    let block = BottleneckConfig::new(spec.in_channels, spec.inner, spec.out_channels, spec.paths)
        .with_stride(spec.stride)
        .init(device)?
        .with_random_batch_norms(device);
    let packed = PackedBottleneck::from_block(&block)?;
    let (h, w) = spec.input_hw;
    let x = host(Tensor::<4>::random(
        [batch, spec.in_channels, h, w],
        Distribution::Normal(0.0, 1.0),
        device,
    ))?;
    let g = host(random_gates(batch, spec.paths, device))?;
    let (h2, w2) = packed.output_hw(h, w);
    let mut out = vec![0.0f32; batch * spec.out_channels * h2 * w2];
    for k in [spec.paths, spec.paths / 2, spec.paths / 4] {
        let sel = if k == spec.paths {
            vec![(0..k).collect::<Vec<_>>(); batch]
        } else {
            random_selection(batch, spec.paths, k, 11)
        };
        let gates = Some((g.as_slice(), sel.as_slice()));
        let mut best = BlockProfile::default();
        let mut best_total = f64::INFINITY;
        for _ in 0..iters.max(2) {
            let p = packed.profile(&x, batch, h, w, gates, &mut out, threads)?;
            if p.total() < best_total {
                best_total = p.total();
                best = p;
            }
        }
        let alloc = time_ms(device, 1, iters, || packed.forward(&x, batch, h, w, gates));
        let reuse = time_ms(device, 1, iters, || {
            packed.forward_into(&x, batch, h, w, gates, &mut out)
        });
        let macs: u64 = moevqa::flops::block_macs(spec, Some(k))
            .iter()
            .map(|l| l.macs)
            .sum();
        println!(
            "{name} N{batch} k{k}: {threads}-thread phases {:.3} ms ({:.1} GFLOP/s) = reduce {:.3} conv3x3 {:.3} shortcut {:.3} expand+epilogue {:.3} | all threads {:.3} ms (reused out {:.3})",
            best.total(),
            2.0 * macs as f64 * batch as f64 / best.total() / 1e6,
            best.reduce,
            best.conv3x3,
            best.shortcut,
            best.expand,
            alloc,
            reuse
        );
    }
    Ok(())
}

/// Where the whole-CNN time goes (Burn stem/pool/head, gate controllers,
/// packed blocks), one line per model.
fn cnn_profile(batch: usize, iters: usize) -> Result<()> {
    use moevqa::cnn::{CnnLayout, ModularResNeXtConfig};
    let device = Device::default();
    for (model, input, k) in [("clevr", 128, 6), ("vqa", 224, 8)] {
        let layout = CnnLayout::by_model(model)?;
        device.seed(7);
        let cnn = ModularResNeXtConfig::new(layout, k).init(&device)?;
        let images = Tensor::<4>::random(
            [batch, 3, input, input],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let q = Tensor::<2>::random([batch, 128], Distribution::Normal(0.0, 1.0), &device);
        let stem_ms = time_ms(&device, 1, iters, || cnn.stem.forward(images.clone()));
        let x = cnn.stem.forward(images.clone());
        let pool_ms = time_ms(&device, 1, iters, || {
            cnn.pool.as_ref().map(|p| p.forward(x.clone()))
        });
        let mut x = cnn.pool.as_ref().map_or(x.clone(), |p| p.forward(x));
        let (mut gate_ms, mut block_ms, mut conv_ms) = (0.0, 0.0, 0.0);
        for (block, ctrl) in cnn.blocks.iter().zip(&cnn.gates) {
            let packed = PackedBottleneck::from_block(block)?;
            let [n, c, h, w] = x.dims();
            gate_ms += time_ms(&device, 1, iters, || ctrl.forward(x.clone(), q.clone(), k));
            let g = ctrl.forward(x.clone(), q.clone(), k)?;
            let gv = host(g.values.clone())?;
            let xv = host(x.clone())?;
            conv_ms += time_ms(&device, 1, iters, || host(x.clone()));
            let (h2, w2) = packed.output_hw(h, w);
            let mut out = vec![0.0f32; n * block.out_channels() * h2 * w2];
            block_ms += time_ms(&device, 1, iters, || {
                packed.forward_into(&xv, n, h, w, Some((&gv, &g.indices)), &mut out)
            });
            x = block.forward_sparse(x, g.values, &g.indices)?;
            let _ = c;
        }
        let head_ms = time_ms(&device, 1, iters, || {
            cnn.head.as_ref().map(|hd| hd.forward(x.clone()))
        });
        println!(
            "{model} N{batch} k{k}: stem {stem_ms:.2} pool {pool_ms:.2} gate controllers {gate_ms:.2} blocks {block_ms:.2} host copies {conv_ms:.2} head {head_ms:.2} ms"
        );
    }
    Ok(())
}

/// The packed CNN in a loop, for perf, then its profile: `MODEL=vqa` for
/// ResNeXt-101 at 224, else CLEVR at 128; gated and sparse at `K` (default
/// P/4), or the ungated network with `DENSE=1`. The profile runs the samples
/// one after another, each over all threads, so at a batch of at least the
/// thread count its total differs from the timed loop (a sample per thread).
fn cnn_loop(batch: usize, iters: usize) -> Result<()> {
    use moevqa::cnn::{CnnLayout, Execution, ModularResNeXtConfig};
    use moevqa::kernels::PackedResNeXt;
    let device = Device::default();
    let vqa = std::env::var("MODEL").is_ok_and(|m| m == "vqa");
    let (layout, size, k) = if vqa {
        (CnnLayout::resnext101_32x4d(), 224, 8)
    } else {
        (CnnLayout::clevr(), 128, 3)
    };
    // K=.. overrides k; DENSE=1 runs the ungated network instead.
    let k = std::env::var("K")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(k);
    let dense = std::env::var("DENSE").is_ok_and(|v| v == "1");
    let cnn = ModularResNeXtConfig::new(layout, k)
        .with_gated(!dense)
        .init(&device)?;
    let packed = PackedResNeXt::from_cnn(&cnn)?;
    let images = Tensor::<4>::random(
        [batch, 3, size, size],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let q = Tensor::<2>::random([batch, 128], Distribution::Normal(0.0, 1.0), &device);
    let (q, exec) = match dense {
        true => (None, Execution::Dense),
        false => (Some(q), Execution::Sparse),
    };
    let ms = time_ms(&device, 1, iters, || {
        packed.forward_k(images.clone(), q.clone(), k, exec)
    });
    println!(
        "packed N{batch} k{k} {exec:?} (gated {}): {ms:.2} ms",
        !dense
    );
    // Where it goes: the median of `iters` profiled runs, part by part.
    let model = if vqa { "vqa" } else { "clevr" };
    let both = moevqa::bench::profile_cnn(model, batch, k, size, iters, &device)?;
    let p = if dense { &both.dense } else { &both.sparse };
    let blocks: Vec<String> = p.blocks.iter().map(|t| format!("{t:.2}")).collect();
    println!(
        "profile {:.2} ms = stem {:.2} + gate controllers {:.2} + blocks {:.2} [{}] + head {:.2}",
        p.total(),
        p.stem,
        p.gates,
        p.blocks.iter().sum::<f64>(),
        blocks.join(" "),
        p.head
    );
    Ok(())
}
