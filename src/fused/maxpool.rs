//! The stem's max pool (ResNeXt's 3x3, stride 2, padding 1; Table 4's
//! CLEVR CNN) as a training op: the forward pass records each output's
//! argmax, the backward pass adds each output's gradient at that argmax.
//!
//! Why: on Burn's Flex backend the pool's forward and backward over the
//! stem's map (64 x 64 x 38 x 38 at 75x75, batch 64) took about 50 ms of a
//! 900 ms training step; one pass over each plane here takes a few.
//!
//! Routing as the module docs of [`crate::fused`] say; without autodiff
//! (and on any other device) Burn's own `MaxPool2d` runs.

use burn::nn::PaddingConfig2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{Route, route};

/// A square max pool: kernel `k`, stride `s`, padding `p` (padding never
/// wins, as -inf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolShape {
    pub k: usize,
    pub s: usize,
    pub p: usize,
}

/// Symmetric padding of a Burn padding config, if it is one.
pub(crate) fn symmetric(p: &PaddingConfig2d) -> Option<usize> {
    match *p {
        PaddingConfig2d::Valid => Some(0),
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => Some(t),
        _ => None,
    }
}

/// Output size of a window of `k` at stride `s` over `n + 2p` values;
/// `None` for an empty input (padding alone would make windows with no
/// value in them).
fn out_len(n: usize, k: usize, s: usize, p: usize) -> Option<usize> {
    if n == 0 || s == 0 {
        return None;
    }
    (n + 2 * p).checked_sub(k).map(|v| v / s + 1)
}

/// Output map of a square window (kernel k, stride s, padding p) over h x w.
pub(crate) fn out_hw(h: usize, w: usize, k: usize, s: usize, p: usize) -> Option<(usize, usize)> {
    Some((out_len(h, k, s, p)?, out_len(w, k, s, p)?))
}

impl PoolShape {
    /// The pool's shape if it is a square max pool without dilation or ceil
    /// mode, with symmetric padding smaller than the kernel.
    pub(crate) fn of(pool: &MaxPool2d) -> Option<PoolShape> {
        let p = symmetric(&pool.padding)?;
        let [k, k2] = pool.kernel_size;
        let [s, s2] = pool.stride;
        (k == k2 && s == s2 && s > 0 && k > p && pool.dilation == [1, 1] && !pool.ceil_mode)
            .then_some(PoolShape { k, s, p })
    }

    /// Output height and width for an input of `h` x `w`.
    pub fn out(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        out_hw(h, w, self.k, self.s, self.p)
    }
}

/// Forward over `planes` planes of `h` x `w`: the maxima ([planes, h2,
/// w2]) and, for each, its index in its input plane (first maximum in
/// row-major window order).
pub(crate) fn max_pool_forward(
    x: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    ps: PoolShape,
) -> (Vec<f32>, Vec<u32>) {
    let (h2, w2) = ps.out(h, w).unwrap_or((0, 0));
    assert_eq!(x.len(), planes * h * w, "max_pool: bad sizes");
    let mut out = vec![0.0f32; planes * h2 * w2];
    let mut idx = vec![0u32; planes * h2 * w2];
    if h2 * w2 == 0 {
        return (out, idx);
    }
    out.par_chunks_mut(h2 * w2)
        .zip(idx.par_chunks_mut(h2 * w2))
        .enumerate()
        .for_each(|(pl, (o, ix))| {
            let plane = &x[pl * h * w..(pl + 1) * h * w];
            for oy in 0..h2 {
                let y0 = (oy * ps.s) as isize - ps.p as isize;
                let ys = y0.max(0) as usize..((y0 + ps.k as isize).min(h as isize)) as usize;
                for ox in 0..w2 {
                    let x0 = (ox * ps.s) as isize - ps.p as isize;
                    let xs = x0.max(0) as usize..((x0 + ps.k as isize).min(w as isize)) as usize;
                    let (mut best, mut at) = (f32::NEG_INFINITY, ys.start * w + xs.start);
                    for yy in ys.clone() {
                        let row = &plane[yy * w..(yy + 1) * w];
                        for xx in xs.clone() {
                            if row[xx] > best {
                                best = row[xx];
                                at = yy * w + xx;
                            }
                        }
                    }
                    o[oy * w2 + ox] = plane[at];
                    ix[oy * w2 + ox] = at as u32;
                }
            }
        });
    (out, idx)
}

/// Backward: `dx` [planes, h, w] with each output's gradient added at its
/// argmax.
pub(crate) fn max_pool_backward(
    dy: &[f32],
    idx: &[u32],
    planes: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    assert_eq!(dy.len(), idx.len(), "max_pool backward: bad sizes");
    let mut dx = vec![0.0f32; planes * h * w];
    if planes == 0 || h * w == 0 {
        return dx;
    }
    let per = dy.len() / planes;
    dx.par_chunks_mut(h * w).enumerate().for_each(|(pl, d)| {
        let g = &dy[pl * per..(pl + 1) * per];
        let ix = &idx[pl * per..(pl + 1) * per];
        for (&g, &i) in g.iter().zip(ix) {
            d[i as usize] += g;
        }
    });
    dx
}

/// `pool.forward(x)` for x [N, C, H, W], with the fast training op where
/// it applies.
pub fn max_pool(x: Tensor<4>, pool: &MaxPool2d) -> Tensor<4> {
    let Some(ps) = PoolShape::of(pool) else {
        return pool.forward(x);
    };
    match route(&x.device(), &[x.dtype()]) {
        #[cfg(feature = "flex")]
        Route::FlexAutodiff => {
            flex::max_pool_autodiff(x.clone(), ps).unwrap_or_else(|| pool.forward(x))
        }
        _ => pool.forward(x),
    }
}

#[cfg(feature = "flex")]
mod flex {
    use std::sync::Arc;

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops};
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Tensor;

    use super::super::flex::{host, record, tensor};
    use super::{PoolShape, max_pool_backward, max_pool_forward};

    type Ad = Autodiff<Flex>;

    #[derive(Debug)]
    struct MaxPoolBackward;

    #[derive(Debug, Clone)]
    struct MaxPoolState {
        idx: Arc<Vec<u32>>,
        dims: [usize; 4],
    }

    impl Backward<Flex, 1> for MaxPoolBackward {
        type State = MaxPoolState;

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [px] = ops.parents;
            let dy = grads.consume::<Flex>(&ops.node);
            let MaxPoolState {
                idx,
                dims: [n, c, h, w],
            } = ops.state;
            let Some(dy) = host(&dy) else {
                unreachable!("max_pool: f32 tensors were checked in the forward pass")
            };
            if let Some(node) = px {
                let dx = max_pool_backward(&dy, &idx, n * c, h, w);
                grads.register::<Flex>(node.id, tensor(dx, vec![n, c, h, w]));
            }
        }
    }

    pub(super) fn max_pool_autodiff(x: Tensor<4>, ps: PoolShape) -> Option<Tensor<4>> {
        let [n, c, h, w] = x.dims();
        let (h2, w2) = ps.out(h, w)?;
        let x = x.try_into_primitive::<Ad>().ok()?;
        let (out, idx) = max_pool_forward(&host(x.primitive())?, n * c, h, w, ps);
        let out = tensor(out, vec![n, c, h2, w2]);
        let state = MaxPoolState {
            idx: Arc::new(idx),
            dims: [n, c, h, w],
        };
        Some(record(MaxPoolBackward, [x.node()], state, out))
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::pool::MaxPool2dConfig;
    use burn::tensor::{Device, Distribution};

    use super::*;
    use crate::fused::testing::flat;

    fn pool(k: usize, s: usize, p: usize) -> MaxPool2d {
        MaxPool2dConfig::new([k, k])
            .with_strides([s, s])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .init()
    }

    #[test]
    fn values_and_gradients_match_burn_max_pool() {
        let device = Device::default().autodiff();
        // (batch, channels, height, width, kernel, stride, padding): the
        // stem's pool on odd and even maps, batch 1, no padding, stride 1.
        for (i, &(n, c, h, w, k, s, p)) in [
            (2, 3, 38, 38, 3, 2, 1),
            (1, 2, 7, 9, 3, 2, 1),
            (1, 1, 5, 5, 2, 2, 0),
            (2, 2, 6, 5, 3, 1, 1),
        ]
        .iter()
        .enumerate()
        {
            device.seed(40 + i as u64);
            let mp = pool(k, s, p);
            assert!(PoolShape::of(&mp).is_some(), "the op handles this pool");
            let x = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let fast = max_pool(x.clone(), &mp);
            let reference = mp.forward(x.clone());
            assert_eq!(fast.dims(), reference.dims());
            let weight = Tensor::<4>::random(fast.dims(), Distribution::Normal(0.0, 1.0), &device);
            let gf = (fast.clone() * weight.clone()).sum().backward();
            let gr = (reference.clone() * weight).sum().backward();
            assert_eq!(
                flat(fast),
                flat(reference),
                "values {:?}",
                (n, c, h, w, k, s, p)
            );
            let (a, b) = (
                flat(x.grad(&gf).expect("dx")),
                flat(x.grad(&gr).expect("dx")),
            );
            for (j, (a, b)) in a.iter().zip(&b).enumerate() {
                assert!((a - b).abs() <= 1e-5, "dx[{j}]: {a} against {b}");
            }
        }
    }

    #[test]
    fn ties_take_the_first_maximum_and_padding_never_wins() {
        // All -1: padding (-inf) must not win, and the first -1 of each
        // window takes the gradient.
        let ps = PoolShape { k: 3, s: 2, p: 1 };
        let x = vec![-1.0f32; 16];
        let (out, idx) = max_pool_forward(&x, 1, 4, 4, ps);
        assert_eq!(out, vec![-1.0; 4]);
        assert_eq!(idx, vec![0, 1, 4, 5]);
        let dx = max_pool_backward(&[1.0, 2.0, 3.0, 4.0], &idx, 1, 4, 4);
        // An empty map has no output, even where padding would make room.
        let wide = PoolShape { k: 3, s: 2, p: 2 };
        assert_eq!(wide.out(0, 5), None);
        assert_eq!(max_pool_forward(&[], 2, 0, 5, wide), (vec![], vec![]));
        assert_eq!(&dx[..6], &[1.0, 2.0, 0.0, 0.0, 3.0, 4.0]);
    }
}
