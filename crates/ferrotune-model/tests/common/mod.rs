//! Shared setup of the model tests: the committed transformers + PEFT fixtures
//! (scripts/make_model_fixtures.py) loaded on any device and dtype, and comparison helpers.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrotune_model::mask::AttentionLayout;
use ferrotune_model::weights::SafetensorsWeights;
use ferrotune_model::{Batch, Phi3, Phi3Config};

pub const CASES: [&str; 7] = [
    "hub_mha",
    "gqa_sharded",
    "longrope",
    "sliding_window",
    "padded",
    "packed",
    "rslora_tied",
];

pub fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models")
        .join(name)
}

pub struct Case {
    pub name: &'static str,
    pub model: Phi3,
    pub expected: HashMap<String, Tensor>,
    pub batch: Batch,
    pub labels: Vec<Vec<i64>>,
    /// [b][t]: 1 where the position is a real token (logits compared there).
    pub real: Vec<Vec<u8>>,
}

pub fn rows_i64(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

pub fn load(name: &'static str) -> Case {
    load_on(name, DType::F32, &Device::Cpu)
}

/// The fixture `name` with its model in `dtype` on `device`; the expected tensors stay on the CPU.
pub fn load_on(name: &'static str, dtype: DType, device: &Device) -> Case {
    let dir = case_dir(name);
    let cfg = Phi3Config::from_dir(&dir).unwrap();
    let weights = SafetensorsWeights::open(&dir, dtype, device).unwrap();
    let model = Phi3::load(&cfg, &weights, dtype, device).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let ids = rows_i64(&expected["input_ids"]);
    let (b, t) = (ids.len(), ids[0].len());
    let positions: Vec<Vec<u32>> = rows_i64(&expected["position_ids"])
        .into_iter()
        .map(|r| r.into_iter().map(|p| p as u32).collect())
        .collect();
    let real: Vec<Vec<u8>> = rows_i64(&expected["attention_mask"])
        .into_iter()
        .map(|r| r.into_iter().map(|m| m as u8).collect())
        .collect();
    let documents: Option<Vec<Vec<u32>>> = case.get("packed").map(|docs| {
        let lens: Vec<usize> = docs
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        vec![ferrotune_model::mask::packed_layout(&lens).0]
    });
    let layout = AttentionLayout {
        padding: Some(&real),
        documents: documents.as_deref(),
        sliding_window: cfg.sliding_window,
    };
    let batch = Batch {
        input_ids: expected["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_device(device)
            .unwrap(),
        positions,
        attention_bias: layout.bias(b, t, device).unwrap(),
    };
    let labels = rows_i64(&expected["labels"]);
    Case {
        name,
        model,
        expected,
        batch,
        labels,
        real,
    }
}

/// Max |a - b| over real (non-padding) positions of `[b, t, V]` logits.
pub fn max_diff(a: &Tensor, b: &Tensor, real: &[Vec<u8>]) -> f32 {
    let a = cpu_f32(a).to_vec3::<f32>().unwrap();
    let b = cpu_f32(b).to_vec3::<f32>().unwrap();
    let mut worst = 0f32;
    for (r, row) in real.iter().enumerate() {
        for (i, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in a[r][i].iter().zip(&b[r][i]) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    worst
}

/// `t` as f32 on the CPU, for comparisons.
pub fn cpu_f32(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// Euclidean norm of a tensor.
pub fn l2(t: &Tensor) -> f32 {
    cpu_f32(t)
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    cpu_f32(t)
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The fixtures with greedy generations from transformers' `generate` (`generate.json`).
pub const GREEDY_CASES: [&str; 5] = [
    "hub_mha",
    "gqa_sharded",
    "longrope",
    "sliding_window",
    "rslora_tied",
];

#[derive(serde::Deserialize)]
struct GreedyRef {
    prompt: Vec<u32>,
    greedy_base: Vec<u32>,
    greedy_lora: Vec<u32>,
    batch_prompts: Vec<Vec<u32>>,
    batch_greedy_base: Vec<Vec<u32>>,
}

/// Greedy decoding of fixture `name` gives transformers' tokens: one prompt without and with
/// the adapter (32 tokens, its casts cached as for serving), and a batch of two prompt lengths
/// (16 tokens), on the CPU in f32.
pub fn check_greedy_generation(name: &'static str) {
    use ferrotune_model::generate::{generate, Sampling};
    let dir = case_dir(name);
    let r: GreedyRef =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generate.json")).unwrap()).unwrap();
    let mut c = load(name);
    let s = Sampling {
        max_new_tokens: 32,
        ..Default::default()
    };
    let out = generate(&c.model, std::slice::from_ref(&r.prompt), &s).unwrap();
    assert_eq!(
        out[0], r.greedy_base,
        "{name}: 32 greedy tokens without adapter"
    );
    let s16 = Sampling {
        max_new_tokens: 16,
        ..Default::default()
    };
    let batch = generate(&c.model, &r.batch_prompts, &s16).unwrap();
    assert_eq!(
        batch, r.batch_greedy_base,
        "{name}: batch of two prompt lengths"
    );
    ferrotune_model::peft::load_adapter(&mut c.model, &dir.join("adapter")).unwrap();
    // As `generate` and `serve` run an adapter: cast once, reused at every step.
    c.model.cache_adapter_casts().unwrap();
    assert!(c
        .model
        .lora_pairs()
        .iter()
        .all(|(_, p)| p.inference_casts.get().is_some()));
    let out = generate(&c.model, std::slice::from_ref(&r.prompt), &s).unwrap();
    assert_eq!(
        out[0], r.greedy_lora,
        "{name}: 32 greedy tokens with adapter"
    );
}
