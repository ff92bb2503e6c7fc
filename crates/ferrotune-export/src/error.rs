//! The export crate's one error type; `is_usage` tells the CLI to exit 2 instead of 1.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A flag or input folder the user must change (missing checkpoint, output exists, ...).
    #[error("{0}")]
    Usage(String),
    /// A folder that is not what it claims to be (damaged MLmodel, missing tensor, ...).
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// `--verify` found a difference between the export and its checkpoint.
    #[error("verification failed: {0}")]
    Mismatch(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] ferrotune_model::ModelError),
    #[error(transparent)]
    Train(#[from] ferrotune_train::TrainError),
    #[error(transparent)]
    Data(#[from] ferrotune_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ExportError {
    pub fn is_usage(&self) -> bool {
        match self {
            ExportError::Usage(_) | ExportError::Invalid { .. } => true,
            ExportError::Model(e) => e.is_usage(),
            ExportError::Train(e) => e.is_usage(),
            ExportError::Data(e) => e.is_usage(),
            _ => false,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> ExportError {
        ExportError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> ExportError {
        ExportError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, ExportError>;
