//! `ferrotune serve`: load each deployment, start its batching engine, warm it up, then serve
//! until SIGTERM/Ctrl-C.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ferrotune_data::{ChatTemplate, SpecialTokens, Tokenizer};
use ferrotune_model::loaded::LoadedModel;
use ferrotune_registry::{Registry, VersionSpec};
use ferrotune_serve::{engine, parse_traffic, Deployment, Endpoint, Keys, ServerOptions};

use crate::cli::{ModelArgs, ServeArgs};
use crate::commands::model_args;
use crate::failure::Failure;

/// The source document's deployment name.
const DEFAULT_DEPLOYMENT: &str = "demo";

pub fn run(args: &ServeArgs) -> Result<(), Failure> {
    let specs = deployment_specs(args)?;
    let keys = keys(args)?;
    let host: IpAddr = args
        .host
        .parse()
        .map_err(|_| Failure::usage(format!("--host {}: not an IP address", args.host)))?;
    if keys.open() && !host.is_loopback() && !args.insecure_no_auth {
        return Err(Failure::usage(format!(
            "--host {host}: refusing to serve without a key on a non-loopback address; set --api-key / FERROTUNE_API_KEY (or --insecure-no-auth)"
        )));
    }
    let timeout = parse_duration(&args.request_timeout, "--request-timeout")?;
    let grace = parse_duration(&args.grace, "--grace")?;
    let traffic = match &args.traffic {
        Some(t) => parse_traffic(t).map_err(|m| Failure::usage(format!("--traffic: {m}")))?,
        None => Vec::new(),
    };
    // `None`: the default, a share of the memory free after each deployment loads.
    let kv_budget = match args.kv_cache_budget.as_deref() {
        None => None,
        Some("none") => Some(KvBudget::Unlimited),
        Some(text) => Some(KvBudget::Bytes(
            crate::commands::export::parse_size(text).ok_or_else(|| {
                Failure::usage(format!(
                    "--kv-cache-budget {text}: expected a size such as 4GiB or 500MB, or none"
                ))
            })?,
        )),
    };
    let mut deployments = Vec::new();
    let mut bases = BaseModels::default();
    let count = specs.len();
    for (i, (name, spec)) in specs.into_iter().enumerate() {
        let (dir, label) = resolve_spec(args, &spec)?;
        let options = DeploymentOptions {
            device: args.device.clone(),
            dtype: args.dtype.clone(),
            max_batch: args.max_concurrency,
            max_queue: args.max_queue,
            // Half of what is free, split among this deployment and those still to load.
            kv_budget: kv_budget.unwrap_or(KvBudget::HalfOfFree {
                shared_by: count - i,
            }),
        };
        deployments.push(deployment_from(&mut bases, &name, &dir, label, &options)?);
    }
    drop(bases);
    let endpoint = Arc::new(
        Endpoint::new(deployments, traffic)
            .map_err(|m| Failure::usage(format!("--traffic: {m}")))?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("starting the server runtime: {e}")))?;
    runtime.block_on(async move {
        let ready = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind((host, args.port))
            .await
            .map_err(|e| Failure::runtime(format!("binding {host}:{}: {e}", args.port)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::runtime(e.to_string()))?;
        let opts = ServerOptions {
            keys,
            request_timeout: timeout,
            max_body_bytes: 4 << 20,
            grace,
        };
        let serving = tokio::spawn(ferrotune_serve::serve(
            listener,
            endpoint.clone(),
            opts,
            ready.clone(),
            ferrotune_serve::termination(),
        ));
        ferrotune_serve::warm_up(&endpoint)
            .await
            .map_err(Failure::runtime)?;
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(f) = &args.port_file {
            let tmp = f.with_extension("tmp");
            std::fs::write(&tmp, addr.port().to_string())
                .and_then(|_| std::fs::rename(&tmp, f))
                .map_err(|e| Failure::runtime(format!("{}: {e}", f.display())))?;
        }
        tracing::info!(
            "serving {} on http://{addr} (traffic {:?}): POST /score, /invocations, /v1/chat/completions",
            endpoint.names().join(", "),
            endpoint.traffic()
        );
        serving
            .await
            .map_err(|e| Failure::runtime(format!("server task: {e}")))?
            .map_err(|e| Failure::runtime(format!("server: {e}")))
    })
}

/// `(name, spec)` per deployment.
fn deployment_specs(args: &ServeArgs) -> Result<Vec<(String, String)>, Failure> {
    if let Some(p) = &args.path {
        return Ok(vec![(DEFAULT_DEPLOYMENT.into(), p.display().to_string())]);
    }
    if let Some(m) = &args.model {
        return Ok(vec![(DEFAULT_DEPLOYMENT.into(), format!("registry:{m}"))]);
    }
    if args.deployments.is_empty() {
        return Err(Failure::usage(
            "nothing to serve: pass --path DIR, --model NAME[:VERSION] or --deployment NAME=SPEC",
        ));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for d in &args.deployments {
        let (name, spec) = d
            .split_once('=')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty())
            .ok_or_else(|| Failure::usage(format!("--deployment {d}: expected NAME=SPEC")))?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(Failure::usage(format!(
                "--deployment {name} is given twice"
            )));
        }
        out.push((name.to_string(), spec.to_string()));
    }
    Ok(out)
}

fn keys(args: &ServeArgs) -> Result<Keys, Failure> {
    let mut keys = Vec::new();
    if let Some(k) = &args.api_key {
        keys.push(k.clone());
    }
    if let Some(f) = &args.api_key_file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Failure::usage(format!("--api-key-file {}: {e}", f.display())))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take(2)
                .map(str::to_owned),
        );
    }
    if keys.iter().any(|k| k.len() < 16) {
        return Err(Failure::usage(
            "API keys must be at least 16 characters (generate one: openssl rand -hex 32)",
        ));
    }
    Ok(Keys {
        keys,
        admin: args.admin_key.clone(),
    })
}

/// `90s`, `2m`, `1500ms`, `90`.
pub fn parse_duration(text: &str, flag: &str) -> Result<Duration, Failure> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| Duration::from_secs_f64(v * scale))
        .ok_or_else(|| {
            Failure::usage(format!(
                "{flag} {text}: expected a duration such as 90s, 2m or 1500ms"
            ))
        })
}

/// A folder, or `registry:NAME[:VERSION|@ALIAS]` / a registered name when no such folder exists.
fn resolve_spec(args: &ServeArgs, spec: &str) -> Result<(PathBuf, String), Failure> {
    let registered = spec.strip_prefix("registry:");
    if registered.is_none() && Path::new(spec).is_dir() {
        return Ok((PathBuf::from(spec), spec.to_string()));
    }
    let name = registered.unwrap_or(spec);
    let home = args
        .home
        .clone()
        .unwrap_or_else(ferrotune_registry::default_home);
    let reg = Registry::open(&home)?;
    let v = reg.get(&VersionSpec::parse(name)?).map_err(|e| {
        Failure::usage(format!(
            "{spec}: not a folder, and not in the registry at {} ({e})",
            home.display()
        ))
    })?;
    Ok((v.path.clone(), format!("{}:{}", v.name, v.version)))
}

/// How much KV cache each deployment's batch may hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvBudget {
    Unlimited,
    Bytes(u64),
    /// Half of the memory free on the device once the deployment's model loaded, divided by
    /// `shared_by` (the default).
    HalfOfFree {
        shared_by: usize,
    },
}

impl KvBudget {
    /// Bytes for a deployment on `device`, read after its model loaded.
    fn bytes(self, device: &candle_core::Device) -> Option<u64> {
        match self {
            KvBudget::Unlimited => None,
            KvBudget::Bytes(b) => Some(b),
            KvBudget::HalfOfFree { shared_by } => ferrotune_model::device_memory::capacity(device)
                .map(|c| c.free / 2 / shared_by.max(1) as u64),
        }
    }
}

/// How a deployment runs: device and dtype (`--device`, `--dtype`), its batch, queue and KV
/// cache budget.
pub struct DeploymentOptions {
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub max_batch: usize,
    pub max_queue: usize,
    pub kv_budget: KvBudget,
}

/// One base model loaded, and where from.
struct Base {
    /// Canonical folder (or hub id), device and dtype.
    key: (String, Option<String>, Option<String>),
    loaded: LoadedModel,
    /// The deployment it was loaded for.
    first: String,
}

/// Base models loaded so far, by folder (or hub id), device and dtype: deployments of adapters
/// on the same base (and of the base itself) share its weights instead of loading them again.
#[derive(Default)]
pub struct BaseModels {
    loaded: Vec<Base>,
}

impl BaseModels {
    /// A model on the weights `args.model` names (`args.adapter` is not read), sharing them
    /// with every earlier deployment of the same base; no adapter attached.
    fn get(&mut self, args: &ModelArgs, deployment: &str) -> Result<LoadedModel, Failure> {
        let key = (
            std::fs::canonicalize(&args.model)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| args.model.clone()),
            args.device.clone(),
            args.dtype.clone(),
        );
        let base = match self.loaded.iter().position(|b| b.key == key) {
            Some(i) => {
                tracing::info!(
                    "deployment {deployment}: shares the base weights loaded for deployment {}",
                    self.loaded[i].first
                );
                &self.loaded[i].loaded
            }
            None => {
                self.loaded.push(Base {
                    key,
                    loaded: model_args::load(args)?,
                    first: deployment.to_string(),
                });
                &self.loaded.last().expect("just pushed").loaded
            }
        };
        Ok(LoadedModel {
            dir: base.dir.clone(),
            tokenizer_dir: base.tokenizer_dir.clone(),
            model: base.model.share_base()?,
            stop_ids: base.stop_ids.clone(),
        })
    }
}

/// A deployment of the model in `dir` (MLflow export, HF folder or PEFT adapter), on a base
/// shared through `bases`.
pub fn deployment_from(
    bases: &mut BaseModels,
    name: &str,
    dir: &Path,
    label: String,
    options: &DeploymentOptions,
) -> Result<Deployment, Failure> {
    let dir = dir.to_path_buf();
    let adapter = dir.join("adapter_config.json").is_file();
    let model = if adapter {
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json"))
                .map_err(|e| Failure::usage(format!("{}: {e}", dir.display())))?,
        )
        .map_err(|e| Failure::usage(format!("{}/adapter_config.json: {e}", dir.display())))?;
        cfg["base_model_name_or_path"]
            .as_str()
            .ok_or_else(|| {
                Failure::usage(format!(
                    "{}: the adapter names no base model (base_model_name_or_path)",
                    dir.display()
                ))
            })?
            .to_string()
    } else {
        dir.display().to_string()
    };
    let mut loaded = bases.get(
        &ModelArgs {
            model,
            adapter: None,
            device: options.device.clone(),
            dtype: options.dtype.clone(),
        },
        name,
    )?;
    if adapter {
        ferrotune_model::peft::load_adapter(&mut loaded.model, &dir)?;
        loaded.model.cache_adapter_casts()?;
    }
    let tokenizer = Tokenizer::load(&loaded.tokenizer_dir)?;
    let template = ChatTemplate::from_tokenizer_dir(
        &loaded.tokenizer_dir,
        SpecialTokens::from_tokenizer_dir(&loaded.tokenizer_dir)?,
    )?;
    tracing::info!(
        "deployment {name}: {label} ({} layers, {:?} on {:?})",
        loaded.model.config().num_hidden_layers,
        loaded.model.dtype(),
        loaded.model.device()
    );
    let budget = options.kv_budget.bytes(loaded.model.device());
    let per_token = engine::kv_bytes_per_token(&loaded.model);
    match budget {
        Some(b) => tracing::info!(
            "deployment {name}: KV cache budget {:.1} MiB ({} tokens of {} bytes)",
            b as f64 / (1u64 << 20) as f64,
            b / per_token.max(1),
            per_token
        ),
        None => tracing::info!("deployment {name}: no KV cache budget"),
    }
    let engine = engine::start_with_budget(
        loaded.model,
        loaded.stop_ids,
        options.max_batch,
        options.max_queue,
        budget,
    );
    Ok(Deployment {
        name: name.to_string(),
        model: label,
        engine,
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
    })
}
