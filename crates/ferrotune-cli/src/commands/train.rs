//! `ferrotune train`: config → data (through the cache) → model + LoRA → the loop, with a
//! progress bar, Ctrl-C to checkpoint and stop (exit 130), and a summary at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferrotune_model::loaded::load_model;
use ferrotune_model::weights::resolve_model;
use ferrotune_model::Phi3Config;
use ferrotune_train::checkpoint;
use ferrotune_train::dist::tcp::{JobIdentity, TcpComm, TcpOptions};
use ferrotune_train::dist::{Communicator, RankEnv, Solo};
use ferrotune_train::setup::{attach_lora, load_split, max_seq_length};
use ferrotune_train::trainer::{dtype_for, Observer};
use ferrotune_train::{Finish, RunData, RunOptions, Summary, TrainConfig};
use serde_json::json;

use crate::cli::TrainArgs;
use crate::commands::model_args;
use crate::commands::tracking::{identity, tracking_uri, MlflowObserver};
use crate::failure::Failure;
use crate::progress::{RowBar, TrainBar};

pub fn run(args: &TrainArgs, json_out: bool) -> Result<(), Failure> {
    let cfg = TrainConfig::load(&args.config, &args.sets)?;
    if args.dry_run {
        return dry_run(&cfg, json_out);
    }
    // The ranks (this process, or those a launcher starts) read the timeout from here.
    std::env::set_var("FERROTUNE_DIST_TIMEOUT", args.dist_timeout.to_string());
    if args.nproc_per_node.is_some() && std::env::var_os("WORLD_SIZE").is_none() {
        return crate::commands::launch::launch(args);
    }
    let summary = train(&cfg, args.resume.as_deref(), !json_out, &mut Vec::new())?;
    if job_rank() == 0 {
        report(&cfg, &summary, json_out);
    }
    if summary.finish == Finish::Interrupted {
        return Err(Failure {
            code: Failure::INTERRUPTED,
            message: format!(
                "interrupted at step {}; checkpoint {} (continue with --resume auto)",
                summary.steps,
                summary.last_checkpoint.display()
            ),
        });
    }
    Ok(())
}

fn dry_run(cfg: &TrainConfig, json_out: bool) -> Result<(), Failure> {
    let model_dir = resolve_model(&cfg.model)?;
    let model_cfg = Phi3Config::from_dir(&model_dir)?;
    let seq = max_seq_length(cfg, &model_cfg)?;
    let on_gpu = cfg.device.starts_with("cuda")
        || (cfg.device == "auto" && candle_core::utils::cuda_is_available());
    // With the GPU at hand, the plan knows which kernels run on it (flash attention: sm_80+).
    let input = match on_gpu
        .then(|| model_args::device(Some(&cfg.device)))
        .and_then(Result::ok)
    {
        Some(device) if device.is_cuda() => plan_input(cfg, &device)?,
        _ => crate::commands::plan::input(cfg, on_gpu)?,
    };
    let mut estimate = ferrotune_train::plan::estimate(&input);
    if on_gpu {
        estimate = ferrotune_train::plan::with_device_overhead(&estimate);
    }
    if json_out {
        println!(
            "{}",
            json!({"config": cfg, "display_name": cfg.display_name(), "max_seq_length": seq,
                   "training_hash": cfg.training_hash(), "plan": estimate})
        );
    } else {
        println!("# resolved config ({})", cfg.display_name());
        print!("{}", cfg.to_yaml());
        println!(
            "# sequences of at most {seq} tokens; training hash {}",
            cfg.training_hash()
        );
        println!(
            "# memory plan per {}:",
            if on_gpu { "GPU" } else { "process (CPU)" }
        );
        for line in ferrotune_train::plan::render(&estimate).lines() {
            println!("#   {line}");
        }
    }
    Ok(())
}

/// Set to 1 to train even when the memory plan says the run does not fit.
const SKIP_MEMORY_CHECK: &str = "FERROTUNE_SKIP_MEMORY_CHECK";

/// The planner's view of the run on `device`: flash attention only where its kernels run (below
/// sm_80 the run keeps the probabilities whatever the switch says; asked with a bf16 tensor).
fn plan_input(
    cfg: &TrainConfig,
    device: &candle_core::Device,
) -> Result<ferrotune_train::plan::PlanInput, Failure> {
    let gpu = !device.is_cpu();
    let mut input = crate::commands::plan::input(cfg, gpu)?;
    if gpu && input.ops.flash_attention {
        input.ops.flash_attention =
            candle_core::Tensor::zeros((1, 1, 1, 96), candle_core::DType::BF16, device)
                .is_ok_and(|q| ferrotune_model::attention::flash_supported(&q));
    }
    Ok(input)
}

/// Refuses, before anything is loaded, a run whose memory plan does not fit what `device` has:
/// a GPU's capacity, or on the CPU the memory available now shared by the `local_world` ranks
/// of this node. Where the device cannot be asked, nothing is checked.
fn check_memory(
    cfg: &TrainConfig,
    device: &candle_core::Device,
    local_world: usize,
    skip: Option<&String>,
) -> Result<(), Failure> {
    let gpu = !device.is_cpu();
    let input = plan_input(cfg, device)?;
    let Some(capacity) = ferrotune_model::device_memory::capacity(device) else {
        return Ok(());
    };
    // A GPU is the run's own (one rank each); the CPU's memory is what is free for all ranks.
    let (memory, ranks, what) = if gpu {
        (capacity.total, 1, format!("{device:?} has"))
    } else {
        (
            capacity.free / local_world.max(1) as u64,
            local_world.max(1),
            "this machine has available".to_string(),
        )
    };
    let verdict = ferrotune_train::plan::verdict(&input, memory);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    if verdict.fits {
        tracing::debug!(
            "memory plan {:.2} GiB per rank fits ({:.2} GiB usable)",
            gib(verdict.needed_bytes),
            gib(verdict.usable_bytes)
        );
        return Ok(());
    }
    let per_rank = if ranks > 1 {
        format!(" for each of {ranks} ranks")
    } else {
        String::new()
    };
    let mut advice = Vec::new();
    if let Some(b) = verdict
        .largest_micro_batch
        .filter(|&b| b < cfg.per_device_train_batch_size)
    {
        advice.push(format!("per_device_train_batch_size: {b}"));
    }
    if let Some(t) = verdict.largest_seq_len.filter(|&t| t < input.seq_len) {
        advice.push(format!("max_seq_length: {t}"));
    }
    if !cfg.gradient_checkpointing {
        advice.push("gradient_checkpointing: true".into());
    }
    let message = format!(
        "the memory plan needs {:.2} GiB{per_rank}, {what} {:.2} GiB ({:.2} GiB usable): the run would not fit. {}See `ferrotune plan --config <this config>` for the breakdown; set {SKIP_MEMORY_CHECK}=1 to try anyway.",
        gib(verdict.needed_bytes),
        gib(memory),
        gib(verdict.usable_bytes),
        if advice.is_empty() {
            String::new()
        } else {
            format!("Try {}. ", advice.join(", or "))
        }
    );
    if skip.is_some_and(|v| v == "1") {
        tracing::warn!("{message} ({SKIP_MEMORY_CHECK}=1: training anyway)");
        return Ok(());
    }
    Err(Failure::usage(message))
}

/// Run training as `cfg` says; `extra` observers see the run too (MLflow, the pipeline).
pub fn train(
    cfg: &TrainConfig,
    resume: Option<&str>,
    show_progress: bool,
    extra: &mut Vec<Box<dyn Observer>>,
) -> Result<Summary, Failure> {
    // One rank of a data-parallel job when a launcher set the world (torchrun, Azure ML,
    // `--nproc-per-node`); rank 0 admits the others only if they run the same training.
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let job = RankEnv::from_env(&env)?;
    let (rank, local_rank) = job.as_ref().map_or((0, 0), |j| (j.rank, j.local_rank));
    let lead = rank == 0;
    let show_progress = show_progress && lead;
    let device = model_args::device(
        match cfg.device.as_str() {
            // Each rank on a node takes its own GPU.
            "auto" | "cuda" if job.is_some() && candle_core::utils::cuda_is_available() => {
                Some(format!("cuda:{local_rank}"))
            }
            "auto" => None,
            d => Some(d.to_string()),
        }
        .as_deref(),
    )?;
    let mut comm: Box<dyn Communicator> = match &job {
        Some(j) if j.world > 1 => join_job(j, cfg, &env, &device)?,
        _ => Box::new(Solo),
    };
    let dtype = dtype_for(cfg.precision, &device);
    let model_dir = resolve_model(&cfg.model)?;
    let model_cfg = Phi3Config::from_dir(&model_dir)?;
    let seq = max_seq_length(cfg, &model_cfg)?;
    let tokenizer = cfg
        .tokenizer
        .clone()
        .unwrap_or_else(|| ferrotune_model::weights::tokenizer_dir_for(&model_dir));
    let resume_from = match resume {
        Some(spec) => checkpoint::resolve_resume(spec, &cfg.output_dir)?,
        None => None,
    };
    if resume.is_none() && !checkpoint::list(&cfg.output_dir).is_empty() {
        return Err(Failure::usage(format!(
            "output_dir {} already holds checkpoints; continue with --resume auto, or choose another output_dir",
            cfg.output_dir.display()
        )));
    }

    let local_world = job.as_ref().map_or(1, |j| j.local_world);
    check_memory(cfg, &device, local_world, env.get(SKIP_MEMORY_CHECK))?;

    let rows = RowBar::new(show_progress);
    let data_dir = cfg.output_dir.join("data");
    let vocab = model_cfg.vocab_size;
    // Data are prepared once per node (local rank 0); the other ranks wait, then read the cache.
    let load = || -> Result<_, Failure> {
        let train = load_split(
            "train_file_path",
            &cfg.train_file_path,
            &cfg.train_split,
            &tokenizer,
            &data_dir.join("train"),
            seq,
            cfg.pack,
            vocab,
            &rows,
        )?;
        let validation = match &cfg.validation_file_path {
            Some(path) => Some(load_split(
                "validation_file_path",
                path,
                &cfg.validation_split,
                &tokenizer,
                &data_dir.join("validation"),
                seq,
                cfg.pack,
                vocab,
                &rows,
            )?),
            None => None,
        };
        Ok((train, validation))
    };
    let data_wait =
        std::time::Duration::from_secs(seconds_from(&env, "FERROTUNE_DIST_DATA_TIMEOUT", 7200));
    let (train, validation) = if local_rank == 0 {
        let loaded = load()?;
        comm.barrier(data_wait)?;
        loaded
    } else {
        comm.barrier(data_wait)?;
        load()?
    };
    rows.finish();

    // On a GPU, the device memory in use is sampled from before the weights load to the end, and
    // its peak is reported next to the plan's figure.
    let memory = ferrotune_model::device_memory::PeakSampler::start(&device);
    let loaded_at = std::time::Instant::now();
    let mut model = load_model(model_dir.to_str().unwrap_or(&cfg.model), dtype, &device)?.model;
    let lora = attach_lora(&mut model, cfg)?;
    tracing::info!(
        "model {} ({:?} on {}) loaded in {:.1} s; LoRA r={} alpha={} on {}",
        model_dir.display(),
        dtype,
        if device.is_cpu() {
            "cpu".to_string()
        } else {
            format!("{device:?}")
        },
        loaded_at.elapsed().as_secs_f64(),
        lora.r,
        lora.lora_alpha,
        lora.target_modules.join(",")
    );
    let pad_id = model_cfg
        .pad_token_id
        .filter(|&p| (p as usize) < vocab)
        .unwrap_or(0);
    let train_key = train.cache_key.clone();
    let data = RunData {
        train: train.sequences,
        validation: validation.map(|v| v.sequences),
        pad_id,
        cache_key: train_key.clone(),
    };

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // A second Ctrl-C while the checkpoint is being written kills the process as usual.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(Failure::INTERRUPTED);
        }
        eprintln!("\ninterrupt: finishing this step, writing a checkpoint (Ctrl-C again to abort)");
    });
    let options = RunOptions {
        stop,
        resume_from,
        base_model: cfg.model.clone(),
        initial_loss_scale: 65536.0,
    };
    let mut mlflow = tracking_uri(cfg)
        .filter(|_| lead)
        .and_then(|uri| MlflowObserver::start(&uri, identity(cfg, &train_key)));
    let mut bar = TrainBar::new(show_progress);
    let result = {
        let mut watchers: Vec<&mut dyn Observer> = vec![&mut bar];
        if let Some(m) = mlflow.as_mut() {
            watchers.push(m);
        }
        if lead {
            for o in extra.iter_mut() {
                watchers.push(o.as_mut());
            }
        }
        ferrotune_train::trainer::train_with(
            cfg,
            &mut model,
            &lora,
            &data,
            &options,
            &mut Fan(watchers),
            comm.as_mut(),
        )
    };
    bar.finish();
    if let Some(used) = memory.finish() {
        let planned = plan_input(cfg, &device).map(|i| {
            ferrotune_train::plan::with_device_overhead(&ferrotune_train::plan::estimate(&i)).total
        });
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        tracing::info!(
            "peak device memory {:.2} GiB in use on the GPU ({:.2} GiB before loading){}",
            gib(used.peak),
            gib(used.at_start),
            planned.map_or(String::new(), |p| format!(
                "; ferrotune plan said {:.2} GiB",
                gib(p)
            ))
        );
    }
    if let Some(m) = mlflow {
        let status = match &result {
            Ok(s) if s.finish == Finish::Interrupted => "KILLED",
            Ok(_) => "FINISHED",
            Err(_) => "FAILED",
        };
        m.finish(status, run_artifacts(cfg, result.as_ref().ok()));
    }
    Ok(result?)
}

/// Joins the job: NCCL for GPU ranks when built with it, else the TCP backend (through host
/// memory). The backend is part of what every rank must agree on.
fn join_job(
    j: &RankEnv,
    cfg: &TrainConfig,
    env: &std::collections::HashMap<String, String>,
    device: &candle_core::Device,
) -> Result<Box<dyn Communicator>, Failure> {
    let nccl = cfg!(feature = "nccl") && device.is_cuda();
    let identity = JobIdentity {
        version: format!(
            "{} ({})",
            env!("CARGO_PKG_VERSION"),
            if nccl { "nccl" } else { "tcp" }
        ),
        config_hash: cfg.training_hash_for(j.world),
    };
    let timeout = std::time::Duration::from_secs(seconds_from(env, "FERROTUNE_DIST_TIMEOUT", 600));
    let opts = TcpOptions {
        timeout,
        join_timeout: timeout.max(std::time::Duration::from_secs(60)),
    };
    #[cfg(feature = "nccl")]
    if nccl {
        let id = if j.rank == 0 {
            Some(ferrotune_train::dist::nccl::new_id()?)
        } else {
            None
        };
        let tcp = TcpComm::join(j, &identity, &opts, id)?;
        let comm = ferrotune_train::dist::nccl::NcclComm::join(tcp, device)?;
        tracing::info!("rank {} of {} joined over NCCL", j.rank, j.world);
        return Ok(Box::new(comm));
    }
    let comm = TcpComm::join(j, &identity, &opts, None)?;
    tracing::info!(
        "rank {} of {} joined (rank 0 at {}:{}, TCP backend)",
        j.rank,
        j.world,
        j.master_addr,
        j.master_port
    );
    Ok(Box::new(comm))
}

/// This process's rank in a job (0 when alone).
pub fn job_rank() -> usize {
    std::env::var("RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn seconds_from(env: &std::collections::HashMap<String, String>, key: &str, default: u64) -> u64 {
    env.get(key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Files a finished run uploads to MLflow: the adapter, the config, metrics and the plot.
fn run_artifacts(cfg: &TrainConfig, summary: Option<&Summary>) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Some(s) = summary else {
        return out;
    };
    if let Some(adapter) = &s.adapter {
        for name in [
            ferrotune_model::peft::CONFIG_FILE,
            ferrotune_model::peft::WEIGHTS_FILE,
        ] {
            out.push((format!("adapter/{name}"), adapter.join(name)));
        }
    }
    out.push((
        checkpoint::CONFIG_FILE.to_string(),
        s.last_checkpoint.join(checkpoint::CONFIG_FILE),
    ));
    out.push(("metrics.jsonl".into(), s.metrics.clone()));
    let plot = cfg.output_dir.join(ferrotune_train::plot::PLOT_FILE);
    if plot.exists() {
        out.push((ferrotune_train::plot::PLOT_FILE.into(), plot));
    }
    out
}

/// Forwards every event to several observers.
struct Fan<'a>(Vec<&'a mut dyn Observer>);

impl Observer for Fan<'_> {
    fn started(&mut self, shape: &ferrotune_train::RunShape) {
        self.0.iter_mut().for_each(|o| o.started(shape));
    }
    fn step(&mut self, step: u64, total: u64, loss: f64, lr: f64, tps: f64) {
        self.0
            .iter_mut()
            .for_each(|o| o.step(step, total, loss, lr, tps));
    }
    fn record(&mut self, record: &ferrotune_train::metrics::Record) {
        self.0.iter_mut().for_each(|o| o.record(record));
    }
    fn checkpoint(&mut self, path: &std::path::Path) {
        self.0.iter_mut().for_each(|o| o.checkpoint(path));
    }
}

/// The end-of-run summary (text or JSON on stdout).
pub fn report(cfg: &TrainConfig, s: &Summary, json_out: bool) {
    if json_out {
        println!("{}", json!({"summary": s, "output_dir": cfg.output_dir}));
        return;
    }
    let finish = match s.finish {
        Finish::Completed => "completed",
        Finish::EarlyStopped => "stopped early",
        Finish::Interrupted => "interrupted",
    };
    println!(
        "training {finish}: {}/{} steps in {:.1} s ({:.0} tokens/s)",
        s.steps, s.total_steps, s.elapsed_s, s.tokens_per_s
    );
    if let Some(l) = s.last_train_loss {
        println!("  train loss  {l:.4}");
    }
    if let Some(e) = &s.final_eval {
        println!(
            "  eval loss   {:.4}  perplexity {:.3}  token accuracy {:.1}%",
            e.loss,
            e.perplexity,
            100.0 * e.accuracy
        );
    }
    println!("  checkpoint  {}", s.last_checkpoint.display());
    if let Some(a) = &s.adapter {
        println!("  adapter     {}", a.display());
    }
    println!("  metrics     {}", s.metrics.display());
    let plot: PathBuf = cfg.output_dir.join(ferrotune_train::plot::PLOT_FILE);
    if plot.exists() {
        println!("  loss plot   {}", plot.display());
    }
}
