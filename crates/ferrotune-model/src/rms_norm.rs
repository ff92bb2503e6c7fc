//! RMSNorm as transformers computes it (`x · rsqrt(mean(x²) + eps)` in f32, then `· weight`),
//! with a fused CPU forward and backward (rows in parallel) for f32, ferrotune-kernels' CUDA kernel
//! on the GPU, and candle ops elsewhere.
//! The weight is frozen: only the input gradient is produced.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu_rows::f32_rows;

/// `[..., h]` normalised over the last dimension and scaled by `weight` `[h]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(RmsNorm {
            weight: weight.contiguous()?,
            eps: eps as f32,
        });
    }
    if x.device().is_cuda() && ferrotune_kernels::enabled() && weight.dtype() == x.dtype() {
        return ferrotune_kernels::rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xf.broadcast_mul(&inv)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// A residual join and the norm after it: `(x + y, rms_norm(x + y))`. One kernel on CUDA where
/// nothing is recorded for a backward (inference, evaluation); two ops elsewhere.
pub fn add_then_norm(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let untracked = !(x.track_op() || y.track_op());
    if untracked
        && x.device().is_cuda()
        && ferrotune_kernels::enabled()
        && weight.dtype() == x.dtype()
        && y.dtype() == x.dtype()
    {
        return ferrotune_kernels::add_rms_norm(x, y, weight, eps);
    }
    let sum = (x + y)?;
    let normed = rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

fn weight_slice(w: &Tensor) -> Result<Vec<f32>> {
    w.flatten_all()?.to_vec1::<f32>()
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, h) = f32_rows(s, l, self.name())?;
        let w = weight_slice(&self.weight)?;
        if w.len() != h {
            candle_core::bail!("rms-norm: weight has {} values for rows of {h}", w.len());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(y, x)| {
                let r = inv_rms(x, self.eps);
                for ((y, x), w) in y.iter_mut().zip(x).zip(&w) {
                    *y = x * r * w;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rms_norm_grad_cpu(
            arg,
            &self.weight,
            self.eps as f64,
            grad_res,
        )?))
    }
}

/// The gradient of [`rms_norm`]'s input given `g`, the gradient of its output, for f32 on the
/// CPU (the fused op's backward). Records no backward.
pub(crate) fn rms_norm_grad_cpu(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    g: &Tensor,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        &g.contiguous()?,
        &RmsNormGrad {
            weight: weight.contiguous()?,
            eps: eps as f32,
        },
    )
}

/// `dx = r·(g⊙w) − x·r³·Σ(g⊙w⊙x)/h` per row, `r = rsqrt(mean(x²) + eps)`.
struct RmsNormGrad {
    weight: Tensor,
    eps: f32,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, h) = f32_rows(s1, l1, self.name())?;
        let (g, _) = f32_rows(s2, l2, self.name())?;
        let w = weight_slice(&self.weight)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h).zip(g.par_chunks(h)))
            .for_each(|(dx, (x, g))| {
                let r = inv_rms(x, self.eps);
                let dot: f32 = x.iter().zip(g).zip(&w).map(|((x, g), w)| g * w * x).sum();
                let c = r * r * r * dot / h as f32;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(&w) {
                    *dx = r * g * w - x * c;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_rms_norm_matches_the_composed_one_forward_and_backward() {
        let w = (Tensor::randn(0f32, 0.1, 16, &Device::Cpu).unwrap() + 1.0).unwrap();
        let composed = |x: &Tensor| {
            let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
                .sqrt()?
                .recip()?;
            x.broadcast_mul(&inv)?.broadcast_mul(&w)
        };
        let fused = |x: &Tensor| rms_norm(x, &w, 1e-5);
        crate::cpu_rows::check::fused_matches_composed(&[2, 3, 16], fused, composed, 1e-6, 1e-5);
    }
}
