#!/usr/bin/env python3
"""Expected input_ids / labels for the data pipeline, produced by the reference stack.

For each conversation: transformers' `apply_chat_template` with the fixture tokenizer renders the
text and tokenizes it; the trained span comes from transformers' own `return_assistant_tokens_mask`
with a copy of the Phi-3 template whose assistant `content + '<|end|>\n'` is wrapped in
`{% generation %}` (the mechanism transformers provides for this). The script checks that the
annotated copy renders exactly the same text as the model's template. Labels follow the Hugging
Face convention: the token id where trained, -100 elsewhere (no shift; the model shifts).

The cases are chosen to break label masks: multi-turn, system prompts, unicode, whitespace-only
and empty turns, literal special-token text inside content, leading/trailing spaces, code.
Plus the first rows of the bundled sample.

Usage: python scripts/make_data_reference.py [--tokenizer fixtures/tokenizer/phi3]
                                             [--out fixtures/data/phi3_chat_reference.jsonl]
"""
import argparse
import json

from transformers import AutoTokenizer

ASSISTANT_OLD = "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
ASSISTANT_NEW = "{{'<|assistant|>\n'}}{% generation %}{{message['content'] + '<|end|>\n'}}{% endgeneration %}"


def u(c):
    return {"role": "user", "content": c}


def a(c):
    return {"role": "assistant", "content": c}


def s(c):
    return {"role": "system", "content": c}


CASES = {
    "single_turn": [u("Hi there"), a("Kate is here.")],
    "multi_turn": [u("What is 2 + 2?"), a("2 + 2 = 4."), u("And times 3?"), a("4 * 3 = 12."), u("Thanks!"), a("You're welcome.")],
    "system_prompt": [s("You are a concise assistant."), u("Capital of Serbia?"), a("Belgrade.")],
    "unicode_serbian": [u("Kako se kaže „hvala“ na ćirilici?"), a("Ћирилицом: „хвала“. Đurđevdan, čaša, šećer.")],
    "unicode_cjk_emoji": [u("用中文说你好 🦙"), a("你好！🦙🦙 Ꙋ — ok")],
    "whitespace_only_assistant": [u("Say nothing."), a("   ")],
    "newline_only_assistant": [u("Print a blank line."), a("\n\n")],
    "empty_assistant": [u("Be silent."), a("")],
    "leading_trailing_spaces": [u("  padded question  "), a("  padded answer  ")],
    "leading_newline_answer": [u("List two things."), a("\n- one\n- two\n")],
    "tabs_and_code": [u("Write a loop."), a("```python\nfor i in range(3):\n\tprint(i)\n```")],
    "special_text_in_content": [u("What does <|end|> mean?"), a("It ends a turn: <|end|> closes it.")],
    "assistant_first": [a("Hello, how can I help?"), u("Tell me a joke."), a("Why did the tensor cross the road?")],
    "consecutive_assistants": [u("Count to two."), a("One."), a("Two.")],
    "system_in_middle": [u("Hi"), a("Hello."), s("Now answer in upper case."), u("Name a colour."), a("RED.")],
    "long_answer": [u("Describe llamas."), a(
        "The llama (/ˈlɑːmə/; Spanish pronunciation: [ˈʎama]) is a domesticated South American camelid, "
        "widely used as a meat and pack animal by Andean cultures since the pre-Columbian era. " * 6)],
    "numbers_and_punctuation": [u("12,345.67 + 0.33 = ?"), a("12,346.00 — exactly; (see §3.2) [ok]!?")],
    "spaces_inside": [u("a    b"), a("c     d      e")],
}


def annotated_template(tok):
    template = tok.chat_template
    if ASSISTANT_OLD not in template:
        raise SystemExit("the tokenizer's chat template is not Phi-3's; cannot annotate it")
    return template.replace(ASSISTANT_OLD, ASSISTANT_NEW)


def reference(tok, annotated, messages):
    text = tok.apply_chat_template(messages, tokenize=False)
    text_annotated = tok.apply_chat_template(messages, tokenize=False, chat_template=annotated)
    assert text == text_annotated, "annotated template renders different text"
    out = tok.apply_chat_template(messages, chat_template=annotated, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == plain, "apply_chat_template tokenized differently from tokenizer(text)"
    mask = list(out["assistant_masks"])
    labels = [t if m else -100 for t, m in zip(ids, mask)]
    return {"text": text, "input_ids": ids, "labels": labels}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="fixtures/tokenizer/phi3")
    ap.add_argument("--sample", default="fixtures/ultrachat_sample/jsonl/train_sft.jsonl")
    ap.add_argument("--sample-rows", type=int, default=16)
    ap.add_argument("--out", default="fixtures/data/phi3_chat_reference.jsonl")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    annotated = annotated_template(tok)
    cases = list(CASES.items())
    with open(args.sample, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= args.sample_rows:
                break
            cases.append((f"sample_row_{i}", json.loads(line)["messages"]))
    with open(args.out, "w", encoding="utf-8") as f:
        for name, messages in cases:
            rec = {"name": name, "messages": messages, **reference(tok, annotated, messages)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} reference conversations to {args.out}")


if __name__ == "__main__":
    main()
