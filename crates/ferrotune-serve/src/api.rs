//! The three request shapes (Azure `/score`, MLflow `/invocations`, OpenAI chat) parsed and
//! validated into one [`Job`]; every mistake is a 400 naming the field.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferrotune_data::{Message, Role};
use serde_json::{json, Map, Value};

use crate::engine::GenParams;

/// An error as every route reports it: OpenAI's `{"error": {...}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("{param}: {}", message.into()),
            param: Some(param.to_string()),
            retry_after: None,
        }
    }

    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            400 | 413 | 422 => "invalid_request_error",
            401 | 403 => "authentication_error",
            404 => "not_found_error",
            408 => "timeout",
            429 => "rate_limit_exceeded",
            _ => "server_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param,
                                     "code": self.status.as_u16()}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert("retry-after", s.to_string().parse().expect("digits"));
        }
        resp
    }
}

/// One input to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Chat(Vec<Message>),
    Text(String),
}

/// What a request asks for, whatever its shape.
#[derive(Debug, Clone)]
pub struct Job {
    pub inputs: Vec<Input>,
    /// Choices per input (OpenAI's `n`).
    pub n: usize,
    /// `None`: as many as the context leaves.
    pub max_new_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// OpenAI's `model`: pins a deployment of that name.
    pub model: Option<String>,
}

impl Job {
    fn new(inputs: Vec<Input>) -> Job {
        Job {
            inputs,
            n: 1,
            max_new_tokens: None,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stops: Vec::new(),
            stream: false,
            include_usage: false,
            model: None,
        }
    }

    /// The parameters of choice `i` for a prompt of `prompt_len` tokens.
    pub fn params(
        &self,
        i: usize,
        prompt_len: usize,
        context: usize,
    ) -> Result<GenParams, ApiError> {
        let room = context.saturating_sub(prompt_len);
        if room == 0 {
            return Err(ApiError::bad(
                "messages",
                format!("the prompt is {prompt_len} tokens; this deployment serves at most {context} (the model's context, or less under its KV cache budget)"),
            ));
        }
        let max_new_tokens = match self.max_new_tokens {
            Some(n) if n > room => {
                return Err(ApiError::bad(
                    "max_new_tokens",
                    format!("{n} new tokens after a {prompt_len}-token prompt exceed the {context} tokens this deployment serves (the model's context, or less under its KV cache budget); at most {room}"),
                ))
            }
            Some(n) => n,
            None => room.min(DEFAULT_MAX_NEW_TOKENS),
        };
        let seed = match self.seed {
            Some(s) => s.wrapping_add(i as u64),
            None => random_seed(),
        };
        Ok(GenParams {
            max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed,
        })
    }
}

/// New tokens when a request does not say (transformers' pipelines use 256 too).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

pub fn parse_json(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("body", "expected a JSON object")),
        Err(e) => Err(ApiError::bad("body", format!("invalid JSON: {e}"))),
    }
}

fn messages(v: &Value, field: &str) -> Result<Vec<Message>, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| ApiError::bad(field, "expected a list of {role, content} messages"))?;
    if list.is_empty() {
        return Err(ApiError::bad(field, "no messages"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(&format!("{at}.role"), "missing"))?;
        let role = Role::parse(role).ok_or_else(|| {
            ApiError::bad(
                &format!("{at}.role"),
                format!("{role:?} is not supported; use system, user or assistant"),
            )
        })?;
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // OpenAI's content parts: text only.
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad(
                                &format!("{at}.content[{j}]"),
                                "only text parts are supported",
                            ))
                        }
                    }
                }
                text
            }
            _ => return Err(ApiError::bad(&format!("{at}.content"), "expected a string")),
        };
        out.push(Message { role, content });
    }
    Ok(out)
}

fn number(m: &Map<String, Value>, key: &str, at: &str) -> Result<Option<f64>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad(&format!("{at}{key}"), "expected a number")),
    }
}

fn count(m: &Map<String, Value>, key: &str, at: &str) -> Result<Option<usize>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| ApiError::bad(&format!("{at}{key}"), "expected a non-negative integer")),
    }
}

fn flag(m: &Map<String, Value>, key: &str, at: &str) -> Result<Option<bool>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::bad(
            &format!("{at}{key}"),
            "expected true or false",
        )),
    }
}

fn sampling(
    job: &mut Job,
    m: &Map<String, Value>,
    at: &str,
    temp_max: f64,
) -> Result<(), ApiError> {
    if let Some(t) = number(m, "temperature", at)? {
        if !(0.0..=temp_max).contains(&t) {
            return Err(ApiError::bad(
                &format!("{at}temperature"),
                format!("{t} is outside 0..{temp_max}"),
            ));
        }
        job.temperature = t;
    }
    if let Some(p) = number(m, "top_p", at)? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad(
                &format!("{at}top_p"),
                format!("{p} is outside (0, 1]"),
            ));
        }
        job.top_p = p;
    }
    if let Some(k) = count(m, "top_k", at)? {
        job.top_k = k;
    }
    if let Some(s) = m.get("seed").filter(|v| !v.is_null()) {
        job.seed = Some(
            s.as_u64()
                .or_else(|| s.as_i64().map(|x| x as u64))
                .ok_or_else(|| ApiError::bad(&format!("{at}seed"), "expected an integer"))?,
        );
    }
    Ok(())
}

fn stops(m: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match m.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad("stop", "expected strings"))
            })
            .collect(),
        Some(_) => Err(ApiError::bad(
            "stop",
            "expected a string or a list of at most 4",
        )),
    }
}

fn unsupported(m: &Map<String, Value>, keys: &[(&str, Value)], at: &str) -> Result<(), ApiError> {
    for (key, neutral) in keys {
        if let Some(v) = m.get(*key) {
            if !v.is_null() && v != neutral {
                return Err(ApiError::bad(
                    &format!("{at}{key}"),
                    "is not supported by this server",
                ));
            }
        }
    }
    Ok(())
}

/// Azure's scoring contract: `{"input_data": {"input_string": [...], "parameters": {...}}, "params": {}}`.
pub fn score_job(body: &Map<String, Value>) -> Result<Job, ApiError> {
    let data = body
        .get("input_data")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            ApiError::bad(
                "input_data",
                "missing; expected {\"input_string\": [...], \"parameters\": {...}}",
            )
        })?;
    let list = data
        .get("input_string")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ApiError::bad(
                "input_data.input_string",
                "expected a list of conversations or strings",
            )
        })?;
    if list.is_empty() {
        return Err(ApiError::bad("input_data.input_string", "is empty"));
    }
    let mut inputs = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let at = format!("input_data.input_string[{i}]");
        inputs.push(match item {
            Value::String(s) => Input::Text(s.clone()),
            Value::Array(_) => Input::Chat(messages(item, &at)?),
            _ => {
                return Err(ApiError::bad(
                    &at,
                    "expected a string or a list of messages",
                ))
            }
        });
    }
    let mut job = Job::new(inputs);
    let empty = Map::new();
    let p = match data.get("parameters") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(p)) => p,
        Some(_) => return Err(ApiError::bad("input_data.parameters", "expected an object")),
    };
    let at = "input_data.parameters.";
    for key in p.keys() {
        if ![
            "temperature",
            "top_p",
            "top_k",
            "do_sample",
            "max_new_tokens",
            "seed",
            "return_full_text",
        ]
        .contains(&key.as_str())
        {
            return Err(ApiError::bad(
                &format!("{at}{key}"),
                "is not a supported parameter (temperature, top_p, top_k, do_sample, max_new_tokens, seed, return_full_text)",
            ));
        }
    }
    unsupported(p, &[("return_full_text", Value::Bool(false))], at)?;
    // transformers' generate: greedy unless do_sample; sampling defaults to top_k 50.
    if flag(p, "do_sample", at)?.unwrap_or(false) {
        job.temperature = 1.0;
        job.top_k = 50;
        sampling(&mut job, p, at, f64::MAX)?;
        if job.temperature == 0.0 {
            return Err(ApiError::bad(
                &format!("{at}temperature"),
                "must be > 0 with do_sample (or set do_sample false)",
            ));
        }
    } else {
        let mut ignored = Job::new(Vec::new());
        sampling(&mut ignored, p, at, f64::MAX)?;
        job.seed = ignored.seed;
    }
    job.max_new_tokens = count(p, "max_new_tokens", at)?;
    if job.max_new_tokens == Some(0) {
        return Err(ApiError::bad(
            &format!("{at}max_new_tokens"),
            "must be at least 1",
        ));
    }
    Ok(job)
}

/// MLflow's `llm/v1/chat` scoring: `{"messages": [...], "max_tokens", "temperature", ...}`.
pub fn invocations_job(body: &Map<String, Value>) -> Result<Job, ApiError> {
    let msgs = body.get("messages").ok_or_else(|| {
        ApiError::bad(
            "messages",
            "missing (this endpoint serves an llm/v1/chat model)",
        )
    })?;
    let mut job = Job::new(vec![Input::Chat(messages(msgs, "messages")?)]);
    // MLflow's pipeline samples by default (do_sample, temperature 0.7, top_k 50).
    job.temperature = 0.7;
    job.top_k = 50;
    sampling(&mut job, body, "", f64::MAX)?;
    job.max_new_tokens = count(body, "max_tokens", "")?;
    job.stops = stops(body)?;
    job.n = count(body, "n", "")?.unwrap_or(1);
    unsupported(
        body,
        &[("stream", Value::Bool(false)), ("tools", Value::Null)],
        "",
    )?;
    check_n(job.n)?;
    Ok(job)
}

/// OpenAI's chat completions.
pub fn openai_job(body: &Map<String, Value>) -> Result<Job, ApiError> {
    let msgs = body
        .get("messages")
        .ok_or_else(|| ApiError::bad("messages", "missing"))?;
    let mut job = Job::new(vec![Input::Chat(messages(msgs, "messages")?)]);
    job.temperature = 1.0;
    sampling(&mut job, body, "", 2.0)?;
    job.max_new_tokens = match count(body, "max_completion_tokens", "")? {
        Some(n) => Some(n),
        None => count(body, "max_tokens", "")?,
    };
    if job.max_new_tokens == Some(0) {
        return Err(ApiError::bad("max_tokens", "must be at least 1"));
    }
    job.stops = stops(body)?;
    job.n = count(body, "n", "")?.unwrap_or(1);
    check_n(job.n)?;
    job.stream = flag(body, "stream", "")?.unwrap_or(false);
    job.include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    job.model = body.get("model").and_then(Value::as_str).map(str::to_owned);
    unsupported(
        body,
        &[
            ("presence_penalty", json!(0)),
            ("frequency_penalty", json!(0)),
            ("logprobs", Value::Bool(false)),
            ("tools", Value::Null),
            ("response_format", json!({"type": "text"})),
        ],
        "",
    )?;
    Ok(job)
}

fn check_n(n: usize) -> Result<(), ApiError> {
    if !(1..=8).contains(&n) {
        return Err(ApiError::bad("n", format!("{n} is outside 1..8")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_sources_sample_score_parses_and_mistakes_name_their_field() {
        let job = score_job(&obj(json!({
            "input_data": {"input_string": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]],
                           "parameters": {"temperature": 0.6, "top_p": 0.9, "do_sample": true, "max_new_tokens": 200}},
            "params": {}
        })))
        .unwrap();
        assert_eq!(job.inputs.len(), 1);
        assert_eq!((job.temperature, job.top_p, job.top_k), (0.6, 0.9, 50));
        assert_eq!(job.max_new_tokens, Some(200));
        let greedy = score_job(&obj(
            json!({"input_data": {"input_string": ["plain text"]}}),
        ))
        .unwrap();
        assert_eq!(greedy.temperature, 0.0);
        assert_eq!(greedy.inputs, vec![Input::Text("plain text".into())]);

        let err = |v: Value| score_job(&obj(v)).unwrap_err().message;
        assert!(err(json!({})).starts_with("input_data"));
        assert!(err(
            json!({"input_data": {"input_string": [[{"role": "robot", "content": "x"}]]}})
        )
        .contains("input_data.input_string[0][0].role"));
        assert!(err(json!({"input_data": {"input_string": ["x"], "parameters": {"temperature": -1, "do_sample": true}}}))
            .contains("temperature"));
        assert!(err(json!({"input_data": {"input_string": ["x"], "parameters": {"repetition_penalty": 1.2}}}))
            .contains("repetition_penalty"));
        let e = openai_job(&obj(
            json!({"messages": [{"role": "user", "content": "x"}], "n": 0}),
        ))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = openai_job(&obj(
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3}),
        ))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
    }

    #[test]
    fn max_new_tokens_beyond_the_context_is_refused_and_defaults_fit_it() {
        let mut job = Job::new(vec![Input::Text("x".into())]);
        assert_eq!(job.params(0, 100, 4096).unwrap().max_new_tokens, 256);
        assert_eq!(job.params(0, 4000, 4096).unwrap().max_new_tokens, 96);
        job.max_new_tokens = Some(100);
        let e = job.params(0, 4000, 4096).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_new_tokens"));
        job.seed = Some(7);
        assert_eq!(
            job.params(1, 10, 4096).unwrap().seed,
            8,
            "choice i gets seed + i"
        );
    }
}
