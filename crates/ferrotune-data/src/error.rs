//! The data crate's one error type. Variants say whether the user can fix it (usage/config)
//! or it happened at run time, so the CLI can pick exit code 2 or 1.

use std::path::PathBuf;

use crate::record::RowLocation;

/// Everything that can go wrong while reading, tokenizing or caching a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The input path or split does not exist or holds no recognised files.
    #[error("{0}")]
    Input(String),
    /// A row is malformed and `--on-bad-row fail` was asked for.
    #[error(
        "bad row at {location}: {reason} ({detail}); fix the row or rerun with --on-bad-row skip"
    )]
    BadRow {
        location: RowLocation,
        reason: crate::record::BadRowReason,
        detail: String,
    },
    /// The tokenizer folder is missing a file or holds something unreadable.
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// The chat template does not compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// An option has a value that cannot work (e.g. --split-pc 0).
    #[error("{0}")]
    Usage(String),
    /// A prepared folder is missing, from another version or damaged.
    #[error("prepared data {path}: {message}")]
    Prepared { path: PathBuf, message: String },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Parquet/arrow decoding failed part-way through a file.
    #[error("{path}: parquet: {message}")]
    Parquet { path: PathBuf, message: String },
}

impl DataError {
    /// True when the user can fix the problem by changing a flag, a file or a path (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            DataError::Input(_)
                | DataError::BadRow { .. }
                | DataError::Tokenizer { .. }
                | DataError::Template(_)
                | DataError::Usage(_)
                | DataError::Prepared { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
