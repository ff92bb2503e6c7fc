//! `ferrotune train` as a user runs it: on the tiny Phi-3 fixture and the bundled ultrachat
//! sample, with config errors, a tracking server that is down, Ctrl-C and resume.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use predicates::str::contains;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn ferrotune() -> Command {
    let mut cmd = Command::cargo_bin("ferrotune").unwrap();
    cmd.env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME")
        .env_remove("MLFLOW_TRACKING_URI");
    cmd
}

/// Run `cmd`, require success, parse its JSON stdout.
fn json_ok(cmd: &mut Command) -> Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A small run: 12 optimizer steps at batch 4 on the bundled sample; `extra` lines replace
/// the base lines with the same key.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("train.yaml");
    let base = format!(
        "model: {model}\ntrain_file_path: {data}\nvalidation_file_path: {data}\n\
             max_steps: 12\nper_device_train_batch_size: 4\nlearning_rate: 5.0e-3\n\
             lr_scheduler_type: cosine\nwarmup_steps: 2\nlogging_steps: 3\neval_steps: 6\n\
             save_steps: 4\nsave_total_limit: 2\nprecision: fp32\ndevice: cpu\noutput_dir: out\n",
        model = fixtures().join("models/tiny_phi3_chat").display(),
        data = fixtures().join("ultrachat_sample/jsonl").display(),
    );
    let key = |l: &str| l.split(':').next().unwrap_or("").trim().to_string();
    let overridden: Vec<String> = extra.lines().map(key).collect();
    let mut text: String = base
        .lines()
        .filter(|l| !overridden.contains(&key(l)))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(extra);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_run_writes_checkpoints_adapter_metrics_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let v = json_ok(
        ferrotune()
            .arg("train")
            .arg("--config")
            .arg(&cfg)
            .arg("--json"),
    );
    let s = &v["summary"];
    assert_eq!(s["finish"], "completed");
    assert_eq!(s["steps"], 12);
    let run = tmp.path().join("out");
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "metrics.jsonl",
        "loss.svg",
        "checkpoint-12/optimizer.safetensors",
        "checkpoint-12/trainer_state.json",
        "checkpoint-12/train_config.yaml",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // save_total_limit 2: of 4, 8, 12 the newest and the best survive.
    let ckpts: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert!(ckpts.len() <= 2, "{} checkpoints kept", ckpts.len());
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let evals: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "eval")
        .collect();
    assert_eq!(evals.len(), 2, "eval at steps 6 and 12");
    let first = evals[0]["eval_loss"].as_f64().unwrap();
    let last = evals[1]["eval_loss"].as_f64().unwrap();
    assert!(last < first, "eval loss must fall: {first} -> {last}");
    // The adapter is usable as is by `generate`.
    ferrotune()
        .args(["generate", "--model"])
        .arg(fixtures().join("models/tiny_phi3_chat"))
        .arg("--adapter")
        .arg(run.join("adapter"))
        .args([
            "--prompt",
            "What is 2 + 2?",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ])
        .assert()
        .success();
    // A second run into the same folder must not silently overwrite it.
    ferrotune()
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .assert()
        .code(2)
        .stderr(contains("--resume auto"));
}

#[test]
fn config_mistakes_exit_2_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "lerning_rate: 1\n");
    ferrotune()
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .assert()
        .code(2)
        .stderr(contains("unknown key \"lerning_rate\""))
        .stderr(contains("learning_rate"));
    let cfg = config(tmp.path(), "");
    ferrotune()
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .args(["--set", "lr_scheduler_type=exponential"])
        .assert()
        .code(2)
        .stderr(contains("lr_scheduler_type"));
    ferrotune()
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .args(["--set", "max_seq_length=100000"])
        .assert()
        .code(2)
        .stderr(contains(
            "max_seq_length: 100000 is longer than the model's context",
        ));
    // A run the memory plan says cannot fit is refused before anything is loaded or written.
    let out_dir = tmp.path().join("out");
    ferrotune()
        .current_dir(tmp.path())
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .args(["--set", "per_device_train_batch_size=1000000"])
        .env_remove("FERROTUNE_SKIP_MEMORY_CHECK")
        .assert()
        .code(2)
        .stderr(contains("the memory plan needs"))
        .stderr(contains("would not fit"))
        .stderr(contains("Try per_device_train_batch_size: "))
        .stderr(contains("FERROTUNE_SKIP_MEMORY_CHECK=1"));
    assert!(!out_dir.exists(), "nothing is written for a refused run");
    ferrotune()
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .arg("--dry-run")
        .assert()
        .success()
        .stdout(contains("learning_rate: 0.005"))
        .stdout(contains(
            "tiny_phi3_chat-ultrachat-bs4-cosine-nods-lora-save_limit2-seqlen-1",
        ));
}

#[test]
fn an_unreachable_tracking_server_never_stops_training() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "max_steps: 3\neval_steps: 3\n");
    let started = Instant::now();
    ferrotune()
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .env("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
        .env("FERROTUNE_MLFLOW_FLUSH_S", "2")
        .assert()
        .success()
        .stderr(contains("MLflow"))
        .stderr(contains("metrics.jsonl"));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_exits_130_and_resume_finishes_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "max_steps: 400\neval_steps: 400\nsave_steps: 1000\nlogging_steps: 1\n",
    );
    let bin = assert_cmd::cargo::cargo_bin("ferrotune");
    let mut child = std::process::Command::new(&bin)
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .env_remove("MLFLOW_TRACKING_URI")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics = tmp.path().join("out/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let ckpt: Vec<_> = std::fs::read_dir(tmp.path().join("out"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpt.len(), 1, "{ckpt:?}");
    let stopped: u64 = ckpt[0].trim_start_matches("checkpoint-").parse().unwrap();
    // max_steps may change on resume (it does not change the numbers of the steps made).
    let v = json_ok(
        ferrotune()
            .arg("train")
            .arg("--config")
            .arg(&cfg)
            .args(["--resume", "auto", "--json", "--set"])
            .arg(format!("max_steps={}", stopped + 5)),
    );
    assert_eq!(v["summary"]["steps"], stopped + 5);
    assert_eq!(v["summary"]["finish"], "completed");
}

/// The embedded default: prepare the bundled sample, fine-tune the bundled base model, compare.
#[test]
fn run_with_no_arguments_fine_tunes_the_bundled_model_then_resumes_as_done() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let run = || {
        let mut cmd = ferrotune();
        cmd.current_dir(tmp.path())
            .env("FERROTUNE_HOME", &home)
            .args(["run", "--json"]);
        cmd
    };
    let out = run().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let base = v["base_eval"]["loss"].as_f64().unwrap();
    let tuned = v["train"]["final_eval"]["loss"].as_f64().unwrap();
    let accuracy = v["train"]["final_eval"]["accuracy"].as_f64().unwrap();
    assert_eq!(v["train"]["finish"], "completed");
    assert!(
        tuned < 0.5 * base,
        "eval loss {base} -> {tuned}: fine-tuning must at least halve it"
    );
    assert!(accuracy > 0.5, "token accuracy {accuracy}");
    assert_eq!(v["answers"].as_array().unwrap().len(), 4);
    let work = tmp.path().join("ferrotune-run");
    for f in [
        "data/train/manifest.json",
        "data/validation/manifest.json",
        "train/adapter/adapter_model.safetensors",
        "train/loss.svg",
        "export/MLmodel",
        "export/model/model.safetensors",
    ] {
        assert!(work.join(f).is_file(), "{f} missing");
    }
    // Again: data cache hits, training already complete (nothing retrained).
    let out = run().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("train: cache hit"), "{stderr}");
    let again: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["train"]["steps"], v["train"]["steps"]);
    // Exported, verified and registered once, with its lineage.
    assert_eq!(v["registered"]["name"], "tiny_phi3_base-ultrachat-200k");
    // Served and scored over HTTP: the held-out conversation's answer came back.
    assert!(
        v["served"]["answer"]
            .as_str()
            .is_some_and(|a| !a.is_empty()),
        "{}",
        v["served"]
    );
    assert!(work.join("sample_score.json").is_file());
    assert_eq!(again["registered"]["version"], v["registered"]["version"]);
    let shown = json_ok(ferrotune().env("FERROTUNE_HOME", &home).args([
        "--json",
        "models",
        "show",
        "tiny_phi3_base-ultrachat-200k",
    ]));
    assert_eq!(
        shown.as_array().unwrap().len(),
        1,
        "registered once: {shown}"
    );
    assert_eq!(
        shown[0]["lineage"]["step"], v["train"]["steps"],
        "lineage names the final step"
    );
    assert_eq!(
        again["train"]["final_eval"]["loss"],
        v["train"]["final_eval"]["loss"]
    );
}

#[test]
fn plan_gives_a_verdict_for_gpus_and_azure_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let v = json_ok(
        ferrotune()
            .args(["plan", "--json", "--gpu", "H100-80GB", "--config"])
            .arg(&cfg),
    );
    assert_eq!(v["verdict"]["fits"], true);
    let total = v["plan"]["total"].as_u64().unwrap();
    let weights = v["plan"]["weights"].as_u64().unwrap();
    assert!(total > weights && weights > 0);
    // fp32 has no flash attention; in bf16 the flash-attention alternative keeps nothing
    // score-sized: less than the kept probabilities.
    assert!(v["flash_attention_total"].is_null());
    let bf16 = json_ok(
        ferrotune()
            .args([
                "plan",
                "--json",
                "--gpu",
                "H100-80GB",
                "--set",
                "precision=bf16",
                "--config",
            ])
            .arg(&cfg),
    );
    assert_eq!(bf16["flash_attention"], false);
    let (flash, probs) = (
        bf16["flash_attention_total"].as_u64().unwrap(),
        bf16["plan"]["total"].as_u64().unwrap(),
    );
    assert!(flash < probs, "{flash} vs {probs}");
    // A V100 has no flash attention (sm_70): no alternative offered, none counted.
    let v100 = json_ok(
        ferrotune()
            .args([
                "plan",
                "--json",
                "--gpu",
                "V100-32GB",
                "--set",
                "precision=fp16",
                "--config",
            ])
            .arg(&cfg),
    );
    assert!(v100["flash_attention_total"].is_null());
    assert_eq!(v100["flash_attention"], false);
    ferrotune()
        .args([
            "plan",
            "--set",
            "precision=auto",
            "--sku",
            "Standard_NC24s_v3",
            "--config",
        ])
        .arg(&cfg)
        .assert()
        .success()
        .stdout(contains("Standard_NC24s_v3 (4 GPUs"))
        .stdout(contains("no bf16"));
    ferrotune()
        .args(["plan", "--sku", "Standard_NC6", "--config"])
        .arg(&cfg)
        .assert()
        .code(2)
        .stderr(contains("K80"));
    // With recompute, the hand-written layer backward plans less than the graph's
    // (`FERROTUNE_LAYER_BACKWARD=graph`), which the plan follows like the run does.
    let activations = |graph: bool| {
        let mut cmd = ferrotune();
        cmd.args([
            "plan",
            "--json",
            "--gpu",
            "H100-80GB",
            "--set",
            "gradient_checkpointing=true",
            "--config",
        ])
        .arg(&cfg);
        if graph {
            cmd.env("FERROTUNE_LAYER_BACKWARD", "graph");
        }
        json_ok(&mut cmd)["plan"]["activations"].as_u64().unwrap()
    };
    let (hand, graph) = (activations(false), activations(true));
    assert!(hand < graph, "hand-written {hand} vs graph {graph}");
    // No GPU named: the plan is for this machine's CPU, checked against its available memory.
    if std::path::Path::new("/proc/meminfo").exists() {
        let v = json_ok(ferrotune().args(["plan", "--json", "--config"]).arg(&cfg));
        assert_eq!(v["target"], Value::Null);
        assert_eq!(v["host_verdict"]["fits"], true, "{v}");
        assert_eq!(v["host_verdict"]["needed_bytes"], v["plan"]["total"]);
    }
}

#[test]
fn packed_data_trains_from_raw_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "pack: true\nmax_seq_length: 256\nmax_steps: 3\neval_steps: 3\n",
    );
    let v = json_ok(
        ferrotune()
            .arg("train")
            .arg("--config")
            .arg(&cfg)
            .arg("--json"),
    );
    assert_eq!(v["summary"]["steps"], 3);
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("out/data/train/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["options"]["pack"], true);
    assert!(
        manifest["stats"]["sequences"].as_u64().unwrap()
            < manifest["stats"]["rows_kept"].as_u64().unwrap()
    );
    assert!(v["summary"]["final_eval"]["loss"]
        .as_f64()
        .unwrap()
        .is_finite());
}

#[test]
fn a_trained_run_exports_verifies_and_is_a_model_for_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "max_steps: 8\nsave_steps: 8\neval_steps: 8\n");
    ferrotune()
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .assert()
        .success();
    let out = tmp.path().join("out");
    let exported = tmp.path().join("exported");
    let export = |extra: &[&str]| {
        let mut cmd = ferrotune();
        cmd.args(["export", "--checkpoint"])
            .arg(&out)
            .arg("--out")
            .arg(&exported)
            .args(["--dtype", "f32"])
            .args(extra);
        cmd
    };
    let report = json_ok(export(&[]).arg("--json"));
    assert_eq!(report["mode"], "merged");
    assert_eq!(report["lineage"]["step"], 8);
    assert!(report["lineage"]["checkpoint"]
        .as_str()
        .unwrap()
        .ends_with("checkpoint-8"));
    export(&[])
        .assert()
        .code(2)
        .stderr(contains("already exists; pass --force"));
    export(&["--force"]).assert().success();

    // The checkpoint named in MLmodel is found by --verify on its own.
    let v = json_ok(
        ferrotune()
            .args(["--json", "export", "--verify"])
            .arg(&exported),
    );
    assert_eq!(v["kind"], "mlflow");
    assert_eq!(v["answers"].as_array().unwrap().len(), 3);

    // generate: the export answers as base + adapter does.
    let answer = |model: &Path, adapter: Option<&Path>| -> Value {
        let mut cmd = ferrotune();
        cmd.args(["--json", "generate", "--model"]).arg(model);
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(a);
        }
        json_ok(cmd.args([
            "--prompt",
            "The capital of Peru is",
            "--max-new-tokens",
            "12",
        ]))
    };
    let base = fixtures().join("models/tiny_phi3_chat");
    assert_eq!(
        answer(&exported, None)["token_ids"],
        answer(&base, Some(&out.join("adapter")))["token_ids"]
    );
    // eval and train take the MLflow folder as --model / model.
    let prepared = tmp.path().join("prepared");
    ferrotune()
        .args(["data", "prepare", "--input"])
        .arg(fixtures().join("ultrachat_sample/jsonl"))
        .args(["--split", "test_sft", "--tokenizer"])
        .arg(exported.join("components/tokenizer"))
        .arg("--out")
        .arg(&prepared)
        .assert()
        .success();
    let e = json_ok(
        ferrotune()
            .args(["--json", "eval", "--model"])
            .arg(&exported)
            .arg("--data")
            .arg(&prepared),
    );
    assert!(e["loss"].as_f64().unwrap() > 0.0);
    let again = config(
        tmp.path(),
        &format!(
            "model: {}\noutput_dir: again\nmax_steps: 2\n",
            exported.display()
        ),
    );
    ferrotune()
        .args(["train", "--dry-run", "--config"])
        .arg(&again)
        .assert()
        .success();

    ferrotune()
        .args(["export", "--checkpoint"])
        .arg(tmp.path().join("nowhere"))
        .arg("--out")
        .arg(tmp.path().join("x"))
        .assert()
        .code(2)
        .stderr(contains("no such folder"));
}

/// `--nproc-per-node 2` starts two ranks that train, bit for bit, what one process trains with
/// twice the accumulation; the same binary under torchrun-style variables joins as one rank, and
/// ranks that disagree about the training stop at once with exit 2.
#[test]
fn two_ranks_train_what_one_process_trains_and_mismatched_ranks_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "max_steps: 6\neval_steps: 3\nsave_steps: 3\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 1\nshuffle: true\nlora_dropout: 0.1\n",
    );
    let out = |name: &str| tmp.path().join(name);
    ferrotune()
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .args(["--nproc-per-node", "2", "--dist-timeout", "120", "--set"])
        .arg(format!("output_dir={}", out("two").display()))
        .assert()
        .success()
        .stdout(contains("training completed: 6/6 steps"));
    ferrotune()
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .args(["--set", "gradient_accumulation_steps=2", "--set"])
        .arg(format!("output_dir={}", out("one").display()))
        .assert()
        .success();
    let adapter =
        |dir: &str| std::fs::read(out(dir).join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        adapter("two") == adapter("one"),
        "the 2-rank adapter differs from the single process's"
    );
    let losses = |dir: &str| -> Vec<String> {
        std::fs::read_to_string(out(dir).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"grad_norm\""))
            .map(|l| l.split("\"elapsed_s\"").next().unwrap().to_string())
            .collect()
    };
    let (two, one) = (losses("two"), losses("one"));
    assert!(!two.is_empty());
    assert_eq!(
        two.iter()
            .map(|l| l.split("\"tokens_per_s\"").next().unwrap())
            .collect::<Vec<_>>(),
        one.iter()
            .map(|l| l.split("\"tokens_per_s\"").next().unwrap())
            .collect::<Vec<_>>()
    );

    // Two processes started by hand, as torchrun would; rank 1 was given another learning rate.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = assert_cmd::cargo::cargo_bin("ferrotune");
    let started = Instant::now();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg("train")
                .arg("--config")
                .arg(&cfg)
                .arg("--set")
                .arg(format!("output_dir={}", out("mismatch").display()))
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("FERROTUNE_DIST_TIMEOUT", "30")
                .env_remove("MLFLOW_TRACKING_URI")
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            if rank == 1 {
                cmd.args(["--set", "learning_rate=1e-3"]);
            }
            cmd.spawn().unwrap()
        })
        .collect();
    for (rank, child) in ranks.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "rank {rank}: {stderr}");
        assert!(stderr.contains("config hash"), "rank {rank}: {stderr}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused fast: {:?}",
        started.elapsed()
    );
    assert!(!out("mismatch").join("checkpoint-3").exists());
}
