//! Loading HF-layout checkpoints: `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, each tensor read and converted to the run's dtype on its own
//! (never two full copies), and model ids resolved through the Hugging Face cache.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::phi3::WeightSource;

/// The safetensors files of a model folder. Each tensor is read with one positioned read into a
/// buffer that is dropped once the tensor exists in the run's dtype, so loading never holds the
/// file contents and the model at once (peak ≈ model + twice the largest tensor), unlike a
/// memory map whose touched pages stay resident until it is dropped.
pub struct SafetensorsWeights {
    dir: PathBuf,
    files: Vec<std::fs::File>,
    /// name → (file index, dtype, shape, absolute byte range)
    index: HashMap<String, (usize, DType, Vec<usize>, u64, u64)>,
    dtype: DType,
    device: Device,
}

impl SafetensorsWeights {
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<SafetensorsWeights> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in weight_files(dir)? {
            let file = std::fs::File::open(&path).map_err(|e| ModelError::Io {
                path: path.clone(),
                source: e,
            })?;
            for (name, entry) in read_header(&file, &path)? {
                index.insert(name, (files.len(), entry.0, entry.1, entry.2, entry.3));
            }
            files.push(file);
        }
        Ok(SafetensorsWeights {
            dir: dir.to_path_buf(),
            files,
            index,
            dtype,
            device: device.clone(),
        })
    }
}

impl SafetensorsWeights {
    /// Every stored tensor: name, stored dtype and shape, in no particular order.
    pub fn entries(&self) -> Vec<(String, DType, Vec<usize>)> {
        self.index
            .iter()
            .map(|(name, (_, dtype, shape, _, _))| (name.clone(), *dtype, shape.clone()))
            .collect()
    }

    /// One tensor in the run's dtype, whatever its shape.
    pub fn tensor_any_shape(&self, name: &str) -> Result<Tensor> {
        let shape =
            self.index
                .get(name)
                .map(|e| e.2.clone())
                .ok_or_else(|| ModelError::Weights {
                    path: self.dir.clone(),
                    message: format!("tensor `{name}` is missing"),
                })?;
        self.tensor(name, &shape)
    }
}

type HeaderEntry = (DType, Vec<usize>, u64, u64);

/// Parse a safetensors header: name → (dtype, shape, absolute start, absolute end).
fn read_header(file: &std::fs::File, path: &Path) -> Result<Vec<(String, HeaderEntry)>> {
    use std::os::unix::fs::FileExt;
    let bad = |m: String| ModelError::Weights {
        path: path.to_path_buf(),
        message: m,
    };
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 {
        return Err(bad(format!("header of {n} bytes: not a safetensors file")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| bad(format!("truncated header ({e})")))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match v.get("dtype").and_then(|d| d.as_str()) {
            Some("F32") => DType::F32,
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {other:?}; expected F32, BF16 or F16"
                )))
            }
        };
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64().map(|d| d as usize))
                    .collect()
            })
            .ok_or_else(|| bad(format!("tensor `{name}` has no shape")))?;
        let offsets = v
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
            .ok_or_else(|| bad(format!("tensor `{name}` has no data_offsets")))?;
        let expected = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        if offsets.1 < offsets.0 || offsets.1 - offsets.0 != expected {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets do not match its shape and dtype"
            )));
        }
        out.push((
            name.clone(),
            (dtype, shape, data_start + offsets.0, data_start + offsets.1),
        ));
    }
    Ok(out)
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let bad = |m: String| ModelError::Weights {
            path: self.dir.clone(),
            message: m,
        };
        let (file, dtype, dims, start, end) = self.index.get(name).ok_or_else(|| {
            bad(format!(
                "tensor `{name}` is missing; is this a Phi-3 checkpoint?"
            ))
        })?;
        if dims.as_slice() != shape {
            return Err(bad(format!(
                "tensor `{name}` has shape {dims:?}; config.json implies {shape:?}"
            )));
        }
        let mut bytes = vec![0u8; (end - start) as usize];
        self.files[*file]
            .read_exact_at(&mut bytes, *start)
            .map_err(|e| bad(format!("reading tensor `{name}`: {e}")))?;
        let t = Tensor::from_raw_buffer(&bytes, *dtype, dims, &Device::Cpu)?;
        drop(bytes);
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// The weight files of a folder: the index's shards, or the single file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io {
            path: index.clone(),
            source: e,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Weights {
                path: index.clone(),
                message: format!("invalid JSON: {e}"),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Weights {
                path: index.clone(),
                message: "no weight_map".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            return Err(ModelError::Weights {
                path: missing.clone(),
                message: "listed in model.safetensors.index.json but not present".into(),
            });
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::Weights {
        path: dir.to_path_buf(),
        message: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

/// A folder as is, or a hub id (`microsoft/Phi-3-mini-4k-instruct`) found in the Hugging Face
/// cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), offline.
/// An MLflow model folder (`MLmodel`, weights in `model/`, tokenizer in
/// `components/tokenizer/`) resolves to its weights folder.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.join(MLMODEL_FILE).is_file() {
        // Today's mlflow.transformers layout, then the older one Azure ML's registry models
        // (Phi-3-mini-4k-instruct among them) were saved in.
        for dir in [MLFLOW_WEIGHTS_DIR, MLFLOW_LEGACY_WEIGHTS_DIR] {
            let weights = path.join(dir);
            if weights.join("config.json").is_file() {
                return Ok(weights);
            }
        }
        return Err(ModelError::NotFound(format!(
            "{spec} is an MLflow model folder without weights in {MLFLOW_WEIGHTS_DIR}/ or \
             {MLFLOW_LEGACY_WEIGHTS_DIR}/ (saved with save_pretrained=False?); export it again with \
             `ferrotune export`, or pass the base model"
        )));
    }
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let Some((org, name)) = spec
        .split_once('/')
        .filter(|(o, n)| !o.is_empty() && !n.contains('/'))
    else {
        return Err(ModelError::NotFound(format!(
            "{spec}: no such folder, and not a hub id of the form org/name"
        )));
    };
    let cache = hub_cache_dir();
    let repo = cache.join(format!("models--{org}--{name}"));
    let revision = std::fs::read_to_string(repo.join("refs/main"))
        .map(|r| r.trim().to_string())
        .ok()
        .or_else(|| {
            // No refs/main: take the only snapshot if there is exactly one.
            let mut snaps: Vec<_> = std::fs::read_dir(repo.join("snapshots"))
                .ok()?
                .flatten()
                .collect();
            (snaps.len() == 1).then(|| snaps.remove(0).file_name().to_string_lossy().into_owned())
        });
    match revision.map(|r| repo.join("snapshots").join(r)) {
        Some(snapshot) if snapshot.join("config.json").is_file() => Ok(snapshot),
        _ => Err(ModelError::NotFound(format!(
            "{spec} is not in the Hugging Face cache at {} (looked for {}); download it there first \
             (`huggingface-cli download {spec}`) or pass the model folder",
            cache.display(),
            repo.display()
        ))),
    }
}

/// The file that marks an MLflow model folder.
pub const MLMODEL_FILE: &str = "MLmodel";
/// Where `mlflow.transformers` keeps the weights (its `model_binary`) and the tokenizer.
pub const MLFLOW_WEIGHTS_DIR: &str = "model";
pub const MLFLOW_TOKENIZER_DIR: &str = "components/tokenizer";
/// The layout of MLflow 2.x's first transformers flavor: `data/model/`, `data/tokenizer/`.
pub const MLFLOW_LEGACY_WEIGHTS_DIR: &str = "data/model";
pub const MLFLOW_LEGACY_TOKENIZER_DIR: &str = "data/tokenizer";

/// The tokenizer of a resolved model folder: the folder itself, or an MLflow folder's
/// `components/tokenizer/` when `weights_dir` is the `model/` inside one.
pub fn tokenizer_dir_for(weights_dir: &Path) -> PathBuf {
    if let Some(root) = weights_dir.parent() {
        let tokenizer = root.join(MLFLOW_TOKENIZER_DIR);
        if root.join(MLMODEL_FILE).is_file() && tokenizer.join("tokenizer.json").is_file() {
            return tokenizer;
        }
        // `data/model` → the MLflow root is two levels up, its tokenizer in `data/tokenizer`.
        if let Some(root) = root.parent().filter(|_| root.ends_with("data")) {
            let tokenizer = root.join(MLFLOW_LEGACY_TOKENIZER_DIR);
            if root.join(MLMODEL_FILE).is_file() && tokenizer.join("tokenizer.json").is_file() {
                return tokenizer;
            }
        }
    }
    weights_dir.to_path_buf()
}

fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/huggingface/hub")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlflow_folders_resolve_in_both_layouts_with_their_tokenizers() {
        let dir = tempfile::tempdir().unwrap();
        for (weights, tokenizer) in [
            (MLFLOW_WEIGHTS_DIR, MLFLOW_TOKENIZER_DIR),
            (MLFLOW_LEGACY_WEIGHTS_DIR, MLFLOW_LEGACY_TOKENIZER_DIR),
        ] {
            let root = dir.path().join(weights.replace('/', "_"));
            std::fs::create_dir_all(root.join(weights)).unwrap();
            std::fs::create_dir_all(root.join(tokenizer)).unwrap();
            std::fs::write(root.join(MLMODEL_FILE), "flavors: {}\n").unwrap();
            std::fs::write(root.join(weights).join("config.json"), "{}").unwrap();
            std::fs::write(root.join(tokenizer).join("tokenizer.json"), "{}").unwrap();
            let resolved = resolve_model(root.to_str().unwrap()).unwrap();
            assert_eq!(resolved, root.join(weights));
            assert_eq!(tokenizer_dir_for(&resolved), root.join(tokenizer));
        }
        let empty = dir.path().join("no_weights");
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::write(empty.join(MLMODEL_FILE), "flavors: {}\n").unwrap();
        let err = resolve_model(empty.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("data/model"), "{err}");
    }

    #[test]
    fn damaged_or_missing_weight_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = SafetensorsWeights::open(dir.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no model.safetensors"), "{err}");
        std::fs::write(
            dir.path().join("model.safetensors"),
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
        )
        .unwrap();
        let err = SafetensorsWeights::open(dir.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("header is not JSON"), "{err}");
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let err = SafetensorsWeights::open(dir.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("listed in model.safetensors.index.json but not present"),
            "{err}"
        );
    }

    #[test]
    fn tensors_convert_to_the_run_dtype_and_shapes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let t = t.to_dtype(DType::BF16).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("w".to_string(), t)]),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        let w = SafetensorsWeights::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let got = w.tensor("w", &[2, 3]).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        );
        assert!(w
            .tensor("w", &[3, 2])
            .unwrap_err()
            .to_string()
            .contains("has shape [2, 3]"));
        assert!(w
            .tensor("v", &[1])
            .unwrap_err()
            .to_string()
            .contains("`v` is missing"));
    }
}
