//! Each CUDA kernel against its CPU reference and against candle's composed (unfused) ops on the
//! same GPU, forward and backward, in f32, bf16 and f16, at sizes that are not multiples of any
//! block size. Needs a GPU: ignored here, run by `scripts/gpu-check.sh` on the device.
//!
//! Tolerances: attention probabilities max |Δ| ≤ 1e-6 in f32 and ≤ one unit in the last place of
//! the output type otherwise (2⁻⁷ for bf16, 2⁻¹⁰ for f16, relative to the largest probability:
//! f32 arithmetic done in another order may round the other way); score
//! gradients relative L2 ≤ 1e-5 in f32, ≤ 1e-2 (bf16) / 2e-3 (f16). RMSNorm, RoPE, SwiGLU:
//! against the CPU reference max |Δ| ≤ 1e-5 in f32, two roundings in bf16/f16 (relative to the
//! largest value), gradients as above; against the composed ops 5e-2 in bf16 (which rounds at
//! other points) and 1e-2 in f16.

#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var, D};
use ferrotune_kernels::{attention_softmax, rms_norm, rope, rope_qkv, swiglu};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (these tests run on the GPU machine)")
}

fn cpu_f32(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    cpu_f32(t)
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn l2(t: &Tensor) -> f32 {
    cpu_f32(t)
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A causal mask with a sliding window, as the model builds it (large negative where masked).
fn mask(b: usize, q: usize, k: usize) -> Tensor {
    let v: Vec<f32> = (0..b * q * k)
        .map(|i| {
            let (row, col) = ((i / k) % q + (k - q), i % k);
            let window = 97 + 13 * (i / (q * k));
            if col > row || row - col >= window {
                f32::MIN
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (b, 1, q, k), &Device::Cpu).unwrap()
}

fn composed(s: &Tensor, bias: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let x = s
        .to_dtype(DType::F32)?
        .affine(scale, 0.0)?
        .broadcast_add(bias)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(s.dtype())
}

type Op<'a> = Box<dyn Fn(&Tensor, &Device) -> candle_core::Result<Tensor> + 'a>;

/// Output and input gradient of `f` on `x` (rounded to `dtype`) on `device`.
fn run_op(f: &Op, x: &Tensor, device: &Device, dtype: DType) -> (Tensor, Tensor) {
    let v = Var::from_tensor(&x.to_device(device).unwrap().to_dtype(dtype).unwrap()).unwrap();
    let y = f(v.as_tensor(), device).unwrap();
    assert_eq!(y.dtype(), dtype);
    let n = y.elem_count();
    let probe: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
        .collect();
    let probe = Tensor::from_vec(probe, y.shape(), device).unwrap();
    let loss = (y.to_dtype(DType::F32).unwrap() * probe)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap().get(v.as_tensor()).unwrap().clone();
    (cpu_f32(&y), cpu_f32(&g))
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn attention_softmax_matches_its_cpu_reference_and_the_composed_ops() {
    let dev = gpu();
    let scale = 1.0 / 96f64.sqrt();
    let mut failures = Vec::new();
    // Short rows (128 threads), long rows (256 threads), decoding (q < k), a batched bias.
    for (b, h, q, k, bias_batch) in [
        (2, 3, 37, 37, 2),
        (1, 5, 19, 1031, 1),
        (2, 2, 7, 4099, 2),
        (1, 4, 3, 61, 1),
    ] {
        let s = Tensor::randn(0f32, 3.0, (b, h, q, k), &Device::Cpu).unwrap();
        let bias = mask(bias_batch, q, k);
        for (dtype, y_tol, g_tol) in [
            (DType::F32, 1e-6f32, 1e-5f32),
            (DType::BF16, 1.0 / 128.0, 1e-2),
            (DType::F16, 1.0 / 1024.0, 2e-3),
        ] {
            // The reference sees the scores rounded to the same dtype the kernel reads.
            let s_rounded = s.to_dtype(dtype).unwrap();
            let kernel: Op = Box::new(|s, dev| attention_softmax(s, &bias.to_device(dev)?, scale));
            let unfused: Op = Box::new(|s, dev| composed(s, &bias.to_device(dev)?, scale));
            let (y_gpu, g_gpu) = run_op(&kernel, &s_rounded, &dev, dtype);
            let (y_cpu, g_cpu) = run_op(&kernel, &s_rounded, &Device::Cpu, dtype);
            let (y_ops, g_ops) = run_op(&unfused, &s_rounded, &dev, dtype);
            let y_ref = max_abs(&y_cpu);
            for (what, y, g) in [
                ("cpu reference", &y_cpu, &g_cpu),
                ("composed ops", &y_ops, &g_ops),
            ] {
                let dy = max_abs(&(&y_gpu - y).unwrap()) / y_ref;
                let dg = l2(&(&g_gpu - g).unwrap()) / l2(g);
                eprintln!(
                    "attention_softmax [{b},{h},{q},{k}] bias batch {bias_batch} {dtype:?} vs {what}: probs {dy:.2e}, grad {dg:.2e}"
                );
                if !(dy <= y_tol && dg <= g_tol) {
                    failures.push(format!(
                        "[{b},{h},{q},{k}] {dtype:?} vs {what}: {dy:e} / {dg:e}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn rms_norm_rope_rope_qkv_and_swiglu_match_their_cpu_references_and_the_composed_ops() {
    let dev = gpu();
    let (b, h, t, d, width, inter) = (2, 3, 37, 96, 3072 + 7, 8192 + 3);
    let w = (Tensor::randn(0f32, 0.1, width, &Device::Cpu).unwrap() + 1.0).unwrap();
    let cos = Tensor::randn(0f32, 1.0, (b, t, d), &Device::Cpu).unwrap();
    let sin = Tensor::randn(0f32, 1.0, (b, t, d), &Device::Cpu).unwrap();
    let like = |c: &Tensor, x: &Tensor, dev: &Device| {
        c.to_device(dev).unwrap().to_dtype(x.dtype()).unwrap()
    };
    let cases: Vec<(&str, Vec<usize>, Op, Op)> = vec![
        (
            "rms_norm",
            vec![b, t, width],
            Box::new(|x: &Tensor, dev: &Device| rms_norm(x, &like(&w, x, dev), 1e-5)),
            Box::new(|x: &Tensor, dev: &Device| {
                let xf = x.to_dtype(DType::F32)?;
                let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + 1e-5)?
                    .sqrt()?
                    .recip()?;
                xf.broadcast_mul(&inv)?
                    .to_dtype(x.dtype())?
                    .broadcast_mul(&like(&w, x, dev))
            }),
        ),
        (
            "rope",
            vec![b, h, t, d],
            Box::new(|x: &Tensor, dev: &Device| rope(x, &like(&cos, x, dev), &like(&sin, x, dev))),
            Box::new(|x: &Tensor, dev: &Device| {
                let (c, s) = (
                    like(&cos, x, dev).unsqueeze(1)?,
                    like(&sin, x, dev).unsqueeze(1)?,
                );
                let rotated = Tensor::cat(
                    &[&x.narrow(3, d / 2, d / 2)?.neg()?, &x.narrow(3, 0, d / 2)?],
                    3,
                )?;
                x.broadcast_mul(&c)? + rotated.broadcast_mul(&s)?
            }),
        ),
        (
            // GQA: 5 query heads on 1 kv head; the three parts flattened and joined to compare.
            "rope_qkv",
            vec![b, t, (5 + 2) * d],
            Box::new(|x: &Tensor, dev: &Device| {
                let (q, k, v) = rope_qkv(x, &like(&cos, x, dev), &like(&sin, x, dev), (5, 1))?;
                Tensor::cat(&[q.flatten_all()?, k.flatten_all()?, v.flatten_all()?], 0)
            }),
            Box::new(|x: &Tensor, dev: &Device| {
                let (c, s) = (
                    like(&cos, x, dev).unsqueeze(1)?,
                    like(&sin, x, dev).unsqueeze(1)?,
                );
                let all = x.reshape((b, t, 7, d))?;
                let heads =
                    |at: usize, n: usize| all.narrow(2, at, n)?.transpose(1, 2)?.contiguous();
                let rotate = |x: Tensor| -> candle_core::Result<Tensor> {
                    let rotated = Tensor::cat(
                        &[&x.narrow(3, d / 2, d / 2)?.neg()?, &x.narrow(3, 0, d / 2)?],
                        3,
                    )?;
                    x.broadcast_mul(&c)? + rotated.broadcast_mul(&s)?
                };
                let (q, k, v) = (rotate(heads(0, 5)?)?, rotate(heads(5, 1)?)?, heads(6, 1)?);
                Tensor::cat(&[q.flatten_all()?, k.flatten_all()?, v.flatten_all()?], 0)
            }),
        ),
        (
            "swiglu",
            vec![3, 5, 2 * inter],
            Box::new(|x: &Tensor, _: &Device| swiglu(x)),
            Box::new(|x: &Tensor, _: &Device| {
                let gate = x.narrow(D::Minus1, 0, inter)?;
                let up = x.narrow(D::Minus1, inter, inter)?;
                up * (&gate * (gate.neg()?.exp()? + 1.0)?.recip()?)?
            }),
        ),
    ];
    let mut failures = Vec::new();
    for (name, shape, kernel, composed) in &cases {
        let x = Tensor::randn(0f32, 1.5, shape.as_slice(), &Device::Cpu).unwrap();
        for (dtype, ref_y, ref_g, ops_tol) in [
            (DType::F32, 1e-5f32, 1e-5f32, 1e-5f32),
            (DType::BF16, 2.0 / 256.0, 1e-2, 5e-2),
            (DType::F16, 2.0 / 2048.0, 2e-3, 1e-2),
        ] {
            let (y_gpu, g_gpu) = run_op(kernel, &x, &dev, dtype);
            let (y_cpu, g_cpu) = run_op(kernel, &x, &Device::Cpu, dtype);
            let (y_ops, g_ops) = run_op(composed, &x, &dev, dtype);
            for (what, y, g, y_tol, g_tol) in [
                ("cpu reference", &y_cpu, &g_cpu, ref_y, ref_g),
                ("composed ops", &y_ops, &g_ops, ops_tol, ops_tol),
            ] {
                let dy = max_abs(&(&y_gpu - y).unwrap()) / max_abs(y);
                let dg = l2(&(&g_gpu - g).unwrap()) / l2(g);
                eprintln!("{name} {shape:?} {dtype:?} vs {what}: output {dy:.2e}, grad {dg:.2e}");
                if !(dy <= y_tol && dg <= g_tol) {
                    failures.push(format!("{name} {dtype:?} vs {what}: {dy:e} / {dg:e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The dropout mask drawn on the GPU is the CPU's, element for element, in every dtype, at a
/// length that is no multiple of the launch's block or grid.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn dropout_masks_on_the_gpu_equal_the_cpu_stream() {
    let dev = gpu();
    let n = 3 * 1_000_003;
    for (key, p) in [
        (0u64, 0.05f32),
        (0x1234_5678_9ABC_DEF0, 0.1),
        (u64::MAX, 0.5),
    ] {
        let cpu = ferrotune_kernels::dropout::reference_mask(n, key, p).unwrap();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let like = Tensor::zeros(n, dt, &dev).unwrap();
            let gpu_mask = ferrotune_kernels::dropout_mask(&like, key, p).unwrap();
            assert_eq!(gpu_mask.dtype(), dt);
            let expected = cpu.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap();
            let differ = cpu_f32(&gpu_mask)
                .ne(&expected)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(
                differ, 0.0,
                "key {key:#x} p {p} {dt:?}: {differ} elements differ"
            );
        }
    }
}

/// The cross-entropy kernels against their CPU reference (exponent sum in f64) at a vocabulary
/// that is no multiple of the block, with untrained rows: the loss per row (f32) within 1e-5
/// relative, the logits' gradient max |Δ| ≤ 1e-6 in f32 and one unit in the last place in
/// bf16/f16. On an H100: loss 9.6e-8, f32 gradient 3.0e-8. (Against an f32 reference summing in
/// order the f32 gradient differed by 1.4e-5: that reference's own rounding.)
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn cross_entropy_matches_its_cpu_reference() {
    use ferrotune_kernels::{cross_entropy_grad, cross_entropy_nll, NO_TARGET};
    let dev = gpu();
    let (n, v) = (37, 32064 + 3);
    let x = Tensor::randn(0f32, 3.0, (n, v), &Device::Cpu).unwrap();
    let targets: Vec<u32> = (0..n)
        .map(|r| {
            if r % 5 == 2 {
                NO_TARGET
            } else {
                (r * 7919 % v) as u32
            }
        })
        .collect();
    let t_cpu = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let t_gpu = t_cpu.to_device(&dev).unwrap();
    let mut failures = Vec::new();
    for (dt, nll_tol, grad_tol) in [
        (DType::F32, 1e-5f32, 1e-6f32),
        (DType::BF16, 1e-5, 2f32.powi(-8)),
        (DType::F16, 1e-5, 2f32.powi(-11)),
    ] {
        let xc = x.to_dtype(dt).unwrap();
        let xg = xc.to_device(&dev).unwrap();
        let (nll_c, nll_g) = (
            cross_entropy_nll(&xc, &t_cpu).unwrap(),
            cross_entropy_nll(&xg, &t_gpu).unwrap(),
        );
        let dn = max_abs(&(cpu_f32(&nll_g) - &nll_c).unwrap()) / max_abs(&nll_c);
        let (g_c, g_g) = (
            cross_entropy_grad(&xc, &t_cpu).unwrap(),
            cross_entropy_grad(&xg, &t_gpu).unwrap(),
        );
        assert_eq!(g_g.dtype(), dt);
        let dg = max_abs(&(cpu_f32(&g_g) - cpu_f32(&g_c)).unwrap());
        eprintln!("cross_entropy [{n}, {v}] {dt:?}: loss rel {dn:.2e}, gradient max |Δ| {dg:.2e}");
        if dn > nll_tol || dg > grad_tol {
            failures.push(format!(
                "{dt:?}: loss {dn:e} > {nll_tol:e} or gradient {dg:e} > {grad_tol:e}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The residual joins fused into RMSNorm against the separate ops on the same GPU and against
/// their CPU reference: `add_rms_norm` (the sum and the norm) and `rms_norm_grad_add`, at a width
/// that is no multiple of the block. Max |Δ| relative to the largest value: 1e-6 in f32, one
/// unit in the last place in bf16/f16 (an add rounded once or, in candle's kernel, maybe twice).
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn residual_joins_fused_into_rms_norm_match_the_separate_ops() {
    use ferrotune_kernels::{add_rms_norm, rms_norm_grad, rms_norm_grad_add};
    let dev = gpu();
    let (rows, width) = (37, 3072 + 7);
    let draw = |s: f32| Tensor::randn(0f32, s, (rows, width), &Device::Cpu).unwrap();
    let (x, y, g, res) = (draw(2.0), draw(1.0), draw(1.0), draw(0.5));
    let w = (Tensor::randn(0f32, 0.1, width, &Device::Cpu).unwrap() + 1.0).unwrap();
    let mut failures = Vec::new();
    for (dtype, tol) in [
        (DType::F32, 1e-6f32),
        (DType::BF16, 2f32.powi(-7)),
        (DType::F16, 2f32.powi(-10)),
    ] {
        let on = |t: &Tensor, d: &Device| t.to_dtype(dtype).unwrap().to_device(d).unwrap();
        let run = |d: &Device| {
            let (x, y, g, res, w) = (on(&x, d), on(&y, d), on(&g, d), on(&res, d), on(&w, d));
            let (sum, normed) = add_rms_norm(&x, &y, &w, 1e-5).unwrap();
            let grad = rms_norm_grad_add(&x, &w, 1e-5, &g, &res).unwrap();
            let sep_sum = (&x + &y).unwrap();
            let sep_norm = rms_norm(&sep_sum, &w, 1e-5).unwrap();
            let sep_grad = (&res + rms_norm_grad(&x, &w, 1e-5, &g).unwrap()).unwrap();
            [(sum, sep_sum), (normed, sep_norm), (grad, sep_grad)]
        };
        let (gpu_out, cpu_out) = (run(&dev), run(&Device::Cpu));
        for (what, (fused, separate), (reference, _)) in ["sum", "norm", "gradient"]
            .iter()
            .zip(&gpu_out)
            .zip(&cpu_out)
            .map(|((w, a), b)| (w, a, b))
        {
            let scale = max_abs(reference);
            let d_sep = max_abs(&(cpu_f32(fused) - cpu_f32(separate)).unwrap()) / scale;
            let d_ref = max_abs(&(cpu_f32(fused) - cpu_f32(reference)).unwrap()) / scale;
            eprintln!(
                "{what} {dtype:?}: vs separate ops {d_sep:.2e}, vs cpu reference {d_ref:.2e}"
            );
            if !(d_sep <= tol && d_ref <= tol) {
                failures.push(format!("{what} {dtype:?}: {d_sep:e} / {d_ref:e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Decode attention against its CPU reference and against the composed ops (scores GEMM,
/// softmax, output GEMM with repeated kv heads) on the same GPU, keys and values read from a
/// cache buffer with spare room: a Phi-3-mini step, GQA with several queries and a batched
/// padding bias, the largest head dimension, fewer keys than the block has warps, odd sizes.
/// Max |Δ| relative to the largest output: vs the reference 1e-5 in f32, one unit in the last
/// place otherwise; vs the composed ops (which round the scores and probabilities to the dtype)
/// 1e-5 in f32, 3e-2 in bf16, 5e-3 in f16.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn decode_attention_matches_its_cpu_reference_and_the_composed_ops() {
    use ferrotune_kernels::decode_attention;
    let dev = gpu();
    let mut failures = Vec::new();
    for (b, heads, kv, tq, t, d) in [
        (1, 32, 32, 1, 640, 96),
        (3, 12, 4, 5, 1031, 80),
        (1, 4, 1, 16, 37, 256),
        (2, 2, 2, 1, 3, 33),
    ] {
        let cap = t + 29;
        let kbuf = Tensor::randn(0f32, 1.0, (b, kv, cap, d), &Device::Cpu).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, kv, cap, d), &Device::Cpu).unwrap();
        let q = Tensor::randn(0f32, 1.0, (b, heads, tq, d), &Device::Cpu).unwrap();
        let bias = mask(b, tq, t);
        let scale = 1.0 / (d as f64).sqrt();
        for (dtype, ref_tol, ops_tol) in [
            (DType::F32, 1e-5f32, 1e-5f32),
            (DType::BF16, 2f32.powi(-7), 3e-2),
            (DType::F16, 2f32.powi(-10), 5e-3),
        ] {
            let run = |dev: &Device, fused: bool| {
                let on = |x: &Tensor| x.to_dtype(dtype).unwrap().to_device(dev).unwrap();
                let (k, v) = (
                    on(&kbuf).narrow(2, 0, t).unwrap(),
                    on(&vbuf).narrow(2, 0, t).unwrap(),
                );
                let (q, bias) = (on(&q), bias.to_device(dev).unwrap());
                if fused {
                    return decode_attention(&q, &k, &v, &bias, scale).unwrap();
                }
                let rep = |x: &Tensor| {
                    x.unsqueeze(2)
                        .unwrap()
                        .broadcast_as((b, kv, heads / kv, t, d))
                        .unwrap()
                        .reshape((b, heads, t, d))
                        .unwrap()
                };
                let s = q.matmul(&rep(&k).t().unwrap()).unwrap();
                attention_softmax(&s, &bias, scale)
                    .unwrap()
                    .matmul(&rep(&v))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
            };
            let y = run(&dev, true);
            assert_eq!((y.dims(), y.dtype()), (&[b, tq, heads, d][..], dtype));
            let reference = run(&Device::Cpu, true);
            let composed = run(&dev, false);
            let scale_y = max_abs(&reference);
            let d_ref = max_abs(&(cpu_f32(&y) - cpu_f32(&reference)).unwrap()) / scale_y;
            let d_ops = max_abs(&(cpu_f32(&y) - cpu_f32(&composed)).unwrap()) / scale_y;
            eprintln!(
                "decode_attention [{b},{heads}/{kv},{tq},{t},{d}] {dtype:?}: vs reference {d_ref:.2e}, vs composed {d_ops:.2e}"
            );
            if !(d_ref <= ref_tol && d_ops <= ops_tol) {
                failures.push(format!(
                    "[{b},{heads}/{kv},{tq},{t},{d}] {dtype:?}: {d_ref:e} / {d_ops:e}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A training bias: causal, a sliding window in batch row 0, a document boundary at position 37
/// and (when `left_pad`) three padding tokens at the start of batch row 1, whose query rows then
/// attend nothing (flash attention gives them 0, the composed softmax an average).
fn training_bias(b: usize, t: usize, left_pad: bool) -> Tensor {
    let v: Vec<f32> = (0..b * t * t)
        .map(|n| {
            let (row, i, j) = (n / (t * t), (n / t) % t, n % t);
            let window_ok = row != 0 || i - j.min(i) < 200;
            let same_doc = row == 0 || (i < 37) == (j < 37);
            let padded = left_pad && row == 1 && j < 3;
            if j <= i && window_ok && same_doc && !padded {
                0.0
            } else {
                f32::MIN
            }
        })
        .collect();
    Tensor::from_vec(v, (b, 1, t, t), &Device::Cpu).unwrap()
}

/// Flash attention's forward (output, log-sum-exp) and backward (dq, dk, dv) on the GPU against
/// the f32 reference on the same (rounded) inputs and against candle's autograd through the
/// composed attention (scores GEMM, the fused softmax, output GEMM) on the GPU, at head dims
/// that need zero padding (40, 80) and lengths that are not multiples of the 64/32 tiles.
/// Tolerances: output relative to its largest value and gradients relative L2, vs the
/// reference ≤ 1e-2 (bf16) / 2e-3 (f16), since the kernel rounds probabilities and score
/// gradients to the dtype before their products as the composed path does; vs composed ≤ 3e-2
/// (bf16) / 1e-2 (f16); log-sum-exp |Δ| ≤ 1e-3.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn flash_attention_matches_its_cpu_reference_and_the_composed_ops() {
    use ferrotune_kernels::{flash_attention, flash_attention_grad};
    let dev = gpu();
    let mut failures = Vec::new();
    for (b, h, t, d, left_pad) in [
        (1, 4, 1000, 96, false),
        (2, 3, 131, 64, true),
        (2, 2, 77, 40, false),
        (1, 2, 65, 128, false),
        (1, 3, 200, 80, false),
        (1, 1, 1, 32, false),
    ] {
        let x = || Tensor::randn(0f32, 1.0, (b, h, t, d), &Device::Cpu).unwrap();
        let (q, k, v) = (x(), x(), x());
        let probe = Tensor::randn(0f32, 1.0, (b, t, h, d), &Device::Cpu).unwrap();
        let bias = training_bias(b, t, left_pad);
        let scale = 1.0 / (d as f64).sqrt();
        for (dtype, ref_tol, ops_tol) in [(DType::BF16, 1e-2f32, 3e-2f32), (DType::F16, 2e-3, 1e-2)]
        {
            let on = |x: &Tensor, dev: &Device| x.to_dtype(dtype).unwrap().to_device(dev).unwrap();
            let flash = |dev: &Device| {
                let (q, k, v, g) = (on(&q, dev), on(&k, dev), on(&v, dev), on(&probe, dev));
                let bias = bias.to_device(dev).unwrap();
                let (out, lse) = flash_attention(&q, &k, &v, &bias, scale).unwrap();
                let (dq, dk, dv) =
                    flash_attention_grad(&q, &k, &v, &bias, &out, &lse, &g, scale).unwrap();
                [out, lse, dq, dk, dv].map(|t| cpu_f32(&t))
            };
            let got = flash(&dev);
            let want = flash(&Device::Cpu);
            let rel_max =
                |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-20);
            let rel_l2 = |a: &Tensor, b: &Tensor| l2(&(a - b).unwrap()) / l2(b).max(1e-20);
            // lse is +inf on rows that attend nothing: compare the finite ones.
            let finite = want[1].abs().unwrap().lt(1e30).unwrap();
            let zero = want[1].zeros_like().unwrap();
            let lse_diff = max_abs(
                &(finite.where_cond(&got[1], &zero).unwrap()
                    - finite.where_cond(&want[1], &zero).unwrap())
                .unwrap(),
            );
            let d_ref = [
                rel_max(&got[0], &want[0]),
                rel_l2(&got[2], &want[2]),
                rel_l2(&got[3], &want[3]),
                rel_l2(&got[4], &want[4]),
            ];
            // The composed attention with candle's autograd (not for rows that attend nothing,
            // where the two differ by definition).
            let d_ops = if left_pad {
                None
            } else {
                let var = |x: &Tensor| Var::from_tensor(&on(x, &dev)).unwrap();
                let (qv, kv, vv) = (var(&q), var(&k), var(&v));
                let s = qv.matmul(&kv.t().unwrap()).unwrap();
                let y = attention_softmax(&s, &bias.to_device(&dev).unwrap(), scale)
                    .unwrap()
                    .matmul(vv.as_tensor())
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap();
                let grads = (y.to_dtype(DType::F32).unwrap()
                    * on(&probe, &dev).to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
                let g = |x: &Var| cpu_f32(grads.get(x.as_tensor()).unwrap());
                Some([
                    rel_max(&got[0], &cpu_f32(&y)),
                    rel_l2(&got[2], &g(&qv)),
                    rel_l2(&got[3], &g(&kv)),
                    rel_l2(&got[4], &g(&vv)),
                ])
            };
            let show = |xs: &[f32]| {
                xs.iter()
                    .map(|x| format!("{x:.2e}"))
                    .collect::<Vec<_>>()
                    .join("/")
            };
            let ops_shown = d_ops.as_ref().map_or("-".to_string(), |o| show(o));
            eprintln!(
                "flash_attention [{b},{h},{t},{d}]{} {dtype:?}: vs reference out/dq/dk/dv {}, lse {lse_diff:.2e}; vs composed {ops_shown}",
                if left_pad { " left-padded" } else { "" },
                show(&d_ref)
            );
            let ok = d_ref.iter().all(|&x| x <= ref_tol)
                && lse_diff <= 1e-3
                && d_ops.is_none_or(|o| o.iter().all(|&x| x <= ops_tol));
            if !ok {
                failures.push(format!(
                    "[{b},{h},{t},{d}] {dtype:?}: reference {}, lse {lse_diff:e}, composed {ops_shown}",
                    show(&d_ref)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `rope_qkv_into_cache` on the GPU against its CPU reference (`rope_qkv` and `slice_set`): the
/// returned query heads and the whole cache buffers (new columns written, the rest untouched),
/// bit for bit, for MHA and GQA, one and several new positions, f32, bf16 and f16.
#[test]
#[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
fn rope_qkv_into_cache_matches_its_cpu_reference() {
    use ferrotune_kernels::rope_qkv_into_cache;
    let dev = gpu();
    let mut failures = Vec::new();
    for (b, t, nh, nkv, d, cap, start) in [(1, 1, 32, 32, 96, 700, 512), (3, 5, 12, 4, 80, 40, 33)]
    {
        let qkv = Tensor::randn(0f32, 1.0, (b, t, (nh + 2 * nkv) * d), &Device::Cpu).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (b, t, d), &Device::Cpu).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (b, t, d), &Device::Cpu).unwrap();
        let kc = Tensor::randn(0f32, 1.0, (b, nkv, cap, d), &Device::Cpu).unwrap();
        let vc = Tensor::randn(0f32, 1.0, (b, nkv, cap, d), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let run = |dev: &Device| {
                let on = |x: &Tensor| x.to_dtype(dtype).unwrap().to_device(dev).unwrap();
                let (kc, vc) = (on(&kc), on(&vc));
                let q = rope_qkv_into_cache(
                    &on(&qkv),
                    &on(&cos),
                    &on(&sin),
                    (nh, nkv),
                    (&kc, &vc),
                    start,
                )
                .unwrap();
                [q, kc, vc].map(|t| cpu_f32(&t))
            };
            let (got, want) = (run(&dev), run(&Device::Cpu));
            let diffs: Vec<f32> = got
                .iter()
                .zip(&want)
                .map(|(a, b)| max_abs(&(a - b).unwrap()))
                .collect();
            eprintln!("rope_qkv_into_cache [{b},{t},{nh}/{nkv},{d}] at {start} of {cap} {dtype:?}: q/k/v cache max |Δ| {diffs:?}");
            if diffs.iter().any(|&x| x != 0.0) {
                failures.push(format!("[{b},{t},{nh}/{nkv},{d}] {dtype:?}: {diffs:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
