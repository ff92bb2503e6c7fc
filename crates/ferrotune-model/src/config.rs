//! Phi-3 `config.json` in both forms found in the wild: the hub's (`rope_theta`, `rope_scaling`,
//! `torch_dtype`) and newer transformers' (`rope_parameters`, `dtype`).

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// RoPE frequencies: plain, or Phi-3 128k's `longrope` (alias `su`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    LongRope {
        /// Per-frequency divisors used while the sequence fits `original_max_position_embeddings`.
        short_factor: Vec<f64>,
        /// Per-frequency divisors beyond it.
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        /// Multiplies cos and sin: `sqrt(1 + ln(max/original) / ln(original))` unless given.
        attention_factor: f64,
    },
}

/// The parts of a Phi-3 config the model uses, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Phi3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// Each query attends to at most this many keys (itself included), as transformers applies it.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// `torch_dtype` / `dtype` of the checkpoint, if stated.
    pub dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// Typed access to config keys with errors that name the key.
struct Keys<'a>(&'a serde_json::Map<String, Value>);

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> std::result::Result<Option<usize>, String> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("{key} must be a non-negative integer, found {v}"))
            })
            .transpose()
    }

    fn required(&self, key: &str) -> std::result::Result<usize, String> {
        self.usize(key)?.ok_or_else(|| format!("{key} is missing"))
    }

    fn f64(&self, key: &str) -> std::result::Result<Option<f64>, String> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| format!("{key} must be a number, found {v}"))
            })
            .transpose()
    }

    fn str(&self, key: &str) -> std::result::Result<Option<&str>, String> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| format!("{key} must be a string, found {v}"))
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> std::result::Result<Option<bool>, String> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| format!("{key} must be true or false, found {v}"))
            })
            .transpose()
    }

    fn id(&self, key: &str) -> std::result::Result<Option<u32>, String> {
        Ok(self.usize(key)?.map(|n| n as u32))
    }
}

impl Phi3Config {
    /// Read and validate `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Phi3Config> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Config {
            path: path.clone(),
            message: format!("cannot read ({e}); a model folder needs config.json"),
        })?;
        Phi3Config::from_json_str(&text).map_err(|message| ModelError::Config { path, message })
    }

    /// Parse config JSON; the error names the offending key.
    pub fn from_json_str(text: &str) -> std::result::Result<Phi3Config, String> {
        let json: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let k = Keys(json.as_object().ok_or("config.json is not a JSON object")?);
        match k.str("model_type")? {
            Some("phi3") => {}
            other => {
                return Err(format!(
                    "model_type is {other:?}; ferrotune's model is Phi-3 (model_type \"phi3\")"
                ))
            }
        }
        if let Some(act) = k.str("hidden_act")? {
            if act != "silu" {
                return Err(format!("hidden_act is {act:?}; Phi-3 uses \"silu\""));
            }
        }
        let hidden_size = k.required("hidden_size")?;
        let max_position_embeddings = k.required("max_position_embeddings")?;
        let heads = k.required("num_attention_heads")?;
        let kv_heads = k.usize("num_key_value_heads")?.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads})"
            ));
        }
        let explicit_head_dim = k.usize("head_dim")?;
        if explicit_head_dim.is_none() && hidden_size % heads != 0 {
            return Err(format!(
                "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({heads})"
            ));
        }
        let head_dim = explicit_head_dim.unwrap_or(hidden_size / heads);
        if head_dim % 2 != 0 {
            return Err(format!("head_dim ({head_dim}) must be even for RoPE"));
        }
        // transformers 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`.
        let params = k.get("rope_parameters");
        let rope_theta = match params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("rope_parameters.rope_theta must be a number, found {v}"))?,
            None => k.f64("rope_theta")?.unwrap_or(10_000.0),
        };
        let scaling = params.or(k.get("rope_scaling"));
        let rope_scaling = match scaling {
            None => RopeScaling::Default,
            Some(s) => rope_scaling(
                s,
                head_dim,
                max_position_embeddings,
                k.usize("original_max_position_embeddings")?,
            )?,
        };
        let eos_token_ids = match k.get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Number(n)) => vec![n.as_u64().ok_or("eos_token_id is not an id")? as u32],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as u32)
                        .ok_or("eos_token_id holds a non-id")
                })
                .collect::<std::result::Result<_, _>>()?,
            Some(_) => return Err("eos_token_id must be an id or a list of ids".into()),
        };
        Ok(Phi3Config {
            vocab_size: k.required("vocab_size")?,
            hidden_size,
            intermediate_size: k.required("intermediate_size")?,
            num_hidden_layers: k.required("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: k.f64("rms_norm_eps")?.unwrap_or(1e-5),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            sliding_window: k.usize("sliding_window")?,
            tie_word_embeddings: k.bool("tie_word_embeddings")?.unwrap_or(false),
            dtype: k.str("dtype")?.or(k.str("torch_dtype")?).map(str::to_owned),
            bos_token_id: k.id("bos_token_id")?,
            eos_token_ids,
            pad_token_id: k.id("pad_token_id")?,
        })
    }

    /// Output width of the fused `qkv_proj`: queries, then keys, then values.
    pub fn qkv_size(&self) -> usize {
        (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
    }
}

fn rope_scaling(
    s: &Value,
    head_dim: usize,
    max_pos: usize,
    original_top: Option<usize>,
) -> std::result::Result<RopeScaling, String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(RopeScaling::Default),
        "longrope" | "su" => {
            let factors = |key: &str| -> std::result::Result<Vec<f64>, String> {
                let list = s
                    .get(key)
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("rope_scaling.{key} is missing"))?;
                let v: Vec<f64> = list.iter().filter_map(Value::as_f64).collect();
                if v.len() != list.len() || v.len() != head_dim / 2 {
                    return Err(format!(
                        "rope_scaling.{key} has {} numbers; head_dim {head_dim} needs {}",
                        list.len(),
                        head_dim / 2
                    ));
                }
                Ok(v)
            };
            let original = s
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .or(original_top)
                .ok_or("longrope needs original_max_position_embeddings")?;
            let attention_factor = match s.get("attention_factor").and_then(Value::as_f64) {
                Some(f) => f,
                None => {
                    let factor = max_pos as f64 / original as f64;
                    if factor <= 1.0 {
                        1.0
                    } else {
                        (1.0 + factor.ln() / (original as f64).ln()).sqrt()
                    }
                }
            };
            Ok(RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        other => Err(format!(
            "rope_scaling type {other:?} is not supported for Phi-3 (default, longrope/su are)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB_4K: &str = r#"{"architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
        "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "pad_token_id": 32000, "rms_norm_eps": 1e-05,
        "rope_scaling": null, "rope_theta": 10000.0, "sliding_window": 2047,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32064}"#;

    #[test]
    fn phi3_mini_4k_as_on_the_hub() {
        let c = Phi3Config::from_json_str(HUB_4K).unwrap();
        assert_eq!(
            (c.hidden_size, c.head_dim, c.num_key_value_heads),
            (3072, 96, 32)
        );
        assert_eq!(c.qkv_size(), 3 * 3072);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert_eq!(c.sliding_window, Some(2047));
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.eos_token_ids, vec![32000]);
    }

    #[test]
    fn transformers_5_form_with_gqa_and_longrope() {
        let short: Vec<f64> = (0..8).map(|i| 1.0 + i as f64 * 0.1).collect();
        let long: Vec<f64> = (0..8).map(|i| 2.0 + i as f64).collect();
        let text = serde_json::json!({"model_type": "phi3", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 1024, "dtype": "float32",
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 500.0,
                "short_factor": short, "long_factor": long, "original_max_position_embeddings": 256},
            "eos_token_id": [5, 7]})
        .to_string();
        let c = Phi3Config::from_json_str(&text).unwrap();
        assert_eq!(c.rope_theta, 500.0);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.qkv_size(), (4 + 4) * 16);
        let RopeScaling::LongRope {
            attention_factor,
            original_max_position_embeddings,
            ..
        } = c.rope_scaling
        else {
            panic!("longrope expected")
        };
        assert_eq!(original_max_position_embeddings, 256);
        let expected = (1.0 + (4.0f64).ln() / (256f64).ln()).sqrt();
        assert!((attention_factor - expected).abs() < 1e-12);
        assert_eq!(c.eos_token_ids, vec![5, 7]);
    }

    #[test]
    fn errors_name_the_key() {
        let bad = HUB_4K.replace("\"phi3\"", "\"llama\"");
        assert!(Phi3Config::from_json_str(&bad)
            .unwrap_err()
            .contains("model_type"));
        let bad = HUB_4K.replace("\"num_key_value_heads\": 32", "\"num_key_value_heads\": 5");
        assert!(Phi3Config::from_json_str(&bad)
            .unwrap_err()
            .contains("num_key_value_heads"));
        let bad = HUB_4K.replace(
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"type\": \"longrope\", \"short_factor\": [1.0], \"long_factor\": [1.0]}",
        );
        assert!(Phi3Config::from_json_str(&bad)
            .unwrap_err()
            .contains("short_factor"));
        let bad = HUB_4K.replace("\"vocab_size\": 32064", "\"vocab_size\": \"big\"");
        assert!(Phi3Config::from_json_str(&bad)
            .unwrap_err()
            .contains("vocab_size must be"));
        let bad = HUB_4K.replace("\"hidden_size\": 3072,", "");
        assert_eq!(
            Phi3Config::from_json_str(&bad).unwrap_err(),
            "hidden_size is missing"
        );
    }
}
