//! Registering an MLflow model folder (or a job's `trained_model` output) as a workspace model
//! version, as the source's `Model(type=MLFLOW_MODEL, name=..., version=timestamp)` does.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::arm::Arm;
use crate::datastore;
use crate::error::{AzureError, Result};
use crate::upload::{self, UploadOptions, UploadReport};

#[derive(Debug, Clone)]
pub struct ModelVersionSpec {
    pub name: String,
    pub version: String,
    pub description: String,
    /// The training job it came from (lineage).
    pub job: Option<String>,
    pub tags: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct RegisteredModel {
    /// ARM id: what a deployment names as its model.
    pub id: String,
    pub name: String,
    pub version: String,
    pub model_uri: String,
    pub upload: Option<UploadReport>,
}

/// Model names Azure accepts: letters, digits, `-`, `_`, `.`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AzureError::Usage(format!(
            "model name `{name}`: use letters, digits, '-', '_' and '.', starting with a letter or digit"
        )))
    }
}

/// Uploads the folder to the default datastore (resumably) and creates the version.
pub fn register_folder(
    arm: &Arm,
    env: &HashMap<String, String>,
    folder: &Path,
    spec: &ModelVersionSpec,
    opts: &UploadOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
    say: &mut dyn FnMut(&str),
) -> Result<RegisteredModel> {
    check_name(&spec.name)?;
    if !folder.join("MLmodel").is_file() {
        return Err(AzureError::Usage(format!(
            "{}: no MLmodel file; register an MLflow model folder (`ferrotune export` makes one)",
            folder.display()
        )));
    }
    let plan = upload::scan(folder)?;
    let ds = datastore::default_datastore(arm)?;
    let container = datastore::container(arm, &ds, env)?;
    say(&format!(
        "uploading {} files ({:.1} MB) to {}/{}",
        plan.files.len(),
        plan.total_bytes() as f64 / 1e6,
        ds.name,
        plan.prefix
    ));
    let report = upload::upload(&container, &plan, opts, progress)?;
    if report.already_complete {
        say("already uploaded (completion marker found): nothing sent");
    }
    let uri = ds.azureml_uri(arm, &plan.prefix);
    let mut registered = create_version(arm, &uri, spec)?;
    registered.upload = Some(report);
    Ok(registered)
}

/// Registers what a job wrote to its `trained_model` output, without moving any bytes.
pub fn register_job_output(
    arm: &Arm,
    job: &str,
    output: &str,
    spec: &ModelVersionSpec,
) -> Result<RegisteredModel> {
    check_name(&spec.name)?;
    let uri = format!("azureml://jobs/{job}/outputs/{output}");
    let mut spec = spec.clone();
    spec.job.get_or_insert_with(|| job.to_string());
    create_version(arm, &uri, &spec)
}

fn create_version(arm: &Arm, model_uri: &str, spec: &ModelVersionSpec) -> Result<RegisteredModel> {
    let mut tags: serde_json::Map<String, Value> = spec
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let mut properties = serde_json::Map::new();
    properties.insert(
        "producer".into(),
        json!(concat!("ferrotune ", env!("CARGO_PKG_VERSION"))),
    );
    if let Some(job) = &spec.job {
        tags.insert("job_name".into(), json!(job));
        properties.insert("azureml.jobName".into(), json!(job));
    }
    let rel = format!("models/{}/versions/{}", spec.name, spec.version);
    let body = json!({
        "properties": {
            "modelType": "mlflow_model",
            "modelUri": model_uri,
            "description": spec.description,
            "tags": tags,
            "properties": properties,
            "isAnonymous": false
        }
    });
    let answer = arm.put(&arm.ws_url(&rel), body)?;
    Ok(RegisteredModel {
        id: answer
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| arm.ws_id(&rel)),
        name: spec.name.clone(),
        version: spec.version.clone(),
        model_uri: model_uri.to_string(),
        upload: None,
    })
}

/// The model version's ARM id from `NAME:VERSION` (what `azure deploy --model` takes).
pub fn version_id(arm: &Arm, spec: &str) -> Result<String> {
    if spec.starts_with("/subscriptions/") || spec.starts_with("azureml:") {
        return Ok(spec.to_string());
    }
    let (name, version) = spec.split_once(':').ok_or_else(|| {
        AzureError::Usage(format!(
            "--model `{spec}`: expected NAME:VERSION (or an ARM id)"
        ))
    })?;
    check_name(name)?;
    Ok(arm.ws_id(&format!("models/{name}/versions/{version}")))
}
