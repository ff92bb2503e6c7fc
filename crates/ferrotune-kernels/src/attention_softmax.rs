//! Attention probabilities `softmax(scale · scores + bias)` over the keys, with its backward, as
//! one kernel each way (`cuda/attention_softmax.cu`).
//!
//! candle composes this from about nine elementwise and reduction kernels forward and as many
//! backward, each a full pass over the `[b, heads, q, k]` score matrix in f32; on a
//! Phi-3-mini-shaped step they were about 60% of the GPU time. Here the scores stay in their own
//! dtype (bf16 in training), the arithmetic is f32 inside the kernel, and the probabilities come
//! out in the scores' dtype, ready for the `probs · v` product.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::rows;

/// `softmax(scale · scores + bias)` over the last dimension. `scores` `[b, h, q, k]` (f32, bf16
/// or f16), `bias` `[b, 1, q, k]` or `[1, 1, q, k]` (f32, a constant: masked positions hold a
/// large negative number). Returns probabilities in the scores' dtype; differentiable in `scores`.
pub fn attention_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, q, k) = scores.dims4()?;
    let (bb, one, bq, bk) = bias.dims4()?;
    if one != 1 || bq != q || bk != k || (bb != 1 && bb != b) {
        candle_core::bail!(
            "attention_softmax: bias {:?} does not broadcast over scores {:?}",
            bias.dims(),
            scores.dims()
        );
    }
    if bias.dtype() != DType::F32 {
        candle_core::bail!(
            "attention_softmax: bias must be f32, got {:?}",
            bias.dtype()
        );
    }
    scores.contiguous()?.apply_op1(AttentionSoftmax {
        bias: bias.contiguous()?,
        scale: scale as f32,
        heads: h,
        bias_batched: bb != 1,
    })
}

struct AttentionSoftmax {
    bias: Tensor,
    scale: f32,
    heads: usize,
    bias_batched: bool,
}

impl AttentionSoftmax {
    /// (rows, q, k) of the scores.
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize)> {
        let (b, h, q, k) = layout.shape().dims4()?;
        if h != self.heads {
            candle_core::bail!("attention_softmax: {h} heads, expected {}", self.heads);
        }
        Ok((b * h * q, q, k))
    }
}

/// The forward in f32 on the CPU: the reference the kernel is tested against.
fn reference_forward(
    s: &[f32],
    bias: &[f32],
    (heads, q, k): (usize, usize, usize),
    bias_batched: bool,
    scale: f32,
) -> Vec<f32> {
    let mut y = vec![0f32; s.len()];
    for (row, (sr, yr)) in s.chunks(k).zip(y.chunks_mut(k)).enumerate() {
        let (qi, b) = (row % q, row / (q * heads));
        let br = &bias[((if bias_batched { b * q } else { 0 }) + qi) * k..][..k];
        let x: Vec<f32> = sr.iter().zip(br).map(|(s, b)| s * scale + b).collect();
        let m = x.iter().copied().fold(f32::MIN, f32::max);
        let z: f32 = x.iter().map(|x| (x - m).exp()).sum();
        for (y, x) in yr.iter_mut().zip(&x) {
            *y = (x - m).exp() / z;
        }
    }
    y
}

/// The backward in f32 on the CPU: `dx = scale · y ⊙ (g − Σ g⊙y)` per row.
fn reference_backward(y: &[f32], g: &[f32], k: usize, scale: f32) -> Vec<f32> {
    let mut dx = vec![0f32; y.len()];
    for ((yr, gr), dr) in y.chunks(k).zip(g.chunks(k)).zip(dx.chunks_mut(k)) {
        let dot: f32 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
        for ((d, y), g) in dr.iter_mut().zip(yr).zip(gr) {
            *d = scale * y * (g - dot);
        }
    }
    dx
}

impl CustomOp1 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "attention-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, q, k) = self.dims(layout)?;
        let s = rows::to_f32(storage, layout)?;
        let bias = self.bias.flatten_all()?.to_vec1::<f32>()?;
        let y = reference_forward(&s, &bias, (self.heads, q, k), self.bias_batched, self.scale);
        let shape = layout.shape().clone();
        Ok((rows::from_f32(y, &shape, storage.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, q, k) = self.dims(layout)?;
        let (bias, bias_layout) = self.bias.storage_and_layout();
        let candle_core::Storage::Cuda(bias) = &*bias else {
            candle_core::bail!("attention_softmax: bias and scores are on different devices");
        };
        let bias = bias
            .as_cuda_slice::<f32>()?
            .slice(bias_layout.start_offset()..);
        let args = cuda::Forward {
            rows,
            heads: self.heads,
            q,
            k,
            bias_batched: self.bias_batched,
            scale: self.scale,
        };
        let out = cuda::forward(storage, layout, &bias, &args)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(res.dtype())?.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &g,
            &AttentionSoftmaxGrad { scale: self.scale },
        )?))
    }
}

/// `(y, g)` → gradient of the scores.
struct AttentionSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for AttentionSoftmaxGrad {
    fn name(&self) -> &'static str {
        "attention-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = *l1.dims().last().expect("4-d probabilities");
        let y = rows::to_f32(s1, l1)?;
        let g = rows::to_f32(s2, l2)?;
        let dx = reference_backward(&y, &g, k, self.scale);
        let shape = l1.shape().clone();
        Ok((rows::from_f32(dx, &shape, s1.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::backward(s1, l1, s2, l2, self.scale)?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

    use crate::ptx::ATTENTION_SOFTMAX;

    const MODULE: &str = "ferrotune_attention_softmax";

    pub struct Forward {
        pub rows: usize,
        pub heads: usize,
        pub q: usize,
        pub k: usize,
        pub bias_batched: bool,
        pub scale: f32,
    }

    /// One block per row; 256 threads cover Phi-3's 4k keys in 16 strided steps.
    fn launch_config(rows: usize, k: usize) -> LaunchConfig {
        let threads = if k >= 1024 { 256 } else { 128 };
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("attention_softmax: unsupported dtype {other:?}"),
        })
    }

    fn i32_of(n: usize, what: &str) -> Result<i32> {
        i32::try_from(n).map_err(|_| {
            candle_core::Error::Msg(format!("attention_softmax: {what} {n} exceeds i32"))
        })
    }

    fn fwd_typed<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        dev: &CudaDevice,
        s: &CudaStorage,
        layout: &Layout,
        bias: &CudaView<'_, f32>,
        a: &Forward,
        name: &str,
    ) -> Result<CudaSlice<T>> {
        let src = s.as_cuda_slice::<T>()?.slice(layout.start_offset()..);
        let func = dev.get_or_load_custom_func(name, MODULE, ATTENTION_SOFTMAX)?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(a.rows * a.k)? };
        let (heads, q, k) = (
            i32_of(a.heads, "heads")?,
            i32_of(a.q, "queries")?,
            i32_of(a.k, "keys")?,
        );
        let batched = i32::from(a.bias_batched);
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(bias);
        builder.arg(&out);
        builder.arg(&heads);
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&batched);
        builder.arg(&a.scale);
        // SAFETY: the arguments match the kernel's signature; sizes were checked by the caller.
        unsafe { builder.launch(launch_config(a.rows, a.k)) }.w()?;
        Ok(out)
    }

    pub fn forward(
        s: &CudaStorage,
        layout: &Layout,
        bias: &CudaView<'_, f32>,
        a: &Forward,
    ) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let name = format!("attention_softmax_fwd_{}", suffix(s.dtype())?);
        let out = match s.dtype() {
            DType::F32 => CudaStorage::wrap_cuda_slice(
                fwd_typed::<f32>(&dev, s, layout, bias, a, &name)?,
                dev,
            ),
            DType::BF16 => CudaStorage::wrap_cuda_slice(
                fwd_typed::<half::bf16>(&dev, s, layout, bias, a, &name)?,
                dev,
            ),
            _ => CudaStorage::wrap_cuda_slice(
                fwd_typed::<half::f16>(&dev, s, layout, bias, a, &name)?,
                dev,
            ),
        };
        Ok(out)
    }

    fn bwd_typed<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        dev: &CudaDevice,
        (y, ly): (&CudaStorage, &Layout),
        (g, lg): (&CudaStorage, &Layout),
        scale: f32,
        name: &str,
    ) -> Result<CudaSlice<T>> {
        let n = ly.shape().elem_count();
        let k = *ly.dims().last().expect("4-d probabilities");
        let yv = y.as_cuda_slice::<T>()?.slice(ly.start_offset()..);
        let gv = g.as_cuda_slice::<T>()?.slice(lg.start_offset()..);
        let func = dev.get_or_load_custom_func(name, MODULE, ATTENTION_SOFTMAX)?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(n)? };
        let k32 = i32_of(k, "keys")?;
        let mut builder = func.builder();
        builder.arg(&yv);
        builder.arg(&gv);
        builder.arg(&out);
        builder.arg(&k32);
        builder.arg(&scale);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(launch_config(n / k, k)) }.w()?;
        Ok(out)
    }

    pub fn backward(
        y: &CudaStorage,
        ly: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        scale: f32,
    ) -> Result<CudaStorage> {
        if !ly.is_contiguous()
            || !lg.is_contiguous()
            || ly.shape() != lg.shape()
            || y.dtype() != g.dtype()
        {
            candle_core::bail!(
                "attention_softmax backward: y and g must be contiguous, same shape and dtype"
            );
        }
        let dev = y.device().clone();
        let name = format!("attention_softmax_bwd_{}", suffix(y.dtype())?);
        Ok(match y.dtype() {
            DType::F32 => CudaStorage::wrap_cuda_slice(
                bwd_typed::<f32>(&dev, (y, ly), (g, lg), scale, &name)?,
                dev,
            ),
            DType::BF16 => CudaStorage::wrap_cuda_slice(
                bwd_typed::<half::bf16>(&dev, (y, ly), (g, lg), scale, &name)?,
                dev,
            ),
            _ => CudaStorage::wrap_cuda_slice(
                bwd_typed::<half::f16>(&dev, (y, ly), (g, lg), scale, &name)?,
                dev,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The composed candle ops the model used before this kernel.
    fn composed(s: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
        let x = s.affine(scale, 0.0)?.broadcast_add(bias)?;
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn the_cpu_reference_matches_the_composed_ops_forward_and_backward() {
        let (b, h, q, k) = (2, 3, 5, 7);
        let mut mask = vec![0f32; b * q * k];
        for (i, m) in mask.iter_mut().enumerate() {
            if i % 4 == 1 {
                *m = f32::MIN;
            }
        }
        for bias_batch in [1, b] {
            let bias = Tensor::from_vec(
                mask[..bias_batch * q * k].to_vec(),
                (bias_batch, 1, q, k),
                &Device::Cpu,
            )
            .unwrap();
            let s =
                Var::from_tensor(&Tensor::randn(0f32, 2.0, (b, h, q, k), &Device::Cpu).unwrap())
                    .unwrap();
            let probe = Tensor::randn(0f32, 1.0, (b, h, q, k), &Device::Cpu).unwrap();
            let ours = attention_softmax(s.as_tensor(), &bias, 0.3).unwrap();
            let theirs = composed(s.as_tensor(), &bias, 0.3).unwrap();
            assert!(max_abs(&(&ours - &theirs).unwrap()) <= 1e-6);
            let g1 = (ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (theirs * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (g1, g2) = (
                g1.get(s.as_tensor()).unwrap(),
                g2.get(s.as_tensor()).unwrap(),
            );
            let err = max_abs(&(g1 - g2).unwrap()) / max_abs(g2);
            assert!(
                err <= 1e-5,
                "bias batch {bias_batch}: gradient off by {err:e}"
            );
        }
    }

    #[test]
    fn low_precision_scores_give_probabilities_in_their_own_dtype() {
        let s = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &Device::Cpu).unwrap();
        let bias = Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let y = attention_softmax(&s.to_dtype(DType::BF16).unwrap(), &bias, 1.0).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let rows = y
            .to_dtype(DType::F32)
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(rows.iter().all(|r| (r - 1.0).abs() < 1e-2), "{rows:?}");
    }

    #[test]
    fn a_bias_of_the_wrong_shape_is_refused() {
        let s = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let bias = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(attention_softmax(&s, &bias, 1.0).is_err());
    }
}
