//! `ferrotune plan`: the memory a training config needs per GPU, and whether it fits a GPU or
//! an Azure VM size, before anything is loaded.

use ferrotune_model::weights::resolve_model;
use ferrotune_model::{peft, Phi3Config};
use ferrotune_train::plan::{self, FusedOps, PlanInput, Target};
use ferrotune_train::setup::{lora_config, max_seq_length};
use ferrotune_train::{Precision, TrainConfig};
use serde_json::json;

use crate::cli::PlanArgs;
use crate::failure::Failure;

/// The planner's view of `cfg` on a device with bf16 (`gpu = true`) or the CPU.
pub fn input(cfg: &TrainConfig, gpu: bool) -> Result<PlanInput, Failure> {
    let model_dir = resolve_model(&cfg.model)?;
    let model = Phi3Config::from_dir(&model_dir)?;
    let seq_len = max_seq_length(cfg, &model)?;
    let lora = match &cfg.init_adapter {
        Some(dir) => peft::read_config(dir)?,
        None => lora_config(cfg),
    };
    let dtype_bytes = match cfg.precision {
        Precision::Fp32 => 4,
        Precision::Bf16 | Precision::Fp16 => 2,
        Precision::Auto if gpu => 2,
        Precision::Auto => 4,
    };
    Ok(PlanInput {
        model,
        lora,
        micro_batch: cfg.per_device_train_batch_size,
        seq_len,
        dtype_bytes,
        recompute: cfg.gradient_checkpointing,
        ops: FusedOps::for_run(gpu, dtype_bytes),
        gpu,
    })
}

pub fn run(args: &PlanArgs, json_out: bool) -> Result<(), Failure> {
    let cfg = TrainConfig::load(&args.config, &args.sets)?;
    let target: Option<Target> = match (&args.gpu, &args.sku) {
        (Some(g), _) => Some(plan::gpu(g).map_err(|e| Failure::usage(format!("--gpu {g}: {e}")))?),
        (_, Some(s)) => {
            Some(plan::azure_sku(s).map_err(|e| Failure::usage(format!("--sku {s}: {e}")))?)
        }
        _ => None,
    };
    let mut input = input(&cfg, target.is_some())?;
    // Flash attention needs sm_80+ (the GPUs with bf16); elsewhere the run keeps the
    // probabilities whatever the switch says.
    let ampere = target.as_ref().is_some_and(|t| t.bf16);
    if target.is_some() && !ampere {
        input.ops.flash_attention = false;
    }
    let estimate = plan::estimate(&input);
    let on_device = target
        .as_ref()
        .map(|_| plan::with_device_overhead(&estimate));
    let verdict = target
        .as_ref()
        .map(|t| plan::verdict(&input, t.memory_per_gpu));
    let bf16_note = target.as_ref().and_then(|t| {
        (!t.bf16 && matches!(cfg.precision, Precision::Bf16 | Precision::Auto)).then(|| {
            format!(
                "{} has no bf16: set precision: fp16 (dynamic loss scaling)",
                t.name
            )
        })
    });
    let ranks = args.gpus.or_else(|| {
        target
            .as_ref()
            .filter(|_| args.sku.is_some())
            .map(|t| t.gpus_per_node)
    });
    let parallel = ranks.map(|n| plan::data_parallel(&estimate, n));
    // Without a GPU named, the plan is for this machine's CPU: checked against the memory
    // available now, as `train` checks it before it starts.
    let available = target
        .is_none()
        .then(|| ferrotune_model::device_memory::capacity(&candle_core::Device::Cpu))
        .flatten();
    let host_verdict = available.map(|c| plan::verdict(&input, c.free));
    // On a GPU in bf16/f16, what the run would plan with flash attention (opt-in until a GPU
    // has run it), where it does not use it already.
    let flash_total =
        (ampere && input.dtype_bytes == 2 && input.ops.kernels && !input.ops.flash_attention).then(
            || {
                let mut flash = input.clone();
                flash.ops.flash_attention = true;
                plan::with_device_overhead(&plan::estimate(&flash)).total
            },
        );
    if json_out {
        println!(
            "{}",
            json!({"plan": on_device.as_ref().unwrap_or(&estimate), "target": target, "verdict": verdict,
                   "micro_batch": input.micro_batch, "seq_len": input.seq_len, "recompute": input.recompute,
                   "dtype_bytes": input.dtype_bytes, "note": bf16_note, "data_parallel": parallel,
                   "host_verdict": host_verdict, "flash_attention": input.ops.flash_attention,
                   "flash_attention_total": flash_total})
        );
        return Ok(());
    }
    println!(
        "{}: micro batch {} × {} tokens, {} bytes/weight, recompute {}",
        cfg.display_name(),
        input.micro_batch,
        input.seq_len,
        input.dtype_bytes,
        if input.recompute { "on" } else { "off" }
    );
    print!("{}", plan::render(on_device.as_ref().unwrap_or(&estimate)));
    if let (Some(t), Some(v)) = (&target, &verdict) {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        println!(
            "{} ({} GPU{} × {:.0} GiB): {} — needs {:.2} GiB of {:.2} GiB usable per GPU",
            t.name,
            t.gpus_per_node,
            if t.gpus_per_node == 1 { "" } else { "s" },
            gib(t.memory_per_gpu),
            if v.fits { "FITS" } else { "DOES NOT FIT" },
            gib(v.needed_bytes),
            gib(v.usable_bytes)
        );
        match v.largest_micro_batch {
            Some(b) => println!(
                "  largest per_device_train_batch_size at {} tokens: {b}",
                input.seq_len
            ),
            None => println!("  not even one sequence of {} tokens fits", input.seq_len),
        }
        if let Some(t) = v.largest_seq_len {
            println!(
                "  longest max_seq_length at batch {}: {t}",
                input.micro_batch
            );
        }
        if !input.recompute && !v.fits {
            println!("  try gradient_checkpointing: true (per-layer recompute)");
        }
        if let Some(total) = flash_total {
            println!(
                "  with flash attention (FERROTUNE_TRAIN_ATTENTION=flash; sm_80+, not yet run on a GPU): {:.2} GiB{}",
                gib(total),
                if !v.fits && total <= v.usable_bytes { ", which fits" } else { "" }
            );
        }
    }
    if let (Some(c), Some(v)) = (available, &host_verdict) {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        println!(
            "this machine (CPU, {:.2} GiB available of {:.2} GiB): {} — needs {:.2} GiB of {:.2} GiB usable",
            gib(c.free),
            gib(c.total),
            if v.fits { "FITS" } else { "DOES NOT FIT" },
            gib(v.needed_bytes),
            gib(v.usable_bytes)
        );
    }
    if let Some(n) = bf16_note {
        println!("  note: {n}");
    }
    if let Some(p) = &parallel {
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "data parallel over {} rank(s): each step all-reduces {:.1} MB of fp32 LoRA gradients ({:.1} MB sent per rank in a ring); \
             global batch = per_device_train_batch_size × gradient_accumulation_steps × {}",
            p.ranks,
            mb(p.gradient_bytes_per_step),
            mb(p.ring_bytes_per_rank),
            p.ranks
        );
        println!(
            "  optimizer state per rank: {:.1} MB; with apply_deepspeed + deepspeed_stage 1 or 2: {:.1} MB",
            mb(p.optimizer_state_per_rank),
            mb(p.optimizer_state_per_rank_zero2)
        );
        if p.ranks > 1 {
            for (link, gbs, ms) in &p.links {
                println!("  on paper, {link} at {gbs:.0} GB/s: {ms:.2} ms per step");
            }
        }
    }
    Ok(())
}
