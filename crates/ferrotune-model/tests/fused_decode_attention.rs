//! Generation through the fused decode-attention op (`ferrotune_kernels::decode_attention`, the
//! path CUDA takes) on the CPU, where its reference implementation runs: the KV cache's strided
//! views, GQA without repeated heads, the padded batch's bias and the output layout, and each
//! decoding step's keys and values written into the cache's buffers by
//! `ferrotune_kernels::rope_qkv_into_cache`, end to end against transformers' greedy tokens. Its own test binary, so the switch it sets applies to
//! this process only.

mod common;

use candle_core::{DType, Device, Tensor};

#[test]
fn greedy_generation_through_the_fused_decode_attention_matches_transformers() {
    std::env::set_var("FERROTUNE_DECODE_ATTENTION", "fused");
    let q = Tensor::zeros((1, 2, 1, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(
        ferrotune_model::attention::decode_kernel_applies(&q, 1, 8),
        "the switch routes CPU decoding through the fused op"
    );
    for name in common::GREEDY_CASES {
        common::check_greedy_generation(name);
    }
}
