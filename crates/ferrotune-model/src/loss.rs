//! Causal-LM loss as transformers computes it: logits at position i predict the label at i+1,
//! labels of -100 are ignored, and the loss is the mean over the trained tokens, in f32.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu_rows::{f32_rows, row_nll, row_nll_grad_in_place};

/// Sum of token cross-entropies and the number of trained tokens, so callers can average over
/// several micro-batches exactly (`sum / count`, not a mean of means).
pub struct LossSum {
    /// Scalar f32 tensor (differentiable).
    pub sum: Tensor,
    pub tokens: usize,
}

/// `logits` `[b, t, vocab]`, `labels` `[b][t]` (-100 = not trained).
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &[Vec<i64>]) -> Result<LossSum> {
    if logits.device().is_cpu() {
        return fused_loss_sum(logits, labels);
    }
    composed_loss_sum(logits, labels)
}

/// Loss of `hidden` `[b, t, h]` (after the final norm) under the frozen output head `weight`
/// `[vocab, h]`: on the CPU in f32 one fused op that never holds the full logits (see
/// `head_loss`); on CUDA with ferrotune's kernels one node over the logits in the model dtype
/// and the cross-entropy kernels (see `device_head_loss`); elsewhere the head's matmul and
/// [`causal_lm_loss_sum`].
pub fn head_loss_sum(hidden: &Tensor, weight: &Tensor, labels: &[Vec<i64>]) -> Result<LossSum> {
    let (b, t, h) = hidden.dims3()?;
    let v = weight.dim(0)?;
    if hidden.device().is_cuda() && ferrotune_kernels::enabled() {
        let targets = shifted_targets(labels, b, t, v)?;
        let tokens = targets.iter().filter(|x| x.is_some()).count();
        let flat = hidden.reshape((b * t, h))?.contiguous()?;
        return Ok(LossSum {
            sum: crate::device_head_loss::device_head_loss(&flat, weight, &targets)?,
            tokens,
        });
    }
    if hidden.device().is_cpu() && hidden.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        let targets = shifted_targets(labels, b, t, v)?;
        let tokens = targets.iter().filter(|x| x.is_some()).count();
        let per_row =
            hidden
                .reshape((b * t, h))?
                .contiguous()?
                .apply_op1(crate::head_loss::HeadLoss {
                    weight: weight.clone(),
                    targets: targets.into(),
                    with_grad: hidden.track_op(),
                    grad: std::sync::Mutex::new(None),
                })?;
        return Ok(LossSum {
            sum: per_row.sum_all()?,
            tokens,
        });
    }
    let logits = crate::frozen_linear::FrozenMatmul::new(weight.clone()).forward(hidden)?;
    causal_lm_loss_sum(&logits, labels)
}

/// Shifted targets per row of the flattened `[b·t]` logits: row `r·t + i` predicts
/// `labels[r][i + 1]`; the last position of each row and -100 labels are ignored (`None`).
fn shifted_targets(labels: &[Vec<i64>], b: usize, t: usize, v: usize) -> Result<Vec<Option<u32>>> {
    let mut targets = vec![None; b * t];
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
                targets[r * t + i] = Some(label as u32);
            }
        }
    }
    Ok(targets)
}

/// One pass per row forward (log-sum-exp and the target's log-probability) and one backward
/// (softmax minus one-hot), rows in parallel: the 32k-vocabulary head's loss without a dozen
/// full-size intermediates.
fn fused_loss_sum(logits: &Tensor, labels: &[Vec<i64>]) -> Result<LossSum> {
    let (b, t, v) = logits.dims3()?;
    let targets = shifted_targets(labels, b, t, v)?;
    let tokens = targets.iter().filter(|x| x.is_some()).count();
    let flat = logits
        .to_dtype(DType::F32)?
        .reshape((b * t, v))?
        .contiguous()?;
    let per_row = flat.apply_op1(CrossEntropyRows {
        targets: targets.into(),
    })?;
    Ok(LossSum {
        sum: per_row.sum_all()?,
        tokens,
    })
}

/// Per-row token cross-entropy `[n]` of logits `[n, v]` (0 for ignored rows).
struct CrossEntropyRows {
    targets: std::sync::Arc<[Option<u32>]>,
}

impl CustomOp1 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (data, v) = f32_rows(storage, layout, self.name())?;
        let n = data.len() / v;
        let out: Vec<f32> = data
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, target)| target.map_or(0.0, |t| row_nll(row, t)))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &CrossEntropyRowsGrad {
                targets: self.targets.clone(),
            },
        )?;
        Ok(Some(grad))
    }
}

/// `d loss_i / d logits_i = g_i · (softmax(logits_i) − onehot(target_i))`, 0 for ignored rows.
struct CrossEntropyRowsGrad {
    targets: std::sync::Arc<[Option<u32>]>,
}

impl CustomOp2 for CrossEntropyRowsGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-rows-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (data, v) = f32_rows(s1, l1, self.name())?;
        let n = data.len() / v;
        let CpuStorage::F32(g) = s2 else {
            candle_core::bail!("cross-entropy grad: expected f32 gradient");
        };
        let g = &g[l2.start_offset()..l2.start_offset() + n];
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v)
            .zip(data.par_chunks(v))
            .zip(self.targets.par_iter().zip(g.par_iter()))
            .for_each(|((dst, row), (target, &gi))| {
                if let Some(t) = target {
                    dst.copy_from_slice(row);
                    row_nll_grad_in_place(dst, *t, gi);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, v))))
    }
}

/// The same loss from candle ops (any device).
fn composed_loss_sum(logits: &Tensor, labels: &[Vec<i64>]) -> Result<LossSum> {
    let (b, t, v) = logits.dims3()?;
    let (rows, targets): (Vec<u32>, Vec<u32>) = shifted_targets(labels, b, t, v)?
        .into_iter()
        .enumerate()
        .filter_map(|(row, target)| Some((row as u32, target?)))
        .unzip();
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_cpu_loss_matches_the_composed_graph_in_value_and_gradient() {
        let logits =
            Var::from_tensor(&Tensor::randn(0f32, 3.0, (2, 5, 11), &Device::Cpu).unwrap()).unwrap();
        let labels = vec![vec![-100, 3, 7, -100, 10], vec![0, -100, 1, 2, -100]];
        let fused = fused_loss_sum(logits.as_tensor(), &labels).unwrap();
        let composed = composed_loss_sum(logits.as_tensor(), &labels).unwrap();
        assert_eq!(fused.tokens, 5); // shifted: row 0 predicts 3, 7, 10; row 1 predicts 1, 2
        assert_eq!(fused.tokens, composed.tokens);
        let (a, b) = (
            fused.sum.to_scalar::<f32>().unwrap(),
            composed.sum.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
        let ga = fused
            .sum
            .backward()
            .unwrap()
            .get(logits.as_tensor())
            .unwrap()
            .clone();
        let gb = composed
            .sum
            .backward()
            .unwrap()
            .get(logits.as_tensor())
            .unwrap()
            .clone();
        let diff = crate::cpu_rows::check::max_abs_diff(&ga, &gb);
        assert!(diff <= 1e-6, "gradient differs by {diff}");
    }
}
