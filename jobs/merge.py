"""Merge the adapter into the base and prove the merge: merged logits == base+adapter logits.

The base is reloaded unquantised in the merge dtype (for QLoRA: 16-bit, never the
4-bit weights), the adapter is loaded from the folder we are about to publish, so
the check also proves the saved adapter reloads.
"""
from __future__ import annotations

import logging
from pathlib import Path

from jobs.errors import LoraJobError

log = logging.getLogger("jobs")


class MergeMismatch(LoraJobError):
    pass


def merge_dtype(requested: str, train_precision: str) -> str:
    if requested != "auto":
        return requested
    return train_precision if train_precision in ("bf16", "fp16") else "fp32"


def tolerance_for(dtype: str, base_tol: float) -> float:
    # bf16 keeps 8 bits of mantissa: merging W + BA rounds once more than applying BA on the fly
    return {"fp32": base_tol, "fp16": max(base_tol, 1e-2), "bf16": max(base_tol, 3e-2)}[dtype]


def merge_and_check(base_dir: str, adapter_dir: Path, out_dir: Path, *, dtype: str, tolerance: float,
                    prompts: list[str], tok, device) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.modelio import torch_dtype

    td = torch_dtype(dtype)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=td, low_cpu_mem_usage=True).to(device)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).to(device)
    model.eval()
    enc = [tok(p, return_tensors="pt", add_special_tokens=False).to(device) for p in prompts[:3]]
    with torch.no_grad():
        ref = [model(**e).logits.float() for e in enc]
        merged = model.merge_and_unload()
        got = [merged(**e).logits.float() for e in enc]
    worst = 0.0
    for a, b in zip(ref, got):
        scale = max(1.0, float(a.abs().max()))
        worst = max(worst, float((a - b).abs().max()) / scale)
    tol = tolerance_for(dtype, tolerance)
    result = {"dtype": dtype, "max_relative_logit_diff": worst, "tolerance": tol, "prompts_checked": len(enc),
              "ok": worst <= tol}
    log.info("merge check: max relative logit difference %.2e (tolerance %.0e) over %d prompts", worst, tol, len(enc))
    if worst > tol:
        raise MergeMismatch(f"the merged model differs from base+adapter by {worst:.2e} (tolerance {tol:.0e})",
                            hint="merge in fp32 (merge.dtype: fp32) or raise merge.tolerance")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    del merged, model, base
    return result
