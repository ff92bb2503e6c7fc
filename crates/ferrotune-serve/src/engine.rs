//! Continuous batching on one model: a thread owns the model and one batched KV cache. Between
//! decode steps, queued requests are prefilled together (left-padded, as `generate` does) and
//! their caches stacked onto the running batch; a row that finishes (stop token, length,
//! cancel, deadline) leaves at the next token boundary and its cache rows are dropped at once.
//! Every row samples with its own parameters and its own seeded generator, so a request's
//! tokens do not depend on what else is in the batch.
//!
//! With a KV cache budget (bytes), a request joins only while the batch's cache (rows × longest
//! row, left padding included) stays within it, and when the growing batch would pass it the
//! youngest sequence is preempted: its cache rows are dropped and it waits at the head of the
//! queue; when it fits again its prompt and the tokens it already produced are prefilled anew
//! (recompute, as vLLM preempts) and it continues where it stopped, with its own sampler state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use ferrotune_model::generate::{pick, Rng, Sampling};
use ferrotune_model::mask::AttentionLayout;
use ferrotune_model::phi3::KvCache;
use ferrotune_model::{Batch, Phi3, RopeScaling};
use rayon::prelude::*;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::histogram::Histogram;

/// How one request samples.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub seed: u64,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token (or a stop string, seen by the caller).
    Stop,
    /// `max_new_tokens` or the model's context.
    Length,
    /// The caller went away or asked to stop.
    Cancelled,
    /// The request's deadline passed.
    Timeout,
}

/// What a request hears back, in order: tokens, then one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(u32),
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: UnboundedSender<Event>,
    /// Set by the caller to stop early (client gone, stop string seen).
    pub cancel: Arc<AtomicBool>,
    pub deadline: Instant,
}

/// Counters the server exports (`/metrics`).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Sum of batch sizes over decode steps (mean batch = this / decode_steps).
    pub batch_rows: AtomicU64,
    /// Admission to first token.
    pub time_to_first_token: Histogram,
    /// Admission to the end, per finished request.
    pub request_duration: Histogram,
    /// First token to the last, over the tokens after the first, per request of two or more.
    pub time_per_output_token: Histogram,
    pub finished: AtomicU64,
    pub timeouts: AtomicU64,
    pub ready: AtomicBool,
    /// Sequences moved out of the batch to keep the KV cache within its budget.
    pub preemptions: AtomicU64,
    /// Preempted sequences waiting to resume.
    pub preempted_waiting: AtomicUsize,
    /// Bytes the running batch's KV cache holds, and the most it has held.
    pub kv_cache_bytes: AtomicU64,
    pub kv_cache_peak_bytes: AtomicU64,
    /// The budget in bytes (0: none).
    pub kv_cache_budget_bytes: AtomicU64,
}

/// The sending side of an engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<GenRequest>,
    pub stats: Arc<EngineStats>,
    /// The longest prompt + new tokens a request may ask for: the model's context, or less
    /// when one sequence of that length would not fit the KV cache budget.
    pub context: usize,
}

/// Why a request was not queued.
#[derive(Debug)]
pub enum Rejected {
    QueueFull,
    Stopped,
}

impl EngineHandle {
    pub fn submit(&self, req: GenRequest) -> Result<(), Rejected> {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(req) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => Rejected::QueueFull,
                    TrySendError::Disconnected(_) => Rejected::Stopped,
                })
            }
        }
    }
}

/// Start the engine thread for `model`: at most `max_batch` sequences decode together and
/// `max_queue` wait; `stop_ids` end a sequence. No KV cache budget.
pub fn start(model: Phi3, stop_ids: Vec<u32>, max_batch: usize, max_queue: usize) -> EngineHandle {
    start_with_budget(model, stop_ids, max_batch, max_queue, None)
}

/// KV cache bytes one token of one sequence takes: keys and values of every layer.
pub fn kv_bytes_per_token(model: &Phi3) -> u64 {
    let c = model.config();
    (c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * model.dtype().size_in_bytes())
        as u64
}

/// [`start`] with the batch's KV cache kept within `kv_budget` bytes (see the module comment).
pub fn start_with_budget(
    model: Phi3,
    stop_ids: Vec<u32>,
    max_batch: usize,
    max_queue: usize,
    kv_budget: Option<u64>,
) -> EngineHandle {
    let (tx, rx) = std::sync::mpsc::sync_channel(max_queue.max(1));
    let stats = Arc::new(EngineStats::default());
    let bytes_per_token = kv_bytes_per_token(&model).max(1);
    stats
        .kv_cache_budget_bytes
        .store(kv_budget.unwrap_or(0), Ordering::Relaxed);
    let model_context = match &model.config().rope_scaling {
        // Past the original context transformers re-encodes with other factors; serving stops
        // there rather than diverge from it.
        RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } => *original_max_position_embeddings,
        RopeScaling::Default => model.config().max_position_embeddings,
    };
    // One sequence alone must fit the budget, so a request that could not is refused up front.
    let context = match kv_budget {
        Some(b) => model_context.min((b / bytes_per_token) as usize).max(1),
        None => model_context,
    };
    let worker = Worker {
        context,
        kv_budget,
        bytes_per_token,
        waiting: VecDeque::new(),
        model,
        stop_ids,
        max_batch: max_batch.max(1),
        stats: stats.clone(),
        rows: Vec::new(),
        cache: KvCache::default(),
    };
    std::thread::Builder::new()
        .name("ferrotune-engine".into())
        .spawn(move || worker.run(rx))
        .expect("spawning the engine thread");
    EngineHandle { tx, stats, context }
}

/// A sequence waiting for the batch: a new request, or one preempted from it.
enum Pending {
    New(GenRequest),
    Resume(Row),
}

impl Pending {
    fn req(&self) -> &GenRequest {
        match self {
            Pending::New(r) => r,
            Pending::Resume(row) => &row.req,
        }
    }

    /// What its prefill encodes: the prompt, and for a resumed sequence the tokens it produced
    /// except the newest (which the next decode step feeds).
    fn tokens(&self) -> Vec<u32> {
        match self {
            Pending::New(r) => r.prompt.clone(),
            Pending::Resume(row) => {
                let fed = row.emitted.len().saturating_sub(1);
                [&row.req.prompt[..], &row.emitted[..fed]].concat()
            }
        }
    }

    fn tokens_len(&self) -> usize {
        match self {
            Pending::New(r) => r.prompt.len(),
            Pending::Resume(row) => row.req.prompt.len() + row.emitted.len().saturating_sub(1),
        }
    }

    fn generated(&self) -> usize {
        match self {
            Pending::New(_) => 0,
            Pending::Resume(row) => row.emitted.len(),
        }
    }
}

struct Row {
    req: GenRequest,
    sampling: Sampling,
    rng: Rng,
    /// 1 per cache column holding this row's token, 0 for padding.
    mask: Vec<u8>,
    next_pos: u32,
    last: u32,
    /// The tokens handed to the caller, in order (what a preempted row re-encodes).
    emitted: Vec<u32>,
    started: Instant,
    first_token_at: Option<Instant>,
    /// Finished: leaves the batch at the next compaction.
    done: bool,
}

struct Worker {
    context: usize,
    kv_budget: Option<u64>,
    bytes_per_token: u64,
    /// Taken from the channel (or preempted) and not yet in the batch; preempted rows first.
    waiting: VecDeque<Pending>,
    model: Phi3,
    stop_ids: Vec<u32>,
    max_batch: usize,
    stats: Arc<EngineStats>,
    rows: Vec<Row>,
    cache: KvCache,
}

impl Worker {
    fn run(mut self, rx: Receiver<GenRequest>) {
        self.stats.ready.store(true, Ordering::Relaxed);
        loop {
            if self.rows.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(r) => self.waiting.push_back(Pending::New(r)),
                    Err(_) => return,
                }
            }
            while self.rows.len() + self.waiting.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(r) => self.waiting.push_back(Pending::New(r)),
                    Err(_) => break,
                }
            }
            let admitted = self.admit();
            if !admitted.is_empty() {
                if let Err(e) = self.prefill(admitted) {
                    self.fail_all(&format!("prefill failed: {e}"));
                    continue;
                }
            }
            if self.rows.is_empty() {
                continue;
            }
            let step = self.make_room().and_then(|()| self.decode());
            if let Err(e) = step {
                self.fail_all(&format!("decoding failed: {e}"));
            }
            self.stats.active.store(self.rows.len(), Ordering::Relaxed);
            let bytes = self.cache_bytes(self.rows.len(), self.cache.len());
            self.stats.kv_cache_bytes.store(bytes, Ordering::Relaxed);
            self.stats
                .kv_cache_peak_bytes
                .fetch_max(bytes, Ordering::Relaxed);
        }
    }

    fn cache_bytes(&self, rows: usize, width: usize) -> u64 {
        rows as u64 * width as u64 * self.bytes_per_token
    }

    /// Take waiting sequences, in order, while the batch and the cache they make (through the
    /// next decode step) stay within `max_batch` and the budget. An empty batch always takes
    /// one: a single sequence fits by construction (`EngineHandle::context`).
    fn admit(&mut self) -> Vec<Pending> {
        let mut out = Vec::new();
        let (mut rows, mut width) = (self.rows.len(), self.cache.len());
        while rows < self.max_batch {
            let Some(next) = self.waiting.front() else {
                break;
            };
            let w = width.max(next.tokens_len());
            let over = self
                .kv_budget
                .is_some_and(|b| self.cache_bytes(rows + 1, w + 1) > b);
            if over && rows > 0 {
                break;
            }
            let p = self.waiting.pop_front().expect("front exists");
            match &p {
                Pending::New(_) => self.stats.queued.fetch_sub(1, Ordering::Relaxed),
                Pending::Resume(_) => self.stats.preempted_waiting.fetch_sub(1, Ordering::Relaxed),
            };
            out.push(p);
            rows += 1;
            width = w;
        }
        out
    }

    /// Before a decode step that would take the cache past the budget: preempt the youngest
    /// sequences (the last admitted) until it fits or one is left.
    fn make_room(&mut self) -> candle_core::Result<()> {
        let Some(budget) = self.kv_budget else {
            return Ok(());
        };
        while self.rows.len() > 1
            && self.cache_bytes(self.rows.len(), self.cache.len() + 1) > budget
        {
            let row = self.rows.pop().expect("more than one row");
            let keep: Vec<usize> = (0..self.rows.len()).collect();
            self.cache = self.cache.select_rows(&keep, self.model.device())?;
            self.trim_common_padding()?;
            tracing::debug!(
                "KV cache budget: preempted a sequence after {} tokens ({} rows remain)",
                row.emitted.len(),
                self.rows.len()
            );
            self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
            self.stats.preempted_waiting.fetch_add(1, Ordering::Relaxed);
            self.waiting.push_front(Pending::Resume(row));
        }
        Ok(())
    }

    fn fail_all(&mut self, message: &str) {
        tracing::error!("{message}");
        for row in self.rows.drain(..) {
            let _ = row.req.events.send(Event::Failed(message.to_string()));
        }
        self.cache = KvCache::default();
        self.stats.active.store(0, Ordering::Relaxed);
    }

    /// Encode the admitted sequences in one left-padded batch, sample the first token of the
    /// new ones, and stack their caches onto the running batch.
    fn prefill(&mut self, incoming: Vec<Pending>) -> candle_core::Result<()> {
        let now = Instant::now();
        let live: Vec<Pending> = incoming
            .into_iter()
            .filter(|p| {
                let (r, generated) = (p.req(), p.generated());
                if r.cancel.load(Ordering::Relaxed) {
                    finish(r, FinishReason::Cancelled, generated);
                    false
                } else if now >= r.deadline {
                    self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    finish(r, FinishReason::Timeout, generated);
                    false
                } else {
                    true
                }
            })
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let device = self.model.device().clone();
        let b = live.len();
        let tokens: Vec<Vec<u32>> = live.iter().map(Pending::tokens).collect();
        let width = tokens.iter().map(Vec::len).max().expect("non-empty");
        let pad = self.model.config().pad_token_id.unwrap_or(0);
        let mut ids = Vec::with_capacity(b * width);
        let mut masks = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(b);
        for t in &tokens {
            let n_pad = width - t.len();
            ids.extend(std::iter::repeat_n(pad, n_pad).chain(t.iter().copied()));
            masks.push([vec![0u8; n_pad], vec![1u8; t.len()]].concat());
            positions.push(
                (0..width)
                    .map(|i| i.saturating_sub(n_pad) as u32)
                    .collect::<Vec<_>>(),
            );
        }
        let layout = AttentionLayout {
            padding: Some(&masks),
            documents: None,
            sliding_window: self.model.config().sliding_window,
        };
        let batch = Batch {
            input_ids: Tensor::from_vec(ids, (b, width), &device)?,
            positions,
            attention_bias: layout.bias_for_queries(b, 0, width, width, &device)?,
        };
        let mut fresh = KvCache::default();
        let logits = self
            .model
            .step(&batch, &mut fresh)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let (stacked, pad_old, pad_new) = KvCache::stack(&self.cache, fresh)?;
        self.cache = stacked;
        for row in &mut self.rows {
            row.mask.splice(0..0, std::iter::repeat_n(0, pad_old));
        }
        let mut fresh_rows = Vec::with_capacity(b);
        for ((pending, mut mask), l) in live.into_iter().zip(masks).zip(logits) {
            mask.splice(0..0, std::iter::repeat_n(0, pad_new));
            let req = match pending {
                // Its newest token was sampled and handed out before it was preempted.
                Pending::Resume(mut row) => {
                    row.mask = mask;
                    self.rows.push(row);
                    continue;
                }
                Pending::New(req) => req,
            };
            let sampling = Sampling {
                max_new_tokens: req.params.max_new_tokens,
                temperature: req.params.temperature,
                top_p: req.params.top_p,
                top_k: req.params.top_k,
                seed: req.params.seed,
                stop_ids: Vec::new(),
            };
            let mut rng = Rng(req.params.seed);
            let tok = pick(&l, &sampling, &mut rng);
            self.stats
                .prompt_tokens
                .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
            let next_pos = req.prompt.len() as u32;
            fresh_rows.push(self.rows.len());
            self.rows.push(Row {
                req,
                sampling,
                rng,
                mask,
                next_pos,
                last: tok,
                emitted: Vec::new(),
                started: now,
                first_token_at: None,
                done: false,
            });
        }
        if self.emit(&fresh_rows) {
            self.compact()?;
        }
        Ok(())
    }

    /// One token for every row.
    fn decode(&mut self) -> candle_core::Result<()> {
        let device = self.model.device().clone();
        let b = self.rows.len();
        let past = self.cache.len();
        for row in &mut self.rows {
            row.mask.push(1);
        }
        let masks: Vec<Vec<u8>> = self.rows.iter().map(|r| r.mask.clone()).collect();
        let layout = AttentionLayout {
            padding: Some(&masks),
            documents: None,
            sliding_window: self.model.config().sliding_window,
        };
        let batch = Batch {
            input_ids: Tensor::from_vec(
                self.rows.iter().map(|r| r.last).collect::<Vec<_>>(),
                (b, 1),
                &device,
            )?,
            positions: self.rows.iter().map(|r| vec![r.next_pos]).collect(),
            attention_bias: layout.bias_for_queries(b, past, 1, past + 1, &device)?,
        };
        let logits = self
            .model
            .step(&batch, &mut self.cache)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.stats.batch_rows.fetch_add(b as u64, Ordering::Relaxed);
        // Rows sample in parallel: each has its own generator, so the draws do not depend on
        // the threads.
        self.rows
            .par_iter_mut()
            .zip(logits.par_iter())
            .for_each(|(row, l)| {
                row.next_pos += 1;
                row.last = pick(l, &row.sampling, &mut row.rng);
            });
        let all: Vec<usize> = (0..b).collect();
        if self.emit(&all) {
            self.compact()?;
        }
        Ok(())
    }

    /// Hand each listed row its newest token, or finish it; returns whether any row finished.
    fn emit(&mut self, rows: &[usize]) -> bool {
        let mut any = false;
        let now = Instant::now();
        let context = self.context;
        for &i in rows {
            let row = &mut self.rows[i];
            let reason = if row.req.cancel.load(Ordering::Relaxed) {
                Some(FinishReason::Cancelled)
            } else if now >= row.req.deadline {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                Some(FinishReason::Timeout)
            } else if self.stop_ids.contains(&row.last) {
                Some(FinishReason::Stop)
            } else {
                if row.emitted.is_empty() {
                    row.first_token_at = Some(now);
                    self.stats
                        .time_to_first_token
                        .observe(now.duration_since(row.started).as_secs_f64());
                }
                row.emitted.push(row.last);
                self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                if row.req.events.send(Event::Token(row.last)).is_err() {
                    Some(FinishReason::Cancelled)
                } else if row.emitted.len() >= row.req.params.max_new_tokens
                    || row.next_pos as usize + 1 >= context
                {
                    Some(FinishReason::Length)
                } else {
                    None
                }
            };
            if let Some(reason) = reason {
                self.stats
                    .request_duration
                    .observe(now.duration_since(row.started).as_secs_f64());
                let generated = row.emitted.len();
                if let Some(first) = row.first_token_at.filter(|_| generated > 1) {
                    self.stats
                        .time_per_output_token
                        .observe(now.duration_since(first).as_secs_f64() / (generated - 1) as f64);
                }
                finish(&row.req, reason, generated);
                self.stats.finished.fetch_add(1, Ordering::Relaxed);
                row.done = true;
                any = true;
            }
        }
        any
    }

    /// Drop finished rows from the batch and the cache, and padding every row now has.
    fn compact(&mut self) -> candle_core::Result<()> {
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&i| !self.rows[i].done)
            .collect();
        if keep.len() == self.rows.len() {
            return Ok(());
        }
        let device = self.model.device().clone();
        if keep.is_empty() {
            self.rows.clear();
            self.cache = KvCache::default();
            return Ok(());
        }
        self.cache = self.cache.select_rows(&keep, &device)?;
        let mut kept = Vec::with_capacity(keep.len());
        for (i, row) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            if keep.contains(&i) {
                kept.push(row);
            }
        }
        self.rows = kept;
        self.trim_common_padding()
    }

    /// Drop the cache columns that are padding in every row.
    fn trim_common_padding(&mut self) -> candle_core::Result<()> {
        let common = self
            .rows
            .iter()
            .map(|r| r.mask.iter().take_while(|&&m| m == 0).count())
            .min()
            .unwrap_or(0);
        if common > 0 {
            self.cache = self.cache.trim_left(common)?;
            for r in &mut self.rows {
                r.mask.drain(..common);
            }
        }
        Ok(())
    }
}

fn finish(req: &GenRequest, reason: FinishReason, completion_tokens: usize) {
    let _ = req.events.send(Event::Finished {
        reason,
        prompt_tokens: req.prompt.len(),
        completion_tokens,
    });
}
