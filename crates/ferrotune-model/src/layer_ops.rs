//! The fused ops a decoder layer's hand-written backward ([`crate::decoder_backward`]) calls, each
//! forward with its backward from the same family, so the two always agree:
//! - [`LayerOps::CpuF32`]: the model's own rayon-parallel CPU ops (f32);
//! - [`LayerOps::Kernels`]: ferrotune-kernels' ops, which run their CUDA kernels on a GPU and
//!   their CPU references elsewhere (which is how the CPU tests cover the CUDA path's plumbing).

use candle_core::{DType, Tensor};
use candle_core::{Device, Result};

use crate::config::Phi3Config;
use crate::phi3::{join_heads, split_heads};
use crate::softmax::{scaled_masked_softmax, SoftmaxGrad};

/// Whether recompute's layer backward is the hand-written one where it applies: yes unless
/// `FERROTUNE_LAYER_BACKWARD=graph`, which differentiates through candle's graph instead (for A/B
/// runs on a GPU, and a way around the hand-written path without a rebuild).
pub fn hand_written_backward() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FERROTUNE_LAYER_BACKWARD").map_or(true, |v| v != "graph"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayerOps {
    CpuF32,
    Kernels,
}

impl LayerOps {
    /// The family for a layer whose input is `x` and whose norm weights are `norms`, or `None`
    /// where neither applies (other dtypes on the CPU, `FERROTUNE_KERNELS=0` on CUDA): the
    /// caller then differentiates through candle's graph.
    pub(crate) fn for_layer(x: &Tensor, norms: [&Tensor; 2]) -> Option<LayerOps> {
        if !hand_written_backward() || norms.iter().any(|w| w.dtype() != x.dtype()) {
            return None;
        }
        LayerOps::for_tensor(x)
    }

    /// The family for ops on `x` by device and dtype alone.
    pub(crate) fn for_tensor(x: &Tensor) -> Option<LayerOps> {
        match x.device() {
            Device::Cpu if x.dtype() == DType::F32 => Some(LayerOps::CpuF32),
            Device::Cuda(_) if ferrotune_kernels::enabled() => Some(LayerOps::Kernels),
            _ => None,
        }
    }

    pub(crate) fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        match self {
            LayerOps::CpuF32 => crate::rms_norm::rms_norm(x, w, eps),
            LayerOps::Kernels => ferrotune_kernels::rms_norm(x, w, eps),
        }
    }

    /// A residual join and the norm after it: `(x + y, rms_norm(x + y))`.
    pub(crate) fn add_rms_norm(
        self,
        x: &Tensor,
        y: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            LayerOps::CpuF32 => {
                let sum = (x + y)?;
                let normed = crate::rms_norm::rms_norm(&sum, w, eps)?;
                Ok((sum, normed))
            }
            LayerOps::Kernels => ferrotune_kernels::add_rms_norm(x, y, w, eps),
        }
    }

    /// `residual + rms_norm_grad(x, w, eps, g)`: the gradient where a residual join's two
    /// branches meet before a norm.
    pub(crate) fn rms_norm_grad_add(
        self,
        x: &Tensor,
        w: &Tensor,
        eps: f64,
        g: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor> {
        match self {
            LayerOps::CpuF32 => residual + crate::rms_norm::rms_norm_grad_cpu(x, w, eps, g)?,
            LayerOps::Kernels => ferrotune_kernels::rms_norm_grad_add(x, w, eps, g, residual),
        }
    }

    /// The fused projection's query, key and value heads, query and key rotated.
    pub(crate) fn rope_qkv(
        self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cfg: &Phi3Config,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            LayerOps::CpuF32 => {
                let (q, k, v) = split_heads(qkv, cfg)?;
                Ok((
                    crate::rope::apply(&q, cos, sin)?,
                    crate::rope::apply(&k, cos, sin)?,
                    v,
                ))
            }
            LayerOps::Kernels => {
                let heads = (cfg.num_attention_heads, cfg.num_key_value_heads);
                ferrotune_kernels::rope_qkv(qkv, cos, sin, heads)
            }
        }
    }

    /// The gradient of the fused projection's output from those of [`LayerOps::rope_qkv`]'s
    /// heads (`dk`, `dv` per kv head).
    pub(crate) fn rope_qkv_adjoint(
        self,
        dq: &Tensor,
        dk: &Tensor,
        dv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        match self {
            LayerOps::CpuF32 => join_heads(&[
                crate::rope::adjoint_cpu(dq, cos, sin)?,
                crate::rope::adjoint_cpu(dk, cos, sin)?,
                dv.clone(),
            ]),
            LayerOps::Kernels => ferrotune_kernels::rope_qkv_adjoint(dq, dk, dv, cos, sin),
        }
    }

    pub(crate) fn swiglu(self, gate_up: &Tensor) -> Result<Tensor> {
        match self {
            LayerOps::CpuF32 => crate::swiglu::swiglu(gate_up),
            LayerOps::Kernels => ferrotune_kernels::swiglu(gate_up),
        }
    }

    pub(crate) fn swiglu_grad(self, gate_up: &Tensor, g: &Tensor) -> Result<Tensor> {
        match self {
            LayerOps::CpuF32 => crate::swiglu::swiglu_grad_cpu(gate_up, g),
            LayerOps::Kernels => ferrotune_kernels::swiglu_grad(gate_up, g),
        }
    }

    /// Attention probabilities `softmax(scale · scores + bias)` in the scores' dtype.
    pub(crate) fn softmax(self, scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
        match self {
            LayerOps::CpuF32 => scaled_masked_softmax(scores, bias, scale),
            LayerOps::Kernels => ferrotune_kernels::attention_softmax(scores, bias, scale),
        }
    }

    /// The scores' gradient from the probabilities and their gradient.
    pub(crate) fn softmax_grad(
        self,
        probs: &Tensor,
        dprobs: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        match self {
            LayerOps::CpuF32 => probs.contiguous()?.apply_op2_no_bwd(
                &dprobs.contiguous()?,
                &SoftmaxGrad {
                    scale: scale as f32,
                },
            ),
            LayerOps::Kernels => ferrotune_kernels::attention_softmax_grad(probs, dprobs, scale),
        }
    }
}
