"""torch.compile of the decoder layers: compiling them, whether bitsandbytes' 4-bit layers trace, inductor's
CPU probe the GPU compile can skip, and running the layers eager again for generation."""
from __future__ import annotations

import contextlib
import logging
import os

from .parts import _decoder, _unwrap

log = logging.getLogger(__name__)


def bnb_4bit_compiles() -> bool:
    """Whether bitsandbytes' 4-bit Linear traces into one dynamo graph: its matmul and dequantization
    are registered torch ops with fake kernels since 0.46 (bitsandbytes PR #1616, #1673)."""
    try:
        import bitsandbytes
        from packaging.version import Version

        return Version(bitsandbytes.__version__) >= Version("0.46")
    except Exception:  # noqa: BLE001 - not installed (CPU image) or an unparsable version
        return False


def skip_cpu_isa_probe() -> None:
    """Tell inductor not to probe the CPU's vector instructions. The layers compile for the GPU, but
    inductor still asks which SIMD extension the host has, building and running a test program per
    candidate (AMX, AVX-512, AVX2), each run a new Python that imports torch: ~25 s of the 8B first
    step, paid again by every warm start (benchmarks/README.md). Only host-side C++ helpers would be
    vectorised by it. Left alone when ``$TORCHINDUCTOR_VEC_ISA_OK`` is set."""
    if os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") is not None:
        return
    os.environ["TORCHINDUCTOR_VEC_ISA_OK"] = "0"  # compile workers started from here on
    try:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.vec_isa_ok = False
    except Exception as err:  # noqa: BLE001 - another torch: the probe runs, nothing else changes
        log.debug("inductor's CPU ISA probe left on (%s: %s)", type(err).__name__, err)


def compile_layers(base) -> None:
    """Compile each decoder layer of ``base`` on its own (regional compile: the layers share one graph)."""
    if next(base.parameters()).is_cuda:
        skip_cpu_isa_probe()
    for layer in _decoder(base).layers:
        layer.compile(dynamic=True)


@contextlib.contextmanager
def eager_layers(model):
    """Run the decoder layers uncompiled for a while (generation: a KV cache changes shape every
    token, which would recompile the per-layer graphs until dynamo's limit)."""
    layers = list(_decoder(_unwrap(model)).layers)
    saved = [getattr(layer, "_compiled_call_impl", None) for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = None
    try:
        yield model
    finally:
        for layer, impl in zip(layers, saved):
            layer._compiled_call_impl = impl
