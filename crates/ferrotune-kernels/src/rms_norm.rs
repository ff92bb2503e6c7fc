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
    norm_grad("rms_norm_grad", x, weight, eps, g, None)
}

/// The gradient of [`rms_norm`]'s input plus `residual` (the gradient the other branch of a
/// residual join brings), in one pass: `residual + rms_norm_grad(x, weight, eps, g)`, with the
/// same roundings. Records no backward.
pub fn rms_norm_grad_add(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    g: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    norm_grad("rms_norm_grad_add", x, weight, eps, g, Some(residual))
}

fn norm_grad(
    op: &str,
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    g: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    check_weight(op, x, weight)?;
    for (name, t) in std::iter::once(("gradient", g)).chain(residual.map(|r| ("residual", r))) {
        if t.dims() != x.dims() {
            candle_core::bail!("{op}: {name} {:?} for input {:?}", t.dims(), x.dims());
        }
    }
    let residual = match residual {
        Some(r) => Some(r.to_dtype(x.dtype())?.contiguous()?),
        None => None,
    };
    let g = g.to_dtype(x.dtype())?.contiguous()?;
    x.contiguous()?.apply_op2_no_bwd(
        &g,
        &RmsNormGrad {
            weight: weight.contiguous()?,
            eps: eps as f32,
            residual,
        },
    )
}

/// A residual join and the norm after it in one pass: `(x + y, rms_norm(x + y))`, the sum
/// rounded to the dtype before it is normalised, as the separate ops store it. Records no
/// backward (for inference and the hand-written backward's forward).
pub fn add_rms_norm(x: &Tensor, y: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    check_weight("add_rms_norm", x, weight)?;
    if y.dims() != x.dims() || y.dtype() != x.dtype() {
        candle_core::bail!(
            "add_rms_norm: {:?} {:?} added to {:?} {:?}",
            y.dims(),
            y.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    let both = x.contiguous()?.apply_op2_no_bwd(
        &y.contiguous()?,
        &AddRmsNorm {
            weight: weight.contiguous()?,
            eps: eps as f32,
        },
    )?;
    let n = x.elem_count();
    Ok((
        both.narrow(0, 0, n)?.reshape(x.shape())?,
        both.narrow(0, n, n)?.reshape(x.shape())?,
    ))
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
        let out = cuda::run_norm(
            &self.weight,
            (s, l),
            None,
            None,
            1,
            self.eps,
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
                residual: None,
            },
        )?))
    }
}

/// `(x, g)` → gradient of x (plus `residual`).
struct RmsNormGrad {
    weight: Tensor,
    eps: f32,
    residual: Option<Tensor>,
}

/// `(x, y)` → `[x + y | rms_norm(x + y)]` flat.
struct AddRmsNorm {
    weight: Tensor,
    eps: f32,
}

impl CustomOp2 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let round = rows::rounding(s1.dtype());
        let x = rows::to_f32(s1, l1)?;
        let y = rows::to_f32(s2, l2)?;
        let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| round(a + b)).collect();
        let normed = reference_forward(&sum, &weight_f32(&self.weight)?, self.eps, round);
        let shape = Shape::from(2 * sum.len());
        Ok((
            rows::from_f32([sum, normed].concat(), &shape, s1.dtype())?,
            shape,
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
        let second = Some((s2, l2));
        let out = cuda::run_norm(
            &self.weight,
            (s1, l1),
            second,
            None,
            2,
            self.eps,
            "rms_norm_add_fwd",
        )?;
        Ok((out, Shape::from(2 * l1.shape().elem_count())))
    }
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
        let mut dx = reference_backward(&x, &g, &weight_f32(&self.weight)?, self.eps);
        if let Some(res) = &self.residual {
            let round = rows::rounding(s1.dtype());
            let res = res
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (d, r) in dx.iter_mut().zip(res) {
                *d = round(*d) + r;
            }
        }
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
        let base = if self.residual.is_some() {
            "rms_norm_bwd_add"
        } else {
            "rms_norm_bwd"
        };
        let (second, residual) = (Some((s2, l2)), self.residual.as_ref());
        let out = cuda::run_norm(&self.weight, (s1, l1), second, residual, 1, self.eps, base)?;
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

    use crate::launch::{i32_of, output, per_row, storage_of, view, Launch};

    /// Runs the RMSNorm kernel `base` on `x` with the frozen `weight` (see [`Norm`] for the
    /// other operands).
    pub fn run_norm(
        weight: &candle_core::Tensor,
        x: (&CudaStorage, &Layout),
        second: Option<(&CudaStorage, &Layout)>,
        residual: Option<&candle_core::Tensor>,
        outputs: usize,
        eps: f32,
        base: &str,
    ) -> Result<CudaStorage> {
        use candle_core::backend::BackendStorage;
        fn cuda_of(s: &candle_core::Storage) -> &CudaStorage {
            match s {
                candle_core::Storage::Cuda(s) => s,
                _ => unreachable!("storage_of checked the device"),
            }
        }
        let (w, wl) = storage_of(weight)?;
        let res = residual.map(storage_of).transpose()?;
        let k = Norm {
            x,
            second,
            w: (cuda_of(&w), &wl),
            residual: res.as_ref().map(|(s, l)| (cuda_of(s), l)),
            outputs,
            eps,
        };
        let rms = ("ferrotune_rms_norm", crate::ptx::RMS_NORM);
        crate::launch::run(&k, x.0.dtype(), x.0.device(), rms, base)
    }

    /// One RMSNorm kernel over rows of `h`; its arguments, in order: `x`, `second` (the
    /// gradient `g` backward, the added `y` in the joined forward), `w`, `residual` (the joined
    /// backward's), the output of `outputs` × x's size, `h`, `eps`.
    pub struct Norm<'a> {
        pub x: (&'a CudaStorage, &'a Layout),
        pub second: Option<(&'a CudaStorage, &'a Layout)>,
        pub w: (&'a CudaStorage, &'a Layout),
        pub residual: Option<(&'a CudaStorage, &'a Layout)>,
        pub outputs: usize,
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
            let out = output::<T>(dev, self.outputs * n)?;
            let h32 = i32_of(h, "rms_norm width")?;
            let second = match self.second {
                Some((s, l)) => Some(view::<T>(s, l)?),
                None => None,
            };
            let residual = match self.residual {
                Some((s, l)) => Some(view::<T>(s, l)?),
                None => None,
            };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&x);
            if let Some(second) = &second {
                b.arg(second);
            }
            b.arg(&w);
            if let Some(residual) = &residual {
                b.arg(residual);
            }
            b.arg(&out);
            b.arg(&h32);
            b.arg(&self.eps);
            // SAFETY: the arguments match the rms_norm_*_<T> kernel's signature; n = rows · h.
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

    /// The joined forms equal the separate ops bit for bit (f32 and bf16): the sum then the
    /// norm, and the residual plus the norm's gradient.
    #[test]
    fn joined_residual_forms_equal_the_separate_ops() {
        let cpu = &Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let t = |s: f32| {
                Tensor::randn(0f32, s, (2, 3, 37), cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (x, y, g, res) = (t(2.0), t(1.0), t(1.0), t(0.5));
            let w = (Tensor::randn(0f32, 0.2, 37, cpu).unwrap() + 1.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let same = |a: &Tensor, b: &Tensor, what: &str| {
                let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(d, 0.0, "{dtype:?} {what}");
            };
            let (sum, normed) = add_rms_norm(&x, &y, &w, 1e-5).unwrap();
            let separate = (&x + &y).unwrap();
            same(&sum, &separate, "sum");
            same(&normed, &rms_norm(&separate, &w, 1e-5).unwrap(), "norm");
            let joined = rms_norm_grad_add(&x, &w, 1e-5, &g, &res).unwrap();
            let separate = (&res + rms_norm_grad(&x, &w, 1e-5, &g).unwrap()).unwrap();
            same(&joined, &separate, "gradient");
        }
    }

    #[test]
    fn a_weight_of_another_width_is_refused() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(5, DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm(&x, &w, 1e-5).is_err());
    }
}
