//! The training config: YAML with the source document's parameter names (so a user's Azure ML
//! `finetune_parameters` carry over unchanged), `--set key=value` overrides, and the checks
//! that reject unknown keys, wrong types and impossible combinations before any work.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};

use crate::error::{Result, TrainError};
use crate::flex;

/// Learning-rate schedules, as transformers' `get_scheduler` names and defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Linear,
    Cosine,
    CosineWithRestarts,
    Constant,
    ConstantWithWarmup,
}

impl SchedulerKind {
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Linear => "linear",
            SchedulerKind::Cosine => "cosine",
            SchedulerKind::CosineWithRestarts => "cosine_with_restarts",
            SchedulerKind::Constant => "constant",
            SchedulerKind::ConstantWithWarmup => "constant_with_warmup",
        }
    }
}

/// Numeric precision of the frozen weights and activations (LoRA master weights and AdamW
/// moments are always fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 on a CUDA device, fp32 on the CPU.
    Auto,
    #[serde(alias = "float32", alias = "f32")]
    Fp32,
    #[serde(alias = "bfloat16")]
    Bf16,
    /// fp16 with dynamic loss scaling (GPUs without bf16, such as the V100).
    #[serde(alias = "float16", alias = "f16")]
    Fp16,
}

fn d_split_train() -> String {
    "train_sft".into()
}
fn d_split_validation() -> String {
    "test_sft".into()
}
fn d_epochs() -> f64 {
    1.0
}
fn d_minus_one() -> i64 {
    -1
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    5e-5
}
fn d_scheduler() -> SchedulerKind {
    SchedulerKind::Linear
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_true() -> bool {
    true
}
fn d_lora_r() -> usize {
    8
}
fn d_lora_alpha() -> f64 {
    16.0
}
fn d_targets() -> Vec<String> {
    ferrotune_model::lora::ALL_TARGETS
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn d_seed() -> u64 {
    42
}
fn d_precision() -> Precision {
    Precision::Auto
}
fn d_logging() -> u64 {
    10
}
fn d_save() -> u64 {
    500
}
fn d_output() -> PathBuf {
    PathBuf::from("ferrotune-output")
}
fn d_stage() -> u8 {
    2
}
fn d_device() -> String {
    "auto".into()
}

/// Every key a training config may hold. Names are the source document's (and transformers'
/// `TrainingArguments`'); defaults are transformers' unless the source sets its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model folder (HF layout) or hub id in the local cache.
    pub model: String,
    /// Tokenizer folder; default: the model's.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Raw ultrachat data (parquet/jsonl file or folder), or a folder from `data prepare`.
    pub train_file_path: PathBuf,
    #[serde(default)]
    pub validation_file_path: Option<PathBuf>,
    /// Split read from a Hugging Face layout folder.
    #[serde(default = "d_split_train")]
    pub train_split: String,
    #[serde(default = "d_split_validation")]
    pub validation_split: String,
    #[serde(default = "d_epochs", deserialize_with = "flex::num")]
    pub num_train_epochs: f64,
    /// Optimizer steps; > 0 overrides `num_train_epochs`.
    #[serde(default = "d_minus_one", deserialize_with = "flex::num")]
    pub max_steps: i64,
    #[serde(default = "d_one", deserialize_with = "flex::num")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "d_one", deserialize_with = "flex::num")]
    pub per_device_eval_batch_size: usize,
    #[serde(default = "d_one", deserialize_with = "flex::num")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "d_lr", deserialize_with = "flex::num")]
    pub learning_rate: f64,
    #[serde(default = "d_scheduler")]
    pub lr_scheduler_type: SchedulerKind,
    #[serde(default, deserialize_with = "flex::num")]
    pub warmup_ratio: f64,
    /// Overrides `warmup_ratio` when > 0.
    #[serde(default, deserialize_with = "flex::num")]
    pub warmup_steps: u64,
    #[serde(default, deserialize_with = "flex::num")]
    pub weight_decay: f64,
    #[serde(default = "d_beta1", deserialize_with = "flex::num")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2", deserialize_with = "flex::num")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps", deserialize_with = "flex::num")]
    pub adam_epsilon: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    #[serde(default = "d_one_f", deserialize_with = "flex::num")]
    pub max_grad_norm: f64,
    #[serde(default = "d_true", deserialize_with = "flex::bool")]
    pub apply_lora: bool,
    #[serde(default = "d_lora_r", deserialize_with = "flex::num")]
    pub lora_r: usize,
    #[serde(default = "d_lora_alpha", deserialize_with = "flex::num")]
    pub lora_alpha: f64,
    #[serde(default, deserialize_with = "flex::num")]
    pub lora_dropout: f64,
    #[serde(default = "d_targets", deserialize_with = "flex::list")]
    pub lora_target_modules: Vec<String>,
    #[serde(default, deserialize_with = "flex::bool")]
    pub use_rslora: bool,
    /// Start from this PEFT adapter instead of a fresh one.
    #[serde(default)]
    pub init_adapter: Option<PathBuf>,
    /// Tokens per sequence; -1 = the model's `max_position_embeddings` (capped at 4096).
    #[serde(default = "d_minus_one", deserialize_with = "flex::num")]
    pub max_seq_length: i64,
    #[serde(default, deserialize_with = "flex::bool")]
    pub pack: bool,
    #[serde(default = "d_true", deserialize_with = "flex::bool")]
    pub shuffle: bool,
    #[serde(default = "d_seed", deserialize_with = "flex::num")]
    pub seed: u64,
    #[serde(default = "d_precision")]
    pub precision: Precision,
    #[serde(default, deserialize_with = "flex::bool")]
    pub gradient_checkpointing: bool,
    /// Evaluate every N optimizer steps (and always at the end when there is validation data).
    #[serde(default, deserialize_with = "flex::opt_num")]
    pub eval_steps: Option<u64>,
    #[serde(default = "d_logging", deserialize_with = "flex::num")]
    pub logging_steps: u64,
    #[serde(default = "d_save", deserialize_with = "flex::num")]
    pub save_steps: u64,
    /// Checkpoints kept; -1 = all. The best and the last are never deleted.
    #[serde(default = "d_minus_one", deserialize_with = "flex::num")]
    pub save_total_limit: i64,
    #[serde(default = "d_output")]
    pub output_dir: PathBuf,
    /// Stop after this many evaluations without a lower eval loss.
    #[serde(default, deserialize_with = "flex::opt_num")]
    pub early_stopping_patience: Option<u64>,
    /// Accepted for compatibility with the source's parameters; see the `[dist]` work.
    #[serde(default, deserialize_with = "flex::bool")]
    pub apply_deepspeed: bool,
    #[serde(default = "d_stage", deserialize_with = "flex::num")]
    pub deepspeed_stage: u8,
    #[serde(default = "d_one", deserialize_with = "flex::num")]
    pub num_nodes_finetune: usize,
    #[serde(default = "d_one", deserialize_with = "flex::num")]
    pub number_of_gpu_to_use_finetuning: usize,
    /// `auto` (CUDA when built in and present), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "d_device")]
    pub device: String,
    /// MLflow tracking server; default `MLFLOW_TRACKING_URI`.
    #[serde(default)]
    pub tracking_uri: Option<String>,
    #[serde(default)]
    pub experiment_name: Option<String>,
    #[serde(default)]
    pub run_name: Option<String>,
}

fn d_one_f() -> f64 {
    1.0
}

/// Every key [`TrainConfig`] accepts (for error messages and docs).
pub const KEYS: &[&str] = &[
    "model",
    "tokenizer",
    "train_file_path",
    "validation_file_path",
    "train_split",
    "validation_split",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "apply_lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_rslora",
    "init_adapter",
    "max_seq_length",
    "pack",
    "shuffle",
    "seed",
    "precision",
    "gradient_checkpointing",
    "eval_steps",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "output_dir",
    "early_stopping_patience",
    "apply_deepspeed",
    "deepspeed_stage",
    "num_nodes_finetune",
    "number_of_gpu_to_use_finetuning",
    "device",
    "tracking_uri",
    "experiment_name",
    "run_name",
];

impl TrainConfig {
    /// Read `path` (YAML or JSON), apply `key=value` overrides, check everything. Relative
    /// paths in the file are taken relative to the file's folder.
    pub fn load(path: &Path, sets: &[String]) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let name = path.display().to_string();
        let value: Value = serde_yaml_ng::from_str(&text)
            .map_err(|e| TrainError::config(&name, format!("not valid YAML: {e}")))?;
        let mut map = match value {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                return Err(TrainError::config(
                    &name,
                    "expected a mapping of parameter names to values",
                ))
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        apply_sets(&mut map, sets)?;
        let mut cfg = from_mapping(map, &name)?;
        cfg.resolve_paths(base);
        cfg.validate(&name)?;
        Ok(cfg)
    }

    /// Build from a mapping already in memory (the bundled `run` default, tests).
    pub fn from_value(map: Mapping, sets: &[String], source_name: &str) -> Result<TrainConfig> {
        let mut map = map;
        apply_sets(&mut map, sets)?;
        let cfg = from_mapping(map, source_name)?;
        cfg.validate(source_name)?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.train_file_path);
        if let Some(p) = self.validation_file_path.as_mut() {
            fix(p);
        }
        if let Some(p) = self.tokenizer.as_mut() {
            fix(p);
        }
        if let Some(p) = self.init_adapter.as_mut() {
            fix(p);
        }
        fix(&mut self.output_dir);
        let local = base.join(&self.model);
        if Path::new(&self.model).is_relative() && local.exists() {
            self.model = local.display().to_string();
        }
    }

    /// The combinations that cannot work, each reported with its key.
    pub fn validate(&self, source_name: &str) -> Result<()> {
        let bad =
            |key: &str, msg: String| Err(TrainError::config(source_name, format!("{key}: {msg}")));
        if !self.apply_lora {
            return bad(
                "apply_lora",
                "false asks for full fine-tuning, which ferrotune does not do; set apply_lora: true".into(),
            );
        }
        for (key, v) in [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("lora_r", self.lora_r),
            ("num_nodes_finetune", self.num_nodes_finetune),
            (
                "number_of_gpu_to_use_finetuning",
                self.number_of_gpu_to_use_finetuning,
            ),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return bad(
                "num_train_epochs",
                format!(
                    "{} with max_steps {} trains nothing; give num_train_epochs > 0 or max_steps > 0",
                    self.num_train_epochs, self.max_steps
                ),
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(
                "learning_rate",
                format!("{} must be a positive number", self.learning_rate),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("{} must be in [0, 1)", self.warmup_ratio),
            );
        }
        if self.weight_decay < 0.0 {
            return bad(
                "weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            );
        }
        for (key, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, format!("{v} must be in [0, 1)"));
            }
        }
        if self.adam_epsilon <= 0.0 {
            return bad("adam_epsilon", format!("{} must be > 0", self.adam_epsilon));
        }
        if self.max_grad_norm < 0.0 {
            return bad(
                "max_grad_norm",
                format!("{} must be >= 0 (0 = no clipping)", self.max_grad_norm),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("{} must be in [0, 1)", self.lora_dropout),
            );
        }
        if self.lora_alpha <= 0.0 {
            return bad("lora_alpha", format!("{} must be > 0", self.lora_alpha));
        }
        if self.lora_target_modules.is_empty() {
            return bad("lora_target_modules", "names no module".into());
        }
        for m in &self.lora_target_modules {
            if !ferrotune_model::lora::ALL_TARGETS.contains(&m.as_str()) {
                return bad(
                    "lora_target_modules",
                    format!(
                        "\"{m}\" is not a Phi-3 linear; use any of {}",
                        ferrotune_model::lora::ALL_TARGETS.join(", ")
                    ),
                );
            }
        }
        if self.max_seq_length == 0 || self.max_seq_length < -1 {
            return bad(
                "max_seq_length",
                format!("{} must be -1 (the model's) or > 0", self.max_seq_length),
            );
        }
        if self.logging_steps == 0 {
            return bad("logging_steps", "must be at least 1".into());
        }
        if self.save_steps == 0 {
            return bad("save_steps", "must be at least 1".into());
        }
        if self.eval_steps == Some(0) {
            return bad("eval_steps", "must be at least 1".into());
        }
        if self.save_total_limit == 0 || self.save_total_limit < -1 {
            return bad(
                "save_total_limit",
                format!("{} must be -1 (keep all) or >= 1", self.save_total_limit),
            );
        }
        if self.validation_file_path.is_none() {
            if self.eval_steps.is_some() {
                return bad("eval_steps", "needs validation_file_path".into());
            }
            if self.early_stopping_patience.is_some() {
                return bad(
                    "early_stopping_patience",
                    "needs validation_file_path".into(),
                );
            }
        }
        if self.early_stopping_patience.is_some() && self.eval_steps.is_none() {
            return bad(
                "early_stopping_patience",
                "needs eval_steps (how often to evaluate)".into(),
            );
        }
        if self.early_stopping_patience == Some(0) {
            return bad("early_stopping_patience", "must be at least 1".into());
        }
        if self.deepspeed_stage > 3 {
            return bad(
                "deepspeed_stage",
                format!("{} must be 0, 1, 2 or 3", self.deepspeed_stage),
            );
        }
        if self.apply_deepspeed && self.deepspeed_stage == 3 {
            return bad(
                "deepspeed_stage",
                "3 (sharding the frozen base weights) is not supported: every rank holds the whole \
                 frozen model; use 2 (gradients and optimizer state sharded) or 0"
                    .into(),
            );
        }
        if !matches!(self.device.as_str(), "auto" | "cpu" | "cuda")
            && !self.device.starts_with("cuda:")
        {
            return bad(
                "device",
                format!("\"{}\": use auto, cpu, cuda or cuda:N", self.device),
            );
        }
        Ok(())
    }

    /// The training hash a job of `world` ranks shares with a single process of the same global
    /// batch: `gradient_accumulation_steps × world` is what defines the steps.
    pub fn training_hash_for(&self, world: usize) -> String {
        if world <= 1 {
            return self.training_hash();
        }
        let mut single = self.clone();
        single.gradient_accumulation_steps *= world;
        single.number_of_gpu_to_use_finetuning = 1;
        single.num_nodes_finetune = 1;
        single.training_hash()
    }

    /// Global batch in sequences: per device × accumulation × devices (the source's `bs` figure).
    pub fn global_batch(&self) -> usize {
        self.per_device_train_batch_size
            * self.gradient_accumulation_steps
            * self.number_of_gpu_to_use_finetuning
            * self.num_nodes_finetune
    }

    /// The source document's display name: `<model>-ultrachat-bs<N>-<scheduler>-<ds>-lora-
    /// save_limit<N>-seqlen<N>`.
    pub fn display_name(&self) -> String {
        let ds = if self.apply_deepspeed {
            format!("ds{}", self.deepspeed_stage)
        } else {
            "nods".into()
        };
        format!(
            "{}-ultrachat-bs{}-{}-{ds}-lora-save_limit{}-seqlen{}",
            self.model_name(),
            self.global_batch(),
            self.lr_scheduler_type.name(),
            self.save_total_limit,
            self.max_seq_length
        )
    }

    /// The model's last path component (`Phi-3-mini-4k-instruct` for a folder or hub id).
    pub fn model_name(&self) -> String {
        self.model
            .trim_end_matches('/')
            .rsplit(['/', '\\'])
            .next()
            .unwrap_or(&self.model)
            .to_string()
    }

    /// The resolved config as YAML (what `--dry-run` prints and checkpoints store).
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a config always serialises")
    }

    /// Hash of everything that decides the numbers a run produces (not where it logs or how
    /// often it saves): a resumed run must have the same.
    pub fn training_hash(&self) -> String {
        let mut v = serde_json::to_value(self).expect("a config always serialises");
        if let Some(m) = v.as_object_mut() {
            for k in [
                "output_dir",
                "logging_steps",
                "save_steps",
                "save_total_limit",
                "eval_steps",
                "early_stopping_patience",
                "tracking_uri",
                "experiment_name",
                "run_name",
                "num_train_epochs",
                "max_steps",
                "device",
                "per_device_eval_batch_size",
            ] {
                m.remove(k);
            }
        }
        blake3::hash(v.to_string().as_bytes()).to_hex()[..16].to_string()
    }
}

fn from_mapping(map: Mapping, source_name: &str) -> Result<TrainConfig> {
    serde_path_to_error::deserialize(Value::Mapping(map)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let msg = if inner.starts_with("unknown field") {
            let key = inner.split('`').nth(1).unwrap_or("?").to_string();
            match close_key(&key) {
                Some(k) => format!("unknown key \"{key}\" (did you mean \"{k}\"?)"),
                None => format!(
                    "unknown key \"{key}\"; the keys are listed in the README's training section"
                ),
            }
        } else if inner.starts_with("missing field") {
            format!("{} is required", inner.split('`').nth(1).unwrap_or("?"))
        } else if path == "." || path.is_empty() {
            inner
        } else {
            format!("{path}: {inner}")
        };
        TrainError::config(source_name, msg)
    })
}

/// A known key within two edits of `key` (typos such as `learnig_rate`).
fn close_key(key: &str) -> Option<&'static str> {
    KEYS.iter()
        .copied()
        .map(|k| (edit_distance(k, key), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// `key=value` overrides; the value is read as YAML (`3`, `true`, `cosine`, `[a, b]`).
fn apply_sets(map: &mut Mapping, sets: &[String]) -> Result<()> {
    for set in sets {
        let Some((key, value)) = set.split_once('=') else {
            return Err(TrainError::config(
                "--set",
                format!("\"{set}\" is not key=value"),
            ));
        };
        let key = key.trim();
        let value: Value = serde_yaml_ng::from_str(value).map_err(|e| {
            TrainError::config("--set", format!("{key}: cannot read \"{value}\": {e}"))
        })?;
        map.insert(Value::String(key.to_string()), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<TrainConfig> {
        let Value::Mapping(m) = serde_yaml_ng::from_str(yaml).unwrap() else {
            panic!("mapping")
        };
        TrainConfig::from_value(m, &[], "t.yaml")
    }

    const MIN: &str = "model: m\ntrain_file_path: d\n";

    #[test]
    fn azure_style_string_values_are_read() {
        let c = parse(&format!(
            "{MIN}apply_lora: \"true\"\ndeepspeed_stage: \"2\"\nlearning_rate: \"5e-6\"\nlora_target_modules: qkv_proj,o_proj\n"
        ))
        .unwrap();
        assert!(c.apply_lora);
        assert_eq!(c.deepspeed_stage, 2);
        assert_eq!(c.learning_rate, 5e-6);
        assert_eq!(c.lora_target_modules, ["qkv_proj", "o_proj"]);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(&format!("{MIN}learnig_rate: 1e-4\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("learnig_rate") && e.contains("did you mean \"learning_rate\""),
            "{e}"
        );
        let e = parse(&format!("{MIN}learning_rate: fast\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate") && e.contains("\"fast\""), "{e}");
        let e = parse(&format!("{MIN}lr_scheduler_type: cosin\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lr_scheduler_type") && e.contains("cosine"),
            "{e}"
        );
        let e = parse("model: m\n").unwrap_err().to_string();
        assert!(e.contains("train_file_path is required"), "{e}");
        let e = parse(&format!("{MIN}eval_steps: 5\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("eval_steps: needs validation_file_path"), "{e}");
        let e = parse(&format!("{MIN}lora_target_modules: [q_proj]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"q_proj\" is not a Phi-3 linear"), "{e}");
        let e = parse(&format!("{MIN}per_device_train_batch_size: -1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("per_device_train_batch_size"), "{e}");
    }

    #[test]
    fn sets_override_the_file_and_display_name_follows_the_source() {
        let Value::Mapping(m) = serde_yaml_ng::from_str(MIN).unwrap() else {
            panic!()
        };
        let c = TrainConfig::from_value(
            m,
            &[
                "per_device_train_batch_size=2".into(),
                "gradient_accumulation_steps=4".into(),
                "lr_scheduler_type=cosine".into(),
                "max_seq_length=2048".into(),
            ],
            "t",
        )
        .unwrap();
        assert_eq!(
            c.display_name(),
            "m-ultrachat-bs8-cosine-nods-lora-save_limit-1-seqlen2048"
        );
    }
}
