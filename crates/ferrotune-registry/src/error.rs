//! The registry's one error type; `is_usage` tells the CLI to exit 2 instead of 1.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Something the user asked for that does not exist or cannot be done as asked.
    #[error("{0}")]
    Usage(String),
    #[error("model registry {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Export(#[from] ferrotune_export::ExportError),
    #[error(transparent)]
    Mlflow(#[from] ferrotune_mlflow::MlflowError),
}

impl RegistryError {
    pub fn is_usage(&self) -> bool {
        match self {
            RegistryError::Usage(_) => true,
            RegistryError::Export(e) => e.is_usage(),
            _ => false,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> RegistryError {
        RegistryError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, RegistryError>;
