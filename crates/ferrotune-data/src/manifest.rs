//! `manifest.json` of a prepared folder: what was read, with which tokenizer and options, the
//! cache key derived from all of that, the shards written and the statistics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::record::{BadRow, BadRowReason};
use crate::shard::ShardInfo;
use crate::source::Format;

/// Bump when the output for the same inputs would change (algorithm or layout).
pub const PREPARED_FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
/// Copy of the tokenizer files inside a prepared folder, so it is self-contained.
pub const TOKENIZER_DIR: &str = "tokenizer";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub cache_key: String,
    pub ferrotune_version: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub input: InputInfo,
    pub tokenizer: TokenizerInfo,
    pub options: PrepareSettings,
    pub shards: Vec<ShardInfo>,
    pub stats: Stats,
    pub build: BuildInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputInfo {
    pub format: Format,
    pub split: Option<String>,
    pub files: Vec<InputFile>,
    /// Rows in the whole split.
    pub total_rows: u64,
    /// Rows selected by --split-pc (all when not given).
    pub selected_rows: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub path: PathBuf,
    pub bytes: u64,
    /// Modification time, nanoseconds since the epoch: with `bytes`, lets a re-run skip rehashing.
    pub modified_ns: u128,
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub source_dir: PathBuf,
    /// blake3 per file copied into `tokenizer/`.
    pub files: BTreeMap<String, String>,
    pub chat_template_blake3: String,
    pub vocab_size: usize,
    pub eos_token: Option<String>,
}

/// The options that shape the output (all part of the cache key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareSettings {
    pub split_pc: Option<u32>,
    pub max_seq_length: usize,
    pub pack: bool,
    pub on_bad_row: OnBadRow,
}

/// What to do with a malformed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    /// Drop it, count it by reason and remember the first few locations.
    #[default]
    Skip,
    /// Stop at the first one with its location (exit code 2).
    Fail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Stats {
    pub rows_read: u64,
    pub rows_kept: u64,
    pub dropped: BTreeMap<BadRowReason, u64>,
    /// Up to [`Stats::EXAMPLES_PER_REASON`] locations per reason.
    pub dropped_examples: Vec<BadRow>,
    pub truncated_rows: u64,
    pub sequences: u64,
    pub tokens: u64,
    pub trainable_tokens: u64,
    /// Tokens per conversation after truncation.
    pub document_tokens: Percentiles,
    /// Tokens per training sequence (equal to `document_tokens` without packing).
    pub sequence_tokens: Percentiles,
    /// tokens / (sequences × max_seq_length): how full the sequences are.
    pub fill_ratio: f64,
}

impl Stats {
    pub const EXAMPLES_PER_REASON: usize = 5;

    pub(crate) fn record_drop(&mut self, bad: BadRow) {
        let n = self.dropped.entry(bad.reason).or_insert(0);
        *n += 1;
        if *n as usize <= Self::EXAMPLES_PER_REASON {
            self.dropped_examples.push(bad);
        }
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Percentiles {
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (sorted in place).
    pub fn of(values: &mut [u32]) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_unstable();
        let rank = |p: f64| {
            let i = ((p / 100.0) * values.len() as f64).ceil() as usize;
            u64::from(values[i.clamp(1, values.len()) - 1])
        };
        let sum: u64 = values.iter().map(|&v| u64::from(v)).sum();
        Percentiles {
            min: u64::from(values[0]),
            p50: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
            max: u64::from(values[values.len() - 1]),
            mean: sum as f64 / values.len() as f64,
        }
    }
}

/// How long the build took; not part of the cache key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BuildInfo {
    pub seconds: f64,
    pub rows_per_second: f64,
    pub tokens_per_second: f64,
    pub threads: usize,
    /// ferrotune's own SentencePiece-BPE encoder was used (same tokens, faster).
    pub fast_encoder: bool,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::Prepared {
            path: dir.to_path_buf(),
            message: format!(
                "cannot read {MANIFEST_FILE} ({e}); is this a folder made by `ferrotune data prepare`?"
            ),
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| DataError::Prepared {
            path: path.clone(),
            message: format!("unreadable ({e}); prepare the data again"),
        })?;
        if manifest.format_version != PREPARED_FORMAT_VERSION {
            return Err(DataError::Prepared {
                path,
                message: format!(
                    "format version {} but this ferrotune reads {PREPARED_FORMAT_VERSION}; prepare the data again",
                    manifest.format_version
                ),
            });
        }
        Ok(manifest)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        write_atomic(&path, text.as_bytes())
    }
}

/// Everything the output depends on; its blake3 is the cache key.
#[derive(Serialize)]
pub(crate) struct CacheKeyParts<'a> {
    pub format_version: u32,
    pub input_format: Format,
    pub split: Option<&'a str>,
    pub input_hashes: Vec<&'a str>,
    pub tokenizer_files: &'a BTreeMap<String, String>,
    pub chat_template_blake3: &'a str,
    pub options: &'a PrepareSettings,
}

impl CacheKeyParts<'_> {
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("cache key parts serialise");
        blake3::hash(&json).to_hex().to_string()
    }
}

/// blake3 of a file's content, hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(std::io::BufReader::with_capacity(1 << 20, file))
        .map_err(|e| DataError::io(path, e))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Write a file so that readers see the old content or the new, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.min, p.p50, p.p90, p.p99, p.max), (1, 50, 90, 99, 100));
        assert!((p.mean - 50.5).abs() < 1e-9);
        assert_eq!(Percentiles::of(&mut []).max, 0);
    }
}
