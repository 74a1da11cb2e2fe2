//! The CNN's dense layers on host slices, one sample at a time: conv + BN +
//! ReLU (the stem, and the 1x1 head) as im2col + GEMM, and the max pool.
//! Burn's Flex conv and pool run these at a few GFLOP/s and dominated the
//! small CLEVR network.

use burn::nn::pool::MaxPool2d;

use super::block::host_vec;
use super::conv3x3::{Isa, OutTile, finish_out, multiversion};
use crate::cnn::ConvBn;
use crate::error::{MoeError, Result as MoeResult};
use crate::fused::conv::{im2col, strided_copy};
use crate::fused::matmul::{View, sgemm};
use crate::fused::maxpool::{PoolShape, out_hw, symmetric};
use crate::moe::block::bn_affine;

/// A square conv (groups 1, dilation 1, symmetric padding) with its eval BN
/// folded in, followed by ReLU.
#[derive(Debug, Clone)]
pub(crate) struct PackedConv {
    cin: usize,
    cout: usize,
    k: usize,
    s: usize,
    p: usize,
    /// [C_out, C_in*k*k], rows scaled by the BN scale.
    w: Vec<f32>,
    /// BN shift (plus the scaled conv bias, if any).
    b: Vec<f32>,
}

impl PackedConv {
    pub fn from_conv_bn(cb: &ConvBn, what: &str) -> MoeResult<PackedConv> {
        let conv = &cb.conv;
        let [cout, cin, kh, kw] = conv.weight.dims();
        let pad = symmetric(&conv.padding);
        let (Some(p), true) = (
            pad,
            kh == kw
                && conv.stride[0] == conv.stride[1]
                && conv.stride[0] > 0
                && conv.dilation == [1, 1]
                && conv.groups == 1,
        ) else {
            return Err(MoeError::config(
                what,
                "the packed CNN needs a square conv with one group, no dilation and symmetric padding",
            ));
        };
        let w = host_vec(conv.weight.val(), what)?;
        let (scale, shift) = bn_affine(&cb.bn);
        let (scale, mut b) = (host_vec(scale, what)?, host_vec(shift, what)?);
        if let Some(bias) = &conv.bias {
            let bias = host_vec(bias.val(), what)?;
            for ((b, s), c) in b.iter_mut().zip(&scale).zip(bias) {
                *b += s * c;
            }
        }
        let row = cin * kh * kw;
        if w.len() != cout * row || scale.len() != cout || b.len() != cout {
            return Err(MoeError::shape(
                what,
                format!("{cout} x {row} weights"),
                format!("{}", w.len()),
            ));
        }
        let w = w
            .chunks_exact(row)
            .zip(&scale)
            .flat_map(|(r, &s)| r.iter().map(move |v| v * s))
            .collect();
        Ok(PackedConv {
            cin,
            cout,
            k: kh,
            s: conv.stride[0],
            p,
            w,
            b,
        })
    }

    pub fn in_channels(&self) -> usize {
        self.cin
    }

    pub fn out_channels(&self) -> usize {
        self.cout
    }

    /// Output map for an input map, `None` when the input is too small.
    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        out_hw(h, w, self.k, self.s, self.p)
    }

    /// One sample: `x` [C_in, h, w] to `out` [C_out, h', w'], relu(conv + b).
    /// `col` is scratch for the im2col tiles.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        isa: Isa,
        x: &[f32],
        h: usize,
        w: usize,
        out: &mut [f32],
        col: &mut Vec<f32>,
        threads: usize,
    ) {
        let Some((h2, w2)) = self.output_hw(h, w) else {
            return;
        };
        let (k, s, p, cin) = (self.k, self.s, self.p, self.cin);
        let (hw2, rows) = (h2 * w2, cin * k * k);
        if k == 1 && s == 1 && p == 0 {
            sgemm(
                self.cout,
                hw2,
                cin,
                out,
                hw2,
                View::rows(&self.w, rows),
                View::rows(x, hw2),
                false,
                threads,
            );
        } else {
            // im2col by bands of output rows (about 512 KiB of columns each),
            // each band multiplied while it is in cache.
            let band = (131072 / (rows * w2).max(1)).clamp(1, h2);
            for y0 in (0..h2).step_by(band) {
                let y1 = (y0 + band).min(h2);
                let nb = (y1 - y0) * w2;
                if col.len() < rows * nb {
                    col.resize(rows * nb, 0.0);
                }
                let c = &mut col[..rows * nb];
                im2col(isa, x, (h, w, w2), (k, s, p), (y0, y1), c);
                let dst = &mut out[y0 * w2..];
                sgemm(
                    self.cout,
                    nb,
                    rows,
                    dst,
                    hw2,
                    View::rows(&self.w, rows),
                    View::rows(c, nb),
                    false,
                    threads,
                );
            }
        }
        let tile = OutTile {
            src: None,
            residual: None,
            bias: &self.b,
            cols: hw2,
        };
        finish_out(isa, &tile, out, hw2);
    }
}

/// A square max pool (padding never wins: it counts as -inf).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PackedPool(PoolShape);

impl PackedPool {
    pub fn from_pool(pool: &MaxPool2d) -> MoeResult<PackedPool> {
        match PoolShape::of(pool) {
            Some(shape) => Ok(PackedPool(shape)),
            None => Err(MoeError::config(
                "CNN pool",
                "the packed CNN needs a square max pool without dilation or ceil mode, with symmetric padding smaller than the kernel",
            )),
        }
    }

    pub fn output_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        self.0.out(h, w)
    }

    /// One sample, `c` channels: `x` [c, h, w] to `out` [c, h', w'].
    /// `tmp` is scratch (one row).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        isa: Isa,
        x: &[f32],
        c: usize,
        h: usize,
        w: usize,
        out: &mut [f32],
        tmp: &mut Vec<f32>,
    ) {
        let Some((h2, w2)) = self.output_hw(h, w) else {
            return;
        };
        // The row of window maxima, padded with -inf on both sides.
        let len = w + 2 * self.0.p + self.0.k;
        if tmp.len() < len {
            tmp.resize(len, 0.0);
        }
        pool_planes(isa, self, x, (c, h, w, h2, w2), out, &mut tmp[..len]);
    }
}

/// Max pool of `c` planes; `t` is one padded row of scratch.
#[inline(always)]
fn pool_impl<const FMA: bool>(
    pool: &PackedPool,
    x: &[f32],
    (c, h, w, h2, w2): (usize, usize, usize, usize, usize),
    out: &mut [f32],
    t: &mut [f32],
) {
    let PoolShape { k, s, p } = pool.0;
    // Plain comparisons (not f32::max) so that the loops vectorise.
    let max = |a: f32, b: f32| if b > a { b } else { a };
    t.fill(f32::NEG_INFINITY);
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for y in 0..h2 {
            // Rows of the window inside the map (p < k: never empty); their
            // element-wise max lands in t[p..p + w].
            let r0 = (y * s).saturating_sub(p);
            let r1 = (y * s + k - p).min(h);
            let tr = &mut t[p..p + w];
            tr.copy_from_slice(&plane[r0 * w..(r0 + 1) * w]);
            for r in r0 + 1..r1 {
                for (a, &b) in tr.iter_mut().zip(&plane[r * w..(r + 1) * w]) {
                    *a = max(*a, b);
                }
            }
            // Output x covers padded columns x*s .. x*s + k of t.
            let o = &mut out[(ch * h2 + y) * w2..(ch * h2 + y + 1) * w2];
            for j in 0..k {
                let src = &t[j..j + (w2 - 1) * s + 1];
                if j == 0 {
                    if s == 2 {
                        strided_copy::<2>(src, o);
                    } else {
                        for (i, v) in o.iter_mut().enumerate() {
                            *v = src[i * s];
                        }
                    }
                } else if s == 2 {
                    for (v, pair) in o.iter_mut().zip(src.chunks(2)) {
                        *v = max(*v, pair[0]);
                    }
                } else {
                    for (i, v) in o.iter_mut().enumerate() {
                        *v = max(*v, src[i * s]);
                    }
                }
            }
        }
    }
}

multiversion! {
    fn pool_planes => pool_impl(
        pool: &PackedPool,
        x: &[f32],
        dims: (usize, usize, usize, usize, usize),
        out: &mut [f32],
        t: &mut [f32],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::max_rel_diff;
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::pool::MaxPool2dConfig;
    use burn::nn::{BatchNormConfig, PaddingConfig2d};
    use burn::tensor::{Device, Distribution, Tensor, TensorData};

    /// Stem-like convs (7x7/2, 3x3/2, 1x1) and the 3x3/2 max pool against
    /// Burn, on odd map sizes.
    #[test]
    fn conv_and_pool_match_burn() {
        let device = Device::default();
        device.seed(8);
        let isa = Isa::detect();
        for (cin, cout, k, s, p, h, w) in [
            (3, 8, 7, 2, 3, 19, 16),
            (3, 5, 3, 2, 1, 9, 10),
            (4, 6, 1, 1, 0, 5, 3),
            (2, 3, 3, 1, 1, 4, 7),
        ] {
            let cb = ConvBn {
                conv: Conv2dConfig::new([cin, cout], [k, k])
                    .with_stride([s, s])
                    .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                    .init(&device),
                bn: crate::moe::block::randomize_batch_norm(
                    BatchNormConfig::new(cout).init(&device),
                    &device,
                ),
            };
            let packed = PackedConv::from_conv_bn(&cb, "conv").unwrap();
            let n = 2;
            let x = Tensor::<4>::random([n, cin, h, w], Distribution::Normal(0.0, 1.0), &device);
            let want = cb.forward(x.clone());
            let [_, _, h2, w2] = want.dims();
            assert_eq!(packed.output_hw(h, w), Some((h2, w2)));
            let xv = host_vec(x, "x").unwrap();
            let mut got = vec![0.0f32; n * cout * h2 * w2];
            let mut col = Vec::new();
            for (xs, o) in xv.chunks(cin * h * w).zip(got.chunks_mut(cout * h2 * w2)) {
                packed.forward(isa, xs, h, w, o, &mut col, 1);
            }
            let got = Tensor::<4>::from_data(TensorData::new(got, [n, cout, h2, w2]), &device);
            assert!(max_rel_diff(got, want.clone()) <= 1e-5, "conv {k}x{k}/{s}");

            let pool = MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init();
            let pw = pool.forward(want.clone());
            let [_, _, h3, w3] = pw.dims();
            let pp = PackedPool::from_pool(&pool).unwrap();
            assert_eq!(pp.output_hw(h2, w2), Some((h3, w3)));
            let wv = host_vec(want, "y").unwrap();
            let mut got = vec![0.0f32; n * cout * h3 * w3];
            let mut tmp = Vec::new();
            for (xs, o) in wv
                .chunks(cout * h2 * w2)
                .zip(got.chunks_mut(cout * h3 * w3))
            {
                pp.forward(isa, xs, cout, h2, w2, o, &mut tmp);
            }
            let got = Tensor::<4>::from_data(TensorData::new(got, [n, cout, h3, w3]), &device);
            assert!(max_rel_diff(got, pw) <= 1e-6, "pool after conv {k}x{k}");
        }
    }
}
