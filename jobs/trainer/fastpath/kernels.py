"""Kernels patched into a loaded model: the lean LoRA forward and Liger's RMSNorm/SwiGLU/RoPE kernels.

Both are applied by :func:`jobs.trainer.fastpath.prepare_model`; :func:`undo_module_patches` takes back
what Liger changed in transformers' modeling modules before the merge reloads a base.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

import torch.nn.functional as F

log = logging.getLogger(__name__)


def _lean_lora_forward(self, x, *args, **kwargs):
    """PEFT LoRA Linear forward without the fp32 round trip of the input.

    PEFT casts the activations to the adapter dtype (fp32) before dropout and the A/B products,
    which stores an fp32 copy of every projection input for the backward. Here the adapter
    weights (kept in fp32 as master weights; the optimizer sees fp32) are cast to the activation
    dtype instead; the product is the one autocast would compute.
    """
    if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
            or any(a in getattr(self, "lora_variant", {}) for a in self.active_adapters)):
        return self._fastpath_orig_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a = self.lora_A[name].weight
        b = self.lora_B[name].weight
        h = self.lora_dropout[name](x)
        h = F.linear(F.linear(h, a.to(x.dtype)), b.to(x.dtype))
        result = result + h * self.scaling[name]
    return result


def _lean_lora_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        types.append(LoraLinear)
    except Exception:  # noqa: BLE001
        return ()
    try:  # QLoRA / 8-bit: the same forward over a bitsandbytes base layer
        from peft.tuners.lora import bnb as lora_bnb
        types += [t for t in (getattr(lora_bnb, "Linear4bit", None), getattr(lora_bnb, "Linear8bitLt", None)) if t]
    except Exception:  # noqa: BLE001 - bitsandbytes not installed
        pass
    return tuple(types)


def install_lean_lora(model) -> int:
    """Use :func:`_lean_lora_forward` on every PEFT LoRA Linear (plain, 4-bit, 8-bit); returns how many.

    For QLoRA this matters twice: PEFT would keep an fp32 copy of every projection input, and the
    upcast activations would also push attention off the bf16 varlen kernel.
    """
    types = _lean_lora_types()
    n = 0
    for mod in model.modules():
        if type(mod) in types and not hasattr(mod, "_fastpath_orig_forward"):
            mod._fastpath_orig_forward = mod.forward
            mod.forward = _lean_lora_forward.__get__(mod)
            n += 1
    return n


#: (module, {name: value before Liger}) for every transformers modeling module Liger patched
_PATCHED_MODULES: list[tuple[Any, dict]] = []


def _apply_liger(base) -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on a loaded model, where Liger knows its type.

    Liger patches the instance *and* the transformers modeling module (its classes and its
    ``apply_rotary_pos_emb``), so any model loaded later in this process would get Triton
    kernels too — the merge's fp32 reload on the CPU then fails ("Pointer argument cannot be
    accessed from Triton"). The module's previous values are kept for
    :func:`undo_module_patches`.
    """
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except Exception:  # noqa: BLE001
        return False
    module = sys.modules.get(type(base).__module__)
    before = dict(vars(module)) if module is not None else {}
    try:
        _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
        return True
    except Exception as err:  # noqa: BLE001
        log.warning("Liger kernels not applied: %s", err)
        return False
    finally:
        if module is not None:
            changed = {k: v for k, v in before.items() if vars(module).get(k) is not v}
            if changed:
                _PATCHED_MODULES.append((module, changed))


def undo_module_patches() -> int:
    """Put back what :func:`_apply_liger` changed in transformers' modeling modules (the model it
    was applied to keeps its patched layers, but may lose the RoPE kernel); returns how many names."""
    n = 0
    while _PATCHED_MODULES:
        module, changed = _PATCHED_MODULES.pop()
        for k, v in changed.items():
            setattr(module, k, v)
            n += 1
    return n
