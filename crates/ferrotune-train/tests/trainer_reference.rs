//! The trainer against transformers' Trainer + PEFT (`scripts/make_train_reference.py`): same
//! model, initial adapter, data order and arguments; every step's loss, gradient norm and
//! learning rate, and the final adapter, must match.

mod common;

use candle_core::{DType, Device};
use common::*;
use ferrotune_train::metrics::{read, Record};
use ferrotune_train::trainer::Silent;

/// How close a run must stay to the reference: per-step loss and gradient norm (relative) and the
/// final adapter (relative to each tensor's largest value).
struct Tolerance {
    loss: f64,
    grad_norm: f64,
    adapter: f32,
}

const F32: Tolerance = Tolerance {
    loss: 1e-4,
    grad_norm: 1e-3,
    adapter: 1e-3,
};

#[test]
fn ten_steps_match_transformers_trainer_with_peft() {
    check_against_reference(&[], DType::F32, &Device::Cpu, &F32);
}

#[test]
fn with_per_layer_recompute_the_steps_still_match() {
    check_against_reference(
        &["gradient_checkpointing=true"],
        DType::F32,
        &Device::Cpu,
        &F32,
    );
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    fn gpu() -> Device {
        Device::new_cuda(0).expect("a CUDA device (these tests run on the GPU machine)")
    }

    #[test]
    #[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
    fn ten_steps_on_cuda_match_the_trainer_in_f32() {
        check_against_reference(&["device=cuda"], DType::F32, &gpu(), &F32);
        check_against_reference(
            &["device=cuda", "gradient_checkpointing=true"],
            DType::F32,
            &gpu(),
            &F32,
        );
    }

    /// bf16 base weights (LoRA and optimizer in f32): the curve stays within bf16's precision.
    #[test]
    #[ignore = "needs a CUDA GPU: run by scripts/gpu-check.sh"]
    fn ten_steps_on_cuda_in_bf16_stay_near_the_trainer() {
        let bf16 = Tolerance {
            loss: 2e-2,
            grad_norm: 0.1,
            adapter: 0.1,
        };
        check_against_reference(
            &[
                "device=cuda",
                "precision=bf16",
                "gradient_checkpointing=true",
            ],
            DType::BF16,
            &gpu(),
            &bf16,
        );
    }
}

fn check_against_reference(sets: &[&str], dtype: DType, device: &Device, tol: &Tolerance) {
    let out = tempfile::tempdir().unwrap();
    let cfg = reference_config(out.path(), sets);
    let (mut model, lora) = model_with_adapter_on(dtype, device);
    let data = reference_data();
    let summary =
        ferrotune_train::train(&cfg, &mut model, &lora, &data, &options(None), &mut Silent)
            .unwrap();
    assert_eq!(summary.steps, 10);

    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reference_dir().join("expected.json")).unwrap(),
    )
    .unwrap();
    let steps = expected["steps"].as_array().unwrap();
    let records: Vec<_> = read(&summary.metrics)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Train(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(records.len(), steps.len());
    for (got, want) in records.iter().zip(steps) {
        let k = got.step;
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
        let (loss, norm, lr) = (
            want["loss"].as_f64().unwrap(),
            want["grad_norm"].as_f64().unwrap(),
            want["lr"].as_f64().unwrap(),
        );
        eprintln!(
            "step {k}: loss {:.7} vs {loss:.7} (rel {:.1e}), grad norm {:.6} vs {norm:.6} (rel {:.1e}), lr {:.3e} vs {lr:.3e}",
            got.loss,
            rel(got.loss, loss),
            got.grad_norm,
            rel(got.grad_norm, norm),
            got.learning_rate
        );
        assert!(
            rel(got.loss, loss) <= tol.loss,
            "step {k}: loss {} vs {loss}",
            got.loss
        );
        assert!(
            rel(got.grad_norm, norm) <= tol.grad_norm,
            "step {k}: grad norm {} vs {norm}",
            got.grad_norm
        );
        assert!(
            (got.learning_rate - lr).abs() <= 1e-12,
            "step {k}: lr {} vs {lr}",
            got.learning_rate
        );
    }

    // The final adapter, tensor by tensor, relative to each tensor's largest value.
    let ours = candle_core::safetensors::load(
        summary.adapter.unwrap().join("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let theirs = candle_core::safetensors::load(
        reference_dir().join("final_adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(ours.len(), theirs.len());
    let mut worst = 0f32;
    for (name, want) in &theirs {
        let key = name.replace(".default", "");
        let got = ours
            .get(&key)
            .or_else(|| ours.get(name))
            .unwrap_or_else(|| panic!("{name} missing"));
        let diff = max_abs(&(got - want).unwrap());
        let scale = max_abs(want);
        worst = worst.max(diff / scale);
    }
    eprintln!("final adapter: worst relative difference {worst:.2e}");
    assert!(worst <= tol.adapter, "final adapter differs by {worst:e}");
}
