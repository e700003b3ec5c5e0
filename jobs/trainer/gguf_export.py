"""GGUF files (llama.cpp, Ollama) of the merged model and of the adapter, written and read back (``export.gguf``).

Written with the ``gguf`` package (llama.cpp's own Python writer) in the conventions of llama.cpp's
``convert_hf_to_gguf.py`` (the model) and ``convert_lora_to_gguf.py`` (the adapter), for the two architectures
whose conventions are implemented here: Llama (``LlamaForCausalLM``, SmolLM included) and Qwen2
(``Qwen2ForCausalLM``). Tensor names come from ``gguf.TensorNameMap``; metadata keys from the writer's
``add_*`` methods. Llama's query and key weights are permuted as ``LlamaModel.permute`` does (llama.cpp's
rotary embedding pairs neighbouring dimensions, transformers' pairs the two halves of a head).

Each file is read back with ``gguf.GGUFReader`` before it counts as written, and a failed check raises
(the run stops before anything is published):

- metadata: architecture, type, dimensions, head counts, rope base, norm epsilon, vocabulary size and the
  tokenizer (tokens, token types, merges, bos/eos/pad ids, chat template) equal to ``config.json`` and to the
  transformers tokenizer of the folder, read again independently of what was written;
- tensors: every name and shape expected, none more;
- values: every tensor dequantised (``gguf.quants.dequantize``) against the merged safetensors (Q/K permuted):
  bit-exact for f32 (norms, biases), f16 and bf16 (against torch's own rounding of the same values); for q8_0
  within each 32-value block's scale error (half a step of max|x|/127, plus the f16 rounding of the scale);
- Llama 3.1's ``llama3`` rope scaling, which has no metadata key in llama.cpp but the ``rope_freqs.weight`` tensor
  its converter writes (:func:`rope_freq_factors`): against transformers' own rotary embedding (f32, to float32
  rounding).

What stays unchecked without llama.cpp, which is not in the trainer image: that llama.cpp (or Ollama) loads the
files, that its pre-tokenizer (``tokenizer.ggml.pre``, chosen as llama.cpp's converter does, by hashing the
tokens of its check text) splits text as the transformers tokenizer does, and that it generates the same text as
the merged model. tests/unit/test_gguf_export.py undoes the Q/K permutation with transformers' GGUF reader's own
code (an implementation independent of this one); llama.cpp itself runs nowhere here.

``check_exportable`` refuses, before training, what the export would refuse after it; ``export_gguf`` is the
export itself, after the merge.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jobs.errors import LoraJobError, Problem, SpecError

log = logging.getLogger("jobs")

#: transformers architecture -> (gguf arch, whether Q/K are permuted as llama.cpp's LlamaModel does)
SUPPORTED = {"LlamaForCausalLM": ("LLAMA", True), "Qwen2ForCausalLM": ("QWEN2", False)}

#: tokenizer.ggml.pre by the sha256 of the token ids of llama.cpp's check text, for the Llama and Qwen2 families:
#: the entries of convert_hf_to_gguf.py's get_vocab_base_pre (llama.cpp, 2026-12) that these families use.
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 tokenizer
}
_CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
               "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
               "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
               "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")

TYPES = ("f16", "bf16", "q8_0")
_BLOCK = 32  # values per Q8_0 block (gguf.GGML_QUANT_SIZES)


def _refuse(message: str, *, fix: str) -> SpecError:
    """A spec asking for a GGUF this export cannot write: BAD_SPEC, naming export.gguf and what to do."""
    return SpecError([Problem(where="export.gguf", message=message, fix=fix)])


def _gguf():
    import gguf

    return gguf


def _qtype(name: str):
    g = _gguf().GGMLQuantizationType
    return {"f32": g.F32, "f16": g.F16, "bf16": g.BF16, "q8_0": g.Q8_0}[name]


def _file_type(name: str):
    f = _gguf().LlamaFileType
    return {"f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0}[name]


# ---------------------------------------------------------------------------- what the config says

def architecture(config: dict) -> tuple[str, bool]:
    """(gguf arch name, permute Q/K) for ``config``; SpecError naming the architecture when not supported."""
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    if archs[0] not in SUPPORTED:
        raise _refuse(f"the base model's architecture {archs[0]} has no GGUF export here; "
                      f"supported: {', '.join(SUPPORTED)}",
                      fix="remove export.gguf from the spec (convert merged/ with llama.cpp's "
                          "convert_hf_to_gguf.py yourself), or fine-tune a Llama- or Qwen2-family base")
    rope = _rope(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" and not (rope_type == "llama3" and SUPPORTED[archs[0]][0] == "LLAMA"):
        raise _refuse(f"the base model's rope scaling {rope_type!r} is not written by this export (only "
                      "unscaled rope, and Llama 3.1's 'llama3' scaling on Llama bases)",
                      fix="remove export.gguf from the spec, or convert merged/ with llama.cpp's "
                          "convert_hf_to_gguf.py")
    return archs[0], SUPPORTED[archs[0]][1]


def _rope(config: dict) -> dict:
    """transformers 5 keeps rope_theta and the scaling in rope_parameters; older configs at the top level."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if rope.get("type") and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


#: llama.cpp's tensor of per-pair rotary frequency divisors (gguf.MODEL_TENSOR.ROPE_FREQS)
ROPE_FREQS = "rope_freqs.weight"


def rope_freq_factors(config: dict) -> np.ndarray | None:
    """For Llama 3.1's ``llama3`` rope scaling: what llama.cpp reads as ``rope_freqs.weight`` (f32, one value per
    rotary pair), the number each pair's base frequency is divided by. transformers scales each inverse frequency
    by its wavelength: pairs whose wavelength is shorter than ``original_max_position_embeddings /
    high_freq_factor`` keep it (1), those longer than ``original_max_position_embeddings / low_freq_factor`` are
    divided by ``factor``, those between are interpolated, ``(1 - s) / factor + s`` with ``s =
    (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``;
    the divisor is the reciprocal of that. Computed in float32 like the rotary embedding itself. None for a base
    without llama3 scaling (llama.cpp's converter writes the tensor for no other)."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    import torch

    dim = _head_dim(config)
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    # all four are required, as transformers requires them (Llama 3.1 and 3.2: 8, 1, 4, 8192); versions of
    # llama.cpp's converter that read original_max_position_embeddings from the config's top level (absent in
    # Llama 3.x configs) fall back to 8192, the same number for those models
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    divisor = torch.where(wavelength < original / high, torch.ones_like(inv_freq),
                          torch.where(wavelength > original / low, torch.full_like(inv_freq, factor),
                                      1 / ((1 - smooth) / factor + smooth)))
    return divisor.numpy().astype(np.float32)


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _n_kv(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rows of each head from (half, half) pairing to interleaved pairs."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _for_llama_cpp(config: dict, permute: bool) -> Callable[[str, np.ndarray], np.ndarray]:
    """The transform of each HF tensor (by its HF name) into llama.cpp's layout."""
    n_head, n_kv = config["num_attention_heads"], _n_kv(config)

    def transform(hf_name: str, w: np.ndarray) -> np.ndarray:
        if permute and ".self_attn.q_proj." in hf_name:
            return _permute(w, n_head, n_head)
        if permute and ".self_attn.k_proj." in hf_name:
            return _permute(w, n_head, n_kv)
        return w

    return transform


def _name_map(config: dict, arch: str):
    g = _gguf()
    return g.get_tensor_name_map(g.MODEL_ARCH[SUPPORTED[arch][0]], config["num_hidden_layers"])


def _gguf_name(name_map, hf_name: str) -> str:
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise _refuse(f"the tensor {hf_name} has no name in llama.cpp's tensor map for this architecture",
                      fix="remove export.gguf from the spec: this base carries a tensor the GGUF layout has "
                          "no place for")
    return name


def _arch_name(arch: str) -> str:
    g = _gguf()
    return g.MODEL_ARCH_NAMES[g.MODEL_ARCH[SUPPORTED[arch][0]]]


# ---------------------------------------------------------------------------- source tensors

def _tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


def _read_tensors(files: dict[str, Path], names: list[str]):
    """(name, torch tensor) one at a time, in ``names``' order: the export never holds the whole model."""
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    for n in names:
        if files[n] not in handles:
            handles[files[n]] = safe_open(str(files[n]), framework="pt")
        yield n, handles[files[n]].get_tensor(n)


def _shape(files: dict[str, Path], name: str) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(files[name]), framework="pt") as st:
        return list(st.get_slice(name).get_shape())


def _model_tensors(config: dict, files: dict[str, Path]) -> list[str]:
    """The HF tensors a GGUF carries: all, less lm_head when it is the tied embedding."""
    names = sorted(files)
    if config.get("tie_word_embeddings") and "lm_head.weight" in files:
        names.remove("lm_head.weight")
    return names


def _storage_type(qtype: str, shape: list[int]) -> str:
    """llama.cpp's converter's choice: 1-D tensors (norms, biases) stay f32; rows that are not whole Q8_0
    blocks fall back to f16."""
    if len(shape) <= 1:
        return "f32"
    if qtype == "q8_0" and shape[-1] % _BLOCK:
        return "f16"
    return qtype


# ---------------------------------------------------------------------------- tokenizer

def _pre_tokenizer(tokenizer_json: dict, encode: Callable[[str], list[int]], where: str) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer (tokenizer.ggml.pre), found as convert_hf_to_gguf.py's
    get_vocab_base_pre finds it (the hash of the ids ``encode`` gives its check text); refuses a tokenizer this
    export cannot write. ``tokenizer_json``: the tokenizer as tokenizer.json holds it."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if tokenizer_json.get("model", {}).get("type") != "BPE" or "ByteLevel" not in {pre.get("type")} | {
            p.get("type") for p in pre.get("pretokenizers", [])}:
        raise _refuse(f"{where} is not a byte-level BPE (GPT-2 style) tokenizer; only those are written by this "
                      "export",
                      fix="remove export.gguf from the spec, or convert merged/ with llama.cpp's "
                          "convert_hf_to_gguf.py")
    chkhsh = hashlib.sha256(str(encode(_CHECK_TEXT)).encode()).hexdigest()
    if chkhsh not in PRE_TOKENIZERS:
        raise _refuse(f"llama.cpp has no pre-tokenizer known here for {where} (hash {chkhsh}); "
                      f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}",
                      fix="remove export.gguf from the spec, or convert merged/ with llama.cpp's "
                          "convert_hf_to_gguf.py (which knows more tokenizers)")
    return PRE_TOKENIZERS[chkhsh]


def _vocab(model_dir: Path, config: dict) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer) as convert_hf_to_gguf.py's get_vocab_base/_set_vocab_gpt2 make them."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    g = _gguf()
    tok_json = model_dir / "tokenizer.json"
    if not tok_json.is_file():
        raise _refuse(f"{model_dir} has no tokenizer.json; only byte-level BPE tokenizer.json tokenizers are "
                      "written by this export", fix="remove export.gguf from the spec")
    # The hash of the pipeline tokenizer.json defines (whose vocabulary and merges the file carries); AutoTokenizer
    # may rebuild the pre-tokenizer from the model type's class instead (transformers 5 does for Qwen2).
    file_tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_json))
    pre = _pre_tokenizer(json.loads(tok_json.read_text()), file_tok.encode, f"the tokenizer in {model_dir}")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab_size = config.get("vocab_size", len(tok.get_vocab()))
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(g.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(g.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(g.TokenType.USER_DEFINED)
        else:
            types.append(g.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, pre


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens that act as control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


# ---------------------------------------------------------------------------- writing

def _write(path: Path, arch: str, kv: Callable[[Any], None], tensors: list[tuple[str, list[int], str]],
           data: Callable[[], Any]) -> None:
    """Header, metadata, tensor infos, then each tensor's data as ``data()`` yields it (one in memory at a time)."""
    g = _gguf()
    w = g.GGUFWriter(str(path), _arch_name(arch))
    kv(w)
    for name, shape, stype in tensors:
        if stype in ("bf16", "q8_0"):  # numpy has no such dtype: gguf stores their raw bytes
            qtype = _qtype(stype)
            byte_shape = g.quant_shape_to_byte_shape(tuple(shape), qtype)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        else:
            dtype = np.dtype(np.float32 if stype == "f32" else np.float16)
            w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for (_, _, stype), array in zip(tensors, data(), strict=True):
        w.write_tensor_data(g.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), _qtype(stype)))
    w.close()


def write_model(merged_dir: Path, path: Path, qtype: str, *, name: str) -> None:
    """The merged model as one GGUF of ``qtype`` (f16, bf16, q8_0), as llama.cpp's convert_hf_to_gguf.py writes it."""
    g = _gguf()
    config = json.loads((merged_dir / "config.json").read_text())
    arch, permute = architecture(config)
    tokens, types, pre = _vocab(merged_dir, config)
    files = _tensor_files(merged_dir)
    names = _model_tensors(config, files)
    name_map = _name_map(config, arch)
    infos = []
    rope_freqs = rope_freq_factors(config)
    if rope_freqs is not None:  # first, as llama.cpp's converter yields it before the model's tensors
        infos.append((ROPE_FREQS, list(rope_freqs.shape), "f32"))
    for n in names:
        shape = _shape(files, n)
        infos.append((_gguf_name(name_map, n), shape, _storage_type(qtype, shape)))
    rope = _rope(config)

    def kv(w) -> None:
        w.add_type(g.GGUFType.MODEL)
        w.add_name(name)
        w.add_block_count(config["num_hidden_layers"])
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(config["hidden_size"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(config["num_attention_heads"])
        w.add_head_count_kv(_n_kv(config))
        w.add_rope_freq_base(float(rope["rope_theta"]))
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        if config.get("head_dim"):
            w.add_key_length(config["head_dim"])
            w.add_value_length(config["head_dim"])
        w.add_vocab_size(len(tokens))
        w.add_rope_dimension_count(_head_dim(config))
        w.add_file_type(_file_type(qtype))
        w.add_quantization_version(g.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        g.SpecialVocab(merged_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

    transform = _for_llama_cpp(config, permute)

    def data():
        if rope_freqs is not None:
            yield rope_freqs
        for n, t in _read_tensors(files, names):
            yield transform(n, t.float().numpy())

    _write(path, arch, kv, infos, data)


def write_adapter(adapter_dir: Path, merged_dir: Path, path: Path, *, name: str) -> None:
    """The LoRA adapter as llama.cpp's LoRA GGUF (convert_lora_to_gguf.py): ``<tensor>.lora_a`` (r x in) and
    ``<tensor>.lora_b`` (out x r, Q/K rows permuted like the weight), f16, with ``adapter.lora.alpha``."""
    g = _gguf()
    config = json.loads((merged_dir / "config.json").read_text())
    arch, permute = architecture(config)
    alpha = _adapter_alpha(adapter_dir)
    pairs = _adapter_pairs(adapter_dir)
    name_map = _name_map(config, arch)
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as st:
        infos = []
        for base, (a, b) in pairs.items():
            dest = _gguf_name(name_map, base)
            infos += [(dest + ".lora_a", list(st.get_slice(a).get_shape()), "f16"),
                      (dest + ".lora_b", list(st.get_slice(b).get_shape()), "f16")]

    def kv(w) -> None:
        w.add_type(g.GGUFType.ADAPTER)
        w.add_name(name)
        w.add_string(g.Keys.Adapter.TYPE, "lora")
        w.add_float32(g.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_file_type(g.LlamaFileType.MOSTLY_F16)
        w.add_quantization_version(g.GGML_QUANT_VERSION)

    transform = _for_llama_cpp(config, permute)

    def data():
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as st:
            for base, (a, b) in pairs.items():
                yield st.get_tensor(a).float().numpy()
                yield transform(base, st.get_tensor(b).float().numpy())

    _write(path, arch, kv, infos, data)


def _no_dora() -> SpecError:
    return _refuse("llama.cpp's LoRA adapters have no DoRA (lora.use_dora is on): the adapter cannot be written "
                   "as GGUF", fix="turn lora.use_dora off, or remove export.gguf from the spec")


def _adapter_alpha(adapter_dir: Path) -> float:
    """The one alpha llama.cpp scales every tensor by (alpha / its rank), refusing what that cannot express."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise _no_dora()
    if cfg.get("alpha_pattern"):
        raise _refuse("llama.cpp's LoRA GGUF holds one alpha; this adapter has an alpha_pattern",
                      fix="use the merged model's GGUF")
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):  # PEFT scales by alpha/sqrt(r), llama.cpp by alpha/r: alpha*sqrt(r) makes them equal
        if cfg.get("rank_pattern"):
            raise _refuse("lora.use_rslora with ranks that differ by module cannot be written as "
                          "one llama.cpp alpha",
                          fix="use the merged model's GGUF")
        alpha *= math.sqrt(cfg["r"])
    return alpha


def _adapter_pairs(adapter_dir: Path) -> dict[str, tuple[str, str]]:
    """HF base weight name -> (lora_A key, lora_B key) of the saved adapter; anything else is refused."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as st:
        keys = sorted(st.keys())
    pairs: dict[str, dict[str, str]] = {}
    for k in keys:
        stem, _, part = k.rpartition(".lora_")
        if part not in ("A.weight", "B.weight") or not stem.startswith("base_model.model."):
            raise _refuse(f"the adapter tensor {k} is not a linear LoRA A/B weight, which is all "
                          "llama.cpp's LoRA GGUF holds",
                          fix="use the merged model's GGUF")
        pairs.setdefault(stem.removeprefix("base_model.model.") + ".weight", {})[part[0]] = k
    return {base: (p["A"], p["B"]) for base, p in pairs.items()}


# ---------------------------------------------------------------------------- reading back

class _Check:
    """Collects every mismatch of one file, then raises them together."""

    def __init__(self, path: Path):
        self.path, self.problems = path, []
        self.reader = _gguf().GGUFReader(str(path))
        self.fields = self.reader.fields

    def value(self, key: str):
        field = self.fields.get(key)
        return None if field is None else field.contents()

    def equal(self, key: str, expected) -> None:
        got = self.value(key)
        if isinstance(expected, float) and isinstance(got, float):
            same = math.isclose(got, expected, rel_tol=1e-6)  # stored as float32
        else:
            same = got == expected
        if not same:
            self.problems.append(f"{key} is {_short(got)}, expected {_short(expected)}")

    def done(self, what: str) -> None:
        if self.problems:
            listed = "\n  ".join(self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise LoraJobError(f"export.gguf: {self.path.name} read back wrong ({what}): {len(self.problems)} "
                               f"problem(s):\n  {listed}{more}",
                               hint="nothing was published; this is a bug in the GGUF export (or a bad disk): "
                                    "report it with this message, and remove export.gguf to publish without it")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_model(path: Path, merged_dir: Path, qtype: str) -> dict:
    """Read ``path`` back and compare it with ``merged_dir`` (config, tokenizer, every tensor); raise on any
    mismatch. Returns what was checked."""
    from transformers import AutoTokenizer

    config = json.loads((merged_dir / "config.json").read_text())
    arch, permute = architecture(config)
    c = _Check(path)
    prefix = _arch_name(arch)
    c.equal("general.architecture", prefix)
    c.equal("general.type", "model")
    c.equal("general.file_type", int(_file_type(qtype)))
    for key, expected in [("block_count", config["num_hidden_layers"]),
                          ("context_length", config["max_position_embeddings"]),
                          ("embedding_length", config["hidden_size"]),
                          ("feed_forward_length", config["intermediate_size"]),
                          ("attention.head_count", config["num_attention_heads"]),
                          ("attention.head_count_kv", _n_kv(config)),
                          ("rope.freq_base", float(_rope(config)["rope_theta"])),
                          ("attention.layer_norm_rms_epsilon", float(config["rms_norm_eps"])),
                          ("rope.dimension_count", _head_dim(config)),
                          ("vocab_size", config["vocab_size"])]:
        c.equal(f"{prefix}.{key}", expected)
    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    tokens = c.value("tokenizer.ggml.tokens") or []
    c.equal("tokenizer.ggml.model", "gpt2")
    if len(tokens) != config["vocab_size"]:
        c.problems.append(f"tokenizer.ggml.tokens has {len(tokens)} tokens, expected {config['vocab_size']}")
    added = tok.get_added_vocab()
    for t, i in tok.get_vocab().items():
        if t not in added and (i >= len(tokens) or tokens[i] != t):
            c.problems.append(f"token {i} is {_short(tokens[i] if i < len(tokens) else None)}, expected {t!r}")
            break
    merges = json.loads((merged_dir / "tokenizer.json").read_text())["model"]["merges"]
    got_merges = c.value("tokenizer.ggml.merges") or []
    if [m if isinstance(m, str) else " ".join(m) for m in merges] != got_merges:
        c.problems.append(f"tokenizer.ggml.merges: {len(got_merges)} merges, expected the {len(merges)} "
                          "of tokenizer.json in order")
    for key, tid in [("bos", tok.bos_token_id), ("eos", tok.eos_token_id)]:
        if tid is not None:
            c.equal(f"tokenizer.ggml.{key}_token_id", tid)
    # the pad the files name (tokenizer_config.json, else config.json), not one transformers' class supplies itself
    tok_cfg_file = merged_dir / "tokenizer_config.json"
    pad = (json.loads(tok_cfg_file.read_text()) if tok_cfg_file.is_file() else {}).get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    c.equal("tokenizer.ggml.padding_token_id", tok.convert_tokens_to_ids(pad) if pad else config.get("pad_token_id"))
    if tok.chat_template:
        c.equal("tokenizer.chat_template", tok.chat_template)

    files = _tensor_files(merged_dir)
    names = _model_tensors(config, files)
    name_map = _name_map(config, arch)
    by_gguf = {_gguf_name(name_map, n): n for n in names}
    read = {t.name: t for t in c.reader.tensors}
    rope_freqs = _rope_freqs_expected(merged_dir, config)
    derived = {ROPE_FREQS: "the rope scaling of config.json"} if rope_freqs is not None else {}
    for extra in sorted(set(read) - set(by_gguf) - set(derived)):
        c.problems.append(f"tensor {extra} is not in the merged model")
    for missing in sorted((set(by_gguf) | set(derived)) - set(read)):
        c.problems.append(f"tensor {missing} ({by_gguf.get(missing) or derived[missing]}) is missing")
    transform = _for_llama_cpp(config, permute)
    worst = 0.0
    if rope_freqs is not None and ROPE_FREQS in read:
        worst = _compare_rope_freqs(c, read[ROPE_FREQS], rope_freqs)
    hf_to_gguf = {hf: gn for gn, hf in by_gguf.items()}
    for hf, src in _read_tensors(files, [by_gguf[n] for n in sorted(set(by_gguf) & set(read))]):
        t = read[hf_to_gguf[hf]]
        worst = max(worst, _compare(c, t, transform(hf, src.float().numpy()), qtype, hf))
    c.done("model")
    return {"metadata_keys": len(c.fields), "tensors": len(read), "tokens": len(tokens),
            "worst_abs_error": worst, "values": "exact" if qtype != "q8_0" else "within q8_0 block error"}


def _rope_freqs_expected(merged_dir: Path, config: dict) -> np.ndarray | None:
    """The divisors ``rope_freqs.weight`` must hold, from transformers' own rotary embedding (an implementation
    independent of :func:`rope_freq_factors`): its unscaled inverse frequencies over the scaled ones it uses."""
    if _rope(config).get("rope_type") != "llama3":
        return None
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = AutoConfig.from_pretrained(str(merged_dir))
    scaled = LlamaRotaryEmbedding(cfg).inv_freq.double()
    dim = _head_dim(config)
    plain = 1.0 / (float(_rope(config)["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (plain / scaled).numpy()


def _compare_rope_freqs(c: _Check, t, expected: np.ndarray) -> float:
    """``rope_freqs.weight`` against transformers' scaling: f32, one value per rotary pair, within float32
    rounding (both sides compute in float32, in different orders)."""
    if t.tensor_type != _qtype("f32") or [int(x) for x in t.shape] != [len(expected)]:
        c.problems.append(f"tensor {t.name} is {t.tensor_type.name} of shape {[int(x) for x in t.shape]}, expected "
                          f"F32 of shape [{len(expected)}] (one divisor per rotary pair)")
        return 0.0
    got = np.asarray(t.data, dtype=np.float64).reshape(-1)
    err = np.abs(got - expected)
    bad = err > 4e-6 * np.abs(expected)  # a few float32 ulps
    if bad.any():
        c.problems.append(f"tensor {t.name}: {int(bad.sum())} rotary divisor(s) differ from transformers' llama3 "
                          f"scaling, largest error {float(err.max()):.3g}")
    return float(err.max())


def _compare(c: _Check, t, expected: np.ndarray, qtype: str, hf: str) -> float:
    """One tensor read back against the value it should hold; returns the largest absolute error."""
    import torch

    g = _gguf()
    shape = list(reversed([int(x) for x in t.shape]))  # GGUF lists dimensions innermost first
    if shape != list(expected.shape):
        c.problems.append(f"tensor {t.name} has shape {shape}, expected {list(expected.shape)} ({hf})")
        return 0.0
    stype = _storage_type(qtype, shape)
    if t.tensor_type != _qtype(stype):
        c.problems.append(f"tensor {t.name} is {t.tensor_type.name}, expected {stype}")
        return 0.0
    got = g.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape).astype(np.float32)
    err = np.abs(got - expected)
    if stype == "q8_0":
        blocks = expected.reshape(-1, _BLOCK)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
        # half a step from rounding to an integer, plus |q| <= 127 times the f16 rounding of the step itself: half
        # an ulp, 2**-11 of it, or 2**-25 where the step is an f16 subnormal (below 2**-14); 1% for float noise
        bound = 1.01 * (step * 0.5 + 127 * np.maximum(step * 2.0 ** -11, 2.0 ** -25))
        bad = err.reshape(-1, _BLOCK) > bound
    else:
        torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[stype]
        rounded = torch.from_numpy(np.ascontiguousarray(expected)).to(torch_dtype).float().numpy()
        if stype == "f16" and np.isinf(rounded).any() and not np.isinf(expected).any():
            c.problems.append(f"tensor {t.name} ({hf}) overflows f16 (|x| > 65504): ask for bf16 instead")
            return float("inf")
        bad = got != rounded
        bad &= ~(np.isnan(got) & np.isnan(rounded))
    if bad.any():
        c.problems.append(f"tensor {t.name} ({hf}): {int(bad.sum())} value(s) off, largest error "
                          f"{float(err.max()):.3g}")
    return float(err.max()) if err.size else 0.0


def check_adapter(path: Path, adapter_dir: Path, merged_dir: Path) -> dict:
    """Read the adapter GGUF back and compare it with the PEFT adapter (alpha, names, shapes, f16 values)."""
    from safetensors import safe_open

    config = json.loads((merged_dir / "config.json").read_text())
    arch, permute = architecture(config)
    c = _Check(path)
    c.equal("general.architecture", _arch_name(arch))
    c.equal("general.type", "adapter")
    c.equal("adapter.type", "lora")
    c.equal("adapter.lora.alpha", _adapter_alpha(adapter_dir))
    pairs = _adapter_pairs(adapter_dir)
    name_map = _name_map(config, arch)
    read = {t.name: t for t in c.reader.tensors}
    expected_names = {}
    for base, (a, b) in pairs.items():
        dest = _gguf_name(name_map, base)
        expected_names[dest + ".lora_a"] = (base, a)
        expected_names[dest + ".lora_b"] = (base, b)
    for extra in sorted(set(read) - set(expected_names)):
        c.problems.append(f"tensor {extra} is not in the adapter")
    for missing in sorted(set(expected_names) - set(read)):
        c.problems.append(f"tensor {missing} ({expected_names[missing][1]}) is missing")
    transform = _for_llama_cpp(config, permute)
    worst = 0.0
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as st:
        for name in sorted(set(expected_names) & set(read)):
            base, key = expected_names[name]
            src = st.get_tensor(key)
            value = src.float().numpy()
            if name.endswith(".lora_b"):
                value = transform(base, value)
            worst = max(worst, _compare(c, read[name], value, "f16", key))
    c.done("adapter")
    return {"metadata_keys": len(c.fields), "tensors": len(read), "lora_pairs": len(pairs),
            "worst_abs_error": worst, "values": "exact"}


# ---------------------------------------------------------------------------- the entry points

def check_exportable(config: dict, tokenizer, *, use_dora: bool) -> str:
    """Before training: refuse (SpecError, BAD_SPEC) a base or adapter the export cannot write (its architecture,
    rope scaling or tokenizer; DoRA), so that the run fails at its start and not after training. ``config``: the
    base's config as a dict; ``tokenizer``: its loaded (fast) tokenizer. Returns the pre-tokenizer llama.cpp will
    use."""
    architecture(config)
    if use_dora:
        raise _no_dora()
    return _pre_tokenizer(json.loads(tokenizer.backend_tokenizer.to_str()), tokenizer.encode,
                          "the base model's tokenizer")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_gguf(merged_dir: str | Path, adapter_dir: str | Path, types: list[str], out_dir: str | Path, *,
                name: str) -> list[dict]:
    """Write ``<out_dir>/<name>-<type>.gguf`` for each requested type and ``<out_dir>/<name>-adapter-f16.gguf``,
    each read back and checked (a failed check raises and removes the file). Returns one entry per file:
    ``file`` (relative to out_dir's parent), ``kind``, ``type``, ``bytes``, ``sha256``, ``checks``."""
    merged_dir, adapter_dir, out_dir = Path(merged_dir), Path(adapter_dir), Path(out_dir)
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise _refuse(f"unknown type(s) {unknown}",
                      fix=f"use {', '.join(TYPES)}")
    architecture(json.loads((merged_dir / "config.json").read_text()))
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, str, Callable[[Path], None], Callable[[Path], dict]]] = [
        ("model", t, lambda p, t=t: write_model(merged_dir, p, t, name=name),
         lambda p, t=t: check_model(p, merged_dir, t)) for t in types]
    jobs.append(("adapter", "f16", lambda p: write_adapter(adapter_dir, merged_dir, p, name=f"{name}-adapter"),
                 lambda p: check_adapter(p, adapter_dir, merged_dir)))
    written = []
    for kind, qtype, write, check in jobs:
        path = out_dir / (f"{name}-{qtype}.gguf" if kind == "model" else f"{name}-adapter-{qtype}.gguf")
        try:
            write(path)
            checks = check(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        entry = {"file": f"{out_dir.name}/{path.name}", "kind": kind, "type": qtype, "bytes": path.stat().st_size,
                 "sha256": _sha256(path), "checks": checks}
        log.info("gguf: wrote and read back %s (%s, %d bytes)", entry["file"], kind, entry["bytes"])
        written.append(entry)
    return written
