#!/usr/bin/env python3
"""Load the adapter ferrotune saved (fixtures/models/hub_mha/ferrotune_adapter) with PEFT, run
the fixture batch, compare with the logits ferrotune computed, and record the result in
peft_check.json and PEFT's own logits in peft_logits.safetensors (committed; the Rust test checks ferrotune still writes that exact adapter).

Regenerate the adapter first:  FERROTUNE_WRITE_FIXTURES=1 cargo test -p ferrotune-model adapters_saved
Then:                          python scripts/check_ferrotune_adapter.py
"""
import json
import os

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Phi3ForCausalLM

CASE = "fixtures/models/hub_mha"
ADAPTER = os.path.join(CASE, "ferrotune_adapter")


def main():
    expected = load_file(os.path.join(CASE, "expected.safetensors"))
    ours = load_file(os.path.join(ADAPTER, "ferrotune_logits.safetensors"))["logits"]
    model = PeftModel.from_pretrained(Phi3ForCausalLM.from_pretrained(CASE).eval(), ADAPTER).eval()
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], position_ids=expected["position_ids"],
                       attention_mask=expected["attention_mask"]).logits
        base = Phi3ForCausalLM.from_pretrained(CASE).eval()(input_ids=expected["input_ids"]).logits
    diff = (logits - ours).abs().max().item()
    effect = (logits - base).abs().max().item()
    result = {"loaded_in_peft": True, "max_abs_logit_diff": diff, "adapter_effect_on_logits": effect,
              "peft_modules": sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_" in n})}
    assert effect > 1e-3, "the adapter should change the output"
    json.dump(result, open(os.path.join(ADAPTER, "peft_check.json"), "w"), indent=1)
    save_file({"logits": logits.contiguous()}, os.path.join(ADAPTER, "peft_logits.safetensors"))
    print(json.dumps(result)[:300])


if __name__ == "__main__":
    main()
