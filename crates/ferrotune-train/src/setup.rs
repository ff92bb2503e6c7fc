//! From a config to what the loop needs: the data (prepared on the fly through the [data]
//! cache, or a folder from `data prepare`), the sequence length, and the LoRA pairs.

use std::path::{Path, PathBuf};

use ferrotune_data::{prepare, OnBadRow, PrepareOptions, Prepared, Progress, TrainingSequence};
use ferrotune_model::lora::LoraConfig;
use ferrotune_model::{peft, Phi3, Phi3Config};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// The longest sequence the run trains on: `max_seq_length`, or the model's context when -1
/// (capped at 4096 tokens, the Phi-3-mini-4k context).
pub fn max_seq_length(cfg: &TrainConfig, model: &Phi3Config) -> Result<usize> {
    let context = model.max_position_embeddings;
    if cfg.max_seq_length < 0 {
        return Ok(context.min(4096));
    }
    let n = cfg.max_seq_length as usize;
    if n > context {
        return Err(TrainError::config(
            "max_seq_length",
            format!("{n} is longer than the model's context of {context} tokens"),
        ));
    }
    Ok(n)
}

/// One split of a run: where it came from and its sequences.
pub struct SplitData {
    pub dir: PathBuf,
    pub cache_key: String,
    pub sequences: Vec<TrainingSequence>,
}

/// Tokenized `path`: a prepared folder as is, or raw data prepared into `cache_dir` (a cache
/// hit when nothing changed). `key` names the config key for messages.
#[allow(clippy::too_many_arguments)]
pub fn load_split(
    key: &str,
    path: &Path,
    split: &str,
    tokenizer: &Path,
    cache_dir: &Path,
    max_seq_length: usize,
    pack: bool,
    vocab_size: usize,
    progress: &dyn Progress,
) -> Result<SplitData> {
    if !path.exists() {
        return Err(TrainError::config(
            key,
            format!("{} does not exist", path.display()),
        ));
    }
    let dir = if path.join("manifest.json").is_file() {
        path.to_path_buf()
    } else {
        let opts = PrepareOptions {
            input: path.to_path_buf(),
            split: path.is_dir().then(|| split.to_string()),
            tokenizer: tokenizer.to_path_buf(),
            out: cache_dir.to_path_buf(),
            split_pc: None,
            max_seq_length,
            pack,
            on_bad_row: OnBadRow::Skip,
            force: false,
        };
        let outcome = prepare(&opts, progress)?;
        let m = outcome.manifest();
        tracing::info!(
            "{key}: {} ({} conversations, {} trained tokens{})",
            match outcome {
                ferrotune_data::Outcome::CacheHit(_) => "cache hit",
                ferrotune_data::Outcome::Built(_) => "prepared",
            },
            m.stats.rows_kept,
            m.stats.trainable_tokens,
            if m.stats.dropped_total() > 0 {
                format!(", {} rows skipped", m.stats.dropped_total())
            } else {
                String::new()
            }
        );
        cache_dir.to_path_buf()
    };
    let prepared = Prepared::open(&dir)?;
    let m = prepared.manifest();
    if m.options.max_seq_length > max_seq_length {
        tracing::warn!(
            "{key}: {} was prepared with max_seq_length {}, longer than this run's {max_seq_length}",
            dir.display(),
            m.options.max_seq_length
        );
    }
    let sequences = prepared.sequences()?;
    for (i, s) in sequences.iter().enumerate() {
        if let Some(bad) = s.ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TrainError::config(
                key,
                format!(
                    "{}: sequence {i} holds token id {bad}, outside the model's vocabulary of {vocab_size}; prepare it with the model's tokenizer",
                    dir.display()
                ),
            ));
        }
    }
    Ok(SplitData {
        dir,
        cache_key: m.cache_key.clone(),
        sequences,
    })
}

/// The LoRA settings of the config.
pub fn lora_config(cfg: &TrainConfig) -> LoraConfig {
    LoraConfig {
        r: cfg.lora_r,
        lora_alpha: cfg.lora_alpha,
        lora_dropout: cfg.lora_dropout,
        target_modules: cfg.lora_target_modules.clone(),
        use_rslora: cfg.use_rslora,
    }
}

/// Attach the adapter to train: `init_adapter` (its rank, alpha and targets win) or fresh
/// PEFT-initialised pairs from the config, seeded by `seed`. Dropout is always the config's.
pub fn attach_lora(model: &mut Phi3, cfg: &TrainConfig) -> Result<LoraConfig> {
    let mut lora = match &cfg.init_adapter {
        Some(dir) => {
            let lora = peft::load_adapter(model, dir)?;
            if lora.r != cfg.lora_r || lora.target_modules != cfg.lora_target_modules {
                tracing::info!(
                    "init_adapter {}: r={} on {} (its settings replace lora_r/lora_target_modules)",
                    dir.display(),
                    lora.r,
                    lora.target_modules.join(",")
                );
            }
            lora
        }
        None => {
            let lora = lora_config(cfg);
            model.add_lora(&lora, cfg.seed)?;
            lora
        }
    };
    lora.lora_dropout = cfg.lora_dropout;
    model.set_lora_dropout(cfg.lora_dropout);
    Ok(lora)
}
