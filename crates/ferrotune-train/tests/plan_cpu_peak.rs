//! The memory planner against the memory a CPU training step really takes (f32, fused CPU ops):
//! a random Phi-3-shaped model with LoRA on all four linears, one forward + backward with and
//! without per-layer recompute, peak resident memory read from `/proc/self/status` (VmHWM,
//! reset through `/proc/self/clear_refs` before each phase). The plan must be within 15%.
//!
//! One test in its own binary, so no other test shares the process's memory. `PLAN_T=2048`
//! changes the sequence length.
//!
//! Not yet within 15% on the CPU (measured 2026-11-26, release build: recompute step −16% to −18%
//! at 512–2048 tokens, plain graph +8% to +21%; the fitted gap of the recompute step is about one
//! more score-sized buffer in the softmax backward, ~35 KB per token and the head's 31 MiB chunk
//! kept by the allocator after use). On CUDA the plan is within 15% of a measured peak
//! (`plan::tests::fused_kernels_plan_matches_the_measured_h200_step`). Run by hand with
//! `cargo test --release -p ferrotune-train --test plan_cpu_peak -- --ignored --nocapture`.

use candle_core::{DType, Device, Tensor};
use ferrotune_model::mask::AttentionLayout;
use ferrotune_model::random_weights::RandomWeights;
use ferrotune_model::{Batch, LoraConfig, Phi3, Phi3Config};
use ferrotune_train::plan::{estimate, PlanInput};

fn status_bytes(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    kb * 1024.0
}

/// Resets the peak (VmHWM) to the current resident size; `false` where the kernel refuses.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[test]
#[ignore = "the CPU plan is not yet within 15% of the measured step (see the module comment and issue [train])"]
fn the_cpu_plan_is_within_15_percent_of_the_measured_step() {
    if !reset_peak() {
        eprintln!("/proc/self/clear_refs is not writable here: peak memory cannot be measured");
        return;
    }
    let t: usize = std::env::var("PLAN_T")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let (layers, hidden, inter, heads, vocab) = (4, 512, 1536, 8, 32064);
    let cfg = Phi3Config::from_json_str(
        &serde_json::json!({"model_type": "phi3", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "max_position_embeddings": 4096})
        .to_string(),
    )
    .unwrap();
    let lora = LoraConfig::default();
    let input = |recompute| PlanInput {
        model: cfg.clone(),
        lora: lora.clone(),
        micro_batch: 1,
        seq_len: t,
        dtype_bytes: 4,
        recompute,
        fused_kernels: true,
        fused_head: true,
    };
    let ids: Vec<u32> = (0..t).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let labels = vec![ids.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()];

    // Phase 1: load, then a recompute step; measured from before the load.
    let before = status_bytes("VmRSS:");
    reset_peak();
    let weights = RandomWeights {
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let mut model = Phi3::load(&cfg, &weights, DType::F32, &Device::Cpu).unwrap();
    model.add_lora(&lora, 0).unwrap();
    let batch = Batch {
        input_ids: Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).unwrap(),
        positions: vec![(0..t as u32).collect()],
        attention_bias: AttentionLayout::default().bias(1, t, &Device::Cpu).unwrap(),
    };
    let loaded = status_bytes("VmRSS:") - before;
    let load_peak = status_bytes("VmHWM:") - before;
    let before_step = status_bytes("VmRSS:");
    reset_peak();
    let (_, _, grads) = model
        .loss_and_grads_recompute(&batch, &labels, 1.0)
        .unwrap();
    let step_only = status_bytes("VmHWM:") - before_step;
    eprintln!(
        "loaded {:.1} MiB (load peak {:.1}), recompute step alone {:.1} MiB",
        loaded / 1048576.0,
        load_peak / 1048576.0,
        step_only / 1048576.0
    );
    drop(grads);
    let measured = status_bytes("VmHWM:") - before;
    let p = estimate(&input(true));
    let planned = (p.weights
        + p.lora_parameters
        + p.gradients / 2
        + p.activations
        + p.logits_and_loss
        + p.attention_workspace) as f64;
    let rel = (planned - measured) / measured;
    eprintln!(
        "plan: weights+lora {:.1} MiB, step {:.1} MiB (acts {:.1}, head {:.1}, workspace {:.1})",
        (p.weights + p.lora_parameters) as f64 / 1048576.0,
        (p.gradients / 2 + p.activations + p.logits_and_loss + p.attention_workspace) as f64
            / 1048576.0,
        p.activations as f64 / 1048576.0,
        p.logits_and_loss as f64 / 1048576.0,
        p.attention_workspace as f64 / 1048576.0
    );
    eprintln!(
        "recompute: plan {:.1} MiB, measured {:.1} MiB ({rel:+.3})",
        planned / 1048576.0,
        measured / 1048576.0
    );

    // Phase 2: the plain graph, the model already loaded; measured from before the step.
    let before = status_bytes("VmRSS:");
    reset_peak();
    let loss = model.loss_sum(&batch, &labels, true).unwrap();
    let grads = loss.sum.backward().unwrap();
    drop((loss, grads));
    let measured_plain = status_bytes("VmHWM:") - before;
    let q = estimate(&input(false));
    let planned_plain =
        (q.gradients / 2 + q.activations + q.logits_and_loss + q.attention_workspace) as f64;
    let rel_plain = (planned_plain - measured_plain) / measured_plain;
    eprintln!(
        "plain graph: plan {:.1} MiB, measured {:.1} MiB ({rel_plain:+.3})",
        planned_plain / 1048576.0,
        measured_plain / 1048576.0
    );
    assert!(rel.abs() <= 0.15, "recompute step: plan off by {rel:+.3}");
    assert!(
        rel_plain.abs() <= 0.15,
        "plain step: plan off by {rel_plain:+.3}"
    );
}
