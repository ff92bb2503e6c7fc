//! Causal attention for training without the score matrix (`cuda/flash_attention.cu`,
//! flash-attention-2's algorithm on the tensor cores): the forward keeps only each row's
//! log-sum-exp, the backward recomputes the probabilities tile by tile from it.
//!
//! Composed, one layer at 2,048 tokens and 32 heads writes and reads a 256 MiB score matrix (bf16)
//! several times per pass and computes the half of it above the diagonal only to mask it; here
//! nothing score-sized exists, and tiles above the diagonal are skipped. The bias is first
//! classified per 64 × 64 tile (one small kernel, once per bias tensor: every layer reads the same): tiles it masks entirely (outside a
//! sliding window, across packed documents) are skipped too, and tiles where it is 0 wherever
//! causal attention is allowed are computed without reading it.
//!
//! Semantics, on every device: query `i` attends key `j` where `j ≤ i` and the bias at `(i, j)` is
//! above [`MASKED`] (the model's bias holds 0 or `f32::MIN`); allowed scores are
//! `scale · q·k + bias`. A row with no allowed key gets output 0 and log-sum-exp `+∞` (the
//! composed softmax would average every value there; such rows are padding, whose loss is
//! masked).
//!
//! The kernels take bf16/f16 on compute capability 8.0 or later (mma.sync), head dims up to
//! [`MAX_HEAD_DIM`]. On the CPU the f32 reference below runs for any float dtype: it is what the
//! GPU tests compare against and how the CPU tests drive the model's flash path.

use candle_core::{DType, Device, Result, Tensor};

/// Head dimensions the kernels hold (instantiated for 32, 64, 96 and 128, zero padded between).
pub const MAX_HEAD_DIM: usize = 128;

/// The most 64-position blocks one call takes (CUDA's grid y dimension).
pub const MAX_GRID_Y: usize = 65_535;

/// Bias at or below this forbids a key (the kernels' `MASKED`).
pub const MASKED: f32 = -1e30;

/// Whether [`flash_attention`] runs for `q` (`[b, heads, t, d]`) on its device: on the CPU for
/// any float dtype (the reference), on CUDA for bf16/f16 with `d ≤ MAX_HEAD_DIM` on compute
/// capability 8.0 or later.
pub fn supports(q: &Tensor) -> bool {
    match q.device() {
        Device::Cpu => q.dtype().is_float(),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let d = q.dims().last().copied().unwrap_or(0);
            matches!(q.dtype(), DType::BF16 | DType::F16)
                && (1..=MAX_HEAD_DIM).contains(&d)
                && cuda::has_mma(dev)
        }
        _ => false,
    }
}

/// `softmax(scale · q·kᵀ + bias) · v`, causal, for `q`, `k`, `v` `[b, heads, t, d]` (heads
/// already repeated for GQA) and an f32 `bias` `[b or 1, 1, t, t]`. Returns the output in the
/// `[b, t, heads, d]` layout `o_proj` reads (q's dtype) and each row's log-sum-exp `[b, heads, t]`
/// (f32), which [`flash_attention_grad`] needs.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let dims = check(q, k, v, bias)?;
    let (q, k, v, bias) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        bias.contiguous()?,
    );
    match q.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::forward(&q, &k, &v, &bias, dims, scale as f32),
        _ => reference::forward(&q, &k, &v, &bias, dims, scale as f32),
    }
}

/// `dq`, `dk`, `dv` (`[b, heads, t, d]`, q's dtype) of [`flash_attention`] given its `out` and
/// `lse` and the output's gradient `dout` (`[b, t, heads, d]`).
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_grad(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = check(q, k, v, bias)?;
    let (b, h, t, d) = dims.shape;
    if out.dims() != [b, t, h, d] || dout.dims() != [b, t, h, d] || lse.dims() != [b, h, t] {
        candle_core::bail!(
            "flash_attention_grad: out {:?}, dout {:?}, lse {:?} for q {:?}",
            out.dims(),
            dout.dims(),
            lse.dims(),
            q.dims()
        );
    }
    if out.dtype() != q.dtype() || dout.dtype() != q.dtype() || lse.dtype() != DType::F32 {
        candle_core::bail!("flash_attention_grad: out and dout in q's dtype, lse in f32");
    }
    let c = |x: &Tensor| x.contiguous();
    let (q, k, v, bias) = (c(q)?, c(k)?, c(v)?, c(bias)?);
    let (out, lse, dout) = (c(out)?, c(lse)?, c(dout)?);
    match q.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::backward(&q, &k, &v, &bias, &out, &lse, &dout, dims, scale as f32),
        _ => reference::backward(&q, &k, &v, &bias, &lse, &dout, &out, dims, scale as f32),
    }
}

/// The operands' sizes, checked.
#[derive(Clone, Copy)]
struct Dims {
    shape: (usize, usize, usize, usize),
    bias_batched: bool,
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Dims> {
    let (b, h, t, d) = q.dims4()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        candle_core::bail!(
            "flash_attention: q {:?}, k {:?}, v {:?} must have one shape (repeat kv heads first)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() || !q.dtype().is_float() {
        candle_core::bail!("flash_attention: q, k and v must share a float dtype");
    }
    if t.div_ceil(64) > MAX_GRID_Y {
        candle_core::bail!(
            "flash_attention: {t} positions exceed the kernels' grid ({MAX_GRID_Y} blocks of 64)"
        );
    }
    if !supports(q) {
        candle_core::bail!(
            "flash_attention: no kernel for {:?} with head dim {d} on {:?} (bf16/f16, d ≤ \
             {MAX_HEAD_DIM}, compute capability 8.0+)",
            q.dtype(),
            q.device()
        );
    }
    let (bb, one, bq, bk) = bias.dims4()?;
    if one != 1 || bq != t || bk != t || (bb != 1 && bb != b) || bias.dtype() != DType::F32 {
        candle_core::bail!(
            "flash_attention: bias {:?} {:?} for {t} positions (f32 [b or 1, 1, t, t])",
            bias.dims(),
            bias.dtype()
        );
    }
    Ok(Dims {
        shape: (b, h, t, d),
        bias_batched: bb != 1,
    })
}

/// The f32 reference: the kernels' arithmetic without the tiling (and without rounding the
/// probabilities and score gradients to bf16/f16 before their products, as the kernels do).
mod reference {
    use super::{Dims, MASKED};
    use candle_core::{DType, Result, Tensor};

    fn values(t: &Tensor) -> Result<Vec<f32>> {
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
    }

    /// Calls `f(batch row, head, that row's bias [t, t], [q, k, v] of that head [t, d])` for
    /// every head of the batch.
    fn for_each_head(
        dims: Dims,
        bias: &[f32],
        [q, k, v]: [&[f32]; 3],
        mut f: impl FnMut(usize, usize, &[f32], [&[f32]; 3]),
    ) {
        let (b, h, t, d) = dims.shape;
        for bi in 0..b {
            let bias_b = &bias[if dims.bias_batched { bi * t * t } else { 0 }..][..t * t];
            for hi in 0..h {
                let head = (bi * h + hi) * t * d;
                let [q, k, v] = [q, k, v].map(|x| &x[head..][..t * d]);
                f(bi, hi, bias_b, [q, k, v]);
            }
        }
    }

    /// The allowed scores of row `i` of one (batch, head), `-∞` where forbidden.
    fn scores(q: &[f32], k: &[f32], bias_row: &[f32], i: usize, d: usize, scale: f32) -> Vec<f32> {
        let qi = &q[i * d..][..d];
        (0..bias_row.len())
            .map(|j| {
                if j > i || bias_row[j] <= MASKED {
                    f32::NEG_INFINITY
                } else {
                    let dot: f32 = qi.iter().zip(&k[j * d..][..d]).map(|(a, b)| a * b).sum();
                    dot * scale + bias_row[j]
                }
            })
            .collect()
    }

    pub fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        dims: Dims,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = dims.shape;
        let (qv, kv, vv, bv) = (values(q)?, values(k)?, values(v)?, values(bias)?);
        let mut out = vec![0f32; b * t * h * d];
        let mut lse = vec![f32::INFINITY; b * h * t];
        for_each_head(
            dims,
            &bv,
            [&qv, &kv, &vv],
            |bi, hi, bias_b, [qh, kh, vh]| {
                for i in 0..t {
                    let x = scores(qh, kh, &bias_b[i * t..][..t], i, d, scale);
                    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    if m == f32::NEG_INFINITY {
                        continue;
                    }
                    let p: Vec<f32> = x.iter().map(|x| (x - m).exp()).collect();
                    let z: f32 = p.iter().sum();
                    let o = &mut out[((bi * t + i) * h + hi) * d..][..d];
                    for (pj, vr) in p.iter().zip(vh.chunks(d)) {
                        o.iter_mut().zip(vr).for_each(|(o, v)| *o += pj * v);
                    }
                    o.iter_mut().for_each(|o| *o /= z);
                    lse[(bi * h + hi) * t + i] = m + z.ln();
                }
            },
        );
        let out = Tensor::from_vec(out, (b, t, h, d), q.device())?.to_dtype(q.dtype())?;
        Ok((out, Tensor::from_vec(lse, (b, h, t), q.device())?))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
        out: &Tensor,
        dims: Dims,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, h, t, d) = dims.shape;
        let (qv, kv, vv, bv) = (values(q)?, values(k)?, values(v)?, values(bias)?);
        let (lv, gv, ov) = (values(lse)?, values(dout)?, values(out)?);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; qv.len()],
            vec![0f32; qv.len()],
            vec![0f32; qv.len()],
        );
        for_each_head(
            dims,
            &bv,
            [&qv, &kv, &vv],
            |bi, hi, bias_b, [qh, kh, vh]| {
                let head = (bi * h + hi) * t * d;
                for i in 0..t {
                    let row = ((bi * t + i) * h + hi) * d;
                    let (g, o) = (&gv[row..][..d], &ov[row..][..d]);
                    // Σ_j P_ij dP_ij = dout_i · out_i.
                    let delta: f32 = g.iter().zip(o).map(|(a, b)| a * b).sum();
                    let x = scores(qh, kh, &bias_b[i * t..][..t], i, d, scale);
                    let l = lv[(bi * h + hi) * t + i];
                    for (j, xj) in x.iter().enumerate() {
                        let p = (xj - l).exp();
                        if p == 0.0 || !p.is_finite() {
                            continue;
                        }
                        let (kj, vj) = (&kh[j * d..][..d], &vh[j * d..][..d]);
                        let dp: f32 = g.iter().zip(vj).map(|(a, b)| a * b).sum();
                        let ds = p * (dp - delta) * scale;
                        let (dqi, dkj, dvj) = (i * d, j * d, j * d);
                        for c in 0..d {
                            dv[head + dvj + c] += p * g[c];
                            dq[head + dqi + c] += ds * kj[c];
                            dk[head + dkj + c] += ds * qh[i * d + c];
                        }
                    }
                }
            },
        );
        let back = |x: Vec<f32>| -> Result<Tensor> {
            Tensor::from_vec(x, (b, h, t, d), q.device())?.to_dtype(q.dtype())
        };
        Ok((back(dq)?, back(dk)?, back(dv)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Result, Tensor};

    use super::Dims;
    use crate::launch::{function, i32_of, typed, with_storages};

    const MODULE: (&str, &str) = ("ferrotune_flash_attention", crate::ptx::FLASH_ATTENTION);
    /// BQ (forward queries per block) and BK (backward keys per block) in the .cu file.
    const BLOCK: usize = 64;
    /// WARPS · 32.
    const THREADS: u32 = 128;

    /// Whether the device has the bf16/f16 mma.sync the kernels use (compute capability 8.0+).
    pub fn has_mma(dev: &CudaDevice) -> bool {
        dev.cuda_stream()
            .context()
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 8)
    }

    /// The head dimension the kernel is instantiated for: the smallest of 32, 64, 96, 128 ≥ d.
    fn padded(d: usize) -> usize {
        d.div_ceil(32) * 32
    }

    /// The kernels' int arguments: heads, positions, head dim, whether the bias is per batch row.
    type Ints = (i32, i32, i32, i32);

    /// The device, the bias's tile kinds and the kernels' [`Ints`], checked to fit.
    fn prologue(q: &Tensor, bias: &Tensor, dims: Dims) -> Result<(CudaDevice, Tensor, Ints)> {
        let (b, h, t, d) = dims.shape;
        let dev = device(q)?;
        let kinds = tile_kinds(bias, dims, &dev)?;
        i32_of(b * h * t * d, "attention elements")?;
        let ints = (
            i32_of(h, "heads")?,
            i32_of(t, "positions")?,
            i32_of(d, "head dim")?,
            i32::from(dims.bias_batched),
        );
        Ok((dev, kinds, ints))
    }

    /// `flash_attention_<pass>_d<D>_<dtype>` for head dim `d`.
    fn sized_kernel(q: &Tensor, dev: &CudaDevice, pass: &str, d: usize) -> Result<CudaFunction> {
        function(
            q.dtype(),
            dev,
            MODULE,
            &format!("flash_attention_{pass}_d{}", padded(d)),
        )
    }

    fn device(t: &Tensor) -> Result<CudaDevice> {
        match t.device() {
            candle_core::Device::Cuda(d) => Ok(d.clone()),
            other => candle_core::bail!("flash_attention: expected a CUDA tensor, got {other:?}"),
        }
    }

    /// The kernels' tile kinds for `bias` (`flash_attention_tile_kinds`: one byte per 64 × 64
    /// tile of each bias row, skip / plain causal / read the bias), `[b or 1, blocks, blocks]`.
    fn tile_kinds(bias: &Tensor, dims: Dims, dev: &CudaDevice) -> Result<Tensor> {
        // Every layer's forward, re-run and backward reads the one bias of the batch: classify
        // it once. A tensor's id is never reused, and a tensor never changes, so the id is a key.
        thread_local! {
            static LAST: std::cell::RefCell<Option<(candle_core::TensorId, Tensor)>> =
                const { std::cell::RefCell::new(None) };
        }
        if let Some(kinds) = LAST.with_borrow(|last| {
            last.as_ref()
                .filter(|(id, _)| *id == bias.id())
                .map(|(_, kinds)| kinds.clone())
        }) {
            return Ok(kinds);
        }
        let kinds = classify(bias, dims, dev)?;
        LAST.set(Some((bias.id(), kinds.clone())));
        Ok(kinds)
    }

    fn classify(bias: &Tensor, dims: Dims, dev: &CudaDevice) -> Result<Tensor> {
        let (b, _, t, _) = dims.shape;
        let blocks = t.div_ceil(BLOCK);
        let rows = if dims.bias_batched { b } else { 1 };
        // SAFETY: the kernel writes every tile's kind (one block per tile) before anything reads.
        let kinds = unsafe { Tensor::empty((rows, blocks, blocks), DType::U8, bias.device())? };
        let func = dev
            .get_or_load_custom_func("flash_attention_tile_kinds", MODULE.0, MODULE.1)?
            .into_cuda_function();
        let t32 = i32_of(t, "positions")?;
        with_storages(&[bias, &kinds], |s| {
            let (bias, kinds) = (typed::<f32>(s, 0)?, typed::<u8>(s, 1)?);
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(&func);
            l.arg(&bias).arg(&kinds).arg(&t32);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, blocks as u32, rows as u32),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match flash_attention_tile_kinds; kinds was just allocated
            // ([rows, blocks, blocks]) and nothing else holds it.
            unsafe { l.launch(cfg) }.w()?;
            Ok(())
        })?;
        Ok(kinds)
    }

    fn grid(t: usize, bh: usize) -> LaunchConfig {
        LaunchConfig {
            // (b·h, position blocks): the kernels put every head's heaviest block first.
            grid_dim: (bh as u32, t.div_ceil(BLOCK) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        dims: Dims,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = dims.shape;
        // SAFETY: the forward writes every row of out and lse, whichever tiles it skips (a row
        // that attends nothing gets 0 and +inf).
        let (out, lse) = unsafe {
            (
                Tensor::empty((b, t, h, d), q.dtype(), q.device())?,
                Tensor::empty((b, h, t), DType::F32, q.device())?,
            )
        };
        let (dev, kinds, ints) = prologue(q, bias, dims)?;
        let func = sized_kernel(q, &dev, "fwd", d)?;
        with_storages(&[q, k, v, bias, &out, &lse, &kinds], |s| {
            fn go<T: CudaDType + DeviceRepr>(
                dev: &CudaDevice,
                func: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
                s: &[(&CudaStorage, usize)],
                (h, t, d, batched): Ints,
                scale: f32,
                cfg: LaunchConfig,
            ) -> Result<()> {
                let (x, f) = (|i| typed::<T>(s, i), |i| typed::<f32>(s, i));
                let (q, k, v, bias, out, lse) = (x(0)?, x(1)?, x(2)?, f(3)?, x(4)?, f(5)?);
                let kinds = typed::<u8>(s, 6)?;
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(func);
                l.arg(&q)
                    .arg(&k)
                    .arg(&v)
                    .arg(&bias)
                    .arg(&kinds)
                    .arg(&out)
                    .arg(&lse);
                l.arg(&h).arg(&t).arg(&d).arg(&batched).arg(&scale);
                // SAFETY: the arguments match flash_attention_fwd_d*_<T>; out and lse were just
                // allocated for this call ([b, t, h, d] and [b, h, t]) and nothing else holds them.
                unsafe { l.launch(cfg) }.w()?;
                Ok(())
            }
            let cfg = grid(t, b * h);
            match q.dtype() {
                DType::BF16 => go::<half::bf16>(&dev, &func, s, ints, scale, cfg),
                _ => go::<half::f16>(&dev, &func, s, ints, scale, cfg),
            }
        })?;
        Ok((out, lse))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
        dims: Dims,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, h, t, d) = dims.shape;
        // dq is summed into with atomics: zeroed. SAFETY: delta gets every row, and each key block
        // writes all its dk and dv rows, whichever query tiles it skips.
        let dq_acc = Tensor::zeros((b, h, t, d), DType::F32, q.device())?;
        let (delta, dk, dv) = unsafe {
            (
                Tensor::empty((b, h, t), DType::F32, q.device())?,
                Tensor::empty((b, h, t, d), q.dtype(), q.device())?,
                Tensor::empty((b, h, t, d), q.dtype(), q.device())?,
            )
        };
        let (dev, kinds, ints) = prologue(q, bias, dims)?;
        let delta_fn = function(q.dtype(), &dev, MODULE, "flash_attention_bwd_delta")?;
        let bwd_fn = sized_kernel(q, &dev, "bwd", d)?;
        let rows = (b * t * h) as i64;
        let tensors = [
            q, k, v, bias, dout, lse, &delta, &dq_acc, &dk, &dv, out, &kinds,
        ];
        with_storages(&tensors, |s| {
            #[allow(clippy::too_many_arguments)]
            fn go<T: CudaDType + DeviceRepr>(
                dev: &CudaDevice,
                (delta_fn, bwd_fn): (
                    &candle_core::cuda_backend::cudarc::driver::CudaFunction,
                    &candle_core::cuda_backend::cudarc::driver::CudaFunction,
                ),
                s: &[(&CudaStorage, usize)],
                (h, t, d, batched): Ints,
                rows: i64,
                scale: f32,
                cfg: LaunchConfig,
            ) -> Result<()> {
                let (x, f) = (|i| typed::<T>(s, i), |i| typed::<f32>(s, i));
                let (q, k, v, bias, dout, lse) = (x(0)?, x(1)?, x(2)?, f(3)?, x(4)?, f(5)?);
                let (delta, dq_acc, dk, dv, out) = (f(6)?, f(7)?, x(8)?, x(9)?, x(10)?);
                let kinds = typed::<u8>(s, 11)?;
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(delta_fn);
                l.arg(&out)
                    .arg(&dout)
                    .arg(&delta)
                    .arg(&h)
                    .arg(&t)
                    .arg(&d)
                    .arg(&rows);
                // One warp per row, 8 rows per block.
                let blocks = (rows as usize).div_ceil(8).clamp(1, 132 * 32) as u32;
                let delta_cfg = LaunchConfig {
                    grid_dim: (blocks, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments match flash_attention_bwd_delta_<T>; delta was just
                // allocated ([b, h, t]) and nothing else holds it.
                unsafe { l.launch(delta_cfg) }.w()?;
                let mut l = stream.launch_builder(bwd_fn);
                l.arg(&q)
                    .arg(&k)
                    .arg(&v)
                    .arg(&bias)
                    .arg(&kinds)
                    .arg(&dout)
                    .arg(&lse)
                    .arg(&delta);
                l.arg(&dq_acc).arg(&dk).arg(&dv);
                l.arg(&h).arg(&t).arg(&d).arg(&batched).arg(&scale);
                // SAFETY: the arguments match flash_attention_bwd_d*_<T>; dq_acc (zeroed), dk and
                // dv were just allocated ([b, h, t, d]) and nothing else holds them.
                unsafe { l.launch(cfg) }.w()?;
                Ok(())
            }
            let fns = (&delta_fn, &bwd_fn);
            let cfg = grid(t, b * h);
            match q.dtype() {
                DType::BF16 => go::<half::bf16>(&dev, fns, s, ints, rows, scale, cfg),
                _ => go::<half::f16>(&dev, fns, s, ints, rows, scale, cfg),
            }
        })?;
        Ok((dq_acc.to_dtype(q.dtype())?, dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The composed attention over all keys with a bias (as the model computes it without the
    /// kernels), its output in `[b, t, heads, d]`.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Tensor {
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(bias)
            .unwrap();
        candle_nn_softmax(&s)
            .matmul(v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
    }

    fn candle_nn_softmax(s: &Tensor) -> Tensor {
        let m = s.max_keepdim(3).unwrap();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap()
    }

    /// Causal + a per-row sliding window and a packed-document boundary in batch row 1.
    fn bias(b: usize, t: usize) -> Tensor {
        let v: Vec<f32> = (0..b * t * t)
            .map(|n| {
                let (row, i, j) = (n / (t * t), (n / t) % t, n % t);
                let window = if row == 0 { t } else { 5 };
                let same_doc = row == 0 || (i < 7) == (j < 7);
                if j <= i && i - j < window && same_doc {
                    0.1 * ((i * 3 + j) % 5) as f32
                } else {
                    f32::MIN
                }
            })
            .collect();
        Tensor::from_vec(v, (b, 1, t, t), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The reference's output and gradients equal candle's autograd through the composed
    /// attention (causal, windowed, packed, uneven sizes), and its lse is each row's
    /// log-sum-exp.
    #[test]
    fn the_reference_matches_the_composed_attention_and_its_gradients() {
        let cpu = &Device::Cpu;
        let (b, h, t, d) = (2, 3, 19, 12);
        let scale = 1.0 / (d as f64).sqrt();
        let var = |seed: f32| {
            let n = b * h * t * d;
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
            Var::from_tensor(&Tensor::from_vec(v, (b, h, t, d), cpu).unwrap()).unwrap()
        };
        let (q, k, v) = (var(0.1), var(1.3), var(2.7));
        let bias = bias(b, t);
        let (out, lse) = flash_attention(&q, &k, &v, &bias, scale).unwrap();
        let want = composed(&q, &k, &v, &bias, scale);
        assert!(max_diff(&out, &want) < 1e-5);

        let s = ((q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap())
            .broadcast_add(&bias)
            .unwrap();
        // log Σ_j exp(x_j): the forbidden entries hold ≈ f32::MIN and add nothing.
        let m = s.max_keepdim(3).unwrap();
        let sum = s
            .broadcast_sub(&m)
            .unwrap()
            .exp()
            .unwrap()
            .sum_keepdim(3)
            .unwrap();
        let want_lse = (sum.log().unwrap() + m).unwrap().squeeze(3).unwrap();
        assert!(max_diff(&lse, &want_lse) < 1e-5);

        let probe = Tensor::randn(0f32, 1.0, out.shape(), cpu).unwrap();
        let grads = (want * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (dq, dk, dv) =
            flash_attention_grad(&q, &k, &v, &bias, &out, &lse, &probe, scale).unwrap();
        for (name, got, var) in [("dq", &dq, &q), ("dk", &dk, &k), ("dv", &dv, &v)] {
            let want = grads.get(var.as_tensor()).unwrap();
            let diff = max_diff(got, want);
            assert!(diff < 1e-5, "{name} differs by {diff:e}");
        }
    }

    /// A row with no allowed key (left padding) gives output 0, lse +∞ and no gradient.
    #[test]
    fn a_fully_masked_row_is_zero() {
        let cpu = &Device::Cpu;
        let (b, h, t, d) = (1, 1, 4, 2);
        let mut bias = vec![0f32; t * t];
        for j in 0..t {
            bias[j] = f32::MIN; // row 0 may attend nothing
            bias[j * t] = f32::MIN; // key 0 is padding
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, t), cpu).unwrap();
        let x = Tensor::arange(0f32, (t * d) as f32, cpu)
            .unwrap()
            .reshape((b, h, t, d))
            .unwrap();
        let (out, lse) = flash_attention(&x, &x, &x, &bias, 0.5).unwrap();
        let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let lse = lse.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&out[..d], &[0.0, 0.0]);
        assert!(lse[0].is_infinite() && lse[1..].iter().all(|l| l.is_finite()));
        // Row 1 attends key 1 alone.
        assert_eq!(&out[d..2 * d], &[2.0, 3.0]);
        let g = Tensor::ones((b, t, h, d), DType::F32, cpu).unwrap();
        let out_t = Tensor::from_vec(out, (b, t, h, d), cpu).unwrap();
        let lse_t = Tensor::from_vec(lse, (b, h, t), cpu).unwrap();
        let (dq, _, _) = flash_attention_grad(&x, &x, &x, &bias, &out_t, &lse_t, &g, 0.5).unwrap();
        let dq = dq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(dq.iter().all(|v| v.is_finite()));
        assert_eq!(&dq[..d], &[0.0, 0.0]);
    }

    #[test]
    fn mismatched_operands_are_an_error() {
        let cpu = &Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), DType::F32, cpu).unwrap();
        let k = Tensor::zeros((1, 1, 4, 8), DType::F32, cpu).unwrap();
        let bias = Tensor::zeros((1, 1, 4, 4), DType::F32, cpu).unwrap();
        let err = flash_attention(&q, &k, &k, &bias, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("repeat kv heads"), "{err}");
        let short = Tensor::zeros((1, 1, 3, 4), DType::F32, cpu).unwrap();
        let err = flash_attention(&q, &q, &q, &short, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias"), "{err}");
    }
}
