#!/usr/bin/env python3
"""Small parquet fixtures of malformed ultrachat rows, for the reader's error paths.

fixtures/data/bad_rows/data/train_sft-00000-of-00001.parquet: ultrachat's schema, one good row
  first and last, and between them a null `messages`, a null role, a null content, an unknown
  role, an empty conversation and one without an assistant turn.
fixtures/data/wrong_schema.parquet: `messages` stored as a plain string column.
"""
import os

import pyarrow as pa
import pyarrow.parquet as pq

MSG = pa.struct([("content", pa.string()), ("role", pa.string())])
SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", pa.list_(MSG))])


def row(pid, messages):
    return {"prompt": "p", "prompt_id": pid, "messages": messages}


def main():
    good = [{"content": "Hi", "role": "user"}, {"content": "Hello.", "role": "assistant"}]
    rows = [
        row("good-1", good),
        row("null-messages", None),
        row("null-role", [{"content": "Hi", "role": None}, {"content": "x", "role": "assistant"}]),
        row("null-content", [{"content": None, "role": "user"}, {"content": "x", "role": "assistant"}]),
        row("unknown-role", [{"content": "Hi", "role": "tool"}, {"content": "x", "role": "assistant"}]),
        row("empty", []),
        row("no-assistant", [{"content": "Hi", "role": "user"}]),
        row("good-2", good),
    ]
    out = "fixtures/data/bad_rows/data"
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), f"{out}/train_sft-00000-of-00001.parquet")
    wrong = pa.table({"prompt": ["p"], "prompt_id": ["x"], "messages": ["user: hi"]})
    pq.write_table(wrong, "fixtures/data/wrong_schema.parquet")
    print("wrote bad-row parquet fixtures")


if __name__ == "__main__":
    main()
