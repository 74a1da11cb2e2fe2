//! Errors of the library. Every variant renders as one line that names the
//! thing at fault and what was expected, so the CLI can print it as is.

use thiserror::Error;

/// Library error type.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum MoeError {
    /// `k` outside `1..=P`.
    #[error("k = {k} is invalid: expected 1 <= k <= {paths} (the number of paths P)")]
    InvalidK { k: usize, paths: usize },

    /// A bottleneck width that does not split into P equal paths.
    #[error(
        "{what}: {channels} channels do not divide into {paths} paths (expected a multiple of {paths})"
    )]
    NotDivisible {
        what: String,
        channels: usize,
        paths: usize,
    },

    /// A tensor or configuration value of the wrong shape.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },

    /// A configuration value outside its valid range.
    #[error("{what}: {message}")]
    Config { what: String, message: String },

    /// A name that is not in a fixed list (preset, model, layout).
    #[error("unknown {kind} '{name}': expected one of {expected}")]
    Unknown {
        kind: &'static str,
        name: String,
        expected: String,
    },
}

impl MoeError {
    /// Shorthand for [`MoeError::Shape`].
    pub fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        MoeError::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }

    /// Shorthand for [`MoeError::Config`].
    pub fn config(what: impl Into<String>, message: impl Into<String>) -> Self {
        MoeError::Config {
            what: what.into(),
            message: message.into(),
        }
    }
}

/// Result alias of the library.
pub type Result<T> = std::result::Result<T, MoeError>;
