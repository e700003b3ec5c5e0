"""Print where the demo's artifacts are, with a before/after sample generation."""
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
latest = (run / "latest").read_text().strip() if (run / "latest").is_file() else None
if not latest:
    sys.exit(f"no published version under {run}")
v = run / latest
report = json.loads((v / "eval_report.json").read_text())
val = report["validation"]
print(f"\nartifacts:   {v}/")
print(f"eval page:   {v}/eval_report.md  (loss curve: {v}/loss_curve.png)")
print(f"validation loss: {val['loss_before']} -> {val['loss_after']}  "
      f"(perplexity {val['perplexity_before']} -> {val['perplexity_after']})")
if report["generations"]:
    g = report["generations"][0]
    print(f"\nprompt: {g['prompt']}\n  before: {g['before'][:300]}\n  after:  {g['after'][:300]}")
