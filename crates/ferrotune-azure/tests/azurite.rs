//! Blob uploads against Azurite, Microsoft's storage emulator (`scripts/install-azurite.sh`
//! puts it in `.azurite/`; `scripts/test.sh` runs that first): block uploads, an interrupted and
//! resumed upload, checksums, the completion marker, and a whole model registration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ferrotune_azure::blob::{BlobAuth, BlobContainer};
use ferrotune_azure::credential::StaticCredential;
use ferrotune_azure::fake::{azure_routes, start_azurite, Azurite, FakeAzure, ACCOUNT, KEY, TOKEN};
use ferrotune_azure::http::{RetryPolicy, Transport};
use ferrotune_azure::model::{self, ModelVersionSpec};
use ferrotune_azure::upload::{self, UploadOptions};
use ferrotune_azure::{Arm, Workspace};
use md5::{Digest, Md5};

fn transport() -> Transport {
    Transport::new(
        RetryPolicy {
            max_retries: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
        },
        None,
    )
    .unwrap()
}

fn container(azurite: &Azurite, name: &str) -> BlobContainer {
    let key = base64::engine::general_purpose::STANDARD
        .decode(KEY)
        .unwrap();
    let c = BlobContainer::new(
        transport(),
        &format!("{}/{name}", azurite.url),
        BlobAuth::SharedKey {
            account: ACCOUNT.into(),
            key,
        },
    );
    c.create_if_missing().unwrap();
    c
}

/// An MLflow-shaped folder with one file big enough for several blocks.
fn model_folder(root: &Path) -> PathBuf {
    let dir = root.join("phi3-export");
    std::fs::create_dir_all(dir.join("model")).unwrap();
    std::fs::write(dir.join("MLmodel"), "flavors:\n  transformers: {}\n").unwrap();
    std::fs::write(dir.join("model/config.json"), "{\"model_type\": \"phi3\"}").unwrap();
    let shard: Vec<u8> = (0..300_001u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("model/model-00001-of-00001.safetensors"), shard).unwrap();
    dir
}

#[test]
fn block_uploads_resume_after_an_interruption_and_verify_their_checksums() {
    let azurite = start_azurite();
    let c = container(&azurite, "uploads");
    let root = tempfile::tempdir().unwrap();
    let dir = model_folder(root.path());
    let plan = upload::scan(&dir).unwrap();
    let block = 64 * 1024;

    // Interrupted after about a third of the bytes (one upload thread, so the cut is sharp).
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = UploadOptions {
        block_size: block,
        parallelism: 1,
        cancel: Some(Arc::clone(&cancel)),
    };
    let stop_at = plan.total_bytes() / 3;
    let trip = Arc::clone(&cancel);
    let err = upload::upload(&c, &plan, &opts, &move |sent, _| {
        if sent >= stop_at {
            trip.store(true, Ordering::SeqCst);
        }
    })
    .unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");
    let first = plan.blob_name(&plan.files[0]);
    let marker = c
        .properties(&first)
        .unwrap()
        .map(|p| p.metadata)
        .unwrap_or_default();
    assert!(
        !marker.contains_key("upload_status"),
        "no completion marker after an interruption"
    );

    // The rerun keeps the staged blocks and sends only the rest.
    let opts = UploadOptions {
        block_size: block,
        parallelism: 4,
        cancel: None,
    };
    let resumed = upload::upload(&c, &plan, &opts, &|_, _| {}).unwrap();
    assert!(resumed.blocks_reused > 0, "{resumed:?}");
    assert!(resumed.bytes_sent < plan.total_bytes(), "{resumed:?}");
    assert_eq!(
        resumed.blocks_reused + resumed.blocks_uploaded,
        300_001usize.div_ceil(block as usize)
    );

    // What the service holds is byte for byte the folder, and its Content-MD5 is the file's.
    for f in &plan.files {
        let name = plan.blob_name(f);
        let held = c.download(&name).unwrap();
        assert_eq!(
            held.as_ref(),
            std::fs::read(&f.path).unwrap().as_slice(),
            "{name}"
        );
        let props = c.properties(&name).unwrap().unwrap();
        assert_eq!(
            props.content_md5.as_deref(),
            Some(
                base64::engine::general_purpose::STANDARD
                    .encode(f.md5)
                    .as_str()
            )
        );
    }
    let props = c.properties(&first).unwrap().unwrap();
    assert_eq!(
        props.metadata.get("upload_status").map(String::as_str),
        Some("completed")
    );

    // A third run sends nothing: the completion marker says the folder is there.
    let again = upload::upload(&c, &plan, &opts, &|_, _| {}).unwrap();
    assert!(again.already_complete && again.bytes_sent == 0);

    // A damaged remote file (same length, other bytes) is found by its checksum and replaced;
    // files that match are left alone.
    let config = plan
        .files
        .iter()
        .find(|f| f.rel == "model/config.json")
        .unwrap();
    let bad = vec![b'x'; config.len as usize];
    c.put_blob(
        &plan.blob_name(config),
        bad.clone().into(),
        &Md5::digest(&bad).into(),
    )
    .unwrap();
    c.set_metadata(&first, &[]).unwrap();
    let repaired = upload::upload(&c, &plan, &opts, &|_, _| {}).unwrap();
    assert_eq!(
        (repaired.files_uploaded, repaired.files_skipped),
        (1, plan.files.len() - 1),
        "{repaired:?}"
    );
    assert_eq!(
        c.download(&plan.blob_name(config)).unwrap().as_ref(),
        std::fs::read(&config.path).unwrap().as_slice()
    );

    // The service itself checks each block's MD5: a block whose checksum lies is refused.
    let err = c
        .put_block(
            &plan.blob_name(config),
            "QUJD",
            bytes::Bytes::from_static(b"abc"),
            &[0u8; 16],
        )
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    // Azure answers Md5Mismatch; Azurite says InvalidOperation "Provided contentMD5 doesn't match".
    assert!(err.to_string().to_lowercase().contains("md5"), "{err}");
}

#[test]
fn registering_a_folder_uploads_it_to_the_default_datastore_and_creates_an_mlflow_model_version() {
    let azurite = start_azurite();
    container(&azurite, "azureml-blobstore-test");
    let mut routes = azure_routes();
    for r in routes.iter_mut() {
        if r.template.ends_with("datastores/{}") {
            r.overrides = serde_json::json!({"name": "workspaceblobstore", "properties": {"accountName": ACCOUNT, "containerName": "azureml-blobstore-test"}});
        }
        if r.template.ends_with("listSecrets") {
            r.overrides = serde_json::json!({"key": KEY});
        }
    }
    let fake = FakeAzure::start(routes);
    let ws = Workspace {
        subscription_id: "sub-1".into(),
        resource_group: "rg-1".into(),
        workspace_name: "ws-1".into(),
    };
    let mut arm = Arm::new(
        transport(),
        Arc::new(StaticCredential(TOKEN.into())),
        &fake.base,
        ws,
    );
    arm.poll_interval = Duration::from_millis(10);
    let env: HashMap<String, String> = [(
        "FERROTUNE_AZURE_BLOB_ENDPOINT".to_string(),
        azurite.url.clone(),
    )]
    .into();
    let root = tempfile::tempdir().unwrap();
    let dir = model_folder(root.path());
    let spec = ModelVersionSpec {
        name: "Phi-3-mini-4k-instruct-ultrachat-200k".into(),
        version: "1764144000".into(),
        description: "fine tuned on ultrachat_200k".into(),
        job: Some("calm_job_42".into()),
        tags: vec![],
    };
    let opts = UploadOptions {
        block_size: 100_000,
        parallelism: 4,
        cancel: None,
    };
    let mut said = Vec::new();
    let registered = model::register_folder(&arm, &env, &dir, &spec, &opts, &|_, _| {}, &mut |s| {
        said.push(s.to_string())
    })
    .unwrap();
    let plan = upload::scan(&dir).unwrap();
    assert_eq!(
        registered.model_uri,
        format!("azureml://subscriptions/sub-1/resourcegroups/rg-1/workspaces/ws-1/datastores/workspaceblobstore/paths/LocalUpload/{}/phi3-export", plan.hash)
    );
    let report = registered.upload.clone().unwrap();
    assert_eq!(report.files_uploaded, 3);
    let put = fake
        .arm_seen()
        .into_iter()
        .find(|s| s.method == "PUT")
        .unwrap();
    assert!(put
        .path
        .ends_with("/models/Phi-3-mini-4k-instruct-ultrachat-200k/versions/1764144000"));
    assert_eq!(put.body["properties"]["modelType"], "mlflow_model");
    assert_eq!(
        put.body["properties"]["modelUri"],
        registered.model_uri.as_str()
    );
    assert_eq!(put.body["properties"]["tags"]["job_name"], "calm_job_42");

    // The same folder again: nothing uploaded, a new version registered.
    let spec2 = ModelVersionSpec {
        version: "1764144001".into(),
        ..spec
    };
    let again = model::register_folder(&arm, &env, &dir, &spec2, &opts, &|_, _| {}, &mut |s| {
        said.push(s.to_string())
    })
    .unwrap();
    assert!(again.upload.unwrap().already_complete);
    assert!(
        said.iter().any(|s| s.contains("already uploaded")),
        "{said:?}"
    );

    // A folder that is not an MLflow model is refused before anything is sent.
    let plain = root.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("x.txt"), "x").unwrap();
    let err = model::register_folder(&arm, &env, &plain, &spec2, &opts, &|_, _| {}, &mut |_| {})
        .unwrap_err();
    assert!(
        err.is_usage() && err.to_string().contains("MLmodel"),
        "{err}"
    );
}
