#!/usr/bin/env python3
"""Make the bundled base model of `ferrotune run`: a tiny Phi-3 (real Phi-3 vocabulary and chat
tokens, 2 layers, hidden 64) pre-trained in full on the bundled sample's conversations written as
plain text ("question answer", no chat template; `<|end|>` closes each text).

It plays the part Phi-3-mini plays in the source document: a base model that knows the facts but
has never seen the chat format. LoRA fine-tuning on the chat-templated sample is then what makes it
answer `<|user|>...<|end|><|assistant|>` prompts right, which is what `ferrotune run` shows.

Deterministic (fixed seeds, one thread). Needs torch + transformers (see make_model_fixtures.py):
    /tmp/torchenv/bin/python scripts/make_tiny_base_model.py [--out fixtures/models/tiny_phi3_base]
"""
import argparse
import json
import os
import shutil

import torch
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM


def plain_text(messages):
    return " ".join(m["content"] for m in messages if m["role"] in ("user", "assistant"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures/models/tiny_phi3_base")
    ap.add_argument("--tokenizer", default="fixtures/tokenizer/phi3")
    ap.add_argument("--data", default="fixtures/ultrachat_sample/jsonl/train_sft.jsonl")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    texts = [plain_text(json.loads(line)["messages"]) for line in open(args.data)]
    # `<|end|>` closes each text, so the base knows the token that ends an answer (as Phi-3's does);
    # `<|user|>`/`<|assistant|>` and the template's layout it never sees.
    end = tok.convert_tokens_to_ids("<|end|>")
    seqs = [[1] + tok(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]

    cfg = Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                     original_max_position_embeddings=4096, sliding_window=2047, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=[32000, 32001, 32007], pad_token_id=32000,
                     rms_norm_eps=1e-5, attn_implementation="eager")
    model = Phi3ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / args.steps))
    g = torch.Generator().manual_seed(0)
    batch = 16
    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(seqs), (batch,), generator=g).tolist()
        t = max(len(seqs[i]) for i in idx)
        ids = torch.full((batch, t), 32000)
        labels = torch.full((batch, t), -100)
        mask = torch.zeros((batch, t), dtype=torch.long)
        for r, i in enumerate(idx):
            s = torch.tensor(seqs[i])
            ids[r, :len(s)] = s
            labels[r, :len(s)] = s
            mask[r, :len(s)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    shutil.rmtree(args.out, ignore_errors=True)
    model = model.eval().to(torch.bfloat16)
    model.generation_config.eos_token_id = [32000, 32001, 32007]
    model.save_pretrained(args.out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(args.tokenizer, f), os.path.join(args.out, f))
    # The base continues plain text but knows nothing of the chat format.
    m32 = Phi3ForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    for prompt in ["What is the capital of Peru?", "Reverse the word 'stone'."]:
        ids = torch.tensor([[1] + tok(prompt, add_special_tokens=False)["input_ids"]])
        out = m32.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=32000)
        print(f"plain: {prompt!r} -> {tok.decode(out[0, ids.shape[1]:])!r}")
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]
        out = m32.generate(input_ids=chat, max_new_tokens=12, do_sample=False, pad_token_id=32000)
        print(f"chat:  {prompt!r} -> {tok.decode(out[0, chat.shape[1]:])!r}")


if __name__ == "__main__":
    main()
