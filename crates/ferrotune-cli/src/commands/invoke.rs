//! `ferrotune invoke`: send a request file to a scoring endpoint (ours or Azure ML's) and print
//! the answer, as the source document's `online_endpoints.invoke` does.

use std::time::Duration;

use crate::cli::InvokeArgs;
use crate::failure::Failure;

pub fn run(args: &InvokeArgs, json_out: bool) -> Result<(), Failure> {
    let body = std::fs::read(&args.file)
        .map_err(|e| Failure::usage(format!("--file {}: {e}", args.file.display())))?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| Failure::usage(format!("--file {}: not JSON: {e}", args.file.display())))?;
    let url = scoring_url(&args.endpoint)?;
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
