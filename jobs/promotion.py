"""Eval-gated promotion: the run's ``champion`` pointer and the gate that moves it (docs/promotion.md).

``<output>/<run>/champion`` is JSON naming one complete version, the sha256 of its manifest, when and how it
became champion, and the gate's comparison. It is moved only by a conditional write: ``If-None-Match: *`` for
the first champion, ``If-Match`` on the ETag read before the gate ran otherwise (a lock and an atomic rename on a
local folder: :meth:`jobs.storage.LocalStore.put_bytes_if_match`). Of two promotions racing, exactly one wins; the
other raises :class:`PromotionConflict` naming the winner.

The gate compares the candidate with the champion on the same frozen held-out set (refused otherwise): the
validation loss and the general-ability (regression set) loss per example, and the eval's per-prompt scores
(ROUGE-L, facts found, fluent answers), each difference with a seeded paired-bootstrap interval. It passes when no metric is significantly worse (its whole interval beyond the
metric's tolerance on the worse side) and the primary metric's mean is not worse.

``launcher promote`` judges a published version and moves the pointer (:func:`promote`). The job, with
``promotion.auto``, judges before it publishes, on the reports in its folder (:func:`judge_before_publish`), puts
the :class:`Verdict` into the version's eval report and page, publishes, then moves the pointer on that verdict
(:func:`promote_judged`), judging again against a champion that changed in between.
"""
from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

from jobs.errors import LoraJobError, StorageError
from jobs.publish import MANIFEST, MARKER, IncompleteVersion, existing_versions, open_version
from jobs.retry import RetryPolicy
from jobs.spec import PromotionSpec
from jobs.storage import Store, join

CHAMPION = "champion"
#: metric -> (which way is better, what the comparison table calls it)
METRICS: dict[str, tuple[Literal["lower", "higher"], str]] = {
    "val_loss": ("lower", "validation loss"),
    "rouge_l": ("higher", "ROUGE-L (faithfulness)"),
    "facts": ("higher", "facts of the reference found"),
    "fluent": ("higher", "fluent answers (no degeneration flag)"),
    "regression": ("lower", "general ability loss (jobs/regression/general.jsonl)"),
}
#: metric -> where its per-example values sit in eval_report.json (absent in versions published before them)
PER_EXAMPLE = {"val_loss": ("validation", "losses_after"), "regression": ("regression", "losses_after")}
#: The reports the gate reads from a version (each checked against the version's manifest first).
REPORTS = ("metadata.json", "eval_report.json", "data_report.json")
#: How a candidate not yet published is named in its own verdict (its version number is taken when it publishes).
THIS_VERSION = "this version"


class PromotionConflict(StorageError):
    """Another promotion moved the champion pointer between this one's read and its conditional write."""


class GateRefused(LoraJobError):
    """The gate cannot compare the two versions (different held-out sets, no evaluation): nothing moved."""

    cli_exit_code = 2  # launcher.errors.EXIT_USAGE: what the user asked cannot be judged as asked


# ----------------------------------------------------------------------------------- a version's evidence

@dataclass(frozen=True)
class Evidence:
    """What the gate reads from one complete version: its manifest's sha256 and its reports."""

    version: str
    manifest_sha256: str
    metadata: dict[str, Any]
    eval_report: dict[str, Any]
    data_report: dict[str, Any]

    @property
    def held_out(self) -> dict[str, Any]:
        return held_out_fingerprint(self.metadata, self.data_report, self.eval_report)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode()).hexdigest()


def held_out_record(val_rows: Sequence[Any], prompts: Sequence[Any]) -> dict[str, Any]:
    """What a run should record in metadata.json as ``held_out`` (jobs/trainer/recipe.py, after evaluate): the
    sha256 of its validation rows and of its eval prompts, as they were used. ``val_rows``: jobs.dataprep rows;
    ``prompts``: jobs.spec.EvalPrompt (a conversation prompt's context included)."""
    rows = [[r.instruction, r.input, r.output, [list(t) for t in r.turns]] for r in val_rows]
    asked = [[p.prompt, p.reference, [list(t) for t in getattr(p, "context", ())]] for p in prompts]
    return {"validation_sha256": _sha(rows), "validation_rows": len(rows), "prompts_sha256": _sha(asked),
            "prompts": len(asked), "sha256": _sha([_sha(rows), _sha(asked)])}


def held_out_fingerprint(metadata: dict[str, Any], data_report: dict[str, Any],
                         eval_report: dict[str, Any]) -> dict[str, Any]:
    """The held-out set of a version, from what it published: the ``held_out`` record where metadata.json has
    one (:func:`held_out_record`), and always the set derived from its reports: the validation file's sha256 (or
    the training file's sha256, seed and row counts when validation was split from it) and the sha256 of the eval
    prompts (prompt, reference, context). Two versions are compared only when every part is equal."""
    train = data_report.get("train") or {}
    if (data_report.get("validation") or {}).get("dataset_sha256"):
        validation = {"file_sha256": data_report["validation"]["dataset_sha256"],
                      "rows": (data_report.get("split") or {}).get("validation_rows")}
    else:
        validation = {"split_of_train_sha256": train.get("dataset_sha256"), "seed": train.get("seed"),
                      "kept_rows": train.get("kept_rows"),
                      "rows": (data_report.get("split") or {}).get("validation_rows")}
    asked = [[g.get("prompt"), g.get("reference"), g.get("context")] for g in eval_report.get("generations") or []]
    recorded = metadata.get("held_out") if isinstance(metadata.get("held_out"), dict) else None
    return {"validation": validation, "prompts": len(asked), "prompts_sha256": _sha(asked),
            "recorded_sha256": recorded.get("sha256") if recorded else None}


def _different_held_out(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    if a["validation"] != b["validation"]:
        out.append(f"validation set {a['validation']} vs {b['validation']}")
    if a["prompts_sha256"] != b["prompts_sha256"]:
        out.append(f"eval prompts ({a['prompts']}, sha256 {a['prompts_sha256'][:12]} vs {b['prompts']}, sha256 "
                   f"{b['prompts_sha256'][:12]})")
    if a["recorded_sha256"] and b["recorded_sha256"] and a["recorded_sha256"] != b["recorded_sha256"]:
        out.append(f"recorded held-out sha256 {a['recorded_sha256'][:12]} vs {b['recorded_sha256'][:12]}")
    return out


def complete_versions(store: Store, run_prefix: str) -> list[str]:
    """The complete versions under ``run_prefix``, oldest first (the publisher's own definition)."""
    return [f"v{n}" for n, done in sorted(existing_versions(store, run_prefix).items()) if done]


def read_evidence(store: Store, run_prefix: str, version: str) -> Evidence:
    """A complete version's manifest sha256 and reports. Its ``_COMPLETE`` marker must vouch for its manifest,
    every file the manifest lists must be there at its size, and each report read must match its sha256 in the
    manifest (:func:`jobs.publish.open_version`); a :class:`StorageError` names what is wrong otherwise."""
    prefix = join(run_prefix, version)
    where = f"{store.label}/{prefix}"
    try:
        opened = open_version(store, prefix, where)
    except IncompleteVersion:
        have = ", ".join(complete_versions(store, run_prefix)) or "none"
        raise StorageError(f"{where} is not a complete version (no {MARKER} marker)",
                           hint=f"pick a complete version (complete: {have}); `launcher artifacts RUN` lists them"
                           ) from None
    entries = opened.entries
    missing = sorted(rel for rel, e in entries.items() if opened.sizes.get(rel) != e["size"])
    if missing:
        raise StorageError(f"{where}: {len(missing)} file(s) of its manifest are missing or have another size: "
                           + ", ".join(missing[:5]), hint="the version is damaged: do not promote it; publish again")
    reports: dict[str, dict[str, Any]] = {}
    for name in REPORTS:
        if name not in entries:
            reports[name] = {}
            continue
        raw = store.get_bytes(opened.key(name))
        if hashlib.sha256(raw).hexdigest() != entries[name]["sha256"]:
            raise StorageError(f"{where}/{name} does not match its sha256 in {MANIFEST}",
                               hint="the version was altered after publishing: do not promote it")
        try:
            reports[name] = json.loads(raw)
        except ValueError:
            raise StorageError(f"{where}/{name} is not JSON", hint="publish the version again") from None
    return Evidence(version, hashlib.sha256(opened.manifest).hexdigest(), reports["metadata.json"],
                    reports["eval_report.json"], reports["data_report.json"])


def read_folder_evidence(folder: Path, version: str = THIS_VERSION) -> Evidence:
    """The reports of a version from the folder the job publishes (the bytes that are published), read before
    publishing; ``manifest_sha256`` is that of the folder's manifest.json once :func:`jobs.publish.publish_version`
    has written it (what the version's ``_COMPLETE`` marker holds), empty before. Raises :class:`StorageError` for
    a report that is not JSON."""
    reports: dict[str, dict[str, Any]] = {}
    for name in REPORTS:
        path = folder / name
        try:
            reports[name] = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            raise StorageError(f"{path} is not JSON", hint="a bug in the job: report it") from None
    manifest = folder / MANIFEST
    return Evidence(version, hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else "",
                    reports["metadata.json"], reports["eval_report.json"], reports["data_report.json"])


# ----------------------------------------------------------------------------------- the gate (pure)

def per_prompt(eval_report: dict[str, Any]) -> dict[str, list[float | None]]:
    """Each per-prompt score of an eval report, one entry per generation (None where a prompt has none: no
    reference, or a reference without facts); ``val_loss`` and ``regression`` per example, where the report
    records them (:data:`PER_EXAMPLE`; else an empty list)."""
    gens = eval_report.get("generations") or []

    def after(g: dict[str, Any], key: str) -> float | None:
        f = g.get("faithfulness")
        v = f["after"].get(key) if isinstance(f, dict) and isinstance(f.get("after"), dict) else None
        return None if v is None else float(v)

    out: dict[str, list[float | None]] = {
        "rouge_l": [after(g, "rouge_l") for g in gens],
        "facts": [after(g, "facts") for g in gens],
        "fluent": [0.0 if g.get("fluency_flags") else 1.0 for g in gens],
    }
    for name, (section, key) in PER_EXAMPLE.items():
        values = (eval_report.get(section) or {}).get(key)
        out[name] = [None if x is None else float(x) for x in values] if isinstance(values, list) else []
    return out


def paired_bootstrap(diffs: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of paired differences: the mean and its percentile interval over ``resamples``
    resamples of the pairs with replacement, seeded (the same inputs give the same interval)."""
    n = len(diffs)
    if n == 0:
        raise ValueError("no paired differences to resample")
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    low = means[min(resamples - 1, int(tail * resamples))]
    high = means[max(0, int((1.0 - tail) * resamples) - 1)]
    return sum(diffs) / n, low, high


@dataclass
class MetricComparison:
    """One metric of the gate: the two means, their difference (candidate − champion) with its interval, and the
    verdict: better, not worse, worse (within the interval or the tolerance), significantly worse, not compared."""

    metric: str
    better: str  # "lower" or "higher"
    primary: bool
    champion: float | None
    candidate: float | None
    difference: float | None
    low: float | None  # None: no interval (one number per side)
    high: float | None
    pairs: int
    tolerance: float
    verdict: str
    why: str = ""
    note: str = ""  # how it was compared, where not the usual way (no interval: a version has one mean)


@dataclass
class Comparison:
    """The gate's outcome: ``passed`` and, when not, the ``reasons``; every metric's comparison."""

    champion: str
    candidate: str
    primary: str
    confidence: float
    resamples: int
    held_out: dict[str, Any]
    metrics: list[MetricComparison] = field(default_factory=list)
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metric(name: str, champ: list[float | None], cand: list[float | None], s: PromotionSpec) -> MetricComparison:
    better, _ = METRICS[name]
    tol = float(getattr(s.tolerance, name))
    primary = name == s.primary
    pairs = [(a, b) for a, b in zip(champ, cand) if a is not None and b is not None]
    if not pairs:
        return MetricComparison(name, better, primary, None, None, None, None, None, 0, tol, "not compared",
                                "no prompt has this score in both versions")
    return _judge(name, pairs, s, bootstrap=len(pairs) > 1)


def _judge(name: str, pairs: list[tuple[float, float]], s: PromotionSpec, *, bootstrap: bool,
           note: str = "") -> MetricComparison:
    """The verdict on (champion, candidate) pairs: with a paired-bootstrap interval, or (``bootstrap`` False: one
    mean each) the plain difference against the tolerance; ``note`` says why there is no interval."""
    better, _ = METRICS[name]
    tol = float(getattr(s.tolerance, name))
    primary = name == s.primary
    m_champ = sum(a for a, _ in pairs) / len(pairs)
    m_cand = sum(b for _, b in pairs) / len(pairs)
    low = high = None
    if bootstrap:
        mean, low, high = paired_bootstrap([b - a for a, b in pairs], resamples=s.resamples,
                                           confidence=s.confidence, seed=s.seed)
    else:
        mean = m_cand - m_champ
    sign = 1.0 if better == "higher" else -1.0  # sign * difference > 0: the candidate is better
    gain = sign * mean
    # the end of the interval most favourable to the candidate: beyond the tolerance, the whole interval is
    favourable = gain if low is None or high is None else max(sign * low, sign * high)
    if favourable < -tol:
        verdict = "significantly worse"
        why = (f"{METRICS[name][1]}: the whole {round(100 * s.confidence)}% interval is worse than the champion "
               f"by more than the tolerance {tol:g}") if low is not None else \
            f"{METRICS[name][1]}: worse than the champion by more than the tolerance {tol:g} (one number each)"
    elif gain > 0:
        verdict, why = "better", ""
    elif gain == 0:
        verdict, why = "not worse", ""
    else:
        verdict, why = "worse (not significant)", ""
    if primary and gain < 0 and verdict != "significantly worse":
        why = f"{METRICS[name][1]} is the primary metric and its mean is worse than the champion's"
    return MetricComparison(name, better, primary, round(m_champ, 5), round(m_cand, 5), round(mean, 5),
                            None if low is None else round(low, 5), None if high is None else round(high, 5),
                            len(pairs), tol, verdict, why, note)


def _per_example_metric(name: str, champion: Evidence, candidate: Evidence, s: PromotionSpec) -> MetricComparison:
    """``val_loss`` or ``regression``: paired by example (the same held-out set, the same order) when both
    reports record per-example losses; refused when their counts differ. ``val_loss`` of a version published
    before per-example losses were recorded: the plain difference of the two means, said so in ``why``."""
    section, key = PER_EXAMPLE[name]
    champ, cand = per_prompt(champion.eval_report)[name], per_prompt(candidate.eval_report)[name]
    sets = {(e.eval_report.get(section) or {}).get("set_sha256") for e in (champion, candidate)}
    if champ and cand and len(sets) > 1:  # the regression set was changed between the two: nothing pairs up
        return MetricComparison(name, METRICS[name][0], name == s.primary, None, None, None, None, None, 0,
                                float(getattr(s.tolerance, name)), "not compared",
                                f"{champion.version} and {candidate.version} were measured on different "
                                f"versions of the {section} set")
    if champ and cand:
        if len(champ) != len(cand):
            raise GateRefused(f"cannot compare {candidate.version} with the champion {champion.version} on "
                              f"{METRICS[name][1]}: {len(cand)} per-example losses against {len(champ)} "
                              f"({section}.{key} of eval_report.json); the same held-out set must give as many",
                              hint="a version whose report was altered or truncated must not be promoted; "
                                   "evaluate both again, or promote with --force (recorded as forced)")
        return _metric(name, champ, cand, s)
    older = ", ".join(e.version for e, v in ((champion, champ), (candidate, cand)) if not v)
    if name == "val_loss":
        a, b = ((e.eval_report.get("validation") or {}).get("loss_after") for e in (champion, candidate))
        if a is not None and b is not None:
            return _judge(name, [(float(a), float(b))], s, bootstrap=False,
                          note=f"no interval: {older} has no per-example validation losses (published before "
                               "they were recorded): the plain difference of the two means")
    return MetricComparison(name, METRICS[name][0], name == s.primary, None, None, None, None, None, 0,
                            float(getattr(s.tolerance, name)), "not compared",
                            f"{older} has no {section}.{key} in its eval report")


def compare(champion: Evidence, candidate: Evidence, settings: PromotionSpec | None = None) -> Comparison:
    """The gate, pure: candidate against champion on the same held-out set. Raises :class:`GateRefused` when
    their held-out sets differ or either has no evaluation to compare."""
    s = settings or PromotionSpec()
    a, b = champion.held_out, candidate.held_out
    if not champion.eval_report or not candidate.eval_report:
        which = champion.version if not champion.eval_report else candidate.version
        raise GateRefused(f"{which} has no eval_report.json: the gate has nothing to compare",
                          hint="promote only versions of runs with eval.enabled, or promote with --force")
    differ = _different_held_out(a, b)
    if differ:
        raise GateRefused(f"cannot compare {candidate.version} with the champion {champion.version}: they were "
                          "evaluated on different held-out sets (" + "; ".join(differ) + ")",
                          hint="evaluate both on the same validation data and eval prompts (same dataset.validation "
                               "or the same training file, split and seed; the same eval.prompts), or promote with "
                               "--force (recorded as forced)")
    champ, cand = per_prompt(champion.eval_report), per_prompt(candidate.eval_report)
    out = Comparison(champion.version, candidate.version, s.primary, s.confidence, s.resamples, b)
    out.metrics = [_per_example_metric(name, champion, candidate, s) if name in PER_EXAMPLE
                   else _metric(name, champ[name], cand[name], s) for name in METRICS]
    for m in out.metrics:
        if m.primary and m.verdict == "not compared":
            out.reasons.append(f"the primary metric {m.metric} is not in both versions' reports: set "
                               "promotion.primary to a metric both have, or promote with --force")
        elif m.verdict == "significantly worse" or (m.primary and m.why):
            out.reasons.append(m.why)
    out.passed = not out.reasons
    return out


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def _difference(m: dict[str, Any]) -> str:
    if m["difference"] is None:
        return "—"
    if m["low"] is None:
        return f"{m['difference']:+.4g} (one number each: no interval)"
    return f"{m['difference']:+.4g} [{m['low']:+.4g}, {m['high']:+.4g}]"


def comparison_rows(comparison: dict[str, Any]) -> list[tuple[str, ...]]:
    """A comparison (:meth:`Comparison.to_dict`) as a table, header first: metric, which way is better, the two
    means, the difference with its interval, the pairs, the verdict (`launcher promote`, the eval page)."""
    pct = round(100 * comparison["confidence"])
    rows: list[tuple[str, ...]] = [("metric", "better", "champion", "candidate", f"difference [{pct}% interval]",
                                    "pairs", "verdict")]
    rows += [(m["metric"] + (" (primary)" if m["primary"] else ""), m["better"], _num(m["champion"]),
              _num(m["candidate"]), _difference(m), str(m["pairs"]), m["verdict"]) for m in comparison["metrics"]]
    return rows


# ----------------------------------------------------------------------------------- the pointer

def read_champion(store: Store, run_prefix: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the champion pointer, its tag for the conditional write); (None, None) when the run has none."""
    key = join(run_prefix, CHAMPION)
    data, tag = store.get_versioned(key)
    if data is None:
        return None, None
    try:
        pointer = json.loads(data)
        if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
            raise ValueError
    except ValueError:
        raise StorageError(f"{store.label}/{key} is not a champion pointer (JSON with a \"version\")",
                           hint="delete it and promote again: `launcher promote RUN:vN --force`") from None
    return pointer, tag


class _Unchanged(Exception):
    """The conditional write lost, yet the pointer still has the tag read: an in-flight conflict (AWS's 409)."""


#: An in-flight conflict (AWS S3 answers 409 ConditionalRequestConflict while another conditional write of the
#: key is under way) is tried again after a short jittered wait; a pointer that moved is never overwritten.
MOVE_POLICY = RetryPolicy(attempts=8, base_delay=0.05, max_delay=1.0)


def write_champion(store: Store, run_prefix: str, pointer: dict[str, Any], expected_tag: str | None, *,
                   policy: RetryPolicy = MOVE_POLICY) -> None:
    """Move the champion pointer to ``pointer`` only if it still has ``expected_tag`` (None: only if there is no
    champion yet). Raises :class:`PromotionConflict` naming whoever moved it in between."""
    key = join(run_prefix, CHAMPION)
    body = (json.dumps(pointer, indent=1, sort_keys=True) + "\n").encode()

    def attempt() -> None:
        if store.put_bytes_if_match(key, body, expected_tag):
            return
        data, tag = store.get_versioned(key)
        if data == body:  # ours: a retried request whose first try had landed (the pointer carries a token)
            return
        if tag == expected_tag:
            raise _Unchanged
        raise _conflict(store, run_prefix, pointer, data)

    try:
        policy.call(attempt, retryable=lambda err: isinstance(err, _Unchanged))
    except _Unchanged:
        raise PromotionConflict(f"could not move {store.label}/{key}: the store kept refusing the conditional "
                                "write although the pointer did not change",
                                hint=f"retry `launcher promote {_run_name(store, run_prefix)}:{pointer['version']}`") from None


def _run_name(store: Store, run_prefix: str) -> str:
    """The run's name: the last segment of its prefix (of the store's root where the store is the run's folder)."""
    return (run_prefix.strip("/") or store.label.rstrip("/")).rsplit("/", 1)[-1]


def _where(store: Store, run_prefix: str) -> str:
    return f"{store.label}/{run_prefix}" if run_prefix else store.label


def _conflict(store: Store, run_prefix: str, ours: dict[str, Any], data: bytes | None) -> PromotionConflict:
    run, version = _run_name(store, run_prefix), ours["version"]
    try:
        winner = json.loads(data) if data else None
    except ValueError:
        winner = None
    if not isinstance(winner, dict):
        what = "removed the champion pointer" if data is None else "wrote something else there"
        return PromotionConflict(f"{version} was not made champion of {_where(store, run_prefix)}: another writer "
                                 f"{what} meanwhile", hint=f"run `launcher promote {run}:{version}` again")
    how = ", forced" if winner.get("forced") else ""
    return PromotionConflict(
        f"{version} was not made champion of {_where(store, run_prefix)}: another promotion won the race and made "
        f"{winner.get('version')} champion (at {winner.get('promoted_at')}{how}); {version} stays published, "
        "unpromoted", hint=f"run `launcher promote {run}:{version}` again: the gate then compares it with "
                           f"{winner.get('version')}")


# ----------------------------------------------------------------------------------- the verdict

#: What the eval page says about when its verdict was reached and where the outcome is (docs/promotion.md).
PAGE_NOTE = ("This verdict was reached before the version was published, against the champion named here. The "
             "champion pointer is moved after publishing, by a conditional write: if another version became "
             "champion in between, the gate runs again against that one and the run's status (`launcher status "
             "RUN`) says what finally happened; `launcher artifacts RUN` names the champion now.")


@dataclass
class Verdict:
    """The gate's verdict on ``candidate`` against the champion the pointer named when it was read (``champion``,
    None: no champion), and the pointer's tag then (``tag``): the pointer is moved on this verdict only while it
    still has that tag. ``refusal``: why the gate could not compare (it did not run)."""

    candidate: str
    champion: str | None
    tag: str | None
    champion_manifest_sha256: str | None = None
    comparison: Comparison | None = None
    refusal: LoraJobError | None = None
    judged_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def first(self) -> bool:
        """No champion yet (and nothing kept the gate from looking): the candidate may become the first."""
        return self.champion is None and self.refusal is None

    @property
    def already(self) -> bool:
        return self.champion is not None and self.champion == self.candidate

    @property
    def passed(self) -> bool:
        """The pointer may move to the candidate: no champion yet, or the gate passed."""
        return self.first or (self.comparison is not None and self.comparison.passed)

    @property
    def reasons(self) -> list[str]:
        if self.refusal is not None:
            return [_refusal_text(self.refusal)]
        return list(self.comparison.reasons) if self.comparison is not None else []

    @property
    def status(self) -> Literal["first", "passed", "failed", "not run", "already"]:
        if self.refusal is not None:
            return "not run"
        if self.already:
            return "already"
        return "first" if self.first else "passed" if self.passed else "failed"

    @property
    def summary(self) -> str:
        """One sentence: 'compared with the champion v3: the gate failed', 'first version: no champion to
        compare', 'gate not run: ...'."""
        if self.refusal is not None:
            return "gate not run: " + _refusal_text(self.refusal)
        if self.already:
            return f"{self.candidate} is already the champion"
        if self.first:
            return "first version: no champion to compare; it becomes the run's champion"
        return f"compared with the champion {self.champion}: the gate {'passed' if self.passed else 'failed'}"

    def section(self) -> dict[str, Any]:
        """The eval report's ``promotion`` section (eval_report.json; the eval page renders it): the verdict, the
        champion it was reached against, each metric's comparison, and :data:`PAGE_NOTE`."""
        return {"status": self.status, "summary": self.summary, "champion": self.champion,
                "champion_manifest_sha256": self.champion_manifest_sha256, "judged_at": self.judged_at,
                "reasons": self.reasons, "comparison": None if self.comparison is None else self.comparison.to_dict(),
                "note": PAGE_NOTE}


def _refusal_text(err: LoraJobError) -> str:
    return err.message + (f" ({err.hint})" if err.hint else "")


def judge(store: Store, run_prefix: str, candidate: Evidence, settings: PromotionSpec | None = None) -> Verdict:
    """The gate, run now: ``candidate`` (a published version's evidence, or one about to be published:
    :func:`read_folder_evidence`) against the run's current champion. A comparison the gate refuses (different
    held-out sets, a damaged champion) is the verdict's ``refusal``; raises :class:`StorageError` only when the
    champion pointer cannot be read."""
    pointer, tag = read_champion(store, run_prefix)
    if pointer is None:
        return Verdict(candidate.version, None, None)
    v = Verdict(candidate.version, pointer["version"], tag, pointer.get("manifest_sha256"))
    if v.already:
        return v
    try:
        v.comparison = compare(read_evidence(store, run_prefix, pointer["version"]), candidate, settings)
    except (GateRefused, StorageError) as err:
        v.refusal = err
    return v


def judge_before_publish(store: Store, run_prefix: str, folder: Path,
                         settings: PromotionSpec | None = None) -> Verdict:
    """For the job with ``promotion.auto``: the gate on the reports in ``folder`` (about to be published) against
    the current champion, for the eval page. Never raises: what kept the gate from running is the verdict's
    ``refusal`` (the version is published all the same)."""
    try:
        return judge(store, run_prefix, read_folder_evidence(folder), settings)
    except LoraJobError as err:
        return Verdict(THIS_VERSION, None, None, refusal=err)


# ----------------------------------------------------------------------------------- promotion

@dataclass
class PromotionResult:
    """What a promotion did: ``promoted`` (the pointer moved to ``candidate``), or why not (``reasons``; ``error``
    when it could not be attempted). ``first``: no champion before; ``forced``: promoted despite the gate.
    ``note``: how the outcome differs from the verdict on the eval page (the champion changed after it)."""

    run: str
    where: str
    candidate: str
    previous: str | None
    promoted: bool = False
    forced: bool = False
    first: bool = False
    already: bool = False
    comparison: Comparison | None = None
    reasons: list[str] = field(default_factory=list)
    error: str | None = None
    pointer: dict[str, Any] | None = None
    note: str = ""
    page: str | None = None  # the job's: the status of the verdict on the version's eval page

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def progress(self) -> dict[str, Any]:
        """The job's progress object's ``promotion`` (what `launcher status` shows): whether it was promoted, the
        champion now, the sentence, the eval page's verdict, and whether the gate was run again after it."""
        return {"promoted": self.promoted, "champion": self.candidate if self.promoted else self.previous,
                "sentence": self.sentence, "page": self.page, "rejudged": bool(self.note)}

    @property
    def sentence(self) -> str:
        return self._sentence() + (f" ({self.note})" if self.note else "")

    def _sentence(self) -> str:
        if self.already:
            return f"{self.candidate} is already the champion of {self.run}"
        if self.error:
            return f"{self.candidate} was not promoted: {self.error}"
        if self.promoted and self.first:
            return f"{self.candidate} is now the champion of {self.run} (there was none: the first complete " \
                   "version may become champion)"
        if self.promoted:
            how = " (forced: " + "; ".join(self.reasons) + ")" if self.forced and self.reasons else \
                " (forced)" if self.forced else " (the gate passed)"
            return f"{self.candidate} is now the champion of {self.run}, replacing {self.previous}{how}"
        return self.headline + ": " + "; ".join(self.reasons)

    @property
    def headline(self) -> str:
        """The sentence without the gate's reasons (a table above them shows them)."""
        if not (self.promoted or self.already or self.error):
            return f"{self.candidate} stays published, unpromoted ({self.previous} stays champion)"
        return self._sentence()


def _result(store: Store, run_prefix: str, version: str, v: Verdict) -> PromotionResult:
    """A promotion's result before the pointer is written, from the verdict on ``version``."""
    comparison = None if v.comparison is None else replace(v.comparison, candidate=version)
    return PromotionResult(_run_name(store, run_prefix), _where(store, run_prefix), version, v.champion,
                           first=v.first, already=v.already, comparison=comparison, reasons=v.reasons)


def move_champion(store: Store, run_prefix: str, result: PromotionResult, candidate: Evidence, tag: str | None,
                  by: str) -> PromotionResult:
    """Make ``result.candidate`` the champion: write the pointer (:func:`write_champion`, conditional on ``tag``,
    the tag the verdict was reached on) and mark ``result`` promoted. Raises :class:`PromotionConflict` when the
    pointer changed meanwhile."""
    result.pointer = {
        "version": result.candidate, "manifest_sha256": candidate.manifest_sha256,
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": by,
        "forced": result.forced, "previous": result.previous, "held_out": candidate.held_out,
        "gate": None if result.comparison is None else result.comparison.to_dict(),
        "reasons_overridden": result.reasons if result.forced else [], "token": secrets.token_hex(8)}
    write_champion(store, run_prefix, result.pointer, tag)
    result.promoted = True
    return result


@dataclass
class PendingPromotion:
    """A promotion read and judged, not yet written: :meth:`commit` moves the pointer (if the gate passed or the
    promotion is forced) with a conditional write on the tag read here."""

    store: Store
    run_prefix: str
    result: PromotionResult
    candidate: Evidence
    tag: str | None
    by: str
    move: bool  # the gate passed, there is no champion yet, or the promotion is forced

    def commit(self) -> PromotionResult:
        if not self.move:
            return self.result
        return move_champion(self.store, self.run_prefix, self.result, self.candidate, self.tag, self.by)


def prepare_promotion(store: Store, run_prefix: str, version: str | None = None, *,
                      settings: PromotionSpec | None = None, force: bool = False,
                      by: str = "launcher promote") -> PendingPromotion:
    """Read the champion pointer (and its tag), the candidate (default: the newest complete version) and run the
    gate (:func:`judge`). Raises :class:`GateRefused` when the two cannot be compared (unless ``force``),
    :class:`StorageError` for a version that is not complete or not whole."""
    run = _run_name(store, run_prefix)
    if version is not None and version.isdigit():
        version = f"v{version}"
    if version is None:
        done = complete_versions(store, run_prefix)
        if not done:
            raise StorageError(f"run {run} has no complete version under {_where(store, run_prefix)}",
                               hint="wait for the run to publish (launcher status), or check --output")
        version = done[-1]
    candidate = read_evidence(store, run_prefix, version)
    v = judge(store, run_prefix, candidate, settings)
    if v.refusal is not None:
        if not force:
            raise v.refusal
        result = _result(store, run_prefix, version, v)
        result.reasons = [v.refusal.message]
    else:
        result = _result(store, run_prefix, version, v)
    result.forced = force and not v.passed and not v.already
    return PendingPromotion(store, run_prefix, result, candidate, v.tag, by,
                            move=not v.already and (v.passed or result.forced))


def promote(store: Store, run_prefix: str, version: str | None = None, *, settings: PromotionSpec | None = None,
            force: bool = False, by: str = "launcher promote") -> PromotionResult:
    """Run the gate and move the champion pointer when it passes (or when ``force``): :func:`prepare_promotion`
    then :meth:`PendingPromotion.commit`. A failed gate is a result (``promoted`` False, ``reasons``), not an
    error; a lost race raises :class:`PromotionConflict`."""
    return prepare_promotion(store, run_prefix, version, settings=settings, force=force, by=by).commit()


#: How often the job judges again when the champion keeps changing between its verdict and its pointer write.
REJUDGE_ROUNDS = 3
AUTO = "auto (promotion.auto)"


def promote_judged(store: Store, run_prefix: str, candidate: Evidence, verdict: Verdict,
                   settings: PromotionSpec | None = None) -> PromotionResult:
    """For the job, after publishing ``candidate`` (its ``version`` and ``manifest_sha256`` now the published
    ones) with ``verdict`` (:func:`judge_before_publish`) on its eval page: move the champion pointer if the
    verdict passed and the pointer still has the tag it was reached on. If the champion changed meanwhile (or the
    conditional write loses a race), the gate runs again against the new champion, at most
    :data:`REJUDGE_ROUNDS` times, and the result's ``note`` says that the page's verdict was superseded. Never
    raises for what a user must act on (a failed gate, a refused comparison, a lost race, an unreachable store):
    the version stays published and the result says why it was not promoted and how to retry."""
    version = candidate.version
    run = _run_name(store, run_prefix)
    retry = f"`launcher promote {run}:{version}` runs the gate again"
    v, result = verdict, _result(store, run_prefix, version, verdict)
    try:
        for _ in range(REJUDGE_ROUNDS + 1):
            _, tag = read_champion(store, run_prefix)
            if tag != v.tag:  # another version became champion after the verdict: judge against that one
                v = judge(store, run_prefix, candidate, settings)
            result = _result(store, run_prefix, version, v)
            result.page = verdict.status
            if v is not verdict:
                result.note = (f"the eval page records the gate at publish time: {verdict.summary}; the champion "
                               f"pointer changed after that (now {v.champion or 'none'}), so the gate ran again: "
                               f"{v.summary}")
            if v.refusal is not None:
                result.error = _refusal_text(v.refusal)
                return result
            if v.already or not v.passed:
                return result
            try:
                return move_champion(store, run_prefix, result, candidate, v.tag, AUTO)
            except PromotionConflict:
                v = replace(v, tag="(moved)")  # judged again next round, against whoever won
        result.error = f"the champion kept changing while this version was judged ({retry})"
        return result
    except LoraJobError as err:
        result.error, result.page = _refusal_text(err) + f"; {retry}", verdict.status
        return result
