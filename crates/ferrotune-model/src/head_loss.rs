//! The output head and its cross-entropy as one CPU op: only the rows that have a target are
//! projected to the vocabulary, a chunk of rows at a time, so the `[b·t, vocab]` logits (40 MB
//! for 8 × 40 tokens at Phi-3's 32k vocabulary, gigabytes at 4k tokens) never exist. When a
//! backward will follow, the forward also turns each chunk's logits into `softmax − onehot`
//! and projects that back to `d loss / d hidden` (`[n, h]`, kept until the backward), so the
//! head costs two vocabulary-sized GEMMs, as in PyTorch, instead of three (projecting the rows
//! again in the backward). The head's weight is frozen, as everywhere in ferrotune.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_rows::{f32_rows, row_nll, row_nll_and_grad_in_place};

/// Rows projected at once: bounds the transient logits to `CHUNK · vocab` floats.
const CHUNK: usize = 256;

/// Per-row token cross-entropy `[n]` of `hidden` `[n, h]` under the head `weight` `[v, h]` (0
/// for rows without a target).
pub(crate) struct HeadLoss {
    pub weight: Tensor,
    pub targets: Arc<[Option<u32>]>,
    /// Form `d loss_r / d hidden_r` in the forward, for the backward to scale.
    pub with_grad: bool,
    /// That gradient `[n·h]`, from the forward to the backward.
    pub grad: Mutex<Option<Vec<f32>>>,
}

impl HeadLoss {
    /// `(row, target)` of every trained row, in order.
    fn trained(&self) -> Vec<(usize, u32)> {
        self.targets
            .iter()
            .enumerate()
            .filter_map(|(r, t)| Some((r, (*t)?)))
            .collect()
    }

    /// Logits `[m, v]` (f32, CPU) of the given rows of `hidden` (row length `h`).
    fn logits(&self, hidden: &[f32], h: usize, rows: &[(usize, u32)]) -> Result<Vec<f32>> {
        let mut x = Vec::with_capacity(rows.len() * h);
        for &(r, _) in rows {
            x.extend_from_slice(&hidden[r * h..(r + 1) * h]);
        }
        Tensor::from_vec(x, (rows.len(), h), &Device::Cpu)?
            .matmul(&self.weight.t()?)?
            .flatten_all()?
            .to_vec1::<f32>()
    }

    /// `p · weight` for `p` `[m, v]`: the rows' gradient w.r.t. their hidden state, `[m, h]`.
    fn project_back(&self, p: Vec<f32>, m: usize) -> Result<Vec<f32>> {
        let v = self.weight.dim(0)?;
        Tensor::from_vec(p, (m, v), &Device::Cpu)?
            .matmul(&self.weight)?
            .flatten_all()?
            .to_vec1::<f32>()
    }

    /// Losses of every row and, with `with_grad`, the gradient of each row's loss w.r.t. its
    /// hidden state (unscaled), chunk by chunk.
    fn losses_and_grad(&self, hidden: &[f32], h: usize) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let n = hidden.len() / h;
        let v = self.weight.dim(0)?;
        let mut out = vec![0f32; n];
        let mut grad = self.with_grad.then(|| vec![0f32; n * h]);
        for rows in self.trained().chunks(CHUNK) {
            let mut logits = self.logits(hidden, h, rows)?;
            let losses: Vec<f32> = match grad {
                None => logits
                    .par_chunks(v)
                    .zip(rows.par_iter())
                    .map(|(row, &(_, t))| row_nll(row, t))
                    .collect(),
                Some(_) => logits
                    .par_chunks_mut(v)
                    .zip(rows.par_iter())
                    .map(|(row, &(_, t))| row_nll_and_grad_in_place(row, t))
                    .collect(),
            };
            for (&(r, _), l) in rows.iter().zip(losses) {
                out[r] = l;
            }
            if let Some(grad) = grad.as_mut() {
                let d = self.project_back(logits, rows.len())?;
                for (i, &(r, _)) in rows.iter().enumerate() {
                    grad[r * h..(r + 1) * h].copy_from_slice(&d[i * h..(i + 1) * h]);
                }
            }
        }
        Ok((out, grad))
    }
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (hidden, h) = f32_rows(storage, layout, self.name())?;
        let (losses, grad) = self.losses_and_grad(hidden, h)?;
        let n = losses.len();
        *self.grad.lock().expect("head gradient lock") = grad;
        Ok((CpuStorage::F32(losses), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, h) = arg.dims2()?;
        let g = grad_res.to_vec1::<f32>()?;
        // Formed by the forward; a second backward of the same graph forms it again.
        let kept = self.grad.lock().expect("head gradient lock").take();
        let mut dh = match kept {
            Some(d) => d,
            None => {
                let hidden = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let with_grad = HeadLoss {
                    weight: self.weight.clone(),
                    targets: self.targets.clone(),
                    with_grad: true,
                    grad: Mutex::new(None),
                };
                with_grad.losses_and_grad(&hidden, h)?.1.unwrap_or_default()
            }
        };
        dh.par_chunks_mut(h)
            .zip(g.par_iter())
            .for_each(|(row, &g)| row.iter_mut().for_each(|x| *x *= g));
        Ok(Some(Tensor::from_vec(dh, (n, h), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_rows::check::max_abs_diff;
    use crate::loss::causal_lm_loss_sum;
    use candle_core::Var;

    #[test]
    fn fused_head_loss_equals_logits_then_loss_in_value_and_hidden_gradient() {
        let (b, t, h, v) = (2, 7, 16, 300);
        let hidden =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h), &Device::Cpu).unwrap()).unwrap();
        let weight = Tensor::randn(0f32, 0.5, (v, h), &Device::Cpu).unwrap();
        let labels = vec![
            vec![-100, -100, 5, 299, 0, -100, 17],
            vec![-100, 3, -100, -100, 250, 251, -100],
        ];
        let logits = hidden
            .as_tensor()
            .broadcast_matmul(&weight.t().unwrap())
            .unwrap();
        let want = causal_lm_loss_sum(&logits, &labels).unwrap();
        let got = crate::loss::head_loss_sum(hidden.as_tensor(), &weight, &labels).unwrap();
        assert_eq!(got.tokens, want.tokens);
        let (a, c) = (
            got.sum.to_scalar::<f32>().unwrap(),
            want.sum.to_scalar::<f32>().unwrap(),
        );
        assert!((a - c).abs() <= 1e-5 * c.abs(), "{a} vs {c}");
        let ga = got.sum.affine(0.3, 0.0).unwrap().backward().unwrap();
        let gc = want.sum.affine(0.3, 0.0).unwrap().backward().unwrap();
        let (ga, gc) = (
            ga.get(hidden.as_tensor()).unwrap(),
            gc.get(hidden.as_tensor()).unwrap(),
        );
        let diff = max_abs_diff(ga, gc);
        assert!(diff <= 1e-5, "hidden gradient differs by {diff}");
        // The gradient kept from the forward is used once; a second backward forms it again.
        let again = got.sum.affine(0.3, 0.0).unwrap().backward().unwrap();
        let again = again.get(hidden.as_tensor()).unwrap();
        let diff = max_abs_diff(again, ga);
        assert_eq!(diff, 0.0, "second backward differs by {diff}");
        // Without a graph the loss is the same and no gradient is formed.
        let detached = crate::loss::head_loss_sum(&hidden.as_tensor().detach(), &weight, &labels)
            .unwrap()
            .sum
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(detached, a);
    }
}
