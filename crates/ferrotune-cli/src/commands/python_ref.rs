//! The benchmarks' Python side: one of the bundled reference scripts, run with the user's
//! interpreter, answering with JSON on its last line of output.

use std::process::Command;

use serde::de::DeserializeOwned;

use crate::failure::Failure;

/// Writes `source` to a temporary file, runs it with `python` (arguments from `configure`) and
/// reads its last stdout line as `T`. `what` names the reference, `needs` its packages.
pub fn run<T: DeserializeOwned>(
    python: &str,
    source: &str,
    what: &str,
    needs: &str,
    configure: impl FnOnce(&mut Command),
) -> Result<T, Failure> {
    let script = std::env::temp_dir().join(format!(
        "ferrotune-{}-{}.py",
        what.replace(|c: char| !c.is_ascii_alphanumeric(), "-"),
        std::process::id()
    ));
    std::fs::write(&script, source)
        .map_err(|e| Failure::runtime(format!("{}: {e}", script.display())))?;
    tracing::info!("running the {what} reference ({python})");
    let mut cmd = Command::new(python);
    cmd.arg(&script);
    configure(&mut cmd);
    let output = cmd.output();
    let _ = std::fs::remove_file(&script);
    let output = output.map_err(|e| {
        Failure::usage(format!(
            "cannot start {python} ({e}); pass --python or --no-reference"
        ))
    })?;
    if !output.status.success() {
        return Err(Failure::usage(format!(
            "the {what} reference failed (needs {needs}; or use --no-reference):\n{}",
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .map_err(|e| Failure::runtime(format!("unreadable reference output ({e}): {stdout}")))
}
