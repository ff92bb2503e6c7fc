//! `ferrotune models`: the local registry (register, list, show, alias, export, delete) and
//! pushes to an MLflow model registry or an Azure ML workspace.

use clap::Parser;
use ferrotune_registry::push::{self, push_to_mlflow};
use ferrotune_registry::{ModelVersion, RegisterRequest, Registry, Selector, VersionSpec};
use serde_json::json;

use crate::cli::{ModelsArgs, ModelsCommand, ModelsRegisterArgs};
use crate::failure::Failure;
use crate::progress::RowBar;

pub fn run(args: &ModelsArgs, json_out: bool) -> Result<(), Failure> {
    let mut reg = Registry::open(&args.home)?;
    match &args.command {
        ModelsCommand::Register(r) => {
            let v = register(&mut reg, r)?;
            if json_out {
                println!("{}", json!(v));
            } else {
                println!(
                    "registered {}:{} ({}, {:.1} MB) in {}",
                    v.name,
                    v.version,
                    v.kind,
                    v.bytes as f64 / 1e6,
                    reg.home().display()
                );
            }
        }
        ModelsCommand::List => {
            let list = reg.list()?;
            if json_out {
                println!("{}", json!(list));
            } else if list.is_empty() {
                println!("no registered models in {}", reg.home().display());
            } else {
                println!("{:<44} {:>8} {:>12}  aliases", "name", "versions", "latest");
                for m in list {
                    let aliases: Vec<String> =
                        m.aliases.iter().map(|(a, v)| format!("{a}→{v}")).collect();
                    println!(
                        "{:<44} {:>8} {:>12}  {}",
                        m.name,
                        m.versions,
                        m.latest.map_or_else(|| "-".into(), |v| v.to_string()),
                        aliases.join(", ")
                    );
                }
            }
        }
        ModelsCommand::Show { spec: text } => {
            let spec = VersionSpec::parse(text)?;
            // `NAME` lists the versions; `NAME:latest`, `NAME:V`, `NAME@A` show one.
            if !text.contains([':', '@']) {
                let versions = reg.versions(&spec.name)?;
                if versions.is_empty() {
                    return Err(Failure::usage(format!(
                        "{} has no registered versions (see `ferrotune models list`)",
                        spec.name
                    )));
                }
                if json_out {
                    println!("{}", json!(versions));
                } else {
                    for v in &versions {
                        print_version_line(v);
                    }
                }
            } else {
                let v = reg.get(&spec)?;
                if json_out {
                    println!("{}", json!(v));
                } else {
                    print_version(&v);
                }
            }
        }
        ModelsCommand::Delete { spec, all } => {
            let spec = VersionSpec::parse(spec)?;
            let deleted = if *all {
                reg.delete_model(&spec.name)?
            } else {
                if spec.selector == Selector::Latest {
                    return Err(Failure::usage(format!(
                        "name the version to delete ({}:VERSION or {}@ALIAS), or pass --all to delete the model",
                        spec.name, spec.name
                    )));
                }
                let v = reg.get(&spec)?;
                vec![reg.delete_version(&v.name, v.version)?]
            };
            if json_out {
                println!("{}", json!({"deleted": deleted}));
            } else {
                for v in &deleted {
                    println!("deleted {}:{}", v.name, v.version);
                }
            }
        }
        ModelsCommand::Alias {
            name,
            alias,
            version,
            delete,
        } => {
            if *delete {
                reg.remove_alias(name, alias)?;
                println!("removed {name}@{alias}");
            } else {
                let version = version.expect("clap requires VERSION");
                reg.set_alias(name, alias, version)?;
                println!("{name}@{alias} → {version}");
            }
        }
        ModelsCommand::Export { spec, out, force } => {
            let v = reg.export(&VersionSpec::parse(spec)?, out, *force)?;
            if json_out {
                println!(
                    "{}",
                    json!({"name": v.name, "version": v.version, "out": out})
                );
            } else {
                println!("exported {}:{} to {}", v.name, v.version, out.display());
            }
        }
        ModelsCommand::Push { spec, to, name } => {
            let v = reg.get(&VersionSpec::parse(spec)?)?;
            if to.starts_with("azureml:") {
                return push_to_azure(&v, to, name.as_deref(), json_out);
            }
            let token = std::env::var("MLFLOW_TRACKING_TOKEN").ok();
            let bar = RowBar::counting(!json_out, "files");
            let report = push_to_mlflow(&v, to, token, name.as_deref(), &mut |done, total| {
                bar.tick(done, total)
            });
            bar.finish();
            let report = report?;
            if json_out {
                println!("{}", json!(report));
            } else {
                println!(
                    "pushed {}:{} to {} as {} version {} ({} files, {:.1} MB, {:.1} s; run {}{})",
                    v.name,
                    v.version,
                    report.uri,
                    report.name,
                    report.version,
                    report.files,
                    report.bytes as f64 / 1e6,
                    report.seconds,
                    report.run_id,
                    if report.training_run {
                        ", the training run"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(())
}

/// `models push --to azureml:…`: `ferrotune azure register` of the version's stored folder,
/// under the same name and version, with the lineage as tags.
fn push_to_azure(
    v: &ModelVersion,
    to: &str,
    name: Option<&str>,
    json_out: bool,
) -> Result<(), Failure> {
    if v.kind != "mlflow" {
        return Err(Failure::usage(format!(
            "{}:{} is a {} version; Azure ML deploys MLflow model folders (`ferrotune export` without --adapter-only)",
            v.name, v.version, v.kind
        )));
    }
    let ws = ferrotune_azure::WorkspaceFlags::from_uri(to)?;
    let mut argv: Vec<String> = vec!["ferrotune".into(), "azure".into()];
    for (flag, value) in [
        ("--subscription-id", ws.subscription_id),
        ("--resource-group", ws.resource_group),
        ("--workspace-name", ws.workspace_name),
    ] {
        if let Some(value) = value {
            argv.extend([flag.to_string(), value]);
        }
    }
    argv.extend(["register".into(), "--path".into()]);
    argv.push(v.path.display().to_string());
    argv.extend(["--name".into(), name.unwrap_or(&v.name).to_string()]);
    argv.extend(["--version".into(), v.version.to_string()]);
    if !v.description.is_empty() {
        argv.extend(["--description".into(), v.description.clone()]);
    }
    for (k, val) in push::version_tags(v) {
        argv.extend(["--tag".into(), format!("{k}={val}")]);
    }
    // Parsed as the user would have typed it, so `azure register`'s defaults apply unchanged.
    let cli = crate::cli::Cli::try_parse_from(&argv)
        .map_err(|e| Failure::usage(format!("--to {to}: {e}")))?;
    let crate::cli::Command::Azure(args) = cli.command else {
        unreachable!("argv names the azure command")
    };
    crate::commands::azure::run(&args, json_out)
}

/// Flags → a registration.
pub fn register(reg: &mut Registry, r: &ModelsRegisterArgs) -> Result<ModelVersion, Failure> {
    Ok(reg.register(&RegisterRequest {
        path: r.path.clone(),
        name: r.name.clone(),
        version: r.version,
        description: r.description.clone(),
        tags: parse_tags(&r.tags)?,
    })?)
}

/// `--tag KEY=VALUE` flags as pairs.
pub fn parse_tags(flags: &[String]) -> Result<Vec<(String, String)>, Failure> {
    flags
        .iter()
        .map(|t| {
            t.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| Failure::usage(format!("--tag {t}: expected KEY=VALUE")))
        })
        .collect()
}

fn print_version_line(v: &ModelVersion) {
    let lineage = v.lineage.as_ref();
    let step = lineage
        .and_then(|l| l.get("step"))
        .map_or_else(|| "-".into(), |s| s.to_string());
    let loss = lineage
        .and_then(|l| l.get("eval_loss"))
        .and_then(|x| x.as_f64())
        .map_or_else(|| "-".into(), |x| format!("{x:.4}"));
    println!(
        "{}:{}  {}  {:.1} MB  step {step}  eval_loss {loss}  {}",
        v.name,
        v.version,
        v.kind,
        v.bytes as f64 / 1e6,
        if v.aliases.is_empty() {
            String::new()
        } else {
            format!("@{}", v.aliases.join(" @"))
        }
    );
}

fn print_version(v: &ModelVersion) {
    println!("{}:{}", v.name, v.version);
    println!("  kind          {}", v.kind);
    if !v.description.is_empty() {
        println!("  description   {}", v.description);
    }
    let when = chrono::DateTime::from_timestamp_millis(v.created_ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC ").to_string())
        .unwrap_or_default();
    println!("  registered    {when}({} unix ms)", v.created_ms);
    println!("  stored at     {}", v.path.display());
    println!("  from          {}", v.source_path);
    println!("  size          {:.1} MB", v.bytes as f64 / 1e6);
    if !v.aliases.is_empty() {
        println!("  aliases       {}", v.aliases.join(", "));
    }
    for (k, val) in &v.tags {
        println!("  tag           {k}={val}");
    }
    match &v.lineage {
        Some(serde_json::Value::Object(l)) => {
            println!("  lineage");
            for (k, val) in l {
                let text = match val {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                println!("    {k:<24} {text}");
            }
        }
        _ => println!("  lineage       (none recorded: not exported by ferrotune)"),
    }
}
