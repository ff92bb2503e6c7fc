//! Causal-LM loss as transformers computes it: logits at position i predict the label at i+1,
//! labels of -100 are ignored, and the loss is the mean over the trained tokens, in f32.

use candle_core::{DType, Result, Tensor, D};

/// Sum of token cross-entropies and the number of trained tokens, so callers can average over
/// several micro-batches exactly (`sum / count`, not a mean of means).
pub struct LossSum {
    /// Scalar f32 tensor (differentiable).
    pub sum: Tensor,
    pub tokens: usize,
}

/// `logits` `[b, t, vocab]`, `labels` `[b][t]` (-100 = not trained).
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &[Vec<i64>]) -> Result<LossSum> {
    let (b, t, v) = logits.dims3()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (r, row) in labels.iter().enumerate().take(b) {
        for i in 0..t.saturating_sub(1) {
            let label = row[i + 1];
            if label != -100 {
                if label < 0 || label as usize >= v {
                    candle_core::bail!(
                        "label {label} at [{r}, {}] is outside the vocabulary of {v}",
                        i + 1
                    );
                }
                rows.push((r * t + i) as u32);
                targets.push(label as u32);
            }
        }
    }
    let device = logits.device();
    if rows.is_empty() {
        return Ok(LossSum {
            sum: Tensor::zeros((), DType::F32, device)?,
            tokens: 0,
        });
    }
    let n = rows.len();
    let idx = Tensor::from_vec(rows, n, device)?;
    let picked = logits
        .to_dtype(DType::F32)?
        .reshape((b * t, v))?
        .index_select(&idx, 0)?;
    let max = picked.max_keepdim(D::Minus1)?.detach();
    let shifted = picked.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let target = Tensor::from_vec(targets, (n, 1), device)?;
    let target_logit = shifted.gather(&target, 1)?;
    let nll = (log_z - target_logit)?;
    Ok(LossSum {
        sum: nll.sum_all()?,
        tokens: n,
    })
}

/// Mean token cross-entropy (the `loss` transformers reports).
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<Tensor> {
    let s = causal_lm_loss_sum(logits, labels)?;
    s.sum.affine(1.0 / s.tokens.max(1) as f64, 0.0)
}
