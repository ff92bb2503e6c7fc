//! The files that make a folder an MLflow model: `MLmodel` as `mlflow.transformers.save_model`
//! writes it for a Phi-3 chat pipeline with `task="llm/v1/chat"` (the committed reference in
//! `fixtures/export/mlflow_transformers_reference/` is kept structurally identical by a test),
//! the environment files, and the licence note.

use std::path::Path;

use candle_core::DType;
use serde_json::{json, Value};

use crate::error::{ExportError, Result};
use crate::lineage::Lineage;

pub const MLMODEL: &str = "MLmodel";
pub const CONDA_FILE: &str = "conda.yaml";
pub const PYTHON_ENV_FILE: &str = "python_env.yaml";
pub const REQUIREMENTS_FILE: &str = "requirements.txt";
pub const LICENSE_FILE: &str = "LICENSE.txt";
/// Files MLflow writes after measuring `model_size_bytes` (so they are not counted in it).
pub const UNCOUNTED: [&str; 4] = [MLMODEL, CONDA_FILE, PYTHON_ENV_FILE, REQUIREMENTS_FILE];

/// The versions the exported folder was checked against (`scripts/check_export_interop.py`);
/// the same as the reference folder's, so `mlflow models serve` builds the environment MLflow
/// itself would have written.
pub const MLFLOW_VERSION: &str = "3.17.2";
pub const TRANSFORMERS_VERSION: &str = "5.24.0";
const PYTHON_VERSION: &str = "3.11.7";
const PIP_REQUIREMENTS: [&str; 7] = [
    "mlflow==3.17.2",
    "accelerate==1.15.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "torch==2.15.0",
    "torchvision==0.29.2",
    "transformers==5.24.0",
];

/// MLflow's chat signature for `llm/v1/chat` models (JSON strings as MLflow stores them).
const CHAT_SIGNATURE: &str = include_str!("chat_signature.json");

/// The tasks `--task` accepts: MLflow's chat inference task.
pub const TASKS: [&str; 1] = ["llm/v1/chat"];

/// `torch.bfloat16`, ...
pub fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "torch.bfloat16",
        DType::F16 => "torch.float16",
        _ => "torch.float32",
    }
}

/// Everything `MLmodel` says that is not fixed.
pub struct MlmodelFields<'a> {
    pub source_model_name: &'a str,
    pub dtype: DType,
    pub model_size_bytes: u64,
    pub model_uuid: &'a str,
    /// `YYYY-MM-DD HH:MM:SS.ffffff`, UTC, as Python prints a datetime.
    pub utc_time_created: &'a str,
    pub task: &'a str,
    pub lineage: &'a Lineage,
}

/// `MLmodel` as a value (keys sorted, as MLflow's YAML dump sorts them).
pub fn mlmodel(f: &MlmodelFields) -> Value {
    let sig: Value = serde_json::from_str(CHAT_SIGNATURE).expect("the chat signature is JSON");
    let lineage = serde_json::to_value(f.lineage).expect("lineage serialises");
    json!({
        "flavors": {
            "python_function": {
                "env": {"conda": CONDA_FILE, "virtualenv": PYTHON_ENV_FILE},
                "loader_module": "mlflow.transformers",
                "python_version": PYTHON_VERSION,
            },
            "transformers": {
                "code": null,
                "components": ["tokenizer"],
                "inference_task": f.task,
                "instance_type": "TextGenerationPipeline",
                "model_binary": "model",
                "pipeline_model_type": "Phi3ForCausalLM",
                "source_model_name": f.source_model_name,
                "task": "text-generation",
                "tokenizer_type": "TokenizersBackend",
                "torch_dtype": torch_dtype(f.dtype),
                "transformers_version": TRANSFORMERS_VERSION,
            },
        },
        "is_signature_from_type_hint": false,
        "metadata": {"ferrotune": lineage, "task": f.task},
        "mlflow_version": MLFLOW_VERSION,
        "model_id": null,
        "model_size_bytes": f.model_size_bytes,
        "model_uuid": f.model_uuid,
        "prompts": null,
        "signature": {"inputs": sig["inputs"], "outputs": sig["outputs"], "params": null},
        "type_hint_from_example": false,
        "utc_time_created": f.utc_time_created,
    })
}

/// Write `MLmodel` and the environment files into `dir`.
pub fn write_mlflow_files(dir: &Path, f: &MlmodelFields) -> Result<()> {
    let yaml = serde_yaml_ng::to_string(&mlmodel(f)).expect("MLmodel serialises");
    write(&dir.join(MLMODEL), &yaml)?;
    write_environment(dir)
}

/// `conda.yaml`, `python_env.yaml`, `requirements.txt` as MLflow writes them.
pub fn write_environment(dir: &Path) -> Result<()> {
    let pip: String = PIP_REQUIREMENTS
        .iter()
        .map(|r| format!("  - {r}\n"))
        .collect();
    let conda = format!(
        "channels:\n- conda-forge\ndependencies:\n- python={PYTHON_VERSION}\n- pip<=23.2.1\n- pip:\n{pip}name: mlflow-env\n"
    );
    write(&dir.join(CONDA_FILE), &conda)?;
    write(
        &dir.join(PYTHON_ENV_FILE),
        &format!(
            "python: {PYTHON_VERSION}\nbuild_dependencies:\n- pip==23.2.1\n- setuptools==84.2.1\n- wheel\ndependencies:\n- -r requirements.txt\n"
        ),
    )?;
    write(&dir.join(REQUIREMENTS_FILE), &PIP_REQUIREMENTS.join("\n"))
}

/// The base model's licence file, or MLflow's note when it has none.
pub fn write_license(dir: &Path, base_dir: &Path, base_model: &str) -> Result<()> {
    for name in ["LICENSE", "LICENSE.txt", "LICENSE.md"] {
        let src = base_dir.join(name);
        if src.is_file() {
            let dst = dir.join(LICENSE_FILE);
            std::fs::copy(&src, &dst).map_err(|e| ExportError::io(&dst, e))?;
            return Ok(());
        }
    }
    write(
        &dir.join(LICENSE_FILE),
        &format!(
            "A license file could not be found for the '{base_model}' repository. \n\
             To ensure that you are in compliance with the license requirements for this model, \
             please visit the model repository here: https://huggingface.co/{base_model}"
        ),
    )
}

/// A random version-4 UUID as 32 hex digits (MLflow's `uuid4().hex`).
pub fn new_uuid() -> String {
    let mut h = blake3::Hasher::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    h.update(
        &CALLS
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    let stack = 0u8;
    h.update(&(std::ptr::addr_of!(stack) as usize).to_le_bytes());
    let mut b: [u8; 16] = h.finalize().as_bytes()[..16].try_into().expect("16 bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Now, as MLflow writes `utc_time_created`.
pub fn utc_now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%d %H:%M:%S%.6f")
        .to_string()
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| ExportError::io(path, e))
}

/// `MLmodel` of an exported folder, read back.
pub fn read_mlmodel(dir: &Path) -> Result<Value> {
    let path = dir.join(MLMODEL);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ExportError::Usage(format!(
            "{}: cannot read ({e}); is {} an MLflow model folder?",
            path.display(),
            dir.display()
        ))
    })?;
    serde_yaml_ng::from_str(&text)
        .map_err(|e| ExportError::invalid(&path, format!("not valid YAML: {e}")))
}
