//! RMSNorm with a frozen weight, one kernel each way (`cuda/rms_norm.cu`): forward
//! `weight · round(x · rsqrt(mean(x²) + eps))` as transformers' Phi3RMSNorm computes it, backward
//! the input gradient only. candle composes it from eight kernels in f32 (plus their backwards).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::rows;

/// `[..., h]` normalised over the last dimension and scaled by `weight` `[h]` (same dtype).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_weight("rms_norm", x, weight)?;
    x.contiguous()?.apply_op1(RmsNorm {
        weight: weight.contiguous()?,
        eps: eps as f32,
    })
}

/// The gradient of [`rms_norm`]'s input `x` given `g`, the gradient of its output (the weight is
/// frozen). Records no backward (for a backward written out by hand).
pub fn rms_norm_grad(x: &Tensor, weight: &Tensor, eps: f64, g: &Tensor) -> Result<Tensor> {
    check_weight("rms_norm_grad", x, weight)?;
    if g.dims() != x.dims() {
        candle_core::bail!(
            "rms_norm_grad: gradient {:?} for input {:?}",
            g.dims(),
            x.dims()
        );
    }
    let g = g.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op2_no_bwd(
        &g,
        &RmsNormGrad {
            weight: weight.contiguous()?,
            eps: eps as f32,
        },
    )
}

fn check_weight(op: &str, x: &Tensor, weight: &Tensor) -> Result<()> {
    let h = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [h] || weight.dtype() != x.dtype() {
        candle_core::bail!(
            "{op}: weight {:?} {:?} for input {:?} {:?}",
            weight.dims(),
            weight.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    Ok(())
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

fn weight_f32(w: &Tensor) -> Result<Vec<f32>> {
    w.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()
}

fn reference_forward(x: &[f32], w: &[f32], eps: f32, round: fn(f32) -> f32) -> Vec<f32> {
    let h = w.len();
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks(h).zip(y.chunks_mut(h)) {
        let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / h as f32 + eps).sqrt();
        for ((y, x), w) in yr.iter_mut().zip(xr).zip(w) {
            *y = w * round(x * r);
        }
    }
    y
}

fn reference_backward(x: &[f32], g: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut dx = vec![0f32; x.len()];
    for ((xr, gr), dr) in x.chunks(h).zip(g.chunks(h)).zip(dx.chunks_mut(h)) {
        let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / h as f32 + eps).sqrt();
        let dot: f32 = xr.iter().zip(gr).zip(w).map(|((x, g), w)| g * w * x).sum();
        let c = r * r * r * dot / h as f32;
        for (((d, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
            *d = r * g * w - x * c;
        }
    }
    dx
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows::to_f32(s, l)?;
        let w = weight_f32(&self.weight)?;
        let y = reference_forward(&x, &w, self.eps, rows::rounding(s.dtype()));
        Ok((rows::from_f32(y, l.shape(), s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, wl) = crate::launch::storage_of(&self.weight)?;
        let candle_core::Storage::Cuda(w) = &*w else {
            unreachable!("storage_of checked the device")
        };
        let k = cuda::Norm {
            x: (s, l),
            g: None,
            w: (w, &wl),
            eps: self.eps,
        };
        let out = crate::launch::run(
            &k,
            s.dtype(),
            s.device(),
            ("ferrotune_rms_norm", crate::ptx::RMS_NORM),
            "rms_norm_fwd",
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(arg.dtype())?.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(
            &g,
            &RmsNormGrad {
                weight: self.weight.clone(),
                eps: self.eps,
            },
        )?))
    }
}

/// `(x, g)` → gradient of x.
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
        let x = rows::to_f32(s1, l1)?;
        let g = rows::to_f32(s2, l2)?;
        let dx = reference_backward(&x, &g, &weight_f32(&self.weight)?, self.eps);
        Ok((
            rows::from_f32(dx, l1.shape(), s1.dtype())?,
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, wl) = crate::launch::storage_of(&self.weight)?;
        let candle_core::Storage::Cuda(w) = &*w else {
            unreachable!("storage_of checked the device")
        };
        let k = cuda::Norm {
            x: (s1, l1),
            g: Some((s2, l2)),
            w: (w, &wl),
            eps: self.eps,
        };
        let out = crate::launch::run(
            &k,
            s1.dtype(),
            s1.device(),
            ("ferrotune_rms_norm", crate::ptx::RMS_NORM),
            "rms_norm_bwd",
        )?;
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

    /// Forward (`g` is `None`) or backward of one RMSNorm over rows of `h`.
    pub struct Norm<'a> {
        pub x: (&'a CudaStorage, &'a Layout),
        pub g: Option<(&'a CudaStorage, &'a Layout)>,
        pub w: (&'a CudaStorage, &'a Layout),
        pub eps: f32,
    }

    impl Launch for Norm<'_> {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<T>> {
            let n = self.x.1.shape().elem_count();
            let h = self.w.1.shape().elem_count();
            let x = view::<T>(self.x.0, self.x.1)?;
            let w = view::<T>(self.w.0, self.w.1)?;
            let out = output::<T>(dev, n)?;
            let h32 = i32_of(h, "rms_norm width")?;
            let g = match self.g {
                Some((s, l)) => Some(view::<T>(s, l)?),
                None => None,
            };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&x);
            if let Some(g) = &g {
                b.arg(g);
            }
            b.arg(&w);
            b.arg(&out);
            b.arg(&h32);
            b.arg(&self.eps);
            // SAFETY: the arguments match rms_norm_{fwd,bwd}_<T>'s signature; n = rows · h.
            unsafe { b.launch(per_row(n / h, h)) }.w()?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    #[test]
    fn the_cpu_reference_matches_the_composed_ops_forward_and_backward() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 5, 19), &Device::Cpu).unwrap()).unwrap();
        let w = (Tensor::randn(0f32, 0.2, 19, &Device::Cpu).unwrap() + 1.0).unwrap();
        let composed = |x: &Tensor| -> Result<Tensor> {
            let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
                .sqrt()?
                .recip()?;
            x.broadcast_mul(&inv)?.broadcast_mul(&w)
        };
        crate::rows::check_against_composed(&x, |x| rms_norm(x, &w, 1e-5), composed, 1e-5);
    }

    #[test]
    fn a_weight_of_another_width_is_refused() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm(&x, &w, 1e-5).is_err());
    }
}
