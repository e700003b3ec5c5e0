"""export.gguf: the merged model and the adapter as GGUF, read back and checked (jobs/trainer/gguf_export.py).

On the real SmolLM2 (Llama architecture, first 4 layers) with a real PEFT LoRA adapter whose B matrices are
not zero (PEFT initialises them to zero, which would hide a wrong permutation), and on a Qwen2-shaped model built
here from a config. The Q/K permutation is undone by transformers' GGUF reader (LlamaTensorProcessor), an
implementation independent of the export's. llama.cpp itself is not run here (nothing in this repository has it).
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from jobs.errors import LoraJobError, SpecError

pytestmark = pytest.mark.unit


def _copy_tokenizer(src, dst) -> None:
    """The tokenizer files as they are: a round trip through AutoTokenizer would rebuild a Qwen2 folder's
    pre-tokenizer from its model type (transformers 5), turning SmolLM2's into one llama.cpp does not know."""
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)


#: the vocabulary of the tiny Qwen2 and Llama built here: SmolLM2's first ids (17 special, the byte alphabet, the
#: first merges), so that their GGUF files carry 1,024 tokens and ~770 merges, not 49,152 and 48,900
SMALL_VOCAB = 1024


def _small_tokenizer(src, dst, monkeypatch) -> None:
    """SmolLM2's tokenizer cut to its first SMALL_VOCAB ids and the merges among them, for the tiny models built
    here: gguf.GGUFReader parses a string array one element at a time (about 2.4 s for the full vocabulary and
    merges on this machine, paid by every read back of a model file), while these tests are about tensors. Its
    pre-tokenizer is SmolLM2's, but cutting the vocabulary changes the ids of llama.cpp's check text, so their hash
    is registered as "smollm" for the test (jobs/trainer/gguf_export.PRE_TOKENIZERS; the real hash of the full
    tokenizer is what the SmolLM2 export above and the preflight test go through)."""
    from transformers import PreTrainedTokenizerFast

    from jobs.trainer import gguf_export

    _copy_tokenizer(src, dst)
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tj["model"]["vocab"].items() if i < SMALL_VOCAB}
    assert len(vocab) == SMALL_VOCAB
    merges = [m for m in tj["model"]["merges"] if (m if isinstance(m, str) else " ".join(m)).replace(" ", "") in vocab
              and all(part in vocab for part in (m.split(" ") if isinstance(m, str) else m))]
    assert len(merges) > SMALL_VOCAB // 2
    tj["model"].update(vocab=vocab, merges=merges)
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    ids = PreTrainedTokenizerFast(tokenizer_file=str(dst / "tokenizer.json")).encode(gguf_export._CHECK_TEXT)
    monkeypatch.setitem(gguf_export.PRE_TOKENIZERS, hashlib.sha256(str(ids).encode()).hexdigest(), "smollm")


def _adapt_and_merge(base_dir, tmp, seed: int):
    """A real PEFT LoRA on ``base_dir`` (B seeded non-zero), saved as adapter/, and merged into merged/."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(tmp / "adapter", safe_serialization=True)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp / "merged", safe_serialization=True)
    _copy_tokenizer(base_dir, tmp / "merged")
    return tmp / "adapter", tmp / "merged"


@pytest.fixture(scope="module")
def llama_export(short_model_dir, tmp_path_factory):
    from jobs.trainer.gguf_export import export_gguf

    tmp = tmp_path_factory.mktemp("gguf-llama")
    adapter, merged = _adapt_and_merge(short_model_dir, tmp, seed=0)
    written = export_gguf(merged, adapter, ["f16", "q8_0"], tmp / "version" / "gguf", name="smol")
    return tmp, adapter, merged, written


def test_export_writes_each_type_and_the_adapter_with_their_checks(llama_export):
    tmp, _, _, written = llama_export
    assert [(w["file"], w["kind"], w["type"]) for w in written] == [
        ("gguf/smol-f16.gguf", "model", "f16"), ("gguf/smol-q8_0.gguf", "model", "q8_0"),
        ("gguf/smol-adapter-f16.gguf", "adapter", "f16")]
    for w in written:
        path = tmp / "version" / w["file"]
        assert w["bytes"] == path.stat().st_size and len(w["sha256"]) == 64
    f16, q8, adapter = (w["checks"] for w in written)
    assert f16["tensors"] == q8["tensors"] == 2 + 9 * 4  # embeddings + final norm + 9 per layer (tied lm_head)
    assert f16["values"] == "exact" and q8["values"] == "within q8_0 block error"
    assert adapter["lora_pairs"] == 7 * 4 and adapter["tensors"] == 2 * 7 * 4
    assert written[1]["bytes"] < 0.6 * written[0]["bytes"]  # 8.5 bits a weight against 16


def test_model_metadata_names_and_shapes_follow_llama_cpp(llama_export):
    import gguf
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    tmp, _, merged, _ = llama_export
    config = json.loads((merged / "config.json").read_text())
    r = gguf.GGUFReader(str(tmp / "version" / "gguf" / "smol-q8_0.gguf"))  # ~2.4 s: 49k tokens, 49k merges
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "llama" and f["general.type"] == "model"
    assert f["llama.block_count"] == 4 and f["llama.embedding_length"] == 576
    assert f["llama.attention.head_count"] == 9 and f["llama.attention.head_count_kv"] == 3
    assert f["llama.feed_forward_length"] == 1536 and f["llama.context_length"] == 8192
    assert f["llama.rope.dimension_count"] == 64 and f["llama.vocab_size"] == 49152
    assert f["llama.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    tensors = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in r.tensors}
    assert tensors["token_embd.weight"] == ("Q8_0", [576, 49152])  # GGUF lists the innermost dimension first
    assert tensors["blk.0.attn_k.weight"] == ("Q8_0", [576, 192])
    assert tensors["blk.3.ffn_down.weight"] == ("Q8_0", [1536, 576])
    assert tensors["blk.0.attn_norm.weight"] == ("F32", [576])
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd
    # transformers' GGUF reader undoes llama.cpp's Q/K permutation its own way: that gives back the merged rows
    unpermute = LlamaTensorProcessor(config=config)
    want = load_file(str(merged / "model.safetensors"))
    for gname, hf in [("attn_q", "q_proj"), ("attn_k", "k_proj")]:
        t = next(x for x in r.tensors if x.name == f"blk.2.{gname}.weight")
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed([int(x) for x in t.shape])))
        w = want[f"model.layers.2.self_attn.{hf}.weight"].float().numpy()
        step = np.abs(w).max() / 127  # q8_0: within a step of the largest block scale
        assert np.abs(unpermute.process(got, f"blk.2.{gname}.weight").weights - w).max() < step
        assert np.abs(got - w).max() > 10 * step  # still permuted, the rows do not line up


def test_adapter_is_llama_cpp_lora_with_permuted_b_and_alpha(llama_export):
    import gguf
    from safetensors.numpy import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    tmp, adapter, merged, _ = llama_export
    r = gguf.GGUFReader(str(tmp / "version" / "gguf" / "smol-adapter-f16.gguf"))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert (f["general.type"], f["adapter.type"], f["adapter.lora.alpha"]) == ("adapter", "lora", 16.0)
    assert f["general.architecture"] == "llama"
    t = {x.name: x for x in r.tensors}
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    unpermute = LlamaTensorProcessor(config=json.loads((merged / "config.json").read_text()))
    for proj, gname in [("k_proj", "attn_k"), ("q_proj", "attn_q"), ("down_proj", "ffn_down")]:
        key = f"base_model.model.model.layers.1.{'mlp' if proj == 'down_proj' else 'self_attn'}.{proj}"
        a = t[f"blk.1.{gname}.weight.lora_a"]
        b = t[f"blk.1.{gname}.weight.lora_b"]
        assert a.tensor_type.name == b.tensor_type.name == "F16"
        a_np = np.asarray(a.data, dtype=np.float32).reshape(list(reversed([int(x) for x in a.shape])))
        b_np = np.asarray(b.data, dtype=np.float32).reshape(list(reversed([int(x) for x in b.shape])))
        np.testing.assert_allclose(a_np, peft[f"{key}.lora_A.weight"], atol=1e-3, rtol=1e-3)
        b_back = unpermute.process(b_np, f"blk.1.{gname}.weight").weights
        np.testing.assert_allclose(b_back, peft[f"{key}.lora_B.weight"], atol=1e-4, rtol=1e-3)
        if proj != "down_proj":  # the permutation moved rows: the check above would fail without undoing it
            assert not np.allclose(b_np, peft[f"{key}.lora_B.weight"], atol=1e-4, rtol=1e-3)


def test_a_corrupted_tensor_or_value_is_caught_by_the_read_back(llama_export):
    import gguf

    from jobs.trainer.gguf_export import check_adapter

    tmp, adapter, merged, _ = llama_export
    bad = tmp / "corrupt-adapter.gguf"
    shutil.copy(tmp / "version" / "gguf" / "smol-adapter-f16.gguf", bad)
    assert check_adapter(bad, adapter, merged)["lora_pairs"] == 28  # the copy itself passes
    t = next(x for x in gguf.GGUFReader(str(bad)).tensors if x.name == "blk.2.attn_v.weight.lora_b")
    with open(bad, "r+b") as fh:  # one f16 value of one tensor, in place
        fh.seek(t.data_offset + 10)
        fh.write(np.float16(7.0).tobytes())
    with pytest.raises(LoraJobError, match=r"blk\.2\.attn_v\.weight\.lora_b .*1 value\(s\) off"):
        check_adapter(bad, adapter, merged)


@pytest.fixture(scope="module")
def qwen_export(short_model_dir, tmp_path_factory):
    """A Qwen2-shaped model built here from a config (biases, untied output, SMALL_VOCAB), adapted, merged and
    exported as bf16 and q8_0."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from jobs.trainer.gguf_export import export_gguf

    tmp = tmp_path_factory.mktemp("gguf-qwen")
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # q8_0 blocks whose f16 scale is subnormal (max|x| below 127 * 2**-14): still in bounds
        model.model.embed_tokens.weight.mul_(1e-4)  # not adapted by the LoRA: stays this small merged
    model.save_pretrained(tmp / "base", safe_serialization=True)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _small_tokenizer(short_model_dir, tmp / "base", monkeypatch)
        adapter, merged = _adapt_and_merge(tmp / "base", tmp, seed=2)
        written = export_gguf(merged, adapter, ["bf16", "q8_0"], tmp / "gguf", name="qwen")
    return tmp, merged, written


def test_a_q8_0_value_beyond_its_block_error_is_caught(qwen_export):
    import gguf

    from jobs.trainer.gguf_export import check_model

    tmp, merged, _ = qwen_export
    # a quantised value moved by three steps of its block's scale is beyond the q8_0 error the check allows
    bad = tmp / "corrupt-q8_0.gguf"
    shutil.copy(tmp / "gguf" / "qwen-q8_0.gguf", bad)
    assert check_model(bad, merged, "q8_0")["values"] == "within q8_0 block error"  # the copy itself passes
    t = next(x for x in gguf.GGUFReader(str(bad)).tensors if x.name == "blk.0.ffn_down.weight")
    assert t.tensor_type.name == "Q8_0"
    with open(bad, "r+b") as fh:  # a Q8_0 block: an f16 scale, then 32 int8
        fh.seek(t.data_offset + 2)
        q0 = np.frombuffer(fh.read(1), dtype=np.int8)[0]
        fh.seek(t.data_offset + 2)
        fh.write(np.int8(q0 - 3 if q0 > 0 else q0 + 3).tobytes())
    with pytest.raises(LoraJobError, match=r"blk\.0\.ffn_down\.weight \(model\.layers\.0\.mlp\.down_proj\.weight\): "
                                           r"1 value\(s\) off"):
        check_model(bad, merged, "q8_0")


def test_a_qwen2_model_exports_with_biases_and_no_permutation(qwen_export):
    import gguf
    from safetensors.torch import load_file

    tmp, merged, written = qwen_export
    assert [(w["kind"], w["type"]) for w in written] == [("model", "bf16"), ("model", "q8_0"), ("adapter", "f16")]
    r = gguf.GGUFReader(str(tmp / "gguf" / "qwen-bf16.gguf"))
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert r.fields["qwen2.rope.freq_base"].contents() == 1000000.0
    tensors = {t.name: t for t in r.tensors}
    assert {"output.weight", "blk.1.attn_q.bias", "blk.1.attn_k.bias"} <= set(tensors)
    assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "BF16"
    # Qwen2 is not permuted: the rows of attn_q read back in transformers' order
    q = gguf.quants.dequantize(tensors["blk.1.attn_q.weight"].data, tensors["blk.1.attn_q.weight"].tensor_type)
    want_q = load_file(str(merged / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_allclose(q.reshape(want_q.shape), want_q, rtol=2 ** -8, atol=1e-6)


def test_a_llama_with_llama3_rope_scaling_exports_its_rotary_divisors_as_rope_freqs(short_model_dir, tmp_path,
                                                                                    monkeypatch):
    """Llama 3.1's rope scaling on a tiny Llama built here (head_dim 16: 8 rotary pairs, original context 256, so
    that 3 pairs keep their frequency, 1 is interpolated and 4 are divided by the factor): llama.cpp's
    rope_freqs.weight (f32, one divisor per pair) is written and read back against transformers' own rotary
    embedding; a divisor changed in the file is caught; no rope scaling metadata key (llama.cpp's converter writes
    none for llama3), and the adapter carries no rope_freqs (convert_lora_to_gguf writes none)."""
    import math

    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.trainer.gguf_export import ROPE_FREQS, check_exportable, check_model, export_gguf
    from jobs.trainer.modelio import load_tokenizer

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256}
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_scaling=rope, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base", safe_serialization=True)
    _small_tokenizer(short_model_dir, tmp_path / "base", monkeypatch)
    saved = json.loads((tmp_path / "base" / "config.json").read_text())
    assert (saved.get("rope_parameters") or saved.get("rope_scaling"))["rope_type"] == "llama3"
    adapter, merged = _adapt_and_merge(tmp_path / "base", tmp_path, seed=4)
    written = export_gguf(merged, adapter, ["f16"], tmp_path / "gguf", name="l31")
    assert [(w["kind"], w["type"]) for w in written] == [("model", "f16"), ("adapter", "f16")]

    r = gguf.GGUFReader(str(tmp_path / "gguf" / "l31-f16.gguf"))
    t = next(x for x in r.tensors if x.name == ROPE_FREQS == "rope_freqs.weight")
    assert t.tensor_type.name == "F32" and [int(x) for x in t.shape] == [8]
    # by hand, in float64: wavelength 2*pi*10000**(2i/16) of each pair against 256/4 = 64 and 256/1 = 256
    wavelength = [2 * math.pi * 10000.0 ** (2 * i / 16) for i in range(8)]
    s = (256 / wavelength[3] - 1.0) / (4.0 - 1.0)
    want = [1.0, 1.0, 1.0, 1 / ((1 - s) / 8.0 + s), 8.0, 8.0, 8.0, 8.0]
    assert 64 < wavelength[3] < 256 and wavelength[2] < 64 and wavelength[4] > 256
    np.testing.assert_allclose(np.asarray(t.data, dtype=np.float64), want, rtol=1e-6)
    assert not any("rope.scaling" in k for k in r.fields), [k for k in r.fields if "rope" in k]
    assert written[0]["checks"]["tensors"] == 2 * 9 + 3  # 9 per layer, embeddings, final norm, rope_freqs
    ar = gguf.GGUFReader(str(tmp_path / "gguf" / "l31-adapter-f16.gguf"))
    assert not any(x.name == ROPE_FREQS for x in ar.tensors)

    bad = tmp_path / "corrupt-rope.gguf"
    shutil.copy(tmp_path / "gguf" / "l31-f16.gguf", bad)
    with open(bad, "r+b") as fh:  # the interpolated pair's divisor, in place
        fh.seek(t.data_offset + 3 * 4)
        fh.write(np.float32(want[3] * 1.001).tobytes())
    with pytest.raises(LoraJobError, match=r"rope_freqs\.weight: 1 rotary divisor\(s\) differ from transformers' "
                                           r"llama3 scaling"):
        check_model(bad, merged, "f16")

    # before training: llama3 scaling passes on a Llama base; on another architecture, or another scaling, refused
    tok = load_tokenizer(str(tmp_path / "base"))
    assert check_exportable(saved, tok, use_dora=False) == "smollm"
    for other in ({**saved, "architectures": ["Qwen2ForCausalLM"]},
                  {**saved, "rope_parameters": {**rope, "rope_type": "yarn", "rope_theta": 10000.0},
                   "rope_scaling": None}):
        with pytest.raises(SpecError, match="rope scaling '(llama3|yarn)' is not written by this export"):
            check_exportable(other, tok, use_dora=False)


def test_an_unsupported_architecture_is_refused_naming_it_and_what_is_supported(tmp_path):
    from jobs.trainer.gguf_export import check_exportable, export_gguf

    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    message = ("export.gguf: the base model's architecture GPT2LMHeadModel has no GGUF export here; supported: "
               "LlamaForCausalLM, Qwen2ForCausalLM")
    with pytest.raises(SpecError) as before_training:
        check_exportable({"architectures": ["GPT2LMHeadModel"]}, None, use_dora=False)
    with pytest.raises(SpecError) as after_merge:
        export_gguf(tmp_path / "merged", tmp_path / "adapter", ["f16"], tmp_path / "gguf", name="x")
    assert message in str(before_training.value) and message in str(after_merge.value)
    assert not (tmp_path / "gguf").exists()


def test_the_preflight_accepts_smollm2_and_refuses_dora_before_training(short_model_dir):
    from tokenizers.pre_tokenizers import Whitespace

    from jobs.trainer.gguf_export import check_exportable
    from jobs.trainer.modelio import load_config, load_tokenizer

    config, tok = load_config(str(short_model_dir)).to_dict(), load_tokenizer(str(short_model_dir))
    assert check_exportable(config, tok, use_dora=False) == "smollm"
    with pytest.raises(SpecError, match="export.gguf: llama.cpp's LoRA adapters have no DoRA"):
        check_exportable(config, tok, use_dora=True)
    tok.backend_tokenizer.pre_tokenizer = Whitespace()  # a tokenizer llama.cpp does not know
    with pytest.raises(SpecError, match="export.gguf: the base model's tokenizer is not a byte-level BPE"):
        check_exportable(config, tok, use_dora=False)
