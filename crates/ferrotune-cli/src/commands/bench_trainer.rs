//! `ferrotune bench train --config FILE`: a whole training run of ferrotune against
//! transformers' Trainer + PEFT on the same prepared data and hyper-parameters, in one call:
//! steps/s, tokens/s, peak RSS and the final eval loss of both, and the ratios.

use std::path::Path;

use ferrotune_train::TrainConfig;
use serde::Deserialize;
use serde_json::json;

use crate::assets;
use crate::cli::BenchTrainArgs;
use crate::commands::bench_train::peak_rss_bytes;
use crate::commands::python_ref;
use crate::commands::train::train;
use crate::failure::Failure;

#[derive(Deserialize)]
struct Reference {
    steps: u64,
    seconds: f64,
    tokens_per_s: f64,
    peak_rss_bytes: u64,
    final_eval_loss: Option<f64>,
    torch: String,
    transformers: String,
}

pub fn run(config: &Path, args: &BenchTrainArgs, json_out: bool) -> Result<(), Failure> {
    let mut cfg = TrainConfig::load(config, &args.sets)?;
    let scratch =
        std::env::temp_dir().join(format!("ferrotune-bench-trainer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    cfg.output_dir = scratch.clone();
    cfg.tracking_uri = None;
    std::env::remove_var("MLFLOW_TRACKING_URI");
    let result = measure(&cfg, args, json_out);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn measure(cfg: &TrainConfig, args: &BenchTrainArgs, json_out: bool) -> Result<(), Failure> {
    let summary = train(cfg, None, false, &mut Vec::new())?;
    let ours_rss = peak_rss_bytes();
    let tokens: f64 = summary.tokens_per_s * summary.elapsed_s;
    let ours_steps_s = summary.steps as f64 / summary.elapsed_s.max(1e-9);
    let ours_eval = summary.final_eval.map(|e| e.loss);
    let reference = if args.no_reference {
        None
    } else {
        Some(run_reference(cfg, args)?)
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if json_out {
        println!(
            "{}",
            json!({
                "ferrotune": {"steps": summary.steps, "seconds": summary.elapsed_s, "steps_per_s": ours_steps_s,
                              "tokens_per_s": summary.tokens_per_s, "tokens": tokens.round(), "peak_rss_bytes": ours_rss,
                              "final_eval_loss": ours_eval},
                "reference": reference.as_ref().map(|r| json!({"steps": r.steps, "seconds": r.seconds,
                              "tokens_per_s": r.tokens_per_s, "peak_rss_bytes": r.peak_rss_bytes,
                              "final_eval_loss": r.final_eval_loss, "torch": r.torch, "transformers": r.transformers})),
                "ratio_tokens_per_s": reference.as_ref().map(|r| summary.tokens_per_s / r.tokens_per_s.max(1e-9)),
                "ratio_peak_rss": reference.as_ref().map(|r| ours_rss as f64 / r.peak_rss_bytes.max(1) as f64),
            })
        );
        return Ok(());
    }
    let eval = |l: Option<f64>| l.map_or_else(|| "-".to_string(), |l| format!("{l:.4}"));
    println!("{} ({} steps)", cfg.display_name(), summary.steps);
    println!(
        "ferrotune  {:>6.2} steps/s  {:>8.0} tokens/s  {:>7.1} s  peak RSS {:.2} GiB  eval loss {}",
        ours_steps_s,
        summary.tokens_per_s,
        summary.elapsed_s,
        gib(ours_rss),
        eval(ours_eval)
    );
    if let Some(r) = &reference {
        println!(
            "reference  {:>6.2} steps/s  {:>8.0} tokens/s  {:>7.1} s  peak RSS {:.2} GiB  eval loss {}  (Trainer + PEFT, torch {}, transformers {})",
            r.steps as f64 / r.seconds.max(1e-9),
            r.tokens_per_s,
            r.seconds,
            gib(r.peak_rss_bytes),
            eval(r.final_eval_loss),
            r.torch,
            r.transformers
        );
        println!(
            "ratio      {:.2}x tokens/s, {:.2}x peak RSS (ferrotune's time includes its evals and checkpoints; the reference's is trainer.train() alone)",
            summary.tokens_per_s / r.tokens_per_s.max(1e-9),
            ours_rss as f64 / r.peak_rss_bytes.max(1) as f64
        );
    }
    Ok(())
}

fn run_reference(cfg: &TrainConfig, args: &BenchTrainArgs) -> Result<Reference, Failure> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let data = cfg.output_dir.join("data");
    // The resolved config (absolute paths, --set applied), so both sides train the same thing.
    let resolved = cfg.output_dir.join("bench_config.yaml");
    std::fs::write(&resolved, cfg.to_yaml())
        .map_err(|e| Failure::runtime(format!("{}: {e}", resolved.display())))?;
    python_ref::run(
        &args.python,
        assets::BENCH_TRAINER_REFERENCE,
        "Trainer + PEFT",
        "torch, transformers, peft",
        |cmd| {
            cmd.arg("--config")
                .arg(&resolved)
                .arg("--train-data")
                .arg(data.join("train"))
                .args(["--threads", &threads.to_string()]);
            if cfg.validation_file_path.is_some() {
                cmd.arg("--validation-data").arg(data.join("validation"));
            }
            if cfg.max_steps > 0 {
                cmd.args(["--max-steps", &cfg.max_steps.to_string()]);
            }
        },
    )
}
