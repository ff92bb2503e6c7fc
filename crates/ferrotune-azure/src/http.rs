//! One HTTP transport for ARM, blob storage and token endpoints: retries with `Retry-After`,
//! capped exponential backoff with jitter, and a dry-run mode that prints requests (secrets
//! masked) instead of sending them.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::blocking::Client;
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::Value;

use crate::error::{AzureError, Result};

#[derive(Debug, Clone)]
pub enum Payload {
    Empty,
    Json(Value),
    Bytes(Bytes),
    Text(String),
}

/// A request as it will go on the wire.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub payload: Payload,
}

impl Call {
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Call {
            method,
            url: url.into(),
            headers: Vec::new(),
            payload: Payload::Empty,
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn json(mut self, body: Value) -> Self {
        self.payload = Payload::Json(body);
        self
    }

    pub fn bytes(mut self, body: Bytes) -> Self {
        self.payload = Payload::Bytes(body);
        self
    }

    pub fn text(mut self, body: String) -> Self {
        self.payload = Payload::Text(body);
        self
    }

    /// PUT, GET, HEAD and DELETE may be repeated safely; a POST is retried only when the server
    /// said it did not process it (429).
    fn idempotent(&self) -> bool {
        self.method != Method::POST && self.method != Method::PATCH
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// True when nothing was sent (dry run): callers must not read anything from it.
    pub dry_run: bool,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Result<Value> {
        if self.dry_run || self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            AzureError::Operation(format!(
                "the answer was not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            ))
        })
    }

    pub fn ok(&self) -> bool {
        self.dry_run || (200..300).contains(&self.status)
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 6,
            base_delay: Duration::from_millis(800),
            max_delay: Duration::from_secs(60),
        }
    }
}

/// Where dry-run requests are printed; tests capture them.
#[derive(Clone)]
pub enum DryRunSink {
    Stdout,
    Capture(Arc<Mutex<Vec<String>>>),
}

#[derive(Clone)]
pub struct Transport {
    client: Client,
    retry: RetryPolicy,
    dry_run: Option<DryRunSink>,
}

impl Transport {
    pub fn new(retry: RetryPolicy, dry_run: Option<DryRunSink>) -> Result<Self> {
        let client = Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .timeout(Duration::from_secs(600))
            .user_agent(concat!("ferrotune/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AzureError::Operation(format!("cannot build the HTTP client: {e}")))?;
        Ok(Transport {
            client,
            retry,
            dry_run,
        })
    }

    pub fn is_dry_run(&self) -> bool {
        self.dry_run.is_some()
    }

    /// In a dry run, prints `text` where the requests go (a summary standing for many requests).
    pub fn note(&self, text: &str) {
        match &self.dry_run {
            Some(DryRunSink::Stdout) => println!("{text}"),
            Some(DryRunSink::Capture(lines)) => {
                lines.lock().expect("dry-run log").push(text.to_string())
            }
            None => {}
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends the call (or prints it in a dry run), retrying throttling and server errors.
    /// Non-2xx answers are returned, not turned into errors: callers decide what 404 means.
    pub fn send(&self, call: &Call) -> Result<Reply> {
        if let Some(sink) = &self.dry_run {
            let text = describe(call);
            match sink {
                DryRunSink::Stdout => {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{text}");
                }
                DryRunSink::Capture(lines) => lines.lock().expect("dry-run log").push(text),
            }
            return Ok(Reply {
                status: 200,
                headers: HeaderMap::new(),
                body: Bytes::new(),
                dry_run: true,
            });
        }
        let mut attempt = 0u32;
        loop {
            let outcome = self.send_once(call);
            let retry_after = match &outcome {
                Ok(reply) if retryable_status(reply.status, call.idempotent()) => {
                    Some(retry_after(&reply.headers))
                }
                Err(_) if call.idempotent() => Some(None),
                _ => None,
            };
            match retry_after {
                Some(hint) if attempt < self.retry.max_retries => {
                    let delay = self.backoff(attempt, hint);
                    tracing::warn!(
                        "{} {}: {}; retry {} of {} in {:.1} s",
                        call.method,
                        mask_url(&call.url),
                        match &outcome {
                            Ok(r) => format!("HTTP {}", r.status),
                            Err(e) => e.to_string(),
                        },
                        attempt + 1,
                        self.retry.max_retries,
                        delay.as_secs_f64()
                    );
                    std::thread::sleep(delay);
                    attempt += 1;
                }
                _ => return outcome,
            }
        }
    }

    fn send_once(&self, call: &Call) -> Result<Reply> {
        let mut builder = self.client.request(call.method.clone(), &call.url);
        for (name, value) in &call.headers {
            builder = builder.header(name, value);
        }
        builder = match &call.payload {
            Payload::Empty => builder,
            Payload::Json(v) => builder.json(v),
            Payload::Bytes(b) => builder.body(b.clone()),
            Payload::Text(t) => builder.body(t.clone()),
        };
        let response = builder.send().map_err(|e| AzureError::Transport {
            method: call.method.to_string(),
            url: mask_url(&call.url),
            detail: error_chain(&e),
        })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().map_err(|e| AzureError::Transport {
            method: call.method.to_string(),
            url: mask_url(&call.url),
            detail: error_chain(&e),
        })?;
        Ok(Reply {
            status,
            headers,
            body,
            dry_run: false,
        })
    }

    fn backoff(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        if let Some(hint) = hint {
            return hint.min(self.retry.max_delay);
        }
        let exp = self
            .retry
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.retry.max_delay);
        // Full jitter in [exp/2, exp]: ranks retrying together spread out.
        exp.mul_f64(0.5 + 0.5 * jitter())
    }
}

fn retryable_status(status: u16, idempotent: bool) -> bool {
    status == 429 || (idempotent && matches!(status, 500 | 502 | 503 | 504))
}

/// `Retry-After` as seconds or an HTTP date; also Azure's `x-ms-retry-after-ms`.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("x-ms-retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Duration::from_millis(ms));
    }
    let value = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return Some(Duration::from_secs_f64(secs.max(0.0)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

const SECRET_HEADERS: [&str; 4] = [
    "authorization",
    "api-key",
    "x-ms-copy-source-authorization",
    "secret",
];
const SECRET_FIELDS: [&str; 9] = [
    "key",
    "primaryKey",
    "secondaryKey",
    "sasUri",
    "sasToken",
    "secret",
    "client_secret",
    "password",
    "accessToken",
];

/// The request as `--dry-run` prints it: method and URL, headers that matter, and the JSON body,
/// with keys, tokens and SAS signatures replaced by `***`.
pub fn describe(call: &Call) -> String {
    let mut text = format!("{} {}", call.method, mask_url(&call.url));
    for (name, value) in &call.headers {
        let lower = name.to_ascii_lowercase();
        if lower == "content-type" || lower == "x-ms-date" || lower == "x-ms-version" {
            continue;
        }
        let shown = if SECRET_HEADERS.contains(&lower.as_str()) {
            match value.split_once(' ') {
                Some((scheme, _)) => format!("{scheme} ***"),
                None => "***".to_string(),
            }
        } else {
            value.clone()
        };
        text.push_str(&format!("\n  {name}: {shown}"));
    }
    match &call.payload {
        Payload::Empty => {}
        Payload::Json(v) => {
            let masked = mask_json(v);
            let body = serde_json::to_string_pretty(&masked).unwrap_or_default();
            for line in body.lines() {
                text.push_str("\n  ");
                text.push_str(line);
            }
        }
        Payload::Bytes(b) => text.push_str(&format!("\n  <{} bytes>", b.len())),
        Payload::Text(t) => text.push_str(&format!("\n  <{} bytes of text>", t.len())),
    }
    text
}

pub fn mask_json(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let masked = if SECRET_FIELDS.contains(&k.as_str()) && !v.is_null() {
                        Value::String("***".into())
                    } else {
                        mask_json(v)
                    };
                    (k.clone(), masked)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(mask_json).collect()),
        other => other.clone(),
    }
}

/// SAS signatures and client secrets never reach a log: `sig=...` becomes `sig=***`.
pub fn mask_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if matches!(k, "sig" | "client_secret" | "code") => format!("{k}=***"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", parts.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn secrets_are_masked_in_urls_headers_and_bodies() {
        let call = Call::new(
            Method::PUT,
            "https://acct.blob.core.windows.net/c/b?sv=2022&sig=abc%2Fdef&se=2030",
        )
        .header("Authorization", "Bearer eyJ0eXAi.secret")
        .header("azureml-model-deployment", "demo")
        .json(serde_json::json!({"properties": {"key": "k1", "name": "x"}, "primaryKey": "p"}));
        let text = describe(&call);
        assert!(text.contains("sig=***"), "{text}");
        assert!(!text.contains("abc%2Fdef"));
        assert!(text.contains("Authorization: Bearer ***"));
        assert!(!text.contains("eyJ0eXAi"));
        assert!(text.contains("azureml-model-deployment: demo"));
        assert!(text.contains("\"key\": \"***\"") && text.contains("\"primaryKey\": \"***\""));
        assert!(text.contains("\"name\": \"x\""));
    }

    #[test]
    fn retry_after_reads_seconds_dates_and_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("x-ms-retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(5));
        h.insert("retry-after", HeaderValue::from_str(&past).unwrap());
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        assert!(retryable_status(429, false) && retryable_status(503, true));
        assert!(!retryable_status(503, false) && !retryable_status(404, true));
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_the_hint() {
        let t = Transport::new(
            RetryPolicy {
                max_retries: 3,
                base_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(350),
            },
            None,
        )
        .unwrap();
        for attempt in 0..6 {
            let d = t.backoff(attempt, None);
            let full = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_millis(350));
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert_eq!(
            t.backoff(0, Some(Duration::from_secs(9))),
            Duration::from_millis(350)
        );
    }
}
