"""A checkpoint planted in the real bucket (MinIO) as a pickle is refused with a clear error and never
unpickled: anyone who can write to the output bucket must not run code in the training pods."""
from __future__ import annotations

import os
import pickle

import pytest

from jobs.errors import DataError
from jobs.storage import S3Store
from jobs.trainer.checkpoints import Checkpoints
from jobs.trainer.train import TrainState
from tests.unit.test_checkpoints_and_merge import _optimizer, _tiny_llama, _with_adapter

pytestmark = pytest.mark.s3

MARKER = "/tmp/lora-jobs-pickle-ran-s3"


class _Boom:
    def __reduce__(self):
        return (open, (MARKER, "w"))


def test_a_pickle_planted_in_the_bucket_is_refused_and_never_unpickled(s3_env, s3_prefix, tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    bucket, _, prefix = s3_prefix[5:].partition("/")
    store = S3Store(bucket)
    ckpt = f"{prefix}/run/checkpoints/abc/step-000004"
    payload = pickle.dumps({"optimizer": _Boom()})
    for name in ("optim.pt", "adapter.pt"):
        store.put_bytes(f"{ckpt}/{name}", payload)
    store.put_bytes(f"{ckpt}/state.json", b'{"step": 4}')
    store.put_bytes(f"{ckpt}/_COMPLETE", b"ok\n")

    model = _with_adapter(_tiny_llama())
    opt, sched = _optimizer(model)
    with pytest.raises(DataError) as err:
        Checkpoints(store, f"{prefix}/run/checkpoints/abc", tmp_path / "work").restore(model, opt, sched, TrainState())
    assert "step-000004" in str(err.value) and "safetensors" in str(err.value), str(err.value)
    assert not os.path.exists(MARKER), "nothing from the bucket was unpickled"
