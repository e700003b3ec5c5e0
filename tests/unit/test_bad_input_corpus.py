"""Issue 32's corpus of bad inputs, by class (spec, data, environment, flags, tampered artifacts, interrupts and
unwritable outputs), through the real CLI: in-process with typer's CliRunner (a few ms a case), plus a handful
per class as real ``python -m launcher`` processes to prove the entry point (REAL below).

Every case asserts: the exit code; that the output names the problem (the field, line, variable, flag or file)
and, for an error, gives a fix; that no traceback appears (in-process: the CLI ended in SystemExit, nothing
else escaped); that no planted secret is echoed; and that nothing was written that could be mistaken for a
result (the case's folder, which is also $HOME and the current folder, is byte-for-byte what it was before).

tests/unit/test_bad_input.py holds the first corpus (malformed specs and JSONL as subprocesses); the table in
docs/reliability.md counts both, from the case lists themselves (test_the_docs_table_matches_the_corpus).
A case marked ``bug`` is a real defect, xfail(strict=True) until it is fixed in production code.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("spec", "data", "environment", "flags", "tampered artifacts", "interrupts and unwritable output")
#: What an error's message must hold besides naming the problem: a way out.
FIX = re.compile(r"fix:| — |should|did you mean|must|use |write |set |give |pick |remove|add it|turn one off|"
                 r"rename|unset|quote|check |split|save |choose|wait |download |Try '", re.I)
#: Values planted below that no output may contain.
SECRETS = ["Hunter2Secret", "Zk3pW9qLm2Rx", "ghp_Zr8Kq2Lm7Xn4Pw9Tb3Vc6Hd1Jf5Gs0AyEuQ8", "AKIAQ7X2LM9PZ4RT8VB3",
           "sk-ant-Qx7Lm2Pz9Rt4Vb8Nc3Kd6Wf1Hj5Sg0AyEuXX", "xoxb-1234567890-abcdefghij", "eyJzdWIiOiIxMjM0NTY3ODkwIn0",
           "hunter2pw", "MIIEpQIBAAKCAQEA"]

GOOD = """\
name: support-bot
base_model: {uri: s3://models/smollm2/}
dataset: {train: s3://data/support/train.jsonl}
output: s3://runs/lora
"""


@dataclass
class Case:
    cls: str
    id: str
    argv: list[str]  # "{d}" is the case's folder
    code: int
    names: list[str]  # regexes that must all appear in the output
    outcome: str = "error"  # error (a clear error), warning (a named warning, exit 0), bug (xfail strict)
    env: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # relative path -> bytes/str written before the run
    setup: Callable[[Path], None] | None = None
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None  # in-process only (interrupts)
    fix: bool = True
    reason: str = ""  # for a bug: what is wrong and how to reproduce it
    runner: str = "inproc"  # inproc | thread (a hang is detected and undone) | process (a real one only)


CASES: list[Case] = []


def case(*args, **kw) -> None:
    c = Case(*args, **kw)
    assert c.cls in CLASSES and c.outcome in ("error", "warning", "bug") and c.id not in {x.id for x in CASES}
    CASES.append(c)


# ------------------------------------------------------------------------------------------ spec

def spec(id: str, extra: str, names: list[str], *, text: str | None = None, code: int = 2, **kw) -> None:
    case("spec", id, ["validate", "{d}/spec.yaml"], code, names,
         files={"spec.yaml": text if text is not None else GOOD + extra}, **kw)


def swap(old: str, new: str) -> str:
    return GOOD.replace(old, new)


spec("missing-required-fields", "", [r"base_model \(line 1\): Field required", r"dataset \(line 1\)", r"output \(line 1\)"],
     text="name: x\n")
spec("duplicate-key", "name: other\n", [r"line 5: not valid YAML: duplicate key 'name' \(first on line 1\)"])
spec("multiple-documents", "---\nname: y\n", [r"line 5: not valid YAML"])
spec("json-trailing-comma", "", [r"base_model \(line 1\): Field required"], text='{"name": "x",}')
for _id, _extra, _where in [
    ("lora-rank-0", "lora: {rank: 0}\n", r"lora\.rank \(line 5\).*greater than or equal to 1"),
    ("lora-dropout-1", "lora: {dropout: 1.0}\n", r"lora\.dropout \(line 5\).*less than 1"),
    ("target-modules-all", "lora: {target_modules: all}\n", r"lora\.target_modules \(line 5\).*'all-linear'"),
    ("target-modules-empty", "lora: {target_modules: []}\n", r"lora\.target_modules \(line 5\): is empty"),
    ("quantization-3bit", "quantization: {mode: 3bit}\n", r"quantization\.mode \(line 5\).*'none', '8bit' or '4bit'"),
    ("epochs-fraction", "training: {epochs: 1.5}\n", r"training\.epochs \(line 5\).*fractional part"),
    ("learning-rate-word", "training: {learning_rate: fast}\n", r"training\.learning_rate \(line 5\).*valid number"),
    ("learning-rate-1e400", "training: {learning_rate: 1e400}\n", r"training\.learning_rate \(line 5\)"),
    ("optimizer-sgd", "training: {optimizer: sgd}\n", r"training\.optimizer \(line 5\).*'adamw_torch'"),
    ("accumulation-word", "training: {gradient_accumulation_steps: many}\n",
     r"training\.gradient_accumulation_steps \(line 5\)"),
    ("max-seq-length-16", "training: {max_seq_length: 16}\n", r"training\.max_seq_length \(line 5\).*32"),
    ("precision-bf32", "training: {precision: bf32}\n", r"training\.precision \(line 5\).*'bf16'"),
    ("seed-negative", "training: {seed: -1}\n", r"training\.seed \(line 5\)"),
    ("warmup-0.9", "training: {warmup_ratio: 0.9}\n", r"training\.warmup_ratio \(line 5\).*0\.5"),
    ("scheduler-step", "training: {lr_scheduler: step}\n", r"training\.lr_scheduler \(line 5\).*'cosine'"),
    ("max-steps-0", "training: {max_steps: 0}\n", r"training\.max_steps \(line 5\)"),
    ("max-steps-1e3", "training: {max_steps: 1e3}\n", r"training\.max_steps \(line 5\).*integer"),
    ("eval-interval-0", "training: {eval_interval_steps: 0}\n", r"training\.eval_interval_steps \(line 5\): must be"),
    ("patience-0", "training: {early_stopping_patience: 0}\n", r"training\.early_stopping_patience \(line 5\)"),
    ("checkpoint-interval-0", "training: {checkpoint_interval_steps: 0}\n",
     r"training\.checkpoint_interval_steps \(line 5\)"),
    ("gradient-checkpointing-maybe", "training: {gradient_checkpointing: maybe}\n",
     r"training\.gradient_checkpointing \(line 5\)"),
    ("gpu-memory-lots", "training: {gpu_memory_gib: lots}\n", r"training\.gpu_memory_gib \(line 5\).*'auto'"),
    ("data-format-csv", "data: {format: csv}\n", r"data\.format \(line 5\).*'instruction'"),
    ("max-sentence-words-2", "data: {max_sentence_words: 2}\n", r"data\.max_sentence_words \(line 5\)"),
    ("near-dup-threshold-1.5", "data: {near_dup_threshold: 1.5}\n", r"data\.near_dup_threshold \(line 5\)"),
    ("max-group-share-0", "data: {max_group_share: 0}\n", r"data\.max_group_share \(line 5\)"),
    ("min-rows-0", "data: {min_rows: 0}\n", r"data\.min_rows \(line 5\)"),
    ("max-output-words-0", "data: {max_output_words: 0}\n", r"data\.max_output_words \(line 5\)"),
    ("num-prompts-1000", "eval: {num_prompts: 1000}\n", r"eval\.num_prompts \(line 5\).*512"),
    ("temperature-3", "eval: {temperature: 3}\n", r"eval\.temperature \(line 5\)"),
    ("top-p-0", "eval: {top_p: 0}\n", r"eval\.top_p \(line 5\)"),
    ("top-k-negative", "eval: {top_k: -1}\n", r"eval\.top_k \(line 5\)"),
    ("top-k-fraction", "eval: {top_k: 40.5}\n", r"eval\.top_k \(line 5\).*fractional"),
    ("max-new-tokens-0", "eval: {max_new_tokens: 0}\n", r"eval\.max_new_tokens \(line 5\)"),
    ("prompt-empty", "eval: {prompts: [{prompt: ''}]}\n", r"eval\.prompts\.0\.prompt \(line 5\)"),
    ("prompt-band-huge", "eval: {prompts: [{prompt: hi, band: huge}]}\n", r"eval\.prompts\.0\.band \(line 5\).*'short'"),
    ("merge-dtype-int8", "merge: {dtype: int8}\n", r"merge\.dtype \(line 5\)"),
    ("merge-tolerance-0", "merge: {tolerance: 0}\n", r"merge\.tolerance \(line 5\)"),
    ("gpus-17", "resources: {gpus: 17}\n", r"resources\.gpus \(line 5\).*16"),
    ("gpus-fraction", "resources: {gpus: 1.5}\n", r"resources\.gpus \(line 5\).*fractional"),
    ("nodes-0", "resources: {nodes: 0}\n", r"resources\.nodes \(line 5\)"),
    ("cpu-four", "resources: {cpu: four}\n", r"resources\.cpu \(line 5\): 'four' is not a CPU quantity"),
    ("memory-lots", "resources: {memory: lots}\n", r"resources\.memory \(line 5\).*Kubernetes quantity"),
    ("timeout-1000h", "resources: {timeout_hours: 1000}\n", r"resources\.timeout_hours \(line 5\).*720"),
    ("retries-21", "resources: {retries: 21}\n", r"resources\.retries \(line 5\).*20"),
    ("mlflow-uri-env-lowercase", "tracking: {mlflow: {uri_env: mlflow_uri, experiment: x}}\n",
     r"tracking\.mlflow\.uri_env \(line 5\)"),
    ("mlflow-no-experiment", "tracking: {mlflow: {}}\n", r"tracking\.mlflow\.experiment \(line 5\): Field required"),
    ("label-key-with-space", "labels: {'Team Name': x}\n", r"labels\.Team Name \(line 5\)"),
    ("label-value-64", "labels: {team: " + "a" * 64 + "}\n", r"labels\.team \(line 5\)"),
    ("unknown-top-level", "epochs: 3\n", r"epochs \(line 5\): unknown field"),
    ("misspelled-section", "trainig: {epochs: 2}\n", r"trainig \(line 5\): unknown field — did you mean 'training'"),
    ("section-null", "lora: null\n", r"lora \(line 5\).*valid dictionary"),
    ("section-list", "lora: [1, 2]\n", r"lora \(line 5\).*valid dictionary"),
    ("section-string", "training: fast\n", r"training \(line 5\).*valid dictionary"),
]:
    spec(_id, _extra, [_where])
spec("dora-with-4bit", "lora: {use_dora: true}\nquantization: {mode: 4bit}\n",
     [r"lora\.use_dora cannot be combined with quantization\.mode 4bit; turn one off"])
spec("quantization-without-gpu", "quantization: {mode: 8bit}\nresources: {gpus: 0}\n", [r"quantization needs a GPU"])
spec("fp8-with-4bit", "training: {fp8: 'on'}\nquantization: {mode: 4bit}\n", [r"training\.fp8: on needs a 16-bit"])
spec("fp8-without-gpu", "training: {fp8: 'on'}\nresources: {gpus: 0}\n", [r"training\.fp8: on needs a GPU"])
spec("fsdp-with-8bit", "training: {fsdp: 'on'}\nquantization: {mode: 8bit}\n", [r"training\.fsdp: on shards"])
spec("max-context-8", "", [r"base_model\.max_context \(line 2\)"],
     text=swap("{uri: s3://models/smollm2/}", "{uri: s3://models/smollm2/, max_context: 8}"))
spec("gs-scheme", "", [r"base_model\.uri \(line 2\): unsupported scheme 'gs://'"], text=swap("s3://models/smollm2/", "gs://m/x"))
spec("empty-uri", "", [r"base_model\.uri \(line 2\).*is empty"], text=swap("s3://models/smollm2/", "''"), fix=False)
spec("validation-split-0.9", "", [r"dataset\.validation_split \(line 3\)"],
     text=swap("train.jsonl}", "train.jsonl, validation_split: 0.9}"))
spec("hf-dataset", "", [r"dataset\.train \(line 3\): hf: names a model"], text=swap("s3://data/support/train.jsonl", "hf:org/d"))
spec("upper-S3-output", "", [r"output \(line 4\).*did you mean 's3://runs/lora'"], text=swap("s3://runs/lora", "S3://runs/lora"))
spec("bucket-name", "", [r"output \(line 4\): 'Runs_X' is not a valid bucket name"], text=swap("s3://runs/", "s3://Runs_X/"), fix=False)
spec("misspelled-nested-key", "", [r"dataset\.valdiation \(line 3\): unknown field — did you mean 'validation'"],
     text=swap("train.jsonl}", "train.jsonl, valdiation: s3://data/v.jsonl}"))
spec("name-41-characters", "", [r"name \(line 1\).*at most 40 characters"], text=swap("support-bot", "a" * 41))
spec("name-empty", "", [r"name \(line 1\): '' is not a valid run name"], text=swap("support-bot", "''"))
spec("name-a-date", "", [r"name \(line 1\): Input should be a valid string"], text=swap("support-bot", "2024-01-01"))
spec("name-null", "", [r"name \(line 1\): Input should be a valid string"], text=swap("support-bot", "null"))
# secrets: refused by field, never echoed
spec("token-in-output-url", "", [r"output \(line 4\).*its token parameter\) \(not shown here\)"],
     text=swap("s3://runs/lora", "s3://runs/lora?token=Zk3pW9qLm2Rx"))
spec("password-in-https-uri", "", [r"base_model\.uri \(line 2\).*credentials in the URL"],
     text=swap("s3://models/smollm2/", "https://bob:hunter2pw@models.example.com/m"))
spec("aws-key-as-name", "", [r"name \(line 1\): '\(a value hidden here: it looks like a secret\)'"],
     text=swap("support-bot", "AKIAQ7X2LM9PZ4RT8VB3"))
spec("jwt-in-label", "labels: {who: eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc}\n",
     [r"labels\.who \(line 5\).*JSON Web Token"])
spec("private-key-in-reference", "eval: {prompts: [{prompt: hi, reference: '-----BEGIN RSA PRIVATE KEY----- "
     "MIIEpQIBAAKCAQEA'}]}\n", [r"eval\.prompts\.0\.reference \(line 5\).*private key"])
spec("api-key-in-prompt", "eval: {prompts: [{prompt: 'call it with sk-ant-Qx7Lm2Pz9Rt4Vb8Nc3Kd6Wf1Hj5Sg0AyEuXX'}]}\n",
     [r"eval\.prompts\.0\.prompt \(line 5\).*API key"])
spec("slack-token-as-experiment", "tracking: {mlflow: {experiment: xoxb-1234567890-abcdefghij}}\n",
     [r"tracking\.mlflow\.experiment \(line 5\).*Slack token"])
# valid, but outside the guide or risky: a named warning, exit 0
for _id, _extra, _where in [
    ("validation-is-train", None, r"warning: dataset\.validation \(line 3\): is the training file.*leakage"),
    ("fsdp-on-one-gpu", "training: {fsdp: 'on'}\n", r"warning: training\.fsdp \(line 5\): fsdp: on has no effect"),
    ("rank-8", "lora: {rank: 8}\n", r"warning: lora\.rank \(line 5\): 8 is outside the guide's 16-64"),
    ("learning-rate-1e-3", "training: {learning_rate: 0.001}\n", r"warning: training\.learning_rate \(line 5\)"),
    ("epochs-5", "training: {epochs: 5}\n", r"warning: training\.epochs \(line 5\): 5 is outside"),
    ("mlflow-without-tracking-uri", "tracking: {mlflow: {experiment: exp}}\n",
     r"warning: tracking\.mlflow: no MLflow tracking URI is configured.*LAUNCHER_MLFLOW_TRACKING_URI"),
]:
    spec(_id, _extra or "", [_where], code=0, outcome="warning",
         text=None if _extra else swap("train.jsonl}", "train.jsonl, validation: s3://data/support/train.jsonl}"))
spec("yaml-boolean-as-epochs", "training: {epochs: yes}\n", [r"training\.epochs \(line 5\)"])
case("spec", "folder-as-spec", ["validate", "{d}"], 2, [r"cannot be read: Is a directory"])
case("spec", "fifo-as-spec", ["validate", "{d}/spec.yaml"], 2, [r"spec\.yaml.*(FIFO|pipe)"],
     setup=lambda d: os.mkfifo(d / "spec.yaml"), runner="thread")
case("spec", "dev-zero-as-spec", ["validate", "/dev/zero"], 2, [r"/dev/zero"], runner="process")


# ------------------------------------------------------------------------------------------ data

def _row(i: int) -> str:
    return json.dumps({"instruction": f"How do I reset router model R{i}00?",
                       "output": f"Hold the reset button for {i + 5} seconds until the light blinks twice."})


ROWS = [_row(i) for i in range(10)]


def data(id: str, body: bytes | str | None, code: int, names: list[str], *, args: tuple = (), **kw) -> None:
    files = kw.pop("files", {})
    if body is not None:
        files["train.jsonl"] = body
    case("data", id, ["data", "check", "{d}/train.jsonl", *args], code, names, files=files, **kw)


def bad(*lines: str) -> str:
    """Ten good rows with ``lines`` inserted as lines 4, 5, ..."""
    return "\n".join(ROWS[:3] + list(lines) + ROWS[3:]) + "\n"


def turns(*pairs) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]})


data("mixed-half-unknown-format", "\n".join(ROWS[:5] + [json.dumps({"prompt": f"p{i}", "completion": "c"})
                                                       for i in range(5)]) + "\n", 1,
     [r"line 6: .*'prompt', 'completion', which is none of the accepted formats"])
data("row-in-two-formats", bad(json.dumps({"instruction": "a", "output": "b", "messages": []})), 1,
     [r"line 4: has both 'instruction' and 'messages'", r"ERROR: 1 of 11 rows are outside"])
data("format-mismatch-with-spec", "\n".join(ROWS) + "\n", 1,
     [r"line 1: missing 'messages': the row looks like an instruction row, but data\.format is 'messages'"],
     args=("--spec", "{d}/spec.yaml"), files={"spec.yaml": GOOD + "data: {format: messages}\n"})
data("invalid-spec-for-rules", "\n".join(ROWS) + "\n", 2, [r"data\.min_rows \(line 5\)"],
     args=("--spec", "{d}/spec.yaml"), files={"spec.yaml": GOOD + "data: {min_rows: 0}\n"})
data("missing-spec-for-rules", "\n".join(ROWS) + "\n", 2, [r"nope\.yaml: file not found"],
     args=("--spec", "{d}/nope.yaml"))
data("all-duplicates", "\n".join([ROWS[0]] * 12) + "\n", 1, [r"11 exact duplicates", r"FAIL: 1 row kept"])
data("too-few-rows", "\n".join(ROWS[:3]) + "\n", 1, [r"FAIL: 3 rows kept, data\.min_rows is 8"], fix=False)
data("json-array-not-jsonl", "[\n" + ",\n".join(ROWS) + "\n]\n", 1, [r"line 1: not valid JSON", r"FAIL"])
data("csv-file", "instruction,output\n" + "\n".join(f"q{i},a{i}" for i in range(10)) + "\n", 1,
     [r"line 1: not valid JSON"])
data("yaml-file", "- instruction: a\n  output: b\n" * 10, 1, [r"line 1: not valid JSON"])
data("gzip-file", __import__("gzip").compress(("\n".join(ROWS) + "\n").encode(), mtime=0), 1,
     [r"line 1: not UTF-8 text"])
data("png-file", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, 1, [r"line 1: not UTF-8 text"])
data("fifo", None, 2, [r"train\.jsonl: is a named pipe \(FIFO\)"], setup=lambda d: os.mkfifo(d / "train.jsonl"))
data("socket", None, 2, [r"train\.jsonl: is a socket"], setup=lambda d: _socket(d / "train.jsonl"))
data("symlink-loop", None, 2, [r"train\.jsonl: cannot be read: Too many levels of symbolic links"],
     setup=lambda d: os.symlink(d / "train.jsonl", d / "train.jsonl"))
data("dangling-symlink", None, 2, [r"train\.jsonl: file not found"],
     setup=lambda d: os.symlink(d / "gone.jsonl", d / "train.jsonl"))
case("data", "dev-zero", ["data", "check", "/dev/zero"], 2, [r"/dev/zero: is a character device"])
case("data", "dev-null", ["data", "check", "/dev/null"], 2, [r"/dev/null: is a character device"])
# one bad row among good ones: exit 0, the line named with its fix, the rest kept (counted in the report)
for _id, _line, _says in [
    ("role-robot", turns(("robot", "x")), r"turn 1: role 'robot' is not one of system, user, assistant"),
    ("messages-empty", json.dumps({"messages": []}), r"'messages' is empty"),
    ("messages-a-string", json.dumps({"messages": "hi"}), r"'messages' must be a list of turns, got a string"),
    ("ends-with-user", turns(("user", "a"), ("assistant", "b"), ("user", "c")), r"ends with a user turn"),
    ("two-user-turns", turns(("user", "a"), ("user", "c"), ("assistant", "b")), r"two user turns in a row"),
    ("system-turn-late", turns(("user", "a"), ("system", "c"), ("assistant", "b")), r"a system turn may only come"),
    ("no-assistant-turn", turns(("system", "a"), ("user", "c")), r"no assistant turn: nothing to learn"),
    ("sharegpt-from-bot", json.dumps({"conversations": [{"from": "bot", "value": "a"}]}), r"role 'bot' is not one of"),
    ("content-a-number", json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}),
     r"'content' must be a string, got a number"),
    ("instruction-empty", json.dumps({"instruction": "", "output": "b"}), r"'instruction' is empty"),
    ("output-whitespace", json.dumps({"instruction": "a", "output": "   "}), r"'output' is empty"),
    ("input-a-number", json.dumps({"instruction": "a", "input": 5, "output": "b"}), r"'input' must be a string"),
    ("persona-a-list", json.dumps({"instruction": "a", "output": "b", "persona": ["x"]}), r"'persona' must be a string"),
    ("control-characters", '{"instruction": "a\x01", "output": "b"}', r"not valid JSON: Invalid control character"),
]:
    data(_id, bad(_line), 0, [rf"line 4: .*{_says}", r"OK: a run would accept"], outcome="warning")
data("conflicting-answers", "\n".join(ROWS + [json.dumps({"instruction": "What colour is the WAN port?",
                                                          "output": f"The WAN port is {c}."})
                                              for c in ("blue", "yellow")]) + "\n", 0,
     [r"warning: 1 question answered differently", r"lines 11, 12: .*'blue' vs 'yellow'"], outcome="warning")
data("pii-in-output", bad(json.dumps({"instruction": "Email?", "output": "Write to jane.doe@example.com."})), 0,
     [r"pii\s+1 redacted \[EMAIL 1\]: lines 4"], outcome="warning", fix=False)
data("boilerplate-answer", bad(json.dumps({"instruction": "Hi", "output": "As an AI language model, I cannot."})), 0,
     [r"strip_boilerplate\s+1 stripped \(1 dropped\): lines 4"], outcome="warning", fix=False)


def _socket(path: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


# ------------------------------------------------------------------------------------------ environment

def env(id: str, variables: dict, names: list[str], *, code: int = 2, spec_text: str = GOOD, **kw) -> None:
    case("environment", id, kw.pop("argv", ["render", "{d}/spec.yaml"]), code, names, env=variables,
         files={"spec.yaml": spec_text, **kw.pop("files", {})}, **kw)


for _id, _vars, _says in [
    ("namespace-underscore", {"LAUNCHER_NAMESPACE": "Bad_NS"}, r"LAUNCHER_NAMESPACE \(namespace\): 'Bad_NS' is not a"),
    ("namespace-typo", {"LAUNCHER_NAMSPACE": "ml"}, r"LAUNCHER_NAMSPACE: not a launcher setting \(did you mean "
                                                     r"LAUNCHER_NAMESPACE\?\)"),
    ("lowercase-variable", {"launcher_namspace": "ml"}, r"launcher_namspace: not a launcher setting"),
    ("image-with-spaces", {"LAUNCHER_IMAGE": "not an image!!"}, r"LAUNCHER_IMAGE \(image\): .*not an image reference"),
    ("image-uppercase", {"LAUNCHER_IMAGE": "Registry/Trainer:1"}, r"LAUNCHER_IMAGE \(image\)"),
    ("endpoint-ftp", {"LAUNCHER_S3_ENDPOINT": "ftp://minio:21"}, r"LAUNCHER_S3_ENDPOINT.*not an http\(s\) URL"),
    ("endpoint-with-password", {"LAUNCHER_S3_ENDPOINT": "http://minio:Hunter2Secret@minio:9000"},
     r"LAUNCHER_S3_ENDPOINT \(s3_endpoint\): holds a user name or password"),
    ("endpoint-port-word", {"LAUNCHER_S3_ENDPOINT": "http://minio:port"}, r"LAUNCHER_S3_ENDPOINT.*not an http"),
    ("gpu-resource-no-domain", {"LAUNCHER_GPU_RESOURCE": "gpu"}, r"LAUNCHER_GPU_RESOURCE.*not an extended resource"),
    ("gpu-resource-kubernetes-io", {"LAUNCHER_GPU_RESOURCE": "kubernetes.io/gpu"}, r"LAUNCHER_GPU_RESOURCE"),
    ("node-selector-not-json", {"LAUNCHER_NODE_SELECTOR": "{pool: gpu}"}, r"LAUNCHER_NODE_SELECTOR: not valid JSON"),
    ("node-selector-bad-key", {"LAUNCHER_NODE_SELECTOR": '{"bad key!": "x"}'}, r"'bad key!' is not a label key"),
    ("node-selector-a-list", {"LAUNCHER_NODE_SELECTOR": '["a"]'}, r"LAUNCHER_NODE_SELECTOR.*valid dictionary"),
    ("node-selector-bad-value", {"LAUNCHER_NODE_SELECTOR": '{"pool": "has space"}'}, r"the value of pool is not a label"),
    ("toleration-operator", {"LAUNCHER_TOLERATIONS": '[{"key": "a", "operator": "Maybe"}]'},
     r"toleration 0: operator must be Equal or Exists"),
    ("toleration-effect", {"LAUNCHER_TOLERATIONS": '[{"key": "a", "effect": "Sometimes"}]'}, r"toleration 0: effect"),
    ("toleration-key-typo", {"LAUNCHER_TOLERATIONS": '[{"kye": "a"}]'}, r"toleration 0: unknown key 'kye'"),
    ("tolerations-not-json", {"LAUNCHER_TOLERATIONS": "["}, r"LAUNCHER_TOLERATIONS: not valid JSON"),
    ("toleration-exists-with-value", {"LAUNCHER_TOLERATIONS": '[{"key": "a", "operator": "Exists", "value": "x"}]'},
     r"operator Exists takes no value"),
    ("toleration-without-key", {"LAUNCHER_TOLERATIONS": '[{"operator": "Equal", "value": "x"}]'},
     r"without a key the operator must be Exists"),
    ("tolerations-an-object", {"LAUNCHER_TOLERATIONS": '{"key": "a"}'}, r"LAUNCHER_TOLERATIONS.*valid list"),
    ("pull-policy", {"LAUNCHER_IMAGE_PULL_POLICY": "Sometimes"}, r"LAUNCHER_IMAGE_PULL_POLICY.*'IfNotPresent'"),
    ("multinode-workload", {"LAUNCHER_MULTINODE_WORKLOAD": "mpi"}, r"LAUNCHER_MULTINODE_WORKLOAD.*'jobset'"),
    ("ttl-negative", {"LAUNCHER_TTL_SECONDS_AFTER_FINISHED": "-5"}, r"LAUNCHER_TTL_SECONDS_AFTER_FINISHED"),
    ("ttl-a-word", {"LAUNCHER_TTL_SECONDS_AFTER_FINISHED": "week"}, r"LAUNCHER_TTL_SECONDS_AFTER_FINISHED.*integer"),
    ("cluster-timeout-0", {"LAUNCHER_CLUSTER_TIMEOUT": "0"}, r"LAUNCHER_CLUSTER_TIMEOUT.*greater than 0"),
    ("cluster-timeout-word", {"LAUNCHER_CLUSTER_TIMEOUT": "soon"}, r"'soon' is not a duration"),
    ("cluster-timeout-negative", {"LAUNCHER_CLUSTER_TIMEOUT": "-1"}, r"'-1' is not a duration"),
    ("cluster-timeout-inf", {"LAUNCHER_CLUSTER_TIMEOUT": "inf"}, r"'inf' is not a duration"),
    ("service-account", {"LAUNCHER_SERVICE_ACCOUNT": "Bad_SA"}, r"LAUNCHER_SERVICE_ACCOUNT.*not a Kubernetes object"),
    ("s3-secret-name", {"LAUNCHER_S3_SECRET_NAME": "UPPER"}, r"LAUNCHER_S3_SECRET_NAME"),
    ("queue-with-space", {"LAUNCHER_QUEUE": "team a"}, r"LAUNCHER_QUEUE \(queue\)"),
    ("priority-class", {"LAUNCHER_PRIORITY_CLASS": "Hi!"}, r"LAUNCHER_PRIORITY_CLASS"),
    ("mlflow-token-secret", {"LAUNCHER_MLFLOW_TOKEN_SECRET": "has_underscore"}, r"LAUNCHER_MLFLOW_TOKEN_SECRET"),
    ("two-bad-variables", {"LAUNCHER_NAMESPACE": "Bad_NS", "LAUNCHER_IMAGE_PULL_POLICY": "Sometimes"},
     r"2 invalid launcher settings:\n  - LAUNCHER_NAMESPACE.*\n  - LAUNCHER_IMAGE_PULL_POLICY"),
    ("config-file-missing", {"LAUNCHER_CONFIG": "{d}/nope.yaml"}, r"LAUNCHER_CONFIG names .*nope\.yaml"),
]:
    env(_id, _vars, [_says])
for _id, _content, _says in [
    ("config-not-yaml", "namespace: [unclosed\n", r"cfg\.yaml, line 2 is not valid YAML"),
    ("config-a-list", "- a\n- b\n", r"cfg\.yaml must be a mapping of settings"),
    ("config-unknown-key", "namspace: ml\n", r"cfg\.yaml: namspace: not a setting \(did you mean namespace\?\)"),
    ("config-bad-value", "namespace: Bad_NS\n", r"cfg\.yaml: namespace: 'Bad_NS' is not a namespace name"),
    ("config-latin1", b"namespace: caf\xe9\n", r"cfg\.yaml is not UTF-8 text"),
]:
    env(_id, {"LAUNCHER_CONFIG": "{d}/cfg.yaml"}, [_says], files={"cfg.yaml": _content})
for _id, _content, _says in [
    ("kubeconfig-a-list", "- a\n", r"the kubeconfig .*kube\.yaml is not a kubeconfig"),
    ("kubeconfig-not-yaml", "contexts: [\n", r"the kubeconfig .*kube\.yaml, line \d+ is not valid YAML"),
    ("kubeconfig-bad-namespace", "current-context: c\ncontexts: [{name: c, context: {namespace: Bad_NS}}]\n",
     r"context c has namespace 'Bad_NS', which is not a namespace name"),
]:
    env(_id, {"KUBECONFIG": "{d}/kube.yaml"}, [_says], files={"kube.yaml": _content})
env("validate-sees-a-typo", {"LAUNCHER_NAMSPACE": "ml"}, [r"LAUNCHER_NAMSPACE: not a launcher setting"],
    argv=["validate", "{d}/spec.yaml"])
_TRACKED = GOOD + "tracking: {mlflow: {experiment: exp}}\n"
env("mlflow-uri-with-password", {"LAUNCHER_MLFLOW_TRACKING_URI": "https://bob:Hunter2Secret@mlflow.example.com"},
    [r"LAUNCHER_MLFLOW_TRACKING_URI"], spec_text=_TRACKED)
env("mlflow-uri-with-token", {"LAUNCHER_MLFLOW_TRACKING_URI": "https://mlflow.example.com/?token=Zk3pW9qLm2Rx"},
    [r"LAUNCHER_MLFLOW_TRACKING_URI"], spec_text=_TRACKED)
env("empty-secret-key-name", {"LAUNCHER_S3_ACCESS_KEY_KEY": ""}, [r"LAUNCHER_S3_ACCESS_KEY_KEY"])


# ------------------------------------------------------------------------------------------ flags

def flag(id: str, argv: list[str], code: int, names: list[str], **kw) -> None:
    case("flags", id, argv, code, names, files={"spec.yaml": GOOD, **kw.pop("files", {})}, **kw)


S = "{d}/spec.yaml"
flag("unknown-option", ["validate", S, "--bogus"], 2, [r"No such option: --bogus"])
flag("misspelled-command", ["valdate", S], 2, [r"No such command 'valdate'\. Did you mean 'validate'\?"])
flag("missing-spec-argument", ["submit"], 2, [r"Missing argument 'spec'"])
flag("missing-run-argument", ["status"], 2, [r"Missing argument 'run'"])
flag("render-output-xml", ["render", S, "-o", "xml"], 2, [r"Invalid value for '--output' / '-o'.*'xml'"])
flag("status-format-csv", ["status", "x", "-o", "csv"], 2, [r"Invalid value for '--format' / '-o'.*'csv'"])
flag("submit-format-xml", ["submit", S, "-o", "xml"], 2, [r"Invalid value for '--format'"])
flag("multinode-workload-mpi", ["render", S, "--multinode-workload", "mpi"], 2, [r"'--multinode-workload'.*'mpi'"])
flag("wait-timeout-negative", ["wait", "x", "--timeout", "-1"], 2, [r"timeout must be a number of seconds above 0"])
flag("wait-timeout-nan", ["wait", "x", "--timeout", "nan"], 2, [r"timeout must be .* above 0; got nan"])
flag("wait-timeout-word", ["wait", "x", "--timeout", "abc"], 2, [r"Invalid value for '--timeout'"])
flag("wait-interval-0", ["wait", "x", "--interval", "0"], 2, [r"interval must be a number of seconds above 0"])
flag("logs-tail-negative", ["logs", "x", "--tail", "-1"], 2, [r"tail must be a number of lines, 0 or more"])
flag("logs-follow-tail-negative", ["logs", "x", "-f", "--tail", "-3"], 2, [r"tail must be .*; got -3"])
flag("logs-tail-fraction", ["logs", "x", "--tail", "1.5"], 2, [r"Invalid value for '--tail'"])
flag("cancel-timeout-word", ["cancel", "x", "--timeout", "abc"], 2, [r"Invalid value for '--timeout'"])
flag("prune-older-than-word", ["artifacts", "prune", "x", "--older-than", "soon", "--output", "{d}"], 2,
     [r"--older-than 'soon' is not a duration"])
flag("prune-older-than-negative", ["artifacts", "prune", "x", "--older-than", "-1h", "--output", "{d}"], 2,
     [r"--older-than '-1h' is not a duration"])
flag("hidden-prune-fortnight", ["prune", "x", "--older-than", "1 fortnight", "--output", "{d}"], 2,
     [r"--older-than '1 fortnight' is not a duration"])
flag("validate-without-spec", ["validate"], 2, [r"name a spec file"])
flag("data-check-without-file", ["data", "check", "--json"], 2, [r"name a JSONL file"])
flag("set-without-value", ["validate", S, "--set"], 2, [r"Option '--set' requires an argument"], fix=False)
flag("set-empty-key", ["validate", S, "--set", "=3"], 2, [r"--set =3: empty key"])
flag("set-a-section", ["validate", S, "--set", "lora=5"], 2, [r"lora \(line 1\).*valid dictionary"])
flag("set-unknown-field", ["validate", S, "--set", "nonexistent.field=1"], 2, [r"nonexistent .*unknown field"])
flag("set-a-secret", ["validate", S, "--set", "labels.team=ghp_Zr8Kq2Lm7Xn4Pw9Tb3Vc6Hd1Jf5Gs0AyEuQ8"], 2,
     [r"labels\.team .*GitHub token \(not shown here\)"])
flag("set-local-path-for-render", ["render", S, "--set", "dataset.train=/etc/passwd"], 2,
     [r"dataset\.train \(line 3\): is a local path \(/etc/passwd\) that a pod cannot read"])
flag("dry-run-with-local-path", ["submit", S, "--dry-run", "--set", "dataset.train=./train.jsonl"], 2,
     [r"dataset\.train \(line 3\): is a local path"])
flag("namespace-flag", ["-n", "Bad_NS", "render", S], 2, [r"namespace: 'Bad_NS' is not a namespace name"])
flag("namespace-flag-empty", ["-n", "", "render", S], 2, [r"namespace: '' is not a namespace name"])
flag("queue-flag", ["render", S, "--queue", "Bad Queue"], 2, [r"queue: 'Bad Queue' is not a Kubernetes object"])
flag("init-over-an-existing-file", ["init", S], 2, [r"spec\.yaml exists; left as it is", r"--force"])
flag("init-bad-name", ["init", "{d}/new.yaml", "--name", "Bad_Name"], 2, [r"--name: 1 problem[\s\S]*'Bad_Name' is not a valid run name"])
flag("init-secret-as-name", ["init", "{d}/new.yaml", "--name", "ghp_Zr8Kq2Lm7Xn4Pw9Tb3Vc6Hd1Jf5Gs0AyEuQ8"], 2,
     [r"--name: 1 problem[\s\S]*a value hidden here"])
flag("kubeconfig-flag-a-list", ["--kubeconfig", "{d}/kube.yaml", "render", S], 2, [r"is not a kubeconfig"],
     files={"kube.yaml": "- a\n"})
flag("context-not-in-kubeconfig", ["--context", "nope", "render", S], 2, [r"no context 'nope' in the kubeconfig"],
     env={"KUBECONFIG": "{d}/kube.yaml"},
     files={"kube.yaml": "current-context: c\ncontexts: [{name: c, context: {namespace: ml}}]\n"})
flag("kubeconfig-flag-missing-file", ["--kubeconfig", "{d}/no-such-kubeconfig", "render", S], 3,
     [r"no kubeconfig at .*no-such-kubeconfig"])
flag("cancel-timeout-negative", ["cancel", "x", "--timeout", "-5"], 2, [r"timeout must be .* above 0"])
flag("submit-wait-timeout-negative", ["submit", S, "--wait", "--timeout", "-1"], 2, [r"timeout must be .* above 0"])


# ------------------------------------------------------------------------------------------ tampered artifacts

def publish(d: Path) -> None:
    """A run `run` with one complete version v1 in the folder store {d}/store."""
    from jobs.publish import publish_version
    from jobs.storage import LocalStore

    src = d / "src"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
    (src / "adapter" / "adapter_config.json").write_text('{"r": 16}')
    (src / "eval_report.html").write_text("<html></html>")
    assert publish_version(LocalStore(str(d / "store")), "run", src) == "v1"
    import shutil

    shutil.rmtree(src)


def v1(d: Path) -> Path:
    return d / "store" / "run" / "v1"


def rewrite_manifest(d: Path, edit: Callable[[dict], object], marker: bytes | None = None) -> None:
    """Edit v1's manifest as a careful tamperer would: the _COMPLETE marker gets the new sha256 (or ``marker``)."""
    m = json.loads((v1(d) / "manifest.json").read_text())
    edit(m)
    raw = json.dumps(m).encode()
    (v1(d) / "manifest.json").write_bytes(raw)
    (v1(d) / "_COMPLETE").write_bytes(hashlib.sha256(raw).hexdigest().encode() if marker is None else marker)


def artifact(id: str, tamper: Callable[[Path], object] | None, code: int, names: list[str], *,
             argv: tuple = (), **kw) -> None:
    def setup(d: Path) -> None:
        publish(d)
        if tamper is not None:
            tamper(d)
    case("tampered artifacts", id, list(argv) or ["artifacts", "run", "--output", "{d}/store", "--download",
                                                   "{d}/dl"], code, names, setup=setup, **kw)


A = "adapter/adapter_model.safetensors"
artifact("file-deleted", lambda d: (v1(d) / A).unlink(), 3, [rf"1 file\(s\) listed in its manifest are missing.*{A}",
                                                              r"nothing was written to .*dl/v1"])
artifact("file-bytes-changed", lambda d: (v1(d) / A).write_bytes(b"\xff" * 2048), 3,
         [rf"1 file\(s\) do not match the manifest \(sha256 or size\): {A}"])
artifact("file-truncated", lambda d: (v1(d) / A).write_bytes(b"\x00" * 10), 3, [rf"do not match the manifest.*{A}"])
artifact("file-appended", lambda d: open(v1(d) / A, "ab").write(b"payload"), 3, [rf"do not match.*{A}"])
artifact("file-replaced-by-symlink", lambda d: ((v1(d) / A).unlink(), os.symlink("/etc/hostname", v1(d) / A)), 3,
         [rf"key '{A}' escapes the store root"], fix=False)
artifact("two-files-changed", lambda d: ((v1(d) / A).write_bytes(b"x"), (v1(d) / "eval_report.html").write_text("")), 3,
         [r"2 file\(s\) do not match"])
artifact("marker-empty", lambda d: (v1(d) / "_COMPLETE").write_bytes(b""), 3, [r"v1/_COMPLETE is empty"])
artifact("marker-garbage", lambda d: (v1(d) / "_COMPLETE").write_text("done\n"), 3,
         [r"v1/_COMPLETE does not hold a sha256"])
artifact("marker-other-sha", lambda d: (v1(d) / "_COMPLETE").write_text("0" * 64), 3,
         [r"v1/manifest\.json does not match the sha256 in its _COMPLETE marker"])
artifact("manifest-edited-marker-not", lambda d: (v1(d) / "manifest.json").write_text('{"files": {}}'), 3,
         [r"manifest\.json does not match the sha256"])
artifact("manifest-deleted", lambda d: (v1(d) / "manifest.json").unlink(), 3,
         [r"v1 has a _COMPLETE marker but no manifest\.json"])
artifact("marker-deleted", lambda d: (v1(d) / "_COMPLETE").unlink(), 3,
         [r"run run has no complete version under .*store/run \(1 incomplete\)"])
artifact("manifest-not-json", lambda d: _raw_manifest(d, b"not json"), 3, [r"manifest\.json is not a manifest"])
artifact("manifest-lists-nothing", lambda d: rewrite_manifest(d, lambda m: m.update(files={})), 3,
         [r"manifest\.json lists no files"])
artifact("manifest-entry-no-sha", lambda d: rewrite_manifest(d, lambda m: m["files"][A].pop("sha256")), 3,
         [rf"the entry '{A}' has no valid sha256 and size"])
artifact("manifest-entry-negative-size", lambda d: rewrite_manifest(d, lambda m: m["files"][A].update(size=-1)), 3,
         [r"has no valid sha256 and size"])
for _id, _path in [("manifest-dotdot", "../../escaped.txt"), ("manifest-absolute", "/etc/passwd"),
                   ("manifest-backslash", "adapter\\..\\..\\x"), ("manifest-double-slash", "adapter//x")]:
    artifact(_id, lambda d, p=_path: rewrite_manifest(d, lambda m: m["files"].update(
        {p: {"sha256": "0" * 64, "size": 1}})), 3, [r"names an unsafe path"])
artifact("manifest-extra-file-missing", lambda d: rewrite_manifest(d, lambda m: m["files"].update(
    {"adapter/extra.bin": {"sha256": "0" * 64, "size": 1}})), 3, [r"missing from the store: adapter/extra\.bin"])
artifact("only-a-claim", lambda d: ((v1(d) / "_COMPLETE").unlink(), (v1(d) / "manifest.json").unlink()), 3,
         [r"no complete version .*\(1 incomplete\)"])
artifact("version-not-published", None, 3, [r"run run has no version v7", r"pick one of: v1"],
         argv=("artifacts", "run", "--output", "{d}/store", "--download", "{d}/dl", "--version", "7"))
artifact("version-incomplete", lambda d: _half_v2(d), 3, [r"run/v2 is incomplete \(no _COMPLETE marker\)"],
         argv=("artifacts", "run", "--output", "{d}/store", "--download", "{d}/dl", "--version", "v2"))
artifact("no-such-run", None, 3, [r"run other has no complete version under .*store/other"],
         argv=("artifacts", "other", "--output", "{d}/store", "--download", "{d}/dl"))
artifact("download-over-an-existing-version", lambda d: (d / "dl" / "v1").mkdir(parents=True) or
         (d / "dl" / "v1" / "mine.txt").write_text("mine"), 3, [r"dl/v1 already exists"])
artifact("output-a-near-miss-uri", None, 2, [r"did you mean 's3://store"], argv=(
    "artifacts", "run", "--output", "s3:/store", "--download", "{d}/dl"))


def _raw_manifest(d: Path, raw: bytes) -> None:
    (v1(d) / "manifest.json").write_bytes(raw)
    (v1(d) / "_COMPLETE").write_bytes(hashlib.sha256(raw).hexdigest().encode())


def _half_v2(d: Path) -> None:
    (v1(d).parent / "v2" / "adapter").mkdir(parents=True)
    (v1(d).parent / "v2" / "_CLAIM").write_text("x")


# ------------------------------------------------------------------------------------------ interrupts, unwritable

def interrupt_at(target: str, after: int = 0):
    """A patch that raises KeyboardInterrupt (Ctrl-C) in the call after the first ``after`` calls of
    ``module:function`` or ``module:Class.method``."""
    def patch(mp: pytest.MonkeyPatch, d: Path) -> None:
        mod, attr = target.split(":")
        owner = importlib.import_module(mod)
        if "." in attr:
            cls, attr = attr.split(".")
            owner = getattr(owner, cls)
        real, calls = getattr(owner, attr), []

        def fake(*a, **k):
            calls.append(1)
            if len(calls) > after:
                raise KeyboardInterrupt
            return real(*a, **k)
        mp.setattr(owner, attr, fake)
    return patch


I = "interrupts and unwritable output"
case(I, "ctrl-c-in-validate", ["validate", S], 130, [r"^interrupted$"], files={"spec.yaml": GOOD}, fix=False,
     patch=interrupt_at("jobs.spec.loading:load_spec_text"))
case(I, "ctrl-c-in-data-check", ["data", "check", "{d}/t.jsonl"], 130, [r"^interrupted$"], fix=False,
     files={"t.jsonl": "\n".join(ROWS) + "\n"}, patch=interrupt_at("jobs.dataprep:prepare_report"))
case(I, "ctrl-c-in-render", ["render", S], 130, [r"^interrupted$"], files={"spec.yaml": GOOD}, fix=False,
     patch=interrupt_at("launcher.render:render_run"))
case(I, "ctrl-c-in-init", ["init", "{d}/new.yaml"], 130, [r"^interrupted$"], fix=False,
     patch=interrupt_at("launcher.init_spec:starter_spec"))
case(I, "ctrl-c-mid-download", ["artifacts", "run", "--output", "{d}/store", "--download", "{d}/dl"], 130,
     [r"^interrupted$"], setup=publish, fix=False, patch=interrupt_at("jobs.storage:LocalStore.get_file", after=1))
case(I, "ctrl-c-mid-download-into-existing-folder", ["artifacts", "run", "--output", "{d}/store", "--download",
                                                     "{d}/dl"], 130, [r"^interrupted$"], fix=False,
     setup=lambda d: (publish(d), (d / "dl").mkdir()), patch=interrupt_at("jobs.storage:LocalStore.get_file", 2))
case(I, "ctrl-c-in-artifacts-list", ["artifacts", "run", "--output", "{d}/store"], 130, [r"^interrupted$"],
     setup=publish, fix=False, patch=interrupt_at("launcher.artifacts:list_versions"))
case(I, "ctrl-c-in-prune", ["artifacts", "prune", "run", "--output", "{d}/store", "--yes"], 130, [r"^interrupted$"],
     setup=lambda d: (publish(d), _half_v2(d)), fix=False, patch=interrupt_at("launcher.artifacts:prune_incomplete"))
case(I, "init-into-proc", ["init", "/proc/nope/spec.yaml"], 2, [r"cannot write /proc/nope/spec\.yaml"])
case(I, "init-under-a-file", ["init", "{d}/spec.yaml/spec.yaml"], 2, [r"cannot write .*spec\.yaml/spec\.yaml"],
     files={"spec.yaml": GOOD})
case(I, "download-into-a-file", ["artifacts", "run", "--output", "{d}/store", "--download", "{d}/afile"], 3,
     [r"afile"], setup=lambda d: (publish(d), (d / "afile").write_text("mine")))
case(I, "download-into-proc", ["artifacts", "run", "--output", "{d}/store", "--download", "/proc/nope"], 3,
     [r"/proc/nope"], setup=publish)

#: Cases run as real `python -m launcher` processes too (a few per class), three at a time.
REAL = ["duplicate-key", "token-in-output-url", "dev-zero-as-spec", "row-in-two-formats", "fifo", "dev-zero",
        "namespace-typo", "endpoint-with-password", "config-unknown-key", "misspelled-command",
        "wait-timeout-negative", "set-a-secret", "file-bytes-changed", "marker-empty", "manifest-dotdot",
        "init-into-proc", "download-into-a-file"]
#: Cases counted from elsewhere: (class, outcome, where, test names that must exist there).
ELSEWHERE = [
    (I, "error", "tests/unit/test_output_and_interrupts.py",
     ["test_an_output_that_names_a_file_is_refused_with_the_fix", "test_an_output_on_a_pseudo_file_system_is_refused",
      "test_an_interrupted_publish_leaves_no_files_and_the_number_is_free_again",
      "test_the_job_stops_on_an_unwritable_output_before_fetching_anything"]),
]


# ------------------------------------------------------------------------------------------ the runs

def _fill(text: str, d: Path) -> str:
    return text.replace("{d}", str(d))


def _prepare(c: Case, d: Path) -> tuple[list[str], dict]:
    for rel, body in c.files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body.encode() if isinstance(body, str) else body)
    if c.setup is not None:
        c.setup(d)
    return [_fill(a, d) for a in c.argv], {k: _fill(v, d) for k, v in c.env.items()}


def _tree(d: Path) -> dict[str, str]:
    """Every path under ``d`` (links not followed) with what it is: the bytes' sha256, a link's target, a folder."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root, name)
            rel = str(p.relative_to(d))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def _clean_env(d: Path, extra: dict) -> dict:
    """The environment of a case: no LAUNCHER_*/AWS_*/KUBECONFIG of the caller; HOME is the case's folder."""
    drop = {k: None for k in os.environ if k.upper().startswith(("LAUNCHER_", "AWS_")) or k == "KUBECONFIG"}
    return {**drop, "HOME": str(d), **extra}


@dataclass
class Ran:
    code: int | None
    out: str
    crash: str | None = None  # an exception that escaped the CLI (a traceback in the real one)
    hung: bool = False


def _inproc(c: Case, d: Path, argv: list[str], env: dict, mp: pytest.MonkeyPatch) -> Ran:
    """The CLI in this process (typer's CliRunner): its exit code, its stdout and stderr, and any exception that
    escaped it (which the real entry point would print as a traceback)."""
    from typer.testing import CliRunner

    from launcher import cli

    if c.patch is not None:
        c.patch(mp, d)
    mp.chdir(d)
    box: list = []

    def go() -> None:
        box.append(CliRunner().invoke(cli.app, argv, env=_clean_env(d, env), prog_name="launcher"))

    if c.runner == "thread":  # a read that blocks forever is detected, then unblocked here
        t = threading.Thread(target=go, daemon=True)
        t.start()
        t.join(3)
        if t.is_alive():
            fifo = next((Path(a) for a in argv if Path(a).is_fifo()), None)
            if fifo is not None:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # EOF for the blocked reader
            t.join(10)
            return Ran(None, box[0].output if box else "", hung=True)
    else:
        go()
    r = box[0]
    crash = None
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        crash = f"{type(r.exception).__name__}: {r.exception}"
    return Ran(r.exit_code, r.output, crash)


def _process(c: Case, d: Path, argv: list[str], env: dict) -> Ran:
    """The real entry point, `python -m launcher`, in a process of its own (1 GiB of address space at most)."""
    full = {k: v for k, v in os.environ.items()
            if not k.upper().startswith(("LAUNCHER_", "AWS_")) and k != "KUBECONFIG"}
    full.update({"PYTHONPATH": str(REPO), "HOME": str(d), **env})

    def cap() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    try:
        p = subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=d, env=full, capture_output=True,
                           timeout=60, preexec_fn=cap if c.runner == "process" else None)
    except subprocess.TimeoutExpired:
        return Ran(None, "", hung=True)
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    return Ran(p.returncode, out)


def _check(c: Case, ran: Ran, before: dict, after: dict) -> None:
    assert not ran.hung, f"{c.id}: the CLI did not return (3 s in-process, 60 s as a process)"
    assert ran.crash is None, f"{c.id}: an exception escaped the CLI: {ran.crash}\n{ran.out[-2000:]}"
    assert "Traceback" not in ran.out, ran.out[-3000:]
    assert ran.code == c.code, (c.id, ran.code, ran.out[-2000:])
    for pat in c.names:
        assert re.search(pat, ran.out, re.M), (c.id, pat, ran.out[:3000])
    if c.outcome != "warning" and c.fix:
        assert FIX.search(ran.out), (c.id, "no fix in the message", ran.out[:2000])
    assert not [s for s in SECRETS if s in ran.out], (c.id, "a planted secret was echoed", ran.out[:2000])
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, (c.id, "the run left something behind or changed it", changed)


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=True, reason=c.reason)] if c.outcome == "bug" else []
    return pytest.param(c, id=f"{c.cls.split()[0]}-{c.id}", marks=marks)


@pytest.mark.parametrize("c", [_param(c) for c in CASES if c.runner != "process"])
def test_bad_input(c: Case, tmp_path, monkeypatch):
    d = tmp_path / "case"
    d.mkdir()
    argv, env = _prepare(c, d)
    before = _tree(d)  # taken after the case's own files are in place: nothing the CLI writes may remain
    ran = _inproc(c, d, argv, env, monkeypatch)
    monkeypatch.undo()
    _check(c, ran, before, _tree(d))


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> dict[str, tuple[Ran, dict, dict]]:
    """The REAL cases as `python -m launcher` processes, three at a time (each is a cold Python start)."""
    base = tmp_path_factory.mktemp("real")
    by_id = {c.id: c for c in CASES}

    def one(cid: str):
        c, d = by_id[cid], base / cid
        d.mkdir()
        argv, env = _prepare(c, d)
        before = _tree(d)
        return cid, (_process(c, d, argv, env), before, _tree(d))

    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(one, REAL))


@pytest.mark.parametrize("c", [_param(c) for c in CASES if c.id in REAL])
def test_bad_input_real_process(c: Case, real_runs):
    ran, before, after = real_runs[c.id]
    _check(c, ran, before, after)


# ------------------------------------------------------------------------------------------ the table

def _old_corpus() -> list[tuple[str, str, str]]:
    """(class, case, outcome) of tests/unit/test_bad_input.py's corpus, from its own lists."""
    spec_ = importlib.util.spec_from_file_location("_bad_input_first_corpus", REPO / "tests/unit/test_bad_input.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    rows = []
    for name, (_, codes, patterns) in mod.SPEC_CORPUS.items():
        if codes == (0,) and not any("warning" in p for p in patterns):
            continue  # valid on purpose (BOM, CRLF, YAML off): not a bad input
        rows.append(("spec", name, "warning" if codes == (0,) else "error"))
    rows += [("spec", name, "error") for name in [*mod.SPEC_EXTRA, "alias-bomb"]]
    for name, (_, code, expected, _valid) in mod.JSONL_CORPUS.items():
        if code == 0 and not expected:
            continue
        rows.append(("data", name, "error" if code else "warning"))
    rows += [("data", "missing-file", "error"), ("data", "a-folder", "error"), ("flags", "set-garbage", "error")]
    return rows


def corpus_rows() -> list[tuple[str, str, str, str]]:
    """(class, case, outcome, file) of every bad input the corpus counts."""
    rows = [(cls, name, outcome, "test_bad_input.py") for cls, name, outcome in _old_corpus()]
    rows += [(c.cls, c.id, c.outcome, "test_bad_input_corpus.py") for c in CASES]
    for cls, outcome, where, names in ELSEWHERE:
        rows += [(cls, n, outcome, Path(where).name) for n in names]
    return rows


def corpus_table() -> str:
    rows = corpus_rows()
    out = ["| class | bad inputs | clear error | named warning | xfail (a real bug) | where |",
           "| --- | --- | --- | --- | --- | --- |"]
    for cls in CLASSES:
        mine = [r for r in rows if r[0] == cls]
        n = {o: sum(r[2] == o for r in mine) for o in ("error", "warning", "bug")}
        where = ", ".join(f"`{f}`" for f in sorted({r[3] for r in mine}))
        out.append(f"| {cls} | {len(mine)} | {n['error']} | {n['warning']} | {n['bug']} | {where} |")
    n = {o: sum(r[2] == o for r in rows) for o in ("error", "warning", "bug")}
    out.append(f"| **all** | **{len(rows)}** | {n['error']} | {n['warning']} | {n['bug']} | |")
    return "\n".join(out)


def test_the_corpus_has_150_distinct_bad_inputs_in_every_class():
    rows = corpus_rows()
    assert len({(r[0], r[1]) for r in rows}) == len(rows) >= 150
    assert {r[0] for r in rows} == set(CLASSES)
    for cls, outcome, where, names in ELSEWHERE:
        text = (REPO / where).read_text()
        assert all(f"def {n}(" in text for n in names), where


def test_the_docs_table_matches_the_corpus():
    table = corpus_table()
    doc = (REPO / "docs" / "reliability.md").read_text()
    assert table in doc, "docs/reliability.md's corpus table is stale; replace it with:\n\n" + table


if __name__ == "__main__":  # print the table for docs/reliability.md
    print(corpus_table())
