//! A local stand-in for Azure, for tests (feature `fake`): ARM routes answered from the API
//! specification's own examples (`fixtures/azure/examples`), which also check every request body
//! the client sends; long-running operations that take several polls; throttling; run history
//! with a growing user log; and AAD / managed-identity token endpoints.

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

pub const TOKEN: &str = "test-arm-token";

/// What the fake job's user log holds after each status poll.
pub const LOG_LINES: [&str; 3] = [
    "step 1 loss 2.31\n",
    "step 2 loss 2.05\n",
    "saved checkpoint-2\n",
];

pub fn examples_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // The shared folder sits beside the repository in this workplace; CI's clean clone has a copy
    // committed under fixtures/azure/examples.
    for candidate in [
        here.join("../../fixtures/azure/examples"),
        here.join("../../../shared/azure/examples"),
    ] {
        if candidate.is_dir() {
            return candidate;
        }
    }
    panic!("no Azure API examples under fixtures/azure/examples");
}

pub fn example(rel: &str) -> Value {
    let path = examples_dir().join(rel);
    serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

#[derive(Clone)]
pub struct Route {
    pub method: &'static str,
    /// Path segments; `{}` matches any one segment.
    pub template: String,
    pub example: Option<&'static str>,
    pub status: u16,
    /// Spec fields the example shows in another variant (the example's PyTorch-less job, say).
    pub extra_fields: Vec<&'static str>,
    pub overrides: Value,
    pub long_running: bool,
}

pub fn route(
    method: &'static str,
    template: &str,
    example: Option<&'static str>,
    status: u16,
) -> Route {
    Route {
        method,
        template: template.to_string(),
        example,
        status,
        extra_fields: Vec::new(),
        overrides: Value::Null,
        long_running: false,
    }
}

const WS: &str =
    "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.MachineLearningServices/workspaces/{}";

pub fn ws(rest: &str) -> String {
    if rest.is_empty() {
        WS.to_string()
    } else {
        format!("{WS}/{rest}")
    }
}

#[derive(Default)]
pub struct FakeState {
    pub routes: Vec<Route>,
    pub seen: Vec<Seen>,
    pub operations: HashMap<String, u32>,
    /// Answer the next N requests to this path with 429.
    pub throttle: HashMap<String, u32>,
    pub job_polls: u32,
    pub polls_per_operation: u32,
    pub base: String,
    pub tokens_issued: u32,
}

pub struct FakeAzure {
    pub base: String,
    pub state: Arc<Mutex<FakeState>>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeAzure {
    pub fn start(routes: Vec<Route>) -> FakeAzure {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(FakeState {
            routes,
            base: base.clone(),
            polls_per_operation: 2,
            ..Default::default()
        }));
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeAzure {
            base,
            state,
            _runtime: runtime,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub fn arm_seen(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path.starts_with("/subscriptions/"))
            .collect()
    }
}

fn matches(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.trim_matches('/').split('/').collect();
    let p: Vec<&str> = path.trim_matches('/').split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(a, b)| *a == "{}" || a.eq_ignore_ascii_case(b))
}

/// Every field the client sends must exist at the same place in the spec's example, with the
/// same JSON type. An object whose only key is "string" (or that is empty) is a free-form map.
pub fn conforms(sent: &Value, example: &Value, at: &str, extra: &[&str]) -> Result<(), String> {
    match (sent, example) {
        (_, Value::Null) | (Value::Null, _) => Ok(()),
        (Value::Object(s), Value::Object(e)) => {
            let map_of = if e.is_empty() {
                Some(&Value::Null)
            } else if e.len() == 1 {
                e.get("string")
            } else {
                None
            };
            for (k, v) in s {
                let here = format!("{at}.{k}");
                if let Some(item) = map_of {
                    conforms(v, item, &format!("{at}.*"), extra)?;
                } else if let Some(ev) = e.get(k) {
                    conforms(v, ev, &here, extra)?;
                } else if !extra.iter().any(|x| *x == here.trim_start_matches('.')) {
                    return Err(format!(
                        "`{}` is not in the specification's example",
                        here.trim_start_matches('.')
                    ));
                }
            }
            Ok(())
        }
        (Value::Array(s), Value::Array(e)) => match e.first() {
            Some(item) => s
                .iter()
                .try_for_each(|v| conforms(v, item, &format!("{at}[]"), extra)),
            None => Ok(()),
        },
        (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_)) => Ok(()),
        (s, e) => Err(format!(
            "`{}` is {s} where the example has {e}",
            at.trim_start_matches('.')
        )),
    }
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) if !o.is_null() => *b = o.clone(),
        _ => {}
    }
}

fn reply(status: u16, body: Value, headers: &[(&str, String)]) -> Response {
    let mut response = if body.is_null() {
        StatusCode::from_u16(status).unwrap().into_response()
    } else {
        (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
    };
    for (k, v) in headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    response
        .headers_mut()
        .insert("x-ms-request-id", "req-0001".parse().unwrap());
    response
}

fn arm_error(status: u16, code: &str, message: &str) -> Response {
    reply(
        status,
        json!({"error": {"code": code, "message": message}}),
        &[],
    )
}

async fn handle(
    State(state): State<Arc<Mutex<FakeState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let body_json: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).to_string()))
    };
    let mut st = state.lock().unwrap();
    st.seen.push(Seen {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: body_json.clone(),
    });

    // Token endpoints.
    if path.ends_with("/oauth2/v2.0/token") {
        let form: HashMap<String, String> = serde_urlencoded_pairs(&String::from_utf8_lossy(&body));
        if form.get("client_secret").map(String::as_str) == Some("wrong") {
            return reply(
                401,
                json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}),
                &[],
            );
        }
        let grant_ok = form.get("grant_type").map(String::as_str) == Some("client_credentials")
            && form.get("scope").map(String::as_str)
                == Some("https://management.azure.com/.default")
            && (form.contains_key("client_secret")
                || form.get("client_assertion").map(String::as_str) == Some("federated-jwt"));
        if !grant_ok {
            return reply(
                400,
                json!({"error": "invalid_request", "error_description": format!("unexpected form {form:?}")}),
                &[],
            );
        }
        st.tokens_issued += 1;
        return reply(
            200,
            json!({"token_type": "Bearer", "expires_in": 3599, "access_token": jwt("aad")}),
            &[],
        );
    }
    if path == "/msi/token" {
        let q = serde_urlencoded_pairs(&query);
        let ok = headers.get("secret").and_then(|v| v.to_str().ok()) == Some("msi-secret")
            && q.get("api-version").map(String::as_str) == Some("2017-09-01")
            && q.get("resource").map(String::as_str) == Some("https://management.azure.com")
            && q.get("clientid").map(String::as_str) == Some("compute-identity");
        if !ok {
            return reply(
                400,
                json!({"message": format!("bad MSI request {q:?}")}),
                &[],
            );
        }
        st.tokens_issued += 1;
        let on = (std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        return reply(
            200,
            json!({"access_token": jwt("msi"), "expires_on": on.to_string(), "token_type": "Bearer"}),
            &[],
        );
    }
    if path == "/metadata/identity/oauth2/token" {
        let q = serde_urlencoded_pairs(&query);
        let ok = headers.get("metadata").and_then(|v| v.to_str().ok()) == Some("true")
            && q.get("api-version").map(String::as_str) == Some("2019-08-01");
        if !ok {
            return reply(400, json!({"error": "invalid_request"}), &[]);
        }
        st.tokens_issued += 1;
        return reply(
            200,
            json!({"access_token": jwt("imds"), "expires_in": "3599"}),
            &[],
        );
    }

    // Long-running operations.
    if let Some(id) = path.strip_prefix("/operations/") {
        let polls = st.polls_per_operation;
        let n = st.operations.entry(id.to_string()).or_insert(0);
        *n += 1;
        let done = *n > polls;
        return if id.starts_with("loc-") {
            if done {
                reply(200, Value::Null, &[])
            } else {
                reply(202, Value::Null, &[("Retry-After", "0".into())])
            }
        } else if done {
            reply(200, json!({"status": "Succeeded"}), &[])
        } else {
            reply(
                200,
                json!({"status": "InProgress"}),
                &[("Retry-After", "0".into())],
            )
        };
    }

    // Run history: discovery, run details with SAS log URLs, and a log that grows per job poll.
    if path == "/discovery" {
        let base = st.base.clone();
        return reply(200, json!({"history": base, "api": base}), &[]);
    }
    if path.starts_with("/history/v1.0/subscriptions/") && path.ends_with("/details") {
        let log = format!("{}/logs/std_log.txt?sv=2021&sig=secret", st.base);
        return reply(
            200,
            json!({"status": "Running", "logFiles": {"user_logs/std_log.txt": log, "system_logs/x.txt": log}}),
            &[],
        );
    }
    if path == "/logs/std_log.txt" {
        let full = LOG_LINES[..(st.job_polls as usize).min(LOG_LINES.len())].concat()
            + "partial line without newline";
        let from: usize = headers
            .get("range")
            .and_then(|v| v.to_str().ok())
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.trim_end_matches('-').parse().ok())
            .unwrap_or(0);
        if from >= full.len() {
            return reply(416, Value::Null, &[]);
        }
        return (StatusCode::PARTIAL_CONTENT, full[from..].to_string()).into_response();
    }
    // A scoring endpoint behind the fake online endpoint (its scoringUri is {base}/score).
    if path == "/score" {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if auth != "Bearer primary-endpoint-key" {
            return reply(401, json!({"message": "invalid key"}), &[]);
        }
        let deployment = headers
            .get("azureml-model-deployment")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("demo")
            .to_string();
        let rows = body_json
            .pointer("/input_data/input_string")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        return reply(
            200,
            json!({"output": format!("{rows} conversation(s) scored")}),
            &[("azureml-model-deployment", deployment)],
        );
    }
    if !path.starts_with("/subscriptions/") {
        return arm_error(404, "NotFound", &format!("no route {path}"));
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let issued = ["aad", "msi", "imds"].map(|w| format!("Bearer {}", jwt(w)));
    if bearer != format!("Bearer {TOKEN}") && !issued.iter().any(|t| t == bearer) {
        return arm_error(401, "AuthenticationFailed", "missing or wrong bearer token");
    }
    if !query.split('&').any(|p| p == "api-version=2024-10-01") {
        return arm_error(
            400,
            "MissingApiVersionParameter",
            "api-version=2024-10-01 expected",
        );
    }
    if let Some(n) = st.throttle.get_mut(&path) {
        if *n > 0 {
            *n -= 1;
            return reply(
                429,
                json!({"error": {"code": "TooManyRequests", "message": "slow down"}}),
                &[("Retry-After", "1".into())],
            );
        }
    }
    let Some(r) = st
        .routes
        .iter()
        .find(|r| r.method == method.as_str() && matches(&r.template, &path))
        .cloned()
    else {
        return arm_error(
            404,
            "ResourceNotFound",
            &format!("The resource {path} was not found."),
        );
    };
    let Some(ex) = r.example else {
        let mut body = r.overrides.clone();
        if path.contains("/jobs/") && method == Method::GET {
            st.job_polls += 1;
            let status = if st.job_polls >= 3 {
                "Completed"
            } else {
                "Running"
            };
            body = json!({"properties": {"status": status, "services": {"Studio": {"endpoint": "https://ml.azure.com/runs/x"}}}});
        }
        return reply(r.status, body, &[]);
    };
    let spec = example(ex);
    if let Some(expected_body) = spec.pointer("/parameters/body") {
        if let Err(why) = conforms(&body_json, expected_body, "", &r.extra_fields) {
            return arm_error(400, "SpecMismatch", &format!("{} {path}: {why}", method));
        }
    }
    let mut answer = spec
        .pointer(&format!("/responses/{}/body", r.status))
        .cloned()
        .unwrap_or(Value::Null);
    merge(&mut answer, &r.overrides);
    if path.contains("/jobs/") && method == Method::GET {
        st.job_polls += 1;
        let status = if st.job_polls >= 3 {
            "Completed"
        } else {
            "Running"
        };
        answer["properties"]["status"] = json!(status);
    }
    let mut hdrs = Vec::new();
    if r.long_running {
        let id = format!("op-{}", st.seen.len());
        hdrs.push((
            "Azure-AsyncOperation",
            format!("{}/operations/{id}", st.base),
        ));
        hdrs.push(("Retry-After", "0".to_string()));
    }
    if method == Method::DELETE {
        let id = format!("loc-{}", st.seen.len());
        hdrs.push(("Location", format!("{}/operations/{id}", st.base)));
        hdrs.push(("Retry-After", "0".to_string()));
    }
    reply(r.status, answer, &hdrs)
}

fn serde_urlencoded_pairs(text: &str) -> HashMap<String, String> {
    text.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .to_string()
}

/// An unsigned JWT whose claims say who holds it (enough for `identity_of`).
pub fn jwt(who: &str) -> String {
    use base64::Engine;
    let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.sig",
        enc(json!({"alg": "none", "typ": "JWT"})),
        enc(
            json!({"upn": format!("{who}@contoso.com"), "oid": "00000000-0000-0000-0000-0000000000aa", "tid": "tenant-1"})
        )
    )
}

/// Every ARM route the source's flow touches, answered from the specification's examples.
pub fn azure_routes() -> Vec<Route> {
    let mut routes = vec![
        route("GET", WS, Some("Workspace/get.json"), 200),
        route("GET", &ws("datastores/{}"), Some("Datastore/get.json"), 200),
        route(
            "POST",
            &ws("datastores/{}/listSecrets"),
            Some("Datastore/listSecrets.json"),
            200,
        ),
        route(
            "PUT",
            &ws("models/{}/versions/{}"),
            Some("Workspace/ModelVersion/createOrUpdate.json"),
            201,
        ),
        route(
            "GET",
            &ws("onlineEndpoints/{}"),
            Some("Workspace/OnlineEndpoint/get.json"),
            200,
        ),
        route(
            "GET",
            &ws("onlineEndpoints/{}/deployments/{}"),
            Some("OnlineDeployment/ManagedOnlineDeployment/get.json"),
            200,
        ),
        route(
            "DELETE",
            &ws("onlineEndpoints/{}"),
            Some("Workspace/OnlineEndpoint/delete.json"),
            202,
        ),
        route(
            "GET",
            "/subscriptions/{}/providers/Microsoft.MachineLearningServices/locations/{}/vmSizes",
            Some("VirtualMachineSize/list.json"),
            200,
        ),
        route(
            "POST",
            &ws("codes/{}/versions/{}/startPendingUpload"),
            Some("Workspace/CodeVersion/createOrGetStartPendingUpload.json"),
            200,
        ),
        route(
            "PUT",
            &ws("codes/{}/versions/{}"),
            Some("Workspace/CodeVersion/createOrUpdate.json"),
            201,
        ),
        route("GET", &ws("jobs/{}"), Some("Job/CommandJob/get.json"), 200),
    ];
    let mut endpoint = route(
        "PUT",
        &ws("onlineEndpoints/{}"),
        Some("Workspace/OnlineEndpoint/createOrUpdate.json"),
        201,
    );
    endpoint.long_running = true;
    let mut deployment = route(
        "PUT",
        &ws("onlineEndpoints/{}/deployments/{}"),
        Some("OnlineDeployment/ManagedOnlineDeployment/createOrUpdate.json"),
        201,
    );
    deployment.long_running = true;
    // listKeys has no example for 2024-10-01 (see SOURCE.md): the documented shape.
    let mut keys = route("POST", &ws("onlineEndpoints/{}/listKeys"), None, 200);
    keys.overrides =
        json!({"primaryKey": "primary-endpoint-key", "secondaryKey": "secondary-endpoint-key"});
    let mut job = route(
        "PUT",
        &ws("jobs/{}"),
        Some("Job/CommandJob/createOrUpdate.json"),
        201,
    );
    // The example shows TensorFlow's distribution and a literal input; PyTorch's process count
    // and a folder input's uri/mode are the same schema's other variants.
    job.extra_fields = vec![
        "properties.distribution.processCountPerInstance",
        "properties.inputs.*.uri",
        "properties.inputs.*.mode",
    ];
    routes.extend([endpoint, deployment, keys, job]);
    routes
}

/// Azurite's published development account: for emulators only.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running `azurite-blob`, stopped (and its data removed) when dropped.
pub struct Azurite {
    child: Child,
    /// `http://127.0.0.1:PORT/devstoreaccount1`: the account URL.
    pub url: String,
    data: PathBuf,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// `FERROTUNE_AZURITE_BLOB`, else `.azurite/` at the repository root (scripts/install-azurite.sh).
pub fn azurite_program() -> PathBuf {
    if let Ok(p) = std::env::var("FERROTUNE_AZURITE_BLOB") {
        return PathBuf::from(p);
    }
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.azurite/node_modules/.bin/azurite-blob");
    assert!(p.exists(), "Azurite is not installed: run scripts/install-azurite.sh (needs npm), or set FERROTUNE_AZURITE_BLOB");
    p
}

/// Starts Azurite's blob service on a free loopback port and waits until it listens.
pub fn start_azurite() -> Azurite {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data =
        std::env::temp_dir().join(format!("ferrotune-azurite-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    let child = Command::new(azurite_program())
        .args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--skipApiVersionCheck",
            "--silent",
            "--location",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start azurite-blob");
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Azurite did not listen on {port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Azurite {
        child,
        url: format!("http://127.0.0.1:{port}/{ACCOUNT}"),
        data,
    }
}
