//! Causal attention `softmax(scale · q·kᵀ + bias) · v` for training as one autograd node.
//!
//! Composed from candle ops, the graph keeps the scores and the probabilities of every layer
//! until the backward ends, and candle's backward of the two matmuls and the softmax starts each
//! gradient it creates as a zeroed score-sized buffer that the real gradient is added to. At
//! 2,048 tokens and 32 heads one such buffer is 256 MiB in bf16, 512 MiB in f32. Here the
//! forward runs on detached inputs and the backward forms `dq`, `dk`, `dv` directly:
//! - on the CPU (f32) the forward drops its scores and the backward recomputes the probabilities
//!   from `q` and `k` (flash-attention's trade: one more `q·kᵀ` for far less memory), holding at
//!   most three score-sized buffers;
//! - on CUDA (with ferrotune's kernels) the probabilities are kept, as the composed graph keeps
//!   them, since recomputing them costs a softmax pass that the saved fills and adds do not repay.
//!
//! Inference, other dtypes on the CPU, and `FERROTUNE_KERNELS=0` on CUDA use the composed path.
//!
//! `FERROTUNE_TRAIN_ATTENTION=flash` instead runs [`ferrotune_kernels::flash_attention()`] where it
//! applies (see [`flash_applies`]): no score matrix at all, the output in `o_proj`'s layout, each
//! row's log-sum-exp kept for the backward.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

pub use ferrotune_kernels::flash_attention::{
    supports as flash_supported, MAX_HEAD_DIM as FLASH_MAX_HEAD_DIM,
};

use crate::handover::Handover;
use crate::layer_ops::LayerOps;
use crate::softmax::{attention_probs, scaled_masked_softmax};

/// `softmax(scale · q·kᵀ + bias) · v` for `q` `[b, h, tq, d]`, `k`/`v` `[b, h, tk, d]` (heads
/// already repeated for GQA) and an f32 `bias` `[b, 1, tq, tk]`; `[b, h, tq, d]` out.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if flash_applies(q, k) {
        let (q0, k0, v0) = (q.detach(), k.detach(), v.detach());
        let (out, lse) = ferrotune_kernels::flash_attention(&q0, &k0, &v0, bias, scale)?;
        // `[b, t, heads, d]` viewed as `[b, heads, t, d]`: the caller's transpose back is free.
        if !tracked {
            return out.transpose(1, 2);
        }
        let op = AttentionNode {
            bias: bias.clone(),
            scale,
            saved: Saved::Lse(lse),
            out: Handover::new("attention output", out),
        };
        return q.apply_op3(k, v, op)?.transpose(1, 2);
    }
    let cpu = q.device().is_cpu() && q.dtype() == DType::F32;
    let cuda = q.device().is_cuda() && ferrotune_kernels::enabled();
    if tracked && (cpu || cuda) {
        let (q0, k0, v0) = (q.detach(), k.detach(), v.detach());
        let probs = attention_probs(&q0.matmul(&k0.t()?)?, bias, scale)?;
        let out = probs.matmul(&v0)?;
        let op = AttentionNode {
            bias: bias.clone(),
            scale,
            saved: Saved::Probs(cuda.then_some(probs)),
            out: Handover::new("attention output", out),
        };
        return q.apply_op3(k, v, op);
    }
    attention_probs(&q.matmul(&k.t()?)?, bias, scale)?.matmul(v)
}

/// Whether a step with `queries` new positions against a KV cache takes the fused decode kernel
/// ([`ferrotune_kernels::decode_attention()`]): on CUDA with the kernels on, for decoding steps
/// (up to [`ferrotune_kernels::decode_attention::MAX_QUERIES`] queries).
/// `FERROTUNE_DECODE_ATTENTION=composed` turns it off (for A/B runs); `=fused` turns it on
/// on the CPU too, where the kernel's CPU reference runs (how the tests drive the CUDA path's
/// plumbing through generation).
pub fn decode_kernel_applies(q: &Tensor, queries: usize, head_dim: usize) -> bool {
    static CHOICE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let forced = *CHOICE.get_or_init(|| match std::env::var("FERROTUNE_DECODE_ATTENTION") {
        Ok(v) if v == "fused" => Some(true),
        Ok(v) if v == "composed" => Some(false),
        _ => None,
    });
    let fits = queries <= ferrotune_kernels::decode_attention::MAX_QUERIES
        && head_dim <= ferrotune_kernels::decode_attention::MAX_HEAD_DIM
        && !q.track_op();
    fits && forced.unwrap_or(q.device().is_cuda() && ferrotune_kernels::enabled())
}

/// Whether attention over `q` and `k` (`[b, heads, t, d]`, as [`attention`] takes them) runs
/// as flash attention: when `FERROTUNE_TRAIN_ATTENTION=flash` and the kernel takes the operands
/// (self-attention, `tq == tk`; on CUDA bf16/f16 with head dim ≤ 128 on compute capability 8.0+
/// and the kernels on; on the CPU its f32 reference, how the tests drive this path).
///
/// Off by default until its kernels have passed their parity tests on a GPU
/// (`scripts/gpu-check.sh` runs them and the A/B benchmark).
pub fn flash_applies(q: &Tensor, k: &Tensor) -> bool {
    flash_chosen()
        && q.dim(2).ok() == k.dim(2).ok()
        && q.dim(2)
            .is_ok_and(|t| t.div_ceil(64) <= ferrotune_kernels::flash_attention::MAX_GRID_Y)
        && (q.device().is_cpu() || ferrotune_kernels::enabled())
        && ferrotune_kernels::flash_attention::supports(q)
}

/// Whether `FERROTUNE_TRAIN_ATTENTION=flash` is set (read once).
pub fn flash_chosen() -> bool {
    static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| std::env::var("FERROTUNE_TRAIN_ATTENTION").is_ok_and(|v| v == "flash"))
}

#[cfg(test)]
fn forward(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    scaled_masked_softmax(&q.matmul(&k.t()?)?, bias, scale)?.matmul(v)
}

/// Carries the output computed in [`attention`] into the graph and computes the gradients of
/// `q`, `k` and `v` from what the forward saved.
struct AttentionNode {
    bias: Tensor,
    scale: f64,
    saved: Saved,
    /// Handed over (and released) by the forward, so the graph holds one copy of the output.
    out: Handover,
}

enum Saved {
    /// The forward's probabilities where they are kept (CUDA); `None`: recomputed (CPU). The
    /// output is `[b, h, tq, d]`.
    Probs(Option<Tensor>),
    /// Flash attention's log-sum-exp; the output is `[b, t, h, d]`.
    Lse(Tensor),
}

impl CustomOp3 for AttentionNode {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached, so the gradients returned hold no graph (and no score buffer) alive.
        let (q, k, v, g) = (q.detach(), k.detach(), v.detach(), grad.detach());
        let scale = self.scale;
        let (dq, dk, dv) = match &self.saved {
            Saved::Lse(lse) => ferrotune_kernels::flash_attention_grad(
                &q,
                &k,
                &v,
                &self.bias,
                &res.detach(),
                lse,
                &g,
                scale,
            )?,
            Saved::Probs(Some(probs)) => attention_grads(&q, &k, &v, probs, &g, |p, dp| {
                LayerOps::Kernels.softmax_grad(p, dp, scale)
            })?,
            Saved::Probs(None) => {
                let probs = scaled_masked_softmax(&q.matmul(&k.t()?)?, &self.bias, scale)?;
                attention_grads(&q, &k, &v, &probs, &g, |p, dp| {
                    LayerOps::CpuF32.softmax_grad(p, dp, scale)
                })?
            }
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// What training attention's backward reads besides q, k, v and the output.
pub enum KeptAttention {
    /// The probabilities `[b, heads, t, t]`.
    Probs(Tensor),
    /// Each row's log-sum-exp `[b, heads, t]` (flash attention).
    Lse(Tensor),
}

/// Training attention as recompute's hand-written layer backward runs it, for `q`, `k`, `v`
/// `[b, heads, t, d]`: the output in `o_proj`'s layout `[b, t, heads, d]` and what the backward
/// reads, with the probabilities kept (the scores GEMM, the `ops` family's softmax, the output
/// GEMM) or, with `flash`, through flash attention.
pub(crate) fn kept_forward(
    ops: LayerOps,
    flash: bool,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    bias: &Tensor,
    scale: f64,
) -> Result<(Tensor, KeptAttention)> {
    if flash {
        let (out, lse) = ferrotune_kernels::flash_attention(q, k, v, bias, scale)?;
        return Ok((out, KeptAttention::Lse(lse)));
    }
    let probs = ops.softmax(&q.matmul(&k.t()?)?, bias, scale)?;
    let out = probs.matmul(v)?.transpose(1, 2)?.contiguous()?;
    Ok((out, KeptAttention::Probs(probs)))
}

/// `dq`, `dk`, `dv` of [`kept_forward`] given its output `out` and the output's gradient `g`
/// (both `[b, t, heads, d]`).
pub(crate) fn kept_backward(
    ops: LayerOps,
    kept: KeptAttention,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    bias: &Tensor,
    (out, g): (&Tensor, &Tensor),
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    match kept {
        KeptAttention::Lse(lse) => {
            ferrotune_kernels::flash_attention_grad(q, k, v, bias, out, &lse, g, scale)
        }
        KeptAttention::Probs(probs) => {
            let g = g.transpose(1, 2)?.contiguous()?;
            attention_grads(q, k, v, &probs, &g, |p, dp| ops.softmax_grad(p, dp, scale))
        }
    }
}

/// Training attention's forward as recompute's layer backward runs it (see [`kept_forward`]),
/// for `ferrotune bench attention`; `None` where that backward does not run (dtypes other than
/// f32 on the CPU, `FERROTUNE_KERNELS=0` on CUDA).
pub fn training_forward(
    flash: bool,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Option<(Tensor, KeptAttention)>> {
    match LayerOps::for_tensor(q) {
        Some(ops) => kept_forward(ops, flash, (q, k, v), bias, scale).map(Some),
        None => Ok(None),
    }
}

/// The backward of [`training_forward`]: `dq`, `dk`, `dv` for the output's gradient `g`.
pub fn training_backward(
    kept: KeptAttention,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    bias: &Tensor,
    (out, g): (&Tensor, &Tensor),
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ops = LayerOps::for_tensor(q)
        .ok_or_else(|| candle_core::Error::Msg("no fused attention ops for this tensor".into()))?;
    kept_backward(ops, kept, (q, k, v), bias, (out, g), scale)
}

/// `dq`, `dk`, `dv` of `probs · v`, `probs = softmax(scale · q·kᵀ + bias)`, given `g`, the
/// gradient of the output; `softmax_grad(probs, dprobs)` is the scores' gradient. The same
/// products, in the same order, as candle's matmul backward would form them.
pub(crate) fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    g: &Tensor,
    softmax_grad: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dv = probs.t()?.matmul(g)?;
    let dscores = softmax_grad(probs, &g.matmul(&v.t()?)?)?;
    let dq = dscores.matmul(k)?;
    let dk = q.t()?.matmul(&dscores)?.t()?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_rows::check::max_abs_diff;
    use candle_core::{Device, Var};

    /// Fused and composed attention agree in output and in the gradients of q, k and v, with a
    /// causal mask, uneven sizes and a query block shorter than the keys.
    #[test]
    fn fused_attention_matches_the_composed_graph_forward_and_backward() {
        let (b, h, tq, tk, d) = (2, 3, 5, 7, 4);
        let cpu = &Device::Cpu;
        let var = |dims: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, cpu).unwrap()).unwrap()
        };
        let (q, k, v) = (
            var(&[b, h, tq, d]),
            var(&[b, h, tk, d]),
            var(&[b, h, tk, d]),
        );
        let bias: Vec<f32> = (0..b * tq * tk)
            .map(|i| {
                let (qi, ki) = ((i / tk) % tq, i % tk);
                if ki > qi + (tk - tq) {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, tq, tk), cpu).unwrap();
        let scale = 0.5;
        let fused = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, scale).unwrap();
        let composed = attention_probs(&q.matmul(&k.t().unwrap()).unwrap(), &bias, scale)
            .unwrap()
            .matmul(v.as_tensor())
            .unwrap();
        assert_eq!(max_abs_diff(&fused, &composed), 0.0, "forward");
        let probe = Tensor::randn(0f32, 1.0, fused.dims(), cpu).unwrap();
        let gf = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (composed * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, c) = (
                gf.get(x.as_tensor()).unwrap(),
                gc.get(x.as_tensor()).unwrap(),
            );
            let d = max_abs_diff(a, c);
            assert!(d <= 1e-6, "gradient of {name} differs by {d}");
            let norm = max_abs_diff(c, &c.zeros_like().unwrap());
            assert!(norm > 1e-3, "gradient of {name} is trivially zero");
        }
    }

    /// Without a graph (inference) the composed path runs and gives the same values.
    #[test]
    fn untracked_inputs_take_the_composed_path() {
        let cpu = &Device::Cpu;
        let t = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, cpu).unwrap();
        let (q, k, v) = (t(&[1, 2, 3, 4]), t(&[1, 2, 3, 4]), t(&[1, 2, 3, 4]));
        let bias = Tensor::zeros((1, 1, 3, 3), DType::F32, cpu).unwrap();
        let out = attention(&q, &k, &v, &bias, 0.5).unwrap();
        assert!(!out.track_op());
        assert_eq!(
            max_abs_diff(&out, &forward(&q, &k, &v, &bias, 0.5).unwrap()),
            0.0
        );
    }
}
