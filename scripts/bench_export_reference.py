#!/usr/bin/env python3
"""The Python stack's export, for comparing with `ferrotune export` (time and peak memory): load
the base model, attach the PEFT adapter, `merge_and_unload()`, and save an MLflow model folder
with `mlflow.transformers.save_model(..., task="llm/v1/chat")`, as the source document's pipeline
does before registering. Run it under `/usr/bin/time -v` next to `ferrotune export` on the same
adapter:

    /usr/bin/time -v python scripts/bench_export_reference.py --adapter ADAPTER_DIR --out OUT
    /usr/bin/time -v ferrotune export --checkpoint ADAPTER_DIR --out OUT2
"""
import argparse
import time

import mlflow
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base", help="default: the adapter's base_model_name_or_path")
    a = ap.parse_args()
    import json, os
    base = a.base or json.load(open(os.path.join(a.adapter, "adapter_config.json")))["base_model_name_or_path"]
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, a.adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(base)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    mlflow.transformers.save_model(transformers_model=pipe, path=a.out, task="llm/v1/chat")
    print(f"reference export: {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
