//! The PTX that build.rs compiled from `cuda/*.cu`, one module per file.

pub const ATTENTION_SOFTMAX: &str =
    include_str!(concat!(env!("OUT_DIR"), "/attention_softmax.ptx"));
pub const CROSS_ENTROPY: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));
pub const DECODE_ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx"));
pub const FLASH_ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
pub const DROPOUT: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));
pub const RMS_NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
pub const ROPE: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
pub const ROPE_QKV: &str = include_str!(concat!(env!("OUT_DIR"), "/rope_qkv.ptx"));
pub const SWIGLU: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
