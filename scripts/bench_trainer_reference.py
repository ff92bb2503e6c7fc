#!/usr/bin/env python3
"""Reference side of a whole-run training benchmark: train what `ferrotune train` trains for a
config, but with transformers' `Trainer` + PEFT LoRA on the CPU, and print throughput, peak RSS
and the final eval loss, so the two runs can be compared as ratios.

Run by hand (needs torch, transformers 5.24, peft 0.21, safetensors, numpy; not part of CI):

    /tmp/torchenv/bin/python scripts/bench_trainer_reference.py --config train.yaml \
        [--train-data DIR] [--validation-data DIR] [--max-steps N] [--threads 2]

--config is a ferrotune training config (YAML or JSON; relative paths are taken from its folder,
Azure-style quoted numbers/booleans and comma-separated `lora_target_modules` are accepted).
--train-data / --validation-data are folders written by `ferrotune data prepare` (or the `data/`
folders inside a ferrotune output_dir); they replace the config's `train_file_path` /
`validation_file_path`, which must otherwise already be prepared folders (this script does not
tokenize). Each training sequence is ids[off[i]:off[i+1]] of its shard; its labels are the ids
where `trainable` is 1 and -100 elsewhere.

What is mirrored from ferrotune (crates/ferrotune-train): the model is loaded in float32 with
eager attention; fresh PEFT LoRA (r, alpha, dropout, rslora, targets) or `init_adapter`; optimizer
steps = max_steps if > 0 else ceil(num_train_epochs * ceil(ceil(sequences / batch) / accumulation))
(a short last window still makes a step); warmup = warmup_steps if > 0 else
ceil(steps * warmup_ratio); AdamW (torch) with the config's betas, eps, weight decay and clip;
micro-batches right-padded with the model's pad_token_id (0 when it has none) and labels -100 on
pads; packed sequences get position ids restarting per conversation and block-diagonal attention
(transformers derives it from the position ids when no attention_mask is given). The loss is
token-mean CE over the trained tokens of an accumulation window, as both sides compute it.

What differs on purpose: the data order is Trainer's seeded random sampler (or sequential when
`shuffle: false`), not ferrotune's permutation, and the LoRA A init comes from torch's RNG, so
expect a similar, not an identical, eval loss. No evaluation or checkpointing runs during
training (ferrotune's wall time includes its periodic/final eval and checkpoint writes).

Reported: `seconds` is the wall clock of `trainer.train()` only; `tokens` counts real (non-pad)
tokens of every micro-batch trained, prompts included (ferrotune's `tokens_seen`); the final eval
(not timed) is token-mean CE over the trained tokens of the validation set with the usual shift,
in order, in batches of per_device_eval_batch_size (ferrotune's eval_loss); `final_train_loss`
is ferrotune's last logged train loss: token-weighted CE over the last logging window;
`peak_rss_bytes` is ru_maxrss of this process at the end (load, train and eval). Human-readable
lines first, then one JSON line.
"""
import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import transformers
import peft
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file
from transformers import Phi3ForCausalLM, Trainer, TrainingArguments

IGNORE = -100
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft 0.21 on transformers 5
ALL_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# config

def parse_simple_yaml(text):
    """Fallback when PyYAML is missing: `key: value` lines, `# comments`, `[a, b]` lists."""
    out = {}
    for raw in text.splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#") or line == "---":
            continue
        if ":" not in line:
            sys.exit(f"config: cannot read line {raw!r} without PyYAML (only `key: value` lines)")
        key, value = (p.strip() for p in line.split(":", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            out[key] = value[1:-1]
        elif value.startswith("[") and value.endswith("]"):
            out[key] = [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
        elif value in ("", "null", "~"):
            out[key] = None
        elif value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def read_config(path):
    text = open(path).read()
    try:
        import yaml
        cfg = yaml.safe_load(text)
    except ImportError:
        try:
            cfg = json.loads(text)
        except ValueError:
            cfg = parse_simple_yaml(text)
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        sys.exit(f"{path}: expected a mapping of parameter names to values")
    return cfg


def num(cfg, key, default, kind=float):
    """A number, or a string holding one (Azure ML passes parameters as strings)."""
    v = cfg.get(key, default)
    if v is None:
        return default
    try:
        return kind(float(v)) if kind is int and isinstance(v, str) else kind(v)
    except (TypeError, ValueError):
        sys.exit(f"config: {key}: expected a number, got {v!r}")


def flag(cfg, key, default):
    v = cfg.get(key, default)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    sys.exit(f"config: {key}: expected true or false, got {v!r}")


def names(cfg, key, default):
    v = cfg.get(key, default)
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        return list(v)
    sys.exit(f"config: {key}: expected a list of names, got {v!r}")


def resolve(base, p):
    return p if p is None or os.path.isabs(p) else os.path.join(base, p)


def load_settings(args):
    cfg = read_config(args.config)
    base = os.path.dirname(os.path.abspath(args.config))
    if "model" not in cfg:
        sys.exit(f"{args.config}: model is required")
    model = str(cfg["model"])
    if not os.path.isabs(model) and os.path.exists(os.path.join(base, model)):
        model = os.path.join(base, model)  # else a hub id in the local cache
    s = dict(
        model=model,
        train=args.train_data or resolve(base, cfg.get("train_file_path")),
        validation=args.validation_data or resolve(base, cfg.get("validation_file_path")),
        num_train_epochs=num(cfg, "num_train_epochs", 1.0),
        max_steps=num(cfg, "max_steps", -1, int),
        batch=num(cfg, "per_device_train_batch_size", 1, int),
        eval_batch=num(cfg, "per_device_eval_batch_size", 1, int),
        accumulation=num(cfg, "gradient_accumulation_steps", 1, int),
        learning_rate=num(cfg, "learning_rate", 5e-5),
        scheduler=str(cfg.get("lr_scheduler_type", "linear")),
        warmup_ratio=num(cfg, "warmup_ratio", 0.0),
        warmup_steps=num(cfg, "warmup_steps", 0, int),
        weight_decay=num(cfg, "weight_decay", 0.0),
        adam_beta1=num(cfg, "adam_beta1", 0.9),
        adam_beta2=num(cfg, "adam_beta2", 0.999),
        adam_epsilon=num(cfg, "adam_epsilon", 1e-8),
        max_grad_norm=num(cfg, "max_grad_norm", 1.0),
        lora_r=num(cfg, "lora_r", 8, int),
        lora_alpha=num(cfg, "lora_alpha", 16.0),
        lora_dropout=num(cfg, "lora_dropout", 0.0),
        targets=names(cfg, "lora_target_modules", ALL_TARGETS),
        use_rslora=flag(cfg, "use_rslora", False),
        init_adapter=resolve(base, cfg.get("init_adapter")),
        shuffle=flag(cfg, "shuffle", True),
        seed=num(cfg, "seed", 42, int),
        gradient_checkpointing=flag(cfg, "gradient_checkpointing", False),
        logging_steps=num(cfg, "logging_steps", 10, int),
        precision=str(cfg.get("precision", "auto")).lower(),
        device=str(cfg.get("device", "auto")).lower(),
    )
    if args.max_steps is not None:
        s["max_steps"] = args.max_steps
    if s["train"] is None:
        sys.exit("no training data: give --train-data or train_file_path in the config")
    if s["precision"] not in ("auto", "fp32", "float32", "f32"):
        sys.exit(f"precision {s['precision']}: this reference trains float32 on the CPU, as ferrotune "
                 "does with precision auto/fp32 there; compare with an fp32 run")
    if s["device"] not in ("auto", "cpu"):
        print(f"note: config device {s['device']!r}; this reference runs on the CPU", flush=True)
    bad = [t for t in s["targets"] if t not in ALL_TARGETS]
    if bad or not s["targets"]:
        sys.exit(f"lora_target_modules {s['targets']}: use any of {', '.join(ALL_TARGETS)}")
    for key in ("eval_steps", "early_stopping_patience"):
        if cfg.get(key) not in (None, ""):
            print(f"note: {key} ignored: this reference evaluates once, after training "
                  "(ferrotune's time includes its evaluations)", flush=True)
    if flag(cfg, "apply_lora", True) is False:
        sys.exit("apply_lora false: ferrotune trains LoRA only")
    return s


# ---------------------------------------------------------------------------------------------
# data

def read_prepared(folder, what):
    """Sequences of a ferrotune prepared folder: (ids int64, labels int64, doc_lengths)."""
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path):
        sys.exit(f"{what} {folder}: no manifest.json; give a folder from `ferrotune data prepare` "
                 f"(--train-data / --validation-data)")
    manifest = json.load(open(manifest_path))
    seqs = []
    for shard in manifest["shards"]:
        t = load_file(os.path.join(folder, shard["file"]))
        ids = t["input_ids"].astype(np.int64)
        trained = t["trainable"] != 0
        offsets = t["sequence_offsets"].astype(np.int64)
        docs = t["document_offsets"].astype(np.int64)
        labels = np.where(trained, ids, IGNORE)
        d = 0
        n_docs = len(t["document_rows"])
        for i in range(len(offsets) - 1):
            start, end = int(offsets[i]), int(offsets[i + 1])
            lengths = []
            while d < n_docs and docs[d] < end:  # as ferrotune's Prepared::sequences
                lengths.append(int(min(docs[d + 1], end) - max(docs[d], start)))
                d += 1
            if sum(lengths) != end - start:
                sys.exit(f"{folder}/{shard['file']}: sequence {i} does not line up with its documents")
            seqs.append((ids[start:end], labels[start:end], lengths))
    return seqs


class Sequences(torch.utils.data.Dataset):
    def __init__(self, seqs):
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]


def make_collator(pad_id):
    def collate(features):
        """Right-pad to the longest row with pad_id, labels -100 on pads. Unpacked rows get an
        attention_mask; a batch with a packed row gets per-conversation position ids instead
        (pads continue the last conversation's positions), from which transformers builds the
        block-diagonal causal mask."""
        width = max(len(ids) for ids, _, _ in features)
        packed = any(len(lengths) > 1 for _, _, lengths in features)
        b = len(features)
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        positions = torch.zeros((b, width), dtype=torch.long)
        for r, (row_ids, row_labels, lengths) in enumerate(features):
            n = len(row_ids)
            ids[r, :n] = torch.from_numpy(row_ids)
            labels[r, :n] = torch.from_numpy(row_labels)
            mask[r, :n] = 1
            pos = np.concatenate([np.arange(l) for l in lengths] + [np.arange(width - n) + lengths[-1]])
            positions[r] = torch.from_numpy(pos)
        batch = {"input_ids": ids, "labels": labels, "n_real": mask.sum()}
        if packed:
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = mask
        return batch
    return collate


# ---------------------------------------------------------------------------------------------
# training

class CountingTrainer(Trainer):
    """Trainer that counts real tokens and keeps each optimizer step's CE sum and target count."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.real_tokens = 0
        self.step_ce = {}  # step (1-based) -> [sum of token CE, trained targets]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.real_tokens += int(inputs.pop("n_real"))
        loss = super().training_step(model, inputs, num_items_in_batch)
        n = int(num_items_in_batch)
        entry = self.step_ce.setdefault(self.state.global_step + 1, [0.0, n])
        entry[0] += loss.item() * n  # the micro-batch's CE sum / window targets
        return loss


def steps_per_epoch(sequences, batch, accumulation):
    return max(1, math.ceil(math.ceil(sequences / batch) / accumulation))


def build_model(s, pad_id_holder):
    base = Phi3ForCausalLM.from_pretrained(s["model"], dtype=torch.float32, attn_implementation="eager")
    base.config.use_cache = False  # no cache while training (and packed masks need none)
    cfg = base.config
    pad = cfg.pad_token_id
    pad_id_holder.append(pad if pad is not None and 0 <= pad < cfg.vocab_size else 0)
    transformers.set_seed(s["seed"])  # LoRA A init
    if s["init_adapter"]:
        lora = LoraConfig.from_pretrained(s["init_adapter"])
        lora.lora_dropout = s["lora_dropout"]  # the run's dropout, as ferrotune does
        model = PeftModel.from_pretrained(base, s["init_adapter"], config=lora, is_trainable=True)
    else:
        lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                          target_modules=s["targets"], use_rslora=s["use_rslora"], task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)
    return model


@torch.no_grad()
def evaluate(model, seqs, batch_size, collate):
    """Token-mean CE over trained tokens (labels shifted by one), in order."""
    model.eval()
    nll, tokens = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        batch = collate(seqs[i:i + batch_size])
        labels = batch.pop("labels")[:, 1:]
        batch.pop("n_real")
        logits = model(**batch).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum").item()
        tokens += int((labels != IGNORE).sum())
    return (nll / tokens if tokens else float("nan")), tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="ferrotune training config (YAML/JSON)")
    ap.add_argument("--train-data", help="prepared training folder (replaces train_file_path)")
    ap.add_argument("--validation-data", help="prepared validation folder (replaces validation_file_path)")
    ap.add_argument("--max-steps", type=int, help="optimizer steps (replaces max_steps / epochs)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    s = load_settings(args)
    train = read_prepared(s["train"], "train data")
    validation = read_prepared(s["validation"], "validation data") if s["validation"] else None
    if not train:
        sys.exit(f"{s['train']}: holds no sequence")

    per_epoch = steps_per_epoch(len(train), s["batch"], s["accumulation"])
    if s["max_steps"] > 0:
        total = s["max_steps"]
    elif s["num_train_epochs"] > 0:
        total = math.ceil(s["num_train_epochs"] * per_epoch)
    else:
        sys.exit("num_train_epochs <= 0 and max_steps <= 0 train nothing")
    warmup = s["warmup_steps"] if s["warmup_steps"] > 0 else math.ceil(total * s["warmup_ratio"])

    pad_holder = []
    load_started = time.perf_counter()
    model = build_model(s, pad_holder)
    load_s = time.perf_counter() - load_started
    pad_id = pad_holder[0]
    collate = make_collator(pad_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {s['model']} (float32, eager) loaded in {load_s:.1f} s; LoRA r={s['lora_r']} "
          f"alpha={s['lora_alpha']} dropout={s['lora_dropout']} on {','.join(s['targets'])}: "
          f"{trainable} trainable parameters; pad id {pad_id}", flush=True)
    print(f"train {s['train']}: {len(train)} sequences, {sum(len(x[0]) for x in train)} tokens; "
          f"{total} steps ({per_epoch} per epoch), warmup {warmup}, {s['scheduler']} lr "
          f"{s['learning_rate']}, batch {s['batch']} x accumulation {s['accumulation']}, "
          f"{'random' if s['shuffle'] else 'sequential'} order, seed {s['seed']}, "
          f"{torch.get_num_threads()} threads", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            max_steps=total,
            per_device_train_batch_size=s["batch"],
            per_device_eval_batch_size=s["eval_batch"],
            gradient_accumulation_steps=s["accumulation"],
            learning_rate=s["learning_rate"],
            lr_scheduler_type=s["scheduler"],
            warmup_steps=warmup,  # an int >= 1 is a step count, 0 is none
            weight_decay=s["weight_decay"],
            adam_beta1=s["adam_beta1"],
            adam_beta2=s["adam_beta2"],
            adam_epsilon=s["adam_epsilon"],
            max_grad_norm=s["max_grad_norm"],  # 0 = no clipping, as in ferrotune
            optim="adamw_torch",
            seed=s["seed"],
            logging_steps=s["logging_steps"],
            activation_checkpointing=s["gradient_checkpointing"],  # transformers 5's name
            activation_checkpointing_kwargs={"use_reentrant": False} if s["gradient_checkpointing"] else None,
            train_sampling_strategy="random" if s["shuffle"] else "sequential",
            use_cpu=True,
            bf16=False,
            fp16=False,
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            dataloader_drop_last=False,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = CountingTrainer(model=model, args=targs, train_dataset=Sequences(train),
                                  data_collator=collate)
        # the loss path the numbers rely on: model-side token mean over the window's targets
        assert trainer.model_accepts_loss_kwargs and trainer.compute_loss_func is None
        started = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - started
    rss_after_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    steps = trainer.state.global_step
    first = ((steps - 1) // s["logging_steps"]) * s["logging_steps"] + 1 if steps else 1
    window = [trainer.step_ce[k] for k in range(first, steps + 1) if k in trainer.step_ce]
    targets = sum(n for _, n in window)
    final_train_loss = sum(ce for ce, _ in window) / targets if targets else None

    final_eval_loss, eval_tokens = None, 0
    if validation:
        eval_started = time.perf_counter()
        final_eval_loss, eval_tokens = evaluate(model, validation, s["eval_batch"], collate)
        print(f"eval {s['validation']}: {len(validation)} sequences, {eval_tokens} trained tokens, "
              f"loss {final_eval_loss:.4f} (perplexity {math.exp(final_eval_loss):.4f}) in "
              f"{time.perf_counter() - eval_started:.2f} s (not timed)", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    tokens = trainer.real_tokens
    print(f"trained {steps} steps in {seconds:.2f} s: {steps / seconds:.3f} steps/s, {tokens} tokens, "
          f"{tokens / seconds:.0f} tokens/s; Trainer's mean train loss {out.training_loss:.4f}, last "
          f"logging window (steps {first}-{steps}) {final_train_loss:.4f}", flush=True)
    print(f"peak RSS {peak / 2**20:.1f} MiB ({rss_after_train / 2**20:.1f} MiB after training); "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    print(json.dumps({
        "steps": steps,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "peak_rss_bytes": peak,
        "final_eval_loss": final_eval_loss,
        "final_train_loss": final_train_loss,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
