"""The eval report of a DPO/ORPO run: the held-out pairs' preference accuracy before and after, DPO's implicit
reward accuracy and margin, in eval_report.json's ``preference`` and as one line on the page (md and html)."""
from __future__ import annotations

from jobs.spec import parse_spec
from jobs.trainer import evaluate as ev


def _spec(tmp_path, method: str):
    return parse_spec({"name": "p1", "base_model": {"uri": "s3://models/base/"},
                       "dataset": {"train": "s3://data/pairs.jsonl"}, "output": str(tmp_path / "out"),
                       "training": {"method": method}})


def test_a_dpo_report_has_the_preference_section_and_its_line_on_both_pages(tmp_path):
    section = ev.preference_section("dpo", 0.1, 40, {"preference_accuracy": 0.425},
                                    {"preference_accuracy": 0.95, "reward_accuracy": 1.0, "reward_margin": 0.81234})
    assert section == {"method": "dpo", "beta": 0.1, "pairs": 40, "preference_accuracy_before": 0.425,
                       "preference_accuracy_after": 0.95, "reward_accuracy_after": 1.0,
                       "reward_margin_after": 0.8123}
    spec = _spec(tmp_path, "dpo")
    report = ev.build_report(spec, prompts=[], before=[], after=[], val_loss_before=0.6931,
                             val_loss_after=0.3, history=[], evals=[], train_outputs=[], preference=section)
    assert report["preference"] == section
    assert report["validation"]["perplexity_before"] is None  # DPO's loss is not a cross-entropy
    line = ev.preference_line(section)
    assert line == ("preference (dpo, beta 0.1): the model prefers the chosen answer on 42% → 95% of 40 held-out "
                    "pairs; implicit reward accuracy 100%, mean margin +0.812")
    md, page = ev.render_markdown(report, spec), ev.render_html(report, spec)
    assert line in md and "| validation loss (DPO, held-out pairs) | 0.6931 | 0.3 |" in md and "perplexity" not in md
    assert "preference (dpo, beta 0.1)" in page and "perplexity" not in page


def test_an_orpo_report_has_no_reward_numbers_and_an_sft_report_no_section(tmp_path):
    section = ev.preference_section("orpo", 0.2, 10, {"preference_accuracy": 0.5}, {"preference_accuracy": 0.9})
    assert section["reward_accuracy_after"] is None and section["reward_margin_after"] is None
    assert ev.preference_line(section).endswith("50% → 90% of 10 held-out pairs")
    spec = _spec(tmp_path, "sft")
    sft = ev.build_report(spec, prompts=[], before=[], after=[], val_loss_before=2.0,
                          val_loss_after=1.5, history=[], evals=[], train_outputs=[])
    md = ev.render_markdown(sft, spec)
    assert sft["preference"] is None and "preference (" not in md and "| perplexity | 7.389 | 4.482 |" in md
