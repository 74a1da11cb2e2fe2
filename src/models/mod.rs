//! VQA models built on the modular CNN: the Relation Network (CLEVR) and
//! the bottom-up top-down model (VQA v2).

pub mod butd;
pub mod relation_network;

pub use butd::{Butd, ButdConfig, ButdOutput};
pub use relation_network::{RelationNetwork, RelationNetworkConfig, RnOutput};

use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{MoeError, Result as MoeResult};

/// The output of a recurrent encoder at each sequence's last real step:
/// `out` is [N, T, H], `lengths[n]` in 1..=T; returns [N, H].
pub fn last_step(out: Tensor<3>, lengths: &[usize]) -> MoeResult<Tensor<2>> {
    let [n, t, h] = out.dims();
    if lengths.len() != n || lengths.iter().any(|&l| l == 0 || l > t) {
        return Err(MoeError::shape(
            "question lengths",
            format!("{n} lengths in 1..={t}"),
            format!("{lengths:?}"),
        ));
    }
    let last: Vec<i64> = lengths
        .iter()
        .flat_map(|&l| std::iter::repeat_n((l - 1) as i64, h))
        .collect();
    let idx = Tensor::<3, Int>::from_data(TensorData::new(last, [n, 1, h]), &out.device());
    Ok(out.gather(1, idx).reshape([n, h]))
}

/// Fails on the first size that is zero, naming it under `model`.
pub fn require_positive(model: &str, sizes: &[(&str, usize)]) -> MoeResult<()> {
    match sizes.iter().find(|(_, v)| *v == 0) {
        Some((what, _)) => Err(MoeError::config(
            format!("{model} {what}"),
            "must be at least 1",
        )),
        None => Ok(()),
    }
}

/// The modular CNN of `layout` at `k` whose gate controllers read a
/// question vector of `question_dim`.
pub fn question_gated_cnn(
    layout: &crate::cnn::CnnLayout,
    k: usize,
    question_dim: usize,
    gate_hidden: usize,
    device: &burn::tensor::Device,
) -> MoeResult<crate::cnn::ModularResNeXt> {
    let gate = crate::cnn::GateSettings::new()
        .with_question_dim(question_dim)
        .with_hidden(gate_hidden);
    crate::cnn::ModularResNeXtConfig::new(layout.clone(), k)
        .with_gate(gate)
        .init(device)
}
