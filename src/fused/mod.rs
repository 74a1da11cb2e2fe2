//! Training ops with their own backward pass on the CPU (Burn's backend
//! extension API on the Flex device), for the parts of a training step that
//! Burn's generic ops run slowly: g of the Relation Network ([`relate`]),
//! the CNN's convolutions ([`conv`]), the stem's max pool ([`maxpool`]),
//! batch norm with the ReLU and the residual add that follow it
//! ([`batchnorm`]) and the gate controllers' soft attention ([`attention`]).
//!
//! Each op takes Burn tensors and routes at run time (`route`): on Flex with
//! autodiff it registers its own backward step, on Flex without autodiff it
//! runs its forward kernel (or Burn's op), and on any other device (a GPU)
//! it runs the same maths as plain Burn ops. Equality of values and
//! gradients with those plain ops is tested in each module.
//!
//! This module depends only on Burn, `gemm` and rayon, so the layers above
//! it (`moe`, `cnn`, `models`, `kernels`) may all call it.

pub mod attention;
pub mod batchnorm;
pub mod conv;
pub(crate) mod isa;
pub(crate) mod matmul;
pub mod maxpool;
pub mod relate;

use burn::tensor::{DType, Device};

/// Where an op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Plain Burn ops (any device; the reference).
    Reference,
    /// The forward kernels on the Flex device.
    #[cfg(feature = "flex")]
    Flex,
    /// The kernels with their own backward on Flex with autodiff.
    #[cfg(feature = "flex")]
    FlexAutodiff,
}

/// ReLU that keeps NaN (as Burn's `relu` does), so a diverging run is still
/// caught by the trainer's NaN check.
#[inline(always)]
pub(crate) fn relu1(s: f32) -> f32 {
    if s <= 0.0 { 0.0 } else { s }
}

pub(crate) fn route(device: &Device, dtypes: &[DType]) -> Route {
    #[cfg(feature = "flex")]
    if dtypes.iter().all(|d| *d == DType::F32) {
        // Device equality ignores autodiff, so ask about it first.
        let flex = device.clone().inner() == Device::flex();
        if flex && !device.is_autodiff() {
            return Route::Flex;
        }
        // Gradient checkpointing would need a recompute rule: not provided.
        if flex
            && device.gradient_checkpointing_strategy()
                == Some(burn::backend::GradientCheckpointingStrategy::Disabled)
        {
            return Route::FlexAutodiff;
        }
    }
    let _ = (device, dtypes);
    Route::Reference
}

/// Helpers shared by the ops' tests.
#[cfg(test)]
pub(crate) mod testing {
    use burn::tensor::Tensor;

    /// A tensor's values as f32.
    pub(crate) fn flat<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32")
    }

    /// `got` within `tol` of `want`, relative to the largest |want| (at
    /// least 1e-3).
    pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}[{i}]: {g} against {w} (scale {scale})"
            );
        }
    }

    /// `len` deterministic values in [lo, hi) from a seed (a linear
    /// congruential generator: no RNG state shared with the code under test).
    pub(crate) fn values(len: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * (hi - lo) + lo
            })
            .collect()
    }
}

/// Host views of Flex tensors.
#[cfg(feature = "flex")]
pub(crate) mod flex {
    use std::borrow::Cow;

    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::ops::{Backward, NodeGuard, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Tensor, TensorData};

    /// The tensor's values in row-major order (borrowed when contiguous).
    pub(crate) fn host(t: &FlexTensor) -> Option<Cow<'_, [f32]>> {
        if let Some(s) = t.as_slice::<f32>() {
            return Some(Cow::Borrowed(s));
        }
        t.to_contiguous()
            .into_data()
            .try_into_vec::<f32>()
            .ok()
            .map(Cow::Owned)
    }

    /// A contiguous f32 tensor.
    pub(crate) fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    /// Its shape.
    pub(crate) fn dims(t: &FlexTensor) -> Vec<usize> {
        t.layout().shape().to_vec()
    }

    /// `out` as the output of the autodiff step `op` over the inputs
    /// behind `nodes`; `state` is kept for the backward pass only when some
    /// input wants a gradient.
    pub(crate) fn record<BO, const N: usize, const D: usize>(
        op: BO,
        nodes: [NodeGuard; N],
        state: BO::State,
        out: FlexTensor,
    ) -> Tensor<D>
    where
        BO: Backward<Flex, N>,
    {
        let out = match op
            .prepare::<NoCheckpointing>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive::<Autodiff<Flex>>(out)
    }
}
