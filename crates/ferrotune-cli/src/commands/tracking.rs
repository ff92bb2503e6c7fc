//! Logging a training run to MLflow without ever slowing or stopping it: a worker thread owns
//! the connection, buffers metrics, retries with backoff while the server is down or slow, and
//! at the end gets a bounded time to deliver the rest before a warning says what was lost.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrotune_mlflow::{Metric, TrackingClient};
use ferrotune_train::metrics::Record;
use ferrotune_train::{Observer, TrainConfig};

/// How long the end of a run waits for an unreachable server (`FERROTUNE_MLFLOW_FLUSH_S`).
fn flush_deadline() -> Duration {
    let seconds = std::env::var("FERROTUNE_MLFLOW_FLUSH_S")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(20.0);
    Duration::from_secs_f64(seconds)
}
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the run tells the worker.
enum Message {
    Metrics(Vec<Metric>),
    Finish {
        status: &'static str,
        artifacts: Vec<(String, PathBuf)>,
    },
}

/// The run as MLflow should show it.
pub struct RunIdentity {
    pub experiment: String,
    pub run_name: String,
    pub params: Vec<(String, String)>,
    pub tags: Vec<(String, String)>,
    /// Where the run's id is recorded once MLflow has it (`output_dir/mlflow_run.json`), so
    /// exports can name the training run in their lineage.
    pub run_file: PathBuf,
}

/// An [`Observer`] that forwards records to the worker.
pub struct MlflowObserver {
    tx: Sender<Message>,
    worker: Option<JoinHandle<()>>,
    uri: String,
}

/// The tracking URI the config or `MLFLOW_TRACKING_URI` names, if any.
pub fn tracking_uri(cfg: &TrainConfig) -> Option<String> {
    cfg.tracking_uri
        .clone()
        .or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok())
        .filter(|u| !u.trim().is_empty())
}

/// Params, tags, experiment and run name of a training run, the source document's way.
pub fn identity(cfg: &TrainConfig, data_cache_key: &str) -> RunIdentity {
    let mut params = Vec::new();
    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(cfg) {
        for (k, v) in map {
            let text = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => "None".into(),
                other => other.to_string(),
            };
            params.push((k, text.chars().take(6000).collect()));
        }
    }
    RunIdentity {
        experiment: cfg
            .experiment_name
            .clone()
            .unwrap_or_else(|| format!("chat_completion_{}", cfg.model_name())),
        run_name: cfg.run_name.clone().unwrap_or_else(|| cfg.display_name()),
        run_file: cfg
            .output_dir
            .join(ferrotune_export::lineage::TRAINING_RUN_FILE),
        params,
        tags: vec![
            ("mlflow.source.name".into(), "ferrotune".into()),
            ("mlflow.source.type".into(), "LOCAL".into()),
            (
                "mlflow.source.git.commit".into(),
                env!("FERROTUNE_GIT_COMMIT").into(),
            ),
            ("ferrotune.version".into(), env!("CARGO_PKG_VERSION").into()),
            ("ferrotune.config_hash".into(), cfg.training_hash()),
            ("ferrotune.data_cache_key".into(), data_cache_key.into()),
        ],
    }
}

impl MlflowObserver {
    /// Start the worker for `uri`; never fails (an unusable URI becomes a warning).
    pub fn start(uri: &str, id: RunIdentity) -> Option<MlflowObserver> {
        let token = std::env::var("MLFLOW_TRACKING_TOKEN").ok();
        let client = match TrackingClient::new(uri, token, REQUEST_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("MLflow tracking off: {e}");
                return None;
            }
        };
        let (tx, rx) = channel();
        let worker = std::thread::Builder::new()
            .name("mlflow".into())
            .spawn(move || Worker::new(client, id).run(rx))
            .ok()?;
        tracing::info!("tracking this run in MLflow at {uri}");
        Some(MlflowObserver {
            tx,
            worker: Some(worker),
            uri: uri.to_string(),
        })
    }

    /// End the run with `status` (`FINISHED`, `KILLED`, `FAILED`), upload `artifacts`
    /// (path in the run, local file), and wait (bounded) for delivery.
    pub fn finish(mut self, status: &'static str, artifacts: Vec<(String, PathBuf)>) {
        let _ = self.tx.send(Message::Finish { status, artifacts });
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        tracing::debug!("MLflow worker for {} done", self.uri);
    }
}

impl Observer for MlflowObserver {
    fn record(&mut self, record: &Record) {
        let now = now_ms();
        let m = |key: &str, value: f64, step: u64| Metric {
            key: key.into(),
            value,
            timestamp: now,
            step: step as i64,
        };
        let metrics: Vec<Metric> = match record {
            Record::Train(r) => vec![
                m("loss", r.loss, r.step),
                m("learning_rate", r.learning_rate, r.step),
                m("grad_norm", r.grad_norm, r.step),
                m("tokens_per_s", r.tokens_per_s, r.step),
                m("epoch", r.epoch, r.step),
            ],
            Record::Eval(r) => vec![
                m("eval_loss", r.eval_loss, r.step),
                m("eval_perplexity", r.eval_perplexity, r.step),
                m("eval_accuracy", r.eval_accuracy, r.step),
            ],
        };
        // JSON cannot carry NaN or infinity; such points are left out.
        let metrics = metrics
            .into_iter()
            .filter(|m| m.value.is_finite())
            .collect();
        let _ = self.tx.send(Message::Metrics(metrics));
    }
}

impl Drop for MlflowObserver {
    fn drop(&mut self) {
        if self.worker.is_some() {
            let _ = self.tx.send(Message::Finish {
                status: "FAILED",
                artifacts: Vec::new(),
            });
            if let Some(w) = self.worker.take() {
                let _ = w.join();
            }
        }
    }
}

/// Write `run_file` atomically; a failure only costs the lineage link, so it is a warning.
fn record_run(run_file: &std::path::Path, run: &serde_json::Value) {
    let tmp = run_file.with_extension("json.tmp");
    let written = std::fs::create_dir_all(run_file.parent().unwrap_or(std::path::Path::new(".")))
        .and_then(|_| std::fs::write(&tmp, run.to_string()))
        .and_then(|_| std::fs::rename(&tmp, run_file));
    if let Err(e) = written {
        tracing::warn!(
            "could not record the MLflow run in {}: {e}",
            run_file.display()
        );
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Worker {
    client: TrackingClient,
    id: RunIdentity,
    run: Option<(String, String)>,
    pending: VecDeque<Metric>,
    backoff: Duration,
    retry_at: Instant,
    last_error: Option<String>,
    /// A permanent refusal (bad request, auth): stop trying.
    disabled: bool,
    started_ms: i64,
}

impl Worker {
    fn new(client: TrackingClient, id: RunIdentity) -> Worker {
        Worker {
            client,
            id,
            run: None,
            pending: VecDeque::new(),
            backoff: Duration::from_millis(500),
            retry_at: Instant::now(),
            last_error: None,
            disabled: false,
            started_ms: now_ms(),
        }
    }

    fn run(mut self, rx: Receiver<Message>) {
        loop {
            let wait = self.retry_at.saturating_duration_since(Instant::now());
            match rx.recv_timeout(if self.pending.is_empty() && self.run.is_some() {
                Duration::from_secs(3600)
            } else {
                wait.max(Duration::from_millis(50))
            }) {
                Ok(Message::Metrics(m)) => self.pending.extend(m),
                Ok(Message::Finish { status, artifacts }) => return self.finish(status, artifacts),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.finish("FAILED", Vec::new()),
            }
            if Instant::now() >= self.retry_at {
                self.deliver();
            }
        }
    }

    /// Try once to create the run (if needed) and send everything pending.
    fn deliver(&mut self) {
        if self.disabled {
            self.pending.clear();
            return;
        }
        let result = self.try_deliver();
        match result {
            Ok(()) => {
                self.backoff = Duration::from_millis(500);
                self.last_error = None;
            }
            Err(e) if e.is_transient() => {
                if self.last_error.is_none() {
                    tracing::warn!("MLflow: {e}; buffering metrics and retrying");
                }
                self.last_error = Some(e.to_string());
                self.retry_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => {
                tracing::warn!("MLflow refused the run, tracking off: {e}");
                self.last_error = Some(e.to_string());
                self.disabled = true;
            }
        }
    }

    fn try_deliver(&mut self) -> ferrotune_mlflow::tracking::Result<()> {
        if self.run.is_none() {
            let exp = self.client.experiment_id(&self.id.experiment)?;
            let run =
                self.client
                    .create_run(&exp, &self.id.run_name, &self.id.tags, self.started_ms)?;
            self.client.log_batch(&run.0, &self.id.params, &[])?;
            tracing::info!(
                "MLflow run {} in experiment \"{}\" ({}/#/experiments/{exp}/runs/{})",
                run.0,
                self.id.experiment,
                self.client.uri(),
                run.0
            );
            record_run(
                &self.id.run_file,
                &serde_json::json!({
                    "tracking_uri": self.client.uri(),
                    "experiment_id": exp,
                    "experiment_name": self.id.experiment,
                    "run_id": run.0,
                    "artifact_uri": run.1,
                }),
            );
            self.run = Some(run);
        }
        let (run_id, _) = self.run.as_ref().expect("created above");
        while !self.pending.is_empty() {
            let n = self
                .pending
                .len()
                .min(ferrotune_mlflow::tracking::MAX_METRICS_PER_BATCH);
            let batch: Vec<Metric> = self.pending.iter().take(n).cloned().collect();
            self.client.log_batch(run_id, &[], &batch)?;
            self.pending.drain(..n);
        }
        Ok(())
    }

    fn finish(mut self, status: &'static str, artifacts: Vec<(String, PathBuf)>) {
        let deadline = Instant::now() + flush_deadline();
        loop {
            self.deliver();
            let done = self.disabled || (self.run.is_some() && self.pending.is_empty());
            if done || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(
                self.retry_at
                    .saturating_duration_since(Instant::now())
                    .min(deadline - Instant::now()),
            );
        }
        let Some((run_id, artifact_uri)) = self.run.clone() else {
            tracing::warn!(
                "MLflow: the run was not recorded at {} ({}); metrics.jsonl in output_dir has everything",
                self.client.uri(),
                self.last_error.as_deref().unwrap_or("unknown error")
            );
            return;
        };
        if !self.pending.is_empty() {
            tracing::warn!(
                "MLflow: {} metric values were not delivered ({}); metrics.jsonl in output_dir has them",
                self.pending.len(),
                self.last_error.as_deref().unwrap_or("unknown error")
            );
        }
        let mut failed = Vec::new();
        for (name, file) in &artifacts {
            if let Err(e) = self.client.upload_artifact(&artifact_uri, name, file) {
                failed.push(format!("{name}: {e}"));
            }
        }
        if !failed.is_empty() {
            tracing::warn!("MLflow: artifacts not uploaded: {}", failed.join("; "));
        }
        if let Err(e) = self.client.finish_run(&run_id, status, now_ms()) {
            tracing::warn!("MLflow: could not mark run {run_id} {status}: {e}");
        }
    }
}
