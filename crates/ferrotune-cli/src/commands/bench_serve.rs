//! `ferrotune bench serve`: a bounded chat load on loopback against `ferrotune serve` (a child
//! process) and, with `--python`, against transformers served one request at a time
//! (`scripts/serve_reference.py`), in one run: requests/s, tokens/s, time to first token and
//! latency percentiles, errors, and the ratios.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::cli::BenchServeArgs;
use crate::failure::Failure;

#[derive(Debug, Clone, Serialize)]
struct LoadResult {
    server: String,
    streams: usize,
    requests: usize,
    errors: usize,
    seconds: f64,
    requests_per_s: f64,
    tokens_per_s: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
}

/// Questions cycled through by the load (the bundled sample's kinds).
const PROMPTS: [&str; 8] = [
    "What is the capital of Peru?",
    "Which city is the capital of Japan?",
    "Reverse the word 'river'.",
    "What is 12 + 30?",
    "How many letters are in 'vector'?",
    "Tell me a story about a fox.",
    "What is the capital of Italy?",
    "Name three colours.",
];

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &BenchServeArgs, json_out: bool) -> Result<(), Failure> {
    let streams: Vec<usize> = args
        .streams
        .split(',')
        .map(|s| s.trim().parse::<usize>().ok().filter(|n| *n > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            Failure::usage(format!("--streams {}: expected e.g. 1,8,32", args.streams))
        })?;
    let work = std::env::temp_dir().join(format!("ferrotune-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&work)
        .map_err(|e| Failure::runtime(format!("{}: {e}", work.display())))?;
    let max_streams = streams.iter().copied().max().unwrap_or(1);
    let exe = std::env::current_exe().map_err(|e| Failure::runtime(e.to_string()))?;
    let mut results = Vec::new();
    {
        let port_file = work.join("ferrotune.port");
        let child = Command::new(&exe)
            .args(["serve", "--path"])
            .arg(&args.model)
            .args(["--port", "0", "--port-file"])
            .arg(&port_file)
            .args([
                "--max-concurrency",
                &max_streams.to_string(),
                "--device",
                "cpu",
                "--dtype",
                "f32",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Failure::runtime(format!("starting ferrotune serve: {e}")))?;
        let guard = ChildGuard(child);
        let base = wait_for_port(&port_file, guard, "ferrotune serve")?;
        for &n in &streams {
            results.push(load(&base.1, "ferrotune", n, args)?);
        }
    }
    if let Some(python) = &args.python {
        let port_file = work.join("reference.port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/serve_reference.py");
        let child = Command::new(python)
            .arg(&script)
            .arg("--model")
            .arg(&args.model)
            .arg("--port-file")
            .arg(&port_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Failure::runtime(format!("starting {}: {e}", script.display())))?;
        let guard = ChildGuard(child);
        let base = wait_for_port(&port_file, guard, "the Python reference")?;
        for &n in &streams {
            results.push(load(&base.1, "transformers", n, args)?);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    if json_out {
        println!("{}", json!({"results": results}));
        return Ok(());
    }
    println!(
        "{:<13} {:>7} {:>8} {:>6} {:>9} {:>10} {:>16} {:>18}",
        "server",
        "streams",
        "requests",
        "errors",
        "req/s",
        "tokens/s",
        "ttft p50/p99 ms",
        "latency p50/p99 ms"
    );
    for r in &results {
        println!(
            "{:<13} {:>7} {:>8} {:>6} {:>9.1} {:>10.0} {:>7.0} / {:<7.0} {:>8.0} / {:<8.0}",
            r.server,
            r.streams,
            r.requests,
            r.errors,
            r.requests_per_s,
            r.tokens_per_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.latency_p50_ms,
            r.latency_p99_ms
        );
    }
    let ours = |n: usize| {
        results
            .iter()
            .find(|r| r.server == "ferrotune" && r.streams == n)
    };
    if let (Some(one), Some(most)) = (ours(streams[0]), ours(max_streams)) {
        println!(
            "batching: {} streams give {:.1}× the tokens/s of {}",
            max_streams,
            most.tokens_per_s / one.tokens_per_s.max(1e-9),
            streams[0]
        );
    }
    for &n in &streams {
        let reference = results
            .iter()
            .find(|r| r.server == "transformers" && r.streams == n);
        if let (Some(o), Some(r)) = (ours(n), reference) {
            println!(
                "{n} streams: ferrotune {:.1}× the tokens/s of transformers, time to first token {:.2}× (p50)",
                o.tokens_per_s / r.tokens_per_s.max(1e-9),
                o.ttft_p50_ms / r.ttft_p50_ms.max(1e-9)
            );
        }
    }
    Ok(())
}

/// Wait until the child wrote its port and answers; returns the guard and the base URL.
fn wait_for_port(
    port_file: &Path,
    mut guard: ChildGuard,
    what: &str,
) -> Result<(ChildGuard, String), Failure> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(p) = std::fs::read_to_string(port_file) {
            let base = format!("http://127.0.0.1:{}", p.trim());
            return Ok((guard, base));
        }
        if let Ok(Some(status)) = guard.0.try_wait() {
            return Err(Failure::runtime(format!(
                "{what} exited with {status} before listening"
            )));
        }
        if Instant::now() > deadline {
            return Err(Failure::runtime(format!(
                "{what} did not listen within 300 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `args.requests` streaming chat requests over `streams` concurrent clients.
fn load(
    base: &str,
    server: &str,
    streams: usize,
    args: &BenchServeArgs,
) -> Result<LoadResult, Failure> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let url = format!("{base}/v1/chat/completions");
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::<(f64, f64, usize)>::new()));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..streams {
            let (client, url, next, samples, errors) = (&client, &url, &next, &samples, &errors);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.requests {
                    return;
                }
                let body = json!({"model": "demo", "messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
                                  "max_tokens": args.max_new_tokens, "temperature": 1.0, "seed": i,
                                  "stream": true, "stream_options": {"include_usage": true}});
                match one_stream(client, url, &body) {
                    Ok(s) => samples.lock().expect("samples").push(s),
                    Err(e) => {
                        tracing::warn!("{server}: request {i}: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let samples = samples.lock().expect("samples").clone();
    let tokens: usize = samples.iter().map(|s| s.2).sum();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let mut lat: Vec<f64> = samples.iter().map(|s| s.1).collect();
    Ok(LoadResult {
        server: server.to_string(),
        streams,
        requests: args.requests,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        requests_per_s: samples.len() as f64 / seconds,
        tokens_per_s: tokens as f64 / seconds,
        ttft_p50_ms: percentile(&mut ttft, 0.50) * 1e3,
        ttft_p99_ms: percentile(&mut ttft, 0.99) * 1e3,
        latency_p50_ms: percentile(&mut lat, 0.50) * 1e3,
        latency_p99_ms: percentile(&mut lat, 0.99) * 1e3,
    })
}

/// (time to first content, total time, completion tokens) of one streamed request.
fn one_stream(
    client: &reqwest::blocking::Client,
    url: &str,
    body: &serde_json::Value,
) -> Result<(f64, f64, usize), String> {
    let t0 = Instant::now();
    let resp = client
        .post(url)
        .json(body)
        .send()
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let mut first = None;
    let mut tokens = 0;
    for line in BufReader::new(resp).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if first.is_none()
            && v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        {
            first = Some(t0.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    let total = t0.elapsed().as_secs_f64();
    Ok((first.unwrap_or(total), total, tokens))
}

/// Nearest-rank percentile (sorts `v`).
fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }
}
