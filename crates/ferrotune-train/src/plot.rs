//! The end-of-run picture: train and eval loss over steps, and the learning rate below it, as
//! one self-contained SVG (opens in any browser; no fonts or native libraries needed).

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Result, TrainError};
use crate::metrics::Record;

pub const PLOT_FILE: &str = "loss.svg";

const W: f64 = 720.0;
const PANEL_H: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const GAP: f64 = 44.0;

/// Draw `records` into `path` (written atomically).
pub fn write(records: &[Record], title: &str, path: &Path) -> Result<()> {
    let mut train = Vec::new();
    let mut eval = Vec::new();
    let mut lr = Vec::new();
    for r in records {
        match r {
            Record::Train(t) => {
                if t.loss.is_finite() {
                    train.push((t.step as f64, t.loss));
                }
                lr.push((t.step as f64, t.learning_rate));
            }
            Record::Eval(e) if e.eval_loss.is_finite() => eval.push((e.step as f64, e.eval_loss)),
            Record::Eval(_) => {}
        }
    }
    let max_step = records.iter().map(|r| r.step()).max().unwrap_or(1).max(1) as f64;
    let height = TOP + 2.0 * PANEL_H + GAP + 30.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="18" font-size="13">{}</text>
"#,
        escape(title)
    );
    let loss_values: Vec<f64> = train.iter().chain(&eval).map(|p| p.1).collect();
    panel(
        &mut svg,
        TOP,
        "loss",
        max_step,
        &loss_values,
        &[("train", "#1f77b4", &train), ("eval", "#d62728", &eval)],
    );
    let lr_values: Vec<f64> = lr.iter().map(|p| p.1).collect();
    panel(
        &mut svg,
        TOP + PANEL_H + GAP,
        "learning rate",
        max_step,
        &lr_values,
        &[("lr", "#2ca02c", &lr)],
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">optimizer step</text></svg>"#,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        height - 6.0
    );
    let tmp = path.with_extension("svg.tmp");
    std::fs::write(&tmp, svg).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

type Series<'a> = (&'a str, &'a str, &'a Vec<(f64, f64)>);

fn panel(
    svg: &mut String,
    top: f64,
    label: &str,
    max_step: f64,
    values: &[f64],
    series: &[Series],
) {
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + lo.abs().max(1e-12) * 0.1 + 1e-12;
    }
    let pad = (hi - lo) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);
    let plot_w = W - LEFT - RIGHT;
    let x = |s: f64| LEFT + s / max_step * plot_w;
    let y = |v: f64| top + PANEL_H - (v - lo) / (hi - lo) * PANEL_H;
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let v = lo + (hi - lo) * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 4.0,
            y(v) + 4.0,
            tick(v),
            y = y(v)
        );
    }
    for i in 0..=5 {
        let s = max_step * i as f64 / 5.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(s),
            top + PANEL_H + 14.0,
            s.round()
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}">{}</text>"#,
        LEFT + 6.0,
        top + 14.0,
        escape(label)
    );
    for (i, (name, color, points)) in series.iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let path: Vec<String> = points
            .iter()
            .map(|&(s, v)| format!("{:.1},{:.1}", x(s), y(v)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
            path.join(" ")
        );
        if points.len() <= 60 {
            for &(s, v) in points.iter() {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="2.2" fill="{color}"/>"#,
                    x(s),
                    y(v)
                );
            }
        }
        let lx = W - RIGHT - 90.0;
        let ly = top + 14.0 + 14.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="{color}" stroke-width="2"/><text x="{}" y="{ly}">{}</text>"#,
            lx + 16.0,
            ly - 4.0,
            ly - 4.0,
            lx + 20.0,
            escape(name)
        );
    }
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{EvalRecord, TrainRecord};

    #[test]
    fn plots_train_eval_and_lr_series() {
        let mut records = Vec::new();
        for step in 1..=5u64 {
            records.push(Record::Train(TrainRecord {
                step,
                epoch: 0.0,
                loss: 3.0 - step as f64 * 0.1,
                learning_rate: 1e-4,
                grad_norm: 1.0,
                tokens_per_s: 1.0,
                tokens_seen: 0,
                elapsed_s: 0.0,
                loss_scale: None,
                skipped_steps: 0,
            }));
        }
        records.push(Record::Eval(EvalRecord {
            step: 5,
            epoch: 0.0,
            eval_loss: 2.7,
            eval_perplexity: 14.9,
            eval_accuracy: 0.1,
            eval_tokens: 10,
            eval_s: 0.1,
        }));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PLOT_FILE);
        write(&records, "run <1>", &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("run &lt;1&gt;") && svg.ends_with("</svg>\n"));
    }
}
