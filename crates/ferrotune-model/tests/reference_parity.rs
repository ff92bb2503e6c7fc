//! ferrotune's Phi-3 + LoRA against transformers + PEFT on the committed fixtures
//! (scripts/make_model_fixtures.py), on CPU in f32:
//! logits max |Δ| ≤ 1e-4, loss relative Δ ≤ 1e-5, every LoRA gradient within 1e-4 (norm-wise).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{case_dir, l2, load, max_abs, max_diff, Case, CASES};
use ferrotune_model::loss::causal_lm_loss;
use ferrotune_model::peft;

#[test]
fn base_logits_match_transformers() {
    for name in CASES {
        let c = load(name);
        let logits = c.model.logits(&c.batch, false).unwrap();
        let d = max_diff(&logits, &c.expected["logits_base"], &c.real);
        eprintln!("{}: base logits max |Δ| = {d:.2e}", c.name);
        assert!(d <= 1e-4, "{}: max |Δ logits| = {d:e}", c.name);
    }
}

#[test]
fn peft_adapters_load_and_give_peft_logits_loss_and_gradients() {
    for name in CASES {
        let mut c = load(name);
        peft::load_adapter(&mut c.model, &case_dir(name).join("adapter")).unwrap();
        let logits = c.model.logits(&c.batch, true).unwrap();
        let d = max_diff(&logits, &c.expected["logits_lora"], &c.real);
        assert!(d <= 1e-4, "{}: max |Δ logits| with adapter = {d:e}", c.name);

        let loss = causal_lm_loss(&logits, &c.labels).unwrap();
        let (ours, theirs) = (
            loss.to_scalar::<f32>().unwrap(),
            c.expected["loss_lora"].to_scalar::<f32>().unwrap(),
        );
        eprintln!(
            "{}: lora logits max |Δ| = {d:.2e}, loss rel Δ = {:.2e}",
            c.name,
            ((ours - theirs) / theirs).abs()
        );
        assert!(
            ((ours - theirs) / theirs).abs() <= 1e-5,
            "{}: loss {ours} vs {theirs}",
            c.name
        );

        let grads = loss.backward().unwrap();
        let pairs = c.model.lora_pairs();
        let mut worst_grad = 0f32;
        assert_eq!(pairs.len(), 4 * c.model.config().num_hidden_layers);
        for (module, pair) in pairs {
            for (which, var) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {module}.{which}"));
                let r = &c.expected[&format!("grad.{module}.{which}")];
                let diff = l2(&(g - r).unwrap());
                let norm = l2(r);
                assert!(
                    norm > 0.0,
                    "{name}: reference gradient of {module}.{which} is zero"
                );
                worst_grad = worst_grad.max(diff / norm);
                assert!(
                    diff / norm <= 1e-4,
                    "{name}: {module}.{which} relative gradient error {:e}",
                    diff / norm
                );
            }
        }
        eprintln!("{name}: worst LoRA gradient relative error {worst_grad:.2e}");
    }
}

#[test]
fn frozen_base_weights_get_no_gradient() {
    let mut c = load("gqa_sharded");
    peft::load_adapter(&mut c.model, &case_dir("gqa_sharded").join("adapter")).unwrap();
    let logits = c.model.logits(&c.batch, true).unwrap();
    let grads = causal_lm_loss(&logits, &c.labels)
        .unwrap()
        .backward()
        .unwrap();
    for v in c.model.trainable_vars() {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "every LoRA variable gets a gradient"
        );
    }
    let frozen = c.model.frozen_weights();
    assert_eq!(frozen.len(), 2 + 6 * c.model.config().num_hidden_layers + 1);
    for w in frozen {
        assert!(
            grads.get(&w).is_none(),
            "a base weight {:?} got a gradient",
            w.dims()
        );
    }
}

#[test]
fn merged_weights_give_the_adapter_logits_and_unmerge_restores_the_base() {
    for name in ["gqa_sharded", "rslora_tied"] {
        let mut c = load(name);
        peft::load_adapter(&mut c.model, &case_dir(name).join("adapter")).unwrap();
        let with_adapter = c.model.logits(&c.batch, false).unwrap();
        // Inference records no graph: a recorded one keeps every layer's activations alive.
        assert!(
            !with_adapter.track_op(),
            "{name}: inference logits with an adapter carry an autograd graph"
        );
        c.model.merge_lora().unwrap();
        assert!(
            c.model.lora_pairs().is_empty(),
            "merged adapters are no longer applied separately"
        );
        // A merged weight must not hold on to its autograd inputs (the old weight and f32
        // copies: a model's worth of memory per merge, found exporting a 1.1B model).
        assert!(
            c.model.frozen_weights().iter().all(|w| !w.track_op()),
            "{name}: merged weights carry an autograd graph"
        );
        let merged = c.model.logits(&c.batch, false).unwrap();
        let d = max_diff(&merged, &with_adapter, &c.real);
        eprintln!("{name}: merged vs adapter logits max |Δ| = {d:.2e}");
        assert!(d <= 1e-4, "{name}: merged logits differ by {d:e}");
        c.model.unmerge_lora().unwrap();
        let again = c.model.logits(&c.batch, false).unwrap();
        assert!(max_diff(&again, &with_adapter, &c.real) <= 1e-4);
        let pairs = c.model.lora_pairs().len();
        assert_eq!(pairs, 8);
    }
}

#[test]
fn an_adapter_saved_here_loads_back_identically() {
    let mut c = load("hub_mha");
    let cfg = peft::load_adapter(&mut c.model, &case_dir("hub_mha").join("adapter")).unwrap();
    let before = c.model.logits(&c.batch, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    peft::save_adapter(&c.model, &cfg, "fixtures/models/hub_mha", dir.path()).unwrap();
    let mut fresh = load("hub_mha");
    let cfg2 = peft::load_adapter(&mut fresh.model, dir.path()).unwrap();
    assert_eq!(cfg, cfg2);
    let after = fresh.model.logits(&fresh.batch, false).unwrap();
    assert_eq!(max_diff(&before, &after, &c.real), 0.0);
}

#[test]
fn greedy_generation_matches_transformers_with_and_without_adapter() {
    for name in common::GREEDY_CASES {
        common::check_greedy_generation(name);
    }
}

/// In bf16 on the CPU, recompute's layers go through candle's graph with the same ops as the
/// plain graph, but with A and scale·B cast once for the step instead of inside each op: the
/// gradients must be the plain graph's bit for bit, and no cast may outlive the step.
#[test]
fn recompute_with_step_casts_equals_the_plain_graph_in_bf16() {
    for name in ["gqa_sharded", "packed"] {
        let mut c = common::load_on(name, candle_core::DType::BF16, &Device::Cpu);
        peft::load_adapter(&mut c.model, &case_dir(name).join("adapter")).unwrap();
        let sum = c.model.loss_sum(&c.batch, &c.labels, true).unwrap();
        let plain = sum.sum.backward().unwrap();
        let (rsum, n, grads) = c
            .model
            .loss_and_grads_recompute(&c.batch, &c.labels, 1.0)
            .unwrap();
        assert_eq!(n, sum.tokens);
        assert_eq!(rsum, sum.sum.to_scalar::<f32>().unwrap(), "{name}: loss");
        for (g, v) in grads.iter().zip(c.model.trainable_vars()) {
            let p = plain.get(v.as_tensor()).unwrap();
            assert_eq!(
                max_abs(&(g - p).unwrap()),
                0.0,
                "{name}: a gradient differs"
            );
        }
        assert!(
            c.model
                .lora_pairs()
                .iter()
                .all(|(_, p)| !p.holds_step_casts()),
            "{name}: casts outlived the step"
        );
    }
}

#[test]
fn per_layer_recompute_gives_the_plain_graph_gradients() {
    for name in ["gqa_sharded", "sliding_window", "packed", "padded"] {
        let mut c = load(name);
        peft::load_adapter(&mut c.model, &case_dir(name).join("adapter")).unwrap();
        let logits = c.model.logits(&c.batch, true).unwrap();
        let loss = causal_lm_loss(&logits, &c.labels).unwrap();
        let plain = loss.backward().unwrap();
        let tokens = ferrotune_model::loss::causal_lm_loss_sum(&logits, &c.labels)
            .unwrap()
            .tokens;
        let scale = 1.0 / tokens as f64;
        for (how, (sum, n, grads)) in [
            (
                "hand-written",
                c.model
                    .loss_and_grads_recompute(&c.batch, &c.labels, scale)
                    .unwrap(),
            ),
            (
                "graph",
                c.model
                    .loss_and_grads_recompute_through_graph(&c.batch, &c.labels, scale)
                    .unwrap(),
            ),
        ] {
            assert_eq!(n, tokens);
            let mean = sum / n as f32;
            assert!((mean - loss.to_scalar::<f32>().unwrap()).abs() <= 1e-6 * mean.abs());
            let vars = c.model.trainable_vars();
            assert_eq!(grads.len(), vars.len());
            let mut worst = 0f32;
            for (g, v) in grads.iter().zip(&vars) {
                let p = plain.get(v.as_tensor()).unwrap();
                let diff = max_abs(&(g - p).unwrap());
                let scale = max_abs(p);
                worst = worst.max(diff / scale);
            }
            eprintln!(
                "{name}: recompute ({how} layer backward) vs plain graph, worst relative gradient difference {worst:.2e}"
            );
            assert!(
                worst <= 1e-5,
                "{name}: recompute ({how}) gradients differ by {worst:e}"
            );
        }
    }
}

/// An adapter made and saved by ferrotune (fresh PEFT-style init on two targets, B set to a
/// fixed pattern so it changes the output), with the logits ferrotune computes with it.
fn ferrotune_adapter(dir: &Path) -> (Tensor, Case) {
    let mut c = load("hub_mha");
    let lora = ferrotune_model::LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: vec!["qkv_proj".into(), "down_proj".into()],
        use_rslora: false,
    };
    c.model.add_lora(&lora, 42).unwrap();
    for (i, (_, pair)) in c.model.lora_pairs().into_iter().enumerate() {
        let (out, r) = pair.b.as_tensor().dims2().unwrap();
        let pattern: Vec<f32> = (0..out * r)
            .map(|k| ((k * 7 + i * 13) % 17) as f32 / 17.0 - 0.5)
            .collect();
        pair.b
            .set(&Tensor::from_vec(pattern, (out, r), &Device::Cpu).unwrap())
            .unwrap();
    }
    peft::save_adapter(&c.model, &lora, "fixtures/models/hub_mha", dir).unwrap();
    (c.model.logits(&c.batch, false).unwrap(), c)
}

#[test]
fn adapters_saved_by_ferrotune_load_in_peft_with_the_same_logits() {
    // scripts/check_ferrotune_adapter.py loaded fixtures/models/hub_mha/ferrotune_adapter in PEFT
    // and recorded its logits; this test checks that ferrotune still writes exactly that adapter
    // and that its logits with it match PEFT's.
    let committed = case_dir("hub_mha").join("ferrotune_adapter");
    let tmp = tempfile::tempdir().unwrap();
    let (logits, _) = ferrotune_adapter(tmp.path());
    if std::env::var_os("FERROTUNE_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(&committed).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::copy(tmp.path().join(f), committed.join(f)).unwrap();
        }
        candle_core::safetensors::save(
            &HashMap::from([("logits".to_string(), logits.clone())]),
            committed.join("ferrotune_logits.safetensors"),
        )
        .unwrap();
    }
    let ours = std::fs::read(tmp.path().join("adapter_model.safetensors")).unwrap();
    let theirs = std::fs::read(committed.join("adapter_model.safetensors")).unwrap();
    assert!(
        ours == theirs,
        "ferrotune now writes a different adapter than the one PEFT checked"
    );
    let peft_logits =
        candle_core::safetensors::load(committed.join("peft_logits.safetensors"), &Device::Cpu)
            .unwrap();
    let all_real = vec![vec![1u8; 12]; 2];
    let d = max_diff(&logits, &peft_logits["logits"], &all_real);
    assert!(
        d <= 1e-4,
        "our logits with our adapter differ from PEFT's by {d:e}"
    );
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(committed.join("peft_check.json")).unwrap())
            .unwrap();
    assert_eq!(check["loaded_in_peft"], true);
    assert!(
        check["max_abs_logit_diff"].as_f64().unwrap() <= 1e-4,
        "{check}"
    );
}

#[test]
fn keyed_lora_dropout_is_the_same_in_the_recompute_pass() {
    let name = "padded";
    let mut c = load(name);
    peft::load_adapter(&mut c.model, &case_dir(name).join("adapter")).unwrap();
    let paths: Vec<String> = c.model.lora_pairs().into_iter().map(|(p, _)| p).collect();
    let plain_loss = |c: &Case| {
        let logits = c.model.logits(&c.batch, true).unwrap();
        causal_lm_loss(&logits, &c.labels).unwrap()
    };
    let without = plain_loss(&c).to_scalar::<f32>().unwrap();
    for p in &paths {
        c.model
            .linear_mut(p)
            .unwrap()
            .lora
            .as_mut()
            .unwrap()
            .dropout = 0.3;
    }
    c.model.set_dropout_key(11);
    let loss = plain_loss(&c);
    let with = loss.to_scalar::<f32>().unwrap();
    assert!((with - without).abs() > 1e-4, "dropout had no effect");
    assert_eq!(
        with,
        plain_loss(&c).to_scalar::<f32>().unwrap(),
        "same key, same masks"
    );
    c.model.set_dropout_key(12);
    assert_ne!(
        with,
        plain_loss(&c).to_scalar::<f32>().unwrap(),
        "new key, new masks"
    );
    c.model.set_dropout_key(11);
    let plain = loss.backward().unwrap();
    let tokens = ferrotune_model::loss::causal_lm_loss_sum(
        &c.model.logits(&c.batch, true).unwrap(),
        &c.labels,
    )
    .unwrap()
    .tokens;
    let (sum, _, grads) = c
        .model
        .loss_and_grads_recompute(&c.batch, &c.labels, 1.0 / tokens as f64)
        .unwrap();
    assert!((sum / tokens as f32 - with).abs() <= 1e-6 * with.abs());
    for (g, v) in grads.iter().zip(&c.model.trainable_vars()) {
        let p = plain.get(v.as_tensor()).unwrap();
        assert!(max_abs(&(g - p).unwrap()) <= 1e-5 * max_abs(p));
    }
}

#[test]
fn adapters_on_a_shared_base_share_its_weights_and_match_their_own_loads() {
    let name = "gqa_sharded";
    let c = load(name);
    let base_logits = c.model.logits(&c.batch, false).unwrap();
    let mut shared = c.model.share_base().unwrap();
    let ids = |m: &ferrotune_model::Phi3| {
        m.frozen_weights()
            .iter()
            .map(|w| w.id())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&c.model),
        ids(&shared),
        "the weights are shared, not copied"
    );
    peft::load_adapter(&mut shared, &case_dir(name).join("adapter")).unwrap();
    let mut own = load(name);
    peft::load_adapter(&mut own.model, &case_dir(name).join("adapter")).unwrap();
    let with_adapter = own.model.logits(&own.batch, false).unwrap();
    let on_shared = shared.logits(&c.batch, false).unwrap();
    assert_eq!(max_diff(&on_shared, &with_adapter, &c.real), 0.0);
    assert!(
        max_diff(&on_shared, &base_logits, &c.real) > 1e-3,
        "the adapter changes the logits"
    );
    // The base it came from still has no adapter.
    let again = c.model.logits(&c.batch, false).unwrap();
    assert_eq!(max_diff(&again, &base_logits, &c.real), 0.0);
    own.model.merge_lora().unwrap();
    assert!(
        own.model.share_base().is_err(),
        "merged weights cannot be shared"
    );
}
