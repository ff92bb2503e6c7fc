//! The PTX that build.rs compiled from `cuda/*.cu`.

pub const ATTENTION_SOFTMAX: &str =
    include_str!(concat!(env!("OUT_DIR"), "/attention_softmax.ptx"));
