//! Data order and micro-batches: a seeded permutation per epoch, micro-batches of
//! `per_device_train_batch_size` sequences right-padded to the longest, and accumulation
//! windows of `gradient_accumulation_steps` micro-batches (the last window of an epoch may be
//! shorter, as in transformers' Trainer).

use candle_core::{Device, Tensor};
use ferrotune_data::TrainingSequence;
use ferrotune_model::mask::{packed_layout, AttentionLayout};
use ferrotune_model::rng::{derive, SplitMix};
use ferrotune_model::Batch;

use crate::error::Result;

/// Label of a token that is not trained (the Hugging Face convention).
pub const IGNORE: i64 = -100;

/// Sequence indices of epoch `epoch`: a seeded Fisher-Yates shuffle, or stored order.
pub fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = SplitMix(derive(seed, epoch));
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// How micro-batches and optimizer steps fall in an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochShape {
    pub sequences: usize,
    pub batch_size: usize,
    pub accumulation: usize,
}

impl EpochShape {
    pub fn micro_batches(&self) -> usize {
        self.sequences.div_ceil(self.batch_size)
    }

    /// Optimizer steps per epoch (a short last window still makes a step).
    pub fn steps(&self) -> usize {
        self.micro_batches().div_ceil(self.accumulation).max(1)
    }

    /// Sequence indices of each micro-batch in accumulation window `window` of an epoch whose
    /// order is `order`.
    pub fn window<'a>(&self, order: &'a [usize], window: usize) -> Vec<&'a [usize]> {
        let first = window * self.accumulation;
        let last = (first + self.accumulation).min(self.micro_batches());
        (first..last)
            .map(|m| {
                let start = m * self.batch_size;
                &order[start..(start + self.batch_size).min(order.len())]
            })
            .collect()
    }
}

/// One micro-batch on the device plus its labels.
pub struct MicroBatch {
    pub batch: Batch,
    /// `[b][t]`, [`IGNORE`] on prompts and padding.
    pub labels: Vec<Vec<i64>>,
    /// Tokens that are loss targets (labels after the shift that are trained).
    pub target_tokens: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
}

/// Labels of a sequence: its ids where trained, [`IGNORE`] elsewhere.
pub fn labels_of(seq: &TrainingSequence) -> Vec<i64> {
    seq.ids
        .iter()
        .zip(&seq.trainable)
        .map(|(&id, &t)| if t { i64::from(id) } else { IGNORE })
        .collect()
}

/// Right-pad `seqs` into one batch `[b, t]`: pads get id `pad_id`, label [`IGNORE`], and are
/// never attended; packed sequences attend within their own documents only.
pub fn collate(
    seqs: &[&TrainingSequence],
    pad_id: u32,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<MicroBatch> {
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let packed = seqs.iter().any(|s| s.doc_lengths.len() > 1);
    let mut ids = Vec::with_capacity(b * t);
    let (mut padding, mut documents, mut positions, mut labels) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut target_tokens, mut tokens) = (0, 0);
    for s in seqs {
        let n = s.ids.len();
        let pad = t - n;
        ids.extend_from_slice(&s.ids);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        let mut row_labels = labels_of(s);
        row_labels.extend(std::iter::repeat_n(IGNORE, pad));
        target_tokens += row_labels.iter().skip(1).filter(|&&l| l != IGNORE).count();
        tokens += n;
        labels.push(row_labels);
        let mut mask = vec![1u8; n];
        mask.extend(std::iter::repeat_n(0u8, pad));
        padding.push(mask);
        let (mut docs, mut pos) = packed_layout(&s.doc_lengths);
        // Padding continues the last document's positions, as an arange would.
        let next = pos.last().map_or(0, |p| p + 1);
        pos.extend(next..next + pad as u32);
        docs.extend(std::iter::repeat_n(u32::MAX, pad));
        documents.push(docs);
        positions.push(pos);
    }
    let layout = AttentionLayout {
        padding: Some(&padding),
        documents: packed.then_some(&documents[..]),
        sliding_window,
    };
    Ok(MicroBatch {
        batch: Batch {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            positions,
            attention_bias: layout.bias(b, t, device)?,
        },
        labels,
        target_tokens,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(ids: &[u32], trained_from: usize) -> TrainingSequence {
        TrainingSequence {
            ids: ids.to_vec(),
            trainable: (0..ids.len()).map(|i| i >= trained_from).collect(),
            doc_lengths: vec![ids.len()],
        }
    }

    #[test]
    fn order_is_a_seeded_permutation_that_changes_per_epoch() {
        let a = epoch_order(50, true, 3, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, true, 3, 0));
        assert_ne!(a, epoch_order(50, true, 3, 1));
        assert_ne!(a, epoch_order(50, true, 4, 0));
        assert_eq!(epoch_order(5, false, 3, 0), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn windows_cover_every_sequence_once_with_a_short_last_window() {
        let shape = EpochShape {
            sequences: 11,
            batch_size: 2,
            accumulation: 4,
        };
        assert_eq!(shape.micro_batches(), 6);
        assert_eq!(shape.steps(), 2);
        let order: Vec<usize> = (0..11).collect();
        let w0 = shape.window(&order, 0);
        let w1 = shape.window(&order, 1);
        assert_eq!(w0.len(), 4);
        assert_eq!(w1, vec![&[8usize, 9][..], &[10][..]]);
    }

    #[test]
    fn collate_pads_right_and_counts_shifted_targets() {
        let (a, b) = (seq(&[5, 6, 7, 8], 2), seq(&[9, 10], 1));
        let mb = collate(&[&a, &b], 0, None, &Device::Cpu).unwrap();
        assert_eq!(mb.batch.input_ids.dims(), [2, 4]);
        assert_eq!(mb.labels[1], [IGNORE, 10, IGNORE, IGNORE]);
        assert_eq!(mb.target_tokens, 3);
        assert_eq!(mb.tokens, 6);
        assert_eq!(mb.batch.positions[1], [0, 1, 2, 3]);
    }
}
