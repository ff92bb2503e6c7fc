//! Folder upload throughput into Azurite, ferrotune's resumable block upload against the Python
//! stack's (azure-storage-blob, as azure-ai-ml uses it), in one run.
//!
//!     cargo bench -p ferrotune-azure --bench upload -- [--dir DIR] [--mb 512] [--python PYTHON]
//!
//! Without --dir a folder of random bytes (--mb MB in one shard plus small files) is made. With
//! --python (an interpreter with azure-storage-blob) the reference runs on the same folder and
//! Azurite instance. Azurite is a Node.js process on this machine, so both sides share the CPUs
//! with it: the ratio is what compares, not the MB/s.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use base64::Engine;
use ferrotune_azure::blob::{BlobAuth, BlobContainer};
use ferrotune_azure::fake::{start_azurite, ACCOUNT, KEY};
use ferrotune_azure::http::Transport;
use ferrotune_azure::upload::{self, UploadOptions};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn make_folder(root: &Path, mb: usize) -> PathBuf {
    let dir = root.join("bench-export");
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::write(dir.join("MLmodel"), "flavors: {}\n").unwrap();
    std::fs::write(dir.join("model/config.json"), "{}").unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..mb * 1024 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(dir.join("model/model.safetensors"), bytes).unwrap();
    dir
}

fn main() {
    let scratch =
        std::env::temp_dir().join(format!("ferrotune-upload-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let dir = match arg("--dir") {
        Some(d) => PathBuf::from(d),
        None => make_folder(
            &scratch,
            arg("--mb").and_then(|m| m.parse().ok()).unwrap_or(512),
        ),
    };
    let azurite = start_azurite();
    let key = base64::engine::general_purpose::STANDARD
        .decode(KEY)
        .unwrap();
    let container = BlobContainer::new(
        Transport::new(Default::default(), None).unwrap(),
        &format!("{}/bench", azurite.url),
        BlobAuth::SharedKey {
            account: ACCOUNT.into(),
            key,
        },
    );
    container.create_if_missing().unwrap();

    let started = Instant::now();
    let plan = upload::scan(&dir).unwrap();
    let scan_s = started.elapsed().as_secs_f64();
    let opts = UploadOptions::default();
    let started = Instant::now();
    let report = upload::upload(&container, &plan, &opts, &|_, _| {}).unwrap();
    let upload_s = started.elapsed().as_secs_f64();
    let mb = plan.total_bytes() as f64 / 1e6;
    println!(
        "ferrotune: {} files, {mb:.0} MB: hash {scan_s:.2} s + upload {upload_s:.2} s = {:.0} MB/s end to end ({} blocks, parallel {})",
        plan.files.len(),
        mb / (scan_s + upload_s),
        report.blocks_uploaded,
        opts.parallelism
    );
    let started = Instant::now();
    let again = upload::upload(&container, &plan, &opts, &|_, _| {}).unwrap();
    println!(
        "ferrotune rerun: {:.3} s (already complete: {})",
        started.elapsed().as_secs_f64(),
        again.already_complete
    );

    if let Some(python) = arg("--python") {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_upload_reference.py");
        for (label, extra) in [
            ("azure-storage-blob", None),
            (
                "azure-storage-blob, MD5 per block",
                Some("--validate-content"),
            ),
        ] {
            let out = Command::new(&python)
                .arg(&script)
                .args([
                    "--account-url",
                    &azurite.url,
                    "--account",
                    ACCOUNT,
                    "--key",
                    KEY,
                    "--container",
                    "bench-py",
                ])
                .arg("--dir")
                .arg(&dir)
                .args([
                    "--prefix",
                    &format!("ref-{}", extra.is_some()),
                    "--concurrency",
                    &opts.parallelism.to_string(),
                ])
                .args(["--block-size", &opts.block_size.to_string()])
                .args(extra)
                .output()
                .expect("run the Python reference");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let py_s = v["seconds"].as_f64().unwrap();
            println!(
                "{label}: upload {py_s:.2} s = {:.0} MB/s (no folder hash, no resume); ferrotune's upload alone {:.2}×, end to end {:.2}× its speed",
                mb / py_s,
                py_s / upload_s,
                py_s / (scan_s + upload_s)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
