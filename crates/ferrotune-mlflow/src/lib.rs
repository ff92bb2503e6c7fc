//! MLflow for ferrotune, spoken to a local `mlflow server` or Azure ML's MLflow-compatible
//! endpoint. `tracking`: experiments, runs, params, metrics and artifacts; `model_registry`:
//! registered models, versions and aliases.

pub mod model_registry;
pub mod tracking;

pub use tracking::{Metric, MlflowError, TrackingClient};
