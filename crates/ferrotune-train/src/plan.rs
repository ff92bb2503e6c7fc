//! The memory planner behind `ferrotune plan` and the pre-flight check of `ferrotune train`:
//! how many bytes a LoRA run of a Phi-3 shape needs on one GPU, whether that fits a GPU or an
//! Azure VM size, and the largest micro batch / sequence length that would. Pure integer
//! arithmetic on the config (no tensors), so it is instant and deterministic.
//!
//! The activation model follows what ferrotune's graph keeps alive on a CUDA device. With
//! `fused_kernels` (the default on CUDA: `ferrotune-kernels`) RMSNorm, RoPE, SwiGLU and the
//! attention softmax are one op each that keeps only its output and captures its constants; without
//! (`FERROTUNE_KERNELS=0`, and the model the planner had before the kernels) they and the
//! cross-entropy are composed from candle ops, as traced through candle-core 0.11's autograd:
//!
//! * every op's output stays alive until the backward ends, because each tensor holds its inputs
//!   (`Op::*`) and the loss holds the graph;
//! * candle's backward also computes gradients for constant operands (the attention bias, the
//!   detached softmax/loss maxima, RoPE's cos/sin, the norm weights, LoRA dropout masks) at
//!   their broadcast shape and leaves them in the `GradStore` until the micro-step ends: these
//!   are counted as "leaked" gradients;
//! * the backward of a broadcast division (the softmax normalisation) holds about six buffers of
//!   the `[b, heads, t, t]` score size at once, and the loss backward about four `[b·t, vocab]`.
//!
//! With the kernels on, attention is one op that keeps its probabilities and forms its gradients
//! without candle's zero-filled buffers, and the head with its cross-entropy is one op. On
//! the CPU in f32 the fused CPU ops, the fused head (no logits) and the fused attention (no score
//! buffer kept between forward and backward) are modelled (`fused_head`, `fused_attention`).
//! With recompute and those fused ops, each layer's backward is written out by hand
//! (`ferrotune_model::decoder_backward`): no graph, and the plan counts the activations alive at
//! its two peaks (`down_proj`'s backward and the softmax backward).
//! Calibration: `fused_kernels_plan_matches_the_measured_h200_step` checks the plan against a
//! peak measured on a GPU by `scripts/gpu-check.sh` (committed under `benches/gpu/`);
//! `tests/plan_cpu_peak.rs` against the bytes allocated and the resident peak of CPU steps.
//! Sizes are bytes throughout; "GiB" is 2³⁰ bytes.

use ferrotune_model::{LoraConfig, Phi3Config};
use serde::Serialize;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Fixed bytes a CUDA context (driver, cuBLAS handles and workspace, candle's and ferrotune's
/// loaded kernels) takes on each GPU besides the tensors: measured on an H200 (CUDA 13.0, driver
/// 580) as device memory in use after loading a Phi-3-mini-shaped model minus its weights and
/// LoRA, 1.0 GB. Not part of [`estimate`]; [`with_device_overhead`] adds it.
pub const CUDA_CONTEXT_BYTES: u64 = 960 * MIB;

/// Device memory a training step takes on CUDA beyond the tensors [`estimate`] itemises:
/// cuBLAS workspaces, operands candle copies into a layout cuBLAS takes, and the stream-ordered
/// pool's slack between a free and the next allocation. Measured as the gap between the itemised
/// step and the measured one on an H100 (`benches/gpu/h100-2026-11-26-aa4b367.json`: Phi-3-mini,
/// 2,048 tokens, recompute, kernels on), 0.56 GiB; with it the plan is within 11% of six other
/// measured steps (kernels off, older binaries, an H200), all at that one shape. Not part of
/// [`estimate`]; [`with_device_overhead`] adds it.
pub const CUDA_STEP_SLACK_BYTES: u64 = 576 * MIB;

/// What a run looks like, as the planner needs it.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub model: Phi3Config,
    pub lora: LoraConfig,
    /// Sequences per forward/backward (`per_device_train_batch_size`).
    pub micro_batch: usize,
    /// Tokens per sequence (the packed / padded length).
    pub seq_len: usize,
    /// Bytes per element of the model dtype: 4 for f32, 2 for bf16/f16.
    pub dtype_bytes: usize,
    /// `gradient_checkpointing`: per-layer recompute (`Phi3::loss_and_grads_recompute`).
    pub recompute: bool,
    /// Which ops run fused (see [`FusedOps`]).
    pub ops: FusedOps,
    /// Planning for a GPU (CUDA's allocator; [`CUDA_CONTEXT_BYTES`] besides) rather than the
    /// CPU process's heap (mimalloc), which sets the overhead (see [`MemoryPlan::overhead`]).
    pub gpu: bool,
}

/// The ops a run fuses, each changing what a step holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FusedOps {
    /// RMSNorm, RoPE, SwiGLU and the attention softmax run as fused ops: on CUDA with
    /// `ferrotune-kernels` on, on the CPU in f32 (ferrotune's CPU ops); otherwise composed
    /// candle ops.
    pub kernels: bool,
    /// The head and its cross-entropy are one op: on the CPU in f32 it never holds the logits
    /// (`head_loss.rs`), on CUDA it holds them in the model dtype only inside the forward
    /// (`device_head_loss.rs`); otherwise logits and a composed cross-entropy.
    pub head: bool,
    /// Attention is one graph node (`ferrotune_model::attention`): on the CPU in f32 it keeps
    /// no `[b, heads, t, t]` buffer between forward and backward and recomputes the
    /// probabilities in the backward; on CUDA with the fused kernels it keeps the probabilities
    /// and skips candle's zero-filled score-sized gradients.
    pub attention: bool,
    /// Each adapted linear is one graph node keeping only its output
    /// (`ferrotune_model::lora_linear`: the CPU, and CUDA with the fused kernels).
    pub lora: bool,
    /// With recompute, each decoder layer's backward is written out by hand instead of run
    /// through candle's graph (`ferrotune_model::decoder_backward`: the CPU in f32, and CUDA
    /// with the fused kernels).
    pub layer_backward: bool,
    /// Attention is flash attention (`FERROTUNE_TRAIN_ATTENTION=flash`: bf16/f16 on CUDA, and
    /// the CPU's reference): nothing score-sized at all, each row's log-sum-exp kept instead of
    /// the probabilities, the output written once in `o_proj`'s layout.
    pub flash_attention: bool,
}

impl FusedOps {
    /// What a run uses on a GPU (`gpu`) or the CPU with `dtype_bytes`: on CUDA everything unless
    /// `FERROTUNE_KERNELS=0`; on the CPU in f32 everything; on the CPU in bf16/f16 only the
    /// LoRA linears; the layer backward through the graph under
    /// `FERROTUNE_LAYER_BACKWARD=graph`.
    pub fn for_run(gpu: bool, dtype_bytes: usize) -> FusedOps {
        let on = if gpu {
            ferrotune_model::kernels_enabled()
        } else {
            dtype_bytes == 4
        };
        FusedOps {
            kernels: on,
            head: on,
            attention: on,
            lora: on || !gpu,
            layer_backward: on && ferrotune_model::hand_written_backward(),
            flash_attention: ferrotune_model::attention::flash_chosen()
                && (!gpu || (on && dtype_bytes == 2)),
        }
    }

    /// Every op fused (what a current binary runs on CUDA with its kernels on; flash attention
    /// is opt-in).
    pub const ALL: FusedOps = FusedOps {
        kernels: true,
        head: true,
        attention: true,
        lora: true,
        layer_backward: true,
        flash_attention: false,
    };
}

/// Peak device memory of one training micro-step, by component. All sizes in bytes; the
/// components from `weights` to `overhead` add up to `total`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    /// Frozen base weights in the model dtype (`lm_head` counted once when tied).
    pub weights: u64,
    /// LoRA A and B, fp32 `Var`s (the master weights).
    pub lora_parameters: u64,
    /// fp32 gradients: the micro-batch's plus the accumulated sum over the window.
    pub gradients: u64,
    /// AdamW's two fp32 moments.
    pub optimizer_state: u64,
    /// Decoder-layer activations for the chosen `recompute` setting (one of the two below).
    pub activations: u64,
    /// Every layer's graph plus the gradients candle leaves for constants, at the peak (the
    /// first layer's softmax backward).
    pub activations_without_recompute: u64,
    /// Each layer's input `[b, t, hidden]` plus one layer's graph at a time.
    pub activations_with_recompute: u64,
    /// The head kept through the backward: final norm, logits in the model dtype, their f32
    /// copy, the cross-entropy intermediates and the leaked gradient of its max.
    pub logits_and_loss: u64,
    /// Shared constants (the `[b, 1, t, t]` f32 attention bias, RoPE cos/sin) plus the transient
    /// buffers of the largest backward step: the softmax backward (six `[b, heads, t, t]` f32),
    /// or the loss backward (four `[b·t, vocab]` f32) when that is larger.
    pub attention_workspace: u64,
    /// Allocator rounding and fragmentation, small temporaries: on a GPU 5% of the components
    /// above (cuBLAS workspaces included), plus [`CUDA_CONTEXT_BYTES`] after
    /// [`with_device_overhead`]; on the CPU [`HOST_OVERHEAD_PERCENT`].
    pub overhead: u64,
    pub total: u64,
    /// LoRA parameter count.
    pub trainable_parameters: u64,
    /// Base parameter count.
    pub frozen_parameters: u64,
}

/// What data parallelism over `ranks` costs and saves for a plan: the bytes every optimizer
/// step reduces (the fp32 LoRA gradients), the optimizer state a rank keeps with and without
/// ZeRO-1/2, and on paper how long a ring all-reduce of those bytes takes on common links.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataParallel {
    pub ranks: usize,
    pub gradient_bytes_per_step: u64,
    /// Bytes each rank sends (and receives) in a ring all-reduce: 2 (n − 1) / n of the gradients.
    pub ring_bytes_per_rank: u64,
    pub optimizer_state_per_rank: u64,
    pub optimizer_state_per_rank_zero2: u64,
    /// (link, assumed bus bandwidth in GB/s, milliseconds per all-reduce).
    pub links: Vec<(String, f64, f64)>,
}

/// Nominal NCCL bus bandwidths used for the on-paper estimate (GB/s).
const LINKS: [(&str, f64); 5] = [
    ("NVLink 4 (H100 SXM)", 360.0),
    ("NVLink 3 (A100 SXM)", 230.0),
    ("NVLink 2 (V100, NC24rs_v3)", 130.0),
    ("PCIe 4.0 x16", 20.0),
    ("InfiniBand HDR 200 Gb/s (across nodes)", 23.0),
];

pub fn data_parallel(plan: &MemoryPlan, ranks: usize) -> DataParallel {
    let n = ranks.max(1) as u64;
    let grads = plan.trainable_parameters * 4;
    let ring = if n == 1 { 0 } else { grads * 2 * (n - 1) / n };
    DataParallel {
        ranks: ranks.max(1),
        gradient_bytes_per_step: grads,
        ring_bytes_per_rank: ring,
        optimizer_state_per_rank: plan.optimizer_state,
        optimizer_state_per_rank_zero2: plan.optimizer_state.div_ceil(n),
        links: LINKS
            .iter()
            .map(|(name, gbs)| (name.to_string(), *gbs, ring as f64 / (gbs * 1e9) * 1e3))
            .collect(),
    }
}

/// A GPU (or an Azure VM size's GPUs) to plan for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub name: String,
    pub gpus_per_node: usize,
    /// Memory of one GPU in bytes (the marketed size read as GiB).
    pub memory_per_gpu: u64,
    /// Whether the GPU computes in bf16 (compute capability 8.0 or newer).
    pub bf16: bool,
}

/// Whether a plan fits a GPU, and what would.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub fits: bool,
    /// The memory less a 5% safety margin, in bytes.
    pub usable_bytes: u64,
    /// [`needed`]: the plan's total, on a GPU including [`CUDA_CONTEXT_BYTES`], in bytes.
    pub needed_bytes: u64,
    /// The largest micro batch that fits at this `seq_len`; `None` if even 1 does not.
    pub largest_micro_batch: Option<usize>,
    /// The largest multiple of 128 (up to the model's `max_position_embeddings`) that fits at
    /// this micro batch; `None` if even 128 does not.
    pub largest_seq_len: Option<usize>,
}

/// Bytes of an f32.
const F32: u128 = 4;
/// On the CPU the process's resident peak exceeds the bytes allocated at its peak: mimalloc
/// keeps freed blocks of other sizes and other threads' heaps resident. Measured by
/// `tests/plan_cpu_peak.rs` on training steps of 512–2,048 tokens: 17% to 38% (mean 25%; more
/// with recompute, whose layer-by-layer churn leaves more freed blocks resident, and a 2,048-token
/// recompute step lands at 22% or 38% from one run to the next). It was 9% to 25% before the
/// fused LoRA linears shrank the allocations themselves.
pub const HOST_OVERHEAD_PERCENT: u128 = 25;
/// Live `[b, heads, t, t]` f32 buffers while the composed softmax's broadcast division
/// back-propagates: the incoming gradient, `grad / sum`, the numerator's summed gradient,
/// `grad · e`, `sum²` and their quotient (candle's `BinaryOp::Div` backward), six as traced,
/// plus four that the measured composed steps on CUDA hold besides (the zero-filled buffers
/// candle starts each score-sized gradient with, and their sums): with ten the plan is within 3%
/// of three kernels-off steps measured on an H100 and an H200 (`benches/gpu/`); with six it was
/// 18-20% short once the head was no longer counted in the layers' phase.
const SOFTMAX_BACKWARD_BUFFERS: u128 = 10;
/// Live `[b·t, vocab]` f32 buffers at the worst point of the cross-entropy backward (the `exp`
/// node: its gradient, `grad · exp`, the old and the new summed gradient of the shifted logits).
const LOSS_BACKWARD_BUFFERS: u128 = 4;
/// Rows the fused CPU head re-projects at once (`head_loss.rs`'s `CHUNK`).
const HEAD_CHUNK: u128 = 256;

fn saturate(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// The model's dimensions and the run's, widened so products cannot overflow.
struct Dims {
    vocab: u128,
    hidden: u128,
    inter: u128,
    layers: u128,
    heads: u128,
    kv_heads: u128,
    head_dim: u128,
    /// Query width `heads · head_dim` (the `o_proj` input).
    attn: u128,
    /// Key (or value) width `kv_heads · head_dim`.
    kv: u128,
    qkv: u128,
    r: u128,
    /// Model dtype bytes.
    d: u128,
    /// 1 when the model dtype is not f32: then `to_dtype(F32)` makes a copy (in f32 it is a
    /// no-op returning the same tensor).
    conv: u128,
    dropout: bool,
    fused: bool,
    fused_head: bool,
    fused_attention: bool,
    /// The fused attention keeps its probabilities for the backward (CUDA) instead of
    /// recomputing them (the CPU).
    attention_keeps_probs: bool,
    /// Flash attention (see [`FusedOps::flash_attention`]).
    flash: bool,
    fused_lora: bool,
    /// The recompute's layer backward is hand-written (see [`FusedOps::layer_backward`]).
    hand_backward: bool,
    /// On a GPU (the fused head keeps its gradient in the model dtype and forms all logits at
    /// once; on the CPU in f32, a chunk at a time).
    gpu: bool,
    b: u128,
    t: u128,
}

/// One linear of a decoder layer: whether LoRA adapts it, its input and output width.
struct Linear {
    targeted: bool,
    input: u128,
    output: u128,
}

impl Dims {
    fn new(p: &PlanInput) -> Dims {
        let m = &p.model;
        let w = |x: usize| x as u128;
        let d = w(p.dtype_bytes.max(1));
        Dims {
            vocab: w(m.vocab_size),
            hidden: w(m.hidden_size),
            inter: w(m.intermediate_size),
            layers: w(m.num_hidden_layers),
            heads: w(m.num_attention_heads),
            kv_heads: w(m.num_key_value_heads),
            head_dim: w(m.head_dim),
            attn: w(m.num_attention_heads * m.head_dim),
            kv: w(m.num_key_value_heads * m.head_dim),
            qkv: w(m.qkv_size()),
            r: w(p.lora.r),
            d,
            conv: u128::from(d != F32),
            dropout: p.lora.lora_dropout > 0.0,
            fused: p.ops.kernels,
            fused_head: p.ops.head,
            fused_attention: p.ops.attention,
            attention_keeps_probs: p.ops.attention && p.gpu && !p.ops.flash_attention,
            flash: p.ops.flash_attention,
            fused_lora: p.ops.lora,
            hand_backward: p.ops.layer_backward && p.recompute,
            gpu: p.gpu,
            b: w(p.micro_batch),
            t: w(p.seq_len),
        }
    }

    /// Tokens in the micro batch.
    fn n(&self) -> u128 {
        self.b * self.t
    }

    /// The four linears of a layer, in forward order (`phi3.rs`'s shapes).
    fn linears(&self, lora: &LoraConfig) -> [Linear; 4] {
        let on = |name: &str| lora.r > 0 && lora.targets(name);
        let (h, i) = (self.hidden, self.inter);
        [
            Linear {
                targeted: on("qkv_proj"),
                input: h,
                output: self.qkv,
            },
            Linear {
                targeted: on("o_proj"),
                input: self.attn,
                output: h,
            },
            Linear {
                targeted: on("gate_up_proj"),
                input: h,
                output: 2 * i,
            },
            Linear {
                targeted: on("down_proj"),
                input: i,
                output: h,
            },
        ]
    }

    /// Composed RMSNorm, bytes kept per token: `x` to f32 (a copy unless f32), `x²`, its mean,
    /// `+eps`, `sqrt`, `recip` (one value each), `x·inv` (f32), back to the dtype (a copy unless
    /// f32), `· weight`.
    /// Fused: the output only.
    fn norm_kept(&self) -> u128 {
        let h = self.hidden;
        if self.fused {
            return h * self.d;
        }
        h * (2 * F32 + self.d) + self.conv * h * (F32 + self.d) + 4 * F32
    }

    /// A frozen projection with an optional adapter, bytes kept per token: the base output;
    /// with LoRA `x·Aᵀ` (r values), `·Bᵀ`, `·scale` and the sum (three more outputs); with
    /// dropout the mask and the masked input. Fused: the output, and the mask.
    fn linear_kept(&self, l: &Linear) -> u128 {
        let mut bytes = l.output * self.d;
        if l.targeted && self.fused_lora {
            if self.dropout {
                bytes += l.input * self.d;
            }
        } else if l.targeted {
            bytes += self.r * self.d + 3 * l.output * self.d;
            if self.dropout {
                bytes += 2 * l.input * self.d;
            }
        }
        bytes
    }

    /// Gradient candle computes for the dropout mask (a constant) and keeps, per token.
    fn linear_leak(&self, l: &Linear) -> u128 {
        if l.targeted && self.dropout && !self.fused_lora {
            l.input * self.d
        } else {
            0
        }
    }

    /// LoRA A and B cast to the model dtype for the forward (per layer, not per token); in f32
    /// the cast is a no-op. The fused linear casts inside its forward and backward and keeps
    /// nothing.
    fn lora_casts(&self, lora: &LoraConfig) -> u128 {
        if self.fused_lora {
            return 0;
        }
        self.linears(lora)
            .iter()
            .filter(|l| l.targeted)
            .map(|l| self.conv * self.r * (l.input + l.output) * self.d)
            .sum()
    }

    /// Recompute's step-long casts of every pair (`ferrotune_model::lora::StepCasts`): `scale·B`
    /// in the model dtype, and `A` where that dtype is not f32 (in f32 the cast shares A's
    /// storage). Per layer; the fused linear's only.
    fn step_casts(&self, lora: &LoraConfig) -> u128 {
        if !self.fused_lora {
            return 0;
        }
        self.linears(lora)
            .iter()
            .filter(|l| l.targeted)
            .map(|l| self.r * (self.conv * l.input + l.output) * self.d)
            .sum()
    }

    /// One decoder layer's graph, bytes per token, without its input (`DecoderLayer::forward`).
    fn layer_kept(&self, lora: &LoraConfig) -> u128 {
        let [qkv, o, gate_up, down] = self.linears(lora);
        let (h, d, a, kv) = (self.hidden, self.d, self.attn, self.kv);
        let mut bytes = self.norm_kept() + self.linear_kept(&qkv);
        // q, k, v: views of the qkv output narrowed and transposed, then one `contiguous` copy
        // each (binaries before 2026-11-26's evening also copied the strided narrow: one more).
        bytes += self.qkv * d;
        // RoPE on q and k: fused, the outputs; composed, `-x2` (half), `cat`, `x·cos`, `rot·sin`,
        // the sum.
        bytes += if self.fused {
            (a + kv) * d
        } else {
            (a / 2 + 4 * a + kv / 2 + 4 * kv) * d
        };
        // repeat_kv (GQA only): a broadcast reshaped into a copy, for k and for v.
        if self.heads != self.kv_heads {
            bytes += 2 * a * d;
        }
        // Scores per query: fused attention, none on the CPU and the probabilities on CUDA;
        // fused softmax, `q·kᵀ` and the probabilities,
        // both in the dtype; composed, `q·kᵀ` in the dtype, its f32 copy, `·scale`, `+bias`,
        // `-max`, `exp`, `/sum` (f32), probabilities back in the dtype; max and sum are one
        // value per head.
        bytes += if self.flash {
            // The log-sum-exp, f32, one per head.
            self.heads * F32
        } else if self.attention_keeps_probs {
            self.heads * self.t * d
        } else if self.fused_attention {
            0
        } else if self.fused {
            2 * self.heads * self.t * d
        } else {
            self.heads * self.t * (d + 5 * F32 + self.conv * (F32 + d)) + 2 * self.heads * F32
        };
        // `probs·v`, and its transpose reshaped into a copy for o_proj; flash attention writes
        // o_proj's layout directly.
        bytes += if self.flash { a * d } else { 2 * a * d };
        bytes += self.linear_kept(&o);
        // The residual sum after attention.
        bytes += h * d;
        bytes += self.norm_kept() + self.linear_kept(&gate_up);
        // SwiGLU: fused, the output; composed, `-gate`, `exp`, `+1`, `recip`, `gate·σ`, `up·…`.
        bytes += if self.fused { 1 } else { 6 } * self.inter * d;
        // down_proj; its residual sum is the next layer's input (counted there).
        bytes + self.linear_kept(&down)
    }

    /// The hand-written layer backward (`ferrotune_model::decoder_backward`): bytes per token
    /// live at its two peaks besides the saved layer inputs and the incoming gradient, as
    /// `(mlp, attention)`. The first comes with one score-sized buffer (the kept probabilities),
    /// the second with three (those, their gradient and the scores').
    ///
    /// Kept from the re-run forward: the first norm's output and q, k, v (k and v repeated for
    /// GQA) until the end; the attention output, the residual sum, the second norm's output,
    /// `gate_up` and the SwiGLU output until the MLP's backward has read them; every adapted
    /// linear's dropout mask until its own backward. At `down_proj`'s backward (the MLP peak) its
    /// input gradient is being formed from `g·W` and the adapter's term (plus the masked input
    /// with dropout); at the softmax backward (the attention peak) the residual stream's
    /// gradient, the attention output's gradient in heads and `dv` exist.
    fn hand_backward_peaks(&self, lora: &LoraConfig) -> (u128, u128) {
        let [qkv, o, gate_up, down] = self.linears(lora);
        let (h, i, a, d) = (self.hidden, self.inter, self.attn, self.d);
        let mask = |l: &Linear| {
            if l.targeted && self.dropout {
                l.input * d
            } else {
                0
            }
        };
        let kv = if self.heads != self.kv_heads {
            a
        } else {
            self.kv
        };
        let to_the_end = h * d + mask(&qkv) + (a + 2 * kv) * d;
        let down_forming = if down.targeted { 3 } else { 1 } * i * d + mask(&down);
        let mlp = to_the_end
            + a * d
            + mask(&o)
            + 2 * h * d
            + mask(&gate_up)
            + 3 * i * d
            + mask(&down)
            + down_forming;
        let attention = if self.flash {
            // Flash attention's backward: the output and its gradient, dq's f32 accumulator and
            // dq, dk, dv (nothing score-sized).
            to_the_end + h * d + 2 * a * d + a * F32 + 3 * a * d
        } else {
            to_the_end + h * d + 2 * a * d
        };
        (mlp, attention)
    }

    /// Leaked gradients of one layer created before its softmax backward runs (the backward
    /// walks the layer from its output): the second norm's weight, the dropout masks of down,
    /// gate_up and o_proj. Bytes per token.
    /// Fused ops capture their constants, so only the dropout masks leak.
    fn layer_leak_before_softmax(&self, lora: &LoraConfig) -> u128 {
        let [_, o, gate_up, down] = self.linears(lora);
        let norm_weight = if self.fused { 0 } else { self.hidden * self.d };
        norm_weight + self.linear_leak(&down) + self.linear_leak(&gate_up) + self.linear_leak(&o)
    }

    /// Leaked gradients created from the softmax backward on: the attention bias and the
    /// softmax max, each at `[heads, t]` f32 per token; RoPE's cos and sin broadcast over q's
    /// and k's heads; the first norm's weight; qkv_proj's dropout mask. Bytes per token.
    /// Fused: only qkv_proj's dropout mask.
    fn layer_leak_from_softmax(&self, lora: &LoraConfig) -> u128 {
        let [qkv, ..] = self.linears(lora);
        if self.fused {
            return self.linear_leak(&qkv);
        }
        2 * self.heads * self.t * F32
            + 2 * (self.attn + self.kv) * self.d
            + self.hidden * self.d
            + self.linear_leak(&qkv)
    }

    /// The head, bytes per token kept through the backward: the final hidden state, the final
    /// norm, logits in the dtype, their f32 copy, the cross-entropy's gathered rows, shifted
    /// rows and `exp` (all f32; every token assumed trained, the worst case), a few per-row
    /// values; plus the leaked gradients of the final norm's weight and of the detached max.
    /// Fused head: the final hidden state, the norm, one loss per row and the hidden state's
    /// gradient formed in the forward (f32).
    fn head(&self) -> u128 {
        let (h, v, d) = (self.hidden, self.vocab, self.d);
        if self.fused_head {
            // The input and the gradient formed in the forward: on CUDA in the model dtype (the
            // loss is one scalar), on the CPU in f32 with a loss per row.
            let grad = if self.gpu { h * d } else { F32 + h * F32 };
            return h * d + self.norm_kept() + grad;
        }
        let kept = h * d + self.norm_kept() + v * (d + self.conv * F32 + 3 * F32) + 4 * F32;
        let norm_weight = if self.fused { 0 } else { h * d };
        let leaked = norm_weight + v * F32;
        kept + leaked
    }
}

/// Parameter counts `(frozen, trainable)`.
fn parameters(p: &PlanInput) -> (u128, u128) {
    let dims = Dims::new(p);
    let (v, h) = (dims.vocab, dims.hidden);
    let linears = dims.linears(&p.lora);
    let per_layer: u128 = 2 * h + linears.iter().map(|l| l.input * l.output).sum::<u128>();
    let head = if p.model.tie_word_embeddings {
        0
    } else {
        v * h
    };
    let frozen = v * h + h + dims.layers * per_layer + head;
    let trainable = dims.layers
        * linears
            .iter()
            .filter(|l| l.targeted)
            .map(|l| dims.r * (l.input + l.output))
            .sum::<u128>();
    (frozen, trainable)
}

/// Peak memory of one micro-step on one GPU, without the CUDA context (see
/// [`with_device_overhead`]).
pub fn estimate(input: &PlanInput) -> MemoryPlan {
    let dims = Dims::new(input);
    let lora = &input.lora;
    let (frozen, trainable) = parameters(input);
    let (n, l, h, d) = (dims.n(), dims.layers, dims.hidden, dims.d);

    let weights = frozen * d;
    // LoRA A/B are fp32 Vars whatever the model dtype (mixed precision with fp32 masters).
    let lora_parameters = trainable * F32;
    // The micro-batch's gradients (fp32: they flow back through the cast of the fp32 Vars) and
    // the window's running sum, a separate fp32 copy once accumulation adds the second one.
    let gradients = 2 * trainable * F32;
    // AdamW's exp_avg and exp_avg_sq, fp32.
    let optimizer_state = 2 * trainable * F32;

    let kept = dims.layer_kept(lora);
    let casts = dims.lora_casts(lora);
    let leak_before = dims.layer_leak_before_softmax(lora);
    let leak_all = leak_before + dims.layer_leak_from_softmax(lora);
    // Plain graph: every layer's input and graph stay until the backward returns. The peak is
    // the first layer's softmax backward, when the other layers' leaked gradients exist too.
    let without =
        l * (n * (h * d + kept) + casts) + l.saturating_sub(1) * n * leak_all + n * leak_before;
    // Recompute: each layer's input is kept (detached), then one layer is re-run under the
    // graph from a Var copy of its input; the backward is seeded with the incoming gradient
    // (`ferrotune_model::backward_seed`: that gradient and the copy candle keeps for the
    // output); plus the Var copy of the final hidden state the head starts from.
    let scores = dims.b * dims.heads * dims.t * dims.t;
    let with = if dims.hand_backward {
        // No graph: the saved inputs, the incoming gradient and the larger of the backward's two
        // peaks; the attention peak's three score-sized buffers are `softmax_backward` below, so
        // the MLP peak's one is counted here as what it lacks against them.
        let (mlp, attention) = dims.hand_backward_peaks(lora);
        let mlp = if dims.flash {
            n * mlp
        } else {
            (n * mlp).saturating_sub(2 * scores * d)
        };
        l * n * h * d + n * h * d + mlp.max(n * attention)
    } else {
        l * n * h * d + n * h * d + n * (h * d + kept + leak_before + 2 * h * d) + casts
    };
    // Recompute holds every layer's A and scale·B casts for the whole step.
    let with = with + l * dims.step_casts(lora);
    let activations = if input.recompute { with } else { without };

    // The head's graph (and its leaked gradient): without recompute it stays until the layers
    // are done; with recompute it is freed before the first layer is re-run (see below).
    let head_kept = n * dims.head();
    // The fused softmax backward holds the incoming gradient, its own output and candle's summed
    // copy of it, all in the dtype; the composed one [`SOFTMAX_BACKWARD_BUFFERS`] in f32.
    // The fused attention's backward holds the recomputed probabilities, their gradient and the
    // scores' gradient, f32 (the CPU); on CUDA the gradients of the kept probabilities and of
    // the scores, in the dtype.
    let softmax_backward = if dims.flash {
        // Flash attention's backward holds dq's f32 accumulator and dq, dk, dv besides what the
        // peaks above count (the graph path; the hand-written one counts them there).
        if dims.hand_backward {
            0
        } else {
            n * dims.attn * (F32 + 3 * d)
        }
    } else if dims.hand_backward {
        3 * scores * d
    } else if dims.attention_keeps_probs {
        2 * scores * d
    } else if dims.fused_attention {
        3 * scores * F32
    } else if dims.fused {
        3 * scores * d
    } else {
        SOFTMAX_BACKWARD_BUFFERS * scores * F32
    };
    // The loss backward: composed, [`LOSS_BACKWARD_BUFFERS`] `[b·t, vocab]` f32 buffers; fused,
    // the head's forward (which forms the gradient): one chunk of logits twice (the matmul's
    // output and the copy rewritten into `softmax − onehot`) with its input rows and their
    // gradient.
    let loss_backward = if dims.fused_head && dims.gpu {
        // On CUDA: the logits and `softmax − onehot`, both in the dtype, with the per-row losses
        // and targets.
        n * (2 * dims.vocab * d + 2 * F32)
    } else if dims.fused_head {
        HEAD_CHUNK * (2 * dims.vocab + 2 * h) * F32
    } else {
        LOSS_BACKWARD_BUFFERS * n * dims.vocab * F32
    };
    let bias_and_rope = dims.b * dims.t * dims.t * F32 + 2 * n * dims.head_dim * d;
    let (logits_and_loss, attention_workspace) = if input.recompute {
        // The head runs first, next to the saved layer inputs only, and its graph is gone before
        // the layers are re-run one at a time: the step's peak is the larger phase. The head's
        // bytes are what its phase needs beyond the layers' (often nothing).
        let head_phase = l * n * h * d + head_kept + loss_backward;
        let layer_phase = with + softmax_backward;
        (
            head_phase.saturating_sub(layer_phase),
            bias_and_rope + softmax_backward,
        )
    } else {
        // Without recompute the loss backward runs next to every layer's graph and the head's.
        (
            head_kept,
            bias_and_rope + softmax_backward.max(loss_backward),
        )
    };

    let sum = weights
        + lora_parameters
        + gradients
        + optimizer_state
        + activations
        + logits_and_loss
        + attention_workspace;
    let overhead = if input.gpu {
        sum / 20
    } else {
        sum * HOST_OVERHEAD_PERCENT / 100
    };
    MemoryPlan {
        weights: saturate(weights),
        lora_parameters: saturate(lora_parameters),
        gradients: saturate(gradients),
        optimizer_state: saturate(optimizer_state),
        activations: saturate(activations),
        activations_without_recompute: saturate(without),
        activations_with_recompute: saturate(with),
        logits_and_loss: saturate(logits_and_loss),
        attention_workspace: saturate(attention_workspace),
        overhead: saturate(overhead),
        total: saturate(sum + overhead),
        trainable_parameters: saturate(trainable),
        frozen_parameters: saturate(frozen),
    }
}

/// `plan` on a GPU: [`CUDA_CONTEXT_BYTES`] and [`CUDA_STEP_SLACK_BYTES`] added to `overhead`
/// and `total` (apply once).
pub fn with_device_overhead(plan: &MemoryPlan) -> MemoryPlan {
    let device = CUDA_CONTEXT_BYTES + CUDA_STEP_SLACK_BYTES;
    MemoryPlan {
        overhead: plan.overhead.saturating_add(device),
        total: plan.total.saturating_add(device),
        ..plan.clone()
    }
}

/// Bytes a run needs: on a GPU with the CUDA context, on the CPU the plan's total.
pub fn needed(input: &PlanInput) -> u64 {
    let plan = estimate(input);
    if input.gpu {
        with_device_overhead(&plan).total
    } else {
        plan.total
    }
}

/// Whether `input` fits a GPU (or, for a CPU plan, a machine) of `memory_bytes` ([`needed`], 5%
/// of the memory kept back), and the largest micro batch and sequence length that would.
pub fn verdict(input: &PlanInput, memory_bytes: u64) -> Verdict {
    let usable_bytes = memory_bytes - memory_bytes / 20;
    let needed_bytes = needed(input);
    let fits_with = |micro_batch: usize, seq_len: usize| {
        needed(&PlanInput {
            micro_batch,
            seq_len,
            ..input.clone()
        }) <= usable_bytes
    };
    // Memory grows with both, so the largest fitting value is found by bisection.
    let largest_micro_batch = largest(1 << 20, |b| fits_with(b, input.seq_len));
    let largest_seq_len = largest(input.model.max_position_embeddings / 128, |k| {
        fits_with(input.micro_batch, 128 * k)
    })
    .map(|k| 128 * k);
    Verdict {
        fits: needed_bytes <= usable_bytes,
        usable_bytes,
        needed_bytes,
        largest_micro_batch,
        largest_seq_len,
    }
}

/// The largest `k` in `1..=limit` with `fits(k)`, for `fits` true up to some point and false
/// after; `None` if `fits(1)` is false (or `limit` is 0).
fn largest(limit: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if limit == 0 || !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1usize, limit); // fits(lo); the answer is in lo..=hi
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

struct Gpu {
    name: &'static str,
    /// Spellings after [`gpu_key`].
    keys: &'static [&'static str],
    gib: u64,
    bf16: bool,
}

const GPUS: &[Gpu] = &[
    Gpu {
        name: "H100-80GB",
        keys: &["h100", "h10080"],
        gib: 80,
        bf16: true,
    },
    Gpu {
        name: "H100-94GB",
        keys: &["h10094", "h100nvl", "h100nvl94"],
        gib: 94,
        bf16: true,
    },
    Gpu {
        name: "H200",
        keys: &["h200", "h200141"],
        gib: 141,
        bf16: true,
    },
    Gpu {
        name: "A100-40GB",
        keys: &["a10040"],
        gib: 40,
        bf16: true,
    },
    Gpu {
        name: "A100-80GB",
        keys: &["a10080"],
        gib: 80,
        bf16: true,
    },
    Gpu {
        name: "A10",
        keys: &["a10", "a1024"],
        gib: 24,
        bf16: true,
    },
    Gpu {
        name: "L4",
        keys: &["l4", "l424"],
        gib: 24,
        bf16: true,
    },
    Gpu {
        name: "L40S",
        keys: &["l40s", "l40s48"],
        gib: 48,
        bf16: true,
    },
    Gpu {
        name: "V100-16GB",
        keys: &["v10016"],
        gib: 16,
        bf16: false,
    },
    Gpu {
        name: "V100-32GB",
        keys: &["v10032"],
        gib: 32,
        bf16: false,
    },
    Gpu {
        name: "T4",
        keys: &["t4", "t416"],
        gib: 16,
        bf16: false,
    },
];

/// Lowercase letters and digits only, without vendor, form-factor and memory-type words or
/// "GB": "NVIDIA H100 80GB HBM3", "h100-80gb" and "H100_80G" all become "h10080",
/// "NVIDIA A100-SXM4-40GB" becomes "a10040", "Tesla V100-PCIE-16GB" "v10016" (nvidia-smi's
/// names work too).
fn gpu_key(name: &str) -> String {
    let mut key: String = name
        .to_lowercase()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    for noise in [
        "nvidia", "tesla", "hbm3e", "hbm3", "hbm2e", "hbm2", "sxm2", "sxm4", "sxm5", "sxm", "pcie",
        "gb",
    ] {
        key = key.replace(noise, "");
    }
    // "80G": a trailing g after a size.
    if key.ends_with('g') && key[..key.len() - 1].ends_with(|c: char| c.is_ascii_digit()) {
        key.pop();
    }
    key
}

fn known_gpus() -> String {
    GPUS.iter().map(|g| g.name).collect::<Vec<_>>().join(", ")
}

/// One GPU by name (case-insensitive; e.g. "H100", "h100-80gb", "A100-40GB", "H100-NVL").
pub fn gpu(name: &str) -> Result<Target, String> {
    let key = gpu_key(name);
    if key == "a100" || key == "v100" {
        let sizes = if key == "a100" {
            "A100-40GB or A100-80GB"
        } else {
            "V100-16GB or V100-32GB"
        };
        return Err(format!(
            "GPU {name:?} comes in two memory sizes; say {sizes} (known GPUs: {})",
            known_gpus()
        ));
    }
    let found = GPUS.iter().find(|g| g.keys.contains(&key.as_str()));
    let g = found.ok_or_else(|| format!("unknown GPU {name:?}; known GPUs: {}", known_gpus()))?;
    Ok(Target {
        name: g.name.to_string(),
        gpus_per_node: 1,
        memory_per_gpu: g.gib * GIB,
        bf16: g.bf16,
    })
}

/// Azure ML VM sizes: name, GPUs, GPU.
const SKUS: &[(&str, usize, &str)] = &[
    ("Standard_NC6s_v3", 1, "V100-16GB"),
    ("Standard_NC12s_v3", 2, "V100-16GB"),
    ("Standard_NC24s_v3", 4, "V100-16GB"),
    ("Standard_NC24rs_v3", 4, "V100-16GB"),
    ("Standard_NC24ads_A100_v4", 1, "A100-80GB"),
    ("Standard_NC48ads_A100_v4", 2, "A100-80GB"),
    ("Standard_NC96ads_A100_v4", 4, "A100-80GB"),
    ("Standard_ND96asr_v4", 8, "A100-40GB"),
    ("Standard_ND96amsr_A100_v4", 8, "A100-80GB"),
    ("Standard_NC40ads_H100_v5", 1, "H100-94GB"),
    ("Standard_ND96isr_H100_v5", 8, "H100-80GB"),
];

/// The K80 sizes the source's Azure ML fine-tuning pipeline refuses (its check compares
/// `compute.size.lower()` with these).
const RETIRED_K80_SKUS: &[&str] = &[
    "standard_nc6",
    "standard_nc12",
    "standard_nc24",
    "standard_nc24r",
];

/// An Azure VM size (case-insensitive, with or without `Standard_`): its GPUs and their memory.
pub fn azure_sku(name: &str) -> Result<Target, String> {
    let lower = name.trim().to_lowercase();
    let full = if lower.starts_with("standard_") {
        lower
    } else {
        format!("standard_{lower}")
    };
    if RETIRED_K80_SKUS.contains(&full.as_str()) {
        return Err(format!(
            "{name} is not supported for fine-tuning: it is a K80-based VM size (retired K80 \
             GPUs) that the Azure ML fine-tuning pipeline refuses; pick an NCv3 (V100), \
             A100 (NC A100 v4, ND A100 v4) or H100 (NC/ND H100 v5) size"
        ));
    }
    let known = || SKUS.iter().map(|s| s.0).collect::<Vec<_>>().join(", ");
    let (sku, count, gpu_name) = SKUS
        .iter()
        .find(|s| s.0.to_lowercase() == full)
        .ok_or_else(|| format!("unknown Azure VM size {name:?}; known sizes: {}", known()))?;
    let g = gpu(gpu_name).expect("the SKU table names known GPUs");
    Ok(Target {
        name: sku.to_string(),
        gpus_per_node: *count,
        ..g
    })
}

fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / GIB as f64)
}

/// The plan as an aligned table, one component per line in GiB (2 decimals).
pub fn render(plan: &MemoryPlan) -> String {
    let chosen = if plan.activations == plan.activations_with_recompute
        && plan.activations != plan.activations_without_recompute
    {
        "activations (recompute on)"
    } else {
        "activations (recompute off)"
    };
    let rows = [
        ("frozen weights", plan.weights),
        ("LoRA parameters (fp32)", plan.lora_parameters),
        ("gradients (fp32, x2)", plan.gradients),
        ("optimizer state (AdamW)", plan.optimizer_state),
        (chosen, plan.activations),
        ("logits and loss", plan.logits_and_loss),
        ("attention workspace", plan.attention_workspace),
        ("overhead", plan.overhead),
    ];
    let total = ("total", plan.total);
    let width = rows
        .iter()
        .chain([&total])
        .map(|r| r.0.len())
        .max()
        .unwrap_or(0);
    let numbers: Vec<String> = rows.iter().chain([&total]).map(|r| gib(r.1)).collect();
    let num_width = numbers.iter().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    let line = |out: &mut String, label: &str, value: &str| {
        out.push_str(&format!("{label:<width$}  {value:>num_width$} GiB\n"));
    };
    for (row, number) in rows.iter().zip(&numbers) {
        line(&mut out, row.0, number);
    }
    out.push_str(&format!("{}\n", "-".repeat(width + 2 + num_width + 4)));
    line(&mut out, total.0, &numbers[rows.len()]);
    out.push_str(&format!(
        "activations with recompute {} GiB, without {} GiB\n",
        gib(plan.activations_with_recompute),
        gib(plan.activations_without_recompute)
    ));
    out.push_str(&format!(
        "parameters: {} trainable, {} frozen\n",
        plan.trainable_parameters, plan.frozen_parameters
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHI3_MINI_4K: &str = r#"{"architectures": ["Phi3ForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
        "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "pad_token_id": 32000, "rms_norm_eps": 1e-05,
        "rope_scaling": null, "rope_theta": 10000.0, "sliding_window": 2047,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32064}"#;

    fn phi3_mini() -> Phi3Config {
        Phi3Config::from_json_str(PHI3_MINI_4K).unwrap()
    }

    fn input(micro_batch: usize, seq_len: usize, dtype_bytes: usize, recompute: bool) -> PlanInput {
        PlanInput {
            model: phi3_mini(),
            lora: LoraConfig::default(), // r 16 on all four targets
            micro_batch,
            seq_len,
            dtype_bytes,
            recompute,
            ops: FusedOps::default(),
            gpu: true,
        }
    }

    fn components(p: &MemoryPlan) -> u64 {
        p.weights
            + p.lora_parameters
            + p.gradients
            + p.optimizer_state
            + p.activations
            + p.logits_and_loss
            + p.attention_workspace
            + p.overhead
    }

    #[test]
    fn data_parallel_reduces_the_lora_gradients_and_zero_2_splits_the_moments() {
        let plan = estimate(&input(1, 2048, 2, true));
        let one = data_parallel(&plan, 1);
        assert_eq!(one.ring_bytes_per_rank, 0);
        let four = data_parallel(&plan, 4);
        // r 16 on all four linears of 32 layers: 25.2 M fp32 gradients, 100.7 MB per step.
        assert_eq!(four.gradient_bytes_per_step, plan.trainable_parameters * 4);
        assert!(
            (four.gradient_bytes_per_step as f64 / 1e6 - 100.7).abs() < 0.5,
            "{four:?}"
        );
        assert_eq!(
            four.ring_bytes_per_rank,
            four.gradient_bytes_per_step * 6 / 4
        );
        assert_eq!(
            four.optimizer_state_per_rank_zero2,
            plan.optimizer_state / 4
        );
        let nvlink = four.links[0].2;
        assert!(nvlink > 0.3 && nvlink < 0.5, "{nvlink} ms");
    }

    #[test]
    fn phi3_mini_parameters_and_weights() {
        let p = estimate(&input(1, 4096, 2, true));
        assert_eq!(p.frozen_parameters, 3_821_079_552);
        assert_eq!(p.trainable_parameters, 25_165_824);
        let rel = (p.weights as f64 - 7.64e9).abs() / 7.64e9;
        assert!(rel < 0.01, "weights {} bytes", p.weights);
        assert_eq!(p.lora_parameters, 25_165_824 * 4);
        assert_eq!(p.gradients, 2 * p.lora_parameters);
        assert_eq!(p.optimizer_state, 2 * p.lora_parameters);
        assert_eq!(components(&p), p.total);
    }

    #[test]
    fn tied_embeddings_count_the_head_once_and_targets_matter() {
        let mut i = input(1, 512, 2, true);
        let untied = estimate(&i).frozen_parameters;
        i.model.tie_word_embeddings = true;
        assert_eq!(untied - estimate(&i).frozen_parameters, 32064 * 3072);
        i.lora.target_modules = vec!["qkv_proj".into()];
        assert_eq!(estimate(&i).trainable_parameters, 32 * 16 * (3072 + 9216));
    }

    #[test]
    fn recompute_keeps_far_less() {
        for t in [512, 4096] {
            let p = estimate(&input(1, t, 2, true));
            assert!(
                p.activations_with_recompute * 8 < p.activations_without_recompute,
                "t {t}: {p:?}"
            );
            assert_eq!(p.activations, p.activations_with_recompute);
            let off = estimate(&input(1, t, 2, false));
            assert_eq!(off.activations, off.activations_without_recompute);
            assert_eq!(components(&off), off.total);
        }
    }

    #[test]
    fn phi3_mini_fits_an_h100_with_recompute() {
        let h100 = gpu("H100-80GB").unwrap();
        let v = verdict(&input(1, 4096, 2, true), h100.memory_per_gpu);
        assert!(v.fits, "{v:?}");
        assert_eq!(v.largest_seq_len, Some(4096));
        assert!(v.largest_micro_batch.unwrap() >= 1);
        assert_eq!(v.usable_bytes, 80 * GIB - 4 * GIB);
        assert_eq!(
            v.needed_bytes,
            estimate(&input(1, 4096, 2, true)).total + CUDA_CONTEXT_BYTES + CUDA_STEP_SLACK_BYTES
        );
    }

    /// Phi-3-mini, bf16, recompute, on CUDA: flash attention holds nothing score-sized, where
    /// the kept probabilities cost at least one `[b, heads, t, t]` buffer more at the layer
    /// phase's peak (the probabilities through the MLP's backward, then three at the softmax
    /// backward).
    #[test]
    fn flash_attention_plans_at_least_a_score_buffer_less() {
        for t in [2048usize, 4096] {
            let plan = |flash_attention| {
                with_device_overhead(&estimate(&PlanInput {
                    ops: FusedOps {
                        flash_attention,
                        ..FusedOps::ALL
                    },
                    ..input(1, t, 2, true)
                }))
            };
            let (probs, flash) = (plan(false), plan(true));
            let scores = (32 * t * t * 2) as u64;
            eprintln!(
                "1 × {t}: kept probabilities {:.2} GiB, flash {:.2} GiB",
                probs.total as f64 / GIB as f64,
                flash.total as f64 / GIB as f64
            );
            assert!(
                flash.total + scores <= probs.total,
                "{t}: {flash:?} vs {probs:?}"
            );
        }
    }

    /// Phi-3-mini, 1 × 2048, bf16, recompute, on CUDA: the hand-written layer backward keeps no
    /// graph, so its layer phase is smaller than the graph's at the same fused ops, though it
    /// holds one more score-sized buffer (the probabilities through the MLP's backward).
    #[test]
    fn the_hand_written_layer_backward_plans_less_than_the_graph() {
        let plan = |ops| {
            with_device_overhead(&estimate(&PlanInput {
                ops,
                ..input(1, 2048, 2, true)
            }))
        };
        let graph = plan(FusedOps {
            layer_backward: false,
            ..FusedOps::ALL
        });
        let hand = plan(FusedOps::ALL);
        eprintln!(
            "Phi-3-mini 1 x 2048 recompute on CUDA: hand-written backward {:.2} GiB (activations {:.2}, attention workspace {:.2}), graph {:.2} GiB (activations {:.2}, attention workspace {:.2})",
            hand.total as f64 / GIB as f64,
            hand.activations as f64 / GIB as f64,
            hand.attention_workspace as f64 / GIB as f64,
            graph.total as f64 / GIB as f64,
            graph.activations as f64 / GIB as f64,
            graph.attention_workspace as f64 / GIB as f64,
        );
        assert!(hand.activations < graph.activations);
        assert!(hand.total < graph.total);
        assert_eq!(hand.weights, graph.weights);
    }

    #[test]
    fn a_v100_without_recompute_does_not_fit_batch_8() {
        let v100 = gpu("V100-16GB").unwrap();
        assert!(!v100.bf16);
        let v = verdict(&input(8, 4096, 2, false), v100.memory_per_gpu);
        assert!(!v.fits);
        assert!(v.needed_bytes > v.usable_bytes);
        assert!(v.largest_micro_batch.is_none_or(|b| b < 8), "{v:?}");
        // With recompute at a shorter length some batch fits, and the answers are exact edges.
        let i = input(64, 1024, 2, true);
        let v = verdict(&i, v100.memory_per_gpu);
        let b = v.largest_micro_batch.expect("batch 1 fits");
        assert!(b < 64, "{v:?}");
        let at = |micro_batch, seq_len| {
            needed(&PlanInput {
                micro_batch,
                seq_len,
                ..i.clone()
            })
        };
        assert!(at(b, 1024) <= v.usable_bytes && at(b + 1, 1024) > v.usable_bytes);
        // At batch 64 not even 128 tokens fit; at batch 4 some length does.
        assert_eq!(v.largest_seq_len, None);
        let v = verdict(
            &PlanInput {
                micro_batch: 4,
                ..i.clone()
            },
            v100.memory_per_gpu,
        );
        let t = v.largest_seq_len.expect("128 tokens fit");
        assert_eq!(t % 128, 0);
        assert!(t < 4096, "{v:?}");
        assert!(at(4, t) <= v.usable_bytes && at(4, t + 128) > v.usable_bytes);
    }

    /// The plan against what `scripts/gpu-check.sh` measured on a GPU: LoRA r 16 forward +
    /// backward of a Phi-3-mini-shaped model in bf16, 2048 tokens, recompute on, fused kernels
    /// (`ferrotune bench train`, device memory sampled every 2 ms). The step's working memory
    /// (peak − in use before the first step) must be the plan's activations, head, attention
    /// workspace and one set of LoRA gradients within 15%, and the memory in use before the step
    /// its weights, LoRA parameters and the CUDA context within 15%; the same run with the
    /// kernels off (candle's composed ops, composed LoRA linears) likewise.
    fn check_against_gpu_report(report: &str, ops: FusedOps) {
        let path = format!("{}/../../benches/gpu/{report}", env!("CARGO_MANIFEST_DIR"));
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let bench = |name: &str| {
            report["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["step"] == name)
                .unwrap_or_else(|| panic!("{path}: no {name} step"))["result"]
                .clone()
        };
        let on = bench("bench_train_phi3_mini");
        assert_eq!(on["shape"]["num_hidden_layers"], 32);
        assert_eq!(on["dtype"], "bf16");
        assert_eq!(on["recompute"], true);
        let working = |b: &serde_json::Value| {
            b["ferrotune"]["peak_device_bytes"].as_f64().unwrap()
                - b["ferrotune"]["device_bytes_at_start"].as_f64().unwrap()
        };
        let start = on["ferrotune"]["device_bytes_at_start"].as_f64().unwrap();
        let i = PlanInput {
            ops,
            ..input(
                on["batch"].as_u64().unwrap() as usize,
                on["seq"].as_u64().unwrap() as usize,
                2,
                true,
            )
        };
        let step_of = |p: &MemoryPlan| {
            (p.activations
                + p.logits_and_loss
                + p.attention_workspace
                + p.gradients / 2
                + CUDA_STEP_SLACK_BYTES) as f64
        };
        let p = estimate(&i);
        let loaded = (p.weights + p.lora_parameters + CUDA_CONTEXT_BYTES) as f64;
        let step_rel = (step_of(&p) - working(&on)) / working(&on);
        let loaded_rel = (loaded - start) / start;
        eprintln!(
            "{path}: step: plan {:.2} GiB, measured {:.2} GiB ({step_rel:+.1e}); loaded: plan {:.2} GiB, measured {:.2} GiB ({loaded_rel:+.1e})",
            step_of(&p) / GIB as f64,
            working(&on) / GIB as f64,
            loaded / GIB as f64,
            start / GIB as f64
        );
        assert!(
            step_rel.abs() <= 0.15,
            "{path}: step working memory off by {step_rel:+e}"
        );
        assert!(
            loaded_rel.abs() <= 0.15,
            "{path}: loaded memory off by {loaded_rel:+e}"
        );
        let has_off = report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step"] == "bench_train_phi3_mini_kernels_off");
        if !has_off {
            return;
        }
        let off = bench("bench_train_phi3_mini_kernels_off");
        let c = estimate(&PlanInput {
            ops: FusedOps::default(),
            ..i
        });
        let off_rel = (step_of(&c) - working(&off)) / working(&off);
        eprintln!(
            "{path}: kernels off: plan {:.2} GiB, measured {:.2} GiB ({off_rel:+.1e})",
            step_of(&c) / GIB as f64,
            working(&off) / GIB as f64
        );
        assert!(
            off_rel.abs() <= 0.15,
            "{path}: composed step off by {off_rel:+e}"
        );
        assert!(c.total > p.total);
    }

    /// An H200 running a binary from before `lora_linear` (its LoRA linears composed).
    #[test]
    fn fused_kernels_plan_matches_the_measured_h200_step() {
        let ops = FusedOps {
            kernels: true,
            ..FusedOps::default()
        };
        check_against_gpu_report("h200-2026-11-26.json", ops);
    }

    /// An H100 running commit 7dcd8a2: the fused kernels and one node per LoRA linear (attention
    /// still composed).
    #[test]
    fn fused_kernels_plan_matches_the_measured_h100_step() {
        let ops = FusedOps {
            kernels: true,
            lora: true,
            ..FusedOps::default()
        };
        check_against_gpu_report("h100-2026-11-26.json", ops);
    }

    /// The same H100 running commit d556ba0: attention one node as well (its kernels-off run was
    /// timed only).
    #[test]
    fn fused_attention_plan_matches_the_measured_h100_step() {
        let ops = FusedOps {
            kernels: true,
            lora: true,
            attention: true,
            ..FusedOps::default()
        };
        check_against_gpu_report("h100-2026-11-26-d556ba0.json", ops);
    }

    /// The same H100 running commit aa4b367: the head and its cross-entropy one node too.
    #[test]
    fn fused_head_plan_matches_the_measured_h100_step() {
        let ops = FusedOps {
            layer_backward: false,
            ..FusedOps::ALL
        };
        check_against_gpu_report("h100-2026-11-26-aa4b367.json", ops);
    }

    #[test]
    fn device_overhead_is_added_once() {
        let p = estimate(&input(2, 1024, 2, true));
        let d = with_device_overhead(&p);
        let device = CUDA_CONTEXT_BYTES + CUDA_STEP_SLACK_BYTES;
        assert_eq!(d.total, p.total + device);
        assert_eq!(d.overhead, p.overhead + device);
        assert_eq!(components(&d), d.total);
        assert_eq!(CUDA_CONTEXT_BYTES, 960 * 1024 * 1024);
    }

    #[test]
    fn f32_costs_more_than_bf16() {
        let bf16 = estimate(&input(1, 1024, 2, true));
        let f32 = estimate(&input(1, 1024, 4, true));
        assert_eq!(f32.weights, 2 * bf16.weights);
        assert_eq!(f32.lora_parameters, bf16.lora_parameters);
        assert!(f32.total > bf16.total);
    }

    #[test]
    fn gpu_names() {
        assert_eq!(gpu("h100").unwrap(), gpu("H100-80GB").unwrap());
        assert_eq!(gpu("NVIDIA H100 80GB").unwrap().name, "H100-80GB");
        assert_eq!(gpu("H100-NVL").unwrap().memory_per_gpu, 94 * GIB);
        assert_eq!(gpu("h100-94gb").unwrap().name, "H100-94GB");
        assert_eq!(gpu("A100-40GB").unwrap().memory_per_gpu, 40 * GIB);
        assert_eq!(gpu("a100_80gb").unwrap().memory_per_gpu, 80 * GIB);
        assert_eq!(gpu("V100-32GB").unwrap().memory_per_gpu, 32 * GIB);
        assert_eq!(gpu("A10").unwrap().memory_per_gpu, 24 * GIB);
        assert_eq!(gpu("H200").unwrap().memory_per_gpu, 141 * GIB);
        assert!(gpu("A100").unwrap_err().contains("A100-80GB"));
        for (smi, name) in [
            ("NVIDIA H100 80GB HBM3", "H100-80GB"),
            ("NVIDIA H100 NVL", "H100-94GB"),
            ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
            ("NVIDIA A100 80GB PCIe", "A100-80GB"),
            ("Tesla V100-SXM2-16GB", "V100-16GB"),
            ("NVIDIA A10G", "A10"),
            ("NVIDIA H200", "H200"),
        ] {
            assert_eq!(gpu(smi).unwrap().name, name, "{smi}");
        }
        let err = gpu("K80").unwrap_err();
        assert!(
            err.contains("H100-80GB") && err.contains("V100-16GB"),
            "{err}"
        );
    }

    #[test]
    fn azure_sizes() {
        let err = azure_sku("Standard_NC6").unwrap_err();
        assert!(
            err.contains("K80") && err.contains("not supported"),
            "{err}"
        );
        for retired in ["nc12", "STANDARD_NC24", "Standard_NC24r"] {
            assert!(azure_sku(retired).unwrap_err().contains("K80"));
        }
        let t = azure_sku("nc24rs_v3").unwrap();
        assert_eq!(
            (t.name.as_str(), t.gpus_per_node, t.memory_per_gpu, t.bf16),
            ("Standard_NC24rs_v3", 4, 16 * GIB, false)
        );
        let t = azure_sku("standard_nd96isr_h100_v5").unwrap();
        assert_eq!(
            (t.gpus_per_node, t.memory_per_gpu, t.bf16),
            (8, 80 * GIB, true)
        );
        assert_eq!(azure_sku("ND96asr_v4").unwrap().memory_per_gpu, 40 * GIB);
        assert_eq!(
            azure_sku("NC40ads_H100_v5").unwrap().memory_per_gpu,
            94 * GIB
        );
        let err = azure_sku("Standard_D4s_v3").unwrap_err();
        assert!(
            err.contains("Standard_NC24ads_A100_v4") && err.contains("Standard_ND96isr_H100_v5"),
            "{err}"
        );
    }

    #[test]
    fn render_is_an_aligned_table() {
        let p = with_device_overhead(&estimate(&input(1, 4096, 2, true)));
        let text = render(&p);
        assert!(text.contains("activations (recompute on)"), "{text}");
        assert!(text.contains(&format!("{:.2} GiB", p.total as f64 / GIB as f64)));
        let ends: Vec<usize> = text
            .lines()
            .filter(|l| l.ends_with(" GiB") && !l.starts_with("activations with"))
            .map(|l| l.len())
            .collect();
        assert_eq!(ends.len(), 9);
        assert!(ends.iter().all(|&e| e == ends[0]), "{text}");
        println!("{text}");
        let off = render(&estimate(&input(1, 4096, 2, false)));
        assert!(off.contains("activations (recompute off)"));
        println!("{off}");
    }
}
