//! The server on the tiny chat fixture, in-process on a free port: batching gives the answers
//! `generate` gives, streaming, auth, limits, timeouts, validation and traffic.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ferrotune_model::generate::{generate, Sampling};
use ferrotune_serve::{engine, Deployment, Endpoint, Keys, ServerOptions};

mod common;
use common::{chat_model, chat_parts, prompt_ids, QUESTIONS};
use serde_json::{json, Value};

const KEY: &str = "0123456789abcdef-primary";
const SECOND: &str = "0123456789abcdef-secondary";

fn deployment(name: &str, max_batch: usize, max_queue: usize) -> Deployment {
    let dir = chat_model();
    let (loaded, tokenizer, template) = chat_parts();
    Deployment {
        name: name.into(),
        model: dir.display().to_string(),
        engine: engine::start(loaded.model, loaded.stop_ids, max_batch, max_queue),
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
    }
}

/// A server on a free port; returns its base URL (it lives until the test process ends).
fn start(
    deployments: Vec<Deployment>,
    traffic: Vec<(String, u32)>,
    keys: Keys,
    timeout: Duration,
) -> String {
    let endpoint = Arc::new(Endpoint::new(deployments, traffic).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let ready = Arc::new(AtomicBool::new(true));
            let opts = ServerOptions {
                keys,
                request_timeout: timeout,
                max_body_bytes: 1 << 20,
                grace: Duration::from_secs(1),
            };
            ferrotune_serve::serve(listener, endpoint, opts, ready, std::future::pending())
                .await
                .unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn post(url: &str, body: &Value, key: Option<&str>) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = client().post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        headers,
    )
}

/// Greedy answers from the model crate's `generate`, one prompt at a time.
fn reference_answers(max_new: usize) -> Vec<String> {
    let (loaded, tokenizer, template) = chat_parts();
    QUESTIONS
        .iter()
        .map(|q| {
            let ids = prompt_ids(&tokenizer, &template, q);
            let s = Sampling {
                max_new_tokens: max_new,
                stop_ids: loaded.stop_ids.clone(),
                ..Default::default()
            };
            let out = generate(&loaded.model, &[ids], &s).unwrap().remove(0);
            tokenizer.decode_text(&out).unwrap()
        })
        .collect()
}

fn chat(q: &str, extra: Value) -> Value {
    let mut body = json!({"model": "demo", "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 24});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn concurrent_requests_batch_and_answer_as_generate_does() {
    let base = start(
        vec![deployment("demo", 8, 64)],
        vec![],
        Keys::default(),
        Duration::from_secs(60),
    );
    let expected = reference_answers(24);
    let url = format!("{base}/v1/chat/completions");
    // One at a time.
    for (q, want) in QUESTIONS.iter().zip(&expected) {
        let (status, v, _) = post(&url, &chat(q, json!({})), None);
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            want.trim_end().to_string().as_str().trim_end()
        );
    }
    // All at once, twice over: they share decode steps.
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || post(&url, &chat(QUESTIONS[i % 6], json!({})), None))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, v, _) = h.join().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            expected[i % 6].trim_end(),
            "question {i}"
        );
    }
    let metrics = client()
        .get(format!("{base}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let mean_batch = value("ferrotune_batch_rows_total") / value("ferrotune_decode_steps_total");
    assert!(
        mean_batch > 1.5,
        "requests were batched: mean batch {mean_batch}"
    );
    assert!(metrics
        .contains("ferrotune_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 18"));
    // Latency histograms: every finished request observed once; buckets cumulative to +Inf.
    let finished = value("ferrotune_request_duration_seconds_count");
    assert!(
        finished >= 18.0,
        "{finished} requests in the duration histogram"
    );
    assert_eq!(
        value("ferrotune_request_duration_seconds_bucket{deployment=\"demo\",le=\"+Inf\"}"),
        finished
    );
    assert_eq!(
        value("ferrotune_time_to_first_token_seconds_count"),
        finished
    );
    assert!(metrics.contains("# TYPE ferrotune_time_per_output_token_seconds histogram"));
    assert!(value("ferrotune_time_per_output_token_seconds_sum") > 0.0);

    // Streaming: the deltas add up to the same answer; [DONE] last; usage when asked.
    let text = client()
        .post(&url)
        .json(&chat(
            QUESTIONS[1],
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, expected[1].trim_end());
    assert!(
        chunks.last().unwrap()["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Seeded sampling is reproducible, and n gives n choices.
    let sampled = chat(
        QUESTIONS[4],
        json!({"temperature": 1.2, "seed": 11, "n": 3}),
    );
    let (_, a, _) = post(&url, &sampled, None);
    let (_, b, _) = post(&url, &sampled, None);
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);

    // The source's scoring contract.
    let (status, v, headers) = post(
        &format!("{base}/score"),
        &json!({"input_data": {"input_string": [[{"role": "user", "content": QUESTIONS[0]}]],
                               "parameters": {"max_new_tokens": 24}}, "params": {}}),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["output"], expected[0].trim_end());
    assert_eq!(headers["azureml-model-deployment"], "demo");
    // MLflow's: a chat completion.
    let (status, v, _) = post(
        &format!("{base}/invocations"),
        &json!({"messages": [{"role": "user", "content": QUESTIONS[0]}], "temperature": 0.0, "max_tokens": 24}),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
}

#[test]
fn mistakes_limits_and_timeouts_get_their_status_codes() {
    let keys = Keys {
        keys: vec![KEY.into(), SECOND.into()],
        admin: None,
    };
    let base = start(
        vec![deployment("demo", 1, 1)],
        vec![],
        keys,
        Duration::from_millis(1500),
    );
    let url = format!("{base}/v1/chat/completions");
    let (status, v, _) = post(&url, &chat("hi", json!({})), None);
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"]["type"], "authentication_error");
    let (status, _, _) = post(
        &url,
        &chat("hi", json!({})),
        Some("0123456789abcdef-wrong!!"),
    );
    assert_eq!(status, 401);
    let (status, _, _) = post(&url, &chat("hi", json!({})), Some(SECOND));
    assert_eq!(status, 200);
    let resp = client()
        .post(&url)
        .header("api-key", KEY)
        .json(&chat("hi", json!({})))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // Probes need no key.
    assert_eq!(
        client()
            .get(format!("{base}/healthz"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    let (status, v, _) = post(
        &url,
        &json!({"messages": [{"role": "robot", "content": "x"}]}),
        Some(KEY),
    );
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "messages[0].role");
    let (status, v, _) = post(&url, &chat("hi", json!({"max_tokens": 100000})), Some(KEY));
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "max_new_tokens");
    let (status, _, _) = post(
        &format!("{base}/score"),
        &json!({"input_data": 3}),
        Some(KEY),
    );
    assert_eq!(status, 400);
    let resp = client()
        .post(&url)
        .bearer_auth(KEY)
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let resp = client()
        .post(&url)
        .bearer_auth(KEY)
        .body(vec![b' '; 2 << 20])
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413, "body size limit");

    // One slot, one queue place: a flood gets 429 with Retry-After, the rest succeed.
    // (Greedy on this random model repeats a word without ever stopping: 200 decode steps.)
    let long = chat(QUESTIONS[1], json!({"max_tokens": 200}));
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let (url, long) = (url.clone(), long.clone());
            std::thread::spawn(move || post(&url, &long, Some(KEY)))
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let too_many: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(
        !too_many.is_empty(),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert_eq!(too_many[0].2["retry-after"], "1");
    assert!(results
        .iter()
        .all(|r| r.0 == 429 || r.0 == 200 || r.0 == 408));

    // A request that cannot finish within the timeout gets 408 (a server whose timeout is zero:
    // every request is past its deadline when admitted), and the server stays healthy.
    let hurried = start(
        vec![deployment("demo", 1, 1)],
        vec![],
        Keys::default(),
        Duration::ZERO,
    );
    let (status, v, _) = post(
        &format!("{hurried}/v1/chat/completions"),
        &chat("Count to a thousand.", json!({"max_tokens": 40})),
        None,
    );
    assert_eq!(status, 408, "{v}");
    assert_eq!(v["error"]["type"], "timeout");
    let (status, _, _) = post(&url, &chat("hi", json!({"max_tokens": 4})), Some(KEY));
    assert_eq!(status, 200);
}

#[test]
fn traffic_splits_pins_and_moves_without_a_restart() {
    let keys = Keys {
        keys: vec![KEY.into()],
        admin: Some("admin-key-0123456789".into()),
    };
    let base = start(
        vec![deployment("blue", 4, 16), deployment("green", 4, 16)],
        vec![("blue".into(), 100), ("green".into(), 0)],
        keys,
        Duration::from_secs(60),
    );
    let score =
        json!({"input_data": {"input_string": ["Hello"], "parameters": {"max_new_tokens": 2}}});
    let served = |pin: Option<&str>| -> String {
        let mut req = client()
            .post(format!("{base}/score"))
            .bearer_auth(KEY)
            .json(&score);
        if let Some(p) = pin {
            req = req.header("azureml-model-deployment", p);
        }
        let resp = req.send().unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.headers()["azureml-model-deployment"]
            .to_str()
            .unwrap()
            .to_string()
    };
    assert!((0..6).all(|_| served(None) == "blue"));
    assert_eq!(served(Some("green")), "green");
    let put = |body: Value, key: &str| {
        client()
            .put(format!("{base}/admin/traffic"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .unwrap()
    };
    assert_eq!(
        put(json!({"blue": 0, "green": 100}), KEY).status().as_u16(),
        401,
        "admin key only"
    );
    let bad = put(json!({"blue": 50, "green": 40}), "admin-key-0123456789");
    assert_eq!(bad.status().as_u16(), 400);
    assert!(bad.text().unwrap().contains("sum to 90"));
    let ok = put(json!({"blue": 0, "green": 100}), "admin-key-0123456789");
    assert_eq!(ok.status().as_u16(), 200);
    assert!((0..6).all(|_| served(None) == "green"));
    let v: Value = client()
        .get(format!("{base}/v1/models"))
        .bearer_auth(KEY)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["blue", "green"]);
}
