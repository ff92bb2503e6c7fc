//! A frozen projection with its LoRA pair as one autograd node: `x·Wᵀ + dropout(x)·Aᵀ·(s·B)ᵀ`
//! forward, and `dx`, `dA`, `dB` from one backward.
//!
//! Composed from candle ops, one adapted linear is eight graph nodes (the frozen matmul, two
//! transposes, two matmuls, the scale, the sum, the dropout). candle's backward starts each
//! node's gradient as a zeroed buffer and adds the contribution into it, so every training step
//! wrote and re-read three `[tokens, out]` and two `[tokens, in]` buffers per linear that carry
//! nothing (on an H100 these zero-fills and adds were about a third of the step's kernel time).
//! As one node, the graph holds one gradient for `x` and two small ones for the pair.
//!
//! The forward runs on the backend's storage directly (the same GEMMs candle would launch), so
//! it is one generic function for the CPU and CUDA.

use candle_core::backend::BackendStorage;
use candle_core::op::{Add, Mul};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

/// `[..., in]` → `[..., out]` through `weight` `[out, in]` and the pair `a` `[r, in]`, `b`
/// `[out, r]` (f32 variables) scaled by `scale`; `mask` (shaped like `x`, in `x`'s dtype) is the
/// adapter input's dropout.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = LoraLinear {
        weight: weight.clone(),
        mask: match mask {
            Some(m) => Some(m.contiguous()?),
            None => None,
        },
        scale,
    };
    x.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

struct LoraLinear {
    weight: Tensor,
    mask: Option<Tensor>,
    scale: f64,
}

/// Rows, out, in, rank, and the output shape.
fn dims(
    weight: &Tensor,
    xl: &Layout,
    al: &Layout,
    bl: &Layout,
) -> Result<(usize, usize, usize, usize, Shape)> {
    let dims = xl.dims();
    let k = *dims.last().expect("an input has a last dimension");
    let (n, wk) = weight.dims2()?;
    let (r, ak) = al.shape().dims2()?;
    let (bn, br) = bl.shape().dims2()?;
    if wk != k || ak != k || bn != n || br != r {
        candle_core::bail!(
            "lora linear: input width {k}, weight [{n}, {wk}], A [{r}, {ak}], B [{bn}, {br}]"
        );
    }
    let m = dims[..dims.len() - 1].iter().product();
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("non-empty") = n;
    Ok((m, n, k, r, Shape::from(shape)))
}

/// `x` as `dtype` (borrowed when it already is).
fn as_dtype<S: BackendStorage>(s: &S, l: &Layout, dtype: DType) -> Result<Option<S>> {
    if s.dtype() == dtype {
        Ok(None)
    } else {
        Ok(Some(s.to_dtype(l, dtype)?))
    }
}

/// The forward on one backend's storage: `w` is the frozen weight `[n, k]` and `mask` the
/// dropout mask, both on the same device as `x`.
#[allow(clippy::too_many_arguments)]
fn forward<S: BackendStorage>(
    op: &LoraLinear,
    x: &S,
    xl: &Layout,
    a: &S,
    al: &Layout,
    b: &S,
    bl: &Layout,
    w: (&S, &Layout),
    mask: Option<(&S, &Layout)>,
) -> Result<(S, Shape)> {
    let (m, n, k, r, shape) = dims(&op.weight, xl, al, bl)?;
    let x2 = Layout::contiguous_with_offset((m, k), xl.start_offset());
    let rows = |cols: usize| Layout::contiguous((m, cols));
    let wt = w.1.transpose(0, 1)?;
    let y = x.matmul(w.0, (1, m, n, k), &x2, &wt)?;
    // The adapter in x's dtype, as PEFT casts it.
    let a_cast = as_dtype(a, al, x.dtype())?;
    let (a, al) = match &a_cast {
        Some(c) => (c, Layout::contiguous((r, k))),
        None => (a, al.clone()),
    };
    let b_cast = as_dtype(b, bl, x.dtype())?;
    let (b, bl) = match &b_cast {
        Some(c) => (c, Layout::contiguous((n, r))),
        None => (b, bl.clone()),
    };
    let dropped = match mask {
        Some((mk, ml)) => Some(x.binary_impl::<Mul>(
            mk,
            &x2,
            &Layout::contiguous_with_offset((m, k), ml.start_offset()),
        )?),
        None => None,
    };
    let (xd, xdl) = match &dropped {
        Some(d) => (d, rows(k)),
        None => (x, x2.clone()),
    };
    let t = xd.matmul(a, (1, m, r, k), &xdl, &al.transpose(0, 1)?)?;
    let sb = b.affine(&bl, op.scale, 0.0)?;
    let u = t.matmul(
        &sb,
        (1, m, n, r),
        &rows(r),
        &Layout::contiguous((n, r)).transpose(0, 1)?,
    )?;
    Ok((y.binary_impl::<Add>(&u, &rows(n), &rows(n))?, shape))
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, wl) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            candle_core::bail!("lora linear: weight and input are on different devices");
        };
        let mask = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &mask {
            Some((s, l)) => match &**s {
                Storage::Cpu(s) => Some((s, *l)),
                _ => candle_core::bail!("lora linear: mask and input are on different devices"),
            },
            None => None,
        };
        forward(self, x, xl, a, al, b, bl, (w, wl), mask)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, wl) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*w else {
            candle_core::bail!("lora linear: weight and input are on different devices");
        };
        let mask = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &mask {
            Some((s, l)) => match &**s {
                Storage::Cuda(s) => Some((s, *l)),
                _ => candle_core::bail!("lora linear: mask and input are on different devices"),
            },
            None => None,
        };
        forward(self, x, xl, a, al, b, bl, (w, wl), mask)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) =
            lora_linear_grads(x, &self.weight, a, b, self.scale, self.mask.as_ref(), grad)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// The gradients of [`lora_linear`]'s input, `A` and `B` (the pair's in f32) given `grad`, the
/// gradient of its output. Records no backward.
pub(crate) fn lora_linear_grads(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let k = x.dim(candle_core::D::Minus1)?;
    let n = b.dim(0)?;
    let m = x.elem_count() / k.max(1);
    let dtype = x.dtype();
    let x2 = x.detach().reshape((m, k))?;
    let g = grad.detach().reshape((m, n))?;
    let mask = match mask {
        Some(mk) => Some(mk.reshape((m, k))?),
        None => None,
    };
    let xd = match &mask {
        Some(mk) => (&x2 * mk)?,
        None => x2,
    };
    let a = a.detach().to_dtype(dtype)?;
    let sb = b.detach().to_dtype(dtype)?.affine(scale, 0.0)?;
    let t = xd.matmul(&a.t()?)?;
    // d/d(s·B) = gᵀ·t, so dB = s·gᵀ·t; d/dt = g·(s·B); dA = (d/dt)ᵀ·dropout(x).
    let db = g.t()?.matmul(&t)?.affine(scale, 0.0)?;
    let gt = g.matmul(&sb)?;
    let da = gt.t()?.matmul(&xd)?;
    let mut dx_lora = gt.matmul(&a)?;
    if let Some(mk) = &mask {
        dx_lora = (dx_lora * mk)?;
    }
    let dx = (g.matmul(weight)? + dx_lora)?.reshape(x.shape())?;
    Ok((dx, da.to_dtype(DType::F32)?, db.to_dtype(DType::F32)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_rows::check::max_abs_diff;
    use candle_core::{Device, Var};

    /// The composed reference: the graph `Linear::forward` built before this op.
    fn composed(
        x: &Tensor,
        w: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let xd = match mask {
            Some(m) => (x * m).unwrap(),
            None => x.clone(),
        };
        let dtype = x.dtype();
        let delta = xd
            .broadcast_matmul(&a.to_dtype(dtype).unwrap().t().unwrap())
            .unwrap()
            .broadcast_matmul(&b.to_dtype(dtype).unwrap().t().unwrap())
            .unwrap()
            .affine(scale, 0.0)
            .unwrap();
        (y + delta).unwrap()
    }

    fn relative(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (
            &a.to_dtype(DType::F32).unwrap(),
            &b.to_dtype(DType::F32).unwrap(),
        );
        let scale = max_abs_diff(b, &b.zeros_like().unwrap()).max(1e-12);
        max_abs_diff(a, b) / scale
    }

    /// Output and the gradients of x, A and B equal the composed graph's, with and without
    /// dropout, for a 3-D input of odd sizes, in f32 and (rounding-sized) in bf16.
    #[test]
    fn fused_lora_linear_matches_the_composed_graph() {
        let cpu = &Device::Cpu;
        let (bsz, t, k, n, r, scale) = (2, 5, 13, 11, 3, 0.75);
        for dtype in [DType::F32, DType::BF16] {
            for dropout in [false, true] {
                let randn = |dims: &[usize]| Tensor::randn(0f32, 1.0, dims, cpu).unwrap();
                let x = Var::from_tensor(&randn(&[bsz, t, k]).to_dtype(dtype).unwrap()).unwrap();
                let w = randn(&[n, k]).to_dtype(dtype).unwrap();
                let a = Var::from_tensor(&randn(&[r, k])).unwrap();
                let b = Var::from_tensor(&randn(&[n, r])).unwrap();
                let mask = dropout.then(|| {
                    let keep: Vec<f32> = (0..bsz * t * k)
                        .map(|i| if i % 4 == 1 { 0.0 } else { 1.0 / 0.75 })
                        .collect();
                    Tensor::from_vec(keep, (bsz, t, k), cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                });
                let fused = lora_linear(&x, &w, &a, &b, scale, mask.clone()).unwrap();
                let reference = composed(&x, &w, &a, &b, scale, mask.as_ref());
                let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                let d = relative(&fused, &reference);
                assert!(
                    d <= tol,
                    "{dtype:?} dropout {dropout}: output differs by {d}"
                );
                let probe = randn(fused.dims()).to_dtype(dtype).unwrap();
                let grads = |y: &Tensor| {
                    (y.to_dtype(DType::F32).unwrap() * probe.to_dtype(DType::F32).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                };
                let (gf, gc) = (grads(&fused), grads(&reference));
                for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
                    let (f, c) = (
                        gf.get(v.as_tensor()).unwrap(),
                        gc.get(v.as_tensor()).unwrap(),
                    );
                    assert_eq!(f.dtype(), v.dtype(), "gradient of {name} keeps its dtype");
                    let d = relative(f, c);
                    assert!(
                        d <= tol,
                        "{dtype:?} dropout {dropout}: d{name} differs by {d}"
                    );
                }
            }
        }
    }
}
