//! Evaluation on held-out sequences: token-weighted mean cross-entropy over the trained
//! (assistant) tokens, its perplexity, and next-token accuracy on the same tokens.

use candle_core::D;
use ferrotune_data::TrainingSequence;
use ferrotune_model::loss::causal_lm_loss_sum;
use ferrotune_model::Phi3;
use serde::{Deserialize, Serialize};

use crate::batches::{collate, IGNORE};
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy per trained token (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// Share of trained tokens whose arg-max prediction is right.
    pub accuracy: f64,
    pub tokens: usize,
    pub sequences: usize,
}

/// Evaluate `model` (dropout off) on `seqs` in batches of `batch_size`, in order.
pub fn evaluate(
    model: &Phi3,
    seqs: &[TrainingSequence],
    batch_size: usize,
    pad_id: u32,
) -> Result<EvalMetrics> {
    let sums = eval_sums(model, seqs, batch_size, pad_id)?;
    Ok(sums.metrics(seqs.len()))
}

/// What evaluation adds up, so that ranks evaluating shards can sum their parts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalSums {
    pub nll: f64,
    pub tokens: usize,
    pub correct: usize,
}

impl EvalSums {
    pub fn metrics(&self, sequences: usize) -> EvalMetrics {
        let loss = if self.tokens == 0 {
            f64::NAN
        } else {
            self.nll / self.tokens as f64
        };
        EvalMetrics {
            loss,
            perplexity: loss.exp(),
            accuracy: if self.tokens == 0 {
                0.0
            } else {
                self.correct as f64 / self.tokens as f64
            },
            tokens: self.tokens,
            sequences,
        }
    }
}

/// Summed negative log-likelihood, trained tokens and right guesses over `seqs`.
pub fn eval_sums(
    model: &Phi3,
    seqs: &[TrainingSequence],
    batch_size: usize,
    pad_id: u32,
) -> Result<EvalSums> {
    let (mut nll, mut tokens, mut correct) = (0f64, 0usize, 0usize);
    for chunk in seqs.chunks(batch_size.max(1)) {
        let refs: Vec<&TrainingSequence> = chunk.iter().collect();
        let mb = collate(&refs, pad_id, model.config().sliding_window, model.device())?;
        let logits = model.logits(&mb.batch, false)?;
        let sum = causal_lm_loss_sum(&logits, &mb.labels)?;
        nll += f64::from(sum.sum.to_scalar::<f32>()?);
        tokens += sum.tokens;
        let predicted = logits.argmax(D::Minus1)?.to_vec2::<u32>()?;
        for (row, labels) in predicted.iter().zip(&mb.labels) {
            for (p, &l) in row.iter().zip(labels.iter().skip(1)) {
                if l != IGNORE && i64::from(*p) == l {
                    correct += 1;
                }
            }
        }
    }
    Ok(EvalSums {
        nll,
        tokens,
        correct,
    })
}
