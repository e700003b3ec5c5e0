"""GPU checks of jobs.trainer.fastpath (skipped without CUDA): the varlen kernel against per-example SDPA,
the packed loss against separate examples in bf16, and the chunked CE against full logits.

Run on a GPU machine: ``python -m pytest -q tests/gpu/test_fastpath_gpu.py``.
"""
from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from jobs.trainer import fastpath  # noqa: E402
from jobs.trainer.fastpath.attention import _sdpa_per_example  # noqa: E402

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("hkv", [8, 2])
def test_varlen_attention_matches_per_example_sdpa(hkv):
    if not fastpath.varlen_available():
        pytest.skip("no varlen kernel in this torch")
    torch.manual_seed(0)
    lens = [1, 37, 300, 5, 1024, 64]
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    q = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = fastpath.varlen_attention_forward(None, q, k, v, None, scaling=128 ** -0.5,
                                               cu_seq_lens_q=cu, max_length_q=max(lens))
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _sdpa_per_example(qr, kr, vr, cu.tolist(), 128 ** -0.5).transpose(1, 2)
    rgrads = torch.autograd.grad((ref * g.double()).sum(), (qr, kr, vr))
    assert out.shape == (1, T, 8, 128)
    assert rel(out, ref) < 1e-2
    for a, b in zip(grads, rgrads):
        assert rel(a, b) < 2e-2


def test_chunked_ce_bf16_matches_full_logits():
    torch.manual_seed(0)
    h = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32000, 512, device="cuda") * 0.05).to(torch.bfloat16)
    y = torch.randint(0, 32000, (3000,), device="cuda")
    y[::7] = -100
    loss = fastpath.chunked_linear_ce(h, w, y, chunk=1024)
    (gh,) = torch.autograd.grad(loss, (h,))
    hr = h.detach().float().requires_grad_()
    ref = F.cross_entropy(hr @ w.float().t(), y, ignore_index=-100, reduction="sum")
    (rh,) = torch.autograd.grad(ref, (hr,))
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3
    assert rel(gh, rh) < 2e-2


def test_packed_lm_loss_bf16_equals_separate_examples():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    fastpath.install_lean_lora(model)
    model.eval()
    rng = random.Random(0)
    rows = []
    for _ in range(9):
        L = rng.randint(2, 700)
        ids = [rng.randrange(3, 4096) for _ in range(L)]
        rows.append({"input_ids": ids, "labels": ids})
    mb = fastpath.pack_rows(rows, 100000, seed=0)[0]
    loss, n = fastpath.lm_loss(model, fastpath.to_device(mb, "cuda"))
    ref, n_ref = 0.0, 0
    base = model.get_base_model()
    base.set_attn_implementation("sdpa")
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]], device="cuda")
            logits = base(input_ids=ids).logits[0].float()
            y = torch.tensor(r["input_ids"][1:] + [-100], device="cuda")
            ref += F.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item()
            n_ref += len(r["input_ids"]) - 1
    assert n == n_ref
    assert abs(loss.item() - ref) / ref < 5e-3, (loss.item(), ref)


def test_fp8_frozen_projection_is_close_to_bf16_and_its_compiled_step_is_faster():
    """One 8B-shape MLP projection (4096 -> 14336, 8k tokens) under a LoRA layer: bf16 vs FP8 (torchao),
    both compiled as the job compiles them; the input gradient only (the base is frozen). Prints the timings."""
    import time

    from peft import LoraConfig, get_peft_model

    if not fastpath.fp8_support(torch.device("cuda"))[0]:
        pytest.skip(fastpath.fp8_support(torch.device("cuda"))[1])

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(4096, 14336, bias=False)
            self.down = torch.nn.Linear(14336, 4096, bias=False)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.up(x)))

    def make(fp8):
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = get_peft_model(Block().to(torch.bfloat16), LoraConfig(r=16, target_modules=["up", "down"]))
        fastpath.install_lean_lora(m)
        if fp8:
            assert fastpath.apply_fp8(m) == 2
        return m, torch.compile(m, dynamic=True)

    x0 = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    out, times = {}, {}
    for fp8 in (False, True):
        m, fn = make(fp8)
        for n in (8192, 7937, 8192):  # two shapes (one not a multiple of 16): the dynamic graph, as in training
            x = x0[:n].clone().requires_grad_(True)
            fn(x).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            x = x0.clone().requires_grad_(True)
            y = fn(x)
            y.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        times[fp8] = (time.perf_counter() - t0) / 20
        out[fp8] = (y.detach(), x.grad)
    print(f"\nFP8 projection fwd+bwd: bf16 {times[False] * 1e3:.2f} ms, fp8 ({fastpath.fp8_recipe()}) "
          f"{times[True] * 1e3:.2f} ms, speed-up {times[False] / times[True]:.2f}x")
    assert rel(out[True][0], out[False][0]) < 0.08
    assert rel(out[True][1], out[False][1]) < 0.15
    assert times[True] < times[False], "FP8 must pay off on the frozen GEMMs (the weight gradient must be dropped)"
