//! Gate controller, paper appendix B (and section 2.1).
//!
//! One controller sits in front of every modular block. From the question
//! vector `v_Q` (length B) and the block's input map `v_I` (D = H*W regions of
//! A channels) it computes
//!
//! ```text
//! h_A = tanh(W_IA v_i + W_QA v_Q + b_A)          per region i, hidden size C
//! p   = softmax_i(W_P h_A + b_P)                 attention over the D regions
//! v~  = W_I (sum_i p_i v_i)                      attended image vector, projected to B
//! u   = v~ + v_Q
//! g   = W_g u + b_g                              one logit per path (P of them)
//! g'  = ReLU(g) / ||ReLU(g)||_1
//! ```
//!
//! and then keeps the top-k of `g'`.
//!
//! Choices the paper leaves open, made here:
//! - `b_P` is a single scalar (a per-region bias would tie the controller to
//!   one input size; a scalar added before a softmax changes nothing, it is
//!   kept only to mirror the equation).
//! - The gate values are the paper's: normalised over all P paths, **not**
//!   renormalised over the k selected ones. With k < P the selected gates sum
//!   to less than one.
//! - Fallback: when every `ReLU(g)` of a sample is zero the L1 norm is zero;
//!   instead of 0/0 the sample gets uniform gates `1/P` (finite, with a zero
//!   gradient through the all-zero logits) and top-k then picks paths 0..k.
//! - `b_g` starts at a positive constant (default 1.0) and `W_g` small, so
//!   every gate starts positive and every path starts trainable.
//! - Ties in top-k break to the lower path index, deterministically.

use burn::config::Config;
use burn::module::{Initializer, Module};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{MoeError, Result as MoeResult};
use crate::fused::attention::attend;

/// Configuration of one gate controller.
#[derive(Config, Debug)]
pub struct GateControllerConfig {
    /// A: channels of each image region (the block's input channels).
    pub image_channels: usize,
    /// B: length of the question vector.
    pub question_dim: usize,
    /// P: number of paths (experts) to gate.
    pub paths: usize,
    /// C: hidden size of the attention.
    #[config(default = 64)]
    pub hidden: usize,
    /// Initial value of every entry of `b_g` (positive so gates start open).
    #[config(default = 1.0)]
    pub gate_bias_init: f64,
}

/// The gate controller of one block.
#[derive(Module, Debug)]
pub struct GateController {
    /// W_IA: A -> C, no bias.
    pub image_att: Linear,
    /// W_QA and b_A: B -> C.
    pub question_att: Linear,
    /// W_P and (scalar) b_P: C -> 1.
    pub att_score: Linear,
    /// W_I: A -> B, projects the attended image vector to the question space.
    pub image_proj: Linear,
    /// W_g and b_g: B -> P.
    pub gate: Linear,
    paths: usize,
}

/// Gates of one block for a batch.
#[derive(Debug, Clone)]
pub struct Gates {
    /// g' for all P paths, shape [N, P]; each row sums to 1.
    pub values: Tensor<2>,
    /// Selected paths per sample, best first (ties: lower index first).
    pub indices: Vec<Vec<usize>>,
}

impl Gates {
    /// Number of selected paths per sample.
    pub fn k(&self) -> usize {
        self.indices.first().map_or(0, Vec::len)
    }

    /// g' with the unselected paths zeroed, shape [N, P]: the dense path's gates.
    pub fn masked_values(&self) -> Tensor<2> {
        let [n, p] = self.values.dims();
        let mask = selection_mask(&self.indices, p, &self.values.device());
        debug_assert_eq!(mask.dims(), [n, p]);
        self.values.clone() * mask
    }
}

impl GateControllerConfig {
    /// Builds the controller; fails on zero sizes.
    pub fn init(&self, device: &Device) -> MoeResult<GateController> {
        for (name, v) in [
            ("gate controller image_channels", self.image_channels),
            ("gate controller question_dim", self.question_dim),
            ("gate controller paths", self.paths),
            ("gate controller hidden", self.hidden),
        ] {
            if v == 0 {
                return Err(MoeError::config(name, "must be at least 1"));
            }
        }
        if !(self.gate_bias_init.is_finite() && self.gate_bias_init > 0.0) {
            return Err(MoeError::config(
                "gate controller gate_bias_init",
                format!("must be a positive number, got {}", self.gate_bias_init),
            ));
        }
        let image_att = LinearConfig::new(self.image_channels, self.hidden)
            .with_bias(false)
            .init(device);
        let question_att = LinearConfig::new(self.question_dim, self.hidden).init(device);
        let att_score = LinearConfig::new(self.hidden, 1).init(device);
        let image_proj = LinearConfig::new(self.image_channels, self.question_dim)
            .with_bias(false)
            .init(device);
        // Small W_g so that b_g dominates at the start: all gates positive.
        let gate = LinearConfig::new(self.question_dim, self.paths)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: 0.01,
            })
            .init(device);
        // A fresh constant parameter, not a mapped tensor: a mapped one would
        // lose its requires-grad flag and b_g would never train.
        let gate = Linear {
            bias: Some(
                Initializer::Constant {
                    value: self.gate_bias_init,
                }
                .init([self.paths], device),
            ),
            ..gate
        };
        Ok(GateController {
            image_att,
            question_att,
            att_score,
            image_proj,
            gate,
            paths: self.paths,
        })
    }
}

impl GateController {
    /// Number of paths P this controller gates.
    pub fn paths(&self) -> usize {
        self.paths
    }

    /// g' = ReLU(g)/||ReLU(g)||_1 for image [N, A, H, W] and question [N, B]; shape [N, P].
    pub fn gate_values(&self, image: Tensor<4>, question: Tensor<2>) -> MoeResult<Tensor<2>> {
        let [n, a, _, _] = image.dims();
        let [nq, b] = question.dims();
        let [exp_a, _] = self.image_att.weight.dims();
        let [exp_b, _] = self.question_att.weight.dims();
        if a != exp_a {
            return Err(MoeError::shape(
                "gate controller image input",
                format!("{exp_a} channels"),
                format!("{a}"),
            ));
        }
        if b != exp_b || nq != n {
            return Err(MoeError::shape(
                "gate controller question input",
                format!("[{n}, {exp_b}]"),
                format!("[{nq}, {b}]"),
            ));
        }
        let qa = self.question_att.forward(question.clone());
        let attended = attend(image, qa, &self.image_att, &self.att_score); // [N, A]
        let u = self.image_proj.forward(attended) + question;
        Ok(normalize_gates(self.gate.forward(u)))
    }

    /// Gate values and the top-k paths of every sample.
    pub fn forward(&self, image: Tensor<4>, question: Tensor<2>, k: usize) -> MoeResult<Gates> {
        check_k(k, self.paths)?;
        let values = self.gate_values(image, question)?;
        let indices = top_k(&values, k)?;
        Ok(Gates { values, indices })
    }
}

/// `ReLU(g) / ||ReLU(g)||_1` row-wise, with uniform `1/P` for rows whose ReLU is all zero.
pub fn normalize_gates(logits: Tensor<2>) -> Tensor<2> {
    let [_, p] = logits.dims();
    let r = relu(logits);
    let sum = r.clone().sum_dim(1); // [N, 1]
    let dead = sum.clone().lower_equal_elem(0.0).float(); // 1 where the row is all zero
    (r + dead.clone().mul_scalar(1.0 / p as f64)) / (sum + dead)
}

/// Fails unless `1 <= k <= paths`.
pub fn check_k(k: usize, paths: usize) -> MoeResult<()> {
    if k == 0 || k > paths {
        return Err(MoeError::InvalidK { k, paths });
    }
    Ok(())
}

/// Top-k per row of a [N, P] tensor, best first, ties to the lower index.
///
/// Runs on the host: N*P values are few, and a stable order matters more
/// than a device kernel here. NaN counts as the lowest value.
pub fn top_k(values: &Tensor<2>, k: usize) -> MoeResult<Vec<Vec<usize>>> {
    let [n, p] = values.dims();
    check_k(k, p)?;
    let data = values
        .clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| MoeError::config("gate values", format!("{e:?}")))?;
    Ok((0..n)
        .map(|row| top_k_row(&data[row * p..(row + 1) * p], k))
        .collect())
}

/// Top-k indices of one row, best first, ties to the lower index.
pub fn top_k_row(row: &[f32], k: usize) -> Vec<usize> {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let mut order: Vec<usize> = (0..row.len()).collect();
    // Stable sort on descending value keeps equal values in index order.
    order.sort_by(|&a, &b| key(row[b]).total_cmp(&key(row[a])));
    order.truncate(k);
    order
}

/// A [N, P] tensor with 1 at the selected paths and 0 elsewhere.
pub fn selection_mask(indices: &[Vec<usize>], paths: usize, device: &Device) -> Tensor<2> {
    let n = indices.len();
    let mut mask = vec![0.0f32; n * paths];
    for (row, sel) in indices.iter().enumerate() {
        for &i in sel {
            mask[row * paths + i] = 1.0;
        }
    }
    Tensor::from_data(TensorData::new(mask, [n, paths]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> Device {
        Device::default()
    }

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v, shape), &dev())
    }

    fn vec2(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn normalize_matches_hand_computed_values() {
        let g = t2(
            vec![1.0, -2.0, 3.0, 0.0, /* row 2 */ -1.0, -1.0, -3.0, -0.5],
            [2, 4],
        );
        let out = vec2(normalize_gates(g));
        let expected = [0.25, 0.0, 0.75, 0.0, 0.25, 0.25, 0.25, 0.25];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn all_zero_relu_gives_uniform_gates_and_finite_gradient() {
        let ad = dev().autodiff();
        let g = Tensor::<2>::from_data(TensorData::new(vec![-1.0f32, -2.0, -0.5], [1, 3]), &ad)
            .require_grad();
        let out = normalize_gates(g.clone());
        let w = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0], [1, 3]), &ad);
        let grads = (out.clone() * w).sum().backward();
        for v in vec2(out.inner()) {
            assert!((v - 1.0 / 3.0).abs() < 1e-6);
        }
        let grad = vec2(g.grad(&grads).expect("gradient of g"));
        assert!(grad.iter().all(|v| v.is_finite()), "{grad:?}");
    }

    #[test]
    fn top_k_breaks_ties_to_lower_index() {
        assert_eq!(top_k_row(&[0.2, 0.3, 0.3, 0.2], 3), vec![1, 2, 0]);
        assert_eq!(top_k_row(&[0.25; 4], 2), vec![0, 1]);
        assert_eq!(top_k_row(&[f32::NAN, 0.1, 0.0], 2), vec![1, 2]);
    }

    #[test]
    fn top_k_rejects_bad_k() {
        let v = t2(vec![0.5, 0.5], [1, 2]);
        assert_eq!(top_k(&v, 0), Err(MoeError::InvalidK { k: 0, paths: 2 }));
        assert_eq!(top_k(&v, 3), Err(MoeError::InvalidK { k: 3, paths: 2 }));
    }

    #[test]
    fn controller_gates_are_a_distribution_and_start_positive() {
        let d = dev();
        let ctrl = GateControllerConfig::new(6, 10, 8).init(&d).unwrap();
        let img = Tensor::<4>::random(
            [3, 6, 4, 5],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &d,
        );
        let q = Tensor::<2>::random([3, 10], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
        let gates = ctrl.forward(img, q, 3).unwrap();
        let v = vec2(gates.values.clone());
        for row in v.chunks(8) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "row sums to {s}");
            assert!(
                row.iter().all(|&x| x > 0.0),
                "gates should start positive: {row:?}"
            );
        }
        assert_eq!(gates.k(), 3);
        for (r, sel) in gates.indices.iter().enumerate() {
            assert_eq!(sel, &top_k_row(&v[r * 8..(r + 1) * 8], 3));
        }
        let masked = vec2(gates.masked_values());
        for (r, sel) in gates.indices.iter().enumerate() {
            for p in 0..8 {
                let expect = if sel.contains(&p) { v[r * 8 + p] } else { 0.0 };
                assert_eq!(masked[r * 8 + p], expect);
            }
        }
    }

    #[test]
    fn controller_rejects_wrong_shapes() {
        let d = dev();
        let ctrl = GateControllerConfig::new(6, 10, 8).init(&d).unwrap();
        let img = Tensor::<4>::zeros([2, 5, 4, 4], &d);
        let q = Tensor::<2>::zeros([2, 10], &d);
        assert!(matches!(
            ctrl.forward(img, q.clone(), 2),
            Err(MoeError::Shape { .. })
        ));
        let img = Tensor::<4>::zeros([2, 6, 4, 4], &d);
        assert!(matches!(
            ctrl.forward(img.clone(), Tensor::zeros([2, 9], &d), 2),
            Err(MoeError::Shape { .. })
        ));
        assert!(matches!(
            ctrl.forward(img, q, 9),
            Err(MoeError::InvalidK { k: 9, paths: 8 })
        ));
        assert!(GateControllerConfig::new(0, 10, 8).init(&d).is_err());
    }

    proptest::proptest! {
        #[test]
        fn top_k_is_the_k_largest_in_order(row in proptest::collection::vec(-2.0f32..2.0, 1..40), k_frac in 0.0f64..1.0) {
            let k = 1 + ((row.len() - 1) as f64 * k_frac) as usize;
            let sel = top_k_row(&row, k);
            proptest::prop_assert_eq!(sel.len(), k);
            let mut seen = sel.clone();
            seen.sort_unstable();
            seen.dedup();
            proptest::prop_assert_eq!(seen.len(), k, "indices repeat");
            // Best first; equal values in index order.
            for w in sel.windows(2) {
                proptest::prop_assert!(row[w[0]] > row[w[1]] || (row[w[0]] == row[w[1]] && w[0] < w[1]));
            }
            // Nothing left out beats the last one kept (ties: lower index kept).
            let last = *sel.last().unwrap();
            for i in (0..row.len()).filter(|i| !sel.contains(i)) {
                proptest::prop_assert!(row[i] < row[last] || (row[i] == row[last] && i > last));
            }
        }

        #[test]
        fn normalized_gates_are_a_distribution(logits in proptest::collection::vec(-3.0f32..3.0, 12)) {
            let out = vec2(normalize_gates(t2(logits.clone(), [2, 6])));
            for (row, lg) in out.chunks(6).zip(logits.chunks(6)) {
                let s: f32 = row.iter().sum();
                proptest::prop_assert!((s - 1.0).abs() < 1e-5);
                for (g, l) in row.iter().zip(lg) {
                    proptest::prop_assert!(*g >= 0.0);
                    // A path with a non-positive logit gets 0 unless the whole row is dead.
                    if *l <= 0.0 && lg.iter().any(|v| *v > 0.0) {
                        proptest::prop_assert_eq!(*g, 0.0);
                    }
                }
            }
        }
    }
}
