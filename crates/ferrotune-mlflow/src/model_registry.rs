//! MLflow's model registry over REST (`registered-models/*`, `model-versions/*`), as a local
//! `mlflow server` and Azure ML's MLflow-compatible registry serve it.

use serde_json::{json, Value};

use crate::tracking::{field, MlflowError, Result, TrackingClient};

impl TrackingClient {
    /// Create registered model `name`; `false` when it already exists (not an error).
    pub fn create_registered_model(&self, name: &str, description: &str) -> Result<bool> {
        match self.post(
            "registered-models/create",
            &json!({"name": name, "description": description}),
        ) {
            Ok(_) => Ok(true),
            Err(MlflowError::Api { status, body, .. })
                if (status == 400 || status == 409) && body.contains("RESOURCE_ALREADY_EXISTS") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Create a version of `name` from the artifacts at `source`; returns its version number.
    pub fn create_model_version(
        &self,
        name: &str,
        source: &str,
        run_id: Option<&str>,
        description: &str,
        tags: &[(String, String)],
    ) -> Result<String> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let mut body =
            json!({"name": name, "source": source, "description": description, "tags": tags});
        if let Some(r) = run_id {
            body["run_id"] = json!(r);
        }
        let v = self.post("model-versions/create", &body)?;
        field(&v, &["model_version", "version"])
    }

    /// `READY`, `PENDING_REGISTRATION` or `FAILED_REGISTRATION`.
    pub fn model_version_status(&self, name: &str, version: &str) -> Result<String> {
        let v = self.get(
            "model-versions/get",
            &[("name", name), ("version", version)],
        )?;
        field(&v, &["model_version", "status"])
    }

    pub fn set_registered_model_alias(&self, name: &str, alias: &str, version: &str) -> Result<()> {
        self.post(
            "registered-models/alias",
            &json!({"name": name, "alias": alias, "version": version}),
        )
        .map(|_| ())
    }

    /// The artifact root of run `run_id` (`mlflow-artifacts:/...`).
    pub fn run_artifact_uri(&self, run_id: &str) -> Result<String> {
        let v = self.get("runs/get", &[("run_id", run_id)])?;
        field(&v, &["run", "info", "artifact_uri"])
    }
}
