//! The engine's KV cache budget: with a budget far below what the batch would take, sequences
//! are preempted and resumed, and every request still gets exactly the tokens it gets alone,
//! greedy or sampled with a seed, while the cache never exceeds the budget.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrotune_serve::engine::{self, EngineHandle, Event, GenParams, GenRequest};

mod common;
use common::{chat_parts, prompt_ids, QUESTIONS};

const NEW_TOKENS: usize = 40;

fn prompts() -> Vec<Vec<u32>> {
    let (_, tokenizer, template) = chat_parts();
    QUESTIONS
        .iter()
        .map(|q| prompt_ids(&tokenizer, &template, q))
        .collect()
}

fn engine(budget_tokens: Option<usize>) -> EngineHandle {
    let (loaded, ..) = chat_parts();
    let per_token = engine::kv_bytes_per_token(&loaded.model);
    // No stop tokens: every sequence runs its full length, so the cache keeps growing.
    engine::start_with_budget(
        loaded.model,
        Vec::new(),
        8,
        16,
        budget_tokens.map(|t| t as u64 * per_token),
    )
}

/// Every prompt submitted at once (even ones greedy, odd ones sampled with a seed); the tokens
/// each got, in order.
fn run(engine: &EngineHandle, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let receivers: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let greedy = i % 2 == 0;
            engine
                .submit(GenRequest {
                    prompt: p.clone(),
                    params: GenParams {
                        max_new_tokens: NEW_TOKENS,
                        temperature: if greedy { 0.0 } else { 0.9 },
                        top_p: 1.0,
                        top_k: 0,
                        seed: 1000 + i as u64,
                    },
                    events: tx,
                    cancel: Arc::new(AtomicBool::new(false)),
                    deadline: Instant::now() + Duration::from_secs(120),
                })
                .unwrap_or_else(|_| panic!("request {i} was not queued"));
            rx
        })
        .collect();
    receivers
        .into_iter()
        .map(|mut rx| {
            let mut tokens = Vec::new();
            loop {
                match rx.blocking_recv().expect("the engine answers") {
                    Event::Token(t) => tokens.push(t),
                    Event::Finished { .. } => break tokens,
                    Event::Failed(m) => panic!("{m}"),
                }
            }
        })
        .collect()
}

#[test]
fn a_small_kv_budget_preempts_and_resumes_without_changing_any_answer() {
    let prompts = prompts();
    let longest = prompts.iter().map(Vec::len).max().unwrap() + NEW_TOKENS;
    let free = engine(None);
    let want = run(&free, &prompts);
    assert!(want.iter().all(|t| t.len() == NEW_TOKENS));

    // Room for about two full-length sequences out of six.
    let budget_tokens = 2 * longest + 8;
    let tight = engine(Some(budget_tokens));
    assert_eq!(
        tight.context, budget_tokens,
        "one sequence's limit follows the budget"
    );
    let got = run(&tight, &prompts);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g,
            w,
            "request {i} ({})",
            if i % 2 == 0 { "greedy" } else { "seeded" }
        );
    }
    let stats = &tight.stats;
    let preempted = stats.preemptions.load(Ordering::Relaxed);
    assert!(preempted > 0, "the budget forced preemption");
    let per_token = free.stats.kv_cache_budget_bytes.load(Ordering::Relaxed);
    assert_eq!(per_token, 0, "no budget on the first engine");
    let budget = stats.kv_cache_budget_bytes.load(Ordering::Relaxed);
    let peak = stats.kv_cache_peak_bytes.load(Ordering::Relaxed);
    assert!(
        peak <= budget,
        "cache peaked at {peak} bytes, budget {budget}"
    );
    assert!(
        peak > free.stats.kv_cache_peak_bytes.load(Ordering::Relaxed) / 4,
        "the budget was used, not left idle"
    );
    assert_eq!(stats.preempted_waiting.load(Ordering::Relaxed), 0);
    assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
    eprintln!(
        "{preempted} preemptions; cache peak {peak} of {budget} bytes (unbudgeted peak {})",
        free.stats.kv_cache_peak_bytes.load(Ordering::Relaxed)
    );
}
