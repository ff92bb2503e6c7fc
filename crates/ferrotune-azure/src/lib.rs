//! Azure ML over its REST APIs, so that a user never needs the Python SDK: credentials in
//! `DefaultAzureCredential`'s order, the workspace as `MLClient.from_config` finds it, one ARM
//! client (retries, long-running operations, dry runs), resumable blob uploads, model versions,
//! online endpoints and command jobs.

pub mod arm;
pub mod blob;
pub mod compute;
pub mod credential;
pub mod datastore;
pub mod duration;
pub mod endpoint;
pub mod error;
#[cfg(feature = "fake")]
pub mod fake;
pub mod http;
pub mod job;
pub mod model;
pub mod upload;
pub mod workspace;

pub use arm::Arm;
pub use error::{AzureError, Result};
pub use workspace::{Workspace, WorkspaceFlags};
