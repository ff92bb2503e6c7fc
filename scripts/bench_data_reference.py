#!/usr/bin/env python3
"""Reference side of `ferrotune bench data`: transformers' apply_chat_template + assistant mask.

Processes the first --rows conversations of a jsonl file the way the Python stack prepares chat
data (render with the tokenizer's chat template, tokenize, mark assistant tokens via
`return_assistant_tokens_mask` on a `{% generation %}`-annotated copy of the Phi-3 template) and
prints one JSON line: rows, tokens, trainable tokens, processing seconds and import seconds.
ferrotune compares the token counts with its own output for the same rows.
"""
import argparse
import json
import sys
import time

t0 = time.perf_counter()
from transformers import AutoTokenizer  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - t0

ASSISTANT_OLD = "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
ASSISTANT_NEW = "{{'<|assistant|>\n'}}{% generation %}{{message['content'] + '<|end|>\n'}}{% endgeneration %}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--rows", type=int, required=True)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if ASSISTANT_OLD not in tok.chat_template:
        sys.exit("bench_data_reference: the tokenizer's chat template is not Phi-3's")
    template = tok.chat_template.replace(ASSISTANT_OLD, ASSISTANT_NEW)
    rows = tokens = trainable = 0
    start = time.perf_counter()
    with open(args.input, encoding="utf-8") as f:
        for line in f:
            if rows >= args.rows:
                break
            messages = json.loads(line)["messages"]
            out = tok.apply_chat_template(messages, chat_template=template, tokenize=True,
                                          return_dict=True, return_assistant_tokens_mask=True)
            rows += 1
            tokens += len(out["input_ids"])
            trainable += sum(out["assistant_masks"])
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": rows, "tokens": tokens, "trainable_tokens": trainable,
                      "seconds": seconds, "import_seconds": IMPORT_SECONDS}))


if __name__ == "__main__":
    main()
