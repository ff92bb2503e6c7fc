//! `ferrotune azure submit | job | run`: this binary and a training config as an Azure ML
//! command job, following it, and the source document end to end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrotune_azure::datastore;
use ferrotune_azure::duration;
use ferrotune_azure::endpoint::{self, DeploymentSpec};
use ferrotune_azure::job::{self, CommandJob, JobInput};
use ferrotune_azure::model::{self, ModelVersionSpec};
use ferrotune_azure::upload::{self, UploadOptions};
use serde_json::json;

use crate::cli::{AzureJobCommand, AzureRunArgs, AzureSubmitArgs};
use crate::commands::azure::{say, unix_time, Session};
use crate::failure::Failure;

/// What runs on each node: CUDA libraries on the loader path, the binary unpacked, `train`, and
/// on rank 0 the export into the job's `trained_model` output.
const JOB_SCRIPT: &str = r#"#!/usr/bin/env bash
# Written by `ferrotune azure submit`; runs on every Azure ML node as: ferrotune-job.sh OUT ARGS...
set -euo pipefail
out="$1"; shift
# cuBLAS, cuRAND, NVRTC and NCCL from the environment's Python wheels (nvidia-*) and conda libs.
prefix="${CONDA_PREFIX:-/opt/conda}"
for d in "$prefix"/lib/python3*/site-packages/nvidia/*/lib "$prefix/lib" /usr/local/cuda/lib64; do
  if [ -d "$d" ]; then LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
done
export LD_LIBRARY_PATH
bin=./ferrotune
if [ -f ferrotune.gz ]; then
  # One copy per process: the ranks of a node unpack at the same time.
  bin="${TMPDIR:-/tmp}/ferrotune-${RANK:-0}"
  gzip -dc ferrotune.gz >"$bin"
  chmod +x "$bin"
fi
"$bin" --version
"$bin" train "$@"
if [ "${RANK:-0}" = 0 ]; then
  staging="${TMPDIR:-/tmp}/ferrotune-export"
  "$bin" export --checkpoint outputs/ferrotune --out "$staging" --force
  cp -r "$staging"/. "$out"/
fi
"#;

/// A config value as written (before paths are made absolute), with `--set` applied.
fn raw_value(config: &Path, sets: &[String], key: &str) -> Result<Option<String>, Failure> {
    for s in sets.iter().rev() {
        if let Some((k, v)) = s.split_once('=') {
            if k.trim() == key {
                return Ok(Some(v.trim().to_string()));
            }
        }
    }
    let text = std::fs::read_to_string(config)
        .map_err(|e| Failure::usage(format!("{}: {e}", config.display())))?;
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| Failure::usage(format!("{}: {e}", config.display())))?;
    Ok(value.get(key).and_then(|v| match v {
        serde_yaml_ng::Value::String(s) => Some(s.clone()),
        serde_yaml_ng::Value::Null => None,
        other => serde_yaml_ng::to_string(other)
            .ok()
            .map(|t| t.trim().to_string()),
    }))
}

/// An input as the job sees it: `azureml://` (and `https://`) as they are; local files and
/// folders uploaded to the default datastore first, as azure-ai-ml does with local paths.
fn job_input(
    s: &Session,
    key: &str,
    value: &str,
    base: &Path,
    model: bool,
) -> Result<JobInput, Failure> {
    if value.starts_with("azureml:") || value.starts_with("https://") {
        let is_model = model && value.contains("/models/");
        let is_file = !model && Path::new(value.trim_end_matches('/')).extension().is_some();
        return Ok(if is_model {
            JobInput::MlflowModel(value.to_string())
        } else if is_file {
            JobInput::File(value.to_string())
        } else {
            JobInput::Folder(value.to_string())
        });
    }
    let path = if Path::new(value).is_absolute() {
        PathBuf::from(value)
    } else {
        base.join(value)
    };
    if !path.exists() {
        let hint = if model {
            "an azureml:// model (azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/N) or a local folder"
        } else {
            "an azureml:// path or a local file or folder"
        };
        return Err(Failure::usage(format!(
            "{key} = {value}: not found here; give {hint}"
        )));
    }
    let plan = if path.is_dir() {
        upload::scan(&path)?
    } else {
        upload::scan_file(&path)?
    };
    let ds = datastore::default_datastore(&s.arm)?;
    let container = datastore::container(&s.arm, &ds, &s.env)?;
    say(&format!(
        "uploading {key} ({}, {:.1} MB) to {}/{}",
        path.display(),
        plan.total_bytes() as f64 / 1e6,
        ds.name,
        plan.prefix
    ));
    upload::upload(&container, &plan, &UploadOptions::default(), &|_, _| {})?;
    let uri = if path.is_dir() {
        format!("azureml://datastores/{}/paths/{}", ds.name, plan.prefix)
    } else {
        format!(
            "azureml://datastores/{}/paths/{}/{}",
            ds.name, plan.prefix, plan.files[0].rel
        )
    };
    Ok(if path.is_dir() {
        JobInput::Folder(uri)
    } else {
        JobInput::File(uri)
    })
}

/// `<model>-ultrachat-200k` from an azureml:// model URI (its name after `models/`) or a folder.
fn registered_name(model: &str) -> String {
    let parts: Vec<&str> = model.trim_end_matches('/').split('/').collect();
    let short = parts
        .iter()
        .position(|p| *p == "models")
        .and_then(|i| parts.get(i + 1))
        .copied()
        .unwrap_or_else(|| parts.last().copied().unwrap_or("model"));
    ferrotune_registry::default_name(Some(&json!({ "base_model": short })))
        .unwrap_or_else(|| "model-ultrachat-200k".into())
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:@+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn default_binary() -> Result<PathBuf, Failure> {
    for cap in ["80", "90"] {
        let p = PathBuf::from(format!("dist/cuda-sm{cap}/ferrotune.gz"));
        if p.is_file() {
            return Ok(p);
        }
    }
    if !cfg!(feature = "cuda") {
        eprintln!(
            "warning: no dist/cuda-sm80/ferrotune.gz (scripts/build-cuda.sh --cap 80) and this binary has no CUDA: \
             the job would train on the node's CPU; pass --binary"
        );
    }
    std::env::current_exe().map_err(|e| Failure::runtime(format!("cannot find this binary: {e}")))
}

pub struct Submitted {
    pub name: String,
    pub registered_name: String,
}

pub fn submit(s: &Session, a: &AzureSubmitArgs, json_out: bool) -> Result<Submitted, Failure> {
    if a.nodes == 0 || a.gpus_per_node == 0 {
        return Err(Failure::usage(
            "--nodes and --gpus-per-node must be at least 1",
        ));
    }
    // The whole config is checked here, before anything is uploaded or submitted.
    let cfg = ferrotune_train::TrainConfig::load(&a.config, &a.sets)?;
    for key in ["tokenizer", "init_adapter"] {
        if let Some(v) = raw_value(&a.config, &a.sets, key)? {
            if !v.starts_with("azureml:") {
                return Err(Failure::usage(format!(
                    "{key} = {v}: local paths other than the model and the data are not uploaded; \
                     remove it or make it an azureml:// path"
                )));
            }
        }
    }
    let base = a.config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let model = match &a.model {
        Some(m) => m.clone(),
        None => raw_value(&a.config, &a.sets, "model")?
            .ok_or_else(|| Failure::usage("the config names no model"))?,
    };
    let train = match &a.data {
        Some(d) => d.clone(),
        None => raw_value(&a.config, &a.sets, "train_file_path")?
            .ok_or_else(|| Failure::usage("the config names no train_file_path"))?,
    };
    let validation = raw_value(&a.config, &a.sets, "validation_file_path")?;

    if !s.arm.is_dry_run() {
        let info = ferrotune_azure::compute::compute(&s.arm, &a.compute)?;
        ferrotune_azure::compute::check_size(&info.vm_size, None).map_err(Failure::usage)?;
        say(&format!("compute {}: {}", a.compute, info.vm_size));
    }
    let mut inputs = vec![
        (
            "model".to_string(),
            job_input(s, "model", &model, &base, true)?,
        ),
        (
            "train".to_string(),
            job_input(s, "train_file_path", &train, &base, false)?,
        ),
    ];
    if let Some(v) = &validation {
        inputs.push((
            "validation".to_string(),
            job_input(s, "validation_file_path", v, &base, false)?,
        ));
    }

    let code =
        tempfile::tempdir().map_err(|e| Failure::runtime(format!("temporary folder: {e}")))?;
    let binary = match &a.binary {
        Some(b) => b.clone(),
        None => default_binary()?,
    };
    let target = if binary.extension().is_some_and(|e| e == "gz") {
        "ferrotune.gz"
    } else {
        "ferrotune"
    };
    std::fs::copy(&binary, code.path().join(target))
        .map_err(|e| Failure::usage(format!("--binary {}: {e}", binary.display())))?;
    std::fs::copy(&a.config, code.path().join("train.yaml"))
        .map_err(|e| Failure::usage(format!("--config {}: {e}", a.config.display())))?;
    std::fs::write(code.path().join("ferrotune-job.sh"), JOB_SCRIPT)
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let code_id = job::upload_code(&s.arm, code.path(), &UploadOptions::default(), &mut say)?;

    let mut command =
        String::from("bash ferrotune-job.sh ${{outputs.trained_model}} --config train.yaml");
    command.push_str(" --set model=${{inputs.model}} --set train_file_path=${{inputs.train}}");
    if validation.is_some() {
        command.push_str(" --set validation_file_path=${{inputs.validation}}");
    }
    for set in &a.sets {
        let key = set.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
        if ![
            "model",
            "train_file_path",
            "validation_file_path",
            "output_dir",
        ]
        .contains(&key)
        {
            command.push_str(&format!(" --set {}", shell_quote(set)));
        }
    }
    // Checkpoints and metrics under ./outputs, which Azure ML keeps with the job.
    command.push_str(" --set output_dir=outputs/ferrotune");

    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("ferrotune-{}", unix_time()));
    let registered = registered_name(&model);
    let spec = CommandJob {
        name: name.clone(),
        display_name: cfg.display_name(),
        experiment: a.experiment.clone(),
        compute: a.compute.clone(),
        environment: a.environment.clone(),
        code_id,
        command,
        nodes: a.nodes,
        processes_per_node: a.gpus_per_node,
        inputs,
        model_outputs: vec!["trained_model".into()],
        timeout: duration::parse(&a.job_timeout)?,
        environment_variables: vec![("RUST_LOG".into(), "info".into())],
        tags: vec![
            ("ferrotune.registered_name".into(), registered.clone()),
            ("ferrotune.version".into(), env!("CARGO_PKG_VERSION").into()),
        ],
    };
    let answer = job::submit(&s.arm, &spec)?;
    let studio = answer
        .pointer("/properties/services/Studio/endpoint")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    if !s.arm.is_dry_run() {
        if json_out && !a.stream {
            println!(
                "{}",
                json!({"name": name, "studio_url": studio, "registered_name": registered})
            );
        } else {
            eprintln!(
                "submitted job {name}{}",
                studio.map(|u| format!(": {u}")).unwrap_or_default()
            );
        }
    }
    if a.stream {
        stream(s, &name)?;
    }
    Ok(Submitted {
        name,
        registered_name: registered,
    })
}

fn stream(s: &Session, name: &str) -> Result<String, Failure> {
    let poll = s.arm.poll_interval.max(Duration::from_millis(10));
    let status = job::follow(&s.arm, name, poll, true, &mut |line| eprintln!("{line}"))?;
    if !s.arm.is_dry_run() && status != "Completed" {
        return Err(Failure::runtime(format!("job {name} ended {status}")));
    }
    Ok(status)
}

pub fn job(s: &Session, j: &AzureJobCommand, json_out: bool) -> Result<(), Failure> {
    match j {
        AzureJobCommand::Show { name } => {
            let st = job::status(&s.arm, name)?;
            if json_out {
                println!(
                    "{}",
                    json!({"name": name, "status": st.status, "studio_url": st.studio_url, "tags": st.tags})
                );
            } else if !s.arm.is_dry_run() {
                println!(
                    "job {name}: {}{}",
                    st.status,
                    st.studio_url.map(|u| format!(" ({u})")).unwrap_or_default()
                );
            }
            Ok(())
        }
        AzureJobCommand::Stream { name } => stream(s, name).map(|_| ()),
        AzureJobCommand::Cancel { name } => {
            job::cancel(&s.arm, name)?;
            if !s.arm.is_dry_run() {
                println!("job {name}: cancel requested");
            }
            Ok(())
        }
    }
}

/// The source document's flow, one step after the other; each step's output feeds the next.
pub fn pipeline(s: &Session, r: &AzureRunArgs) -> Result<(), Failure> {
    if !r.score_file.is_file() {
        return Err(Failure::usage(format!(
            "--score-file {}: not found; make one with `ferrotune invoke --sample --data <ultrachat folder> --file {}`",
            r.score_file.display(),
            r.score_file.display()
        )));
    }
    let mut submit_args = clone_submit(&r.submit);
    submit_args.stream = true;
    eprintln!("1/7 submit and follow the fine-tuning job");
    let submitted = submit(s, &submit_args, false)?;
    eprintln!("2/7 register its trained_model");
    let version = unix_time();
    let name = r.model_name.clone().unwrap_or(submitted.registered_name);
    let spec = ModelVersionSpec {
        description: format!(
            "{name}: fine tuned with ferrotune for ultrachat-200k chat completion"
        ),
        name: name.clone(),
        version: version.clone(),
        job: Some(submitted.name.clone()),
        tags: vec![],
    };
    let registered = model::register_job_output(&s.arm, &submitted.name, "trained_model", &spec)?;
    let ep = r
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("ultrachat-completion-{version}"));
    eprintln!("3/7 endpoint {ep}");
    endpoint::create_endpoint(
        &s.arm,
        &ep,
        "key",
        &format!("Online endpoint for {name}, fine tuned model for ultrachat-200k-chat-completion"),
        &mut say,
    )?;
    eprintln!("4/7 deployment demo ({})", r.instance_type);
    let dep = DeploymentSpec {
        endpoint: ep.clone(),
        name: "demo".into(),
        model_id: registered.id.clone(),
        instance_type: r.instance_type.clone(),
        instance_count: 1,
        liveness_initial_delay: Duration::from_secs(600),
        request_timeout: Duration::from_secs(90),
    };
    endpoint::deploy(&s.arm, &dep, &mut say)?;
    eprintln!("5/7 traffic demo=100");
    endpoint::set_traffic(&s.arm, &ep, &[("demo".into(), 100)], &mut say)?;
    eprintln!("6/7 score {}", r.score_file.display());
    let answer = crate::commands::azure::invoke(s, &ep, Some("demo"), &r.score_file)?;
    if !s.arm.is_dry_run() {
        println!("{answer}");
    }
    if r.delete {
        eprintln!("7/7 delete endpoint {ep}");
        endpoint::delete_endpoint(&s.arm, &ep, &mut say)?;
    } else {
        eprintln!(
            "7/7 endpoint {ep} kept (ferrotune azure delete --endpoint {ep} --yes removes it)"
        );
    }
    Ok(())
}

fn clone_submit(a: &AzureSubmitArgs) -> AzureSubmitArgs {
    AzureSubmitArgs {
        config: a.config.clone(),
        sets: a.sets.clone(),
        compute: a.compute.clone(),
        nodes: a.nodes,
        gpus_per_node: a.gpus_per_node,
        environment: a.environment.clone(),
        model: a.model.clone(),
        data: a.data.clone(),
        experiment: a.experiment.clone(),
        name: a.name.clone(),
        binary: a.binary.clone(),
        job_timeout: a.job_timeout.clone(),
        stream: a.stream,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_quoting() {
        assert_eq!(
            registered_name(
                "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/7"
            ),
            "Phi-3-mini-4k-instruct-ultrachat-200k"
        );
        assert_eq!(
            registered_name("/data/models/tiny phi3/"),
            "tiny-phi3-ultrachat-200k"
        );
        assert_eq!(shell_quote("learning_rate=1e-4"), "learning_rate=1e-4");
        assert_eq!(shell_quote("run_name=it's"), r"'run_name=it'\''s'");
    }
}
