"""Model shapes for the unit tests (a helper module: no tests here): the Llama-3-8B config the planner is tested
on, and a tiny randomly initialised Llama of the same architecture for the loss and checkpointing mechanics."""
from __future__ import annotations

from typing import Any

#: Llama-3-8B's shape (benchmarks/acceptance.py's LLAMA3_8B), as the planner reads it from a config
LLAMA3_8B: dict[str, Any] = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                 max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def llama3_8b():
    """:data:`LLAMA3_8B` as a transformers ``LlamaConfig``."""
    from transformers import LlamaConfig

    return LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k != "model_type"})


def tiny_llama(layers: int = 2, seed: int = 0, **config: Any):
    """A float32 ``LlamaForCausalLM`` with a 128-token vocabulary, hidden size 64 and ``layers`` decoder layers,
    initialised from ``torch.manual_seed(seed)``; ``config`` adds to or overrides its ``LlamaConfig``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                tie_word_embeddings=False), **config})
    return LlamaForCausalLM(cfg).float()
