"""A job process on a machine without CUDA keeps the GPU-only packages (bitsandbytes, torchao) out: peft and
transformers import them at their own import when installed, ~2 s of every CPU job's start-up; nothing on a CPU
uses them unless the spec quantises or asks for the paged 8-bit optimizer."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from jobs.spec import parse_spec
from jobs.trainer.main import GPU_ONLY_PACKAGES, _skip_gpu_only_imports

pytestmark = pytest.mark.unit

BASE = {"name": "r", "base_model": {"uri": "s3://models/x/"}, "dataset": {"train": "s3://data/t.jsonl"},
        "output": "s3://runs/p"}


@pytest.fixture()
def modules(monkeypatch):
    """sys.modules as the job process starts (neither package imported yet), restored after the test."""
    for name in GPU_ONLY_PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)  # records what was there, for the undo
        monkeypatch.delitem(sys.modules, name)
    return sys.modules


def test_a_cpu_run_makes_them_unimportable_as_peft_and_transformers_ask(monkeypatch, modules):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _skip_gpu_only_imports(parse_spec({**BASE, "resources": {"gpus": 0}}))
    for name in GPU_ONLY_PACKAGES:
        assert importlib.util.find_spec(name) is None, name  # peft's is_bnb_available, transformers' checks
        with pytest.raises(ImportError):
            __import__(name)


@pytest.mark.parametrize("extra", [
    {"resources": {"gpus": 1}, "quantization": {"mode": "4bit"}},  # no GPU visible: bitsandbytes' CPU kernels
    {"resources": {"gpus": 0}, "training": {"optimizer": "paged_adamw_8bit"}},
])
def test_a_run_that_could_use_bitsandbytes_keeps_it(monkeypatch, modules, extra):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _skip_gpu_only_imports(parse_spec({**BASE, **extra}))
    assert not any(name in modules for name in GPU_ONLY_PACKAGES)


def test_a_gpu_machine_keeps_them(monkeypatch, modules):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not _skip_gpu_only_imports(parse_spec({**BASE, "resources": {"gpus": 1}}))
    assert not any(name in modules for name in GPU_ONLY_PACKAGES)
