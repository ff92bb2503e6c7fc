//! `ferrotune export --verify DIR`: re-open an export as a user would, check that it is complete
//! (MLmodel flavors, every tensor present with the shape config.json implies and the dtype MLmodel
//! names, the tokenizer component), and that greedy answers equal the checkpoint's.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ferrotune_model::loaded::{load_model, parse_dtype};
use ferrotune_model::peft;
use ferrotune_model::weights::{SafetensorsWeights, MLFLOW_TOKENIZER_DIR, MLFLOW_WEIGHTS_DIR};
use serde::Serialize;
use serde_json::Value;

use crate::chat::greedy_chat;
use crate::error::{ExportError, Result};
use crate::lineage::Lineage;
use crate::mlmodel::{self, read_mlmodel};
use crate::model_card::LINEAGE_FILE;
use crate::source::Source;

/// Questions both models answer.
pub const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
];
/// New tokens per answer.
pub const NEW_TOKENS: usize = 16;

#[derive(Debug, Clone, Serialize)]
pub struct AnswerCheck {
    pub prompt: String,
    pub checkpoint: Vec<u32>,
    pub export: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub dir: PathBuf,
    /// `mlflow` (merged) or `adapter`.
    pub kind: String,
    pub tensors: usize,
    pub dtype: String,
    /// The checkpoint the answers were compared with.
    pub checkpoint: PathBuf,
    pub answers: Vec<AnswerCheck>,
}

/// Verify `dir` against `checkpoint` (default: the checkpoint its lineage names).
pub fn verify(
    dir: &Path,
    checkpoint: Option<&Path>,
    base_model: Option<&str>,
) -> Result<VerifyReport> {
    let (kind, lineage) = if dir.join(mlmodel::MLMODEL).is_file() {
        let m = read_mlmodel(dir)?;
        ("mlflow", lineage_in(&m))
    } else if dir.join(peft::CONFIG_FILE).is_file() {
        let path = dir.join(LINEAGE_FILE);
        let lineage = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Lineage>(&t).ok());
        ("adapter", lineage)
    } else {
        return Err(ExportError::Usage(format!(
            "--verify {}: neither an MLflow model folder (MLmodel) nor a PEFT adapter (adapter_config.json)",
            dir.display()
        )));
    };
    let checkpoint = match checkpoint {
        Some(c) => c.to_path_buf(),
        None => {
            let named = lineage
                .as_ref()
                .and_then(|l| l.checkpoint.clone())
                .ok_or_else(|| {
                    ExportError::Usage(format!(
                        "{} does not name the checkpoint it came from; pass --checkpoint DIR",
                        dir.display()
                    ))
                })?;
            let p = PathBuf::from(named);
            if !p.exists() {
                return Err(ExportError::Usage(format!(
                    "{} was exported from {}, which no longer exists; pass --checkpoint DIR",
                    dir.display(),
                    p.display()
                )));
            }
            p
        }
    };
    let source = Source::open(&checkpoint, base_model)?;
    let (tensors, dtype) = match kind {
        "mlflow" => check_mlflow_folder(dir)?,
        _ => check_adapter_folder(dir)?,
    };

    // The checkpoint's answers, from the weights the export should hold: base + adapter merged
    // in f32 and rounded once to the export's dtype (merged folders), or the adapter rounded to
    // it (adapter folders); the model code builds them, not the export writer. For f32 exports
    // that is the checkpoint as trained; in bf16 a random model's near-tied logits would
    // otherwise flip on rounding alone. Both sides then run in the same dtype on the CPU.
    let base = source.base_dir.to_string_lossy().into_owned();
    let stored = parse_dtype(&dtype).expect("checked dtype");
    // Compute in the export's dtype (half the memory of f32) when the base is stored in it, so
    // loading rounds nothing the export did not round; else in f32.
    let base_weights = SafetensorsWeights::open(&source.base_dir, DType::F32, &Device::Cpu)?;
    let compute = if kind == "mlflow"
        && base_weights
            .entries()
            .iter()
            .all(|(_, d, _)| !d.is_float() || *d == stored)
    {
        stored
    } else {
        DType::F32
    };
    drop(base_weights);
    let mut reference = load_model(&base, compute, &Device::Cpu)?;
    peft::load_adapter(&mut reference.model, &source.adapter_dir)?;
    if kind == "mlflow" {
        reference.model.merge_lora()?;
        if compute != stored {
            reference.model.round_frozen_weights(stored)?;
        }
    } else if stored != DType::F32 {
        for (_, pair) in reference.model.lora_pairs() {
            for v in [&pair.a, &pair.b] {
                let rounded = v
                    .as_tensor()
                    .detach()
                    .to_dtype(stored)?
                    .to_dtype(DType::F32)?;
                v.set(&rounded)?;
            }
        }
    }
    let expected = greedy_chat(
        &reference.model,
        &source.tokenizer_dir,
        &reference.stop_ids,
        &PROMPTS,
        NEW_TOKENS,
    )?;
    drop(reference);
    // Answers of the export, loaded as a user would load it.
    let got = if kind == "mlflow" {
        let exported = load_model(&dir.to_string_lossy(), compute, &Device::Cpu)?;
        greedy_chat(
            &exported.model,
            &exported.tokenizer_dir,
            &exported.stop_ids,
            &PROMPTS,
            NEW_TOKENS,
        )?
    } else {
        let mut with_adapter = load_model(&base, DType::F32, &Device::Cpu)?;
        peft::load_adapter(&mut with_adapter.model, dir)?;
        greedy_chat(
            &with_adapter.model,
            &source.tokenizer_dir,
            &with_adapter.stop_ids,
            &PROMPTS,
            NEW_TOKENS,
        )?
    };
    let answers: Vec<AnswerCheck> = PROMPTS
        .iter()
        .zip(expected.into_iter().zip(got))
        .map(|(p, (c, e))| AnswerCheck {
            prompt: p.to_string(),
            checkpoint: c,
            export: e,
        })
        .collect();
    if let Some(bad) = answers.iter().find(|a| a.checkpoint != a.export) {
        let at = bad
            .checkpoint
            .iter()
            .zip(&bad.export)
            .position(|(a, b)| a != b)
            .unwrap_or(bad.checkpoint.len().min(bad.export.len()));
        return Err(ExportError::Mismatch(format!(
            "greedy answer to {:?} differs from the checkpoint's at new token {at}: checkpoint {:?}, export {:?}",
            bad.prompt, bad.checkpoint, bad.export
        )));
    }
    Ok(VerifyReport {
        dir: dir.to_path_buf(),
        kind: kind.to_string(),
        tensors,
        dtype,
        checkpoint,
        answers,
    })
}

/// The checkpoint an export names in its lineage, if it is an export at all.
pub fn exported_from(dir: &Path) -> Option<PathBuf> {
    let m = read_mlmodel(dir).ok()?;
    lineage_in(&m)?.checkpoint.map(PathBuf::from)
}

fn lineage_in(mlmodel: &Value) -> Option<Lineage> {
    let v = mlmodel.get("metadata")?.get("ferrotune")?;
    serde_json::from_value(v.clone()).ok()
}

/// MLmodel's flavors, the weights (every tensor in the index is in its file, with the dtype
/// MLmodel names; the model builds from them) and the tokenizer component.
fn check_mlflow_folder(dir: &Path) -> Result<(usize, String)> {
    let path = dir.join(mlmodel::MLMODEL);
    let m = read_mlmodel(dir)?;
    let field = |keys: &[&str]| -> Option<String> {
        let mut v = &m;
        for k in keys {
            v = v.get(k)?;
        }
        v.as_str().map(str::to_owned)
    };
    let need = |keys: &[&str], expected: &str| -> Result<()> {
        match field(keys) {
            Some(v) if v == expected => Ok(()),
            other => Err(ExportError::invalid(
                &path,
                format!("{} is {other:?}, expected {expected:?}", keys.join(".")),
            )),
        }
    };
    need(
        &["flavors", "python_function", "loader_module"],
        "mlflow.transformers",
    )?;
    need(
        &["flavors", "transformers", "model_binary"],
        MLFLOW_WEIGHTS_DIR,
    )?;
    need(&["flavors", "transformers", "task"], "text-generation")?;
    need(
        &["flavors", "transformers", "pipeline_model_type"],
        "Phi3ForCausalLM",
    )?;
    let torch_dtype = field(&["flavors", "transformers", "torch_dtype"]).ok_or_else(|| {
        ExportError::invalid(&path, "flavors.transformers.torch_dtype is missing")
    })?;
    let dtype = [DType::BF16, DType::F16, DType::F32]
        .into_iter()
        .find(|d| mlmodel::torch_dtype(*d) == torch_dtype)
        .ok_or_else(|| {
            ExportError::invalid(
                &path,
                format!("torch_dtype {torch_dtype} is not bf16, f16 or f32"),
            )
        })?;

    let weights_dir = dir.join(MLFLOW_WEIGHTS_DIR);
    let weights = SafetensorsWeights::open(&weights_dir, dtype, &Device::Cpu)?;
    let entries = weights.entries();
    if let Some((name, stored, _)) = entries.iter().find(|(_, d, _)| d.is_float() && *d != dtype) {
        return Err(ExportError::invalid(
            &weights_dir,
            format!("tensor `{name}` is {stored:?}; MLmodel says {torch_dtype}"),
        ));
    }
    let index = weights_dir.join(crate::shards::INDEX_FILE);
    if index.is_file() {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(&index).map_err(|e| ExportError::io(&index, e))?,
        )
        .map_err(|e| ExportError::invalid(&index, format!("invalid JSON: {e}")))?;
        let listed = v["weight_map"].as_object().map_or(0, |m| m.len());
        for name in v["weight_map"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
        {
            if !entries.iter().any(|(n, _, _)| n == name) {
                return Err(ExportError::invalid(
                    &index,
                    format!("lists `{name}`, which is in no shard"),
                ));
            }
        }
        if listed != entries.len() {
            return Err(ExportError::invalid(
                &index,
                format!("lists {listed} tensors; the shards hold {}", entries.len()),
            ));
        }
    }
    // Builds the model: every tensor it needs present with the shape config.json implies.
    let cfg = ferrotune_model::Phi3Config::from_dir(&weights_dir)?;
    ferrotune_model::Phi3::load(&cfg, &weights, dtype, &Device::Cpu)?;
    let tokenizer = dir.join(MLFLOW_TOKENIZER_DIR);
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        if !tokenizer.join(name).is_file() {
            return Err(ExportError::invalid(
                &tokenizer,
                format!("{name} is missing"),
            ));
        }
    }
    Ok((entries.len(), format!("{dtype:?}").to_lowercase()))
}

fn check_adapter_folder(dir: &Path) -> Result<(usize, String)> {
    let (_, pairs) = peft::read_adapter(dir)?;
    let first = pairs
        .first()
        .ok_or_else(|| ExportError::invalid(dir, "the adapter holds no LoRA weights"))?;
    if let Some(p) = pairs
        .iter()
        .find(|p| p.a.dtype() != first.a.dtype() || p.b.dtype() != first.a.dtype())
    {
        return Err(ExportError::invalid(
            dir,
            format!("{} is stored in another dtype than the rest", p.module),
        ));
    }
    Ok((
        2 * pairs.len(),
        format!("{:?}", first.a.dtype()).to_lowercase(),
    ))
}
