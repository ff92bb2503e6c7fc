//! `ferrotune generate` and `ferrotune eval` on the tiny Phi-3 fixture, against the numbers
//! transformers computed for it (scripts/make_model_fixtures.py → expected.json).

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::str::contains;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tiny() -> PathBuf {
    fixtures().join("models/tiny_phi3_chat")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(tiny().join("expected.json")).unwrap()).unwrap()
}

fn ferrotune() -> Command {
    let mut cmd = Command::cargo_bin("ferrotune").unwrap();
    cmd.env_remove("HF_HUB_CACHE").env_remove("HF_HOME");
    cmd
}

fn json_stdout(cmd: &mut Command) -> Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn generate_with_the_chat_template_gives_transformers_greedy_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let messages = tmp.path().join("m.json");
    std::fs::write(&messages, expected()["messages"].to_string()).unwrap();
    let out = json_stdout(
        ferrotune()
            .args(["--json", "generate", "--model"])
            .arg(tiny())
            .arg("--messages")
            .arg(&messages)
            .args(["--max-new-tokens", "24", "--temperature", "0"]),
    );
    assert_eq!(
        out["prompt_tokens"],
        expected()["prompt_ids"].as_array().unwrap().len()
    );
    assert_eq!(out["token_ids"], expected()["greedy_24"]);
    assert!(out["text"].as_str().unwrap().len() > 10);
}

#[test]
fn eval_gives_transformers_loss_on_prepared_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("test");
    ferrotune()
        .args(["data", "prepare", "--input"])
        .arg(fixtures().join("ultrachat_sample/jsonl/test_sft.jsonl"))
        .arg("--tokenizer")
        .arg(tiny())
        .arg("--out")
        .arg(&data)
        .assert()
        .success();
    let out = json_stdout(
        ferrotune()
            .args(["--json", "eval", "--model"])
            .arg(tiny())
            .arg("--data")
            .arg(&data),
    );
    let reference = &expected()["eval_test_sft"];
    assert_eq!(out["tokens"], reference["tokens"]);
    let (ours, theirs) = (
        out["loss"].as_f64().unwrap(),
        reference["loss"].as_f64().unwrap(),
    );
    assert!(
        ((ours - theirs) / theirs).abs() < 1e-5,
        "loss {ours} vs transformers {theirs}"
    );
    assert!((out["perplexity"].as_f64().unwrap() - ours.exp()).abs() < 1e-6 * ours.exp());
}

#[test]
fn a_hub_id_resolves_through_the_hugging_face_cache_offline() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny-phi3");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd\n").unwrap();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let out = json_stdout(ferrotune().env("HF_HUB_CACHE", cache.path()).args([
        "--json",
        "generate",
        "--model",
        "acme/tiny-phi3",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "3",
    ]));
    assert_eq!(out["token_ids"].as_array().unwrap().len(), 3);
    ferrotune()
        .env("HF_HUB_CACHE", cache.path())
        .args(["generate", "--model", "acme/other", "--prompt", "x"])
        .assert()
        .code(2)
        .stderr(contains("not in the Hugging Face cache"));
}

#[test]
fn model_errors_are_usage_errors_naming_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    ferrotune()
        .args(["generate", "--prompt", "x", "--model"])
        .arg(tmp.path())
        .assert()
        .code(2)
        .stderr(contains("config.json"));
    // A checkpoint whose config disagrees with its weights names the tensor.
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(tiny().join(f), bad.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(tiny().join("config.json")).unwrap();
    std::fs::write(
        bad.join("config.json"),
        cfg.replace("\"intermediate_size\": 64", "\"intermediate_size\": 80"),
    )
    .unwrap();
    ferrotune()
        .args(["generate", "--prompt", "x", "--model"])
        .arg(&bad)
        .assert()
        .code(2)
        .stderr(contains("gate_up_proj.weight"));
    ferrotune()
        .args(["generate", "--prompt", "x", "--device", "tpu", "--model"])
        .arg(tiny())
        .assert()
        .code(2)
        .stderr(contains("--device tpu"));
}

/// `bench decode` measures prefill and decoding for each batch size, on a model folder or on
/// random weights (the PyTorch side is left to the benchmark runs: --no-reference here).
#[test]
fn bench_decode_reports_each_batch_size() {
    let v = json_stdout(
        ferrotune()
            .args([
                "--json",
                "bench",
                "decode",
                "--no-reference",
                "--prompt",
                "8",
                "--new-tokens",
                "4",
                "--batches",
                "1,3",
            ])
            .arg("--model-dir")
            .arg(tiny()),
    );
    let rows = v["ferrotune"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r["batch"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 3]
    );
    // Timings only as numbers that exist: their order depends on the machine's load.
    for r in rows {
        for field in ["decode_tokens_per_s", "prefill_s", "total_s"] {
            let x = r[field].as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{field} in {r}");
        }
    }
    let random = json_stdout(ferrotune().args([
        "--json",
        "bench",
        "decode",
        "--no-reference",
        "--layers",
        "1",
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--vocab",
        "512",
        "--prompt",
        "5",
        "--new-tokens",
        "3",
        "--batches",
        "2",
    ]));
    assert!(random["model"]
        .as_str()
        .unwrap()
        .starts_with("random Phi-3: 1 layers"));
    assert!(random["reference"].is_null());
}

/// `bench attention` on the CPU: both variants run, agree (flash's reference against the kept
/// probabilities, f32), and flash keeps one number per row instead of the probabilities; a
/// dtype flash attention cannot take on the CPU's kept-probabilities path is a usage error.
#[test]
fn bench_attention_compares_flash_with_the_kept_probabilities() {
    let v = json_stdout(ferrotune().args([
        "--json",
        "bench",
        "attention",
        "--heads",
        "2",
        "--seq",
        "70",
        "--head-dim",
        "16",
        "--iters",
        "1",
        "--warmup",
        "0",
    ]));
    for field in ["out", "dq", "dk", "dv"] {
        let d = v["relative_difference"][field].as_f64().unwrap();
        assert!(d < 1e-5, "{field}: {d}");
    }
    assert_eq!(v["probabilities"]["kept_bytes"], 2 * 70 * 70 * 4);
    assert_eq!(v["flash"]["kept_bytes"], 2 * 70 * 4);
    let out = ferrotune()
        .args([
            "bench",
            "attention",
            "--seq",
            "8",
            "--dtype",
            "bf16",
            "--iters",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("kept-probabilities path"));
}

/// `bench train` on a random shape with LoRA dropout: it runs both the plain and the recompute
/// step, reports what it ran, and refuses a dropout outside [0, 1) as a usage error.
#[test]
fn bench_train_runs_with_lora_dropout_and_checks_it() {
    let shape = [
        "--layers",
        "2",
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--vocab",
        "256",
        "--seq",
        "24",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--no-reference",
        "--lora-dropout",
    ];
    for recompute in [false, true] {
        let mut cmd = ferrotune();
        cmd.args(["--json", "bench", "train"])
            .args(shape)
            .arg("0.1");
        if recompute {
            cmd.arg("--recompute");
        }
        let v = json_stdout(&mut cmd);
        assert_eq!(v["lora_dropout"], 0.1);
        assert_eq!(v["recompute"], recompute);
        let tps = v["ferrotune"]["tokens_per_second"].as_f64().unwrap();
        assert!(tps.is_finite() && tps > 0.0, "{v}");
    }
    ferrotune()
        .args(["bench", "train"])
        .args(shape)
        .arg("1.5")
        .assert()
        .code(2)
        .stderr(contains("--lora-dropout 1.5"));
}
