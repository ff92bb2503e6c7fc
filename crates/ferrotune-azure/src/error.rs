use std::path::PathBuf;

/// Everything that can go wrong talking to Azure. `Usage` is the user's to fix before anything is
/// sent (exit 2); the rest are runtime failures (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    #[error("{0}")]
    Usage(String),
    #[error("credentials: {0}")]
    Credential(String),
    #[error("{method} {url} answered HTTP {status}: {code}: {message}{}", request_id_suffix(.request_id))]
    Api {
        method: String,
        url: String,
        status: u16,
        code: String,
        message: String,
        request_id: Option<String>,
    },
    #[error("{method} {url}: {detail}")]
    Transport {
        method: String,
        url: String,
        detail: String,
    },
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Operation(String),
}

fn request_id_suffix(id: &Option<String>) -> String {
    match id {
        Some(id) => format!(" (request id {id})"),
        None => String::new(),
    }
}

impl AzureError {
    pub fn is_usage(&self) -> bool {
        matches!(self, AzureError::Usage(_))
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AzureError::Io {
            path: path.into(),
            source,
        }
    }

    /// HTTP status of an API error, for callers that treat 404 as "absent".
    pub fn status(&self) -> Option<u16> {
        match self {
            AzureError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, AzureError>;
