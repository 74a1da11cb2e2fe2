//! Datasets: the CLEVR v1.0 layout and the generators that write it.

pub mod clevr2d;
pub mod clevr_format;
pub mod clevr_reader;
pub mod fingerprint;
pub mod sort_of_clevr;
pub mod vqa2;
pub mod vqa2_gen;

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors of reading and writing datasets; each names the file.
#[derive(Debug, Error)]
pub enum DataError {
    // The io error is in the message, not a `source`, so a chained report prints it once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: line {line}, column {column}: malformed JSON: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{root}: not a dataset directory: {message}")]
    Layout { root: PathBuf, message: String },
    #[error("{path}: line {line}: {message}")]
    Text {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: image error: {message}")]
    Image { path: PathBuf, message: String },
}

impl DataError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            error: source,
        }
    }

    /// An image encode/decode error on `path`.
    pub fn image(path: &Path, e: image::ImageError) -> Self {
        DataError::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

/// A fresh, empty directory under the system temp directory for a test.
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moevqa-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
