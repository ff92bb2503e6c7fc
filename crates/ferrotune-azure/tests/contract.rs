//! The ARM client and the source's flow against a local server that answers from the API
//! specification's examples and refuses any request body the examples do not describe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrotune_azure::credential::{
    identity_of, DefaultCredential, StaticCredential, TokenCredential, ARM_SCOPE,
};
use ferrotune_azure::endpoint::{self, DeploymentSpec};
use ferrotune_azure::fake::{azure_routes, FakeAzure, TOKEN};
use ferrotune_azure::http::{DryRunSink, RetryPolicy, Transport};
use ferrotune_azure::job::{self, CommandJob, JobInput};
use ferrotune_azure::model::{self, ModelVersionSpec};
use ferrotune_azure::{compute, Arm, Workspace};

fn workspace() -> Workspace {
    Workspace {
        subscription_id: "00000000-1111-2222-3333-444444444444".into(),
        resource_group: "test-rg".into(),
        workspace_name: "my-aml-workspace".into(),
    }
}

fn arm_for(fake: &FakeAzure) -> Arm {
    let transport = Transport::new(
        RetryPolicy {
            max_retries: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(2),
        },
        None,
    )
    .unwrap();
    let mut arm = Arm::new(
        transport,
        Arc::new(StaticCredential(TOKEN.into())),
        &fake.base,
        workspace(),
    );
    arm.poll_interval = Duration::from_millis(10);
    arm
}

fn deployment_spec(model_id: &str) -> DeploymentSpec {
    DeploymentSpec {
        endpoint: "ultrachat-completion-1764144000".into(),
        name: "demo".into(),
        model_id: model_id.into(),
        instance_type: "Standard_NC6s_v3".into(),
        instance_count: 1,
        liveness_initial_delay: Duration::from_secs(600),
        request_timeout: Duration::from_secs(90),
    }
}

#[test]
fn the_sources_endpoint_flow_matches_the_specification_and_waits_for_each_operation() {
    let fake = FakeAzure::start(azure_routes());
    let arm = arm_for(&fake);
    let mut said = Vec::new();
    let mut say = |s: &str| said.push(s.to_string());
    let ep = "ultrachat-completion-1764144000";
    endpoint::create_endpoint(
        &arm,
        ep,
        "key",
        "Phi-3 fine tuned for ultrachat-200k chat completion",
        &mut say,
    )
    .unwrap();
    let model_id = model::version_id(&arm, "phi3-ultrachat-200k:1764144000").unwrap();
    endpoint::deploy(&arm, &deployment_spec(&model_id), &mut say).unwrap();
    let traffic = endpoint::parse_traffic("demo=100").unwrap();
    endpoint::set_traffic(&arm, ep, &traffic, &mut say).unwrap();
    let keys = endpoint::keys(&arm, ep).unwrap();
    assert_eq!(keys.primary, "primary-endpoint-key");
    endpoint::delete_endpoint(&arm, ep, &mut say).unwrap();

    // Each long-running operation was polled until it finished, with progress along the way.
    assert!(
        said.iter()
            .any(|s| s.contains("endpoint ultrachat-completion-1764144000: InProgress")),
        "{said:?}"
    );
    assert!(
        said.iter()
            .any(|s| s.contains("deployment ultrachat-completion-1764144000/demo: Succeeded")),
        "{said:?}"
    );
    let polls = fake
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/operations/"))
        .count();
    assert_eq!(
        polls,
        4 * 3,
        "endpoint, deployment, traffic and delete take three polls each"
    );

    let arm_calls = fake.arm_seen();
    let find = |method: &str, suffix: &str| {
        arm_calls
            .iter()
            .find(|s| s.method == method && s.path.ends_with(suffix))
            .unwrap_or_else(|| {
                panic!(
                    "no {method} …{suffix} in {:?}",
                    arm_calls
                        .iter()
                        .map(|s| format!("{} {}", s.method, s.path))
                        .collect::<Vec<_>>()
                )
            })
            .clone()
    };
    let dep = find(
        "PUT",
        "/onlineEndpoints/ultrachat-completion-1764144000/deployments/demo",
    );
    assert_eq!(dep.body["properties"]["instanceType"], "Standard_NC6s_v3");
    assert_eq!(
        dep.body["properties"]["livenessProbe"]["initialDelay"],
        "PT10M"
    );
    assert_eq!(
        dep.body["properties"]["requestSettings"]["requestTimeout"],
        "PT1M30S"
    );
    assert_eq!(dep.body["sku"]["capacity"], 1);
    assert!(dep.body["properties"]["model"]
        .as_str()
        .unwrap()
        .ends_with("/models/phi3-ultrachat-200k/versions/1764144000"));
    let traffic_put = arm_calls
        .iter()
        .filter(|s| {
            s.method == "PUT"
                && s.path
                    .ends_with("/onlineEndpoints/ultrachat-completion-1764144000")
        })
        .nth(1)
        .expect("a second PUT of the endpoint sets traffic");
    assert_eq!(
        traffic_put.body["properties"]["traffic"],
        serde_json::json!({"demo": 100})
    );
    assert_eq!(
        traffic_put.body["properties"]["authMode"], "AMLToken",
        "the endpoint's own auth mode is kept"
    );
    let create = find("PUT", "/onlineEndpoints/ultrachat-completion-1764144000");
    assert_eq!(create.body["properties"]["authMode"], "Key");
    assert_eq!(
        create.body["location"], "eastus2euap",
        "the workspace's location"
    );
}

#[test]
fn a_body_the_specification_does_not_describe_is_refused_with_azures_error() {
    let fake = FakeAzure::start(azure_routes());
    let arm = arm_for(&fake);
    let url = arm.ws_url("models/m/versions/1");
    let err = arm
        .put(
            &url,
            serde_json::json!({"properties": {"modelUri": "x", "flavour": "typo"}}),
        )
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("SpecMismatch") && text.contains("properties.flavour"),
        "{text}"
    );
    assert!(
        text.contains("request id req-0001") && text.contains("HTTP 400"),
        "{text}"
    );
    let missing = arm
        .get(&arm.ws_url("onlineEndpoints/nope/deployments/x/y"))
        .unwrap_err();
    assert_eq!(missing.status(), Some(404));
    assert!(missing.to_string().contains("ResourceNotFound"));
}

#[test]
fn throttled_requests_wait_for_retry_after_then_succeed() {
    let fake = FakeAzure::start(azure_routes());
    let arm = arm_for(&fake);
    let ws_path = arm.workspace.arm_path();
    fake.state
        .lock()
        .unwrap()
        .throttle
        .insert(ws_path.clone(), 2);
    let started = Instant::now();
    let ws = arm.get(&arm.ws_url("")).unwrap();
    assert_eq!(ws["location"], "eastus2euap");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "two 429s with Retry-After: 1 took {:?}",
        started.elapsed()
    );
    assert_eq!(fake.seen().iter().filter(|s| s.path == ws_path).count(), 3);
    // A POST is retried only on 429, never on a 5xx: it might have been processed.
    fake.state.lock().unwrap().throttle.insert(ws_path, 10);
    let err = arm.get(&arm.ws_url("")).unwrap_err();
    assert_eq!(err.status(), Some(429), "gives up after max_retries: {err}");
}

#[test]
fn registering_a_job_output_and_submitting_a_command_job_match_the_specification() {
    let fake = FakeAzure::start(azure_routes());
    let arm = arm_for(&fake);
    let spec = ModelVersionSpec {
        name: "Phi-3-mini-4k-instruct-ultrachat-200k".into(),
        version: "1764144000".into(),
        description: "fine tuned".into(),
        job: None,
        tags: vec![],
    };
    let registered =
        model::register_job_output(&arm, "calm_job_42", "trained_model", &spec).unwrap();
    assert_eq!(
        registered.model_uri,
        "azureml://jobs/calm_job_42/outputs/trained_model"
    );
    let put = fake
        .arm_seen()
        .into_iter()
        .find(|s| s.method == "PUT")
        .unwrap();
    assert_eq!(put.body["properties"]["modelType"], "mlflow_model");
    assert_eq!(
        put.body["properties"]["tags"]["job_name"], "calm_job_42",
        "lineage to the job"
    );

    let code = tempfile::tempdir().unwrap();
    std::fs::write(code.path().join("train.yaml"), "model: m\n").unwrap();
    // The SAS container of the example answer is not reachable; code upload is covered against
    // Azurite. Here: the job itself.
    let job = CommandJob {
        name: "ferrotune-1764144000".into(),
        display_name: "Phi-3-mini-4k-instruct-ultrachat-bs1-cosine-lora".into(),
        experiment: "chat_completion_Phi-3-mini-4k-instruct".into(),
        compute: "gpu-cluster".into(),
        environment:
            "azureml://registries/azureml/environments/acpt-pytorch-2.2-cuda12.1/labels/latest"
                .into(),
        code_id: arm.ws_id("codes/ferrotune-abc/versions/1"),
        command: "bash ferrotune-job.sh".into(),
        nodes: 2,
        processes_per_node: 4,
        inputs: vec![
            (
                "model".into(),
                JobInput::MlflowModel(
                    "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/7".into(),
                ),
            ),
            (
                "train".into(),
                JobInput::Folder("azureml://datastores/workspaceblobstore/paths/ultrachat/".into()),
            ),
        ],
        model_outputs: vec!["trained_model".into()],
        timeout: Duration::from_secs(5 * 3600),
        environment_variables: vec![("FERROTUNE_LOG".into(), "info".into())],
        tags: vec![(
            "ferrotune.model_name".into(),
            "Phi-3-mini-4k-instruct".into(),
        )],
    };
    job::submit(&arm, &job).unwrap();
    let sent = fake
        .arm_seen()
        .into_iter()
        .find(|s| s.path.ends_with("/jobs/ferrotune-1764144000"))
        .unwrap();
    let p = &sent.body["properties"];
    assert_eq!(
        p["distribution"],
        serde_json::json!({"distributionType": "PyTorch", "processCountPerInstance": 4})
    );
    assert_eq!(p["resources"]["instanceCount"], 2);
    assert_eq!(p["limits"]["timeout"], "PT5H");
    assert!(p["computeId"]
        .as_str()
        .unwrap()
        .ends_with("/computes/gpu-cluster"));
    let mut said = Vec::new();
    // The workspace's discovery URL leads to run history and the job's user log.
    let discovery = format!("{}/discovery", fake.base);
    for r in fake.state.lock().unwrap().routes.iter_mut() {
        if r.method == "GET" && r.template == ferrotune_azure::fake::ws("") {
            r.overrides = serde_json::json!({"properties": {"discoveryUrl": discovery}});
        }
    }
    let end = job::follow(
        &arm,
        "ferrotune-1764144000",
        Duration::from_millis(10),
        true,
        &mut |s| said.push(s.to_string()),
    )
    .unwrap();
    assert_eq!(end, "Completed");
    assert!(said.iter().any(|s| s.contains("Running")), "{said:?}");
    let logged: Vec<&String> = said.iter().filter(|s| !s.starts_with("job ")).collect();
    assert_eq!(
        logged,
        ["step 1 loss 2.31", "step 2 loss 2.05", "saved checkpoint-2"],
        "each user-log line once, in order, never the partial last line: {said:?}"
    );
    let status = job::status(&arm, "ferrotune-1764144000").unwrap();
    assert_eq!(
        status.tags.get("string").and_then(|v| v.as_str()),
        Some("string")
    );
}

#[test]
fn vm_sizes_give_the_gpu_count_per_node() {
    let fake = FakeAzure::start(azure_routes());
    let arm = arm_for(&fake);
    let sizes = compute::vm_sizes(&arm, "eastus").unwrap();
    assert!(!sizes.is_empty());
    let ds1 = sizes.iter().find(|s| s.name == "Standard_DS1_v2").unwrap();
    assert_eq!((ds1.gpus, ds1.vcpus), (0, 1));
}

#[test]
fn dry_runs_print_every_request_with_secrets_masked_and_send_nothing() {
    let fake = FakeAzure::start(azure_routes());
    let lines = Arc::new(Mutex::new(Vec::new()));
    let transport = Transport::new(
        RetryPolicy::default(),
        Some(DryRunSink::Capture(Arc::clone(&lines))),
    )
    .unwrap();
    let arm = Arm::new(
        transport.clone(),
        Arc::new(StaticCredential("real-secret-token".into())),
        &fake.base,
        workspace(),
    );
    let mut say = |_: &str| {};
    let ep = "ultrachat-completion-1764144000";
    endpoint::create_endpoint(&arm, ep, "key", "d", &mut say).unwrap();
    endpoint::deploy(
        &arm,
        &deployment_spec(&model::version_id(&arm, "m:1").unwrap()),
        &mut say,
    )
    .unwrap();
    endpoint::set_traffic(&arm, ep, &[("demo".into(), 100)], &mut say).unwrap();
    endpoint::keys(&arm, ep).unwrap();
    endpoint::invoke(
        &transport,
        "https://x.inference.ml.azure.com/score",
        "the-endpoint-key",
        Some("demo"),
        serde_json::json!({"input_data": {}}),
    )
    .unwrap();
    endpoint::delete_endpoint(&arm, ep, &mut say).unwrap();
    assert!(
        fake.seen().is_empty(),
        "a dry run sent {} requests",
        fake.seen().len()
    );
    let text = lines.lock().unwrap().join("\n");
    for needle in [
        "PUT http://",
        "/onlineEndpoints/ultrachat-completion-1764144000?api-version=2024-10-01",
        "/onlineEndpoints/ultrachat-completion-1764144000/deployments/demo?api-version=2024-10-01",
        "\"initialDelay\": \"PT10M\"",
        "\"demo\": 100",
        "POST http://",
        "/listKeys?api-version=2024-10-01",
        "azureml-model-deployment: demo",
        "DELETE http://",
        "Authorization: Bearer ***",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    assert!(
        !text.contains("real-secret-token") && !text.contains("the-endpoint-key"),
        "{text}"
    );
}

#[test]
fn credentials_come_in_default_azure_credentials_order_and_are_cached() {
    let fake = FakeAzure::start(azure_routes());
    let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        let mut m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.insert("FERROTUNE_AZ_CLI".into(), "/nonexistent/az".into());
        m
    };
    // 1. Environment client secret wins over the compute's managed identity.
    let cred = DefaultCredential::from_env(&env(&[
        ("AZURE_AUTHORITY_HOST", &fake.base),
        ("AZURE_TENANT_ID", "tenant-1"),
        ("AZURE_CLIENT_ID", "app-1"),
        ("AZURE_CLIENT_SECRET", "s3cret"),
        ("MSI_ENDPOINT", &format!("{}/msi/token", fake.base)),
    ]))
    .unwrap();
    let token = cred.token(ARM_SCOPE).unwrap();
    assert!(cred.source().contains("AZURE_CLIENT_SECRET"));
    assert_eq!(
        identity_of(&token).unwrap().name.as_deref(),
        Some("aad@contoso.com")
    );
    cred.token(ARM_SCOPE).unwrap();
    assert_eq!(
        fake.state.lock().unwrap().tokens_issued,
        1,
        "the second call is served from the cache"
    );
    assert!(
        !format!("{token:?}").contains(&token.secret),
        "Debug never shows the token"
    );
    let seen = fake.seen();
    assert!(seen[0].path == "/tenant-1/oauth2/v2.0/token");

    // 2. A wrong secret stops the chain with AAD's reason, rather than falling to another identity.
    let wrong = DefaultCredential::from_env(&env(&[
        ("AZURE_AUTHORITY_HOST", &fake.base),
        ("AZURE_TENANT_ID", "tenant-1"),
        ("AZURE_CLIENT_ID", "app-1"),
        ("AZURE_CLIENT_SECRET", "wrong"),
        ("MSI_ENDPOINT", &format!("{}/msi/token", fake.base)),
    ]))
    .unwrap();
    let err = wrong.token(ARM_SCOPE).unwrap_err().to_string();
    assert!(
        err.contains("AADSTS7000215") && !err.contains("wrong"),
        "{err}"
    );

    // 3. Workload identity reads its federated token file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "federated-jwt\n").unwrap();
    let wi = DefaultCredential::from_env(&env(&[
        ("AZURE_AUTHORITY_HOST", &fake.base),
        ("AZURE_TENANT_ID", "tenant-1"),
        ("AZURE_CLIENT_ID", "app-1"),
        ("AZURE_FEDERATED_TOKEN_FILE", file.to_str().unwrap()),
    ]))
    .unwrap();
    wi.token(ARM_SCOPE).unwrap();
    assert!(wi.source().contains("workload identity"));

    // 4. Azure ML compute: MSI_ENDPOINT with its secret header and the compute's client id.
    let msi = DefaultCredential::from_env(&env(&[
        ("MSI_ENDPOINT", &format!("{}/msi/token", fake.base)),
        ("MSI_SECRET", "msi-secret"),
        ("DEFAULT_IDENTITY_CLIENT_ID", "compute-identity"),
    ]))
    .unwrap();
    let t = msi.token(ARM_SCOPE).unwrap();
    assert_eq!(
        identity_of(&t).unwrap().name.as_deref(),
        Some("msi@contoso.com")
    );
    assert!(t.expires_at > std::time::SystemTime::now() + Duration::from_secs(3000));

    // 5. IMDS (host overridable as azure-identity allows), with Metadata: true.
    let imds =
        DefaultCredential::from_env(&env(&[("AZURE_POD_IDENTITY_AUTHORITY_HOST", &fake.base)]))
            .unwrap();
    imds.token(ARM_SCOPE).unwrap();
    assert!(imds.source().contains("IMDS"));

    // 6. Nothing configured, nothing reachable: one message naming every source tried.
    let none = DefaultCredential::from_env(&env(&[(
        "AZURE_POD_IDENTITY_AUTHORITY_HOST",
        "http://127.0.0.1:9",
    )]))
    .unwrap();
    let err = none.token(ARM_SCOPE).unwrap_err().to_string();
    assert!(
        err.contains("IMDS") && err.contains("Azure CLI") && err.contains("az login"),
        "{err}"
    );
}
