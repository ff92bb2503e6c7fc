#!/usr/bin/env python3
"""The reference for `ferrotune export`: what MLflow's own `mlflow.transformers.save_model` writes
for a Phi-3 chat model (task llm/v1/chat), so ferrotune's MLflow folder can be kept structurally
identical to it. Saves the bundled tiny chat model (fixtures/models/tiny_phi3_chat) as MLflow
does, then commits the small text files as they are (MLmodel, conda.yaml, python_env.yaml,
requirements.txt, LICENSE.txt, the model's and tokenizer's json/jinja files) and a listing of every file with its size and, for safetensors, the tensor
names, dtypes and shapes (`listing.json`) -- not the weights.

    pip install mlflow==3.17.2 transformers torch torchvision   # versions used: listing.json
    (MLflow's default requirements for a transformers model import torchvision.)
    python scripts/make_mlflow_reference.py [--out fixtures/export/mlflow_transformers_reference]
"""
import argparse
import json
import os
import shutil
import struct
import tempfile

import mlflow
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_FILES = ["MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "LICENSE.txt"]


def safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in sorted(header.items())}


def main():
    ap = argparse.ArgumentParser()
    # Relative to the repository, so MLmodel's source_model_name names no machine's folder.
    ap.add_argument("--model", default="fixtures/models/tiny_phi3_chat")
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures/export/mlflow_transformers_reference"))
    a = ap.parse_args()
    a.out = os.path.abspath(a.out)
    os.chdir(ROOT)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "mlflow_model")
        mlflow.transformers.save_model(transformers_model=pipe, path=saved, task="llm/v1/chat")
        listing = {"mlflow": mlflow.__version__, "transformers": transformers.__version__,
                   "torch": torch.__version__, "files": {}}
        for dirpath, _, files in os.walk(saved):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, saved)
                entry = {"bytes": os.path.getsize(path)}
                if name.endswith(".safetensors"):
                    entry["tensors"] = safetensors_header(path)
                listing["files"][rel] = entry
        shutil.rmtree(a.out, ignore_errors=True)
        os.makedirs(a.out)
        for name in TEXT_FILES:
            if os.path.exists(os.path.join(saved, name)):
                shutil.copy(os.path.join(saved, name), os.path.join(a.out, name))
        for rel in listing["files"]:
            if rel.endswith((".json", ".jinja")) and not rel.endswith("tokenizer.json"):
                dest = os.path.join(a.out, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy(os.path.join(saved, rel), dest)
        with open(os.path.join(a.out, "listing.json"), "w") as f:
            json.dump(listing, f, indent=1, sort_keys=True)
            f.write("\n")
    print(f"wrote {a.out}: {len(listing['files'])} files listed")


if __name__ == "__main__":
    main()
