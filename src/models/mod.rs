//! VQA models built on the modular CNN: the Relation Network (CLEVR) and
//! the bottom-up top-down model (VQA v2).

pub mod butd;
pub mod relation_network;

pub use butd::{Butd, ButdConfig, ButdOutput};
pub use relation_network::{RelationNetwork, RelationNetworkConfig, RnOutput};
