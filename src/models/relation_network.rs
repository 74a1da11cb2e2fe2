//! Relation Network (Santoro et al. 2017) over the modular CNN of Table 4,
//! the paper's CLEVR model (section 3.2, figure 4).
//!
//! - Question: word embedding (32) -> LSTM (128); the LSTM state at the last
//!   real word is the question vector, which also feeds every gate controller.
//! - Objects: the cells of the CNN's final map (8x8x24 at 128x128), each with
//!   its (x, y) coordinate in [-1, 1] appended.
//! - g over every ordered pair (o_i, o_j) with the question, 4 layers of 256,
//!   summed over pairs; f: 256 -> 256 -> 256 (dropout 0.5) -> answers.
//!
//! g's first layer is applied in its cheap, exact form: `W [o_i; o_j; q] + b
//! = W_i o_i + W_j o_j + (W_q q + b)`, so the objects are projected once
//! (D of them) and the pairs (D^2) only add.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{
    Dropout, DropoutConfig, Embedding, EmbeddingConfig, Linear, LinearConfig, Lstm, LstmConfig,
};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::GatedVqaModel;
use crate::cnn::{CnnLayout, CnnOutput, ModularResNeXt};
use crate::error::{MoeError, Result as MoeResult};
use crate::fused::relate::{linear_relu, linear_relu_sum, pair_relu};
use crate::moe::Gates;

/// Configuration of the Relation Network.
#[derive(Config, Debug)]
pub struct RelationNetworkConfig {
    /// Word vocabulary size (with `<pad>` and `<unk>`).
    pub vocab_size: usize,
    /// Number of answer classes.
    pub num_answers: usize,
    /// Paths kept per block of the CNN (k = P is the dense baseline).
    pub k: usize,
    #[config(default = "CnnLayout::clevr()")]
    pub layout: CnnLayout,
    #[config(default = 32)]
    pub embed_dim: usize,
    /// LSTM hidden size = question vector length B.
    #[config(default = 128)]
    pub question_dim: usize,
    /// Attention hidden size of the gate controllers.
    #[config(default = 64)]
    pub gate_hidden: usize,
    #[config(default = 256)]
    pub g_dim: usize,
    #[config(default = 4)]
    pub g_layers: usize,
    #[config(default = 256)]
    pub f_dim: usize,
    #[config(default = 0.5)]
    pub dropout: f64,
}

/// The Relation Network with a modular CNN.
#[derive(Module, Debug)]
pub struct RelationNetwork {
    pub embed: Embedding,
    pub lstm: Lstm,
    pub cnn: ModularResNeXt,
    pub g_first_i: Linear,
    pub g_first_j: Linear,
    pub g_first_q: Linear,
    pub g_rest: Vec<Linear>,
    pub f1: Linear,
    pub f2: Linear,
    pub dropout: Dropout,
    pub out: Linear,
}

/// The share of dead ReLU units per layer (0 to 1): zero for every question
/// of a probe and, in g, every object pair. A run whose g layers die stops
/// looking at the image (the k = 6 Sort-of-CLEVR run at lr 1e-3: 97% of g's
/// last layer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadUnits {
    /// Questions in the probe.
    pub questions: usize,
    /// g's layers, first to last.
    pub g: Vec<f64>,
    /// f's two hidden layers.
    pub f: Vec<f64>,
}

impl DeadUnits {
    /// From [`RelationNetwork::relu_maxima`] (merged over the probe's
    /// batches by element-wise max).
    pub fn from_maxima(maxima: &[Vec<f32>], questions: usize) -> Self {
        let dead =
            |m: &Vec<f32>| m.iter().filter(|&&x| x <= 0.0).count() as f64 / m.len().max(1) as f64;
        let split = maxima.len().saturating_sub(2);
        DeadUnits {
            questions,
            g: maxima[..split].iter().map(dead).collect(),
            f: maxima[split..].iter().map(dead).collect(),
        }
    }
}

impl std::fmt::Display for DeadUnits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{:.1}", 100.0 * x))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        write!(
            f,
            "dead ReLU units on {} probe questions: g {}%, f {}%",
            self.questions,
            pct(&self.g),
            pct(&self.f)
        )
    }
}

/// The largest value of each column of [rows, cols].
fn column_max(x: &Tensor<2>) -> MoeResult<Vec<f32>> {
    crate::kernels::block::host_vec(x.clone().max_dim(0), "relu maxima")
}

/// Output of a forward pass.
#[derive(Debug, Clone)]
pub struct RnOutput {
    /// Answer logits [N, answers].
    pub logits: Tensor<2>,
    /// Gates of every CNN block.
    pub gates: Vec<Gates>,
}

impl RelationNetworkConfig {
    /// Builds the model.
    pub fn init(&self, device: &Device) -> MoeResult<RelationNetwork> {
        super::require_positive(
            "relation network",
            &[
                ("vocab_size", self.vocab_size),
                ("num_answers", self.num_answers),
                ("embed_dim", self.embed_dim),
                ("question_dim", self.question_dim),
                ("g_dim", self.g_dim),
                ("g_layers", self.g_layers),
                ("f_dim", self.f_dim),
            ],
        )?;
        let cnn = super::question_gated_cnn(
            &self.layout,
            self.k,
            self.question_dim,
            self.gate_hidden,
            device,
        )?;
        let obj_dim = self.layout.output_shape(self.layout.default_input())?.0 + 2;
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        Ok(RelationNetwork {
            embed: EmbeddingConfig::new(self.vocab_size, self.embed_dim).init(device),
            lstm: LstmConfig::new(self.embed_dim, self.question_dim, true).init(device),
            cnn,
            g_first_i: LinearConfig::new(obj_dim, self.g_dim)
                .with_bias(false)
                .init(device),
            g_first_j: LinearConfig::new(obj_dim, self.g_dim)
                .with_bias(false)
                .init(device),
            g_first_q: lin(self.question_dim, self.g_dim),
            g_rest: (1..self.g_layers)
                .map(|_| lin(self.g_dim, self.g_dim))
                .collect(),
            f1: lin(self.g_dim, self.f_dim),
            f2: lin(self.f_dim, self.f_dim),
            dropout: DropoutConfig::new(self.dropout).init(),
            out: lin(self.f_dim, self.num_answers),
        })
    }
}

/// (x, y) in [-1, 1] of each of the h*w cells, row-major, shape [h*w, 2].
pub fn cell_coordinates(h: usize, w: usize, device: &Device) -> Tensor<2> {
    let coord = |i: usize, n: usize| {
        if n > 1 {
            2.0 * i as f32 / (n - 1) as f32 - 1.0
        } else {
            0.0
        }
    };
    let mut v = Vec::with_capacity(h * w * 2);
    for y in 0..h {
        for x in 0..w {
            v.push(coord(x, w));
            v.push(coord(y, h));
        }
    }
    Tensor::from_data(TensorData::new(v, [h * w, 2]), device)
}

impl RelationNetwork {
    /// The objects of a CNN map [N, C, H, W]: its cells with their
    /// coordinates appended, [N, H*W, C + 2].
    pub fn objects(&self, features: Tensor<4>) -> MoeResult<Tensor<3>> {
        let [n, c, h, w] = features.dims();
        let device = features.device();
        let cells = features.reshape([n, c, h * w]).swap_dims(1, 2); // [N, D, C]
        let coords = cell_coordinates(h, w, &device)
            .unsqueeze_dim::<3>(0)
            .repeat_dim(0, n);
        let objects = Tensor::cat(vec![cells, coords], 2);
        let [_, _, obj_dim] = objects.dims();
        let expected = self.g_first_i.weight.dims()[0];
        if obj_dim != expected {
            return Err(MoeError::shape(
                "relation network objects",
                format!("{expected} features"),
                obj_dim.to_string(),
            ));
        }
        Ok(objects)
    }

    /// Each ReLU unit's largest output over a batch: one vector per layer,
    /// g's layers (over every object pair too) then f's two. A unit whose
    /// largest output is 0 was zero for every question: dead, it passes
    /// nothing on and gets no gradient (see [`DeadUnits`]).
    pub fn relu_maxima(&self, cnn: CnnOutput, q: Tensor<2>) -> MoeResult<Vec<Vec<f32>>> {
        let objects = self.objects(cnn.features)?;
        let [n, d, _] = objects.dims();
        let mut h = self.first_pairs(objects, q);
        let g = h.dims()[1];
        let mut maxima = vec![column_max(&h)?];
        for layer in &self.g_rest {
            h = linear_relu(h, layer);
            maxima.push(column_max(&h)?);
        }
        let g_out = h.reshape([n, d * d, g]).sum_dim(1).reshape([n, g]);
        let x = relu(self.f1.forward(g_out));
        maxima.push(column_max(&x)?);
        let x = relu(self.f2.forward(x));
        maxima.push(column_max(&x)?);
        Ok(maxima)
    }

    /// g's first layer on every ordered pair, [N*D*D, g_dim] (pair (i, j) of
    /// sample s at row (s*D + i)*D + j).
    fn first_pairs(&self, objects: Tensor<3>, question: Tensor<2>) -> Tensor<2> {
        let [n, d, _] = objects.dims();
        let a = self.g_first_i.forward(objects.clone()); // [N, D, G]
        let b = self.g_first_j.forward(objects);
        let c = self.g_first_q.forward(question); // [N, G]
        let g = a.dims()[2];
        // The question term joins the i side: relu(a_i + c + b_j).
        pair_relu(a + c.unsqueeze_dim::<3>(1), b).reshape([n * d * d, g])
    }

    /// g summed over all ordered object pairs, [N, g_dim].
    pub fn relate(&self, objects: Tensor<3>, question: Tensor<2>) -> Tensor<2> {
        let [n, d, _] = objects.dims();
        let h = self.first_pairs(objects, question);
        let g = h.dims()[1];
        match self.g_rest.split_last() {
            None => h.reshape([n, d * d, g]).sum_dim(1).reshape([n, g]),
            Some((last, hidden)) => {
                let h = hidden.iter().fold(h, linear_relu);
                linear_relu_sum(h, last, d * d)
            }
        }
    }
}

impl GatedVqaModel for RelationNetwork {
    type Output = RnOutput;

    fn encode_question(&self, tokens: Tensor<2, Int>, lengths: &[usize]) -> MoeResult<Tensor<2>> {
        let (out, _) = self.lstm.forward(self.embed.forward(tokens), None); // [N, T, B]
        super::last_step(out, lengths)
    }

    fn cnn(&self) -> &ModularResNeXt {
        &self.cnn
    }

    fn answer_from(&self, cnn: CnnOutput, q: Tensor<2>) -> MoeResult<RnOutput> {
        let r = self.relate(self.objects(cnn.features)?, q);
        let x = relu(self.f1.forward(r));
        let x = self.dropout.forward(relu(self.f2.forward(x)));
        Ok(RnOutput {
            logits: self.out.forward(x),
            gates: cnn.gates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cnn::Execution;
    use crate::kernels::{Engine, EvalCnn};
    use burn::tensor::Distribution;

    fn small(device: &Device) -> RelationNetwork {
        RelationNetworkConfig::new(20, 7, 6)
            .with_g_dim(16)
            .with_f_dim(16)
            .with_question_dim(12)
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
    fn cheap_first_layer_equals_the_concatenated_form() {
        let device = Device::default();
        let net = small(&device);
        let (n, d, o) = (2, 3, 26);
        let objects = Tensor::<3>::random([n, d, o], Distribution::Normal(0.0, 1.0), &device);
        let q = Tensor::<2>::random([n, 12], Distribution::Normal(0.0, 1.0), &device);
        let fast = net.relate(objects.clone(), q.clone());
        // Naive: build every pair [o_i; o_j; q] and apply the stacked weight.
        let w = Tensor::cat(
            vec![
                net.g_first_i.weight.val(),
                net.g_first_j.weight.val(),
                net.g_first_q.weight.val(),
            ],
            0,
        ); // [2*o + 12, G]
        let bias = net.g_first_q.bias.as_ref().unwrap().val();
        let mut sums = Vec::new();
        for s in 0..n {
            let mut acc: Option<Tensor<2>> = None;
            for i in 0..d {
                for j in 0..d {
                    let oi = objects
                        .clone()
                        .slice([s..s + 1, i..i + 1, 0..o])
                        .reshape([1, o]);
                    let oj = objects
                        .clone()
                        .slice([s..s + 1, j..j + 1, 0..o])
                        .reshape([1, o]);
                    let qs = q.clone().slice([s..s + 1, 0..12]);
                    let pair = Tensor::cat(vec![oi, oj, qs], 1);
                    let mut h = relu(pair.matmul(w.clone()) + bias.clone().unsqueeze_dim::<2>(0));
                    for layer in &net.g_rest {
                        h = relu(layer.forward(h));
                    }
                    acc = Some(match acc {
                        Some(a) => a + h,
                        None => h,
                    });
                }
            }
            sums.push(acc.unwrap());
        }
        let naive = Tensor::cat(sums, 0);
        let diff = (fast - naive.clone()).abs().max().into_scalar::<f32>();
        let scale = naive.abs().max().into_scalar::<f32>();
        assert!(diff <= 1e-4 * scale.max(1e-6), "diff {diff} scale {scale}");
    }

    #[test]
    fn forward_shapes_and_gradients_reach_the_gates() {
        let device = Device::default().autodiff();
        let net = small(&device);
        let img = Tensor::<4>::random([2, 3, 128, 128], Distribution::Normal(0.0, 1.0), &device);
        let (t, len) = tokens(&device);
        let out = net.forward(img, t, &len, 6, Execution::Dense).unwrap();
        assert_eq!(out.logits.dims(), [2, 7]);
        assert_eq!(out.gates.len(), 3);
        let grads = out.logits.sum().backward();
        for ctrl in &net.cnn.gates {
            let g = ctrl.gate.weight.grad(&grads).expect("gate gradient");
            assert!(g.abs().sum().into_scalar::<f32>() > 0.0);
        }
        assert!(net.embed.weight.grad(&grads).is_some());
    }

    #[test]
    fn dead_units_count_layers_that_are_zero_everywhere() {
        // By hand: g layers [0, 1, 2, 0] and [1, 1], f layers [0, 0, 0, 5] and [0, 3].
        let m = vec![
            vec![0.0, 1.0, 2.0, 0.0],
            vec![1.0, 1.0],
            vec![0.0, 0.0, 0.0, 5.0],
            vec![0.0, 3.0],
        ];
        let d = DeadUnits::from_maxima(&m, 7);
        assert_eq!(
            (d.questions, d.g.clone(), d.f.clone()),
            (7, vec![0.5, 0.0], vec![0.75, 0.5])
        );
        assert_eq!(
            d.to_string(),
            "dead ReLU units on 7 probe questions: g 50.0 / 0.0%, f 75.0 / 50.0%"
        );

        let device = Device::default();
        let mut net = small(&device);
        let (t, len) = tokens(&device);
        let img = Tensor::<4>::random([2, 3, 64, 64], Distribution::Uniform(0.0, 1.0), &device);
        let q = net.encode_question(t.clone(), &len).unwrap();
        let cnn = net
            .cnn
            .forward_k(img.clone(), Some(q.clone()), 6, Execution::Sparse)
            .unwrap();
        let maxima = net.relu_maxima(cnn.clone(), q.clone()).unwrap();
        assert_eq!(maxima.len(), net.g_rest.len() + 1 + 2);
        // f's first layer sees g summed over pairs: the same as `relate`.
        let r = net.relate(net.objects(cnn.features.clone()).unwrap(), q.clone());
        let f1 = relu(net.f1.forward(r));
        let want = column_max(&f1).unwrap();
        for (a, b) in maxima[maxima.len() - 2].iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        // A g layer with zero weights and a negative bias is dead for everyone.
        let layer = &net.g_rest[0];
        let bias = layer.bias.as_ref().unwrap().val();
        net.g_rest[0] = Linear {
            weight: burn::module::Param::from_tensor(layer.weight.val().zeros_like()),
            bias: Some(burn::module::Param::from_tensor(bias.zeros_like() - 1.0)),
        };
        let maxima = net.relu_maxima(cnn, q).unwrap();
        let d = DeadUnits::from_maxima(&maxima, 2);
        assert_eq!(d.g[1], 1.0, "{d}");
        assert!(d.g[0] < 1.0, "{d}");
    }

    #[test]
    fn fast_engine_answers_as_the_burn_reference() {
        let device = Device::default();
        let net = small(&device);
        let (t, len) = tokens(&device);
        for (size, k) in [(128, 12), (128, 6), (75, 3), (64, 1)] {
            let img =
                Tensor::<4>::random([2, 3, size, size], Distribution::Uniform(0.0, 1.0), &device);
            let reference = net
                .forward(img.clone(), t.clone(), &len, k, Execution::Sparse)
                .unwrap();
            for engine in [Engine::Burn, Engine::Fast] {
                let cnn = EvalCnn::new(&net.cnn, engine).unwrap();
                let out = net
                    .forward_eval(img.clone(), t.clone(), &len, k, &cnn)
                    .unwrap();
                let diff = (out.logits - reference.logits.clone())
                    .abs()
                    .max()
                    .into_scalar::<f32>();
                let scale = reference.logits.clone().abs().max().into_scalar::<f32>();
                assert!(diff <= 1e-4 * scale.max(1e-6), "{engine:?} k {k}: {diff}");
                for (a, b) in out.gates.iter().zip(&reference.gates) {
                    assert_eq!(a.indices, b.indices, "{engine:?} k {k}");
                }
            }
        }
    }

    #[test]
    fn question_vector_reads_the_last_real_word() {
        let device = Device::default();
        let net = small(&device);
        let (t, len) = tokens(&device);
        let q = net.encode_question(t.clone(), &len).unwrap();
        // Changing padding after the last word must not change the vector.
        let t2 = Tensor::<2, Int>::from_data(
            TensorData::new(vec![3i64, 4, 5, 9, 6, 7, 9, 9], [2, 4]),
            &device,
        );
        let q2 = net.encode_question(t2, &len).unwrap();
        assert!((q - q2).abs().max().into_scalar::<f32>() < 1e-6);
        assert!(net.encode_question(t.clone(), &[0, 2]).is_err());
        assert!(net.encode_question(t, &[5, 2]).is_err());
    }
}
