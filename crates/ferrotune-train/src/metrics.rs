//! What a run reports: train and eval records, written one JSON object per line to
//! `output_dir/metrics.jsonl` (the same numbers the progress line and MLflow get).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Training metrics over a logging window (`logging_steps` optimizer steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub step: u64,
    pub epoch: f64,
    /// Mean cross-entropy per trained token over the window.
    #[serde(with = "finite_or_null")]
    pub loss: f64,
    /// Learning rate of the window's last update.
    pub learning_rate: f64,
    /// Global gradient norm of the last step, before clipping (null when not finite).
    #[serde(with = "finite_or_null")]
    pub grad_norm: f64,
    /// Tokens (real, not padding) processed per second over the window.
    pub tokens_per_s: f64,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    /// fp16 only: the dynamic loss scale and steps skipped for overflow in the window.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_scale: Option<f64>,
    #[serde(skip_serializing_if = "is_zero", default)]
    pub skipped_steps: u64,
}

/// JSON has no NaN or infinity: such values are written as `null` and read back as NaN.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub epoch: f64,
    #[serde(with = "finite_or_null")]
    pub eval_loss: f64,
    #[serde(with = "finite_or_null")]
    pub eval_perplexity: f64,
    pub eval_accuracy: f64,
    pub eval_tokens: usize,
    pub eval_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Train(TrainRecord),
    Eval(EvalRecord),
}

impl Record {
    pub fn step(&self) -> u64 {
        match self {
            Record::Train(r) => r.step,
            Record::Eval(r) => r.step,
        }
    }
}

/// Appends records to `metrics.jsonl`, flushing each line.
pub struct MetricsFile {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsFile {
    /// Open for appending; on resume, records after `resume_step` (the tail of the interrupted
    /// run, about to be recomputed) are dropped first.
    pub fn open(output_dir: &Path, resume_step: Option<u64>) -> Result<MetricsFile> {
        let path = output_dir.join(METRICS_FILE);
        match resume_step {
            Some(step) => {
                let kept: Vec<Record> = read(&path)?
                    .into_iter()
                    .filter(|r| r.step() <= step)
                    .collect();
                let text: String = kept
                    .iter()
                    .map(|r| serde_json::to_string(r).expect("record serialises") + "\n")
                    .collect();
                let tmp = path.with_extension("jsonl.tmp");
                std::fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, e))?;
                std::fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, e))?;
            }
            None => {
                std::fs::write(&path, "").map_err(|e| TrainError::io(&path, e))?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(MetricsFile { path, file })
    }

    pub fn append(&mut self, record: &Record) -> Result<()> {
        let line = serde_json::to_string(record).expect("record serialises") + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every record of a `metrics.jsonl` (missing file = none; a torn last line is ignored).
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}
