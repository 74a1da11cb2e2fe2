//! A [`GateController`] on host slices, one sample at a time (the same
//! equations as [`crate::moe::gate`]). On the Burn path the controllers cost
//! about as much as the sparse blocks of the VQA network. The attention is
//! [`crate::fused::attention`]'s per-sample kernel, shared with the
//! training op: its D*A*C multiply-adds run as one GEMM, and its D*C tanh
//! as a vectorised rational approximation instead of libm calls. A sample
//! split over threads runs it in phases on the spinning team
//! ([`crate::fused::attention::Attention::sample_phased`]): GEMM, tanh and
//! scores by blocks of regions, then the softmax, then the attended vector
//! by blocks of channels (the gates of a sparse ResNeXt-101 at batch 1 on
//! two threads: 7.4 -> 4.6 ms; the CLEVR CNN's: 0.13 -> 0.08 ms).

use super::block::host_vec;
use super::conv3x3::Isa;
use super::team::{self, Phase};
use crate::error::{MoeError, Result as MoeResult};
use crate::fused::attention::Attention;
use crate::fused::matmul::View;
use crate::moe::GateController;

/// `m` [rows, cols] transposed to [cols, rows] (empty if `m` is not that
/// size, which the caller's size check then reports).
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    if m.len() != rows * cols {
        return Vec::new();
    }
    (0..cols)
        .flat_map(|j| (0..rows).map(move |i| m[i * cols + j]))
        .collect()
}

/// A gate controller's weights on the host.
#[derive(Debug, Clone)]
pub(crate) struct PackedGate {
    /// A, B, C, P.
    a: usize,
    b: usize,
    c: usize,
    p: usize,
    /// W_IA^T [C, A], row-major: gemm packs it faster than the transposed
    /// view of W_IA.
    w_ia_t: Vec<f32>,
    /// W_QA [B, C] and b_A [C].
    w_qa: Vec<f32>,
    b_a: Vec<f32>,
    /// W_P [C] and b_P.
    w_p: Vec<f32>,
    b_p: f32,
    /// W_I [A, B].
    w_i: Vec<f32>,
    /// W_g [B, P] and b_g [P].
    w_g: Vec<f32>,
    b_g: Vec<f32>,
}

/// Per-thread buffers of a controller.
#[derive(Default)]
pub(crate) struct GateScratch {
    hid: Vec<f32>,
    scores: Vec<f32>,
    qa: Vec<f32>,
    att: Vec<f32>,
    u: Vec<f32>,
}

impl PackedGate {
    pub fn from_controller(ctrl: &GateController) -> MoeResult<PackedGate> {
        let what = "gate controller";
        let weight = |l: &burn::nn::Linear| host_vec(l.weight.val(), what);
        let bias = |l: &burn::nn::Linear, n: usize| -> MoeResult<Vec<f32>> {
            match &l.bias {
                Some(b) => host_vec(b.val(), what),
                None => Ok(vec![0.0; n]),
            }
        };
        let [a, c] = ctrl.image_att.weight.dims();
        let [b, _] = ctrl.question_att.weight.dims();
        let p = ctrl.paths();
        let b_p = bias(&ctrl.att_score, 1)?;
        let g = PackedGate {
            a,
            b,
            c,
            p,
            w_ia_t: transpose(&weight(&ctrl.image_att)?, a, c),
            w_qa: weight(&ctrl.question_att)?,
            b_a: bias(&ctrl.question_att, c)?,
            w_p: weight(&ctrl.att_score)?,
            b_p: b_p.first().copied().unwrap_or(0.0),
            w_i: weight(&ctrl.image_proj)?,
            w_g: weight(&ctrl.gate)?,
            b_g: bias(&ctrl.gate, p)?,
        };
        let ok = g.w_ia_t.len() == a * c
            && g.w_qa.len() == b * c
            && g.b_a.len() == c
            && g.w_p.len() == c
            && b_p.len() == 1
            && g.w_i.len() == a * b
            && g.w_g.len() == b * p
            && g.b_g.len() == p;
        if !ok {
            return Err(MoeError::shape(
                what,
                format!("Linear layers A {a} -> C {c}, B {b} -> C, C -> 1, A -> B, B -> P {p}"),
                "other shapes",
            ));
        }
        Ok(g)
    }

    /// B.
    pub fn question_dim(&self) -> usize {
        self.b
    }

    /// P.
    pub fn paths(&self) -> usize {
        self.p
    }

    /// g' of one sample: `x` [A, D] (D = H*W regions), `q` [B] into
    /// `out` [P].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        isa: Isa,
        x: &[f32],
        d: usize,
        q: &[f32],
        out: &mut [f32],
        sc: &mut GateScratch,
        threads: usize,
    ) {
        let (a, b, c, p) = (self.a, self.b, self.c, self.p);
        fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
            if v.len() < n {
                v.resize(n, 0.0);
            }
            &mut v[..n]
        }
        // W_QA q + b_A.
        let qa = grow(&mut sc.qa, c);
        qa.copy_from_slice(&self.b_a);
        for (&qv, row) in q.iter().zip(self.w_qa.chunks_exact(c)) {
            for (o, &wv) in qa.iter_mut().zip(row) {
                *o += qv * wv;
            }
        }
        // The attention over the D regions: hidden layer, scores, softmax,
        // attended image vector [A].
        let (hid, scores) = (grow(&mut sc.hid, c * d), grow(&mut sc.scores, d));
        let att = grow(&mut sc.att, a);
        let weights = Attention {
            w_t: View::rows(&self.w_ia_t, a),
            wp: &self.w_p,
            bp: self.b_p,
            isa,
        };
        if threads > 1 {
            // The hidden layer by blocks of regions (each item's GEMM, tanh
            // and scores stay in cache), then the softmax, then the
            // attended vector by blocks of channels: on the spinning team,
            // like the blocks.
            let cols = d.div_ceil(2 * threads).next_multiple_of(16);
            let run = |phases: &[Phase<'_>]| team::run(threads, phases);
            weights.sample_phased(x, qa, hid, scores, att, cols, &run);
        } else {
            weights.sample(x, qa, hid, scores, att);
        }
        // u = W_I att + q.
        let u = grow(&mut sc.u, b);
        u.copy_from_slice(q);
        for (&av, row) in att.iter().zip(self.w_i.chunks_exact(b)) {
            for (o, &wv) in u.iter_mut().zip(row) {
                *o += av * wv;
            }
        }
        // g = W_g u + b_g, then g' = ReLU(g) / ||ReLU(g)||_1 (uniform when 0).
        let g = &mut out[..p];
        g.copy_from_slice(&self.b_g);
        for (&uv, row) in u.iter().zip(self.w_g.chunks_exact(p)) {
            for (o, &wv) in g.iter_mut().zip(row) {
                *o += uv * wv;
            }
        }
        let mut total = 0.0f32;
        for v in g.iter_mut() {
            *v = v.max(0.0);
            total += *v;
        }
        if total > 0.0 {
            g.iter_mut().for_each(|v| *v /= total);
        } else {
            g.fill(1.0 / p as f32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::GateControllerConfig;
    use crate::moe::gate::top_k_row;
    use burn::tensor::{Device, Distribution, Tensor};

    #[test]
    fn packed_gate_matches_burn() {
        let device = Device::default();
        device.seed(4);
        for (a, b, p, h, w) in [(6, 10, 4, 3, 5), (48, 128, 12, 8, 8)] {
            let mut ctrl = GateControllerConfig::new(a, b, p)
                .with_hidden(16)
                .init(&device)
                .unwrap();
            // Larger W_g than the init's, so that the gates differ.
            ctrl.gate = burn::nn::LinearConfig::new(b, p).init(&device);
            let packed = PackedGate::from_controller(&ctrl).unwrap();
            let n = 3;
            let img = Tensor::<4>::random([n, a, h, w], Distribution::Normal(0.0, 1.0), &device);
            let q = Tensor::<2>::random([n, b], Distribution::Normal(0.0, 1.0), &device);
            let want = host_vec(ctrl.gate_values(img.clone(), q.clone()).unwrap(), "g").unwrap();
            let (xv, qv) = (host_vec(img, "x").unwrap(), host_vec(q, "q").unwrap());
            let mut sc = GateScratch::default();
            // One thread (`Attention::sample`), and split over 2 and 3 on
            // the team (`sample_phased`).
            for (s, threads) in (0..n).flat_map(|s| [1, 2, 3].map(|t| (s, t))) {
                let mut got = vec![0.0; p];
                let x = &xv[s * a * h * w..(s + 1) * a * h * w];
                packed.forward(
                    Isa::detect(),
                    x,
                    h * w,
                    &qv[s * b..(s + 1) * b],
                    &mut got,
                    &mut sc,
                    threads,
                );
                let row = &want[s * p..(s + 1) * p];
                for (g, r) in got.iter().zip(row) {
                    assert!(
                        (g - r).abs() < 1e-5,
                        "{threads} threads: {got:?} vs {row:?}"
                    );
                }
                assert_eq!(top_k_row(&got, p / 2), top_k_row(row, p / 2));
            }
        }
    }
}
