#!/usr/bin/env python3
"""Generate the bundled ultrachat-shaped sample (both layouts the field uses).

Real ultrachat text cannot be fetched here, so the conversations are made to be learnable by a
tiny model: arithmetic, capital-city lookups, string rules (reverse, upper-case, letter count),
and short multi-turn follow-ups, some with a system prompt. Deterministic (fixed seed).

Writes, under --out (default fixtures/ultrachat_sample):
  hf/data/{split}-00000-of-00001.parquet   HuggingFaceH4/ultrachat_200k's layout and schema
  jsonl/{split}.jsonl                      what the source document's download script writes
"""
import argparse
import hashlib
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Hungary": "Budapest", "Romania": "Bucharest", "Turkey": "Ankara",
}
WORDS = ["stone", "river", "candle", "ferro", "tune", "planet", "orange", "window", "garden", "silver",
         "rocket", "pencil", "banana", "coffee", "matrix", "kernel", "tensor", "gradient", "lambda", "vector"]
SYSTEMS = ["You are a concise assistant.", "Answer briefly and exactly.", "You are a helpful math tutor."]


def arithmetic(rng):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    val = {"+": a + b, "-": a - b, "*": a * b}[op]
    q = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"Calculate {a} {op} {b}, please."])
    turns = [("user", q), ("assistant", f"{a} {op} {b} = {val}.")]
    if rng.random() < 0.35:
        k = rng.randint(2, 5)
        turns += [("user", f"And multiplied by {k}?"), ("assistant", f"{val} * {k} = {val * k}.")]
    return turns


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    q = rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}.",
                    f"Which city is the capital of {country}?"])
    turns = [("user", q), ("assistant", f"The capital of {country} is {CAPITALS[country]}.")]
    if rng.random() < 0.3:
        other = rng.choice(sorted(CAPITALS))
        turns += [("user", f"And of {other}?"), ("assistant", f"The capital of {other} is {CAPITALS[other]}.")]
    return turns


def string_rule(rng):
    w = rng.choice(WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        return [("user", f"Reverse the word '{w}'."), ("assistant", f"'{w}' reversed is '{w[::-1]}'.")]
    if kind == 1:
        phrase = " ".join(rng.sample(WORDS, 2))
        return [("user", f"Write '{phrase}' in upper case."), ("assistant", phrase.upper())]
    return [("user", f"How many letters are in '{w}'?"), ("assistant", f"'{w}' has {len(w)} letters.")]


def conversation(rng):
    turns = rng.choice([arithmetic, capital, string_rule])(rng)
    if rng.random() < 0.2:
        turns = [("system", rng.choice(SYSTEMS))] + turns
    messages = [{"content": c, "role": r} for r, c in turns]
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages}


SCHEMA = pa.schema([
    ("prompt", pa.string()),
    ("prompt_id", pa.string()),
    ("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures/ultrachat_sample")
    ap.add_argument("--seed", type=int, default=20241125)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    splits = {"train_sft": 480, "test_sft": 60}
    os.makedirs(os.path.join(args.out, "hf", "data"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "jsonl"), exist_ok=True)
    for split, n in splits.items():
        rows = [conversation(rng) for _ in range(n)]
        with open(os.path.join(args.out, "jsonl", f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        # Small row groups so the streaming reader crosses group boundaries in tests.
        pq.write_table(table, os.path.join(args.out, "hf", "data", f"{split}-00000-of-00001.parquet"),
                       row_group_size=100, compression="snappy")
        print(f"{split}: {n} rows")


if __name__ == "__main__":
    main()
