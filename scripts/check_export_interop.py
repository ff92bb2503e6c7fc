#!/usr/bin/env python3
"""Interop proof for `ferrotune export`: the exported MLflow folder loads, as it is, in MLflow's
and transformers' own loaders, and they answer as `ferrotune generate` does on the same folder.

For each question: greedy answers (max 16 new tokens) from
  1. `mlflow.pyfunc.load_model(folder).predict({"messages": [...], "max_tokens": 16,
     "temperature": 1e-6})` (greedy in effect: see below),
     (MLflow loads the weights in MLmodel's torch_dtype; compared with
     `ferrotune generate --dtype <that dtype>` as text),
  2. `transformers.AutoModelForCausalLM.from_pretrained(folder/model)` with the tokenizer in
     folder/components/tokenizer (float32, `generate(do_sample=False)`; compared with
     `ferrotune generate --dtype f32` token by token),
and the run fails on any difference. Needs torch, transformers and mlflow (the versions in
fixtures/export/mlflow_transformers_reference/listing.json); run by hand, it is not in CI:

    cargo build --release -p ferrotune-cli
    target/release/ferrotune run --workdir /tmp/ft            # trains the tiny model
    target/release/ferrotune export --checkpoint /tmp/ft/train --out /tmp/ft-export
    python scripts/check_export_interop.py --ferrotune target/release/ferrotune --export /tmp/ft-export
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import mlflow
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTIONS = [
    "What is the capital of Peru?",
    "Which city is the capital of Japan?",
    "Reverse the word 'river'.",
    "What is 12 + 30?",
]
NEW_TOKENS = 16


def ferrotune_answer(binary, folder, question, dtype):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([{"role": "user", "content": question}], f)
        path = f.name
    try:
        out = subprocess.run(
            [binary, "--json", "--quiet", "generate", "--model", folder, "--messages", path,
             "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--dtype", dtype],
            check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferrotune", required=True)
    ap.add_argument("--export", required=True, help="a folder written by `ferrotune export`")
    a = ap.parse_args()
    folder = os.path.abspath(a.export)
    mlmodel = yaml.safe_load(open(os.path.join(folder, "MLmodel")))
    torch_dtype = mlmodel["flavors"]["transformers"]["torch_dtype"]
    short = {"torch.bfloat16": "bf16", "torch.float16": "f16", "torch.float32": "f32"}[torch_dtype]

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "components/tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "model"), dtype=torch.float32)
    pyfunc = mlflow.pyfunc.load_model(folder)
    failures = 0
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        hf_tokens = out[0, ids["input_ids"].shape[1]:].tolist()
        ft32 = ferrotune_answer(a.ferrotune, folder, q, "f32")
        ok_tokens = hf_tokens == ft32["token_ids"]

        # transformers' text-generation pipeline samples by default (do_sample=True, temperature
        # 0.7) and MLflow's llm/v1/chat signature has no do_sample; a vanishing temperature makes
        # every draw the argmax, i.e. greedy decoding through the signature's own inputs.
        pred = pyfunc.predict({"messages": messages, "max_tokens": NEW_TOKENS, "temperature": 1e-6})
        mlflow_text = pred[0]["choices"][0]["message"]["content"] if isinstance(pred, list) else \
            pred["choices"][0]["message"]["content"]
        ft_native = ferrotune_answer(a.ferrotune, folder, q, short)
        ok_text = mlflow_text.strip() == ft_native["text"].strip()
        failures += (not ok_tokens) + (not ok_text)
        print(json.dumps({
            "question": q,
            "transformers_f32_tokens": hf_tokens,
            "ferrotune_f32_tokens": ft32["token_ids"],
            "tokens_equal": ok_tokens,
            f"mlflow_pyfunc_{short}": mlflow_text,
            f"ferrotune_{short}": ft_native["text"],
            "text_equal": ok_text,
        }))
    if failures:
        sys.exit(f"{failures} mismatches")
    print(f"ok: MLflow pyfunc ({short}) and transformers (f32) answer as ferrotune does on "
          f"{len(QUESTIONS)} questions")


if __name__ == "__main__":
    main()
