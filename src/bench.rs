//! Timing harness: one modular block run dense and sparse, in one process,
//! after warm-up, medians reported with the MAC ratio beside them.
//!
//! Presets are the blocks of the paper's layouts: `resnext101-convN` is the
//! repeated (stride 1, C_in = C_out) block of stage N of Table 3 at 224x224,
//! `clevr-convN` the single block of stage N of Table 4 at 128x128, and
//! `ref-256x28` the block of the performance issue and of
//! `shared/examples` (256 channels, width 128, P = 32, 28x28).
//!
//! Two engines run the same blocks: `burn` (the plain-tensor
//! [`crate::moe::Bottleneck`] on the Burn device) and `fast` (the eval-mode
//! CPU path of [`crate::kernels`], weights packed once outside the timing).
//! [`bench_cnn`] times a whole CNN the same way.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use serde::Serialize;

use crate::cnn::layout::{BlockSpec, CnnLayout};
use crate::cnn::{Execution, GateSettings, ModularResNeXt, ModularResNeXtConfig};
use crate::error::{MoeError, Result};
use crate::flops::{block_macs, count_macs};
pub use crate::kernels::Engine;
use crate::kernels::{CnnProfile, PackedBottleneck, PackedResNeXt};
use crate::moe::{Bottleneck, BottleneckConfig, check_k};

/// All block presets, in a stable order.
pub fn block_presets() -> Vec<(String, BlockSpec)> {
    let mut out = Vec::new();
    for (prefix, layout) in [
        ("resnext101", CnnLayout::resnext101_32x4d()),
        ("clevr", CnnLayout::clevr()),
    ] {
        let blocks = layout
            .blocks(layout.default_input())
            .expect("built-in layouts are valid");
        for stage in &layout.stages {
            // The stage's last block: the repeated one that dominates the cost.
            let b = blocks
                .iter()
                .rev()
                .find(|b| b.stage == stage.name)
                .expect("every stage has a block");
            out.push((format!("{prefix}-{}", stage.name), b.clone()));
        }
    }
    out.push((
        "ref-256x28".into(),
        BlockSpec {
            stage: "ref".into(),
            index: 0,
            in_channels: 256,
            inner: 128,
            out_channels: 256,
            paths: 32,
            stride: 1,
            input_hw: (28, 28),
            output_hw: (28, 28),
        },
    ));
    out
}

/// A preset by name.
pub fn find_preset(name: &str) -> Result<BlockSpec> {
    let presets = block_presets();
    presets
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b.clone())
        .ok_or_else(|| MoeError::Unknown {
            kind: "preset",
            name: name.into(),
            expected: presets
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Result of `bench block`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockBench {
    pub preset: String,
    pub batch: usize,
    pub k: usize,
    pub paths: usize,
    /// Timed runs of each of dense and sparse ([`time_pair_ms`]).
    pub iters: usize,
    /// Median eval-mode forward time, all paths.
    pub dense_ms: f64,
    /// Median eval-mode forward time, only the selected paths.
    pub sparse_ms: f64,
    /// dense_ms / sparse_ms.
    pub speedup: f64,
    /// dense MACs / sparse MACs (per image, block only).
    pub flops_ratio: f64,
    /// speedup / flops_ratio (1.0 = sparse is as fast as its MACs say).
    pub efficiency: f64,
    pub dense_macs: u64,
    pub sparse_macs: u64,
    /// max |sparse - dense| / max |dense| on the timed inputs (for a whole
    /// CNN: sparse against the Burn dense execution of the same gated
    /// network at k).
    pub max_rel_diff: f64,
    /// Implementation timed: "burn" or "fast".
    pub engine: Engine,
}

/// The measured part of a [`BlockBench`].
struct Measured {
    iters: usize,
    /// Dense and sparse medians, ms.
    times: (f64, f64),
    /// Dense and sparse multiply-adds per image.
    macs: (u64, u64),
    diff: f64,
    engine: Engine,
}

impl BlockBench {
    /// The report, with the speedup, MAC ratio and efficiency derived.
    fn new(preset: String, batch: usize, k: usize, paths: usize, m: Measured) -> Self {
        let ((dense_ms, sparse_ms), (dense_macs, sparse_macs)) = (m.times, m.macs);
        let speedup = dense_ms / sparse_ms;
        let flops_ratio = dense_macs as f64 / sparse_macs as f64;
        BlockBench {
            preset,
            batch,
            k,
            paths,
            iters: m.iters,
            dense_ms,
            sparse_ms,
            speedup,
            flops_ratio,
            efficiency: speedup / flops_ratio,
            dense_macs,
            sparse_macs,
            max_rel_diff: m.diff,
            engine: m.engine,
        }
    }
}

/// Deterministic pseudo-random selection of k distinct paths per sample
/// (xorshift; independent of the backend's RNG).
pub fn random_selection(batch: usize, paths: usize, k: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..batch)
        .map(|_| {
            let mut all: Vec<usize> = (0..paths).collect();
            for i in 0..k {
                let j = i + (next() % (paths - i) as u64) as usize;
                all.swap(i, j);
            }
            all.truncate(k);
            all
        })
        .collect()
}

/// Random gate values [N, P] that sum to 1 per row.
pub fn random_gates(batch: usize, paths: usize, device: &Device) -> Tensor<2> {
    let g = Tensor::<2>::random([batch, paths], Distribution::Uniform(0.1, 1.0), device);
    let s = g.clone().sum_dim(1);
    g / s
}

/// max |a - b| / max |b|.
pub fn max_rel_diff(a: Tensor<4>, b: Tensor<4>) -> f64 {
    let diff = (a - b.clone()).abs().max().into_scalar::<f32>() as f64;
    let scale = b.abs().max().into_scalar::<f32>() as f64;
    diff / scale.max(f64::MIN_POSITIVE)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Median milliseconds of `f` over `iters` runs after `warmup` runs.
pub fn time_ms<T>(device: &Device, warmup: usize, iters: usize, mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..warmup {
        let _ = f();
        let _ = device.sync();
    }
    let times = (0..iters.max(1))
        .map(|_| {
            let t0 = Instant::now();
            let out = f();
            let _ = device.sync();
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            drop(out);
            ms
        })
        .collect();
    median(times)
}

/// Milliseconds of timed runs (both halves of each pair counted) that
/// [`time_pair_ms`] adds up to before it stops: short rows (a batch-1 block
/// takes 0.02-2 ms) repeat until their medians hold still. Five runs of the
/// 0.6 ms resnext101-conv3 block at batch 1, k = 16 read 0.73-0.84
/// efficiency in `bench all`; fifty read 0.94-0.97.
pub const MIN_PAIR_MS: f64 = 250.0;

/// At most this many times the requested runs, for the shortest pairs.
const MAX_PAIR_FACTOR: usize = 200;

/// Medians of a pair timed in turn, and how many runs each took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairTimes {
    pub a_ms: f64,
    pub b_ms: f64,
    pub iters: usize,
}

/// Median milliseconds of `a` and of `b`, timed in turn (a, b, a, b, ...)
/// after `warmup` runs of each: a change in the shared machine's load
/// during the measurement then falls on both alike, and their ratio (the
/// speedup the benchmarks report) stays honest. At least `iters` runs each,
/// and more, up to [`MAX_PAIR_FACTOR`] times as many, until the timed runs
/// add up to [`MIN_PAIR_MS`].
pub fn time_pair_ms<A, B>(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut a: impl FnMut() -> A,
    mut b: impl FnMut() -> B,
) -> PairTimes {
    let timed = |f: &mut dyn FnMut()| {
        let t0 = Instant::now();
        f();
        let _ = device.sync();
        t0.elapsed().as_secs_f64() * 1e3
    };
    for _ in 0..warmup {
        timed(&mut || drop(a()));
        timed(&mut || drop(b()));
    }
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    let (least, most) = (iters.max(1), iters.max(1) * MAX_PAIR_FACTOR);
    let mut total = 0.0;
    while ta.len() < least || (total < MIN_PAIR_MS && ta.len() < most) {
        ta.push(timed(&mut || drop(a())));
        tb.push(timed(&mut || drop(b())));
        total += ta[ta.len() - 1] + tb[tb.len() - 1];
    }
    let iters = ta.len();
    PairTimes {
        a_ms: median(ta),
        b_ms: median(tb),
        iters,
    }
}

/// What a block benchmark runs: a preset's block at a batch size and k.
#[derive(Debug, Clone)]
pub struct BlockCase {
    pub preset: String,
    pub spec: BlockSpec,
    pub batch: usize,
    pub k: usize,
}

impl BlockCase {
    /// Checks the preset, k and batch.
    pub fn new(preset: &str, batch: usize, k: usize) -> Result<Self> {
        let spec = find_preset(preset)?;
        check_k(k, spec.paths)?;
        if batch == 0 {
            return Err(MoeError::config("--batch", "must be at least 1"));
        }
        Ok(BlockCase {
            preset: preset.into(),
            spec,
            batch,
            k,
        })
    }

    /// Multiply-adds per image with `k` paths (the block only).
    pub fn macs(&self, k: usize) -> u64 {
        block_macs(&self.spec, Some(k)).iter().map(|l| l.macs).sum()
    }

    /// The report of a run: `times` are the dense and sparse medians (ms),
    /// `diff` the sparse output's distance from the dense one.
    fn report(&self, iters: usize, times: (f64, f64), diff: f64, engine: Engine) -> BlockBench {
        let m = Measured {
            iters,
            times,
            macs: (self.macs(self.spec.paths), self.macs(self.k)),
            diff,
            engine,
        };
        BlockBench::new(self.preset.clone(), self.batch, self.k, self.spec.paths, m)
    }
}

/// A case's block (random BN statistics, seed 7) with a random input,
/// gates and selection: what both engines time.
struct BlockInputs {
    case: BlockCase,
    block: Bottleneck,
    x: Tensor<4>,
    gates: Tensor<2>,
    /// The gates with the unselected paths zeroed: the dense run's.
    masked: Tensor<2>,
    selection: Vec<Vec<usize>>,
}

impl BlockInputs {
    fn new(case: BlockCase, device: &Device) -> Result<Self> {
        let spec = &case.spec;
        device.seed(7);
        let block =
            BottleneckConfig::new(spec.in_channels, spec.inner, spec.out_channels, spec.paths)
                .with_stride(spec.stride)
                .init(device)?
                .with_random_batch_norms(device);
        let (h, w) = spec.input_hw;
        let x = Tensor::<4>::random(
            [case.batch, spec.in_channels, h, w],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let gates = random_gates(case.batch, spec.paths, device);
        let selection = random_selection(case.batch, spec.paths, case.k, 11);
        let mask = crate::moe::gate::selection_mask(&selection, spec.paths, device);
        Ok(BlockInputs {
            block,
            x,
            masked: gates.clone() * mask,
            gates,
            selection,
            case,
        })
    }
}

/// Times one preset block dense and sparse (eval mode) on `device`.
pub fn bench_block(
    preset: &str,
    batch: usize,
    k: usize,
    iters: usize,
    warmup: usize,
    device: &Device,
) -> Result<BlockBench> {
    let b = BlockInputs::new(BlockCase::new(preset, batch, k)?, device)?;
    let dense = || b.block.forward_dense(b.x.clone(), Some(b.masked.clone()));
    let sparse = || {
        b.block
            .forward_sparse(b.x.clone(), b.gates.clone(), &b.selection)
    };
    let diff = max_rel_diff(sparse()?, dense()?);
    let t = time_pair_ms(device, warmup, iters, dense, sparse);
    Ok(b.case.report(t.iters, (t.a_ms, t.b_ms), diff, Engine::Burn))
}

/// max |a - b| / max |b| of host slices.
pub fn max_rel_diff_slices(a: &[f32], b: &[f32]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max) as f64;
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max) as f64;
    diff / scale.max(f64::MIN_POSITIVE)
}

fn host<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| MoeError::config("benchmark tensor", format!("{e:?}")))
}

/// One preset block on the fast CPU path ([`PackedBottleneck`]), packed,
/// with [`bench_block`]'s input, gates and selection, ready to run dense
/// (all P paths, the gates masked to the selection, as the Burn dense
/// reference does) or sparse (only the k selected paths). Built once,
/// outside any timing; [`bench_block_fast`] and `benches/kernels.rs` time it.
pub struct FastBlock {
    pub case: BlockCase,
    packed: PackedBottleneck,
    x: Vec<f32>,
    gates: Vec<f32>,
    masked: Vec<f32>,
    every: Vec<Vec<usize>>,
    selection: Vec<Vec<usize>>,
}

impl FastBlock {
    /// The block of `preset` (see [`block_presets`]) at `batch` and `k`.
    pub fn new(preset: &str, batch: usize, k: usize, device: &Device) -> Result<Self> {
        let b = BlockInputs::new(BlockCase::new(preset, batch, k)?, device)?;
        Ok(FastBlock {
            packed: PackedBottleneck::from_block(&b.block)?,
            x: host(b.x)?,
            gates: host(b.gates)?,
            masked: host(b.masked)?,
            every: vec![(0..b.case.spec.paths).collect(); batch],
            selection: b.selection,
            case: b.case,
        })
    }

    /// A zeroed output buffer of the right length. Callers allocate it once,
    /// outside the timing: the kernels' time, not the allocator's (a fresh
    /// 25 MB output costs a few ms of page faults or zeroing; the whole-CNN
    /// path reuses its buffers the same way).
    pub fn output(&self) -> Vec<f32> {
        let (h, w) = self.case.spec.input_hw;
        let (h2, w2) = self.packed.output_hw(h, w);
        vec![0.0; self.case.batch * self.case.spec.out_channels * h2 * w2]
    }

    fn run(&self, gates: &[f32], selection: &[Vec<usize>], out: &mut [f32]) -> Result<()> {
        let (h, w) = self.case.spec.input_hw;
        self.packed.forward_into(
            &self.x,
            self.case.batch,
            h,
            w,
            Some((gates, selection)),
            out,
        )
    }

    /// Every path, with the gates masked to the selection.
    pub fn dense(&self, out: &mut [f32]) -> Result<()> {
        self.run(&self.masked, &self.every, out)
    }

    /// Only the k selected paths of each sample.
    pub fn sparse(&self, out: &mut [f32]) -> Result<()> {
        self.run(&self.gates, &self.selection, out)
    }
}

/// [`bench_block`] on the fast CPU path ([`FastBlock`]): the same block,
/// input, gates and selection. Packing happens once, outside the timing.
pub fn bench_block_fast(
    preset: &str,
    batch: usize,
    k: usize,
    iters: usize,
    warmup: usize,
    device: &Device,
) -> Result<BlockBench> {
    let b = FastBlock::new(preset, batch, k, device)?;
    let (mut dense_out, mut sparse_out) = (b.output(), b.output());
    b.dense(&mut dense_out)?;
    b.sparse(&mut sparse_out)?;
    let diff = max_rel_diff_slices(&sparse_out, &dense_out);
    let t = time_pair_ms(
        device,
        warmup,
        iters,
        || b.dense(&mut dense_out),
        || b.sparse(&mut sparse_out),
    );
    Ok(b.case.report(t.iters, (t.a_ms, t.b_ms), diff, Engine::Fast))
}

/// What both [`bench_cnn`] and [`profile_cnn`] run: the gated and the
/// ungated network (seed 7), random images and questions, and the MACs per
/// image of each.
struct CnnInputs {
    gated: ModularResNeXt,
    plain: ModularResNeXt,
    images: Tensor<4>,
    q: Tensor<2>,
    dense_macs: u64,
    sparse_macs: u64,
}

impl CnnInputs {
    fn new(
        layout: &CnnLayout,
        k: usize,
        input_size: usize,
        batch: usize,
        device: &Device,
    ) -> Result<CnnInputs> {
        if batch == 0 {
            return Err(MoeError::config("--batch", "must be at least 1"));
        }
        let input = (input_size, input_size);
        layout.output_shape(input)?;
        let gate = GateSettings::new();
        let dense_macs = count_macs(layout, input, None, &gate)?.total();
        let sparse_macs = count_macs(layout, input, Some(k), &gate)?.total();
        device.seed(7);
        let gated = ModularResNeXtConfig::new(layout.clone(), k).init(device)?;
        let plain = ModularResNeXtConfig::new(layout.clone(), k)
            .with_gated(false)
            .init(device)?;
        let images = Tensor::<4>::random(
            [batch, layout.input_channels, input_size, input_size],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let q = Tensor::<2>::random(
            [batch, gate.question_dim],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        Ok(CnnInputs {
            gated,
            plain,
            images,
            q,
            dense_macs,
            sparse_macs,
        })
    }
}

/// Where the packed CNNs of [`bench_cnn`] spend their time, part by part:
/// the ungated network (dense) and the gated one at k (sparse).
#[derive(Debug, Clone, Serialize)]
pub struct CnnProfiles {
    pub dense: CnnProfile,
    pub sparse: CnnProfile,
}

/// [`bench_cnn`]'s two networks on the fast CPU path, each profiled
/// ([`PackedResNeXt::profile`]) `iters` times after one warm-up run: the
/// run with the median total, for each.
pub fn profile_cnn(
    model: &str,
    batch: usize,
    k: usize,
    input_size: usize,
    iters: usize,
    device: &Device,
) -> Result<CnnProfiles> {
    let layout = CnnLayout::by_model(model)?;
    let inputs = CnnInputs::new(&layout, k, input_size, batch, device)?;
    let median_run = |net: &PackedResNeXt, q: Option<Tensor<2>>, exec| -> Result<CnnProfile> {
        net.profile(inputs.images.clone(), q.clone(), k, exec)?;
        let mut runs = (0..iters.max(1))
            .map(|_| Ok(net.profile(inputs.images.clone(), q.clone(), k, exec)?.1))
            .collect::<Result<Vec<CnnProfile>>>()?;
        runs.sort_by(|a, b| a.total().total_cmp(&b.total()));
        Ok(runs.swap_remove(runs.len() / 2))
    };
    let plain = PackedResNeXt::from_cnn(&inputs.plain)?;
    let gated = PackedResNeXt::from_cnn(&inputs.gated)?;
    Ok(CnnProfiles {
        dense: median_run(&plain, None, Execution::Dense)?,
        sparse: median_run(&gated, Some(inputs.q.clone()), Execution::Sparse)?,
    })
}

/// Times a whole CNN (`model`: `clevr` or `vqa`, see
/// [`CnnLayout::by_model`]) at `input_size`x`input_size`, eval mode: dense
/// is the ungated baseline network (every path, no gate controllers), sparse
/// the gated network running its top-k paths. MACs are per image, CNN plus
/// gate controllers ([`count_macs`]), so efficiency charges the controllers
/// to the sparse side. `preset` in the result is `"{model}-cnn-{input_size}"`,
/// `paths` the layout's P. One warm-up run.
pub fn bench_cnn(
    model: &str,
    batch: usize,
    k: usize,
    input_size: usize,
    iters: usize,
    engine: Engine,
    device: &Device,
) -> Result<BlockBench> {
    let layout = CnnLayout::by_model(model)?;
    let CnnInputs {
        gated,
        plain,
        images,
        q,
        dense_macs,
        sparse_macs,
    } = CnnInputs::new(&layout, k, input_size, batch, device)?;
    let reference = gated
        .forward_k(images.clone(), Some(q.clone()), k, Execution::Dense)?
        .features;
    let (t, diff) = match engine {
        Engine::Burn => {
            let dense = || plain.forward_k(images.clone(), None, k, Execution::Dense);
            let sparse = || gated.forward_k(images.clone(), Some(q.clone()), k, Execution::Sparse);
            let diff = max_rel_diff(sparse()?.features, reference);
            (time_pair_ms(device, 1, iters, dense, sparse), diff)
        }
        Engine::Fast => {
            let gated = PackedResNeXt::from_cnn(&gated)?;
            let plain = PackedResNeXt::from_cnn(&plain)?;
            let dense = || plain.forward_k(images.clone(), None, k, Execution::Dense);
            let sparse = || gated.forward_k(images.clone(), Some(q.clone()), k, Execution::Sparse);
            let diff = max_rel_diff(sparse()?.features, reference);
            (time_pair_ms(device, 1, iters, dense, sparse), diff)
        }
    };
    let m = Measured {
        iters: t.iters,
        times: (t.a_ms, t.b_ms),
        macs: (dense_macs, sparse_macs),
        diff,
        engine,
    };
    let paths = layout.paths().unwrap_or(0);
    Ok(BlockBench::new(
        format!("{model}-cnn-{input_size}"),
        batch,
        k,
        paths,
        m,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn short_pairs_repeat_up_to_the_cap_and_long_ones_run_the_minimum() {
        let device = Device::default();
        // Instant pairs never fill the time budget: the cap.
        let (mut na, mut nb) = (0, 0);
        let t = time_pair_ms(&device, 2, 3, || na += 1, || nb += 1);
        assert_eq!(t.iters, 3 * MAX_PAIR_FACTOR);
        assert_eq!(
            (na, nb),
            (t.iters + 2, t.iters + 2),
            "warm-up plus timed runs"
        );
        // One pair of 2 x 130 ms fills it (both halves count): exactly
        // the minimum of one run each.
        let nap = || std::thread::sleep(Duration::from_millis(130));
        let t = time_pair_ms(&device, 0, 1, nap, nap);
        assert_eq!(t.iters, 1);
        assert!(t.a_ms >= 130.0 && t.b_ms >= 130.0, "{t:?}");
    }
}
