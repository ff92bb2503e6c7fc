//! ferrotune-kernels: fused CUDA kernels for the training step, each a candle custom op with a
//! forward and a backward, a CPU reference implementation (the same arithmetic in Rust) and
//! parity tests against it that run on a GPU.
//!
//! Without the `cuda` feature only the CPU references are built.

pub mod attention_softmax;
pub mod cross_entropy;
pub mod decode_attention;
pub mod dropout;
pub mod flash_attention;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
mod ptx;
pub mod rms_norm;
pub mod rope;
pub mod rope_qkv;
mod rows;
pub mod swiglu;

pub use attention_softmax::{attention_softmax, attention_softmax_grad};
pub use cross_entropy::{cross_entropy_grad, cross_entropy_nll, NO_TARGET};
pub use decode_attention::decode_attention;
pub use dropout::dropout_mask;
pub use flash_attention::{flash_attention, flash_attention_grad};
pub use rms_norm::{add_rms_norm, rms_norm, rms_norm_grad, rms_norm_grad_add};
pub use rope::{rope, rope_adjoint};
pub use rope_qkv::{rope_qkv, rope_qkv_adjoint, rope_qkv_into_cache};
pub use swiglu::{swiglu, swiglu_grad};

/// Whether the fused kernels are used where they apply: yes unless `FERROTUNE_KERNELS=0`, which
/// falls back to candle's composed ops (for A/B runs and to rule a kernel out when debugging).
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("FERROTUNE_KERNELS").map_or(true, |v| v != "0"))
}
