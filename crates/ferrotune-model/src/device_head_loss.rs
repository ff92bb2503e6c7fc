//! The output head and its cross-entropy on CUDA (with ferrotune's kernels) as one autograd node.
//!
//! Composed, the head keeps `[b·t, vocab]` logits in the model dtype and an f32 copy, and the
//! loss's ten-odd f32 ops and their backward hold several more such buffers (4 × 263 MB for 2,048
//! tokens of Phi-3's 32k vocabulary). Here one GEMM forms the logits in the model dtype, the
//! cross-entropy kernels give each row's loss and, when a backward follows, `softmax − onehot`,
//! which a second GEMM projects back to `d loss / d hidden` right away; the logits are freed
//! before the op returns, and the graph keeps only that `[b·t, h]` gradient.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use crate::frozen_linear::FrozenMatmul;
use crate::handover::Handover;

/// Summed token cross-entropy (an f32 scalar) of `hidden` `[n, h]` under the frozen head
/// `weight` `[v, h]`, with `targets[r]` the target of row `r` (`None`: not trained).
/// Differentiable in `hidden`.
pub(crate) fn device_head_loss(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &[Option<u32>],
) -> Result<Tensor> {
    let t: Vec<u32> = targets
        .iter()
        .map(|t| t.unwrap_or(ferrotune_kernels::NO_TARGET))
        .collect();
    let t = Tensor::from_vec(t, targets.len(), hidden.device())?;
    let head = FrozenMatmul::new(weight.clone());
    let logits = head.forward(&hidden.detach())?;
    let sum = ferrotune_kernels::cross_entropy_nll(&logits, &t)?.sum_all()?;
    if !hidden.track_op() {
        return Ok(sum);
    }
    let dlogits = ferrotune_kernels::cross_entropy_grad(&logits, &t)?;
    drop(logits);
    let grad = dlogits.matmul(weight)?;
    hidden.apply_op1(HeadLossNode {
        sum: Handover::new("head loss", sum),
        grad,
    })
}

/// Carries the loss computed in [`device_head_loss`] into the graph; its backward scales the
/// gradient formed there.
struct HeadLossNode {
    /// Handed over (and released) by the forward.
    sum: Handover,
    /// `d (Σ loss) / d hidden` `[n, h]` in the model dtype.
    grad: Tensor,
}

impl CustomOp1 for HeadLossNode {
    fn name(&self) -> &'static str {
        "device-head-loss"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.sum.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.sum.cuda()
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // Scaled in f32: the incoming factor (1 / tokens, typically) rounded to bf16 would be
        // off by up to 0.4%.
        let g = self
            .grad
            .to_dtype(DType::F32)?
            .broadcast_mul(&grad_res.to_dtype(DType::F32)?)?;
        Ok(Some(g.to_dtype(arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// On the CPU (the op is generic; the model uses it on CUDA) the loss and the hidden
    /// gradient equal the composed head + cross-entropy's, untrained rows included.
    #[test]
    fn the_head_node_matches_logits_then_loss() {
        let cpu = &Device::Cpu;
        let (n, h, v) = (7, 12, 41);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, h), cpu).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 0.5, (v, h), cpu).unwrap();
        let targets: Vec<Option<u32>> = (0..n)
            .map(|r| (r % 3 != 1).then_some((r * 11 % v) as u32))
            .collect();
        let fused = device_head_loss(x.as_tensor(), &w, &targets).unwrap();
        // Composed: logits, log-softmax, the targets' negative log-probabilities.
        let logits = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let m = logits.max_keepdim(1).unwrap().detach();
        let shifted = logits.broadcast_sub(&m).unwrap();
        let lse = shifted
            .exp()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .log()
            .unwrap();
        let logp = shifted.broadcast_sub(&lse).unwrap();
        let picked: Vec<Tensor> = targets
            .iter()
            .enumerate()
            .filter_map(|(r, t)| Some(logp.get(r).unwrap().get((*t)? as usize).unwrap()))
            .collect();
        let composed = Tensor::stack(&picked, 0)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() <= 1e-5 * b.abs(), "loss {a} vs {b}");
        let ga = fused.affine(0.25, 0.0).unwrap().backward().unwrap();
        let gb = composed.affine(0.25, 0.0).unwrap().backward().unwrap();
        let (ga, gb) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        let diff = (ga - gb).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            diff.to_scalar::<f32>().unwrap() <= 1e-6,
            "hidden gradient differs"
        );
        let untrained = ga.get(1).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(untrained.to_scalar::<f32>().unwrap(), 0.0);
    }
}
