"""``python -m jobs`` under torch.profiler for a few steady optimizer steps; writes a small summary.

    PROFILE_STEPS=FIRST:N PROFILE_OUT=DIR python benchmarks/profile_job.py run --spec S --workdir W

The job runs unchanged (same process, same code path): a global optimizer step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) starts the profiler after optimizer
step FIRST-1 and stops it after step FIRST+N-1, with a device synchronize at both ends, so the window
is N whole training-loop iterations (packing, forward, backward, clipping, the optimizer, the
bookkeeping between steps). No training code is touched; only the profiled steps' own times (and so
that run's tokens/s) carry the profiler's overhead.

DIR gets ``profile_summary.json`` (kernels by CUDA time, grouped: GEMMs, attention, compiled Triton
kernels, the rest; GPU busy time vs the window's wall time, i.e. the host gaps; CUDA runtime calls that
block the host) and ``profile_top.txt`` (torch's own table). No trace is written: it would be tens of MB.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CATEGORIES = [  # first match wins; names as CUPTI reports them on Hopper (cuBLAS/cuBLASLt, CUTLASS, nvjet)
    # attention first: flash kernels' template arguments name cutlass types
    ("attention", re.compile(r"flash|fmha|attention|attn", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|wgmma|cublas|sm90_|sm100_|_mm_|matmul|scaled_mm", re.I)),
    ("triton (compiled: norms, RoPE, SwiGLU, dropout, casts, loss)", re.compile(r"^triton|_triton", re.I)),
    ("memcpy/memset", re.compile(r"memcpy|memset|Memcpy|Memset", re.I)),
    ("optimizer (fused AdamW, foreach)", re.compile(r"adam|foreach|multi_tensor", re.I)),
    ("reductions/elementwise (aten)", re.compile(r"reduce|elementwise|vectorized|unrolled|index|scatter|gather|"
                                                 r"copy|fill|cat|softmax|cross_entropy|nll", re.I)),
]
BLOCKING = re.compile(r"Synchronize|cudaMemcpy(?!Async)|cudaStreamWaitEvent|cudaMalloc|cudaFree|cudaHostAlloc", re.I)


def category(name: str) -> str:
    for label, rx in CATEGORIES:
        if rx.search(name):
            return label
    return "other"


def _union(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Total covered length of [start, end) intervals and the gaps between the covered stretches."""
    busy, gaps, cur_s, cur_e = 0.0, [], None, None
    for s, e in sorted(intervals):
        if cur_e is None:
            cur_s, cur_e = s, e
        elif s > cur_e:
            busy += cur_e - cur_s
            gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy, gaps


def summarize(prof, wall_s: float, steps: int, tokens: int, top: int = 25) -> dict:
    """A small JSON-able summary of a finished torch.profiler.profile."""
    from torch.autograd import DeviceType

    kernels: dict[str, dict] = {}
    intervals = []
    runtime: dict[str, dict] = {}
    cpu_ops: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            k = kernels.setdefault(e.name, {"us": 0.0, "count": 0})
            k["us"] += e.time_range.elapsed_us()
            k["count"] += 1
            intervals.append((e.time_range.start, e.time_range.end))
        elif e.name.startswith("cuda") or e.name.startswith("cu"):
            r = runtime.setdefault(e.name, {"us": 0.0, "count": 0})
            r["us"] += e.time_range.elapsed_us()
            r["count"] += 1
        elif e.name.startswith("aten::") or e.name.startswith("Torch-Compiled") or "CompiledFunction" in e.name:
            cpu_ops[e.name] = cpu_ops.get(e.name, 0.0) + e.self_cpu_time_total
    kernel_us = sum(k["us"] for k in kernels.values())
    by_cat: dict[str, float] = {}
    for name, k in kernels.items():
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + k["us"]
    busy_us, gaps = _union(intervals)
    wall_us = wall_s * 1e6
    big = sorted(gaps, reverse=True)
    out = {
        "steps": steps, "tokens": tokens, "wall_s": round(wall_s, 4),
        "tokens_per_s_under_profiler": round(tokens / wall_s, 1) if wall_s > 0 and tokens else None,
        "gpu_kernel_time_s": round(kernel_us / 1e6, 4),
        "gpu_busy_s": round(busy_us / 1e6, 4),
        "gpu_busy_fraction_of_wall": round(busy_us / wall_us, 4) if wall_us else None,
        "gpu_idle_s": round(max(0.0, wall_us - busy_us) / 1e6, 4),
        "gaps_between_kernels": {"count": len(gaps), "total_s": round(sum(gaps) / 1e6, 4),
                                 "over_100us": sum(1 for g in gaps if g > 100),
                                 "over_100us_total_s": round(sum(g for g in gaps if g > 100) / 1e6, 4),
                                 "largest_us": [round(g, 1) for g in big[:10]]},
        "share_of_kernel_time": {c: round(us / kernel_us, 4) for c, us in
                                 sorted(by_cat.items(), key=lambda x: -x[1])} if kernel_us else {},
        "kernel_time_s_by_category": {c: round(us / 1e6, 4) for c, us in sorted(by_cat.items(), key=lambda x: -x[1])},
        "kernel_launches": sum(k["count"] for k in kernels.values()),
        "top_kernels": [{"name": n[:160], "category": category(n), "ms": round(k["us"] / 1e3, 3), "count": k["count"],
                         "share": round(k["us"] / kernel_us, 4) if kernel_us else None}
                        for n, k in sorted(kernels.items(), key=lambda x: -x[1]["us"])[:top]],
        "cuda_runtime_calls": {n: {"ms": round(r["us"] / 1e3, 3), "count": r["count"]}
                               for n, r in sorted(runtime.items(), key=lambda x: -x[1]["us"])[:15]},
        "blocking_runtime_calls": {n: {"ms": round(r["us"] / 1e3, 3), "count": r["count"]}
                                   for n, r in runtime.items() if BLOCKING.search(n)},
        "top_cpu_ops_self_ms": {n: round(us / 1e3, 3) for n, us in sorted(cpu_ops.items(), key=lambda x: -x[1])[:15]},
    }
    return out


def compile_stats() -> dict:
    """What torch.compile did in this process so far: dynamo's per-phase seconds and its counters
    (graphs, recompiles, graph breaks, inductor/AOTAutograd cache hits and misses)."""
    out: dict = {}
    try:
        from torch._dynamo.utils import compile_times, counters

        out["compile_times"] = compile_times(repr="str", aggregate=True)
        out["counters"] = {k: {str(n): (v if isinstance(v, (int, float)) else str(v)) for n, v in list(c.items())[:40]}
                           for k, c in counters.items() if c}
    except Exception as err:  # noqa: BLE001 - another torch: no stats, the profile still counts
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def install(first: int, count: int, out_dir: Path) -> None:
    """Profile optimizer steps first..first+count-1 of this process's training loop."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from jobs.trainer import fastpath

    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    st = {"steps": 0, "prof": None, "t0": 0.0, "tokens": 0, "done": False}
    lm_loss = fastpath.lm_loss

    def counting_lm_loss(model, batch):  # tokens in the window (train.py calls fastpath.lm_loss by attribute)
        if st["prof"] is not None:
            st["tokens"] += int(batch["input_ids"].numel())
        return lm_loss(model, batch)

    fastpath.lm_loss = counting_lm_loss

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def hook(optimizer, args, kwargs):
        st["steps"] += 1
        n = st["steps"]
        if n == first - 1 and st["prof"] is None and not st["done"]:
            sync()
            st["compile"] = compile_stats()  # everything compiled by now: the first steps'
            st["compile"]["after_step"] = n
            st["prof"] = torch.profiler.profile(activities=acts, record_shapes=False, with_stack=False)
            st["prof"].__enter__()
            st["t0"] = time.perf_counter()
        elif n == first + count - 1 and st["prof"] is not None:
            sync()
            wall = time.perf_counter() - st["t0"]
            prof, st["prof"], st["done"] = st["prof"], None, True
            prof.__exit__(None, None, None)
            out_dir.mkdir(parents=True, exist_ok=True)
            # the window opens after step first-1's optimizer and ends after step first+count-1's: count steps
            summary = summarize(prof, wall, count, st["tokens"])
            summary["window"] = f"after optimizer step {first - 1} to after step {first + count - 1}"
            summary["compile_before_window"] = st.get("compile")
            (out_dir / "profile_summary.json").write_text(json.dumps(summary, indent=1))
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            (out_dir / "profile_top.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40,
                                                                                max_name_column_width=90))
            print(f"PROFILE {json.dumps({k: summary[k] for k in ('wall_s', 'tokens', 'gpu_busy_fraction_of_wall', 'share_of_kernel_time')})}",
                  flush=True)

    register_optimizer_step_post_hook(hook)


def main() -> int:
    spec = os.environ.get("PROFILE_STEPS", "10:3")
    first, count = (int(x) for x in spec.split(":"))
    if first < 2 or count < 1:
        raise SystemExit("PROFILE_STEPS=FIRST:N with FIRST >= 2")
    install(first, count, Path(os.environ.get("PROFILE_OUT", ".")))
    from jobs.trainer.main import main as jobs_main

    return jobs_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
