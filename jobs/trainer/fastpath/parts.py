"""Where the parts of a loaded causal LM are: the base model under a PEFT wrapper, and its decoder stack."""
from __future__ import annotations


def _unwrap(model):
    """The causal LM itself: the PEFT model's base model, or ``model`` when it is not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(base):
    """The decoder stack of a causal LM (the module holding ``layers``), without the lm_head."""
    if hasattr(base, "get_decoder"):
        dec = base.get_decoder()
        if dec is not None:
            return dec
    return base.model
