//! Metrics: the official VQA v2 accuracy.

pub mod vqa;

pub use vqa::{MetricError, VqaAnnotation, VqaScore, normalize_answer, score};
