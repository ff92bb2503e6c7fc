//! MLflow's stable REST API (`/api/2.0/mlflow/...`) for run tracking, plus the artifact proxy
//! (`/api/2.0/mlflow-artifacts/artifacts/...`) that `mlflow server` serves by default. Blocking
//! calls with a per-request timeout; the caller decides how to retry.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    /// The server could not be reached or did not answer in time.
    #[error("MLflow server {url}: {message}")]
    Unreachable { url: String, message: String },
    /// The server answered with an error.
    #[error("MLflow {endpoint}: HTTP {status}: {body}")]
    Api {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("{0}")]
    Other(String),
}

impl MlflowError {
    /// Worth retrying later (network trouble, server overloaded or restarting).
    pub fn is_transient(&self) -> bool {
        match self {
            MlflowError::Unreachable { .. } => true,
            MlflowError::Api { status, .. } => *status == 429 || *status >= 500,
            MlflowError::Other(_) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, MlflowError>;

/// One metric value at a step (`timestamp` in ms since the epoch).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    pub timestamp: i64,
    pub step: i64,
}

/// A connection to one tracking server.
pub struct TrackingClient {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

/// MLflow's limits per `runs/log-batch` request.
pub const MAX_METRICS_PER_BATCH: usize = 1000;
pub const MAX_PARAMS_PER_BATCH: usize = 100;

impl TrackingClient {
    /// `uri` is `http(s)://host[:port][/prefix]`; `token` is sent as a bearer token
    /// (`MLFLOW_TRACKING_TOKEN`, or an Azure AD token for Azure ML).
    pub fn new(uri: &str, token: Option<String>, timeout: Duration) -> Result<TrackingClient> {
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            return Err(MlflowError::Other(format!(
                "tracking URI \"{uri}\" is not an http(s) server; ferrotune logs to a running `mlflow server` (or Azure ML) and always writes metrics.jsonl locally"
            )));
        }
        let http = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| MlflowError::Other(e.to_string()))?;
        Ok(TrackingClient {
            base: uri.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    pub fn uri(&self) -> &str {
        &self.base
    }

    pub(crate) fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> Result<Value> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        self.send(self.http.get(url).query(query), endpoint)
    }

    pub(crate) fn send(
        &self,
        req: reqwest::blocking::RequestBuilder,
        endpoint: &str,
    ) -> Result<Value> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().map_err(|e| MlflowError::Unreachable {
            url: self.base.clone(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        if !(200..300).contains(&status) {
            return Err(MlflowError::Api {
                endpoint: endpoint.to_string(),
                status,
                body: text.chars().take(500).collect(),
            });
        }
        if text.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&text).map_err(|e| MlflowError::Other(format!("{endpoint}: {e}")))
    }

    pub(crate) fn post(&self, endpoint: &str, body: &Value) -> Result<Value> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        self.send(self.http.post(url).json(body), endpoint)
    }

    /// The id of experiment `name`, created when missing.
    pub fn experiment_id(&self, name: &str) -> Result<String> {
        let url = format!("{}/api/2.0/mlflow/experiments/get-by-name", self.base);
        match self.send(
            self.http.get(url).query(&[("experiment_name", name)]),
            "experiments/get-by-name",
        ) {
            Ok(v) => field(&v, &["experiment", "experiment_id"]),
            Err(MlflowError::Api { status: 404, .. }) => {
                let v = self.post("experiments/create", &json!({ "name": name }))?;
                field(&v, &["experiment_id"])
            }
            Err(e) => Err(e),
        }
    }

    /// Start a run; returns `(run_id, artifact_uri)`.
    pub fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        tags: &[(String, String)],
        start_ms: i64,
    ) -> Result<(String, String)> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let v = self.post(
            "runs/create",
            &json!({"experiment_id": experiment_id, "run_name": run_name, "start_time": start_ms, "tags": tags}),
        )?;
        Ok((
            field(&v, &["run", "info", "run_id"])?,
            field(&v, &["run", "info", "artifact_uri"]).unwrap_or_default(),
        ))
    }

    /// Log params and metrics (each call within MLflow's per-request limits).
    pub fn log_batch(
        &self,
        run_id: &str,
        params: &[(String, String)],
        metrics: &[Metric],
    ) -> Result<()> {
        for chunk in params.chunks(MAX_PARAMS_PER_BATCH) {
            let params: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect();
            self.post(
                "runs/log-batch",
                &json!({"run_id": run_id, "params": params}),
            )?;
        }
        for chunk in metrics.chunks(MAX_METRICS_PER_BATCH) {
            self.post(
                "runs/log-batch",
                &json!({"run_id": run_id, "metrics": chunk}),
            )?;
        }
        Ok(())
    }

    pub fn set_tag(&self, run_id: &str, key: &str, value: &str) -> Result<()> {
        self.post(
            "runs/set-tag",
            &json!({"run_id": run_id, "key": key, "value": value}),
        )
        .map(|_| ())
    }

    /// End a run: `FINISHED`, `FAILED` or `KILLED`.
    pub fn finish_run(&self, run_id: &str, status: &str, end_ms: i64) -> Result<()> {
        self.post(
            "runs/update",
            &json!({"run_id": run_id, "status": status, "end_time": end_ms}),
        )
        .map(|_| ())
    }

    /// Upload a file as run artifact `artifact_path` through the server's artifact proxy
    /// (`artifact_uri` as `runs/create` returned it, `mlflow-artifacts:/...`).
    pub fn upload_artifact(
        &self,
        artifact_uri: &str,
        artifact_path: &str,
        file: &Path,
    ) -> Result<()> {
        let Some(rest) = artifact_uri.strip_prefix("mlflow-artifacts:") else {
            return Err(MlflowError::Other(format!(
                "the server stores artifacts at {artifact_uri}, which it does not proxy; start it with --serve-artifacts (the default) to receive them"
            )));
        };
        // `mlflow-artifacts://host/path` or `mlflow-artifacts:/path`.
        let path = match rest.strip_prefix("//") {
            Some(hosted) => hosted.split_once('/').map_or("", |(_, p)| p).to_string(),
            None => rest.trim_start_matches('/').to_string(),
        };
        // Streamed from disk: shards are hundreds of megabytes.
        let body = std::fs::File::open(file)
            .map_err(|e| MlflowError::Other(format!("{}: {e}", file.display())))?;
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{}/{}",
            self.base,
            path.trim_end_matches('/'),
            artifact_path
        );
        self.send(self.http.put(url).body(body), "mlflow-artifacts")
            .map(|_| ())
    }
}

pub(crate) fn field(v: &Value, path: &[&str]) -> Result<String> {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .ok_or_else(|| MlflowError::Other(format!("response has no {}", path.join("."))))?;
    }
    Ok(match cur {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_servers_are_accepted_and_down_servers_are_transient() {
        assert!(TrackingClient::new("./mlruns", None, Duration::from_secs(1)).is_err());
        let c =
            TrackingClient::new("http://127.0.0.1:9", None, Duration::from_millis(300)).unwrap();
        let e = c.experiment_id("x").unwrap_err();
        assert!(e.is_transient(), "{e}");
    }
}
