//! MLflow for ferrotune. `tracking`: the REST client for experiments, runs, params, metrics and
//! artifacts, spoken to a local `mlflow server` or Azure ML's MLflow-compatible endpoint.

pub mod tracking;

pub use tracking::{Metric, MlflowError, TrackingClient};
