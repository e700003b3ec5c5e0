"""Summarise one device run's JSON results (bench_trainer.py, trl_baseline.py, trl_parity.py) as markdown.

Usage: python benchmarks/report.py RESULTS_DIR [> summary.md]. Ratios are against the best TRL
throughput measured in the same results folder (same device run).
"""
from __future__ import annotations

import glob
import json
import os
import sys


def load(folder):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            with open(path) as f:
                runs[os.path.basename(path)[:-5]] = json.load(f)
        except (OSError, ValueError):
            pass
    return runs


def describe(name, r):
    if name.startswith("trl_"):
        return f"TRL {r.get('variant')} (GC {'on' if str(r.get('gc')) == '1' else 'off'}, batch {r.get('bs')})"
    bits = [f"{r.get('tokens_per_micro_batch')} tok/micro-batch", "GC on" if r.get("gc") else "no GC",
            "Liger kernels" if r.get("liger") else "no Liger", f"CE {r.get('ce')}"]
    if not r.get("lean_lora", True):
        bits.append("PEFT LoRA forward")
    if r.get("compile"):
        bits.append("compile")
    if r.get("quant", "none") != "none":
        bits.append(f"QLoRA {r['quant']}")
    if r.get("world", 1) > 1:
        bits.append(f"{r['world']} GPUs DP")
    return "ours: " + ", ".join(bits)


def parity(runs):
    a = runs.get("trl_parity_default")
    b = runs.get("fp_parity")
    if not a or not b or "losses" not in a or "losses" not in b:
        return None
    la, lb = a["losses"], b["losses"]
    n = min(len(la), len(lb))
    la, lb = la[:n], lb[:n]
    diff = [abs(x - y) for x, y in zip(la, lb)]

    def smooth(xs, k=20):
        return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]

    sa, sb = smooth(la), smooth(lb)
    srel = [abs(x - y) / abs(x) for x, y in zip(sa, sb)]
    return dict(steps=n, first_trl=la[0], first_ours=lb[0], last_trl=la[-1], last_ours=lb[-1],
                mean_abs_diff=sum(diff) / n, max_abs_diff=max(diff), max_rel_diff_smoothed20=max(srel),
                final_rel_diff_smoothed20=srel[-1])


def main(folder):
    runs = load(folder)
    thr = {k: v for k, v in runs.items() if "tokens_per_s" in v and "parity" not in k}
    trl = {k: v for k, v in thr.items() if k.startswith("trl_")}
    best_name, best = None, None
    for k, v in trl.items():
        if best is None or v["tokens_per_s"] > best["tokens_per_s"]:
            best_name, best = k, v
    gpu = next((v.get("gpu") for v in thr.values() if v.get("gpu")), "?")
    print(f"# Device run: {gpu}\n")
    print("| run | configuration | real tokens/s | peak GiB | step s (median) | ratio vs best TRL |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    order = sorted(thr, key=lambda k: (not k.startswith("trl_"), -thr[k]["tokens_per_s"]))
    for k in order:
        v = thr[k]
        ratio = f"{v['tokens_per_s'] / best['tokens_per_s']:.2f}x" if best else "-"
        print(f"| {k} | {describe(k, v)} | {v['tokens_per_s']:,.0f} | {v.get('peak_mem_gib', 0):.1f} | "
              f"{v.get('step_s_median', 0):.2f} | {ratio} |")
    if best:
        print(f"\nBest TRL configuration in this run: {best_name} ({best['tokens_per_s']:,.0f} tokens/s, "
              f"{best['peak_mem_gib']:.1f} GiB).")
    one = thr.get("fp_auto")
    two = thr.get("fp_dp2")
    if one and two:
        print(f"\nData parallel: 2 GPUs {two['tokens_per_s']:,.0f} tokens/s vs 1 GPU {one['tokens_per_s']:,.0f} "
              f"= {two['tokens_per_s'] / one['tokens_per_s']:.2f}x")
    q = thr.get("fp_qlora4_2048")
    if q:
        print(f"\nQLoRA 4-bit, 2048-token micro-batches: peak {q['peak_mem_gib']:.2f} GiB, "
              f"{q['tokens_per_s']:,.0f} tokens/s")
    p = parity(runs)
    if p:
        print("\nLoss parity (LAYERS=2, markov data, TRL 'default' vs ours on the same batches):")
        print("```\n" + json.dumps(p, indent=1) + "\n```")
        out = os.path.join(folder, "parity_summary.json")
        with open(out, "w") as f:
            json.dump(p, f, indent=1)
    for k, v in sorted(thr.items()):
        if v.get("plan_notes"):
            print(f"\n{k} plan: " + "; ".join(v["plan_notes"]))
            break


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
