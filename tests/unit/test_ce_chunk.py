"""The loss's chunk, chosen by the plan: the budget keeps one chunk of fp32 logits and their gradient free (1.96 GiB
for Llama-3's 128,256-token vocabulary at 2,048 tokens a chunk). Found on an H100: the 8B in NF4 with
training.gpu_memory_gib: 9.2 was refused (weights ~5.6 GiB + LoRA state ~0.7 + 1 GiB allocator + 1.96 GiB of
logits > 9.2), while TRL's QLoRA DPO ran in 9.24 GiB. Where the default chunk leaves no room for one micro-batch,
the plan takes a smaller one (1,024, 512, 256 tokens), prepare_model puts it on the base, and the loss reads it
from there: same values and gradients, more chunks."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from jobs.errors import OutOfMemory  # noqa: E402
from jobs.formatting import size  # noqa: E402
from jobs.spec import TrainingSpec  # noqa: E402
from jobs.trainer import fastpath  # noqa: E402
from jobs.trainer.fastpath import loss as loss_mod  # noqa: E402
from jobs.trainer.fastpath import planning  # noqa: E402
from tiny_models import LLAMA3_8B, tiny_llama  # noqa: E402

pytestmark = pytest.mark.unit
FREE = int(79.1 * 2**30)  # an H100's free memory before the load
GIB = 2**30


@pytest.fixture(autouse=True)
def _as_on_an_h100(monkeypatch):
    monkeypatch.setattr(planning, "varlen_available", lambda device: True)
    monkeypatch.setattr(planning, "bnb_4bit_compiles", lambda: True)


def _plan(quantization="4bit", free=FREE, **training):
    return fastpath.plan(LLAMA3_8B, TrainingSpec(**training), torch.device("cuda"), free_memory_bytes=free,
                         quantization=quantization)


def _fixed_bytes(chunk: int) -> float:
    """The 8B NF4 plan's weights, LoRA state and headroom with a loss chunk of ``chunk`` tokens (planning's terms)."""
    n = fastpath.estimate_param_count(LLAMA3_8B)
    weights = n * 0.56 + 2 * 128256 * 4096 * (2 - 0.56)
    return weights + 0.006 * n * 16 + planning.QUANTIZED_HEADROOM_BYTES + 2 * chunk * 128256 * 4


def test_the_8b_in_4bit_plans_for_9_2_gib_with_a_smaller_loss_chunk_where_it_was_refused(monkeypatch):
    per_tok = fastpath.activation_bytes_per_token(LLAMA3_8B, checkpointing=True, liger=True)
    for method, seq, chunk in (("sft", 1024, 1024), ("dpo", 1024, 512), ("sft", 2048, 512)):
        unit = seq * (2 if method == "dpo" else 1)
        p = _plan(method=method, max_seq_length=seq, gpu_memory_gib=9.2)
        assert p.ce_chunk == chunk, (method, seq, p.notes)
        assert f"loss computed {chunk} tokens at a time (2048 does not fit the memory budget)" in p.notes, p.notes
        assert p.memory_budget_bytes == int(9.2 * GIB) and p.gradient_checkpointing
        assert p.tokens_per_micro_batch >= unit
        # the micro-batch, the chunk's logits and the rest fit the 9.2 GiB; the next larger chunk left no unit
        assert _fixed_bytes(chunk) + p.tokens_per_micro_batch * per_tok <= 9.2 * GIB
        assert _fixed_bytes(2 * chunk) + unit * per_tok > 9.2 * GIB
    # with the default chunk only (as before), the same budget is refused
    monkeypatch.setattr(planning, "CE_CHUNKS", (loss_mod.CE_CHUNK,))
    with pytest.raises(OutOfMemory, match="does not fit the GPU memory budget"):
        _plan(gpu_memory_gib=9.2)


def test_the_default_chunk_where_it_fits():
    for p in (_plan(), _plan(method="dpo", max_seq_length=2048), _plan("none"), _plan("none", gpu_memory_gib=24),
              _plan(gpu_memory_gib=10)):
        assert p.ce_chunk == loss_mod.CE_CHUNK, p.notes
        assert not any(n.startswith("loss computed") for n in p.notes), p.notes
    # auto raises a quantised run's 12 GiB floor for a long row rather than shrinking the chunk (as before)
    long = _plan(max_seq_length=16384)
    assert long.ce_chunk == loss_mod.CE_CHUNK and long.memory_budget_bytes > 12 * GIB, long.notes
    assert fastpath.Plan(fastpath.ATTN_IMPL, torch.float32, False, 64, False).ce_chunk == loss_mod.CE_CHUNK
    cpu = fastpath.plan(LLAMA3_8B, TrainingSpec(), torch.device("cpu"))
    assert cpu.ce_chunk == loss_mod.CE_CHUNK


def test_a_budget_too_small_even_for_the_smallest_chunk_is_refused_as_before():
    small = int(min(loss_mod.CE_CHUNKS) * 128256 * 4 * 2 + planning.QUANTIZED_HEADROOM_BYTES)
    # the weights do not fit: the same error and hint as before, the headroom counted with the smallest chunk
    with pytest.raises(OutOfMemory) as err:
        _plan(gpu_memory_gib=7)
    assert str(err.value).startswith("the base model does not fit the GPU memory budget: weights ~5.6 GiB")
    assert f"headroom {size(small)} > 7.0 GiB planned for per GPU" in str(err.value)
    hint = err.value.hint
    assert hint.startswith("raise training.gpu_memory_gib to ") and "(with training.max_seq_length 1024)" in hint
    need = int(hint.split("raise training.gpu_memory_gib to ")[1].split()[0])
    assert _plan(gpu_memory_gib=need).tokens_per_micro_batch >= 1024  # the advice is enough to plan
    # the weights fit, one row does not even with 256-token chunks: the max_seq_length refusal, as before
    with pytest.raises(OutOfMemory) as err:
        _plan(gpu_memory_gib=8.0)
    assert str(err.value).startswith("training.max_seq_length 1024 does not fit: one micro-batch holds a "
                                     "1024-token row whole"), err.value
    assert err.value.hint.startswith("lower training.max_seq_length to ")
    fits = int(err.value.hint.split("lower training.max_seq_length to ")[1].split()[0])
    p = _plan(gpu_memory_gib=8.0, max_seq_length=fits)
    assert p.ce_chunk == min(loss_mod.CE_CHUNKS), p.notes


def test_a_sharded_plan_counts_its_chunk_against_the_sharded_budget(monkeypatch):
    """FSDP2 (two processes, a 16-bit base): each rank's share of the weights, the gathered layers and the chunk's
    logits; a tighter budget per GPU takes a smaller chunk, as one GPU does."""
    def sharded(gib):
        return fastpath.plan(LLAMA3_8B, TrainingSpec(gpu_memory_gib=gib), torch.device("cuda"),
                             free_memory_bytes=FREE, world_size=2)

    p = sharded(14)
    assert p.fsdp and p.ce_chunk == loss_mod.CE_CHUNK, p.notes
    tight = sharded(12.5)
    assert tight.fsdp and tight.ce_chunk == 512 and tight.tokens_per_micro_batch >= 1024, tight.notes
    assert "loss computed 512 tokens at a time (2048 does not fit the memory budget)" in tight.notes
    monkeypatch.setattr(planning, "CE_CHUNKS", (loss_mod.CE_CHUNK,))
    with pytest.raises(OutOfMemory):
        sharded(12.5)


# ----------------------------------------------------------------------------- the loss reads the plan's chunk


def _tiny(head_cls=None):
    model = tiny_llama()
    if head_cls is not None:  # a head that is not a plain Linear: the loss recomputes each chunk in the backward
        head = head_cls(64, 128, bias=False)
        head.weight.data.copy_(model.lm_head.weight.data)
        model.lm_head = head
    return model


class _NotPlain(torch.nn.Linear):
    pass


def _batch():
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(4):
        ids = torch.randint(3, 128, (20 + 7 * i,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (2 + i) + ids[2 + i:]})
    return rows, fastpath.to_device(fastpath.pack_rows(rows, 1024, seed=0, shuffle=False)[0], "cpu")


def _reference(model, rows):
    """The plain transformers forward and one full cross-entropy per row: summed loss and per-row sums."""
    sums = []
    for r in rows:
        logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
        target = torch.tensor(r["labels"][1:])
        sums.append(F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum"))
    return torch.stack(sums)


@pytest.mark.parametrize("head_cls", [None, _NotPlain], ids=["plain-head", "recomputed-head"])
def test_the_loss_runs_the_plans_chunk_with_the_same_values_and_gradients(monkeypatch, head_cls):
    rows, batch = _batch()
    n_targets = int(batch["num_targets"])
    calls = []
    real_linear = loss_mod._linear_chunk_ce
    monkeypatch.setattr(loss_mod, "_linear_chunk_ce",
                        lambda hc, *a, **k: calls.append(hc.shape[0]) or real_linear(hc, *a, **k))
    real_fn = loss_mod._head_chunk_ce_fn

    def counted_fn(*a, **k):
        fn = real_fn(*a, **k)
        return lambda hc, yc: calls.append(hc.shape[0]) or fn(hc, yc)

    monkeypatch.setattr(loss_mod, "_head_chunk_ce_fn", counted_fn)
    results = {}
    for chunk in (loss_mod.CE_CHUNK, 16):
        model = _tiny(head_cls)
        plan = fastpath.Plan(fastpath.ATTN_IMPL, torch.float32, False, 1024, False, ce_chunk=chunk)
        fastpath.prepare_model(model, plan)
        assert loss_mod.ce_chunk(model) == chunk
        params = [p for p in model.parameters() if p.requires_grad]
        calls.clear()
        total, n = fastpath.lm_loss(model, batch)
        # forward chunks only (a recomputed head runs each chunk again in the backward)
        assert calls == [min(chunk, n_targets - s) for s in range(0, n_targets, chunk)], (chunk, calls)
        grads = torch.autograd.grad(total, params)
        sums, counts = fastpath.example_losses(model, batch)
        ref = _reference(model, rows)
        ref_grads = torch.autograd.grad(ref.sum(), params)
        assert n == n_targets == sum(counts)
        assert torch.allclose(total.detach(), ref.sum().detach(), rtol=1e-5)
        assert torch.allclose(sums.detach(), ref.detach(), rtol=1e-5)
        for a, b in zip(grads, ref_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        results[chunk] = (total.detach(), [g.detach() for g in grads])
    assert n_targets > 16 * 3  # the small chunk really splits the loss
    big, small = results[loss_mod.CE_CHUNK], results[16]
    assert torch.allclose(big[0], small[0], rtol=1e-5)
    for a, b in zip(big[1], small[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
