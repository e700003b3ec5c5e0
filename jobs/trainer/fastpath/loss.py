"""The loss of a packed row: the decoder once over it, then a chunked cross-entropy over the lm_head.

Only target positions go through the lm_head, and the ``[T, vocab]`` logits are never materialised in
full: :func:`chunked_linear_ce` computes the loss and its gradient one chunk of tokens at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import ensure_attention, packed_context
from .packing import IGNORE_INDEX
from .parts import _decoder, _unwrap

#: tokens per chunk of the cross-entropy by default (the plan keeps one chunk of fp32 logits and their gradient free)
CE_CHUNK = 2048
#: the chunks the planner tries, in order, when the default's logits do not fit the budget (Plan.ce_chunk)
CE_CHUNKS = (2048, 1024, 512, 256)
#: the attribute of the base model that holds the plan's chunk (set by jobs.trainer.fastpath.prepare_model)
CE_CHUNK_ATTR = "_lora_jobs_ce_chunk"
#: the method of an FSDP2-sharded base that runs :func:`base_lm_loss` as its root forward
#: (jobs.trainer.distributed)
FSDP_LOSS_METHOD = "lora_jobs_lm_loss"


def ce_chunk(base) -> int:
    """Tokens per chunk of the loss for this (unwrapped) base: its plan's :attr:`Plan.ce_chunk`, else
    :data:`CE_CHUNK`."""
    return int(getattr(base, CE_CHUNK_ATTR, CE_CHUNK))


def _linear_chunk_ce(hc, yc, weight, softcap):
    """One chunk's cross-entropy against a plain weight matrix (the hand-written-gradient path of
    :func:`chunked_linear_ce` and :func:`chunked_linear_token_ce`), with what its gradient needs: fp32 logits
    of ``hc @ weight.T`` (soft-capped), their logsumexp, the tanh of the cap (None without one), which targets
    count and the safe target ids; the per-token loss is ``(lse - picked) * valid``."""
    logits = hc @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    capped = None
    if softcap:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    lse = torch.logsumexp(logits, dim=-1)
    valid = yc != IGNORE_INDEX
    ysafe = torch.where(valid, yc, 0)
    picked = logits.gather(1, ysafe.unsqueeze(1)).squeeze(1)
    return logits, lse, capped, valid, ysafe, (lse - picked) * valid


def _chunk_grad_logits(logits, lse, capped, valid, ysafe):
    """d loss / d logits of one chunk, in place over ``logits``: softmax - onehot, zero on ignored rows, through
    the soft cap."""
    g = logits.sub_(lse.unsqueeze(1)).exp_()
    g.scatter_add_(1, ysafe.unsqueeze(1), -torch.ones_like(lse).unsqueeze(1))
    g.mul_(valid.unsqueeze(1))
    if capped is not None:
        g.mul_(1 - capped * capped)
    return g


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
            logits, lse, capped, valid, ysafe, token_loss = _linear_chunk_ce(hc, targets[s:s + chunk], weight, softcap)
            total += token_loss.sum()
            if grad_h is None and grad_w is None:
                continue
            g = _chunk_grad_logits(logits, lse, capped, valid, ysafe).to(h.dtype)
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


class _ChunkedLinearTokenCE(torch.autograd.Function):
    """CE(h_t @ W^T, y_t) for each token t (0 where y_t is ignored), chunked over tokens; ``W`` frozen.

    The per-token gradient of ``h`` is computed in the forward (one chunk of fp32 logits at a time, as
    :class:`_ChunkedLinearCE`) and scaled in the backward by each token's upstream gradient, so the per-token
    losses can be summed per example (or weighted in any way) without ``[N, vocab]`` ever existing.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, softcap: float | None):
        n = h.shape[0]
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        out = torch.zeros(n, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        for s in range(0, n, chunk):
            logits, lse, capped, valid, ysafe, out[s:s + chunk] = _linear_chunk_ce(
                h[s:s + chunk], targets[s:s + chunk], weight, softcap)
            if grad_h is None:
                continue
            g = _chunk_grad_logits(logits, lse, capped, valid, ysafe)
            grad_h[s:s + chunk] = g.to(h.dtype) @ weight
            del g, logits
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0))
        ctx.has_h = grad_h is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (gh,) = ctx.saved_tensors
        dh = gh * grad_out.to(gh.dtype).unsqueeze(1) if ctx.has_h else None
        return dh, None, None, None, None


def chunked_linear_token_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                            chunk: int = 4096, softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of each row of ``h @ weight.T`` against ``targets`` (0 where -100), fp32, ``[N]``.

    ``weight`` gets no gradient (a frozen lm_head: LoRA's case); :func:`example_losses` falls back to a
    recomputing path for a head that trains."""
    if weight.requires_grad:
        raise ValueError("chunked_linear_token_ce takes a frozen weight")
    return _ChunkedLinearTokenCE.apply(h, weight, targets, chunk, softcap)


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the target tokens of a packed row, and their number.

    ``model`` is a causal LM, PEFT-wrapped or not; ``batch`` comes from :func:`jobs.trainer.fastpath.to_device`.
    Divide the sum by the total target count of the optimizer step (over accumulation and ranks) to get
    the mean token loss. The decoder runs once over the packed row with per-example attention;
    only target positions go through the lm_head, in chunks.
    """
    base = _unwrap(model)
    sharded = getattr(base, FSDP_LOSS_METHOD, None)
    if sharded is not None:  # FSDP2: the loss is the root's forward (its params gathered for it)
        return sharded(batch)
    return base_lm_loss(base, batch)


def example_losses(model, batch: dict) -> tuple[torch.Tensor, list[int]]:
    """Each packed example's summed next-token loss (``[num_examples]`` fp32, differentiable: the negative of
    its summed target log-prob) and its number of target tokens (host ints, no GPU sync), from one forward.

    As :func:`lm_loss`, only target positions go through the lm_head, chunk by chunk; the per-token losses are
    then summed by the example each target position belongs to (``batch["target_example"]``)."""
    base = _unwrap(model)
    sharded = getattr(base, FSDP_LOSS_METHOD, None)
    if sharded is not None:
        return sharded(batch, per_example=True)
    return base_example_losses(base, batch)


def _target_hidden(base, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder once over the packed row; the hidden states of the target positions and their targets."""
    ensure_attention(base)
    dec = _decoder(base)
    cu = batch["cu_seq_lens"]
    max_len = batch["max_length"]
    with packed_context():
        out = dec(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
    hidden = hidden[0]  # [T, H]
    targets = batch["targets"][0]
    # only positions with a target go through the head (prompt tokens cost no lm_head work); each example's
    # last position has none, so this always selects
    if batch["num_targets"] < targets.numel():
        idx = batch["target_positions"]
        hidden = hidden.index_select(0, idx)
        targets = targets.index_select(0, idx)
    return hidden, targets


def _plain_head(head) -> bool:
    return isinstance(head, torch.nn.Linear) and head.bias is None and type(head) is torch.nn.Linear


def _head_chunk_ce_fn(head, softcap, reduction: str):
    """A function ``(hc, yc) -> cross-entropy`` of one chunk through any lm_head module (bias, LoRA on the
    head, quantised), ``reduction`` as :func:`torch.nn.functional.cross_entropy`'s: what
    ``torch.utils.checkpoint`` runs per chunk, recomputing its logits in the backward."""
    def chunk_loss(hc, yc):
        logits = head(hc).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, yc, ignore_index=IGNORE_INDEX, reduction=reduction)
    return chunk_loss


def base_lm_loss(base, batch: dict) -> tuple[torch.Tensor, int]:
    """:func:`lm_loss` on the unwrapped causal LM."""
    hidden, targets = _target_hidden(base, batch)
    n = batch["num_targets"]
    if n == 0:
        return hidden.sum() * 0.0, 0
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    chunk = ce_chunk(base)
    if _plain_head(head):
        return chunked_linear_ce(hidden, head.weight, targets, chunk=chunk, softcap=softcap), n
    # any other head (bias, LoRA on lm_head, quantised): recompute each chunk in the backward
    from torch.utils.checkpoint import checkpoint

    chunk_loss = _head_chunk_ce_fn(head, softcap, "sum")
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(chunk_loss, hidden[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
    return total, n


def base_example_losses(base, batch: dict) -> tuple[torch.Tensor, list[int]]:
    """:func:`example_losses` on the unwrapped causal LM."""
    hidden, targets = _target_hidden(base, batch)
    counts = list(batch["example_targets"])
    sums = hidden.new_zeros(len(counts), dtype=torch.float32)
    if batch["num_targets"] == 0:
        return sums + hidden.sum() * 0.0, counts
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    chunk = ce_chunk(base)
    if _plain_head(head) and not head.weight.requires_grad:
        per_token = chunked_linear_token_ce(hidden, head.weight, targets, chunk=chunk, softcap=softcap)
    else:  # a head that trains or is not a plain Linear: recompute each chunk in the backward
        from torch.utils.checkpoint import checkpoint

        chunk_loss = _head_chunk_ce_fn(head, softcap, "none")
        per_token = torch.cat([checkpoint(chunk_loss, hidden[s:s + chunk], targets[s:s + chunk],
                                          use_reentrant=False) for s in range(0, hidden.shape[0], chunk)])
    # each row of hidden is a target position (every example ends on one without a target): sum by example
    return sums.index_add(0, batch["target_example"], per_token.float()), counts
