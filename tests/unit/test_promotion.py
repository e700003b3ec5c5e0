"""Eval-gated promotion (jobs/promotion.py): the paired bootstrap, the gate's decisions, and the champion pointer
on a local folder (conditional writes, the race, a stale tag). tests/integration/test_promotion_minio.py runs the
same pointer checks against the real MinIO. Versions are published by the real publisher from folders holding
reports in eval_report.json's format, with per-prompt scores set by the test."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from jobs.promotion import (CHAMPION, THIS_VERSION, GateRefused, PromotionConflict, compare, judge_before_publish,
                            paired_bootstrap, prepare_promotion, promote, promote_judged, read_champion, read_evidence,
                            read_folder_evidence, write_champion)
from jobs.publish import publish_version
from jobs.spec import PromotionSpec
from jobs.storage import LocalStore

N_PROMPTS = 12


def version_folder(tmp_path: Path, tag: str, *, rouge: list[float], facts: list[float | None] | None = None,
                   broken: tuple[int, ...] = (), val_loss: float = 1.2, prompts: list[str] | None = None,
                   validation_sha: str | None = None, train_sha: str = "a" * 64,
                   val_losses: list[float] | None = None, regression: list[float] | None = None) -> Path:
    """A folder as the job leaves it before publishing: an adapter, metadata.json, data_report.json and an
    eval_report.json whose generations carry the given per-prompt scores (``broken``: prompts with a fluency
    flag); ``val_losses`` and ``regression``: per-example losses after training (left out: a version published
    before the job recorded them)."""
    d = tmp_path / f"folder-{tag}"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(tag.encode() * 100)
    prompts = prompts or [f"How do I set up feature {i}?" for i in range(len(rouge))]
    facts = facts or [0.5] * len(rouge)
    gens = []
    for i, (p, r, f) in enumerate(zip(prompts, rouge, facts)):
        gens.append({"prompt": p, "reference": f"Open Settings > Feature {i}.", "context": None, "after": "…",
                     "fluency_flags": ["repeated_phrase"] if i in broken else [],
                     "faithfulness": {"before": {"rouge_l": 0.1, "facts": 0.0},
                                      "after": {"rouge_l": r, "facts": f, "facts_found": [], "facts_missing": []}}})
    report: dict = {"validation": {"loss_before": 2.0, "loss_after": val_loss}, "generations": gens}
    if val_losses is not None:
        report["validation"]["losses_after"] = val_losses
    if regression is not None:
        report["regression"] = {"losses_after": regression, "loss_after": sum(regression) / len(regression)}
    (d / "eval_report.json").write_text(json.dumps(report))
    data = {"train": {"dataset_sha256": train_sha, "seed": 42, "kept_rows": 120},
            "split": {"train_rows": 108, "validation_rows": 12}}
    if validation_sha:
        data["validation"] = {"dataset_sha256": validation_sha}
    (d / "data_report.json").write_text(json.dumps(data))
    (d / "metadata.json").write_text(json.dumps({"run": "r1", "metrics": {"val_loss_after": val_loss}}))
    return d


GOOD = [0.40, 0.42, 0.38, 0.45, 0.41, 0.39, 0.44, 0.40, 0.43, 0.37, 0.42, 0.41]
BETTER = [x + 0.2 for x in GOOD]
WORSE = [0.05, 0.02, 0.08, 0.0, 0.04, 0.03, 0.06, 0.01, 0.05, 0.02, 0.03, 0.04]  # what lr 0 (the base) answers


def publish(store, run_prefix: str, tmp_path: Path, tag: str, **scores) -> str:
    return publish_version(store, run_prefix, version_folder(tmp_path, tag, **scores))


# ------------------------------------------------------------------------------ the bootstrap

def test_paired_bootstrap_is_seeded_and_brackets_the_mean():
    diffs = [0.1, 0.3, -0.05, 0.2, 0.15, 0.0, 0.25, 0.1]
    mean, low, high = paired_bootstrap(diffs, resamples=2000, seed=7)
    assert (mean, low, high) == paired_bootstrap(diffs, resamples=2000, seed=7)
    assert low < mean < high and low > 0  # every resample of these mostly-positive differences stays positive
    assert paired_bootstrap([0.0] * 5) == (0.0, 0.0, 0.0)
    wide = paired_bootstrap(diffs, confidence=0.99, seed=7)
    assert wide[1] <= low and wide[2] >= high
    with pytest.raises(ValueError):
        paired_bootstrap([])


# ------------------------------------------------------------------------------ the gate (pure)

def _evidence(tmp_path, tag, **scores):
    store = LocalStore(str(tmp_path / "gate-out"))
    v = publish(store, f"r-{tag}", tmp_path, tag, **scores)
    return read_evidence(store, f"r-{tag}", v)


def test_a_clearly_better_candidate_passes_with_every_interval_shown(tmp_path):
    champ = _evidence(tmp_path, "champ", rouge=GOOD, val_loss=1.2)
    cand = _evidence(tmp_path, "cand", rouge=BETTER, val_loss=1.1)
    c = compare(champ, cand)
    assert c.passed and not c.reasons
    by = {m.metric: m for m in c.metrics}
    assert by["rouge_l"].verdict == "better" and by["rouge_l"].low > 0.15 and by["rouge_l"].pairs == N_PROMPTS
    assert by["val_loss"].primary and by["val_loss"].verdict == "better" and by["val_loss"].low is None
    assert by["fluent"].verdict == "not worse"


def test_a_candidate_trained_with_learning_rate_0_fails_naming_each_worse_metric(tmp_path):
    champ = _evidence(tmp_path, "champ", rouge=GOOD, val_loss=1.2)
    base = _evidence(tmp_path, "lr0", rouge=WORSE, val_loss=2.0, broken=(0, 2, 3, 5, 7, 9, 11))
    c = compare(champ, base)
    assert not c.passed
    by = {m.metric: m for m in c.metrics}
    assert by["val_loss"].verdict == "significantly worse"
    assert by["rouge_l"].verdict == "significantly worse" and by["rouge_l"].high < -0.02
    assert by["fluent"].verdict == "significantly worse"
    assert any("ROUGE-L" in r for r in c.reasons) and any("validation loss" in r for r in c.reasons)


def test_a_worse_primary_mean_fails_even_within_the_tolerance_and_noise_elsewhere_passes(tmp_path):
    champ = _evidence(tmp_path, "champ", rouge=GOOD, val_loss=1.2)
    noisy = _evidence(tmp_path, "noisy", rouge=[x + (0.03 if i % 2 else -0.04) for i, x in enumerate(GOOD)],
                      val_loss=1.19)
    c = compare(champ, noisy)
    assert c.passed, c.reasons
    assert {m.metric: m for m in c.metrics}["rouge_l"].verdict == "worse (not significant)"
    slightly = _evidence(tmp_path, "slightly", rouge=BETTER, val_loss=1.21)
    c = compare(champ, slightly)
    assert not c.passed and c.reasons == ["validation loss is the primary metric and its mean is worse than the "
                                          "champion's"]
    assert compare(champ, slightly, PromotionSpec(primary="rouge_l")).passed


#: per-example validation losses of a champion (12 held-out rows), and a candidate whose every loss is lower
CHAMP_LOSSES = [1.10, 1.35, 0.95, 1.20, 1.42, 1.05, 1.18, 1.30, 0.99, 1.25, 1.12, 1.28]
LOWER_LOSSES = [x - 0.1 + (0.03 if i % 2 else -0.02) for i, x in enumerate(CHAMP_LOSSES)]


def test_val_loss_gets_a_bootstrap_interval_from_per_example_losses(tmp_path):
    champ = _evidence(tmp_path, "champ", rouge=GOOD, val_loss=sum(CHAMP_LOSSES) / 12, val_losses=CHAMP_LOSSES)
    cand = _evidence(tmp_path, "cand", rouge=GOOD, val_loss=sum(LOWER_LOSSES) / 12, val_losses=LOWER_LOSSES)
    c = compare(champ, cand)
    v = {m.metric: m for m in c.metrics}["val_loss"]
    assert c.passed and v.verdict == "better" and v.pairs == 12 and not v.note
    assert v.low is not None and v.high is not None and v.low <= v.difference <= v.high < 0
    worse = _evidence(tmp_path, "worse", rouge=GOOD, val_loss=1.6, val_losses=[x + 0.4 for x in CHAMP_LOSSES])
    w = {m.metric: m for m in compare(champ, worse).metrics}["val_loss"]
    assert w.verdict == "significantly worse" and w.low is not None and w.low > 0.3


def test_per_example_losses_of_different_counts_are_refused(tmp_path):
    champ = _evidence(tmp_path, "champ", rouge=GOOD, val_losses=CHAMP_LOSSES)
    short = _evidence(tmp_path, "short", rouge=GOOD, val_losses=LOWER_LOSSES[:11])
    with pytest.raises(GateRefused, match="11 per-example losses against 12"):
        compare(champ, short)


def test_a_version_without_per_example_losses_falls_back_to_the_plain_difference_and_says_so(tmp_path):
    older = _evidence(tmp_path, "older", rouge=GOOD, val_loss=1.2)
    newer = _evidence(tmp_path, "newer", rouge=GOOD, val_loss=1.1, val_losses=LOWER_LOSSES)
    c = compare(older, newer)
    v = {m.metric: m for m in c.metrics}["val_loss"]
    assert c.passed and v.verdict == "better" and v.low is None and v.pairs == 1
    assert v.difference == pytest.approx(-0.1) and v.note.startswith("no interval: v1 has no per-example validation losses") and "plain difference" in v.note
    assert {m.metric: m for m in c.metrics}["regression"].verdict == "not compared"


def test_the_regression_set_flags_a_candidate_that_forgot_and_passes_one_that_did_not(tmp_path):
    base = [2.1, 1.8, 2.5, 1.9, 2.2, 2.0, 1.7, 2.4, 2.3, 1.6, 2.0, 2.2, 1.9, 2.1, 1.8, 2.6,
            2.0, 1.9, 2.3, 2.2, 1.7, 2.5, 2.1, 1.8]
    champ = _evidence(tmp_path, "champ", rouge=GOOD, regression=base)
    kept = _evidence(tmp_path, "kept", rouge=GOOD, regression=[x + (0.02 if i % 3 else -0.03)
                                                               for i, x in enumerate(base)])
    forgot = _evidence(tmp_path, "forgot", rouge=GOOD, regression=[x + 0.6 + 0.05 * (i % 4)
                                                                   for i, x in enumerate(base)])
    ok = compare(champ, kept)
    r = {m.metric: m for m in ok.metrics}["regression"]
    assert ok.passed and r.pairs == 24 and r.low is not None and r.verdict != "significantly worse"
    bad = compare(champ, forgot)
    r = {m.metric: m for m in bad.metrics}["regression"]
    assert not bad.passed and r.verdict == "significantly worse" and r.high is not None and r.high > 0.5
    assert any("general ability" in reason for reason in bad.reasons)
    assert compare(champ, forgot, PromotionSpec(tolerance={"regression": 1.0})).passed
    champ.eval_report["regression"]["set_sha256"], forgot.eval_report["regression"]["set_sha256"] = "a", "b"
    r = {m.metric: m for m in compare(champ, forgot).metrics}["regression"]
    assert r.verdict == "not compared" and "different versions of the regression set" in r.why


def test_different_held_out_sets_are_refused_with_what_differs(tmp_path):
    champ = _evidence(tmp_path, "champ", rouge=GOOD)
    other_prompts = _evidence(tmp_path, "prompts", rouge=BETTER, prompts=[f"Other {i}" for i in range(N_PROMPTS)])
    with pytest.raises(GateRefused, match="different held-out sets .*eval prompts") as err:
        compare(champ, other_prompts)
    assert "--force" in err.value.hint
    other_data = _evidence(tmp_path, "data", rouge=BETTER, train_sha="b" * 64)
    with pytest.raises(GateRefused, match="validation set"):
        compare(champ, other_data)
    other_file = _evidence(tmp_path, "file", rouge=BETTER, validation_sha="c" * 64)
    with pytest.raises(GateRefused, match="validation set"):
        compare(champ, other_file)


# ------------------------------------------------------------------------------ the pointer (shared with MinIO)

def check_first_then_gated_moves(store, run_prefix: str, tmp_path: Path) -> None:
    """No champion: v1 becomes it (If-None-Match); a better v2 moves it (If-Match); a worse v3 stays published,
    unpromoted, with the reasons; --force moves it, recorded as forced."""
    v1 = publish(store, run_prefix, tmp_path, "one", rouge=GOOD, val_loss=1.2)
    r = promote(store, run_prefix, v1)
    assert r.promoted and r.first and "there was none" in r.sentence
    pointer, tag1 = read_champion(store, run_prefix)
    assert pointer["version"] == "v1" and len(pointer["manifest_sha256"]) == 64 and pointer["previous"] is None
    assert promote(store, run_prefix, "v1").already
    v2 = publish(store, run_prefix, tmp_path, "two", rouge=BETTER, val_loss=1.1)
    r = promote(store, run_prefix, v2)
    assert r.promoted and not r.forced and r.previous == "v1" and r.comparison.passed
    pointer, tag2 = read_champion(store, run_prefix)
    assert pointer["version"] == "v2" and pointer["gate"]["passed"] and tag2 != tag1
    publish(store, run_prefix, tmp_path, "three", rouge=WORSE, val_loss=2.0)
    r = promote(store, run_prefix)  # default: the newest complete version
    assert r.candidate == "v3" and not r.promoted and r.reasons and "stays published, unpromoted" in r.sentence
    assert read_champion(store, run_prefix)[0]["version"] == "v2"
    r = promote(store, run_prefix, "3", force=True)
    assert r.promoted and r.forced and read_champion(store, run_prefix)[0]["forced"] is True
    assert read_champion(store, run_prefix)[0]["reasons_overridden"] == r.reasons


def check_concurrent_promotions_have_one_winner(make_store, run_prefix: str, tmp_path: Path, racers: int = 4) -> None:
    """``racers`` promotions of different versions, each judged against the same champion, write at once: exactly
    one moves the pointer; every other gets a PromotionConflict naming the winner."""
    store = make_store()
    promote(store, run_prefix, publish(store, run_prefix, tmp_path, "base", rouge=GOOD, val_loss=1.2))
    versions = [publish(store, run_prefix, tmp_path, f"c{i}", rouge=[x + 0.1 + 0.01 * i for x in GOOD],
                        val_loss=1.1 - 0.01 * i) for i in range(racers)]
    pending = [prepare_promotion(make_store(), run_prefix, v) for v in versions]  # all read the same tag
    assert len({p.tag for p in pending}) == 1
    start = threading.Barrier(racers)
    won, lost = [], []

    def go(p):
        start.wait()
        try:
            won.append(p.commit().candidate)
        except PromotionConflict as err:
            lost.append(err)

    threads = [threading.Thread(target=go, args=(p,)) for p in pending]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == racers - 1, (won, lost)
    assert read_champion(store, run_prefix)[0]["version"] == won[0]
    for err in lost:
        assert f"made {won[0]} champion" in err.message and "launcher promote" in err.hint


def check_a_stale_tag_is_refused(store, run_prefix: str, tmp_path: Path) -> None:
    v1 = publish(store, run_prefix, tmp_path, "s1", rouge=GOOD)
    promote(store, run_prefix, v1)
    pointer, stale = read_champion(store, run_prefix)
    v2 = publish(store, run_prefix, tmp_path, "s2", rouge=BETTER, val_loss=1.1)
    promote(store, run_prefix, v2)
    with pytest.raises(PromotionConflict, match="made v2 champion"):
        write_champion(store, run_prefix, {**pointer, "token": "late"}, stale)
    with pytest.raises(PromotionConflict):  # a first promotion (If-None-Match) where there is a champion
        write_champion(store, run_prefix, {**pointer, "token": "first"}, None)
    assert read_champion(store, run_prefix)[0]["version"] == "v2"


def test_first_promotion_then_gated_moves_on_a_folder(tmp_path):
    check_first_then_gated_moves(LocalStore(str(tmp_path / "out")), "r1", tmp_path)
    assert (tmp_path / "out" / "r1" / CHAMPION).is_file()


def test_concurrent_promotions_on_a_folder_have_exactly_one_winner(tmp_path):
    check_concurrent_promotions_have_one_winner(lambda: LocalStore(str(tmp_path / "out")), "r1", tmp_path)


def test_a_stale_tag_is_refused_on_a_folder(tmp_path):
    check_a_stale_tag_is_refused(LocalStore(str(tmp_path / "out")), "r1", tmp_path)


# ------------------------------------------------------------------------------ the job: judged before publishing

def job_publishes(store, run_prefix: str, folder: Path, settings: PromotionSpec | None = None, *,
                  meanwhile=lambda: None):
    """What the job's publish step does with promotion.auto (jobs/trainer/recipe.py): the gate on the folder's
    reports against the current champion, its verdict into eval_report.json, the folder published, then the
    pointer moved on that verdict. ``meanwhile``: what other promotions do between the verdict and the publish.
    Returns (the verdict's section as published, the result)."""
    verdict = judge_before_publish(store, run_prefix, folder, settings)
    report = json.loads((folder / "eval_report.json").read_text())
    report["promotion"] = verdict.section()
    (folder / "eval_report.json").write_text(json.dumps(report))
    meanwhile()
    version = publish_version(store, run_prefix, folder)
    result = promote_judged(store, run_prefix, read_folder_evidence(folder, version), verdict, settings)
    published = read_evidence(store, run_prefix, version)
    assert published.manifest_sha256 == read_folder_evidence(folder, version).manifest_sha256
    return published.eval_report["promotion"], result


def test_the_job_judges_before_publishing_and_the_published_report_carries_the_verdict(tmp_path):
    store = LocalStore(str(tmp_path / "out"))
    page, r = job_publishes(store, "r1", version_folder(tmp_path, "one", rouge=GOOD, val_loss=1.2))
    assert page["status"] == "first" and page["champion"] is None and page["comparison"] is None
    assert page["summary"].startswith("first version: no champion to compare") and "launcher status" in page["note"]
    assert r.promoted and r.first and r.candidate == "v1" and not r.note
    pointer = read_champion(store, "r1")[0]
    assert pointer["version"] == "v1" and pointer["by"] == "auto (promotion.auto)"
    assert pointer["manifest_sha256"] == read_evidence(store, "r1", "v1").manifest_sha256

    page, r = job_publishes(store, "r1", version_folder(tmp_path, "lr0", rouge=WORSE, val_loss=2.0,
                                                        broken=(0, 2, 3)))
    assert page["status"] == "failed" and page["champion"] == "v1"
    assert page["summary"] == "compared with the champion v1: the gate failed"
    assert page["champion_manifest_sha256"] == pointer["manifest_sha256"]
    by = {m["metric"]: m for m in page["comparison"]["metrics"]}
    assert page["comparison"]["candidate"] == THIS_VERSION and page["comparison"]["champion"] == "v1"
    assert by["rouge_l"]["verdict"] == "significantly worse" and by["rouge_l"]["high"] < 0 and by["rouge_l"]["pairs"]
    assert any("ROUGE-L" in x for x in page["reasons"]) and page["reasons"] == page["comparison"]["reasons"]
    assert not r.promoted and r.previous == "v1" and r.candidate == "v2" and r.reasons == page["reasons"]
    assert r.sentence.startswith("v2 stays published, unpromoted (v1 stays champion): ") and not r.note
    assert r.comparison.candidate == "v2"  # named by its version once published
    assert read_champion(store, "r1")[0]["version"] == "v1"

    page, r = job_publishes(store, "r1", version_folder(tmp_path, "three", rouge=BETTER, val_loss=1.1))
    assert page["status"] == "passed" and page["summary"] == "compared with the champion v1: the gate passed"
    assert r.promoted and r.previous == "v1" and read_champion(store, "r1")[0]["gate"]["candidate"] == "v3"


def test_a_champion_that_changes_after_the_verdict_is_judged_again_and_status_says_so(tmp_path):
    """The page (published, immutable) keeps the verdict against the champion at publish time; when another
    version became champion before the pointer write, the gate runs again against it and the result (the run's
    status) says both."""
    store = LocalStore(str(tmp_path / "out"))
    promote(store, "r1", publish(store, "r1", tmp_path, "one", rouge=GOOD, val_loss=1.2))
    great = [x + 0.4 for x in GOOD]

    def a_better_champion():
        assert promote(store, "r1", publish(store, "r1", tmp_path, "two", rouge=great, val_loss=0.9)).promoted

    page, r = job_publishes(store, "r1", version_folder(tmp_path, "three", rouge=BETTER, val_loss=1.1),
                            meanwhile=a_better_champion)
    assert page["status"] == "passed" and page["champion"] == "v1", "the page: the gate against v1, at publish time"
    assert not r.promoted and r.previous == "v2" and r.comparison.champion == "v2" and r.candidate == "v3"
    assert r.note == ("the eval page records the gate at publish time: compared with the champion v1: the gate "
                      "passed; the champion pointer changed after that (now v2), so the gate ran again: compared "
                      "with the champion v2: the gate failed")
    assert r.note in r.sentence and read_champion(store, "r1")[0]["version"] == "v2"

    def a_weaker_champion_forced():
        assert promote(store, "r1", publish(store, "r1", tmp_path, "four", rouge=WORSE, val_loss=2.0),
                       force=True).forced

    page, r = job_publishes(store, "r1", version_folder(tmp_path, "five", rouge=BETTER, val_loss=1.1),
                            meanwhile=a_weaker_champion_forced)
    assert page["status"] == "failed" and page["champion"] == "v2"
    assert r.promoted and r.previous == "v4" and "now v4), so the gate ran again: compared with the champion v4: " \
        "the gate passed" in r.note
    assert read_champion(store, "r1")[0]["version"] == "v5"


class _RivalFirst(LocalStore):
    """A real folder store on which another promotion lands just before this writer's first pointer write: the
    race between a verdict's tag check and its conditional write, made to happen every time."""

    def __init__(self, root: str, rival) -> None:
        super().__init__(root)
        self.rival = rival

    def put_bytes_if_match(self, key: str, data: bytes, tag: str | None) -> bool:
        if key.endswith("/" + CHAMPION) and self.rival is not None:
            rival, self.rival = self.rival, None
            rival()
        return super().put_bytes_if_match(key, data, tag)


def test_a_race_lost_at_the_pointer_write_is_judged_again_against_the_winner(tmp_path):
    root = str(tmp_path / "out")
    plain = LocalStore(root)
    promote(plain, "r1", publish(plain, "r1", tmp_path, "one", rouge=GOOD, val_loss=1.2))
    great = [x + 0.4 for x in GOOD]
    store = _RivalFirst(root, lambda: promote(plain, "r1", publish(plain, "r1", tmp_path, "two", rouge=great,
                                                                    val_loss=0.9)))
    page, r = job_publishes(store, "r1", version_folder(tmp_path, "three", rouge=BETTER, val_loss=1.1))
    assert page["status"] == "passed" and page["champion"] == "v1"
    # the job published v2; the rival published v3 and made it champion between the job's check and its write
    assert r.candidate == "v2" and not r.promoted and not r.error and r.previous == "v3" and "now v3" in r.note
    assert read_champion(plain, "r1")[0]["version"] == "v3"


def test_the_job_never_fails_on_the_gate_and_says_why(tmp_path):
    store = LocalStore(str(tmp_path / "out"))
    promote(store, "r1", publish(store, "r1", tmp_path, "one", rouge=GOOD))
    page, r = job_publishes(store, "r1", version_folder(tmp_path, "other", rouge=BETTER,
                                                        prompts=[f"Other {i}" for i in range(N_PROMPTS)]))
    assert page["status"] == "not run" and page["champion"] == "v1"
    assert page["summary"].startswith("gate not run: cannot compare this version with the champion v1: they were "
                                      "evaluated on different held-out sets")
    assert not r.promoted and "different held-out sets" in r.error and r.previous == "v1"
    (tmp_path / "out" / "r1" / CHAMPION).write_text("not a pointer")
    page, r = job_publishes(store, "r1", version_folder(tmp_path, "three", rouge=BETTER))
    assert page["status"] == "not run" and "is not a champion pointer" in page["summary"]
    assert not r.promoted and "is not a champion pointer" in r.error and "launcher promote r1:v3" in r.error


def test_launcher_status_of_a_local_run_says_what_promotion_auto_finally_did(tmp_path):
    """The run's progress object carries the result (jobs/trainer/recipe.py closes it with
    PromotionResult.progress()); `launcher status` prints its sentence, including that the page's verdict was
    superseded. The local run's folder is written as launcher.backends.local leaves a finished run."""
    from typer.testing import CliRunner

    from jobs.progress import ProgressWriter, progress_key
    from launcher import cli

    out = tmp_path / "out"
    store = LocalStore(str(out))
    promote(store, "r1", publish(store, "r1", tmp_path, "one", rouge=GOOD, val_loss=1.2))

    def a_better_champion():
        promote(store, "r1", publish(store, "r1", tmp_path, "two", rouge=[x + 0.4 for x in GOOD], val_loss=0.9))

    _, r = job_publishes(store, "r1", version_folder(tmp_path, "three", rouge=BETTER, val_loss=1.1),
                         meanwhile=a_better_champion)
    progress = ProgressWriter(store, progress_key("r1", "h" * 12))
    progress.close("succeeded", stage="publish", version=r.candidate, promotion=r.progress())
    assert r.progress() == {"promoted": False, "champion": "v2", "sentence": r.sentence, "page": "passed",
                            "rejudged": True}
    job = tmp_path / "state" / "r1-hhhhhhhh"
    job.mkdir(parents=True)
    (job / "run.json").write_text(json.dumps({"run": "r1", "job": job.name, "spec_hash": "h" * 12,
                                              "output": f"{out}/r1", "created": "2026-12-07T16:00:00Z", "pid": None}))
    (job / "exit_code").write_text("0\n")
    shown = CliRunner().invoke(cli.app, ["--backend", "local", "--state-dir", str(tmp_path / "state"), "status", "r1"],
                               terminal_width=400)
    assert shown.exit_code == 0, shown.output
    line = next(x for x in shown.output.splitlines() if x.strip().startswith("promotion:"))
    assert "v3 stays published, unpromoted (v2 stays champion)" in line and "the gate ran again" in line
    assert "the eval page records the gate at publish time: compared with the champion v1: the gate passed" in line


def test_the_eval_page_shows_the_verdict_its_table_and_reasons(tmp_path):
    """jobs.trainer.evaluate renders the report's promotion section (Markdown and the HTML page): the verdict, the
    champion, each metric's difference with its interval, the reasons, and when the verdict was reached."""
    from jobs.spec import EvalPrompt, parse_spec
    from jobs.trainer.evaluate import build_report, render_html, render_markdown

    store = LocalStore(str(tmp_path / "out"))
    promote(store, "r1", publish(store, "r1", tmp_path, "one", rouge=GOOD, val_loss=1.2))
    folder = version_folder(tmp_path, "lr0", rouge=WORSE, val_loss=2.0, broken=(0, 2, 3))
    verdict = judge_before_publish(store, "r1", folder)
    spec = parse_spec({"name": "r1", "base_model": {"uri": "s3://models/base/"},
                       "dataset": {"train": "s3://data/train.jsonl"}, "output": str(tmp_path / "out")})
    report = build_report(spec, prompts=[EvalPrompt(prompt="<b>q</b>", reference="a")], before=["?"], after=["a"],
                          val_loss_before=2.0, val_loss_after=1.2, history=[], evals=[], train_outputs=[])
    report["promotion"] = verdict.section()
    rouge = next(m for m in verdict.comparison.metrics if m.metric == "rouge_l")
    interval = f"{rouge.difference:+.4g} [{rouge.low:+.4g}, {rouge.high:+.4g}]"
    md = render_markdown(report, spec)
    assert "## Promotion gate (promotion.auto)" in md and "**compared with the champion v1: the gate failed**" in md
    row = next(line for line in md.splitlines() if line.startswith("| rouge_l |"))
    assert interval in row and "significantly worse" in row
    assert f"- {verdict.reasons[0]}" in md and "launcher status" in md
    html = render_html(report, spec)
    assert '<span class="fail">compared with the champion v1: the gate failed</span>' in html
    assert f"<td>{interval}</td>" in html and "<td>val_loss (primary)</td>" in html
    report["promotion"] = judge_before_publish(LocalStore(str(tmp_path / "empty")), "r1", folder).section()
    assert "**first version: no champion to compare; it becomes the run's champion**" in render_markdown(report, spec)
    del report["promotion"]
    assert "Promotion gate" not in render_markdown(report, spec) and "Promotion gate" not in render_html(report, spec)


# ------------------------------------------------------------------------------ the CLI and the SDK

def test_cli_promote_prints_the_comparison_moves_only_on_a_pass_and_artifacts_marks_the_champion(tmp_path):
    from typer.testing import CliRunner

    from launcher import cli

    runner = CliRunner()
    out = str(tmp_path / "out")
    store = LocalStore(out)
    publish(store, "r1", tmp_path, "one", rouge=GOOD, val_loss=1.2)
    publish(store, "r1", tmp_path, "two", rouge=BETTER, val_loss=1.1)
    publish(store, "r1", tmp_path, "three", rouge=WORSE, val_loss=2.0, broken=(0, 1, 2))

    r = runner.invoke(cli.app, ["promote", "r1:v1", "--output", out], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "v1 is now the champion of r1 (there was none" in r.output

    r = runner.invoke(cli.app, ["promote", "r1:v2", "--output", out], terminal_width=200)
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.lstrip("│ ").startswith("rouge_l"))
    assert "0.41" in row and "0.61" in row and "+0.2" in row and "better" in row and "[" in row
    assert "val_loss (primary)" in r.output and "95%" in r.output and "2000 resamples" in r.output
    assert "verdict: pass" in r.output and "v2 is now the champion of r1, replacing v1" in r.output

    r = runner.invoke(cli.app, ["promote", "r1:v3", "--output", out], terminal_width=200)
    assert r.exit_code == 1, r.output
    assert "verdict: fail" in r.output and "significantly worse" in r.output
    assert "v3 stays published, unpromoted (v2 stays champion)" in r.output
    assert read_champion(store, "r1")[0]["version"] == "v2"

    r = runner.invoke(cli.app, ["artifacts", "r1", "--output", out], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "v2 (champion)" in r.output and "v3 (latest)" in r.output
    assert "champion: v2, promoted" in r.output
    r = runner.invoke(cli.app, ["artifacts", "r1", "--output", out, "-o", "json"])
    assert json.loads(r.output)["champion"] == "v2"

    r = runner.invoke(cli.app, ["promote", "r1:v3", "--output", out, "--force", "-o", "json"], terminal_width=200)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["promoted"] and data["forced"] and data["comparison"]["passed"] is False

    r = runner.invoke(cli.app, ["promote", "r1:v7", "--output", out], terminal_width=200)
    assert r.exit_code == 3 and "not a complete version" in r.output and "Traceback" not in r.output


def test_cli_promote_refuses_different_held_out_sets_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from launcher import cli

    out = str(tmp_path / "out")
    store = LocalStore(out)
    promote(store, "r1", publish(store, "r1", tmp_path, "one", rouge=GOOD))
    publish_version(store, "r1", version_folder(tmp_path, "other", rouge=BETTER,
                                                prompts=[f"Other {i}" for i in range(N_PROMPTS)]))
    r = CliRunner().invoke(cli.app, ["promote", "r1", "--output", out], terminal_width=200)
    assert r.exit_code == 2, r.output
    assert "different held-out sets" in r.output and "fix:" in r.output and "Traceback" not in r.output


def test_sdk_promote_reads_the_gate_settings_from_a_spec(tmp_path):
    from launcher.client import Client

    out = str(tmp_path / "out")
    store = LocalStore(out)
    promote(store, "r1", publish(store, "r1", tmp_path, "one", rouge=GOOD, val_loss=1.2))
    publish(store, "r1", tmp_path, "two", rouge=BETTER, val_loss=1.21)  # better answers, a slightly worse loss
    spec = {"name": "r1", "base_model": {"uri": "s3://models/base/"}, "dataset": {"train": "s3://data/train.jsonl"},
            "output": out, "promotion": {"primary": "rouge_l"}}
    client = Client(backend="local", state_dir=tmp_path / "state")
    assert not client.promote("r1", version="v2", output=out).promoted  # the default primary: val_loss
    r = client.promote("r1", version="v2", spec=spec)
    assert r.promoted and r.comparison.primary == "rouge_l"


def test_a_recorded_held_out_record_must_match_too(tmp_path):
    from jobs.dataprep import Row
    from jobs.promotion import held_out_record
    from jobs.spec import EvalPrompt

    rows = [Row(line=i, instruction=f"q{i}", output=f"a{i}") for i in range(3)]
    prompts = [EvalPrompt(prompt="q0", reference="a0")]
    rec = held_out_record(rows, prompts)
    assert rec == held_out_record(list(rows), list(prompts)) and rec["validation_rows"] == 3 and rec["prompts"] == 1
    assert held_out_record(rows[:2], prompts)["sha256"] != rec["sha256"]

    champ, cand = _evidence(tmp_path, "champ", rouge=GOOD), _evidence(tmp_path, "cand", rouge=BETTER)
    champ.metadata["held_out"] = rec
    cand.metadata["held_out"] = held_out_record(rows[:2], prompts)
    with pytest.raises(GateRefused, match="recorded held-out sha256"):
        compare(champ, cand)
    cand.metadata["held_out"] = rec
    assert compare(champ, cand).passed


def test_the_gate_reads_reports_as_the_trainers_evaluation_writes_them(tmp_path):
    """Reports from jobs.trainer.evaluate.build_report itself (ROUGE-L by torchmetrics, facts, fluency flags): the
    candidate whose answers carry the references' facts passes; the one that repeats itself fails on fluency."""
    from jobs.spec import EvalPrompt, parse_spec
    from jobs.trainer.evaluate import build_report

    spec = parse_spec({"name": "r1", "base_model": {"uri": "s3://models/base/"},
                       "dataset": {"train": "s3://data/train.jsonl"}, "output": str(tmp_path / "out")})
    refs = [f"Open Settings > Network {i} and set the port to {8000 + i}." for i in range(8)]
    prompts = [EvalPrompt(prompt=f"How do I set the port of network {i}?", reference=r) for i, r in enumerate(refs)]
    answers = {"champ": [f"Go to Settings and pick network {i}." for i in range(8)],
               "good": refs,
               "loops": ["port port port port port port port port port port" for _ in range(8)]}
    store = LocalStore(str(tmp_path / "out"))
    for tag, after in answers.items():
        report = build_report(spec, prompts=prompts, before=["?"] * 8, after=after, val_loss_before=2.0,
                              val_loss_after=1.2, history=[], evals=[], train_outputs=[])
        d = version_folder(tmp_path, tag, rouge=GOOD)
        (d / "eval_report.json").write_text(json.dumps(report))
        publish_version(store, "r1", d)
    champ, good, loops = (read_evidence(store, "r1", v) for v in ("v1", "v2", "v3"))
    c = compare(champ, good, PromotionSpec(primary="rouge_l"))
    assert c.passed and {m.metric: m for m in c.metrics}["facts"].verdict == "better"
    c = compare(champ, loops, PromotionSpec(primary="rouge_l"))
    assert not c.passed and {m.metric: m for m in c.metrics}["fluent"].verdict == "significantly worse"
