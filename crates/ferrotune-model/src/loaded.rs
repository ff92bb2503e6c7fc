//! Loading a model folder (or hub id) with its tokenizer-side metadata in one call: what the
//! `generate` and `eval` commands, and later the trainer and server, start from.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::config::Phi3Config;
use crate::error::{ModelError, Result};
use crate::phi3::Phi3;
use crate::weights::{resolve_model, tokenizer_dir_for, SafetensorsWeights};

/// A model ready to run, and where it came from.
pub struct LoadedModel {
    /// The weights folder (`model/` of an MLflow folder).
    pub dir: PathBuf,
    /// Where the tokenizer files are (the same folder, or an MLflow folder's tokenizer component).
    pub tokenizer_dir: PathBuf,
    pub model: Phi3,
    /// Ids that end generation: config.json's and generation_config.json's `eos_token_id`.
    pub stop_ids: Vec<u32>,
}

/// Parse a dtype name as transformers spells it (`float32`, `bfloat16`, `float16`) or short.
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name {
        "f32" | "fp32" | "float32" => Some(DType::F32),
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f16" | "fp16" | "float16" => Some(DType::F16),
        _ => None,
    }
}

/// Load `spec` (a folder or a cached hub id) in `dtype` on `device`.
pub fn load_model(spec: &str, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let dir = resolve_model(spec)?;
    let cfg = Phi3Config::from_dir(&dir)?;
    let weights = SafetensorsWeights::open(&dir, dtype, device)?;
    let model = Phi3::load(&cfg, &weights, dtype, device)?;
    let mut stop_ids = cfg.eos_token_ids.clone();
    for id in generation_config_eos(&dir)? {
        if !stop_ids.contains(&id) {
            stop_ids.push(id);
        }
    }
    Ok(LoadedModel {
        tokenizer_dir: tokenizer_dir_for(&dir),
        dir,
        model,
        stop_ids,
    })
}

fn generation_config_eos(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.clone(),
        message: format!("invalid JSON: {e}"),
    })?;
    Ok(match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    })
}
