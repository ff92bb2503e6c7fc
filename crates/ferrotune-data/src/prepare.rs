//! `ferrotune data prepare`: split → rows → chat template → tokens + mask → (packing) → shards,
//! cached by a key over everything the output depends on, written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rayon::prelude::*;

use crate::chat_template::ChatTemplate;
use crate::error::{DataError, Result};
use crate::label_mask::tokenize_conversation;
use crate::manifest::{
    hash_file, BuildInfo, CacheKeyParts, InputFile, InputInfo, Manifest, OnBadRow, Percentiles,
    PrepareSettings, Stats, TokenizerInfo, MANIFEST_FILE, PREPARED_FORMAT_VERSION, TOKENIZER_DIR,
};
use crate::pack::Packer;
use crate::record::{BadRow, BadRowReason, Conversation};
use crate::shard::{Document, ShardWriter};
use crate::source::SplitSource;
use crate::special_tokens::SpecialTokens;
use crate::split::rows_for_percent;
use crate::tokenizer::Tokenizer;

/// Tokenizer files copied into the prepared folder when present.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];
/// Rows tokenized in parallel per step; bounds memory, keeps every core busy.
const BATCH_ROWS: usize = 2048;
/// A shard is closed once it holds this many tokens (64 MiB of ids).
const SHARD_TOKENS: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// A folder in the Hugging Face or jsonl layout, or one .parquet/.jsonl file.
    pub input: PathBuf,
    /// Split name (`train_sft`, ...); needed when `input` is a folder.
    pub split: Option<String>,
    /// Folder with `tokenizer.json` and `tokenizer_config.json` (chat template inside).
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    /// Keep the first P% of the split, rounded as `datasets` rounds.
    pub split_pc: Option<u32>,
    /// Tokens; longer conversations are cut.
    pub max_seq_length: usize,
    pub pack: bool,
    pub on_bad_row: OnBadRow,
    /// Rebuild even when the cache key matches.
    pub force: bool,
}

/// Progress callbacks: total rows to process, then rows done so far.
pub trait Progress: Sync {
    fn start(&self, _total_rows: u64) {}
    fn advance(&self, _rows_done: u64) {}
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {}

#[derive(Debug)]
pub enum Outcome {
    /// The folder already held this exact preparation.
    CacheHit(Manifest),
    Built(Manifest),
}

impl Outcome {
    pub fn manifest(&self) -> &Manifest {
        match self {
            Outcome::CacheHit(m) | Outcome::Built(m) => m,
        }
    }
}

/// Prepare a split into token shards under `opts.out`, or return at once on a cache hit.
pub fn prepare(opts: &PrepareOptions, progress: &dyn Progress) -> Result<Outcome> {
    let started = Instant::now();
    validate(opts)?;
    let source = SplitSource::discover(&opts.input, opts.split.as_deref())?;
    let tokenizer_files = hash_tokenizer_files(&opts.tokenizer)?;
    let specials = SpecialTokens::from_tokenizer_dir(&opts.tokenizer)?;
    let template = ChatTemplate::from_tokenizer_dir(&opts.tokenizer, specials)?;

    let previous = Manifest::read(&opts.out).ok();
    let files = hash_inputs(&source.files, previous.as_ref())?;
    let settings = PrepareSettings {
        split_pc: opts.split_pc,
        max_seq_length: opts.max_seq_length,
        pack: opts.pack,
        on_bad_row: opts.on_bad_row,
    };
    let template_hash = blake3::hash(template.source().as_bytes())
        .to_hex()
        .to_string();
    let key = CacheKeyParts {
        format_version: PREPARED_FORMAT_VERSION,
        input_format: source.format,
        split: opts.split.as_deref(),
        input_hashes: files.iter().map(|f| f.blake3.as_str()).collect(),
        tokenizer_files: &tokenizer_files,
        chat_template_blake3: &template_hash,
        options: &settings,
    }
    .key();
    if let Some(prev) = previous {
        if prev.cache_key == key && !opts.force && shards_present(&opts.out, &prev) {
            return Ok(Outcome::CacheHit(prev));
        }
    } else {
        refuse_foreign_folder(&opts.out)?;
    }

    let tokenizer = Tokenizer::load(&opts.tokenizer)?;
    let total_rows = source.count_rows()?;
    let selected_rows = opts
        .split_pc
        .map_or(total_rows, |pc| rows_for_percent(total_rows, pc));
    if selected_rows == 0 {
        return Err(DataError::Input(format!(
            "{} has {total_rows} rows; {} selects none",
            opts.input.display(),
            opts.split_pc
                .map_or("the split".to_string(), |pc| format!("--split-pc {pc}"))
        )));
    }

    let staging = Staging::create(&opts.out)?;
    copy_tokenizer(&opts.tokenizer, &staging.path.join(TOKENIZER_DIR))?;
    progress.start(selected_rows);
    let stats = tokenize_split(
        &source,
        selected_rows,
        &template,
        &tokenizer,
        opts,
        &staging.path,
        progress,
    )?;
    let (stats, shards) = stats;
    if stats.rows_kept == 0 {
        return Err(DataError::Input(format!(
            "no usable rows in {} ({} read, dropped: {})",
            opts.input.display(),
            stats.rows_read,
            describe_drops(&stats)
        )));
    }

    let seconds = started.elapsed().as_secs_f64();
    let manifest = Manifest {
        format_version: PREPARED_FORMAT_VERSION,
        cache_key: key,
        ferrotune_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        input: InputInfo {
            format: source.format,
            split: opts.split.clone(),
            files,
            total_rows,
            selected_rows,
        },
        tokenizer: TokenizerInfo {
            source_dir: opts.tokenizer.clone(),
            files: tokenizer_files,
            chat_template_blake3: template_hash,
            vocab_size: tokenizer.vocab_size(),
            eos_token: template.specials().eos.clone(),
        },
        options: settings,
        shards,
        build: BuildInfo {
            seconds,
            rows_per_second: stats.rows_read as f64 / seconds.max(1e-9),
            tokens_per_second: stats.tokens as f64 / seconds.max(1e-9),
            threads: rayon::current_num_threads(),
            fast_encoder: tokenizer.uses_fast_encoder(),
        },
        stats,
    };
    manifest.write(&staging.path)?;
    staging.commit(&opts.out)?;
    Ok(Outcome::Built(manifest))
}

fn validate(opts: &PrepareOptions) -> Result<()> {
    if let Some(pc) = opts.split_pc {
        if !(1..=100).contains(&pc) {
            return Err(DataError::Usage(format!(
                "--split-pc {pc}: must be a whole percentage from 1 to 100"
            )));
        }
    }
    if opts.max_seq_length < 2 {
        return Err(DataError::Usage(format!(
            "--max-seq-length {}: a training sequence needs at least 2 tokens",
            opts.max_seq_length
        )));
    }
    Ok(())
}

type ShardList = Vec<crate::shard::ShardInfo>;

/// Stream the selected rows through template + tokenizer in parallel batches, in order.
fn tokenize_split(
    source: &SplitSource,
    selected_rows: u64,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    opts: &PrepareOptions,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(Stats, ShardList)> {
    let mut stats = Stats::default();
    let mut writer = ShardWriter::new(out, SHARD_TOKENS);
    let mut packer = opts.pack.then(|| Packer::new(opts.max_seq_length));
    let (mut doc_lens, mut seq_lens) = (Vec::new(), Vec::new());
    let mut rows = source.rows(selected_rows);
    let mut batch: Vec<Conversation> = Vec::with_capacity(BATCH_ROWS);
    loop {
        batch.clear();
        let mut pending_bad = Vec::new();
        for row in rows.by_ref() {
            stats.rows_read += 1;
            match row? {
                Ok(conv) => batch.push(conv),
                Err(bad) => pending_bad.push((batch.len(), bad)),
            }
            if batch.len() + pending_bad.len() >= BATCH_ROWS {
                break;
            }
        }
        if batch.is_empty() && pending_bad.is_empty() {
            break;
        }
        let results: Vec<_> = batch
            .par_iter()
            .map(|conv| tokenize_conversation(template, tokenizer, &conv.messages))
            .collect();

        // Merge read-time rejections back into row order so `fail` reports the first bad row.
        let mut bad_iter = pending_bad.into_iter().peekable();
        for (i, (conv, result)) in batch.iter().zip(results).enumerate() {
            while let Some((_, bad)) = bad_iter.next_if(|(pos, _)| *pos == i) {
                reject(&mut stats, bad, opts.on_bad_row)?;
            }
            let tokenized = match result {
                Ok(t) => t,
                Err((reason, detail)) => {
                    let bad = BadRow {
                        location: conv.location.clone(),
                        reason,
                        detail,
                    };
                    reject(&mut stats, bad, opts.on_bad_row)?;
                    continue;
                }
            };
            let mut ids = tokenized.ids;
            let mut trainable = tokenized.trainable;
            if ids.len() > opts.max_seq_length {
                ids.truncate(opts.max_seq_length);
                trainable.truncate(opts.max_seq_length);
                stats.truncated_rows += 1;
                if !trainable.iter().any(|&t| t) {
                    stats.record_drop(BadRow {
                        location: conv.location.clone(),
                        reason: BadRowReason::NoTrainableTokensAfterTruncation,
                        detail: format!(
                            "the first assistant token comes after --max-seq-length {}",
                            opts.max_seq_length
                        ),
                    });
                    continue;
                }
            }
            stats.rows_kept += 1;
            stats.tokens += ids.len() as u64;
            stats.trainable_tokens += trainable.iter().filter(|&&t| t).count() as u64;
            doc_lens.push(ids.len() as u32);
            let doc = Document {
                row: conv.index,
                ids,
                trainable,
            };
            let closed = match packer.as_mut() {
                Some(p) => p.push(doc),
                None => Some(vec![doc]),
            };
            if let Some(seq) = closed {
                seq_lens.push(seq.iter().map(|d| d.ids.len() as u32).sum());
                writer.push_sequence(seq)?;
            }
        }
        for (_, bad) in bad_iter {
            reject(&mut stats, bad, opts.on_bad_row)?;
        }
        progress.advance(stats.rows_read);
    }
    if let Some(seq) = packer.and_then(Packer::finish) {
        seq_lens.push(seq.iter().map(|d| d.ids.len() as u32).sum());
        writer.push_sequence(seq)?;
    }
    stats.sequences = seq_lens.len() as u64;
    stats.fill_ratio =
        stats.tokens as f64 / (stats.sequences.max(1) as f64 * opts.max_seq_length as f64);
    stats.document_tokens = Percentiles::of(&mut doc_lens);
    stats.sequence_tokens = Percentiles::of(&mut seq_lens);
    Ok((stats, writer.finish()?))
}

fn reject(stats: &mut Stats, bad: BadRow, policy: OnBadRow) -> Result<()> {
    if policy == OnBadRow::Fail && bad.reason.is_malformed() {
        return Err(DataError::BadRow {
            location: bad.location,
            reason: bad.reason,
            detail: bad.detail,
        });
    }
    stats.record_drop(bad);
    Ok(())
}

fn describe_drops(stats: &Stats) -> String {
    if stats.dropped.is_empty() {
        return "none".into();
    }
    stats
        .dropped
        .iter()
        .map(|(r, n)| format!("{n} {r}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn hash_tokenizer_files(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for name in TOKENIZER_FILES {
        let path = dir.join(name);
        if path.is_file() {
            out.insert(name.to_string(), hash_file(&path)?);
        }
    }
    if !out.contains_key("tokenizer.json") {
        return Err(DataError::Tokenizer {
            path: dir.join("tokenizer.json"),
            message: "not found; --tokenizer must be a folder with the model's tokenizer.json and tokenizer_config.json".into(),
        });
    }
    Ok(out)
}

fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| DataError::io(to, e))?;
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name)).map_err(|e| DataError::io(&src, e))?;
        }
    }
    Ok(())
}

/// Content hashes of the input files, reusing the previous manifest's when size and mtime match.
fn hash_inputs(files: &[PathBuf], previous: Option<&Manifest>) -> Result<Vec<InputFile>> {
    files
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
            let modified_ns = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let known = previous.and_then(|m| {
                m.input.files.iter().find(|f| {
                    f.path == abs && f.bytes == meta.len() && f.modified_ns == modified_ns
                })
            });
            let blake3 = match known {
                Some(f) => f.blake3.clone(),
                None => hash_file(path)?,
            };
            Ok(InputFile {
                path: abs,
                bytes: meta.len(),
                modified_ns,
                blake3,
            })
        })
        .collect()
}

fn shards_present(dir: &Path, m: &Manifest) -> bool {
    m.shards.iter().all(|s| dir.join(&s.file).is_file())
        && dir.join(TOKENIZER_DIR).join("tokenizer.json").is_file()
}

/// An existing, non-empty `--out` that ferrotune did not make is never replaced.
fn refuse_foreign_folder(out: &Path) -> Result<()> {
    if out.is_file() {
        return Err(DataError::Usage(format!(
            "--out {} is a file; give a folder path",
            out.display()
        )));
    }
    let non_empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if non_empty && !out.join(MANIFEST_FILE).is_file() {
        return Err(DataError::Usage(format!(
            "--out {} exists and is not a ferrotune prepared folder; choose an empty or new folder",
            out.display()
        )));
    }
    Ok(())
}

/// A sibling folder that becomes `out` in one rename on success and disappears on failure.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(out: &Path) -> Result<Staging> {
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        let name = out
            .file_name()
            .ok_or_else(|| DataError::Usage(format!("--out {}: not a folder name", out.display())))?
            .to_string_lossy()
            .into_owned();
        remove_stale_staging(parent, &name);
        let path = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| DataError::io(&path, e))?;
        }
        std::fs::create_dir(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    /// Swap the staged folder into place; the old one (if any) is removed only afterwards.
    fn commit(mut self, out: &Path) -> Result<()> {
        let old = out.with_file_name(format!(
            ".{}.old-{}",
            out.file_name()
                .expect("checked in create")
                .to_string_lossy(),
            std::process::id()
        ));
        let had_old = out.exists();
        if had_old {
            std::fs::rename(out, &old).map_err(|e| DataError::io(out, e))?;
        }
        if let Err(e) = std::fs::rename(&self.path, out) {
            if had_old {
                let _ = std::fs::rename(&old, out);
            }
            return Err(DataError::io(out, e));
        }
        self.committed = true;
        if had_old {
            std::fs::remove_dir_all(&old).map_err(|e| DataError::io(&old, e))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Remove staging folders of earlier runs that were killed (their process no longer exists).
fn remove_stale_staging(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(s) = file_name.to_str() else {
            continue;
        };
        let pid = s
            .strip_prefix(&format!(".{name}.tmp-"))
            .or_else(|| s.strip_prefix(&format!(".{name}.old-")))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            let alive = Path::new(&format!("/proc/{pid}")).exists();
            if !alive || pid == std::process::id() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}
