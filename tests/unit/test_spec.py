"""The spec model: defaults from the guide, every problem at once with field and line."""
import pytest

from jobs.errors import SpecError
from jobs.spec import apply_overrides, field_docs, load_spec, load_spec_text

pytestmark = pytest.mark.unit

MINIMAL = """\
name: support-bot
base_model: {uri: s3://models/llama/}
dataset: {train: s3://data/train.jsonl}
output: s3://artifacts/lora
"""


def test_defaults_follow_the_lora_guide():
    s = load_spec_text(MINIMAL)
    assert (s.lora.rank, s.lora.alpha, s.lora.dropout, s.lora.target_modules) == (16, 16, 0.05, "all-linear")
    assert (s.training.learning_rate, s.training.weight_decay, s.training.epochs) == (2e-4, 0.01, 1)
    assert s.training.per_device_batch_size * s.training.accumulation_for(1) == 16
    assert (s.eval.temperature, s.eval.top_p, s.eval.top_k) == (0.3, 0.9, 40)
    assert s.data.max_sentence_words == 28


def test_every_problem_is_reported_at_once_with_field_and_line():
    bad = MINIMAL.replace("name: support-bot", "name: Support_Bot") + (
        "lora:\n  rank: 0\n  colour: red\ntraining:\n  learning_rate: -0.01\n  epochs: 0\n")
    with pytest.raises(SpecError) as err:
        load_spec_text(bad, source="spec.yaml")
    where = {p.where: p for p in err.value.problems}
    assert set(where) == {"name", "lora.rank", "lora.colour", "training.learning_rate", "training.epochs"}
    assert where["lora.colour"].message == "unknown field" and where["lora.colour"].line == 7
    assert where["training.epochs"].line == 10
    assert "spec.yaml: 5 problems" in str(err.value)


def test_the_guides_ranges_are_advice_with_the_range_and_why_only_the_impossible_is_an_error():
    expert = load_spec_text(MINIMAL + "lora:\n  rank: 8\n  alpha: 128\ntraining:\n  learning_rate: 3.0e-4\n"
                                      "  epochs: 4\n")
    advice = {p.where: p for p in expert.advice()}
    assert set(advice) == {"lora.rank", "lora.alpha", "training.learning_rate", "training.epochs"}
    assert "outside the guide's 16-64" in advice["lora.rank"].message and advice["lora.rank"].fix
    assert advice["training.epochs"].line == 10
    assert load_spec_text(MINIMAL).advice() == [], "the defaults are the guide's"
    with pytest.raises(SpecError) as err:
        load_spec_text(MINIMAL + "lora:\n  rank: 0\n  dropout: 1.0\ntraining:\n  learning_rate: -1\n")
    assert {p.where for p in err.value.problems} == {"lora.rank", "lora.dropout", "training.learning_rate"}


def test_a_misspelled_key_gets_a_suggestion():
    with pytest.raises(SpecError) as err:
        load_spec_text(MINIMAL + "lora:\n  rnak: 16\ntrainig:\n  epochs: 2\n")
    fixes = {p.where: p.fix for p in err.value.problems}
    assert "did you mean 'rank'?" in fixes["lora.rnak"] and "did you mean 'training'?" in fixes["trainig"]


def test_yaml_syntax_error_names_the_line():
    with pytest.raises(SpecError) as err:
        load_spec_text("name: x\nlora:\n  rank: [16\n")
    assert err.value.problems[0].where.startswith("line ")


def test_missing_file_and_non_mapping_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec_text("- just\n- a list\n")


def test_output_and_data_paths_cannot_escape_with_dotdot():
    with pytest.raises(SpecError) as err:
        load_spec_text(MINIMAL.replace("s3://artifacts/lora", "s3://artifacts/../../etc"))
    assert err.value.problems[0].where == "output"


def test_spec_hash_is_stable_and_changes_with_the_spec():
    a, b = load_spec_text(MINIMAL), load_spec_text(MINIMAL)
    assert a.spec_hash() == b.spec_hash()
    changed = load_spec_text(MINIMAL + "training: {epochs: 2}\n")
    assert changed.spec_hash() != a.spec_hash()


def test_the_checkpoint_key_ignores_where_a_run_runs_but_not_what_it_trains():
    """The Job's name (spec hash) changes with resources; the checkpoints' key does not, so a run
    resubmitted with more memory or another number of GPUs resumes instead of starting over."""
    a = load_spec_text(MINIMAL)
    moved = load_spec_text(MINIMAL + "resources: {gpus: 4, memory: 200Gi, nodes: 2}\n")
    assert moved.spec_hash() != a.spec_hash()
    assert moved.training_hash() == a.training_hash()
    assert load_spec_text(MINIMAL + "training: {epochs: 2}\n").training_hash() != a.training_hash()


def test_overrides_set_nested_fields_and_are_validated():
    import yaml
    data = apply_overrides(yaml.safe_load(MINIMAL), ["training.epochs=2", "lora.rank=32"])
    s = load_spec_text(yaml.safe_dump(data))
    assert s.training.epochs == 2 and s.lora.rank == 32
    with pytest.raises(SpecError):
        apply_overrides({}, ["no-equals-sign"])


def test_qlora_with_dora_is_rejected():
    with pytest.raises(SpecError, match="use_dora"):
        load_spec_text(MINIMAL + "quantization: {mode: 4bit}\nlora: {use_dora: true}\n")


def test_field_docs_cover_nested_fields_with_descriptions():
    rows = {path: desc for path, _, desc in field_docs()}
    assert "training.learning_rate" in rows and rows["training.learning_rate"]
    assert "lora.rank" in rows


def test_duplicate_keys_are_an_error_not_last_one_wins():
    with pytest.raises(SpecError) as err:
        load_spec_text(MINIMAL + "training:\n  epochs: 1\n  epochs: 3\n")
    p = err.value.problems[0]
    assert p.where == "line 7" and "duplicate key 'epochs' (first on line 6)" in p.message


def test_spec_reference_doc_is_in_sync_with_the_model():
    from pathlib import Path

    from jobs.spec import reference_markdown
    doc = Path(__file__).resolve().parents[2] / "docs" / "spec-reference.md"
    assert doc.read_text() == reference_markdown(), "regenerate: python -m jobs.spec > docs/spec-reference.md"


# ---------------------------------------------------------------------------- secrets never leave the secret

#: Secrets of every shape the spec refuses; none may come back in an error. (Made-up values, not real keys.)
PLANTED = {
    "hf": "hf_Qx7Lm2Pz9Rt4Vb8Nc3Kd6Wf1Hj5Sg0AyEu",
    "aws-key-id": "AKIAQ7X2LM9PZ4RT8VB3",
    "github": "ghp_Zr8Kq2Lm7Xn4Pw9Tb3Vc6Hd1Jf5Gs0AyEuQ8",
    "random-40": "Xk9Qm2Lp7Rz4Tv8Nb3Wc6Hd1Jf5Gs0AyEu9Qx2L",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
}
#: URIs that carry a secret: a presigned signature, credentials, a token.
PLANTED_URIS = {
    "presigned": "s3://data/train.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAQ7X2LM9PZ4RT8VB3"
                 "%2F20261207&X-Amz-Signature=9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "sas": "s3://data/train.jsonl?sv=2024-01-01&sig=Zm9vYmFyYmF6cXV4c2VjcmV0",
    "credentials": "s3://MYACCESSKEY:my-secret-value-123@data/train.jsonl",
    "hf-token-uri": "hf:hf_Qx7Lm2Pz9Rt4Vb8Nc3Kd6Wf1Hj5Sg0AyEu",
}
#: Parts of the planted values that must not appear in any error (a URI's secret part, not its bucket).
SECRET_PARTS = [*PLANTED.values(), "X-Amz-Signature=9f8e7d6c", "Zm9vYmFyYmF6cXV4c2VjcmV0", "my-secret-value-123",
                "MYACCESSKEY"]


def _string_fields():
    """(path, value-maker) for every string field of the spec, found from the model, so a new one is covered."""
    import typing

    from jobs.spec import TrainingRunSpec, _section_model

    def holds_str(ann):
        return ann is str or any(holds_str(a) for a in typing.get_args(ann))

    out = []

    def walk(model, prefix):
        for name, f in model.model_fields.items():
            sub = _section_model(f.annotation)
            if sub is not None:
                walk(sub, prefix + (name,))
            elif holds_str(f.annotation):
                out.append(prefix + (name,))

    walk(TrainingRunSpec, ())
    return out


def _plant(path, secret):
    import yaml

    from jobs.spec import _looks_random

    data = yaml.safe_load(MINIMAL)
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    last = path[-1]
    if path == ("labels",):
        node[last] = {"team": secret}
    elif path == ("lora", "target_modules"):
        node[last] = ["q_proj", secret]
    elif path == ("eval", "prompts") and not _looks_random(secret):
        node[last] = [{"prompt": f"What is {secret}?", "reference": secret}]  # prose: shapes and URLs only
    else:
        node[last] = secret
    return data


def test_the_planted_secret_test_covers_every_string_field():
    fields = {".".join(p) for p in _string_fields()}
    assert {"name", "base_model.uri", "dataset.train", "dataset.validation", "output", "labels", "eval.prompts",
            "tracking.mlflow.experiment", "tracking.mlflow.uri_env", "resources.priority_class",
            "resources.memory", "lora.target_modules", "data.balance_field"} <= fields


@pytest.mark.parametrize("secret", list(PLANTED.values()) + list(PLANTED_URIS.values()),
                         ids=list(PLANTED) + list(PLANTED_URIS))
def test_a_secret_in_any_string_field_is_refused_without_echoing_it(secret):
    from jobs.spec import parse_spec

    for path in _string_fields():
        data = _plant(path, secret)
        with pytest.raises(SpecError) as err:
            parse_spec(data)
        text = str(err.value) + "".join(p.render() for p in err.value.problems)
        leaked = [s for s in SECRET_PARTS if s in text]
        assert not leaked, (path, leaked, text)
        assert any(p.where.startswith(".".join(path)) for p in err.value.problems), (path, text)


def test_prose_is_refused_only_for_token_shapes_and_secret_urls():
    from jobs.spec import parse_spec

    prose = "Rotate the key Xk9Qm2Lp7Rz4Tv8Nb3Wc6Hd1Jf5Gs0AyEu9Qx2L? See ssh://git@example.com/repo."
    data = _plant(("eval", "prompts"), "x")
    data["eval"]["prompts"] = [{"prompt": prose}]
    assert parse_spec(data).eval.prompts[0].prompt == prose


def test_a_secret_in_a_label_key_is_refused_and_the_key_not_echoed():
    with pytest.raises(SpecError) as err:
        load_spec_text(MINIMAL + f"labels:\n  {PLANTED['github'].lower()}: x\n  {PLANTED['aws-key-id']}: y\n")
    text = str(err.value)
    assert PLANTED["github"].lower() not in text and PLANTED["aws-key-id"] not in text
    assert all(p.line == 6 or p.line == 7 for p in err.value.problems), text


def test_s3_credentials_in_the_uri_are_named_not_printed():
    with pytest.raises(SpecError) as err:
        load_spec_text(MINIMAL.replace("s3://data/train.jsonl", "s3://AKIAQ7X2LM9PZ4RT8VB3:wJalrXUtnFEMI@data/t"))
    p = err.value.problems[0]
    assert p.where == "dataset.train" and p.line == 3 and "credentials" in p.message or "access key" in p.message
    assert "wJalrXUtnFEMI" not in str(err.value) and "AKIAQ7X2LM9PZ4RT8VB3" not in str(err.value)


@pytest.mark.parametrize("value", [
    "support-bot", "llama-3.1-8b-instruct", "Customer Support / Llama 3 8B (v2)", "team-ml", "v1.2.3",
    "3f2a9c1b0d4e5f60718293a4b5c6d7e8f9012345",  # a git commit
    "123e4567-e89b-12d3-a456-426614174000", "Meta-Llama-3-70B-Instruct-GPTQ-4bit-v2",
    "ThisIsALongCamelCaseProjectName2026Edition", "support_bot_Experiment_2026_12_07_Run42",
    "s3://ml-artifacts/runs/ProjectX/2026/12/07/Llama3-8B-QLoRA-r16-a32-lr2e4",
    "s3://bucket/task-classification-model-v1-2026/sk-learn-models/x", "hf:HuggingFaceTB/SmolLM2-135M-Instruct",
    "hf:deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "hf:nvidia/Llama-3_3-Nemotron-Super-49B-v1",
    "/Users/alice@example.com/support-bot", "s3://data/tokenizer/token_counts.jsonl", "MLFLOW_TRACKING_URI",
])
def test_ordinary_names_ids_and_paths_are_not_taken_for_secrets(value):
    from jobs.spec import secret_kind

    assert secret_kind(value) is None


def test_ordinary_values_pass_in_the_fields_that_are_checked():
    s = load_spec_text(MINIMAL.replace("s3://models/llama/", "hf:meta-llama/Llama-3.1-8B-Instruct") +
                       "labels: {team: ml-platform, commit: 3f2a9c1b0d4e5f60718293a4b5c6d7e8f9012345}\n"
                       "tracking:\n  mlflow: {experiment: /Users/alice@example.com/Support-Bot Llama3 8B}\n")
    assert s.labels["team"] == "ml-platform" and s.tracking.mlflow.experiment.startswith("/Users/")


# ---------------------------------------------------------------------------- places: schemes and local paths

@pytest.mark.parametrize("value,fix", [
    ("s3:/data/x.jsonl", "did you mean 's3://data/x.jsonl'"),
    ("s3:data/x.jsonl", "did you mean 's3://data/x.jsonl'"),
    ("S3://data/x.jsonl", "did you mean 's3://data/x.jsonl'"),
    ("s3///data/x.jsonl", "did you mean 's3://data/x.jsonl'"),
    ("s3//data/x.jsonl", "did you mean 's3://data/x.jsonl'"),
    ("file:/etc/x", "file:///absolute/path"),
    ("gs://data/x", "unsupported scheme"),
    ("hf:org/name", "only base_model.uri"),
])
def test_a_near_miss_of_a_scheme_is_an_error_with_the_spelling_meant(value, fix):
    with pytest.raises(SpecError) as err:
        load_spec_text(MINIMAL.replace("s3://data/train.jsonl", value))
    p = err.value.problems[0]
    assert p.where == "dataset.train" and p.line == 3 and fix in p.message, p.render()


@pytest.mark.parametrize("uri", ["hf:../../x", "hf:/etc", "hf://org/name", "hf:org/../x", "hf:a/b/c", "HF:org/n"])
def test_an_hf_uri_must_be_a_model_id_not_a_path(uri):
    with pytest.raises(SpecError) as err:
        load_spec_text(MINIMAL.replace("s3://models/llama/", uri))
    assert err.value.problems[0].where == "base_model.uri"


def test_file_uris_and_paths_are_local_paths_alike():
    for value in ("file:///etc/data.jsonl", "/etc/data.jsonl", "data/train.jsonl", "file://data/train.jsonl"):
        s = load_spec_text(MINIMAL.replace("s3://data/train.jsonl", value))
        assert ("dataset.train", value) in s.places()


# ---------------------------------------------------------------------------- impossible values, clear messages

def _problem(text):
    with pytest.raises(SpecError) as err:
        load_spec_text(MINIMAL + text)
    assert len(err.value.problems) == 1, str(err.value)
    return err.value.problems[0]


def test_impossible_resources_are_errors():
    assert "not a PriorityClass name" in _problem("resources: {priority_class: Bad_Class!}\n").message
    for field in ("cpu", "memory", "scratch"):
        for zero in ("'0'", "'0m'" if field == "cpu" else "0Gi", "0.0"):
            p = _problem(f"resources: {{{field}: {zero}}}\n")
            assert p.where == f"resources.{field}" and "0" in p.message and "zero" in p.message


def test_numbers_are_quantities_as_kubernetes_reads_them():
    s = load_spec_text(MINIMAL + "resources: {cpu: 4, memory: 34359738368, scratch: 100Gi}\n")
    assert (s.resources.cpu, s.resources.memory) == ("4", "34359738368")
    assert s.spec_hash() == load_spec_text(MINIMAL + "resources: {cpu: '4', memory: '34359738368'}\n").spec_hash()
    assert load_spec_text(MINIMAL + "resources: {cpu: 0.5}\n").resources.cpu == "0.5"


def test_a_gigabyte_unit_says_which_unit_to_use():
    p = _problem("resources: {memory: 32GB}\n")
    assert p.where == "resources.memory" and "write 32Gi" in p.message and "pattern" not in p.message


def test_an_inverted_length_band_is_an_error():
    p = _problem("eval: {length_bands: {short: [40, 1]}}\n")
    assert p.where == "eval.length_bands.short" and "[40, 1]" in p.message


def test_yaml_booleans_where_a_word_was_meant():
    s = load_spec_text(MINIMAL + "data: {pii: off, long_sentences: off}\n")
    assert (s.data.pii, s.data.long_sentences) == ("off", "off")
    assert load_spec_text(MINIMAL + "data: {pii: on}\n").data.pii == "redact"
    p = _problem("data: {long_sentences: on}\n")
    assert "YAML reads a bare on/yes as true" in p.fix
    p = _problem("quantization: {mode: off}\n")
    assert "YAML reads a bare off/no as false" in p.fix and "write one of the values above" in p.fix


def test_a_tab_in_yaml_is_named():
    with pytest.raises(SpecError) as err:
        load_spec_text("name: x\nbase_model:\n\turi: s3://models/m/\n")
    p = err.value.problems[0]
    assert p.where == "line 3" and "tab" in p.message and "spaces" in p.fix


def test_validation_equal_to_train_is_a_leakage_warning():
    s = load_spec_text(MINIMAL.replace("{train: s3://data/train.jsonl}",
                                       "{train: s3://data/train.jsonl, validation: s3://data/train.jsonl}"))
    (p,) = [a for a in s.advice() if a.where == "dataset.validation"]
    assert "leakage" in p.message and p.line == 3
    s = load_spec_text(MINIMAL.replace("{train: s3://data/train.jsonl}", "{train: d/t.jsonl, validation: ./d/t.jsonl}"))
    assert any(a.where == "dataset.validation" for a in s.advice())


# ---------------------------------------------------------------------------- training.packing was removed

def test_packing_false_is_an_error_that_says_the_job_always_packs():
    p = _problem("training: {packing: false}\n")
    assert p.where == "training.packing" and p.line == 5 and "was removed" in p.message and "delete" in p.message


def test_packing_true_is_a_warning_and_changes_no_hash():
    plain, written = load_spec_text(MINIMAL), load_spec_text(MINIMAL + "training: {packing: true}\n")
    assert [a.where for a in written.advice()] == ["training.packing"]
    assert (written.spec_hash(), written.training_hash()) == (plain.spec_hash(), plain.training_hash())
    # the hashes every spec had while the field existed (its `true` was in them): no Job renamed, no checkpoint
    # orphaned (tests/unit/golden/spec_hashes.yaml holds those of every committed spec)
    assert (plain.spec_hash(), plain.training_hash()) == ("15605a035b", "ac563f65f1")
    assert "packing" not in plain.model_dump(mode="json")["training"]  # not in the ConfigMap
    assert "training.packing" not in {path for path, _, _ in field_docs()}
