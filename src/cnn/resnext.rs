//! The modular ResNeXt (paper section 2, appendix D): built from a
//! [`CnnLayout`] and a k. Every bottleneck block gets its own gate controller
//! reading the question vector and the block's input map; the network runs
//! dense (reference and training) or sparse (only the top-k paths of each
//! sample) and returns every block's gates for the balance loss and for
//! analysis. Built with `gated = false` it is the plain ResNeXt, the baseline
//! row of the paper's Table 1.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use crate::cnn::layout::CnnLayout;
use crate::error::{MoeError, Result as MoeResult};
use crate::moe::{
    Bottleneck, BottleneckConfig, GateController, GateControllerConfig, Gates, check_k,
};

/// Settings shared by every gate controller of a network.
#[derive(Config, Debug)]
pub struct GateSettings {
    /// B: length of the question vector fed to every controller.
    #[config(default = 128)]
    pub question_dim: usize,
    /// C: hidden size of the controllers' attention.
    #[config(default = 64)]
    pub hidden: usize,
    /// Initial value of b_g.
    #[config(default = 1.0)]
    pub bias_init: f64,
}

/// Configuration of a modular ResNeXt.
#[derive(Config, Debug)]
pub struct ModularResNeXtConfig {
    pub layout: CnnLayout,
    /// Paths kept per block (1..=P); may be changed at inference.
    pub k: usize,
    /// `false` builds the plain ResNeXt (no gates, no sparsity).
    #[config(default = true)]
    pub gated: bool,
    #[config(default = "GateSettings::new()")]
    pub gate: GateSettings,
}

/// How the blocks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Execution {
    /// All paths computed, unselected gates zeroed (reference; training).
    Dense,
    /// Only the selected paths computed (inference; eval-mode BN).
    Sparse,
}

/// 1x1 (or any) conv followed by BN and ReLU.
#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

impl ConvBn {
    fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        device: &Device,
    ) -> Self {
        ConvBn {
            conv: Conv2dConfig::new([cin, cout], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(
                    padding, padding, padding, padding,
                ))
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(cout).init(device),
        }
    }

    /// conv, BN, ReLU.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = crate::fused::conv::conv2d(x, &self.conv);
        crate::fused::batchnorm::batch_norm(y, &self.bn, None, true)
    }
}

/// A ResNeXt whose bottleneck paths are experts.
#[derive(Module, Debug)]
pub struct ModularResNeXt {
    pub stem: ConvBn,
    pub pool: Option<MaxPool2d>,
    pub blocks: Vec<Bottleneck>,
    /// One per block; empty for the plain ResNeXt.
    pub gates: Vec<GateController>,
    pub head: Option<ConvBn>,
    k: usize,
    input_channels: usize,
    question_dim: usize,
}

/// Output of the CNN.
#[derive(Debug, Clone)]
pub struct CnnOutput {
    /// Final feature map [N, C, H, W].
    pub features: Tensor<4>,
    /// Gates of every block, in order (empty for the plain ResNeXt).
    pub gates: Vec<Gates>,
}

impl ModularResNeXtConfig {
    /// Builds the network; fails on an invalid layout or k.
    pub fn init(&self, device: &Device) -> MoeResult<ModularResNeXt> {
        let layout = &self.layout;
        layout.validate()?;
        let stem = ConvBn::new(
            layout.input_channels,
            layout.stem.channels,
            layout.stem.kernel,
            layout.stem.stride,
            layout.stem.padding,
            device,
        );
        let pool = layout.pool.map(|p| {
            MaxPool2dConfig::new([p.kernel, p.kernel])
                .with_strides([p.stride, p.stride])
                .with_padding(PaddingConfig2d::Explicit(
                    p.padding, p.padding, p.padding, p.padding,
                ))
                .init()
        });
        let mut blocks = Vec::new();
        let mut gates = Vec::new();
        let mut ch = layout.stem.channels;
        for stage in &layout.stages {
            if self.gated {
                check_k(self.k, stage.paths)?;
            }
            for i in 0..stage.blocks {
                let stride = if i == 0 { stage.stride } else { 1 };
                blocks.push(
                    BottleneckConfig::new(ch, stage.inner, stage.out, stage.paths)
                        .with_stride(stride)
                        .init(device)?,
                );
                if self.gated {
                    gates.push(
                        GateControllerConfig::new(ch, self.gate.question_dim, stage.paths)
                            .with_hidden(self.gate.hidden)
                            .with_gate_bias_init(self.gate.bias_init)
                            .init(device)?,
                    );
                }
                ch = stage.out;
            }
        }
        let head = layout.head.map(|c| ConvBn::new(ch, c, 1, 1, 0, device));
        Ok(ModularResNeXt {
            stem,
            pool,
            blocks,
            gates,
            head,
            k: self.k,
            input_channels: layout.input_channels,
            question_dim: if self.gated {
                self.gate.question_dim
            } else {
                0
            },
        })
    }
}

impl ModularResNeXt {
    /// Default k.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether the blocks are gated.
    pub fn is_gated(&self) -> bool {
        !self.gates.is_empty()
    }

    /// Fails unless `dims` is [N, C_in, H, W] with N, H, W >= 1.
    pub fn check_images(&self, dims: &[usize]) -> MoeResult<()> {
        let c = self.input_channels;
        if dims.len() != 4 || dims[1] != c || dims.contains(&0) {
            return Err(MoeError::shape(
                "CNN input images",
                format!("[N, {c}, H, W] with N, H, W >= 1"),
                format!("{dims:?}"),
            ));
        }
        Ok(())
    }

    /// Forward with the configured k.
    pub fn forward(
        &self,
        images: Tensor<4>,
        question: Option<Tensor<2>>,
        exec: Execution,
    ) -> MoeResult<CnnOutput> {
        self.forward_k(images, question, self.k, exec)
    }

    /// Forward with an explicit k (sparsity as an inference-time knob).
    pub fn forward_k(
        &self,
        images: Tensor<4>,
        question: Option<Tensor<2>>,
        k: usize,
        exec: Execution,
    ) -> MoeResult<CnnOutput> {
        self.check_images(&images.dims())?;
        let n = images.dims()[0];
        let question = match (self.is_gated(), question) {
            (false, _) => None,
            (true, Some(q)) => {
                if q.dims() != [n, self.question_dim] {
                    return Err(MoeError::shape(
                        "question vector",
                        format!("[{n}, {}]", self.question_dim),
                        format!("{:?}", q.dims()),
                    ));
                }
                Some(q)
            }
            (true, None) => {
                return Err(MoeError::config(
                    "question vector",
                    "a gated network needs the question vector",
                ));
            }
        };
        let mut x = self.stem.forward(images);
        if let Some(pool) = &self.pool {
            x = crate::fused::maxpool::max_pool(x, pool);
        }
        let mut all_gates = Vec::with_capacity(self.gates.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = match (&question, self.gates.get(i)) {
                (Some(q), Some(ctrl)) => {
                    let gates = ctrl.forward(x.clone(), q.clone(), k)?;
                    let y = match exec {
                        Execution::Dense => block.forward_dense(x, Some(gates.masked_values()))?,
                        Execution::Sparse => {
                            block.forward_sparse(x, gates.values.clone(), &gates.indices)?
                        }
                    };
                    all_gates.push(gates);
                    y
                }
                _ => block.forward_dense(x, None)?,
            };
        }
        if let Some(head) = &self.head {
            x = head.forward(x);
        }
        Ok(CnnOutput {
            features: x,
            gates: all_gates,
        })
    }
}
