//! `ferrotune run`: the whole pipeline. Without --config it runs on the bundled tiny base model
//! (Phi-3 vocabulary, pre-trained on plain text, never shown the chat format) and the bundled
//! ultrachat sample: prepare → train LoRA → evaluate → ask it questions before and after →
//! export an MLflow model folder, verify it, register it → serve it on a loopback port and
//! score a held-out conversation over HTTP.

use std::path::Path;

use ferrotune_data::{OnBadRow, PrepareOptions};
use ferrotune_model::loaded::load_model;
use ferrotune_train::eval::{evaluate, EvalMetrics};
use ferrotune_train::{Finish, TrainConfig};
use serde_json::json;
use serde_yaml_ng::Value;

use crate::assets;
use crate::cli::RunArgs;
use crate::commands::data::run_prepare;
use crate::commands::generate::chat_answers;
use crate::commands::train::{report, train};
use crate::failure::Failure;

/// The embedded training recipe (paths are filled in; `--set` overrides any key).
const DEFAULT_TRAIN: &str = "\
num_train_epochs: 3
per_device_train_batch_size: 8
gradient_accumulation_steps: 1
learning_rate: 1.0e-2
lr_scheduler_type: cosine
warmup_ratio: 0.05
weight_decay: 0.0
lora_r: 16
lora_alpha: 32
lora_dropout: 0.0
max_seq_length: 512
logging_steps: 10
eval_steps: 60
save_steps: 60
save_total_limit: 2
seed: 42
precision: fp32
device: cpu
experiment_name: ferrotune_run
";

/// Questions asked before and after fine-tuning (from the sample's held-out split's kinds).
const QUESTIONS: [&str; 4] = [
    "What is the capital of Peru?",
    "Which city is the capital of Japan?",
    "Reverse the word 'river'.",
    "What is 12 + 30?",
];

pub fn run(args: &RunArgs, json: bool) -> Result<(), Failure> {
    if let Some(config) = &args.config {
        return Err(Failure::usage(format!(
            "--config {}: pipeline configs arrive with export and serving; use `ferrotune train --config` for a training config, or run without --config for the embedded default",
            config.display()
        )));
    }
    let work = &args.workdir;
    let tokenizer = work.join("assets/tokenizer");
    let sample = work.join("assets/ultrachat_sample");
    let model_dir = work.join("assets/model");
    let written = |e: std::io::Error| {
        Failure::runtime(format!(
            "writing bundled assets under {}: {e}",
            work.display()
        ))
    };
    assets::materialise(&tokenizer, &assets::TOKENIZER).map_err(written)?;
    assets::materialise(&sample, &assets::SAMPLE_JSONL).map_err(written)?;
    assets::materialise(&model_dir, &assets::BASE_MODEL).map_err(written)?;

    // 1. Data.
    let mut data_lines = Vec::new();
    for (split, name) in [("train_sft", "train"), ("test_sft", "validation")] {
        let opts = PrepareOptions {
            input: sample.clone(),
            split: Some(split.to_string()),
            tokenizer: tokenizer.clone(),
            out: work.join("data").join(name),
            split_pc: None,
            max_seq_length: 512,
            pack: false,
            on_bad_row: OnBadRow::Skip,
            force: false,
        };
        let outcome = run_prepare(&opts, !json)?;
        let hit = matches!(outcome, ferrotune_data::Outcome::CacheHit(_));
        tracing::info!(
            "{name}: {} ({split})",
            if hit { "cache hit" } else { "prepared" }
        );
        let st = &outcome.manifest().stats;
        data_lines.push(format!(
            "  {name:<10} {} conversations, {} tokens ({} trained){}",
            st.rows_kept,
            st.tokens,
            st.trainable_tokens,
            if hit { ", cache hit" } else { "" }
        ));
    }

    // 2. Train (resuming a killed run; a finished one is only reported).
    let Value::Mapping(mut map) =
        serde_yaml_ng::from_str::<Value>(DEFAULT_TRAIN).expect("the embedded recipe is valid YAML")
    else {
        unreachable!("the embedded recipe is a mapping")
    };
    let path = |p: &Path| Value::String(p.display().to_string());
    map.insert("model".into(), path(&model_dir));
    map.insert("train_file_path".into(), path(&work.join("data/train")));
    map.insert(
        "validation_file_path".into(),
        path(&work.join("data/validation")),
    );
    map.insert("output_dir".into(), path(&work.join("train")));
    let cfg = TrainConfig::from_value(map, &args.sets, "ferrotune run (embedded recipe)")?;
    let (before, base_eval) = answers(&model_dir, None, Some(&work.join("data/validation")))?;
    let summary = train(&cfg, Some("auto"), !json, &mut Vec::new())?;
    if summary.finish == Finish::Interrupted {
        report(&cfg, &summary, json);
        return Err(Failure {
            code: Failure::INTERRUPTED,
            message: format!(
                "interrupted at step {}; run `ferrotune run` again to continue",
                summary.steps
            ),
        });
    }
    let (after, _) = answers(&model_dir, summary.adapter.as_deref(), None)?;

    // 3. Export (an MLflow model folder), verify it against the checkpoint, register it.
    let published = publish(work, &cfg.output_dir)?;

    // 4. Serve it on a free loopback port and score a held-out conversation over HTTP.
    let scored = serve_and_score(work, &published.export, &sample.join("test_sft.jsonl"))?;

    if json {
        let qa: Vec<_> = QUESTIONS
            .iter()
            .zip(before.iter().zip(&after))
            .map(|(q, (b, a))| json!({"question": q, "base": b, "fine_tuned": a}))
            .collect();
        println!(
            "{}",
            json!({"workdir": work, "base_eval": base_eval, "train": summary, "answers": qa,
                   "export": published.export, "verified": published.verified,
                   "registered": published.registered, "served": scored})
        );
        return Ok(());
    }
    println!("ferrotune run (embedded default) in {}", work.display());
    println!("data");
    for l in &data_lines {
        println!("{l}");
    }
    if let Some(e) = &base_eval {
        println!(
            "base model on the validation split: loss {:.4}  perplexity {:.3}  token accuracy {:.1}%",
            e.loss,
            e.perplexity,
            100.0 * e.accuracy
        );
    }
    report(&cfg, &summary, false);
    println!("\nanswers (greedy), base model → fine-tuned:");
    for (q, (b, a)) in QUESTIONS.iter().zip(before.iter().zip(&after)) {
        println!("  Q: {q}\n     base:       {b}\n     fine-tuned: {a}");
    }
    println!(
        "\nexported     {} (MLflow model, bf16; greedy answers verified against {})",
        published.export.display(),
        published.verified.display()
    );
    println!(
        "registered   {}:{}{} in {}",
        published.registered.name,
        published.registered.version,
        if published.newly_registered {
            ""
        } else {
            " (already registered)"
        },
        ferrotune_registry::default_home().display()
    );
    println!(
        "served       on {} as deployment demo; POST /score with {} ({:.2} s):",
        scored["endpoint"].as_str().unwrap_or("?"),
        scored["request_file"].as_str().unwrap_or("?"),
        scored["seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  Q: {}\n     reference:  {}\n     answer:     {}",
        scored["question"].as_str().unwrap_or(""),
        scored["reference"].as_str().unwrap_or(""),
        scored["answer"].as_str().unwrap_or("")
    );
    println!(
        "\nnext: `ferrotune generate --model {} --messages FILE` to ask it more, \
         `ferrotune models show {}` for its lineage",
        published.export.display(),
        published.registered.name
    );
    Ok(())
}

/// Serve `export` on 127.0.0.1 (a free port), score the first held-out conversation with the
/// source's request shape (up to its last user turn, greedy), stop the server.
fn serve_and_score(
    work: &Path,
    export: &Path,
    test_jsonl: &Path,
) -> Result<serde_json::Value, Failure> {
    let first = std::fs::read_to_string(test_jsonl)
        .map_err(|e| Failure::runtime(format!("{}: {e}", test_jsonl.display())))?
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .ok_or_else(|| Failure::runtime(format!("{}: no conversation", test_jsonl.display())))?;
    let mut messages = first["messages"].as_array().cloned().unwrap_or_default();
    let reference = match messages.last() {
        Some(m) if m["role"] == "assistant" => messages
            .pop()
            .and_then(|m| m["content"].as_str().map(str::to_owned)),
        _ => None,
    };
    let question = messages
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    let request = json!({"input_data": {"input_string": [messages],
                                        "parameters": {"do_sample": false, "max_new_tokens": 48}},
                         "params": {}});
    let request_file = work.join("sample_score.json");
    std::fs::write(&request_file, request.to_string())
        .map_err(|e| Failure::runtime(format!("{}: {e}", request_file.display())))?;
    let deployment = crate::commands::serve::deployment_from(
        &mut Default::default(),
        "demo",
        export,
        export.display().to_string(),
        &crate::commands::serve::DeploymentOptions {
            device: Some("cpu".into()),
            dtype: Some("f32".into()),
            max_batch: 8,
            max_queue: 16,
            kv_budget: crate::commands::serve::KvBudget::HalfOfFree { shared_by: 1 },
        },
    )?;
    let endpoint = std::sync::Arc::new(
        ferrotune_serve::Endpoint::new(vec![deployment], Vec::new()).map_err(Failure::runtime)?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("starting the server runtime: {e}")))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| Failure::runtime(format!("binding a loopback port: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::runtime(e.to_string()))?;
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let opts = ferrotune_serve::ServerOptions {
            keys: ferrotune_serve::Keys::default(),
            request_timeout: std::time::Duration::from_secs(90),
            max_body_bytes: 1 << 20,
            grace: std::time::Duration::from_secs(5),
        };
        let server = tokio::spawn(ferrotune_serve::serve(
            listener,
            endpoint.clone(),
            opts,
            ready,
            async {
                let _ = stop_rx.await;
            },
        ));
        ferrotune_serve::warm_up(&endpoint)
            .await
            .map_err(Failure::runtime)?;
        Ok::<_, Failure>((addr, server))
    })?;
    let url = format!("http://{addr}/score");
    let started = std::time::Instant::now();
    let answer = reqwest::blocking::Client::new()
        .post(&url)
        .json(&request)
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json::<serde_json::Value>())
        .map_err(|e| Failure::runtime(format!("{url}: {e}")))?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    runtime
        .block_on(server)
        .map_err(|e| Failure::runtime(format!("server task: {e}")))?
        .map_err(|e| Failure::runtime(format!("server: {e}")))?;
    Ok(json!({
        "endpoint": format!("http://{addr}"),
        "request_file": request_file,
        "question": question,
        "reference": reference,
        "answer": answer["output"],
        "seconds": seconds,
    }))
}

/// The exported, verified and registered result of a run.
struct Published {
    export: std::path::PathBuf,
    verified: std::path::PathBuf,
    registered: ferrotune_registry::ModelVersion,
    newly_registered: bool,
}

/// Name the bundled model is registered under (the source document's `<model>-ultrachat-200k`).
const REGISTERED_NAME: &str = "tiny_phi3_base-ultrachat-200k";

/// Export the final checkpoint (again only when it changed), verify, and register it unless
/// this very folder already is.
fn publish(work: &Path, output_dir: &Path) -> Result<Published, Failure> {
    let out = work.join("export");
    let (_, checkpoint) = ferrotune_train::checkpoint::list(output_dir)
        .pop()
        .ok_or_else(|| Failure::runtime("the finished run left no checkpoint to export"))?;
    let current = ferrotune_export::verify::exported_from(&out);
    let checkpoint = std::fs::canonicalize(&checkpoint).unwrap_or(checkpoint);
    if current.as_deref() != Some(checkpoint.as_path()) {
        let opts = ferrotune_export::ExportOptions {
            checkpoint: checkpoint.clone(),
            out: out.clone(),
            mode: ferrotune_export::Mode::Merged,
            dtype: None,
            task: "llm/v1/chat".into(),
            force: true,
            max_shard_bytes: ferrotune_export::DEFAULT_MAX_SHARD_BYTES,
            base_model: None,
            git_commit: Some(env!("FERROTUNE_GIT_COMMIT").to_string()),
        };
        crate::commands::export::run_export(&opts, false)?;
    }
    let report = ferrotune_export::verify(&out, Some(&checkpoint), None)?;
    let mut reg = ferrotune_registry::Registry::open(&ferrotune_registry::default_home())?;
    let (key, _) = ferrotune_registry::artifacts::content_key(&out)?;
    let existing = reg
        .versions(REGISTERED_NAME)?
        .into_iter()
        .find(|v| v.artifact == key);
    let newly_registered = existing.is_none();
    let registered = match existing {
        Some(v) => v,
        None => reg.register(&ferrotune_registry::RegisterRequest {
            path: out.clone(),
            name: Some(REGISTERED_NAME.into()),
            description:
                "ferrotune run: the bundled tiny model fine-tuned on the bundled ultrachat sample"
                    .into(),
            ..Default::default()
        })?,
    };
    Ok(Published {
        export: out,
        verified: report.checkpoint,
        registered,
        newly_registered,
    })
}

/// Greedy answers to [`QUESTIONS`] (and, given prepared data, the eval metrics on it).
fn answers(
    model_dir: &Path,
    adapter: Option<&Path>,
    eval_data: Option<&Path>,
) -> Result<(Vec<String>, Option<EvalMetrics>), Failure> {
    let device = candle_core::Device::Cpu;
    let mut loaded = load_model(
        model_dir.to_str().unwrap_or_default(),
        candle_core::DType::F32,
        &device,
    )?;
    if let Some(a) = adapter {
        ferrotune_model::peft::load_adapter(&mut loaded.model, a)?;
    }
    let metrics = match eval_data {
        Some(dir) => {
            let seqs = ferrotune_data::Prepared::open(dir)?.sequences()?;
            let pad = loaded.model.config().pad_token_id.unwrap_or(0);
            Some(evaluate(&loaded.model, &seqs, 8, pad)?)
        }
        None => None,
    };
    let answers = chat_answers(
        &loaded.model,
        &loaded.tokenizer_dir,
        &loaded.stop_ids,
        &QUESTIONS,
        24,
    )?;
    Ok((answers, metrics))
}
