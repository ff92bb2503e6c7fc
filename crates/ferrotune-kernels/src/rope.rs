//! Rotary position embedding `x·cos + rotate_half(x)·sin` on `[b, heads, t, d]`, one kernel each
//! way (`cuda/rope.cu`), with the products rounded to the dtype as PyTorch computes them. candle
//! composes it from six kernels (two narrows, a negation, a concatenation, two broadcast products
//! and a sum) plus their backwards.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::rows;

/// `x` `[b, heads, t, d]` (d even), `cos`/`sin` `[b, t, d]` in x's dtype (constants).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(checked(x, cos, sin, false)?)
}

/// The adjoint of [`rope`] applied to `g`, the gradient of its output: the gradient of its
/// input. Records no backward (for a backward written out by hand).
pub fn rope_adjoint(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    g.contiguous()?
        .apply_op1_no_bwd(&checked(g, cos, sin, true)?)
}

fn checked(x: &Tensor, cos: &Tensor, sin: &Tensor, adjoint: bool) -> Result<Rope> {
    let (b, h, t, d) = x.dims4()?;
    for (name, c) in [("cos", cos), ("sin", sin)] {
        if c.dims() != [b, t, d] || c.dtype() != x.dtype() {
            candle_core::bail!(
                "rope: {name} {:?} {:?} for x {:?} {:?}",
                c.dims(),
                c.dtype(),
                x.dims(),
                x.dtype()
            );
        }
    }
    if d % 2 != 0 {
        candle_core::bail!("rope: head dimension {d} is not even");
    }
    Ok(Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        heads: h,
        adjoint,
    })
}

/// The rotation (`adjoint: false`) or its transpose, which is the backward.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    heads: usize,
    adjoint: bool,
}

impl Rope {
    fn reference(
        &self,
        x: &[f32],
        (t, d): (usize, usize),
        round: fn(f32) -> f32,
    ) -> Result<Vec<f32>> {
        let cos = self
            .cos
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let sin = self
            .sin
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        for (r, (xr, yr)) in x.chunks(d).zip(y.chunks_mut(d)).enumerate() {
            let (pos, b) = (r % t, r / (t * self.heads));
            let (c, s) = (
                &cos[(b * t + pos) * d..][..d],
                &sin[(b * t + pos) * d..][..d],
            );
            for j in 0..d {
                yr[j] = if self.adjoint {
                    let other = if j < half {
                        xr[j + half] * s[j + half]
                    } else {
                        -xr[j - half] * s[j - half]
                    };
                    xr[j] * c[j] + other
                } else {
                    let rot = if j < half {
                        -xr[j + half]
                    } else {
                        xr[j - half]
                    };
                    round(round(xr[j] * c[j]) + round(rot * s[j]))
                };
            }
        }
        Ok(y)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, _, t, d) = l.shape().dims4()?;
        let x = rows::to_f32(s, l)?;
        let y = self.reference(&x, (t, d), rows::rounding(s.dtype()))?;
        Ok((rows::from_f32(y, l.shape(), s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (cos, cl) = crate::launch::storage_of(&self.cos)?;
        let (sin, sl) = crate::launch::storage_of(&self.sin)?;
        let (candle_core::Storage::Cuda(cos), candle_core::Storage::Cuda(sin)) = (&*cos, &*sin)
        else {
            unreachable!("storage_of checked the device")
        };
        let k = cuda::Rotate {
            x: (s, l),
            cos: (cos, &cl),
            sin: (sin, &sl),
            heads: self.heads,
        };
        let base = if self.adjoint { "rope_bwd" } else { "rope_fwd" };
        let out = crate::launch::run(
            &k,
            s.dtype(),
            s.device(),
            ("ferrotune_rope", crate::ptx::ROPE),
            base,
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.to_dtype(arg.dtype())?.contiguous()?;
        Ok(Some(g.apply_op1_no_bwd(&Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            heads: self.heads,
            adjoint: !self.adjoint,
        })?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, DeviceRepr, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result};

    use crate::launch::{elementwise, i32_of, output, view, Launch};

    pub struct Rotate<'a> {
        pub x: (&'a CudaStorage, &'a Layout),
        pub cos: (&'a CudaStorage, &'a Layout),
        pub sin: (&'a CudaStorage, &'a Layout),
        pub heads: usize,
    }

    impl Launch for Rotate<'_> {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<T>> {
            let (_, _, t, d) = self.x.1.shape().dims4()?;
            let n = self.x.1.shape().elem_count();
            let x = view::<T>(self.x.0, self.x.1)?;
            let cos = view::<T>(self.cos.0, self.cos.1)?;
            let sin = view::<T>(self.sin.0, self.sin.1)?;
            let out = output::<T>(dev, n)?;
            let (n64, heads, t32, d32) = (
                n as i64,
                i32_of(self.heads, "heads")?,
                i32_of(t, "positions")?,
                i32_of(d, "head dim")?,
            );
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&x);
            b.arg(&cos);
            b.arg(&sin);
            b.arg(&out);
            b.arg(&n64);
            b.arg(&heads);
            b.arg(&t32);
            b.arg(&d32);
            // SAFETY: the arguments match rope_{fwd,bwd}_<T>'s signature.
            unsafe { b.launch(elementwise(n)) }.w()?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_cpu_reference_matches_the_composed_ops_forward_and_backward() {
        let cos = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (2, 5, 8), &Device::Cpu).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &Device::Cpu).unwrap())
            .unwrap();
        let composed = |x: &Tensor| -> Result<Tensor> {
            let (c, s) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
            let rotated = Tensor::cat(&[&x.narrow(3, 4, 4)?.neg()?, &x.narrow(3, 0, 4)?], 3)?;
            x.broadcast_mul(&c)? + rotated.broadcast_mul(&s)?
        };
        crate::rows::check_against_composed(&x, |x| rope(x, &cos, &sin), composed, 1e-6);
    }
}
