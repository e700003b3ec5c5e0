"""Attention over packed rows: each example attends only to itself.

:data:`ATTN_IMPL` names our attention with transformers: PyTorch's flash varlen kernel on CUDA (Ampere+,
16-bit), causal SDPA per example elsewhere, plain SDPA with transformers' mask when a forward carries no
``cu_seq_lens_q`` (evaluation, generation). :func:`register_attention` adds it to transformers'
registries; importing this module registers nothing.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Any

import torch
import torch.nn.functional as F

from .parts import _unwrap

#: Name under which the packed-row attention is registered with transformers (:func:`register_attention`);
#: :func:`ensure_attention` switches a loaded model to it.
ATTN_IMPL = "lora_jobs_varlen"

_state = threading.local()


@contextlib.contextmanager
def packed_context():
    """While active, mask creation for :data:`ATTN_IMPL` is skipped (the varlen kernel needs none)."""
    prev = getattr(_state, "packed", False)
    _state.packed = True
    try:
        yield
    finally:
        _state.packed = prev


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return None, set()
    try:
        params = set(inspect.signature(varlen_attn).parameters)
    except (TypeError, ValueError):
        params = set()
    return varlen_attn, params


_VARLEN, _VARLEN_PARAMS = _varlen_kernel()
_GQA_NATIVE: bool | None = None  # learnt on first use when the kernel has no enable_gqa flag


def varlen_available(device: torch.device | None = None) -> bool:
    """Whether the flash varlen kernel can run on ``device`` (CUDA, compute capability >= 8.0)."""
    if _VARLEN is None or not torch.cuda.is_available():
        return False
    dev = device if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(dev)
    return major >= 8


def _call_varlen(q, k, v, cu, max_len, scale):
    """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D], causal inside each example."""
    global _GQA_NATIVE
    kw: dict[str, Any] = {}
    if "is_causal" in _VARLEN_PARAMS:
        kw["is_causal"] = True
    elif "window_size" in _VARLEN_PARAMS:
        kw["window_size"] = (-1, 0)
    else:  # unknown signature: positional is_causal was the first form
        kw["is_causal"] = True
    if "scale" in _VARLEN_PARAMS and scale is not None:
        kw["scale"] = scale
    gqa = q.shape[1] != k.shape[1]
    if gqa and "enable_gqa" in _VARLEN_PARAMS:
        kw["enable_gqa"] = True
    elif gqa and _GQA_NATIVE is not False:
        try:
            out = _VARLEN(q, k, v, cu, cu, max_len, max_len, **kw)
            _GQA_NATIVE = True
            return out
        except RuntimeError:
            _GQA_NATIVE = False
    if gqa and not kw.get("enable_gqa") and _GQA_NATIVE is False:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return _VARLEN(q, k, v, cu, cu, max_len, max_len, **kw)


def _sdpa_per_example(query, key, value, cu_list, scaling):
    """Reference path: query [1, Hq, T, D]; causal SDPA on each example separately."""
    outs = []
    gqa = query.shape[1] != key.shape[1]
    for s, e in zip(cu_list[:-1], cu_list[1:]):
        if e <= s:
            continue
        outs.append(F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                   is_causal=True, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query ``[B, Hq, T, D]`` -> (``[B, T, Hq, D]``, None).

    With ``cu_seq_lens_q`` and ``max_length_q`` in kwargs (packed row, B == 1): attention inside each example only.
    Without (evaluation, generation): plain SDPA with the mask transformers built.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed rows have batch size 1")
    if dropout:
        raise ValueError("attention dropout is not supported on packed rows")
    if (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _VARLEN is not None
            and torch.cuda.get_device_capability(query.device)[0] >= 8):
        max_len = kwargs["max_length_q"]
        q = query[0].transpose(0, 1)  # [T, Hq, D]
        k = key[0].transpose(0, 1)
        v = value[0].transpose(0, 1)
        out = _call_varlen(q, k, v, cu, int(max_len), scaling)
        return out.unsqueeze(0), None
    out = _sdpa_per_example(query, key, value, cu.tolist(), scaling)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def register_attention() -> None:
    """Register :data:`ATTN_IMPL` with transformers' attention and mask registries (once a process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args, **kwargs):
        if getattr(_state, "packed", False):
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(ATTN_IMPL, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPL, mask)


def ensure_attention(model) -> None:
    """Switch a loaded model to :data:`ATTN_IMPL`, registering it first (no-op when it already uses it)."""
    base = _unwrap(model)
    if getattr(base.config, "_attn_implementation", None) == ATTN_IMPL:
        return
    register_attention()
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(ATTN_IMPL)
    else:  # pragma: no cover - older transformers
        base.config._attn_implementation = ATTN_IMPL
