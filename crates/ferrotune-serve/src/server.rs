//! The HTTP side: routes, auth, limits, streaming, probes, metrics and graceful shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{invocations_job, openai_job, parse_json, score_job, ApiError, Input, Job};
use crate::auth::Keys;
use crate::deployments::{parse_traffic, Deployment, Endpoint};
use crate::engine::{EngineStats, Event, FinishReason, GenRequest, Rejected};
use crate::histogram::Histogram;
use crate::text::Detokenizer;

pub struct ServerOptions {
    pub keys: Keys,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    /// After SIGTERM/Ctrl-C, how long in-flight requests may take.
    pub grace: Duration,
}

#[derive(Clone)]
struct AppState {
    endpoint: Arc<Endpoint>,
    keys: Arc<Keys>,
    timeout: Duration,
    requests: Arc<Mutex<BTreeMap<(String, u16), u64>>>,
    ready: Arc<AtomicBool>,
    started: i64,
    ids: Arc<AtomicU64>,
}

/// Everything `/score`, `/invocations` and the chat API need from one finished choice.
struct Outcome {
    text: String,
    reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
}

pub fn router(endpoint: Arc<Endpoint>, opts: &ServerOptions, ready: Arc<AtomicBool>) -> Router {
    let state = AppState {
        endpoint,
        keys: Arc::new(opts.keys.clone()),
        timeout: opts.request_timeout,
        requests: Arc::default(),
        ready,
        started: unix_s(),
        ids: Arc::new(AtomicU64::new(1)),
    };
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({"status": "alive"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/score", post(score))
        .route("/invocations", post(invocations))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/admin/traffic", get(get_traffic).put(put_traffic))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .with_state(state)
}

/// Serve until SIGTERM or Ctrl-C, then drain in-flight requests for up to `opts.grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    endpoint: Arc<Endpoint>,
    opts: ServerOptions,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(endpoint, &opts, ready);
    let grace = opts.grace;
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, draining for up to {grace:?}");
        let _ = drain_tx.send(());
    };
    // Streamed tokens are small writes: without TCP_NODELAY each waits on the peer's delayed
    // ACK (~40 ms to the first token, measured).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    tokio::select! {
        r = server => r,
        _ = async { let _ = drain_rx.await; tokio::time::sleep(grace).await; } => {
            tracing::warn!("grace period over; exiting with requests still in flight");
            Ok(())
        }
    }
}

/// Ctrl-C or SIGTERM.
pub async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn unix_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl AppState {
    fn count(&self, route: &str, status: StatusCode) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((route.to_string(), status.as_u16()))
            .or_insert(0) += 1;
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.keys.allows(headers) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong key: send Authorization: Bearer KEY or api-key: KEY",
            ))
        }
    }

    fn pick(&self, headers: &HeaderMap, model: Option<&str>) -> Result<&Deployment, ApiError> {
        let pinned = headers
            .get("azureml-model-deployment")
            .and_then(|v| v.to_str().ok())
            .or(model.filter(|m| self.endpoint.get(m).is_some()));
        self.endpoint
            .route(pinned)
            .map_err(|m| ApiError::new(StatusCode::NOT_FOUND, m))
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    let engines = s
        .endpoint
        .deployments
        .iter()
        .all(|d| d.engine.stats.ready.load(Ordering::Relaxed));
    if s.ready.load(Ordering::Relaxed) && engines {
        Json(json!({"status": "ready", "deployments": s.endpoint.names()})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut out = String::new();
    out += "# HELP ferrotune_requests_total Requests by route and HTTP status.\n# TYPE ferrotune_requests_total counter\n";
    for ((route, status), n) in s.requests.lock().expect("metrics lock").iter() {
        out += &format!("ferrotune_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n");
    }
    let gauges: [(&str, &str, &str); 11] = [
        ("queue_depth", "gauge", "Requests waiting for a batch slot."),
        (
            "active_sequences",
            "gauge",
            "Sequences in the running batch.",
        ),
        ("generated_tokens_total", "counter", "Tokens generated."),
        ("prompt_tokens_total", "counter", "Prompt tokens prefilled."),
        ("decode_steps_total", "counter", "Batched decode steps."),
        (
            "batch_rows_total",
            "counter",
            "Sum of batch sizes over decode steps (mean batch = this / decode_steps_total).",
        ),
        (
            "kv_cache_bytes",
            "gauge",
            "Bytes the running batch's KV cache holds.",
        ),
        (
            "kv_cache_peak_bytes",
            "gauge",
            "The most bytes the KV cache has held.",
        ),
        (
            "kv_cache_budget_bytes",
            "gauge",
            "The KV cache budget (0: none).",
        ),
        (
            "preemptions_total",
            "counter",
            "Sequences preempted to keep the KV cache within its budget.",
        ),
        (
            "preempted_waiting",
            "gauge",
            "Preempted sequences waiting to resume.",
        ),
    ];
    for (name, kind, help) in gauges {
        out += &format!("# HELP ferrotune_{name} {help}\n# TYPE ferrotune_{name} {kind}\n");
        for d in &s.endpoint.deployments {
            let st = &d.engine.stats;
            let v = match name {
                "queue_depth" => st.queued.load(Ordering::Relaxed) as u64,
                "active_sequences" => st.active.load(Ordering::Relaxed) as u64,
                "generated_tokens_total" => st.generated_tokens.load(Ordering::Relaxed),
                "prompt_tokens_total" => st.prompt_tokens.load(Ordering::Relaxed),
                "decode_steps_total" => st.decode_steps.load(Ordering::Relaxed),
                "batch_rows_total" => st.batch_rows.load(Ordering::Relaxed),
                "kv_cache_bytes" => st.kv_cache_bytes.load(Ordering::Relaxed),
                "kv_cache_peak_bytes" => st.kv_cache_peak_bytes.load(Ordering::Relaxed),
                "kv_cache_budget_bytes" => st.kv_cache_budget_bytes.load(Ordering::Relaxed),
                "preemptions_total" => st.preemptions.load(Ordering::Relaxed),
                _ => st.preempted_waiting.load(Ordering::Relaxed) as u64,
            };
            out += &format!("ferrotune_{name}{{deployment=\"{}\"}} {v}\n", d.name);
        }
    }
    type Pick = fn(&EngineStats) -> &Histogram;
    let histograms: [(&str, &str, Pick); 3] = [
        (
            "time_to_first_token_seconds",
            "Time from admission to the first token.",
            |st| &st.time_to_first_token,
        ),
        (
            "request_duration_seconds",
            "Time from admission to the last token, per finished request.",
            |st| &st.request_duration,
        ),
        (
            "time_per_output_token_seconds",
            "Mean time between tokens after the first, per request of two or more tokens.",
            |st| &st.time_per_output_token,
        ),
    ];
    for (name, help, pick) in histograms {
        out += &format!("# HELP ferrotune_{name} {help}\n# TYPE ferrotune_{name} histogram\n");
        for d in &s.endpoint.deployments {
            pick(&d.engine.stats).render(&format!("ferrotune_{name}"), &d.name, &mut out);
        }
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

async fn models(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    s.authorize(&headers)?;
    let data: Vec<Value> = s
        .endpoint
        .deployments
        .iter()
        .map(|d| json!({"id": d.name, "object": "model", "created": s.started, "owned_by": "ferrotune", "root": d.model}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn get_traffic(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    if !s.keys.allows_admin(&headers) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the admin key is required",
        ));
    }
    let t: serde_json::Map<String, Value> = s
        .endpoint
        .traffic()
        .into_iter()
        .map(|(n, p)| (n, json!(p)))
        .collect();
    Ok(Json(Value::Object(t)).into_response())
}

/// `PUT /admin/traffic` with `{"blue": 90, "green": 10}` (or `"blue=90,green=10"`).
async fn put_traffic(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !s.keys.allows_admin(&headers) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the admin key is required",
        ));
    }
    let traffic = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => m
            .into_iter()
            .map(|(k, v)| {
                v.as_u64()
                    .map(|p| (k.clone(), p as u32))
                    .ok_or_else(|| ApiError::bad(&k, "expected a whole percentage"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Ok(Value::String(t)) => parse_traffic(&t).map_err(|m| ApiError::bad("traffic", m))?,
        _ => return Err(ApiError::bad("body", "expected {\"NAME\": PERCENT, ...}")),
    };
    s.endpoint
        .set_traffic(traffic)
        .map_err(|m| ApiError::bad("traffic", m))?;
    tracing::info!("traffic now {:?}", s.endpoint.traffic());
    get_traffic(State(s), headers).await
}

/// Prompt ids of one input.
fn prompt_ids(d: &Deployment, input: &Input, field: &str) -> Result<Vec<u32>, ApiError> {
    let ids = match input {
        Input::Chat(messages) => {
            let text = d
                .template
                .render(messages, true)
                .map_err(|e| ApiError::bad(field, format!("chat template: {e}")))?;
            d.tokenizer
                .encode(&text)
                .map_err(|e| ApiError::bad(field, format!("tokenizing: {e}")))?
                .ids
        }
        Input::Text(text) => d
            .tokenizer
            .encode_prompt(text)
            .map_err(|e| ApiError::bad(field, format!("tokenizing: {e}")))?,
    };
    if ids.is_empty() {
        return Err(ApiError::bad(field, "is empty"));
    }
    Ok(ids)
}

/// Sets the cancel flag when the request's future is dropped (client gone).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Run one choice to the end; `deltas` receives text as it becomes final (streaming).
async fn drive(
    d: &Deployment,
    prompt: Vec<u32>,
    params: crate::engine::GenParams,
    stops: Vec<String>,
    timeout: Duration,
    deltas: Option<(usize, mpsc::UnboundedSender<(usize, String)>)>,
) -> Result<Outcome, ApiError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let deadline = Instant::now() + timeout;
    let prompt_tokens = prompt.len();
    d.engine
        .submit(GenRequest {
            prompt,
            params,
            events: tx,
            cancel: cancel.clone(),
            deadline,
        })
        .map_err(|r| match r {
            Rejected::QueueFull => ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!("deployment {} is at its queue limit; retry shortly", d.name),
                param: None,
                retry_after: Some(1),
            },
            Rejected::Stopped => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is stopping")
            }
        })?;
    let mut text = String::new();
    let mut detok = Detokenizer::new(&d.tokenizer, stops);
    let timed_out = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "no answer within the request timeout of {} s",
                timeout.as_secs_f64()
            ),
        )
    };
    loop {
        let event =
            tokio::time::timeout_at((deadline + Duration::from_millis(500)).into(), rx.recv())
                .await
                .map_err(|_| timed_out())?;
        match event {
            Some(Event::Token(id)) => {
                let piece = detok.push(id);
                if !piece.is_empty() {
                    text.push_str(&piece);
                    if let Some((choice, tx)) = &deltas {
                        if tx.send((*choice, piece)).is_err() {
                            return Err(ApiError::new(StatusCode::BAD_REQUEST, "client went away"));
                        }
                    }
                }
                if detok.stopped() {
                    cancel.store(true, Ordering::Relaxed);
                    return Ok(Outcome {
                        text,
                        reason: FinishReason::Stop,
                        prompt_tokens,
                        completion_tokens: detok.tokens(),
                    });
                }
            }
            Some(Event::Finished {
                reason,
                completion_tokens,
                ..
            }) => {
                if reason == FinishReason::Timeout {
                    return Err(timed_out());
                }
                let rest = detok.finish();
                text.push_str(&rest);
                if let (Some((choice, tx)), false) = (&deltas, rest.is_empty()) {
                    let _ = tx.send((*choice, rest));
                }
                return Ok(Outcome {
                    text,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                });
            }
            Some(Event::Failed(m)) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine stopped",
                ))
            }
        }
    }
}

/// Every choice of every input, concurrently (they batch together in the engine).
async fn run_job(
    s: &AppState,
    d: &Deployment,
    job: &Job,
    field: &str,
) -> Result<Vec<Vec<Outcome>>, ApiError> {
    let mut futures = Vec::new();
    for (i, input) in job.inputs.iter().enumerate() {
        let at = if job.inputs.len() > 1 {
            format!("{field}[{i}]")
        } else {
            field.to_string()
        };
        let prompt = prompt_ids(d, input, &at)?;
        for c in 0..job.n {
            let params = job.params(c, prompt.len(), d.engine.context)?;
            futures.push(drive(
                d,
                prompt.clone(),
                params,
                job.stops.clone(),
                s.timeout,
                None,
            ));
        }
    }
    let results = futures_util::future::join_all(futures).await;
    let mut flat = results.into_iter();
    let mut out = Vec::new();
    for _ in &job.inputs {
        let mut choices = Vec::new();
        for _ in 0..job.n {
            choices.push(flat.next().expect("one per choice")?);
        }
        out.push(choices);
    }
    Ok(out)
}

fn with_deployment(mut resp: Response, d: &Deployment) -> Response {
    if let Ok(v) = HeaderValue::from_str(&d.name) {
        resp.headers_mut().insert("azureml-model-deployment", v);
    }
    resp
}

async fn score(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        s.authorize(&headers)?;
        let job = score_job(&parse_json(&body)?)?;
        let d = s.pick(&headers, None)?;
        let outs = run_job(&s, d, &job, "input_data.input_string").await?;
        let answers: Vec<Value> = outs.iter().map(|c| json!({"output": c[0].text})).collect();
        let body = if answers.len() == 1 {
            answers[0].clone()
        } else {
            Value::Array(answers)
        };
        Ok::<_, ApiError>(with_deployment(Json(body).into_response(), d))
    }
    .await;
    finish(&s, "/score", result)
}

async fn invocations(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        s.authorize(&headers)?;
        let job = invocations_job(&parse_json(&body)?)?;
        let d = s.pick(&headers, None)?;
        let outs = run_job(&s, d, &job, "messages").await?;
        Ok::<_, ApiError>(with_deployment(
            Json(completion(&s, d, &outs[0])).into_response(),
            d,
        ))
    }
    .await;
    finish(&s, "/invocations", result)
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

fn completion(s: &AppState, d: &Deployment, choices: &[Outcome]) -> Value {
    let prompt_tokens = choices.first().map_or(0, |c| c.prompt_tokens);
    let completion_tokens: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({
        "id": format!("chatcmpl-{}", s.ids.fetch_add(1, Ordering::Relaxed)),
        "object": "chat.completion",
        "created": unix_s(),
        "model": d.name,
        "choices": choices.iter().enumerate().map(|(i, c)| json!({
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": finish_reason(c.reason),
        })).collect::<Vec<_>>(),
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })
}

async fn chat_completions(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        s.authorize(&headers)?;
        let job = openai_job(&parse_json(&body)?)?;
        let d = s.pick(&headers, job.model.as_deref())?;
        if !job.stream {
            let outs = run_job(&s, d, &job, "messages").await?;
            return Ok(with_deployment(
                Json(completion(&s, d, &outs[0])).into_response(),
                d,
            ));
        }
        stream(&s, d, job).map(|r| with_deployment(r, d))
    }
    .await;
    finish(&s, "/v1/chat/completions", result)
}

/// Server-sent events: a role chunk, content deltas per choice, a finish chunk per choice,
/// optionally usage, then `[DONE]`.
fn stream(s: &AppState, d: &Deployment, job: Job) -> Result<Response, ApiError> {
    let Input::Chat(_) = &job.inputs[0] else {
        unreachable!("chat requests carry messages")
    };
    let prompt = prompt_ids(d, &job.inputs[0], "messages")?;
    let mut params = Vec::with_capacity(job.n);
    for c in 0..job.n {
        params.push(job.params(c, prompt.len(), d.engine.context)?);
    }
    let id = format!("chatcmpl-{}", s.ids.fetch_add(1, Ordering::Relaxed));
    let created = unix_s();
    let model = d.name.clone();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Result<String, std::io::Error>>();
    let endpoint = s.endpoint.clone();
    let name = d.name.clone();
    let timeout = s.timeout;
    let stops = job.stops.clone();
    let include_usage = job.include_usage;
    tokio::spawn(async move {
        let d = endpoint.get(&name).expect("deployment exists");
        let chunk = |choice: usize, delta: Value, reason: Option<&str>| -> String {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": choice, "delta": delta, "finish_reason": reason}]});
            format!("data: {v}\n\n")
        };
        for c in 0..params.len() {
            if out_tx
                .send(Ok(chunk(
                    c,
                    json!({"role": "assistant", "content": ""}),
                    None,
                )))
                .is_err()
            {
                return;
            }
        }
        let mut runs = Vec::new();
        let (delta_tx, mut delta_rx) = mpsc::unbounded_channel::<(usize, String)>();
        for (c, p) in params.into_iter().enumerate() {
            runs.push(drive(
                d,
                prompt.clone(),
                p,
                stops.clone(),
                timeout,
                Some((c, delta_tx.clone())),
            ));
        }
        drop(delta_tx);
        let all = futures_util::future::join_all(runs);
        tokio::pin!(all);
        let results = loop {
            tokio::select! {
                Some((c, piece)) = delta_rx.recv() => {
                    if out_tx.send(Ok(chunk(c, json!({"content": piece}), None))).is_err() {
                        return; // client gone: dropping `all` cancels every choice
                    }
                }
                results = &mut all => break results,
            }
        };
        while let Ok((c, piece)) = delta_rx.try_recv() {
            let _ = out_tx.send(Ok(chunk(c, json!({"content": piece}), None)));
        }
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        for (c, r) in results.into_iter().enumerate() {
            match r {
                Ok(o) => {
                    prompt_tokens = o.prompt_tokens;
                    completion_tokens += o.completion_tokens;
                    let _ = out_tx.send(Ok(chunk(c, json!({}), Some(finish_reason(o.reason)))));
                }
                Err(e) => {
                    let _ = out_tx.send(Ok(format!(
                        "data: {}\n\n",
                        json!({"error": {"message": e.message, "code": e.status.as_u16()}})
                    )));
                }
            }
        }
        if include_usage {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                                     "total_tokens": prompt_tokens + completion_tokens}});
            let _ = out_tx.send(Ok(format!("data: {v}\n\n")));
        }
        let _ = out_tx.send(Ok("data: [DONE]\n\n".to_string()));
    });
    let body = Body::from_stream(futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .expect("static headers"))
}

fn finish(s: &AppState, route: &str, result: Result<Response, ApiError>) -> Response {
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::error!("{route}: {}", e.message);
            }
            e.into_response()
        }
    };
    s.count(route, resp.status());
    resp
}

/// One short generation per deployment, so `/readyz` means the first request will not pay for
/// lazy initialisation.
pub async fn warm_up(endpoint: &Endpoint) -> Result<(), String> {
    for d in &endpoint.deployments {
        let prompt = d
            .tokenizer
            .encode_prompt("Hello")
            .map_err(|e| format!("{}: tokenizing the warm-up prompt: {e}", d.name))?;
        let params = crate::engine::GenParams {
            max_new_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        };
        drive(
            d,
            prompt,
            params,
            Vec::new(),
            Duration::from_secs(600),
            None,
        )
        .await
        .map_err(|e| format!("{}: warm-up generation failed: {}", d.name, e.message))?;
    }
    Ok(())
}
