//! Training and inference through flash attention (`ferrotune_kernels::flash_attention`, the
//! path `FERROTUNE_TRAIN_ATTENTION=flash` takes on CUDA) on the CPU, where its f32 reference
//! runs: the output handed over in `o_proj`'s layout, the log-sum-exp kept for the backward, the
//! graph's custom op and the hand-written recompute backward, against transformers + PEFT on
//! every fixture (causal, GQA, sliding window, packed documents, padding, longrope, rsLoRA).
//! Its own test binary, so the switch it sets applies to this process only.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{case_dir, l2, load, max_diff, CASES};
use ferrotune_model::loss::{causal_lm_loss, causal_lm_loss_sum};
use ferrotune_model::peft;

fn switch_on() {
    std::env::set_var("FERROTUNE_TRAIN_ATTENTION", "flash");
    let q = Tensor::zeros((1, 2, 3, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(
        ferrotune_model::attention::flash_applies(&q, &q),
        "the switch routes CPU training attention through flash attention"
    );
}

/// Logits, loss and every LoRA gradient with flash attention, through the graph and through
/// the hand-written recompute backward, within the tolerances of `reference_parity.rs`.
#[test]
fn training_through_flash_attention_matches_peft() {
    switch_on();
    for name in CASES {
        let mut c = load(name);
        peft::load_adapter(&mut c.model, &case_dir(name).join("adapter")).unwrap();
        let logits = c.model.logits(&c.batch, true).unwrap();
        let d = max_diff(&logits, &c.expected["logits_lora"], &c.real);
        assert!(d <= 1e-4, "{name}: max |Δ logits| = {d:e}");
        let loss = causal_lm_loss(&logits, &c.labels).unwrap();
        let want = c.expected["loss_lora"].to_scalar::<f32>().unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            ((got - want) / want).abs() <= 1e-5,
            "{name}: loss {got} vs {want}"
        );

        let graph = loss.backward().unwrap();
        let tokens = causal_lm_loss_sum(&logits, &c.labels).unwrap().tokens;
        let (sum, n, recompute) = c
            .model
            .loss_and_grads_recompute(&c.batch, &c.labels, 1.0 / tokens as f64)
            .unwrap();
        assert_eq!(n, tokens);
        assert!(
            ((sum / n as f32 - want) / want).abs() <= 1e-5,
            "{name}: recompute loss"
        );

        let mut worst = 0f32;
        let names: Vec<String> = c
            .model
            .lora_pairs()
            .into_iter()
            .flat_map(|(module, _)| ["lora_A", "lora_B"].map(|w| format!("grad.{module}.{w}")))
            .collect();
        let vars = c.model.trainable_vars();
        assert_eq!(names.len(), vars.len());
        for ((key, var), hand) in names.iter().zip(&vars).zip(&recompute) {
            let r = &c.expected[key];
            for (how, g) in [
                ("graph", graph.get(var.as_tensor()).unwrap()),
                ("recompute", hand),
            ] {
                let rel = l2(&(g - r).unwrap()) / l2(r);
                worst = worst.max(rel);
                assert!(rel <= 1e-4, "{name}: {key} ({how}) relative error {rel:e}");
            }
        }
        eprintln!("{name}: flash attention, logits |Δ| {d:.2e}, worst LoRA gradient {worst:.2e}");
    }
}

/// Generation's prefill (self-attention over the prompt) also takes flash attention; the greedy
/// tokens stay transformers'.
#[test]
fn greedy_generation_with_a_flash_prefill_matches_transformers() {
    switch_on();
    for name in common::GREEDY_CASES {
        common::check_greedy_generation(name);
    }
}
