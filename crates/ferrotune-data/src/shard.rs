//! Token shards: safetensors files (readable from numpy/torch as they are) holding
//! training sequences, the conversations ("documents") packed into them and their labels mask.
//!
//! Tensors of one shard (`T` tokens, `S` sequences, `D` documents):
//! - `input_ids` u32 `[T]`
//! - `trainable` u8 `[T]`: 1 where the token is trained (its label is its id), 0 for label -100
//! - `sequence_offsets` u64 `[S+1]`: token ranges of the training sequences
//! - `document_offsets` u64 `[D+1]`: token ranges of the conversations; a packed sequence holds
//!   several, position ids restart at each and attention must not cross them
//! - `document_rows` u64 `[D]`: each conversation's row index in the selected split

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Recorded in each shard's safetensors metadata.
pub const SHARD_FORMAT: &str = "ferrotune-tokens/1";

/// One tokenized conversation on its way into a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub row: u64,
    pub ids: Vec<u32>,
    pub trainable: Vec<bool>,
}

/// What a written shard holds; stored in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub sequences: u64,
    pub documents: u64,
    pub tokens: u64,
    pub trainable_tokens: u64,
}

/// Accumulates sequences and writes a shard whenever `target_tokens` is reached.
pub struct ShardWriter {
    dir: PathBuf,
    target_tokens: usize,
    buf: ShardData,
    written: Vec<ShardInfo>,
}

impl ShardWriter {
    pub fn new(dir: &Path, target_tokens: usize) -> ShardWriter {
        ShardWriter {
            dir: dir.to_path_buf(),
            target_tokens,
            buf: ShardData::default(),
            written: Vec::new(),
        }
    }

    /// Append one training sequence made of `docs` (one document unless packing).
    pub fn push_sequence(&mut self, docs: Vec<Document>) -> Result<()> {
        for doc in docs {
            self.buf.input_ids.extend_from_slice(&doc.ids);
            self.buf
                .trainable
                .extend(doc.trainable.iter().map(|&t| u8::from(t)));
            self.buf
                .document_offsets
                .push(self.buf.input_ids.len() as u64);
            self.buf.document_rows.push(doc.row);
        }
        self.buf
            .sequence_offsets
            .push(self.buf.input_ids.len() as u64);
        if self.buf.input_ids.len() >= self.target_tokens {
            self.flush()?;
        }
        Ok(())
    }

    /// Write what is buffered and return every shard written, in order.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>> {
        if !self.buf.document_rows.is_empty() {
            self.flush()?;
        }
        Ok(self.written)
    }

    fn flush(&mut self) -> Result<()> {
        let name = format!("shard-{:05}.safetensors", self.written.len());
        let path = self.dir.join(&name);
        let data = std::mem::take(&mut self.buf);
        data.write(&path)?;
        self.written.push(ShardInfo {
            file: name,
            sequences: data.sequence_count() as u64,
            documents: data.document_rows.len() as u64,
            tokens: data.input_ids.len() as u64,
            trainable_tokens: data.trainable.iter().map(|&t| u64::from(t)).sum(),
        });
        Ok(())
    }
}

/// The contents of one shard, in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardData {
    pub input_ids: Vec<u32>,
    pub trainable: Vec<u8>,
    pub sequence_offsets: Vec<u64>,
    pub document_offsets: Vec<u64>,
    pub document_rows: Vec<u64>,
}

impl Default for ShardData {
    fn default() -> Self {
        ShardData {
            input_ids: Vec::new(),
            trainable: Vec::new(),
            sequence_offsets: vec![0],
            document_offsets: vec![0],
            document_rows: Vec::new(),
        }
    }
}

impl ShardData {
    pub fn sequence_count(&self) -> usize {
        self.sequence_offsets.len() - 1
    }

    pub fn document_count(&self) -> usize {
        self.document_rows.len()
    }

    /// Token range of document `i` within this shard.
    pub fn document_range(&self, i: usize) -> std::ops::Range<usize> {
        self.document_offsets[i] as usize..self.document_offsets[i + 1] as usize
    }

    fn write(&self, path: &Path) -> Result<()> {
        let ids: Vec<u8> = self
            .input_ids
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let seq = u64_bytes(&self.sequence_offsets);
        let docs = u64_bytes(&self.document_offsets);
        let rows = u64_bytes(&self.document_rows);
        let view = |dtype, len, data| {
            TensorView::new(dtype, vec![len], data).expect("buffer sizes match their shapes")
        };
        let tensors = vec![
            (
                "input_ids",
                view(Dtype::U32, self.input_ids.len(), &ids[..]),
            ),
            (
                "trainable",
                view(Dtype::U8, self.trainable.len(), &self.trainable[..]),
            ),
            (
                "sequence_offsets",
                view(Dtype::U64, self.sequence_offsets.len(), &seq[..]),
            ),
            (
                "document_offsets",
                view(Dtype::U64, self.document_offsets.len(), &docs[..]),
            ),
            (
                "document_rows",
                view(Dtype::U64, self.document_rows.len(), &rows[..]),
            ),
        ];
        let meta = HashMap::from([("format".to_string(), SHARD_FORMAT.to_string())]);
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| DataError::io(path, std::io::Error::other(e.to_string())))?;
        std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))
    }

    /// Read a shard written by [`ShardWriter`], checking its format and internal consistency.
    pub fn read(path: &Path) -> Result<ShardData> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let damaged = |m: String| DataError::Prepared {
            path: path.to_path_buf(),
            message: format!("{m}; delete the folder and run `ferrotune data prepare` again"),
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| damaged(e.to_string()))?;
        let tensor = |name: &str, dtype: Dtype| {
            let t = st
                .tensor(name)
                .map_err(|_| damaged(format!("tensor `{name}` missing")))?;
            if t.dtype() != dtype {
                return Err(damaged(format!("tensor `{name}` is {:?}", t.dtype())));
            }
            Ok(t.data())
        };
        let data = ShardData {
            input_ids: tensor("input_ids", Dtype::U32)?
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("chunk of 4")))
                .collect(),
            trainable: tensor("trainable", Dtype::U8)?.to_vec(),
            sequence_offsets: u64_vec(tensor("sequence_offsets", Dtype::U64)?),
            document_offsets: u64_vec(tensor("document_offsets", Dtype::U64)?),
            document_rows: u64_vec(tensor("document_rows", Dtype::U64)?),
        };
        let n = data.input_ids.len() as u64;
        let consistent = data.trainable.len() as u64 == n
            && data.sequence_offsets.first() == Some(&0)
            && data.sequence_offsets.last() == Some(&n)
            && data.document_offsets.first() == Some(&0)
            && data.document_offsets.last() == Some(&n)
            && data.document_offsets.len() == data.document_rows.len() + 1
            && data.sequence_offsets.windows(2).all(|w| w[0] <= w[1])
            && data.document_offsets.windows(2).all(|w| w[0] <= w[1]);
        if !consistent {
            return Err(damaged("offsets do not match the token count".into()));
        }
        Ok(data)
    }
}

fn u64_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u64_vec(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("chunk of 8")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(row: u64, ids: &[u32], mask: &[bool]) -> Document {
        Document {
            row,
            ids: ids.to_vec(),
            trainable: mask.to_vec(),
        }
    }

    #[test]
    fn shards_round_trip_and_roll_over_at_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), 5);
        w.push_sequence(vec![doc(0, &[1, 2, 3], &[false, true, true])])
            .unwrap();
        w.push_sequence(vec![doc(1, &[4, 5], &[false, true]), doc(2, &[6], &[true])])
            .unwrap();
        w.push_sequence(vec![doc(3, &[7, 8], &[true, false])])
            .unwrap();
        let infos = w.finish().unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(
            (infos[0].sequences, infos[0].documents, infos[0].tokens),
            (2, 3, 6)
        );
        assert_eq!(infos[0].trainable_tokens, 4);
        let s0 = ShardData::read(&dir.path().join(&infos[0].file)).unwrap();
        assert_eq!(s0.input_ids, [1, 2, 3, 4, 5, 6]);
        assert_eq!(s0.sequence_offsets, [0, 3, 6]);
        assert_eq!(s0.document_offsets, [0, 3, 5, 6]);
        assert_eq!(s0.document_rows, [0, 1, 2]);
        let s1 = ShardData::read(&dir.path().join(&infos[1].file)).unwrap();
        assert_eq!(s1.trainable, [1, 0]);
        assert_eq!(s1.document_rows, [3]);
    }

    #[test]
    fn a_damaged_shard_is_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shard-00000.safetensors");
        std::fs::write(&p, b"not a safetensors file").unwrap();
        let err = ShardData::read(&p).unwrap_err();
        assert!(err.to_string().contains("prepare` again"), "{err}");
    }
}
