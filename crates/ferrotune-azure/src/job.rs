//! Command jobs: the `ferrotune` binary and its config as a code asset, a PyTorch-distribution
//! command job that runs it, and following the job to its end.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::arm::Arm;
use crate::blob::BlobContainer;
use crate::credential::ML_SCOPE;
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
    upload::upload(&container, &plan, opts, &|_, _| {})?;
    arm.put(
        &arm.ws_url(&rel),
        json!({"properties": {"codeUri": blob_uri, "isAnonymous": false}}),
    )?;
    Ok(arm.ws_id(&rel))
}

#[derive(Debug, Clone)]
pub enum JobInput {
    /// An `azureml://` or `https://` folder.
    Folder(String),
    /// One file.
    File(String),
    /// An MLflow model (the source's registry model, say).
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
    pub tags: Vec<(String, String)>,
}

fn string_map(pairs: &[(String, String)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect()
}

pub fn submit(arm: &Arm, job: &CommandJob) -> Result<Value> {
    let mount =
        |kind: &str, uri: &str| json!({"jobInputType": kind, "uri": uri, "mode": "ReadOnlyMount"});
    let inputs: Map<String, Value> = job
        .inputs
        .iter()
        .map(|(k, v)| {
            let body = match v {
                JobInput::Folder(uri) => mount("uri_folder", uri),
                JobInput::File(uri) => mount("uri_file", uri),
                JobInput::MlflowModel(uri) => mount("mlflow_model", uri),
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
    let body = json!({
        "properties": {
            "jobType": "Command",
            "displayName": job.display_name,
            "experimentName": job.experiment,
            "tags": string_map(&job.tags),
            "computeId": compute_id,
            "codeId": job.code_id,
            "environmentId": job.environment,
            "command": job.command,
            "distribution": {"distributionType": "PyTorch", "processCountPerInstance": job.processes_per_node},
            "resources": {"instanceCount": job.nodes},
            "inputs": inputs,
            "outputs": outputs,
            "environmentVariables": string_map(&job.environment_variables),
            "limits": {"jobLimitsType": "Command", "timeout": iso8601(job.timeout)}
        }
    });
    arm.put(&arm.ws_url(&format!("jobs/{}", job.name)), body)
}

#[derive(Debug, Clone)]
pub struct JobStatus {
    pub status: String,
    pub studio_url: Option<String>,
    pub tags: Map<String, Value>,
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
        tags: v
            .pointer("/properties/tags")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
    })
}

pub fn cancel(arm: &Arm, name: &str) -> Result<()> {
    arm.post(&arm.ws_url(&format!("jobs/{name}/cancel")), None)
        .map(|_| ())
}

/// The job's user logs (`user_logs/std_log*.txt`) as run history lists them: the workspace's
/// discovery URL names the history service, whose run details carry a SAS URL per log file.
pub struct LogTail {
    details_url: Option<String>,
    offsets: std::collections::BTreeMap<String, u64>,
}

impl LogTail {
    pub fn new(arm: &Arm, name: &str) -> Result<LogTail> {
        let ws = arm.get(&arm.ws_url(""))?;
        let discovery = ws
            .pointer("/properties/discoveryUrl")
            .and_then(Value::as_str)
            .map(str::to_string);
        let details_url = match discovery {
            Some(url) if !arm.is_dry_run() => {
                let services = arm
                    .send_for(crate::http::Call::new(reqwest::Method::GET, url), ML_SCOPE)?
                    .json()?;
                services.get("history").and_then(Value::as_str).map(|h| {
                    format!(
                        "{}/history/v1.0{}/runs/{name}/details",
                        h.trim_end_matches('/'),
                        arm.workspace.arm_path()
                    )
                })
            }
            _ => None,
        };
        Ok(LogTail {
            details_url,
            offsets: Default::default(),
        })
    }

    /// New lines of every user log since the last call, prefixed by the file's name when the
    /// job has several (one per rank).
    pub fn poll(&mut self, arm: &Arm) -> Result<Vec<String>> {
        let Some(url) = &self.details_url else {
            return Ok(Vec::new());
        };
        let details = arm
            .send_for(
                crate::http::Call::new(reqwest::Method::GET, url.clone()),
                ML_SCOPE,
            )?
            .json()?;
        let Some(files) = details.get("logFiles").and_then(Value::as_object) else {
            return Ok(Vec::new());
        };
        let mut logs: Vec<(&String, &str)> = files
            .iter()
            .filter(|(k, _)| k.starts_with("user_logs/std_log"))
            .filter_map(|(k, v)| Some((k, v.as_str()?)))
            .collect();
        logs.sort();
        let several = logs.len() > 1;
        let mut lines = Vec::new();
        for (file, sas) in logs {
            let offset = self.offsets.get(file.as_str()).copied().unwrap_or(0);
            let call = crate::http::Call::new(reqwest::Method::GET, sas)
                .header("Range", format!("bytes={offset}-"));
            let reply = arm.transport().send(&call)?;
            if reply.status == 416 || !reply.ok() {
                continue;
            }
            // Only whole lines: a partial last line waits for the next poll.
            let text = String::from_utf8_lossy(&reply.body);
            let Some(end) = text.rfind('\n') else {
                continue;
            };
            let complete = &text[..=end];
            self.offsets
                .insert(file.clone(), offset + complete.len() as u64);
            let short = file.trim_start_matches("user_logs/");
            for line in complete.lines() {
                lines.push(if several {
                    format!("[{short}] {line}")
                } else {
                    line.to_string()
                });
            }
        }
        Ok(lines)
    }
}

/// Polls until the job ends, passing status changes and new log lines to `say`; answers the
/// final status.
pub fn follow(
    arm: &Arm,
    name: &str,
    poll: Duration,
    logs: bool,
    say: &mut dyn FnMut(&str),
) -> Result<String> {
    if arm.is_dry_run() {
        status(arm, name)?;
        say(&format!(
            "job {name}: (dry run) would be followed, status and user logs, until it ends"
        ));
        return Ok("Completed".into());
    }
    let started = Instant::now();
    let mut last = String::new();
    let mut tail = if logs {
        Some(LogTail::new(arm, name)?)
    } else {
        None
    };
    loop {
        let s = status(arm, name)?;
        if let Some(t) = tail.as_mut() {
            for line in t.poll(arm)? {
                say(&line);
            }
        }
        if s.status != last {
            say(&format!(
                "job {name}: {} ({} s)",
                s.status,
                started.elapsed().as_secs()
            ));
            last = s.status.clone();
        }
        if TERMINAL.contains(&s.status.as_str()) {
            return Ok(s.status);
        }
        std::thread::sleep(poll);
    }
}
