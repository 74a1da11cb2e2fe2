//! The paper's heart: gate controller, modular bottleneck block (dense and
//! sparse execution) and the load-balancing loss. Depends only on Burn.

pub mod balance;
pub mod block;
pub mod gate;
pub mod usage;

pub use balance::{BalanceLossConfig, cv_squared, importance};
pub use block::{Bottleneck, BottleneckConfig};
pub use gate::{GateController, GateControllerConfig, Gates, check_k, normalize_gates, top_k};
