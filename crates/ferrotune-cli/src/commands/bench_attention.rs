//! `ferrotune bench attention`: training attention alone, forward then backward, as recompute's
//! hand-written layer backward runs it: flash attention (`ferrotune_kernels::flash_attention`)
//! against the kept probabilities (the scores GEMM, the fused softmax, the output GEMM and their
//! backward), on one causal shape, in one run. Reports milliseconds, TFLOP/s over the causal
//! half of the work (forward `2·b·h·t²·d`, backward `4·b·h·t²·d`: what both must do, though the
//! composed path computes the masked half too), the bytes each keeps between forward and
//! backward, on CUDA the device memory each used above what was in use before it (sampled), and
//! how far the two results are apart.

use std::time::Instant;

use candle_core::{DType, Tensor};
use ferrotune_model::attention::{training_backward, training_forward, KeptAttention};
use ferrotune_model::device_memory::PeakSampler;
use ferrotune_model::mask::AttentionLayout;
use serde_json::json;

use crate::cli::BenchAttentionArgs;
use crate::commands::bench_train::bench_dtype;
use crate::commands::model_args;
use crate::failure::Failure;

/// Mean forward and backward seconds of one variant, what it keeps, the device memory it used at
/// its peak beyond what was in use before it (sampled, CUDA), and its last results.
struct Timing {
    forward: f64,
    backward: f64,
    kept_bytes: u64,
    peak_device_bytes: Option<u64>,
    results: [Tensor; 4],
}

pub fn run(args: &BenchAttentionArgs, json_out: bool) -> Result<(), Failure> {
    let (b, h, t, d) = (args.batch, args.heads, args.seq, args.head_dim);
    if args.iters == 0 || b == 0 || h == 0 || t == 0 || d == 0 {
        return Err(Failure::usage(
            "--iters, --batch, --heads, --seq and --head-dim must be at least 1",
        ));
    }
    let device = model_args::device(Some(&args.device))?;
    let dtype = bench_dtype(args.dtype.as_deref(), &device)?;
    let random = |dims: &[usize]| -> Result<Tensor, Failure> {
        Ok(Tensor::randn(0f32, 1.0, dims, &device)?.to_dtype(dtype)?)
    };
    let (q, k, v) = (
        random(&[b, h, t, d])?,
        random(&[b, h, t, d])?,
        random(&[b, h, t, d])?,
    );
    let g = random(&[b, t, h, d])?;
    let bias = AttentionLayout::default().bias(b, t, &device)?;
    let scale = 1.0 / (d as f64).sqrt();

    if !ferrotune_model::attention::flash_supported(&q) {
        return Err(Failure::usage(format!(
            "flash attention does not run for {dtype:?} with head dim {d} on {}: it takes bf16/f16 \
             on compute capability 8.0+ with head dim ≤ {}",
            args.device,
            ferrotune_model::attention::FLASH_MAX_HEAD_DIM
        )));
    }
    let time = |flash: bool| -> Result<Timing, Failure> {
        let (mut forward, mut backward) = (0.0, 0.0);
        let mut last = None;
        device.synchronize()?;
        let sampler = PeakSampler::start(&device);
        for i in 0..args.warmup + args.iters {
            device.synchronize()?;
            let start = Instant::now();
            let Some((out, kept)) = training_forward(flash, &q, &k, &v, &bias, scale)? else {
                return Err(Failure::usage(format!(
                    "the kept-probabilities path needs f32 on the CPU or the kernels on CUDA \
                     (got {dtype:?} on {}, FERROTUNE_KERNELS={})",
                    args.device,
                    std::env::var("FERROTUNE_KERNELS").unwrap_or_default()
                )));
            };
            device.synchronize()?;
            let mid = Instant::now();
            let kept_bytes = match &kept {
                KeptAttention::Probs(p) | KeptAttention::Lse(p) => {
                    (p.elem_count() * p.dtype().size_in_bytes()) as u64
                }
            };
            let (dq, dk, dv) = training_backward(kept, (&q, &k, &v), &bias, (&out, &g), scale)?;
            device.synchronize()?;
            if i >= args.warmup {
                forward += (mid - start).as_secs_f64();
                backward += mid.elapsed().as_secs_f64();
            }
            last = Some((kept_bytes, [out, dq, dk, dv]));
        }
        let memory = sampler.finish();
        let (kept_bytes, results) = last.expect("at least one pass");
        let n = args.iters as f64;
        Ok(Timing {
            forward: forward / n,
            backward: backward / n,
            kept_bytes,
            peak_device_bytes: memory.map(|m| m.peak.saturating_sub(m.at_start)),
            results,
        })
    };
    let probs = time(false)?;
    let flash = time(true)?;

    let causal_flops = (b * h * t * t * d) as f64;
    let tflops = |secs: f64, factor: f64| factor * causal_flops / secs / 1e12;
    let differences = flash
        .results
        .iter()
        .zip(&probs.results)
        .map(|(a, c)| relative_difference(a, c))
        .collect::<Result<Vec<f64>, Failure>>()?;
    let describe = |x: &Timing| {
        json!({"forward_ms": x.forward * 1e3, "backward_ms": x.backward * 1e3,
            "total_ms": (x.forward + x.backward) * 1e3,
            "forward_tflops": tflops(x.forward, 2.0), "backward_tflops": tflops(x.backward, 4.0),
            "kept_bytes": x.kept_bytes, "peak_device_bytes_beyond_start": x.peak_device_bytes})
    };
    let speedup = (probs.forward + probs.backward) / (flash.forward + flash.backward);
    if json_out {
        println!(
            "{}",
            json!({"batch": b, "heads": h, "seq": t, "head_dim": d, "device": args.device,
                "dtype": format!("{dtype:?}").to_lowercase(), "iters": args.iters,
                "probabilities": describe(&probs), "flash": describe(&flash), "speedup": speedup,
                "relative_difference": {"out": differences[0], "dq": differences[1],
                    "dk": differences[2], "dv": differences[3]}})
        );
        return Ok(());
    }
    println!(
        "attention      batch {b}, {h} heads, {t} positions, head dim {d}, {dtype:?} on {}, causal; {} passes after {} warm-up",
        args.device, args.iters, args.warmup
    );
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    let line = |name: &str, x: &Timing| {
        println!(
            "{name:<14} forward {:>8.3} ms ({:>7.2} TFLOP/s)  backward {:>8.3} ms ({:>7.2} TFLOP/s)  kept {:>9.2} MiB{}",
            x.forward * 1e3,
            tflops(x.forward, 2.0),
            x.backward * 1e3,
            tflops(x.backward, 4.0),
            mib(x.kept_bytes),
            x.peak_device_bytes
                .map_or(String::new(), |p| format!("  peak +{:.0} MiB", mib(p)))
        );
    };
    line("probabilities", &probs);
    line("flash", &flash);
    println!(
        "ratio          {speedup:.2}x forward+backward; flash vs probabilities, relative difference out {:.1e}, dq {:.1e}, dk {:.1e}, dv {:.1e}",
        differences[0], differences[1], differences[2], differences[3]
    );
    if device.is_cpu() {
        println!(
            "(on the CPU flash attention is its f32 reference implementation, not a fast path)"
        );
    }
    Ok(())
}

/// `‖a − c‖ / ‖c‖` in f32.
fn relative_difference(a: &Tensor, c: &Tensor) -> Result<f64, Failure> {
    let (a, c) = (a.to_dtype(DType::F32)?, c.to_dtype(DType::F32)?);
    let norm = |x: &Tensor| -> Result<f64, Failure> {
        Ok(f64::from(x.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?))
    };
    Ok(norm(&(&a - &c)?)? / norm(&c)?.max(f64::MIN_POSITIVE))
}
