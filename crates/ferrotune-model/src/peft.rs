//! LoRA adapters in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.{i}.self_attn.qkv_proj.lora_A.weight` (`[r, in]`) and
//! `...lora_B.weight` (`[out, r]`), so PEFT and servers that load PEFT adapters accept ours and
//! we load theirs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use crate::error::{ModelError, Result};
use crate::lora::{LoraConfig, LoraPair};
use crate::phi3::Phi3;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// Read `adapter_config.json`; options PEFT supports but ferrotune does not are refused by name.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let bad = |m: String| ModelError::Adapter {
        path: path.clone(),
        message: m,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    if v.get("peft_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t != "LORA")
    {
        return Err(bad(format!(
            "peft_type is {}; only LORA adapters are supported",
            v["peft_type"]
        )));
    }
    for (key, ok) in [
        (
            "use_dora",
            v.get("use_dora").is_none_or(|x| x.is_null() || x == false),
        ),
        (
            "bias",
            v.get("bias").is_none_or(|x| x.is_null() || x == "none"),
        ),
        (
            "modules_to_save",
            v.get("modules_to_save")
                .is_none_or(|x| x.is_null() || x.as_array().is_some_and(Vec::is_empty)),
        ),
        (
            "rank_pattern",
            v.get("rank_pattern")
                .is_none_or(|x| x.is_null() || x.as_object().is_some_and(|o| o.is_empty())),
        ),
        (
            "alpha_pattern",
            v.get("alpha_pattern")
                .is_none_or(|x| x.is_null() || x.as_object().is_some_and(|o| o.is_empty())),
        ),
        (
            "fan_in_fan_out",
            v.get("fan_in_fan_out")
                .is_none_or(|x| x.is_null() || x == false),
        ),
    ] {
        if !ok {
            return Err(bad(format!("{key} = {} is not supported", v[key])));
        }
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("r is missing".into()))? as usize;
    let lora_alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let target_modules = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(s)) => {
            return Err(bad(format!(
                "target_modules is a regex ({s:?}); use a list of module names"
            )))
        }
        _ => return Err(bad("target_modules is missing".into())),
    };
    Ok(LoraConfig {
        r,
        lora_alpha,
        lora_dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// One adapted module of an adapter file: its path (`model.layers.0.self_attn.qkv_proj`),
/// `lora_A` `[r, in]` and `lora_B` `[out, r]` as stored.
pub struct AdapterPair {
    pub module: String,
    pub a: Tensor,
    pub b: Tensor,
}

/// Read the adapter in `dir` (config and weights) without a model, on the CPU.
pub fn read_adapter(dir: &Path) -> Result<(LoraConfig, Vec<AdapterPair>)> {
    let cfg = read_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let bad = |m: String| ModelError::Adapter {
        path: path.clone(),
        message: m,
    };
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (key, t) in tensors {
        let rest = key.strip_prefix(KEY_PREFIX).ok_or_else(|| {
            bad(format!(
                "unexpected key `{key}` (PEFT keys start with {KEY_PREFIX})"
            ))
        })?;
        let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(bad(format!(
                "unexpected key `{key}`: only lora_A/lora_B weights are supported"
            )));
        };
        let entry = pairs.entry(module.to_string()).or_default();
        if which == 0 {
            entry.0 = Some(t);
        } else {
            entry.1 = Some(t);
        }
    }
    let mut out = Vec::with_capacity(pairs.len());
    for (module, (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(bad(format!("{module} has only one of lora_A/lora_B")));
        };
        if a.dims().first() != Some(&cfg.r) || b.dims().get(1) != Some(&cfg.r) {
            return Err(bad(format!(
                "{module}: lora_A {:?} and lora_B {:?} do not have rank r={}",
                a.dims(),
                b.dims(),
                cfg.r
            )));
        }
        out.push(AdapterPair { module, a, b });
    }
    out.sort_by(|x, y| x.module.cmp(&y.module));
    Ok((cfg, out))
}

/// Attach the adapter in `dir` to `model` (replacing any adapter it had), weights as f32 `Var`s.
pub fn load_adapter(model: &mut Phi3, dir: &Path) -> Result<LoraConfig> {
    let (cfg, pairs) = read_adapter(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let bad = |m: String| ModelError::Adapter {
        path: path.clone(),
        message: m,
    };
    let device = model.device().clone();
    for linear_path in all_linear_paths(model) {
        if let Some(linear) = model.linear_mut(&linear_path) {
            linear.lora = None;
        }
    }
    for AdapterPair { module, a, b } in pairs {
        let linear = model
            .linear_mut(&module)
            .ok_or_else(|| bad(format!("{module} is not a linear of this model")))?;
        let (out, inp) = linear.base.weight().dims2()?;
        if a.dims() != [cfg.r, inp] || b.dims() != [out, cfg.r] {
            return Err(bad(format!(
                "{module}: lora_A {:?} and lora_B {:?} do not fit r={} and the weight [{out}, {inp}]",
                a.dims(),
                b.dims(),
                cfg.r
            )));
        }
        linear.lora = Some(LoraPair::new(
            Var::from_tensor(&a.to_dtype(DType::F32)?.to_device(&device)?)?,
            Var::from_tensor(&b.to_dtype(DType::F32)?.to_device(&device)?)?,
            cfg.scale(),
            cfg.lora_dropout,
        ));
    }
    Ok(cfg)
}

fn all_linear_paths(model: &Phi3) -> Vec<String> {
    (0..model.config().num_hidden_layers)
        .flat_map(|l| {
            [
                "self_attn.qkv_proj",
                "self_attn.o_proj",
                "mlp.gate_up_proj",
                "mlp.down_proj",
            ]
            .map(|m| format!("model.layers.{l}.{m}"))
        })
        .collect()
}

/// Write the model's adapter to `dir` in PEFT's layout (f32), atomically per file.
pub fn save_adapter(model: &Phi3, cfg: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut tensors = HashMap::new();
    for (module, pair) in model.lora_pairs() {
        tensors.insert(
            format!("{KEY_PREFIX}{module}.lora_A.weight"),
            pair.a.as_tensor().to_device(&Device::Cpu)?,
        );
        tensors.insert(
            format!("{KEY_PREFIX}{module}.lora_B.weight"),
            pair.b.as_tensor().to_device(&Device::Cpu)?,
        );
    }
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = weights.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    rename(&tmp, &weights)?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": cfg.target_modules,
        "use_rslora": cfg.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    let path = dir.join(CONFIG_FILE);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&config).expect("json")).map_err(|e| {
        ModelError::Io {
            path: tmp.clone(),
            source: e,
        }
    })?;
    rename(&tmp, &path)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| ModelError::Io {
        path: to.to_path_buf(),
        source: e,
    })
}
