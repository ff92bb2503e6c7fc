//! Loading HF-layout checkpoints: `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped, each tensor converted to the run's dtype as it
//! is read (never two full copies), and model ids resolved through the Hugging Face cache.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::phi3::WeightSource;

/// The safetensors files of a model folder, mapped.
pub struct SafetensorsWeights {
    dir: PathBuf,
    files: MmapedSafetensors,
    dtype: DType,
    device: Device,
}

impl SafetensorsWeights {
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<SafetensorsWeights> {
        let paths = weight_files(dir)?;
        // SAFETY: the files are mapped read-only; ferrotune never writes them while mapped.
        let files =
            unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| ModelError::Weights {
                path: dir.to_path_buf(),
                message: format!("cannot map safetensors: {e}"),
            })?;
        Ok(SafetensorsWeights {
            dir: dir.to_path_buf(),
            files,
            dtype,
            device: device.clone(),
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let missing = |m: String| ModelError::Weights {
            path: self.dir.clone(),
            message: m,
        };
        let t = self.files.load(name, &Device::Cpu).map_err(|_| {
            missing(format!(
                "tensor `{name}` is missing; is this a Phi-3 checkpoint?"
            ))
        })?;
        if t.dims() != shape {
            return Err(missing(format!(
                "tensor `{name}` has shape {:?}; config.json implies {shape:?}",
                t.dims()
            )));
        }
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
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
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
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
