//! Packing several conversations into one training sequence of at most `max_len` tokens.
//!
//! Greedy and order-preserving: a conversation goes into the open sequence if it fits, else the
//! sequence is closed and a new one starts. Order-preserving keeps the run reproducible and the
//! `--split-pc` prefix meaningful; the boundaries are recorded per document (see `shard`), so
//! position ids restart and attention never crosses a conversation.

use crate::shard::Document;

pub struct Packer {
    max_len: usize,
    open: Vec<Document>,
    open_len: usize,
}

impl Packer {
    /// `max_len` in tokens; every document pushed must already be at most that long.
    pub fn new(max_len: usize) -> Packer {
        Packer {
            max_len,
            open: Vec::new(),
            open_len: 0,
        }
    }

    /// Add a document; returns the sequence it closed, if any.
    pub fn push(&mut self, doc: Document) -> Option<Vec<Document>> {
        debug_assert!(
            doc.ids.len() <= self.max_len,
            "documents are truncated first"
        );
        let closed = if self.open_len + doc.ids.len() > self.max_len && !self.open.is_empty() {
            self.open_len = 0;
            Some(std::mem::take(&mut self.open))
        } else {
            None
        };
        self.open_len += doc.ids.len();
        self.open.push(doc);
        closed
    }

    /// The last, partly filled sequence.
    pub fn finish(self) -> Option<Vec<Document>> {
        (!self.open.is_empty()).then_some(self.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(row: u64, len: usize) -> Document {
        Document {
            row,
            ids: vec![7; len],
            trainable: vec![true; len],
        }
    }

    fn rows(seq: &[Document]) -> Vec<u64> {
        seq.iter().map(|d| d.row).collect()
    }

    #[test]
    fn fills_sequences_in_order_without_exceeding_max_len() {
        let mut p = Packer::new(10);
        let mut out = Vec::new();
        for (row, len) in [(0, 4), (1, 6), (2, 3), (3, 8), (4, 2), (5, 10)] {
            out.extend(p.push(doc(row, len)));
        }
        out.extend(p.finish());
        let seqs: Vec<_> = out.iter().map(|s| rows(s)).collect();
        assert_eq!(seqs, vec![vec![0, 1], vec![2], vec![3, 4], vec![5]]);
        for s in &out {
            assert!(s.iter().map(|d| d.ids.len()).sum::<usize>() <= 10);
        }
    }
}
