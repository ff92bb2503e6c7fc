#!/usr/bin/env python3
"""Reference side of `ferrotune bench train`: transformers' Phi-3 + PEFT LoRA, forward + backward
on random weights of the given shape, on CPU (eager attention) or CUDA (transformers' default SDPA
attention, what the Python stack runs). Prints one JSON line: tokens/s, seconds per step, peak RSS
(VmHWM) and, on CUDA, the peak device memory in use (total - free, sampled every 2 ms as ferrotune
samples its own)."""
import argparse
import json
import threading
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import Phi3Config, Phi3ForCausalLM


def peak_rss_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class DevicePeak:
    """Samples the device's used memory (total - free) in a thread, like nvidia-smi would show it."""

    def __init__(self):
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while True:
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            if self.stop.wait(0.002):
                break

    def finish(self):
        self.stop.set()
        self.thread.join()
        return self.peak


def main():
    ap = argparse.ArgumentParser()
    for k, d in [("vocab", 32064), ("hidden", 256), ("intermediate", 768), ("layers", 4), ("heads", 8),
                 ("kv_heads", 8), ("seq", 512), ("batch", 1), ("r", 16), ("steps", 5), ("warmup", 2),
                 ("threads", 2)]:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=d)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--recompute", action="store_true")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                     num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                     max_position_embeddings=max(4096, a.seq), sliding_window=None,
                     attn_implementation="sdpa" if cuda else "eager",
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(a.device):
        model = Phi3ForCausalLM(cfg).to(dtype)
    if a.recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=a.lora_dropout,
                                             target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    model.train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device)
    if cuda:
        torch.cuda.synchronize()
        sampler = DevicePeak()
    times = []
    for step in range(a.warmup + a.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
    peak_device = sampler.finish() if cuda else None
    per_step = sum(times) / len(times)
    print(json.dumps({"tokens_per_second": a.batch * a.seq / per_step, "seconds_per_step": per_step,
                      "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device,
                      "torch_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                      "attention": cfg._attn_implementation, "torch": torch.__version__, "threads": a.threads}))


if __name__ == "__main__":
    main()
