//! Attention of a few new query positions against the KV cache in one kernel
//! (`cuda/decode_attention.cu`): `softmax(scale · q·kᵀ + bias) · v` with the keys and values read
//! where they lie in the cache's buffers, kv heads shared by query-head groups (GQA) without
//! repeating them, and the output written in the `[b, t, heads, d]` layout `o_proj` reads.
//!
//! Composed, one decoded token costs a GEMM for the scores, the softmax kernel, a GEMM for the
//! output and (for GQA) the repeated heads, per layer; with a batch of one they are each tiny and
//! the step is bound by launches. Inference only: it records no backward.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::rows;

/// Queries that may take this kernel: decoding steps and short extensions. Longer blocks (a
/// prefill) are GEMM work.
pub const MAX_QUERIES: usize = 16;

/// Head dimensions the kernel holds in registers (32 lanes × 8).
pub const MAX_HEAD_DIM: usize = 256;

/// `q` `[b, heads, tq, d]`, `k`/`v` `[b, kv_heads, t, d]` (any strides across batch and heads;
/// rows of `d` contiguous, as a narrow of the cache's buffers is), `bias` `[b or 1, 1, tq, t]`
/// f32. Returns `[b, tq, heads, d]` in q's dtype.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, heads, tq, d) = q.dims4()?;
    let (kb, kv_heads, t, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!(
            "decode_attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!("decode_attention: q, k and v must share a dtype");
    }
    let (bb, one, bq, bk) = bias.dims4()?;
    if one != 1 || bq != tq || bk != t || (bb != 1 && bb != b) || bias.dtype() != DType::F32 {
        candle_core::bail!(
            "decode_attention: bias {:?} {:?} for {tq} queries over {t} keys",
            bias.dims(),
            bias.dtype()
        );
    }
    if d > MAX_HEAD_DIM || d == 0 {
        candle_core::bail!("decode_attention: head dimension {d} (at most {MAX_HEAD_DIM})");
    }
    let rows_contiguous =
        |x: &Tensor| x.stride()[3] == 1 && (x.stride()[2] == d || x.dim(2).is_ok_and(|n| n <= 1));
    let (k, v) = (
        if rows_contiguous(k) {
            k.clone()
        } else {
            k.contiguous()?
        },
        if rows_contiguous(v) {
            v.clone()
        } else {
            v.contiguous()?
        },
    );
    q.contiguous()?.apply_op3_no_bwd(
        &k,
        &v,
        &DecodeAttention {
            bias: bias.contiguous()?,
            scale: scale as f32,
            bias_batched: bb != 1,
        },
    )
}

struct DecodeAttention {
    bias: Tensor,
    scale: f32,
    bias_batched: bool,
}

impl DecodeAttention {
    /// The forward in f32 on contiguous `q`, `k`, `v`: the kernel's reference.
    fn reference(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        (b, heads, kv_heads, tq, t, d): (usize, usize, usize, usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let bias = self.bias.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; b * tq * heads * d];
        for bi in 0..b {
            for h in 0..heads {
                let kh = h / (heads / kv_heads);
                let keys = &k[(bi * kv_heads + kh) * t * d..][..t * d];
                let values = &v[(bi * kv_heads + kh) * t * d..][..t * d];
                for i in 0..tq {
                    let qr = &q[((bi * heads + h) * tq + i) * d..][..d];
                    let br = &bias[((if self.bias_batched { bi * tq } else { 0 }) + i) * t..][..t];
                    let x: Vec<f32> = keys
                        .chunks(d)
                        .zip(br)
                        .map(|(kr, bj)| {
                            qr.iter().zip(kr).map(|(a, c)| a * c).sum::<f32>() * self.scale + bj
                        })
                        .collect();
                    let m = x.iter().copied().fold(f32::MIN, f32::max);
                    let p: Vec<f32> = x.iter().map(|x| (x - m).exp()).collect();
                    let z: f32 = p.iter().sum();
                    let o = &mut out[((bi * tq + i) * heads + h) * d..][..d];
                    for (pj, vr) in p.iter().zip(values.chunks(d)) {
                        for (o, v) in o.iter_mut().zip(vr) {
                            *o += pj * v;
                        }
                    }
                    o.iter_mut().for_each(|o| *o /= z);
                }
            }
        }
        Ok(out)
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
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
        use candle_core::backend::BackendStorage;
        let (b, heads, tq, d) = l1.shape().dims4()?;
        let (_, kv_heads, t, _) = l2.shape().dims4()?;
        let (q, k, v) = (
            rows::to_f32(s1, l1)?,
            rows::to_f32(s2, l2)?,
            rows::to_f32(s3, l3)?,
        );
        let out = self.reference((&q, &k, &v), (b, heads, kv_heads, tq, t, d))?;
        let shape = Shape::from((b, tq, heads, d));
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
        use candle_core::backend::BackendStorage;
        let (b, heads, tq, d) = l1.shape().dims4()?;
        let (bias, bl) = crate::launch::storage_of(&self.bias)?;
        let candle_core::Storage::Cuda(bias) = &*bias else {
            unreachable!("storage_of checked the device")
        };
        let k = cuda::Attend {
            q: (s1, l1),
            k: (s2, l2),
            v: (s3, l3),
            bias: (bias, &bl),
            op: self,
        };
        let out = crate::launch::run(
            &k,
            s1.dtype(),
            s1.device(),
            ("ferrotune_decode_attention", crate::ptx::DECODE_ATTENTION),
            "decode_attention",
        )?;
        Ok((out, Shape::from((b, tq, heads, d))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result};

    use super::DecodeAttention;
    use crate::launch::{i32_of, output, view, Launch};

    pub struct Attend<'a> {
        pub q: (&'a CudaStorage, &'a Layout),
        pub k: (&'a CudaStorage, &'a Layout),
        pub v: (&'a CudaStorage, &'a Layout),
        pub bias: (&'a CudaStorage, &'a Layout),
        pub op: &'a DecodeAttention,
    }

    /// The elements from `layout`'s offset, for a strided operand (the kernel takes the strides).
    fn strided<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
    }

    impl Launch for Attend<'_> {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dev: &CudaDevice,
            func: &CudaFunction,
        ) -> Result<CudaSlice<T>> {
            let (b, heads, tq, d) = self.q.1.shape().dims4()?;
            let (_, kv_heads, t, _) = self.k.1.shape().dims4()?;
            let q = view::<T>(self.q.0, self.q.1)?;
            let k = strided::<T>(self.k.0, self.k.1)?;
            let v = strided::<T>(self.v.0, self.v.1)?;
            let bias = view::<f32>(self.bias.0, self.bias.1)?;
            let out = output::<T>(dev, b * tq * heads * d)?;
            let (ks, vs) = (self.k.1.stride(), self.v.1.stride());
            let (k_batch, k_head, v_batch, v_head) =
                (ks[0] as i64, ks[1] as i64, vs[0] as i64, vs[1] as i64);
            let (heads32, kv32, tq32, t32, d32) = (
                i32_of(heads, "heads")?,
                i32_of(kv_heads, "kv heads")?,
                i32_of(tq, "queries")?,
                i32_of(t, "keys")?,
                i32_of(d, "head dim")?,
            );
            let batched = i32::from(self.op.bias_batched);
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(func);
            l.arg(&q);
            l.arg(&k);
            l.arg(&v);
            l.arg(&bias);
            l.arg(&out);
            l.arg(&heads32);
            l.arg(&kv32);
            l.arg(&tq32);
            l.arg(&t32);
            l.arg(&d32);
            l.arg(&k_batch);
            l.arg(&k_head);
            l.arg(&v_batch);
            l.arg(&v_head);
            l.arg(&batched);
            l.arg(&self.op.scale);
            let cfg = LaunchConfig {
                grid_dim: ((b * heads * tq) as u32, 1, 1),
                // WARPS in decode_attention.cu.
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match decode_attention_<T>'s signature; the strides address
            // only elements of k's and v's storages (their layouts' own).
            unsafe { l.launch(cfg) }.w()?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The composed attention `softmax(scale · q·kᵀ + bias) · v` with repeated kv heads.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Tensor {
        let (b, heads, _, d) = q.dims4().unwrap();
        let (_, kv, t, _) = k.dims4().unwrap();
        let rep = |x: &Tensor| {
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kv, heads / kv, t, d))
                .unwrap()
                .reshape((b, heads, t, d))
                .unwrap()
        };
        let s = (q.matmul(&rep(k).t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(bias)
            .unwrap();
        let m = s.max_keepdim(D::Minus1).unwrap();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&rep(v)).unwrap().transpose(1, 2).unwrap()
    }

    /// Against the composed ops: keys read from a cache buffer with spare room (a strided
    /// narrow), GQA (6 query heads on 2 kv heads), two rows with a padding mask, one and three
    /// queries, an odd head dimension.
    #[test]
    fn the_cpu_reference_matches_the_composed_attention_on_a_cache_view() {
        let cpu = &Device::Cpu;
        let (b, heads, kv, t, cap, d) = (2, 6, 2, 11, 16, 40);
        let buf = |s| Tensor::randn(0f32, 1.0, (b, kv, cap, d), cpu).unwrap() * s;
        let (kbuf, vbuf) = (buf(1.0).unwrap(), buf(2.0).unwrap());
        let (k, v) = (kbuf.narrow(2, 0, t).unwrap(), vbuf.narrow(2, 0, t).unwrap());
        assert!(!k.is_contiguous());
        for tq in [1, 3] {
            let q = Tensor::randn(0f32, 1.0, (b, heads, tq, d), cpu).unwrap();
            // Row 1 pads its first two keys; each query sees keys up to its own position.
            let bias: Vec<f32> = (0..b * tq * t)
                .map(|e| {
                    let (row, i, j) = (e / (tq * t), (e / t) % tq, e % t);
                    if (row == 1 && j < 2) || j > t - tq + i {
                        f32::MIN
                    } else {
                        0.0
                    }
                })
                .collect();
            let bias = Tensor::from_vec(bias, (b, 1, tq, t), cpu).unwrap();
            let fused = decode_attention(&q, &k, &v, &bias, 0.3).unwrap();
            assert_eq!(fused.dims(), [b, tq, heads, d]);
            let want = composed(&q, &k, &v, &bias, 0.3);
            let diff = (fused - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff <= 1e-5, "{tq} queries: differs by {diff}");
        }
    }

    #[test]
    fn mismatched_heads_are_an_error() {
        let cpu = &Device::Cpu;
        let q = Tensor::zeros((1, 5, 1, 8), DType::F32, cpu).unwrap();
        let k = Tensor::zeros((1, 2, 4, 8), DType::F32, cpu).unwrap();
        let bias = Tensor::zeros((1, 1, 1, 4), DType::F32, cpu).unwrap();
        let err = decode_attention(&q, &k, &k, &bias, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
    }
}
