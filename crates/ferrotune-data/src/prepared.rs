//! Reading a prepared folder back: its manifest, any conversation by index, its tokenizer.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::label_mask::labels_from_mask;
use crate::manifest::{Manifest, TOKENIZER_DIR};
use crate::shard::ShardData;
use crate::tokenizer::Tokenizer;

/// A folder written by `prepare`.
pub struct Prepared {
    dir: PathBuf,
    manifest: Manifest,
}

/// One conversation as stored: tokens, trained-token mask and its row in the split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    /// Index among the kept conversations (what `inspect --row` takes).
    pub index: u64,
    /// Row index in the selected split.
    pub source_row: u64,
    pub ids: Vec<u32>,
    pub trainable: Vec<bool>,
}

/// One training sequence: a conversation, or several packed ones (`doc_lengths` in tokens, in
/// order, summing to `ids.len()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingSequence {
    pub ids: Vec<u32>,
    pub trainable: Vec<bool>,
    pub doc_lengths: Vec<usize>,
}

impl StoredDocument {
    /// Labels in the Hugging Face convention (-100 = not trained).
    pub fn labels(&self) -> Vec<i64> {
        labels_from_mask(&self.ids, &self.trainable)
    }
}

impl Prepared {
    pub fn open(dir: &Path) -> Result<Prepared> {
        Ok(Prepared {
            dir: dir.to_path_buf(),
            manifest: Manifest::read(dir)?,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of conversations kept.
    pub fn document_count(&self) -> u64 {
        self.manifest.shards.iter().map(|s| s.documents).sum()
    }

    /// Conversation `index` (0-based over all shards).
    pub fn document(&self, index: u64) -> Result<StoredDocument> {
        let mut first = 0;
        for info in &self.manifest.shards {
            if index < first + info.documents {
                let shard = ShardData::read(&self.dir.join(&info.file))?;
                let local = (index - first) as usize;
                if local >= shard.document_count() {
                    return Err(DataError::Prepared {
                        path: self.dir.join(&info.file),
                        message: "holds fewer conversations than the manifest says; prepare again"
                            .into(),
                    });
                }
                return Ok(stored(&shard, index, local));
            }
            first += info.documents;
        }
        Err(DataError::Usage(format!(
            "--row {index}: {} holds {} conversations (0 to {})",
            self.dir.display(),
            first,
            first.saturating_sub(1)
        )))
    }

    /// Every conversation in order, reading each shard once.
    pub fn documents(&self) -> impl Iterator<Item = Result<StoredDocument>> + '_ {
        let mut first = 0u64;
        self.manifest.shards.iter().flat_map(move |info| {
            let base = first;
            first += info.documents;
            let docs: Vec<Result<StoredDocument>> =
                match ShardData::read(&self.dir.join(&info.file)) {
                    Ok(shard) => (0..shard.document_count())
                        .map(|i| Ok(stored(&shard, base + i as u64, i)))
                        .collect(),
                    Err(e) => vec![Err(e)],
                };
            docs
        })
    }

    /// Every training sequence (one conversation, or several packed), in stored order, all in
    /// memory: about 5 bytes per token.
    pub fn sequences(&self) -> Result<Vec<TrainingSequence>> {
        let mut out = Vec::new();
        for info in &self.manifest.shards {
            let shard = ShardData::read(&self.dir.join(&info.file))?;
            let mut doc = 0usize;
            for s in 0..shard.sequence_count() {
                let (start, end) = (
                    shard.sequence_offsets[s] as usize,
                    shard.sequence_offsets[s + 1] as usize,
                );
                let mut doc_lengths = Vec::new();
                while doc < shard.document_count() && (shard.document_offsets[doc] as usize) < end {
                    let range = shard.document_range(doc);
                    doc_lengths.push(range.end.min(end) - range.start.max(start));
                    doc += 1;
                }
                if doc_lengths.iter().sum::<usize>() != end - start {
                    return Err(DataError::Prepared {
                        path: self.dir.join(&info.file),
                        message: format!(
                            "sequence {s} does not line up with its conversations; prepare again"
                        ),
                    });
                }
                out.push(TrainingSequence {
                    ids: shard.input_ids[start..end].to_vec(),
                    trainable: shard.trainable[start..end]
                        .iter()
                        .map(|&t| t != 0)
                        .collect(),
                    doc_lengths,
                });
            }
        }
        Ok(out)
    }

    /// The tokenizer copied into the folder at prepare time.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::load(&self.dir.join(TOKENIZER_DIR))
    }
}

fn stored(shard: &ShardData, index: u64, local: usize) -> StoredDocument {
    let range = shard.document_range(local);
    StoredDocument {
        index,
        source_row: shard.document_rows[local],
        ids: shard.input_ids[range.clone()].to_vec(),
        trainable: shard.trainable[range].iter().map(|&t| t != 0).collect(),
    }
}

/// Text of a token sequence cut where the trained flag changes: `(trained, text)` pieces whose
/// concatenation is the decoded sequence.
pub fn trained_segments(
    tokenizer: &Tokenizer,
    ids: &[u32],
    trainable: &[bool],
) -> std::result::Result<Vec<(bool, String)>, String> {
    let mut segments = Vec::new();
    let mut start = 0;
    let mut decoded_before = String::new();
    while start < ids.len() {
        let flag = trainable[start];
        let end = (start..ids.len())
            .find(|&i| trainable[i] != flag)
            .unwrap_or(ids.len());
        // Decode prefixes so word-initial spaces come out as they do in the whole text.
        let decoded = tokenizer.decode(&ids[..end])?;
        let piece = match decoded.strip_prefix(decoded_before.as_str()) {
            Some(rest) => rest.to_string(),
            None => tokenizer.decode(&ids[start..end])?,
        };
        segments.push((flag, piece));
        decoded_before = decoded;
        start = end;
    }
    Ok(segments)
}
