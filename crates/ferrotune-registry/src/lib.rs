//! ferrotune's model registry: registered models and versions with tags, aliases and lineage in
//! SQLite, their folders stored once by content, and pushes to an MLflow model registry.

pub mod artifacts;
pub mod error;
pub mod push;
pub mod registry;
pub mod spec;

pub use error::{RegistryError, Result};
pub use registry::{
    default_home, default_name, inspect, ModelSummary, ModelVersion, RegisterRequest, Registry,
};
pub use spec::{Selector, VersionSpec};
