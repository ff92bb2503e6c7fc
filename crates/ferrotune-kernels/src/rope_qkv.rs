//! The fused `qkv` projection's query, key and value heads with RoPE applied to the first two, in
//! one kernel each way (`cuda/rope_qkv.cu`). Split and rotated separately, the heads cost five
//! kernels forward (three transposing copies, two rotations) and six back (two rotations, three
//! transposing copies and a concatenation).
//!
//! The forward writes one buffer `[q | k | v]`, each part `[b, heads, t, d]` and contiguous, so
//! the three tensors handed out are views of it (at `b > 1` a view into a `[b, heads, t, d]` of all
//! heads would not be a batch of matrices a GEMM reads).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use crate::rows;

/// Query, key and value heads `[b, heads, t, head_dim]` of `qkv` `[b, t, (q_heads + 2·kv_heads)·
/// head_dim]`, query and key rotated by `cos`/`sin` `[b, t, head_dim]` (in qkv's dtype), as
/// [`crate::rope()`] rotates them. Differentiable (the backward is [`rope_qkv_adjoint`]).
pub fn rope_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    (q_heads, kv_heads): (usize, usize),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, width) = qkv.dims3()?;
    let heads = q_heads + 2 * kv_heads;
    if heads == 0 || !width.is_multiple_of(heads) {
        candle_core::bail!("rope_qkv: width {width} is not a multiple of {heads} heads");
    }
    let d = width / heads;
    let op = RopeQkv {
        tables: Tables::checked(cos, sin, qkv.dtype(), (b, t, d))?,
        q_heads,
        kv_heads,
    };
    let all = qkv.contiguous()?.apply_op1(op)?;
    let part = |start: usize, h: usize| all.narrow(0, start, b * h * t * d)?.reshape((b, h, t, d));
    let kv = b * kv_heads * t * d;
    let q_size = b * q_heads * t * d;
    Ok((
        part(0, q_heads)?,
        part(q_size, kv_heads)?,
        part(q_size + kv, kv_heads)?,
    ))
}

/// The gradient of `qkv` from those of [`rope_qkv`]'s three outputs: `[b, t, (q_heads +
/// 2·kv_heads)·head_dim]`. Records no backward (for a backward written out by hand).
pub fn rope_qkv_adjoint(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (b, q_heads, t, d) = dq.dims4()?;
    let kv_heads = dk.dim(1)?;
    for (name, g) in [("dk", dk), ("dv", dv)] {
        if g.dims() != [b, kv_heads, t, d] || g.dtype() != dq.dtype() {
            candle_core::bail!(
                "rope_qkv_adjoint: {name} {:?} {:?} for dq {:?} {:?}",
                g.dims(),
                g.dtype(),
                dq.dims(),
                dq.dtype()
            );
        }
    }
    let op = RopeQkvAdjoint(RopeQkv {
        tables: Tables::checked(cos, sin, dq.dtype(), (b, t, d))?,
        q_heads,
        kv_heads,
    });
    dq.contiguous()?
        .apply_op3_no_bwd(&dk.contiguous()?, &dv.contiguous()?, &op)
}

/// Decoding's form of [`rope_qkv`]: returns the query heads `[b, q_heads, t, d]` and writes the
/// rotated key heads and the value heads into the KV cache's buffers `k_cache`/`v_cache`
/// (`[b, kv_heads, capacity, d]`, contiguous) at columns `start..start + t`, in place. On CUDA one
/// kernel (`rope_qkv_cache`) instead of the split and a copy into each buffer; elsewhere
/// [`rope_qkv`] and `slice_set`, its reference. Records no backward.
pub fn rope_qkv_into_cache(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    (q_heads, kv_heads): (usize, usize),
    (k_cache, v_cache): (&Tensor, &Tensor),
    start: usize,
) -> Result<Tensor> {
    let (b, t, width) = qkv.dims3()?;
    let heads = q_heads + 2 * kv_heads;
    if heads == 0 || !width.is_multiple_of(heads) {
        candle_core::bail!("rope_qkv_into_cache: width {width} is not a multiple of {heads} heads");
    }
    let d = width / heads;
    let (cb, ckv, capacity, cd) = k_cache.dims4()?;
    let fits = v_cache.dims() == k_cache.dims()
        && (cb, ckv, cd) == (b, kv_heads, d)
        && start + t <= capacity
        && [k_cache, v_cache]
            .iter()
            .all(|c| c.dtype() == qkv.dtype() && c.is_contiguous());
    if !fits {
        candle_core::bail!(
            "rope_qkv_into_cache: caches {:?}/{:?} ({:?}) cannot take {t} columns at {start} of \
             [b {b}, {kv_heads} kv heads, d {d}] ({:?}; contiguous buffers needed)",
            k_cache.dims(),
            v_cache.dims(),
            k_cache.dtype(),
            qkv.dtype()
        );
    }
    let qkv = qkv.detach();
    match qkv.device() {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => {
            let tables = Tables::checked(cos, sin, qkv.dtype(), (b, t, d))?;
            cuda::into_cache(
                &qkv.contiguous()?,
                &tables,
                (q_heads, kv_heads),
                (k_cache, v_cache),
                start,
            )
        }
        _ => {
            let (q, k, v) = rope_qkv(&qkv, cos, sin, (q_heads, kv_heads))?;
            k_cache.slice_set(&k.contiguous()?, 2, start)?;
            v_cache.slice_set(&v.contiguous()?, 2, start)?;
            Ok(q)
        }
    }
}

/// The rotary tables `[b, t, d]`.
#[derive(Clone)]
struct Tables {
    cos: Tensor,
    sin: Tensor,
}

impl Tables {
    fn checked(
        cos: &Tensor,
        sin: &Tensor,
        dtype: candle_core::DType,
        dims: (usize, usize, usize),
    ) -> Result<Tables> {
        let want = [dims.0, dims.1, dims.2];
        for (name, c) in [("cos", cos), ("sin", sin)] {
            if c.dims() != want || c.dtype() != dtype {
                candle_core::bail!(
                    "rope_qkv: {name} {:?} {:?}, want {want:?} {dtype:?}",
                    c.dims(),
                    c.dtype()
                );
            }
        }
        if !dims.2.is_multiple_of(2) {
            candle_core::bail!("rope_qkv: head dimension {} is not even", dims.2);
        }
        Ok(Tables {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        })
    }

    fn f32(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let v = |t: &Tensor| {
            t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        Ok((v(&self.cos)?, v(&self.sin)?))
    }
}

/// `qkv` → `[q | k | v]` flat.
#[derive(Clone)]
struct RopeQkv {
    tables: Tables,
    q_heads: usize,
    kv_heads: usize,
}

/// `(dq, dk, dv)` → `dqkv`.
struct RopeQkvAdjoint(RopeQkv);

impl RopeQkv {
    fn heads(&self) -> usize {
        self.q_heads + 2 * self.kv_heads
    }

    /// For element `(b, pos, head, j)` of `qkv`: its index in `[q | k | v]`.
    fn split_index(
        &self,
        (b, pos, head, j): (usize, usize, usize, usize),
        bt: (usize, usize),
        d: usize,
    ) -> usize {
        let (batch, t) = bt;
        let (nh, nkv) = (self.q_heads, self.kv_heads);
        let (q_size, kv_size) = (batch * nh * t * d, batch * nkv * t * d);
        if head < nh {
            ((b * nh + head) * t + pos) * d + j
        } else if head < nh + nkv {
            q_size + ((b * nkv + head - nh) * t + pos) * d + j
        } else {
            q_size + kv_size + ((b * nkv + head - nh - nkv) * t + pos) * d + j
        }
    }

    /// Every element of `qkv` `[b, t, heads·d]`, in order, as `(b, pos, head, j)`.
    fn elements(
        &self,
        (b, t, d): (usize, usize, usize),
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let heads = self.heads();
        (0..b * t * heads * d).map(move |e| {
            (
                e / (d * heads * t),
                (e / (d * heads)) % t,
                (e / d) % heads,
                e % d,
            )
        })
    }

    /// The forward on f32 values, rounding products to the storage dtype as the kernel does.
    fn reference(
        &self,
        qkv: &[f32],
        (b, t, d): (usize, usize, usize),
        round: fn(f32) -> f32,
    ) -> Result<Vec<f32>> {
        let (cos, sin) = self.tables.f32()?;
        let half = d / 2;
        let mut out = vec![0f32; qkv.len()];
        for (e, (bi, pos, head, j)) in self.elements((b, t, d)).enumerate() {
            let mut y = qkv[e];
            if head < self.q_heads + self.kv_heads {
                let cs = (bi * t + pos) * d + j;
                let rot = if j < half {
                    -qkv[e + half]
                } else {
                    qkv[e - half]
                };
                y = round(round(y * cos[cs]) + round(rot * sin[cs]));
            }
            out[self.split_index((bi, pos, head, j), (b, t), d)] = y;
        }
        Ok(out)
    }

    /// The adjoint on f32 values: `split` is `[dq | dk | dv]` flat.
    fn adjoint_reference(
        &self,
        split: &[f32],
        (b, t, d): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let (cos, sin) = self.tables.f32()?;
        let half = d / 2;
        let mut out = vec![0f32; split.len()];
        for (e, (bi, pos, head, j)) in self.elements((b, t, d)).enumerate() {
            let at = self.split_index((bi, pos, head, j), (b, t), d);
            let g = split[at];
            out[e] = if head < self.q_heads + self.kv_heads {
                let cs = (bi * t + pos) * d;
                let other = if j < half {
                    split[at + half] * sin[cs + j + half]
                } else {
                    -split[at - half] * sin[cs + j - half]
                };
                g * cos[cs + j] + other
            } else {
                g
            };
        }
        Ok(out)
    }
}

impl CustomOp1 for RopeQkv {
    fn name(&self) -> &'static str {
        "rope-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, width) = l.shape().dims3()?;
        let x = rows::to_f32(s, l)?;
        let y = self.reference(&x, (b, t, width / self.heads()), rows::rounding(s.dtype()))?;
        let shape = Shape::from(y.len());
        Ok((rows::from_f32(y, &shape, s.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::launch(self, None, (s, l), s.device(), "rope_qkv_fwd")?;
        Ok((out, Shape::from(l.shape().elem_count())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, width) = arg.dims3()?;
        let d = width / self.heads();
        let g = grad_res.to_dtype(arg.dtype())?;
        let part =
            |start: usize, h: usize| g.narrow(0, start, b * h * t * d)?.reshape((b, h, t, d));
        let (q_size, kv) = (b * self.q_heads * t * d, b * self.kv_heads * t * d);
        let dqkv = rope_qkv_adjoint(
            &part(0, self.q_heads)?,
            &part(q_size, self.kv_heads)?,
            &part(q_size + kv, self.kv_heads)?,
            &self.tables.cos,
            &self.tables.sin,
        )?;
        Ok(Some(dqkv))
    }
}

impl CustomOp3 for RopeQkvAdjoint {
    fn name(&self) -> &'static str {
        "rope-qkv-adjoint"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, _, t, d) = l1.shape().dims4()?;
        let split = [
            rows::to_f32(s1, l1)?,
            rows::to_f32(s2, l2)?,
            rows::to_f32(s3, l3)?,
        ]
        .concat();
        let out = self.0.adjoint_reference(&split, (b, t, d))?;
        let shape = Shape::from((b, t, self.0.heads() * d));
        Ok((rows::from_f32(out, &shape, s1.dtype())?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, _, t, d) = l1.shape().dims4()?;
        let out = cuda::launch(
            &self.0,
            Some([(s2, l2), (s3, l3)]),
            (s1, l1),
            s1.device(),
            "rope_qkv_bwd",
        )?;
        Ok((out, Shape::from((b, t, self.0.heads() * d))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, DeviceRepr, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Tensor};

    use super::RopeQkv;
    use crate::launch::{elementwise, i32_of, output, storage_of, view, Launch};

    /// The forward (`first` is `qkv`) or, with `more` = `[dk, dv]`, the adjoint (`first` is `dq`).
    pub fn launch(
        op: &RopeQkv,
        more: Option<[(&CudaStorage, &Layout); 2]>,
        first: (&CudaStorage, &Layout),
        dev: &CudaDevice,
        base: &str,
    ) -> Result<CudaStorage> {
        let (cos, cl) = storage_of(&op.tables.cos)?;
        let (sin, sl) = storage_of(&op.tables.sin)?;
        let (candle_core::Storage::Cuda(cos), candle_core::Storage::Cuda(sin)) = (&*cos, &*sin)
        else {
            unreachable!("storage_of checked the device")
        };
        let k = Split {
            op,
            first,
            more,
            cos: (cos, &cl),
            sin: (sin, &sl),
        };
        crate::launch::run(
            &k,
            first.0.dtype(),
            dev,
            ("ferrotune_rope_qkv", crate::ptx::ROPE_QKV),
            base,
        )
    }

    /// `rope_qkv_cache_<T>`: q into a new buffer, k and v into the caches at `start`.
    pub fn into_cache(
        qkv: &Tensor,
        tables: &super::Tables,
        (nh, nkv): (usize, usize),
        (k_cache, v_cache): (&Tensor, &Tensor),
        start: usize,
    ) -> Result<Tensor> {
        let (b, t, width) = qkv.dims3()?;
        let d = width / (nh + 2 * nkv);
        let capacity = k_cache.dim(2)?;
        // SAFETY: the kernel writes every element of q (one thread per element of qkv).
        let q = unsafe { Tensor::empty((b, nh, t, d), qkv.dtype(), qkv.device())? };
        let candle_core::Device::Cuda(dev) = qkv.device() else {
            candle_core::bail!("rope_qkv_into_cache: qkv is not on the GPU")
        };
        let func = crate::launch::function(
            qkv.dtype(),
            dev,
            ("ferrotune_rope_qkv", crate::ptx::ROPE_QKV),
            "rope_qkv_cache",
        )?;
        let n = qkv.elem_count();
        let ints = [
            i32_of(nh, "query heads")?,
            i32_of(nkv, "kv heads")?,
            i32_of(t, "positions")?,
            i32_of(d, "head dim")?,
            i32_of(capacity, "cache capacity")?,
            i32_of(start, "cache start")?,
        ];
        let tensors = [qkv, &tables.cos, &tables.sin, &q, k_cache, v_cache];
        crate::launch::with_storages(&tensors, |s| {
            fn go<T: CudaDType + DeviceRepr>(
                dev: &CudaDevice,
                func: &CudaFunction,
                s: &[(&CudaStorage, usize)],
                n: usize,
                ints: &[i32; 6],
            ) -> Result<()> {
                let x = |i| crate::launch::typed::<T>(s, i);
                let n64 = n as i64;
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(func);
                let (qkv, cos, sin, q, kc, vc) = (x(0)?, x(1)?, x(2)?, x(3)?, x(4)?, x(5)?);
                l.arg(&qkv)
                    .arg(&cos)
                    .arg(&sin)
                    .arg(&q)
                    .arg(&kc)
                    .arg(&vc)
                    .arg(&n64);
                for v in ints {
                    l.arg(v);
                }
                // SAFETY: the arguments match rope_qkv_cache_<T>; q was just allocated
                // ([b, nh, t, d]); the caches are contiguous [b, nkv, capacity, d] with
                // start + t <= capacity (checked by the caller), the kernel writes only there.
                unsafe { l.launch(elementwise(n)) }.w()?;
                Ok(())
            }
            match qkv.dtype() {
                candle_core::DType::F32 => go::<f32>(dev, &func, s, n, &ints),
                candle_core::DType::BF16 => go::<half::bf16>(dev, &func, s, n, &ints),
                _ => go::<half::f16>(dev, &func, s, n, &ints),
            }
        })?;
        Ok(q)
    }

    struct Split<'a> {
        op: &'a RopeQkv,
        first: (&'a CudaStorage, &'a Layout),
        more: Option<[(&'a CudaStorage, &'a Layout); 2]>,
        cos: (&'a CudaStorage, &'a Layout),
        sin: (&'a CudaStorage, &'a Layout),
    }

    impl Launch for Split<'_> {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<T>> {
            // (b, t, d) from the tables; n counts every head's elements.
            let (_, t, d) = self.cos.1.shape().dims3()?;
            let n = match self.more {
                None => self.first.1.shape().elem_count(),
                Some([(_, lk), (_, lv)]) => {
                    self.first.1.shape().elem_count()
                        + lk.shape().elem_count()
                        + lv.shape().elem_count()
                }
            };
            let first = view::<T>(self.first.0, self.first.1)?;
            let more = match self.more {
                Some([(sk, lk), (sv, lv)]) => Some((view::<T>(sk, lk)?, view::<T>(sv, lv)?)),
                None => None,
            };
            let cos = view::<T>(self.cos.0, self.cos.1)?;
            let sin = view::<T>(self.sin.0, self.sin.1)?;
            let out = output::<T>(dev, n)?;
            let (n64, nh, nkv, t32, d32) = (
                n as i64,
                i32_of(self.op.q_heads, "query heads")?,
                i32_of(self.op.kv_heads, "kv heads")?,
                i32_of(t, "positions")?,
                i32_of(d, "head dim")?,
            );
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(func);
            b.arg(&first);
            if let Some((dk, dv)) = &more {
                b.arg(dk);
                b.arg(dv);
            }
            b.arg(&cos);
            b.arg(&sin);
            b.arg(&out);
            b.arg(&n64);
            b.arg(&nh);
            b.arg(&nkv);
            b.arg(&t32);
            b.arg(&d32);
            // SAFETY: the arguments match rope_qkv_{fwd,bwd}_<T>'s signature.
            unsafe { b.launch(elementwise(n)) }.w()?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Into the cache: q as `rope_qkv` gives it, k and v in the cache columns from `start`, every
    /// other column as it was; a cache without room is an error naming the sizes.
    #[test]
    fn into_cache_writes_the_new_columns_and_returns_q() {
        let cpu = &Device::Cpu;
        let (b, t, nh, nkv, d, cap, start) = (2, 3, 6, 2, 8, 9, 4);
        let qkv = Tensor::randn(0f32, 1.0, (b, t, (nh + 2 * nkv) * d), cpu).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (b, t, d), cpu).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (b, t, d), cpu).unwrap();
        let (q0, k0, v0) = rope_qkv(&qkv, &cos, &sin, (nh, nkv)).unwrap();
        let kc = Tensor::randn(0f32, 1.0, (b, nkv, cap, d), cpu).unwrap();
        let vc = Tensor::randn(0f32, 1.0, (b, nkv, cap, d), cpu).unwrap();
        let (k_before, v_before) = (kc.copy().unwrap(), vc.copy().unwrap());
        let q = rope_qkv_into_cache(&qkv, &cos, &sin, (nh, nkv), (&kc, &vc), start).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert!(same(&q, &q0));
        for (cache, before, new) in [(&kc, &k_before, &k0), (&vc, &v_before, &v0)] {
            assert!(same(&cache.narrow(2, start, t).unwrap(), new));
            assert!(same(
                &cache.narrow(2, 0, start).unwrap(),
                &before.narrow(2, 0, start).unwrap()
            ));
            let rest = cap - start - t;
            assert!(same(
                &cache.narrow(2, start + t, rest).unwrap(),
                &before.narrow(2, start + t, rest).unwrap()
            ));
        }
        let err = rope_qkv_into_cache(&qkv, &cos, &sin, (nh, nkv), (&kc, &vc), cap - 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot take 3 columns at 8"), "{err}");
    }

    /// Split into heads and rotated with the separate ops: the same values (bit for bit in f32),
    /// and the same `qkv` gradient through both, with GQA (6 query heads on 2 kv heads), two rows.
    #[test]
    fn the_cpu_reference_matches_split_heads_and_rope() {
        let cpu = &Device::Cpu;
        let (b, t, nh, nkv, d) = (2, 5, 6, 2, 8);
        let cos = Tensor::randn(0f32, 1.0, (b, t, d), cpu).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (b, t, d), cpu).unwrap();
        let qkv =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, (nh + 2 * nkv) * d), cpu).unwrap())
                .unwrap();
        let separate = |x: &Tensor| -> Result<Vec<Tensor>> {
            let all = x.reshape((b, t, nh + 2 * nkv, d))?;
            let heads = |s: usize, n: usize| all.narrow(2, s, n)?.transpose(1, 2)?.contiguous();
            Ok(vec![
                crate::rope(&heads(0, nh)?, &cos, &sin)?,
                crate::rope(&heads(nh, nkv)?, &cos, &sin)?,
                heads(nh + nkv, nkv)?,
            ])
        };
        let fused = |x: &Tensor| -> Result<Vec<Tensor>> {
            let (q, k, v) = rope_qkv(x, &cos, &sin, (nh, nkv))?;
            Ok(vec![q, k, v])
        };
        let (a, c) = (fused(&qkv).unwrap(), separate(&qkv).unwrap());
        let probes: Vec<Tensor> = c
            .iter()
            .map(|p| Tensor::randn(0f32, 1.0, p.dims(), cpu).unwrap())
            .collect();
        let weighted = |parts: &[Tensor]| {
            parts
                .iter()
                .zip(&probes)
                .map(|(p, w)| (p * w).unwrap().sum_all().unwrap())
                .reduce(|x, y| (x + y).unwrap())
                .unwrap()
        };
        for (x, y) in a.iter().zip(&c) {
            assert_eq!(x.dims(), y.dims());
            let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "forward");
        }
        let ga = weighted(&a).backward().unwrap();
        let gc = weighted(&c).backward().unwrap();
        let (ga, gc) = (
            ga.get(qkv.as_tensor()).unwrap(),
            gc.get(qkv.as_tensor()).unwrap(),
        );
        let diff = (ga - gc).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() <= 1e-6, "gradient");
        // The adjoint called directly equals the backward through the op.
        let direct = rope_qkv_adjoint(&probes[0], &probes[1], &probes[2], &cos, &sin).unwrap();
        let diff = (direct - gc).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() <= 1e-6, "adjoint");
    }

    /// In bf16 the products are rounded as the separate rotation rounds them.
    #[test]
    fn bf16_rounds_as_the_separate_rotation() {
        let cpu = &Device::Cpu;
        let (b, t, nh, nkv, d) = (1, 3, 2, 1, 4);
        let bf = |dims: &[usize]| {
            Tensor::randn(0f32, 1.0, dims, cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let (cos, sin, qkv) = (
            bf(&[b, t, d]),
            bf(&[b, t, d]),
            bf(&[b, t, (nh + 2 * nkv) * d]),
        );
        let (q, k, _) = rope_qkv(&qkv, &cos, &sin, (nh, nkv)).unwrap();
        let all = qkv.reshape((b, t, nh + 2 * nkv, d)).unwrap();
        let heads = |s: usize, n: usize| {
            all.narrow(2, s, n)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        for (fused, part) in [(q, heads(0, nh)), (k, heads(nh, nkv))] {
            let separate = crate::rope(&part, &cos, &sin).unwrap();
            let diff = (fused.to_dtype(DType::F32).unwrap()
                - separate.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
            assert_eq!(diff, 0.0);
        }
    }

    #[test]
    fn a_width_that_is_not_a_multiple_of_the_heads_is_an_error() {
        let cpu = &Device::Cpu;
        let qkv = Tensor::zeros((1, 2, 30), DType::F32, cpu).unwrap();
        let cs = Tensor::zeros((1, 2, 4), DType::F32, cpu).unwrap();
        let err = rope_qkv(&qkv, &cs, &cs, (4, 2)).unwrap_err().to_string();
        assert!(err.contains("not a multiple of 8 heads"), "{err}");
    }
}
