//! Command jobs: the `ferrotune` binary and its config as a code asset, a PyTorch-distribution
//! command job that runs it, and following the job to its end.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::arm::Arm;
use crate::blob::BlobContainer;
use crate::duration::iso8601;
use crate::error::{AzureError, Result};
use crate::upload::{self, UploadOptions};

pub const TERMINAL: [&str; 4] = ["Completed", "Failed", "Canceled", "NotResponding"];

/// Uploads the folder as a code asset (content-addressed: an identical folder is reused) and
/// answers its ARM id.
pub fn upload_code(
    arm: &Arm,
    folder: &Path,
    opts: &UploadOptions,
    say: &mut dyn FnMut(&str),
) -> Result<String> {
    let mut plan = upload::scan(folder)?;
    let name = format!("ferrotune-{}", &plan.hash[..16]);
    let rel = format!("codes/{name}/versions/1");
    if !arm.is_dry_run() && arm.get_opt(&arm.ws_url(&rel))?.is_some() {
        say(&format!("code asset {name} exists already: reused"));
        return Ok(arm.ws_id(&rel));
    }
    let pending = arm.post(
        &arm.ws_url(&format!("{rel}/startPendingUpload")),
        Some(json!({"pendingUploadType": "TemporaryBlobReference"})),
    )?;
    let (sas_uri, blob_uri) = if arm.is_dry_run() {
        (
            "https://<account>.blob.core.windows.net/<container>/<code>?sig=***".to_string(),
            "https://<account>.blob.core.windows.net/<container>/<code>".to_string(),
        )
    } else {
        let r = pending.get("blobReferenceForConsumption").ok_or_else(|| {
            AzureError::Operation(
                "startPendingUpload answered no blobReferenceForConsumption".into(),
            )
        })?;
        let sas = r
            .pointer("/credential/sasUri")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let blob = r
            .get("blobUri")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if sas.is_empty() || blob.is_empty() {
            return Err(AzureError::Operation(
                "startPendingUpload answered no SAS URI".into(),
            ));
        }
        (sas, blob)
    };
    plan.prefix = String::new();
    let container = BlobContainer::from_sas_uri(arm.transport().clone(), &sas_uri)?;
    say(&format!(
        "uploading code asset {name}: {} files, {:.1} MB",
        plan.files.len(),
        plan.total_bytes() as f64 / 1e6
    ));
    if !arm.is_dry_run() {
        upload::upload(&container, &plan, opts, &|_, _| {})?;
    }
    arm.put(
        &arm.ws_url(&rel),
        json!({"properties": {"codeUri": blob_uri, "isAnonymous": false}}),
    )?;
    Ok(arm.ws_id(&rel))
}

#[derive(Debug, Clone)]
pub enum JobInput {
    /// An `azureml://` or `https://` folder, an MLflow model, or a literal value.
    Folder(String),
    MlflowModel(String),
    Literal(String),
}

#[derive(Debug, Clone)]
pub struct CommandJob {
    pub name: String,
    pub display_name: String,
    pub experiment: String,
    pub compute: String,
    pub environment: String,
    pub code_id: String,
    pub command: String,
    pub nodes: u32,
    pub processes_per_node: u32,
    pub inputs: Vec<(String, JobInput)>,
    /// Outputs written as MLflow model folders (`trained_model`).
    pub model_outputs: Vec<String>,
    pub timeout: Duration,
    pub environment_variables: Vec<(String, String)>,
}

pub fn submit(arm: &Arm, job: &CommandJob) -> Result<Value> {
    let inputs: Map<String, Value> = job
        .inputs
        .iter()
        .map(|(k, v)| {
            let body = match v {
                JobInput::Folder(uri) => {
                    json!({"jobInputType": "uri_folder", "uri": uri, "mode": "ReadOnlyMount"})
                }
                JobInput::MlflowModel(uri) => {
                    json!({"jobInputType": "mlflow_model", "uri": uri, "mode": "ReadOnlyMount"})
                }
                JobInput::Literal(value) => json!({"jobInputType": "literal", "value": value}),
            };
            (k.clone(), body)
        })
        .collect();
    let outputs: Map<String, Value> = job
        .model_outputs
        .iter()
        .map(|k| {
            (
                k.clone(),
                json!({"jobOutputType": "mlflow_model", "mode": "ReadWriteMount"}),
            )
        })
        .collect();
    let compute_id = if job.compute.starts_with("/subscriptions/") {
        job.compute.clone()
    } else {
        arm.ws_id(&format!("computes/{}", job.compute))
    };
    let env_vars: Map<String, Value> = job
        .environment_variables
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let body = json!({
        "properties": {
            "jobType": "Command",
            "displayName": job.display_name,
            "experimentName": job.experiment,
            "computeId": compute_id,
            "codeId": job.code_id,
            "environmentId": job.environment,
            "command": job.command,
            "distribution": {"distributionType": "PyTorch", "processCountPerInstance": job.processes_per_node},
            "resources": {"instanceCount": job.nodes},
            "inputs": inputs,
            "outputs": outputs,
            "environmentVariables": env_vars,
            "limits": {"jobLimitsType": "Command", "timeout": iso8601(job.timeout)}
        }
    });
    arm.put(&arm.ws_url(&format!("jobs/{}", job.name)), body)
}

#[derive(Debug, Clone)]
pub struct JobStatus {
    pub status: String,
    pub studio_url: Option<String>,
}

pub fn status(arm: &Arm, name: &str) -> Result<JobStatus> {
    let v = arm.get(&arm.ws_url(&format!("jobs/{name}")))?;
    Ok(JobStatus {
        status: v
            .pointer("/properties/status")
            .and_then(Value::as_str)
            .unwrap_or("Unknown")
            .to_string(),
        studio_url: v
            .pointer("/properties/services/Studio/endpoint")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Polls until the job ends; answers its final status.
pub fn follow(arm: &Arm, name: &str, poll: Duration, say: &mut dyn FnMut(&str)) -> Result<String> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let s = status(arm, name)?;
        if s.status != last {
            say(&format!(
                "job {name}: {} ({} s)",
                s.status,
                started.elapsed().as_secs()
            ));
            last = s.status.clone();
        }
        if arm.is_dry_run() || TERMINAL.contains(&s.status.as_str()) {
            return Ok(s.status);
        }
        std::thread::sleep(poll);
    }
}
