//! Training, evaluation and run directories.

pub mod checkpoint;
pub mod clevr;
pub mod plot;
pub mod report;
pub mod run;
pub mod vqa;

use thiserror::Error;

use crate::data::DataError;
use crate::error::MoeError;
use crate::kernels::Engine;

/// How a trained run answers (eval, predict, answer): sparse at `k`
/// (`None`: the run's own k), in batches of `batch`, its CNN run by `engine`.
#[derive(Debug, Clone, Copy)]
pub struct Inference {
    pub k: Option<usize>,
    pub batch: usize,
    pub engine: Engine,
    /// Which of the run's checkpoints answers.
    pub checkpoint: CheckpointChoice,
}

/// Which of a run's checkpoints inference loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointChoice {
    /// `RUN/checkpoint`: the last one saved (one inside an epoch included).
    #[default]
    Last,
    /// `RUN/best`: the end of the epoch with the best validation so far.
    Best,
}

impl std::str::FromStr for CheckpointChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "last" => Ok(CheckpointChoice::Last),
            "best" => Ok(CheckpointChoice::Best),
            _ => Err(format!("expected `last` or `best`, got `{s}`")),
        }
    }
}

impl Inference {
    /// Sparse at `k`, batches of `batch`, the default engine of `device`.
    pub fn at(k: usize, batch: usize, device: &burn::tensor::Device) -> Inference {
        Inference {
            k: Some(k),
            batch,
            engine: Engine::for_device(device),
            checkpoint: CheckpointChoice::Last,
        }
    }
}

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
