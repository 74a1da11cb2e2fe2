//! VQA models built on the modular CNN: the Relation Network (CLEVR).

pub mod relation_network;

pub use relation_network::{RelationNetwork, RelationNetworkConfig, RnOutput};
