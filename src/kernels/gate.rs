//! A [`GateController`] on host slices, one sample at a time (the same
//! equations as [`crate::moe::gate`]). On the Burn path the controllers cost
//! about as much as the sparse blocks of the VQA network: the attention's
//! D*A*C multiply-adds run as one GEMM here, and its D*C tanh as a
//! vectorised rational approximation instead of libm calls.

use super::block::host_vec;
use super::conv3x3::Isa;
use crate::error::{MoeError, Result as MoeResult};
use crate::fused::attention::tanh_fast;
use crate::fused::matmul::{View, sgemm};
use crate::moe::GateController;
use rayon::prelude::*;

/// scores[d] += w * tanh(h[d] + a) for one hidden unit (row `h`).
#[inline(always)]
fn score_row_impl<const FMA: bool>(h: &[f32], a: f32, w: f32, scores: &mut [f32]) {
    for (s, &v) in scores.iter_mut().zip(h) {
        *s += w * tanh_fast(v + a);
    }
}

super::conv3x3::multiversion! {
    /// One hidden unit's contribution to the attention scores.
    fn score_row => score_row_impl(h: &[f32], a: f32, w: f32, scores: &mut [f32])
}

/// out[a] = scale * sum_d x[a, d] * p[d], with 16 partial sums per row so
/// that the reduction vectorises.
#[inline(always)]
fn attend_impl<const FMA: bool>(x: &[f32], p: &[f32], scale: f32, out: &mut [f32]) {
    let d = p.len();
    for (o, row) in out.iter_mut().zip(x.chunks_exact(d)) {
        let mut acc = [0.0f32; 16];
        let (rb, rt) = row.split_at(d / 16 * 16);
        let (pb, pt) = p.split_at(d / 16 * 16);
        for (r, q) in rb.chunks_exact(16).zip(pb.chunks_exact(16)) {
            for i in 0..16 {
                acc[i] += r[i] * q[i];
            }
        }
        let tail: f32 = rt.iter().zip(pt).map(|(u, v)| u * v).sum();
        *o = (acc.iter().sum::<f32>() + tail) * scale;
    }
}

super::conv3x3::multiversion! {
    /// The attention-weighted image vector.
    fn attend => attend_impl(x: &[f32], p: &[f32], scale: f32, out: &mut [f32])
}

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
    /// W_IA^T [C, A]: row-major, so that each thread's GEMM takes a
    /// contiguous band of hidden units (and gemm packs it faster than the
    /// transposed view of W_IA).
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
        // Hidden [C, D] = W_IA^T x. With several threads each takes a band
        // of hidden units: gemm's own split of this shape (64 rows) gained
        // nothing, and the controllers were a fifth of a sparse ResNeXt-101.
        let hid = grow(&mut sc.hid, c * d);
        let band = |rows: &mut [f32], c0: usize| {
            let m = rows.len() / d;
            let lhs = View::rows(&self.w_ia_t[c0 * a..], a);
            sgemm(m, d, a, rows, d, lhs, View::rows(x, d), false, 1);
        };
        if threads > 1 && c >= 2 * 8 && d > 0 {
            let per = c.div_ceil(threads).next_multiple_of(8).min(c);
            hid.par_chunks_mut(per * d)
                .enumerate()
                .for_each(|(i, rows)| band(rows, i * per));
        } else if d > 0 {
            band(hid, 0);
        }
        // Scores over the regions, then their softmax.
        let scores = grow(&mut sc.scores, d);
        scores.fill(self.b_p);
        for ((row, &qv), &wv) in hid.chunks_exact(d).zip(qa.iter()).zip(&self.w_p) {
            score_row(isa, row, qv, wv, scores);
        }
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - m).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        // Attended image vector [A] = x . softmax.
        let att = grow(&mut sc.att, a);
        attend(isa, x, scores, inv, att);
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
            for s in 0..n {
                let mut got = vec![0.0; p];
                let x = &xv[s * a * h * w..(s + 1) * a * h * w];
                packed.forward(
                    Isa::detect(),
                    x,
                    h * w,
                    &qv[s * b..(s + 1) * b],
                    &mut got,
                    &mut sc,
                    1,
                );
                let row = &want[s * p..(s + 1) * p];
                for (g, r) in got.iter().zip(row) {
                    assert!((g - r).abs() < 1e-5, "{got:?} vs {row:?}");
                }
                assert_eq!(top_k_row(&got, p / 2), top_k_row(row, p / 2));
            }
        }
    }
}
