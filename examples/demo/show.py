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
print(f"eval page:   {v}/eval_report.html  (markdown: {v}/eval_report.md)")
print(f"validation loss: {val['loss_before']} -> {val['loss_after']}  "
      f"(perplexity {val['perplexity_before']} -> {val['perplexity_after']})")
f = report["checklist"].get("faithfulness")
if f and f["of"]:
    def pct(x):
        return "n/a" if x is None else f"{round(100 * x)}%"
    print(f"faithfulness ({f['of']} prompts): ROUGE-L {f['before']['rouge_l']} -> {f['after']['rouge_l']}, "
          f"facts of the reference found {pct(f['before']['facts'])} -> {pct(f['after']['facts'])}; "
          f"dropped: {', '.join(f'#{n}' for n in f['dropped']) or 'none'}")
fl = report["checklist"]["fluency"]
print(f"fluency: {fl['broken_generations']} of {fl['of']} answers look broken")
for b in fl.get("broken", []):
    print(f"  #{b['prompt']} {b['text'][:70]}: {', '.join(x.replace('_', ' ') for x in b['flags'])}")
if report["generations"]:
    g = report["generations"][0]
    print(f"\nprompt: {g['prompt']}\n  before: {g['before'][:300]}\n  after:  {g['after'][:300]}")
