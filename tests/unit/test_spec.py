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
