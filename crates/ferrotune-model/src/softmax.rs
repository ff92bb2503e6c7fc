//! Softmax over the last dimension with a backward, fused on CPU (rows in parallel, one pass
//! forward, one backward) and composed from candle ops elsewhere. candle's own
//! `softmax_last_dim` records no backward, so it cannot be used in training.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu_rows::f32_rows;

/// Softmax over the last dimension (f32 in, f32 out on CPU; any dtype elsewhere).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op1(SoftmaxLastDim);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `softmax(scale · scores + bias)` over the last dimension, for attention: scores
/// `[b, h, q, k]` (f32), bias `[b, 1, q, k]` (f32, broadcast over heads, a constant). One pass
/// forward and one backward on CPU instead of five ops and their backwards.
pub fn scaled_masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == candle_core::DType::F32 {
        let (b, h, q, k) = scores.dims4()?;
        if bias.dims() == [b, 1, q, k] && bias.dtype() == candle_core::DType::F32 {
            return scores.contiguous()?.apply_op1(ScaledMaskedSoftmax {
                bias: bias.contiguous()?,
                scale: scale as f32,
                heads: h,
            });
        }
    }
    softmax_last_dim(&scores.affine(scale, 0.0)?.broadcast_add(bias)?)
}

/// Attention probabilities in the scores' dtype: `softmax(scale · scores + bias)` computed in f32
/// (as transformers' eager attention does). On CUDA one fused kernel each way
/// (`ferrotune_kernels::attention_softmax`, unless `FERROTUNE_KERNELS=0`); elsewhere the scores
/// go through [`scaled_masked_softmax`] in f32.
pub fn attention_probs(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if scores.device().is_cuda() && ferrotune_kernels::enabled() {
        return ferrotune_kernels::attention_softmax(scores, bias, scale);
    }
    let dtype = scores.dtype();
    scaled_masked_softmax(&scores.to_dtype(candle_core::DType::F32)?, bias, scale)?.to_dtype(dtype)
}

struct ScaledMaskedSoftmax {
    bias: Tensor,
    scale: f32,
    heads: usize,
}

impl CustomOp1 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, k) = f32_rows(s, l, self.name())?;
        let (_, _, q, _) = l.shape().dims4()?;
        let bias = self.bias.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k)
            .zip(x.par_chunks(k))
            .enumerate()
            .for_each(|(row, (y, x))| {
                // row = ((bi · heads) + head) · q + qi; the bias row is (bi · q + qi).
                let (bi, qi) = (row / (self.heads * q), row % q);
                let bias = &bias[(bi * q + qi) * k..(bi * q + qi + 1) * k];
                let mut max = f32::NEG_INFINITY;
                for ((y, x), b) in y.iter_mut().zip(x).zip(bias) {
                    *y = x * self.scale + b;
                    max = max.max(*y);
                }
                let mut sum = 0f32;
                for y in y.iter_mut() {
                    *y = (*y - max).exp();
                    sum += *y;
                }
                let inv = 1.0 / sum;
                y.iter_mut().for_each(|y| *y *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = SoftmaxGrad { scale: self.scale };
        Ok(Some(res.apply_op2_no_bwd(&grad_res.contiguous()?, &grad)?))
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, d) = f32_rows(s, l, self.name())?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(y, x)| {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (y, x) in y.iter_mut().zip(x) {
                    *y = (x - max).exp();
                    sum += *y;
                }
                let inv = 1.0 / sum;
                y.iter_mut().for_each(|y| *y *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &SoftmaxGrad { scale: 1.0 },
        )?))
    }
}

/// `dx = (y ⊙ (g − Σ g⊙y)) · scale` per row: the softmax backward, and with `scale` the
/// backward of the scores' scaling in the same pass (rounded as the product followed by
/// `affine(scale, 0)`; with 1 exactly the plain softmax backward).
pub(crate) struct SoftmaxGrad {
    pub scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, d) = f32_rows(s1, l1, self.name())?;
        let (g, _) = f32_rows(s2, l2, self.name())?;
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = (y * (g - dot)) * self.scale;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_scaled_masked_softmax_matches_the_composed_ops() {
        use candle_core::Device;
        let mut bias = Tensor::randn(0f32, 1.0, (2, 1, 4, 4), &Device::Cpu).unwrap();
        // Forbid a few positions as the attention mask does.
        let forbid = Tensor::from_vec(
            (0..32)
                .map(|i| if i % 5 == 3 { f32::MIN } else { 0.0 })
                .collect::<Vec<_>>(),
            (2, 1, 4, 4),
            &Device::Cpu,
        )
        .unwrap();
        bias = (bias + forbid).unwrap();
        let fused = |x: &Tensor| scaled_masked_softmax(x, &bias, 0.25);
        let composed = |x: &Tensor| softmax_last_dim(&x.affine(0.25, 0.0)?.broadcast_add(&bias)?);
        crate::cpu_rows::check::fused_matches_composed(&[2, 3, 4, 4], fused, composed, 1e-6, 1e-6);
    }

    #[test]
    fn fused_softmax_matches_the_composed_one_forward_and_backward() {
        let composed = |x: &Tensor| {
            let max = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&max)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        };
        crate::cpu_rows::check::fused_matches_composed(
            &[3, 4, 9],
            softmax_last_dim,
            composed,
            1e-6,
            1e-6,
        );
    }
}
