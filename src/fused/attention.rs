//! The gate controller's soft attention over the image (the paper's
//! appendix B) as one training op:
//!
//! ```text
//! H   = tanh(W_IA^T X + qa 1^T)       [C, D] per sample, X is [A, D]
//! s   = w_P^T H + b_P                 [D]
//! p   = softmax(s)                    over the D regions
//! att = X p                           [A]
//! ```
//!
//! where `qa = W_QA v_Q + b_A` comes in as a tensor (it is cheap, [N, C]).
//!
//! Why: in Burn's ops the attention transposes the map to [N, D, A], runs
//! three small matmuls and five element-wise passes with their backward,
//! and in a CLEVR training step at 75x75 the three controllers took about
//! 150 ms, more than the blocks they gate. Here each sample is three GEMMs
//! (`W^T X`; in backward `X dPre^T` and `W dPre`) on the NCHW map as it is,
//! with the element-wise work done in the GEMMs' wake, samples in parallel.
//! `dW_IA`, `dw_P` and `db_P` are summed over samples in order, so a run
//! gives the same numbers every time.
//!
//! tanh is [`tanh_fast`] (a rational approximation within 2e-6 of libm) so
//! that its loop vectorises; the gradient through it uses `1 - H^2` of the
//! stored `H`. Routing as the module docs of [`crate::fused`] say.

use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::activation::{softmax, tanh};
use rayon::prelude::*;

use super::isa::{Isa, multiversion};
use super::matmul::{View, sgemm, sgemm_ptr};
use super::{Route, route};

/// tanh as Eigen's float rational approximation (odd 13/6 polynomial
/// ratio on [-7.9, 7.9], saturating outside): within a few ulp of libm,
/// branch-free, so loops over it vectorise.
#[inline(always)]
fn tanh_fast(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A1: f32 = 4.893_524_6e-3;
    const A3: f32 = 6.372_619_3e-4;
    const A5: f32 = 1.485_722_4e-5;
    const A7: f32 = 5.122_297e-8;
    const A9: f32 = -8.604_672e-11;
    const A11: f32 = 2.000_188e-13;
    const A13: f32 = -2.760_768_5e-16;
    const B0: f32 = 4.893_525e-3;
    const B2: f32 = 2.268_434_6e-3;
    const B4: f32 = 1.185_347_1e-4;
    const B6: f32 = 1.198_258_4e-6;
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let mut p = A13;
    p = p * x2 + A11;
    p = p * x2 + A9;
    p = p * x2 + A7;
    p = p * x2 + A5;
    p = p * x2 + A3;
    p = p * x2 + A1;
    p *= x;
    let mut q = B6;
    q = q * x2 + B4;
    q = q * x2 + B2;
    q = q * x2 + B0;
    p / q
}

/// Sizes: `n` samples, `a` image channels, `c` hidden units, `d` regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttShape {
    pub n: usize,
    pub a: usize,
    pub c: usize,
    pub d: usize,
}

/// The forward pass's output and what its backward pass needs.
#[derive(Debug, Clone)]
pub(crate) struct AttForward {
    /// att [n, a].
    pub att: Vec<f32>,
    /// H [n, c, d].
    pub h: Vec<f32>,
    /// p [n, d].
    pub p: Vec<f32>,
}

/// Forward over `x` [n, a, d], `qa` [n, c], `w` = W_IA [a, c], `wp` [c].
pub(crate) fn attend_forward(
    x: &[f32],
    qa: &[f32],
    w: &[f32],
    wp: &[f32],
    bp: f32,
    s: AttShape,
) -> AttForward {
    let AttShape { n, a, c, d } = s;
    assert!(
        x.len() == n * a * d && qa.len() == n * c && w.len() == a * c && wp.len() == c,
        "attend: bad sizes"
    );
    let mut out = AttForward {
        att: vec![0.0; n * a],
        h: vec![0.0; n * c * d],
        p: vec![0.0; n * d],
    };
    if n * a * c * d == 0 {
        return out;
    }
    let att_w = Attention {
        w_t: View {
            data: w,
            rs: 1,
            cs: c,
        },
        wp,
        bp,
        isa: Isa::detect(),
    };
    out.att
        .par_chunks_mut(a)
        .zip(out.h.par_chunks_mut(c * d))
        .zip(out.p.par_chunks_mut(d))
        .enumerate()
        .for_each(|(i, ((att, h), p))| {
            let xs = &x[i * a * d..(i + 1) * a * d];
            att_w.sample(xs, &qa[i * c..(i + 1) * c], h, p, att);
        });
    out
}

/// A controller's attention weights, for [`Attention::sample`].
#[derive(Clone, Copy)]
pub(crate) struct Attention<'a> {
    /// W_IA^T as a [C, A] view (of W_IA [A, C] read transposed, or of a
    /// row-major copy).
    pub w_t: View<'a>,
    /// w_P [C] and b_P.
    pub wp: &'a [f32],
    pub bp: f32,
    pub isa: Isa,
}

impl Attention<'_> {
    /// One sample, `x` [A, D] with D = `p.len()` regions and `qa` [C]:
    /// `h` [C, D] = tanh(W_IA^T x + qa 1^T), `p` [D] = softmax(w_P^T h + b_P)
    /// and `att` [A] = x p, on the calling thread. This is the whole forward
    /// pass of the training op (samples in parallel) and the attention of
    /// the fast inference path on one thread (`kernels::gate`; split over
    /// threads, it runs [`Self::sample_phased`]).
    pub(crate) fn sample(
        &self,
        x: &[f32],
        qa: &[f32],
        h: &mut [f32],
        p: &mut [f32],
        att: &mut [f32],
    ) {
        let (a, c, d) = (att.len(), qa.len(), p.len());
        if d == 0 {
            return;
        }
        sgemm(
            c,
            d,
            a,
            &mut h[..c * d],
            d,
            self.w_t,
            View::rows(x, d),
            false,
            1,
        );
        p.fill(self.bp);
        for ((row, &q), &wv) in h.chunks_exact_mut(d).zip(qa).zip(self.wp) {
            hidden_row(self.isa, row, q, wv, p);
        }
        softmax_in_place(p);
        weighted_rows(self.isa, x, p, att);
    }
}

/// Items of one phase of [`Attention::sample_phased`]: their count and what
/// runs item `i` (items of a phase are independent; a phase starts when
/// the one before it has finished).
pub(crate) type AttPhase<'a> = (usize, &'a (dyn Fn(usize) + Sync));

/// A pointer to a phase's buffer, which its items write in disjoint parts.
#[derive(Clone, Copy)]
struct Out(*mut f32);

// SAFETY: items of a phase write disjoint elements (see `sample_phased`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so that closures capture the whole `Out`).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

impl Attention<'_> {
    /// [`Self::sample`] cut into three phases of independent items, for a
    /// caller that spreads each phase over its threads (`run`): the hidden
    /// layer and the scores by blocks of `cols` regions (each item one GEMM
    /// on its columns, then tanh and its regions' scores while they are in
    /// cache), the softmax, and the attended vector by four blocks of
    /// channels (its A*D multiply-adds are a small share). Each score sums
    /// over the hidden units in the same order as `sample`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sample_phased(
        &self,
        x: &[f32],
        qa: &[f32],
        h: &mut [f32],
        p: &mut [f32],
        att: &mut [f32],
        cols: usize,
        run: &dyn Fn(&[AttPhase<'_>]),
    ) {
        let (a, c, d) = (att.len(), qa.len(), p.len());
        assert!(
            x.len() >= a * d && h.len() >= c * d && self.wp.len() >= c,
            "sample_phased: bad sizes"
        );
        if d == 0 || a == 0 {
            // Nothing to split (no regions, or a map without channels).
            return self.sample(x, qa, h, p, att);
        }
        let cols = cols.clamp(1, d);
        let rows = a.div_ceil(4).max(1);
        let (hp, pp, ap) = (
            Out(h.as_mut_ptr()),
            Out(p.as_mut_ptr()),
            Out(att.as_mut_ptr()),
        );
        let hidden = |i: usize| {
            let (j0, n) = (i * cols, cols.min(d - i * cols));
            // SAFETY: item i writes columns j0..j0 + n of h's C rows and
            // p[j0..j0 + n], its own; h holds C*D values, p D.
            unsafe {
                sgemm_ptr(
                    c,
                    n,
                    a,
                    hp.at(j0),
                    c * d - j0,
                    d,
                    self.w_t,
                    View::rows(&x[j0..], d),
                    false,
                    1,
                )
            };
            // SAFETY: as above.
            let p_cols = unsafe { std::slice::from_raw_parts_mut(pp.at(j0), n) };
            p_cols.fill(self.bp);
            for (r, (&q, &wv)) in qa.iter().zip(self.wp).enumerate() {
                // SAFETY: row r's columns j0..j0 + n, this item's own.
                let row = unsafe { std::slice::from_raw_parts_mut(hp.at(r * d + j0), n) };
                hidden_row(self.isa, row, q, wv, p_cols);
            }
        };
        let softmax = |_: usize| {
            // SAFETY: the only item of its phase; phase 1 is over.
            softmax_in_place(unsafe { std::slice::from_raw_parts_mut(pp.at(0), d) });
        };
        let attend = |i: usize| {
            let (r0, m) = (i * rows, rows.min(a - i * rows));
            // SAFETY: p is only read from phase 3 on; att[r0..r0 + m] is
            // this item's own.
            let (p, out) = unsafe {
                (
                    std::slice::from_raw_parts(pp.at(0), d),
                    std::slice::from_raw_parts_mut(ap.at(r0), m),
                )
            };
            weighted_rows(self.isa, &x[r0 * d..(r0 + m) * d], p, out);
        };
        run(&[
            (d.div_ceil(cols), &hidden),
            (1, &softmax),
            (a.div_ceil(rows), &attend),
        ]);
    }
}

/// `p` = softmax(`p`), in place.
fn softmax_in_place(p: &mut [f32]) {
    let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in p.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|v| *v *= inv);
}

/// One hidden unit: `h = tanh(h + q)`, then `p += w h` (its share of the
/// scores).
#[inline(always)]
fn hidden_row_impl<const FMA: bool>(h: &mut [f32], q: f32, w: f32, p: &mut [f32]) {
    for (hv, sv) in h.iter_mut().zip(p.iter_mut()) {
        *hv = tanh_fast(*hv + q);
        *sv += w * *hv;
    }
}

multiversion! {
    fn hidden_row => hidden_row_impl(h: &mut [f32], q: f32, w: f32, p: &mut [f32])
}

/// `att[i] = x[i, :] . p` over the rows of `x`.
#[inline(always)]
fn weighted_rows_impl<const FMA: bool>(x: &[f32], p: &[f32], att: &mut [f32]) {
    for (o, row) in att.iter_mut().zip(x.chunks_exact(p.len())) {
        *o = dot(row, p);
    }
}

multiversion! {
    fn weighted_rows => weighted_rows_impl(x: &[f32], p: &[f32], att: &mut [f32])
}

/// Dot product in eight lanes (so that it vectorises).
#[inline(always)]
fn dot(u: &[f32], v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (cu, cv) = (u.chunks_exact(8), v.chunks_exact(8));
    let tail: f32 = cu
        .remainder()
        .iter()
        .zip(cv.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in cu.zip(cv) {
        for j in 0..8 {
            acc[j] += a[j] * b[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Gradients of [`attend_forward`].
#[derive(Debug, Clone)]
pub(crate) struct AttGrads {
    /// dX [n, a, d] (empty when not asked for).
    pub dx: Vec<f32>,
    /// dqa [n, c].
    pub dqa: Vec<f32>,
    /// dW_IA [a, c].
    pub dw: Vec<f32>,
    /// dw_P [c].
    pub dwp: Vec<f32>,
    /// db_P.
    pub dbp: f32,
}

/// Backward of [`attend_forward`] from `datt` [n, a]:
/// `dp = X^T datt`, `ds = p (dp - p.dp)`, `dw_P = H ds`, `db_P = sum ds`,
/// `dPre = w_P ds^T (1 - H^2)`, `dqa = dPre 1`, `dW_IA = sum_n X dPre^T` and
/// `dX = datt p^T + W_IA dPre`.
pub(crate) fn attend_backward(
    x: &[f32],
    w: &[f32],
    wp: &[f32],
    fwd: &AttForward,
    datt: &[f32],
    s: AttShape,
    want_dx: bool,
) -> AttGrads {
    let AttShape { n, a, c, d } = s;
    assert!(
        x.len() == n * a * d && datt.len() == n * a && fwd.h.len() == n * c * d,
        "attend backward: bad sizes"
    );
    let mut dx = vec![0.0f32; if want_dx { n * a * d } else { 0 }];
    let mut dqa = vec![0.0f32; n * c];
    let per_sample = |i: usize, dx: Option<&mut [f32]>, dqa: &mut [f32]| {
        let xs = &x[i * a * d..(i + 1) * a * d];
        let (h, p) = (
            &fwd.h[i * c * d..(i + 1) * c * d],
            &fwd.p[i * d..(i + 1) * d],
        );
        let g = &datt[i * a..(i + 1) * a];
        // dp = X^T datt, accumulated row by row.
        let mut ds = vec![0.0f32; d];
        for (row, &gv) in xs.chunks_exact(d).zip(g) {
            for (o, &xv) in ds.iter_mut().zip(row) {
                *o += gv * xv;
            }
        }
        let pdp = dot(p, &ds);
        for (o, &pv) in ds.iter_mut().zip(p) {
            *o = pv * (*o - pdp);
        }
        let dbp: f32 = ds.iter().sum();
        let mut dwp = vec![0.0f32; c];
        let mut dpre = vec![0.0f32; c * d];
        for (((row, drow), &wv), (dw, dq)) in h
            .chunks_exact(d)
            .zip(dpre.chunks_exact_mut(d))
            .zip(wp)
            .zip(dwp.iter_mut().zip(dqa.iter_mut()))
        {
            *dw = dot(row, &ds);
            let mut sum = 0.0f32;
            for ((o, &hv), &sv) in drow.iter_mut().zip(row).zip(&ds) {
                *o = wv * sv * (1.0 - hv * hv);
                sum += *o;
            }
            *dq = sum;
        }
        // dW_IA of this sample: X [a, d] dPre^T [d, c].
        let mut dw = vec![0.0f32; a * c];
        let dpre_t = View {
            data: &dpre,
            rs: 1,
            cs: d,
        };
        sgemm(a, c, d, &mut dw, c, View::rows(xs, d), dpre_t, false, 1);
        if let Some(dx) = dx {
            // dX = W_IA [a, c] dPre [c, d] + datt p^T.
            sgemm(
                a,
                d,
                c,
                dx,
                d,
                View::rows(w, c),
                View::rows(&dpre, d),
                false,
                1,
            );
            for (row, &gv) in dx.chunks_exact_mut(d).zip(g) {
                for (o, &pv) in row.iter_mut().zip(p) {
                    *o += gv * pv;
                }
            }
        }
        (dw, dwp, dbp)
    };
    let parts: Vec<(Vec<f32>, Vec<f32>, f32)> = if n * a * c * d == 0 {
        Vec::new()
    } else if want_dx {
        dx.par_chunks_mut(a * d)
            .zip(dqa.par_chunks_mut(c))
            .enumerate()
            .map(|(i, (dx, dqa))| per_sample(i, Some(dx), dqa))
            .collect()
    } else {
        dqa.par_chunks_mut(c)
            .enumerate()
            .map(|(i, dqa)| per_sample(i, None, dqa))
            .collect()
    };
    // Parameter gradients summed over samples in order: deterministic.
    let mut dw = vec![0.0f32; a * c];
    let mut dwp = vec![0.0f32; c];
    let mut dbp = 0.0f32;
    for (pw, pwp, pbp) in &parts {
        dw.iter_mut().zip(pw).for_each(|(o, v)| *o += v);
        dwp.iter_mut().zip(pwp).for_each(|(o, v)| *o += v);
        dbp += pbp;
    }
    AttGrads {
        dx,
        dqa,
        dw,
        dwp,
        dbp,
    }
}

/// The attended image vector [N, A] of `image` [N, A, H, W], given the
/// question's term of the hidden layer `qa` [N, C], W_IA (`image_att`, no
/// bias) and w_P, b_P (`att_score`, C -> 1).
pub fn attend(
    image: Tensor<4>,
    qa: Tensor<2>,
    image_att: &Linear,
    att_score: &Linear,
) -> Tensor<2> {
    let mut dtypes = vec![
        image.dtype(),
        qa.dtype(),
        image_att.weight.val().dtype(),
        att_score.weight.val().dtype(),
    ];
    dtypes.extend(att_score.bias.as_ref().map(|b| b.val().dtype()));
    let fits = image_att.bias.is_none();
    match route(&image.device(), &dtypes) {
        #[cfg(feature = "flex")]
        Route::Flex if fits => flex::attend(image.clone(), qa.clone(), image_att, att_score)
            .unwrap_or_else(|| attend_reference(image, qa, image_att, att_score)),
        #[cfg(feature = "flex")]
        Route::FlexAutodiff if fits => {
            flex::attend_autodiff(image.clone(), qa.clone(), image_att, att_score)
                .unwrap_or_else(|| attend_reference(image, qa, image_att, att_score))
        }
        _ => attend_reference(image, qa, image_att, att_score),
    }
}

/// The same maths as plain Burn ops (any device; the reference).
pub fn attend_reference(
    image: Tensor<4>,
    qa: Tensor<2>,
    image_att: &Linear,
    att_score: &Linear,
) -> Tensor<2> {
    let [n, a, h, w] = image.dims();
    let regions = image.reshape([n, a, h * w]).swap_dims(1, 2); // [N, D, A]
    let hidden = image_att.forward(regions.clone()) + qa.unsqueeze_dim::<3>(1);
    let scores = att_score.forward(tanh(hidden)); // [N, D, 1]
    let p = softmax(scores, 1).swap_dims(1, 2); // [N, 1, D]
    p.matmul(regions).reshape([n, a])
}

#[cfg(feature = "flex")]
mod flex {
    use std::sync::Arc;

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::Linear;
    use burn::tensor::Tensor;

    use super::super::flex::{dims, host, record, tensor};
    use super::{AttForward, AttShape, attend_backward, attend_forward};

    type Ad = Autodiff<Flex>;

    /// The shape, or `None` when the weights do not fit the image.
    fn shape(image: &[usize], qa: &[usize], w: &[usize], wp: &[usize]) -> Option<AttShape> {
        let (&[n, a, h, ww], &[nq, c], &[a2, c2], &[c3, 1]) = (image, qa, w, wp) else {
            return None;
        };
        (nq == n && a2 == a && c2 == c && c3 == c).then_some(AttShape { n, a, c, d: h * ww })
    }

    /// The shape and the forward pass over the host values.
    fn inputs(
        image: &FlexTensor,
        qa: &FlexTensor,
        w: &FlexTensor,
        wp: &FlexTensor,
        bp: Option<&FlexTensor>,
    ) -> Option<(AttShape, AttForward)> {
        let s = shape(&dims(image), &dims(qa), &dims(w), &dims(wp))?;
        let bp = match bp {
            Some(b) if dims(b) == [1] => host(b)?[0],
            Some(_) => return None,
            None => 0.0,
        };
        let f = attend_forward(&host(image)?, &host(qa)?, &host(w)?, &host(wp)?, bp, s);
        Some((s, f))
    }

    pub(super) fn attend(
        image: Tensor<4>,
        qa: Tensor<2>,
        image_att: &Linear,
        att_score: &Linear,
    ) -> Option<Tensor<2>> {
        let image = image.try_into_primitive::<Flex>().ok()?;
        let qa = qa.try_into_primitive::<Flex>().ok()?;
        let w = image_att.weight.val().try_into_primitive::<Flex>().ok()?;
        let wp = att_score.weight.val().try_into_primitive::<Flex>().ok()?;
        let bp = match &att_score.bias {
            Some(b) => Some(b.val().try_into_primitive::<Flex>().ok()?),
            None => None,
        };
        let (s, f) = inputs(&image, &qa, &w, &wp, bp.as_ref())?;
        Some(Tensor::from_primitive::<Flex>(tensor(
            f.att,
            vec![s.n, s.a],
        )))
    }

    /// Parents: image, qa, W_IA, W_P and b_P when `N == 5`.
    #[derive(Debug)]
    struct AttendBackward<const N: usize>;

    #[derive(Debug, Clone)]
    struct AttendState {
        x: FlexTensor,
        w: FlexTensor,
        wp: FlexTensor,
        fwd: Arc<AttForward>,
        shape: AttShape,
        dims: Vec<usize>,
    }

    impl<const N: usize> Backward<Flex, N> for AttendBackward<N> {
        type State = AttendState;

        fn backward(
            self,
            ops: Ops<Self::State, N>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let mut parents = ops.parents.into_iter();
            let [px, pq, pw, pwp, pbp] = [(); 5].map(|_| parents.next().flatten());
            let datt = grads.consume::<Flex>(&ops.node);
            let st = ops.state;
            let (Some(x), Some(w), Some(wp), Some(datt)) =
                (host(&st.x), host(&st.w), host(&st.wp), host(&datt))
            else {
                unreachable!("attend: f32 tensors were checked in the forward pass")
            };
            let s = st.shape;
            let g = attend_backward(&x, &w, &wp, &st.fwd, &datt, s, px.is_some());
            if let Some(node) = px {
                grads.register::<Flex>(node.id, tensor(g.dx, st.dims));
            }
            if let Some(node) = pq {
                grads.register::<Flex>(node.id, tensor(g.dqa, vec![s.n, s.c]));
            }
            if let Some(node) = pw {
                grads.register::<Flex>(node.id, tensor(g.dw, vec![s.a, s.c]));
            }
            if let Some(node) = pwp {
                grads.register::<Flex>(node.id, tensor(g.dwp, vec![s.c, 1]));
            }
            if let Some(node) = pbp {
                grads.register::<Flex>(node.id, tensor(vec![g.dbp], vec![1]));
            }
        }
    }

    pub(super) fn attend_autodiff(
        image: Tensor<4>,
        qa: Tensor<2>,
        image_att: &Linear,
        att_score: &Linear,
    ) -> Option<Tensor<2>> {
        let dims = image.dims().to_vec();
        let image = image.try_into_primitive::<Ad>().ok()?;
        let qa = qa.try_into_primitive::<Ad>().ok()?;
        let w = image_att.weight.val().try_into_primitive::<Ad>().ok()?;
        let wp = att_score.weight.val().try_into_primitive::<Ad>().ok()?;
        let bp = match &att_score.bias {
            Some(b) => Some(b.val().try_into_primitive::<Ad>().ok()?),
            None => None,
        };
        let (s, f) = inputs(
            image.primitive(),
            qa.primitive(),
            w.primitive(),
            wp.primitive(),
            bp.as_ref().map(|b| b.primitive()),
        )?;
        let out = tensor(f.att.clone(), vec![s.n, s.a]);
        let state = AttendState {
            x: image.primitive().clone(),
            w: w.primitive().clone(),
            wp: wp.primitive().clone(),
            fwd: Arc::new(f),
            shape: s,
            dims,
        };
        let nodes = [image.node(), qa.node(), w.node(), wp.node()];
        Some(match bp {
            Some(bp) => {
                let [a, b, c, d] = nodes;
                record(AttendBackward::<5>, [a, b, c, d, bp.node()], state, out)
            }
            None => record(AttendBackward::<4>, nodes, state, out),
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution};

    use super::*;
    use crate::fused::testing::{assert_close, flat};

    #[test]
    fn tanh_fast_is_within_a_few_ulp() {
        let mut worst = 0.0f32;
        for i in -20000..=20000 {
            let x = i as f32 * 1e-3;
            worst = worst.max((tanh_fast(x) - x.tanh()).abs());
        }
        assert!(worst < 2e-6, "max abs error {worst}");
        assert_eq!(tanh_fast(100.0), tanh_fast(7.905_311));
        assert!(tanh_fast(f32::INFINITY) <= 1.0);
    }

    /// The phased sample (any block of columns, its phases run here in
    /// order with items in reverse) gives `sample`'s h, p and att.
    #[test]
    fn phased_sample_matches_sample() {
        let val = |i: usize, m: usize| ((i * 7919 % m) as f32 / m as f32 - 0.5) * 0.8;
        let run = |phases: &[AttPhase<'_>]| {
            for &(n, f) in phases {
                (0..n).rev().for_each(f);
            }
        };
        for (a, c, d, cols) in [
            (1, 1, 1, 16),
            (0, 4, 40, 8),
            (6, 8, 5, 2),
            (24, 64, 1024, 256),
            (64, 64, 49, 16),
            (33, 16, 100, 7),
            (5, 3, 40, 64),
        ] {
            let x: Vec<f32> = (0..a * d).map(|i| val(i, 97)).collect();
            let w: Vec<f32> = (0..c * a).map(|i| val(i, 89)).collect();
            let qa: Vec<f32> = (0..c).map(|i| val(i, 13)).collect();
            let wp: Vec<f32> = (0..c).map(|i| val(i + 5, 11)).collect();
            let att_w = Attention {
                w_t: View::rows(&w, a),
                wp: &wp,
                bp: 0.3,
                isa: Isa::detect(),
            };
            let (mut h1, mut p1, mut a1) = (vec![0.0; c * d], vec![0.0; d], vec![0.0; a]);
            att_w.sample(&x, &qa, &mut h1, &mut p1, &mut a1);
            let (mut h2, mut p2, mut a2) = (vec![9.0; c * d], vec![9.0; d], vec![9.0; a]);
            att_w.sample_phased(&x, &qa, &mut h2, &mut p2, &mut a2, cols, &run);
            for (got, want, what) in [(&h2, &h1, "h"), (&p2, &p1, "p"), (&a2, &a1, "att")] {
                for (g, w) in got.iter().zip(want.iter()) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{what} A {a} C {c} D {d} cols {cols}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// (image_att, att_score) with a non-zero b_P.
    fn layers(a: usize, c: usize, device: &Device) -> (Linear, Linear) {
        let ia = LinearConfig::new(a, c).with_bias(false).init(device);
        let sc = LinearConfig::new(c, 1).init(device);
        (ia, sc)
    }

    #[test]
    fn values_and_gradients_match_burn_reference() {
        let device = Device::default().autodiff();
        // (n, a, c, h, w): batch 1, one region, odd sizes, a CLEVR block.
        for (t, &(n, a, c, h, w)) in [
            (1, 3, 4, 2, 3),
            (2, 5, 3, 1, 1),
            (3, 6, 7, 5, 4),
            (2, 64, 64, 19, 19),
        ]
        .iter()
        .enumerate()
        {
            device.seed(70 + t as u64);
            let what = format!("{:?}", (n, a, c, h, w));
            let (ia, sc) = layers(a, c, &device);
            let x = Tensor::<4>::random([n, a, h, w], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let qa =
                Tensor::<2>::random([n, c], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let wts = Tensor::<2>::random([n, a], Distribution::Normal(0.0, 1.0), &device);
            let fast = attend(x.clone(), qa.clone(), &ia, &sc);
            let reference = attend_reference(x.clone(), qa.clone(), &ia, &sc);
            let gf = (fast.clone() * wts.clone()).sum().backward();
            let gr = (reference.clone() * wts).sum().backward();
            assert_close(&format!("att {what}"), &flat(fast), &flat(reference), 1e-5);
            let g4 = |t: &Tensor<4>, g| flat(t.grad(g).expect("gradient"));
            let g2 = |t: &Tensor<2>, g| flat(t.grad(g).expect("gradient"));
            assert_close(&format!("dx {what}"), &g4(&x, &gf), &g4(&x, &gr), 1e-4);
            assert_close(&format!("dqa {what}"), &g2(&qa, &gf), &g2(&qa, &gr), 1e-4);
            let (wi, wp) = (ia.weight.val(), sc.weight.val());
            assert_close(&format!("dW_IA {what}"), &g2(&wi, &gf), &g2(&wi, &gr), 1e-4);
            assert_close(&format!("dw_P {what}"), &g2(&wp, &gf), &g2(&wp, &gr), 1e-4);
            // b_P shifts every score alike: its gradient is zero up to rounding.
            let bp = sc.bias.as_ref().expect("b_P").val();
            let (fb, rb) = (
                flat(bp.grad(&gf).expect("db_P")),
                flat(bp.grad(&gr).expect("db_P")),
            );
            assert!(
                (fb[0] - rb[0]).abs() < 1e-5,
                "db_P {what}: {fb:?} against {rb:?}"
            );
        }
    }

    #[test]
    fn inference_kernel_matches_burn_reference() {
        let device = Device::default();
        device.seed(3);
        let (ia, sc) = layers(8, 5, &device);
        let x = Tensor::<4>::random([3, 8, 4, 6], Distribution::Normal(0.0, 1.0), &device);
        let qa = Tensor::<2>::random([3, 5], Distribution::Normal(0.0, 1.0), &device);
        let fast = flat(attend(x.clone(), qa.clone(), &ia, &sc));
        assert_close("att", &fast, &flat(attend_reference(x, qa, &ia, &sc)), 1e-5);
    }

    #[test]
    fn repeated_backward_passes_are_bit_identical() {
        let s = AttShape {
            n: 9,
            a: 6,
            c: 5,
            d: 40,
        };
        let v =
            |len: usize, k: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * k).sin()).collect() };
        let (x, qa, w, wp) = (
            v(s.n * s.a * s.d, 0.37),
            v(s.n * s.c, 1.3),
            v(s.a * s.c, 0.7),
            v(s.c, 2.1),
        );
        let f = attend_forward(&x, &qa, &w, &wp, 0.1, s);
        let datt = v(s.n * s.a, 0.9);
        let first = attend_backward(&x, &w, &wp, &f, &datt, s, true);
        for _ in 0..3 {
            let again = attend_backward(&x, &w, &wp, &f, &datt, s, true);
            assert_eq!(first.dw, again.dw);
            assert_eq!(first.dx, again.dx);
            assert_eq!(first.dwp, again.dwp);
        }
    }
}
