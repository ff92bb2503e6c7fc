#!/usr/bin/env python3
"""Reference training run: transformers' `Trainer` + PEFT LoRA on the tiny hub_mha fixture model.

Run by hand (needs torch, transformers 5.24, peft 0.21; not part of CI):
    /tmp/torchenv/bin/python scripts/make_train_reference.py [--out fixtures/train/hub_mha_trainer]

Starts from fixtures/models/hub_mha (base, f32) + fixtures/models/hub_mha/adapter (LoRA r=4,
alpha=8, non-zero A and B), trains 10 optimizer steps with `Trainer` on 36 generated examples
(batch 2, gradient accumulation 2, sequential order, cosine schedule with 2 warmup steps, AdamW
with weight decay, gradient clipping) and writes into --out:

  data.json           {"pad_token_id": 0, "examples": [{"input_ids": [...], "labels": [...]}, ...]}
                      labels = input_ids with -100 on a prompt prefix (>= 1 masked, >= 2 trained)
  expected.json       {"args": {...}, "facts": {...}, "versions": {...}, "steps": [...]}; one entry
                      per optimizer step k = 1..10, full float precision:
                        loss          token-mean CE over the accumulation window (sum of the CE of
                                      every trained token in both micro-batches / num_items)
                        micro_losses  what `training_step` returned per micro-batch (they sum to loss)
                        num_items     trained tokens in the window (labels[..., 1:] != -100)
                        grad_norm     total L2 norm before clipping (clip_grad_norm_'s return value)
                        clip_coef     min(max_grad_norm / (grad_norm + 1e-6), 1) in float32, the factor
                                      the grads were multiplied by (1.0 = not clipped)
                        lr            param_groups[0]["lr"] when optimizer.step ran
                        micro_batches example indices of each micro-batch
  final_adapter/      the adapter after step 10 (PEFT layout, adapter_model.safetensors, f32)

Every number is also recomputed by an independent plain-torch loop (no Trainer: own collation,
own cosine schedule, own clip and own single-tensor AdamW); the script fails unless both agree,
which pins the formulas the Rust side has to implement.
"""
import argparse
import json
import math
import os
import random
import tempfile

import torch
import transformers
import peft
from peft import PeftModel
from safetensors.torch import load_file
from torch.optim.optimizer import _default_to_fused_or_foreach
from transformers import Phi3ForCausalLM, Trainer, TrainingArguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "fixtures", "models", "hub_mha")
ADAPTER = os.path.join(BASE, "adapter")

DATA_SEED = 1234
NUM_EXAMPLES = 36
MIN_LEN, MAX_LEN = 6, 40
PAD_ID = 0
TOKEN_LO, TOKEN_HI = 3, 255  # inclusive; 0 = pad, 1 = bos, 2 = eos are never drawn

ARGS = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    max_steps=10,
    learning_rate=2e-3,
    lr_scheduler_type="cosine",
    warmup_steps=2,
    weight_decay=0.01,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    max_grad_norm=3.0,  # clips some steps, not others (see "clipped" in expected.json)
    optim="adamw_torch",
    seed=0,
    logging_steps=1,
    save_strategy="no",
    eval_strategy="no",
    report_to=[],
    use_cpu=True,
    bf16=False,
    fp16=False,
    dataloader_drop_last=False,
    dataloader_num_workers=0,
    remove_unused_columns=False,
    train_sampling_strategy="sequential",
    disable_tqdm=True,
)


def make_examples():
    rng = random.Random(DATA_SEED)
    examples = []
    for _ in range(NUM_EXAMPLES):
        n = rng.randint(MIN_LEN, MAX_LEN)
        ids = [rng.randint(TOKEN_LO, TOKEN_HI) for _ in range(n)]
        prompt = rng.randint(1, n - 2)  # masked prefix; n - prompt >= 2 tokens trained
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


class Examples(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return {"idx": i, **self.examples[i]}


def collate(features):
    """Right-pad to the longest row with PAD_ID; attention_mask 0 and labels -100 on pads."""
    width = max(len(f["input_ids"]) for f in features)
    ids, mask, labels = [], [], []
    for f in features:
        pad = width - len(f["input_ids"])
        ids.append(f["input_ids"] + [PAD_ID] * pad)
        mask.append([1] * len(f["input_ids"]) + [0] * pad)
        labels.append(f["labels"] + [-100] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels), "example_ids": torch.tensor([f["idx"] for f in features])}


def load_model():
    base = Phi3ForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, ADAPTER, is_trainable=True)
    cfg = model.peft_config["default"]
    assert cfg.lora_dropout == 0.0, cfg.lora_dropout
    for name, m in model.named_modules():
        if name.endswith("lora_dropout.default"):
            assert isinstance(m, torch.nn.Identity), name
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class RecordingTrainer(Trainer):
    """Trainer that records, per optimizer step, the exact window loss, grad norm, lr and batches."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.steps = []
        self.window = self._new_window()

    @staticmethod
    def _new_window():
        return {"micro_batches": [], "micro_losses": [], "ce_sums": [], "num_items": None}

    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        opt.register_step_pre_hook(self._pre_step)
        return opt

    def _pre_step(self, optimizer, args, kwargs):
        w = self.window
        w["lr"] = optimizer.param_groups[0]["lr"]
        w["group_lrs"] = [g["lr"] for g in optimizer.param_groups]
        self.steps.append(w)
        self.window = self._new_window()

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.pop("example_ids")
        self.window["micro_batches"].append(ids.tolist())
        n = int(num_items_in_batch)
        assert self.window["num_items"] in (None, n)
        self.window["num_items"] = n
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.window["micro_losses"].append(loss.item())
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        # independent token CE sum, float64, with the causal shift
        logits = outputs.logits.detach()[:, :-1].double()
        target = inputs["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=-100, reduction="sum")
        self.window["ce_sums"].append(ce.item())
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model):
        norm = super()._clip_grad_norm(model)
        self.window["grad_norm"] = norm.item()
        return norm


def run_trainer(examples, max_grad_norm):
    model = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, **{**ARGS, "max_grad_norm": max_grad_norm})
        trainer = RecordingTrainer(model=model, args=args, train_dataset=Examples(examples),
                                   data_collator=collate)
        seen = []  # what Trainer logs (not rounded in 5.24; checked against the exact values)

        class KeepLogs(transformers.TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    seen.append({**logs, "step": state.global_step})

        trainer.add_callback(KeepLogs())
        # the loss path the facts below rely on
        assert trainer.model_accepts_loss_kwargs and trainer._loss_shifts_labels
        assert trainer.label_smoother is None and trainer.compute_loss_func is None
        out = trainer.train()
        opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [{"weight_decay": g["weight_decay"], "params": [names[id(p)] for p in g["params"]]}
                  for g in opt.param_groups]
        # AdamW leaves foreach/fused unset; torch then picks the implementation from the devices
        assert all(g["foreach"] is None and not g["fused"] for g in opt.param_groups)
        all_params = [p for g in opt.param_groups for p in g["params"]]
        assert _default_to_fused_or_foreach(all_params, False, False) == (False, False)
        info = {"train_output": {"global_step": out.global_step, "training_loss": out.training_loss},
                "epoch_end": trainer.state.epoch, "logs": seen, "optimizer_groups": groups,
                "optimizer_class": type(opt).__module__ + "." + type(opt).__name__}
    return model, trainer.steps, info


def cosine_lr(step0, base_lr, warmup, total):
    """transformers' _get_cosine_schedule_with_warmup_lr_lambda (num_cycles 0.5) times base lr."""
    if step0 < warmup:
        return base_lr * step0 / max(1, warmup)
    progress = (step0 - warmup) / max(1, total - warmup)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def run_manual(examples, max_grad_norm):
    """The same training without Trainer/accelerate/torch.optim: the formulas written out."""
    model = load_model()
    model.train()
    params = trainable(model)
    a = ARGS
    bs, ga, total = a["per_device_train_batch_size"], a["gradient_accumulation_steps"], a["max_steps"]
    b1, b2, eps, wd = a["adam_beta1"], a["adam_beta2"], a["adam_epsilon"], a["weight_decay"]
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    micro = [list(range(i, min(i + bs, len(examples)))) for i in range(0, len(examples), bs)]
    per_epoch = math.ceil(len(micro) / ga)
    windows = [micro[i:i + ga] for i in range(0, len(micro), ga)]
    assert len(windows) == per_epoch
    steps = []
    for k in range(total):
        window = windows[k % per_epoch]  # a new epoch restarts the (sequential) order
        batches = [collate([{"idx": i, **examples[i]} for i in mb]) for mb in window]
        num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss_sum = 0.0
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            logits = out.logits.float()
            labels = torch.nn.functional.pad(b["labels"], (0, 1), value=-100)[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction="sum") / num_items
            ce.backward()
            loss_sum += ce.item()
        norms = torch.stack([torch.linalg.vector_norm(p.grad, 2) for p in params.values()])
        grad_norm = torch.linalg.vector_norm(norms, 2)
        coef = torch.clamp(max_grad_norm / (grad_norm + 1e-6), max=1.0)
        lr = cosine_lr(k, a["learning_rate"], a["warmup_steps"], total)
        step = k + 1
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        with torch.no_grad():
            for n, p in params.items():
                g = p.grad.mul_(coef)
                p.mul_(1 - lr * wd)                      # decoupled weight decay first
                m[n].lerp_(g, 1 - b1)                    # m = b1 m + (1 - b1) g
                v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v[n].sqrt() / bc2 ** 0.5).add_(eps)
                p.addcdiv_(m[n], denom, value=-(lr / bc1))
                p.grad = None
        steps.append({"micro_batches": window, "loss": loss_sum, "num_items": num_items,
                      "grad_norm": grad_norm.item(), "lr": lr})
    return model, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures", "train", "hub_mha_trainer"))
    ap.add_argument("--max-grad-norm", type=float, default=ARGS["max_grad_norm"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    examples = make_examples()
    model, rec, info = run_trainer(examples, args.max_grad_norm)
    manual_model, manual = run_manual(examples, args.max_grad_norm)

    total = ARGS["max_steps"]
    assert len(rec) == total, len(rec)
    steps = []
    for k, (r, mref) in enumerate(zip(rec, manual), start=1):
        loss = math.fsum(r["micro_losses"])
        ce_mean = math.fsum(r["ce_sums"]) / r["num_items"]
        # as clip_grad_norm_ computes it: float32 tensor arithmetic
        coef = torch.clamp(args.max_grad_norm / (torch.tensor(r["grad_norm"]) + 1e-6), max=1.0).item()
        step = {"step": k, "loss": loss, "micro_losses": r["micro_losses"], "num_items": r["num_items"],
                "grad_norm": r["grad_norm"], "clipped": r["grad_norm"] > args.max_grad_norm, "clip_coef": coef,
                "lr": r["lr"], "micro_batches": r["micro_batches"]}
        steps.append(step)
        # Trainer's numbers vs the float64 recomputation and the written-out loop
        assert len(set(r["group_lrs"])) == 1, r["group_lrs"]
        assert abs(loss - ce_mean) <= 1e-5 * ce_mean, (k, loss, ce_mean)
        assert r["micro_batches"] == mref["micro_batches"], (k, r["micro_batches"], mref["micro_batches"])
        assert r["num_items"] == mref["num_items"]
        assert r["lr"] == mref["lr"], (k, r["lr"], mref["lr"])
        assert abs(loss - mref["loss"]) <= 1e-5 * loss, (k, loss, mref["loss"])
        assert abs(r["grad_norm"] - mref["grad_norm"]) <= 1e-5 * r["grad_norm"], (k, r["grad_norm"], mref)
        log = info["logs"][k - 1]
        assert log["step"] == k and abs(log["loss"] - loss) <= 1e-6 * loss and log["learning_rate"] == r["lr"]

    # weight decay on every LoRA matrix (A and B), nothing in the no-decay group
    groups = info["optimizer_groups"]
    names = sorted(trainable(model))
    assert groups[0]["weight_decay"] == ARGS["weight_decay"] and sorted(groups[0]["params"]) == names
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["params"] == []
    assert any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)

    final = {n: p.detach().clone() for n, p in trainable(model).items()}
    diff = max((final[n] - p.detach()).abs().max().item() for n, p in trainable(manual_model).items())
    scale = max(t.abs().max().item() for t in final.values())
    assert diff <= 1e-5 * scale, diff

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data.json"), "w") as f:
        json.dump({"pad_token_id": PAD_ID, "examples": examples}, f, separators=(",", ":"))
        f.write("\n")
    adapter_dir = os.path.join(args.out, "final_adapter")
    # no local path in the saved adapter_config.json (base_model_name_or_path) and README (base_model)
    model.get_base_model().name_or_path = ""
    model.get_base_model().config._name_or_path = ""
    model.save_pretrained(adapter_dir)
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    adapter_cfg = json.load(open(cfg_path))
    adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])  # PEFT writes a set
    with open(cfg_path, "w") as f:
        json.dump(adapter_cfg, f, indent=2, sort_keys=True)
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert len(saved) == len(final) and all(t.dtype == torch.float32 for t in saved.values())
    # the saved adapter loads back in PEFT and gives the trained model's logits
    batch = collate([{"idx": i, **examples[i]} for i in range(4)])
    reloaded = PeftModel.from_pretrained(
        Phi3ForCausalLM.from_pretrained(BASE, dtype=torch.float32, attn_implementation="eager"), adapter_dir)
    with torch.no_grad():
        want = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(want, got)
    initial = load_file(os.path.join(ADAPTER, "adapter_model.safetensors"))
    moved = max((saved[k] - initial[k]).abs().max().item() for k in saved)
    assert moved > 0

    micro_per_epoch = math.ceil(NUM_EXAMPLES / ARGS["per_device_train_batch_size"])
    per_epoch = math.ceil(micro_per_epoch / ARGS["gradient_accumulation_steps"])
    for s in steps:
        s["epoch"] = (s["step"] - 1) // per_epoch
    expected = {
        "args": {**ARGS, "max_grad_norm": args.max_grad_norm, "attn_implementation": "eager",
                 "torch_num_threads": 1, "data_seed": DATA_SEED},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "facts": {
            "num_examples": NUM_EXAMPLES,
            "micro_batches_per_epoch": micro_per_epoch,
            "update_steps_per_epoch": per_epoch,
            "num_train_epochs": math.ceil(total / per_epoch),
            "clipped_steps": [s["step"] for s in steps if s["clipped"]],
            "epoch_boundary": "step 10 restarts the sequential order at example 0; optimizer state "
                              "and scheduler continue",
            "loss": "sum over both micro-batches of token CE (labels shifted by one inside the model) "
                    "/ num_items, num_items = count(labels[..., 1:] != -100) over the window",
            "lr": "lr_k = lr * (k-1)/warmup for k-1 < warmup, else lr * 0.5 * (1 + cos(pi * (k-1-warmup) "
                  "/ (max_steps-warmup))); step k uses scheduler index k-1, so step 1 has lr 0",
            "clip": "g *= min(max_grad_norm / (grad_norm + 1e-6), 1), grad_norm = L2 over all LoRA grads",
            "adamw": "torch.optim.AdamW single-tensor (foreach off on CPU): p *= 1 - lr*wd; m = lerp(m, g, 1-b1); "
                     "v = b2 v + (1-b2) g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)",
            "optimizer_class": info["optimizer_class"],
            "weight_decay_params": "all lora_A and lora_B weights",
            "trainer_train_loss": info["train_output"]["training_loss"],
            "final_epoch": info["epoch_end"],
            "max_abs_diff_trainer_vs_manual_final_adapter": diff,
        },
        "steps": steps,
    }
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"{'step':>4} {'loss':>20} {'grad_norm':>20} {'clip':>5} {'lr':>24}  micro_batches")
    for s in steps:
        print(f"{s['step']:>4} {s['loss']:>20.17g} {s['grad_norm']:>20.17g} {str(s['clipped']):>5} "
              f"{s['lr']!r:>24}  {s['micro_batches']}")
    print(f"final adapter moved by at most {moved:.3g}; trainer vs manual final adapter max |diff| {diff:.3g}")


if __name__ == "__main__":
    main()
