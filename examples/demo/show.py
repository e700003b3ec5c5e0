"""Print where the demo's artifacts are and a before/after sample generation, then what training did:
validation loss, the answers that look broken (each named by its prompt), and, last, faithfulness
to the references before → after."""
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
latest = (run / "latest").read_text().strip() if (run / "latest").is_file() else None
if not latest:
    sys.exit(f"no published version under {run}")
v = run / latest
report = json.loads((v / "eval_report.json").read_text())
print(f"\nartifacts:   {v}/")
print(f"eval page:   {v}/eval_report.html  (markdown: {v}/eval_report.md)")
if report["generations"]:
    g = report["generations"][0]
    print(f"\nprompt: {g['prompt']}\n  before: {g['before'][:300]}\n  after:  {g['after'][:300]}")
val = report["validation"]
print(f"\nvalidation loss: {val['loss_before']} -> {val['loss_after']}  "
      f"(perplexity {val['perplexity_before']} -> {val['perplexity_after']})")
fl = report["checklist"]["fluency"]
print(f"fluency: {fl['broken_generations']} of {fl['of']} answers look broken")
for b in fl.get("broken", []):
    print(f"  #{b['prompt']} {b['text'][:70]}: {', '.join(x.replace('_', ' ') for x in b['flags'])}")
f = report["checklist"].get("faithfulness")
if f and f["of"]:
    def pct(x):
        return "n/a" if x is None else f"{round(100 * x)}%"
    print(f"faithfulness before -> after ({f['of']} prompts with a reference): ROUGE-L {f['before']['rouge_l']} -> "
          f"{f['after']['rouge_l']}, facts of the reference found {pct(f['before']['facts'])} -> "
          f"{pct(f['after']['facts'])}; less faithful after: {', '.join(f'#{n}' for n in f['dropped']) or 'none'}")
