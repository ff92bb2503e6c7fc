//! The training crate's one error type; `is_usage` tells the CLI to exit 2 instead of 1.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A config key with a bad value, an unknown key or an impossible combination.
    #[error("{source_name}: {message}")]
    Config {
        source_name: String,
        message: String,
    },
    /// The run cannot fit in the device's memory (see `plan`).
    #[error("{0}")]
    DoesNotFit(String),
    /// A checkpoint that cannot be resumed from.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A loss or gradient that is NaN or infinite.
    #[error("step {step}: {what} is not finite ({value}); {last_good}")]
    NonFinite {
        step: u64,
        what: &'static str,
        value: f64,
        last_good: String,
    },
    /// A rank that left, never came, or timed out; a broken connection between ranks.
    #[error("distributed: {0}")]
    Distributed(String),
    #[error(transparent)]
    Data(#[from] ferrotune_data::DataError),
    #[error(transparent)]
    Model(#[from] ferrotune_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TrainError {
    pub fn is_usage(&self) -> bool {
        match self {
            TrainError::Config { .. }
            | TrainError::DoesNotFit(_)
            | TrainError::Checkpoint { .. } => true,
            TrainError::Data(e) => e.is_usage(),
            TrainError::Model(e) => e.is_usage(),
            _ => false,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> TrainError {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn config(source_name: impl Into<String>, message: impl Into<String>) -> TrainError {
        TrainError::Config {
            source_name: source_name.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
