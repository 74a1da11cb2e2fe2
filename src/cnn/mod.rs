//! CNN layouts (paper appendix D) as data, and the modular ResNeXt built from them.

pub mod import;
pub mod layout;
pub mod resnext;

pub use layout::{BlockSpec, CnnLayout, ConvSpec, PoolSpec, StageSpec};
pub use resnext::{
    CnnOutput, ConvBn, Execution, GateSettings, ModularResNeXt, ModularResNeXtConfig,
};
