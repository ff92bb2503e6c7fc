//! Every flag of the `ferrotune` binary, with its help text and environment variable.
//! Precedence: (config file, for commands that take one) < `FERROTUNE_*` environment < flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "ferrotune",
    version,
    about = "Fine-tune Phi-3 with LoRA: data, training, export, serving and Azure ML, in one binary",
    propagate_version = true
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The whole pipeline; without --config, on the bundled tiny model and ultrachat sample.
    Run(RunArgs),
    /// Prepare, inspect and summarise training data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train LoRA adapters (single process or one rank of many).
    Train(TrainArgs),
    /// Loss and perplexity of a model on prepared data.
    Eval(EvalArgs),
    /// Generate text from a model, with or without an adapter.
    Generate(GenerateArgs),
    /// Memory estimate for a training config: fits / does not fit on a GPU or Azure VM size.
    Plan(PlanArgs),
    /// Export a checkpoint as an MLflow model folder (or a PEFT adapter), or verify an export.
    Export(ExportArgs),
    /// The local model registry: register, list, show, alias, export, push, delete.
    Models(ModelsArgs),
    /// Serve models over HTTP: Azure's /score, MLflow's /invocations, OpenAI's chat API.
    Serve(ServeArgs),
    /// Call a scoring endpoint (ferrotune serve or Azure ML) with a request file.
    Invoke(InvokeArgs),
    /// Azure ML over REST: login, compute checks, register, endpoints, deployments, traffic,
    /// keys, invoke, delete, and training as a command job.
    Azure(AzureArgs),
    /// Throughput benchmarks, side by side with the Python reference.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training config (YAML) with the source document's parameter names; see the README.
    #[arg(long, env = "FERROTUNE_CONFIG")]
    pub config: PathBuf,
    /// Override one config key (repeatable): --set learning_rate=1e-4 --set max_steps=50.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue from a checkpoint folder, a training output folder (its newest checkpoint),
    /// or `auto` (the newest checkpoint in output_dir, else a fresh start).
    #[arg(long, env = "FERROTUNE_RESUME", value_name = "DIR|auto")]
    pub resume: Option<String>,
    /// Print the resolved config and the memory plan, then stop (nothing is loaded).
    #[arg(long)]
    pub dry_run: bool,
    /// Start N ranks on this node (one per GPU, or N CPU processes) and wait for them, as
    /// torchrun does. Under torchrun or Azure ML (RANK/WORLD_SIZE set) each process is one rank.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Nodes in the job (with --nproc-per-node).
    #[arg(long, default_value_t = 1, requires = "nproc_per_node")]
    pub nnodes: usize,
    /// This node's index, 0..nnodes.
    #[arg(long, default_value_t = 0, requires = "nproc_per_node")]
    pub node_rank: usize,
    /// Rank 0's host (with several nodes: an address every node reaches).
    #[arg(long, default_value = "127.0.0.1", requires = "nproc_per_node")]
    pub master_addr: String,
    /// Rank 0's port (default: 29500 with several nodes, a free port on one).
    #[arg(long, requires = "nproc_per_node")]
    pub master_port: Option<u16>,
    /// Seconds a rank waits for another in a collective before it gives up and names it.
    #[arg(long, env = "FERROTUNE_DIST_TIMEOUT", default_value_t = 600)]
    pub dist_timeout: u64,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint folder, a training output_dir (its newest checkpoint) or a PEFT adapter
    /// folder. With --verify: the checkpoint to compare with (default: the one the export names).
    #[arg(long, required_unless_present = "verify")]
    pub checkpoint: Option<PathBuf>,
    /// The folder to create.
    #[arg(long, required_unless_present = "verify", conflicts_with = "verify")]
    pub out: Option<PathBuf>,
    /// Fold the adapter into the base weights and write an MLflow model folder (the default).
    #[arg(long, conflicts_with = "adapter_only")]
    pub merge: bool,
    /// Write the PEFT adapter and a model card instead.
    #[arg(long)]
    pub adapter_only: bool,
    /// Weights dtype: bf16 (merged default), f16 or f32 (adapter default).
    #[arg(long)]
    pub dtype: Option<String>,
    /// MLflow inference task.
    #[arg(long, default_value = "llm/v1/chat")]
    pub task: String,
    /// Replace --out if it exists (only once the new folder is complete).
    #[arg(long)]
    pub force: bool,
    /// Largest safetensors shard: 500MB (MLflow's default), 5GB, 2GiB, or bytes.
    #[arg(
        long,
        env = "MLFLOW_HUGGINGFACE_MODEL_MAX_SHARD_SIZE",
        default_value = "500MB"
    )]
    pub max_shard_size: String,
    /// The base model, when it is no longer where the checkpoint says.
    #[arg(long)]
    pub base_model: Option<String>,
    /// Check an exported folder: complete, loadable, and answering as its checkpoint does.
    #[arg(long, value_name = "DIR")]
    pub verify: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// Registry folder (registry.db and stored models).
    #[arg(long, env = "FERROTUNE_HOME", default_value_os_t = ferrotune_registry::default_home(), global = true)]
    pub home: PathBuf,
    #[command(subcommand)]
    pub command: ModelsCommand,
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Register an exported folder (MLflow model or PEFT adapter) as a new version.
    #[command(disable_version_flag = true)]
    Register(ModelsRegisterArgs),
    /// Registered models with their latest version and aliases.
    List,
    /// A model's versions (NAME), or one version with its lineage (NAME:VERSION, NAME@ALIAS).
    Show { spec: String },
    /// Delete a version (NAME:VERSION, NAME@ALIAS), or a model with all its versions (NAME --all).
    Delete {
        spec: String,
        /// Delete every version of the model and the model itself.
        #[arg(long)]
        all: bool,
    },
    /// Point ALIAS at VERSION of NAME (moving it if set), or remove it with --delete.
    #[command(disable_version_flag = true)]
    Alias {
        name: String,
        alias: String,
        #[arg(required_unless_present = "delete")]
        version: Option<u64>,
        #[arg(long)]
        delete: bool,
    },
    /// Copy a version's folder out (NAME:VERSION --out DIR).
    Export {
        spec: String,
        #[arg(long)]
        out: PathBuf,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Push a version to an MLflow model registry (a `mlflow server`; token from
    /// MLFLOW_TRACKING_TOKEN) or to an Azure ML workspace's models.
    Push {
        spec: String,
        /// http(s)://host:port (an MLflow server), or azureml://subscriptions/S/resourceGroups/R/
        /// workspaces/W (also a workspace's MLflow tracking URI; a bare `azureml:` uses the
        /// workspace `ferrotune azure` would: AZURE_* variables or config.json).
        #[arg(long, env = "MLFLOW_TRACKING_URI")]
        to: String,
        /// Registered model name there (default: the local name).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct ModelsRegisterArgs {
    /// A folder written by `ferrotune export` (MLflow model or PEFT adapter).
    #[arg(long)]
    pub path: PathBuf,
    /// Registered model name (default: `<base model>-ultrachat-200k`, from the lineage).
    #[arg(long)]
    pub name: Option<String>,
    /// Version number (default: the current Unix time in seconds, as the source document does).
    #[arg(long)]
    pub version: Option<u64>,
    #[arg(long, default_value = "")]
    pub description: String,
    /// A tag (repeatable): --tag team=nlp.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A folder to serve as deployment `demo`: an MLflow export, an HF model folder or a PEFT
    /// adapter (its base from adapter_config.json).
    #[arg(long, conflicts_with_all = ["model", "deployments"])]
    pub path: Option<PathBuf>,
    /// A registered model to serve as deployment `demo`: NAME, NAME:VERSION or NAME@ALIAS.
    #[arg(long, conflicts_with = "deployments")]
    pub model: Option<String>,
    /// NAME=SPEC (repeatable): SPEC is a folder or a registered NAME[:VERSION|@ALIAS].
    #[arg(long = "deployment", value_name = "NAME=SPEC")]
    pub deployments: Vec<String>,
    /// Traffic split across deployments: blue=90,green=10 (sums to 100).
    #[arg(long)]
    pub traffic: Option<String>,
    #[arg(long, env = "FERROTUNE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (see --port-file).
    #[arg(long, env = "FERROTUNE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Write the bound port here once listening.
    #[arg(long)]
    pub port_file: Option<PathBuf>,
    /// The primary key (Authorization: Bearer KEY or api-key: KEY).
    #[arg(long, env = "FERROTUNE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A file with the primary key on its first line and optionally a secondary on its second.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Key for PUT /admin/traffic (default: the primary key).
    #[arg(long, env = "FERROTUNE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Serve without keys on a non-loopback address.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Sequences decoded together per deployment (the continuous batch).
    #[arg(long, default_value_t = 32)]
    pub max_concurrency: usize,
    /// Requests waiting per deployment before 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// KV cache bytes per deployment (`4GiB`, `500MB`, bytes, or `none`): requests join the
    /// batch only while its cache fits, and the youngest sequence is preempted (and resumed
    /// later, unchanged) when the growing batch would pass it. Default: half of the memory free
    /// on the device after loading, shared by the deployments.
    #[arg(long, value_name = "SIZE")]
    pub kv_cache_budget: Option<String>,
    /// Per-request limit (the source's request_timeout_ms is 90 s): 90s, 2m, 1500ms.
    #[arg(long, default_value = "90s")]
    pub request_timeout: String,
    /// After SIGTERM, how long in-flight requests may finish.
    #[arg(long, default_value = "30s")]
    pub grace: String,
    /// cpu, cuda or cuda:N (default: CUDA when present).
    #[arg(long, env = "FERROTUNE_DEVICE")]
    pub device: Option<String>,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on GPU).
    #[arg(long, env = "FERROTUNE_DTYPE")]
    pub dtype: Option<String>,
    /// Registry folder for --model / registered SPECs.
    #[arg(long, env = "FERROTUNE_HOME")]
    pub home: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InvokeArgs {
    /// The endpoint: http(s)://host:port (then /score) or a full scoring URI.
    #[arg(long, env = "FERROTUNE_ENDPOINT", required_unless_present = "sample")]
    pub endpoint: Option<String>,
    /// Key sent as Authorization: Bearer KEY.
    #[arg(long, env = "FERROTUNE_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Pin a deployment (azureml-model-deployment header).
    #[arg(long)]
    pub deployment: Option<String>,
    /// The request body, e.g. the source's sample_score.json (with --sample: where to write it).
    #[arg(long, required_unless_present = "sample")]
    pub file: Option<PathBuf>,
    /// Build sample_score.json as the source does: one random row of --data's --split, with
    /// temperature 0.6, top_p 0.9, do_sample, max_new_tokens 200 (sent when --endpoint is given).
    #[arg(long, requires = "data")]
    pub sample: bool,
    /// ultrachat data: a Hugging Face or jsonl folder, or one .parquet/.jsonl file.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "test_gen")]
    pub split: String,
    /// Which random row (default: a fresh draw).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Training config (YAML), as for `ferrotune train`.
    #[arg(long, env = "FERROTUNE_CONFIG")]
    pub config: PathBuf,
    /// Override one config key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// A GPU: H100-80GB, H100-94GB, H200, A100-40GB, A100-80GB, A10, V100-16GB, V100-32GB, ...
    #[arg(long, conflicts_with = "sku")]
    pub gpu: Option<String>,
    /// An Azure VM size: Standard_NC24ads_A100_v4, Standard_NC6s_v3, Standard_ND96isr_H100_v5, ...
    #[arg(long)]
    pub sku: Option<String>,
    /// Ranks of a data-parallel job (all GPUs of all nodes): the bytes each step all-reduces,
    /// ZeRO-2's optimizer-state saving, and on-paper all-reduce times on common links.
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Folder for everything the run makes (data, later checkpoints and exports).
    #[arg(long, env = "FERROTUNE_WORKDIR", default_value = "ferrotune-run")]
    pub workdir: PathBuf,
    /// Pipeline config (YAML); without it the embedded default runs.
    #[arg(long, env = "FERROTUNE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one key of the embedded training recipe (repeatable): --set num_train_epochs=1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Read a split, apply the chat template, tokenize, mask, (pack) and cache as token shards.
    Prepare(PrepareArgs),
    /// Show one prepared conversation with its trained tokens highlighted.
    Inspect(InspectArgs),
    /// Rows, tokens, trainable tokens, lengths and dropped rows of a prepared folder.
    Stats(StatsArgs),
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// A folder in the Hugging Face layout (data/{split}-*.parquet) or the jsonl layout
    /// ({split}.jsonl), or one .parquet/.jsonl file.
    #[arg(long, env = "FERROTUNE_DATA_INPUT")]
    pub input: PathBuf,
    /// Split to read when --input is a folder (train_sft, test_sft, train_gen, test_gen).
    #[arg(long, env = "FERROTUNE_DATA_SPLIT")]
    pub split: Option<String>,
    /// Folder with the model's tokenizer.json and tokenizer_config.json (its chat template).
    #[arg(long, env = "FERROTUNE_TOKENIZER")]
    pub tokenizer: PathBuf,
    /// Output folder for the token shards and manifest.json.
    #[arg(long, env = "FERROTUNE_DATA_OUT")]
    pub out: PathBuf,
    /// Keep the first P% of the split, rounded as `datasets`' split[:P%] (1-100).
    #[arg(long, env = "FERROTUNE_SPLIT_PC")]
    pub split_pc: Option<u32>,
    /// Cut conversations to this many tokens.
    #[arg(long, env = "FERROTUNE_MAX_SEQ_LENGTH", default_value_t = 4096)]
    pub max_seq_length: usize,
    /// Pack several conversations into each sequence (boundaries are kept).
    #[arg(long, env = "FERROTUNE_PACK")]
    pub pack: bool,
    /// What to do with malformed rows.
    #[arg(long, value_enum, env = "FERROTUNE_ON_BAD_ROW", default_value_t = BadRowPolicy::Skip)]
    pub on_bad_row: BadRowPolicy,
    /// Rebuild even when the folder already holds this exact preparation.
    #[arg(long)]
    pub force: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadRowPolicy {
    /// Drop malformed rows, count them by reason and show where the first ones are.
    Skip,
    /// Stop at the first malformed row (exit code 2).
    Fail,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A folder made by `ferrotune data prepare`.
    #[arg(long)]
    pub data: PathBuf,
    /// Conversation index (0-based, among the kept conversations).
    #[arg(long, default_value_t = 0)]
    pub row: u64,
    /// Never colour the output (also: NO_COLOR set).
    #[arg(long)]
    pub no_color: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// A folder made by `ferrotune data prepare`.
    #[arg(long)]
    pub data: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// `data prepare` throughput against transformers' apply_chat_template, in one run.
    Data(BenchDataArgs),
    /// LoRA forward+backward tokens/s and peak memory against transformers + PEFT (PyTorch eager).
    Train(BenchTrainArgs),
    /// Decoding tokens/s (prefill, then single-stream and batched greedy decoding with the KV
    /// cache) against transformers' `generate` on the same shape.
    Decode(BenchDecodeArgs),
    /// Chat load on `ferrotune serve` (1, 8, 32 streams) against transformers served the simple way.
    Serve(BenchServeArgs),
    /// Training attention alone, forward and backward: flash attention against the kept
    /// probabilities (what training runs without it), on one shape, in one run.
    Attention(BenchAttentionArgs),
}

#[derive(Args, Debug)]
pub struct BenchAttentionArgs {
    /// cpu, cuda or cuda:N (on the CPU flash attention is its f32 reference: a correctness
    /// oracle, not a fast path; use small shapes there).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Attention heads (Phi-3-mini: 32).
    #[arg(long, default_value_t = 32)]
    pub heads: usize,
    /// Sequence length.
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Head dimension (Phi-3-mini: 96).
    #[arg(long, default_value_t = 96)]
    pub head_dim: usize,
    /// Timed forward+backward passes of each.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed passes first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
}

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// The model to serve (an export or model folder).
    #[arg(long)]
    pub model: PathBuf,
    /// Concurrent streams per round.
    #[arg(long, default_value = "1,8,32")]
    pub streams: String,
    /// Requests per round.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// A Python with torch + transformers: also load scripts/serve_reference.py the same way.
    #[arg(long)]
    pub python: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchDataArgs {
    /// Conversations in the benchmark input (the bundled sample, repeated and merged).
    #[arg(long, default_value_t = 20_000)]
    pub rows: usize,
    /// Sample conversations merged into each benchmark conversation, for ultrachat-like length.
    #[arg(long, default_value_t = 6)]
    pub merge: usize,
    /// Python interpreter with transformers installed, for the reference.
    #[arg(long, env = "FERROTUNE_PYTHON", default_value = "python3")]
    pub python: String,
    /// Rows the Python reference processes (it is slow; its rate is what is compared).
    #[arg(long, default_value_t = 4_000)]
    pub reference_rows: usize,
    /// Skip the Python reference (ferrotune's numbers only).
    #[arg(long)]
    pub no_reference: bool,
    /// Tokenizer folder (default: the bundled Phi-3 tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Where and in which precision a model runs.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Model folder (HF layout) or a hub id found in the Hugging Face cache
    /// (e.g. microsoft/Phi-3-mini-4k-instruct; nothing is downloaded).
    #[arg(long, env = "FERROTUNE_MODEL")]
    pub model: String,
    /// A PEFT LoRA adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// cpu, cuda or cuda:N (default: cuda when built with it and a GPU is present, else cpu).
    #[arg(long, env = "FERROTUNE_DEVICE")]
    pub device: Option<String>,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long, env = "FERROTUNE_DTYPE")]
    pub dtype: Option<String>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "messages"])))]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Plain text prompt, tokenized as is (no chat template).
    #[arg(long)]
    pub prompt: Option<String>,
    /// JSON file with a conversation (a list of {role, content}, or an ultrachat row with
    /// `messages`); the model's chat template is applied with the assistant prompt added.
    #[arg(long)]
    pub messages: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A folder made by `ferrotune data prepare` (with this model's tokenizer).
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate only the first N conversations.
    #[arg(long)]
    pub max_rows: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct BenchTrainArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub model: RandomShape,
    /// f32, bf16 or f16 for the frozen weights and activations (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// The device's dense peak in TFLOP/s for that dtype, for MFU (default: 989, an H100/H200
    /// SXM in bf16; CUDA only).
    #[arg(long, default_value_t = 989.0)]
    pub peak_tflops: f64,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// LoRA rank (alpha = 2r) on all four decoder linears.
    #[arg(long, default_value_t = 16)]
    pub r: usize,
    /// LoRA dropout on the adapters' input (PEFT's `lora_dropout`), in both runs.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Use per-layer recompute (activation checkpointing) for the backward.
    #[arg(long)]
    pub recompute: bool,
    /// Python with torch, transformers and peft, for the reference.
    #[arg(long, env = "FERROTUNE_PYTHON", default_value = "python3")]
    pub python: String,
    /// Skip the PyTorch reference.
    #[arg(long)]
    pub no_reference: bool,
    /// Benchmark a whole training run instead: `ferrotune train` on this config against
    /// transformers' Trainer + PEFT on the same prepared data (scripts/bench_trainer_reference.py).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Override one key of --config (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
    pub sets: Vec<String>,
}

/// A Phi-3 of random weights for the benchmarks: a named shape or explicit sizes.
#[derive(Args, Debug, Clone)]
pub struct RandomShape {
    /// A named shape instead of --layers/--hidden/...: phi3-mini (Phi-3-mini-4k-instruct).
    #[arg(long, value_parser = ["phi3-mini"])]
    pub shape: Option<String>,
    #[arg(long, default_value_t = 32064)]
    pub vocab: usize,
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 768)]
    pub intermediate: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
}

impl RandomShape {
    /// The sizes as the Python reference scripts take them (call on a resolved shape).
    pub fn python_args(&self) -> [(&'static str, usize); 6] {
        [
            ("--vocab", self.vocab),
            ("--hidden", self.hidden),
            ("--intermediate", self.intermediate),
            ("--layers", self.layers),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
        ]
    }

    /// The sizes, with a named shape applied.
    pub fn resolved(&self) -> RandomShape {
        match self.shape.as_deref() {
            Some("phi3-mini") => RandomShape {
                shape: None,
                vocab: 32064,
                hidden: 3072,
                intermediate: 8192,
                layers: 32,
                heads: 32,
                kv_heads: 32,
            },
            _ => self.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct BenchDecodeArgs {
    /// A model folder (HF or MLflow export) to decode with; without it, random weights of the
    /// shape below.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    #[command(flatten)]
    pub model: RandomShape,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// New tokens per sequence (greedy, no stop token: every row decodes all of them).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Batch sizes to measure: 1 is single-stream decoding.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Python with torch and transformers, for the reference (`generate`, same shape and lengths).
    #[arg(long, env = "FERROTUNE_PYTHON", default_value = "python3")]
    pub python: String,
    /// Skip the PyTorch reference.
    #[arg(long)]
    pub no_reference: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_subcommand_s_flags_are_consistent() {
        // clap checks flag clashes only when a subcommand is parsed; check them all here.
        super::Cli::command().debug_assert();
    }
}

#[derive(Args, Debug)]
pub struct AzureArgs {
    /// Subscription id (else FERROTUNE_AZURE_SUBSCRIPTION_ID / AZURE_SUBSCRIPTION_ID, else config.json).
    #[arg(long, global = true)]
    pub subscription_id: Option<String>,
    /// Resource group (else FERROTUNE_AZURE_RESOURCE_GROUP / AZURE_RESOURCE_GROUP, else config.json).
    #[arg(long, global = true)]
    pub resource_group: Option<String>,
    /// Workspace name (else FERROTUNE_AZURE_WORKSPACE, else config.json).
    #[arg(long, global = true)]
    pub workspace_name: Option<String>,
    /// The workspace's config.json (default: searched from here upwards, as MLClient.from_config does).
    #[arg(long, global = true, value_name = "FILE")]
    pub workspace_config: Option<PathBuf>,
    /// Resource Manager URL (sovereign clouds, tests).
    #[arg(
        long,
        global = true,
        env = "AZURE_RESOURCE_MANAGER_ENDPOINT",
        default_value = "https://management.azure.com"
    )]
    pub arm_endpoint: String,
    /// Print the requests (method, URL, body; secrets masked) instead of sending them.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Longest wait for a long-running operation (endpoint, deployment, delete).
    #[arg(long, global = true, default_value = "2h")]
    pub timeout: String,
    /// Time between polls of a long-running operation or a job.
    #[arg(long, global = true, default_value = "10s")]
    pub poll_interval: String,
    #[command(subcommand)]
    pub command: AzureCommand,
}

#[derive(Subcommand, Debug)]
pub enum AzureCommand {
    /// Resolve credentials (DefaultAzureCredential's order) and the workspace, and say who you are.
    Login {
        /// Also read the workspace, to prove the identity may use it.
        #[arg(long)]
        check: bool,
    },
    /// Compute checks of the source document, and the memory plan's verdict.
    #[command(subcommand)]
    Compute(AzureComputeCommand),
    /// Upload an MLflow model folder and register it as a model version (or register a job's output).
    #[command(disable_version_flag = true)]
    Register(AzureRegisterArgs),
    /// Managed online endpoints.
    #[command(subcommand)]
    Endpoint(AzureEndpointCommand),
    /// Create or update a deployment behind an endpoint.
    Deploy(AzureDeployArgs),
    /// Set the endpoint's traffic: demo=100 or blue=90,green=10.
    Traffic {
        #[arg(long)]
        endpoint: String,
        traffic: String,
    },
    /// The endpoint's keys (masked unless --show).
    Keys {
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        show: bool,
    },
    /// Score a request file on the endpoint (the source's sample_score.json).
    Invoke {
        #[arg(long)]
        endpoint: String,
        /// Pin one deployment (azureml-model-deployment).
        #[arg(long)]
        deployment: Option<String>,
        #[arg(long, default_value = "sample_score.json")]
        file: PathBuf,
    },
    /// Delete the endpoint and its deployments.
    Delete {
        #[arg(long)]
        endpoint: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// Train on Azure ML: this binary and the config as a command job.
    Submit(AzureSubmitArgs),
    /// A submitted job: show, stream, cancel.
    #[command(subcommand)]
    Job(AzureJobCommand),
    /// The source document end to end: submit, stream, register, endpoint, deploy, traffic,
    /// invoke, and delete with --delete.
    Run(AzureRunArgs),
}

#[derive(Subcommand, Debug)]
pub enum AzureComputeCommand {
    /// Is this compute (or VM size) fit for fine-tuning, how many GPUs per node, does the config fit?
    Check(AzureComputeCheckArgs),
}

#[derive(Args, Debug)]
pub struct AzureComputeCheckArgs {
    /// A compute cluster of the workspace.
    #[arg(long, required_unless_present = "sku", conflicts_with = "sku")]
    pub compute: Option<String>,
    /// A VM size, checked without a workspace.
    #[arg(long)]
    pub sku: Option<String>,
    /// The model's finetune_compute_allow_list tag: ['Standard_NC24ads_A100_v4', ...] or a,b,c.
    #[arg(long)]
    pub allow_list: Option<String>,
    /// A training config: also print whether it fits the VM size's GPUs.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

#[derive(Args, Debug)]
pub struct AzureRegisterArgs {
    /// An MLflow model folder (`ferrotune export`).
    #[arg(long, conflicts_with_all = ["model", "job"])]
    pub path: Option<PathBuf>,
    /// A version of the local registry (NAME:VERSION or NAME@ALIAS).
    #[arg(long, conflicts_with = "job")]
    pub model: Option<String>,
    /// A job whose output to register (azureml://jobs/JOB/outputs/trained_model); with --path or
    /// --model: the lineage only.
    #[arg(long)]
    pub job: Option<String>,
    /// The job output to register.
    #[arg(long, default_value = "trained_model")]
    pub output: String,
    /// Model name (default `<base model>-ultrachat-200k`).
    #[arg(long)]
    pub name: Option<String>,
    /// Version (default: the Unix time, as the source does).
    #[arg(long)]
    pub version: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Upload block size (multi-GB shards go up as blocks).
    #[arg(long, default_value = "32MiB")]
    pub block_size: String,
    /// Blocks uploaded at once.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
}

#[derive(Subcommand, Debug)]
pub enum AzureEndpointCommand {
    /// Create (or update) a managed online endpoint.
    Create {
        name: String,
        /// key (the source's), aml_token or aad_token.
        #[arg(long, default_value = "key")]
        auth: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// The endpoint's state, scoring URI and traffic.
    Show { name: String },
}

#[derive(Args, Debug)]
pub struct AzureDeployArgs {
    #[arg(long)]
    pub endpoint: String,
    #[arg(long, default_value = "demo")]
    pub name: String,
    /// The registered model: NAME:VERSION in the workspace (or its ARM id).
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value = "Standard_NC6s_v3")]
    pub instance_type: String,
    #[arg(long, default_value_t = 1)]
    pub instance_count: u32,
    #[arg(long, default_value = "600s")]
    pub liveness_initial_delay: String,
    #[arg(long, default_value = "90s")]
    pub request_timeout: String,
}

#[derive(Args, Debug)]
pub struct AzureSubmitArgs {
    /// Training config, as for `ferrotune train` (validated here before anything is sent).
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// The workspace's compute cluster.
    #[arg(long)]
    pub compute: String,
    /// Nodes (the job's instance count).
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
    /// Processes per node, one per GPU.
    #[arg(long, default_value_t = 1)]
    pub gpus_per_node: u32,
    /// Azure ML environment with CUDA and NCCL libraries.
    #[arg(
        long,
        default_value = "azureml://registries/azureml/environments/acpt-pytorch-2.2-cuda12.1/labels/latest"
    )]
    pub environment: String,
    /// Base model: an azureml:// model (as the source's registry model), or a local folder to upload.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: azureml:// folder/file, or a local folder/file to upload (default: the config's).
    #[arg(long)]
    pub data: Option<String>,
    #[arg(long, default_value = "chat_completion_Phi-3-mini-4k-instruct")]
    pub experiment: String,
    /// Job name (default ferrotune-<unix time>).
    #[arg(long)]
    pub name: Option<String>,
    /// The Linux binary to run there (default: dist/cuda-sm80/ferrotune.gz, else this binary).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// The job's time limit.
    #[arg(long, default_value = "5h")]
    pub job_timeout: String,
    /// Follow the job and its logs until it ends; exit with its outcome.
    #[arg(long)]
    pub stream: bool,
}

#[derive(Subcommand, Debug)]
pub enum AzureJobCommand {
    /// Status and studio link.
    Show { name: String },
    /// Follow status and user logs until the job ends; exit 1 unless it completed.
    Stream { name: String },
    /// Cancel the job.
    Cancel { name: String },
}

#[derive(Args, Debug)]
pub struct AzureRunArgs {
    #[command(flatten)]
    pub submit: AzureSubmitArgs,
    /// Registered model name (default `<model>-ultrachat-200k`).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Endpoint name (default ultrachat-completion-<unix time>).
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long, default_value = "Standard_NC6s_v3")]
    pub instance_type: String,
    /// Request file to score once deployed.
    #[arg(long, default_value = "sample_score.json")]
    pub score_file: PathBuf,
    /// Delete the endpoint at the end, as the source's last step does.
    #[arg(long)]
    pub delete: bool,
}
