//! Training ops with their own backward pass on the CPU (Burn's backend
//! extension API on the Flex device), for the parts of a training step that
//! Burn's generic ops run slowly: g of the Relation Network
//! ([`relate`]) and the stem's max pool ([`maxpool`]).
//!
//! Each op takes Burn tensors and routes at run time (`route`): on Flex with
//! autodiff it registers its own backward step, on Flex without autodiff it
//! runs its forward kernel (or Burn's op), and on any other device (a GPU)
//! it runs the same maths as plain Burn ops. Equality of values and
//! gradients with those plain ops is tested in each module.

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
