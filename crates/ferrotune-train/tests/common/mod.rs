//! Shared setup of the trainer tests: the `hub_mha` fixture model and the reference run's data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device};
use ferrotune_data::TrainingSequence;
use ferrotune_model::loaded::load_model;
use ferrotune_model::{peft, LoraConfig, Phi3};
use ferrotune_train::{RunData, RunOptions, TrainConfig};
use serde_yaml_ng::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn reference_dir() -> PathBuf {
    repo().join("fixtures/train/hub_mha_trainer")
}

pub fn model_dir() -> PathBuf {
    repo().join("fixtures/models/hub_mha")
}

/// The reference run's 36 examples as training sequences.
pub fn reference_data() -> RunData {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference_dir().join("data.json")).unwrap())
            .unwrap();
    let train = v["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let ids: Vec<u32> = e["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let trainable = e["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap() != -100)
                .collect();
            TrainingSequence {
                doc_lengths: vec![ids.len()],
                ids,
                trainable,
            }
        })
        .collect();
    RunData {
        train,
        validation: None,
        pad_id: v["pad_token_id"].as_u64().unwrap() as u32,
        cache_key: "hub_mha_trainer/data.json".into(),
    }
}

/// The reference run's arguments as a ferrotune config writing to `out`, plus `sets`.
pub fn reference_config(out: &Path, sets: &[&str]) -> TrainConfig {
    let yaml = format!(
        "model: {model}\ntrain_file_path: unused\nper_device_train_batch_size: 2\n\
         gradient_accumulation_steps: 2\nmax_steps: 10\nlearning_rate: 2.0e-3\n\
         lr_scheduler_type: cosine\nwarmup_steps: 2\nweight_decay: 0.01\nmax_grad_norm: 3.0\n\
         shuffle: false\nseed: 0\nlogging_steps: 1\nsave_steps: 1000\nprecision: fp32\n\
         lora_r: 4\nlora_alpha: 8\noutput_dir: {out}\n",
        model = model_dir().display(),
        out = out.display()
    );
    let Value::Mapping(m) = serde_yaml_ng::from_str::<Value>(&yaml).unwrap() else {
        panic!("mapping")
    };
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::from_value(m, &sets, "test").unwrap()
}

/// The fixture model in `dtype` with the reference's initial adapter.
pub fn model_with_adapter(dtype: DType) -> (Phi3, LoraConfig) {
    model_with_adapter_on(dtype, &Device::Cpu)
}

/// [`model_with_adapter`] on `device`.
pub fn model_with_adapter_on(dtype: DType, device: &Device) -> (Phi3, LoraConfig) {
    let mut model = load_model(model_dir().to_str().unwrap(), dtype, device)
        .unwrap()
        .model;
    let lora = peft::load_adapter(&mut model, &model_dir().join("adapter")).unwrap();
    (model, lora)
}

pub fn options(resume: Option<PathBuf>) -> RunOptions {
    RunOptions {
        stop: Arc::new(AtomicBool::new(false)),
        resume_from: resume,
        base_model: "hub_mha".into(),
        initial_loss_scale: 65536.0,
    }
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
