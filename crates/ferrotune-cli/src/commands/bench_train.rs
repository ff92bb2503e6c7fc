//! `ferrotune bench train`: LoRA forward+backward throughput and peak memory of ferrotune and of
//! transformers + PEFT (PyTorch eager) on the same random Phi-3 shape, in one run.

use std::time::Instant;

use candle_core::{DType, Tensor};
use ferrotune_model::device_memory::PeakSampler;
use ferrotune_model::mask::AttentionLayout;
use ferrotune_model::random_weights::RandomWeights;
use ferrotune_model::{Batch, LoraConfig, Phi3, Phi3Config};
use serde::Deserialize;
use serde_json::json;

use crate::assets;
use crate::cli::{BenchTrainArgs, RandomShape};
use crate::commands::{model_args, python_ref};
use crate::failure::Failure;

#[derive(Deserialize)]
struct Reference {
    tokens_per_second: f64,
    seconds_per_step: f64,
    peak_rss_bytes: u64,
    /// Device memory in use at the peak (total − free, sampled), on CUDA.
    #[serde(default)]
    peak_device_bytes: Option<u64>,
    torch: String,
}

pub fn run(args: &BenchTrainArgs, json_out: bool) -> Result<(), Failure> {
    if let Some(config) = &args.config {
        return crate::commands::bench_trainer::run(config, args, json_out);
    }
    let shape = args.model.resolved();
    if args.steps == 0 || args.seq < 2 || !shape.heads.is_multiple_of(shape.kv_heads.max(1)) {
        return Err(Failure::usage(
            "--steps ≥ 1, --seq ≥ 2 and --kv-heads dividing --heads are needed",
        ));
    }
    if !(0.0..1.0).contains(&args.lora_dropout) {
        return Err(Failure::usage(format!(
            "--lora-dropout {} must be in [0, 1)",
            args.lora_dropout
        )));
    }
    let device = model_args::device(Some(&args.device))?;
    let dtype = bench_dtype(args.dtype.as_deref(), &device)?;
    let (mut model, cfg_json) = random_model(&shape, args.seq, dtype, &device)?;
    let lora = LoraConfig {
        r: args.r,
        lora_alpha: 2.0 * args.r as f64,
        lora_dropout: args.lora_dropout,
        ..LoraConfig::default()
    };
    model.add_lora(&lora, 0)?;
    // LoRA B starts at zero; give it values so the backward does the work it does mid-training.
    for (_, pair) in model.lora_pairs() {
        let b = pair.b.as_tensor();
        pair.b.set(&Tensor::randn(0f32, 0.02, b.dims(), &device)?)?;
    }
    let (b, t) = (args.batch, args.seq);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i * 7919 + 13) % shape.vocab) as u32)
        .collect();
    let labels: Vec<Vec<i64>> = ids
        .chunks(t)
        .map(|r| r.iter().map(|&x| i64::from(x)).collect())
        .collect();
    let batch = Batch {
        input_ids: Tensor::from_vec(ids, (b, t), &device)?,
        positions: vec![(0..t as u32).collect(); b],
        attention_bias: AttentionLayout::default().bias(b, t, &device)?,
    };
    let mut times = Vec::new();
    device.synchronize()?;
    let sampler = PeakSampler::start(&device);
    for step in 0..args.warmup + args.steps {
        let start = Instant::now();
        // A fresh dropout mask per step, as training draws them.
        model.set_dropout_key(step as u64);
        if args.recompute {
            let (_, n, grads) = model.loss_and_grads_recompute(&batch, &labels, 1.0)?;
            drop((n, grads));
        } else {
            let loss = model.loss_sum(&batch, &labels, true)?;
            let grads = loss
                .sum
                .affine(1.0 / loss.tokens.max(1) as f64, 0.0)?
                .backward()?;
            drop(grads);
        }
        device.synchronize()?;
        if step >= args.warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let memory = sampler.finish();
    let per_step = times.iter().sum::<f64>() / times.len() as f64;
    let ours_tps = (b * t) as f64 / per_step;
    let ours_rss = peak_rss_bytes();
    let flops_per_token = training_flops_per_token(args);
    let mfu = |tps: f64| {
        device
            .is_cuda()
            .then(|| tps * flops_per_token / (args.peak_tflops * 1e12))
    };
    let reference = if args.no_reference {
        None
    } else {
        Some(run_reference(args, dtype)?)
    };
    let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
    if json_out {
        println!(
            "{}",
            json!({
                "shape": cfg_json, "batch": b, "seq": t, "lora_r": args.r, "lora_dropout": args.lora_dropout, "recompute": args.recompute,
                "device": args.device, "dtype": format!("{dtype:?}").to_lowercase(),
                "flops_per_token": flops_per_token, "peak_tflops": args.peak_tflops,
                "flash_attention": ferrotune_model::attention::flash_chosen(),
                "ferrotune": {"tokens_per_second": ours_tps, "seconds_per_step": per_step, "peak_rss_bytes": ours_rss,
                    "peak_device_bytes": memory.map(|m| m.peak), "device_bytes_at_start": memory.map(|m| m.at_start),
                    "mfu": mfu(ours_tps)},
                "reference": reference.as_ref().map(|r| json!({"tokens_per_second": r.tokens_per_second,
                    "seconds_per_step": r.seconds_per_step, "peak_rss_bytes": r.peak_rss_bytes,
                    "peak_device_bytes": r.peak_device_bytes, "mfu": mfu(r.tokens_per_second), "torch": r.torch})),
                "speedup": reference.as_ref().map(|r| ours_tps / r.tokens_per_second),
                "device_memory_ratio": reference.as_ref().and_then(|r| Some(memory?.peak as f64 / r.peak_device_bytes? as f64)),
            })
        );
        return Ok(());
    }
    println!(
        "shape      Phi-3 {} layers, hidden {}, intermediate {}, heads {}/{}, vocab {}; batch {b} x {t} tokens, LoRA r={} on all linears{}{}{}",
        shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.vocab, args.r,
        if args.lora_dropout > 0.0 { format!(", dropout {}", args.lora_dropout) } else { String::new() },
        if args.recompute { ", recompute" } else { "" },
        if ferrotune_model::attention::flash_chosen() { ", flash attention" } else { "" }
    );
    let device_mem = |peak: Option<u64>| {
        peak.map_or(String::new(), |p| {
            format!("  peak device memory {:.2} GiB", gib(p))
        })
    };
    let mfu_text =
        |tps: f64| mfu(tps).map_or(String::new(), |m| format!("  MFU {:.1}%", 100.0 * m));
    println!(
        "ferrotune  {ours_tps:>9.0} tokens/s  {per_step:.3} s/step  peak RSS {:.2} GiB{}{}",
        gib(ours_rss),
        device_mem(memory.map(|m| m.peak)),
        mfu_text(ours_tps)
    );
    if let Some(r) = &reference {
        println!(
            "reference  {:>9.0} tokens/s  {:.3} s/step  peak RSS {:.2} GiB{}{}  (PyTorch {} + PEFT)",
            r.tokens_per_second,
            r.seconds_per_step,
            gib(r.peak_rss_bytes),
            device_mem(r.peak_device_bytes),
            mfu_text(r.tokens_per_second),
            r.torch
        );
        println!(
            "ratio      {:.2}x tokens/s, {:.2}x peak RSS",
            ours_tps / r.tokens_per_second,
            ours_rss as f64 / r.peak_rss_bytes.max(1) as f64
        );
    }
    Ok(())
}

/// Training FLOPs per token as MFU counts them for LoRA: 4·N for the frozen linears (forward, and
/// the input gradient backward; no weight gradient), plus attention's score and value products
/// (12·layers·seq·hidden: forward 4, backward 8), recompute not counted.
fn training_flops_per_token(args: &BenchTrainArgs) -> f64 {
    let a = args.model.resolved();
    let (h, i, l) = (a.hidden as f64, a.intermediate as f64, a.layers as f64);
    let head_dim = h / a.heads as f64;
    let qkv = h * (h + 2.0 * a.kv_heads as f64 * head_dim);
    let per_layer = qkv + h * h + 2.0 * h * i + i * h;
    let linear = l * per_layer + a.vocab as f64 * h;
    4.0 * linear + 12.0 * l * args.seq as f64 * h
}

fn run_reference(a: &BenchTrainArgs, dtype: DType) -> Result<Reference, Failure> {
    let shape = a.model.resolved();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    python_ref::run(
        &a.python,
        assets::BENCH_TRAIN_REFERENCE,
        "PyTorch + PEFT",
        "torch, transformers, peft",
        |cmd| {
            for (flag, v) in shape.python_args().into_iter().chain([
                ("--seq", a.seq),
                ("--batch", a.batch),
                ("--r", a.r),
                ("--steps", a.steps),
                ("--warmup", a.warmup),
                ("--threads", threads),
            ]) {
                cmd.args([flag, &v.to_string()]);
            }
            cmd.args([
                "--device",
                &a.device,
                "--dtype",
                &format!("{dtype:?}").to_lowercase(),
            ])
            .args(["--lora-dropout", &a.lora_dropout.to_string()])
            .args(a.recompute.then_some("--recompute"));
        },
    )
}

/// `--dtype`, else bf16 on CUDA and f32 on the CPU.
pub fn bench_dtype(name: Option<&str>, device: &candle_core::Device) -> Result<DType, Failure> {
    match name {
        Some(name) => ferrotune_model::loaded::parse_dtype(name)
            .ok_or_else(|| Failure::usage(format!("--dtype {name}: expected f32, bf16 or f16"))),
        None if device.is_cuda() => Ok(DType::BF16),
        None => Ok(DType::F32),
    }
}

/// A Phi-3 of `shape` with random weights on `device`, and its config as JSON.
pub fn random_model(
    shape: &RandomShape,
    seq: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<(Phi3, serde_json::Value), Failure> {
    let cfg_json = json!({"model_type": "phi3", "vocab_size": shape.vocab, "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": seq.max(4096)});
    let cfg = Phi3Config::from_json_str(&cfg_json.to_string()).map_err(Failure::usage)?;
    let weights = RandomWeights {
        dtype,
        device: device.clone(),
    };
    Ok((Phi3::load(&cfg, &weights, dtype, device)?, cfg_json))
}

/// Peak resident set of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
