//! The non-weight files of an export's `model/` and `components/tokenizer/`, in the layout
//! transformers 5 saves: `config.json` with the export's dtype, `generation_config.json` with
//! Phi-3's stop ids, and the tokenizer as `tokenizer.json`, `tokenizer_config.json` and
//! `chat_template.jinja`.

use std::path::Path;

use candle_core::DType;
use serde_json::{json, Map, Value};

use crate::error::{ExportError, Result};

/// transformers' name of a dtype in config.json.
fn config_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

fn read_json(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| ExportError::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ExportError::invalid(path, "is not a JSON object")),
        Err(e) => Err(ExportError::invalid(path, format!("invalid JSON: {e}"))),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serialises") + "\n";
    std::fs::write(path, text).map_err(|e| ExportError::io(path, e))
}

/// The base model's `config.json` for the merged weights: the export's dtype, and no `auto_map`
/// (the export ships no modelling code; transformers' own Phi-3 class loads it).
pub fn write_config(base_dir: &Path, out_dir: &Path, dtype: DType) -> Result<Map<String, Value>> {
    let mut cfg = read_json(&base_dir.join("config.json"))?;
    cfg.remove("auto_map");
    let name = json!(config_dtype(dtype));
    let mut set = false;
    for key in ["dtype", "torch_dtype"] {
        if cfg.contains_key(key) {
            cfg.insert(key.into(), name.clone());
            set = true;
        }
    }
    if !set {
        cfg.insert("torch_dtype".into(), name);
    }
    cfg.insert("architectures".into(), json!(["Phi3ForCausalLM"]));
    write_json(&out_dir.join("config.json"), &Value::Object(cfg.clone()))?;
    Ok(cfg)
}

/// The base model's `generation_config.json`, or one made from config.json's token ids.
pub fn write_generation_config(
    base_dir: &Path,
    out_dir: &Path,
    config: &Map<String, Value>,
) -> Result<()> {
    let src = base_dir.join("generation_config.json");
    let value = if src.is_file() {
        Value::Object(read_json(&src)?)
    } else {
        let mut g = Map::new();
        g.insert("_from_model_config".into(), json!(true));
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = config.get(key) {
                g.insert(key.into(), v.clone());
            }
        }
        if let Some(v) = config.get("transformers_version") {
            g.insert("transformers_version".into(), v.clone());
        }
        Value::Object(g)
    };
    write_json(&out_dir.join("generation_config.json"), &value)
}

/// The tokenizer component: `tokenizer.json` as is; `tokenizer_config.json` with the special
/// tokens of `special_tokens_map.json` folded in and the chat template moved to
/// `chat_template.jinja`, as transformers 5 writes them.
pub fn write_tokenizer(tokenizer_dir: &Path, out_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|e| ExportError::io(out_dir, e))?;
    let copy = |name: &str| -> Result<()> {
        let (src, dst) = (tokenizer_dir.join(name), out_dir.join(name));
        std::fs::copy(&src, &dst)
            .map(drop)
            .map_err(|e| ExportError::io(&src, e))
    };
    copy("tokenizer.json")?;
    let cfg_path = tokenizer_dir.join("tokenizer_config.json");
    let mut cfg = if cfg_path.is_file() {
        read_json(&cfg_path)?
    } else {
        Map::new()
    };
    let map_path = tokenizer_dir.join("special_tokens_map.json");
    if map_path.is_file() {
        for (k, v) in read_json(&map_path)? {
            cfg.entry(k).or_insert(v);
        }
    }
    let template = match cfg.remove("chat_template") {
        Some(Value::String(t)) => Some(t),
        Some(other) => {
            // A list of named templates: keep it where transformers reads it.
            cfg.insert("chat_template".into(), other);
            None
        }
        None => None,
    };
    let jinja = tokenizer_dir.join("chat_template.jinja");
    if jinja.is_file() {
        copy("chat_template.jinja")?;
    } else if let Some(t) = template {
        let dst = out_dir.join("chat_template.jinja");
        std::fs::write(&dst, t).map_err(|e| ExportError::io(&dst, e))?;
    }
    write_json(&out_dir.join("tokenizer_config.json"), &Value::Object(cfg))
}
