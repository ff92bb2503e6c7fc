//! The output head and its cross-entropy as one CPU op: only the rows that have a target are
//! projected to the vocabulary, a chunk of rows at a time, so the `[b·t, vocab]` logits (40 MB
//! for 8 × 40 tokens at Phi-3's 32k vocabulary, gigabytes at 4k tokens) never exist, and the
//! backward re-projects the same rows and returns only `d loss / d hidden`. The head's weight is
//! frozen, as everywhere in ferrotune.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_rows::{f32_rows, row_nll, row_nll_grad_in_place};

/// Rows projected at once: bounds the transient logits to `CHUNK · vocab` floats.
const CHUNK: usize = 256;

/// Per-row token cross-entropy `[n]` of `hidden` `[n, h]` under the head `weight` `[v, h]` (0
/// for rows without a target).
pub(crate) struct HeadLoss {
    pub weight: Tensor,
    pub targets: Arc<[Option<u32>]>,
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
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (hidden, h) = f32_rows(storage, layout, self.name())?;
        let n = hidden.len() / h;
        let v = self.weight.dim(0)?;
        let mut out = vec![0f32; n];
        for rows in self.trained().chunks(CHUNK) {
            let logits = self.logits(hidden, h, rows)?;
            let losses: Vec<f32> = logits
                .par_chunks(v)
                .zip(rows.par_iter())
                .map(|(row, &(_, t))| row_nll(row, t))
                .collect();
            for (&(r, _), l) in rows.iter().zip(losses) {
                out[r] = l;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (n, h) = arg.dims2()?;
        let v = self.weight.dim(0)?;
        let hidden = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.to_vec1::<f32>()?;
        let mut dh = vec![0f32; n * h];
        for rows in self.trained().chunks(CHUNK) {
            // softmax − one-hot, scaled by the incoming gradient of each row's loss.
            let mut p = self.logits(&hidden, h, rows)?;
            p.par_chunks_mut(v)
                .zip(rows.par_iter())
                .for_each(|(row, &(r, t))| row_nll_grad_in_place(row, t, g[r]));
            let d = Tensor::from_vec(p, (rows.len(), v), &Device::Cpu)?
                .matmul(&self.weight)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (i, &(r, _)) in rows.iter().enumerate() {
                dh[r * h..(r + 1) * h].copy_from_slice(&d[i * h..(i + 1) * h]);
            }
        }
        Ok(Some(Tensor::from_vec(dh, (n, h), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let diff = (ga - gc)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5, "hidden gradient differs by {diff}");
    }
}
