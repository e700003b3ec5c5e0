"""Bad input never crashes the launcher: a corpus of malformed real-world files through
`launcher validate` and `launcher data check` (in-process through typer's CliRunner, where an exception that
escapes the CLI counts as a traceback; a few of them, and the alias bomb, as real subprocesses), plus property
tests over JSONL bytes and run names. tests/unit/test_bad_input_corpus.py holds the rest of issue 32's corpus.

Contract under test (issue 7, "Bad input"): never a traceback; the process exits with a
documented code (0 ok, 1 data unusable, 2 spec/usage error); every problem names its
line or its field; output stays bounded whatever the input size. The 10 MB spec line,
deep YAML nesting, the YAML alias bomb and the line of invalid UTF-8 were defects in
jobs/spec.py found by this corpus (fixed in 863a75b); see docs/reliability.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MAX_OUTPUT = 64 * 1024  # no error report needs more than this, whatever the input size


def _cap_memory(limit: int):
    def apply():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def launcher(*args: str, timeout: float = 60, memory: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "AWS_"))}
    env["PYTHONPATH"] = str(REPO)
    env.pop("LAUNCHER_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          timeout=timeout, preexec_fn=_cap_memory(memory) if memory else None)


def assert_clean(proc: subprocess.CompletedProcess, codes: tuple[int, ...]) -> str:
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    assert "Traceback" not in out, out[-3000:]
    assert proc.returncode in codes, (proc.returncode, out[-2000:])
    assert len(out) < MAX_OUTPUT, f"{len(out):,} bytes of output"
    return out


# ------------------------------------------------------------------------------------------ specs

GOOD_SPEC = """\
name: support-bot
base_model: {uri: s3://models/smollm2/}
dataset: {train: s3://data/support/train.jsonl}
output: s3://runs/lora
"""


def _laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for c in "bcdefghi":
        lines.append(f"{c}: &{c} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = c
    return "\n".join(lines) + "\n" + GOOD_SPEC + f"labels: *{prev}\n"


# name -> (bytes, expected exit codes, regexes that must all appear in the output)
SPEC_CORPUS: dict[str, tuple[bytes, tuple[int, ...], list[str]]] = {
    "utf8-bom": (b"\xef\xbb\xbf" + GOOD_SPEC.encode(), (0,), [r"is valid"]),
    "crlf": (GOOD_SPEC.replace("\n", "\r\n").encode(), (0,), [r"is valid"]),
    "bom-and-crlf": (b"\xef\xbb\xbf" + GOOD_SPEC.replace("\n", "\r\n").encode(), (0,), [r"is valid"]),
    "empty": (b"", (2,), [r"\(spec\).*empty file"]),
    "only-comments": (b"# nothing here\n\n", (2,), [r"\(spec\).*empty file"]),
    "top-level-list": (b"- name: x\n- y\n", (2,), [r"\(spec\).*got a list"]),
    "binary-elf": (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4, (2,), [r"not UTF-8"]),
    "tab-indent": (b"name: x\nbase_model:\n\turi: s3://models/m/\n", (2,), [r"line 3: not valid YAML"]),
    "python-tag": (b"name: x\nbase_model: !!python/object/apply:os.system ['echo pwned']\n", (2,),
                   [r"line 2: not valid YAML"]),
    "nan-and-infinity": (GOOD_SPEC.encode() + b"training: {learning_rate: .nan, epochs: .inf}\n"
                         b"lora: {dropout: -.inf}\nresources: {timeout_hours: .inf}\neval: {temperature: .NaN}\n",
                         (2,), [r"training\.learning_rate \(line 5\)", r"training\.epochs \(line 5\)",
                                r"lora\.dropout \(line 6\)", r"resources\.timeout_hours \(line 7\)",
                                r"eval\.temperature \(line 8\)"]),
    "json-with-nan": (b'{"name": "json-spec", "base_model": {"uri": "s3://models/m/"}, "dataset": {"train": '
                      b'"s3://data/t.jsonl"}, "output": "s3://runs/x", "training": {"learning_rate": NaN}}',
                      (2,), [r"training\.learning_rate \(line 1\)"]),
    "wrong-types-and-unknown-keys": (b"name: 42\nbase_model: s3://models/m/\ndataset: {train: [a, b]}\n"
                                     b"output: s3://runs/x\nlora: {rank: sixteen, rnak: 16}\nresources: {gpus: -1}\n",
                                     (2,), [r"name \(line 1\)", r"base_model \(line 2\)", r"dataset\.train \(line 3\)",
                                            r"lora\.rank \(line 5\)", r"lora\.rnak \(line 5\): unknown field",
                                            r"resources\.gpus \(line 6\)"]),
    "path-traversal": (b"name: ../../etc\nbase_model: {uri: s3://models/m/}\ndataset: {train: s3://data/t.jsonl}\n"
                       b"output: s3://runs/../../other\n", (2,), [r"name \(line 1\)", r"output \(line 4\).*'\.\.'"]),
    "name-not-a-k8s-name": (GOOD_SPEC.replace("support-bot", "Support_Bot.V2").encode(), (2,),
                            [r"name \(line 1\).*not a valid run name"]),
    # issue 32: secrets are refused by field and never echoed (the output is also checked for the values below)
    "s3-credentials-in-uri": (GOOD_SPEC.replace("s3://data/", "s3://AKIAQ7X2LM9PZ4RT8VB3:wJalrXUtnFEMIK7MDENG@data/")
                              .encode(), (2,), [r"dataset\.train \(line 3\).*looks like"]),
    "presigned-dataset-uri": (GOOD_SPEC.replace("train.jsonl", "train.jsonl?X-Amz-Signature=9f8e7d6c5b4a3928")
                              .encode(), (2,), [r"dataset\.train \(line 3\).*X-Amz-Signature parameter"]),
    "hf-token-as-model": (GOOD_SPEC.replace("s3://models/smollm2/", "hf:hf_Qx7Lm2Pz9Rt4Vb8Nc3Kd6Wf1Hj5Sg0AyEu")
                          .encode(), (2,), [r"base_model\.uri \(line 2\).*Hugging Face token"]),
    "secret-label-and-experiment": (GOOD_SPEC.encode() + b"labels: {team: ghp_Zr8Kq2Lm7Xn4Pw9Tb3Vc6Hd1Jf5Gs0AyEuQ8}\n"
                                    b"tracking: {mlflow: {experiment: Xk9Qm2Lp7Rz4Tv8Nb3Wc6Hd1Jf5Gs0AyEu9Qx2L}}\n",
                                    (2,), [r"labels\.team \(line 5\).*GitHub token",
                                           r"tracking\.mlflow\.experiment \(line 6\).*random token"]),
    # issue 32: near-miss schemes and hf: paths are errors, never local paths
    "s3-single-slash": (GOOD_SPEC.replace("s3://data/", "s3:/data/").encode(), (2,),
                        [r"dataset\.train \(line 3\).*did you mean 's3://data/support/train\.jsonl'"]),
    "hf-dotdot": (GOOD_SPEC.replace("s3://models/smollm2/", "hf:../../x").encode(), (2,),
                  [r"base_model\.uri \(line 2\).*not a model id"]),
    # issue 32: impossible values and misleading messages
    "impossible-resources": (GOOD_SPEC.encode() + b"resources: {priority_class: Bad_Class!, cpu: '0', memory: 32GB,"
                             b" scratch: '0'}\neval: {length_bands: {short: [40, 1]}}\n", (2,),
                             [r"priority_class.*not a PriorityClass name", r"resources\.cpu.*0 CPUs",
                              r"resources\.memory.*write 32Gi", r"resources\.scratch.*0 bytes",
                              r"length_bands\.short.*\[40, 1\]"]),
    "yaml-off-and-numbers": (GOOD_SPEC.encode() + b"data: {pii: off}\nresources: {cpu: 4}\n", (0,), [r"is valid"]),
    "packing-false": (GOOD_SPEC.encode() + b"training: {packing: false}\n", (2,),
                      [r"training\.packing \(line 5\): was removed.*always packs"]),
    "packing-true": (GOOD_SPEC.encode() + b"training: {packing: true}\n", (0,),
                     [r"warning: training\.packing \(line 5\): was removed"]),
    "local-paths-warn": (GOOD_SPEC.replace("s3://data/support/train.jsonl", "/etc/passwd")
                         .replace("s3://models/smollm2/", "file:///no/such/model").encode(), (0,),
                         [r"warning: dataset\.train \(line 3\): is a local path \(/etc/passwd\) that a pod cannot",
                          r"warning: base_model\.uri \(line 2\): file:///no/such/model does not exist"]),
}
#: Values planted in the corpus above that no output may contain.
PLANTED_SECRETS = ["wJalrXUtnFEMIK7MDENG", "AKIAQ7X2LM9PZ4RT8VB3", "9f8e7d6c5b4a3928",
                   "hf_Qx7Lm2Pz9Rt4Vb8Nc3Kd6Wf1Hj5Sg0AyEu", "ghp_Zr8Kq2Lm7Xn4Pw9Tb3Vc6Hd1Jf5Gs0AyEuQ8",
                   "Xk9Qm2Lp7Rz4Tv8Nb3Wc6Hd1Jf5Gs0AyEu9Qx2L"]


def _spec_cases():
    for name, (data, codes, patterns) in SPEC_CORPUS.items():
        yield pytest.param(name, codes, patterns, id=name)
    yield pytest.param("single-10MB-line", (2,), [r"name \(line 1\)"], id="single-10MB-line")
    yield pytest.param("deeply-nested-yaml", (2,), [r"line \d+"], id="deeply-nested-yaml")
    yield pytest.param("invalid-utf8", (2,), [r"line 1"], id="invalid-utf8-names-its-line")


SPEC_EXTRA = {
    "single-10MB-line": b"name: " + b"a" * 10_000_000 + b"\n",
    "deeply-nested-yaml": b"name: x\nlabels: " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "invalid-utf8": b"name: caf\xe9-bot\nbase_model: {uri: s3://models/m/}\n",
}


@pytest.mark.parametrize("name,codes,patterns", list(_spec_cases()))
def test_validate_malformed_spec(ran, name, codes, patterns):
    out = assert_clean(ran[("validate", name)], codes)
    for pat in patterns:
        assert re.search(pat, out), (pat, out[:2000])
    assert not [s for s in PLANTED_SECRETS if s in out], out[:2000]


def test_local_paths_are_an_error_for_a_cluster_and_missing_inputs_for_a_local_run(tmp_path):
    from jobs.errors import SpecError
    from launcher.client import Client

    (tmp_path / "train.jsonl").write_text("{}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD_SPEC.replace("s3://data/support/train.jsonl", "train.jsonl") +
                    "eval: {prompts: ./prompts.jsonl}\n")
    v = Client().validate(spec)  # no target: both are warnings
    assert {(a.where, "does not exist" in a.message) for a in v.advice} == {
        ("dataset.train", False), ("eval.prompts", False), ("eval.prompts", True)}
    with pytest.raises(SpecError) as err:  # a pod reads neither, --skip-preflight or not
        Client().validate(spec, target="cluster")
    assert [(p.where, p.line) for p in err.value.problems] == [("dataset.train", 3), ("eval.prompts", 5)]
    assert "upload it to S3" in err.value.problems[0].fix
    with pytest.raises(SpecError) as err:  # here train.jsonl is read from the spec's folder; prompts are missing
        Client().validate(spec, target="local")
    assert [p.where for p in err.value.problems] == ["eval.prompts"]
    (tmp_path / "prompts.jsonl").write_text("{}\n")
    assert Client().validate(spec, target="local").advice == []


def test_validate_alias_bomb_is_bounded(ran):
    proc = ran[("validate", "alias-bomb")]
    if proc is None:
        pytest.fail("launcher validate ran over 8 s on a 1 KB spec with YAML aliases")
    assert_clean(proc, (2,))


def test_set_override_garbage_is_reported_by_field(tmp_path):
    f = tmp_path / "spec.yaml"
    f.write_text(GOOD_SPEC)
    out = assert_clean(launcher("validate", str(f), "--set", "training.epochs=.nan", "--set", "noequals",
                                "--set", "lora.rank=[1, {2: 3}]"), (2,))
    assert "noequals" in out


# ------------------------------------------------------------------------------------------ JSONL

def _row(i: int) -> str:
    return json.dumps({"instruction": f"How do I reset router model R{i}00?",
                       "output": f"Hold the reset button for {i + 5} seconds until the light blinks twice."})


ROWS = [_row(i) for i in range(10)]


def _join(lines: list[str], nl: str = "\n") -> bytes:
    return (nl.join(lines) + nl).encode("utf-8")


def _with_bad(bad: list[bytes], at: int = 3) -> bytes:
    """Good rows with the ``bad`` lines inserted after row ``at`` (they become lines at+1 ...)."""
    parts = [r.encode() for r in ROWS[:at]] + bad + [r.encode() for r in ROWS[at:]]
    return b"\n".join(parts) + b"\n"


# name -> (bytes, expected exit code, {line: regex the problem on that line must match}, valid rows)
JSONL_CORPUS: dict[str, tuple[bytes, int, dict[int, str], int]] = {
    "utf8-bom": (b"\xef\xbb\xbf" + _join(ROWS), 0, {}, 10),
    "crlf": (_join(ROWS, "\r\n"), 0, {}, 10),
    "crlf-with-bad-line": (_with_bad([b"{oops"]).replace(b"\n", b"\r\n"), 0,
                           {4: r"not valid JSON"}, 10),
    "bom-inside-concatenated-files": (_join(ROWS[:5]) + b"\xef\xbb\xbf" + _join(ROWS[5:]), 0, {}, 10),
    "invalid-utf8": (_with_bad([b'{"instruction": "caf\xe9", "output": "x"}']), 0, {4: r"not UTF-8"}, 10),
    "latin1-everywhere": ("\n".join(ROWS).replace("reset", "r\xe9set").encode("latin-1") + b"\n", 1,
                          {n: r"not UTF-8" for n in range(1, 11)}, 0),
    "single-10MB-line": (_with_bad([json.dumps({"instruction": "a", "output": "b" * 10_000_000}).encode()]), 0,
                         {4: r"over the .*-byte limit"}, 10),
    "nan-infinity": (_with_bad([b'{"instruction": "x", "output": NaN}', b'{"instruction": "y", "output": "z", '
                                b'"score": Infinity}', b'{"instruction": -Infinity, "output": "q"}']), 0,
                     {4: r"NaN", 5: r"Infinity", 6: r"-Infinity"}, 10),
    "deeply-nested": (_with_bad([b"[" * 100_000 + b"]" * 100_000,
                                 b'{"instruction":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b',"output":"x"}']),
                      0, {4: r"nested too deeply", 5: r"nested too deeply"}, 10),
    "empty-file": (b"", 1, {}, 0),
    "only-blank-lines": (b"\n\r\n   \n", 1, {}, 0),
    "nul-bytes": (b"\x00\x00\x00\n" + _join(ROWS), 0, {1: r"not valid JSON"}, 10),
    "utf16": ("\n".join(ROWS).encode("utf-16"), 1, {1: r"not UTF-8"}, 0),
    "not-objects-and-wrong-types": (_with_bad([b"[1, 2]", b'"just a string"', b"null", b'{"instruction": "a"}',
                                               b'{"instruction": "a", "output": 5}',
                                               b'{"instruction": "\\ud800", "output": "x"}',
                                               b'{"instruction": "a", "output": "b"} trailing', b"1" * 5000]), 0,
                                    {4: r"got a list", 5: r"got a string", 6: r"got null", 7: r"missing 'output'",
                                     8: r"'output' must be a string", 9: r"unpaired", 10: r"not valid JSON",
                                     11: r"not valid JSON"}, 10),
    "truncated-last-line": (_join(ROWS) + b'{"instruction": "x", "output": "y"', 0, {11: r"not valid JSON"}, 10),
}


@pytest.mark.parametrize("name", list(JSONL_CORPUS))
def test_data_check_malformed_jsonl(ran, name):
    from jobs import dataprep

    data, code, expected, valid = JSONL_CORPUS[name]
    out = assert_clean(ran[("data", name)], (code,))
    for line, pat in expected.items():
        m = re.search(rf"^\s*line {line}: (.*)$", out, re.M)
        assert m and re.search(pat, m.group(1)), (line, pat, out[:3000])
    if code == 1:
        assert "FAIL" in out and "min_rows" in out
    as_json = ran.get(("data-json", name))
    if as_json is not None:
        assert_clean(as_json, (code,))
        report = json.loads(as_json.stdout)
    else:  # the same function `--json` prints, called here to keep the suite quick
        report = dataprep.check_file(ran.paths[("data", name)])
    assert report["valid_rows"] == valid
    assert {p["line"] for p in report["problems"]} >= expected.keys()
    for p in report["problems"]:  # every problem names its line, inside the file
        assert 1 <= p["line"] <= max(report["total_lines"], 1), p


# ------------------------------------------------------------------------------------------ the runs

#: Corpus files that also go through `python -m launcher` as a real process (the others run in-process).
REAL = {("validate", "binary-elf"), ("validate", "single-10MB-line"), ("validate", "s3-credentials-in-uri"),
        ("data", "latin1-everywhere"), ("data", "single-10MB-line"), ("data-json", "not-objects-and-wrong-types")}


def in_process(*args: str, home: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in this process through typer's CliRunner, as a CompletedProcess; an exception that escapes it
    (a traceback in the real entry point) is written into stderr as one, so assert_clean sees it."""
    from typer.testing import CliRunner

    from launcher import cli

    env = {k: None for k in os.environ if k.startswith(("LAUNCHER_", "AWS_")) or k == "KUBECONFIG"}
    if home:  # no settings file or kubeconfig of the machine's user
        env["HOME"] = home
    r = CliRunner().invoke(cli.app, list(args), env=env, prog_name="launcher")
    err = r.stderr_bytes or b""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += f"Traceback (escaped the CLI): {type(r.exception).__name__}: {r.exception}".encode()
    return subprocess.CompletedProcess(["launcher", *args], r.exit_code, r.stdout_bytes, err)


JSON_TOO = ("invalid-utf8", "single-10MB-line", "deeply-nested", "not-objects-and-wrong-types", "empty-file")


class _Runs(dict):
    paths: dict
    files_before: dict
    files_after: dict


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> _Runs:
    """Every corpus file through the real CLI, three processes at a time (each is a cold Python start)."""
    d = tmp_path_factory.mktemp("corpus")
    jobs: dict[tuple, tuple] = {}
    paths: dict[tuple, Path] = {}
    specs = {**{k: v[0] for k, v in SPEC_CORPUS.items()}, **SPEC_EXTRA, "alias-bomb": _laughs().encode()}
    for name, data in specs.items():
        f = d / f"{name}.yaml"
        f.write_bytes(data)
        jobs[("validate", name)] = ("validate", str(f))
    for name, (data, *_rest) in JSONL_CORPUS.items():
        f = d / f"{name}.jsonl"
        f.write_bytes(data)
        paths[("data", name)] = f
        jobs[("data", name)] = ("data", "check", str(f))
        if name in JSON_TOO:
            jobs[("data-json", name)] = ("data", "check", str(f), "--json")

    def one(args):
        try:
            if "alias-bomb" in args[-1]:  # bounded so a regression cannot take the machine down
                return launcher(*args, timeout=8, memory=1 << 30)
            return launcher(*args, timeout=120)
        except subprocess.TimeoutExpired:
            return None

    before = _tree(d)
    real = [k for k in jobs if k in REAL or k[1] == "alias-bomb"]
    with ThreadPoolExecutor(3) as pool:  # the real entry point, as cold processes
        results = dict(zip(real, pool.map(one, [jobs[k] for k in real])))
    results.update({k: in_process(*args, home=str(d)) for k, args in jobs.items() if k not in results})
    out = _Runs(results)
    out.paths = paths
    out.files_before, out.files_after = before, _tree(d)
    return out


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


def test_the_corpus_runs_wrote_nothing(ran):
    """No spec, report or copy appeared beside the corpus files (also the in-process runs' $HOME), none changed."""
    assert ran.files_after == ran.files_before


def test_data_check_missing_file_and_folder(tmp_path):
    out = assert_clean(launcher("data", "check", str(tmp_path / "nope.jsonl")), (2,))
    assert "not found" in out
    out = assert_clean(launcher("data", "check", str(tmp_path)), (2,))
    assert "folder" in out


# ------------------------------------------------------------------------------------------ properties

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["instruction", "output", "input", "persona", "tone", "x"]) | st.text(max_size=5),
        inner, max_size=5),
    max_leaves=12)
_lines = st.one_of(
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda i, o: json.dumps({"instruction": i, "output": o}).encode(), st.text(min_size=1),
              st.text(min_size=1)),
    st.sampled_from([b"", b"\r", b"\xef\xbb\xbf{}", b"NaN", b"[" * 5000, b'{"instruction": "\\udc80", "output": "x"}']),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_lines, max_size=12), st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_read_jsonl_never_raises_and_accounts_for_every_line(lines, nl, bom):
    from jobs import dataprep
    from jobs.spec import DataRules

    data = (b"\xef\xbb\xbf" if bom else b"") + nl.join(lines) + (nl if lines else b"")
    rows, problems = dataprep.read_jsonl(data)
    total = dataprep.count_lines(data)
    assert len(rows) + len(problems) <= total
    seen = [r.line for r in rows] + [p.line for p in problems]
    assert len(seen) == len(set(seen)) and all(1 <= n <= total for n in seen)
    for p in problems:
        assert p.where == f"line {p.line}" and p.message
    report = dataprep.prepare_report(data, DataRules(min_rows=1)).report  # the rules never raise either
    assert report["valid_rows"] == len(rows) and report["kept_rows"] <= len(rows)
    json.dumps(report)  # the report is always serialisable (no NaN objects, no bytes)


_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=70), st.from_regex(r"[a-z0-9][-a-z0-9./]{0,50}[a-z0-9]", fullmatch=True),
                 st.sampled_from(["..", ".", "a/../b", "a/b", "-a", "a-", "A", "a" * 41, "a" * 40, "a_b", "a.b",
                                  "%2e%2e", "a\x00b", "ａｂ", "a\nb", " a"])),
       st.sampled_from(["s3://runs/lora", "s3://runs/team/a/b", "s3://runs"]))
def test_run_names_cannot_escape_the_output_prefix_or_make_bad_k8s_names(name, output):
    from jobs.errors import SpecError
    from jobs.spec import parse_spec
    from jobs.storage import join, parse_uri
    from launcher.render import job_name, render_run
    from launcher.settings import make_settings

    data = {"name": name, "base_model": {"uri": "s3://models/m/"}, "dataset": {"train": "s3://data/t.jsonl"},
            "output": output}
    try:
        spec = parse_spec(data)
    except SpecError as err:
        assert any(p.where == "name" for p in err.problems)
        return
    # Accepted: a DNS-1123 label that fits the Job name (and its pods' generated names) into 63 characters.
    jn = job_name(spec)
    assert _K8S_NAME.match(spec.name) and _K8S_NAME.match(jn) and len(jn) <= 52
    _, bucket, prefix = parse_uri(spec.output)
    key = join(prefix, spec.name, "v1", "adapter/adapter_model.safetensors")
    assert key.startswith(prefix.strip("/") + "/" if prefix else spec.name + "/")
    assert ".." not in key.split("/") and "." not in key.split("/") and "//" not in key
    run = render_run(spec, make_settings(namespace="ml"))
    job, cm = run.workload, run.configmap
    for obj in (job, cm, job["spec"]["template"]):
        for v in obj["metadata"]["labels"].values():
            assert len(v) <= 63 and re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", v)


@pytest.mark.parametrize("output", ["s3://runs/../x", "s3://runs/a/../../x", "s3://runs/a/..", "s3://../x",
                                    "s3://Runs/x", "s3://r/x", "http://runs/x", "s3://"])
def test_output_prefixes_that_escape_or_are_not_buckets_are_refused(output):
    from jobs.errors import SpecError
    from jobs.spec import parse_spec

    data = {"name": "ok", "base_model": {"uri": "s3://models/m/"}, "dataset": {"train": "s3://data/t.jsonl"},
            "output": output}
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    assert [p.where for p in exc.value.problems] == ["output"]
