//! Training, evaluation and run directories.

pub mod checkpoint;
pub mod clevr;
pub mod run;
pub mod vqa;

use thiserror::Error;

use crate::data::DataError;
use crate::error::MoeError;

/// Errors of training and evaluation; each message is one line.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] MoeError),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Io(String),
    #[error("training diverged: loss is {value} at epoch {epoch}, step {step}; try a lower --lr")]
    Diverged {
        epoch: usize,
        step: usize,
        value: f64,
    },
}
