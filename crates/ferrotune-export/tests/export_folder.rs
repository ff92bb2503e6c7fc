//! `ferrotune export` on the tiny chat fixture with a random adapter: the folder has the layout
//! `mlflow.transformers.save_model` writes (compared with the committed reference made by
//! scripts/make_mlflow_reference.py), the merged weights are the checkpoint's, sharding, adapter
//! exports, atomic output and `--verify`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ferrotune_export::{export, verify, ExportOptions, Mode, DEFAULT_MAX_SHARD_BYTES};
use ferrotune_model::loaded::load_model;
use ferrotune_model::lora::LoraConfig;
use ferrotune_model::mask::AttentionLayout;
use ferrotune_model::{peft, Batch};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn base() -> PathBuf {
    fixtures().join("models/tiny_phi3_chat")
}

fn reference() -> PathBuf {
    fixtures().join("export/mlflow_transformers_reference")
}

/// A PEFT adapter on the tiny chat model with non-zero B (so merging changes the weights).
fn adapter(dir: &Path, b_std: f64) {
    let mut loaded = load_model(base().to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..Default::default()
    };
    loaded.model.add_lora(&cfg, 7).unwrap();
    for (_, pair) in loaded.model.lora_pairs() {
        let b = pair.b.as_tensor();
        let noise = Tensor::randn(0f32, b_std as f32, b.dims(), &Device::Cpu).unwrap();
        pair.b.set(&noise).unwrap();
    }
    peft::save_adapter(&loaded.model, &cfg, base().to_str().unwrap(), dir).unwrap();
}

fn options(checkpoint: &Path, out: &Path) -> ExportOptions {
    ExportOptions {
        checkpoint: checkpoint.to_path_buf(),
        out: out.to_path_buf(),
        mode: Mode::Merged,
        dtype: None,
        task: "llm/v1/chat".into(),
        force: false,
        max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        base_model: None,
        git_commit: Some("abc123".into()),
    }
}

fn files_under(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn yaml(path: &Path) -> Value {
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Same keys at every level; values equal except where `free` names the path.
fn same_structure(
    ours: &Value,
    theirs: &Value,
    path: &str,
    free: &[&str],
    diffs: &mut Vec<String>,
) {
    if free.contains(&path) {
        return;
    }
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            let ka: BTreeSet<_> = a.keys().collect();
            let kb: BTreeSet<_> = b.keys().collect();
            if ka != kb {
                diffs.push(format!("{path}: keys {ka:?} vs {kb:?}"));
            }
            for k in ka.intersection(&kb) {
                same_structure(&a[*k], &b[*k], &format!("{path}.{k}"), free, diffs);
            }
        }
        (a, b) if a != b => diffs.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

fn logits(dir: &str, adapter: Option<&Path>) -> Tensor {
    let mut m = load_model(dir, DType::F32, &Device::Cpu).unwrap();
    if let Some(a) = adapter {
        peft::load_adapter(&mut m.model, a).unwrap();
    }
    let ids: Vec<u32> = (0..24).map(|i| (i * 997 + 13) % 32000).collect();
    let layout = AttentionLayout {
        padding: None,
        documents: None,
        sliding_window: m.model.config().sliding_window,
    };
    let batch = Batch {
        input_ids: Tensor::from_vec(ids, (1, 24), &Device::Cpu).unwrap(),
        positions: vec![(0..24).collect()],
        attention_bias: layout.bias(1, 24, &Device::Cpu).unwrap(),
    };
    m.model.logits(&batch, false).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_merged_export_has_mlflows_own_layout_and_mlmodel() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("adapter");
    adapter(&ckpt, 0.05);
    let out = tmp.path().join("mlflow_model");
    let report = export(&options(&ckpt, &out), &mut |_, _| {}).unwrap();
    assert_eq!(report.dtype, "bf16");

    // The same files as MLflow writes.
    let listing = json(&reference().join("listing.json"));
    let theirs: BTreeSet<String> = listing["files"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(files_under(&out), theirs);

    // The same tensors, dtypes and shapes.
    let header = |path: &Path| -> Value {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut h: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let obj = h.as_object_mut().unwrap();
        obj.remove("__metadata__");
        for v in obj.values_mut() {
            v.as_object_mut().unwrap().remove("data_offsets");
        }
        h
    };
    assert_eq!(
        header(&out.join("model/model.safetensors")),
        listing["files"]["model/model.safetensors"]["tensors"]
    );

    // MLmodel: every key MLflow writes, the same values except what names this export.
    let ours = yaml(&out.join("MLmodel"));
    let theirs = yaml(&reference().join("MLmodel"));
    let mut diffs = Vec::new();
    same_structure(
        &ours,
        &theirs,
        "",
        &[
            ".model_uuid",
            ".utc_time_created",
            ".model_size_bytes",
            ".flavors.transformers.source_model_name",
            ".metadata",
        ],
        &mut diffs,
    );
    assert!(
        diffs.is_empty(),
        "MLmodel differs from MLflow's: {diffs:#?}"
    );
    assert_eq!(ours["metadata"]["task"], theirs["metadata"]["task"]);
    let lineage = &ours["metadata"]["ferrotune"];
    assert_eq!(lineage["export_kind"], "merged");
    assert_eq!(lineage["git_commit"], "abc123");
    assert_eq!(lineage["lora_r"], 4);
    assert_eq!(ours["model_uuid"].as_str().unwrap().len(), 32);
    // model_size_bytes counts what MLflow counts: everything but MLmodel and the env files.
    let counted: u64 = files_under(&out)
        .iter()
        .filter(|f| {
            ![
                "MLmodel",
                "conda.yaml",
                "python_env.yaml",
                "requirements.txt",
            ]
            .contains(&f.as_str())
        })
        .map(|f| std::fs::metadata(out.join(f)).unwrap().len())
        .sum();
    assert_eq!(ours["model_size_bytes"].as_u64(), Some(counted));

    // Environment files and the model's config as MLflow and transformers write them.
    for f in ["conda.yaml", "python_env.yaml", "requirements.txt"] {
        assert_eq!(
            std::fs::read_to_string(out.join(f)).unwrap(),
            std::fs::read_to_string(reference().join(f)).unwrap(),
            "{f}"
        );
    }
    for f in ["model/config.json", "model/generation_config.json"] {
        assert_eq!(json(&out.join(f)), json(&reference().join(f)), "{f}");
    }
    let tok = json(&out.join("components/tokenizer/tokenizer_config.json"));
    let tok_ref = json(&reference().join("components/tokenizer/tokenizer_config.json"));
    for key in [
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "model_max_length",
    ] {
        assert_eq!(tok[key], tok_ref[key], "tokenizer_config.json {key}");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("components/tokenizer/chat_template.jinja")).unwrap(),
        std::fs::read_to_string(reference().join("components/tokenizer/chat_template.jinja"))
            .unwrap()
    );
}

#[test]
fn merged_weights_answer_as_the_checkpoint_does_and_shards_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("adapter");
    adapter(&ckpt, 0.05);
    let expected = logits(base().to_str().unwrap(), Some(&ckpt));
    let without = logits(base().to_str().unwrap(), None);

    let mut f32_opts = options(&ckpt, &tmp.path().join("f32"));
    f32_opts.dtype = Some(DType::F32);
    export(&f32_opts, &mut |_, _| {}).unwrap();
    let merged = logits(tmp.path().join("f32").to_str().unwrap(), None);
    // Folding the adapter into f32 weights only reorders float sums.
    let d = max_abs_diff(&merged, &expected);
    assert!(d < 1e-4, "f32 merged vs unmerged logits differ by {d}");
    assert!(
        max_abs_diff(&expected, &without) > 100.0 * d.max(1e-6),
        "the adapter changes the logits"
    );

    // Sharded at 20 kB: an index, several files, the same tensors.
    let mut sharded = options(&ckpt, &tmp.path().join("sharded"));
    sharded.dtype = Some(DType::F32);
    sharded.max_shard_bytes = 20_000;
    let report = export(&sharded, &mut |_, _| {}).unwrap();
    assert!(report.weight_files.len() > 2, "{:?}", report.weight_files);
    let index = json(
        &tmp.path()
            .join("sharded/model/model.safetensors.index.json"),
    );
    assert_eq!(
        index["weight_map"].as_object().unwrap().len(),
        report.tensors
    );
    let resharded = logits(tmp.path().join("sharded").to_str().unwrap(), None);
    assert_eq!(max_abs_diff(&resharded, &merged), 0.0);

    // bf16: the merged weights rounded once.
    export(&options(&ckpt, &tmp.path().join("bf16")), &mut |_, _| {}).unwrap();
    let bf16 = logits(tmp.path().join("bf16").to_str().unwrap(), None);
    let d = max_abs_diff(&bf16, &expected);
    assert!(d < 0.1, "bf16 merged vs unmerged logits differ by {d}");

    // --verify: complete, loadable, same greedy answers as the checkpoint.
    let report = verify(&tmp.path().join("f32"), None, None).unwrap();
    assert_eq!(report.kind, "mlflow");
    assert_eq!(report.dtype, "f32");
    assert!(report.answers.iter().all(|a| a.checkpoint == a.export));
    verify(&tmp.path().join("sharded"), Some(&ckpt), None).unwrap();
}

#[test]
fn verify_catches_an_export_that_is_not_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (strong, weak) = (tmp.path().join("strong"), tmp.path().join("weak"));
    adapter(&strong, 1.0);
    adapter(&weak, 0.0);
    let out = tmp.path().join("out");
    let mut opts = options(&strong, &out);
    opts.dtype = Some(DType::F32);
    export(&opts, &mut |_, _| {}).unwrap();
    let err = verify(&out, Some(&weak), None).unwrap_err();
    assert!(
        err.to_string().contains("differs from the checkpoint's"),
        "{err}"
    );

    // A tensor whose dtype disagrees with MLmodel.
    let mlmodel = out.join("MLmodel");
    let text = std::fs::read_to_string(&mlmodel).unwrap();
    std::fs::write(&mlmodel, text.replace("torch.float32", "torch.bfloat16")).unwrap();
    let err = verify(&out, Some(&strong), None).unwrap_err();
    assert!(
        err.to_string().contains("MLmodel says torch.bfloat16"),
        "{err}"
    );

    // A missing weight file.
    std::fs::remove_file(out.join("model/model.safetensors")).unwrap();
    std::fs::write(&mlmodel, text).unwrap();
    let err = verify(&out, Some(&strong), None).unwrap_err();
    assert!(err.is_usage());
    assert!(err.to_string().contains("no model.safetensors"), "{err}");
}

#[test]
fn adapter_only_exports_carry_a_model_card_and_load_back() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("adapter");
    adapter(&ckpt, 0.05);
    let out = tmp.path().join("card");
    let mut opts = options(&ckpt, &out);
    opts.mode = Mode::AdapterOnly;
    let report = export(&opts, &mut |_, _| {}).unwrap();
    assert_eq!(report.dtype, "f32");
    assert_eq!(
        files_under(&out),
        BTreeSet::from(
            [
                "README.md",
                "adapter_config.json",
                "adapter_model.safetensors",
                "ferrotune_lineage.json"
            ]
            .map(String::from)
        )
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nbase_model: "), "{card}");
    assert!(card.contains("library_name: peft"));
    assert!(card.contains("| rank r | 4 |"));
    assert_eq!(
        max_abs_diff(
            &logits(base().to_str().unwrap(), Some(&out)),
            &logits(base().to_str().unwrap(), Some(&ckpt))
        ),
        0.0
    );
    let report = verify(&out, None, None).unwrap();
    assert_eq!(report.kind, "adapter");
}

#[test]
fn outputs_appear_whole_and_are_never_overwritten_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("adapter");
    adapter(&ckpt, 0.05);
    let out = tmp.path().join("out");
    export(&options(&ckpt, &out), &mut |_, _| {}).unwrap();
    let uuid = yaml(&out.join("MLmodel"))["model_uuid"].clone();
    let err = export(&options(&ckpt, &out), &mut |_, _| {}).unwrap_err();
    assert!(
        err.is_usage() && err.to_string().contains("--force"),
        "{err}"
    );
    let mut forced = options(&ckpt, &out);
    forced.force = true;
    export(&forced, &mut |_, _| {}).unwrap();
    assert_ne!(yaml(&out.join("MLmodel"))["model_uuid"], uuid);

    // A failure mid-export (an adapter for another model) leaves nothing behind.
    let wrong = tmp.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    let mut cfg = json(&ckpt.join("adapter_config.json"));
    cfg["r"] = 3.into();
    std::fs::write(wrong.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        ckpt.join("adapter_model.safetensors"),
        wrong.join("adapter_model.safetensors"),
    )
    .unwrap();
    let before = files_under(tmp.path());
    let err = export(&options(&wrong, &tmp.path().join("never")), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("rank r=3"), "{err}");
    assert_eq!(files_under(tmp.path()), before);

    let err = export(
        &options(&tmp.path().join("nothing"), &tmp.path().join("x")),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(
        err.is_usage() && err.to_string().contains("no such folder"),
        "{err}"
    );
}
