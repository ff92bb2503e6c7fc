//! `ferrotune bench decode`: prefill time and greedy decoding tokens/s with the KV cache, single
//! stream and batched, against transformers' `generate` on the same shape and lengths, in one run.

use std::time::Instant;

use candle_core::DType;
use ferrotune_model::generate::{generate, Sampling};
use ferrotune_model::Phi3;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::assets;
use crate::cli::BenchDecodeArgs;
use crate::commands::bench_train::{bench_dtype, random_model};
use crate::commands::{model_args, python_ref};
use crate::failure::Failure;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Measured {
    batch: usize,
    prefill_s: f64,
    total_s: f64,
    decode_tokens_per_s: f64,
}

#[derive(Deserialize)]
struct Reference {
    torch: String,
    results: Vec<Measured>,
}

pub fn run(args: &BenchDecodeArgs, json_out: bool) -> Result<(), Failure> {
    if args.prompt == 0 || args.new_tokens < 2 || args.batches.contains(&0) {
        return Err(Failure::usage(
            "--prompt ≥ 1, --new-tokens ≥ 2 and batch sizes ≥ 1 are needed",
        ));
    }
    let device = model_args::device(Some(&args.device))?;
    let dtype = bench_dtype(args.dtype.as_deref(), &device)?;
    let shape = args.model.resolved();
    let (model, what) = match &args.model_dir {
        Some(dir) => {
            let loaded = ferrotune_model::loaded::load_model(
                dir.to_str().unwrap_or_default(),
                dtype,
                &device,
            )?;
            (loaded.model, format!("{}", dir.display()))
        }
        None => {
            if !shape.heads.is_multiple_of(shape.kv_heads.max(1)) {
                return Err(Failure::usage("--kv-heads must divide --heads"));
            }
            let (m, _) = random_model(&shape, args.prompt + args.new_tokens, dtype, &device)?;
            (
                m,
                format!(
                    "random Phi-3: {} layers, hidden {}, intermediate {}, heads {}/{}, vocab {}",
                    shape.layers,
                    shape.hidden,
                    shape.intermediate,
                    shape.heads,
                    shape.kv_heads,
                    shape.vocab
                ),
            )
        }
    };
    let vocab = model.config().vocab_size;
    let mut ours = Vec::new();
    for &b in &args.batches {
        ours.push(measure(
            &model,
            b,
            args.prompt,
            args.new_tokens,
            vocab,
            &device,
        )?);
    }
    let reference = if args.no_reference {
        None
    } else {
        Some(run_reference(args, dtype)?)
    };
    if json_out {
        println!(
            "{}",
            json!({"model": what, "device": args.device, "dtype": format!("{dtype:?}").to_lowercase(),
                   "prompt": args.prompt, "new_tokens": args.new_tokens, "ferrotune": ours,
                   "reference": reference.as_ref().map(|r| json!({"torch": r.torch, "results": r.results})),
                   "ratios": reference.as_ref().map(|r| ours.iter().zip(&r.results)
                        .map(|(o, p)| o.decode_tokens_per_s / p.decode_tokens_per_s).collect::<Vec<_>>())})
        );
        return Ok(());
    }
    println!(
        "model      {what}; {dtype:?} on {}; prompt {} tokens, {} new tokens (greedy, KV cache)",
        args.device, args.prompt, args.new_tokens
    );
    for (i, o) in ours.iter().enumerate() {
        let theirs = reference.as_ref().and_then(|r| r.results.get(i));
        println!(
            "batch {:>3}  ferrotune {:>9.0} tokens/s (prefill {:>7.1} ms){}",
            o.batch,
            o.decode_tokens_per_s,
            o.prefill_s * 1e3,
            theirs.map_or(String::new(), |t| format!(
                "   transformers {:>9.0} tokens/s (prefill {:>7.1} ms)   ratio {:.2}x",
                t.decode_tokens_per_s,
                t.prefill_s * 1e3,
                o.decode_tokens_per_s / t.decode_tokens_per_s
            ))
        );
    }
    if let Some(r) = &reference {
        println!("reference  PyTorch {} `generate`", r.torch);
    }
    Ok(())
}

/// A warm-up, then a 1-token run (the prefill) and a full run; decoding is the difference.
fn measure(
    model: &Phi3,
    batch: usize,
    prompt: usize,
    new_tokens: usize,
    vocab: usize,
    device: &candle_core::Device,
) -> Result<Measured, Failure> {
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|r| {
            (0..prompt)
                .map(|i| (((r * prompt + i) * 7919 + 13) % vocab) as u32)
                .collect()
        })
        .collect();
    let timed = |n: usize| -> Result<f64, Failure> {
        let s = Sampling {
            max_new_tokens: n,
            ..Sampling::default()
        };
        device.synchronize()?;
        let start = Instant::now();
        let out = generate(model, &prompts, &s)?;
        device.synchronize()?;
        debug_assert!(out.iter().all(|o| o.len() == n));
        Ok(start.elapsed().as_secs_f64())
    };
    timed(2)?;
    // The prefill is short and the decode rate is what is left of the total, so one noisy
    // prefill run would skew it: the fastest of three is taken.
    let prefill_s = (0..3)
        .map(|_| timed(1))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    let total_s = timed(new_tokens)?;
    Ok(Measured {
        batch,
        prefill_s,
        total_s,
        decode_tokens_per_s: (batch * (new_tokens - 1)) as f64 / (total_s - prefill_s).max(1e-9),
    })
}

fn run_reference(a: &BenchDecodeArgs, dtype: DType) -> Result<Reference, Failure> {
    let shape = a.model.resolved();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let batches: Vec<String> = a.batches.iter().map(usize::to_string).collect();
    let model_dir = match &a.model_dir {
        Some(dir) => Some(ferrotune_model::weights::resolve_model(
            dir.to_str().unwrap_or_default(),
        )?),
        None => None,
    };
    python_ref::run(
        &a.python,
        assets::BENCH_DECODE_REFERENCE,
        "transformers generate",
        "torch, transformers",
        |cmd| {
            match &model_dir {
                Some(dir) => {
                    cmd.arg("--model-dir").arg(dir);
                }
                None => {
                    for (flag, v) in shape.python_args() {
                        cmd.args([flag, &v.to_string()]);
                    }
                }
            }
            cmd.args([
                "--prompt",
                &a.prompt.to_string(),
                "--new-tokens",
                &a.new_tokens.to_string(),
            ])
            .args([
                "--batches",
                &batches.join(","),
                "--threads",
                &threads.to_string(),
            ])
            .args([
                "--device",
                &a.device,
                "--dtype",
                &format!("{dtype:?}").to_lowercase(),
            ]);
        },
    )
}
