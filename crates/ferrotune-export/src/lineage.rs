//! Where an export came from: the training run, its base model, data, config and code. Written
//! into `MLmodel`'s free-form `metadata` (under `ferrotune`) so MLflow, Azure ML and the registry
//! all carry it with the model.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ExportError, Result};
use crate::source::Source;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    pub ferrotune_version: String,
    /// The commit ferrotune was built from, when known.
    #[serde(default)]
    pub git_commit: Option<String>,
    /// `merged` or `adapter`.
    pub export_kind: String,
    pub base_model: String,
    /// The Hugging Face snapshot revision, when the base model came from the hub cache.
    #[serde(default)]
    pub base_model_revision: Option<String>,
    /// blake3 of the base model's config.json and every weight file's header and size.
    pub base_model_fingerprint: String,
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// The MLflow run that trained it (`output_dir/mlflow_run.json`), when it was tracked.
    #[serde(default)]
    pub training_run_id: Option<String>,
    #[serde(default)]
    pub tracking_uri: Option<String>,
    #[serde(default)]
    pub step: Option<u64>,
    #[serde(default)]
    pub epoch: Option<f64>,
    #[serde(default)]
    pub tokens_seen: Option<u64>,
    /// The [data] cache key of the training split.
    #[serde(default)]
    pub data_cache_key: Option<String>,
    /// Hash of everything in the config that changes training.
    #[serde(default)]
    pub config_hash: Option<String>,
    #[serde(default)]
    pub eval_loss: Option<f64>,
    #[serde(default)]
    pub best_eval_loss: Option<f64>,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_target_modules: Vec<String>,
}

impl Lineage {
    pub fn of(source: &Source, export_kind: &str, git_commit: Option<&str>) -> Result<Lineage> {
        let state = source.state.as_ref();
        let run = source.checkpoint.as_ref().and_then(|c| training_run(c));
        let text =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        Ok(Lineage {
            ferrotune_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: git_commit.filter(|c| !c.is_empty()).map(str::to_owned),
            export_kind: export_kind.to_string(),
            base_model: source.base_model.clone(),
            base_model_revision: hub_revision(&source.base_dir),
            base_model_fingerprint: fingerprint(&source.base_dir)?,
            checkpoint: source
                .checkpoint
                .as_ref()
                .or(Some(&source.adapter_dir))
                .map(|p| absolute(p).display().to_string()),
            training_run_id: run.as_ref().and_then(|r| text(r, "run_id")),
            tracking_uri: run.as_ref().and_then(|r| text(r, "tracking_uri")),
            step: state.map(|s| s.global_step),
            epoch: state.map(|s| s.epoch),
            tokens_seen: state.map(|s| s.tokens_seen),
            data_cache_key: state
                .map(|s| s.data_cache_key.clone())
                .filter(|k| !k.is_empty()),
            config_hash: state.map(|s| s.training_hash.clone()),
            eval_loss: state.and_then(|s| s.eval_loss),
            best_eval_loss: state.and_then(|s| s.best_eval_loss),
            lora_r: source.lora.r,
            lora_alpha: source.lora.lora_alpha,
            lora_target_modules: source.lora.target_modules.clone(),
        })
    }
}

/// `mlflow_run.json` of the training output a checkpoint sits in.
fn training_run(checkpoint: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(checkpoint.parent()?.join(TRAINING_RUN_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Written by `ferrotune train` into output_dir when the run is tracked in MLflow.
pub const TRAINING_RUN_FILE: &str = "mlflow_run.json";

fn absolute(p: &Path) -> std::path::PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `.../models--org--name/snapshots/<revision>` → the revision.
fn hub_revision(dir: &Path) -> Option<String> {
    let parent = dir.parent()?;
    (parent.file_name()? == "snapshots")
        .then(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .flatten()
}

/// A cheap identity of a model folder: its config and the headers and sizes of its weight files
/// (hashing the weights themselves would read gigabytes for every export).
pub fn fingerprint(dir: &Path) -> Result<String> {
    use std::io::Read;
    let mut h = blake3::Hasher::new();
    let config = dir.join("config.json");
    h.update(&std::fs::read(&config).map_err(|e| ExportError::io(&config, e))?);
    for file in ferrotune_model::weights::weight_files(dir)? {
        let mut f = std::fs::File::open(&file).map_err(|e| ExportError::io(&file, e))?;
        let size = f.metadata().map_err(|e| ExportError::io(&file, e))?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|e| ExportError::io(&file, e))?;
        let len = u64::from_le_bytes(n).min(size);
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header)
            .map_err(|e| ExportError::io(&file, e))?;
        h.update(&size.to_le_bytes());
        h.update(&header);
    }
    Ok(h.finalize().to_hex().to_string())
}
