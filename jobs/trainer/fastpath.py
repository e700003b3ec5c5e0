"""The training hot path: padding-free packing, per-example attention, chunked loss, and the plan.

``jobs.trainer.train`` owns the loop (optimizer, schedule, accumulation, checkpoints); this module owns
what happens to the tokens inside one micro-batch and how the GPU is used:

* :func:`pack_rows` packs examples into padding-free micro-batches of at most ``max_tokens``
  tokens, with position ids that restart at 0 for each example.
* :func:`to_device` turns one into tensors of shape ``[1, T]`` plus ``cu_seq_lens`` (cumulative
  example lengths) for variable-length attention.
* :func:`lm_loss` runs a (PEFT-wrapped) causal LM over a packed row and returns the summed token
  loss and the number of target tokens. Attention never crosses an example boundary (a registered
  attention implementation, :data:`ATTN_IMPL`: PyTorch's flash varlen kernel on CUDA, scaled dot
  product attention per example elsewhere), targets are shifted inside each example, and the
  ``[T, vocab]`` logits are never materialised in full: the cross-entropy runs over the lm_head in
  chunks and computes its gradient on the fly.
* :func:`plan` picks dtype, attention, activation checkpointing and tokens per micro-batch from the
  device and its free memory; :func:`prepare_model` applies a plan to a loaded model.

torch and transformers are imported here at module level: import this module only in the job.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: Name under which the packed-row attention is registered with transformers. Pass it as
#: ``attn_implementation=`` to ``from_pretrained`` (importing this module registers it), or let
#: :func:`prepare_model` / :func:`lm_loss` switch a loaded model to it.
ATTN_IMPL = "lora_jobs_varlen"

# ----------------------------------------------------------------------------- packing


def _clean_row(row: dict, max_tokens: int) -> tuple[list[int], list[int]] | None:
    ids = list(row["input_ids"])
    labels = list(row["labels"]) if row.get("labels") is not None else list(ids)
    if len(labels) != len(ids):
        raise ValueError(f"row has {len(ids)} input_ids but {len(labels)} labels")
    if len(ids) > max_tokens:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
    if len(ids) < 2:
        return None  # nothing to predict
    return ids, labels


def pack_rows(rows: list[dict], max_tokens: int, *, seed: int, shuffle: bool = True) -> list[dict]:
    """Pack tokenised rows into padding-free micro-batches of at most ``max_tokens`` tokens.

    Each row has ``input_ids`` and ``labels`` (``-100`` on tokens that are not trained on; missing
    labels mean "train on every token"). Rows longer than ``max_tokens`` are truncated; rows of
    fewer than 2 tokens are dropped. The order is shuffled with ``seed`` (deterministic), then rows
    are packed greedily in that order (next fit), so every micro-batch holds a random mix of long
    and short examples. Each micro-batch is a dict of flat lists: ``input_ids``, ``labels``,
    ``position_ids`` (restarting at 0 for each example), and ``seq_lens``; ``labels`` are NOT
    shifted (the loss shifts them inside each example).
    """
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2")
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    batches: list[dict] = []
    cur: dict | None = None
    for i in order:
        cleaned = _clean_row(rows[i], max_tokens)
        if cleaned is None:
            continue
        ids, labels = cleaned
        if cur is None or len(cur["input_ids"]) + len(ids) > max_tokens:
            cur = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
            batches.append(cur)
        cur["input_ids"].extend(ids)
        cur["labels"].extend(labels)
        cur["position_ids"].extend(range(len(ids)))
        cur["seq_lens"].append(len(ids))
    return batches


def pack_step(rows: list[dict], max_tokens: int) -> list[dict]:
    """Pack one optimizer step's examples into as few micro-batches of <= ``max_tokens`` as fit.

    The step's examples are fixed (the guide's batch semantics); only their layout is chosen here.
    First-fit decreasing finds how many micro-batches are needed; the examples are then spread
    over that many as evenly as possible (longest first, each to the lightest micro-batch), so a
    step of 8.5k tokens under an 8k budget runs as two ~4.3k micro-batches rather than 8k + 0.5k:
    the same GEMM work, a lower memory peak, no tiny tail. Same fields as :func:`pack_rows`.
    """
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2")
    cleaned = [c for c in (_clean_row(r, max_tokens) for r in rows) if c is not None]
    cleaned.sort(key=lambda c: -len(c[0]))
    ffd: list[list] = []
    for item in cleaned:
        for b in ffd:
            if b[0] + len(item[0]) <= max_tokens:
                b[0] += len(item[0])
                b[1].append(item)
                break
        else:
            ffd.append([len(item[0]), [item]])
    groups = [b[1] for b in ffd]
    if len(ffd) > 1:
        balanced: list[list] = [[0, []] for _ in ffd]
        for item in cleaned:
            b = min(balanced, key=lambda x: x[0])
            b[0] += len(item[0])
            b[1].append(item)
        if all(b[0] <= max_tokens for b in balanced):
            groups = [b[1] for b in balanced]
    out = []
    for group in groups:
        b = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for ids, labels in group:
            b["input_ids"].extend(ids)
            b["labels"].extend(labels)
            b["position_ids"].extend(range(len(ids)))
            b["seq_lens"].append(len(ids))
        out.append(b)
    return out


def shifted_targets(labels: list[int], seq_lens: list[int]) -> list[int]:
    """Next-token targets of a packed row: ``labels[t+1]`` inside each example, -100 at its end."""
    out: list[int] = []
    pos = 0
    for n in seq_lens:
        seg = labels[pos:pos + n]
        out.extend(seg[1:])
        out.append(IGNORE_INDEX)
        pos += n
    return out


def to_device(mb: dict, device: torch.device | str, *, pad_to_multiple: int = 1) -> dict[str, Any]:
    """Tensors for one packed micro-batch.

    Returns ``input_ids``, ``position_ids``, ``labels`` (unshifted) and ``targets`` (shifted inside
    each example), all ``[1, T]`` int64; ``target_positions`` (``[num_targets]``, where targets are);
    ``cu_seq_lens`` (``[N+1]`` int32, cumulative example
    lengths) and, as plain ints (so the hot path never syncs with the GPU), ``max_length`` (longest
    example) and ``num_targets`` (tokens that carry a loss). ``pad_to_multiple`` > 1 appends one
    padding example (no targets) so T is a multiple of it (steadier shapes for ``torch.compile``).
    """
    device = torch.device(device)
    ids = list(mb["input_ids"])
    labels = list(mb["labels"])
    pos = list(mb["position_ids"])
    seq_lens = list(mb["seq_lens"])
    if sum(seq_lens) != len(ids):
        raise ValueError("seq_lens do not add up to the number of tokens")
    targets = shifted_targets(labels, seq_lens)
    pad = (-len(ids)) % max(1, pad_to_multiple)
    if pad:
        ids += [0] * pad
        labels += [IGNORE_INDEX] * pad
        targets += [IGNORE_INDEX] * pad
        pos += list(range(pad))
        seq_lens.append(pad)
    cu = [0]
    for n in seq_lens:
        cu.append(cu[-1] + n)
    pin = device.type == "cuda"

    def t(x, dtype=torch.long):
        ten = torch.tensor(x, dtype=dtype)
        if pin:
            ten = ten.pin_memory()
        return ten.to(device, non_blocking=pin)

    target_positions = [i for i, x in enumerate(targets) if x != IGNORE_INDEX]
    return {
        "input_ids": t([ids]),
        "target_positions": t(target_positions),
        "position_ids": t([pos]),
        "labels": t([labels]),
        "targets": t([targets]),
        "cu_seq_lens": t(cu, torch.int32),
        "max_length": max(seq_lens),
        "num_targets": len(target_positions),
        "num_tokens": len(ids) - pad,
    }


# ----------------------------------------------------------------------------- attention

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

    With ``cu_seq_lens_q`` in kwargs (packed row, B == 1): attention inside each example only.
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
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        q = query[0].transpose(0, 1)  # [T, Hq, D]
        k = key[0].transpose(0, 1)
        v = value[0].transpose(0, 1)
        out = _call_varlen(q, k, v, cu, int(max_len), scaling)
        return out.unsqueeze(0), None
    out = _sdpa_per_example(query, key, value, cu.tolist(), scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args, **kwargs):
        if getattr(_state, "packed", False):
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(ATTN_IMPL, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPL, mask)


_register()


# ----------------------------------------------------------------------------- loss


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_t CE(h_t @ W^T, y_t), chunked over tokens; the gradient is computed in the forward.

    Memory: one chunk of logits (fp32) at a time plus grad_h ``[N, H]``, never ``[N, vocab]``.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, softcap: float | None):
        n = h.shape[0]
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                              device=weight.device)
                  if ctx.needs_input_grad[1] else None)
        ctx.w_dtype = weight.dtype
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        for s in range(0, n, chunk):
            hc = h[s:s + chunk]
            yc = targets[s:s + chunk]
            logits = hc @ weight.t()
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            valid = yc != IGNORE_INDEX
            ysafe = torch.where(valid, yc, 0)
            picked = logits.gather(1, ysafe.unsqueeze(1)).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if grad_h is None and grad_w is None:
                continue
            # d/dlogits = softmax - onehot, zero on ignored rows
            g = logits.sub_(lse.unsqueeze(1)).exp_()
            g.scatter_add_(1, ysafe.unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
            g.mul_(valid.unsqueeze(1))
            if softcap:
                g.mul_(1 - capped * capped)
            g = g.to(h.dtype)
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ weight
            if grad_w is not None:
                grad_w += g.t() @ hc
            del g, logits
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0))
        ctx.has = (grad_h is not None, grad_w is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        has_h, has_w = ctx.has
        dh = gh * grad_out.to(gh.dtype) if has_h else None
        dw = (gw * grad_out).to(ctx.w_dtype) if has_w else None
        return dh, dw, None, None, None


def chunked_linear_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                      chunk: int = 4096, softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``h @ weight.T`` against ``targets`` (-100 ignored), fp32 result."""
    return _ChunkedLinearCE.apply(h, weight, targets, chunk, softcap)


def _liger_flce():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except Exception:  # noqa: BLE001
        return None
    return LigerFusedLinearCrossEntropyFunction


def _unwrap(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base


def _decoder(base):
    if hasattr(base, "get_decoder"):
        dec = base.get_decoder()
        if dec is not None:
            return dec
    return base.model


def ensure_attention(model) -> None:
    """Switch a loaded model to :data:`ATTN_IMPL` (no-op when it already uses it)."""
    base = _unwrap(model)
    if getattr(base.config, "_attn_implementation", None) == ATTN_IMPL:
        return
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(ATTN_IMPL)
    else:  # pragma: no cover - older transformers
        base.config._attn_implementation = ATTN_IMPL


#: which cross-entropy lm_loss uses: "auto" (Liger's fused kernel on CUDA when importable, else
#: chunked), "chunked", or "liger". Set by prepare_model from the plan.
CE_IMPL = "chunked"
CE_CHUNK = 2048


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the target tokens of a packed row, and their number.

    ``model`` is a causal LM, PEFT-wrapped or not; ``batch`` comes from :func:`to_device`. Divide
    the sum by the total target count of the optimizer step (over accumulation and ranks) to get
    the mean token loss. The decoder runs once over the packed row with per-example attention;
    only target positions go through the lm_head, in chunks.
    """
    base = _unwrap(model)
    sharded = getattr(base, FSDP_LOSS_METHOD, None)
    if sharded is not None:  # FSDP2: the loss is the root's forward (its params gathered for it)
        return sharded(batch)
    return base_lm_loss(base, batch)


#: the method of an FSDP2-sharded base that runs :func:`base_lm_loss` as its root forward (jobs.trainer.distributed)
FSDP_LOSS_METHOD = "lora_jobs_lm_loss"


def base_lm_loss(base, batch: dict) -> tuple[torch.Tensor, int]:
    """:func:`lm_loss` on the unwrapped causal LM."""
    ensure_attention(base)
    dec = _decoder(base)
    head = base.get_output_embeddings()
    cu = batch["cu_seq_lens"]
    max_len = batch["max_length"]
    with packed_context():
        out = dec(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
    hidden = hidden[0]  # [T, H]
    targets = batch["targets"][0]
    n = batch.get("num_targets")
    if n is None:
        n = int((targets != IGNORE_INDEX).sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    # only positions with a target go through the head (prompt tokens cost no lm_head work)
    if n < targets.numel():
        idx = batch.get("target_positions")
        if idx is None:
            idx = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        hidden = hidden.index_select(0, idx)
        targets = targets.index_select(0, idx)
    cfg = base.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    plain = isinstance(head, torch.nn.Linear) and head.bias is None and type(head) is torch.nn.Linear
    impl = CE_IMPL
    if impl == "auto":
        impl = "liger" if hidden.is_cuda and _liger_flce() is not None else "chunked"
    if plain and impl == "liger" and not softcap and hidden.is_cuda and _liger_flce() is not None:
        fn = _liger_flce()
        # args: input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        # label_smoothing, reduction
        loss = fn.apply(hidden.contiguous(), head.weight, targets, None, None, IGNORE_INDEX, 0.0, 0.0, "sum")
        if isinstance(loss, tuple):
            loss = loss[0]
        return loss.float(), n
    if plain:
        return chunked_linear_ce(hidden, head.weight, targets, chunk=CE_CHUNK, softcap=softcap), n
    # any other head (bias, LoRA on lm_head, quantised): recompute each chunk in the backward
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(hc, yc):
        logits = head(hc).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, yc, ignore_index=IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], CE_CHUNK):
        total = total + checkpoint(chunk_loss, hidden[s:s + CE_CHUNK], targets[s:s + CE_CHUNK],
                                   use_reentrant=False)
    return total, n


# ----------------------------------------------------------------------------- lean LoRA forward


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


# ----------------------------------------------------------------------------- plan


@dataclass
class Plan:
    attn_implementation: str
    dtype: torch.dtype
    gradient_checkpointing: bool
    tokens_per_micro_batch: int
    compile: bool
    notes: list[str] = field(default_factory=list)
    liger_kernels: bool = False      # Liger RMSNorm/SwiGLU/RoPE kernels on the decoder
    ce_impl: str = "chunked"         # "chunked" (ours) or "liger" (fused linear CE)
    lean_lora: bool = True           # LoRA in the activation dtype (see install_lean_lora)
    memory_budget_bytes: int | None = None  # GPU memory the plan fits into (None on CPU)
    fp8: bool = False                # FP8 GEMMs for the frozen base projections (see apply_fp8)
    fsdp: bool = False               # FSDP2: the base sharded over every rank (jobs.trainer.distributed.shard_model)


def _cfg(model_config, name, default=None):
    if isinstance(model_config, dict):
        return model_config.get(name, default)
    return getattr(model_config, name, default)


def estimate_param_count(model_config) -> int:
    h = int(_cfg(model_config, "hidden_size", 0) or 0)
    inter = int(_cfg(model_config, "intermediate_size", 4 * h) or 4 * h)
    layers = int(_cfg(model_config, "num_hidden_layers", 0) or 0)
    vocab = int(_cfg(model_config, "vocab_size", 0) or 0)
    heads = int(_cfg(model_config, "num_attention_heads", 1) or 1)
    kv = int(_cfg(model_config, "num_key_value_heads", heads) or heads)
    hd = int(_cfg(model_config, "head_dim", None) or (h // max(1, heads)))
    attn = h * heads * hd * 2 + h * kv * hd * 2
    mlp = 3 * h * inter
    tied = bool(_cfg(model_config, "tie_word_embeddings", False))
    return layers * (attn + mlp + 2 * h) + vocab * h * (1 if tied else 2) + h


def activation_bytes_per_token(model_config, *, checkpointing: bool, dtype_bytes: int = 2,
                               liger: bool = False) -> float:
    """Bytes of saved activations per token of a micro-batch (whole model), LoRA on all linears.

    No checkpointing: every layer keeps its inputs of the projections, the dropout copies for the
    LoRA branches, attention inputs/outputs and the MLP intermediates: about 17 hidden-sized and
    7 intermediate-sized tensors a layer with the eager RMSNorm/SwiGLU, 13 and 3.5 with Liger's
    kernels (which keep no fp32 copies); see benchmarks/README.md for the measured values.
    Checkpointing: one hidden-sized tensor a layer plus one layer's full set during recompute.
    """
    h = int(_cfg(model_config, "hidden_size", 0) or 0)
    inter = int(_cfg(model_config, "intermediate_size", 4 * h) or 4 * h)
    layers = int(_cfg(model_config, "num_hidden_layers", 1) or 1)
    ch, ci = (LIGER_HIDDEN_COEF, LIGER_INTER_COEF) if liger else (ACT_HIDDEN_COEF, ACT_INTER_COEF)
    per_layer = (ch * h + ci * inter) * dtype_bytes
    if checkpointing:
        return layers * h * dtype_bytes * 1.0 + per_layer
    return layers * per_layer


#: calibration of activation_bytes_per_token (see benchmarks/README.md)
ACT_HIDDEN_COEF = 17.0
ACT_INTER_COEF = 7.3
LIGER_HIDDEN_COEF = 13.0
LIGER_INTER_COEF = 4.1
#: model types whose decoder layers were measured to compile (dynamic shapes, varlen attention)
COMPILE_MODEL_TYPES = {"llama"}
#: above this micro-batch size the GEMMs are saturated; more tokens only cost memory (8B on an
#: H200: 15.2k tokens/s at 69 GiB with 8k-token micro-batches, 15.0k at 121 GiB with 16k)
MAX_TOKENS_PER_MICRO_BATCH = 8192
#: bytes kept free for the allocator, CUDA context and fragmentation (plus the loss chunk, in plan)
HEADROOM_BYTES = 2 * 2**30
#: the same for quantised runs, planned into a small budget (12 GiB): the 8B QLoRA plan with 2 GiB kept free
#: took 3,584-token micro-batches and peaked at 9.0 GiB of its 12 (benchmarks/README.md)
QUANTIZED_HEADROOM_BYTES = 1 * 2**30
#: what ``training.gpu_memory_gib: auto`` means for quantised runs: the guide's "4-12 GB of VRAM"
QUANTIZED_MEMORY_GIB = 12.0


def bnb_4bit_compiles() -> bool:
    """Whether bitsandbytes' 4-bit Linear traces into one dynamo graph: its matmul and dequantization
    are registered torch ops with fake kernels since 0.46 (bitsandbytes PR #1616, #1673)."""
    try:
        import bitsandbytes
        from packaging.version import Version

        return Version(bitsandbytes.__version__) >= Version("0.46")
    except Exception:  # noqa: BLE001 - not installed (CPU image) or an unparsable version
        return False


def memory_budget_bytes(training, quantization: str, free_memory_bytes: int) -> int:
    """GPU memory a run may plan for: the spec's ``gpu_memory_gib``, else all free memory for 16-bit
    LoRA and :data:`QUANTIZED_MEMORY_GIB` for QLoRA / 8-bit (so it also runs on a small card or a
    shared one); never more than is free."""
    want = getattr(training, "gpu_memory_gib", "auto")
    if want == "auto":
        want = QUANTIZED_MEMORY_GIB if quantization != "none" else None
    if want is None:
        return int(free_memory_bytes)
    return int(min(free_memory_bytes, float(want) * 2**30))


def plan(model_config, training, device: torch.device | str, *, free_memory_bytes: int | None = None,
         quantization: str = "none", world_size: int = 1) -> Plan:
    """Choose the fast path for this model on this device.

    * dtype: bf16 where the GPU supports it, else fp16; fp32 on CPU. ``training.precision`` wins
      when it is not "auto".
    * attention: :data:`ATTN_IMPL` always (packed rows need per-example attention); it runs the
      flash varlen kernel on CUDA (Ampere+) and SDPA per example elsewhere.
    * checkpointing and tokens per micro-batch: from the free memory, the weights and the
      calibrated activation cost per token: no checkpointing when a micro-batch of at least
      ``max(8192, 2 * max_seq_length)`` tokens fits without it, else checkpointing with the
      largest micro-batch that fits (capped at :data:`MAX_TOKENS_PER_MICRO_BATCH`).
      ``training.gradient_checkpointing`` true/false is obeyed.
    * compile: each decoder layer with ``torch.compile(dynamic=True)`` on CUDA for model types in
      :data:`COMPILE_MODEL_TYPES`, 16-bit or 4-bit (bitsandbytes' NF4 ops trace since 0.46), unless
      ``training.compile: off`` (+8% over Liger's kernels on the 8B benchmark); otherwise Liger's
      RMSNorm/SwiGLU/RoPE kernels when importable.
    * ``free_memory_bytes`` is the memory free BEFORE the model is loaded (default: free now); the
      plan fits into :func:`memory_budget_bytes` of it.
    * FSDP2 (``training.fsdp``, ``world_size`` training processes): auto shards the base when there
      is more than one process and the weights, the LoRA state, headroom and one max-length sequence
      (with checkpointing) do not fit the budget; on shards whenever there is more than one. A
      sharded plan counts weights and LoRA state / world_size plus the all-gathered layers FSDP
      holds at a time, and leaves out torch.compile and FP8. When the weights alone do not fit and
      the base is not sharded, planning fails (:class:`jobs.errors.OutOfMemory`) naming the fix.
    """
    device = torch.device(device)
    notes: list[str] = []
    fp8_req = getattr(training, "fp8", "off")
    if fp8_req == "on" and device.type != "cuda":
        _fp8_refused("this run has no GPU")
    max_seq = int(getattr(training, "max_seq_length", 1024))
    ctx = _cfg(model_config, "max_position_embeddings", None)
    if ctx:
        max_seq = min(max_seq, int(ctx))
    precision = getattr(training, "precision", "auto")
    gc_req = getattr(training, "gradient_checkpointing", "auto")
    fsdp_req = getattr(training, "fsdp", "auto")
    if fsdp_req == "on" and world_size <= 1:
        notes.append("fsdp: on has no effect with one training process: the whole base on one device")
        log.warning("training.fsdp: on has no effect with one training process (set resources.gpus above 1)")
    if device.type != "cuda":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        notes.append("CPU: attention is SDPA per example; no compile; fp32 unless asked otherwise")
        tokens = max(max_seq, 2048)
        # no memory model on a CPU: auto never shards there, on does (how FSDP2 is tested without GPUs)
        sharded = fsdp_req == "on" and world_size > 1 and quantization == "none"
        if sharded:
            notes.append(_fsdp_note(world_size))
        return Plan(ATTN_IMPL, dtype, gc_req is True, tokens, False, notes, False, "chunked", True, fsdp=sharded)

    try:
        bf16_ok = torch.cuda.is_bf16_supported()
    except Exception:  # noqa: BLE001 - planning for a GPU from a machine without one (tests)
        bf16_ok = True
    if precision == "auto":
        dtype = torch.bfloat16 if bf16_ok else torch.float16
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    fp8 = False
    if fp8_req != "off":
        ok, why = fp8_support(device)
        if ok and quantization != "none":
            ok, why = False, f"quantization {quantization} replaces the projections"
        if ok and dtype != torch.bfloat16:
            ok, why = False, f"precision is {str(dtype).removeprefix('torch.')}, FP8 training wants bf16"
        if not ok and fp8_req == "on":
            _fp8_refused(why)
        fp8 = ok
        notes.append(f"FP8 ({fp8_recipe()} scaling, torchao) for the frozen projections' forward and input-gradient "
                     "GEMMs; LoRA, attention, norms and the lm_head in bf16" if ok else f"FP8 off: {why}")
    if varlen_available(device) and dtype != torch.float32:
        notes.append("attention: flash varlen kernel (torch.nn.attention.varlen) over packed rows")
    else:
        notes.append("attention: SDPA per example (no varlen kernel for this device/dtype)")
    model_type = str(_cfg(model_config, "model_type", "") or "")
    compile_req = getattr(training, "compile", "auto")
    compile_ok = (compile_req != "off" and model_type in COMPILE_MODEL_TYPES and varlen_available(device)
                  and dtype != torch.float32 and (quantization == "none"
                                                  or (quantization == "4bit" and bnb_4bit_compiles())))
    liger = False
    if compile_req == "off":
        notes.append("torch.compile off (training.compile: off)")
    if compile_ok:
        notes.append("torch.compile of each decoder layer (fuses norms, SwiGLU, RoPE, dropout"
                     + (", and bitsandbytes' 4-bit dequantization into the same graph" if quantization == "4bit" else "")
                     + "; the first steps pay ~1-2 minutes of compilation)")
    else:
        try:
            import liger_kernel  # noqa: F401
            liger = True
            notes.append("Liger kernels importable: RMSNorm/SwiGLU/RoPE fused")
        except Exception:  # noqa: BLE001
            pass
    if free_memory_bytes is None:
        free_memory_bytes, _total = torch.cuda.mem_get_info(device)
    budget_total = memory_budget_bytes(training, quantization, free_memory_bytes)
    n_params = estimate_param_count(model_config)
    wbytes = {"4bit": 0.56, "8bit": 1.05}.get(quantization, torch.finfo(dtype).bits / 8)
    weights = n_params * wbytes
    if quantization != "none":  # embeddings and lm_head stay in 16 bit
        h = int(_cfg(model_config, "hidden_size", 0) or 0)
        vocab = int(_cfg(model_config, "vocab_size", 0) or 0)
        weights += 2 * vocab * h * (2 - wbytes)
    lora_state = 0.006 * n_params * 16  # ~0.5% of the params trainable at r=16: fp32 weight+grad+2 moments
    vocab = int(_cfg(model_config, "vocab_size", 0) or 0)
    # allocator slack + one chunk of fp32 logits (and its gradient)
    headroom = (QUANTIZED_HEADROOM_BYTES if quantization != "none" else HEADROOM_BYTES) + 2 * CE_CHUNK * vocab * 4
    budget = budget_total - weights - lora_state - headroom
    dbytes = torch.finfo(dtype).bits // 8
    fused = liger or compile_ok  # both keep no fp32 copies in the norms and one MLP intermediate less
    per_tok_nogc = activation_bytes_per_token(model_config, checkpointing=False, dtype_bytes=dbytes, liger=fused)
    per_tok_gc = activation_bytes_per_token(model_config, checkpointing=True, dtype_bytes=dbytes, liger=fused)
    fits_one_gpu = budget - max_seq * per_tok_gc >= 0
    sharded = (world_size > 1 and quantization == "none"
               and (fsdp_req == "on" or (fsdp_req == "auto" and not fits_one_gpu)))
    if sharded:
        # Each rank keeps 1/world of the weights and of the LoRA state (sharded DTensors, sharded AdamW
        # moments); FSDP2 all-gathers one decoder layer while the previous one computes (two layers at a
        # time) and keeps the root's embeddings and lm_head gathered from the loss's forward to its backward.
        n_layers = max(1, int(_cfg(model_config, "num_hidden_layers", 1) or 1))
        h = int(_cfg(model_config, "hidden_size", 0) or 0)
        root = vocab * h * (1 if bool(_cfg(model_config, "tie_word_embeddings", False)) else 2) + h
        layer = (n_params - root) / n_layers
        gathered = (2 * layer + root) * wbytes * (1 - 1 / world_size)
        weights = weights / world_size
        lora_state = lora_state / world_size
        budget = budget_total - weights - lora_state - headroom - gathered
        if compile_ok:
            compile_ok = False
            notes.append("torch.compile off: the layers are FSDP2-sharded (their all-gather hooks stay eager)")
            fused = liger
        if fp8 and fp8_req == "on":
            _fp8_refused("the base is FSDP2-sharded (training.fsdp), and FP8 is not wired into its all-gather: "
                         "set training.fp8: off, or training.fsdp: off if the base fits one GPU")
        if fp8:
            fp8 = False
            notes.append("FP8 off: FSDP2 would all-gather the bf16 weights; torchao's float8 all-gather is not wired in")
        per_tok_nogc = activation_bytes_per_token(model_config, checkpointing=False, dtype_bytes=dbytes, liger=fused)
        per_tok_gc = activation_bytes_per_token(model_config, checkpointing=True, dtype_bytes=dbytes, liger=fused)
        notes.append(_fsdp_note(world_size) + (" (the weights do not fit one GPU)" if not fits_one_gpu else ""))
    if budget <= 0:
        if world_size > 1 and not sharded:
            fix = ("set training.fsdp: auto or on to shard it over the run's "
                   f"{world_size} processes" if quantization == "none" else
                   "use a GPU with more memory (a quantised base is not sharded)")
        elif sharded:
            fix = (f"even 1/{world_size} of it does not fit: raise resources.gpus (or resources.nodes), or raise "
                   "training.gpu_memory_gib if it is set below the card's memory")
        else:
            fix = ("raise resources.gpus above 1 (training.fsdp: auto then shards the base over the GPUs), use "
                   "quantization.mode: 4bit, or a GPU with more memory")
        need_gib = math.ceil((weights + lora_state + headroom + max_seq * per_tok_gc) / 2**30)
        if (quantization != "none" and getattr(training, "gpu_memory_gib", "auto") == "auto"
                and need_gib * 2**30 <= free_memory_bytes):
            fix = (f"training.gpu_memory_gib: auto plans {quantization} runs for {QUANTIZED_MEMORY_GIB:g} GiB; "
                   f"{free_memory_bytes / 2**30:.0f} GiB are free: set training.gpu_memory_gib to {need_gib} or more"
                   + (", or use quantization.mode: 4bit" if quantization == "8bit" else "")
                   + (" (a quantised base is not sharded)" if world_size > 1 else ""))
        from jobs.errors import OutOfMemory

        raise OutOfMemory(f"the base model does not fit the GPU memory budget: weights ~{weights / 2**30:.1f} GiB "
                          f"+ LoRA state ~{lora_state / 2**30:.1f} GiB + headroom {headroom / 2**30:.1f} GiB "
                          f"> {budget_total / 2**30:.1f} GiB planned for per GPU"
                          + (f" ({world_size} processes, {'sharded' if sharded else 'each with the whole base'})"
                             if world_size > 1 else " (one training process)"), hint=fix)
    want = max(8192, 2 * max_seq)

    def fit(per_tok: float) -> int:
        t = int(budget // per_tok) if budget > 0 else 0
        return min(MAX_TOKENS_PER_MICRO_BATCH, (t // 256) * 256)

    if gc_req is True:
        gc = True
    elif gc_req is False:
        gc = False
    else:
        gc = fit(per_tok_nogc) < min(want, MAX_TOKENS_PER_MICRO_BATCH)
    tokens = fit(per_tok_gc if gc else per_tok_nogc)
    if tokens < max_seq:
        if not gc and gc_req != False:  # noqa: E712
            gc = True
            tokens = fit(per_tok_gc)
        if tokens < max_seq:
            notes.append(f"memory is tight: {tokens} tokens fit, using max_seq_length={max_seq} anyway")
            tokens = max_seq
    tokens = max(tokens, max_seq)
    notes.append(f"free {free_memory_bytes / 2**30:.1f} GiB, planning for {budget_total / 2**30:.1f} GiB, "
                 f"weights ~{weights / 2**30:.1f} GiB, activations ~{(per_tok_gc if gc else per_tok_nogc) / 2**20:.2f} MiB/token "
                 f"-> {tokens} tokens per micro-batch, checkpointing {'on' if gc else 'off'}")
    return Plan(ATTN_IMPL, dtype, gc, tokens, compile_ok, notes, liger, "chunked", True, budget_total, fp8,
                fsdp=sharded)


def whole_base_fits(model_config, p: Plan) -> bool:
    """Whether the whole (unsharded) base fits the plan's GPU memory budget for generations: what rank 0 needs
    at the end of an FSDP2 run (evaluation, the adapter's files, the merge), where one GPU no longer has the
    other ranks' shards. True on CPU (no budget)."""
    if p.memory_budget_bytes is None:
        return True
    weights = estimate_param_count(model_config) * torch.finfo(p.dtype).bits / 8
    return weights + HEADROOM_BYTES <= p.memory_budget_bytes


def _fsdp_note(world_size: int) -> str:
    return (f"FSDP2: the frozen base and the LoRA weights sharded over {world_size} processes (fully_shard per "
            "decoder layer and at the root); gradients reduce-scattered")


def skip_cpu_isa_probe() -> None:
    """Tell inductor not to probe the CPU's vector instructions. The layers compile for the GPU, but
    inductor still asks which SIMD extension the host has, building and running a test program per
    candidate (AMX, AVX-512, AVX2), each run a new Python that imports torch: ~25 s of the 8B first
    step, paid again by every warm start (benchmarks/README.md). Only host-side C++ helpers would be
    vectorised by it. Left alone when ``$TORCHINDUCTOR_VEC_ISA_OK`` is set."""
    if os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") is not None:
        return
    os.environ["TORCHINDUCTOR_VEC_ISA_OK"] = "0"  # compile workers started from here on
    try:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.vec_isa_ok = False
    except Exception as err:  # noqa: BLE001 - another torch: the probe runs, nothing else changes
        log.debug("inductor's CPU ISA probe left on (%s: %s)", type(err).__name__, err)


def prepare_model(model, p: Plan) -> Any:
    """Apply a plan to a loaded (PEFT-wrapped) model: attention, lean LoRA, kernels, checkpointing.

    Returns the model (compiled layers when ``p.compile``). Call after ``get_peft_model``.
    """
    global CE_IMPL
    base = _unwrap(model)
    ensure_attention(base)
    CE_IMPL = p.ce_impl
    if p.lean_lora:
        install_lean_lora(model)
    if p.liger_kernels and p.compile:
        log.warning("Liger kernels and torch.compile do not combine (dynamo fails); using compile only")
    elif p.liger_kernels:
        _apply_liger(base)
    base.config.use_cache = False
    if p.fp8:
        n = apply_fp8(model)
        log.info("FP8: %d frozen projections run their GEMMs in float8 (%s scaling)", n, fp8_recipe())
    if p.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if (p.gradient_checkpointing or p.compile) and hasattr(base, "enable_input_require_grads"):
        # checkpointing needs an input that requires grad; so does compile, for one graph for every
        # layer: the first layer's input comes from the frozen embedding, the others' require grad,
        # dynamo guards on that, and inductor compiled the first layer a second time (8B: 88.7 s ->
        # 81.0 s cold). The price is one layer's input gradient, which the embedding then drops.
        base.enable_input_require_grads()
    if p.compile:
        if next(base.parameters()).is_cuda:
            skip_cpu_isa_probe()
        for layer in _decoder(base).layers:
            layer.compile(dynamic=True)
    return model


# ----------------------------------------------------------------------------- FP8 (frozen base)

#: torchao float8 recipe: "tensorwise" (one dynamic scale per tensor, e4m3 forward / e5m2 gradients:
#: torchao's default and its fastest) or "rowwise" (a scale per row, e4m3 throughout: more accurate,
#: slower kernels). The environment variable is for benchmarks; the spec only says on/off/auto.
FP8_RECIPE_ENV = "LORA_JOBS_FP8_RECIPE"
FP8_RECIPES = ("tensorwise", "rowwise")


def fp8_recipe() -> str:
    recipe = os.environ.get(FP8_RECIPE_ENV, "tensorwise")
    return recipe if recipe in FP8_RECIPES else "tensorwise"


def fp8_support(device) -> tuple[bool, str]:
    """Whether FP8 training of the frozen projections can run on ``device``; if not, why."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "not a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"this GPU (compute capability {major}.{minor}) has no FP8 matmuls; they need 8.9+"
    try:
        import torchao.float8  # noqa: F401
    except Exception as err:  # noqa: BLE001 - not installed, or built for another torch
        return False, f"torchao's float8 does not import ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return True, "ok"


def _fp8_refused(why: str):
    from jobs.errors import Problem, SpecError

    raise SpecError([Problem("training.fp8", f"training.fp8 is on, but {why}",
                             "use a GPU with FP8 matmuls (L4, L40S, H100, H200, B200 and newer) with torchao "
                             "installed, or set training.fp8: auto (FP8 where it can run) or off")])


def _fp8_candidate(module, fqn: str) -> bool:
    # only the frozen nn.Linear under a PEFT LoRA layer; FP8 GEMMs want both dims divisible by 16
    return (type(module) is torch.nn.Linear and fqn.split(".")[-1] == "base_layer"
            and not module.weight.requires_grad and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def apply_fp8(model) -> int:
    """Swap the frozen base projections under PEFT's LoRA layers for FP8 ones (torchao's float8).

    Their forward and input-gradient GEMMs then run in FP8 with dynamic scaling; the weight
    gradient is never computed (see :func:`_frozen_float8_linear`). LoRA A/B, the embeddings and
    the lm_head keep their dtype. The weights are shared, not copied. :func:`remove_fp8` puts the
    original modules back. Returns how many were swapped.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    recipe = fp8_recipe()
    config = Float8LinearConfig() if recipe == "tensorwise" else Float8LinearConfig.from_recipe_name(recipe)
    originals: dict[str, torch.nn.Module] = {}

    def pick(module, fqn):
        if _fp8_candidate(module, fqn):
            originals[fqn] = module
            return True
        return False

    convert_to_float8_training(model, module_filter_fn=pick, config=config)
    frozen = _frozen_float8_linear()
    for fqn in originals:
        model.get_submodule(fqn).__class__ = frozen
    model.__dict__["_fastpath_fp8_originals"] = originals
    return len(originals)


_FROZEN_FLOAT8: list[type] = []


def _frozen_float8_linear() -> type:
    """torchao's ``Float8Linear`` for a frozen weight: forward and input gradient only.

    torchao's matmul (``matmul_with_hp_or_float8_args``) always computes the weight gradient as
    well: a third GEMM that a frozen base throws away, and one whose inner dimension is the
    micro-batch's token count, which FP8 GEMMs need divisible by 16, so ``torch.compile`` with
    dynamic shapes refuses it ("Expected self.size(1) to be divisible by 16", GPU call 8). This
    one does the same casts (torchao's ``hp_tensor_to_float8_dynamic``, the config's scaling) for
    the two GEMMs that a frozen projection needs, and saves only the weight for the backward, not
    its input.
    """
    if _FROZEN_FLOAT8:
        return _FROZEN_FLOAT8[0]
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    def cast(t, cast_config, mm_config, role, dim, config):
        return hp_tensor_to_float8_dynamic(
            t, cast_config.target_dtype, mm_config, gemm_input_role=role,
            scaling_granularity=cast_config.scaling_granularity,
            axiswise_dim=get_maybe_axiswise_dim(dim, cast_config.scaling_granularity),
            round_scales_to_power_of_2=config.round_scales_to_power_of_2)

    @torch._dynamo.allow_in_graph
    class FrozenFloat8Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight_t, mm_config, config):
            ctx.save_for_backward(weight_t)
            ctx.mm_config, ctx.config = mm_config, config
            x8 = cast(x.reshape(-1, x.shape[-1]), config.cast_config_input, mm_config, GemmInputRole.INPUT, -1, config)
            w8 = cast(weight_t, config.cast_config_weight, mm_config, GemmInputRole.WEIGHT, 0, config)
            out = torch.mm(x8, w8)
            return out.reshape(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad_out):
            (weight_t,) = ctx.saved_tensors
            c = ctx.config
            g = grad_out.reshape(-1, grad_out.shape[-1])
            g8 = cast(g, c.cast_config_grad_output, ctx.mm_config, GemmInputRole.GRAD_OUTPUT, -1, c)
            w8 = cast(weight_t, c.cast_config_weight_for_grad_input, ctx.mm_config, GemmInputRole.WEIGHT, -1, c)
            grad_in = torch.mm(g8, w8.t())
            return grad_in.reshape(*grad_out.shape[:-1], grad_in.shape[-1]), None, None, None

    class FrozenFloat8Linear(Float8Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled():
                input = input.to(torch.get_autocast_gpu_dtype())
            out = FrozenFloat8Matmul.apply(input, self.weight.t(), self.linear_mm_config, self.config)
            return out if self.bias is None else out + self.bias.to(out.dtype)

    _FROZEN_FLOAT8.append(FrozenFloat8Linear)
    return FrozenFloat8Linear


def remove_fp8(model) -> int:
    """Put back the bf16 projections that :func:`apply_fp8` swapped; returns how many (0 when none)."""
    originals = model.__dict__.pop("_fastpath_fp8_originals", None) or {}
    for fqn, module in originals.items():
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, module)
    return len(originals)


@contextlib.contextmanager
def eager_layers(model):
    """Run the decoder layers uncompiled for a while (generation: a KV cache changes shape every
    token, which would recompile the per-layer graphs until dynamo's limit)."""
    layers = list(_decoder(_unwrap(model)).layers)
    saved = [getattr(layer, "_compiled_call_impl", None) for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield model
    finally:
        for layer, impl in zip(layers, saved):
            layer._compiled_call_impl = impl


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
    import sys

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


def mfu(tokens_per_s: float, n_params: int, peak_flops: float = 989e12, *, checkpointing: bool = False) -> float:
    """Model FLOPs utilisation of LoRA training: ~4N FLOPs a token (6N with recompute)."""
    return (6 if checkpointing else 4) * n_params * tokens_per_s / peak_flops


__all__ = ["ATTN_IMPL", "IGNORE_INDEX", "Plan", "chunked_linear_ce", "ensure_attention", "install_lean_lora",
           "lm_loss", "pack_rows", "plan", "prepare_model", "shifted_targets", "to_device",
           "varlen_attention_forward"]
