#!/usr/bin/env python3
"""Reference side of `ferrotune bench decode`: transformers' Phi-3 `generate` (greedy, KV cache,
no stop token so every row decodes all new tokens) on random weights of the given shape, or on a
model folder. For each batch size: the prefill time (a 1-token generate) and the decoding
tokens/s of the rest. Prints one JSON line."""
import argparse
import json
import time

import torch
from transformers import Phi3Config, Phi3ForCausalLM


def main():
    ap = argparse.ArgumentParser()
    for k, d in [("vocab", 32064), ("hidden", 256), ("intermediate", 768), ("layers", 4), ("heads", 8),
                 ("kv_heads", 8), ("prompt", 128), ("new_tokens", 64), ("threads", 2)]:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=d)
    ap.add_argument("--model-dir")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    a = ap.parse_args()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model_dir:
        model = Phi3ForCausalLM.from_pretrained(a.model_dir, torch_dtype=dtype)
    else:
        cfg = Phi3Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         num_key_value_heads=a.kv_heads, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = Phi3ForCausalLM(cfg).to(dtype)
    model = model.to(a.device).eval()
    vocab = model.config.vocab_size
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    def timed(ids, new):
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        sync()
        return time.perf_counter() - start

    results = []
    for b in [int(x) for x in a.batches.split(",")]:
        ids = (torch.arange(b * a.prompt).reshape(b, a.prompt) * 7919 + 13) % vocab
        ids = ids.to(a.device)
        timed(ids, 2)  # warm-up
        prefill = timed(ids, 1)
        full = timed(ids, a.new_tokens)
        decode_s = max(full - prefill, 1e-9)
        results.append({"batch": b, "prefill_s": prefill, "total_s": full,
                        "decode_tokens_per_s": b * (a.new_tokens - 1) / decode_s})
    print(json.dumps({"torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
