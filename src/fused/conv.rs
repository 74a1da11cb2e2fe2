//! 2-D convolution as a training op: im2col + GEMM forward, and a backward
//! pass that computes only the gradients a step needs (the image never
//! wants one, so the stem skips its `dx`).
//!
//! Why: on Burn's Flex backend the CNN's convolutions were the slow part of
//! a Relation Network training step. At 75x75, batch 64, the stem conv
//! (3 -> 64, 3x3, stride 2; 2.5 M multiply-adds per image) took 72-104 ms
//! forward and backward, and the blocks' reduce 1x1 + grouped 3x3 (paper
//! section 2: one group per path) about 90 ms, at 1-10 GFLOP/s. Here the
//! samples run in parallel, each group's product on its own: a `gemm` call
//! (the 1x1 convolutions multiply the map in place), or for groups of a few
//! channels (the paths) rows of multiply-adds, where `gemm`'s per-call cost
//! dominated. The weight gradient is summed over fixed chunks of samples in
//! a fixed order, so the same seed gives the same bits. At 75x75, batch 64,
//! a training step went from 571-644 ms to 438-450 (`moevqa bench train
//! --image-size 75`).
//!
//! Routing as the module docs of [`crate::fused`] say; without autodiff,
//! and for what the op does not handle (dilation, uneven padding or
//! stride, non-square kernels, other dtypes), Burn's own `Conv2d` runs.

use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::isa::{Isa, madd, multiversion};
use super::matmul::{View, sgemm};
use super::maxpool::{out_hw, symmetric};
use super::{Route, route};

/// Samples whose weight gradients one task sums before the partial sums
/// are added in order (fixed, so the result does not depend on threads).
const DW_CHUNK: usize = 4;

/// A convolution the op handles: square kernel `k`, stride `s`, symmetric
/// padding `p`, `groups` groups, no dilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvShape {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub s: usize,
    pub p: usize,
    pub groups: usize,
    pub h2: usize,
    pub w2: usize,
}

impl ConvShape {
    /// The shape of `conv` over an input of `dims`, if the op handles it.
    fn of(conv: &Conv2d, dims: [usize; 4]) -> Option<ConvShape> {
        let [n, cin, h, w] = dims;
        let [cout, cin_g, k, k2] = conv.weight.val().dims();
        let [s, s2] = conv.stride;
        let groups = conv.groups;
        let p = symmetric(&conv.padding)?;
        let fits = k == k2
            && s == s2
            && s > 0
            && conv.dilation == [1, 1]
            && groups > 0
            && cin == cin_g * groups
            && cout % groups == 0
            && n > 0;
        let (h2, w2) = out_hw(h, w, k, s, p)?;
        (fits && h2 * w2 > 0).then_some(ConvShape {
            n,
            cin,
            h,
            w,
            cout,
            k,
            s,
            p,
            groups,
            h2,
            w2,
        })
    }

    fn cin_g(&self) -> usize {
        self.cin / self.groups
    }
    fn cout_g(&self) -> usize {
        self.cout / self.groups
    }
    /// Rows of a group's column matrix (its weight's row length).
    fn kk(&self) -> usize {
        self.cin_g() * self.k * self.k
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn hw2(&self) -> usize {
        self.h2 * self.w2
    }
    /// A 1x1, stride-1, unpadded conv multiplies the map as it lies.
    fn in_place(&self) -> bool {
        self.k == 1 && self.s == 1 && self.p == 0
    }
}

/// `dst[i] = src[i * S]`; `src` holds `(dst.len() - 1) * S + 1` values.
#[inline(always)]
pub(crate) fn strided_copy<const S: usize>(src: &[f32], dst: &mut [f32]) {
    let n = dst.len();
    if n == 0 || src.len() < (n - 1) * S + 1 {
        return;
    }
    let (body, last) = dst.split_at_mut(n - 1);
    for (o, c) in body.iter_mut().zip(src.chunks_exact(S)) {
        *o = c[0];
    }
    last[0] = src[(n - 1) * S];
}

/// The outputs x in `lo..hi` (within 0..n) whose tap `x*s + off` lies in
/// a row of `w` inputs.
#[inline(always)]
fn inside(n: usize, w: usize, s: usize, off: isize) -> (usize, usize) {
    let (w, n, si) = (w as isize, n as isize, s as isize);
    let lo = if off >= 0 { 0 } else { (-off + si - 1) / si }.min(n);
    let hi = if w - off <= 0 {
        0
    } else {
        ((w - off - 1) / si + 1).min(n)
    }
    .max(lo);
    (lo as usize, hi as usize)
}

/// Copies input row `src` sampled at `x*s + kx - p` (x in 0..dst.len()),
/// zeros outside the row.
#[inline(always)]
fn sample_row(src: &[f32], s: usize, off: isize, dst: &mut [f32]) {
    let si = s as isize;
    let (lo, hi) = inside(dst.len(), src.len(), s, off);
    dst[..lo].fill(0.0);
    dst[hi..].fill(0.0);
    if hi > lo {
        let first = (lo as isize * si + off) as usize;
        let src = &src[first..first + (hi - lo - 1) * s + 1];
        match s {
            1 => dst[lo..hi].copy_from_slice(src),
            2 => strided_copy::<2>(src, &mut dst[lo..hi]),
            _ => {
                for (i, o) in dst[lo..hi].iter_mut().enumerate() {
                    *o = src[i * s];
                }
            }
        }
    }
}

/// im2col of output rows y0..y1: row (c, ky, kx) of `col` holds input
/// channel c at (y*s + ky - p, x*s + kx - p), zero outside the map.
#[inline(always)]
fn im2col_impl<const FMA: bool>(
    x: &[f32],
    (h, w, w2): (usize, usize, usize),
    (k, s, p): (usize, usize, usize),
    (y0, y1): (usize, usize),
    col: &mut [f32],
) {
    let nb = (y1 - y0) * w2;
    for (r, crow) in col.chunks_exact_mut(nb).enumerate() {
        let (ci, ky, kx) = (r / (k * k), r / k % k, r % k);
        let plane = &x[ci * h * w..(ci + 1) * h * w];
        for (yy, seg) in (y0..y1).zip(crow.chunks_exact_mut(w2)) {
            let iy = (yy * s + ky).wrapping_sub(p);
            if iy >= h {
                seg.fill(0.0);
            } else {
                sample_row(
                    &plane[iy * w..(iy + 1) * w],
                    s,
                    kx as isize - p as isize,
                    seg,
                );
            }
        }
    }
}

multiversion! {
    /// im2col of output rows `rows` = (y0, y1) of the map `hw` = (H, W, W')
    /// under kernel / stride / padding `ksp`; `col` holds as many rows
    /// (c, ky, kx) of (y1 - y0) * W' values as it has room for.
    pub(crate) fn im2col => im2col_impl(
        x: &[f32],
        hw: (usize, usize, usize),
        ksp: (usize, usize, usize),
        rows: (usize, usize),
        col: &mut [f32],
    )
}

/// Adds one sample's column gradients `dcols` [kk, H'W'] back onto its
/// group's channels `dx` [C_in/G, H, W] (im2col's adjoint).
#[inline(always)]
fn col2im_impl<const FMA: bool>(dcols: &[f32], sh: &ConvShape, dx: &mut [f32]) {
    let (hw2, k) = (sh.hw2(), sh.k);
    for cl in 0..sh.cin_g() {
        let plane = &mut dx[cl * sh.hw()..][..sh.hw()];
        for ky in 0..k {
            for kx in 0..k {
                let row = &dcols[((cl * k + ky) * k + kx) * hw2..][..hw2];
                let off = kx as isize - sh.p as isize;
                let (lo, hi) = inside(sh.w2, sh.w, sh.s, off);
                if lo == hi {
                    continue;
                }
                let first = (lo as isize * sh.s as isize + off) as usize;
                for oy in 0..sh.h2 {
                    let y = (oy * sh.s + ky).wrapping_sub(sh.p);
                    if y >= sh.h {
                        continue;
                    }
                    let dst = &mut plane[y * sh.w + first..(y + 1) * sh.w];
                    let src = &row[oy * sh.w2 + lo..oy * sh.w2 + hi];
                    if sh.s == 1 {
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d += v;
                        }
                    } else {
                        for (i, v) in src.iter().enumerate() {
                            dst[i * sh.s] += v;
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    fn col2im => col2im_impl(dcols: &[f32], sh: &ConvShape, dx: &mut [f32])
}

/// Groups with at most this many output channels multiply here, row by
/// row (a row of the result stays in L1 while the inner sum runs): `gemm`
/// spent about 10 us per call on a CLEVR block's group product, 4 x 36 x
/// 361 (10 GFLOP/s).
const SMALL_GROUP: usize = 8;

/// `c [m, n] (row stride ldc) = a [m, k] . b [k, n] (row stride ldb)`,
/// each row of c as a sum of b's rows scaled by a's entries.
#[inline(always)]
fn axpy_mm_impl<const FMA: bool>(
    (m, n, k): (usize, usize, usize),
    a: View<'_>,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let at = |i: usize, r: usize| a.data[i * a.rs + r * a.cs];
    for i in 0..m {
        let ci = &mut c[i * ldc..][..n];
        ci.fill(0.0);
        // Four rows of b per pass over c's row (one store per element
        // instead of four); the sum's order is the plain one.
        let mut r = 0;
        while r + 4 <= k {
            let (a0, a1, a2, a3) = (at(i, r), at(i, r + 1), at(i, r + 2), at(i, r + 3));
            let rows = |j: usize| &b[(r + j) * ldb..][..n];
            let (b0, b1, b2, b3) = (rows(0), rows(1), rows(2), rows(3));
            for q in 0..n {
                let v = madd::<FMA>(a0, b0[q], ci[q]);
                let v = madd::<FMA>(a1, b1[q], v);
                let v = madd::<FMA>(a2, b2[q], v);
                ci[q] = madd::<FMA>(a3, b3[q], v);
            }
            r += 4;
        }
        for r in r..k {
            let av = at(i, r);
            for (cv, &bv) in ci.iter_mut().zip(&b[r * ldb..][..n]) {
                *cv = madd::<FMA>(av, bv, *cv);
            }
        }
    }
}

multiversion! {
    fn axpy_mm => axpy_mm_impl(
        mnk: (usize, usize, usize),
        a: View<'_>,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
    )
}

/// `c [m, n] (row stride ldc) += a [m, k] . b^T`, b [n, k] with row stride
/// `ldb`: dot products in 16 lanes, summed in a fixed order.
#[inline(always)]
fn dots_impl<const FMA: bool>(
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[f32], usize),
    (b, ldb): (&[f32], usize),
    c: &mut [f32],
    ldc: usize,
) {
    const L: usize = 16;
    for i in 0..m {
        let ai = &a[i * lda..][..k];
        for j in 0..n {
            let bj = &b[j * ldb..][..k];
            let mut acc = [0.0f32; L];
            let (ha, ta) = ai.split_at(k - k % L);
            let (hb, tb) = bj.split_at(k - k % L);
            for (ca, cb) in ha.chunks_exact(L).zip(hb.chunks_exact(L)) {
                for l in 0..L {
                    acc[l] = madd::<FMA>(ca[l], cb[l], acc[l]);
                }
            }
            for (l, (&x, &y)) in ta.iter().zip(tb).enumerate() {
                acc[l] = madd::<FMA>(x, y, acc[l]);
            }
            c[i * ldc + j] += acc.iter().sum::<f32>();
        }
    }
}

multiversion! {
    fn dots => dots_impl(
        mnk: (usize, usize, usize),
        a: (&[f32], usize),
        b: (&[f32], usize),
        c: &mut [f32],
        ldc: usize,
    )
}

/// Group `g`'s right operand [kk, hw2] for one sample `xn`: the map itself
/// for an in-place 1x1, else its columns written into `cols`.
fn operand<'a>(
    isa: Isa,
    xn: &'a [f32],
    sh: &ConvShape,
    g: usize,
    cols: &'a mut Vec<f32>,
) -> &'a [f32] {
    let xg = &xn[g * sh.cin_g() * sh.hw()..][..sh.cin_g() * sh.hw()];
    if sh.in_place() {
        return xg;
    }
    cols.resize(sh.kk() * sh.hw2(), 0.0);
    let (hw, ksp) = ((sh.h, sh.w, sh.w2), (sh.k, sh.s, sh.p));
    im2col(isa, xg, hw, ksp, (0, sh.h2), cols);
    cols
}

/// `dst [m, n] = a [m, k] . b [k, n]`, all row-major except `a` (a view):
/// row by row for small groups, else `gemm`.
fn product(
    isa: Isa,
    small: bool,
    (m, n, k): (usize, usize, usize),
    a: View<'_>,
    b: &[f32],
    dst: &mut [f32],
) {
    if small {
        axpy_mm(isa, (m, n, k), a, b, n, dst, n);
    } else {
        sgemm(m, n, k, dst, n, a, View::rows(b, n), false, 1);
    }
}

/// y [N, C_out, H', W'] = conv(x [N, C_in, H, W], w [C_out, C_in/G, k, k]).
pub(crate) fn conv_forward(x: &[f32], w: &[f32], sh: &ConvShape) -> Vec<f32> {
    let (hw2, kk, cog) = (sh.hw2(), sh.kk(), sh.cout_g());
    assert!(
        x.len() == sh.n * sh.cin * sh.hw() && w.len() == sh.cout * kk,
        "conv: bad sizes"
    );
    let (isa, small) = (Isa::detect(), cog <= SMALL_GROUP);
    let mut y = vec![0.0f32; sh.n * sh.cout * hw2];
    y.par_chunks_mut(sh.cout * hw2)
        .enumerate()
        .for_each_init(Vec::new, |cols, (i, yn)| {
            let xn = &x[i * sh.cin * sh.hw()..][..sh.cin * sh.hw()];
            for g in 0..sh.groups {
                let b = operand(isa, xn, sh, g, cols);
                let dst = &mut yn[g * cog * hw2..][..cog * hw2];
                let wg = View::rows(&w[g * cog * kk..][..cog * kk], kk);
                product(isa, small, (cog, hw2, kk), wg, b, dst);
            }
        });
    y
}

/// dx [N, C_in, H, W] from dy [N, C_out, H', W'].
pub(crate) fn conv_backward_input(dy: &[f32], w: &[f32], sh: &ConvShape) -> Vec<f32> {
    let (hw2, kk, cog) = (sh.hw2(), sh.kk(), sh.cout_g());
    assert!(
        dy.len() == sh.n * sh.cout * hw2 && w.len() == sh.cout * kk,
        "conv backward: bad sizes"
    );
    let (isa, small) = (Isa::detect(), cog <= SMALL_GROUP);
    let mut dx = vec![0.0f32; sh.n * sh.cin * sh.hw()];
    dx.par_chunks_mut(sh.cin * sh.hw())
        .enumerate()
        .for_each_init(Vec::new, |dcols: &mut Vec<f32>, (i, dxn)| {
            let dyn_ = &dy[i * sh.cout * hw2..][..sh.cout * hw2];
            for g in 0..sh.groups {
                // W_g^T: element (r, o) of the transpose is W_g[o, r].
                let wt = View {
                    data: &w[g * cog * kk..][..cog * kk],
                    rs: 1,
                    cs: kk,
                };
                let dyg = &dyn_[g * cog * hw2..][..cog * hw2];
                if sh.in_place() {
                    let dst = &mut dxn[g * kk * hw2..][..kk * hw2];
                    product(isa, small, (kk, hw2, cog), wt, dyg, dst);
                } else {
                    dcols.resize(kk * hw2, 0.0);
                    product(isa, small, (kk, hw2, cog), wt, dyg, dcols);
                    let dxg = &mut dxn[g * sh.cin_g() * sh.hw()..][..sh.cin_g() * sh.hw()];
                    col2im(isa, dcols, sh, dxg);
                }
            }
        });
    dx
}

/// dw [C_out, C_in/G, k, k] from x and dy, summed over the batch in a fixed
/// order.
pub(crate) fn conv_backward_weight(x: &[f32], dy: &[f32], sh: &ConvShape) -> Vec<f32> {
    let (hw2, kk, cog) = (sh.hw2(), sh.kk(), sh.cout_g());
    assert!(
        x.len() == sh.n * sh.cin * sh.hw() && dy.len() == sh.n * sh.cout * hw2,
        "conv backward: bad sizes"
    );
    let (isa, small) = (Isa::detect(), cog <= SMALL_GROUP);
    let partials: Vec<Vec<f32>> = (0..sh.n.div_ceil(DW_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut dw = vec![0.0f32; sh.cout * kk];
            let mut cols = Vec::new();
            for i in c * DW_CHUNK..((c + 1) * DW_CHUNK).min(sh.n) {
                let xn = &x[i * sh.cin * sh.hw()..][..sh.cin * sh.hw()];
                let dyn_ = &dy[i * sh.cout * hw2..][..sh.cout * hw2];
                for g in 0..sh.groups {
                    let b = operand(isa, xn, sh, g, &mut cols);
                    let dyg = &dyn_[g * cog * hw2..][..cog * hw2];
                    let dst = &mut dw[g * cog * kk..][..cog * kk];
                    if small {
                        dots(isa, (cog, kk, hw2), (dyg, hw2), (b, hw2), dst, kk);
                        continue;
                    }
                    // B^T: element (q, r) is B[r, q].
                    let bt = View {
                        data: b,
                        rs: 1,
                        cs: hw2,
                    };
                    sgemm(cog, kk, hw2, dst, kk, View::rows(dyg, hw2), bt, true, 1);
                }
            }
            dw
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut dw = parts.next().unwrap_or_else(|| vec![0.0; sh.cout * kk]);
    for p in parts {
        for (a, b) in dw.iter_mut().zip(&p) {
            *a += b;
        }
    }
    dw
}

/// `conv.forward(x)` for x [N, C_in, H, W], with the training op where it
/// applies (Flex with autodiff, f32, a shape [`ConvShape`] handles).
pub fn conv2d(x: Tensor<4>, conv: &Conv2d) -> Tensor<4> {
    let dtypes = [x.dtype(), conv.weight.val().dtype()];
    let Some(sh) = ConvShape::of(conv, x.dims()) else {
        return conv.forward(x);
    };
    match route(&x.device(), &dtypes) {
        #[cfg(feature = "flex")]
        Route::FlexAutodiff => match flex::conv_autodiff(x.clone(), conv.weight.val(), sh) {
            Some(y) => match &conv.bias {
                Some(b) => y + b.val().reshape([1, sh.cout, 1, 1]),
                None => y,
            },
            None => conv.forward(x),
        },
        _ => conv.forward(x),
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Tensor;

    use super::super::flex::{host, record, tensor};
    use super::{ConvShape, conv_backward_input, conv_backward_weight, conv_forward};

    type Ad = Autodiff<Flex>;

    /// Parents: the input, the weight.
    #[derive(Debug)]
    struct ConvBackward;

    #[derive(Debug, Clone)]
    struct ConvState {
        x: FlexTensor,
        w: FlexTensor,
        shape: ConvShape,
    }

    impl Backward<Flex, 2> for ConvBackward {
        type State = ConvState;

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [px, pw] = ops.parents;
            let dy = grads.consume::<Flex>(&ops.node);
            let ConvState { x, w, shape: sh } = ops.state;
            let (Some(x), Some(w), Some(dy)) = (host(&x), host(&w), host(&dy)) else {
                unreachable!("conv: f32 tensors were checked in the forward pass")
            };
            if let Some(node) = px {
                let dx = conv_backward_input(&dy, &w, &sh);
                grads.register::<Flex>(node.id, tensor(dx, vec![sh.n, sh.cin, sh.h, sh.w]));
            }
            if let Some(node) = pw {
                let dw = conv_backward_weight(&x, &dy, &sh);
                let dims = vec![sh.cout, sh.cin / sh.groups, sh.k, sh.k];
                grads.register::<Flex>(node.id, tensor(dw, dims));
            }
        }
    }

    pub(super) fn conv_autodiff(x: Tensor<4>, w: Tensor<4>, sh: ConvShape) -> Option<Tensor<4>> {
        let x = x.try_into_primitive::<Ad>().ok()?;
        let w = w.try_into_primitive::<Ad>().ok()?;
        let y = conv_forward(&host(x.primitive())?, &host(w.primitive())?, &sh);
        let out = tensor(y, vec![sh.n, sh.cout, sh.h2, sh.w2]);
        let state = ConvState {
            x: x.primitive().clone(),
            w: w.primitive().clone(),
            shape: sh,
        };
        Some(record(ConvBackward, [x.node(), w.node()], state, out))
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    use super::*;
    use crate::fused::testing::{assert_close, flat};

    /// (batch, C_in, H, W, C_out, kernel, stride, padding, groups).
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
    );

    fn layer(c: Case, bias: bool, device: &Device) -> Conv2d {
        let (_, cin, _, _, cout, k, s, p, g) = c;
        Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([s, s])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .with_groups(g)
            .with_bias(bias)
            .init(device)
    }

    /// The op against Burn's `Conv2d` on case `c`: values, dx, dw and the
    /// bias gradient within 1e-5 relative.
    fn check(c: Case, bias: bool, seed: u64) {
        let device = Device::default().autodiff();
        device.seed(seed);
        let conv = layer(c, bias, &device);
        let (n, cin, h, w, ..) = c;
        assert!(
            ConvShape::of(&conv, [n, cin, h, w]).is_some(),
            "{c:?} handled"
        );
        let x = Tensor::<4>::random([n, cin, h, w], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let fast = conv2d(x.clone(), &conv);
        let reference = conv.forward(x.clone());
        assert_eq!(fast.dims(), reference.dims(), "{c:?}");
        let r = Tensor::<4>::random(fast.dims(), Distribution::Normal(0.0, 1.0), &device);
        let gf = (fast.clone() * r.clone()).sum().backward();
        let gr = (reference.clone() * r).sum().backward();
        let what = format!("{c:?} bias {bias}");
        assert_close(&format!("y {what}"), &flat(fast), &flat(reference), 1e-5);
        let grad = |g: &_, t: &Tensor<4>| flat(t.grad(g).expect("gradient"));
        assert_close(&format!("dx {what}"), &grad(&gf, &x), &grad(&gr, &x), 1e-5);
        let wv = conv.weight.val();
        let (a, e) = (grad(&gf, &wv), grad(&gr, &wv));
        assert_close(&format!("dw {what}"), &a, &e, 1e-5);
        if let Some(b) = &conv.bias {
            let (a, e) = (b.val().grad(&gf), b.val().grad(&gr));
            let (a, e) = (flat(a.expect("db")), flat(e.expect("db")));
            assert_close(&format!("db {what}"), &a, &e, 1e-5);
        }
    }

    #[test]
    fn values_and_gradients_match_burn_conv() {
        // The CLEVR stem (3x3/2 from 3 channels), a block's grouped 3x3 at
        // stride 1 and 2, the 1x1 reduce / expand, a strided 1x1 shortcut,
        // a 7x7/2 stem, odd and even maps, batch 1 in most.
        let cases: [Case; 8] = [
            (2, 3, 11, 11, 8, 3, 2, 1, 1),
            (1, 8, 7, 7, 8, 3, 1, 1, 4),
            (2, 12, 9, 8, 12, 3, 2, 1, 3),
            (3, 6, 5, 5, 10, 1, 1, 0, 1),
            (1, 6, 4, 6, 12, 1, 1, 0, 2),
            (2, 6, 7, 7, 4, 1, 2, 0, 1),
            (1, 3, 15, 13, 4, 7, 2, 3, 1),
            (1, 4, 3, 3, 4, 3, 1, 0, 1),
        ];
        for (i, &c) in cases.iter().enumerate() {
            for bias in [false, true] {
                check(c, bias, 70 + i as u64);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Any shape the op takes: groups with few output channels (the
        /// row-by-row products) and more than `SMALL_GROUP` (`gemm`),
        /// kernels 1 to 5, strides 1 to 3, any padding below the kernel.
        #[test]
        fn any_handled_shape_matches_burn_conv(
            n in 1usize..3,
            groups in 1usize..4,
            cin_g in 1usize..4,
            cout_g in 1usize..12,
            (h, w) in (1usize..12, 1usize..12),
            k in 1usize..6,
            s in 1usize..4,
            p_frac in 0.0f64..1.0,
            seed in 0u64..1000,
        ) {
            let p = (k as f64 * p_frac) as usize; // 0..k
            proptest::prop_assume!(h + 2 * p >= k && w + 2 * p >= k);
            let c = (n, groups * cin_g, h, w, groups * cout_g, k, s, p, groups);
            check(c, seed % 2 == 0, seed);
        }
    }

    #[test]
    fn an_input_without_gradient_still_trains_the_weight() {
        // The stem's case: the image is a constant; only dw is wanted.
        let device = Device::default().autodiff();
        device.seed(91);
        let c = (3, 3, 9, 9, 5, 3, 2, 1, 1);
        let conv = layer(c, false, &device);
        let x = Tensor::<4>::random([3, 3, 9, 9], Distribution::Uniform(0.0, 1.0), &device);
        let gf = conv2d(x.clone(), &conv).powi_scalar(2).sum().backward();
        let gr = conv.forward(x.clone()).powi_scalar(2).sum().backward();
        let wv = conv.weight.val();
        assert!(x.grad(&gf).is_none(), "no gradient for a constant input");
        let (a, b) = (wv.grad(&gf).expect("dw"), wv.grad(&gr).expect("dw"));
        assert_close("dw", &flat(a), &flat(b), 1e-5);
    }

    #[test]
    fn im2col_and_col2im_are_adjoint() {
        // <im2col(x), c> == <x, col2im(c)> for any x, c: the backward pass
        // of the columns is the transpose of their forward.
        let sh = ConvShape {
            n: 1,
            cin: 4,
            h: 6,
            w: 5,
            cout: 2,
            k: 3,
            s: 2,
            p: 1,
            groups: 2,
            h2: 3,
            w2: 3,
        };
        let x = crate::fused::testing::values(sh.cin * sh.hw(), 3, -1.0, 1.0);
        let c = crate::fused::testing::values(sh.kk() * sh.hw2(), 4, -1.0, 1.0);
        for g in 0..sh.groups {
            let mut cols = Vec::new();
            let cols = operand(Isa::detect(), &x, &sh, g, &mut cols);
            let mut dx = vec![0.0f32; sh.cin * sh.hw()];
            let own = g * sh.cin_g() * sh.hw()..(g + 1) * sh.cin_g() * sh.hw();
            col2im(Isa::detect(), &c, &sh, &mut dx[own]);
            let lhs: f64 = cols.iter().zip(&c).map(|(a, b)| f64::from(a * b)).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| f64::from(a * b)).sum();
            assert!((lhs - rhs).abs() < 1e-4, "group {g}: {lhs} against {rhs}");
            // Only the group's own channels receive gradient.
            let own = g * sh.cin_g() * sh.hw()..(g + 1) * sh.cin_g() * sh.hw();
            assert!(
                dx.iter()
                    .enumerate()
                    .all(|(j, v)| own.contains(&j) || *v == 0.0)
            );
        }
    }
}
