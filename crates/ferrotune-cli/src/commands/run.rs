//! `ferrotune run`: the whole pipeline. Without --config it runs on the bundled sample and
//! tokenizer; today the pipeline is data preparation (training, export, serving join it as they
//! land).

use std::path::Path;

use ferrotune_data::{OnBadRow, PrepareOptions};
use serde_json::json;

use crate::assets;
use crate::cli::RunArgs;
use crate::commands::data::{run_prepare, stats_text};
use crate::failure::Failure;

pub fn run(args: &RunArgs, json: bool) -> Result<(), Failure> {
    if let Some(config) = &args.config {
        return Err(Failure::usage(format!(
            "--config {}: pipeline configs arrive with `ferrotune train` ([train]); run without --config for the embedded default",
            config.display()
        )));
    }
    let work = &args.workdir;
    let tokenizer = work.join("assets/tokenizer");
    let sample = work.join("assets/ultrachat_sample");
    let written = |e: std::io::Error| {
        Failure::runtime(format!(
            "writing bundled assets under {}: {e}",
            work.display()
        ))
    };
    assets::materialise(&tokenizer, &assets::TOKENIZER).map_err(written)?;
    assets::materialise(&sample, &assets::SAMPLE_JSONL).map_err(written)?;

    let mut report = Vec::new();
    for (split, name) in [("train_sft", "train"), ("test_sft", "validation")] {
        let out = work.join("data").join(name);
        let opts = PrepareOptions {
            input: sample.clone(),
            split: Some(split.to_string()),
            tokenizer: tokenizer.clone(),
            out: out.clone(),
            split_pc: None,
            max_seq_length: 4096,
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
        report.push((name, out, hit, outcome.manifest().clone()));
    }
    if json {
        let stages: Vec<_> = report
            .iter()
            .map(|(name, out, hit, m)| json!({"stage": "data", "split": name, "out": out, "cache_hit": hit, "stats": m.stats}))
            .collect();
        println!("{}", json!({"workdir": work, "stages": stages}));
    } else {
        println!("ferrotune run (embedded default) in {}", display(work));
        for (name, out, _, m) in &report {
            println!("\n[{name}]");
            print!("{}", stats_text(out, m));
        }
        println!(
            "\nnext: `ferrotune data inspect --data {} --row 0` shows the trained tokens",
            display(&work.join("data/train"))
        );
    }
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
