//! Rotary position embeddings as transformers computes them for Phi-3, in f32 like PyTorch
//! (inverse frequencies, position × frequency and cos/sin all in f32), incl. `longrope`.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::config::{Phi3Config, RopeScaling};
use crate::phi3::split_heads;

/// Inverse frequencies and scaling for one model.
pub struct Rope {
    head_dim: usize,
    short: Vec<f32>,
    /// longrope's frequencies beyond `original_max_position_embeddings` (with that limit).
    long: Option<(Vec<f32>, usize)>,
    scale: f32,
}

impl Rope {
    pub fn new(cfg: &Phi3Config) -> Rope {
        let dim = cfg.head_dim;
        let base = cfg.rope_theta as f32;
        let freq =
            |i: usize, factor: f32| 1.0f32 / (factor * base.powf((2 * i) as f32 / dim as f32));
        match &cfg.rope_scaling {
            RopeScaling::Default => Rope {
                head_dim: dim,
                short: (0..dim / 2).map(|i| freq(i, 1.0)).collect(),
                long: None,
                scale: 1.0,
            },
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => Rope {
                head_dim: dim,
                short: short_factor
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| freq(i, f as f32))
                    .collect(),
                long: Some((
                    long_factor
                        .iter()
                        .enumerate()
                        .map(|(i, &f)| freq(i, f as f32))
                        .collect(),
                    *original_max_position_embeddings,
                )),
                scale: *attention_factor as f32,
            },
        }
    }

    /// cos and sin `[b, t, head_dim]` for position ids `[b, t]`, in `dtype`.
    ///
    /// longrope switches to the long factors for the whole batch once any position reaches
    /// `original_max_position_embeddings`, as transformers' dynamic update does.
    pub fn cos_sin(
        &self,
        positions: &[Vec<u32>],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let max_pos = positions.iter().flatten().copied().max().unwrap_or(0) as usize;
        let inv = match &self.long {
            Some((long, original)) if max_pos + 1 > *original => long,
            _ => &self.short,
        };
        let (b, t) = (positions.len(), positions.first().map_or(0, Vec::len));
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(b * t * self.head_dim);
        let mut sin = Vec::with_capacity(b * t * self.head_dim);
        for row in positions {
            for &p in row {
                let angles: Vec<f32> = inv.iter().map(|&f| p as f32 * f).collect();
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos() * self.scale));
                    sin.extend(angles.iter().map(|a| a.sin() * self.scale));
                }
            }
        }
        debug_assert_eq!(cos.len(), b * t * 2 * half);
        let shape = (b, t, self.head_dim);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }
}

/// `x·cos + rotate_half(x)·sin` for `x` `[b, heads, t, head_dim]`, cos/sin `[b, t, head_dim]`.
/// Fused on CPU for f32 (forward and backward one pass each), a CUDA kernel on the GPU
/// (ferrotune-kernels), candle ops elsewhere.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(Rotary {
            cos: cos.contiguous()?.flatten_all()?.to_vec1::<f32>()?.into(),
            sin: sin.contiguous()?.flatten_all()?.to_vec1::<f32>()?.into(),
            transpose: false,
        });
    }
    if x.device().is_cuda() && ferrotune_kernels::enabled() {
        return ferrotune_kernels::rope(x, cos, sin);
    }
    composed(x, cos, sin)
}

/// Query, key and value heads `[b, heads, t, head_dim]` of the fused projection `qkv`, query and
/// key rotated: one kernel on CUDA (`ferrotune_kernels::rope_qkv`), otherwise split by
/// `split_heads` and rotated by [`apply`].
pub fn heads(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    cfg: &Phi3Config,
) -> Result<(Tensor, Tensor, Tensor)> {
    if qkv.device().is_cuda() && ferrotune_kernels::enabled() {
        let heads = (cfg.num_attention_heads, cfg.num_key_value_heads);
        return ferrotune_kernels::rope_qkv(qkv, cos, sin, heads);
    }
    let (q, k, v) = split_heads(qkv, cfg)?;
    Ok((apply(&q, cos, sin)?, apply(&k, cos, sin)?, v))
}

/// The adjoint of [`apply`] on `g`, the gradient of its output (the gradient of its input), for
/// f32 on the CPU. Records no backward.
pub(crate) fn adjoint_cpu(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op1_no_bwd(&Rotary {
        cos: cos.contiguous()?.flatten_all()?.to_vec1::<f32>()?.into(),
        sin: sin.contiguous()?.flatten_all()?.to_vec1::<f32>()?.into(),
        transpose: true,
    })
}

fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    let half = x.dim(3)? / 2;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// The rotation as one op. `transpose` applies the adjoint (what the backward needs):
/// forward `y_j = x_j·c_j + s_j·(j < h ? −x_{j+h} : x_{j−h})`,
/// adjoint `dx_k = g_k·c_k + (k < h ? g_{k+h}·s_{k+h} : −g_{k−h}·s_{k−h})`.
struct Rotary {
    /// `[b, t, d]`, flattened.
    cos: std::sync::Arc<[f32]>,
    sin: std::sync::Arc<[f32]>,
    transpose: bool,
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("rotary: expected f32");
        };
        let Some((a, z)) = l.contiguous_offsets() else {
            candle_core::bail!("rotary: expected a contiguous input");
        };
        let x = &data[a..z];
        let (b, heads, t, d) = l.shape().dims4()?;
        if self.cos.len() != b * t * d {
            candle_core::bail!("rotary: cos/sin do not match [{b}, {t}, {d}]");
        }
        let h = d / 2;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(row, (y, x))| {
                // row = ((bi · heads) + head) · t + ti
                let (bi, ti) = (row / (heads * t), row % t);
                let base = (bi * t + ti) * d;
                let (c, sn) = (&self.cos[base..base + d], &self.sin[base..base + d]);
                for j in 0..d {
                    let other = if j < h { j + h } else { j - h };
                    let sign = if j < h { -1.0 } else { 1.0 };
                    y[j] = if self.transpose {
                        x[j] * c[j] - sign * x[other] * sn[other]
                    } else {
                        x[j] * c[j] + sign * x[other] * sn[j]
                    };
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&Rotary {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            transpose: !self.transpose,
        })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_rotary_matches_the_composed_one_forward_and_backward() {
        let cos = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
        let fused = |x: &Tensor| apply(x, &cos, &sin);
        let slow = |x: &Tensor| composed(x, &cos, &sin);
        crate::cpu_rows::check::fused_matches_composed(&[2, 3, 5, 8], fused, slow, 1e-6, 1e-5);
    }
}
