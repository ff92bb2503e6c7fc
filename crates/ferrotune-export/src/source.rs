//! What an export starts from: a ferrotune checkpoint folder, a training `output_dir` (its newest
//! checkpoint), or any PEFT LoRA adapter folder; and the base model and tokenizer it belongs to.

use std::path::{Path, PathBuf};

use ferrotune_model::lora::LoraConfig;
use ferrotune_model::peft;
use ferrotune_model::weights::{resolve_model, tokenizer_dir_for};
use ferrotune_train::checkpoint::{self, TrainerState};
use serde_yaml_ng::Value;

use crate::error::{ExportError, Result};

/// A resolved export source.
#[derive(Debug, Clone)]
pub struct Source {
    /// The folder holding `adapter_config.json` and `adapter_model.safetensors`.
    pub adapter_dir: PathBuf,
    /// The checkpoint folder, when the source is a ferrotune checkpoint.
    pub checkpoint: Option<PathBuf>,
    pub state: Option<TrainerState>,
    /// `train_config.yaml` of the checkpoint, as written.
    pub config_yaml: Option<String>,
    /// The base model as the run named it (folder or hub id).
    pub base_model: String,
    /// Its weights folder.
    pub base_dir: PathBuf,
    pub tokenizer_dir: PathBuf,
    pub lora: LoraConfig,
}

impl Source {
    /// `spec`: checkpoint folder, training output folder or PEFT adapter folder. `base_model`
    /// overrides the base the checkpoint names (a moved or re-downloaded model).
    pub fn open(spec: &Path, base_model: Option<&str>) -> Result<Source> {
        if !spec.exists() {
            return Err(ExportError::Usage(format!(
                "--checkpoint {}: no such folder",
                spec.display()
            )));
        }
        let checkpoint = if spec.join(checkpoint::STATE_FILE).is_file() {
            Some(spec.to_path_buf())
        } else if spec.join(peft::CONFIG_FILE).is_file() {
            None
        } else {
            match checkpoint::list(spec).pop() {
                Some((_, dir)) => Some(dir),
                None => {
                    return Err(ExportError::Usage(format!(
                        "--checkpoint {}: not a checkpoint folder (trainer_state.json), a training \
                         output_dir with checkpoint-N folders, or a PEFT adapter folder \
                         (adapter_config.json)",
                        spec.display()
                    )))
                }
            }
        };
        let adapter_dir = checkpoint.clone().unwrap_or_else(|| spec.to_path_buf());
        let lora = peft::read_config(&adapter_dir)?;
        let (state, config_yaml, named_base, tokenizer) = match &checkpoint {
            Some(dir) => {
                let state = checkpoint::read_state(dir)?;
                let path = dir.join(checkpoint::CONFIG_FILE);
                let yaml = std::fs::read_to_string(&path).map_err(|e| ExportError::io(&path, e))?;
                let config: Value = serde_yaml_ng::from_str(&yaml)
                    .map_err(|e| ExportError::invalid(&path, format!("not a YAML mapping: {e}")))?;
                let text = |key: &str| config.get(key).and_then(Value::as_str).map(str::to_owned);
                let base = text("model").ok_or_else(|| {
                    ExportError::invalid(&path, "has no `model` (the base model of the run)")
                })?;
                (Some(state), Some(yaml), base, text("tokenizer"))
            }
            None => (None, None, adapter_base(&adapter_dir)?, None),
        };
        let base_model = base_model.map_or(named_base, str::to_owned);
        let base_dir = resolve_model(&base_model).map_err(|e| {
            ExportError::Usage(format!(
                "the base model of {} ({e}); pass --base-model DIR if it moved",
                adapter_dir.display()
            ))
        })?;
        let tokenizer_dir = tokenizer.map_or_else(|| tokenizer_dir_for(&base_dir), PathBuf::from);
        if !tokenizer_dir.join("tokenizer.json").is_file() {
            return Err(ExportError::Usage(format!(
                "{}: no tokenizer.json; the export needs the model's tokenizer (set `tokenizer` in the training config)",
                tokenizer_dir.display()
            )));
        }
        Ok(Source {
            adapter_dir,
            checkpoint,
            state,
            config_yaml,
            base_model,
            base_dir,
            tokenizer_dir,
            lora,
        })
    }
}

/// `base_model_name_or_path` of a PEFT adapter.
fn adapter_base(dir: &Path) -> Result<String> {
    let path = dir.join(peft::CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ExportError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ExportError::invalid(&path, format!("invalid JSON: {e}")))?;
    v.get("base_model_name_or_path")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            ExportError::Usage(format!(
                "{}: no base_model_name_or_path; pass --base-model",
                path.display()
            ))
        })
}
