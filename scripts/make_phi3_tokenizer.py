#!/usr/bin/env python3
"""Build the Phi-3 tokenizer fixture (tokenizer.json + tokenizer_config.json) without hub access.

Phi-3's vocabulary is Llama's 32,000-token SentencePiece BPE vocabulary plus eleven added tokens
(<|endoftext|> 32000 ... <|user|> 32010). The npm package `llama-tokenizer-js` ships that
vocabulary with its merges (base64 inside llama-tokenizer.js), so we rebuild the Hugging Face
`tokenizer.json` from it, add Phi-3's tokens and chat template, and check the result against the
package's own test strings (the ids its test-suite asserts) through node.

`tokenizer_class` is `PreTrainedTokenizerFast` on purpose: transformers 5 rebuilds a
`LlamaTokenizer` with Metaspace(prepend_scheme=first) and ignores tokenizer.json's normalizer,
so after `<|assistant|>` it would emit `K` where the `tokenizers` library (and ferrotune) emit `▁K`.
With the fast class both sides run exactly this tokenizer.json.

Usage: python scripts/make_phi3_tokenizer.py [--npm-dir DIR] [--out fixtures/tokenizer/phi3]
"""
import argparse
import base64
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

PACKAGE = "llama-tokenizer-js@1.2.2"

# The chat template of microsoft/Phi-3-mini-4k-instruct (tokenizer_config.json, 2024-07 revision).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# (id, content, rstrip, special) as in Phi-3-mini-4k-instruct's tokenizer.json.
PHI3_ADDED = [
    (0, "<unk>", False, True),
    (1, "<s>", False, True),
    (2, "</s>", True, False),
    (32000, "<|endoftext|>", False, True),
    (32001, "<|assistant|>", True, True),
    (32002, "<|placeholder1|>", True, True),
    (32003, "<|placeholder2|>", True, True),
    (32004, "<|placeholder3|>", True, True),
    (32005, "<|placeholder4|>", True, True),
    (32006, "<|system|>", True, True),
    (32007, "<|end|>", True, True),
    (32008, "<|placeholder5|>", True, True),
    (32009, "<|placeholder6|>", True, True),
    (32010, "<|user|>", True, True),
]


def fetch_package(npm_dir):
    if npm_dir:
        return npm_dir
    tmp = tempfile.mkdtemp(prefix="llama-tokenizer-js-")
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
    tgz = [f for f in os.listdir(tmp) if f.endswith(".tgz")][0]
    subprocess.run(["tar", "xzf", tgz], cwd=tmp, check=True)
    return os.path.join(tmp, "package")


def read_vocab_and_merges(pkg):
    src = open(os.path.join(pkg, "llama-tokenizer.js"), encoding="utf-8").read()
    vocab_b64 = re.search(r'const llama_vocab_base64 = "([^"]+)"', src).group(1)
    merges_b64 = re.search(r'const llama_merges_binary = "([^"]+)"', src).group(1)
    vocab = base64.b64decode(vocab_b64).decode("utf-8").split("\n")
    raw = base64.b64decode(merges_b64)
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [f"{vocab[ids[i]]} {vocab[ids[i + 1]]}" for i in range(0, len(ids), 2)]
    if len(vocab) != 32000:
        sys.exit(f"expected 32000 tokens in {PACKAGE}, found {len(vocab)}")
    return vocab, merges


def tokenizer_json(vocab, merges):
    vocab_map = {tok: i for i, tok in enumerate(vocab)}
    for tid, content, _, _ in PHI3_ADDED:
        if tid >= 32000:
            vocab_map[content] = tid
    added = [
        {
            "id": tid,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": rstrip,
            "normalized": False,
            "special": special,
        }
        for tid, content, rstrip, special in PHI3_ADDED
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab_map,
            "merges": merges,
        },
    }


def tokenizer_config():
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(tid): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": rstrip,
                "single_word": False,
                "special": special,
            }
            for tid, content, rstrip, special in PHI3_ADDED
        },
        "bos_token": "<s>",
        "chat_template": PHI3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def package_test_cases(pkg):
    """Every (input, ids) pair the package's own test-suite asserts, as the package encodes them."""
    probe = (
        "import t from './llama-tokenizer.js';\n"
        "const cases = [];\n"
        "const rec = { encode: (s, a, b, c) => { const ids = t.encode(s, a, b, c); cases.push([s, ids]); return ids; },\n"
        "              decode: (...a) => t.decode(...a) };\n"
        "t.defaultTests(rec);\n"
        "process.stdout.write(JSON.stringify(cases));\n"
    )
    path = os.path.join(pkg, "probe.mjs")
    open(path, "w").write(probe)
    out = subprocess.run(["node", "probe.mjs"], cwd=pkg, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("[[") :])


def verify(out_dir, cases):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    for text, ids in cases:
        got = tok.encode(text, add_special_tokens=False).ids
        # The package prepends BOS (id 1); Phi-3 adds no BOS.
        if got != ids[1:]:
            sys.exit(f"mismatch on {text[:40]!r}: {got[:12]} vs {ids[1:13]}")
        back = tok.decode(got)
        if back != text:
            sys.exit(f"decode mismatch on {text[:40]!r}: {back[:40]!r}")
    print(f"{len(cases)} package test strings encode and decode identically")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--npm-dir", help="unpacked llama-tokenizer-js package (default: npm pack it)")
    ap.add_argument("--out", default="fixtures/tokenizer/phi3")
    args = ap.parse_args()

    pkg = fetch_package(args.npm_dir)
    vocab, merges = read_vocab_and_merges(pkg)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(vocab, merges), f, ensure_ascii=False, indent=1)
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
    specials = {
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
    }
    with open(os.path.join(args.out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2)
    print(f"wrote {args.out}: {len(vocab)} base tokens, {len(merges)} merges")
    verify(args.out, package_test_cases(pkg))


if __name__ == "__main__":
    main()
