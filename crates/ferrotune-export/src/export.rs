//! `ferrotune export`: a checkpoint becomes an MLflow model folder with the adapter merged into
//! the base weights (streamed tensor by tensor), or a PEFT adapter folder with a model card.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ferrotune_model::peft;
use ferrotune_model::weights::{SafetensorsWeights, MLFLOW_TOKENIZER_DIR, MLFLOW_WEIGHTS_DIR};
use serde::Serialize;

use crate::components;
use crate::error::{ExportError, Result};
use crate::lineage::Lineage;
use crate::mlmodel::{self, MlmodelFields};
use crate::model_card;
use crate::output::{folder_size, Staging};
use crate::shards::{write_shards, TensorSpec};
use crate::source::Source;

/// MLflow's default shard size for transformers weights (`MLFLOW_HUGGINGFACE_MODEL_MAX_SHARD_SIZE`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 500_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// An MLflow model folder with the adapter folded into the base weights.
    Merged,
    /// The PEFT adapter and a model card.
    AdapterOnly,
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub checkpoint: PathBuf,
    pub out: PathBuf,
    pub mode: Mode,
    /// Weights dtype; merged exports default to bf16, adapters keep f32.
    pub dtype: Option<DType>,
    pub task: String,
    pub force: bool,
    pub max_shard_bytes: u64,
    /// Use this base model instead of the one the checkpoint names.
    pub base_model: Option<String>,
    pub git_commit: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    pub mode: Mode,
    pub dtype: String,
    pub tensors: usize,
    pub weight_files: Vec<String>,
    pub weight_bytes: u64,
    pub folder_bytes: u64,
    pub seconds: f64,
    pub lineage: Lineage,
}

/// Run an export; `progress(done, total)` is told after each tensor.
pub fn export(
    opts: &ExportOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportReport> {
    if !mlmodel::TASKS.contains(&opts.task.as_str()) {
        return Err(ExportError::Usage(format!(
            "--task {}: expected one of {}",
            opts.task,
            mlmodel::TASKS.join(", ")
        )));
    }
    let started = Instant::now();
    let source = Source::open(&opts.checkpoint, opts.base_model.as_deref())?;
    let staging = Staging::begin(&opts.out, opts.force)?;
    let (kind, dtype) = match opts.mode {
        Mode::Merged => ("merged", opts.dtype.unwrap_or(DType::BF16)),
        Mode::AdapterOnly => ("adapter", opts.dtype.unwrap_or(DType::F32)),
    };
    let lineage = Lineage::of(&source, kind, opts.git_commit.as_deref())?;
    let (tensors, weight_files, weight_bytes) = match opts.mode {
        Mode::Merged => write_merged(&source, &staging.dir, dtype, opts, &lineage, progress)?,
        Mode::AdapterOnly => write_adapter(&source, &staging.dir, dtype, &lineage)?,
    };
    let folder_bytes = folder_size(&staging.dir, &[])?;
    let out = staging.commit()?;
    Ok(ExportReport {
        out,
        mode: opts.mode,
        dtype: format!("{dtype:?}").to_lowercase(),
        tensors,
        weight_files,
        weight_bytes,
        folder_bytes,
        seconds: started.elapsed().as_secs_f64(),
        lineage,
    })
}

type Written = (usize, Vec<String>, u64);

fn write_merged(
    source: &Source,
    dir: &Path,
    dtype: DType,
    opts: &ExportOptions,
    lineage: &Lineage,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Written> {
    let model_dir = dir.join(MLFLOW_WEIGHTS_DIR);
    std::fs::create_dir_all(&model_dir).map_err(|e| ExportError::io(&model_dir, e))?;
    let config = components::write_config(&source.base_dir, &model_dir, dtype)?;
    components::write_generation_config(&source.base_dir, &model_dir, &config)?;

    let base = SafetensorsWeights::open(&source.base_dir, DType::F32, &Device::Cpu)?;
    let mut specs: Vec<TensorSpec> = base
        .entries()
        .into_iter()
        .map(|(name, stored, shape)| TensorSpec {
            name,
            dtype: if stored.is_float() { dtype } else { stored },
            shape,
        })
        .collect();
    specs.sort_by_key(|s| model_order(&s.name));
    let (lora, pairs) = peft::read_adapter(&source.adapter_dir)?;
    let scale = lora.scale();
    let mut deltas: HashMap<String, (Tensor, Tensor)> = HashMap::new();
    for p in pairs {
        let weight = format!("{}.weight", p.module);
        let Some(spec) = specs.iter().find(|s| s.name == weight) else {
            return Err(ExportError::Usage(format!(
                "adapter {}: module {} has no weight `{weight}` in the base model {}; was it trained on another model?",
                source.adapter_dir.display(),
                p.module,
                source.base_dir.display()
            )));
        };
        let (out, inp) = (spec.shape[0], spec.shape.get(1).copied().unwrap_or(0));
        if p.b.dims() != [out, lora.r] || p.a.dims() != [lora.r, inp] {
            return Err(ExportError::Usage(format!(
                "adapter {}: {} has lora_A {:?} and lora_B {:?}, which do not fit the base weight {:?}",
                source.adapter_dir.display(),
                p.module,
                p.a.dims(),
                p.b.dims(),
                spec.shape
            )));
        }
        deltas.insert(
            weight,
            (p.a.to_dtype(DType::F32)?, p.b.to_dtype(DType::F32)?),
        );
    }
    let mut produce = |spec: &TensorSpec| -> Result<Vec<u8>> {
        let mut w = base.tensor_any_shape(&spec.name)?;
        if let Some((a, b)) = deltas.get(&spec.name) {
            w = (w + b.matmul(a)?.affine(scale, 0.0)?)?;
        }
        le_bytes(&w.to_dtype(spec.dtype)?)
    };
    let written = write_shards(
        &model_dir,
        &specs,
        opts.max_shard_bytes,
        &mut produce,
        progress,
    )?;
    components::write_tokenizer(&source.tokenizer_dir, &dir.join(MLFLOW_TOKENIZER_DIR))?;
    mlmodel::write_license(dir, &source.base_dir, &source.base_model)?;
    let size = folder_size(dir, &[])?;
    let uuid = mlmodel::new_uuid();
    let created = mlmodel::utc_now();
    mlmodel::write_mlflow_files(
        dir,
        &MlmodelFields {
            source_model_name: &source.base_model,
            dtype,
            model_size_bytes: size,
            model_uuid: &uuid,
            utc_time_created: &created,
            task: &opts.task,
            lineage,
        },
    )?;
    Ok((specs.len(), written.files, written.total_bytes))
}

fn write_adapter(source: &Source, dir: &Path, dtype: DType, lineage: &Lineage) -> Result<Written> {
    let (_, pairs) = peft::read_adapter(&source.adapter_dir)?;
    let mut tensors = HashMap::new();
    for p in &pairs {
        let key = |which: &str| format!("base_model.model.{}.lora_{which}.weight", p.module);
        tensors.insert(key("A"), p.a.to_dtype(dtype)?);
        tensors.insert(key("B"), p.b.to_dtype(dtype)?);
    }
    let weights = dir.join(peft::WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights)?;
    let config_src = source.adapter_dir.join(peft::CONFIG_FILE);
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_src).map_err(|e| ExportError::io(&config_src, e))?,
    )
    .map_err(|e| ExportError::invalid(&config_src, format!("invalid JSON: {e}")))?;
    config["base_model_name_or_path"] = serde_json::json!(source.base_model);
    let config_dst = dir.join(peft::CONFIG_FILE);
    std::fs::write(
        &config_dst,
        serde_json::to_string_pretty(&config).expect("JSON serialises") + "\n",
    )
    .map_err(|e| ExportError::io(&config_dst, e))?;
    let card = model_card::render(source, lineage, dtype);
    let card_path = dir.join("README.md");
    std::fs::write(&card_path, card).map_err(|e| ExportError::io(&card_path, e))?;
    let lineage_path = dir.join(model_card::LINEAGE_FILE);
    std::fs::write(
        &lineage_path,
        serde_json::to_string_pretty(lineage).expect("JSON serialises") + "\n",
    )
    .map_err(|e| ExportError::io(&lineage_path, e))?;
    let bytes = std::fs::metadata(&weights)
        .map_err(|e| ExportError::io(&weights, e))?
        .len();
    Ok((tensors.len(), vec![peft::WEIGHTS_FILE.to_string()], bytes))
}

/// Embeddings, then layers in numeric order, then the final norm and the head: the order of
/// the model's state dict, which is how transformers fills its shards.
fn model_order(name: &str) -> (u8, usize, String) {
    if let Some(rest) = name.strip_prefix("model.layers.") {
        let (n, tail) = rest.split_once('.').unwrap_or((rest, ""));
        return (1, n.parse().unwrap_or(usize::MAX), tail.to_string());
    }
    let group = match name {
        n if n.starts_with("model.embed_tokens") => 0,
        n if n.starts_with("model.norm") => 2,
        _ => 3,
    };
    (group, 0, name.to_string())
}

/// A tensor's values as little-endian bytes in its own dtype.
pub fn le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        other => {
            return Err(ExportError::Usage(format!(
                "tensors of dtype {other:?} cannot be exported"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_ordered_as_the_state_dict() {
        let mut names = vec![
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.10.mlp.down_proj.weight",
            "model.layers.2.input_layernorm.weight",
            "model.embed_tokens.weight",
        ];
        names.sort_by_key(|n| model_order(n));
        assert_eq!(
            names,
            [
                "model.embed_tokens.weight",
                "model.layers.2.input_layernorm.weight",
                "model.layers.10.mlp.down_proj.weight",
                "model.norm.weight",
                "lm_head.weight"
            ]
        );
    }
}
