"""The training job: data -> LoRA/QLoRA -> eval -> merge -> versioned artifacts.

Importing this package must stay cheap: no torch, no Kubernetes client.
"""
import os as _os

__version__ = "0.1.0"

# OpenMP threads that finish their part of a parallel op sleep until the next one instead of spinning.
# libgomp (torch's CPU thread pool) reads this once, when torch loads, so it is set here, before any of
# the job's modules imports torch; torchrun's workers and the pod inherit it. libgomp's own default
# spins ~300k rounds first, which a CPU shared with anything else (a pod's neighbours, the other
# rank, the control plane of a test node, its own CFS quota) turns into stalls: with one other busy
# process on 2 cores the CPU run's generation took 4.4x longer (benchmarks/cpu_wait_policy.py). A
# user who set either knob keeps it.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
