//! `ferrotune data prepare | inspect | stats`.

use std::io::{IsTerminal, Write};
use std::path::Path;

use ferrotune_data::manifest::Manifest;
use ferrotune_data::{prepare as prepare_split, OnBadRow, Outcome, PrepareOptions, Prepared};
use serde_json::json;

use crate::cli::{BadRowPolicy, InspectArgs, PrepareArgs, StatsArgs};
use crate::failure::Failure;
use crate::progress::RowBar;

pub fn prepare(args: &PrepareArgs, json: bool) -> Result<(), Failure> {
    let opts = PrepareOptions {
        input: args.input.clone(),
        split: args.split.clone(),
        tokenizer: args.tokenizer.clone(),
        out: args.out.clone(),
        split_pc: args.split_pc,
        max_seq_length: args.max_seq_length,
        pack: args.pack,
        on_bad_row: match args.on_bad_row {
            BadRowPolicy::Skip => OnBadRow::Skip,
            BadRowPolicy::Fail => OnBadRow::Fail,
        },
        force: args.force,
    };
    let outcome = run_prepare(&opts, !json)?;
    report_prepare(&opts.out, &outcome, json);
    Ok(())
}

/// Prepare with a progress bar on a terminal.
pub fn run_prepare(opts: &PrepareOptions, show_progress: bool) -> Result<Outcome, Failure> {
    let bar = RowBar::new(show_progress);
    let outcome = prepare_split(opts, &bar);
    bar.finish();
    Ok(outcome?)
}

/// One line on stderr saying what happened, then the stats (text or JSON) on stdout.
pub fn report_prepare(out: &Path, outcome: &Outcome, json: bool) {
    let m = outcome.manifest();
    let cache_hit = matches!(outcome, Outcome::CacheHit(_));
    if cache_hit {
        tracing::info!(
            "cache hit: {} already holds this preparation (key {})",
            out.display(),
            &m.cache_key[..12]
        );
    } else {
        tracing::info!(
            "prepared {} in {:.2} s ({} rows/s, {} tokens/s)",
            out.display(),
            m.build.seconds,
            thousands(m.build.rows_per_second as u64),
            thousands(m.build.tokens_per_second as u64)
        );
    }
    if json {
        println!(
            "{}",
            json!({"out": out, "cache_hit": cache_hit, "cache_key": m.cache_key,
                   "stats": m.stats, "build": m.build, "shards": m.shards})
        );
    } else {
        print!("{}", stats_text(out, m));
    }
}

pub fn stats(args: &StatsArgs, json: bool) -> Result<(), Failure> {
    let prepared = Prepared::open(&args.data)?;
    let m = prepared.manifest();
    if json {
        println!(
            "{}",
            json!({"data": args.data, "input": m.input, "options": m.options,
                   "stats": m.stats, "build": m.build, "shards": m.shards})
        );
    } else {
        print!("{}", stats_text(&args.data, m));
    }
    Ok(())
}

/// The human summary of a prepared folder (the same numbers as the JSON output).
pub fn stats_text(dir: &Path, m: &Manifest) -> String {
    let s = &m.stats;
    let mut out = String::new();
    let split = m.input.split.as_deref().unwrap_or("file");
    let pc = m
        .options
        .split_pc
        .map_or(String::new(), |p| format!(", first {p}%"));
    out += &format!(
        "data       {}  ({split}, {}, {} of {} rows{pc})\n",
        dir.display(),
        m.input.format.as_str(),
        thousands(m.input.selected_rows),
        thousands(m.input.total_rows)
    );
    let dropped = if s.dropped.is_empty() {
        "0 dropped".to_string()
    } else {
        let by_reason: Vec<_> = s.dropped.iter().map(|(r, n)| format!("{n} {r}")).collect();
        format!("{} dropped ({})", s.dropped_total(), by_reason.join(", "))
    };
    out += &format!(
        "rows       {} read, {} kept, {dropped}, {} truncated\n",
        thousands(s.rows_read),
        thousands(s.rows_kept),
        thousands(s.truncated_rows)
    );
    let share = 100.0 * s.trainable_tokens as f64 / (s.tokens.max(1) as f64);
    out += &format!(
        "tokens     {} ({} trainable, {share:.1}%)\n",
        thousands(s.tokens),
        thousands(s.trainable_tokens)
    );
    out += &format!(
        "sequences  {} of at most {} tokens{}, {:.1}% full\n",
        thousands(s.sequences),
        m.options.max_seq_length,
        if m.options.pack { " (packed)" } else { "" },
        100.0 * s.fill_ratio
    );
    let p = &s.document_tokens;
    out += &format!(
        "length     min {}  p50 {}  p90 {}  p99 {}  max {}  mean {:.1} tokens/conversation\n",
        p.min, p.p50, p.p90, p.p99, p.max, p.mean
    );
    if m.options.pack {
        let q = &s.sequence_tokens;
        out += &format!(
            "packed     min {}  p50 {}  p90 {}  p99 {}  max {}  mean {:.1} tokens/sequence\n",
            q.min, q.p50, q.p90, q.p99, q.max, q.mean
        );
    }
    out += &format!(
        "built      {:.2} s, {} rows/s, {} tokens/s on {} threads\n",
        m.build.seconds,
        thousands(m.build.rows_per_second as u64),
        thousands(m.build.tokens_per_second as u64),
        m.build.threads
    );
    for bad in &s.dropped_examples {
        out += &format!(
            "  dropped  {}: {} ({})\n",
            bad.location, bad.reason, bad.detail
        );
    }
    out
}

pub fn inspect(args: &InspectArgs, json: bool) -> Result<(), Failure> {
    let prepared = Prepared::open(&args.data)?;
    let doc = prepared.document(args.row)?;
    let tokenizer = prepared.tokenizer()?;
    let segments = ferrotune_data::trained_segments(&tokenizer, &doc.ids, &doc.trainable)
        .map_err(|e| Failure::runtime(format!("decoding row {}: {e}", args.row)))?;
    let text: String = segments.iter().map(|(_, s)| s.as_str()).collect();
    if json {
        println!(
            "{}",
            json!({"row": doc.index, "source_row": doc.source_row, "input_ids": doc.ids,
                   "labels": doc.labels(), "text": text})
        );
        return Ok(());
    }
    let colour =
        std::io::stdout().is_terminal() && !args.no_color && std::env::var_os("NO_COLOR").is_none();
    let trained = doc.trainable.iter().filter(|&&t| t).count();
    let mut out = std::io::stdout().lock();
    let legend = if colour {
        "\x1b[1;32mgreen\x1b[0m = trained"
    } else {
        "⟦…⟧ = trained"
    };
    let _ = writeln!(
        out,
        "conversation {} (split row {}): {} tokens, {trained} trained; {legend}",
        doc.index,
        doc.source_row,
        doc.ids.len()
    );
    for (is_trained, piece) in &segments {
        let _ = match (is_trained, colour) {
            (true, true) => write!(out, "\x1b[1;32m{piece}\x1b[0m"),
            (true, false) => write!(out, "⟦{piece}⟧"),
            (false, _) => write!(out, "{piece}"),
        };
    }
    let _ = writeln!(out);
    Ok(())
}

/// 1234567 -> "1,234,567".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
