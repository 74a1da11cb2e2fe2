//! CNN layouts of the paper's appendix D as data: Table 3 (ResNeXt-101
//! 32x4d, the VQA v2 image encoder) and Table 4 (the CLEVR Relation Network
//! CNN). One type describes both; [`crate::cnn::ModularResNeXt`] and
//! [`crate::flops`] read it.

use serde::{Deserialize, Serialize};

use crate::error::{MoeError, Result};

/// A square convolution: kernel, stride, padding, output channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvSpec {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub channels: usize,
}

/// A square max pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// A stage: `blocks` bottleneck blocks; the first has the stage's stride.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Name in the paper's tables (conv2, conv3, ...).
    pub name: String,
    pub blocks: usize,
    /// Bottleneck width P*d.
    pub inner: usize,
    /// Output channels.
    pub out: usize,
    /// P: cardinality, the number of experts.
    pub paths: usize,
    /// Stride of the stage's first block.
    pub stride: usize,
}

/// A whole CNN: stem conv + BN + ReLU, optional max pool, stages of
/// bottleneck blocks, optional 1x1 head conv + BN + ReLU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnnLayout {
    pub name: String,
    pub input_channels: usize,
    pub stem: ConvSpec,
    pub pool: Option<PoolSpec>,
    pub stages: Vec<StageSpec>,
    /// Output channels of a final 1x1 conv (Table 4's conv5), if any.
    pub head: Option<usize>,
}

/// One block of a layout, with its place and shapes resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockSpec {
    pub stage: String,
    /// Index of the block inside its stage.
    pub index: usize,
    pub in_channels: usize,
    pub inner: usize,
    pub out_channels: usize,
    pub paths: usize,
    pub stride: usize,
    /// Input map size (H, W).
    pub input_hw: (usize, usize),
    /// Output map size (H, W).
    pub output_hw: (usize, usize),
}

/// Output size of a conv or pool along one axis; `None` when the input is too small.
pub fn out_size(input: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    (input + 2 * padding)
        .checked_sub(kernel)
        .map(|v| v / stride + 1)
}

impl CnnLayout {
    /// Table 3: ResNeXt-101 32x4d (7x7x2048 at 224x224).
    pub fn resnext101_32x4d() -> Self {
        Self::resnext101(4, "resnext101-32x4d")
    }

    /// ResNeXt-101 32x8d (torchvision's `resnext101_32x8d`): Table 3 with
    /// every bottleneck twice as wide (d = 8, 16, 32, 64 per stage; P = 32);
    /// same output widths (7x7x2048 at 224x224).
    pub fn resnext101_32x8d() -> Self {
        Self::resnext101(8, "resnext101-32x8d")
    }

    /// ResNeXt-101 32x`d`d: P = 32, bottleneck widths 32*d, 64*d, 128*d, 256*d.
    fn resnext101(d: usize, name: &str) -> Self {
        let stage = |name: &str, blocks, inner: usize, out, stride| StageSpec {
            name: name.into(),
            blocks,
            inner,
            out,
            paths: 32,
            stride,
        };
        CnnLayout {
            name: name.into(),
            input_channels: 3,
            stem: ConvSpec {
                kernel: 7,
                stride: 2,
                padding: 3,
                channels: 64,
            },
            pool: Some(PoolSpec {
                kernel: 3,
                stride: 2,
                padding: 1,
            }),
            stages: vec![
                stage("conv2", 3, 32 * d, 256, 1),
                stage("conv3", 4, 64 * d, 512, 2),
                stage("conv4", 23, 128 * d, 1024, 2),
                stage("conv5", 3, 256 * d, 2048, 2),
            ],
            head: None,
        }
    }

    /// Table 4: the CLEVR CNN (8x8x24 at 128x128).
    pub fn clevr() -> Self {
        let stage = |name: &str, stride| StageSpec {
            name: name.into(),
            blocks: 1,
            inner: 48,
            out: 48,
            paths: 12,
            stride,
        };
        CnnLayout {
            name: "clevr".into(),
            input_channels: 3,
            stem: ConvSpec {
                kernel: 3,
                stride: 2,
                padding: 1,
                channels: 64,
            },
            pool: Some(PoolSpec {
                kernel: 3,
                stride: 2,
                padding: 1,
            }),
            stages: vec![stage("conv2", 1), stage("conv3", 2), stage("conv4", 2)],
            head: Some(24),
        }
    }

    /// Layout by model name: `vqa` (Table 3), `clevr` (Table 4), or a
    /// layout's own name (`resnext101-32x4d`, `resnext101-32x8d`).
    pub fn by_model(name: &str) -> Result<Self> {
        match name {
            "vqa" | "resnext101-32x4d" => Ok(Self::resnext101_32x4d()),
            "resnext101-32x8d" => Ok(Self::resnext101_32x8d()),
            "clevr" => Ok(Self::clevr()),
            other => Err(MoeError::Unknown {
                kind: "model",
                name: other.into(),
                expected: "clevr, vqa, resnext101-32x4d, resnext101-32x8d".into(),
            }),
        }
    }

    /// The default input size of the paper for this layout.
    pub fn default_input(&self) -> (usize, usize) {
        if self.name == "clevr" {
            (128, 128)
        } else {
            (224, 224)
        }
    }

    /// Cardinality P shared by every stage, if they agree.
    pub fn paths(&self) -> Option<usize> {
        let first = self.stages.first()?.paths;
        self.stages
            .iter()
            .all(|s| s.paths == first)
            .then_some(first)
    }

    /// Checks sizes and that every stage's width splits into its P paths.
    pub fn validate(&self) -> Result<()> {
        if self.input_channels == 0
            || self.stem.channels == 0
            || self.stem.kernel == 0
            || self.stem.stride == 0
        {
            return Err(MoeError::config(
                format!("layout {} stem", self.name),
                "sizes must be at least 1",
            ));
        }
        if let Some(p) = &self.pool
            && (p.kernel == 0 || p.stride == 0)
        {
            return Err(MoeError::config(
                format!("layout {} pool", self.name),
                "kernel and stride must be at least 1",
            ));
        }
        if self.stages.is_empty() {
            return Err(MoeError::config(
                format!("layout {}", self.name),
                "needs at least one stage",
            ));
        }
        for s in &self.stages {
            let what = format!("layout {} stage {}", self.name, s.name);
            if s.blocks == 0 || s.inner == 0 || s.out == 0 || s.paths == 0 || s.stride == 0 {
                return Err(MoeError::config(
                    what,
                    "blocks, widths, paths and stride must be at least 1",
                ));
            }
            if !s.inner.is_multiple_of(s.paths) {
                return Err(MoeError::NotDivisible {
                    what: format!("{what} inner width"),
                    channels: s.inner,
                    paths: s.paths,
                });
            }
        }
        if self.head == Some(0) {
            return Err(MoeError::config(
                format!("layout {} head", self.name),
                "must have at least 1 channel",
            ));
        }
        Ok(())
    }

    /// Map size after the stem and the pool for an input (H, W).
    pub fn stem_output(&self, input: (usize, usize)) -> Result<(usize, usize)> {
        let too_small = || {
            MoeError::shape(
                format!("input size for layout {}", self.name),
                "an image large enough for the stem and pool",
                format!("{}x{}", input.0, input.1),
            )
        };
        if input.0 == 0 || input.1 == 0 {
            return Err(too_small());
        }
        let s = self.stem;
        let mut h = out_size(input.0, s.kernel, s.stride, s.padding).ok_or_else(too_small)?;
        let mut w = out_size(input.1, s.kernel, s.stride, s.padding).ok_or_else(too_small)?;
        if let Some(p) = self.pool {
            h = out_size(h, p.kernel, p.stride, p.padding).ok_or_else(too_small)?;
            w = out_size(w, p.kernel, p.stride, p.padding).ok_or_else(too_small)?;
        }
        Ok((h, w))
    }

    /// Every block with its channels and map sizes, for an input (H, W).
    pub fn blocks(&self, input: (usize, usize)) -> Result<Vec<BlockSpec>> {
        self.validate()?;
        let mut hw = self.stem_output(input)?;
        let mut ch = self.stem.channels;
        let mut out = Vec::new();
        for s in &self.stages {
            for i in 0..s.blocks {
                let stride = if i == 0 { s.stride } else { 1 };
                // 3x3, padding 1.
                let next = (
                    out_size(hw.0, 3, stride, 1).unwrap_or(0),
                    out_size(hw.1, 3, stride, 1).unwrap_or(0),
                );
                out.push(BlockSpec {
                    stage: s.name.clone(),
                    index: i,
                    in_channels: ch,
                    inner: s.inner,
                    out_channels: s.out,
                    paths: s.paths,
                    stride,
                    input_hw: hw,
                    output_hw: next,
                });
                ch = s.out;
                hw = next;
            }
        }
        Ok(out)
    }

    /// Output (C, H, W) of the whole CNN for an input (H, W).
    pub fn output_shape(&self, input: (usize, usize)) -> Result<(usize, usize, usize)> {
        let blocks = self.blocks(input)?;
        let last = blocks.last().expect("validated layouts have a block");
        let c = self.head.unwrap_or(last.out_channels);
        Ok((c, last.output_hw.0, last.output_hw.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table3_shapes_at_224() {
        let l = CnnLayout::resnext101_32x4d();
        assert_eq!(l.output_shape((224, 224)).unwrap(), (2048, 7, 7));
        let blocks = l.blocks((224, 224)).unwrap();
        assert_eq!(blocks.len(), 3 + 4 + 23 + 3);
        let sizes: Vec<_> = ["conv2", "conv3", "conv4", "conv5"]
            .iter()
            .map(|s| blocks.iter().find(|b| b.stage == *s).unwrap().output_hw)
            .collect();
        assert_eq!(sizes, vec![(56, 56), (28, 28), (14, 14), (7, 7)]);
        // 32 paths everywhere; the path width d doubles with the width: 4 ("32x4d"), 8, 16, 32.
        let d: Vec<_> = ["conv2", "conv3", "conv4", "conv5"]
            .iter()
            .map(|s| {
                blocks
                    .iter()
                    .find(|b| b.stage == *s)
                    .map(|b| b.inner / b.paths)
                    .unwrap()
            })
            .collect();
        assert_eq!(d, vec![4, 8, 16, 32]);
        assert!(blocks.iter().all(|b| b.paths == 32));
    }

    #[test]
    fn resnext101_32x8d_doubles_the_path_width() {
        let l = CnnLayout::resnext101_32x8d();
        assert_eq!(l.name, "resnext101-32x8d");
        assert_eq!(l.output_shape((224, 224)).unwrap(), (2048, 7, 7));
        let d: Vec<_> = l.stages.iter().map(|s| s.inner / s.paths).collect();
        assert_eq!(d, vec![8, 16, 32, 64]);
        let x4 = CnnLayout::resnext101_32x4d();
        for (a, b) in l.stages.iter().zip(&x4.stages) {
            assert_eq!(
                (a.blocks, a.out, a.paths, a.stride),
                (b.blocks, b.out, b.paths, b.stride)
            );
            assert_eq!(a.inner, 2 * b.inner);
        }
        assert_eq!(CnnLayout::by_model("resnext101-32x8d").unwrap(), l);
    }

    #[test]
    fn table4_shapes_at_128() {
        let l = CnnLayout::clevr();
        assert_eq!(l.output_shape((128, 128)).unwrap(), (24, 8, 8));
        let blocks = l.blocks((128, 128)).unwrap();
        let hw: Vec<_> = blocks.iter().map(|b| b.output_hw).collect();
        assert_eq!(hw, vec![(32, 32), (16, 16), (8, 8)]);
        assert_eq!(blocks[0].in_channels, 64);
        assert!(blocks.iter().all(|b| b.paths == 12 && b.inner == 48));
    }

    #[test]
    fn bad_layouts_are_errors() {
        let mut l = CnnLayout::clevr();
        l.stages[1].inner = 50;
        assert!(matches!(
            l.validate(),
            Err(MoeError::NotDivisible {
                channels: 50,
                paths: 12,
                ..
            })
        ));
        assert!(CnnLayout::clevr().stem_output((0, 5)).is_err());
        assert!(CnnLayout::resnext101_32x4d().stem_output((2, 2)).is_ok());
        assert!(matches!(
            CnnLayout::by_model("alexnet"),
            Err(MoeError::Unknown { .. })
        ));
    }
}
