//! Fast CPU path for eval-mode (inference) bottleneck blocks and whole CNNs.
//!
//! Why: on Burn 0.22.1's Flex backend the grouped 3x3 convolution runs at
//! about 2 GFLOP/s, and every plain-tensor op of the sparse block
//! (`select`, batched `matmul`, the grouped conv with the batch folded into
//! the groups, BN, ReLU) makes its own pass over memory; in the whole CNN
//! the stem conv, the max pool and the gate controllers (libm `tanh` per
//! hidden unit and region) cost more than the blocks. The fast path works on
//! host `f32` slices instead (NCHW, like the tensors), one sample at a time,
//! so that a sample's activations stay in the core's cache:
//!
//! - a block's weights are packed once ([`PackedBottleneck::from_block`])
//!   with the eval-mode BN folded in: each BN's scale multiplies the rows of
//!   the conv before it, its shift becomes a bias applied in the next pass;
//! - reduce 1x1 and expand 1x1 (and the projection shortcut) are GEMMs. The
//!   weights are packed once into panels of rows (`pgemm`): a sparse sample
//!   multiplies by its selected paths' panels of the reduce weight and by
//!   their column ranges of the expand weight where they lie, with no copy,
//!   and the expand's tiles are stored through bias + residual + ReLU. On
//!   wide maps (512 positions or more, the early stages) the selected
//!   weights are instead copied out row-major and multiplied by the `gemm`
//!   crate, which is faster there and for which the copy costs under 1/512
//!   of the product;
//! - the grouped 3x3 (stride s, padding 1) is a direct kernel per path: the
//!   reduce's epilogue (bias + ReLU) writes the path's `d` channels zero-padded
//!   and split into `s*s` phase planes, so every one of the 9 taps is a
//!   contiguous shifted read and the inner loop is a register-blocked FMA
//!   loop (no im2col); its epilogue applies the BN shift, ReLU and the gate;
//! - on wide maps the expand GEMM runs by blocks of output channels, each
//!   followed at once by bias + residual + ReLU while it is still in cache;
//! - the hand-written loops are compiled for AVX-512, AVX2+FMA and baseline
//!   x86-64 and picked at run time (`is_x86_feature_detected!`);
//! - parallelism: over samples (each sample single-threaded) when the batch
//!   has at least as many samples as threads, otherwise inside the sample
//!   (the GEMMs by panels or column ranges, the 3x3 by path), as phases of
//!   a `team` of threads that wait for each other by spinning instead of
//!   rayon's joins (a parked worker took 20-500 us to wake on the 2-vCPU
//!   VM, a batch-1 block phase is 0.05-0.3 ms).
//!
//! Dense execution is the same code with all P paths, so dense and sparse
//! timings compare like with like.
//!
//! [`PackedResNeXt`] runs a whole [`crate::cnn::ModularResNeXt`] this way,
//! sample by sample from the image to the features: the stem and the 1x1
//! head as im2col + GEMM with BN folded, the max pool, every gate
//! controller (its attention as one GEMM, `tanh` as a vectorised rational
//! approximation) and every block. It returns the same
//! [`crate::cnn::CnnOutput`] as `ModularResNeXt::forward_k`.
//!
//! Scope: eval mode only (BN with running statistics, no autodiff). Training
//! keeps the Burn path ([`crate::moe::Bottleneck::forward_dense`] on an
//! autodiff device); there is no backward pass here. The training ops with
//! their own backward (the RN's g, batch norm with its ReLU, the gate controllers'
//! attention, the stem's max pool) are in
//! [`crate::fused`].

pub(crate) mod block;
mod cnn;
mod conv3x3;
mod gate;
mod pgemm;
mod stem;
mod team;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::cnn::{CnnOutput, Execution, ModularResNeXt};
use crate::error::{MoeError, Result};

pub use block::{BlockProfile, PackedBottleneck};
pub use cnn::{CnnProfile, PackedResNeXt};

/// Which implementation runs an eval-mode CNN (and which one a benchmark
/// times).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Plain Burn tensor ops on the given device.
    #[default]
    Burn,
    /// The eval-mode CPU path of [`crate::kernels`].
    Fast,
}

impl Engine {
    /// The engine for inference on `device`: the fast path on the CPU
    /// (Flex) device, Burn's own ops on any other.
    pub fn for_device(device: &Device) -> Engine {
        #[cfg(feature = "flex")]
        if *device == Device::flex() {
            return Engine::Fast;
        }
        let _ = device;
        Engine::Burn
    }

    /// Its name on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Burn => "burn",
            Engine::Fast => "fast",
        }
    }
}

impl FromStr for Engine {
    type Err = MoeError;
    fn from_str(s: &str) -> Result<Engine> {
        match s {
            "burn" => Ok(Engine::Burn),
            "fast" => Ok(Engine::Fast),
            other => Err(MoeError::Unknown {
                kind: "engine",
                name: other.into(),
                expected: "burn, fast".into(),
            }),
        }
    }
}

/// A model's CNN ready for sparse inference with the chosen engine (the
/// Burn module itself, or its packed copy, packed once and reused per
/// batch), with the wall time of its calls on the fast engine.
#[derive(Debug, Clone)]
pub struct EvalCnn<'a> {
    runner: Runner<'a>,
    clock: CnnClock,
}

#[derive(Debug, Clone)]
enum Runner<'a> {
    /// Plain Burn ops on the model's device.
    Burn(&'a ModularResNeXt),
    /// The packed CPU path; its output tensors are on the images' device.
    Fast(Box<PackedResNeXt>),
}

/// Wall time spent in [`EvalCnn::forward_k`] and images it ran, summed
/// (atomics, so that an `EvalCnn` stays shareable between threads).
#[derive(Debug, Default)]
struct CnnClock {
    nanos: AtomicU64,
    images: AtomicU64,
}

impl Clone for CnnClock {
    fn clone(&self) -> CnnClock {
        CnnClock {
            nanos: AtomicU64::new(self.nanos.load(Ordering::Relaxed)),
            images: AtomicU64::new(self.images.load(Ordering::Relaxed)),
        }
    }
}

/// What an [`EvalCnn`] has run so far: wall seconds inside its calls and
/// images (see [`EvalCnn::clock`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CnnTime {
    pub seconds: f64,
    pub images: u64,
}

impl CnnTime {
    /// Milliseconds per image between `earlier` and this reading (None
    /// when no image ran in between).
    pub fn ms_per_image_since(&self, earlier: CnnTime) -> Option<f64> {
        let images = self.images.checked_sub(earlier.images)?;
        (images > 0).then(|| 1e3 * (self.seconds - earlier.seconds) / images as f64)
    }
}

impl<'a> EvalCnn<'a> {
    /// Prepares `cnn` (in eval mode: pass the `valid()` model's CNN) for
    /// `engine`.
    pub fn new(cnn: &'a ModularResNeXt, engine: Engine) -> Result<EvalCnn<'a>> {
        let runner = match engine {
            Engine::Burn => Runner::Burn(cnn),
            Engine::Fast => Runner::Fast(Box::new(PackedResNeXt::from_cnn(cnn)?)),
        };
        Ok(EvalCnn {
            runner,
            clock: CnnClock::default(),
        })
    }

    /// The engine it runs on.
    pub fn engine(&self) -> Engine {
        match self.runner {
            Runner::Burn(_) => Engine::Burn,
            Runner::Fast(_) => Engine::Fast,
        }
    }

    /// Sparse forward at `k`, as [`ModularResNeXt::forward_k`] with
    /// [`Execution::Sparse`].
    pub fn forward_k(
        &self,
        images: Tensor<4>,
        question: Option<Tensor<2>>,
        k: usize,
    ) -> Result<CnnOutput> {
        let n = images.dims()[0] as u64;
        let t0 = Instant::now();
        let out = match &self.runner {
            Runner::Burn(cnn) => cnn.forward_k(images, question, k, Execution::Sparse),
            Runner::Fast(packed) => packed.forward_k(images, question, k, Execution::Sparse),
        }?;
        let nanos = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.clock.nanos.fetch_add(nanos, Ordering::Relaxed);
        self.clock.images.fetch_add(n, Ordering::Relaxed);
        Ok(out)
    }

    /// Time inside [`Self::forward_k`] so far, on the fast engine (images
    /// tensor in, features out, all computed before the call returns).
    /// None on Burn's ops: an asynchronous device (a GPU) may return
    /// before the work is done, so that time would not be the CNN's.
    pub fn clock(&self) -> Option<CnnTime> {
        matches!(self.runner, Runner::Fast(_)).then(|| CnnTime {
            seconds: self.clock.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            images: self.clock.images.load(Ordering::Relaxed),
        })
    }

    /// Milliseconds per image of the calls since `before` (a reading of
    /// [`Self::clock`]; None: since it was made), on the fast engine.
    pub fn ms_per_image_since(&self, before: Option<CnnTime>) -> Option<f64> {
        self.clock()?.ms_per_image_since(before.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::CnnTime;

    #[test]
    fn cnn_time_per_image_between_readings() {
        let a = CnnTime {
            seconds: 0.5,
            images: 10,
        };
        let b = CnnTime {
            seconds: 0.8,
            images: 70,
        };
        // 0.3 s over 60 images: 5 ms each.
        assert!((b.ms_per_image_since(a).unwrap() - 5.0).abs() < 1e-9);
        assert!((b.ms_per_image_since(CnnTime::default()).unwrap() - 0.8e3 / 70.0).abs() < 1e-9);
        // No image in between, or readings out of order: nothing to say.
        assert_eq!(b.ms_per_image_since(b), None);
        assert_eq!(a.ms_per_image_since(b), None);
    }
}
