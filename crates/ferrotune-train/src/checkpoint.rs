//! Checkpoints: `output_dir/checkpoint-{step}/` with the adapter (PEFT layout, fp32 master
//! weights), the AdamW moments, the trainer state and the resolved config. A checkpoint is
//! written in a hidden staging folder and renamed into place, so a folder named
//! `checkpoint-N` is always complete: a crash mid-write leaves the previous one untouched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const CONFIG_FILE: &str = "train_config.yaml";
const PREFIX: &str = "checkpoint-";

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken (including fp16 steps skipped for overflow).
    pub global_step: u64,
    /// Updates applied (what the schedule and AdamW's bias correction count).
    pub optimizer_steps: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub tokens_seen: u64,
    pub target_tokens_seen: u64,
    /// fp16 dynamic loss scale and steps since it last changed.
    pub loss_scale: f64,
    pub scale_good_steps: u64,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub evals_without_improvement: u64,
    /// Eval loss measured at this checkpoint's step, if any.
    pub eval_loss: Option<f64>,
    pub training_hash: String,
    pub seed: u64,
    pub elapsed_s: f64,
    pub ferrotune_version: String,
    /// Cache key of the training data (empty in checkpoints that predate it).
    #[serde(default)]
    pub data_cache_key: String,
}

/// Tensors and files of one checkpoint.
pub struct CheckpointContents<'a> {
    pub state: &'a TrainerState,
    pub optimizer: HashMap<String, Tensor>,
    pub config_yaml: &'a str,
    /// Writes the adapter into the given folder.
    pub write_adapter: &'a dyn Fn(&Path) -> Result<()>,
}

/// `output_dir/checkpoint-{step}`.
pub fn path_for(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{PREFIX}{step}"))
}

/// Write a checkpoint atomically; returns its folder.
pub fn save(output_dir: &Path, contents: CheckpointContents) -> Result<PathBuf> {
    let step = contents.state.global_step;
    let pid = std::process::id();
    let staging = output_dir.join(format!(".{PREFIX}{step}.tmp-{pid}"));
    if staging.exists() {
        remove_dir(&staging)?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
    (contents.write_adapter)(&staging)?;
    candle_core::safetensors::save(&contents.optimizer, staging.join(OPTIMIZER_FILE))?;
    write_synced(&staging.join(CONFIG_FILE), contents.config_yaml.as_bytes())?;
    let state = serde_json::to_string_pretty(contents.state).expect("state serialises");
    write_synced(&staging.join(STATE_FILE), state.as_bytes())?;
    let target = path_for(output_dir, step);
    if target.exists() {
        // A re-run reached the same step again: swap the old folder out, then drop it.
        let old = output_dir.join(format!(".{PREFIX}{step}.old-{pid}"));
        std::fs::rename(&target, &old).map_err(|e| TrainError::io(&target, e))?;
        std::fs::rename(&staging, &target).map_err(|e| TrainError::io(&target, e))?;
        remove_dir(&old)?;
    } else {
        std::fs::rename(&staging, &target).map_err(|e| TrainError::io(&target, e))?;
    }
    Ok(target)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(path, e))?;
    f.sync_all().map_err(|e| TrainError::io(path, e))
}

fn remove_dir(path: &Path) -> Result<()> {
    std::fs::remove_dir_all(path).map_err(|e| TrainError::io(path, e))
}

/// Complete checkpoints in `output_dir`, by step.
pub fn list(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix(PREFIX)?.parse::<u64>().ok()?;
            let path = e.path();
            path.join(STATE_FILE).is_file().then_some((step, path))
        })
        .collect();
    out.sort();
    out
}

/// Remove staging folders left by killed runs.
pub fn clean_staging(output_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&format!(".{PREFIX}"))
            && (name.contains(".tmp-") || name.contains(".old-"))
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The checkpoint to resume from: `spec` is `auto` (the newest in `output_dir`, or none), a
/// checkpoint folder, or a training output folder (its newest).
pub fn resolve_resume(spec: &str, output_dir: &Path) -> Result<Option<PathBuf>> {
    if spec == "auto" {
        return Ok(list(output_dir).pop().map(|(_, p)| p));
    }
    let path = PathBuf::from(spec);
    if path.join(STATE_FILE).is_file() {
        return Ok(Some(path));
    }
    match list(&path).pop() {
        Some((_, p)) => Ok(Some(p)),
        None => Err(TrainError::Checkpoint {
            path,
            message: "is neither a checkpoint folder (with trainer_state.json) nor a training output with one; use --resume auto to start fresh when none exists".into(),
        }),
    }
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        message: format!("{STATE_FILE} is unreadable: {e}"),
    })
}

pub fn read_optimizer(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(OPTIMIZER_FILE);
    candle_core::safetensors::load(&path, &candle_core::Device::Cpu).map_err(|e| {
        TrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("{OPTIMIZER_FILE}: {e}"),
        }
    })
}

/// Delete the oldest checkpoints beyond `limit`, never the newest nor `best`; returns what
/// was deleted.
pub fn prune(output_dir: &Path, limit: usize, best: Option<u64>) -> Result<Vec<PathBuf>> {
    let all = list(output_dir);
    let newest = all.last().map(|(s, _)| *s);
    let mut keep = all.len();
    let mut deleted = Vec::new();
    for (step, path) in &all {
        if keep <= limit {
            break;
        }
        if Some(*step) == newest || Some(*step) == best {
            continue;
        }
        remove_dir(path)?;
        deleted.push(path.clone());
        keep -= 1;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(dir: &Path, step: u64) {
        let p = path_for(dir, step);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join(STATE_FILE), "{}").unwrap();
    }

    #[test]
    fn prune_keeps_the_limit_the_newest_and_the_best() {
        let dir = tempfile::tempdir().unwrap();
        for s in [10, 20, 30, 40, 50] {
            fake(dir.path(), s);
        }
        std::fs::create_dir_all(dir.path().join("checkpoint-60")).unwrap(); // incomplete: ignored
        let deleted = prune(dir.path(), 2, Some(20)).unwrap();
        assert_eq!(deleted.len(), 3);
        let left: Vec<u64> = list(dir.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, [20, 50]);
        assert_eq!(
            resolve_resume("auto", dir.path()).unwrap(),
            Some(path_for(dir.path(), 50))
        );
        assert!(resolve_resume(dir.path().join("nothing").to_str().unwrap(), dir.path()).is_err());
    }
}
