//! Pretrained weights for the modular CNN, and our own CNN weight files.
//!
//! # Importing a torchvision or timm ResNeXt
//!
//! [`import_resnext`] reads a PyTorch ResNeXt state dict saved as
//! `.safetensors` (e.g. torchvision's `resnext101_32x4d` / `resnext101_32x8d`,
//! or timm's, which use the same names) into a [`ModularResNeXt`] built from a
//! [`ModularResNeXtConfig`]:
//!
//! | state dict | modular CNN |
//! |---|---|
//! | `conv1.weight`, `bn1.*` | `stem.conv`, `stem.bn` |
//! | `layer{s}.{i}.conv1.weight`, `.bn1.*` | block: `reduce`, `bn_reduce` |
//! | `layer{s}.{i}.conv2.weight`, `.bn2.*` | block: `conv` (grouped 3x3), `bn_conv` |
//! | `layer{s}.{i}.conv3.weight`, `.bn3.*` | block: `expand` (x P when gated, see below), `bn_expand` |
//! | `layer{s}.{i}.downsample.0.weight`, `.downsample.1.*` | block: `shortcut.conv`, `shortcut.bn` |
//! | `fc.*`, `*.num_batches_tracked` | skipped (listed in the report) |
//!
//! `layer{s}` is the s-th stage of the layout (1-based, whatever the stage's
//! own name) and `i` the block inside it; `bn*.{weight, bias, running_mean,
//! running_var}` go to BN's gamma, beta and running statistics. A common
//! prefix such as `module.` or `model.` is detected and stripped. Tensors may
//! be F32, F16, BF16 or F64 and are converted to f32.
//!
//! Every tensor's shape is checked against the module built from the
//! config's layout; a tensor of another shape, a missing tensor, or tensors
//! the layout has no place for (anything but `fc.*` and `num_batches_tracked`)
//! are errors that name the file and the tensor. The layout is taken from the
//! config, not guessed: [`infer_layout`] reads only the file's header and
//! returns the layout its shapes describe (the `resnext101-32x4d` or
//! `resnext101-32x8d` preset when they match one), for a caller that wants
//! to build the config from the file; a shape error also says which preset
//! the file looks like when it is another one than the config's.
//!
//! Paths are groups. The 3x3 conv of a block is one grouped conv with P
//! groups, group i being path (expert) i: output channels `i*d..(i+1)*d` of
//! `conv2.weight` ([P*d, d, 3, 3]) and the matching channels of `conv1`,
//! `bn1`, `bn2` and input channels of `conv3`. PyTorch's grouped convolution
//! uses the same channel order, so group i of the state dict maps to path i
//! of our block directly, without any permutation.
//!
//! Gate scaling. A gated block multiplies each path's output (after
//! `bn_conv` and ReLU) by its gate value before the expand sums the paths;
//! with equal gates and k = P every gate is 1/P, so the expand's input is
//! the original one divided by P. The importer therefore multiplies the
//! expand weights (`conv3`) by P. This is exact: the expand is a linear
//! 1x1 conv without bias followed by its BN, so `(P W)(h / P) = W h`, and the
//! imported network at k = P with equal gates computes the original network
//! (up to float rounding). With unequal or top-k gates it is the
//! mixture the paper trains from there. The plain ResNeXt (`gated: false`)
//! runs its blocks without gates (every path weighted 1), so its weights are
//! loaded unscaled.
//!
//! Not in the file, and left at their fresh initialisation: the gate
//! controllers (b_g = +1 and W_g ~ N(0, 0.01), so the first gates are close to
//! uniform), and the layout's head conv if it has one. The layout's max pool
//! has no weights; torchvision's is 3x3/2 with padding 1, as in both
//! ResNeXt-101 presets.
//!
//! # Our own CNN files
//!
//! [`save_cnn`] writes one file, atomically (a temporary sibling fsynced
//! and then renamed over `path`), and [`load_cnn`] reads it back:
//!
//! ```text
//! bytes 0..8    magic  b"MOEVQCNN"
//! bytes 8..16   n: header length, u64 little-endian
//! next n bytes  header: UTF-8 JSON {"format": "moevqa-cnn", "version": 1,
//!               "config": <ModularResNeXtConfig>, "weights_bytes": <u64>,
//!               "weights_fnv1a64": "<16 hex digits>"}
//! the rest      the weights: the module's burnpack record
//!               (Burn `ModuleRecord::into_bytes` of `cnn.valid()`), keyed by
//!               module path, with parameter ids
//! ```
//!
//! Loading refuses, with one line naming the file and the difference, a
//! file whose layout, `gated` flag or gate controller sizes (`question_dim`,
//! `hidden`) differ from the config's, and a file whose weights do not have
//! the size and checksum its header records. `k` is not a property of the
//! weights: the loaded network gets the config's `k`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use burn::module::{Module, Param, RunningState};
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::store::{ModuleRecord, RecordError};
use burn::tensor::{Bytes, Device, Tensor, TensorData, bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cnn::layout::{CnnLayout, ConvSpec, PoolSpec, StageSpec};
use crate::cnn::resnext::{ModularResNeXt, ModularResNeXtConfig};
use crate::error::MoeError;

/// Magic bytes at the start of a file written by [`save_cnn`].
pub const CNN_FILE_MAGIC: &[u8; 8] = b"MOEVQCNN";
const CNN_FORMAT: &str = "moevqa-cnn";
const CNN_VERSION: u32 = 1;
/// Largest JSON header accepted (safetensors' own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;
/// How many unexpected tensor names an error lists.
const LIST_FIRST: usize = 5;

/// Why weights could not be imported, saved or loaded. Every message is
/// one line naming the file (and the tensor, where there is one).
#[derive(Debug, Error)]
pub enum ImportError {
    /// A file system operation failed.
    #[error("{}: cannot {action}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid file of the kind expected, or it is damaged.
    #[error("{}: not a valid {kind} file: {detail}", .path.display())]
    Format {
        path: PathBuf,
        kind: &'static str,
        detail: String,
    },
    /// A tensor the layout needs is not in the file.
    #[error("{}: tensor `{tensor}` is missing (expected shape {expected:?} for layout {layout})", .path.display())]
    Missing {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        layout: String,
    },
    /// A tensor of another shape than the layout's.
    #[error("{}: tensor `{tensor}` has shape {got:?}, expected {expected:?} for layout {layout}", .path.display())]
    Shape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
        /// The config's layout name, followed by ` (the file looks like
        /// <preset>)` when the file's shapes match another preset.
        layout: String,
    },
    /// A tensor of a type that is not a float.
    #[error("{}: tensor `{tensor}` has dtype {dtype}, expected F32, F16, BF16 or F64", .path.display())]
    Dtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// Tensors the layout has no place for.
    #[error("{}: {count} unexpected tensor(s) for layout {layout}: {first}", .path.display())]
    Unexpected {
        path: PathBuf,
        count: usize,
        layout: String,
        /// The first few names, comma-separated.
        first: String,
    },
    /// The file holds several models (several name prefixes).
    #[error("{}: {detail}", .path.display())]
    Prefix { path: PathBuf, detail: String },
    /// The configuration does not build a network.
    #[error("{}: invalid CNN configuration: {source}", .path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: MoeError,
    },
    /// A CNN file saved with another configuration.
    #[error("{}: the file does not match the configuration: {detail}", .path.display())]
    Mismatch { path: PathBuf, detail: String },
    /// The weights could not be encoded or decoded.
    #[error("{}: cannot {action} the weights: {detail}", .path.display())]
    Record {
        path: PathBuf,
        action: &'static str,
        detail: String,
    },
}

fn one_line(s: impl fmt::Display) -> String {
    s.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> ImportError {
    let path = path.to_path_buf();
    move |source| ImportError::Io {
        path,
        action,
        source,
    }
}

fn format_err(path: &Path, kind: &'static str, detail: impl fmt::Display) -> ImportError {
    ImportError::Format {
        path: path.to_path_buf(),
        kind,
        detail: one_line(detail),
    }
}

/// What [`import_resnext`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// The file read.
    pub file: PathBuf,
    /// Name of the config's layout.
    pub layout: String,
    /// The prefix stripped from every name (`""`, `"module."`, ...).
    pub prefix: String,
    /// Tensors loaded into the network.
    pub loaded: usize,
    /// Tensors of the file not used (`fc.*`, `*.num_batches_tracked`), full names.
    pub skipped: Vec<String>,
    /// Parts of the network not in the file, left at their fresh init.
    pub fresh: Vec<String>,
    /// The factor the expand (`conv3`) weights were multiplied by: P for a
    /// gated network (see the module docs), `None` for the plain ResNeXt
    /// (and for a gated layout whose stages differ in P, where each block is
    /// scaled by its own P).
    pub expand_scale: Option<usize>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "imported {} tensors from {} into layout {}",
            self.loaded,
            self.file.display(),
            self.layout
        )?;
        if !self.prefix.is_empty() {
            write!(f, " (prefix `{}` stripped)", self.prefix)?;
        }
        let batches = self
            .skipped
            .iter()
            .filter(|s| s.ends_with("num_batches_tracked"))
            .count();
        let others: Vec<&str> = self
            .skipped
            .iter()
            .filter(|s| !s.ends_with("num_batches_tracked"))
            .map(String::as_str)
            .collect();
        write!(f, "; skipped {}", self.skipped.len())?;
        if !self.skipped.is_empty() {
            let mut parts: Vec<String> = others.iter().map(|s| s.to_string()).collect();
            if batches > 0 {
                parts.push(format!("{batches} num_batches_tracked"));
            }
            write!(f, " ({})", parts.join(", "))?;
        }
        if !self.fresh.is_empty() {
            write!(f, "; fresh init: {}", self.fresh.join(", "))?;
        }
        if let Some(p) = self.expand_scale {
            write!(f, "; expand weights x{p} for gates of 1/P")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Importing.

/// Builds the network of `config` on `device` and loads a torchvision/timm
/// ResNeXt state dict (`.safetensors`) into it; see the module docs for the
/// mapping, the checks and the gate scaling.
pub fn import_resnext(
    path: &Path,
    config: &ModularResNeXtConfig,
    device: &Device,
) -> Result<(ModularResNeXt, ImportReport), ImportError> {
    let bytes = fs::read(path).map_err(io_err(path, "read"))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(path, "safetensors", e))?;
    let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    let prefix = detect_prefix(path, &names)?;

    let mut cnn = config.init(device).map_err(|source| ImportError::Config {
        path: path.to_path_buf(),
        source,
    })?;
    let layout = &config.layout;
    let hint = {
        let shapes: BTreeMap<String, Vec<usize>> = st
            .iter()
            .filter_map(|(n, v)| Some((n.strip_prefix(&prefix)?.to_string(), v.shape().to_vec())))
            .collect();
        match infer_from_shapes(&shapes) {
            Some(l) if l.name != "imported" && l.name != layout.name => {
                format!(" (the file looks like {})", l.name)
            }
            _ => String::new(),
        }
    };
    let mut sd = StateDict {
        path,
        st: &st,
        prefix: prefix.clone(),
        layout: layout.name.clone(),
        hint,
        used: HashSet::new(),
        device: device.clone(),
    };

    sd.conv("conv1", &mut cnn.stem.conv, 1.0)?;
    sd.bn("bn1", &mut cnn.stem.bn)?;
    let mut blocks = cnn.blocks.iter_mut();
    for (s, stage) in layout.stages.iter().enumerate() {
        for i in 0..stage.blocks {
            let block = blocks
                .next()
                .expect("the network has one block per block of its layout");
            let base = format!("layer{}.{i}", s + 1);
            let scale = if config.gated {
                block.paths() as f32
            } else {
                1.0
            };
            sd.conv(&format!("{base}.conv1"), &mut block.reduce, 1.0)?;
            sd.bn(&format!("{base}.bn1"), &mut block.bn_reduce)?;
            sd.conv(&format!("{base}.conv2"), &mut block.conv, 1.0)?;
            sd.bn(&format!("{base}.bn2"), &mut block.bn_conv)?;
            sd.conv(&format!("{base}.conv3"), &mut block.expand, scale)?;
            sd.bn(&format!("{base}.bn3"), &mut block.bn_expand)?;
            if let Some(sc) = &mut block.shortcut {
                sd.conv(&format!("{base}.downsample.0"), &mut sc.conv, 1.0)?;
                sd.bn(&format!("{base}.downsample.1"), &mut sc.bn)?;
            }
        }
    }
    let (loaded, skipped) = sd.finish(&names)?;

    let mut fresh = Vec::new();
    if !cnn.gates.is_empty() {
        fresh.push(format!("{} gate controllers", cnn.gates.len()));
    }
    if cnn.head.is_some() {
        fresh.push("head conv + BN".to_string());
    }
    let expand_scale = config.gated.then(|| layout.paths()).flatten();
    let report = ImportReport {
        file: path.to_path_buf(),
        layout: layout.name.clone(),
        prefix,
        loaded,
        skipped,
        fresh,
        expand_scale,
    };
    Ok((cnn, report))
}

/// The layout described by the tensor shapes of a torchvision/timm ResNet(X)
/// state dict, read from the file's header only.
///
/// Channels, blocks per stage, P and d come from the shapes (P = rows / columns
/// of each stage's first `conv2.weight`); what shapes cannot tell follows
/// torchvision: stem stride 2 with padding kernel/2, a 3x3/2 max pool with
/// padding 1, stage strides 1, 2, 2, 2..., no head. When the result equals
/// [`CnnLayout::resnext101_32x4d`] or [`CnnLayout::resnext101_32x8d`] (names
/// aside) that preset is returned; otherwise the layout is named `imported`.
pub fn infer_layout(path: &Path) -> Result<CnnLayout, ImportError> {
    let shapes = read_header_shapes(path)?;
    let names: Vec<String> = shapes.keys().cloned().collect();
    let prefix = detect_prefix(path, &names)?;
    let shapes: BTreeMap<String, Vec<usize>> = shapes
        .into_iter()
        .filter_map(|(n, s)| Some((n.strip_prefix(&prefix)?.to_string(), s)))
        .collect();
    infer_from_shapes(&shapes).ok_or_else(|| {
        format_err(
            path,
            "ResNet/ResNeXt state dict",
            "no `conv1.weight` and `layer1.0.conv{1,2,3}.weight` tensors of rank 4 with a 3x3 grouped conv2",
        )
    })
}

/// Shapes of every tensor in a safetensors header (the data is not read).
fn read_header_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>, ImportError> {
    let mut f = File::open(path).map_err(io_err(path, "open"))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| format_err(path, "safetensors", format!("no header length: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(format_err(
            path,
            "safetensors",
            format!("header of {n} bytes"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| format_err(path, "safetensors", format!("truncated header: {e}")))?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format_err(path, "safetensors", e))?;
    let mut shapes = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone())
            .map_err(|e| format_err(path, "safetensors", format!("shape of `{name}`: {e}")))?;
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

/// Whether `p` (ending in `.`) ends in a block's path such as `layer1.0.`.
fn is_block_prefix(p: &str) -> bool {
    let parts: Vec<&str> = p.trim_end_matches('.').split('.').collect();
    parts.len() >= 2
        && parts[parts.len() - 1].parse::<usize>().is_ok()
        && parts[parts.len() - 2].starts_with("layer")
}

/// The prefix (`""`, `module.`, `model.`, ...) in front of the stem's
/// `conv1.weight` and `bn1.weight`; `""` when there is no stem (the missing
/// tensor is then reported by name). Several candidates are an error.
fn detect_prefix(path: &Path, names: &[String]) -> Result<String, ImportError> {
    let set: HashSet<&str> = names.iter().map(String::as_str).collect();
    let mut found: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix("conv1.weight"))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .filter(|p| !is_block_prefix(p))
        .filter(|p| set.contains(format!("{p}bn1.weight").as_str()))
        .collect();
    found.sort_unstable();
    found.dedup();
    match found.as_slice() {
        [] => Ok(String::new()),
        [p] => Ok(p.to_string()),
        many => Err(ImportError::Prefix {
            path: path.to_path_buf(),
            detail: format!(
                "several models in one file (name prefixes {}); expected one",
                many.iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// See [`infer_layout`]; `shapes` are keyed by names without prefix.
fn infer_from_shapes(shapes: &BTreeMap<String, Vec<usize>>) -> Option<CnnLayout> {
    let stem = shapes.get("conv1.weight").filter(|s| s.len() == 4)?;
    let mut stages = Vec::new();
    for s in 1.. {
        let mut blocks = 0;
        while shapes.contains_key(&format!("layer{s}.{blocks}.conv1.weight")) {
            blocks += 1;
        }
        if blocks == 0 {
            break;
        }
        let get = |c: &str| {
            shapes
                .get(&format!("layer{s}.0.{c}.weight"))
                .filter(|v| v.len() == 4)
        };
        let (c1, c2, c3) = (get("conv1")?, get("conv2")?, get("conv3")?);
        let (inner, d) = (c1[0], c2[1]);
        if d == 0 || inner == 0 || !inner.is_multiple_of(d) || c2[0] != inner {
            return None;
        }
        stages.push(StageSpec {
            name: format!("conv{}", s + 1),
            blocks,
            inner,
            out: c3[0],
            paths: inner / d,
            stride: if s == 1 { 1 } else { 2 },
        });
    }
    if stages.is_empty() {
        return None;
    }
    let layout = CnnLayout {
        name: "imported".into(),
        input_channels: stem[1],
        stem: ConvSpec {
            kernel: stem[2],
            stride: 2,
            padding: stem[2] / 2,
            channels: stem[0],
        },
        pool: Some(PoolSpec {
            kernel: 3,
            stride: 2,
            padding: 1,
        }),
        stages,
        head: None,
    };
    for preset in [CnnLayout::resnext101_32x4d(), CnnLayout::resnext101_32x8d()] {
        let renamed = CnnLayout {
            name: preset.name.clone(),
            ..layout.clone()
        };
        if renamed == preset {
            return Some(preset);
        }
    }
    Some(layout)
}

/// The tensors of a state dict, consumed one by one.
struct StateDict<'a> {
    path: &'a Path,
    st: &'a SafeTensors<'a>,
    prefix: String,
    layout: String,
    hint: String,
    used: HashSet<String>,
    device: Device,
}

impl StateDict<'_> {
    /// The tensor `name` (without prefix) as f32, checked against `expected`.
    fn read(&mut self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ImportError> {
        let full = format!("{}{name}", self.prefix);
        let view = self.st.tensor(&full).map_err(|_| ImportError::Missing {
            path: self.path.to_path_buf(),
            tensor: full.clone(),
            expected: expected.to_vec(),
            layout: self.layout.clone(),
        })?;
        if view.shape() != expected {
            return Err(ImportError::Shape {
                path: self.path.to_path_buf(),
                tensor: full,
                expected: expected.to_vec(),
                got: view.shape().to_vec(),
                layout: format!("{}{}", self.layout, self.hint),
            });
        }
        let values = decode_f32(view.dtype(), view.data()).ok_or_else(|| ImportError::Dtype {
            path: self.path.to_path_buf(),
            tensor: full.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        self.used.insert(full);
        Ok(values)
    }

    /// `{name}.weight` into a conv, times `scale`.
    fn conv(&mut self, name: &str, conv: &mut Conv2d, scale: f32) -> Result<(), ImportError> {
        let dims = conv.weight.lazy_shape().to_vec();
        let mut v = self.read(&format!("{name}.weight"), &dims)?;
        if scale != 1.0 {
            v.iter_mut().for_each(|x| *x *= scale);
        }
        conv.weight = Param::from_tensor(Tensor::from_data(TensorData::new(v, dims), &self.device));
        Ok(())
    }

    /// `{name}.{weight, bias, running_mean, running_var}` into a BN.
    fn bn(&mut self, name: &str, bn: &mut BatchNorm) -> Result<(), ImportError> {
        let dims = bn.gamma.lazy_shape().to_vec();
        let mut get = |field: &str| -> Result<Tensor<1>, ImportError> {
            let v = self.read(&format!("{name}.{field}"), &dims)?;
            Ok(Tensor::from_data(
                TensorData::new(v, dims.clone()),
                &self.device,
            ))
        };
        let (gamma, beta) = (get("weight")?, get("bias")?);
        let (mean, var) = (get("running_mean")?, get("running_var")?);
        bn.gamma = Param::from_tensor(gamma);
        bn.beta = Param::from_tensor(beta);
        bn.running_mean = RunningState::new(mean);
        bn.running_var = RunningState::new(var);
        Ok(())
    }

    /// Tensors loaded and skipped; an error for tensors left over.
    fn finish(self, names: &[String]) -> Result<(usize, Vec<String>), ImportError> {
        let mut names: Vec<&String> = names.iter().filter(|n| !self.used.contains(*n)).collect();
        names.sort();
        let (skipped, unexpected): (Vec<&String>, Vec<&String>) =
            names.into_iter().partition(|n| {
                n.strip_prefix(&self.prefix).is_some_and(|short| {
                    short.starts_with("fc.") || short.ends_with("num_batches_tracked")
                })
            });
        if !unexpected.is_empty() {
            let mut first: Vec<String> = unexpected
                .iter()
                .take(LIST_FIRST)
                .map(|n| format!("`{n}`"))
                .collect();
            if unexpected.len() > LIST_FIRST {
                first.push("...".into());
            }
            return Err(ImportError::Unexpected {
                path: self.path.to_path_buf(),
                count: unexpected.len(),
                layout: self.layout,
                first: first.join(", "),
            });
        }
        Ok((self.used.len(), skipped.into_iter().cloned().collect()))
    }
}

/// Little-endian float data as f32; `None` for other types.
fn decode_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Our own files.

#[derive(Debug, Serialize, Deserialize)]
struct CnnFileHeader {
    format: String,
    version: u32,
    config: ModularResNeXtConfig,
    weights_bytes: u64,
    weights_fnv1a64: String,
}

const CNN_KIND: &str = "moevqa CNN";

/// Writes `cnn` (built from `config`) to `path` atomically; see the module
/// docs for the format.
pub fn save_cnn(
    cnn: &ModularResNeXt,
    config: &ModularResNeXtConfig,
    path: &Path,
) -> Result<(), ImportError> {
    // `valid()` syncs BN running statistics that are still pending (see
    // `crate::train::checkpoint`); the caller's network shares them.
    let weights = cnn
        .valid()
        .into_record()
        .into_bytes()
        .map_err(|e| ImportError::Record {
            path: path.to_path_buf(),
            action: "encode",
            detail: one_line(e),
        })?;
    let header = CnnFileHeader {
        format: CNN_FORMAT.into(),
        version: CNN_VERSION,
        config: config.clone(),
        weights_bytes: weights.len() as u64,
        weights_fnv1a64: format!("{:016x}", fnv1a64(&weights)),
    };
    let header = serde_json::to_vec(&header).map_err(|e| ImportError::Record {
        path: path.to_path_buf(),
        action: "encode",
        detail: format!("header: {}", one_line(e)),
    })?;
    let len = (header.len() as u64).to_le_bytes();
    write_atomic(path, &[CNN_FILE_MAGIC, &len, &header, &weights])
}

/// Loads a file written by [`save_cnn`] into the network of `config`, on
/// `device`; refuses a file saved with another layout, `gated` flag or gate
/// sizes (one line naming the file and the difference).
pub fn load_cnn(
    path: &Path,
    config: &ModularResNeXtConfig,
    device: &Device,
) -> Result<ModularResNeXt, ImportError> {
    let mut bytes = fs::read(path).map_err(io_err(path, "read"))?;
    if bytes.len() < 16 || &bytes[..8] != CNN_FILE_MAGIC {
        return Err(format_err(
            path,
            CNN_KIND,
            "it does not start with the magic bytes MOEVQCNN",
        ));
    }
    let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let start = 16u64
        .checked_add(n)
        .filter(|&e| n <= MAX_HEADER && e <= bytes.len() as u64)
        .ok_or_else(|| format_err(path, CNN_KIND, format!("header length {n} out of range")))?
        as usize;
    let header: CnnFileHeader =
        serde_json::from_slice(&bytes[16..start]).map_err(|e| format_err(path, CNN_KIND, e))?;
    if header.format != CNN_FORMAT || header.version != CNN_VERSION {
        return Err(format_err(
            path,
            CNN_KIND,
            format!(
                "format {:?} version {}, expected {CNN_FORMAT:?} version {CNN_VERSION}",
                header.format, header.version
            ),
        ));
    }
    if let Some(detail) = config_difference(&header.config, config) {
        return Err(ImportError::Mismatch {
            path: path.to_path_buf(),
            detail,
        });
    }
    let weights = bytes.split_off(start);
    if weights.len() as u64 != header.weights_bytes {
        return Err(format_err(
            path,
            CNN_KIND,
            format!(
                "{} bytes of weights, the header says {}",
                weights.len(),
                header.weights_bytes
            ),
        ));
    }
    let sum = format!("{:016x}", fnv1a64(&weights));
    if sum != header.weights_fnv1a64 {
        return Err(format_err(
            path,
            CNN_KIND,
            format!(
                "weights checksum {sum}, the header says {}",
                header.weights_fnv1a64
            ),
        ));
    }
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(weights))
        .map_err(|e| format_err(path, CNN_KIND, e))?;
    let cnn = config.init(device).map_err(|source| ImportError::Config {
        path: path.to_path_buf(),
        source,
    })?;
    cnn.try_load_record(record).map_err(|e| match e {
        RecordError::Validation(msg) => ImportError::Mismatch {
            path: path.to_path_buf(),
            detail: one_line(msg),
        },
        RecordError::Io(msg) => ImportError::Record {
            path: path.to_path_buf(),
            action: "decode",
            detail: one_line(msg),
        },
    })
}

/// The first difference that changes the weights, saved (file) vs ours (config).
fn config_difference(saved: &ModularResNeXtConfig, ours: &ModularResNeXtConfig) -> Option<String> {
    if let Some(d) = layout_difference(&saved.layout, &ours.layout) {
        return Some(d);
    }
    if saved.gated != ours.gated {
        return Some(format!(
            "gated = {} in the file, {} in the config",
            saved.gated, ours.gated
        ));
    }
    if saved.gated {
        let (a, b) = (&saved.gate, &ours.gate);
        if a.question_dim != b.question_dim {
            return Some(format!(
                "gate question_dim {} in the file, {} in the config",
                a.question_dim, b.question_dim
            ));
        }
        if a.hidden != b.hidden {
            return Some(format!(
                "gate hidden size {} in the file, {} in the config",
                a.hidden, b.hidden
            ));
        }
    }
    None
}

fn layout_difference(a: &CnnLayout, b: &CnnLayout) -> Option<String> {
    if a == b {
        return None;
    }
    let detail = if a.input_channels != b.input_channels {
        format!(
            "input channels {} vs {}",
            a.input_channels, b.input_channels
        )
    } else if a.stem != b.stem {
        format!("stem {:?} vs {:?}", a.stem, b.stem)
    } else if a.pool != b.pool {
        format!("pool {:?} vs {:?}", a.pool, b.pool)
    } else if a.stages.len() != b.stages.len() {
        format!("{} stages vs {}", a.stages.len(), b.stages.len())
    } else if let Some((x, y)) = a.stages.iter().zip(&b.stages).find(|(x, y)| x != y) {
        format!("stage {x:?} vs {y:?}")
    } else if a.head != b.head {
        format!("head {:?} vs {:?}", a.head, b.head)
    } else {
        "same structure, other name".into()
    };
    Some(format!(
        "layout `{}` in the file, `{}` in the config ({detail}; file vs config)",
        a.name, b.name
    ))
}

/// Writes the concatenated `parts` to a temporary sibling of `path`,
/// fsyncs it, renames it over `path` and fsyncs the directory.
fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<(), ImportError> {
    let name = path.file_name().ok_or_else(|| ImportError::Record {
        path: path.to_path_buf(),
        action: "write",
        detail: "the path has no file name".into(),
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err(&parent, "create directory"))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = File::create(&tmp).map_err(io_err(&tmp, "create file"))?;
        for part in parts {
            f.write_all(part).map_err(io_err(&tmp, "write"))?;
        }
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        fs::rename(&tmp, path).map_err(io_err(path, "rename the new file into"))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    #[cfg(unix)]
    File::open(&parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&parent, "fsync directory"))?;
    Ok(())
}

/// FNV-1a, 64 bits.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cnn::resnext::{Execution, GateSettings};
    use burn::tensor::Distribution;
    use burn::tensor::activation::relu;
    use burn::tensor::module::{conv2d, max_pool2d};
    use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use safetensors::tensor::TensorView;

    /// Acceptance bound on max |ours - reference| / max |reference|.
    const TOL: f32 = 1e-4;

    /// (name without prefix, shape, values) in torchvision's order.
    type Entry = (String, Vec<usize>, Vec<f32>);

    fn dev() -> Device {
        Device::default()
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moevqa-import-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// P = 4 everywhere; an identity and a projection shortcut in each stage,
    /// a strided stage; 32x32 input gives 8x8 then 4x4 maps.
    fn tiny_layout() -> CnnLayout {
        let stage = |name: &str, blocks, inner, out, stride| StageSpec {
            name: name.into(),
            blocks,
            inner,
            out,
            paths: 4,
            stride,
        };
        CnnLayout {
            name: "tiny".into(),
            input_channels: 3,
            stem: ConvSpec {
                kernel: 7,
                stride: 2,
                padding: 3,
                channels: 16,
            },
            pool: Some(PoolSpec {
                kernel: 3,
                stride: 2,
                padding: 1,
            }),
            stages: vec![stage("conv2", 2, 16, 32, 1), stage("conv3", 2, 32, 64, 2)],
            head: None,
        }
    }

    fn config(layout: CnnLayout, gated: bool) -> ModularResNeXtConfig {
        let k = layout.paths().unwrap();
        ModularResNeXtConfig::new(layout, k)
            .with_gated(gated)
            .with_gate(GateSettings::new().with_question_dim(8).with_hidden(8))
    }

    fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..hi)).collect()
    }

    fn push_conv(out: &mut Vec<Entry>, rng: &mut ChaCha8Rng, name: &str, shape: [usize; 4]) {
        let fan_in = (shape[1] * shape[2] * shape[3]) as f32;
        let a = (6.0 / fan_in).sqrt();
        let n = shape.iter().product();
        out.push((
            format!("{name}.weight"),
            shape.to_vec(),
            uniform(rng, n, -a, a),
        ));
    }

    fn push_bn(out: &mut Vec<Entry>, rng: &mut ChaCha8Rng, name: &str, c: usize) {
        for (field, lo, hi) in [
            ("weight", 0.5, 1.5),
            ("bias", -0.3, 0.3),
            ("running_mean", -0.5, 0.5),
            ("running_var", 0.5, 2.0),
        ] {
            out.push((format!("{name}.{field}"), vec![c], uniform(rng, c, lo, hi)));
        }
    }

    /// A random state dict in torchvision's naming for `layout`, with `fc`.
    fn state_dict(layout: &CnnLayout, seed: u64) -> Vec<Entry> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        let s = layout.stem;
        push_conv(
            &mut out,
            &mut rng,
            "conv1",
            [s.channels, layout.input_channels, s.kernel, s.kernel],
        );
        push_bn(&mut out, &mut rng, "bn1", s.channels);
        let mut ch = s.channels;
        for (si, stage) in layout.stages.iter().enumerate() {
            for i in 0..stage.blocks {
                let stride = if i == 0 { stage.stride } else { 1 };
                let b = format!("layer{}.{i}", si + 1);
                let (inner, out_c) = (stage.inner, stage.out);
                let d = inner / stage.paths;
                push_conv(&mut out, &mut rng, &format!("{b}.conv1"), [inner, ch, 1, 1]);
                push_bn(&mut out, &mut rng, &format!("{b}.bn1"), inner);
                push_conv(&mut out, &mut rng, &format!("{b}.conv2"), [inner, d, 3, 3]);
                push_bn(&mut out, &mut rng, &format!("{b}.bn2"), inner);
                push_conv(
                    &mut out,
                    &mut rng,
                    &format!("{b}.conv3"),
                    [out_c, inner, 1, 1],
                );
                push_bn(&mut out, &mut rng, &format!("{b}.bn3"), out_c);
                if stride != 1 || ch != out_c {
                    push_conv(
                        &mut out,
                        &mut rng,
                        &format!("{b}.downsample.0"),
                        [out_c, ch, 1, 1],
                    );
                    push_bn(&mut out, &mut rng, &format!("{b}.downsample.1"), out_c);
                }
                ch = out_c;
            }
        }
        out.push((
            "fc.weight".into(),
            vec![10, ch],
            uniform(&mut rng, 10 * ch, -0.1, 0.1),
        ));
        out.push(("fc.bias".into(), vec![10], uniform(&mut rng, 10, -0.1, 0.1)));
        out
    }

    /// Writes `entries` (names prefixed by `prefix`) in `dtype`, plus an I64
    /// `num_batches_tracked` for every BN, as a safetensors file.
    fn write_st(path: &Path, entries: &[Entry], prefix: &str, dtype: Dtype) {
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, shape, v) in entries {
            let bytes: Vec<u8> = match dtype {
                Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16 => v
                    .iter()
                    .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
                Dtype::BF16 => v
                    .iter()
                    .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
                Dtype::I64 => v.iter().flat_map(|x| (*x as i64).to_le_bytes()).collect(),
                other => panic!("test writer: {other:?}"),
            };
            owned.push((format!("{prefix}{name}"), dtype, shape.clone(), bytes));
            if let Some(bn) = name.strip_suffix(".running_var") {
                owned.push((
                    format!("{prefix}{bn}.num_batches_tracked"),
                    Dtype::I64,
                    vec![],
                    1234i64.to_le_bytes().to_vec(),
                ));
            }
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    /// The original network, from the state dict, with plain tensor ops:
    /// conv, eval-mode BN from the running statistics, ReLU, max pool,
    /// residual sums; the grouped conv's groups read from its weight shape.
    fn reference(entries: &[Entry], layout: &CnnLayout, x: Tensor<4>) -> Tensor<4> {
        let sd: HashMap<&str, (&Vec<usize>, &Vec<f32>)> = entries
            .iter()
            .map(|(n, s, v)| (n.as_str(), (s, v)))
            .collect();
        let d = x.device();
        let t4 = |name: &str| {
            let (s, v) = sd[name];
            Tensor::<4>::from_data(TensorData::new(v.clone(), s.clone()), &d)
        };
        let t1 = |name: &str| {
            let (s, v) = sd[name];
            Tensor::<1>::from_data(TensorData::new(v.clone(), s.clone()), &d).reshape([
                1,
                s[0] as i32,
                1,
                1,
            ])
        };
        let bn = |x: Tensor<4>, p: &str| {
            let mean = t1(&format!("{p}.running_mean"));
            let var = t1(&format!("{p}.running_var"));
            (x - mean) / var.add_scalar(1e-5).sqrt() * t1(&format!("{p}.weight"))
                + t1(&format!("{p}.bias"))
        };
        let conv = |x: Tensor<4>, name: &str, stride: usize, pad: usize| {
            let w = t4(&format!("{name}.weight"));
            let [o, i, _, _] = w.dims();
            let cin = x.dims()[1];
            let groups = cin / i;
            assert_eq!(o % groups, 0);
            conv2d(
                x,
                w,
                None,
                ConvOptions::new([stride, stride], [pad, pad], [1, 1], groups),
            )
        };
        let s = layout.stem;
        let mut x = relu(bn(conv(x, "conv1", s.stride, s.padding), "bn1"));
        let p = layout.pool.unwrap();
        x = max_pool2d(
            x,
            MaxPoolOptions::new([p.kernel, p.kernel])
                .with_stride([p.stride, p.stride])
                .with_padding([p.padding, p.padding]),
        );
        for (si, stage) in layout.stages.iter().enumerate() {
            for i in 0..stage.blocks {
                let stride = if i == 0 { stage.stride } else { 1 };
                let b = format!("layer{}.{i}", si + 1);
                let h = relu(bn(
                    conv(x.clone(), &format!("{b}.conv1"), 1, 0),
                    &format!("{b}.bn1"),
                ));
                let h = relu(bn(
                    conv(h, &format!("{b}.conv2"), stride, 1),
                    &format!("{b}.bn2"),
                ));
                let h = bn(conv(h, &format!("{b}.conv3"), 1, 0), &format!("{b}.bn3"));
                let ds = format!("{b}.downsample.0.weight");
                let short = if sd.contains_key(ds.as_str()) {
                    bn(
                        conv(x, &format!("{b}.downsample.0"), stride, 0),
                        &format!("{b}.downsample.1"),
                    )
                } else {
                    x
                };
                x = relu(h + short);
            }
        }
        x
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// max |a - b| / max |b|.
    fn rel_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (values(a), values(b));
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        diff / scale
    }

    /// W_g = 0: every gate is ReLU(b_g) / ||ReLU(b_g)||_1 = 1/P exactly.
    fn equal_gates(mut cnn: ModularResNeXt) -> ModularResNeXt {
        for g in cnn.gates.iter_mut() {
            g.gate.weight = Param::from_tensor(g.gate.weight.val().zeros_like());
        }
        cnn
    }

    fn images() -> Tensor<4> {
        Tensor::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &dev())
    }

    fn question() -> Tensor<2> {
        Tensor::random([2, 8], Distribution::Normal(0.0, 1.0), &dev())
    }

    /// Gated import at k = P with equal gates, dense and sparse, against the
    /// reference; returns the larger relative difference.
    fn check_gated(path: &Path, entries: &[Entry]) -> (f32, ImportReport) {
        let layout = tiny_layout();
        let (cnn, report) = import_resnext(path, &config(layout.clone(), true), &dev()).unwrap();
        let cnn = equal_gates(cnn);
        let x = images();
        let want = reference(entries, &layout, x.clone());
        let mut worst = 0f32;
        for exec in [Execution::Dense, Execution::Sparse] {
            let out = cnn.forward_k(x.clone(), Some(question()), 4, exec).unwrap();
            for g in &out.gates {
                assert!(values(g.values.clone()).iter().all(|v| *v == 0.25));
            }
            let r = rel_diff(out.features, want.clone());
            eprintln!("{}: {exec:?} max|diff|/max|ref| = {r:.2e}", path.display());
            worst = worst.max(r);
        }
        (worst, report)
    }

    #[test]
    fn imported_gated_network_at_k_p_with_equal_gates_is_the_original() {
        let dir = tmp_dir("gated");
        let layout = tiny_layout();
        let entries = state_dict(&layout, 1);
        let path = dir.join("resnext.safetensors");
        write_st(&path, &entries, "module.", Dtype::F32);
        let (rel, report) = check_gated(&path, &entries);
        assert!(rel <= TOL, "relative difference {rel:e} > {TOL:e}");

        let n_bn = entries
            .iter()
            .filter(|(n, _, _)| n.ends_with(".running_var"))
            .count();
        assert_eq!(report.loaded, entries.len() - 2);
        assert_eq!(report.prefix, "module.");
        assert_eq!(report.skipped.len(), 2 + n_bn);
        assert!(report.skipped.contains(&"module.fc.weight".to_string()));
        assert!(
            report
                .skipped
                .contains(&"module.bn1.num_batches_tracked".to_string())
        );
        assert_eq!(report.expand_scale, Some(4));
        assert_eq!(report.fresh, vec!["4 gate controllers".to_string()]);
        assert!(!report.to_string().contains('\n'));

        // The file's layout, from its header.
        let inferred = infer_layout(&path).unwrap();
        assert_eq!(
            inferred,
            CnnLayout {
                name: "imported".into(),
                ..layout
            }
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn imported_plain_resnext_is_unscaled_and_the_original() {
        let dir = tmp_dir("plain");
        let layout = tiny_layout();
        let entries = state_dict(&layout, 2);
        let path = dir.join("plain.safetensors");
        write_st(&path, &entries, "", Dtype::F32);
        let (cnn, report) = import_resnext(&path, &config(layout.clone(), false), &dev()).unwrap();
        assert_eq!(report.expand_scale, None);
        assert!(report.fresh.is_empty());
        let x = images();
        let out = cnn.forward(x.clone(), None, Execution::Dense).unwrap();
        let r = rel_diff(out.features, reference(&entries, &layout, x));
        eprintln!("plain: max|diff|/max|ref| = {r:.2e}");
        assert!(r <= TOL, "relative difference {r:e} > {TOL:e}");

        // A head is not in the file: it keeps its fresh init.
        let headed = CnnLayout {
            head: Some(8),
            ..layout
        };
        let (_, report) = import_resnext(&path, &config(headed, false), &dev()).unwrap();
        assert_eq!(report.fresh, vec!["head conv + BN".to_string()]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn half_precision_files_import() {
        let dir = tmp_dir("half");
        let layout = tiny_layout();
        for (dtype, round) in [
            (
                Dtype::F16,
                (|v: f32| f16::from_f32(v).to_f32()) as fn(f32) -> f32,
            ),
            (Dtype::BF16, |v: f32| bf16::from_f32(v).to_f32()),
        ] {
            // Values representable in the file's type: the reference is exact.
            let entries: Vec<Entry> = state_dict(&layout, 3)
                .into_iter()
                .map(|(n, s, v)| (n, s, v.into_iter().map(round).collect()))
                .collect();
            let path = dir.join(format!("{dtype:?}.safetensors"));
            write_st(&path, &entries, "model.", dtype);
            let (rel, report) = check_gated(&path, &entries);
            assert!(
                rel <= TOL,
                "{dtype:?}: relative difference {rel:e} > {TOL:e}"
            );
            assert_eq!(report.prefix, "model.");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrong_shape_missing_and_extra_tensors_are_one_line_errors() {
        let dir = tmp_dir("errors");
        let layout = tiny_layout();
        let cfg = config(layout.clone(), true);
        let good = state_dict(&layout, 4);

        let mut bad = good.clone();
        let e = bad
            .iter_mut()
            .find(|(n, _, _)| n == "layer2.0.conv2.weight")
            .unwrap();
        e.1 = vec![32, 4, 3, 3]; // 8 groups of 4 instead of 4 of 8
        e.2.truncate(32 * 4 * 9);
        let path = dir.join("shape.safetensors");
        write_st(&path, &bad, "", Dtype::F32);
        let err = import_resnext(&path, &cfg, &dev()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImportError::Shape { .. }), "{msg}");
        assert!(msg.contains("shape.safetensors"), "{msg}");
        assert!(msg.contains("`layer2.0.conv2.weight`"), "{msg}");
        assert!(
            msg.contains("[32, 4, 3, 3]") && msg.contains("[32, 8, 3, 3]"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));

        let missing: Vec<Entry> = good
            .iter()
            .filter(|(n, _, _)| n != "layer2.1.bn3.running_var")
            .cloned()
            .collect();
        let path = dir.join("missing.safetensors");
        write_st(&path, &missing, "module.", Dtype::F32);
        let err = import_resnext(&path, &cfg, &dev()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImportError::Missing { .. }), "{msg}");
        assert!(msg.contains("`module.layer2.1.bn3.running_var`"), "{msg}");
        assert!(msg.contains("missing.safetensors"), "{msg}");

        let mut extra = good.clone();
        extra.push((
            "layer3.0.conv1.weight".into(),
            vec![8, 64, 1, 1],
            vec![0.0; 512],
        ));
        extra.push(("aux.weight".into(), vec![2], vec![0.0; 2]));
        let path = dir.join("extra.safetensors");
        write_st(&path, &extra, "", Dtype::F32);
        let err = import_resnext(&path, &cfg, &dev()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ImportError::Unexpected { count: 2, .. }),
            "{msg}"
        );
        assert!(
            msg.contains("`layer3.0.conv1.weight`") && msg.contains("`aux.weight`"),
            "{msg}"
        );

        // An integer tensor where a float is needed.
        let path = dir.join("int.safetensors");
        write_st(&path, &good, "", Dtype::I64);
        let msg = import_resnext(&path, &cfg, &dev()).unwrap_err().to_string();
        assert!(
            msg.contains("`conv1.weight`") && msg.contains("I64"),
            "{msg}"
        );

        // Not a safetensors file.
        let path = dir.join("junk.safetensors");
        fs::write(&path, b"not a safetensors file").unwrap();
        let err = import_resnext(&path, &cfg, &dev()).unwrap_err();
        assert!(matches!(err, ImportError::Format { .. }), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn layout_inference_recognises_the_presets() {
        // Header-only shapes of a 32x8d file, without data (never decoded).
        let preset = CnnLayout::resnext101_32x8d();
        let mut shapes = BTreeMap::new();
        shapes.insert("conv1.weight".to_string(), vec![64, 3, 7, 7]);
        let mut ch = 64;
        for (si, s) in preset.stages.iter().enumerate() {
            for i in 0..s.blocks {
                let b = format!("layer{}.{i}", si + 1);
                shapes.insert(format!("{b}.conv1.weight"), vec![s.inner, ch, 1, 1]);
                shapes.insert(
                    format!("{b}.conv2.weight"),
                    vec![s.inner, s.inner / 32, 3, 3],
                );
                shapes.insert(format!("{b}.conv3.weight"), vec![s.out, s.inner, 1, 1]);
                ch = s.out;
            }
        }
        assert_eq!(infer_from_shapes(&shapes), Some(preset));
        shapes.insert("layer1.0.conv2.weight".into(), vec![128, 4, 3, 3]);
        for s in [
            "layer1.0.conv1.weight",
            "layer1.1.conv1.weight",
            "layer1.2.conv1.weight",
        ] {
            shapes.get_mut(s).unwrap()[0] = 128;
        }
        // Every stage's first block decides; only stage 1 changed: not a preset.
        assert_eq!(infer_from_shapes(&shapes).unwrap().name, "imported");
    }

    #[test]
    fn prefixes_are_detected() {
        let p = Path::new("x.safetensors");
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let plain = names(&[
            "conv1.weight",
            "bn1.weight",
            "layer1.0.conv1.weight",
            "layer1.0.bn1.weight",
        ]);
        assert_eq!(detect_prefix(p, &plain).unwrap(), "");
        let module = names(&[
            "module.conv1.weight",
            "module.bn1.weight",
            "module.layer1.0.conv1.weight",
            "module.layer1.0.bn1.weight",
        ]);
        assert_eq!(detect_prefix(p, &module).unwrap(), "module.");
        let no_stem = names(&["layer1.0.conv1.weight", "layer1.0.bn1.weight"]);
        assert_eq!(detect_prefix(p, &no_stem).unwrap(), "");
        let two = names(&[
            "a.conv1.weight",
            "a.bn1.weight",
            "b.conv1.weight",
            "b.bn1.weight",
        ]);
        let msg = detect_prefix(p, &two).unwrap_err().to_string();
        assert!(msg.contains("`a.`") && msg.contains("`b.`"), "{msg}");
    }

    #[test]
    fn save_and_load_round_trip_and_refuse_other_layouts() {
        let dir = tmp_dir("roundtrip");
        let layout = tiny_layout();
        let cfg = config(layout.clone(), true);
        let entries = state_dict(&layout, 5);
        let st_path = dir.join("in.safetensors");
        write_st(&st_path, &entries, "", Dtype::F32);
        let (cnn, _) = import_resnext(&st_path, &cfg, &dev()).unwrap();

        let path = dir.join("sub").join("cnn.bin");
        save_cnn(&cnn, &cfg, &path).unwrap();
        // Saved again over itself: still one file, no temporaries left.
        save_cnn(&cnn, &cfg, &path).unwrap();
        let left: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("cnn.bin")]);

        let loaded = load_cnn(&path, &cfg, &dev()).unwrap();
        // k is not a property of the weights: another k loads.
        let mut cfg2 = config(layout.clone(), true);
        cfg2.k = 2;
        let k2 = load_cnn(&path, &cfg2, &dev()).unwrap();
        assert_eq!((loaded.k(), k2.k()), (4, 2));
        let (x, q) = (images(), question());
        for exec in [Execution::Dense, Execution::Sparse] {
            let a = cnn.forward_k(x.clone(), Some(q.clone()), 2, exec).unwrap();
            let b = loaded
                .forward_k(x.clone(), Some(q.clone()), 2, exec)
                .unwrap();
            assert_eq!(values(a.features), values(b.features));
            for (ga, gb) in a.gates.iter().zip(&b.gates) {
                assert_eq!(values(ga.values.clone()), values(gb.values.clone()));
            }
        }

        // Other layouts, gating or gate sizes are refused, naming the file.
        let mut wide = layout.clone();
        wide.stages[1].inner = 64;
        let mut renamed = layout.clone();
        renamed.name = "other".into();
        for (other, what) in [
            (config(wide, true), "stage"),
            (config(renamed, true), "other name"),
            (config(layout.clone(), false), "gated"),
            (
                config(layout.clone(), true).with_gate(GateSettings::new().with_question_dim(8)),
                "hidden",
            ),
            (
                config(CnnLayout::resnext101_32x4d(), true),
                "resnext101-32x4d",
            ),
        ] {
            let err = load_cnn(&path, &other, &dev()).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ImportError::Mismatch { .. }), "{msg}");
            assert!(msg.contains("cnn.bin") && msg.contains(what), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }

        // A damaged file, and a file of another kind, are refused.
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let bad = dir.join("bad.bin");
        fs::write(&bad, &bytes).unwrap();
        let msg = load_cnn(&bad, &cfg, &dev()).unwrap_err().to_string();
        assert!(msg.contains("bad.bin") && msg.contains("checksum"), "{msg}");
        let err = load_cnn(&st_path, &cfg, &dev()).unwrap_err();
        assert!(matches!(err, ImportError::Format { .. }), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
