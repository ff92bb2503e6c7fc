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
        self.dims(layout)?;
        let (bias, bias_layout) = crate::launch::storage_of(&self.bias)?;
        let candle_core::Storage::Cuda(bias) = &*bias else {
            unreachable!("storage_of checked the device")
        };
        let out = cuda::forward(&cuda::Forward {
            s: (storage, layout),
            bias: (bias, &bias_layout),
            heads: self.heads,
            bias_batched: self.bias_batched,
            scale: self.scale,
        })?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(attention_softmax_grad(
            res,
            grad_res,
            self.scale as f64,
        )?))
    }
}

/// The gradient of the scores given the probabilities [`attention_softmax`] returned and the
/// gradient of those probabilities: `scale · y ⊙ (g − Σ g⊙y)` per row, in `y`'s dtype, one kernel
/// on CUDA. Records no backward (for ops that form their own).
pub fn attention_softmax_grad(y: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let g = g.to_dtype(y.dtype())?.contiguous()?;
    y.contiguous()?.apply_op2_no_bwd(
        &g,
        &AttentionSoftmaxGrad {
            scale: scale as f32,
        },
    )
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
        let out = cuda::backward(&cuda::Backward {
            y: (s1, l1),
            g: (s2, l2),
            scale: self.scale,
        })?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, DeviceRepr, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result};

    use crate::launch::{i32_of, output, per_row, view, Launch};

    const MODULE: (&str, &str) = ("ferrotune_attention_softmax", crate::ptx::ATTENTION_SOFTMAX);

    pub struct Forward<'a> {
        pub s: (&'a CudaStorage, &'a Layout),
        pub bias: (&'a CudaStorage, &'a Layout),
        pub heads: usize,
        pub bias_batched: bool,
        pub scale: f32,
    }

    impl Launch for Forward<'_> {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<T>> {
            let (_, _, q, k) = self.s.1.shape().dims4()?;
            let n = self.s.1.shape().elem_count();
            let s = view::<T>(self.s.0, self.s.1)?;
            let bias = view::<f32>(self.bias.0, self.bias.1)?;
            let out = output::<T>(dev, n)?;
            let (heads, q32, k32) = (
                i32_of(self.heads, "heads")?,
                i32_of(q, "queries")?,
                i32_of(k, "keys")?,
            );
            let batched = i32::from(self.bias_batched);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&s);
            b.arg(&bias);
            b.arg(&out);
            b.arg(&heads);
            b.arg(&q32);
            b.arg(&k32);
            b.arg(&batched);
            b.arg(&self.scale);
            // SAFETY: the arguments match attention_softmax_fwd_<T>'s signature.
            unsafe { b.launch(per_row(n / k, k)) }.w()?;
            Ok(out)
        }
    }

    pub fn forward(a: &Forward<'_>) -> Result<CudaStorage> {
        use candle_core::backend::BackendStorage;
        crate::launch::run(
            a,
            a.s.0.dtype(),
            a.s.0.device(),
            MODULE,
            "attention_softmax_fwd",
        )
    }

    pub struct Backward<'a> {
        pub y: (&'a CudaStorage, &'a Layout),
        pub g: (&'a CudaStorage, &'a Layout),
        pub scale: f32,
    }

    impl Launch for Backward<'_> {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<T>> {
            let n = self.y.1.shape().elem_count();
            let k = *self.y.1.dims().last().expect("4-d probabilities");
            let y = view::<T>(self.y.0, self.y.1)?;
            let g = view::<T>(self.g.0, self.g.1)?;
            let out = output::<T>(dev, n)?;
            let k32 = i32_of(k, "keys")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&y);
            b.arg(&g);
            b.arg(&out);
            b.arg(&k32);
            b.arg(&self.scale);
            // SAFETY: the arguments match attention_softmax_bwd_<T>'s signature.
            unsafe { b.launch(per_row(n / k, k)) }.w()?;
            Ok(out)
        }
    }

    pub fn backward(a: &Backward<'_>) -> Result<CudaStorage> {
        use candle_core::backend::BackendStorage;
        if a.y.1.shape() != a.g.1.shape() || a.y.0.dtype() != a.g.0.dtype() {
            candle_core::bail!("attention_softmax backward: y and g differ in shape or dtype");
        }
        crate::launch::run(
            a,
            a.y.0.dtype(),
            a.y.0.device(),
            MODULE,
            "attention_softmax_bwd",
        )
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
