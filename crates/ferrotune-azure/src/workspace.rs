//! Which Azure ML workspace: flags, then environment, then `config.json` found as
//! `MLClient.from_config` finds it (the working directory and its parents, also in `.azureml/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{AzureError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    pub subscription_id: String,
    pub resource_group: String,
    pub workspace_name: String,
}

/// What the user said on the command line; any field left out is looked up.
#[derive(Debug, Clone, Default)]
pub struct WorkspaceFlags {
    pub subscription_id: Option<String>,
    pub resource_group: Option<String>,
    pub workspace_name: Option<String>,
    pub config: Option<PathBuf>,
}

impl WorkspaceFlags {
    /// The workspace an `azureml:` URI names: the short form
    /// `azureml://subscriptions/S/resourceGroups/R/workspaces/W` or a workspace's MLflow tracking
    /// URI (`azureml://<region>.api.azureml.ms/mlflow/v1.0/subscriptions/S/resourceGroups/R/
    /// providers/Microsoft.MachineLearningServices/workspaces/W`). A bare `azureml:` or
    /// `azureml://` names none, so flags, environment and `config.json` decide.
    pub fn from_uri(uri: &str) -> Result<WorkspaceFlags> {
        let rest = uri
            .strip_prefix("azureml:")
            .ok_or_else(|| AzureError::Usage(format!("{uri}: not an azureml: URI")))?;
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Ok(WorkspaceFlags::default());
        }
        let after = |key: &str| {
            parts
                .windows(2)
                .find(|w| w[0].eq_ignore_ascii_case(key))
                .map(|w| w[1].to_string())
        };
        let flags = WorkspaceFlags {
            subscription_id: after("subscriptions"),
            resource_group: after("resourceGroups"),
            workspace_name: after("workspaces"),
            config: None,
        };
        if flags.subscription_id.is_none()
            || flags.resource_group.is_none()
            || flags.workspace_name.is_none()
        {
            return Err(AzureError::Usage(format!(
                "{uri}: expected azureml://subscriptions/SUB/resourceGroups/RG/workspaces/WS \
                 (or the workspace's MLflow tracking URI, or a bare azureml: to use the configured workspace)"
            )));
        }
        Ok(flags)
    }
}

/// Environment names per field, most specific first. `AZUREML_ARM_*` are set by Azure ML inside
/// its jobs, so a command job finds its own workspace without configuration.
const ENV_NAMES: [(&str, [&str; 3]); 3] = [
    (
        "subscription_id",
        [
            "FERROTUNE_AZURE_SUBSCRIPTION_ID",
            "AZURE_SUBSCRIPTION_ID",
            "AZUREML_ARM_SUBSCRIPTION",
        ],
    ),
    (
        "resource_group",
        [
            "FERROTUNE_AZURE_RESOURCE_GROUP",
            "AZURE_RESOURCE_GROUP",
            "AZUREML_ARM_RESOURCEGROUP",
        ],
    ),
    (
        "workspace_name",
        [
            "FERROTUNE_AZURE_WORKSPACE",
            "AZUREML_WORKSPACE_NAME",
            "AZUREML_ARM_WORKSPACE_NAME",
        ],
    ),
];

impl Workspace {
    /// Resolves each field on its own: a flag wins, then the environment, then `config.json`.
    pub fn resolve(
        flags: &WorkspaceFlags,
        env: &HashMap<String, String>,
        cwd: &Path,
    ) -> Result<Workspace> {
        let config = match &flags.config {
            Some(path) => Some((path.clone(), read_config(path)?)),
            None => match find_config(cwd) {
                Some(path) => Some((path.clone(), read_config(&path)?)),
                None => None,
            },
        };
        let pick = |flag: &Option<String>, field: &str| -> Result<String> {
            if let Some(v) = flag.as_ref().filter(|v| !v.is_empty()) {
                return Ok(v.clone());
            }
            let names = ENV_NAMES
                .iter()
                .find(|(f, _)| *f == field)
                .map(|(_, n)| n)
                .expect("field");
            if let Some(v) = names
                .iter()
                .find_map(|n| env.get(*n).filter(|v| !v.is_empty()))
            {
                return Ok(v.clone());
            }
            if let Some((path, cfg)) = &config {
                if let Some(v) = config_field(cfg, field) {
                    return Ok(v);
                }
                return Err(AzureError::Usage(format!(
                    "{} has no `{field}`; add it, or pass --{} or set {}",
                    path.display(),
                    field.replace('_', "-"),
                    names[0]
                )));
            }
            Err(AzureError::Usage(format!(
                "which workspace? no --{} flag, no {} variable and no config.json in {} or its parents \
                 (download it from the workspace's overview page in Azure ML studio)",
                field.replace('_', "-"),
                names.join("/"),
                cwd.display()
            )))
        };
        Ok(Workspace {
            subscription_id: pick(&flags.subscription_id, "subscription_id")?,
            resource_group: pick(&flags.resource_group, "resource_group")?,
            workspace_name: pick(&flags.workspace_name, "workspace_name")?,
        })
    }

    /// The ARM id path of the workspace, without a host.
    pub fn arm_path(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.MachineLearningServices/workspaces/{}",
            self.subscription_id, self.resource_group, self.workspace_name
        )
    }
}

/// `config.json` or `.azureml/config.json` in `start` or the nearest parent that has one.
pub fn find_config(start: &Path) -> Option<PathBuf> {
    let mut dir = Some(start);
    while let Some(d) = dir {
        for candidate in [
            d.join("config.json"),
            d.join(".azureml").join("config.json"),
        ] {
            if candidate.is_file() && looks_like_workspace_config(&candidate) {
                return Some(candidate);
            }
        }
        dir = d.parent();
    }
    None
}

// A project's unrelated config.json (an HF model's, say) must not be taken for a workspace.
fn looks_like_workspace_config(path: &Path) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| {
            config_field(&v, "subscription_id").is_some()
                || config_field(&v, "workspace_name").is_some()
        })
}

fn read_config(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| AzureError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| AzureError::Usage(format!("{}: not valid JSON ({e})", path.display())))
}

/// Both spellings MLClient accepts: `subscription_id` and the older `Scope` ARM id.
fn config_field(cfg: &Value, field: &str) -> Option<String> {
    if let Some(v) = cfg.get(field).and_then(Value::as_str) {
        return Some(v.to_string());
    }
    let alt = match field {
        "workspace_name" => "workspaceName",
        "resource_group" => "resourceGroup",
        "subscription_id" => "subscriptionId",
        _ => return None,
    };
    if let Some(v) = cfg.get(alt).and_then(Value::as_str) {
        return Some(v.to_string());
    }
    let scope = cfg.get("Scope").and_then(Value::as_str)?;
    let parts: Vec<&str> = scope.trim_matches('/').split('/').collect();
    let after = |key: &str| {
        parts
            .iter()
            .position(|p| p.eq_ignore_ascii_case(key))
            .and_then(|i| parts.get(i + 1))
            .map(|s| s.to_string())
    };
    match field {
        "subscription_id" => after("subscriptions"),
        "resource_group" => after("resourceGroups"),
        _ => after("workspaces"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workspace_from_an_azureml_uri() {
        let short = WorkspaceFlags::from_uri(
            "azureml://subscriptions/s-1/resourceGroups/rg-1/workspaces/ws-1",
        )
        .unwrap();
        let tracking = WorkspaceFlags::from_uri(
            "azureml://eastus2.api.azureml.ms/mlflow/v1.0/subscriptions/s-1/resourcegroups/rg-1/providers/Microsoft.MachineLearningServices/workspaces/ws-1",
        )
        .unwrap();
        for f in [short, tracking] {
            assert_eq!(f.subscription_id.as_deref(), Some("s-1"));
            assert_eq!(f.resource_group.as_deref(), Some("rg-1"));
            assert_eq!(f.workspace_name.as_deref(), Some("ws-1"));
        }
        for bare in ["azureml:", "azureml://"] {
            let f = WorkspaceFlags::from_uri(bare).unwrap();
            assert!(f.subscription_id.is_none() && f.workspace_name.is_none());
        }
        let e =
            WorkspaceFlags::from_uri("azureml://subscriptions/s-1/workspaces/ws-1").unwrap_err();
        assert!(
            e.is_usage() && e.to_string().contains("resourceGroups/RG"),
            "{e}"
        );
        assert!(WorkspaceFlags::from_uri("http://x").is_err());
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flags_then_environment_then_the_nearest_config_json() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        std::fs::create_dir_all(nested.join("model")).unwrap();
        std::fs::create_dir_all(dir.path().join(".azureml")).unwrap();
        std::fs::write(
            dir.path().join(".azureml/config.json"),
            r#"{"subscription_id": "sub-cfg", "resource_group": "rg-cfg", "workspace_name": "ws-cfg"}"#,
        )
        .unwrap();
        // An HF model's config.json on the way up is not a workspace.
        std::fs::write(nested.join("config.json"), r#"{"model_type": "phi3"}"#).unwrap();
        let ws = Workspace::resolve(&WorkspaceFlags::default(), &env(&[]), &nested).unwrap();
        assert_eq!(ws.workspace_name, "ws-cfg");
        let ws = Workspace::resolve(
            &WorkspaceFlags {
                workspace_name: Some("ws-flag".into()),
                ..Default::default()
            },
            &env(&[
                ("AZURE_SUBSCRIPTION_ID", "sub-env"),
                ("FERROTUNE_AZURE_WORKSPACE", "ws-env"),
            ]),
            &nested,
        )
        .unwrap();
        assert_eq!(
            (
                ws.subscription_id.as_str(),
                ws.resource_group.as_str(),
                ws.workspace_name.as_str()
            ),
            ("sub-env", "rg-cfg", "ws-flag")
        );
        assert_eq!(
            ws.arm_path(),
            "/subscriptions/sub-env/resourceGroups/rg-cfg/providers/Microsoft.MachineLearningServices/workspaces/ws-flag"
        );
    }

    #[test]
    fn the_scope_form_is_read_and_a_missing_workspace_says_where_to_get_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"Scope": "/subscriptions/s1/resourceGroups/r1/providers/Microsoft.MachineLearningServices/workspaces/w1"}"#,
        )
        .unwrap();
        let ws = Workspace::resolve(&WorkspaceFlags::default(), &env(&[]), dir.path()).unwrap();
        assert_eq!(
            (ws.subscription_id, ws.resource_group, ws.workspace_name),
            ("s1".into(), "r1".into(), "w1".into())
        );
        let empty = tempfile::tempdir().unwrap();
        let err =
            Workspace::resolve(&WorkspaceFlags::default(), &env(&[]), empty.path()).unwrap_err();
        assert!(err.is_usage());
        assert!(
            err.to_string().contains("--subscription-id")
                && err.to_string().contains("config.json"),
            "{err}"
        );
    }
}
