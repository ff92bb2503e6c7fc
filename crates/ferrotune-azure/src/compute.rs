//! The source's compute checks: the model's fine-tune allow list, the rejected old GPU sizes,
//! and the GPU count per node from the region's VM-size list.

use serde_json::Value;

use crate::arm::Arm;
use crate::error::{AzureError, Result};

/// Sizes the source rejects when the model carries no allow list (K80 GPUs).
pub const UNSUPPORTED_SIZES: [&str; 4] = [
    "standard_nc6",
    "standard_nc12",
    "standard_nc24",
    "standard_nc24r",
];

#[derive(Debug, Clone, PartialEq)]
pub struct VmSize {
    pub name: String,
    pub gpus: u32,
    pub vcpus: u32,
    pub memory_gb: f64,
    pub family: String,
}

#[derive(Debug, Clone)]
pub struct ComputeInfo {
    pub name: String,
    pub vm_size: String,
    pub max_nodes: Option<u32>,
    pub location: Option<String>,
}

pub fn compute(arm: &Arm, name: &str) -> Result<ComputeInfo> {
    let v = arm
        .get_opt(&arm.ws_url(&format!("computes/{name}")))?
        .ok_or_else(|| {
            AzureError::Usage(format!(
                "compute `{name}` is not in workspace {}",
                arm.workspace.workspace_name
            ))
        })?;
    let props = v
        .pointer("/properties/properties")
        .cloned()
        .unwrap_or(Value::Null);
    Ok(ComputeInfo {
        name: name.to_string(),
        vm_size: props
            .get("vmSize")
            .and_then(Value::as_str)
            .unwrap_or("<vm size>")
            .to_string(),
        max_nodes: props
            .pointer("/scaleSettings/maxNodeCount")
            .and_then(Value::as_u64)
            .map(|n| n as u32),
        location: v
            .get("location")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

pub fn vm_sizes(arm: &Arm, location: &str) -> Result<Vec<VmSize>> {
    let path = format!(
        "/subscriptions/{}/providers/Microsoft.MachineLearningServices/locations/{location}/vmSizes",
        arm.workspace.subscription_id
    );
    let v = arm.get(&arm.url(&path))?;
    Ok(v.get("value")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|s| {
                    Some(VmSize {
                        name: s.get("name")?.as_str()?.to_string(),
                        gpus: s.get("gpus").and_then(Value::as_u64).unwrap_or(0) as u32,
                        vcpus: s.get("vCPUs").and_then(Value::as_u64).unwrap_or(0) as u32,
                        memory_gb: s.get("memoryGB").and_then(Value::as_f64).unwrap_or(0.0),
                        family: s
                            .get("family")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The allow list as the model's `finetune_compute_allow_list` tag writes it: a Python list
/// literal (`['Standard_NC24ads_A100_v4', ...]`) or plain comma-separated names.
pub fn parse_allow_list(text: &str) -> Vec<String> {
    text.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|s| {
            s.trim()
                .trim_matches(|c| c == '\'' || c == '"')
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// The source's rule: with an allow list the size must be on it (any case); without one the
/// K80 sizes are refused.
pub fn check_size(size: &str, allow_list: Option<&[String]>) -> std::result::Result<(), String> {
    let lower = size.to_ascii_lowercase();
    match allow_list {
        Some(list) if !list.iter().any(|a| a.to_ascii_lowercase() == lower) => Err(format!(
            "VM size {size} is not in the allow-listed computes for finetuning: {}",
            list.join(", ")
        )),
        None if UNSUPPORTED_SIZES.contains(&lower.as_str()) => Err(format!(
            "VM size {size} is currently not supported for finetuning (K80 GPUs); use one of the NCv3, NC A100 v4 or ND H100 v5 sizes"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sources_checks() {
        let allow = parse_allow_list("['Standard_NC24ads_A100_v4', \"Standard_NC96ads_A100_v4\"]");
        assert_eq!(
            allow,
            ["Standard_NC24ads_A100_v4", "Standard_NC96ads_A100_v4"]
        );
        assert!(check_size("standard_nc24ads_a100_v4", Some(&allow)).is_ok());
        assert!(check_size("Standard_NC6s_v3", Some(&allow))
            .unwrap_err()
            .contains("allow-listed"));
        assert!(check_size("Standard_NC24r", None)
            .unwrap_err()
            .contains("not supported"));
        assert!(check_size("Standard_NC24rs_v3", None).is_ok());
    }
}
