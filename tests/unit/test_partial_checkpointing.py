"""Checkpointing some of the layers: under a memory cap where a 4,096-token micro-batch does not fit without
checkpointing, a 16-bit plan checkpoints the fewest decoder layers that let it fit (each layer left out saves its
recomputed forward), and prepare_model checkpoints exactly those: the first k layers run their forward twice per
step, the others once, and the gradients are those of no checkpointing."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from jobs.spec import TrainingSpec  # noqa: E402
from jobs.trainer import fastpath  # noqa: E402
from jobs.trainer.fastpath import planning  # noqa: E402
from tiny_models import llama3_8b, tiny_llama  # noqa: E402

pytestmark = pytest.mark.unit
FREE = int(78.7 * 2**30)


_llama8b = llama3_8b


@pytest.fixture(autouse=True)
def _as_on_an_h100(monkeypatch):
    monkeypatch.setattr(planning, "varlen_available", lambda device: True)
    monkeypatch.setattr(planning, "bnb_4bit_compiles", lambda: True)


def _plan(quantization="none", **training):
    return fastpath.plan(_llama8b(), TrainingSpec(**training), torch.device("cuda"), free_memory_bytes=FREE,
                         quantization=quantization)


def _per_tok(k):
    return fastpath.activation_bytes_per_token(_llama8b(), checkpointing=True, liger=True, checkpoint_layers=k)


def test_a_capped_16_bit_plan_checkpoints_the_fewest_layers_that_fit_a_4096_token_micro_batch():
    from jobs.trainer.fastpath.loss import CE_CHUNK

    n = fastpath.estimate_param_count(_llama8b())
    floor = planning.MIN_TOKENS_WITHOUT_CHECKPOINTING
    for method, cap in (("sft", 40), ("dpo", 40), ("sft", 32)):
        p = _plan(method=method, gpu_memory_gib=cap)
        k = p.checkpoint_layers
        assert p.gradient_checkpointing and k is not None and 0 < k < 32, (method, cap, p.notes)
        assert f"checkpointing on for {k} of 32 layers" in p.notes[-1]
        # what the weights, the LoRA state and the headroom leave of the cap holds the micro-batch with k layers
        # checkpointed, and would not hold 4,096 tokens with one layer fewer
        left = cap * 2**30 - n * 2 - 0.006 * n * 16 - (planning.HEADROOM_BYTES + 2 * CE_CHUNK * 128256 * 4)
        assert floor <= p.tokens_per_micro_batch and p.tokens_per_micro_batch * _per_tok(k) <= left, p.notes
        assert left // _per_tok(k - 1) < floor
    # a tighter cap checkpoints more layers
    assert _plan(gpu_memory_gib=32).checkpoint_layers > _plan(gpu_memory_gib=40).checkpoint_layers
    # the per-token estimate runs from no checkpointing (k=0) to every layer (k=32)
    assert _per_tok(0) == fastpath.activation_bytes_per_token(_llama8b(), checkpointing=False, liger=True)
    assert _per_tok(32) == fastpath.activation_bytes_per_token(_llama8b(), checkpointing=True, liger=True)


def test_every_layer_when_asked_for_or_quantised_and_none_when_it_fits():
    assert _plan(gradient_checkpointing=True).checkpoint_layers is None
    assert _plan(gradient_checkpointing=True).gradient_checkpointing is True
    q = _plan("4bit", max_seq_length=2048)  # dequantised per micro-batch: the largest micro-batch, every layer
    assert q.gradient_checkpointing and q.checkpoint_layers is None and q.tokens_per_micro_batch > 4096
    assert _plan(gpu_memory_gib=64).gradient_checkpointing is False
    tight = _plan(gpu_memory_gib=22)  # not even 31 layers' worth: every layer, the largest micro-batch that fits
    assert tight.gradient_checkpointing and tight.checkpoint_layers is None


def _tiny():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(layers=4), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def test_prepare_model_checkpoints_exactly_the_plans_first_layers_with_the_same_gradients():
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (4, 24), generator=g).tolist()]
    batch = fastpath.to_device(fastpath.pack_rows(rows, 256, seed=0)[0], "cpu")
    grads, calls = {}, {}
    for name, gc, k in (("none", False, None), ("first 2 of 4", True, 2), ("all", True, None)):
        model = _tiny()
        fastpath.prepare_model(model, fastpath.Plan(fastpath.ATTN_IMPL, torch.float32, gc, 256, False,
                                                    checkpoint_layers=k))
        layers = list(fastpath._unwrap(model).model.layers)
        counts = [0] * len(layers)
        for i, layer in enumerate(layers):
            # a pre-hook on the attention: the recompute stops early once it has what the backward needs
            layer.self_attn.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        model.train()
        loss, n = fastpath.lm_loss(model, batch)
        (loss / n).backward()
        grads[name] = {p_name: p.grad.clone() for p_name, p in model.named_parameters() if p.requires_grad}
        calls[name] = counts
    assert calls == {"none": [1, 1, 1, 1], "first 2 of 4": [2, 2, 1, 1], "all": [2, 2, 2, 2]}
    for name in ("first 2 of 4", "all"):
        for p_name, grad in grads["none"].items():
            torch.testing.assert_close(grads[name][p_name], grad, rtol=1e-5, atol=1e-6, msg=f"{name}: {p_name}")


def test_compiled_layers_checkpointed_or_not_share_one_graph_and_keep_the_gradients(monkeypatch):
    """The decoder layers compile on their own (regional compile, one graph for all): the checkpointed layers run
    that graph under torch.utils.checkpoint, the others without it; no second graph, the same gradients. Dynamo
    and AOTAutograd as on the GPU, inductor's code generation left out (aot_eager: 40 s -> a few on 2 cores)."""
    from torch._dynamo.utils import counters

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compile_module(self, **{**kw, "backend": "aot_eager"}))

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (1, 32), generator=g)
    grads = {}
    for name, gc, k, compiled in (("eager", False, None, False), ("compiled, 2 of 4", True, 2, True)):
        torch._dynamo.reset()
        counters.clear()
        model = fastpath.prepare_model(_tiny(), fastpath.Plan(fastpath.ATTN_IMPL, torch.float32, gc, 64, compiled,
                                                              checkpoint_layers=k))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        if compiled:
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for n, grad in grads["eager"].items():
        torch.testing.assert_close(grads["compiled, 2 of 4"][n], grad, rtol=1e-4, atol=1e-5, msg=n)
