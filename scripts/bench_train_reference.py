#!/usr/bin/env python3
"""Reference side of `ferrotune bench train`: transformers' Phi-3 + PEFT LoRA, PyTorch eager,
forward + backward on random weights of the given shape. Prints one JSON line: tokens/s, seconds
per step and peak RSS (VmHWM) of this process."""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Phi3Config, Phi3ForCausalLM


def peak_rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    for k, d in [("vocab", 32064), ("hidden", 256), ("intermediate", 768), ("layers", 4), ("heads", 8),
                 ("kv_heads", 8), ("seq", 512), ("batch", 1), ("r", 16), ("steps", 5), ("warmup", 2),
                 ("threads", 2)]:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=d)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                     num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                     max_position_embeddings=max(4096, a.seq), sliding_window=None, attn_implementation="eager",
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Phi3ForCausalLM(cfg)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0,
                                             target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    model.train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    times = []
    for step in range(a.warmup + a.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
    per_step = sum(times) / len(times)
    print(json.dumps({"tokens_per_second": a.batch * a.seq / per_step, "seconds_per_step": per_step,
                      "peak_rss_bytes": peak_rss_bytes(), "torch": torch.__version__, "threads": a.threads}))


if __name__ == "__main__":
    main()
