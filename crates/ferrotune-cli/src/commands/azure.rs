//! `ferrotune azure`: the source document's Azure ML steps over REST (login, compute checks,
//! register, endpoint, deploy, traffic, keys, invoke, delete); jobs live in `azure_job`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ferrotune_azure::credential::{identity_of, DefaultCredential, TokenCredential, ARM_SCOPE};
use ferrotune_azure::endpoint::{self, DeploymentSpec};
use ferrotune_azure::http::{DryRunSink, RetryPolicy, Transport};
use ferrotune_azure::model::{self, ModelVersionSpec, RegisteredModel};
use ferrotune_azure::upload::UploadOptions;
use ferrotune_azure::{compute, duration, Arm, AzureError, Workspace, WorkspaceFlags};
use ferrotune_registry::{Registry, VersionSpec};
use serde_json::json;

use crate::cli::{
    AzureArgs, AzureCommand, AzureComputeCheckArgs, AzureComputeCommand, AzureDeployArgs,
    AzureEndpointCommand, AzureRegisterArgs,
};
use crate::failure::Failure;

impl From<AzureError> for Failure {
    fn from(e: AzureError) -> Failure {
        if e.is_usage() {
            Failure::usage(e.to_string())
        } else {
            Failure::runtime(e.to_string())
        }
    }
}

/// Everything a command needs to talk to the workspace.
pub struct Session {
    pub arm: Arm,
    pub transport: Transport,
    pub env: HashMap<String, String>,
    pub credential: Arc<DefaultCredential>,
}

pub fn session(args: &AzureArgs) -> Result<Session, Failure> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let cwd = std::env::current_dir().map_err(|e| Failure::runtime(e.to_string()))?;
    let flags = WorkspaceFlags {
        subscription_id: args.subscription_id.clone(),
        resource_group: args.resource_group.clone(),
        workspace_name: args.workspace_name.clone(),
        config: args.workspace_config.clone(),
    };
    let workspace = match Workspace::resolve(&flags, &env, &cwd) {
        Ok(ws) => ws,
        // A dry run shows the flow even before a workspace exists.
        Err(e) if args.dry_run && e.is_usage() => Workspace {
            subscription_id: flags
                .subscription_id
                .clone()
                .unwrap_or_else(|| "<subscription-id>".into()),
            resource_group: flags
                .resource_group
                .clone()
                .unwrap_or_else(|| "<resource-group>".into()),
            workspace_name: flags
                .workspace_name
                .clone()
                .unwrap_or_else(|| "<workspace>".into()),
        },
        Err(e) => return Err(e.into()),
    };
    let sink = args.dry_run.then_some(DryRunSink::Stdout);
    let transport = Transport::new(RetryPolicy::default(), sink)?;
    let credential = Arc::new(DefaultCredential::from_env(&env)?);
    let mut arm = Arm::new(
        transport.clone(),
        credential.clone(),
        &args.arm_endpoint,
        workspace,
    );
    arm.poll_interval = duration::parse(&args.poll_interval)?;
    arm.operation_timeout = duration::parse(&args.timeout)?;
    Ok(Session {
        arm,
        transport,
        env,
        credential,
    })
}

/// Progress of long-running operations, on stderr.
pub fn say(line: &str) {
    eprintln!("  {line}");
}

pub fn unix_time() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string()
}

pub fn run(args: &AzureArgs, json_out: bool) -> Result<(), Failure> {
    let outcome = dispatch(args, json_out);
    if args.dry_run && outcome.is_ok() {
        eprintln!("dry run: nothing was sent");
    }
    outcome
}

fn dispatch(args: &AzureArgs, json_out: bool) -> Result<(), Failure> {
    if let AzureCommand::Compute(AzureComputeCommand::Check(c)) = &args.command {
        if c.sku.is_some() {
            // A VM size needs no workspace.
            return compute_check(None, c, json_out);
        }
    }
    let s = session(args)?;
    match &args.command {
        AzureCommand::Login { check } => login(&s, *check, args.dry_run, json_out),
        AzureCommand::Compute(AzureComputeCommand::Check(c)) => {
            compute_check(Some(&s), c, json_out)
        }
        AzureCommand::Register(r) => {
            let m = register(&s, r)?;
            if !args.dry_run {
                print_registered(&m, json_out);
            }
            Ok(())
        }
        AzureCommand::Endpoint(AzureEndpointCommand::Create {
            name,
            auth,
            description,
        }) => {
            let description = description.clone().unwrap_or_else(|| {
                format!(
                    "Online endpoint {name}, fine tuned model for ultrachat-200k-chat-completion"
                )
            });
            let v = endpoint::create_endpoint(&s.arm, name, auth, &description, &mut say)?;
            report_endpoint(name, &v, json_out);
            Ok(())
        }
        AzureCommand::Endpoint(AzureEndpointCommand::Show { name }) => {
            let v = s
                .arm
                .get(&s.arm.ws_url(&format!("onlineEndpoints/{name}")))?;
            report_endpoint(name, &v, json_out);
            Ok(())
        }
        AzureCommand::Deploy(d) => {
            let v = deploy(&s, d)?;
            if json_out {
                println!("{v}");
            } else if !s.arm.is_dry_run() {
                println!(
                    "deployment {}/{}: {}",
                    d.endpoint,
                    d.name,
                    v.pointer("/properties/provisioningState")
                        .and_then(|x| x.as_str())
                        .unwrap_or("done")
                );
            }
            Ok(())
        }
        AzureCommand::Traffic {
            endpoint: ep,
            traffic,
        } => {
            let weights = endpoint::parse_traffic(traffic)?;
            let v = endpoint::set_traffic(&s.arm, ep, &weights, &mut say)?;
            if json_out {
                println!("{v}");
            } else if !s.arm.is_dry_run() {
                println!(
                    "traffic of {ep}: {}",
                    v.pointer("/properties/traffic")
                        .cloned()
                        .unwrap_or(json!({}))
                );
            }
            Ok(())
        }
        AzureCommand::Keys { endpoint: ep, show } => {
            let keys = endpoint::keys(&s.arm, ep)?;
            let shown = |k: &str| if *show { k.to_string() } else { mask(k) };
            if json_out {
                println!(
                    "{}",
                    json!({"primaryKey": shown(&keys.primary), "secondaryKey": shown(&keys.secondary)})
                );
            } else if !s.arm.is_dry_run() {
                println!(
                    "primary:   {}\nsecondary: {}",
                    shown(&keys.primary),
                    shown(&keys.secondary)
                );
                if !show {
                    eprintln!("(masked; --show prints them)");
                }
            }
            Ok(())
        }
        AzureCommand::Invoke {
            endpoint: ep,
            deployment,
            file,
        } => {
            let out = invoke(&s, ep, deployment.as_deref(), file)?;
            if !s.arm.is_dry_run() {
                println!("{out}");
            }
            Ok(())
        }
        AzureCommand::Delete { endpoint: ep, yes } => delete(&s, ep, *yes),
        AzureCommand::Submit(a) => crate::commands::azure_job::submit(&s, a, json_out).map(|_| ()),
        AzureCommand::Job(j) => crate::commands::azure_job::job(&s, j, json_out),
        AzureCommand::Run(r) => crate::commands::azure_job::pipeline(&s, r),
    }
}

fn mask(key: &str) -> String {
    if key.len() <= 8 {
        return "***".into();
    }
    format!("{}…({} characters)", &key[..4], key.len())
}

fn login(s: &Session, check: bool, dry_run: bool, json_out: bool) -> Result<(), Failure> {
    let ws = &s.arm.workspace;
    if dry_run {
        println!(
            "credentials would be tried in this order: {}",
            s.credential.chain().join(" → ")
        );
        println!(
            "workspace: {} (resource group {}, subscription {})",
            ws.workspace_name, ws.resource_group, ws.subscription_id
        );
        return Ok(());
    }
    let token = s.credential.token(ARM_SCOPE)?;
    let who = identity_of(&token).unwrap_or_default();
    let location = if check {
        let v = s.arm.get(&s.arm.ws_url(""))?;
        v.get("location")
            .and_then(|l| l.as_str())
            .map(str::to_string)
    } else {
        None
    };
    let valid_for = token
        .expires_at
        .duration_since(SystemTime::now())
        .map(|d| d.as_secs() / 60)
        .unwrap_or(0);
    if json_out {
        println!(
            "{}",
            json!({"source": s.credential.source(), "name": who.name, "app_id": who.app_id, "object_id": who.object_id,
                   "tenant_id": who.tenant_id, "token_minutes_left": valid_for, "subscription_id": ws.subscription_id,
                   "resource_group": ws.resource_group, "workspace_name": ws.workspace_name, "workspace_location": location})
        );
        return Ok(());
    }
    let name = who
        .name
        .or(who.app_id.map(|a| format!("application {a}")))
        .unwrap_or_else(|| "an unnamed identity".into());
    println!("signed in as {name} via {}", s.credential.source());
    if let (Some(oid), Some(tid)) = (&who.object_id, &who.tenant_id) {
        println!("object id {oid}, tenant {tid}; token valid for {valid_for} more minutes");
    }
    println!(
        "workspace {} (resource group {}, subscription {})",
        ws.workspace_name, ws.resource_group, ws.subscription_id
    );
    if let Some(l) = location {
        println!("workspace reachable, in {l}");
    }
    Ok(())
}

fn compute_check(
    s: Option<&Session>,
    c: &AzureComputeCheckArgs,
    json_out: bool,
) -> Result<(), Failure> {
    let allow = c.allow_list.as_deref().map(compute::parse_allow_list);
    let (size, gpus, source) = match (s, &c.compute) {
        (Some(s), Some(name)) => {
            let info = compute::compute(&s.arm, name)?;
            let location = match info.location.clone() {
                Some(l) => l,
                None => s
                    .arm
                    .get(&s.arm.ws_url(""))?
                    .get("location")
                    .and_then(|l| l.as_str())
                    .unwrap_or("")
                    .to_string(),
            };
            let sizes = compute::vm_sizes(&s.arm, &location)?;
            let gpus = sizes
                .iter()
                .find(|v| v.name.eq_ignore_ascii_case(&info.vm_size))
                .map(|v| v.gpus as u64);
            (
                info.vm_size,
                gpus,
                format!("compute {name}, VM sizes of {location}"),
            )
        }
        _ => {
            let sku = c.sku.clone().expect("clap: --sku or --compute");
            let gpus = ferrotune_train::plan::azure_sku(&sku)
                .ok()
                .map(|t| t.gpus_per_node as u64);
            (
                sku,
                gpus,
                "ferrotune's table of Azure GPU sizes".to_string(),
            )
        }
    };
    let size_check = compute::check_size(&size, allow.as_deref());
    let plan = c.config.as_ref().map(|path| plan_for(path, &c.sets, &size));
    if json_out {
        println!(
            "{}",
            json!({"vm_size": size, "gpus_per_node": gpus, "gpus_from": source,
                   "supported": size_check.is_ok(), "reason": size_check.as_ref().err(),
                   "plan": plan.as_ref().map(|p| p.as_ref().map_err(|f| f.message.clone()))})
        );
    } else {
        println!(
            "VM size {size}: {}",
            match gpus {
                Some(g) => format!("{g} GPU(s) per node (gpus_per_node = {g}; from {source})"),
                None => format!("GPU count unknown ({source})"),
            }
        );
        match &size_check {
            Ok(()) => println!(
                "fine-tuning: allowed{}",
                if allow.is_some() {
                    " (on the model's allow list)"
                } else {
                    ""
                }
            ),
            Err(why) => println!("fine-tuning: refused: {why}"),
        }
        match &plan {
            Some(Ok(line)) => println!("{line}"),
            Some(Err(f)) => println!("memory plan: not computed: {}", f.message),
            None => {}
        }
    }
    if let Err(why) = size_check {
        return Err(Failure::usage(why));
    }
    if let Some(Err(f)) = plan {
        return Err(f);
    }
    Ok(())
}

fn plan_for(config: &Path, sets: &[String], size: &str) -> Result<String, Failure> {
    use ferrotune_train::plan;
    let cfg = ferrotune_train::TrainConfig::load(config, sets)?;
    let target = plan::azure_sku(size).map_err(Failure::usage)?;
    let input = crate::commands::plan::input(&cfg, true)?;
    let verdict = plan::verdict(&input, target.memory_per_gpu);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut line = format!(
        "memory plan on {} ({} GPU(s) of {:.0} GiB): needs {:.1} GiB of {:.1} GiB usable: {}",
        target.name,
        target.gpus_per_node,
        gib(target.memory_per_gpu),
        gib(verdict.needed_bytes),
        gib(verdict.usable_bytes),
        if verdict.fits { "fits" } else { "does NOT fit" }
    );
    if !verdict.fits {
        line.push_str(&format!(
            " (largest micro batch that fits: {}; largest seq length: {})",
            verdict
                .largest_micro_batch
                .map_or("none".into(), |b| b.to_string()),
            verdict
                .largest_seq_len
                .map_or("none".into(), |t| t.to_string())
        ));
    }
    Ok(line)
}

/// `--path`, `--model` (local registry) or `--job`: upload if needed, then create the version.
pub fn register(s: &Session, r: &AzureRegisterArgs) -> Result<RegisteredModel, Failure> {
    let version = r.version.clone().unwrap_or_else(unix_time);
    let tags = crate::commands::models::parse_tags(&r.tags)?;
    let folder: Option<PathBuf> = match (&r.path, &r.model) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(spec)) => {
            let reg = Registry::open(&ferrotune_registry::default_home())?;
            let v = reg.get(&VersionSpec::parse(spec)?)?;
            if v.kind != "mlflow" {
                return Err(Failure::usage(format!(
                    "--model {spec} is a {} version; Azure deploys MLflow model folders (ferrotune export --merge)",
                    v.kind
                )));
            }
            Some(v.path)
        }
        (None, None) => None,
    };
    let name = match (&r.name, &folder, &r.job) {
        (Some(n), _, _) => n.clone(),
        (None, Some(dir), _) => {
            let (_, lineage) = ferrotune_registry::inspect(dir)?;
            ferrotune_registry::default_name(lineage.as_ref()).ok_or_else(|| {
                Failure::usage(format!(
                    "{}: no lineage names the base model; pass --name",
                    dir.display()
                ))
            })?
        }
        (None, None, Some(job)) => job_model_name(s, job)?,
        (None, None, None) => {
            return Err(Failure::usage(
                "what to register? --path DIR, --model NAME:VERSION or --job JOB",
            ))
        }
    };
    let spec = ModelVersionSpec {
        description: r.description.clone().unwrap_or_else(|| {
            format!("{name}: fine tuned with ferrotune for ultrachat-200k chat completion")
        }),
        name,
        version,
        job: r.job.clone(),
        tags,
    };
    let Some(dir) = folder else {
        return Ok(model::register_job_output(
            &s.arm,
            r.job.as_deref().expect("checked"),
            &r.output,
            &spec,
        )?);
    };
    let opts = upload_options(&r.block_size, r.parallel)?;
    let cancel = opts.cancel.clone().expect("set by upload_options");
    let _ = ctrlc::set_handler(move || cancel.store(true, Ordering::SeqCst));
    let shown = AtomicU64::new(0);
    let progress = |sent: u64, total: u64| {
        let tenth = (sent * 10).checked_div(total).unwrap_or(10);
        if tenth > shown.swap(tenth, Ordering::SeqCst) && total > 0 {
            eprintln!(
                "  uploaded {:.1} of {:.1} MB",
                sent as f64 / 1e6,
                total as f64 / 1e6
            );
        }
    };
    Ok(model::register_folder(
        &s.arm, &s.env, &dir, &spec, &opts, &progress, &mut say,
    )?)
}

/// The model name a submitted job's tags carry (`ferrotune azure submit` sets it).
fn job_model_name(s: &Session, job: &str) -> Result<String, Failure> {
    if s.arm.is_dry_run() {
        return Ok("<model>-ultrachat-200k".into());
    }
    let status = ferrotune_azure::job::status(&s.arm, job)?;
    status
        .tags
        .get("ferrotune.registered_name")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            Failure::usage(format!(
                "job {job} does not say which model it trained; pass --name"
            ))
        })
}

pub fn upload_options(block_size: &str, parallel: usize) -> Result<UploadOptions, Failure> {
    let block = crate::commands::export::parse_size(block_size).ok_or_else(|| {
        Failure::usage(format!(
            "--block-size {block_size}: expected a size such as 32MiB, 100MB or bytes"
        ))
    })?;
    if !(64 * 1024..=4000 * 1024 * 1024).contains(&block) {
        return Err(Failure::usage(format!(
            "--block-size {block_size}: between 64KiB and 4000MiB (the service's block limit)"
        )));
    }
    Ok(UploadOptions {
        block_size: block,
        parallelism: parallel.max(1),
        cancel: Some(Arc::new(AtomicBool::new(false))),
    })
}

pub fn print_registered(m: &RegisteredModel, json_out: bool) {
    if json_out {
        println!(
            "{}",
            json!({"id": m.id, "name": m.name, "version": m.version, "model_uri": m.model_uri,
                   "upload": m.upload.as_ref().map(|u| json!({"already_complete": u.already_complete,
                       "files_uploaded": u.files_uploaded, "files_skipped": u.files_skipped,
                       "blocks_uploaded": u.blocks_uploaded, "blocks_reused": u.blocks_reused, "bytes_sent": u.bytes_sent}))})
        );
    } else {
        println!("registered {}:{} ({})", m.name, m.version, m.model_uri);
    }
}

pub fn deploy(s: &Session, d: &AzureDeployArgs) -> Result<serde_json::Value, Failure> {
    let spec = DeploymentSpec {
        endpoint: d.endpoint.clone(),
        name: d.name.clone(),
        model_id: model::version_id(&s.arm, &d.model)?,
        instance_type: d.instance_type.clone(),
        instance_count: d.instance_count,
        liveness_initial_delay: duration::parse(&d.liveness_initial_delay)?,
        request_timeout: duration::parse(&d.request_timeout)?,
    };
    Ok(endpoint::deploy(&s.arm, &spec, &mut say)?)
}

fn report_endpoint(name: &str, v: &serde_json::Value, json_out: bool) {
    if json_out {
        println!("{v}");
        return;
    }
    if v.is_null() {
        return; // dry run
    }
    let p = |k: &str| {
        v.pointer(&format!("/properties/{k}"))
            .cloned()
            .unwrap_or(json!(null))
    };
    println!(
        "endpoint {name}: {}, auth {}, scoring URI {}, traffic {}",
        p("provisioningState").as_str().unwrap_or("?"),
        p("authMode").as_str().unwrap_or("?"),
        p("scoringUri").as_str().unwrap_or("(not yet)"),
        p("traffic")
    );
}

pub fn invoke(
    s: &Session,
    ep: &str,
    deployment: Option<&str>,
    file: &Path,
) -> Result<String, Failure> {
    let text = std::fs::read(file)
        .map_err(|e| Failure::usage(format!("--file {}: {e}", file.display())))?;
    let body: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Failure::usage(format!("--file {}: not JSON: {e}", file.display())))?;
    let uri = endpoint::scoring_uri(&s.arm, ep)?;
    let keys = endpoint::keys(&s.arm, ep)?;
    let scored = endpoint::invoke(&s.transport, &uri, &keys.primary, deployment, body)?;
    if let Some(d) = &scored.deployment {
        eprintln!("  answered by deployment {d}");
    }
    Ok(scored.body)
}

fn delete(s: &Session, ep: &str, yes: bool) -> Result<(), Failure> {
    if !yes && !s.arm.is_dry_run() {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::usage(format!(
                "deleting endpoint {ep} needs --yes when not asked on a terminal"
            )));
        }
        eprint!("delete endpoint {ep} and all its deployments? [y/N] ");
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .map_err(|e| Failure::runtime(e.to_string()))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(Failure::usage("not deleted"));
        }
    }
    endpoint::delete_endpoint(&s.arm, ep, &mut say)?;
    if !s.arm.is_dry_run() {
        println!("endpoint {ep} deleted");
    }
    Ok(())
}
