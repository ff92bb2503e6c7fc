//! The `ferrotune` binary as a user drives it: data prepare / inspect / stats, run, exit codes.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::str::contains;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tokenizer() -> PathBuf {
    fixtures().join("tokenizer/phi3")
}

fn ferrotune() -> Command {
    let mut cmd = Command::cargo_bin("ferrotune").unwrap();
    cmd.env_remove("NO_COLOR").env("FERROTUNE_LOG", "info");
    cmd
}

fn prepare(
    input: &Path,
    split: Option<&str>,
    out: &Path,
    extra: &[&str],
) -> assert_cmd::assert::Assert {
    let mut cmd = ferrotune();
    cmd.args(["data", "prepare", "--input"]).arg(input);
    if let Some(split) = split {
        cmd.args(["--split", split]);
    }
    cmd.arg("--tokenizer")
        .arg(tokenizer())
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd.assert()
}

fn json_of(cmd: &mut Command) -> Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stats(dir: &Path) -> Value {
    json_of(
        ferrotune()
            .args(["--json", "data", "stats", "--data"])
            .arg(dir),
    )
}

fn inspect(dir: &Path, row: u64) -> Value {
    json_of(
        ferrotune()
            .args(["--json", "data", "inspect", "--data"])
            .arg(dir)
            .args(["--row", &row.to_string()]),
    )
}

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("data/phi3_chat_reference.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["name"] == name)
        .unwrap()
}

#[test]
fn parquet_and_jsonl_layouts_give_the_same_tokens_as_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let (pq, js) = (tmp.path().join("pq"), tmp.path().join("js"));
    prepare(
        &fixtures().join("ultrachat_sample/hf"),
        Some("train_sft"),
        &pq,
        &[],
    )
    .success();
    prepare(
        &fixtures().join("ultrachat_sample/jsonl"),
        Some("train_sft"),
        &js,
        &[],
    )
    .success();
    let (a, b) = (stats(&pq), stats(&js));
    assert_eq!(a["stats"]["rows_kept"], 480);
    assert_eq!(a["stats"], b["stats"]);
    assert_eq!(a["input"]["format"], "parquet");
    assert_eq!(b["input"]["format"], "jsonl");
    for row in [0, 7, 15] {
        let (x, y) = (inspect(&pq, row), inspect(&js, row));
        assert_eq!(x["input_ids"], y["input_ids"]);
        let r = reference(&format!("sample_row_{row}"));
        assert_eq!(x["input_ids"], r["input_ids"], "row {row}");
        assert_eq!(x["labels"], r["labels"], "row {row}");
    }
}

#[test]
fn split_pc_keeps_the_rows_datasets_keeps() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("five");
    prepare(
        &fixtures().join("ultrachat_sample/hf"),
        Some("train_sft"),
        &out,
        &["--split-pc", "5"],
    )
    .success();
    let s = stats(&out);
    assert_eq!(s["input"]["total_rows"], 480);
    assert_eq!(s["input"]["selected_rows"], 24); // round(480 * 5 / 100)
    assert_eq!(s["stats"]["rows_read"], 24);
    prepare(
        &fixtures().join("ultrachat_sample/hf"),
        Some("train_sft"),
        &out,
        &["--split-pc", "0"],
    )
    .code(2)
    .stderr(contains("--split-pc 0"));
}

#[test]
fn a_second_prepare_is_a_cache_hit_and_any_change_rebuilds() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("train_sft.jsonl");
    std::fs::copy(
        fixtures().join("ultrachat_sample/jsonl/train_sft.jsonl"),
        &input,
    )
    .unwrap();
    let out = tmp.path().join("out");
    prepare(&input, None, &out, &[])
        .success()
        .stderr(contains("prepared"));
    let key = stats(&out)["build"].clone();
    prepare(&input, None, &out, &[])
        .success()
        .stderr(contains("cache hit"));
    assert_eq!(
        stats(&out)["build"],
        key,
        "a cache hit leaves the folder untouched"
    );
    prepare(&input, None, &out, &["--max-seq-length", "32"])
        .success()
        .stderr(contains("prepared"));
    assert!(stats(&out)["stats"]["truncated_rows"].as_u64().unwrap() > 0);
    // Same options again: hit. Then edit the data: rebuild.
    prepare(&input, None, &out, &["--max-seq-length", "32"])
        .success()
        .stderr(contains("cache hit"));
    let mut text = std::fs::read_to_string(&input).unwrap();
    let first_row = text.lines().next().unwrap().to_owned();
    text.push_str(&first_row);
    text.push('\n');
    std::fs::write(&input, text).unwrap();
    prepare(&input, None, &out, &["--max-seq-length", "32"])
        .success()
        .stderr(contains("prepared"));
    assert_eq!(stats(&out)["stats"]["rows_read"], 481);
    prepare(&input, None, &out, &["--max-seq-length", "32", "--force"])
        .success()
        .stderr(contains("prepared"));
}

fn bad_jsonl(dir: &Path) -> PathBuf {
    let path = dir.join("bad.jsonl");
    let good = r#"{"prompt": "a", "prompt_id": "1", "messages": [{"content": "Hi", "role": "user"}, {"content": "Hello.", "role": "assistant"}]}"#;
    let lines = [
        good,
        "{not json",
        r#"{"prompt": "b"}"#,
        r#"{"messages": [{"content": "Hi", "role": "robot"}, {"content": "x", "role": "assistant"}]}"#,
        r#"{"messages": []}"#,
        r#"{"messages": [{"content": "only user", "role": "user"}]}"#,
        r#"{"messages": [{"content": 12, "role": "user"}, {"content": "x", "role": "assistant"}]}"#,
        "",
        good,
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn bad_rows_are_skipped_and_counted_by_reason_with_locations() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    prepare(&bad_jsonl(tmp.path()), None, &out, &[]).success();
    let s = stats(&out)["stats"].clone();
    assert_eq!(s["rows_read"], 8);
    assert_eq!(s["rows_kept"], 2);
    for reason in [
        "invalid_json",
        "missing_field",
        "unknown_role",
        "empty_conversation",
        "no_assistant_turn",
        "wrong_type",
    ] {
        assert_eq!(s["dropped"][reason], 1, "{reason}");
    }
    let first = &s["dropped_examples"][0];
    assert_eq!(first["reason"], "invalid_json");
    assert_eq!(first["location"]["row"], 2);
    ferrotune()
        .args(["data", "stats", "--data"])
        .arg(&out)
        .assert()
        .success()
        .stdout(contains("bad.jsonl:4: unknown_role"));
}

#[test]
fn on_bad_row_fail_stops_at_the_first_with_exit_2_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    prepare(
        &bad_jsonl(tmp.path()),
        None,
        &out,
        &["--on-bad-row", "fail"],
    )
    .code(2)
    .stderr(contains("bad.jsonl:2"))
    .stderr(contains("invalid_json"));
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "only the input remains: {leftovers:?}");
}

#[test]
fn parquet_rows_with_nulls_are_bad_rows_and_a_wrong_schema_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    prepare(
        &fixtures().join("data/bad_rows"),
        Some("train_sft"),
        &out,
        &[],
    )
    .success();
    let s = stats(&out)["stats"].clone();
    assert_eq!(s["rows_kept"], 2);
    assert_eq!(s["dropped"]["missing_field"], 3);
    assert_eq!(s["dropped"]["unknown_role"], 1);
    prepare(
        &fixtures().join("data/wrong_schema.parquet"),
        None,
        &tmp.path().join("w"),
        &[],
    )
    .code(2)
    .stderr(contains("column `messages` has type Utf8"));
}

#[test]
fn truncation_inside_an_assistant_turn_keeps_the_reference_labels_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let r = reference("multi_turn");
    let messages = r["messages"].clone();
    let input = tmp.path().join("one.jsonl");
    std::fs::write(
        &input,
        serde_json::json!({"messages": messages}).to_string(),
    )
    .unwrap();
    let labels: Vec<i64> = serde_json::from_value(r["labels"].clone()).unwrap();
    // Cut two tokens into the second assistant turn.
    let starts: Vec<usize> = (1..labels.len())
        .filter(|&i| labels[i] != -100 && labels[i - 1] == -100)
        .collect();
    let cut = starts[1] + 2;
    let out = tmp.path().join("out");
    prepare(&input, None, &out, &["--max-seq-length", &cut.to_string()]).success();
    let got = inspect(&out, 0);
    let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    assert_eq!(got["input_ids"], serde_json::json!(ids[..cut]));
    assert_eq!(got["labels"], serde_json::json!(labels[..cut]));
    assert_eq!(stats(&out)["stats"]["truncated_rows"], 1);

    // Cut before the first assistant token: nothing to train, the row is dropped and counted.
    let out2 = tmp.path().join("out2");
    prepare(
        &input,
        None,
        &out2,
        &["--max-seq-length", &starts[0].to_string()],
    )
    .code(2)
    .stderr(contains("no usable rows"))
    .stderr(contains("no_trainable_tokens_after_truncation"));
}

#[test]
fn packing_keeps_every_conversation_whole_and_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, packed) = (tmp.path().join("plain"), tmp.path().join("packed"));
    let input = fixtures().join("ultrachat_sample/jsonl/test_sft.jsonl");
    prepare(&input, None, &plain, &["--max-seq-length", "128"]).success();
    prepare(
        &input,
        None,
        &packed,
        &["--max-seq-length", "128", "--pack"],
    )
    .success();
    let (a, b) = (
        stats(&plain)["stats"].clone(),
        stats(&packed)["stats"].clone(),
    );
    assert_eq!(a["tokens"], b["tokens"]);
    assert_eq!(a["trainable_tokens"], b["trainable_tokens"]);
    assert!(b["sequences"].as_u64().unwrap() < a["sequences"].as_u64().unwrap() / 2);
    assert!(b["sequence_tokens"]["max"].as_u64().unwrap() <= 128);
    for row in [0, 10, 59] {
        assert_eq!(
            inspect(&plain, row)["input_ids"],
            inspect(&packed, row)["input_ids"]
        );
    }
}

#[test]
fn inspect_marks_exactly_the_trained_span() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let input = tmp.path().join("one.jsonl");
    std::fs::write(
        &input,
        r#"{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]}"#,
    )
    .unwrap();
    prepare(&input, None, &out, &[]).success();
    ferrotune()
        .args(["data", "inspect", "--data"])
        .arg(&out)
        .assert()
        .success()
        .stdout(contains(
            "<|user|> What is 2 + 2?<|end|><|assistant|>⟦ 2 + 2 = 4.<|end|>⟧<|endoftext|>",
        ));
    ferrotune()
        .args(["data", "inspect", "--row", "5", "--data"])
        .arg(&out)
        .assert()
        .code(2)
        .stderr(contains("holds 1 conversations"));
}

#[test]
fn an_existing_folder_that_is_not_ours_is_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("thesis.tex"), "precious").unwrap();
    prepare(
        &fixtures().join("ultrachat_sample/jsonl/test_sft.jsonl"),
        None,
        &out,
        &[],
    )
    .code(2)
    .stderr(contains("not a ferrotune prepared folder"));
    assert_eq!(
        std::fs::read_to_string(out.join("thesis.tex")).unwrap(),
        "precious"
    );
}

#[test]
fn staging_left_by_a_killed_run_is_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // A pid that cannot be running (above the kernel's pid_max ceiling).
    let stale = tmp.path().join(".out.tmp-4194305");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("shard-00000.safetensors"), "half written").unwrap();
    prepare(
        &fixtures().join("ultrachat_sample/jsonl/test_sft.jsonl"),
        None,
        &out,
        &[],
    )
    .success();
    assert!(!stale.exists());
    assert!(out.join("manifest.json").is_file());
}

#[test]
fn missing_inputs_are_usage_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    prepare(&tmp.path().join("nope"), Some("train_sft"), &out, &[])
        .code(2)
        .stderr(contains("does not exist"));
    prepare(
        &fixtures().join("ultrachat_sample/hf"),
        Some("train_gen"),
        &out,
        &[],
    )
    .code(2)
    .stderr(contains("splits found: test_sft, train_sft"));
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    prepare(&empty, None, &out, &[])
        .code(2)
        .stderr(contains("has 0 rows"));
    ferrotune()
        .args(["data", "prepare", "--input"])
        .arg(fixtures().join("ultrachat_sample/hf"))
        .args(["--split", "train_sft", "--tokenizer"])
        .arg(tmp.path())
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(contains("tokenizer.json: not found"));
    ferrotune()
        .args(["data", "stats", "--data"])
        .arg(tmp.path())
        .assert()
        .code(2)
        .stderr(contains("ferrotune data prepare"));
}

#[test]
fn commands_without_what_they_need_exit_2() {
    ferrotune()
        .args(["bench", "decode", "--new-tokens", "1"])
        .assert()
        .code(2)
        .stderr(contains("--new-tokens ≥ 2"));
    ferrotune()
        .args(["serve"])
        .assert()
        .code(2)
        .stderr(contains("nothing to serve"));
    ferrotune()
        .args(["serve", "--path", ".", "--host", "0.0.0.0"])
        .assert()
        .code(2)
        .stderr(contains("refusing to serve without a key"));
    ferrotune().args(["data", "prepare"]).assert().code(2);
}

#[test]
fn environment_variables_fill_flags_and_flags_win() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    ferrotune()
        .env("FERROTUNE_TOKENIZER", tokenizer())
        .env("FERROTUNE_MAX_SEQ_LENGTH", "16")
        .args(["data", "prepare", "--input"])
        .arg(fixtures().join("ultrachat_sample/jsonl/test_sft.jsonl"))
        .arg("--out")
        .arg(&out)
        .args(["--max-seq-length", "24"])
        .assert()
        .success();
    assert_eq!(stats(&out)["options"]["max_seq_length"], 24);
}
