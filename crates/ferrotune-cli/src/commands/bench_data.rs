//! `ferrotune bench data`: rows/s and tokens/s of `data prepare` against the Python reference
//! (transformers' apply_chat_template + assistant mask), on the same input, in one run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ferrotune_data::{OnBadRow, PrepareOptions, Prepared};
use serde::Deserialize;
use serde_json::json;

use crate::assets;
use crate::cli::BenchDataArgs;
use crate::commands::data::{run_prepare, thousands};
use crate::failure::Failure;

#[derive(Deserialize)]
struct ReferenceResult {
    rows: u64,
    tokens: u64,
    trainable_tokens: u64,
    seconds: f64,
    import_seconds: f64,
}

pub fn run(args: &BenchDataArgs, json_out: bool) -> Result<(), Failure> {
    if args.rows == 0 || args.merge == 0 {
        return Err(Failure::usage("--rows and --merge must be at least 1"));
    }
    let work = BenchDir::create()?;
    let tokenizer = match &args.tokenizer {
        Some(dir) => dir.clone(),
        None => {
            let dir = work.0.join("tokenizer");
            assets::materialise(&dir, &assets::TOKENIZER).map_err(io_failure)?;
            dir
        }
    };
    let input = work.0.join("bench.jsonl");
    write_bench_input(&input, args.rows, args.merge)?;

    let opts = PrepareOptions {
        input: input.clone(),
        split: None,
        tokenizer: tokenizer.clone(),
        out: work.0.join("prepared"),
        split_pc: None,
        max_seq_length: 1 << 20,
        pack: false,
        on_bad_row: OnBadRow::Fail,
        force: true,
    };
    let started = Instant::now();
    let outcome = run_prepare(&opts, !json_out)?;
    let wall = started.elapsed().as_secs_f64();
    let m = outcome.manifest();
    let ours = json!({
        "rows": m.stats.rows_read, "tokens": m.stats.tokens, "seconds": wall,
        "rows_per_second": m.stats.rows_read as f64 / wall,
        "tokens_per_second": m.stats.tokens as f64 / wall,
        "threads": m.build.threads, "fast_encoder": m.build.fast_encoder,
    });

    let reference = if args.no_reference {
        None
    } else {
        let r = run_reference(args, &tokenizer, &input, &work.0)?;
        check_same_tokens(&opts.out, &r)?;
        Some(r)
    };
    let ratio = reference.as_ref().map(|r| {
        let ours_rate = m.stats.tokens as f64 / wall;
        ours_rate / (r.tokens as f64 / r.seconds)
    });
    if json_out {
        let reference = reference.as_ref().map(|r| {
            json!({
                "rows": r.rows, "tokens": r.tokens, "seconds": r.seconds,
                "import_seconds": r.import_seconds,
                "rows_per_second": r.rows as f64 / r.seconds,
                "tokens_per_second": r.tokens as f64 / r.seconds,
            })
        });
        println!(
            "{}",
            json!({"ferrotune": ours, "reference": reference, "speedup_tokens_per_second": ratio})
        );
        return Ok(());
    }
    println!(
        "input      {} conversations, {} tokens ({:.0} tokens/conversation)",
        thousands(m.stats.rows_read),
        thousands(m.stats.tokens),
        m.stats.tokens as f64 / m.stats.rows_read.max(1) as f64
    );
    println!(
        "ferrotune  {:>9} rows/s  {:>11} tokens/s  ({:.2} s end to end, {} threads)",
        thousands((m.stats.rows_read as f64 / wall) as u64),
        thousands((m.stats.tokens as f64 / wall) as u64),
        wall,
        m.build.threads
    );
    if let (Some(r), Some(ratio)) = (&reference, ratio) {
        println!(
            "reference  {:>9} rows/s  {:>11} tokens/s  ({:.2} s for {} rows, after {:.1} s of imports)",
            thousands((r.rows as f64 / r.seconds) as u64),
            thousands((r.tokens as f64 / r.seconds) as u64),
            r.seconds,
            thousands(r.rows),
            r.import_seconds
        );
        println!("speedup    {ratio:.1}x tokens/s (same tokens and labels on the {} rows both processed)", thousands(r.rows));
    }
    Ok(())
}

fn run_reference(
    args: &BenchDataArgs,
    tokenizer: &Path,
    input: &Path,
    work: &Path,
) -> Result<ReferenceResult, Failure> {
    let script = work.join("bench_data_reference.py");
    std::fs::write(&script, assets::BENCH_DATA_REFERENCE).map_err(io_failure)?;
    tracing::info!(
        "running the Python reference on {} rows ({})",
        args.reference_rows,
        args.python
    );
    let output = Command::new(&args.python)
        .arg(&script)
        .arg("--tokenizer")
        .arg(tokenizer)
        .arg("--input")
        .arg(input)
        .arg("--rows")
        .arg(args.reference_rows.min(args.rows).to_string())
        .output()
        .map_err(|e| {
            Failure::usage(format!(
                "cannot start {} for the reference ({e}); install Python with `pip install transformers`, pass --python, or use --no-reference",
                args.python
            ))
        })?;
    if !output.status.success() {
        return Err(Failure::usage(format!(
            "the Python reference failed (is transformers installed? `pip install transformers`, or use --no-reference):\n{}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .map_err(|e| Failure::runtime(format!("unreadable reference output ({e}): {stdout}")))
}

/// The rows both sides processed must have the same token and trained-token counts.
fn check_same_tokens(prepared: &Path, r: &ReferenceResult) -> Result<(), Failure> {
    let data = Prepared::open(prepared)?;
    let (mut tokens, mut trainable) = (0u64, 0u64);
    for doc in data.documents().take(r.rows as usize) {
        let doc = doc?;
        tokens += doc.ids.len() as u64;
        trainable += doc.trainable.iter().filter(|&&t| t).count() as u64;
    }
    if (tokens, trainable) != (r.tokens, r.trainable_tokens) {
        return Err(Failure::runtime(format!(
            "ferrotune and the reference disagree on the first {} rows: {tokens} vs {} tokens, {trainable} vs {} trained",
            r.rows, r.tokens, r.trainable_tokens
        )));
    }
    Ok(())
}

/// Benchmark conversations: `merge` bundled sample conversations joined into one, each
/// assistant turn followed by a sentence drawn from a 30,000-word synthetic lexicon with a
/// Zipf-like skew, so lengths (~1k tokens) and vocabulary spread resemble ultrachat's rather
/// than the tiny sample's.
fn write_bench_input(path: &Path, rows: usize, merge: usize) -> Result<(), Failure> {
    let sample: Vec<serde_json::Value> = std::str::from_utf8(assets::SAMPLE_JSONL[0].1)
        .expect("bundled sample is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("bundled sample is valid JSON"))
        .collect();
    let lexicon = Lexicon::new(30_000);
    let mut rng = SplitMix(0x5eed);
    let file = std::fs::File::create(path).map_err(io_failure)?;
    let mut w = std::io::BufWriter::new(file);
    for row in 0..rows {
        let mut messages = Vec::new();
        for k in 0..merge {
            let conv = &sample[(row * merge + k) % sample.len()];
            for m in conv["messages"]
                .as_array()
                .expect("sample rows have messages")
            {
                let mut m = m.clone();
                if m["role"] == "assistant" {
                    let words = 40 + rng.below(60);
                    let extra = lexicon.sentence(&mut rng, words);
                    let content = format!("{} {extra}", m["content"].as_str().unwrap_or_default());
                    m["content"] = content.into();
                }
                messages.push(m);
            }
        }
        let line = json!({"prompt": messages[0]["content"], "prompt_id": format!("bench-{row}"), "messages": messages});
        writeln!(w, "{line}").map_err(io_failure)?;
    }
    w.flush().map_err(io_failure)
}

struct Lexicon(Vec<String>);

impl Lexicon {
    fn new(size: usize) -> Lexicon {
        const SYL: [&str; 24] = [
            "ka", "ro", "mi", "tel", "sun", "var", "po", "li", "den", "qua", "zor", "ni", "bel",
            "tra", "ox", "fin", "gu", "hal", "es", "ur", "ship", "ment", "ing", "ly",
        ];
        let mut rng = SplitMix(7);
        Lexicon(
            (0..size)
                .map(|_| {
                    let n = 1 + rng.below(4);
                    (0..n).map(|_| SYL[rng.below(SYL.len())]).collect()
                })
                .collect(),
        )
    }

    fn sentence(&self, rng: &mut SplitMix, words: usize) -> String {
        let mut s = String::new();
        for i in 0..words {
            // u^3 skews towards the head of the lexicon, giving a long-tailed word distribution.
            let u = rng.unit();
            let w = &self.0[((u * u * u) * self.0.len() as f64) as usize];
            if i > 0 {
                s.push(if rng.below(12) == 0 { ',' } else { ' ' });
                if s.ends_with(',') {
                    s.push(' ');
                }
            }
            s.push_str(w);
        }
        s.push('.');
        s
    }
}

/// splitmix64: a tiny deterministic generator (the benchmark input must not depend on a crate).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A temporary folder removed when the benchmark ends.
struct BenchDir(PathBuf);

impl BenchDir {
    fn create() -> Result<BenchDir, Failure> {
        let dir = std::env::temp_dir().join(format!("ferrotune-bench-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io_failure)?;
        Ok(BenchDir(dir))
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io_failure(e: std::io::Error) -> Failure {
    Failure::runtime(format!("bench data: {e}"))
}
