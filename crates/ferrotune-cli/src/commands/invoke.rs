//! `ferrotune invoke`: send a request file to a scoring endpoint (ours or Azure ML's) and print
//! the answer, as the source document's `online_endpoints.invoke` does.

use std::time::Duration;

use crate::cli::InvokeArgs;
use crate::failure::Failure;

pub fn run(args: &InvokeArgs, json_out: bool) -> Result<(), Failure> {
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("sample_score.json"));
    if args.sample {
        let data = args.data.as_deref().expect("clap requires --data");
        let row = write_sample(data, &args.split, args.seed, &file)?;
        eprintln!(
            "wrote {} from row {row} of {} ({})",
            file.display(),
            data.display(),
            args.split
        );
    }
    let Some(endpoint) = &args.endpoint else {
        return Ok(());
    };
    let body = std::fs::read(&file)
        .map_err(|e| Failure::usage(format!("--file {}: {e}", file.display())))?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| Failure::usage(format!("--file {}: not JSON: {e}", file.display())))?;
    let url = scoring_url(endpoint)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .build()
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let mut req = client
        .post(&url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = &args.key {
        req = req.bearer_auth(k);
    }
    if let Some(d) = &args.deployment {
        req = req.header("azureml-model-deployment", d);
    }
    let resp = req
        .send()
        .map_err(|e| Failure::runtime(format!("{url}: {e}")))?;
    let status = resp.status();
    let served_by = resp
        .headers()
        .get("azureml-model-deployment")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp
        .text()
        .map_err(|e| Failure::runtime(format!("{url}: reading the answer: {e}")))?;
    if !status.is_success() {
        return Err(Failure::runtime(format!("{url}: HTTP {status}: {text}")));
    }
    if json_out {
        println!("{text}");
        return Ok(());
    }
    if let Some(d) = served_by {
        eprintln!("served by deployment {d}");
    }
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(text)),
        Err(_) => println!("{text}"),
    }
    Ok(())
}

/// The source's `sample_score.json` from one random row (`test_df.sample(n=1)`): the row's
/// messages as they are, and its fixed parameters. Returns the row index.
fn write_sample(
    data: &std::path::Path,
    split: &str,
    seed: Option<u64>,
    out: &std::path::Path,
) -> Result<u64, Failure> {
    let source = ferrotune_data::source::SplitSource::discover(data, Some(split))?;
    let rows = source.count_rows()?;
    if rows == 0 {
        return Err(Failure::usage(format!(
            "--data {}: split {split} has no rows",
            data.display()
        )));
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let index = ferrotune_model::rng::SplitMix(seed).next_u64() % rows;
    let row = source
        .rows(index + 1)
        .last()
        .ok_or_else(|| Failure::runtime("the split ended early"))??
        .map_err(|bad| Failure::usage(format!("row {index} cannot be used: {}", bad.detail)))?;
    let request = serde_json::json!({
        "input_data": {
            "input_string": [row.messages],
            "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": true, "max_new_tokens": 200},
        },
        "params": {},
    });
    std::fs::write(out, request.to_string())
        .map_err(|e| Failure::runtime(format!("{}: {e}", out.display())))?;
    Ok(index)
}

/// `http://host:port` → `http://host:port/score`; a URL with a path is used as is.
fn scoring_url(endpoint: &str) -> Result<String, Failure> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| {
            Failure::usage(format!(
                "--endpoint {endpoint}: expected http(s)://host[:port][/path]"
            ))
        })?;
    Ok(match rest.split_once('/') {
        Some((_, path)) if !path.is_empty() => endpoint.to_string(),
        _ => format!("{}/score", endpoint.trim_end_matches('/')),
    })
}

#[cfg(test)]
mod tests {
    use super::scoring_url;

    #[test]
    fn a_bare_endpoint_gets_the_scoring_route() {
        assert_eq!(
            scoring_url("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080/score"
        );
        assert_eq!(scoring_url("http://h:1/").unwrap(), "http://h:1/score");
        assert_eq!(
            scoring_url("https://e.westeurope.inference.ml.azure.com/score").unwrap(),
            "https://e.westeurope.inference.ml.azure.com/score"
        );
        assert!(scoring_url("e.azure.com").is_err());
    }
}
