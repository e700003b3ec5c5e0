"""The training hot path: padding-free packing, per-example attention, chunked loss, and the plan.

``jobs.trainer.train`` owns the loop (optimizer, schedule, accumulation, checkpoints); this package owns
what happens to the tokens inside one micro-batch and how the GPU is used. Its components:

* :mod:`.packing` — :func:`pack_rows` / :func:`pack_step` pack examples into padding-free micro-batches
  (position ids restart at 0 for each example); :func:`to_device` makes one a ``[1, T]`` row of tensors
  with ``cu_seq_lens`` (cumulative example lengths).
* :mod:`.attention` — :data:`ATTN_IMPL`, attention that never crosses an example boundary (PyTorch's
  flash varlen kernel on CUDA, SDPA per example elsewhere), and :func:`register_attention`.
* :mod:`.loss` — :func:`lm_loss`: the decoder once over a packed row, targets shifted inside each example,
  a chunked cross-entropy over the lm_head that never materialises the ``[T, vocab]`` logits;
  :func:`example_losses`: the same forward, each packed example's summed loss (validation, preference losses).
* :mod:`.planning` — :func:`plan`: dtype, checkpointing, compile, FP8, FSDP2 and tokens per micro-batch
  from the device and its free memory.
* :mod:`.prepare` — :func:`prepare_model` applies a plan to a loaded model (it registers the attention
  with transformers; importing this package changes nothing outside it).
* :mod:`.kernels` (lean LoRA, Liger), :mod:`.compiling` (per-layer torch.compile), :mod:`.fp8` (torchao
  float8 for the frozen base), :mod:`.parts` (the base model and decoder of a PEFT model).

torch is imported at module level: import this package only in the job.
"""
from __future__ import annotations

from .attention import ATTN_IMPL, register_attention, varlen_available, varlen_attention_forward
from .compiling import eager_layers, skip_cpu_isa_probe
from .fp8 import apply_fp8, fp8_recipe, fp8_support, remove_fp8
# Private names other modules still reach through the package: fastpath._unwrap / _decoder (jobs.trainer.distributed,
# jobs.trainer.strategies), fastpath._apply_liger (tests/unit/test_checkpoints_and_merge.py).
from .kernels import _apply_liger as _apply_liger
from .kernels import install_lean_lora, undo_module_patches
from .loss import (FSDP_LOSS_METHOD, base_example_losses, base_lm_loss, chunked_linear_ce, chunked_linear_token_ce,
                   example_losses, lm_loss)
from .packing import pack_rows, pack_step, to_device
from .parts import _decoder as _decoder
from .parts import _unwrap as _unwrap
from .planning import Plan, activation_bytes_per_token, estimate_param_count, plan, whole_base_fits
from .prepare import prepare_model

__all__ = [
    "ATTN_IMPL", "FSDP_LOSS_METHOD", "Plan", "activation_bytes_per_token", "apply_fp8",
    "base_example_losses", "base_lm_loss", "chunked_linear_ce", "chunked_linear_token_ce", "eager_layers",
    "example_losses", "estimate_param_count",
    "fp8_recipe", "fp8_support", "install_lean_lora", "lm_loss", "pack_rows", "pack_step", "plan",
    "prepare_model", "register_attention", "remove_fp8", "skip_cpu_isa_probe", "to_device", "undo_module_patches",
    "varlen_attention_forward", "varlen_available", "whole_base_fits",
]
