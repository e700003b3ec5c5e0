"""Merge the adapter into the base and prove the merge before anything is published.

The check runs in fp32, before the merged weights are cast to ``merge.dtype``. A check in
bf16 compares two different roundings of the model (W x + s·B(A x) against (W + s·B·A) x,
each rounded to 8 mantissa bits at every layer): on an 8B model a correct merge differed
from base+adapter by 6.5e-2 of the logit scale, more than a tolerance that could still catch a
wrong merge. In fp32 a correct merge is exact to about 1e-6, so a wrong one shows. Two checks:

* **weights** — for every LoRA module, the merged weight's change ``W_merged - W_base`` against
  ``scale · B · A`` computed here from the adapter files being published and the base model's
  own safetensors, independently of PEFT's merge code: a module left out, a wrong scaling or a
  transposed product fails, naming the module.
* **logits** — the merged model against base+adapter (PEFT's unmerged forward) on the eval
  prompts, relative to the logit scale.

It also reports how much of the adapter's change survives rounding the merged weights to
``merge.dtype`` (``delta_retained``): a small adapter on a large base can lose most of its
change in bf16, and the user should know that the adapter, not the merged copy, is then the
faithful artefact.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from jobs.errors import MergeMismatch
from jobs.formatting import size

log = logging.getLogger("jobs")

__all__ = ["MergeMismatch", "check_merged_weights", "merge_and_check", "merge_dtype"]

#: fp32 rounding of W + delta: about 2^-24 of |W| per element; the check allows a few times that
FP32_FLOOR = 2.0 ** -22


def merge_dtype(requested: str, train_precision: str) -> str:
    if requested != "auto":
        return requested
    return train_precision if train_precision in ("bf16", "fp16") else "fp32"


def _adapter_layers(adapter_dir: Path) -> tuple[dict, dict[str, tuple]]:
    """(adapter_config, {module name: (A, B)}) read from the published adapter folder."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    layers: dict[str, dict] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                name = key.split(marker)[0]
                name = name.removeprefix("base_model.model.")
                layers.setdefault(name, {})[part] = t
    return cfg, {n: (d["lora_A"], d["lora_B"]) for n, d in layers.items() if "lora_A" in d and "lora_B" in d}


def _scale(cfg: dict, name: str) -> float:
    r = (cfg.get("rank_pattern") or {}).get(name, cfg["r"])
    alpha = (cfg.get("alpha_pattern") or {}).get(name, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _base_tensor_files(base_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: base_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def check_merged_weights(merged, base_dir: str | Path, adapter_dir: str | Path, *, target_dtype) -> dict:
    """Compare every merged LoRA module with ``W_base + scale·B·A`` (fp32); see the module doc.

    Returns ``worst_rel_error`` (relative to the module's change, plus the fp32 rounding floor),
    ``worst_module``, ``modules_checked``, ``unchecked`` (modules whose base weight is not in the
    base folder's safetensors) and ``delta_retained`` (share of the change left after casting
    the merged weights to ``target_dtype``).
    """
    import torch
    from safetensors import safe_open

    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    cfg, layers = _adapter_layers(adapter_dir)
    if cfg.get("use_dora"):
        return {"skipped": "DoRA rescales the merged weight; only the logits are compared",
                "modules_checked": 0, "worst_rel_error": 0.0, "worst_module": None, "unchecked": [],
                "delta_retained": None}
    files = _base_tensor_files(base_dir)
    handles: dict[Path, object] = {}
    worst, worst_name, checked, unchecked = 0.0, None, 0, []
    kept, total = 0.0, 0.0
    try:
        for name, (a, b) in sorted(layers.items()):
            key = f"{name}.weight"
            if key not in files:
                unchecked.append(name)
                continue
            f = files[key]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt")
            w_m = merged.get_submodule(name).weight.detach()
            dev = w_m.device
            w0 = handles[f].get_tensor(key).to(dev, torch.float32)
            delta = _scale(cfg, name) * (b.to(dev, torch.float32) @ a.to(dev, torch.float32))
            if cfg.get("fan_in_fan_out"):
                delta = delta.t()
            diff = w_m.float() - w0
            err = float(torch.linalg.vector_norm(diff - delta))
            dn = float(torch.linalg.vector_norm(delta))
            rel = err / (dn + FP32_FLOOR * float(torch.linalg.vector_norm(w0)) + 1e-30)
            if rel > worst:
                worst, worst_name = rel, name
            rounded = w_m.to(target_dtype).float() - w0.to(target_dtype).float()
            kept += float((rounded * delta).sum())
            total += dn * dn
            checked += 1
            del w0, delta, diff, rounded
    finally:
        handles.clear()
    return {"modules_checked": checked, "worst_rel_error": worst, "worst_module": worst_name,
            "unchecked": unchecked, "delta_retained": None if total == 0 else round(kept / total, 4)}


def _merge_device(base_dir: str, device, memory_budget_bytes: int | None):
    """The GPU when an fp32 copy of the model fits the run's memory budget there, else the CPU."""
    import torch
    from transformers import AutoConfig

    from jobs.trainer.fastpath import estimate_param_count

    if device.type != "cuda":
        return device
    need = estimate_param_count(AutoConfig.from_pretrained(base_dir)) * 4 * 1.1 + 2 * 2**30
    free, _total = torch.cuda.mem_get_info(device)
    budget = min(free, memory_budget_bytes or free)
    if need <= budget:
        return device
    log.info("merge: an fp32 copy of the model needs ~%s, more than the %s budget on the GPU: "
             "merging on the CPU", size(need), size(budget))
    return torch.device("cpu")


def merge_and_check(base_dir: str, adapter_dir: Path, out_dir: Path, *, dtype: str, tolerance: float,
                    prompts: list[str], tok, device, memory_budget_bytes: int | None = None) -> dict:
    """Merge in fp32, check weights and logits, then save the merged model in ``dtype``."""
    import time

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.trainer.modelio import torch_dtype

    t0 = time.perf_counter()
    dev = _merge_device(base_dir, device, memory_budget_bytes)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, low_cpu_mem_usage=True).to(dev)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).to(dev)
    model.eval()
    enc = [tok(p, return_tensors="pt", add_special_tokens=False).to(dev) for p in prompts[:3]]
    with torch.no_grad():
        ref = [model(**e).logits.float() for e in enc]
        merged = model.merge_and_unload()
        got = [merged(**e).logits.float() for e in enc]
    logit_err = 0.0
    for a, b in zip(ref, got):
        scale = max(1.0, float(a.abs().max()))
        logit_err = max(logit_err, float((a - b).abs().max()) / scale)
    del ref, got
    target = torch_dtype(dtype)
    with torch.no_grad():
        weights = check_merged_weights(merged, base_dir, adapter_dir, target_dtype=target)
    ok = logit_err <= tolerance and weights["worst_rel_error"] <= tolerance
    result = {"dtype": dtype, "checked_in": "fp32", "device": str(dev), "tolerance": tolerance,
              "max_relative_logit_diff": logit_err, "prompts_checked": len(enc), **weights, "ok": ok}
    log.info("merge check (fp32, %s): logits %.1e, worst weight %.1e (%s) over %d modules; tolerance %.0e; "
             "%s keeps %s of the adapter's change", dev, logit_err, weights["worst_rel_error"],
             weights["worst_module"] or "-", weights["modules_checked"], tolerance, dtype,
             "n/a" if weights["delta_retained"] is None else f"{weights['delta_retained']:.0%}")
    if weights["unchecked"]:
        log.warning("merge check: %d LoRA modules have no weight of the same name in the base folder's "
                    "safetensors; only the logits cover them: %s", len(weights["unchecked"]),
                    ", ".join(weights["unchecked"][:5]))
    if not ok:
        what = (f"the logits differ by {logit_err:.2e} of their scale" if logit_err > tolerance else
                f"module {weights['worst_module']} changed by something other than scale·B·A "
                f"(relative error {weights['worst_rel_error']:.2e})")
        raise MergeMismatch(f"the merged model does not reproduce base + adapter: {what} (tolerance "
                            f"{tolerance:.0e}, checked in fp32); nothing was published",
                            hint="this is a bug in the merge, not in the data: publish without the merged "
                                 "copy (merge.enabled: false) and report it")
    if weights["delta_retained"] is not None and weights["delta_retained"] < 0.5 and dtype != "fp32":
        log.warning("merge: rounding the merged weights to %s keeps only %.0f%% of the adapter's change (it is "
                    "small next to the base weights); the adapter itself is exact — serve base + adapter, or "
                    "set merge.dtype: fp32", dtype, 100 * weights["delta_retained"])
    merged = merged.to(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    del merged, model, base
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result
