//! [`PackedResNeXt`]: a whole modular ResNeXt on the fast eval-mode path.

use std::cell::RefCell;
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use serde::Serialize;

use super::block::{Mode, PackedBottleneck, host_vec};
use super::conv3x3::Isa;
use super::gate::{GateScratch, PackedGate};
use super::stem::{PackedConv, PackedPool};
use crate::cnn::{CnnOutput, Execution, ModularResNeXt};
use crate::error::{MoeError, Result as MoeResult};
use crate::moe::Gates;
use crate::moe::gate::{check_k, top_k_row};

/// A [`ModularResNeXt`] packed for eval-mode inference on the CPU: stem
/// (conv + BN + ReLU), max pool, every gate controller, every bottleneck
/// block and the head run on host slices, sample by sample, so that a
/// sample's activations stay in cache from the stem to the head. Samples
/// run in parallel when the batch has at least as many as there are
/// threads; otherwise each sample's GEMMs and paths are split over the
/// threads.
#[derive(Debug, Clone)]
pub struct PackedResNeXt {
    stem: PackedConv,
    pool: Option<PackedPool>,
    blocks: Vec<PackedBottleneck>,
    gates: Vec<PackedGate>,
    head: Option<PackedConv>,
    k: usize,
}

/// Per-thread buffers of one sample's forward, reused across calls.
#[derive(Default)]
struct CnnScratch {
    a: Vec<f32>,
    b: Vec<f32>,
    col: Vec<f32>,
    gate: GateScratch,
}

thread_local! {
    static CNN_SCRATCH: RefCell<CnnScratch> = RefCell::new(CnnScratch::default());
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Where a packed CNN's wall time goes ([`PackedResNeXt::profile`]):
/// milliseconds summed over the samples of one call.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CnnProfile {
    /// Stem convolution (with its BN and ReLU) and max pool.
    pub stem: f64,
    /// Every gate controller, with its top-k.
    pub gates: f64,
    /// Each block, in order (without its gate controller).
    pub blocks: Vec<f64>,
    /// The head convolution (without one, the copy of the last block's
    /// output into the features).
    pub head: f64,
}

impl CnnProfile {
    /// Sum of the parts.
    pub fn total(&self) -> f64 {
        self.stem + self.gates + self.blocks.iter().sum::<f64>() + self.head
    }
}

/// Adds the time since the last lap to a slot of the profile, when there
/// is one.
struct Laps<'a>(Option<(&'a mut CnnProfile, Instant)>);

impl Laps<'_> {
    fn lap(&mut self, slot: impl FnOnce(&mut CnnProfile) -> &mut f64) {
        if let Some((p, t0)) = &mut self.0 {
            let now = Instant::now();
            *slot(p) += (now - *t0).as_secs_f64() * 1e3;
            *t0 = now;
        }
    }
}

/// What one sample's forward reports: per gated block, its P gate values and
/// its selected paths.
type SampleGates = Vec<(Vec<f32>, Vec<usize>)>;

impl PackedResNeXt {
    /// Packs `cnn` (every BN folded from its running statistics). Fails on a
    /// stem, pool or head the packed path does not implement (the layouts
    /// of [`crate::cnn::CnnLayout`] are all supported).
    pub fn from_cnn(cnn: &ModularResNeXt) -> MoeResult<PackedResNeXt> {
        let blocks = cnn
            .blocks
            .iter()
            .map(PackedBottleneck::from_block)
            .collect::<MoeResult<Vec<_>>>()?;
        let gates = cnn
            .gates
            .iter()
            .map(PackedGate::from_controller)
            .collect::<MoeResult<Vec<_>>>()?;
        Ok(PackedResNeXt {
            stem: PackedConv::from_conv_bn(&cnn.stem, "CNN stem")?,
            pool: cnn.pool.as_ref().map(PackedPool::from_pool).transpose()?,
            blocks,
            gates,
            head: cnn
                .head
                .as_ref()
                .map(|h| PackedConv::from_conv_bn(h, "CNN head"))
                .transpose()?,
            k: cnn.k(),
        })
    }

    /// Default k (the packed network's).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether the blocks are gated.
    pub fn is_gated(&self) -> bool {
        !self.gates.is_empty()
    }

    /// The packed blocks, in order.
    pub fn blocks(&self) -> &[PackedBottleneck] {
        &self.blocks
    }

    /// Map sizes after the stem (and pool), then after each block; `None`
    /// when the input is too small.
    fn shapes(&self, h: usize, w: usize) -> Option<Vec<(usize, usize, usize)>> {
        let (mut h, mut w) = self.stem.output_hw(h, w)?;
        let mut v = vec![(self.stem.out_channels(), h, w)];
        if let Some(pool) = &self.pool {
            (h, w) = pool.output_hw(h, w)?;
            v.push((self.stem.out_channels(), h, w));
        }
        for b in &self.blocks {
            (h, w) = b.output_hw(h, w);
            v.push((b.out_channels(), h, w));
        }
        if let Some(head) = &self.head {
            v.push((head.out_channels(), h, w));
        }
        Some(v)
    }

    /// Same contract and result as [`ModularResNeXt::forward_k`] in eval mode:
    /// `Execution::Sparse` runs only each sample's top-k paths,
    /// `Execution::Dense` every path with the unselected gates zeroed; an
    /// ungated network runs every block whole.
    pub fn forward_k(
        &self,
        images: Tensor<4>,
        question: Option<Tensor<2>>,
        k: usize,
        exec: Execution,
    ) -> MoeResult<CnnOutput> {
        self.forward_impl(images, question, k, exec, None)
    }

    /// [`Self::forward_k`] sample after sample, each split over all the
    /// threads, with where the wall time went (stem, gate controllers,
    /// each block, head; summed over the samples).
    pub fn profile(
        &self,
        images: Tensor<4>,
        question: Option<Tensor<2>>,
        k: usize,
        exec: Execution,
    ) -> MoeResult<(CnnOutput, CnnProfile)> {
        let mut prof = CnnProfile {
            blocks: vec![0.0; self.blocks.len()],
            ..CnnProfile::default()
        };
        let out = self.forward_impl(images, question, k, exec, Some(&mut prof))?;
        Ok((out, prof))
    }

    fn forward_impl(
        &self,
        images: Tensor<4>,
        question: Option<Tensor<2>>,
        k: usize,
        exec: Execution,
        prof: Option<&mut CnnProfile>,
    ) -> MoeResult<CnnOutput> {
        let dims = images.dims();
        let cin = self.stem.in_channels();
        let bad_images = || {
            MoeError::shape(
                "CNN input images",
                format!("[N, {cin}, H, W] with N, H, W >= 1, large enough for the stem and pool"),
                format!("{dims:?}"),
            )
        };
        if dims[1] != cin || dims.contains(&0) {
            return Err(bad_images());
        }
        let [n, _, h, w] = dims;
        let shapes = self.shapes(h, w).ok_or_else(bad_images)?;
        let device = images.device();
        let qdim = self.gates.first().map_or(0, PackedGate::question_dim);
        let question = match (self.is_gated(), question) {
            (false, _) => None,
            (true, Some(q)) => {
                if q.dims() != [n, qdim] {
                    return Err(MoeError::shape(
                        "question vector",
                        format!("[{n}, {qdim}]"),
                        format!("{:?}", q.dims()),
                    ));
                }
                Some(host_vec(q, "question vector")?)
            }
            (true, None) => {
                return Err(MoeError::config(
                    "question vector",
                    "a gated network needs the question vector",
                ));
            }
        };
        if self.is_gated() {
            for g in &self.gates {
                check_k(k, g.paths())?;
            }
        }
        let img = host_vec(images, "CNN input images")?;
        let (fc, fh, fw) = *shapes.last().ok_or_else(bad_images)?;
        let (in_len, feat_len) = (cin * h * w, fc * fh * fw);
        let mut features = vec![0.0f32; n * feat_len];
        let threads = rayon::current_num_threads().max(1);
        let isa = Isa::detect();
        let one = |s: usize, f: &mut [f32], t: usize, p: Laps<'_>| -> MoeResult<SampleGates> {
            let q = question.as_ref().map(|q| &q[s * qdim..(s + 1) * qdim]);
            let x = (&img[s * in_len..(s + 1) * in_len], h, w);
            with_cnn_scratch(|sc| self.run_sample(isa, x, q, k, exec, &shapes, f, sc, t, p))
        };
        let per_sample: Vec<SampleGates> = if let Some(prof) = prof {
            features
                .chunks_mut(feat_len)
                .enumerate()
                .map(|(s, f)| one(s, f, threads, Laps(Some((&mut *prof, Instant::now())))))
                .collect::<MoeResult<_>>()?
        } else if n >= threads {
            features
                .par_chunks_mut(feat_len)
                .enumerate()
                .map(|(s, f)| one(s, f, 1, Laps(None)))
                .collect::<MoeResult<_>>()?
        } else {
            features
                .chunks_mut(feat_len)
                .enumerate()
                .map(|(s, f)| one(s, f, threads, Laps(None)))
                .collect::<MoeResult<_>>()?
        };
        // Per block: the [N, P] gate values and each sample's selection.
        let gates = (0..self.gates.len())
            .map(|i| {
                let p = self.gates[i].paths();
                let mut values = Vec::with_capacity(n * p);
                let mut indices = Vec::with_capacity(n);
                for sample in &per_sample {
                    let (v, sel) = &sample[i];
                    values.extend_from_slice(v);
                    indices.push(sel.clone());
                }
                Gates {
                    values: Tensor::from_data(TensorData::new(values, [n, p]), &device),
                    indices,
                }
            })
            .collect();
        Ok(CnnOutput {
            features: Tensor::from_data(TensorData::new(features, [n, fc, fh, fw]), &device),
            gates,
        })
    }

    /// Forward with the packed network's own k.
    pub fn forward(
        &self,
        images: Tensor<4>,
        question: Option<Tensor<2>>,
        exec: Execution,
    ) -> MoeResult<CnnOutput> {
        self.forward_k(images, question, self.k, exec)
    }

    /// One sample from image to features (`out`), through the ping-pong
    /// buffers of `sc`; `threads > 1` splits each layer over the threads.
    #[allow(clippy::too_many_arguments)]
    fn run_sample(
        &self,
        isa: Isa,
        (img, h_in, w_in): (&[f32], usize, usize),
        q: Option<&[f32]>,
        k: usize,
        exec: Execution,
        shapes: &[(usize, usize, usize)],
        out: &mut [f32],
        sc: &mut CnnScratch,
        threads: usize,
        mut laps: Laps<'_>,
    ) -> MoeResult<SampleGates> {
        let CnnScratch { a, b, col, gate } = sc;
        let len = |i: usize| shapes[i].0 * shapes[i].1 * shapes[i].2;
        let mut at = 0;
        grow(a, len(0));
        self.stem
            .forward(isa, img, h_in, w_in, &mut a[..len(0)], col, threads);
        if let Some(pool) = &self.pool {
            let (c, ph, pw) = shapes[0];
            grow(b, len(1));
            pool.forward(isa, &a[..len(0)], c, ph, pw, &mut b[..len(1)], col);
            std::mem::swap(a, b);
            at = 1;
        }
        laps.lap(|p| &mut p.stem);
        let mut gates = Vec::with_capacity(self.gates.len());
        // One thread per sample, or the block's own choice (it splits a
        // sample over the threads only when that pays).
        let mode = (threads == 1).then_some(Mode::PerSample);
        for (i, block) in self.blocks.iter().enumerate() {
            let (c, bh, bw) = shapes[at];
            let (in_len, out_len) = (len(at), len(at + 1));
            grow(b, out_len);
            let (x, y) = (&a[..in_len], &mut b[..out_len]);
            match (q, self.gates.get(i)) {
                (Some(q), Some(ctrl)) => {
                    let mut values = vec![0.0f32; ctrl.paths()];
                    ctrl.forward(isa, x, bh * bw, q, &mut values, gate, threads);
                    let sel = top_k_row(&values, k);
                    laps.lap(|p| &mut p.gates);
                    match exec {
                        Execution::Sparse => {
                            let s = std::slice::from_ref(&sel);
                            block.forward_mode(x, 1, bh, bw, Some((&values, s)), y, mode)?;
                        }
                        Execution::Dense => {
                            let mut masked = vec![0.0f32; values.len()];
                            for &j in &sel {
                                masked[j] = values[j];
                            }
                            let every = [(0..block.paths()).collect::<Vec<_>>()];
                            block.forward_mode(x, 1, bh, bw, Some((&masked, &every)), y, mode)?;
                        }
                    }
                    gates.push((values, sel));
                }
                _ => block.forward_mode(x, 1, bh, bw, None, y, mode)?,
            }
            laps.lap(|p| &mut p.blocks[i]);
            debug_assert_eq!(c, block.in_channels());
            std::mem::swap(a, b);
            at += 1;
        }
        match &self.head {
            Some(head) => {
                let (_, hh, hw) = shapes[at];
                head.forward(isa, &a[..len(at)], hh, hw, out, col, threads);
            }
            None => out.copy_from_slice(&a[..len(at)]),
        }
        laps.lap(|p| &mut p.head);
        Ok(gates)
    }
}

/// Runs `f` with this thread's CNN scratch (a fresh one if it is in use).
fn with_cnn_scratch<T>(f: impl FnOnce(&mut CnnScratch) -> T) -> T {
    CNN_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut sc) => f(&mut sc),
        Err(_) => f(&mut CnnScratch::default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::max_rel_diff;
    use crate::cnn::{CnnLayout, ConvSpec, ModularResNeXtConfig, StageSpec};
    use crate::moe::Gates;
    use burn::tensor::{Device, Distribution};

    /// Gates compare equal when they select the same paths.
    fn same_selection(a: &[Gates], b: &[Gates]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.indices == y.indices)
    }

    fn check(layout: CnnLayout, input: usize, k: usize, gated: bool) {
        let device = Device::default();
        device.seed(21);
        let mut cnn = ModularResNeXtConfig::new(layout, k)
            .with_gated(gated)
            .init(&device)
            .unwrap();
        // Random BN statistics, so that folding them is exercised.
        cnn.blocks = cnn
            .blocks
            .into_iter()
            .map(|b| b.with_random_batch_norms(&device))
            .collect();
        let packed = PackedResNeXt::from_cnn(&cnn).unwrap();
        // One sample (split over the threads) and three (one per thread).
        for n in [1, 3] {
            let images = Tensor::<4>::random(
                [n, 3, input, input],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let q = gated
                .then(|| Tensor::<2>::random([n, 128], Distribution::Normal(0.0, 1.0), &device));
            for exec in [Execution::Sparse, Execution::Dense] {
                let want = cnn.forward_k(images.clone(), q.clone(), k, exec).unwrap();
                let got = packed
                    .forward_k(images.clone(), q.clone(), k, exec)
                    .unwrap();
                assert_eq!(got.features.dims(), want.features.dims());
                assert!(
                    same_selection(&got.gates, &want.gates),
                    "{exec:?}: selections differ"
                );
                let diff = max_rel_diff(got.features.clone(), want.features);
                assert!(diff <= 1e-4, "{exec:?} k {k} N {n}: rel diff {diff}");
                // The profiled run computes the same, and accounts for
                // every block (and for gates exactly when there are any).
                let (prof_out, prof) = packed.profile(images.clone(), q.clone(), k, exec).unwrap();
                assert!(same_selection(&prof_out.gates, &got.gates));
                let diff = max_rel_diff(prof_out.features, got.features);
                assert!(
                    diff <= 1e-6,
                    "profiled {exec:?} k {k} N {n}: rel diff {diff}"
                );
                assert_eq!(prof.blocks.len(), cnn.blocks.len());
                assert!(prof.blocks.iter().all(|&t| t > 0.0) && prof.stem > 0.0);
                assert_eq!(prof.gates > 0.0, gated, "gate time {}", prof.gates);
                let parts = prof.stem + prof.gates + prof.head + prof.blocks.iter().sum::<f64>();
                assert!((prof.total() - parts).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn clevr_cnn_matches_burn() {
        check(CnnLayout::clevr(), 64, 6, true);
        check(CnnLayout::clevr(), 64, 3, true);
        check(CnnLayout::clevr(), 64, 12, false);
    }

    #[test]
    fn tiny_cnn_matches_burn() {
        let stage = |name: &str, blocks, inner, out, paths, stride| StageSpec {
            name: name.into(),
            blocks,
            inner,
            out,
            paths,
            stride,
        };
        let layout = CnnLayout {
            name: "tiny".into(),
            input_channels: 3,
            stem: ConvSpec {
                kernel: 3,
                stride: 1,
                padding: 1,
                channels: 8,
            },
            pool: None,
            stages: vec![stage("s1", 2, 16, 16, 4, 1), stage("s2", 1, 32, 24, 8, 2)],
            head: None,
        };
        check(layout.clone(), 11, 2, true);
        check(layout, 11, 4, false);
    }

    #[test]
    fn missing_question_and_bad_images_are_errors() {
        let device = Device::default();
        let cnn = ModularResNeXtConfig::new(CnnLayout::clevr(), 6)
            .init(&device)
            .unwrap();
        let packed = PackedResNeXt::from_cnn(&cnn).unwrap();
        let images = Tensor::<4>::zeros([1, 3, 32, 32], &device);
        assert!(packed.forward(images, None, Execution::Sparse).is_err());
        let bad = Tensor::<4>::zeros([1, 4, 32, 32], &device);
        let q = Tensor::<2>::zeros([1, 128], &device);
        assert!(
            packed
                .forward(bad, Some(q.clone()), Execution::Sparse)
                .is_err()
        );
        let wrong_q = Tensor::<2>::zeros([1, 7], &device);
        let images = Tensor::<4>::zeros([1, 3, 32, 32], &device);
        assert!(
            packed
                .forward(images, Some(wrong_q), Execution::Sparse)
                .is_err()
        );
    }
}
