//! moevqa: sparse mixture-of-experts visual question answering.
//!
//! Implements Pahuja, Fu and Pal, *Learning Sparse Mixture of Experts for
//! Visual Question Answering*: a ResNeXt whose bottleneck paths are experts,
//! a question-conditioned gate controller per block that keeps the top-k
//! paths, and sparse execution that runs only those paths.
//!
//! Layout: [`moe`] (gates, blocks, balance loss), [`cnn`] (layouts of the
//! paper's Tables 3 and 4 and the modular ResNeXt built from them),
//! [`flops`] (analytic multiply-add counts), [`bench`] (timing harness),
//! [`data`] (the CLEVR layout and generated datasets).

pub mod bench;
pub mod cnn;
pub mod data;
pub mod error;
pub mod flops;
pub mod fused;
pub mod kernels;
pub mod metrics;
pub mod models;
pub mod moe;
pub mod text;
pub mod train;

pub use error::{MoeError, Result};
