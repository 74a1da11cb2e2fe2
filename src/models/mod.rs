//! VQA models built on the modular CNN: the Relation Network (CLEVR) and
//! the bottom-up top-down model (VQA v2).

pub mod butd;
pub mod relation_network;

pub use butd::{Butd, ButdConfig, ButdOutput};
pub use relation_network::{RelationNetwork, RelationNetworkConfig, RnOutput};

use burn::tensor::{Int, Tensor, TensorData};

use crate::cnn::{CnnOutput, Execution, ModularResNeXt};
use crate::error::{MoeError, Result as MoeResult};
use crate::kernels::EvalCnn;

/// A VQA model whose modular CNN is gated by the question vector (section
/// 3.1): a question encoder, the CNN, and what follows the CNN. Training
/// and the Burn reference use [`GatedVqaModel::forward`]; inference with a
/// chosen engine uses [`GatedVqaModel::forward_eval`].
pub trait GatedVqaModel {
    /// Logits plus what the model reports (gates, attention).
    type Output;

    /// Question vectors [N, B] from `tokens` [N, T] (padded with 0),
    /// `lengths[n]` in 1..=T.
    fn encode_question(&self, tokens: Tensor<2, Int>, lengths: &[usize]) -> MoeResult<Tensor<2>>;

    /// The question-gated CNN.
    fn cnn(&self) -> &ModularResNeXt;

    /// Everything after the CNN, from its output and the question vectors.
    fn answer_from(&self, cnn: CnnOutput, question: Tensor<2>) -> MoeResult<Self::Output>;

    /// Output for images [N, 3, H, W] and questions at `k`, the CNN run by
    /// Burn (`exec`: sparse, or dense with the unselected gates zeroed).
    fn forward(
        &self,
        images: Tensor<4>,
        tokens: Tensor<2, Int>,
        lengths: &[usize],
        k: usize,
        exec: Execution,
    ) -> MoeResult<Self::Output> {
        let q = self.encode_question(tokens, lengths)?;
        let features = self.cnn().forward_k(images, Some(q.clone()), k, exec)?;
        self.answer_from(features, q)
    }

    /// Sparse inference at `k` with the CNN run by `cnn` (built from this
    /// model's CNN in eval mode): the result of `forward(.., Sparse)` within
    /// float rounding when `cnn` is the fast path.
    fn forward_eval(
        &self,
        images: Tensor<4>,
        tokens: Tensor<2, Int>,
        lengths: &[usize],
        k: usize,
        cnn: &EvalCnn,
    ) -> MoeResult<Self::Output> {
        let q = self.encode_question(tokens, lengths)?;
        let features = cnn.forward_k(images, Some(q.clone()), k)?;
        self.answer_from(features, q)
    }
}

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
