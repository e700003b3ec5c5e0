"""Applying a plan to a loaded (PEFT-wrapped) model: attention, lean LoRA, kernels, FP8, checkpointing, compile."""
from __future__ import annotations

import logging
from typing import Any

from .attention import ensure_attention
from .compiling import compile_layers
from .fp8 import apply_fp8, fp8_recipe
from .kernels import _apply_liger, install_lean_lora
from .loss import CE_CHUNK_ATTR
from .parts import _decoder, _unwrap
from .planning import Plan

log = logging.getLogger(__name__)


def prepare_model(model, p: Plan) -> Any:
    """Apply a plan to a loaded (PEFT-wrapped) model: attention, lean LoRA, kernels, checkpointing, the loss's chunk.

    Registers :data:`jobs.trainer.fastpath.ATTN_IMPL` with transformers on first use. Returns the model
    (compiled layers when ``p.compile``). Call after ``get_peft_model``.
    """
    base = _unwrap(model)
    ensure_attention(base)
    install_lean_lora(model)
    if p.liger_kernels and p.compile:
        log.warning("Liger kernels and torch.compile do not combine (dynamo fails); using compile only")
    elif p.liger_kernels:
        _apply_liger(base)
    base.config.use_cache = False
    setattr(base, CE_CHUNK_ATTR, p.ce_chunk)  # the loss's chunk (jobs.trainer.fastpath.loss.ce_chunk)
    if p.fp8:
        n = apply_fp8(model)
        log.info("FP8: %d frozen projections run their GEMMs in float8 (%s scaling)", n, fp8_recipe())
    if p.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if p.checkpoint_layers is not None:  # the plan's first k layers recompute; the others keep activations
            for layer in list(_decoder(base).layers)[p.checkpoint_layers:]:
                layer.gradient_checkpointing = False
    if (p.gradient_checkpointing or p.compile) and hasattr(base, "enable_input_require_grads"):
        # checkpointing needs an input that requires grad; so does compile, for one graph for every
        # layer: the first layer's input comes from the frozen embedding, the others' require grad,
        # dynamo guards on that, and inductor compiled the first layer a second time (8B: 88.7 s ->
        # 81.0 s cold). The price is one layer's input gradient, which the embedding then drops.
        base.enable_input_require_grads()
    if p.compile:
        compile_layers(base)
    return model
