//! The additive attention bias: causal, padding, packed documents and sliding window, exactly
//! where transformers allows or forbids attention.

use candle_core::{Device, Result, Tensor};

/// Value added to forbidden scores (transformers uses the dtype's minimum too: a fully masked
/// row then gets a uniform softmax instead of NaN).
pub const FORBIDDEN: f32 = f32::MIN;

/// How the tokens of a batch relate; all slices are `[b][t]`.
#[derive(Debug, Clone, Default)]
pub struct AttentionLayout<'a> {
    /// 1 for a real token, 0 for padding (keys that are padding are never attended).
    pub padding: Option<&'a [Vec<u8>]>,
    /// Document id per token in packed sequences: attention never crosses documents.
    pub documents: Option<&'a [Vec<u32>]>,
    /// A query attends keys at most `window - 1` positions back (itself included: `window`).
    pub sliding_window: Option<usize>,
}

impl AttentionLayout<'_> {
    /// Whether query `q` may attend key `k` in row `row`.
    pub fn allowed(&self, row: usize, q: usize, k: usize) -> bool {
        k <= q
            && self.padding.is_none_or(|p| p[row][k] != 0)
            && self.documents.is_none_or(|d| d[row][q] == d[row][k])
            && self.sliding_window.is_none_or(|w| q - k < w)
    }

    /// Bias `[b, 1, t, t]` (f32): 0 where allowed, [`FORBIDDEN`] elsewhere.
    pub fn bias(&self, b: usize, t: usize, device: &Device) -> Result<Tensor> {
        self.bias_for_queries(b, 0, t, t, device)
    }

    /// Bias `[b, 1, t_q, t_k]` for queries at sequence indices `q_start..q_start + t_q` over keys
    /// `0..t_k` (decoding with a cache: the new tokens against everything so far).
    pub fn bias_for_queries(
        &self,
        b: usize,
        q_start: usize,
        t_q: usize,
        t_k: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let mut v = Vec::with_capacity(b * t_q * t_k);
        for row in 0..b {
            for q in q_start..q_start + t_q {
                for k in 0..t_k {
                    v.push(if self.allowed(row, q, k) {
                        0.0
                    } else {
                        FORBIDDEN
                    });
                }
            }
        }
        Tensor::from_vec(v, (b, 1, t_q, t_k), device)
    }
}

/// Documents and positions of a packed row from per-document lengths: position ids restart at
/// 0 for each document.
pub fn packed_layout(doc_lengths: &[usize]) -> (Vec<u32>, Vec<u32>) {
    let mut docs = Vec::new();
    let mut positions = Vec::new();
    for (d, &len) in doc_lengths.iter().enumerate() {
        docs.extend(std::iter::repeat_n(d as u32, len));
        positions.extend(0..len as u32);
    }
    (docs, positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_counts_the_query_itself() {
        let l = AttentionLayout {
            sliding_window: Some(2),
            ..Default::default()
        };
        assert!(l.allowed(0, 3, 3) && l.allowed(0, 3, 2));
        assert!(!l.allowed(0, 3, 1) && !l.allowed(0, 2, 3));
    }

    #[test]
    fn packed_documents_do_not_see_each_other() {
        let (docs, pos) = packed_layout(&[2, 3]);
        assert_eq!(pos, [0, 1, 0, 1, 2]);
        let docs = [docs];
        let l = AttentionLayout {
            documents: Some(&docs),
            ..Default::default()
        };
        assert!(l.allowed(0, 1, 0) && l.allowed(0, 4, 2));
        assert!(!l.allowed(0, 2, 1));
    }
}
