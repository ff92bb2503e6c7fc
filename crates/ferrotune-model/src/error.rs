//! The model crate's one error type; `is_usage` tells the CLI to exit 2 instead of 1.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// config.json is missing, unreadable or describes something other than Phi-3.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A weight file is missing, or a tensor is absent or has the wrong shape.
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// A PEFT adapter folder that cannot be used with this model.
    #[error("adapter {path}: {message}")]
    Adapter { path: PathBuf, message: String },
    /// A model id that is not in the Hugging Face cache (no network is used).
    #[error("{0}")]
    NotFound(String),
    /// Inputs with inconsistent shapes or values (a caller bug or bad data).
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ModelError {
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ModelError::Config { .. }
                | ModelError::Weights { .. }
                | ModelError::Adapter { .. }
                | ModelError::NotFound(_)
        )
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
