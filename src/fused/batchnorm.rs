//! Batch norm in training mode with what follows it in a ResNeXt block (a
//! residual add and a ReLU; the paper's section 2 and Table 4) as one
//! training op: `act(BN(x) + r)`.
//!
//! Why: Burn 0.22.1's generic `batch_norm_train` (which Flex does not
//! override) transposes the map to [C, N*H*W] for each of its means, and the
//! ReLU and the add are further passes with their own backward. Over the
//! CLEVR CNN's stem map (64 x 64 x 38 x 38 at 75x75, batch 64) BN + ReLU
//! took about 55 ms of a training step. Here the forward pass is one read
//! of `x` for the mean, one for the variance and one to write `y`; the
//! backward pass reads `x`, `r` and `dy` twice (the ReLU's mask is
//! recomputed from `x`, so nothing else is kept) and writes `dx` (and `dr`).
//!
//! Per-channel sums run in eight f32 lanes per plane, the planes added in
//! f64 in order: the same numbers on every run (no scheduling-dependent
//! order), and closer to exact than Burn's f32 means.
//!
//! The running statistics are updated exactly as Burn's
//! `BatchNorm::forward_train` does (biased batch variance, `momentum`).
//! Routing as the module docs of [`crate::fused`] say; a layer in eval mode
//! (or a frozen one) runs Burn's `BatchNorm::forward`.

use burn::nn::BatchNorm;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

use super::{Route, relu1, route};

/// `x` viewed as [n, c, hw].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BnShape {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

impl BnShape {
    fn len(&self) -> usize {
        self.n * self.c * self.hw
    }

    /// Values per channel.
    fn count(&self) -> f64 {
        (self.n * self.hw) as f64
    }

    /// Plane (sample `i`, channel `ch`) of a [n, c, hw] buffer.
    fn plane<'a>(&self, t: &'a [f32], i: usize, ch: usize) -> &'a [f32] {
        let o = (i * self.c + ch) * self.hw;
        &t[o..o + self.hw]
    }

    /// Planes per parallel task: at least 4096 values each.
    fn min_planes(&self) -> usize {
        (4096 / self.hw.max(1)).max(1)
    }
}

/// Sums of `f(a_j, b_j)` (two of them) in eight f32 lanes, so that the
/// loop vectorises, returned as f64.
#[inline(always)]
fn lane_sums(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> [f32; 2]) -> [f64; 2] {
    let mut acc = [[0.0f32; 8]; 2];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (a, b) in ca.zip(cb) {
        for j in 0..8 {
            let t = f(a[j], b[j]);
            acc[0][j] += t[0];
            acc[1][j] += t[1];
        }
    }
    let mut tail = [0.0f32; 2];
    for (&a, &b) in ta.iter().zip(tb) {
        let t = f(a, b);
        tail[0] += t[0];
        tail[1] += t[1];
    }
    [0, 1].map(|k| acc[k].iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(tail[k]))
}

/// The output's gradient over one plane: `dy` masked where
/// `x * k + b (+ r) <= 0` (as Burn's ReLU backward masks). Branch-free, so
/// that it vectorises.
fn masked_grad(dz: &mut [f32], x: &[f32], r: Option<&[f32]>, dy: &[f32], k: f32, b: f32) {
    match r {
        Some(r) => {
            for (((d, &x), &r), &g) in dz.iter_mut().zip(x).zip(r).zip(dy) {
                *d = if x * k + b + r <= 0.0 { 0.0 } else { g };
            }
        }
        None => {
            for ((d, &x), &g) in dz.iter_mut().zip(x).zip(dy) {
                *d = if x * k + b <= 0.0 { 0.0 } else { g };
            }
        }
    }
}

/// Per channel of `x` [n, c, hw]: the batch mean and the biased variance
/// (what Burn's `batch_norm_train` returns and feeds the running stats).
pub(crate) fn channel_stats(x: &[f32], s: BnShape) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), s.len(), "batch_norm: bad sizes");
    let m = s.count();
    (0..s.c)
        .into_par_iter()
        .map(|ch| {
            let sum: f64 = (0..s.n)
                .map(|i| {
                    let p = s.plane(x, i, ch);
                    lane_sums(p, p, |x, _| [x, 0.0])[0]
                })
                .sum();
            let mean = (sum / m) as f32;
            let sq: f64 = (0..s.n)
                .map(|i| {
                    let p = s.plane(x, i, ch);
                    lane_sums(p, p, |x, _| [(x - mean) * (x - mean), 0.0])[0]
                })
                .sum();
            (mean, (sq / m) as f32)
        })
        .unzip()
}

/// The normalisation of one batch, per channel.
#[derive(Debug, Clone)]
pub(crate) struct Affine {
    pub gamma: Vec<f32>,
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    /// gamma * inv_std.
    pub scale: Vec<f32>,
    /// beta - mean * scale.
    pub shift: Vec<f32>,
}

impl Affine {
    pub(crate) fn new(mean: &[f32], var: &[f32], gamma: &[f32], beta: &[f32], eps: f64) -> Self {
        let inv_std: Vec<f32> = var
            .iter()
            .map(|&v| (1.0 / (f64::from(v) + eps).sqrt()) as f32)
            .collect();
        let scale: Vec<f32> = gamma.iter().zip(&inv_std).map(|(g, i)| g * i).collect();
        let shift = beta
            .iter()
            .zip(mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Affine {
            gamma: gamma.to_vec(),
            mean: mean.to_vec(),
            inv_std,
            scale,
            shift,
        }
    }
}

/// `y = act(x * scale + shift + r)` per channel (`act` is ReLU when `relu`).
pub(crate) fn batch_norm_forward(
    x: &[f32],
    r: Option<&[f32]>,
    a: &Affine,
    s: BnShape,
    relu: bool,
) -> Vec<f32> {
    assert!(
        x.len() == s.len() && r.is_none_or(|r| r.len() == s.len()),
        "batch_norm: bad sizes"
    );
    let mut y = vec![0.0f32; s.len()];
    if s.hw == 0 {
        return y;
    }
    let act = |z: f32| if relu { relu1(z) } else { z };
    y.par_chunks_mut(s.hw)
        .enumerate()
        .with_min_len(s.min_planes())
        .for_each(|(i, y)| {
            let ch = i % s.c;
            let (k, b) = (a.scale[ch], a.shift[ch]);
            let xs = &x[i * s.hw..(i + 1) * s.hw];
            match r {
                Some(r) => {
                    let rs = &r[i * s.hw..(i + 1) * s.hw];
                    for ((y, &x), &r) in y.iter_mut().zip(xs).zip(rs) {
                        *y = act(x * k + b + r);
                    }
                }
                None => {
                    for (y, &x) in y.iter_mut().zip(xs) {
                        *y = act(x * k + b);
                    }
                }
            }
        });
    y
}

/// Gradients of [`batch_norm_forward`] in training mode.
#[derive(Debug, Clone)]
pub(crate) struct BnGrads {
    pub dx: Vec<f32>,
    pub dgamma: Vec<f32>,
    pub dbeta: Vec<f32>,
    /// Gradient of the residual (when asked for).
    pub dr: Option<Vec<f32>>,
}

/// Backward of [`batch_norm_forward`] with batch statistics: with
/// `dz = dy * [z > 0]` (or `dy` without the ReLU) and `x^ = (x - mean) *
/// inv_std`, `dbeta = sum dz`, `dgamma = sum dz x^`, `dr = dz` and
/// `dx = gamma inv_std (dz - mean(dz) - x^ mean(dz x^))`.
pub(crate) fn batch_norm_backward(
    x: &[f32],
    r: Option<&[f32]>,
    dy: &[f32],
    a: &Affine,
    s: BnShape,
    relu: bool,
    want_dr: bool,
) -> BnGrads {
    assert!(
        x.len() == s.len() && dy.len() == s.len() && r.is_none_or(|r| r.len() == s.len()),
        "batch_norm backward: bad sizes"
    );
    // The output's gradient over plane (i, ch): `dy` itself without the
    // ReLU, else written into `buf`.
    let dz = |i: usize, ch: usize, buf: &'_ mut [f32]| {
        let dys = s.plane(dy, i, ch);
        if relu {
            let rs = r.map(|r| s.plane(r, i, ch));
            masked_grad(buf, s.plane(x, i, ch), rs, dys, a.scale[ch], a.shift[ch]);
        } else {
            buf.copy_from_slice(dys);
        }
    };
    let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = (0..s.c)
        .into_par_iter()
        .map(|ch| {
            let (m, is) = (a.mean[ch], a.inv_std[ch]);
            let mut buf = vec![0.0f32; s.hw];
            let [sd, sdx] = (0..s.n).fold([0.0f64; 2], |acc, i| {
                let g: &[f32] = if relu {
                    dz(i, ch, &mut buf);
                    &buf
                } else {
                    s.plane(dy, i, ch)
                };
                let t = lane_sums(g, s.plane(x, i, ch), |g, x| [g, g * (x - m) * is]);
                [acc[0] + t[0], acc[1] + t[1]]
            });
            (sd as f32, sdx as f32)
        })
        .unzip();
    let mut dx = vec![0.0f32; s.len()];
    let mut dr = want_dr.then(|| vec![0.0f32; s.len()]);
    if s.hw > 0 {
        let cnt = s.count() as f32;
        // dx over plane i (and dz into `dr`, the plane's scratch otherwise).
        let body = |i: usize, dx: &mut [f32], dr: &mut [f32]| {
            let (ni, ch) = (i / s.c, i % s.c);
            dz(ni, ch, dr);
            let (m, is) = (a.mean[ch], a.inv_std[ch]);
            let k = a.gamma[ch] * is;
            let (mg, mgx) = (dbeta[ch] / cnt, dgamma[ch] / cnt);
            for ((dx, &x), &g) in dx.iter_mut().zip(s.plane(x, ni, ch)).zip(&*dr) {
                *dx = k * (g - mg - (x - m) * is * mgx);
            }
        };
        let min = s.min_planes();
        match dr.as_mut() {
            Some(dr) => dx
                .par_chunks_mut(s.hw)
                .zip(dr.par_chunks_mut(s.hw))
                .enumerate()
                .with_min_len(min)
                .for_each(|(i, (dx, dr))| body(i, dx, dr)),
            None => dx
                .par_chunks_mut(s.hw)
                .enumerate()
                .with_min_len(min)
                .for_each_init(|| vec![0.0f32; s.hw], |buf, (i, dx)| body(i, dx, buf)),
        }
    }
    BnGrads {
        dx,
        dgamma,
        dbeta,
        dr,
    }
}

/// `act(bn(x) + residual)` for x [N, C, H, W]: `act` is ReLU when `relu`,
/// `residual` (same shape as `x`) is added when given. In training mode
/// (an autodiff device and a trainable layer) it uses the batch statistics
/// and updates the layer's running statistics, as `bn.forward` does.
pub fn batch_norm(
    x: Tensor<4>,
    bn: &BatchNorm,
    residual: Option<Tensor<4>>,
    relu: bool,
) -> Tensor<4> {
    let device = x.device();
    let mut dtypes = vec![x.dtype(), bn.gamma.val().dtype(), bn.beta.val().dtype()];
    dtypes.extend(residual.as_ref().map(|r| r.dtype()));
    let training = device.is_autodiff() && bn.training.is_enabled();
    match route(&device, &dtypes) {
        #[cfg(feature = "flex")]
        Route::FlexAutodiff if training => {
            let fast = flex::batch_norm_autodiff(
                x.clone(),
                bn.gamma.val(),
                bn.beta.val(),
                residual.clone(),
                bn.epsilon,
                relu,
            );
            match fast {
                Some((y, mean, var)) => {
                    update_running(bn, mean, var, &device);
                    y
                }
                None => batch_norm_reference(x, bn, residual, relu),
            }
        }
        _ => batch_norm_reference(x, bn, residual, relu),
    }
}

/// The same maths as plain Burn ops (any device; the reference).
pub fn batch_norm_reference(
    x: Tensor<4>,
    bn: &BatchNorm,
    residual: Option<Tensor<4>>,
    act: bool,
) -> Tensor<4> {
    let mut y = bn.forward(x);
    if let Some(r) = residual {
        y = y + r;
    }
    if act { relu(y) } else { y }
}

/// Running statistics as Burn's `BatchNorm::forward_train` updates them.
fn update_running(bn: &BatchNorm, mean: Vec<f32>, var: Vec<f32>, device: &Device) {
    let m = bn.momentum;
    let blend = |old: Tensor<1>, new: Vec<f32>| {
        let c = new.len();
        let new = Tensor::<1>::from_data(TensorData::new(new, [c]), device);
        old.to_device(device)
            .mul_scalar(1.0 - m)
            .add(new.mul_scalar(m))
            .detach()
    };
    bn.running_mean
        .update(blend(bn.running_mean.value_sync(), mean));
    bn.running_var
        .update(blend(bn.running_var.value_sync(), var));
}

#[cfg(feature = "flex")]
mod flex {
    use std::sync::Arc;

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Tensor;

    use super::super::flex::{dims, host, record, tensor};
    use super::{Affine, BnShape, batch_norm_backward, batch_norm_forward, channel_stats};

    type Ad = Autodiff<Flex>;

    /// Parents: x, gamma, beta, and the residual when `N == 4`.
    #[derive(Debug)]
    struct BatchNormBackward<const N: usize>;

    #[derive(Debug, Clone)]
    struct BatchNormState {
        x: FlexTensor,
        r: Option<FlexTensor>,
        affine: Arc<Affine>,
        shape: BnShape,
        dims: Vec<usize>,
        relu: bool,
    }

    impl<const N: usize> Backward<Flex, N> for BatchNormBackward<N> {
        type State = BatchNormState;

        fn backward(
            self,
            ops: Ops<Self::State, N>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let mut parents = ops.parents.into_iter();
            let [px, pg, pb, pr] = [(); 4].map(|_| parents.next().flatten());
            let dy = grads.consume::<Flex>(&ops.node);
            let st = ops.state;
            let r = match &st.r {
                Some(r) => host(r).map(Some),
                None => Some(None),
            };
            let (Some(x), Some(dy), Some(r)) = (host(&st.x), host(&dy), r) else {
                unreachable!("batch_norm: f32 tensors were checked in the forward pass")
            };
            let g = batch_norm_backward(
                &x,
                r.as_deref(),
                &dy,
                &st.affine,
                st.shape,
                st.relu,
                pr.is_some(),
            );
            if let Some(node) = px {
                grads.register::<Flex>(node.id, tensor(g.dx, st.dims.clone()));
            }
            if let Some(node) = pg {
                grads.register::<Flex>(node.id, tensor(g.dgamma, vec![st.shape.c]));
            }
            if let Some(node) = pb {
                grads.register::<Flex>(node.id, tensor(g.dbeta, vec![st.shape.c]));
            }
            if let (Some(node), Some(dr)) = (pr, g.dr) {
                grads.register::<Flex>(node.id, tensor(dr, st.dims));
            }
        }
    }

    /// The op's output and the batch mean and variance (for the running
    /// statistics); `None` when the tensors are not what the kernels take.
    pub(super) fn batch_norm_autodiff(
        x: Tensor<4>,
        gamma: Tensor<1>,
        beta: Tensor<1>,
        residual: Option<Tensor<4>>,
        eps: f64,
        relu: bool,
    ) -> Option<(Tensor<4>, Vec<f32>, Vec<f32>)> {
        let [n, c, h, w] = x.dims();
        if residual.as_ref().is_some_and(|r| r.dims() != [n, c, h, w]) {
            return None;
        }
        let x = x.try_into_primitive::<Ad>().ok()?;
        let gamma = gamma.try_into_primitive::<Ad>().ok()?;
        let beta = beta.try_into_primitive::<Ad>().ok()?;
        let r = match residual {
            Some(r) => Some(r.try_into_primitive::<Ad>().ok()?),
            None => None,
        };
        let shape = BnShape { n, c, hw: h * w };
        let (gv, bv) = (host(gamma.primitive())?, host(beta.primitive())?);
        if dims(gamma.primitive()) != [c] || dims(beta.primitive()) != [c] {
            return None;
        }
        let xv = host(x.primitive())?;
        let rv = match &r {
            Some(r) => Some(host(r.primitive())?),
            None => None,
        };
        let (mean, var) = channel_stats(&xv, shape);
        let affine = Affine::new(&mean, &var, &gv, &bv, eps);
        let y = batch_norm_forward(&xv, rv.as_deref(), &affine, shape, relu);
        let y = tensor(y, vec![n, c, h, w]);
        let state = BatchNormState {
            x: x.primitive().clone(),
            r: r.as_ref().map(|r| r.primitive().clone()),
            affine: Arc::new(affine),
            shape,
            dims: vec![n, c, h, w],
            relu,
        };
        let out = match r {
            Some(r) => record(
                BatchNormBackward::<4>,
                [x.node(), gamma.node(), beta.node(), r.node()],
                state,
                y,
            ),
            None => record(
                BatchNormBackward::<3>,
                [x.node(), gamma.node(), beta.node()],
                state,
                y,
            ),
        };
        Some((out, mean, var))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::BatchNormConfig;
    use burn::tensor::Distribution;

    use super::*;
    use crate::fused::testing::{assert_close, flat};

    fn values(len: usize, seed: u64) -> Vec<f32> {
        crate::fused::testing::values(len, seed, -1.5, 2.5)
    }

    /// The same forward and backward in f64 loops, straight from the
    /// definitions: (y, dx, dgamma, dbeta, dr).
    #[allow(clippy::type_complexity)]
    fn naive(
        x: &[f32],
        r: Option<&[f32]>,
        dy: &[f32],
        gamma: &[f32],
        beta: &[f32],
        s: BnShape,
        relu: bool,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, c, hw) = (s.n, s.c, s.hw);
        let at = |i: usize, ch: usize, j: usize| (i * c + ch) * hw + j;
        let m = (n * hw) as f64;
        let (mut y, mut dx, mut dr) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        for ch in 0..c {
            let idx: Vec<usize> = (0..n)
                .flat_map(|i| (0..hw).map(move |j| at(i, ch, j)))
                .collect();
            let mean = idx.iter().map(|&o| f64::from(x[o])).sum::<f64>() / m;
            let var = idx
                .iter()
                .map(|&o| (f64::from(x[o]) - mean).powi(2))
                .sum::<f64>()
                / m;
            let is = 1.0 / (var + 1e-5).sqrt();
            let xh: Vec<f64> = idx.iter().map(|&o| (f64::from(x[o]) - mean) * is).collect();
            let mut dz = vec![0.0; idx.len()];
            for (t, &o) in idx.iter().enumerate() {
                let z = xh[t] * f64::from(gamma[ch])
                    + f64::from(beta[ch])
                    + r.map_or(0.0, |r| f64::from(r[o]));
                y[o] = if relu { z.max(0.0) } else { z };
                dz[t] = if relu && z <= 0.0 {
                    0.0
                } else {
                    f64::from(dy[o])
                };
                dr[o] = dz[t];
            }
            db[ch] = dz.iter().sum();
            dg[ch] = dz.iter().zip(&xh).map(|(a, b)| a * b).sum();
            for (t, &o) in idx.iter().enumerate() {
                dx[o] = f64::from(gamma[ch]) * is * (dz[t] - db[ch] / m - xh[t] * dg[ch] / m);
            }
        }
        (y, dx, dg, db, dr)
    }

    fn to32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&v| v as f32).collect()
    }

    #[test]
    fn kernels_match_naive_loops() {
        // Batch 1, one channel, planes shorter and longer than the 8 lanes,
        // odd sizes; with and without the residual and the ReLU.
        for (t, &(n, c, hw)) in [(1, 1, 5), (1, 3, 17), (2, 4, 9), (3, 2, 100), (5, 7, 1)]
            .iter()
            .enumerate()
        {
            let s = BnShape { n, c, hw };
            let x = values(s.len(), t as u64);
            let r = values(s.len(), 100 + t as u64);
            let dy = values(s.len(), 200 + t as u64);
            let gamma = values(c, 300 + t as u64);
            let beta = values(c, 400 + t as u64);
            for (res, act) in [(false, false), (false, true), (true, false), (true, true)] {
                let rr = res.then_some(r.as_slice());
                let what = format!("{s:?} residual {res} relu {act}");
                let (mean, var) = channel_stats(&x, s);
                let a = Affine::new(&mean, &var, &gamma, &beta, 1e-5);
                let y = batch_norm_forward(&x, rr, &a, s, act);
                let g = batch_norm_backward(&x, rr, &dy, &a, s, act, res);
                let (ny, ndx, ndg, ndb, ndr) = naive(&x, rr, &dy, &gamma, &beta, s, act);
                assert_close(&format!("y {what}"), &y, &to32(&ny), 1e-5);
                assert_close(&format!("dx {what}"), &g.dx, &to32(&ndx), 1e-4);
                assert_close(&format!("dgamma {what}"), &g.dgamma, &to32(&ndg), 1e-5);
                assert_close(&format!("dbeta {what}"), &g.dbeta, &to32(&ndb), 1e-5);
                match (res, g.dr) {
                    (true, Some(dr)) => assert_close(&format!("dr {what}"), &dr, &to32(&ndr), 0.0),
                    (false, None) => {}
                    (_, dr) => panic!("{what}: dr {:?}", dr.map(|d| d.len())),
                }
            }
        }
    }

    /// A layer with non-trivial gamma, beta and running statistics.
    fn layer(c: usize, device: &Device) -> BatchNorm {
        let bn = BatchNormConfig::new(c).init(device);
        let g = Tensor::<1>::random([c], Distribution::Uniform(0.5, 1.5), device);
        let b = Tensor::<1>::random([c], Distribution::Normal(0.0, 0.3), device);
        BatchNorm {
            gamma: Param::from_tensor(g),
            beta: Param::from_tensor(b),
            ..bn
        }
    }

    #[test]
    fn values_gradients_and_running_stats_match_burn() {
        let device = Device::default().autodiff();
        for (t, &(n, c, h, w)) in [(2, 3, 5, 4), (1, 4, 3, 3), (4, 2, 1, 1), (3, 5, 7, 6)]
            .iter()
            .enumerate()
        {
            for (res, act) in [(false, true), (true, true), (true, false), (false, false)] {
                device.seed(10 + t as u64);
                let what = format!("{:?} residual {res} relu {act}", (n, c, h, w));
                let (fast_bn, ref_bn) = (layer(c, &device), layer(c, &device));
                // The same parameters in both layers, distinct autodiff nodes.
                let ref_bn = BatchNorm {
                    gamma: Param::from_tensor(fast_bn.gamma.val().detach()),
                    beta: Param::from_tensor(fast_bn.beta.val().detach()),
                    ..ref_bn
                };
                let x = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.5, 2.0), &device)
                    .require_grad();
                let r = Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &device)
                    .require_grad();
                let wts =
                    Tensor::<4>::random([n, c, h, w], Distribution::Normal(0.0, 1.0), &device);
                let fast = batch_norm(x.clone(), &fast_bn, res.then(|| r.clone()), act);
                let reference =
                    batch_norm_reference(x.clone(), &ref_bn, res.then(|| r.clone()), act);
                let gf = (fast.clone() * wts.clone()).sum().backward();
                let gr = (reference.clone() * wts).sum().backward();
                assert_close(&format!("y {what}"), &flat(fast), &flat(reference), 1e-5);
                let grad = |p: &Tensor<4>, g| flat(p.grad(g).expect("gradient"));
                assert_close(&format!("dx {what}"), &grad(&x, &gf), &grad(&x, &gr), 1e-4);
                if res {
                    assert_close(&format!("dr {what}"), &grad(&r, &gf), &grad(&r, &gr), 1e-5);
                }
                let pg = |bn: &BatchNorm, g| {
                    let gamma = flat(bn.gamma.val().grad(g).expect("dgamma"));
                    let beta = flat(bn.beta.val().grad(g).expect("dbeta"));
                    (gamma, beta)
                };
                let ((fg, fb), (rg, rb)) = (pg(&fast_bn, &gf), pg(&ref_bn, &gr));
                assert_close(&format!("dgamma {what}"), &fg, &rg, 1e-4);
                assert_close(&format!("dbeta {what}"), &fb, &rb, 1e-4);
                let stats = |bn: &BatchNorm| {
                    [bn.running_mean.value_sync(), bn.running_var.value_sync()].map(flat)
                };
                let ([fm, fv], [rm, rv]) = (stats(&fast_bn), stats(&ref_bn));
                assert_close(&format!("running mean {what}"), &fm, &rm, 1e-5);
                assert_close(&format!("running var {what}"), &fv, &rv, 1e-5);
                assert!(
                    fv.iter().any(|v| (v - 1.0).abs() > 1e-3),
                    "{what}: the running variance moved"
                );
            }
        }
    }

    #[test]
    fn eval_mode_and_plain_devices_use_running_statistics() {
        // Without autodiff the layer normalises with its running stats, as
        // Burn's does: a batch of one constant image is not zeroed.
        let device = Device::default();
        let bn = layer(2, &device);
        let x = Tensor::<4>::ones([1, 2, 2, 2], &device);
        let y = flat(batch_norm(x.clone(), &bn, None, false));
        assert_eq!(y, flat(bn.forward(x)));
        assert!(y.iter().any(|v| v.abs() > 0.1), "{y:?}");
    }

    #[test]
    fn repeated_backward_passes_are_bit_identical() {
        let s = BnShape {
            n: 16,
            c: 6,
            hw: 361,
        };
        let x = values(s.len(), 1);
        let dy = values(s.len(), 2);
        let gamma = values(s.c, 3);
        let (mean, var) = channel_stats(&x, s);
        let a = Affine::new(&mean, &var, &gamma, &gamma, 1e-5);
        let first = batch_norm_backward(&x, None, &dy, &a, s, true, false);
        for _ in 0..3 {
            let again = batch_norm_backward(&x, None, &dy, &a, s, true, false);
            assert_eq!(first.dx, again.dx);
            assert_eq!(first.dgamma, again.dgamma);
        }
    }
}
