//! What the binary prints and returns when a command fails.

use ferrotune_data::DataError;

/// An error message and the process exit code (1 runtime, 2 usage/config).
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub const RUNTIME: i32 = 1;
    pub const USAGE: i32 = 2;
    /// Stopped by Ctrl-C after writing a checkpoint (128 + SIGINT, as shells report it).
    pub const INTERRUPTED: i32 = 130;

    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: Self::USAGE,
            message: message.into(),
        }
    }

    pub fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            code: Self::RUNTIME,
            message: message.into(),
        }
    }
}

impl Failure {
    /// Exit 2 when the error is the user's to fix (input, config), 1 otherwise.
    fn classified(usage: bool, message: String) -> Failure {
        Failure {
            code: if usage { Self::USAGE } else { Self::RUNTIME },
            message,
        }
    }
}

impl From<ferrotune_model::ModelError> for Failure {
    fn from(e: ferrotune_model::ModelError) -> Failure {
        Failure::classified(e.is_usage(), e.to_string())
    }
}

impl From<candle_core::Error> for Failure {
    fn from(e: candle_core::Error) -> Failure {
        Failure::runtime(e.to_string())
    }
}

impl From<DataError> for Failure {
    fn from(e: DataError) -> Failure {
        Failure::classified(e.is_usage(), e.to_string())
    }
}

impl From<ferrotune_train::TrainError> for Failure {
    fn from(e: ferrotune_train::TrainError) -> Failure {
        Failure::classified(e.is_usage(), e.to_string())
    }
}

impl From<ferrotune_export::ExportError> for Failure {
    fn from(e: ferrotune_export::ExportError) -> Failure {
        Failure::classified(e.is_usage(), e.to_string())
    }
}

impl From<ferrotune_registry::RegistryError> for Failure {
    fn from(e: ferrotune_registry::RegistryError) -> Failure {
        Failure::classified(e.is_usage(), e.to_string())
    }
}
