//! ferrotune-model: Phi-3 with LoRA on candle. Config in both hub and transformers-5 forms,
//! HF-layout weights, a differentiable forward whose frozen weights never get gradients, PEFT's
//! LoRA, and the causal-LM loss.

pub mod attention;
pub mod backward_seed;
pub mod config;
mod cpu_rows;
mod decoder_backward;
mod device_head_loss;
pub mod device_memory;
pub mod error;
pub mod frozen_linear;
pub mod generate;
mod handover;
mod head_loss;
mod layer_ops;
pub mod loaded;
pub mod lora;
pub mod lora_linear;
pub mod loss;
pub mod mask;
pub mod peft;
pub mod phi3;
pub mod random_weights;
pub mod rms_norm;
pub mod rng;
pub mod rope;
pub mod softmax;
pub mod swiglu;
pub mod weights;

pub use config::{Phi3Config, RopeScaling};
pub use error::{ModelError, Result};
/// Whether the fused CUDA kernels are in use (`FERROTUNE_KERNELS=0` turns them off).
pub use ferrotune_kernels::enabled as kernels_enabled;
pub use layer_ops::hand_written_backward;
pub use lora::{LoraConfig, LoraPair};
pub use phi3::{Batch, Phi3};
