//! `ferrotune export`: a checkpoint as an MLflow model folder or a PEFT adapter; `--verify`.

use ferrotune_export::{export, verify, ExportOptions, ExportReport, Mode, VerifyReport};
use ferrotune_model::loaded::parse_dtype;
use serde_json::json;

use crate::cli::ExportArgs;
use crate::failure::Failure;
use crate::progress::RowBar;

pub fn run(args: &ExportArgs, json_out: bool) -> Result<(), Failure> {
    if let Some(dir) = &args.verify {
        let report = verify(dir, args.checkpoint.as_deref(), args.base_model.as_deref())?;
        print_verify(&report, json_out);
        return Ok(());
    }
    let opts = options(args)?;
    let report = run_export(&opts, !json_out)?;
    if json_out {
        println!("{}", json!(report));
    } else {
        print_export(&report);
    }
    Ok(())
}

/// Flags → options (sizes and dtypes parsed, the git commit of this build filled in).
pub fn options(args: &ExportArgs) -> Result<ExportOptions, Failure> {
    let dtype =
        match args.dtype.as_deref() {
            None => None,
            Some(name) => Some(parse_dtype(name).ok_or_else(|| {
                Failure::usage(format!("--dtype {name}: expected bf16, f16 or f32"))
            })?),
        };
    Ok(ExportOptions {
        checkpoint: args.checkpoint.clone().expect("clap requires --checkpoint"),
        out: args.out.clone().expect("clap requires --out"),
        mode: if args.adapter_only {
            Mode::AdapterOnly
        } else {
            Mode::Merged
        },
        dtype,
        task: args.task.clone(),
        force: args.force,
        max_shard_bytes: parse_size(&args.max_shard_size).ok_or_else(|| {
            Failure::usage(format!(
                "--max-shard-size {}: expected a size such as 500MB, 5GB, 2GiB or a number of bytes",
                args.max_shard_size
            ))
        })?,
        base_model: args.base_model.clone(),
        git_commit: Some(env!("FERROTUNE_GIT_COMMIT").to_string()),
    })
}

/// Export with a tensor progress bar on a terminal.
pub fn run_export(opts: &ExportOptions, bar: bool) -> Result<ExportReport, Failure> {
    let bar = RowBar::counting(bar, "tensors");
    let report = export(opts, &mut |done, total| bar.tick(done, total));
    bar.finish();
    Ok(report?)
}

/// `500MB`, `5GB`, `2GiB`, `1000` (bytes), as transformers and MLflow read sizes.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().ok()?;
    let factor: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = n * factor;
    (bytes >= 1.0).then_some(bytes as u64)
}

fn print_export(r: &ExportReport) {
    let what = match r.mode {
        Mode::Merged => "MLflow model folder (adapter merged)",
        Mode::AdapterOnly => "PEFT adapter with a model card",
    };
    println!("exported {} to {}", what, r.out.display());
    println!(
        "  {} tensors in {} file(s), {:.1} MB of {} weights; folder {:.1} MB; {:.1} s",
        r.tensors,
        r.weight_files.len(),
        r.weight_bytes as f64 / 1e6,
        r.dtype,
        r.folder_bytes as f64 / 1e6,
        r.seconds
    );
    let l = &r.lineage;
    println!(
        "  from {} (step {}), base {}",
        l.checkpoint.as_deref().unwrap_or("?"),
        l.step.map_or_else(|| "?".into(), |s| s.to_string()),
        l.base_model
    );
    println!(
        "next: `ferrotune export --verify {}`; load it with mlflow.pyfunc.load_model or `ferrotune generate --model {}`",
        r.out.display(),
        r.out.display()
    );
}

fn print_verify(r: &VerifyReport, json_out: bool) {
    if json_out {
        println!("{}", json!(r));
        return;
    }
    println!(
        "{}: ok ({} folder, {} tensors in {}, complete and loadable)",
        r.dir.display(),
        r.kind,
        r.tensors,
        r.dtype
    );
    println!(
        "  greedy answers equal the checkpoint's ({}) on {} prompts, {} new tokens each",
        r.checkpoint.display(),
        r.answers.len(),
        ferrotune_export::verify::NEW_TOKENS
    );
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_as_transformers_reads_them() {
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("1.5 kb"), Some(1500));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("0"), None);
    }
}
