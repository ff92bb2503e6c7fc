//! The memory planner against the memory a CPU training step really takes (f32, fused CPU ops,
//! the fused head and attention): a random Phi-3-shaped model with LoRA on all four linears, one
//! forward + backward with and without per-layer recompute, at 512, 1,024 and 2,048 tokens.
//!
//! Each case runs in a fresh process (this test binary re-run with `PLAN_CASE` set), measured
//! two ways: the bytes allocated at once during the step (a counting wrapper around mimalloc,
//! the allocator of the `ferrotune` binary; exact and repeatable, what the plan models), and the
//! process's peak resident set (VmHWM) above its size before the model was loaded (what a user
//! sees, allocator caching included) against the plan's weights plus step. Both must be within
//! 15%. Run with `--nocapture` for the numbers; `PLAN_T=4096` adds a length.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use candle_core::{DType, Device, Tensor};
use ferrotune_model::mask::AttentionLayout;
use ferrotune_model::random_weights::RandomWeights;
use ferrotune_model::{Batch, LoraConfig, Phi3, Phi3Config};
use ferrotune_train::plan::{estimate, FusedOps, MemoryPlan, PlanInput, HOST_OVERHEAD_PERCENT};
use mimalloc::MiMalloc;

/// Counts the bytes live at once on top of mimalloc.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(live, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { MiMalloc.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { MiMalloc.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { MiMalloc.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        let q = unsafe { MiMalloc.realloc(p, l, size) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            grew(size);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MIB: f64 = 1048576.0;

fn resident(field: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

/// The plan's bytes for one micro-step on top of the loaded model: this micro-batch's
/// gradients, activations, the head and the workspace (no optimizer state or accumulated sum
/// exists in a bare forward + backward).
fn planned_step(p: &MemoryPlan) -> f64 {
    (p.gradients / 2 + p.activations + p.logits_and_loss + p.attention_workspace) as f64
}

fn rel(planned: f64, measured: f64) -> f64 {
    (planned - measured) / measured
}

const LAYERS: usize = 4;
const HIDDEN: usize = 512;
const VOCAB: usize = 32064;

fn config() -> Phi3Config {
    Phi3Config::from_json_str(
        &serde_json::json!({"model_type": "phi3", "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "intermediate_size": 3 * HIDDEN, "num_hidden_layers": LAYERS,
            "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 4096})
        .to_string(),
    )
    .unwrap()
}

fn plan(t: usize, recompute: bool) -> MemoryPlan {
    estimate(&PlanInput {
        model: config(),
        lora: LoraConfig::default(),
        micro_batch: 1,
        seq_len: t,
        dtype_bytes: 4,
        recompute,
        ops: FusedOps::for_run(false, 4),
        gpu: false,
    })
}

/// One case, in the child process: prints `allocated resident` (bytes; resident −1 where
/// /proc cannot be read).
#[test]
fn one_case() {
    let Some(case) = std::env::var("PLAN_CASE").ok() else {
        return; // only in the child processes the test below starts
    };
    let (t, recompute) = case.split_once(':').unwrap();
    let (t, recompute): (usize, bool) = (t.parse().unwrap(), recompute == "recompute");
    let start = resident("VmRSS:");
    let weights = RandomWeights {
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let mut model = Phi3::load(&config(), &weights, DType::F32, &Device::Cpu).unwrap();
    model.add_lora(&LoraConfig::default(), 0).unwrap();
    let ids: Vec<u32> = (0..t).map(|i| ((i * 7919 + 13) % VOCAB) as u32).collect();
    let labels = vec![ids.iter().map(|&x| i64::from(x)).collect::<Vec<_>>()];
    let batch = Batch {
        input_ids: Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap(),
        positions: vec![(0..t as u32).collect()],
        attention_bias: AttentionLayout::default().bias(1, t, &Device::Cpu).unwrap(),
    };
    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    if recompute {
        let (_, _, grads) = model
            .loss_and_grads_recompute(&batch, &labels, 1.0)
            .unwrap();
        drop(grads);
    } else {
        let loss = model.loss_sum(&batch, &labels, true).unwrap();
        let grads = loss.sum.backward().unwrap();
        drop((loss, grads));
    }
    let allocated = PEAK.load(Relaxed) - before;
    let resident = match (start, resident("VmHWM:")) {
        (Some(start), Some(peak)) => peak - start,
        _ => -1.0,
    };
    println!("PLAN_CASE_RESULT {allocated} {resident}");
}

#[test]
fn the_cpu_plan_is_within_15_percent_of_the_measured_step() {
    if std::env::var("PLAN_CASE").is_ok() {
        return;
    }
    let mut lengths = vec![512, 1024, 2048];
    if let Some(t) = std::env::var("PLAN_T").ok().and_then(|v| v.parse().ok()) {
        lengths.push(t);
    }
    let mut failures = Vec::new();
    for t in lengths {
        for recompute in [true, false] {
            let mode = if recompute { "recompute" } else { "plain" };
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "one_case", "--nocapture", "--test-threads", "1"])
                .env("PLAN_CASE", format!("{t}:{mode}"))
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let Some(line) = stdout
                .lines()
                .find_map(|l| l.split_once("PLAN_CASE_RESULT ").map(|(_, r)| r))
            else {
                panic!(
                    "case {t}:{mode} printed no result:\n{stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            let v: Vec<f64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
            let (allocated, resident) = (v[0], v[1]);
            let p = plan(t, recompute);
            let step = planned_step(&p);
            // The process: weights, LoRA and the step, with the plan's allocator overhead on them.
            let bare = step + (p.weights + p.lora_parameters) as f64;
            let with_weights = bare * (1.0 + HOST_OVERHEAD_PERCENT as f64 / 100.0);
            let allocated_rel = rel(step, allocated);
            let resident_note = if resident < 0.0 {
                "not measurable here".to_string()
            } else {
                let r = rel(with_weights, resident);
                if r.abs() > 0.15 {
                    failures.push(format!("{t} tokens {mode}: resident off by {r:+.3}"));
                }
                format!(
                    "plan {:.1} MiB vs {:.1} MiB ({r:+.3})",
                    with_weights / MIB,
                    resident / MIB
                )
            };
            eprintln!(
                "{t:>5} tokens, {mode:<9}: step plan {:.1} MiB vs allocated {:.1} MiB ({allocated_rel:+.3}); process peak: {resident_note}",
                step / MIB,
                allocated / MIB,
            );
            if allocated_rel.abs() > 0.15 {
                failures.push(format!(
                    "{t} tokens {mode}: allocated off by {allocated_rel:+.3}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "plan outside 15%: {failures:?}");
}
