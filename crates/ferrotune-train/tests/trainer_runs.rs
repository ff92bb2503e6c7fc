//! Whole runs of the trainer on the fixture model: exact resume, checkpoint retention,
//! fp16 loss scaling and the non-finite stop.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;

use candle_core::{DType, Device};
use common::*;
use ferrotune_train::checkpoint::{self, list};
use ferrotune_train::metrics::{read, Record, TrainRecord};
use ferrotune_train::trainer::Silent;
use ferrotune_train::{Finish, Observer, TrainError};

fn train_records(path: &Path) -> Vec<TrainRecord> {
    read(path)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Train(t) => Some(t),
            _ => None,
        })
        .collect()
}

fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Sets the stop flag (as Ctrl-C does) once step `at` is done.
struct StopAt(u64, std::sync::Arc<std::sync::atomic::AtomicBool>);
impl Observer for StopAt {
    fn step(&mut self, step: u64, _: u64, _: f64, _: f64, _: f64) {
        if step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
}

// Shuffled order and LoRA dropout: the resumed run must redraw both exactly.
const RESUME_SETS: &[&str] = &["shuffle=true", "save_steps=4", "seed=7"];

fn run(
    out: &Path,
    resume: Option<std::path::PathBuf>,
    stop_at: Option<u64>,
) -> ferrotune_train::Summary {
    let cfg = reference_config(out, RESUME_SETS);
    let (mut model, mut lora) = model_with_adapter(DType::F32);
    lora.lora_dropout = 0.1;
    model.set_lora_dropout(0.1);
    let opts = options(resume);
    let mut stop = StopAt(stop_at.unwrap_or(u64::MAX), opts.stop.clone());
    ferrotune_train::train(&cfg, &mut model, &lora, &reference_data(), &opts, &mut stop).unwrap()
}

#[test]
fn interrupted_and_killed_runs_resume_to_the_same_bits() {
    let whole = tempfile::tempdir().unwrap();
    let a = run(whole.path(), None, None);
    assert_eq!(a.finish, Finish::Completed);
    let want = train_records(&a.metrics);
    let want_adapter = adapter(a.adapter.as_ref().unwrap());

    // Ctrl-C after step 6: a checkpoint at 6, then resume from it.
    let cut = tempfile::tempdir().unwrap();
    let b = run(cut.path(), None, Some(6));
    assert_eq!(b.finish, Finish::Interrupted);
    assert_eq!(b.steps, 6);
    assert!(checkpoint::path_for(cut.path(), 6).is_dir());
    let resume = checkpoint::resolve_resume("auto", cut.path()).unwrap();
    let b = run(cut.path(), resume, None);
    assert_eq!(b.finish, Finish::Completed);

    // Killed after step 9 (checkpoints 4 and 8 on disk, metrics up to 9): resume from 8.
    let killed = tempfile::tempdir().unwrap();
    let c = run(killed.path(), None, None);
    std::fs::remove_dir_all(checkpoint::path_for(killed.path(), 10)).unwrap();
    let text = std::fs::read_to_string(&c.metrics).unwrap();
    let kept: String = text.lines().take(9).map(|l| format!("{l}\n")).collect();
    std::fs::write(&c.metrics, kept).unwrap();
    let resume = checkpoint::resolve_resume("auto", killed.path()).unwrap();
    assert_eq!(resume, Some(checkpoint::path_for(killed.path(), 8)));
    let c = run(killed.path(), resume, None);

    for (name, got) in [("interrupted", &b), ("killed", &c)] {
        let records = train_records(&got.metrics);
        assert_eq!(records.len(), want.len(), "{name}: one record per step");
        for (r, w) in records.iter().zip(&want) {
            assert_eq!(r.step, w.step);
            assert_eq!(
                r.loss.to_bits(),
                w.loss.to_bits(),
                "{name}: step {} loss",
                r.step
            );
            assert_eq!(
                r.grad_norm.to_bits(),
                w.grad_norm.to_bits(),
                "{name}: step {} norm",
                r.step
            );
            assert_eq!(r.learning_rate, w.learning_rate);
        }
        assert!(
            adapter(got.adapter.as_ref().unwrap()) == want_adapter,
            "{name}: final adapter differs"
        );
    }
}

#[test]
fn save_total_limit_keeps_the_newest_and_the_best() {
    let out = tempfile::tempdir().unwrap();
    let cfg = reference_config(out.path(), &["save_steps=2", "save_total_limit=2"]);
    let cfg = ferrotune_train::TrainConfig {
        validation_file_path: Some("unused".into()),
        eval_steps: Some(2),
        ..cfg
    };
    let (mut model, lora) = model_with_adapter(DType::F32);
    let mut data = reference_data();
    data.validation = Some(data.train[..8].to_vec());
    ferrotune_train::train(&cfg, &mut model, &lora, &data, &options(None), &mut Silent).unwrap();
    let left: Vec<u64> = list(out.path()).into_iter().map(|(s, _)| s).collect();
    let state = checkpoint::read_state(&checkpoint::path_for(out.path(), 10)).unwrap();
    let best = state.best_step.unwrap();
    assert!(
        left.len() <= 2 && left.contains(&10) && left.contains(&best),
        "{left:?}, best {best}"
    );
    let evals = read(&out.path().join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| matches!(r, Record::Eval(_)))
        .count();
    assert_eq!(evals, 5, "eval every 2 steps over 10");
}

#[test]
fn fp16_overflow_skips_the_update_and_lowers_the_scale() {
    let out = tempfile::tempdir().unwrap();
    let cfg = reference_config(out.path(), &["precision=fp16", "warmup_steps=0"]);
    let (mut model, lora) = model_with_adapter(DType::F16);
    let before = model.trainable_vars()[0].as_tensor().copy().unwrap();
    let mut opts = options(None);
    opts.initial_loss_scale = 2f64.powi(24);
    let s = ferrotune_train::train(
        &cfg,
        &mut model,
        &lora,
        &reference_data(),
        &opts,
        &mut Silent,
    )
    .unwrap();
    let records = train_records(&s.metrics);
    let skipped: u64 = records.iter().map(|r| r.skipped_steps).sum();
    assert!(skipped >= 1, "a scale of 2^24 must overflow fp16");
    assert!(skipped < 10, "the scale must come down until steps succeed");
    let last = records.last().unwrap();
    assert_eq!(last.loss_scale, Some(2f64.powi(24 - skipped as i32)));
    let after = model.trainable_vars()[0].as_tensor().copy().unwrap();
    let moved = max_abs(&(after - before).unwrap());
    assert!(moved > 0.0, "successful steps update the adapter");
}

#[test]
fn a_non_finite_loss_stops_the_run_and_names_the_last_good_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let cfg = reference_config(
        out.path(),
        &[
            "learning_rate=1e30",
            "warmup_steps=0",
            "save_steps=1",
            "max_grad_norm=0",
        ],
    );
    let (mut model, lora) = model_with_adapter(DType::F32);
    let err = ferrotune_train::train(
        &cfg,
        &mut model,
        &lora,
        &reference_data(),
        &options(None),
        &mut Silent,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{msg}");
    assert!(msg.contains("checkpoint-"), "{msg}");
    let (step, good) = list(out.path())
        .pop()
        .expect("a good checkpoint before the blow-up");
    assert!(msg.contains(&format!("step {}", step + 1)), "{msg}");
    assert!(checkpoint::read_state(&good).is_ok());
}

#[test]
fn early_stopping_ends_the_run_when_eval_loss_stops_improving() {
    let out = tempfile::tempdir().unwrap();
    let cfg = reference_config(out.path(), &["learning_rate=2e-2", "max_steps=30"]);
    let cfg = ferrotune_train::TrainConfig {
        validation_file_path: Some("unused".into()),
        eval_steps: Some(1),
        early_stopping_patience: Some(2),
        ..cfg
    };
    let (mut model, lora) = model_with_adapter(DType::F32);
    let mut data = reference_data();
    // Held-out text unlike the training text (ids mirrored), on which fitting the training
    // data soon stops helping.
    let mut held_out = data.train[..6].to_vec();
    for s in &mut held_out {
        for id in &mut s.ids {
            *id = 258 - *id;
        }
    }
    data.validation = Some(held_out);
    let s = ferrotune_train::train(&cfg, &mut model, &lora, &data, &options(None), &mut Silent)
        .unwrap();
    let evals: Vec<f64> = read(&s.metrics)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Eval(e) => Some(e.eval_loss),
            _ => None,
        })
        .collect();
    assert_eq!(s.finish, Finish::EarlyStopped, "eval losses {evals:?}");
    assert!(s.steps < 30);
    let best = evals.iter().cloned().fold(f64::INFINITY, f64::min);
    let best_at = evals.iter().position(|&l| l == best).unwrap();
    assert_eq!(
        evals.len(),
        best_at + 1 + 2,
        "stops after 2 evals without improvement: {evals:?}"
    );
    assert!(
        checkpoint::path_for(out.path(), s.steps).is_dir(),
        "a checkpoint at the stop"
    );
    assert!(s.adapter.is_some());
}

#[test]
fn a_packed_sequence_scores_like_its_documents_apart() {
    let (model, _) = model_with_adapter(DType::F32);
    let data = reference_data();
    let (a, b) = (&data.train[0], &data.train[1]);
    let mut first_of_b = b.trainable.clone();
    first_of_b[0] = false; // never a target across the boundary
    let packed = ferrotune_data::TrainingSequence {
        ids: [a.ids.clone(), b.ids.clone()].concat(),
        trainable: [a.trainable.clone(), first_of_b].concat(),
        doc_lengths: vec![a.ids.len(), b.ids.len()],
    };
    let apart = ferrotune_train::eval::evaluate(&model, &[a.clone(), b.clone()], 2, 0).unwrap();
    let together = ferrotune_train::eval::evaluate(&model, &[packed], 1, 0).unwrap();
    assert_eq!(apart.tokens, together.tokens);
    let (x, y) = (
        apart.loss * apart.tokens as f64,
        together.loss * together.tokens as f64,
    );
    assert!((x - y).abs() <= 1e-5 * x.abs(), "apart {x} vs packed {y}");
    assert_eq!(apart.accuracy, together.accuracy);
}

#[test]
fn resuming_on_other_data_is_refused() {
    let out = tempfile::tempdir().unwrap();
    let cfg = reference_config(out.path(), &["max_steps=4", "save_steps=2"]);
    let (mut model, lora) = model_with_adapter(DType::F32);
    let mut opts = options(None);
    let mut stop = StopAt(2, opts.stop.clone());
    let data = reference_data();
    ferrotune_train::train(&cfg, &mut model, &lora, &data, &opts, &mut stop).unwrap();
    opts = options(checkpoint::resolve_resume("auto", out.path()).unwrap());
    let changed = ferrotune_train::RunData {
        cache_key: "something else".into(),
        ..reference_data()
    };
    let (mut model, lora) = model_with_adapter(DType::F32);
    let err =
        ferrotune_train::train(&cfg, &mut model, &lora, &changed, &opts, &mut Silent).unwrap_err();
    assert!(
        err.is_usage() && err.to_string().contains("other data"),
        "{err}"
    );
}
