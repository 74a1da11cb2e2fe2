//! Metrics: the official VQA v2 accuracy, and the confusion of right and
//! given answers per question type.

pub mod confusion;
pub mod vqa;

pub use vqa::{MetricError, VqaAnnotation, VqaScore, normalize_answer, score};
