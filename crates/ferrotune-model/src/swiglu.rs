//! Phi-3's MLP activation on the fused `gate_up_proj` output: `up · silu(gate)` where
//! `[gate | up] = gate_up` along the last dimension. Fused on CPU for f32 (one pass forward,
//! one backward writing the gradient of `gate_up` directly), a CUDA kernel on the GPU
//! (ferrotune-kernels), candle ops elsewhere.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::cpu_rows::f32_rows;

/// `[..., 2i]` → `[..., i]`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    if gate_up.device().is_cpu() && gate_up.dtype() == DType::F32 {
        return gate_up.contiguous()?.apply_op1(SwiGlu);
    }
    if gate_up.device().is_cuda() && ferrotune_kernels::enabled() {
        return ferrotune_kernels::swiglu(gate_up);
    }
    let i = gate_up.dim(D::Minus1)? / 2;
    let gate = gate_up.narrow(D::Minus1, 0, i)?;
    let up = gate_up.narrow(D::Minus1, i, i)?;
    let sigmoid = (gate.neg()?.exp()? + 1.0)?.recip()?;
    up * (gate * sigmoid)?
}

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = f32_rows(s, l, self.name())?;
        let i = w / 2;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(i)
            .zip(x.par_chunks(w))
            .for_each(|(y, row)| {
                let (gate, up) = row.split_at(i);
                for ((y, g), u) in y.iter_mut().zip(gate).zip(up) {
                    *y = u * g * sigmoid(*g);
                }
            });
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("non-empty") = i;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(swiglu_grad_cpu(arg, grad_res)?))
    }
}

/// The gradient of `gate_up` given `g`, the gradient of [`swiglu`]'s output, for f32 on the
/// CPU (the fused op's backward). Records no backward.
pub(crate) fn swiglu_grad_cpu(gate_up: &Tensor, g: &Tensor) -> Result<Tensor> {
    gate_up
        .contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &SwiGluGrad)
}

/// d/dgate = g·u·σ(gate)·(1 + gate·(1 − σ(gate))), d/dup = g·gate·σ(gate).
struct SwiGluGrad;

impl CustomOp2 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = f32_rows(s1, l1, self.name())?;
        let (g, i) = f32_rows(s2, l2, self.name())?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(w)
            .zip(x.par_chunks(w).zip(g.par_chunks(i)))
            .for_each(|(dx, (row, g))| {
                let (gate, up) = row.split_at(i);
                let (dgate, dup) = dx.split_at_mut(i);
                for k in 0..i {
                    let s = sigmoid(gate[k]);
                    dgate[k] = g[k] * up[k] * s * (1.0 + gate[k] * (1.0 - s));
                    dup[k] = g[k] * gate[k] * s;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_swiglu_matches_the_composed_one_forward_and_backward() {
        let composed = |x: &Tensor| {
            let (gate, up) = (x.narrow(2, 0, 5)?, x.narrow(2, 5, 5)?);
            up * (&gate * candle_nn::ops::sigmoid(&gate)?)?
        };
        crate::cpu_rows::check::fused_matches_composed(&[2, 3, 10], swiglu, composed, 1e-6, 1e-5);
    }
}
