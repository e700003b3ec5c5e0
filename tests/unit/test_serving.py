"""vLLM's verdict on an adapter (jobs/serving.py), on small adapters built here, and the serving-ready adapter folder.

Hand-built adapters (adapter_config.json + a safetensors file with PEFT's tensor names and shapes) cover each
refusal; a real PEFT adapter of a tiny random Llama covers what the job saves: the folder left with exactly
the two files, the base named by its URI, and PEFT still loading it onto the base.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from jobs import serving
from jobs.spec import load_spec_text

pytestmark = pytest.mark.unit

HIDDEN, VOCAB = 64, 96
MINIMAL = """\
name: support-bot
base_model: {uri: s3://models/llama/}
dataset: {train: s3://data/train.jsonl}
output: s3://artifacts/lora
"""


def _config(**over) -> dict:
    cfg = {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
           "bias": "none", "modules_to_save": None, "use_dora": False, "use_rslora": False,
           "init_lora_weights": True, "base_model_name_or_path": "/work/base-model", "task_type": "CAUSAL_LM"}
    cfg.update(over)
    return cfg


def _tensors(r: int, extra: dict | None = None) -> dict[str, np.ndarray]:
    """PEFT's names and shapes for q_proj/v_proj of two layers (A: [r, in], B: [out, r])."""
    out = {}
    for layer in range(2):
        for mod in ("q_proj", "v_proj"):
            stem = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            out[f"{stem}.lora_A.weight"] = np.zeros((r, HIDDEN), np.float32)
            out[f"{stem}.lora_B.weight"] = np.zeros((HIDDEN, r), np.float32)
    out.update(extra or {})
    return out


def _adapter(tmp_path, r: int = 16, extra: dict | None = None, **config):
    from safetensors.numpy import save_file

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(_config(r=r, **config)))
    save_file(_tensors(r, extra), str(d / "adapter_model.safetensors"))
    return d


def test_a_plain_rank_16_adapter_is_served_as_a_lora_with_the_default_flags(tmp_path):
    v = serving.check_adapter_dir(_adapter(tmp_path), base_vocab_size=VOCAB, tokenizer_size=VOCAB)
    assert v.problems == [] and v.servable_as_lora and v.serve_as == "lora"
    assert (v.rank, v.needed_max_lora_rank, v.vllm_flags) == (16, 16, ["--enable-lora"])
    assert v.target_modules == ["q_proj", "v_proj"]
    d = v.to_dict()
    assert d["serve_as"] == "lora" and d["vllm_max_lora_rank"] == 16 and json.loads(json.dumps(d)) == d


def test_rank_32_is_refused_at_the_default_max_rank_and_names_the_flag_that_serves_it(tmp_path):
    v = serving.check_adapter_dir(_adapter(tmp_path, r=32))
    [p] = v.problems
    assert p.kind == "rank" and "above vLLM's --max-lora-rank 16 (its default)" in p.message
    assert p.fix == "serve with --max-lora-rank 32"
    assert v.servable_as_lora and v.vllm_flags == ["--enable-lora", "--max-lora-rank 32"]
    assert "--max-lora-rank 32" in v.summary()
    assert serving.check_adapter_dir(tmp_path / "adapter", max_lora_rank=32).problems == []


@pytest.mark.parametrize("rank,needed", [(1, 1), (2, 8), (8, 8), (17, 32), (64, 64), (300, 320), (512, 512),
                                         (513, None)])
def test_the_smallest_max_lora_rank_is_one_vllm_accepts(rank, needed):
    assert serving.needed_max_lora_rank(rank) == needed


def test_a_rank_above_512_serves_only_merged():
    v = serving.check(_config(r=1024))
    assert not v.servable_as_lora and v.needed_max_lora_rank is None and "above 512" in v.summary()


def test_the_rank_is_read_from_the_weights_and_the_rank_pattern_too(tmp_path):
    # a config that says 16 over weights of rank 32 (or a rank_pattern entry of 64): vLLM takes the largest
    assert serving.check(_config(r=16), {"m.q_proj.lora_A.weight": [32, HIDDEN]}).needed_max_lora_rank == 32
    assert serving.check(_config(r=16, rank_pattern={"v_proj": 64})).needed_max_lora_rank == 64


def test_dora_is_refused_serve_merged(tmp_path):
    mags = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector": np.ones(HIDDEN, np.float32)
            for i in range(2)}
    v = serving.check_adapter_dir(_adapter(tmp_path, extra=mags, use_dora=True))
    assert [p.kind for p in v.problems] == ["dora"], v.problems
    assert not v.servable_as_lora and v.serve_as == "merged" and v.vllm_flags == []
    assert "DoRA" in v.summary() and "merged" in v.problems[0].fix


def test_modules_to_save_is_refused_but_a_classifier_head_is_not(tmp_path):
    head = {"base_model.model.lm_head.weight": np.zeros((VOCAB, HIDDEN), np.float32)}
    v = serving.check_adapter_dir(_adapter(tmp_path, extra=head, modules_to_save=["lm_head"]), base_vocab_size=VOCAB)
    assert [p.kind for p in v.problems] == ["modules_to_save"] and not v.servable_as_lora
    assert "lm_head" in v.problems[0].message
    assert serving.check(_config(modules_to_save=["score"])).problems == []
    # a whole module in the weights with nothing in the config is the same refusal ('unsupported LoRA weight')
    assert [p.kind for p in serving.check(_config(), {"base_model.model.lm_head.weight": [VOCAB, HIDDEN]},
                                          base_vocab_size=VOCAB).problems] == ["modules_to_save"]


def test_added_tokens_serve_merged(tmp_path):
    # the tokenizer published with the version is larger than the base's embedding
    v = serving.check_adapter_dir(_adapter(tmp_path), base_vocab_size=VOCAB, tokenizer_size=VOCAB + 2)
    assert [p.kind for p in v.problems] == ["added_tokens"] and v.serve_as == "merged"
    assert f"{VOCAB + 2} tokens" in v.problems[0].message
    # PEFT's save of a resized embedding (save_embedding_layers): the weights show it without the tokenizer
    resized = {"base_model.model.model.embed_tokens.weight": [VOCAB + 8, HIDDEN]}
    assert [p.kind for p in serving.check(_config(), resized, base_vocab_size=VOCAB).problems] == ["added_tokens"]
    emb = {"base_model.model.model.embed_tokens.lora_embedding_A": [16, VOCAB + 8]}
    assert [p.kind for p in serving.check(_config(), emb, base_vocab_size=VOCAB).problems] == ["added_tokens"]
    assert serving.check(_config(), emb | {"base_model.model.model.embed_tokens.lora_embedding_A": [16, VOCAB]},
                         base_vocab_size=VOCAB).problems == []


@pytest.mark.parametrize("over,kind", [({"bias": "lora_only"}, "bias"), ({"lora_bias": True}, "bias"),
                                       ({"init_lora_weights": "pissa"}, "init"),
                                       ({"init_lora_weights": "olora"}, "init"),
                                       ({"init_lora_weights": "loftq"}, "init"),
                                       ({"layer_replication": [[0, 1]]}, "unsupported")])
def test_biases_and_base_modifying_inits_are_refused(over, kind):
    assert [p.kind for p in serving.check(_config(**over)).problems] == [kind]


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_inits_that_set_only_the_adapter_are_fine(init):
    assert serving.check(_config(init_lora_weights=init)).problems == []


def test_an_unknown_tensor_is_refused_as_vllm_does():
    v = serving.check(_config(), {"base_model.model.model.layers.0.mlp.gate_proj.hada_w1_a": [4, 4]})
    assert [p.kind for p in v.problems] == ["tensor"] and "unsupported LoRA weight" in v.problems[0].message
    # the base embeddings PEFT may store next to a LoRA'd embedding are skipped by vLLM, so here too
    assert serving.check(_config(), {"base_model.model.model.embed_tokens.base_layer.weight": [VOCAB, HIDDEN]}
                         ).problems == []


def test_the_safetensors_header_is_read_without_loading_a_tensor(tmp_path):
    from safetensors import safe_open

    d = _adapter(tmp_path, r=8)
    shapes = serving.read_safetensors_header(d / "adapter_model.safetensors")
    with safe_open(str(d / "adapter_model.safetensors"), framework="numpy") as f:
        assert shapes == {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(ValueError):
        serving.read_safetensors_header(tmp_path / "short")


# ------------------------------------------------------------------------------ the spec (launcher validate)

def test_validate_warns_in_vllms_terms_on_what_the_spec_will_produce():
    assert load_spec_text(MINIMAL).advice() == [], "the defaults serve on vLLM's defaults"
    s = load_spec_text(MINIMAL + "lora:\n  rank: 32\n  alpha: 32\n")
    [a] = s.advice()
    assert a.where == "lora.rank" and a.line == 6 and "--max-lora-rank 16" in a.message
    assert a.fix == "serve with --max-lora-rank 32"
    dora = {p.where: p for p in load_spec_text(MINIMAL + "lora:\n  use_dora: true\n").advice()}
    assert "vLLM will not serve this adapter as a LoRA" in dora["lora.use_dora"].message
    assert "merge.enabled: true publishes it" in dora["lora.use_dora"].fix
    no_merge = load_spec_text(MINIMAL + "lora:\n  use_dora: true\nmerge:\n  enabled: false\n").advice()
    assert "set merge.enabled: true to publish one" in no_merge[0].fix


def test_validate_prints_the_serving_warning(tmp_path):
    from typer.testing import CliRunner

    from launcher import cli

    p = tmp_path / "spec.yaml"
    p.write_text(MINIMAL + "lora:\n  rank: 64\n  alpha: 64\n")
    r = CliRunner().invoke(cli.app, ["validate", str(p)])
    assert r.exit_code == 0 and "lora.rank" in r.output and "--max-lora-rank 64" in r.output, r.output


def test_the_eval_report_has_a_serving_section():
    from jobs.trainer.evaluate import _serving_lines

    lines = _serving_lines(serving.check(_config(r=32, use_dora=True)).to_dict())
    assert lines[0] == "## Serving (vLLM)" and "merged model only" in lines[2]
    assert any("DoRA" in line for line in lines) and _serving_lines(None) == []
    # no vLLM runs in the job: the report says parity was not run, never a pass
    assert "- Serving parity (vLLM's generations against PEFT's): **not run** — no vLLM runs in the job" in \
        "\n".join(lines)


# ------------------------------------------------------------------------------ a real PEFT adapter

torch = pytest.importorskip("torch")


def _tiny_peft(**lora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).float()
    base.config._name_or_path = base.name_or_path = "/tmp/job-workdir/base-model"  # as the job loads it
    return cfg, get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora))


def test_the_published_adapter_folder_holds_the_two_files_and_names_the_base_by_its_uri(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from jobs.trainer.recipe import _serving_ready

    cfg, model = _tiny_peft(r=16, lora_alpha=16, target_modules="all-linear")
    d = tmp_path / "adapter"
    model.save_pretrained(d, safe_serialization=True)  # what the job does
    assert "README.md" in {p.name for p in d.iterdir()}, "PEFT writes a model card: the reason for this test"
    assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"].startswith("/tmp/job")

    spec = load_spec_text(MINIMAL)
    verdict = _serving_ready(d, spec, cfg, VOCAB)
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((d / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "s3://models/llama/"
    assert verdict["serve_as"] == "lora" and verdict["vllm_max_lora_rank"] == 16 and verdict["problems"] == []
    assert set(verdict["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}

    # every in-repo reader loads it with its own base: the same logits as the model that saved it
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).float()
    reloaded = PeftModel.from_pretrained(base, str(d)).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_a_hub_base_is_named_by_its_hub_id():
    assert serving.base_model_name("hf:HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert serving.base_model_name("s3://models/llama/") == "s3://models/llama/"


def test_a_real_peft_dora_adapter_is_refused(tmp_path):
    cfg, model = _tiny_peft(r=32, lora_alpha=32, target_modules=["q_proj", "v_proj"], use_dora=True)
    model.save_pretrained(tmp_path / "a", safe_serialization=True)
    v = serving.check_adapter_dir(tmp_path / "a", base_vocab_size=VOCAB, tokenizer_size=VOCAB)
    assert {p.kind for p in v.problems} == {"rank", "dora"} and v.serve_as == "merged"
    assert v.rank == 32 and v.needed_max_lora_rank == 32


def test_launcher_artifacts_shows_the_latest_versions_verdict(tmp_path):
    import hashlib

    from typer.testing import CliRunner

    from launcher import artifacts, cli

    summary = serving.check(_config(r=32)).summary()
    run = tmp_path / "out" / "r1"
    for n, meta in ((1, {}), (2, {"serving": serving.check(_config(r=32)).to_dict()})):
        v = run / f"v{n}"
        v.mkdir(parents=True)
        (v / "metadata.json").write_text(json.dumps(meta))
        files = {"metadata.json": {"sha256": hashlib.sha256((v / "metadata.json").read_bytes()).hexdigest(),
                                   "size": (v / "metadata.json").stat().st_size}}
        (v / "manifest.json").write_text(json.dumps({"files": files}))
        (v / "_COMPLETE").write_text(hashlib.sha256((v / "manifest.json").read_bytes()).hexdigest() + "\n")
    listing = artifacts.list_versions(str(tmp_path / "out"), "r1")
    assert [(v.name, v.serving) for v in listing.versions] == [("v1", None), ("v2", summary)]
    assert summary == "vLLM LoRA (--enable-lora --max-lora-rank 32)"
    r = CliRunner().invoke(cli.app, ["artifacts", "r1", "--output", str(tmp_path / "out")])
    assert r.exit_code == 0 and f"serving (v2): {summary}" in r.output, r.output
    (run / "latest").write_text("v1\n")  # a version from before the check: no line, no failure
    r = CliRunner().invoke(cli.app, ["artifacts", "r1", "--output", str(tmp_path / "out")])
    assert r.exit_code == 0 and "serving (" not in r.output, r.output
