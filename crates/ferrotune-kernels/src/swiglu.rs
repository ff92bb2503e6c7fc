//! Phi-3's MLP activation `up · silu(gate)` on the fused `gate_up` output `[..., 2i]`, one kernel
//! each way (`cuda/swiglu.cu`), silu's result rounded to the dtype as PyTorch stores it. candle
//! composes it from six kernels plus their backwards.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::rows;

/// `[..., 2i]` → `[..., i]`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let two_i = gate_up.dim(candle_core::D::Minus1)?;
    if two_i % 2 != 0 {
        candle_core::bail!("swiglu: last dimension {two_i} is not even");
    }
    gate_up.contiguous()?.apply_op1(SwiGlu)
}

/// The gradient of `gate_up` given `g`, the gradient of [`swiglu`]'s output (in `gate_up`'s
/// dtype). Records no backward (for a backward written out by hand).
pub fn swiglu_grad(gate_up: &Tensor, g: &Tensor) -> Result<Tensor> {
    let mut want = gate_up.dims().to_vec();
    if let Some(last) = want.last_mut() {
        *last /= 2;
    }
    if g.dims() != want.as_slice() {
        candle_core::bail!(
            "swiglu_grad: gradient {:?} for gate_up {:?}",
            g.dims(),
            gate_up.dims()
        );
    }
    let g = g.to_dtype(gate_up.dtype())?.contiguous()?;
    gate_up.contiguous()?.apply_op2_no_bwd(&g, &SwiGluGrad)
}

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Output shape: the last dimension halved.
fn halved(l: &Layout) -> Shape {
    let mut dims = l.dims().to_vec();
    *dims.last_mut().expect("at least one dimension") /= 2;
    Shape::from(dims)
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let gu = rows::to_f32(s, l)?;
        let i = l.dims()[l.dims().len() - 1] / 2;
        let round = rows::rounding(s.dtype());
        let y: Vec<f32> = gu
            .chunks(2 * i)
            .flat_map(|r| {
                let (gate, up) = r.split_at(i);
                gate.iter()
                    .zip(up)
                    .map(|(&g, &u)| u * round(g * sigmoid(g)))
                    .collect::<Vec<_>>()
            })
            .collect();
        let shape = halved(l);
        Ok((rows::from_f32(y, &shape, s.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let k = cuda::Act {
            gu: (s, l),
            g: None,
        };
        let out = crate::launch::run(
            &k,
            s.dtype(),
            s.device(),
            ("ferrotune_swiglu", crate::ptx::SWIGLU),
            "swiglu_fwd",
        )?;
        Ok((out, halved(l)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(swiglu_grad(arg, grad_res)?))
    }
}

/// `(gate_up, g)` → gradient of gate_up.
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
        let gu = rows::to_f32(s1, l1)?;
        let g = rows::to_f32(s2, l2)?;
        let i = l1.dims()[l1.dims().len() - 1] / 2;
        let mut d = vec![0f32; gu.len()];
        for ((r, gr), dr) in gu.chunks(2 * i).zip(g.chunks(i)).zip(d.chunks_mut(2 * i)) {
            let (gate, up) = r.split_at(i);
            let (dgate, dup) = dr.split_at_mut(i);
            for j in 0..i {
                let s = sigmoid(gate[j]);
                dgate[j] = gr[j] * up[j] * s * (1.0 + gate[j] * (1.0 - s));
                dup[j] = gr[j] * gate[j] * s;
            }
        }
        Ok((
            rows::from_f32(d, l1.shape(), s1.dtype())?,
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
        let k = cuda::Act {
            gu: (s1, l1),
            g: Some((s2, l2)),
        };
        let out = crate::launch::run(
            &k,
            s1.dtype(),
            s1.device(),
            ("ferrotune_swiglu", crate::ptx::SWIGLU),
            "swiglu_bwd",
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

    use crate::launch::{elementwise, i32_of, output, view, Launch};

    /// Forward (`g` is `None`: output `[rows, i]`) or backward (output `[rows, 2i]`).
    pub struct Act<'a> {
        pub gu: (&'a CudaStorage, &'a Layout),
        pub g: Option<(&'a CudaStorage, &'a Layout)>,
    }

    impl Launch for Act<'_> {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<T>> {
            let total = self.gu.1.shape().elem_count();
            let i = self.gu.1.dims()[self.gu.1.dims().len() - 1] / 2;
            let n = (total / 2) as i64;
            let gu = view::<T>(self.gu.0, self.gu.1)?;
            let g = match self.g {
                Some((s, l)) => Some(view::<T>(s, l)?),
                None => None,
            };
            let out = output::<T>(dev, if g.is_some() { total } else { total / 2 })?;
            let i32_ = i32_of(i, "swiglu width")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&gu);
            if let Some(g) = &g {
                b.arg(g);
            }
            b.arg(&out);
            b.arg(&n);
            b.arg(&i32_);
            // SAFETY: the arguments match swiglu_{fwd,bwd}_<T>'s signature.
            unsafe { b.launch(elementwise(total / 2)) }.w()?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn the_cpu_reference_matches_the_composed_ops_forward_and_backward() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 4, 22), &Device::Cpu).unwrap()).unwrap();
        let composed = |gu: &Tensor| -> Result<Tensor> {
            let gate = gu.narrow(D::Minus1, 0, 11)?;
            let up = gu.narrow(D::Minus1, 11, 11)?;
            up * (&gate * (gate.neg()?.exp()? + 1.0)?.recip()?)?
        };
        crate::rows::check_against_composed(&x, swiglu, composed, 1e-5);
    }
}
