//! Modular bottleneck block, paper section 2 and figure 1.
//!
//! A ResNeXt bottleneck in grouped form: 1x1 reduce (C_in -> P*d), BN, ReLU,
//! 3x3 grouped conv (P groups of width d, stride s), BN, ReLU, 1x1 expand
//! (P*d -> C_out), BN, plus the shortcut (identity, or 1x1/s conv + BN when
//! the shape changes), then ReLU. Path i is the i-th group: channels
//! `i*d..(i+1)*d` of the reduce, the 3x3 and the expand's input. Each path's
//! output is scaled by its gate value before the expand sums the paths.
//!
//! The same parameters run two ways:
//! - [`Bottleneck::forward_dense`]: every path computed, gates of unselected
//!   paths zeroed. The reference, and the training path (BN in train mode on
//!   an autodiff device, through [`crate::fused::batchnorm`], which fuses
//!   each BN with the ReLU or the residual add after it).
//! - [`Bottleneck::forward_sparse`]: only the k selected paths of each
//!   sample: the paper's "efficient implementation". The selected rows of the
//!   reduce weight, the selected groups of the 3x3 and the matching columns of
//!   the expand are gathered per sample; the reduce and expand run as batched
//!   matmuls and the 3x3 as one grouped conv with the batch folded into the
//!   groups (N*k groups). BN uses running statistics (eval semantics) folded
//!   into a per-channel scale and shift, gathered like the weights.

use burn::config::Config;
use burn::module::Module;
use burn::module::RunningState;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

use crate::error::{MoeError, Result as MoeResult};
use crate::fused::batchnorm::batch_norm;
use crate::fused::conv::conv2d as conv_layer;

/// Configuration of a modular bottleneck block.
#[derive(Config, Debug)]
pub struct BottleneckConfig {
    /// C_in.
    pub in_channels: usize,
    /// Bottleneck width P*d.
    pub inner_channels: usize,
    /// C_out.
    pub out_channels: usize,
    /// P: number of paths (cardinality).
    pub paths: usize,
    /// Stride of the 3x3 conv (and of the projection shortcut).
    #[config(default = 1)]
    pub stride: usize,
}

/// Projection shortcut: 1x1 conv with stride, then BN.
#[derive(Module, Debug)]
pub struct Shortcut {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

/// A modular ResNeXt bottleneck block whose P paths are experts.
#[derive(Module, Debug)]
pub struct Bottleneck {
    pub reduce: Conv2d,
    pub bn_reduce: BatchNorm,
    pub conv: Conv2d,
    pub bn_conv: BatchNorm,
    pub expand: Conv2d,
    pub bn_expand: BatchNorm,
    pub shortcut: Option<Shortcut>,
    paths: usize,
    path_width: usize,
    stride: usize,
}

impl BottleneckConfig {
    /// Checks the configuration without building anything.
    pub fn validate(&self) -> MoeResult<usize> {
        for (name, v) in [
            ("block in_channels", self.in_channels),
            ("block inner_channels", self.inner_channels),
            ("block out_channels", self.out_channels),
            ("block paths", self.paths),
            ("block stride", self.stride),
        ] {
            if v == 0 {
                return Err(MoeError::config(name, "must be at least 1"));
            }
        }
        if !self.inner_channels.is_multiple_of(self.paths) {
            return Err(MoeError::NotDivisible {
                what: "block inner_channels".into(),
                channels: self.inner_channels,
                paths: self.paths,
            });
        }
        Ok(self.inner_channels / self.paths)
    }

    /// Builds the block; fails on a width that does not split into P paths.
    pub fn init(&self, device: &Device) -> MoeResult<Bottleneck> {
        let d = self.validate()?;
        let (cin, inner, cout, s) = (
            self.in_channels,
            self.inner_channels,
            self.out_channels,
            self.stride,
        );
        let reduce = Conv2dConfig::new([cin, inner], [1, 1])
            .with_bias(false)
            .init(device);
        let conv = Conv2dConfig::new([inner, inner], [3, 3])
            .with_stride([s, s])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_groups(self.paths)
            .with_bias(false)
            .init(device);
        let expand = Conv2dConfig::new([inner, cout], [1, 1])
            .with_bias(false)
            .init(device);
        let shortcut = (s != 1 || cin != cout).then(|| Shortcut {
            conv: Conv2dConfig::new([cin, cout], [1, 1])
                .with_stride([s, s])
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(cout).init(device),
        });
        Ok(Bottleneck {
            reduce,
            bn_reduce: BatchNormConfig::new(inner).init(device),
            conv,
            bn_conv: BatchNormConfig::new(inner).init(device),
            expand,
            bn_expand: BatchNormConfig::new(cout).init(device),
            shortcut,
            paths: self.paths,
            path_width: d,
            stride: s,
        })
    }
}

/// BN with random affine parameters and running statistics, so that
/// gathering BN parameters is exercised (a fresh BN is the identity).
pub fn randomize_batch_norm(bn: BatchNorm, device: &Device) -> BatchNorm {
    let [c] = bn.gamma.dims();
    let u = |lo: f64, hi: f64| Tensor::<1>::random([c], Distribution::Uniform(lo, hi), device);
    let n = |std: f64| Tensor::<1>::random([c], Distribution::Normal(0.0, std), device);
    BatchNorm {
        gamma: bn.gamma.map(|_| u(0.5, 1.5)),
        beta: bn.beta.map(|_| n(0.2)),
        running_mean: RunningState::new(n(0.3)),
        running_var: RunningState::new(u(0.5, 2.0)),
        ..bn
    }
}

/// Eval-mode BN as `x * scale + shift` per channel, from the running statistics.
pub fn bn_affine(bn: &BatchNorm) -> (Tensor<1>, Tensor<1>) {
    let var = bn.running_var.value();
    let mean = bn.running_mean.value();
    let scale = bn.gamma.val() / var.add_scalar(bn.epsilon).sqrt();
    let shift = bn.beta.val() - mean * scale.clone();
    (scale, shift)
}

/// Eval-mode BN of a [N, C, ...] tensor, whatever the device.
fn bn_eval<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    let (scale, shift) = bn_affine(bn);
    let c = scale.dims()[0];
    let mut shape = [1usize; D];
    shape[1] = c;
    x * scale.reshape(shape) + shift.reshape(shape)
}

impl Bottleneck {
    /// The same block with every BN randomised (see [`randomize_batch_norm`]);
    /// for tests and benchmarks, where identity BNs would hide gathering bugs.
    pub fn with_random_batch_norms(self, device: &Device) -> Self {
        Bottleneck {
            bn_reduce: randomize_batch_norm(self.bn_reduce, device),
            bn_conv: randomize_batch_norm(self.bn_conv, device),
            bn_expand: randomize_batch_norm(self.bn_expand, device),
            shortcut: self.shortcut.map(|s| Shortcut {
                bn: randomize_batch_norm(s.bn, device),
                ..s
            }),
            ..self
        }
    }

    /// P.
    pub fn paths(&self) -> usize {
        self.paths
    }
    /// d.
    pub fn path_width(&self) -> usize {
        self.path_width
    }
    /// Stride of the block.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// C_in.
    pub fn in_channels(&self) -> usize {
        self.reduce.weight.dims()[1]
    }
    /// C_out.
    pub fn out_channels(&self) -> usize {
        self.expand.weight.dims()[0]
    }

    /// Fails unless `x` is [N, C_in, H, W] with N, H, W >= 1.
    pub fn check_input(&self, dims: &[usize]) -> MoeResult<()> {
        let cin = self.in_channels();
        let ok = dims.len() == 4 && dims[1] == cin && dims[0] > 0 && dims[2] > 0 && dims[3] > 0;
        if !ok {
            return Err(MoeError::shape(
                "block input",
                format!("[N, {cin}, H, W] with N, H, W >= 1"),
                format!("{dims:?}"),
            ));
        }
        Ok(())
    }

    fn check_gates(&self, n: usize, gates: &Tensor<2>) -> MoeResult<()> {
        let dims = gates.dims();
        if dims != [n, self.paths] {
            return Err(MoeError::shape(
                "block gates",
                format!("[{n}, {}]", self.paths),
                format!("{dims:?}"),
            ));
        }
        Ok(())
    }

    /// The shortcut branch: `x`, or its projection.
    fn shortcut(&self, x: Tensor<4>, eval_bn: bool) -> Tensor<4> {
        match &self.shortcut {
            Some(sc) if eval_bn => bn_eval(&sc.bn, conv_layer(x, &sc.conv)),
            Some(sc) => batch_norm(conv_layer(x, &sc.conv), &sc.bn, None, false),
            None => x,
        }
    }

    /// Dense reference: all P paths; `gates` [N, P] scales each path (pass the
    /// masked gates to zero unselected paths). `None` runs the plain ResNeXt
    /// block (no gating). BN follows the device: train mode on autodiff.
    pub fn forward_dense(&self, x: Tensor<4>, gates: Option<Tensor<2>>) -> MoeResult<Tensor<4>> {
        self.check_input(&x.dims())?;
        let n = x.dims()[0];
        let h = batch_norm(
            conv_layer(x.clone(), &self.reduce),
            &self.bn_reduce,
            None,
            true,
        );
        let mut h = batch_norm(conv_layer(h, &self.conv), &self.bn_conv, None, true);
        if let Some(g) = gates {
            self.check_gates(n, &g)?;
            let g = g
                .reshape([n, self.paths, 1])
                .repeat_dim(2, self.path_width)
                .reshape([n, self.paths * self.path_width, 1, 1]);
            h = h * g;
        }
        let short = self.shortcut(x, false);
        Ok(batch_norm(
            conv_layer(h, &self.expand),
            &self.bn_expand,
            Some(short),
            true,
        ))
    }

    /// Sparse execution: only the selected paths of each sample run.
    ///
    /// `gates` is g' [N, P] (unmasked; only the selected entries are read) and
    /// `indices[n]` the k distinct selected paths of sample n (same k for all).
    /// BN uses running statistics, so this equals [`Self::forward_dense`] with
    /// masked gates on a non-autodiff device.
    pub fn forward_sparse(
        &self,
        x: Tensor<4>,
        gates: Tensor<2>,
        indices: &[Vec<usize>],
    ) -> MoeResult<Tensor<4>> {
        self.check_input(&x.dims())?;
        let [n, cin, h, w] = x.dims();
        self.check_gates(n, &gates)?;
        let k = self.check_indices(n, indices)?;
        let (p, d) = (self.paths, self.path_width);
        let kd = k * d;
        let device = x.device();

        // Gather indices: bottleneck channels and (sample, path) gate entries.
        let mut ch = Vec::with_capacity(n * kd);
        let mut gate_idx = Vec::with_capacity(n * k);
        for (s, sel) in indices.iter().enumerate() {
            let mut sel = sel.clone();
            sel.sort_unstable(); // ascending: contiguous-ish weight rows
            for &path in &sel {
                gate_idx.push((s * p + path) as i64);
                ch.extend((0..d).map(|c| (path * d + c) as i64));
            }
        }
        let ch = Tensor::<1, Int>::from_data(TensorData::new(ch, [n * kd]), &device);
        let gate_idx = Tensor::<1, Int>::from_data(TensorData::new(gate_idx, [n * k]), &device);

        // 1x1 reduce on the selected rows: [N, kd, C_in] @ [N, C_in, HW].
        let w1 = self
            .reduce
            .weight
            .val()
            .reshape([p * d, cin])
            .select(0, ch.clone());
        let hid = w1
            .reshape([n, kd, cin])
            .matmul(x.clone().reshape([n, cin, h * w]));
        let (s1, t1) = bn_affine(&self.bn_reduce);
        let hid = relu(
            hid * s1.select(0, ch.clone()).reshape([n, kd, 1])
                + t1.select(0, ch.clone()).reshape([n, kd, 1]),
        );

        // 3x3 grouped conv on the gathered groups, batch folded into groups.
        let w2 = self.conv.weight.val().select(0, ch.clone()); // [N*kd, d, 3, 3]
        let s = self.stride;
        let hid = conv2d(
            hid.reshape([1, n * kd, h, w]),
            w2,
            None,
            ConvOptions::new([s, s], [1, 1], [1, 1], n * k),
        );
        let [_, _, h2, w2_] = hid.dims();
        let (s2, t2) = bn_affine(&self.bn_conv);
        let g = gates
            .reshape([n * p])
            .select(0, gate_idx)
            .reshape([n, k, 1])
            .repeat_dim(2, d)
            .reshape([n, kd, 1]);
        let hid = relu(
            hid.reshape([n, kd, h2 * w2_]) * s2.select(0, ch.clone()).reshape([n, kd, 1])
                + t2.select(0, ch.clone()).reshape([n, kd, 1]),
        ) * g;

        // 1x1 expand on the matching columns: [N, C_out, kd] @ [N, kd, HW2].
        let cout = self.out_channels();
        let w3 = self
            .expand
            .weight
            .val()
            .reshape([cout, p * d])
            .swap_dims(0, 1)
            .select(0, ch)
            .reshape([n, kd, cout])
            .swap_dims(1, 2);
        let out = w3.matmul(hid).reshape([n, cout, h2, w2_]);
        let out = bn_eval(&self.bn_expand, out);
        Ok(relu(out + self.shortcut(x, true)))
    }

    fn check_indices(&self, n: usize, indices: &[Vec<usize>]) -> MoeResult<usize> {
        if indices.len() != n {
            return Err(MoeError::shape(
                "block selected paths",
                format!("one list per sample ({n})"),
                format!("{} lists", indices.len()),
            ));
        }
        let k = indices.first().map_or(0, Vec::len);
        crate::moe::gate::check_k(k, self.paths)?;
        for (s, sel) in indices.iter().enumerate() {
            let mut seen = vec![false; self.paths];
            let valid = sel.len() == k
                && sel
                    .iter()
                    .all(|&i| i < self.paths && !std::mem::replace(&mut seen[i], true));
            if !valid {
                return Err(MoeError::shape(
                    format!("block selected paths of sample {s}"),
                    format!("{k} distinct path indices below {}", self.paths),
                    format!("{sel:?}"),
                ));
            }
        }
        Ok(k)
    }
}
