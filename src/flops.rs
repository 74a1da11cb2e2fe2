//! Analytic multiply-add (MAC) counts of a layout, paper section 2.
//!
//! Convention (one MAC = one multiply and one add, per image):
//! - convolution: `(C_in / groups) * kh * kw * C_out * H_out * W_out`;
//! - batch norm: one MAC per output element (eval BN is a per-channel
//!   scale and shift);
//! - the gate scaling of the selected paths: one MAC per scaled element
//!   (gated networks only);
//! - ReLU, max pool, residual additions, softmax and tanh: not counted (no
//!   multiplies);
//! - a block running k of its P paths of width d counts `k*d` bottleneck
//!   channels in the reduce, the 3x3, the expand and their BNs; this is the
//!   paper's `k*d*C*H1*W1 + 9*d^2*k*H2*W2 + k*d*C*H3*W3 + O(k)`;
//! - gate controllers are reported apart (`gate_macs`), per block
//!   `D*A*C + B*C + D*C + D*A + A*B + B*P` for D regions of A channels,
//!   question length B, hidden C and P paths.
//!
//! The ungated baseline is the plain ResNeXt: all paths, no gate scaling, no
//! controllers.

use serde::Serialize;

use crate::cnn::layout::{BlockSpec, CnnLayout, out_size};
use crate::cnn::resnext::GateSettings;
use crate::error::Result;
use crate::moe::check_k;

/// MACs of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerMacs {
    pub name: String,
    pub macs: u64,
    /// Part of a gate controller (reported apart from the CNN).
    pub gate: bool,
}

/// MACs of a whole CNN for one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MacsCount {
    pub layers: Vec<LayerMacs>,
    pub cnn_macs: u64,
    pub gate_macs: u64,
}

impl MacsCount {
    /// CNN plus gate controllers.
    pub fn total(&self) -> u64 {
        self.cnn_macs + self.gate_macs
    }
}

fn conv_macs(cin: usize, cout: usize, kernel: usize, groups: usize, hw: (usize, usize)) -> u64 {
    (cin / groups * kernel * kernel * cout * hw.0 * hw.1) as u64
}

/// MACs of one bottleneck block running `k` paths (`None`: plain, ungated block).
pub fn block_macs(b: &BlockSpec, k: Option<usize>) -> Vec<LayerMacs> {
    let d = b.inner / b.paths;
    let active = k.unwrap_or(b.paths) * d;
    let (hin, hout) = (b.input_hw, b.output_hw);
    let area = |hw: (usize, usize)| (hw.0 * hw.1) as u64;
    let name = |part: &str| format!("{}.{}.{part}", b.stage, b.index);
    let layer = |part: &str, macs| LayerMacs {
        name: name(part),
        macs,
        gate: false,
    };
    let mut v = vec![
        layer("reduce", conv_macs(b.in_channels, active, 1, 1, hin)),
        layer("bn_reduce", active as u64 * area(hin)),
        // Grouped 3x3: each active channel sees d inputs.
        layer("conv3x3", (9 * d * active) as u64 * area(hout)),
        layer("bn_conv", active as u64 * area(hout)),
    ];
    if k.is_some() {
        v.push(layer("gate_scale", active as u64 * area(hout)));
    }
    v.push(layer(
        "expand",
        conv_macs(active, b.out_channels, 1, 1, hout),
    ));
    v.push(layer("bn_expand", b.out_channels as u64 * area(hout)));
    if b.stride != 1 || b.in_channels != b.out_channels {
        v.push(layer(
            "shortcut",
            conv_macs(b.in_channels, b.out_channels, 1, 1, hout),
        ));
        v.push(layer("bn_shortcut", b.out_channels as u64 * area(hout)));
    }
    v
}

/// MACs of the gate controller in front of a block.
pub fn gate_controller_macs(b: &BlockSpec, gate: &GateSettings) -> u64 {
    let dd = (b.input_hw.0 * b.input_hw.1) as u64;
    let (a, bq, c, p) = (
        b.in_channels as u64,
        gate.question_dim as u64,
        gate.hidden as u64,
        b.paths as u64,
    );
    dd * a * c + bq * c + dd * c + dd * a + a * bq + bq * p
}

/// MACs per image for an input (H, W); `k = None` is the ungated baseline.
pub fn count_macs(
    layout: &CnnLayout,
    input: (usize, usize),
    k: Option<usize>,
    gate: &GateSettings,
) -> Result<MacsCount> {
    let blocks = layout.blocks(input)?;
    if let Some(k) = k {
        for s in &layout.stages {
            check_k(k, s.paths)?;
        }
    }
    let s = layout.stem;
    let stem_hw = (
        out_size(input.0, s.kernel, s.stride, s.padding).unwrap_or(0),
        out_size(input.1, s.kernel, s.stride, s.padding).unwrap_or(0),
    );
    let mut layers = vec![
        LayerMacs {
            name: "stem".into(),
            macs: conv_macs(layout.input_channels, s.channels, s.kernel, 1, stem_hw),
            gate: false,
        },
        LayerMacs {
            name: "bn_stem".into(),
            macs: (s.channels * stem_hw.0 * stem_hw.1) as u64,
            gate: false,
        },
    ];
    for b in &blocks {
        if k.is_some() {
            layers.push(LayerMacs {
                name: format!("{}.{}.gate_controller", b.stage, b.index),
                macs: gate_controller_macs(b, gate),
                gate: true,
            });
        }
        layers.extend(block_macs(b, k));
    }
    if let (Some(c), Some(last)) = (layout.head, blocks.last()) {
        let hw = last.output_hw;
        layers.push(LayerMacs {
            name: "head".into(),
            macs: conv_macs(last.out_channels, c, 1, 1, hw),
            gate: false,
        });
        layers.push(LayerMacs {
            name: "bn_head".into(),
            macs: (c * hw.0 * hw.1) as u64,
            gate: false,
        });
    }
    let gate_macs = layers.iter().filter(|l| l.gate).map(|l| l.macs).sum();
    let cnn_macs = layers.iter().filter(|l| !l.gate).map(|l| l.macs).sum();
    Ok(MacsCount {
        layers,
        cnn_macs,
        gate_macs,
    })
}

/// The paper's reported CNN FLOPs (Tables 1 and 2); `None` k is the baseline row.
pub fn paper_flops(model: &str, k: Option<usize>) -> Option<f64> {
    match (model, k) {
        ("vqa", None) => Some(156.04e9),
        ("vqa", Some(32)) => Some(181.39e9),
        ("vqa", Some(16)) => Some(77.72e9),
        ("vqa", Some(8)) => Some(45.94e9),
        ("clevr", Some(12)) => Some(5.37e7),
        ("clevr", Some(6)) => Some(3.21e7),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cnn::layout::{ConvSpec, StageSpec};

    fn tiny() -> CnnLayout {
        CnnLayout {
            name: "tiny".into(),
            input_channels: 3,
            stem: ConvSpec {
                kernel: 3,
                stride: 1,
                padding: 1,
                channels: 8,
            },
            pool: None,
            stages: vec![StageSpec {
                name: "s".into(),
                blocks: 1,
                inner: 8,
                out: 16,
                paths: 4,
                stride: 2,
            }],
            head: Some(5),
        }
    }

    #[test]
    fn hand_counted_tiny_network() {
        // Input 4x4. Stem: 3*9*8*16 = 3456, BN 8*16 = 128.
        // Block (C_in 8, P 4, d 2, C_out 16, stride 2, out 2x2), k = 2 -> 4 active channels:
        // reduce 8*4*16 = 512, bn 4*16 = 64, 3x3 9*2*4*4 = 288, bn 4*4 = 16, gate 16,
        // expand 4*16*4 = 256, bn 16*4 = 64, shortcut 8*16*4 = 512, bn 64.
        // Head: 16*5*4 = 320, bn 5*4 = 20.
        let g = GateSettings::new().with_question_dim(10).with_hidden(6);
        let m = count_macs(&tiny(), (4, 4), Some(2), &g).unwrap();
        assert_eq!(
            m.cnn_macs,
            3456 + 128 + 512 + 64 + 288 + 16 + 16 + 256 + 64 + 512 + 64 + 320 + 20
        );
        // Controller: D 16, A 8, B 10, C 6, P 4:
        // 16*8*6 + 10*6 + 16*6 + 16*8 + 8*10 + 10*4 = 768 + 60 + 96 + 128 + 80 + 40.
        assert_eq!(m.gate_macs, 768 + 60 + 96 + 128 + 80 + 40);
        // Baseline: 8 active channels, no gate scale, no controller.
        let b = count_macs(&tiny(), (4, 4), None, &g).unwrap();
        assert_eq!(b.gate_macs, 0);
        assert_eq!(
            b.cnn_macs,
            3456 + 128 + 1024 + 128 + 576 + 32 + 512 + 64 + 512 + 64 + 320 + 20
        );
    }

    #[test]
    fn paper_formula_for_a_block() {
        // k*d*C*H1*W1 + 9*d^2*k*H2*W2 + k*d*C*H3*W3 (C_in = C_out = C, stride 1), plus BN and gates.
        let l = CnnLayout::resnext101_32x4d();
        let b = &l.blocks((224, 224)).unwrap()[1]; // conv2, block 1: 256 -> 256 at 56x56
        let (k, d, c, hw) = (8u64, 4u64, 256u64, 56u64 * 56);
        let conv: u64 = block_macs(b, Some(8))
            .iter()
            .filter(|l| {
                ["conv2.1.reduce", "conv2.1.conv3x3", "conv2.1.expand"].contains(&l.name.as_str())
            })
            .map(|l| l.macs)
            .sum();
        assert_eq!(conv, k * d * c * hw + 9 * d * d * k * hw + k * d * c * hw);
    }

    #[test]
    fn sparsity_scales_the_cnn_cost() {
        let l = CnnLayout::clevr();
        let g = GateSettings::new();
        let full = count_macs(&l, (128, 128), Some(12), &g).unwrap();
        let half = count_macs(&l, (128, 128), Some(6), &g).unwrap();
        let base = count_macs(&l, (128, 128), None, &g).unwrap();
        assert!(half.cnn_macs < full.cnn_macs && base.cnn_macs < full.cnn_macs);
        assert_eq!(half.gate_macs, full.gate_macs);
        assert!(count_macs(&l, (128, 128), Some(13), &g).is_err());
    }
}
