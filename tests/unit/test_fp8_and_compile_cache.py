"""FP8 and the compile cache without a GPU: the spec field, the plan's decision, which modules are
swapped, and a compile cache that loads only what this run's key signed (tests/gpu runs them for real)."""
from __future__ import annotations

import logging
import sys
import types

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from jobs.trainer import compile_cache as cc  # noqa: E402
from jobs.trainer import fastpath  # noqa: E402
from jobs.trainer.fastpath import fp8 as fastpath_fp8  # noqa: E402
from jobs.errors import SpecError  # noqa: E402
from jobs.spec import TrainingSpec, parse_spec  # noqa: E402
from jobs.storage import LocalStore  # noqa: E402

pytestmark = pytest.mark.unit

BASE = {"name": "support-bot", "base_model": {"uri": "s3://models/m/"},
        "dataset": {"train": "s3://data/train.jsonl"}, "output": "s3://runs/lora"}
LLAMA = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192}


@pytest.fixture(autouse=True)
def no_cpu_isa_probe(monkeypatch):
    """inductor's probe of the CPU's vector instructions (a test program built and run per candidate, paid by a
    process's first CPU compile: ~12 s of this file on the 2-core machine) is not what these tests are about: off,
    as the subprocesses below have it (TORCHINDUCTOR_VEC_ISA_OK=0); the probe's own switch is the subject of
    test_gpu_compiles_skip_inductors_cpu_isa_probe_unless_the_user_set_it, in a process of its own."""
    from torch._inductor import config

    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "0")
    saved, config.cpp.vec_isa_ok = config.cpp.vec_isa_ok, False  # (monkeypatch.setattr refuses a config proxy)
    yield
    config.cpp.vec_isa_ok = saved


# ------------------------------------------------------------------ spec and plan

def test_fp8_is_off_by_default_and_off_keeps_every_earlier_spec_hash():
    plain = parse_spec(BASE)
    assert plain.training.fp8 == "off"
    assert plain.spec_hash() == parse_spec({**BASE, "training": {"fp8": "off"}}).spec_hash()
    on = parse_spec({**BASE, "training": {"fp8": "on"}})
    assert on.spec_hash() != plain.spec_hash()  # FP8 changes the numbers: another run, other checkpoints


def test_fp8_on_with_quantization_or_without_a_gpu_is_refused_with_the_field_named():
    with pytest.raises(SpecError) as err:
        parse_spec({**BASE, "training": {"fp8": "on"}, "quantization": {"mode": "4bit"}})
    assert "training.fp8" in str(err.value)
    with pytest.raises(SpecError):
        parse_spec({**BASE, "training": {"fp8": "on"}, "resources": {"gpus": 0}})
    with pytest.raises(SpecError):
        parse_spec({**BASE, "training": {"fp8": "sometimes"}})
    parse_spec({**BASE, "training": {"fp8": "auto"}, "quantization": {"mode": "4bit"}})  # auto just stays off


def test_plan_fp8_auto_falls_back_with_a_note_and_on_fails_where_fp8_cannot_run():
    # no GPU in this process: "cuda" plans (as in the other plan tests) see no FP8 support
    auto = fastpath.plan(LLAMA, TrainingSpec(fp8="auto"), torch.device("cuda"), free_memory_bytes=139 * 2**30)
    assert auto.fp8 is False and any(n.startswith("FP8 off:") for n in auto.notes)
    assert fastpath.plan(LLAMA, TrainingSpec(), torch.device("cuda"), free_memory_bytes=139 * 2**30).fp8 is False
    for device in ("cuda", "cpu"):
        with pytest.raises(SpecError) as err:
            fastpath.plan(LLAMA, TrainingSpec(fp8="on"), torch.device(device), free_memory_bytes=139 * 2**30)
        assert err.value.problems[0].where == "training.fp8"


def test_apply_fp8_swaps_only_the_frozen_base_projections_and_remove_puts_them_back(monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, target_modules="all-linear"))
    swapped = []

    class FakeFloat8Linear(torch.nn.Linear):
        pass

    def convert(model, *, module_filter_fn, config):  # torchao's module swap, by its contract
        for fqn, mod in list(model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and module_filter_fn(mod, fqn):
                new = FakeFloat8Linear(mod.in_features, mod.out_features, bias=False, device="meta")
                new.weight = mod.weight
                parent, _, name = fqn.rpartition(".")
                setattr(model.get_submodule(parent), name, new)
                swapped.append(fqn)
        return model

    float8 = types.ModuleType("torchao.float8")
    float8.convert_to_float8_training = convert
    float8.Float8LinearConfig = type("Float8LinearConfig", (), {"from_recipe_name": staticmethod(lambda n: n)})
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", float8)
    frozen = type("FrozenFakeFloat8Linear", (FakeFloat8Linear,), {})
    monkeypatch.setattr(fastpath_fp8, "_frozen_float8_linear", lambda: frozen)

    before = {n: type(m) for n, m in model.named_modules()}
    assert fastpath.apply_fp8(model) == 2 * 7  # q k v o gate up down in each of 2 layers
    assert all(f.endswith(".base_layer") for f in swapped)
    assert not any("lora_" in f or "lm_head" in f for f in swapped)
    assert type(model.get_submodule(swapped[0])) is frozen
    assert fastpath.remove_fp8(model) == 14
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert fastpath.remove_fp8(model) == 0


# ------------------------------------------------------------------ compile cache

def test_a_sealed_blob_opens_only_with_its_key_and_unchanged():
    blob = cc.seal(b"graphs and kernels", b"k1")
    assert cc.unseal(blob, b"k1") == b"graphs and kernels"
    assert cc.unseal(blob, b"k2") is None
    assert cc.unseal(blob[:-1] + b"X", b"k1") is None
    assert cc.unseal(b"graphs and kernels", b"k1") is None


def test_the_cache_round_trips_through_the_store_and_refuses_what_another_key_wrote(tmp_path, monkeypatch, caplog):
    loaded = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled" * 100, None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data))
    store = LocalStore(str(tmp_path))
    key = cc.cache_key({"hidden_size": 64}, {"fp8": None})
    assert key == cc.cache_key({"hidden_size": 64}, {"fp8": None}) != cc.cache_key({"hidden_size": 64}, {"fp8": "x"})

    first = cc.CompileCache(store, "runs/bot", key, b"secret")
    assert first.restore() is False and first.outcome.startswith("cold")
    assert first.save() == 800 and first.save() == 0  # nothing new the second time
    again = cc.CompileCache(store, "runs/bot", key, b"secret")
    assert again.restore() is True and loaded == [b"compiled" * 100] and again.summary()["outcome"] == "warm"

    planted = cc.CompileCache(store, "runs/bot", key, b"someone else's key")
    with caplog.at_level(logging.WARNING, logger="jobs"):
        assert planted.restore() is False
    assert "not loaded" in caplog.text and len(loaded) == 1  # never handed to torch


def test_without_a_key_there_is_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: pytest.fail("must not be called"))
    assert cc.signing_key({}) is None
    assert cc.signing_key({"AWS_SECRET_ACCESS_KEY": "s3"}) == b"s3"
    assert cc.signing_key({cc.KEY_ENV: "k", "AWS_SECRET_ACCESS_KEY": "s3"}) == b"k"
    off = cc.CompileCache(LocalStore(str(tmp_path)), "runs/bot", "abc", None)
    assert off.restore() is False and off.save() == 0 and off.outcome == "off (no key)"


def test_bare_yaml_on_and_off_mean_on_and_off():
    from jobs.spec import load_spec_text

    text = "name: bot\nbase_model: {uri: s3://models/x/}\ndataset: {train: s3://data/t.jsonl}\noutput: s3://runs/l\n"
    assert load_spec_text(text + "training: {fp8: on}\n").training.fp8 == "on"
    assert load_spec_text(text + "training: {fp8: off}\n").training.fp8 == "off"


_TWO_SAVES = r'''
import json, sys, torch
from torch._dynamo.utils import counters
from jobs.trainer.compile_cache import CompileCache
from jobs.storage import LocalStore
cache = CompileCache(LocalStore(sys.argv[1]), "runs/bot", "k", b"secret")
warm = cache.restore()
def step(x):  # stands in for the training step's graphs, saved after step 1
    return torch.nn.functional.silu(x) * 3 + 1
def validate(x):  # stands in for the validation graphs, saved again at the end
    return (x.cos() - 2).sum(-1)
torch.compile(step, dynamic=True)(torch.randn(16, 8))
cache.save()
torch.compile(validate, dynamic=True)(torch.randn(4, 8))
cache.save()
print(json.dumps({"warm": warm, "hit": counters["inductor"]["fxgraph_cache_hit"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"]}))
'''


def test_a_retry_restores_every_graph_of_a_run_that_saved_twice(tmp_path):
    """torch's own round trip, no stand-ins: a run saves after its first step and again after validation;
    a retry in a fresh process with an empty inductor folder finds both graphs (torch 2.11 alone keeps
    only the last save's batch, so the first step's graphs compiled again)."""
    import json
    import os
    import subprocess
    from pathlib import Path

    def run(inductor: str) -> dict:
        # no CPU ISA probe (~19 s a process on 2 cores): the subject is the cache, not vectorised code
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / inductor), "TORCHINDUCTOR_VEC_ISA_OK": "0",
               "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        out = subprocess.run([sys.executable, "-c", _TWO_SAVES, str(tmp_path / "store")], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run("inductor-1")
    assert first == {"warm": False, "hit": 0, "miss": 2}
    retry = run("inductor-2")
    assert retry == {"warm": True, "hit": 2, "miss": 0}


def test_the_first_save_records_where_the_compile_time_went(tmp_path):
    torch.compile(lambda x: x.sin() + 1, dynamic=True)(torch.randn(8))
    cache = cc.CompileCache(LocalStore(str(tmp_path)), "runs/bot", "k", None)  # no key: nothing written
    assert cache.save() == 0
    phases = cache.summary()["phases_first_save"]
    assert phases and all(isinstance(v, float) and v >= 0 for v in phases.values())
    assert any("compile" in name for name in phases), phases
    assert cache.summary()["counters_first_save"].get("graphs", 0) >= 1


def test_every_compiled_decoder_layer_shares_one_graph():
    """Regional compile pays off only when the layers reuse one compiled graph. The first layer's input
    comes from the frozen embedding (no grad) and the others' do not, so without the plan's fix the
    first layer was a graph of its own that inductor compiled again: half the 8B first step."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model = fastpath.prepare_model(model, fastpath.Plan(fastpath.ATTN_IMPL, torch.float32, False, 64, True))
    ids = torch.randint(0, 128, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_gpu_compiles_skip_inductors_cpu_isa_probe_unless_the_user_set_it(monkeypatch):
    """The probe builds and runs a test program per SIMD extension (~19 s on a 2-core host, ~25 s of the
    8B first step on the GPU host); skip_cpu_isa_probe turns it off (in a fresh process, where nothing has set
    it yet), and leaves a user's choice alone (here: no_cpu_isa_probe restores inductor's config afterwards)."""
    import os
    import subprocess
    from pathlib import Path

    from torch._inductor import config

    code = ("import time; from jobs.trainer import fastpath; fastpath.skip_cpu_isa_probe()\n"
            "import os; from torch._inductor import config, cpu_vec_isa\n"
            "t = time.perf_counter(); isa = cpu_vec_isa.pick_vec_isa()\n"
            "print(os.environ['TORCHINDUCTOR_VEC_ISA_OK'], config.cpp.vec_isa_ok, bool(isa), time.perf_counter() - t)")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_VEC_ISA_OK"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    flag, config_value, vectorised, seconds = out.stdout.split()[-4:]
    assert (flag, config_value, vectorised) == ("0", "False", "False")
    assert float(seconds) < 1.0
    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "1")
    config.cpp.vec_isa_ok = True
    fastpath.skip_cpu_isa_probe()
    assert os.environ["TORCHINDUCTOR_VEC_ISA_OK"] == "1" and config.cpp.vec_isa_ok is True


def test_qlora_decoder_layers_compile_as_one_graph_without_breaks(tmp_path, monkeypatch):
    """QLoRA compiles since bitsandbytes registered its 4-bit ops with fake kernels: PEFT's 4-bit LoRA layers
    with our lean forward and checkpointing trace as one graph for every decoder layer, with no graph break,
    and the LoRA weights get gradients. (The 4-bit weights are quantised by bitsandbytes on the CPU here.)"""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch._dynamo.reset()
    counters.clear()
    # dynamo and AOTAutograd trace as on the GPU; inductor's CPU code generation (~100 s here) is left out
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, **kw, backend="aot_eager"))
    model = fastpath.prepare_model(model, fastpath.Plan(fastpath.ATTN_IMPL, torch.bfloat16, True, 64, True))
    ids = torch.randint(0, 128, (1, 32))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
