//! The training loop, readable top to bottom: for each optimizer step, take the step's
//! accumulation window from the epoch's seeded order, run forward and backward on each
//! micro-batch (loss scaled by 1 / the window's trained tokens, so the step's gradient is that
//! of the token-mean loss over the whole window), unscale and check, clip, AdamW, then log,
//! evaluate, checkpoint. Everything a step depends on is a function of (seed, step), so a run
//! resumed from a checkpoint computes exactly what the uninterrupted run would have.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use ferrotune_data::TrainingSequence;
use ferrotune_model::rng::derive;
use ferrotune_model::{peft, LoraConfig, Phi3};
use serde::{Deserialize, Serialize};

use crate::batches::{collate, epoch_order, EpochShape, MicroBatch};
use crate::checkpoint::{self, CheckpointContents, TrainerState};
use crate::config::{Precision, TrainConfig};
use crate::dist::{self, Communicator, Solo};
use crate::error::{Result, TrainError};
use crate::eval::{eval_sums, EvalMetrics, EvalSums};
use crate::metrics::{EvalRecord, MetricsFile, Record, TrainRecord};
use crate::optimizer::{clip, combine_norms, global_norm, tensor_norms, AdamW, AdamWSettings};
use crate::schedule::Schedule;

/// The final adapter of a run, in PEFT layout: `output_dir/adapter`.
pub const ADAPTER_DIR: &str = "adapter";
/// fp16: steps without overflow before the loss scale doubles (torch's GradScaler default).
const SCALE_GROWTH_INTERVAL: u64 = 2000;

/// Tokenized data for a run.
pub struct RunData {
    pub train: Vec<TrainingSequence>,
    pub validation: Option<Vec<TrainingSequence>>,
    pub pad_id: u32,
    /// The training data's cache key (`manifest.json`): a resumed run must train on the same.
    pub cache_key: String,
}

/// What the caller controls besides the config.
pub struct RunOptions {
    /// Set (e.g. by Ctrl-C) to checkpoint after the current step and stop.
    pub stop: Arc<AtomicBool>,
    pub resume_from: Option<PathBuf>,
    /// Written into the adapter's `base_model_name_or_path`.
    pub base_model: String,
    /// fp16 only: the starting loss scale (torch's GradScaler starts at 2^16).
    pub initial_loss_scale: f64,
}

/// Derived quantities of a run, reported before step 1.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunShape {
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub warmup_steps: u64,
    pub train_sequences: usize,
    pub validation_sequences: usize,
    pub trainable_parameters: usize,
    pub resumed_from: Option<PathBuf>,
    pub start_step: u64,
}

/// Something that watches a run (progress bar, MLflow).
pub trait Observer {
    fn started(&mut self, _shape: &RunShape) {}
    /// After every optimizer step.
    fn step(&mut self, _step: u64, _total: u64, _loss: f64, _lr: f64, _tokens_per_s: f64) {}
    fn record(&mut self, _record: &Record) {}
    fn checkpoint(&mut self, _path: &Path) {}
}

/// A watcher that ignores everything.
pub struct Silent;
impl Observer for Silent {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Completed,
    EarlyStopped,
    Interrupted,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub finish: Finish,
    pub steps: u64,
    pub total_steps: u64,
    pub last_checkpoint: PathBuf,
    /// The final adapter (PEFT layout); absent when interrupted.
    pub adapter: Option<PathBuf>,
    pub final_eval: Option<EvalMetrics>,
    /// Token-mean loss of the last logging window.
    pub last_train_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub metrics: PathBuf,
}

/// The model dtype a precision setting means on `device`.
pub fn dtype_for(precision: Precision, device: &candle_core::Device) -> DType {
    match precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
        Precision::Auto if device.is_cuda() => DType::BF16,
        Precision::Auto => DType::F32,
    }
}

/// Names of the trainable tensors, aligned with `Phi3::trainable_vars`.
fn var_names(model: &Phi3) -> Vec<String> {
    model
        .lora_pairs()
        .into_iter()
        .flat_map(|(m, _)| [format!("{m}.lora_A"), format!("{m}.lora_B")])
        .collect()
}

/// Train `model` (LoRA pairs attached) on `data` as `cfg` says, in this process alone.
pub fn train(
    cfg: &TrainConfig,
    model: &mut Phi3,
    lora: &LoraConfig,
    data: &RunData,
    options: &RunOptions,
    observer: &mut dyn Observer,
) -> Result<Summary> {
    train_with(cfg, model, lora, data, options, observer, &mut Solo)
}

/// Train as one rank of a data-parallel job. Each optimizer step covers the window a single
/// process would take with `gradient_accumulation_steps × world` micro-batches; rank r computes
/// the r-th contiguous share of it, gradients are summed over ranks, and (with `apply_deepspeed`
/// and stage 1 or 2) each rank keeps and updates only the optimizer state of the tensors it owns.
/// Only rank 0 writes checkpoints and metrics and tells `observer`.
pub fn train_with(
    cfg: &TrainConfig,
    model: &mut Phi3,
    lora: &LoraConfig,
    data: &RunData,
    options: &RunOptions,
    observer: &mut dyn Observer,
    comm: &mut dyn Communicator,
) -> Result<Summary> {
    let started = Instant::now();
    let out = &cfg.output_dir;
    let (rank, world) = (comm.rank(), comm.world());
    let lead = rank == 0;
    let configured = cfg.num_nodes_finetune * cfg.number_of_gpu_to_use_finetuning;
    if configured > 1 && configured != world {
        return Err(TrainError::config(
            "number_of_gpu_to_use_finetuning",
            format!(
                "num_nodes_finetune × number_of_gpu_to_use_finetuning = {configured}, but this job has {world} rank(s); \
                 start it with --nproc-per-node (and --nnodes) to match, or set both to 1"
            ),
        ));
    }
    let zero = if cfg.apply_deepspeed && world > 1 {
        cfg.deepspeed_stage
    } else {
        0
    };
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    if lead {
        checkpoint::clean_staging(out);
    }
    let shape = EpochShape {
        sequences: data.train.len(),
        batch_size: cfg.per_device_train_batch_size,
        accumulation: cfg.gradient_accumulation_steps * world,
    };
    if data.train.is_empty() {
        return Err(TrainError::config(
            "train_file_path",
            "holds no sequence with trained tokens",
        ));
    }
    let steps_per_epoch = shape.steps() as u64;
    let total_steps = if cfg.max_steps > 0 {
        cfg.max_steps as u64
    } else {
        (cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64
    };
    let schedule = Schedule {
        kind: cfg.lr_scheduler_type,
        base_lr: cfg.learning_rate,
        warmup_steps: Schedule::warmup_for(total_steps, cfg.warmup_steps, cfg.warmup_ratio),
        total_steps,
    };
    let fp16 = model.dtype() == DType::F16;
    let hash = cfg.training_hash_for(world);

    // Resume: adapter weights first (they replace the variables), then the moments.
    let mut state = TrainerState {
        global_step: 0,
        optimizer_steps: 0,
        total_steps,
        epoch: 0.0,
        tokens_seen: 0,
        target_tokens_seen: 0,
        loss_scale: if fp16 {
            options.initial_loss_scale
        } else {
            1.0
        },
        scale_good_steps: 0,
        best_eval_loss: None,
        best_step: None,
        evals_without_improvement: 0,
        eval_loss: None,
        training_hash: hash.clone(),
        seed: cfg.seed,
        elapsed_s: 0.0,
        ferrotune_version: env!("CARGO_PKG_VERSION").to_string(),
        data_cache_key: data.cache_key.clone(),
    };
    let mut resumed_optimizer = None;
    if let Some(dir) = &options.resume_from {
        let saved = checkpoint::read_state(dir)?;
        if saved.training_hash != hash {
            return Err(TrainError::Checkpoint {
                path: dir.clone(),
                message: format!(
                    "was written by a run with different training settings (hash {} vs {hash}); resume with the config in its {} or start a new output_dir",
                    saved.training_hash,
                    checkpoint::CONFIG_FILE
                ),
            });
        }
        if !saved.data_cache_key.is_empty() && saved.data_cache_key != data.cache_key {
            return Err(TrainError::Checkpoint {
                path: dir.clone(),
                message: format!(
                    "was trained on other data (cache key {} vs {}): the files behind train_file_path changed; restore them or start a new output_dir",
                    saved.data_cache_key, data.cache_key
                ),
            });
        }
        peft::load_adapter(model, dir)?;
        // The checkpoint holds weights; the run's own settings decide dropout.
        model.set_lora_dropout(lora.lora_dropout);
        resumed_optimizer = Some(checkpoint::read_optimizer(dir)?);
        state = TrainerState {
            total_steps,
            ..saved
        };
    }
    let vars = model.trainable_vars();
    let names = var_names(model);
    // ZeRO-1/2: each tensor's optimizer state (and, at stage 2, its summed gradient) lives on
    // one rank only; stage 0 keeps everything everywhere.
    let owners = if zero >= 1 {
        dist::owners(
            &vars.iter().map(|v| v.elem_count()).collect::<Vec<_>>(),
            world,
        )
    } else {
        vec![rank; vars.len()]
    };
    let owned: Vec<usize> = (0..vars.len()).filter(|&i| owners[i] == rank).collect();
    let owned_vars: Vec<candle_core::Var> = owned.iter().map(|&i| vars[i].clone()).collect();
    let owned_names: Vec<String> = owned.iter().map(|&i| names[i].clone()).collect();
    let mut optimizer = AdamW::new(
        AdamWSettings {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
        &owned_vars,
    )?;
    if let (Some(tensors), Some(dir)) = (&resumed_optimizer, &options.resume_from) {
        optimizer.load_state(
            &owned_names,
            tensors,
            state.optimizer_steps,
            dir,
            model.device(),
        )?;
    }
    let run_shape = RunShape {
        total_steps,
        steps_per_epoch,
        warmup_steps: schedule.warmup_steps,
        train_sequences: data.train.len(),
        validation_sequences: data.validation.as_ref().map_or(0, |v| v.len()),
        trainable_parameters: vars.iter().map(|v| v.elem_count()).sum(),
        resumed_from: options.resume_from.clone(),
        start_step: state.global_step,
    };
    if lead {
        observer.started(&run_shape);
    }
    let mut metrics = if lead {
        Some(MetricsFile::open(
            out,
            options.resume_from.as_ref().map(|_| state.global_step),
        )?)
    } else {
        None
    };
    let mut last_eval: Option<EvalMetrics> = None;
    let config_yaml = cfg.to_yaml();
    let elapsed_before = state.elapsed_s;
    let session_start = Instant::now();
    let mut last_checkpoint: Option<PathBuf> = options.resume_from.clone();
    let mut last_train_loss = None;
    let mut window = LogWindow::new();
    let mut order_cache: Option<(u64, Vec<usize>)> = None;
    let mut finish = Finish::Completed;
    let mut session_tokens = 0u64;
    // Time inside the gradient reduction, waiting for slower ranks included: what overlapping it
    // with the backward pass could win at most.
    let mut reduce_s = 0f64;

    while state.global_step < total_steps {
        let k = state.global_step;
        let epoch = k / steps_per_epoch;
        if order_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            order_cache = Some((
                epoch,
                epoch_order(shape.sequences, cfg.shuffle, cfg.seed, epoch),
            ));
        }
        let order = &order_cache.as_ref().expect("set above").1;
        let micro = shape.window(order, (k % steps_per_epoch) as usize);
        let seqs: Vec<Vec<&TrainingSequence>> = micro
            .iter()
            .map(|idx| idx.iter().map(|&i| &data.train[i]).collect())
            .collect();
        // Every rank knows the whole window (it has all the data), so the token count that
        // normalises the loss is the global one without a collective.
        let targets: usize = seqs
            .iter()
            .flatten()
            .map(|s| s.trainable.iter().skip(1).filter(|&&t| t).count())
            .sum();
        let share = cfg.gradient_accumulation_steps;
        let mine = (rank * share).min(seqs.len())..((rank + 1) * share).min(seqs.len());
        let step_started = Instant::now();

        // Forward and backward over the window.
        let scale = state.loss_scale / targets.max(1) as f64;
        let mut step_tokens = 0usize;
        // Rank 0 accumulates as it goes; other ranks keep their micro-batches' gradients apart,
        // to be added one by one onto the running sum the ranks before them pass on.
        let mut acc: Option<Vec<Tensor>> = None;
        let mut parts: Vec<Vec<Tensor>> = Vec::new();
        let mut micro_losses = vec![0f64; seqs.len()];
        for (m, group) in seqs.iter().enumerate() {
            if !mine.contains(&m) {
                continue;
            }
            model.set_dropout_key(derive(derive(cfg.seed, k), m as u64));
            let mb = collate(
                group,
                data.pad_id,
                model.config().sliding_window,
                model.device(),
            )?;
            let (sum, g) = micro_step(model, &mb, scale, cfg.gradient_checkpointing, &vars)?;
            micro_losses[m] = f64::from(sum);
            step_tokens += mb.tokens;
            if rank == 0 {
                acc = Some(dist::fold(acc, g)?);
            } else {
                parts.push(g);
            }
        }
        let like: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let reduce_started = Instant::now();
        let grads = comm.ordered_sum(acc, parts, &like, (zero >= 2).then_some(&owners[..]))?;
        reduce_s += reduce_started.elapsed().as_secs_f64();
        // Per-micro-batch losses travel in their slots, so their sum has the single-process order.
        let mut totals = micro_losses;
        totals.push(step_tokens as f64);
        comm.all_reduce_scalars(&mut totals)?;
        let step_tokens = totals.pop().expect("token count") as usize;
        let loss_sum = totals.iter().fold(0f64, |s, l| s + l);
        // From here on a rank works on the gradients of the tensors it updates.
        let mut grads: Vec<Tensor> = if zero >= 1 {
            owned.iter().map(|&i| grads[i].clone()).collect()
        } else {
            grads
        };
        if state.loss_scale != 1.0 {
            let inv = 1.0 / state.loss_scale;
            grads = grads
                .iter()
                .map(|g| g.affine(inv, 0.0))
                .collect::<candle_core::Result<Vec<_>>>()?;
        }
        let loss = loss_sum / targets.max(1) as f64;
        let norm = if zero >= 1 {
            // Each owner's per-tensor norms in their slots: combined in tensor order, as one
            // process would.
            let mut norms = vec![0f64; vars.len()];
            for (&i, n) in owned.iter().zip(tensor_norms(&grads)?) {
                norms[i] = n;
            }
            comm.all_reduce_scalars(&mut norms)?;
            combine_norms(&norms)
        } else {
            global_norm(&grads)?
        };
        state.global_step += 1;
        state.epoch = state.global_step as f64 / steps_per_epoch as f64;
        state.tokens_seen += step_tokens as u64;
        state.target_tokens_seen += targets as u64;
        session_tokens += step_tokens as u64;

        let finite = loss.is_finite() && norm.is_finite();
        let mut lr = schedule.lr(state.optimizer_steps);
        if !finite && fp16 {
            // Overflow in half precision: skip the update, halve the scale (GradScaler).
            state.loss_scale *= 0.5;
            state.scale_good_steps = 0;
            window.skipped += 1;
            tracing::warn!(
                "step {}: fp16 overflow, update skipped, loss scale now {}",
                state.global_step,
                state.loss_scale
            );
            if state.loss_scale < 1e-8 {
                return Err(non_finite(
                    &state,
                    "fp16 loss scale",
                    state.loss_scale,
                    &last_checkpoint,
                ));
            }
        } else if !finite {
            let (what, value) = if loss.is_finite() {
                ("gradient norm", norm)
            } else {
                ("loss", loss)
            };
            state.global_step -= 1;
            return Err(non_finite(&state, what, value, &last_checkpoint));
        } else {
            if cfg.max_grad_norm > 0.0 {
                clip(&mut grads, norm, cfg.max_grad_norm)?;
            }
            optimizer.update(&owned_vars, &grads, lr)?;
            if zero >= 1 {
                let mut weights: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                comm.broadcast_from_owners(&mut weights, &owners)?;
                for (v, w) in vars.iter().zip(&weights) {
                    v.set(w)?;
                }
            }
            state.optimizer_steps += 1;
            if fp16 {
                state.scale_good_steps += 1;
                if state.scale_good_steps == SCALE_GROWTH_INTERVAL {
                    state.loss_scale *= 2.0;
                    state.scale_good_steps = 0;
                }
            }
        }
        if !finite {
            lr = 0.0;
        }
        let step_s = step_started.elapsed().as_secs_f64();
        window.add(loss_sum, targets, step_tokens, step_s, finite);
        let tokens_per_s = step_tokens as f64 / step_s.max(1e-9);
        if lead {
            observer.step(
                state.global_step,
                total_steps,
                if finite { loss } else { f64::NAN },
                lr,
                tokens_per_s,
            );
        }

        let step = state.global_step;
        let last = step == total_steps;
        let elapsed = elapsed_before + session_start.elapsed().as_secs_f64();
        if step.is_multiple_of(cfg.logging_steps) || last {
            if let Some(rec) = window.record(&state, lr, norm, elapsed, fp16) {
                last_train_loss = Some(rec.loss);
                let rec = Record::Train(rec);
                if let Some(m) = metrics.as_mut() {
                    m.append(&rec)?;
                    observer.record(&rec);
                }
            }
            window = LogWindow::new();
        }
        state.eval_loss = None;
        let mut stop_early = false;
        if let Some(val) = &data.validation {
            let due = cfg.eval_steps.is_some_and(|n| step.is_multiple_of(n));
            if due || last {
                let rec = run_eval(model, val, cfg, &state, data.pad_id, comm)?;
                last_eval = Some(EvalMetrics {
                    loss: rec.eval_loss,
                    perplexity: rec.eval_perplexity,
                    accuracy: rec.eval_accuracy,
                    tokens: rec.eval_tokens,
                    sequences: val.len(),
                });
                state.eval_loss = Some(rec.eval_loss);
                if state.best_eval_loss.is_none_or(|b| rec.eval_loss < b) {
                    state.best_eval_loss = Some(rec.eval_loss);
                    state.best_step = Some(step);
                    state.evals_without_improvement = 0;
                } else {
                    state.evals_without_improvement += 1;
                    if cfg
                        .early_stopping_patience
                        .is_some_and(|p| state.evals_without_improvement >= p)
                    {
                        stop_early = !last;
                    }
                }
                let rec = Record::Eval(rec);
                if let Some(m) = metrics.as_mut() {
                    m.append(&rec)?;
                    observer.record(&rec);
                }
            }
        }
        // One rank's Ctrl-C (or its launcher's) stops them all after the same step.
        let mut stop = [f64::from(u8::from(options.stop.load(Ordering::SeqCst)))];
        comm.all_reduce_scalars(&mut stop)?;
        let interrupted = stop[0] > 0.0;
        if step.is_multiple_of(cfg.save_steps) || last || stop_early || interrupted {
            state.elapsed_s = elapsed;
            // Sharded optimizer state comes together on rank 0; every rank takes part.
            let moments = optimizer_state(&optimizer, &owned, &names, &vars, &owners, zero, comm)?;
            if lead {
                let path =
                    save_checkpoint(cfg, model, lora, options, moments, &state, &config_yaml)?;
                observer.checkpoint(&path);
                last_checkpoint = Some(path);
                if cfg.save_total_limit > 0 {
                    for gone in
                        checkpoint::prune(out, cfg.save_total_limit as usize, state.best_step)?
                    {
                        tracing::debug!(
                            "removed {} (save_total_limit {})",
                            gone.display(),
                            cfg.save_total_limit
                        );
                    }
                }
            } else {
                last_checkpoint = Some(checkpoint::path_for(out, state.global_step));
            }
        }
        if interrupted && !last {
            finish = Finish::Interrupted;
            break;
        }
        if stop_early {
            tracing::info!(
                "early stopping at step {step}: eval loss has not improved for {} evaluations (best {:.4} at step {})",
                state.evals_without_improvement,
                state.best_eval_loss.unwrap_or(f64::NAN),
                state.best_step.unwrap_or(0)
            );
            finish = Finish::EarlyStopped;
            break;
        }
    }

    let last_checkpoint = match last_checkpoint {
        Some(p) => p,
        None => {
            // Resumed from the final checkpoint: nothing left to do but report it.
            checkpoint::list(out)
                .pop()
                .map(|(_, p)| p)
                .ok_or_else(|| TrainError::config("output_dir", "no checkpoint was written"))?
        }
    };
    let adapter = if finish == Finish::Interrupted {
        None
    } else if lead {
        Some(publish_adapter(out, &last_checkpoint)?)
    } else {
        Some(out.join(ADAPTER_DIR))
    };
    let metrics_path = out.join(crate::metrics::METRICS_FILE);
    let final_eval = if lead {
        let records = crate::metrics::read(&metrics_path)?;
        let plot = out.join(crate::plot::PLOT_FILE);
        if let Err(e) = crate::plot::write(&records, &cfg.display_name(), &plot) {
            tracing::warn!("could not draw the loss plot: {e}");
        }
        records.into_iter().rev().find_map(|r| match r {
            Record::Eval(e) => Some(EvalMetrics {
                loss: e.eval_loss,
                perplexity: e.eval_perplexity,
                accuracy: e.eval_accuracy,
                tokens: e.eval_tokens,
                sequences: data.validation.as_ref().map_or(0, |v| v.len()),
            }),
            _ => None,
        })
    } else {
        last_eval
    };
    let session_s = session_start.elapsed().as_secs_f64();
    if world > 1 {
        tracing::info!(
            "rank {rank}: {reduce_s:.2} s of {session_s:.2} s ({:.1}%) in gradient reductions, waiting for slower ranks included",
            100.0 * reduce_s / session_s.max(1e-9)
        );
    }
    tracing::debug!("trained in {:.1} s", started.elapsed().as_secs_f64());
    Ok(Summary {
        finish,
        steps: state.global_step,
        total_steps,
        last_checkpoint,
        adapter,
        final_eval,
        last_train_loss,
        tokens_per_s: session_tokens as f64 / session_s.max(1e-9),
        elapsed_s: elapsed_before + session_s,
        metrics: metrics_path,
    })
}

/// Forward and backward of one micro-batch: the summed token loss (unscaled) and the
/// gradients of `scale · sum` for `vars`.
fn micro_step(
    model: &Phi3,
    mb: &MicroBatch,
    scale: f64,
    recompute: bool,
    vars: &[candle_core::Var],
) -> Result<(f32, Vec<Tensor>)> {
    if recompute {
        let (sum, _, grads) = model.loss_and_grads_recompute(&mb.batch, &mb.labels, scale)?;
        return Ok((sum, grads));
    }
    let loss = model.loss_sum(&mb.batch, &mb.labels, true)?;
    let sum = loss.sum.to_scalar::<f32>()?;
    let store = loss.sum.affine(scale, 0.0)?.backward()?;
    let grads = vars
        .iter()
        .map(|v| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((sum, grads))
}

fn run_eval(
    model: &Phi3,
    val: &[TrainingSequence],
    cfg: &TrainConfig,
    state: &TrainerState,
    pad_id: u32,
    comm: &mut dyn Communicator,
) -> Result<EvalRecord> {
    let t = Instant::now();
    // Each rank evaluates a contiguous shard; the sums are added over ranks.
    let (rank, world) = (comm.rank(), comm.world());
    let per = val.len().div_ceil(world);
    let shard = &val[(rank * per).min(val.len())..((rank + 1) * per).min(val.len())];
    let mut sums = eval_sums(model, shard, cfg.per_device_eval_batch_size, pad_id)?;
    if world > 1 {
        let mut parts = [sums.nll, sums.tokens as f64, sums.correct as f64];
        comm.all_reduce_scalars(&mut parts)?;
        sums = EvalSums {
            nll: parts[0],
            tokens: parts[1] as usize,
            correct: parts[2] as usize,
        };
    }
    let m = sums.metrics(val.len());
    Ok(EvalRecord {
        step: state.global_step,
        epoch: state.epoch,
        eval_loss: m.loss,
        eval_perplexity: m.perplexity,
        eval_accuracy: m.accuracy,
        eval_tokens: m.tokens,
        eval_s: t.elapsed().as_secs_f64(),
    })
}

/// The optimizer moments of every trainable tensor, named as a checkpoint stores them, on
/// rank 0 (`None` elsewhere). Under ZeRO the owners send theirs to rank 0.
fn optimizer_state(
    optimizer: &AdamW,
    owned: &[usize],
    names: &[String],
    vars: &[candle_core::Var],
    owners: &[usize],
    zero: u8,
    comm: &mut dyn Communicator,
) -> Result<Option<std::collections::HashMap<String, Tensor>>> {
    let owned_names: Vec<String> = owned.iter().map(|&i| names[i].clone()).collect();
    let mine = optimizer.state_tensors(&owned_names)?;
    if zero == 0 {
        return Ok((comm.rank() == 0).then_some(mine));
    }
    let mut tensors = Vec::with_capacity(2 * vars.len());
    let mut tensor_owners = Vec::with_capacity(2 * vars.len());
    for (i, name) in names.iter().enumerate() {
        for suffix in ["exp_avg", "exp_avg_sq"] {
            let key = format!("{name}.{suffix}");
            let t = match mine.get(&key) {
                Some(t) => t.clone(),
                None => vars[i]
                    .as_tensor()
                    .zeros_like()?
                    .to_dtype(DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?,
            };
            tensors.push(t);
            tensor_owners.push(owners[i]);
        }
    }
    comm.gather_to_root(&mut tensors, &tensor_owners)?;
    if comm.rank() != 0 {
        return Ok(None);
    }
    let mut all = std::collections::HashMap::new();
    let mut it = tensors.into_iter();
    for name in names {
        for suffix in ["exp_avg", "exp_avg_sq"] {
            all.insert(
                format!("{name}.{suffix}"),
                it.next().expect("two per tensor"),
            );
        }
    }
    Ok(Some(all))
}

fn save_checkpoint(
    cfg: &TrainConfig,
    model: &Phi3,
    lora: &LoraConfig,
    options: &RunOptions,
    moments: Option<std::collections::HashMap<String, Tensor>>,
    state: &TrainerState,
    config_yaml: &str,
) -> Result<PathBuf> {
    let write_adapter = |dir: &Path| -> Result<()> {
        peft::save_adapter(model, lora, &options.base_model, dir)?;
        Ok(())
    };
    checkpoint::save(
        &cfg.output_dir,
        CheckpointContents {
            state,
            optimizer: moments.expect("rank 0 holds every moment"),
            config_yaml,
            write_adapter: &write_adapter,
        },
    )
}

/// Copy the final checkpoint's adapter to `output_dir/adapter` (replaced atomically).
fn publish_adapter(out: &Path, checkpoint: &Path) -> Result<PathBuf> {
    let target = out.join(ADAPTER_DIR);
    let staging = out.join(format!(".{ADAPTER_DIR}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
    for name in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
        std::fs::copy(checkpoint.join(name), staging.join(name))
            .map_err(|e| TrainError::io(checkpoint.join(name), e))?;
    }
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(|e| TrainError::io(&target, e))?;
    }
    std::fs::rename(&staging, &target).map_err(|e| TrainError::io(&target, e))?;
    Ok(target)
}

fn non_finite(
    state: &TrainerState,
    what: &'static str,
    value: f64,
    last: &Option<PathBuf>,
) -> TrainError {
    TrainError::NonFinite {
        step: state.global_step + 1,
        what,
        value,
        last_good: match last {
            Some(p) => format!("the last good checkpoint is {}", p.display()),
            None => "no checkpoint was written yet".into(),
        },
    }
}

/// Sums over the steps of one logging window.
struct LogWindow {
    loss_sum: f64,
    targets: usize,
    tokens: usize,
    seconds: f64,
    steps: u64,
    skipped: u64,
}

impl LogWindow {
    fn new() -> LogWindow {
        LogWindow {
            loss_sum: 0.0,
            targets: 0,
            tokens: 0,
            seconds: 0.0,
            steps: 0,
            skipped: 0,
        }
    }

    fn add(&mut self, loss_sum: f64, targets: usize, tokens: usize, seconds: f64, finite: bool) {
        if finite {
            self.loss_sum += loss_sum;
            self.targets += targets;
        }
        self.tokens += tokens;
        self.seconds += seconds;
        self.steps += 1;
    }

    fn record(
        &self,
        state: &TrainerState,
        lr: f64,
        norm: f64,
        elapsed: f64,
        fp16: bool,
    ) -> Option<TrainRecord> {
        if self.steps == 0 {
            return None;
        }
        Some(TrainRecord {
            step: state.global_step,
            epoch: state.epoch,
            loss: if self.targets == 0 {
                f64::NAN
            } else {
                self.loss_sum / self.targets as f64
            },
            learning_rate: lr,
            grad_norm: norm,
            tokens_per_s: self.tokens as f64 / self.seconds.max(1e-9),
            tokens_seen: state.tokens_seen,
            elapsed_s: elapsed,
            loss_scale: fp16.then_some(state.loss_scale),
            skipped_steps: self.skipped,
        })
    }
}
