//! Managed online endpoints: create, deploy, traffic, keys, invoke, delete (the source's steps
//! 9 to 11, with its defaults).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::arm::{Arm, Progress};
use crate::duration::iso8601;
use crate::error::{AzureError, Result};
use crate::http::{Call, Transport};

/// Endpoint names: 3 to 32 characters, a letter first, then letters, digits and `-`.
pub fn check_endpoint_name(name: &str) -> Result<()> {
    let ok = (3..=32).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(AzureError::Usage(format!(
            "endpoint name `{name}`: 3 to 32 letters, digits and '-', starting with a letter, not ending with '-'"
        )))
    }
}

fn workspace_location(arm: &Arm) -> Result<String> {
    let ws = arm.get(&arm.ws_url(""))?;
    if arm.is_dry_run() {
        return Ok("<workspace location>".into());
    }
    ws.get("location")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| AzureError::Operation("the workspace answer has no location".into()))
}

pub fn create_endpoint(
    arm: &Arm,
    name: &str,
    auth_mode: &str,
    description: &str,
    progress: Progress,
) -> Result<Value> {
    check_endpoint_name(name)?;
    let auth = match auth_mode.to_ascii_lowercase().as_str() {
        "key" => "Key",
        "aml_token" | "amltoken" => "AMLToken",
        "aad_token" | "aadtoken" => "AADToken",
        other => {
            return Err(AzureError::Usage(format!(
                "--auth {other}: expected key, aml_token or aad_token"
            )))
        }
    };
    let location = workspace_location(arm)?;
    let body = json!({
        "location": location,
        "identity": {"type": "SystemAssigned"},
        "properties": {"authMode": auth, "description": description, "traffic": {}}
    });
    arm.put_and_wait(
        &arm.ws_url(&format!("onlineEndpoints/{name}")),
        body,
        &format!("endpoint {name}"),
        progress,
    )
}

#[derive(Debug, Clone)]
pub struct DeploymentSpec {
    pub endpoint: String,
    pub name: String,
    /// ARM id of the model version.
    pub model_id: String,
    pub instance_type: String,
    pub instance_count: u32,
    pub liveness_initial_delay: Duration,
    pub request_timeout: Duration,
}

pub fn deploy(arm: &Arm, spec: &DeploymentSpec, progress: Progress) -> Result<Value> {
    check_endpoint_name(&spec.endpoint)?;
    if spec.name.is_empty()
        || spec.name.len() > 32
        || !spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(AzureError::Usage(format!(
            "deployment name `{}`: up to 32 letters, digits and '-'",
            spec.name
        )));
    }
    if spec.instance_count == 0 {
        return Err(AzureError::Usage(
            "--instance-count must be at least 1".into(),
        ));
    }
    let location = workspace_location(arm)?;
    let body = json!({
        "location": location,
        "sku": {"name": "Default", "capacity": spec.instance_count},
        "properties": {
            "endpointComputeType": "Managed",
            "model": spec.model_id,
            "instanceType": spec.instance_type,
            "requestSettings": {"requestTimeout": iso8601(spec.request_timeout)},
            "livenessProbe": {"initialDelay": iso8601(spec.liveness_initial_delay)}
        }
    });
    let url = arm.ws_url(&format!(
        "onlineEndpoints/{}/deployments/{}",
        spec.endpoint, spec.name
    ));
    arm.put_and_wait(
        &url,
        body,
        &format!("deployment {}/{}", spec.endpoint, spec.name),
        progress,
    )
}

/// `demo=100` or `blue=90,green=10`: names lower-cased, 0% entries dropped, total 100.
pub fn parse_traffic(text: &str) -> Result<Vec<(String, u32)>> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, pct) = part
            .split_once('=')
            .ok_or_else(|| AzureError::Usage(format!("traffic `{part}`: expected NAME=PERCENT")))?;
        let pct: u32 = pct
            .trim()
            .parse()
            .ok()
            .filter(|p| *p <= 100)
            .ok_or_else(|| {
                AzureError::Usage(format!("traffic `{part}`: the percentage must be 0 to 100"))
            })?;
        let name = name.trim().to_ascii_lowercase();
        if out.iter().any(|(n, _)| *n == name) {
            return Err(AzureError::Usage(format!("traffic names `{name}` twice")));
        }
        if pct > 0 {
            out.push((name, pct));
        }
    }
    let total: u32 = out.iter().map(|(_, p)| p).sum();
    if total != 100 && total != 0 {
        return Err(AzureError::Usage(format!(
            "traffic `{text}` adds up to {total}%, not 100%"
        )));
    }
    Ok(out)
}

/// Traffic is part of the endpoint: read it, change `properties.traffic`, put it back.
pub fn set_traffic(
    arm: &Arm,
    endpoint: &str,
    traffic: &[(String, u32)],
    progress: Progress,
) -> Result<Value> {
    let url = arm.ws_url(&format!("onlineEndpoints/{endpoint}"));
    let mut current = arm.get(&url)?;
    let weights: serde_json::Map<String, Value> =
        traffic.iter().map(|(n, p)| (n.clone(), json!(p))).collect();
    if arm.is_dry_run() {
        current = json!({"location": "<endpoint location>", "identity": {"type": "SystemAssigned"}, "properties": {"authMode": "Key"}});
    }
    let properties = current.get("properties").cloned().ok_or_else(|| {
        AzureError::Operation(format!("endpoint {endpoint}: the answer has no properties"))
    })?;
    let mut body = json!({
        "location": current.get("location").cloned().unwrap_or(Value::Null),
        "properties": {
            "authMode": properties.get("authMode").cloned().unwrap_or(json!("Key")),
            "traffic": weights
        }
    });
    if let Some(desc) = properties.get("description").filter(|d| !d.is_null()) {
        body["properties"]["description"] = desc.clone();
    }
    if let Some(identity) = current.get("identity").and_then(|i| i.get("type")) {
        body["identity"] = json!({"type": identity});
    }
    if let Some(tags) = current.get("tags").filter(|t| !t.is_null()) {
        body["tags"] = tags.clone();
    }
    arm.put_and_wait(&url, body, &format!("traffic of {endpoint}"), progress)
}

#[derive(Debug, Clone)]
pub struct EndpointKeys {
    pub primary: String,
    pub secondary: String,
}

pub fn keys(arm: &Arm, endpoint: &str) -> Result<EndpointKeys> {
    let v = arm.post(
        &arm.ws_url(&format!("onlineEndpoints/{endpoint}/listKeys")),
        None,
    )?;
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Ok(EndpointKeys {
        primary: s("primaryKey"),
        secondary: s("secondaryKey"),
    })
}

pub fn scoring_uri(arm: &Arm, endpoint: &str) -> Result<String> {
    let v = arm.get(&arm.ws_url(&format!("onlineEndpoints/{endpoint}")))?;
    if arm.is_dry_run() {
        return Ok(format!(
            "https://{endpoint}.<region>.inference.ml.azure.com/score"
        ));
    }
    v.pointer("/properties/scoringUri")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            AzureError::Operation(format!(
                "endpoint {endpoint} has no scoring URI yet (still creating?)"
            ))
        })
}

#[derive(Debug)]
pub struct Scored {
    pub status: u16,
    /// The deployment that answered (`azureml-model-deployment` response header).
    pub deployment: Option<String>,
    pub body: String,
}

/// POSTs a scoring request with the endpoint key, optionally pinned to one deployment.
pub fn invoke(
    transport: &Transport,
    uri: &str,
    key: &str,
    deployment: Option<&str>,
    body: Value,
) -> Result<Scored> {
    let mut call = Call::new(Method::POST, uri)
        .header("Authorization", format!("Bearer {key}"))
        .json(body);
    if let Some(d) = deployment {
        call = call.header("azureml-model-deployment", d);
    }
    let reply = transport.send(&call)?;
    let scored = Scored {
        status: reply.status,
        deployment: reply.header("azureml-model-deployment").map(str::to_string),
        body: String::from_utf8_lossy(&reply.body).to_string(),
    };
    if !reply.ok() {
        return Err(AzureError::Api {
            method: "POST".into(),
            url: uri.to_string(),
            status: reply.status,
            code: format!("HTTP{}", reply.status),
            message: scored.body.chars().take(400).collect(),
            request_id: reply.header("x-request-id").map(str::to_string),
        });
    }
    Ok(scored)
}

pub fn delete_endpoint(arm: &Arm, endpoint: &str, progress: Progress) -> Result<()> {
    arm.delete_and_wait(
        &arm.ws_url(&format!("onlineEndpoints/{endpoint}")),
        &format!("endpoint {endpoint}"),
        progress,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_is_validated_like_azure() {
        assert_eq!(
            parse_traffic("demo=100").unwrap(),
            [("demo".to_string(), 100)]
        );
        assert_eq!(
            parse_traffic("Blue=90, green=10,red=0").unwrap(),
            [("blue".into(), 90), ("green".into(), 10)]
        );
        assert!(parse_traffic("blue=90")
            .unwrap_err()
            .to_string()
            .contains("90%"));
        assert!(parse_traffic("blue").is_err() && parse_traffic("a=50,A=50").is_err());
        assert!(check_endpoint_name("ultrachat-completion-1764144000").is_ok());
        assert!(check_endpoint_name("1abc").is_err() && check_endpoint_name("ab").is_err());
    }
}
