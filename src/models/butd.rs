//! Bottom-up top-down VQA model (Teney et al. 2017, "Tips and tricks for
//! visual question answering") over the modular ResNeXt-101 of Table 3: the
//! paper's VQA v2 model (section 3.1, Table 1).
//!
//! - Question: word embedding (300, optionally GloVe) -> GRU; the state at
//!   the last real word is the question vector q, which also feeds every
//!   gate controller of the CNN.
//! - Image: the cells of the CNN's final map (7x7x2048 at 224x224) are the
//!   regions v_i, each L2-normalised as in Teney et al.
//! - Top-down attention: a_i = w_a . f_a([v_i; q]), softmax over the cells,
//!   v^ = sum_i a_i v_i. f_a's concatenation is applied in its exact cheap
//!   form W_v v_i + W_q q, so q is projected once, not once per cell.
//! - Fusion: h = f_q(q) * f_v(v^) (element-wise); logits = W_o f_o(h).
//! - Every f is a gated tanh layer: tanh(W x + b) * sigmoid(W' x + b').
//!
//! Loss: sigmoid cross-entropy against the soft scores, summed over answers
//! and averaged over questions (Teney et al.), plus the balance loss.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Gru, GruConfig, Linear, LinearConfig,
};
use burn::tensor::activation::{relu, sigmoid, softmax, tanh};
use burn::tensor::{Device, Int, Tensor};

use super::GatedVqaModel;
use crate::cnn::{CnnLayout, CnnOutput, ModularResNeXt};
use crate::error::{MoeError, Result as MoeResult};
use crate::moe::Gates;

/// Configuration of the bottom-up top-down model.
#[derive(Config, Debug)]
pub struct ButdConfig {
    /// Word vocabulary size (with `<pad>` and `<unk>`).
    pub vocab_size: usize,
    /// Number of answer classes.
    pub num_answers: usize,
    /// Paths kept per block of the CNN (k = P is the dense baseline).
    pub k: usize,
    #[config(default = "CnnLayout::resnext101_32x4d()")]
    pub layout: CnnLayout,
    #[config(default = 300)]
    pub embed_dim: usize,
    /// GRU hidden size = question vector length.
    #[config(default = 512)]
    pub question_dim: usize,
    /// Width of the attention and fusion layers.
    #[config(default = 512)]
    pub hidden: usize,
    /// Attention hidden size of the gate controllers.
    #[config(default = 64)]
    pub gate_hidden: usize,
    #[config(default = 0.5)]
    pub dropout: f64,
}

/// tanh(W x + b) * sigmoid(W' x + b').
#[derive(Module, Debug)]
pub struct GatedTanh {
    pub fc: Linear,
    pub gate: Linear,
}

impl GatedTanh {
    fn new(d_in: usize, d_out: usize, device: &Device) -> Self {
        GatedTanh {
            fc: LinearConfig::new(d_in, d_out).init(device),
            gate: LinearConfig::new(d_in, d_out).init(device),
        }
    }

    /// Applies the layer over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        tanh(self.fc.forward(x.clone())) * sigmoid(self.gate.forward(x))
    }
}

/// The bottom-up top-down model with a modular CNN.
#[derive(Module, Debug)]
pub struct Butd {
    pub embed: Embedding,
    pub gru: Gru,
    pub cnn: ModularResNeXt,
    /// f_a's image half (no bias) and question half.
    pub att_v: Linear,
    pub att_q: Linear,
    pub att_gate_v: Linear,
    pub att_gate_q: Linear,
    pub att_score: Linear,
    pub fuse_q: GatedTanh,
    pub fuse_v: GatedTanh,
    pub out_hidden: GatedTanh,
    pub dropout: Dropout,
    pub out: Linear,
}

/// Output of a forward pass.
#[derive(Debug, Clone)]
pub struct ButdOutput {
    /// Answer logits [N, answers] (sigmoid, not softmax, gives each score).
    pub logits: Tensor<2>,
    /// Attention weights over the grid cells [N, cells].
    pub attention: Tensor<2>,
    /// Gates of every CNN block.
    pub gates: Vec<Gates>,
}

impl ButdConfig {
    /// Builds the model.
    pub fn init(&self, device: &Device) -> MoeResult<Butd> {
        super::require_positive(
            "butd",
            &[
                ("vocab_size", self.vocab_size),
                ("num_answers", self.num_answers),
                ("embed_dim", self.embed_dim),
                ("question_dim", self.question_dim),
                ("hidden", self.hidden),
            ],
        )?;
        let cnn = super::question_gated_cnn(
            &self.layout,
            self.k,
            self.question_dim,
            self.gate_hidden,
            device,
        )?;
        let v_dim = self.layout.output_shape(self.layout.default_input())?.0;
        let (q, h) = (self.question_dim, self.hidden);
        let no_bias = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        Ok(Butd {
            embed: EmbeddingConfig::new(self.vocab_size, self.embed_dim).init(device),
            gru: GruConfig::new(self.embed_dim, q, true).init(device),
            cnn,
            att_v: no_bias(v_dim, h),
            att_q: lin(q, h),
            att_gate_v: no_bias(v_dim, h),
            att_gate_q: lin(q, h),
            att_score: lin(h, 1),
            fuse_q: GatedTanh::new(q, h, device),
            fuse_v: GatedTanh::new(v_dim, h, device),
            out_hidden: GatedTanh::new(h, 2 * h, device),
            dropout: DropoutConfig::new(self.dropout).init(),
            out: lin(2 * h, self.num_answers),
        })
    }
}

/// Sigmoid cross-entropy of `logits` against soft `targets` in [0, 1], summed
/// over answers and averaged over the batch, in the stable form
/// max(x, 0) - x y + log(1 + exp(-|x|)).
pub fn soft_bce(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let [n, _] = logits.dims();
    let per =
        relu(logits.clone()) - logits.clone() * targets + (logits.abs().neg().exp() + 1.0).log();
    per.sum().div_scalar(n.max(1) as f64)
}

impl Butd {
    /// Top-down attention over `regions` [N, R, C] guided by `q` [N, Q]:
    /// returns (attended [N, C], weights [N, R]).
    pub fn attend(&self, regions: Tensor<3>, q: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
        let [n, r, c] = regions.dims();
        let h = self.att_q.weight.dims()[1];
        let pre =
            self.att_v.forward(regions.clone()) + self.att_q.forward(q.clone()).reshape([n, 1, h]);
        let gate = self.att_gate_v.forward(regions.clone())
            + self.att_gate_q.forward(q).reshape([n, 1, h]);
        let f = tanh(pre) * sigmoid(gate);
        let scores = self.att_score.forward(f).reshape([n, r]);
        let weights = softmax(scores, 1);
        let attended = weights
            .clone()
            .reshape([n, 1, r])
            .matmul(regions)
            .reshape([n, c]);
        (attended, weights)
    }
}

impl GatedVqaModel for Butd {
    type Output = ButdOutput;

    fn encode_question(&self, tokens: Tensor<2, Int>, lengths: &[usize]) -> MoeResult<Tensor<2>> {
        let out = self.gru.forward(self.embed.forward(tokens), None); // [N, T, Q]
        super::last_step(out, lengths)
    }

    fn cnn(&self) -> &ModularResNeXt {
        &self.cnn
    }

    fn answer_from(&self, cnn: CnnOutput, q: Tensor<2>) -> MoeResult<ButdOutput> {
        let [n, c, h, w] = cnn.features.dims();
        let expected = self.att_v.weight.dims()[0];
        if c != expected {
            return Err(MoeError::shape(
                "butd image features",
                format!("{expected} channels"),
                c.to_string(),
            ));
        }
        let cells = cnn.features.reshape([n, c, h * w]).swap_dims(1, 2); // [N, R, C]
        // L2-normalise each region (Teney et al.); the epsilon keeps an
        // all-zero cell (possible after ReLU) finite.
        let norm = cells
            .clone()
            .powi_scalar(2)
            .sum_dim(2)
            .add_scalar(1e-12)
            .sqrt();
        let regions = cells / norm;
        let (attended, attention) = self.attend(regions, q.clone());
        let joint = self.fuse_q.forward(q) * self.fuse_v.forward(attended);
        let x = self.dropout.forward(self.out_hidden.forward(joint));
        Ok(ButdOutput {
            logits: self.out.forward(x),
            attention,
            gates: cnn.gates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cnn::Execution;
    use crate::kernels::{Engine, EvalCnn};
    use burn::tensor::{Distribution, TensorData};

    fn small(device: &Device) -> Butd {
        ButdConfig::new(20, 7, 2)
            .with_layout(CnnLayout::clevr())
            .with_embed_dim(8)
            .with_question_dim(12)
            .with_hidden(16)
            .with_gate_hidden(8)
            .init(device)
            .unwrap()
    }

    fn tokens(device: &Device) -> (Tensor<2, Int>, Vec<usize>) {
        let t = Tensor::<2, Int>::from_data(
            TensorData::new(vec![3i64, 4, 5, 0, 6, 7, 0, 0], [2, 4]),
            device,
        );
        (t, vec![3, 2])
    }

    #[test]
    fn soft_bce_matches_the_formula_by_hand() {
        let device = Device::default();
        let x = Tensor::<2>::from_data(
            TensorData::new(vec![0.0f32, 2.0, -1.0, 30.0], [2, 2]),
            &device,
        );
        let y = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 0.3, 0.0, 1.0], [2, 2]),
            &device,
        );
        let got = soft_bce(x, y).into_scalar::<f32>() as f64;
        let bce = |x: f64, y: f64| {
            let p = 1.0 / (1.0 + (-x).exp());
            -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
        };
        // x = 30, y = 1: -ln(sigmoid(30)) ~ 9.4e-14, kept in the stable form.
        let want = (bce(0.0, 1.0) + bce(2.0, 0.3) + bce(-1.0, 0.0) + 9.357623e-14) / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn attention_is_a_distribution_and_weights_the_regions() {
        let device = Device::default();
        let net = small(&device);
        let regions = Tensor::<3>::random([2, 5, 24], Distribution::Normal(0.0, 1.0), &device);
        let q = Tensor::<2>::random([2, 12], Distribution::Normal(0.0, 1.0), &device);
        let (att, w) = net.attend(regions.clone(), q);
        let sums = w
            .clone()
            .sum_dim(1)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        // By hand for sample 0: sum_i w_i v_i.
        let wv = w.slice([0..1, 0..5]).reshape([5, 1]);
        let by_hand = (regions.slice([0..1, 0..5, 0..24]).reshape([5, 24]) * wv).sum_dim(0);
        let diff = (att.slice([0..1, 0..24]) - by_hand)
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn forward_shapes_and_gradients_reach_the_gates() {
        let device = Device::default().autodiff();
        let net = small(&device);
        let img = Tensor::<4>::random([2, 3, 64, 64], Distribution::Normal(0.0, 1.0), &device);
        let (t, len) = tokens(&device);
        let out = net.forward(img, t, &len, 6, Execution::Dense).unwrap();
        assert_eq!(out.logits.dims(), [2, 7]);
        assert_eq!(out.attention.dims(), [2, 16]);
        let targets = Tensor::<2>::zeros([2, 7], &device);
        let grads = soft_bce(out.logits, targets).backward();
        for ctrl in &net.cnn.gates {
            let g = ctrl.gate.weight.grad(&grads).expect("gate gradient");
            assert!(g.abs().sum().into_scalar::<f32>() > 0.0);
        }
        assert!(net.embed.weight.grad(&grads).is_some());
        assert!(net.att_score.weight.grad(&grads).is_some());
    }

    #[test]
    fn sparse_and_fast_inference_equal_dense_inference() {
        let device = Device::default();
        let net = small(&device).valid();
        let img = Tensor::<4>::random([2, 3, 64, 64], Distribution::Normal(0.0, 1.0), &device);
        let (t, len) = tokens(&device);
        for k in [12, 6, 3, 1] {
            let d = net
                .forward(img.clone(), t.clone(), &len, k, Execution::Dense)
                .unwrap();
            let s = net
                .forward(img.clone(), t.clone(), &len, k, Execution::Sparse)
                .unwrap();
            let fast = EvalCnn::new(&net.cnn, Engine::Fast).unwrap();
            let f = net
                .forward_eval(img.clone(), t.clone(), &len, k, &fast)
                .unwrap();
            let scale = d.logits.clone().abs().max().into_scalar::<f32>().max(1e-6);
            for (name, other) in [("sparse", s.logits), ("fast", f.logits)] {
                let diff = (d.logits.clone() - other).abs().max().into_scalar::<f32>();
                assert!(diff <= 1e-4 * scale, "{name} k = {k}: {diff} vs {scale}");
            }
            for (a, b) in f.gates.iter().zip(&s.gates) {
                assert_eq!(a.indices, b.indices, "fast k = {k}");
            }
        }
    }
}
