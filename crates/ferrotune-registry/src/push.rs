//! `ferrotune models push NAME:VERSION --to URI`: a registered version into an MLflow model
//! registry. The folder's files go through the server's artifact proxy into a run (the MLflow run
//! that trained it when the lineage names one on the same server, else a new run in experiment
//! `ferrotune-registry`), then the registered model and a version pointing at them are created,
//! with the lineage as tags and the local aliases carried over.

use std::path::Path;
use std::time::{Duration, Instant};

use ferrotune_mlflow::TrackingClient;
use serde::Serialize;
use serde_json::Value;

use crate::artifacts::files;
use crate::error::{RegistryError, Result};
use crate::registry::{now_ms, ModelVersion};

/// Per-request limit: a 500 MB shard over a slow link takes minutes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
const EXPERIMENT: &str = "ferrotune-registry";

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub uri: String,
    pub name: String,
    /// The version number the MLflow registry gave it.
    pub version: String,
    pub run_id: String,
    /// Whether the run is the training run (lineage) rather than one made for the push.
    pub training_run: bool,
    pub source: String,
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// The tags a pushed version carries in any remote registry: where it came from locally, its
/// lineage as `ferrotune.lineage.*` (values cut at 5,000 characters, MLflow's limit) and the local
/// tags.
pub fn version_tags(v: &ModelVersion) -> Vec<(String, String)> {
    let mut tags = vec![
        ("ferrotune.local_name".to_string(), v.name.clone()),
        ("ferrotune.local_version".to_string(), v.version.to_string()),
        ("ferrotune.artifact".to_string(), v.artifact.clone()),
        ("ferrotune.kind".to_string(), v.kind.clone()),
    ];
    if let Some(Value::Object(map)) = &v.lineage {
        for (k, val) in map {
            let s = match val {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            tags.push((
                format!("ferrotune.lineage.{k}"),
                s.chars().take(5000).collect(),
            ));
        }
    }
    tags.extend(v.tags.iter().map(|(k, val)| (k.clone(), val.clone())));
    tags
}

/// Push `v` to the MLflow server at `uri` (as `name`, default its local name).
pub fn push_to_mlflow(
    v: &ModelVersion,
    uri: &str,
    token: Option<String>,
    name: Option<&str>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PushReport> {
    if uri.starts_with("azureml:") {
        return Err(RegistryError::Usage(
            "an azureml: URI is pushed to Azure ML (`ferrotune models push` sends it there), not to an MLflow server".into(),
        ));
    }
    let started = Instant::now();
    let client = TrackingClient::new(uri, token, REQUEST_TIMEOUT)
        .map_err(|e| RegistryError::Usage(format!("--to {uri}: {e}")))?;
    let name = name.unwrap_or(&v.name).to_string();
    let lineage = v.lineage.clone().unwrap_or(Value::Null);
    let text = |k: &str| lineage.get(k).and_then(Value::as_str).map(str::to_owned);
    let same_server =
        text("tracking_uri").is_some_and(|t| t.trim_end_matches('/') == uri.trim_end_matches('/'));
    let training = text("training_run_id").filter(|_| same_server);

    let tags = version_tags(v);

    let (run_id, artifact_uri, own_run) = match &training {
        Some(run) => (run.clone(), client.run_artifact_uri(run)?, false),
        None => {
            let exp = client.experiment_id(EXPERIMENT)?;
            let (run, art) =
                client.create_run(&exp, &format!("{}:{}", v.name, v.version), &tags, now_ms())?;
            (run, art, true)
        }
    };
    let subpath = format!("ferrotune-model-{}", v.version);
    let all = files(&v.path)?;
    let mut bytes = 0u64;
    for (i, rel) in all.iter().enumerate() {
        let file = v.path.join(rel);
        bytes += std::fs::metadata(&file)
            .map_err(|e| RegistryError::io(&file, e))?
            .len();
        client.upload_artifact(&artifact_uri, &format!("{subpath}/{}", slash(rel)), &file)?;
        progress(i + 1, all.len());
    }
    if own_run {
        client.finish_run(&run_id, "FINISHED", now_ms())?;
    }
    client.create_registered_model(&name, "Fine-tuned with ferrotune")?;
    let source = format!("{}/{subpath}", artifact_uri.trim_end_matches('/'));
    let version =
        client.create_model_version(&name, &source, Some(&run_id), &v.description, &tags)?;
    // MLflow's own server registers at once; other registries may copy first.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let status = client.model_version_status(&name, &version)?;
        match status.as_str() {
            "READY" => break,
            "FAILED_REGISTRATION" => {
                return Err(RegistryError::Usage(format!(
                    "{uri}: the registry failed to register {name} version {version}"
                )))
            }
            _ if Instant::now() > deadline => {
                return Err(RegistryError::Usage(format!(
                    "{uri}: {name} version {version} is still {status} after 10 minutes"
                )))
            }
            _ => std::thread::sleep(Duration::from_secs(2)),
        }
    }
    for alias in &v.aliases {
        client.set_registered_model_alias(&name, alias, &version)?;
    }
    Ok(PushReport {
        uri: uri.to_string(),
        name,
        version,
        run_id,
        training_run: !own_run,
        source,
        files: all.len(),
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn slash(p: &Path) -> String {
    p.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}
