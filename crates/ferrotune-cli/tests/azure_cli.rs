//! `ferrotune azure` as a user drives it, against the fake Azure (answers from the API
//! specification's examples) and Azurite: login, register, endpoint, deploy, traffic, keys,
//! invoke, delete; dry runs; exit codes.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use ferrotune_azure::blob::BlobContainer;
use ferrotune_azure::fake::{azure_routes, start_azurite, FakeAzure, ACCOUNT, KEY};
use predicates::prelude::*;
use predicates::str::contains;
use serde_json::json;

fn ferrotune() -> Command {
    let mut cmd = Command::cargo_bin("ferrotune").unwrap();
    // Nothing from the machine running the tests may leak in: no CLI login, no IMDS probe.
    for var in [
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "MSI_ENDPOINT",
        "IDENTITY_ENDPOINT",
        "AZURE_FEDERATED_TOKEN_FILE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("FERROTUNE_AZ_CLI", "/nonexistent/az")
        .env("FERROTUNE_AZURE_NO_IMDS", "1");
    cmd
}

/// `ferrotune` signed in with a client secret against the fake.
fn signed_in(fake: &FakeAzure) -> Command {
    let mut cmd = ferrotune();
    cmd.env("AZURE_AUTHORITY_HOST", &fake.base)
        .env("AZURE_TENANT_ID", "tenant-1")
        .env("AZURE_CLIENT_ID", "app-1")
        .env("AZURE_CLIENT_SECRET", "s3cret");
    cmd
}

/// `ferrotune azure` signed in against the fake, in workspace ws-1.
fn azure(fake: &FakeAzure) -> Command {
    let mut cmd = signed_in(fake);
    cmd.args([
        "azure",
        "--arm-endpoint",
        &fake.base,
        "--poll-interval",
        "0s",
    ])
    .args([
        "--subscription-id",
        "sub-1",
        "--resource-group",
        "rg-1",
        "--workspace-name",
        "ws-1",
    ]);
    cmd
}

fn mlflow_folder(root: &Path) -> PathBuf {
    let dir = root.join("export");
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::write(dir.join("MLmodel"), "flavors:\n  transformers: {}\n").unwrap();
    std::fs::write(dir.join("model/config.json"), "{}").unwrap();
    std::fs::write(dir.join("model/model.safetensors"), vec![7u8; 200_000]).unwrap();
    dir
}

/// The fake's default datastore in Azurite's container `models` (created), with its key.
fn fake_with_datastore() -> (ferrotune_azure::fake::Azurite, FakeAzure, BlobContainer) {
    let azurite = start_azurite();
    let mut routes = azure_routes();
    for r in routes.iter_mut() {
        if r.template.ends_with("datastores/{}") {
            r.overrides = json!({"name": "workspaceblobstore", "properties": {"accountName": ACCOUNT, "containerName": "models"}});
        }
        if r.template.ends_with("listSecrets") {
            r.overrides = json!({"key": KEY});
        }
    }
    let fake = FakeAzure::start(routes);
    let container = BlobContainer::new(
        ferrotune_azure::http::Transport::new(Default::default(), None).unwrap(),
        &format!("{}/models", azurite.url),
        ferrotune_azure::blob::BlobAuth::SharedKey {
            account: ACCOUNT.into(),
            key: base64_decode(KEY),
        },
    );
    container.create_if_missing().unwrap();
    (azurite, fake, container)
}

#[test]
fn the_sources_steps_from_the_command_line() {
    let (azurite, fake, container) = fake_with_datastore();
    let scoring = format!("{}/score", fake.base);
    for r in fake.state.lock().unwrap().routes.iter_mut() {
        if r.method == "GET" && r.template.ends_with("onlineEndpoints/{}") {
            r.overrides = json!({"properties": {"scoringUri": scoring}});
        }
    }
    azure(&fake)
        .args(["login", "--check"])
        .assert()
        .success()
        .stdout(contains(
            "signed in as aad@contoso.com via environment (AZURE_CLIENT_SECRET)",
        ))
        .stdout(contains("workspace reachable, in eastus2euap"))
        .stdout(contains("s3cret").not());

    let root = tempfile::tempdir().unwrap();
    let dir = mlflow_folder(root.path());
    azure(&fake)
        .env("FERROTUNE_AZURE_BLOB_ENDPOINT", &azurite.url)
        .args(["register", "--path"])
        .arg(&dir)
        .args(["--name", "tiny-ultrachat-200k", "--version", "1", "--block-size", "64KiB"])
        .assert()
        .success()
        .stdout(contains("registered tiny-ultrachat-200k:1 (azureml://subscriptions/sub-1/resourcegroups/rg-1/workspaces/ws-1/datastores/workspaceblobstore/paths/LocalUpload/"));
    let plan = ferrotune_azure::upload::scan(&dir).unwrap();
    let shard = plan
        .files
        .iter()
        .find(|f| f.rel == "model/model.safetensors")
        .unwrap();
    assert_eq!(
        container.download(&plan.blob_name(shard)).unwrap().len(),
        200_000,
        "the shard is in the datastore"
    );

    let ep = "ultrachat-completion-1";
    azure(&fake)
        .args(["endpoint", "create", ep])
        .assert()
        .success()
        .stdout(contains("endpoint ultrachat-completion-1:"));
    azure(&fake)
        .args([
            "deploy",
            "--endpoint",
            ep,
            "--model",
            "tiny-ultrachat-200k:1",
        ])
        .assert()
        .success()
        .stderr(contains(
            "deployment ultrachat-completion-1/demo: Succeeded",
        ));
    azure(&fake)
        .args(["traffic", "--endpoint", ep, "demo=100"])
        .assert()
        .success();
    azure(&fake)
        .args(["keys", "--endpoint", ep])
        .assert()
        .success()
        .stdout(contains("prim…(20 characters)"))
        .stdout(contains("primary-endpoint-key").not());
    let score = root.path().join("sample_score.json");
    std::fs::write(
        &score,
        r#"{"input_data": {"input_string": [[{"role": "user", "content": "hi"}]], "parameters": {"max_new_tokens": 8}}}"#,
    )
    .unwrap();
    azure(&fake)
        .args(["invoke", "--endpoint", ep, "--deployment", "demo", "--file"])
        .arg(&score)
        .assert()
        .success()
        .stdout(contains("1 conversation(s) scored"))
        .stderr(contains("answered by deployment demo"));
    azure(&fake)
        .args(["delete", "--endpoint", ep, "--yes"])
        .assert()
        .success()
        .stdout(contains("deleted"));

    let seen = fake.arm_seen();
    let traffic = seen
        .iter()
        .filter(|s| {
            s.method == "PUT" && s.path.ends_with("/onlineEndpoints/ultrachat-completion-1")
        })
        .nth(1)
        .unwrap();
    assert_eq!(traffic.body["properties"]["traffic"], json!({"demo": 100}));
    assert!(seen.iter().any(|s| s.method == "DELETE"));
}

#[test]
fn models_push_to_an_azureml_uri_registers_the_stored_folder_with_its_lineage() {
    let (azurite, fake, container) = fake_with_datastore();
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("home");
    let dir = mlflow_folder(root.path());
    ferrotune()
        .env("FERROTUNE_HOME", &home)
        .args([
            "models",
            "register",
            "--name",
            "tiny",
            "--version",
            "7",
            "--tag",
            "stage=ci",
            "--path",
        ])
        .arg(&dir)
        .assert()
        .success();
    let push = |to: &str| {
        let mut cmd = signed_in(&fake);
        cmd.env("FERROTUNE_HOME", &home)
            .env("AZURE_RESOURCE_MANAGER_ENDPOINT", &fake.base)
            .env("FERROTUNE_AZURE_BLOB_ENDPOINT", &azurite.url)
            .args(["models", "push", "tiny:7", "--to", to]);
        cmd
    };
    push("azureml://subscriptions/sub-1/resourceGroups/rg-1/workspaces/ws-1")
        .assert()
        .success()
        .stdout(contains(
            "registered tiny:7 (azureml://subscriptions/sub-1/resourcegroups/rg-1/workspaces/ws-1/datastores/workspaceblobstore/paths/LocalUpload/",
        ));
    let seen = fake.arm_seen();
    let put = seen
        .iter()
        .find(|s| s.method == "PUT" && s.path.ends_with("/workspaces/ws-1/models/tiny/versions/7"))
        .expect("a model version PUT in ws-1");
    let tags = &put.body["properties"]["tags"];
    assert_eq!(tags["stage"], "ci", "{tags}");
    assert_eq!(tags["ferrotune.local_version"], "7", "{tags}");
    let stored = std::fs::read_dir(home.join("artifacts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let plan = ferrotune_azure::upload::scan(&stored).unwrap();
    assert!(!plan.files.is_empty());
    assert!(
        plan.files
            .iter()
            .all(|f| container.download(&plan.blob_name(f)).is_ok()),
        "every file of the stored folder is in the datastore"
    );
    push("azureml://subscriptions/sub-1/workspaces/ws-1")
        .assert()
        .code(2)
        .stderr(contains("resourceGroups/RG"));
}

#[test]
fn mistakes_exit_2_and_runtime_failures_exit_1_with_azures_reason() {
    let fake = FakeAzure::start(azure_routes());
    azure(&fake)
        .args(["traffic", "--endpoint", "ep-1", "blue=90"])
        .assert()
        .code(2)
        .stderr(contains("adds up to 90%"));
    azure(&fake)
        .args(["delete", "--endpoint", "ep-1"])
        .assert()
        .code(2)
        .stderr(contains("--yes"));
    azure(&fake)
        .args(["endpoint", "create", "9bad"])
        .assert()
        .code(2)
        .stderr(contains("starting with a letter"));
    azure(&fake)
        .env("AZURE_CLIENT_SECRET", "wrong")
        .args(["login"])
        .assert()
        .code(1)
        .stderr(contains("AADSTS7000215"))
        .stderr(contains("wrong").not());
    azure(&fake)
        .args([
            "deploy",
            "--endpoint",
            "ep-1",
            "--model",
            "m:1",
            "--request-timeout",
            "soon",
        ])
        .assert()
        .code(2)
        .stderr(contains("`soon`: expected a duration"));
    let empty = tempfile::tempdir().unwrap();
    ferrotune()
        .current_dir(empty.path())
        .args(["azure", "keys", "--endpoint", "ep-1"])
        .assert()
        .code(2)
        .stderr(contains("config.json"));
    ferrotune()
        .args(["azure", "compute", "check", "--sku", "Standard_NC24r"])
        .assert()
        .code(2)
        .stdout(contains("not supported"));
    ferrotune()
        .args(["azure", "compute", "check", "--sku", "Standard_NC24rs_v3"])
        .assert()
        .success()
        .stdout(contains("4 GPU(s) per node"));
}

#[test]
fn a_dry_run_prints_the_sources_whole_flow_and_sends_nothing() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("train.yaml");
    std::fs::write(
        &config,
        "model: azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/7\n\
         train_file_path: azureml://datastores/workspaceblobstore/paths/ultrachat/train_sft.jsonl\n\
         num_train_epochs: 3\nlearning_rate: 5e-6\nlr_scheduler_type: cosine\napply_lora: \"true\"\n",
    )
    .unwrap();
    let score = root.path().join("sample_score.json");
    std::fs::write(&score, r#"{"input_data": {"input_string": ["hi"]}}"#).unwrap();
    let me = assert_cmd::cargo::cargo_bin("ferrotune");
    let out = ferrotune()
        .args([
            "azure",
            "--dry-run",
            "--arm-endpoint",
            "http://127.0.0.1:9",
            "--subscription-id",
            "s",
            "--resource-group",
            "r",
            "--workspace-name",
            "w",
        ])
        .args(["run", "--compute", "gpu-cluster", "--delete", "--config"])
        .arg(&config)
        .arg("--score-file")
        .arg(&score)
        .arg("--binary")
        .arg(&me)
        .assert()
        .success()
        .stderr(contains("dry run: nothing was sent"))
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(out).unwrap();
    let ws = "http://127.0.0.1:9/subscriptions/s/resourceGroups/r/providers/Microsoft.MachineLearningServices/workspaces/w";
    for needle in [
        format!("POST {ws}/codes/ferrotune-"),
        "\"distributionType\": \"PyTorch\"".to_string(),
        "\"jobInputType\": \"mlflow_model\"".to_string(),
        "\"uri\": \"azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/7\""
            .to_string(),
        "\"jobInputType\": \"uri_file\"".to_string(),
        "--set model=${{inputs.model}} --set train_file_path=${{inputs.train}}".to_string(),
        format!("PUT {ws}/models/Phi-3-mini-4k-instruct-ultrachat-200k/versions/"),
        "\"modelUri\": \"azureml://jobs/ferrotune-".to_string(),
        format!("PUT {ws}/onlineEndpoints/ultrachat-completion-"),
        "\"initialDelay\": \"PT10M\"".to_string(),
        "\"requestTimeout\": \"PT1M30S\"".to_string(),
        "\"demo\": 100".to_string(),
        "azureml-model-deployment: demo".to_string(),
        format!("DELETE {ws}/onlineEndpoints/ultrachat-completion-"),
    ] {
        assert!(
            text.contains(&needle),
            "missing `{needle}` in the dry run:\n{text}"
        );
    }
    // Every request line is a method and a URL (or a summary line for a blob upload).
    assert!(
        text.lines()
            .filter(|l| !l.starts_with(' '))
            .all(|l| l.starts_with("GET ")
                || l.starts_with("PUT ")
                || l.starts_with("POST ")
                || l.starts_with("DELETE ")
                || l.starts_with("HEAD ")),
        "{text}"
    );
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}
