//! The workspace's default blob datastore and a client for its container.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;

use crate::arm::Arm;
use crate::blob::{BlobAuth, BlobContainer};
use crate::error::{AzureError, Result};

pub const DEFAULT_DATASTORE: &str = "workspaceblobstore";

#[derive(Debug, Clone)]
pub struct Datastore {
    pub name: String,
    pub account: String,
    pub container: String,
    pub endpoint_suffix: String,
    pub protocol: String,
    pub credentials_type: String,
}

impl Datastore {
    /// `azureml://` URI of a path in this datastore, as model versions name their files.
    pub fn azureml_uri(&self, arm: &Arm, path: &str) -> String {
        let ws = &arm.workspace;
        format!(
            "azureml://subscriptions/{}/resourcegroups/{}/workspaces/{}/datastores/{}/paths/{}",
            ws.subscription_id, ws.resource_group, ws.workspace_name, self.name, path
        )
    }
}

/// `workspaceblobstore`, or whichever datastore the workspace marks as default.
pub fn default_datastore(arm: &Arm) -> Result<Datastore> {
    let found = match arm.get_opt(&arm.ws_url(&format!("datastores/{DEFAULT_DATASTORE}")))? {
        Some(v) => v,
        None => {
            let list = arm.get(&format!("{}&isDefault=true", arm.ws_url("datastores")))?;
            list.get("value")
                .and_then(Value::as_array)
                .and_then(|v| v.first().cloned())
                .ok_or_else(|| {
                    AzureError::Operation("the workspace has no default datastore".into())
                })?
        }
    };
    if arm.is_dry_run() {
        return Ok(Datastore {
            name: DEFAULT_DATASTORE.into(),
            account: "<datastore account>".into(),
            container: "<datastore container>".into(),
            endpoint_suffix: "core.windows.net".into(),
            protocol: "https".into(),
            credentials_type: "AccountKey".into(),
        });
    }
    let p = found.get("properties").cloned().unwrap_or(Value::Null);
    let s = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_string);
    if s("datastoreType").as_deref() != Some("AzureBlob") {
        return Err(AzureError::Operation(format!(
            "datastore {} is {}, not AzureBlob: uploads need a blob datastore",
            found.get("name").and_then(Value::as_str).unwrap_or("?"),
            s("datastoreType").unwrap_or_else(|| "of no type".into())
        )));
    }
    Ok(Datastore {
        name: found
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_DATASTORE)
            .to_string(),
        account: s("accountName")
            .ok_or_else(|| AzureError::Operation("datastore without accountName".into()))?,
        container: s("containerName")
            .ok_or_else(|| AzureError::Operation("datastore without containerName".into()))?,
        endpoint_suffix: s("endpoint").unwrap_or_else(|| "core.windows.net".into()),
        protocol: s("protocol").unwrap_or_else(|| "https".into()),
        credentials_type: p
            .pointer("/credentials/credentialsType")
            .and_then(Value::as_str)
            .unwrap_or("None")
            .to_string(),
    })
}

/// A client for the datastore's container: account key or SAS from `listSecrets`, or the
/// caller's own AAD identity when the datastore holds no secret. `FERROTUNE_AZURE_BLOB_ENDPOINT`
/// (for example Azurite's `http://127.0.0.1:10000/devstoreaccount1`) replaces the account URL.
pub fn container(
    arm: &Arm,
    ds: &Datastore,
    env: &HashMap<String, String>,
) -> Result<BlobContainer> {
    let account_url = match env
        .get("FERROTUNE_AZURE_BLOB_ENDPOINT")
        .filter(|v| !v.is_empty())
    {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => format!(
            "{}://{}.blob.{}",
            ds.protocol, ds.account, ds.endpoint_suffix
        ),
    };
    let base = format!("{account_url}/{}", ds.container);
    let auth = match ds.credentials_type.as_str() {
        "AccountKey" | "Sas" => {
            let secrets = arm.post(
                &arm.ws_url(&format!("datastores/{}/listSecrets", ds.name)),
                Some(serde_json::json!({})),
            )?;
            if arm.is_dry_run() {
                BlobAuth::Sas("sig=***".into())
            } else if let Some(key) = secrets.get("key").and_then(Value::as_str) {
                let key = B64.decode(key).map_err(|e| {
                    AzureError::Credential(format!(
                        "datastore {}'s account key is not base64: {e}",
                        ds.name
                    ))
                })?;
                BlobAuth::SharedKey {
                    account: ds.account.clone(),
                    key,
                }
            } else if let Some(sas) = secrets.get("sasToken").and_then(Value::as_str) {
                BlobAuth::Sas(sas.trim_start_matches('?').to_string())
            } else {
                return Err(AzureError::Credential(format!(
                    "datastore {}: listSecrets gave neither an account key nor a SAS token",
                    ds.name
                )));
            }
        }
        _ => BlobAuth::Bearer(Arc::clone(arm.credential())),
    };
    Ok(BlobContainer::new(arm.transport().clone(), &base, auth))
}
