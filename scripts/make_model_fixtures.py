#!/usr/bin/env python3
"""Tiny random Phi-3 checkpoints and the numbers transformers + PEFT compute on them.

Run by hand (needs torch, transformers, peft; not part of CI):
    python scripts/make_model_fixtures.py [--out fixtures/models]

Each case folder holds a checkpoint in HF layout (config.json in the form the case tests, and
model.safetensors or shards + index), a PEFT adapter saved by PEFT (`adapter/`), and
`expected.safetensors` with the batch and what the reference computed on it, in float32:
  input_ids, position_ids, attention_mask (1 = real token), labels (-100 = ignored),
  logits_base  [b, t, V]   the checkpoint alone
  logits_lora  [b, t, V]   with the adapter
  loss_lora    []          mean token cross-entropy with the adapter (transformers' shift)
  grad.<module>.lora_A / lora_B   gradients of that loss, e.g. grad.model.layers.0.self_attn.qkv_proj.lora_A
`case.json` says what the case covers (and, for packed rows, the document lengths).
"""
import argparse
import json
import os
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import Phi3Config, Phi3ForCausalLM

VOCAB = 256
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def base_kwargs(**over):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
              original_max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
              sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, attn_implementation="eager")
    kw.update(over)
    return kw


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def hub_form_config(path, longrope=None):
    """Rewrite config.json as the hub has it (rope_theta / rope_scaling / torch_dtype)."""
    cfg = json.load(open(path))
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", 10000.0)
    cfg["rope_scaling"] = longrope
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    json.dump(cfg, open(path, "w"), indent=2)


def batch_for(case, seed):
    g = torch.Generator().manual_seed(seed + 1)
    b, t = case["batch"], case["seq"]
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    pos = torch.arange(t).unsqueeze(0).repeat(b, 1)
    docs = case.get("packed")
    if case.get("left_pad"):
        n = case["left_pad"]
        mask[1, :n] = 0
        ids[1, :n] = 0
        pos[1] = (mask[1].cumsum(0) - 1).clamp(min=0)
    if docs:
        pos = torch.cat([torch.arange(n) for n in docs]).unsqueeze(0)
    labels = ids.clone()
    labels[:, : t // 3] = -100  # a prompt that is not trained
    labels[mask == 0] = -100
    return ids, mask, pos, labels


def packed_mask(docs):
    """Additive 4D mask [1, 1, t, t]: causal within each document, nothing across."""
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(docs)])
    t = doc.numel()
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    bias = torch.zeros(t, t)
    bias[~allowed] = torch.finfo(torch.float32).min
    return bias[None, None]


def mask_kwargs(mask, packed):
    # transformers' eager attention does not split packed rows by position_ids alone, so packed
    # rows get an explicit 4D mask; the assertion in make_case checks it isolates documents.
    return {"attention_mask": packed_mask(packed) if packed else mask}


def forward(model, ids, mask, pos, packed):
    return model(input_ids=ids, position_ids=pos, **mask_kwargs(mask, packed))


def make_case(out, name, case, seed):
    torch.manual_seed(seed)
    cfg = Phi3Config(**case["config"])
    model = Phi3ForCausalLM(cfg).eval()
    randomize(model, seed)
    d = os.path.join(out, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True, max_shard_size=case.get("shard", "50MB"))
    if case.get("hub_form"):
        hub_form_config(os.path.join(d, "config.json"), case.get("hub_rope_scaling"))

    ids, mask, pos, labels = batch_for(case, seed)
    packed = case.get("packed")
    with torch.no_grad():
        logits_base = forward(model, ids, mask, pos, packed).logits
    if packed:
        # The reference must keep documents apart: the last document alone gives the same logits.
        n = packed[-1]
        alone = model(input_ids=ids[:, -n:]).logits
        assert torch.allclose(alone, logits_base[:, -n:], atol=1e-5), "transformers did not isolate packed documents"

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                      init_lora_weights=False, use_rslora=case.get("rslora", False))
    peft_model = get_peft_model(model, lora)
    out_lora = peft_model(input_ids=ids, position_ids=pos, labels=labels, **mask_kwargs(mask, packed))
    out_lora.loss.backward()
    expected = {
        "input_ids": ids.contiguous(),
        "position_ids": pos.contiguous(),
        "attention_mask": mask.contiguous(),
        "labels": labels.contiguous(),
        "logits_base": logits_base.contiguous(),
        "logits_lora": out_lora.logits.detach().contiguous(),
        "loss_lora": out_lora.loss.detach().reshape(()),
    }
    for pname, p in peft_model.named_parameters():
        if "lora_" in pname:
            # base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.default.weight
            module = pname.split("base_model.model.", 1)[1].split(".lora_")[0]
            which = "lora_A" if ".lora_A." in pname else "lora_B"
            expected[f"grad.{module}.{which}"] = p.grad.detach().contiguous()
    save_file(expected, os.path.join(d, "expected.safetensors"))
    peft_model.save_pretrained(os.path.join(d, "adapter"))
    cfg_path = os.path.join(d, "adapter", "adapter_config.json")
    adapter_cfg = json.load(open(cfg_path))
    adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])  # PEFT writes a set
    json.dump(adapter_cfg, open(cfg_path, "w"), indent=2, sort_keys=True)
    # The saved adapter loads back in PEFT and gives the same logits.
    fresh = Phi3ForCausalLM.from_pretrained(d).eval()
    reloaded = PeftModel.from_pretrained(fresh, os.path.join(d, "adapter")).eval()
    with torch.no_grad():
        again = forward(reloaded, ids, mask, pos, packed).logits
    real = mask.bool()  # padded query rows are fully masked: their logits mean nothing
    assert torch.allclose(again[real], expected["logits_lora"][real], atol=1e-5)
    if not packed and not case.get("left_pad"):
        json.dump(greedy_references(d, ids, reloaded), open(os.path.join(d, "generate.json"), "w"))
    json.dump({k: v for k, v in case.items() if k != "config"} | {"seed": seed},
              open(os.path.join(d, "case.json"), "w"), indent=2)
    print(f"{name}: loss {out_lora.loss.item():.6f}")


def greedy(model, prompts, new_tokens):
    """transformers' greedy `generate` for prompts of different lengths (left-padded), no EOS stop."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def greedy_references(d, ids, peft_model):
    """32 greedy tokens with and without the adapter, and a batch of two different lengths."""
    prompt = ids[0, :8].tolist()
    base = Phi3ForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        ref = {
            "prompt": prompt,
            "greedy_base": greedy(base, [prompt], 32)[0],
            "greedy_lora": greedy(peft_model, [prompt], 32)[0],
            "batch_prompts": [ids[0, :5].tolist(), ids[-1, :8].tolist()],
        }
        ref["batch_greedy_base"] = greedy(base, ref["batch_prompts"], 16)
    return ref


def make_chat_model(out, tokenizer_dir, sample_jsonl):
    """A tiny Phi-3 with the real Phi-3 vocabulary and tokenizer (bf16 weights, tied head), plus
    what transformers computes with it in f32: greedy tokens for a chat prompt and the eval loss
    over the bundled test_sft sample (assistant tokens only)."""
    from transformers import AutoTokenizer

    d = os.path.join(out, "tiny_phi3_chat")
    shutil.rmtree(d, ignore_errors=True)
    cfg = Phi3Config(**base_kwargs(vocab_size=32064, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=4096, original_max_position_embeddings=4096,
                                   sliding_window=2047, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=[32000, 32001, 32007], pad_token_id=32000))
    torch.manual_seed(7)
    model = Phi3ForCausalLM(cfg).eval()
    randomize(model, 7)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = [32000, 32001, 32007]
    model.save_pretrained(d, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(d)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(d, f))
    model = Phi3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out_ids = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=32000)[0, len(prompt):].tolist()

    annotated = tok.chat_template.replace(
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
        "{{'<|assistant|>\n'}}{% generation %}{{message['content'] + '<|end|>\n'}}{% endgeneration %}")
    total, count = 0.0, 0
    with open(sample_jsonl) as f, torch.no_grad():
        for line in f:
            conv = tok.apply_chat_template(json.loads(line)["messages"], chat_template=annotated, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True)
            ids = torch.tensor([conv["input_ids"]])
            labels = torch.tensor([[t if m else -100 for t, m in zip(conv["input_ids"], conv["assistant_masks"])]])
            logits = model(input_ids=ids).logits.float()
            lp = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
            total += lp.item()
            count += int((labels[0, 1:] != -100).sum())
    json.dump({"messages": messages, "prompt_ids": prompt, "greedy_24": out_ids,
               "eval_test_sft": {"loss": total / count, "tokens": count}},
              open(os.path.join(d, "expected.json"), "w"), indent=1)
    print(f"tiny_phi3_chat: eval loss {total / count:.6f} over {count} tokens")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures/models")
    args = ap.parse_args()
    head_dim = 16
    longrope = {"rope_type": "longrope",
                "short_factor": [1.0 + 0.05 * i for i in range(head_dim // 2)],
                "long_factor": [1.5 + 0.5 * i for i in range(head_dim // 2)],
                "rope_theta": 10000.0, "original_max_position_embeddings": 32}
    cases = {
        "hub_mha": dict(config=base_kwargs(), hub_form=True, batch=2, seq=12),
        "gqa_sharded": dict(config=base_kwargs(num_key_value_heads=2), batch=2, seq=12, shard="60KB"),
        "longrope": dict(config=base_kwargs(max_position_embeddings=128, rope_parameters=longrope,
                                            original_max_position_embeddings=32), batch=1, seq=40),
        "sliding_window": dict(config=base_kwargs(sliding_window=4), batch=1, seq=12),
        "padded": dict(config=base_kwargs(), batch=2, seq=12, left_pad=3),
        "packed": dict(config=base_kwargs(), batch=1, seq=12, packed=[5, 7]),
        "rslora_tied": dict(config=base_kwargs(tie_word_embeddings=True), batch=1, seq=10, rslora=True),
    }
    os.makedirs(args.out, exist_ok=True)
    for i, (name, case) in enumerate(cases.items()):
        make_case(args.out, name, case, seed=1000 + i)
    make_chat_model(args.out, "fixtures/tokenizer/phi3", "fixtures/ultrachat_sample/jsonl/test_sft.jsonl")


if __name__ == "__main__":
    main()
