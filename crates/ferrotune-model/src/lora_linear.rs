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

/// `A` and `scale·B` in the activations' dtype: what the forward and the backward compute from
/// the f32 pair before their GEMMs. Formed once per training step where the caller holds them
/// (see `Phi3::loss_and_grads_recompute`), instead of at each of the step's three passes.
#[derive(Clone)]
pub struct PairCasts {
    pub a: Tensor,
    pub sb: Tensor,
}

impl PairCasts {
    /// From the f32 pair, exactly as [`lora_linear`] and `lora_linear_grads` form them.
    pub fn of(a: &Tensor, b: &Tensor, scale: f64, dtype: DType) -> Result<PairCasts> {
        Ok(PairCasts {
            a: a.detach().to_dtype(dtype)?,
            sb: b.detach().to_dtype(dtype)?.affine(scale, 0.0)?,
        })
    }
}

/// `[..., in]` → `[..., out]` through `weight` `[out, in]` and the pair `a` `[r, in]`, `b`
/// `[out, r]` (f32 variables) scaled by `scale`; `mask` (shaped like `x`, in `x`'s dtype) is the
/// adapter input's dropout; `casts`, where given, are the pair's [`PairCasts`] for x's dtype.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<Tensor>,
    casts: Option<PairCasts>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = LoraLinear {
        weight: weight.clone(),
        mask: match mask {
            Some(m) => Some(m.contiguous()?),
            None => None,
        },
        scale,
        casts,
    };
    x.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

struct LoraLinear {
    weight: Tensor,
    mask: Option<Tensor>,
    scale: f64,
    casts: Option<PairCasts>,
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

/// The frozen weight, the dropout mask and the pair's casts of a [`LoraLinear`] as one backend's
/// storages (on `x`'s device).
struct Operands<'a, S> {
    w: (&'a S, &'a Layout),
    mask: Option<(&'a S, &'a Layout)>,
    /// `A` `[r, k]` and `scale·B` `[n, r]` in x's dtype.
    casts: Option<[(&'a S, &'a Layout); 2]>,
}

/// Runs `f` on the op's weight, mask and casts as the backend storages `pick` finds (each held
/// read-locked meanwhile); an operand on another device is an error.
fn with_operands<S, R>(
    op: &LoraLinear,
    pick: fn(&Storage) -> Option<&S>,
    f: impl FnOnce(Operands<'_, S>) -> Result<R>,
) -> Result<R> {
    let (w, wl) = op.weight.storage_and_layout();
    let mask = op.mask.as_ref().map(|m| m.storage_and_layout());
    let casts = op
        .casts
        .as_ref()
        .map(|c| [c.a.storage_and_layout(), c.sb.storage_and_layout()]);
    fn on_device<'s, S>(
        pick: fn(&Storage) -> Option<&S>,
        what: &str,
        s: &'s Storage,
    ) -> Result<&'s S> {
        match pick(s) {
            Some(s) => Ok(s),
            None => candle_core::bail!("lora linear: {what} and input are on different devices"),
        }
    }
    let with = Operands {
        w: (on_device(pick, "weight", &w)?, wl),
        mask: match &mask {
            Some((s, l)) => Some((on_device(pick, "mask", s)?, *l)),
            None => None,
        },
        casts: match &casts {
            Some([(sa, la), (sb, lb)]) => Some([
                (on_device(pick, "A's cast", sa)?, *la),
                (on_device(pick, "B's cast", sb)?, *lb),
            ]),
            None => None,
        },
    };
    f(with)
}

/// The forward on one backend's storage.
fn forward<S: BackendStorage>(
    op: &LoraLinear,
    (x, xl): (&S, &Layout),
    (a, al): (&S, &Layout),
    (b, bl): (&S, &Layout),
    with: Operands<'_, S>,
) -> Result<(S, Shape)> {
    let (m, n, k, r, shape) = dims(&op.weight, xl, al, bl)?;
    let x2 = Layout::contiguous_with_offset((m, k), xl.start_offset());
    let rows = |cols: usize| Layout::contiguous((m, cols));
    let wt = with.w.1.transpose(0, 1)?;
    let y = x.matmul(with.w.0, (1, m, n, k), &x2, &wt)?;
    // The adapter in x's dtype, as PEFT casts it (cast here unless the step's casts are given).
    let (a_cast, sb_owned) = match with.casts {
        Some(_) => (None, None),
        None => {
            let a_cast = as_dtype(a, al, x.dtype())?;
            let b_cast = as_dtype(b, bl, x.dtype())?;
            let sb = match &b_cast {
                Some(c) => c.affine(&Layout::contiguous((n, r)), op.scale, 0.0)?,
                None => b.affine(bl, op.scale, 0.0)?,
            };
            (a_cast, Some(sb))
        }
    };
    let (a, al) = match (&with.casts, &a_cast) {
        (Some([(ca, cal), _]), _) => (*ca, (*cal).clone()),
        (None, Some(c)) => (c, Layout::contiguous((r, k))),
        (None, None) => (a, al.clone()),
    };
    let (sb, sbl) = match (&with.casts, &sb_owned) {
        (Some([_, (cb, cbl)]), _) => (*cb, (*cbl).clone()),
        (None, Some(sb)) => (sb, Layout::contiguous((n, r))),
        (None, None) => unreachable!("formed above when no casts are given"),
    };
    let mask = with.mask;
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
    let u = t.matmul(sb, (1, m, n, r), &rows(r), &sbl.transpose(0, 1)?)?;
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
        fn pick(s: &Storage) -> Option<&CpuStorage> {
            match s {
                Storage::Cpu(s) => Some(s),
                _ => None,
            }
        }
        with_operands(self, pick, |with| {
            forward(self, (x, xl), (a, al), (b, bl), with)
        })
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
        fn pick(s: &Storage) -> Option<&candle_core::CudaStorage> {
            match s {
                Storage::Cuda(s) => Some(s),
                _ => None,
            }
        }
        with_operands(self, pick, |with| {
            forward(self, (x, xl), (a, al), (b, bl), with)
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) = lora_linear_grads(
            x,
            &self.weight,
            (a, b),
            self.scale,
            self.mask.as_ref(),
            self.casts.as_ref(),
            grad,
        )?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// The gradients of [`lora_linear`]'s input, `A` and `B` (the pair's in f32) given `grad`, the
/// gradient of its output (`casts`: the pair's [`PairCasts`], where the caller holds them).
/// Records no backward.
pub(crate) fn lora_linear_grads(
    x: &Tensor,
    weight: &Tensor,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<&Tensor>,
    casts: Option<&PairCasts>,
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
    let PairCasts { a, sb } = match casts {
        Some(c) => c.clone(),
        None => PairCasts::of(a, b, scale, dtype)?,
    };
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
                let fused = lora_linear(&x, &w, (&a, &b), scale, mask.clone(), None).unwrap();
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
