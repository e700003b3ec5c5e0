"""training.method and training.beta: validation names the field and the fix, advice is a warning, SFT specs keep
their hash and their rendered spec; `launcher data check` reads pairs when the spec, --method or the file says."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.errors import SpecError
from jobs.spec import load_spec_text
from launcher import cli
from launcher.render import spec_yaml
from spec_texts import minimal_spec

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
BASE = minimal_spec("prefs")


def spec(training: str = "", extra: str = ""):
    return load_spec_text(BASE + ("training:\n" + training if training else "") + extra)


def problems(training: str, extra: str = "") -> list[str]:
    with pytest.raises(SpecError) as err:
        spec(training, extra)
    return [p.render() for p in err.value.problems]


# ---------------------------------------------------------------------------- the fields

def test_method_defaults_to_sft_and_beta_resolves_to_the_methods_default():
    assert spec().training.method == "sft" and spec().training.beta is None
    assert spec("  method: dpo\n").training.preference_beta() == 0.1
    assert spec("  method: orpo\n").training.preference_beta() == 0.1
    assert spec("  method: dpo\n  beta: 0.25\n").training.preference_beta() == 0.25
    with pytest.raises(ValueError, match="sft has no preference beta"):
        spec().training.preference_beta()


@pytest.mark.parametrize("training, expected", [
    ("  method: ppo\n", "training.method (line 8): 'ppo' is not a training method: write sft, dpo or orpo (others, "
                        "such as KTO"),
    ("  method: DPO\n", "training.method (line 8): 'DPO' is not a training method: write sft, dpo or orpo "
                        "(lowercase)"),
    ("  method: 1\n", "training.method (line 8): Input should be 'sft', 'dpo' or 'orpo'"),
    ("  method: dpo\n  beta: 0\n", "training.beta (line 9): 0 is not above 0: beta scales the preference term"),
    ("  method: dpo\n  beta: -0.1\n", "training.beta (line 9): -0.1 is not above 0"),
    ("  method: dpo\n  beta: .nan\n", "training.beta (line 9): Input should be a finite number"),
    ("  method: orpo\n  beta: yes\n", "training.beta (line 9): is a YAML boolean"),
    ("  beta: 0.1\n", "training.beta (line 8): is only read by training.method dpo or orpo, and the method is sft: "
                      "set training.method: dpo (or orpo), or delete the beta line"),
])
def test_bad_values_name_the_field_its_line_and_the_fix(training, expected):
    assert any(p.startswith(expected) for p in problems(training)), problems(training)


def test_an_sft_data_format_with_a_preference_method_is_an_error_saying_what_to_set():
    (p,) = problems("  method: dpo\n", "data:\n  format: messages\n")
    assert "data.format 'messages' names a format of SFT rows" in p and "set data.format: auto" in p


# ---------------------------------------------------------------------------- advice

def advice(training: str) -> dict[str, str]:
    return {p.where: p.message + " — " + (p.fix or "") for p in spec(training).advice()}


def test_dpo_advice_has_its_own_beta_and_learning_rate_ranges():
    assert advice("  method: dpo\n  learning_rate: 1.0e-5\n") == {}
    got = advice("  method: dpo\n  beta: 0.005\n  learning_rate: 2.0e-4\n")
    assert got["training.beta"].startswith("0.005 is outside the range advised for dpo 0.01-0.5")
    assert "Rafailov et al. 2023" in got["training.beta"]
    assert got["training.learning_rate"].startswith("0.0002 is outside the range advised for dpo 5e-06-5e-05")
    assert "TRL's DPOConfig defaults to 1e-6" in got["training.learning_rate"]
    assert "training.beta" in advice("  method: dpo\n  beta: 0.8\n  learning_rate: 1.0e-5\n")


def test_orpo_advice_reads_beta_as_lambda():
    assert advice("  method: orpo\n  beta: 0.5\n  learning_rate: 1.0e-5\n") == {}
    got = advice("  method: orpo\n  beta: 2\n  learning_rate: 1.0e-5\n")
    assert got["training.beta"].startswith("2 is outside the range advised for orpo 0.05-1")
    assert "Hong et al. 2024" in got["training.beta"]


def test_sft_keeps_the_guides_learning_rate_range():
    assert advice("  learning_rate: 1.5e-4\n") == {}
    assert advice("  learning_rate: 1.0e-5\n")["training.learning_rate"].startswith(
        "1e-05 is outside the guide's 0.0001-0.0002")


# ---------------------------------------------------------------------------- hash and rendered spec

def test_sft_specs_keep_their_hash_and_rendered_spec():
    plain, explicit = spec(), spec("  method: sft\n")
    assert plain.spec_hash() == explicit.spec_hash() and plain.training_hash() == explicit.training_hash()
    assert "method" not in spec_yaml(explicit) and "beta" not in spec_yaml(explicit)


def test_a_preference_run_hashes_its_method_and_the_beta_it_trains_with():
    dpo, dpo_written = spec("  method: dpo\n"), spec("  method: dpo\n  beta: 0.1\n")
    assert dpo.spec_hash() == dpo_written.spec_hash() != spec().spec_hash()
    assert spec("  method: dpo\n  beta: 0.2\n").spec_hash() != dpo.spec_hash()
    assert spec("  method: orpo\n").spec_hash() != dpo.spec_hash()
    rendered = spec_yaml(dpo)
    assert "method: dpo" in rendered and "beta" not in rendered  # the job resolves the default itself
    assert "beta: 0.2" in spec_yaml(spec("  method: dpo\n  beta: 0.2\n"))
    # the rendered spec reads back as the same spec
    assert load_spec_text(spec_yaml(dpo_written)).spec_hash() == dpo.spec_hash()


def test_the_example_is_a_dpo_spec_whose_data_passes():
    from jobs.preference import check_pairs_file
    from jobs.spec import load_spec

    s = load_spec(REPO / "examples" / "preference" / "spec.yaml")
    assert s.training.method == "dpo" and s.dataset.validation == "heldout.jsonl"
    for name, count in (("pairs.jsonl", 208), ("heldout.jsonl", 40)):
        report = check_pairs_file(REPO / "examples" / "preference" / name, s.data, seed=s.training.seed)
        assert report["ok"] and report["valid_rows"] == report["kept_rows"] == count, report["rules"]
        assert set(report["counts"]["by_format"]) == {"preference", "preference_chat", "preference_implicit"}


# ---------------------------------------------------------------------------- launcher data check

@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i} about topic {i * 7}?", "chosen": f"Answer {i}.",
                                        "rejected": f"Go away {i}."}) + "\n" for i in range(10)))
    return path


def test_data_check_reads_a_pairs_file_as_pairs_and_says_so(pairs_file):
    r = CliRunner().invoke(cli.app, ["data", "check", str(pairs_file)])
    assert r.exit_code == 0, r.output
    assert "10 valid pairs, 10 kept" in r.stdout and "OK: a run would accept this data" in r.stdout
    assert "read as preference pairs (the file's first row has 'chosen' or 'rejected')" in r.stderr


def test_data_check_method_sft_checks_pairs_as_rows_and_names_the_fix(pairs_file):
    r = CliRunner().invoke(cli.app, ["data", "check", str(pairs_file), "--method", "sft"])
    assert r.exit_code == 1
    assert "they look like preference (10)" in r.stdout and "set training.method: dpo or orpo" in r.stdout


def test_data_check_follows_the_specs_method(pairs_file, tmp_path):
    sft_spec, dpo_spec = tmp_path / "sft.yaml", tmp_path / "dpo.yaml"
    sft_spec.write_text(BASE)
    dpo_spec.write_text(BASE + "training:\n  method: dpo\n  learning_rate: 1.0e-5\ndata:\n  min_rows: 11\n")
    assert CliRunner().invoke(cli.app, ["data", "check", str(pairs_file), "--spec", str(sft_spec)]).exit_code == 1
    r = CliRunner().invoke(cli.app, ["data", "check", str(pairs_file), "--spec", str(dpo_spec), "--json"])
    assert r.exit_code == 1  # the spec's min_rows: 11 of 10 pairs
    report = json.loads(r.stdout)
    assert report["unit"] == "pairs" and report["kept_rows"] == 10 and report["ok"] is False
    # --method wins over the spec
    r = CliRunner().invoke(cli.app, ["data", "check", str(pairs_file), "--spec", str(sft_spec), "--method", "orpo"])
    assert r.exit_code == 0, r.output


def test_data_check_explain_shows_the_preference_formats():
    r = CliRunner().invoke(cli.app, ["data", "check", "--explain"])
    assert r.exit_code == 0
    for fmt in ("preference ", "preference_chat", "preference_implicit", "identical_sides", "swapped"):
        assert fmt in r.stdout
    assert "--method" in CliRunner().invoke(cli.app, ["data", "check", "--help"]).stdout


def test_the_examples_pairs_are_what_make_pairs_writes_and_no_held_out_fact_is_trained_on():
    import importlib.util

    path = REPO / "examples" / "preference" / "make_pairs.py"
    spec_ = importlib.util.spec_from_file_location("make_pairs", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    built = module.build()
    for name, pairs in built.items():
        assert (REPO / "examples" / "preference" / name).read_text(encoding="utf-8") == module.jsonl(pairs), name

    def answers(pairs):  # the fact is the answer without the style's opening and closing words
        return {json.dumps(p["chosen"]) for p in pairs}

    facts = {answer for _, _, answer in module.FACTS}
    seen = {name: {f for f in facts if any(f in a for a in answers(pairs))} for name, pairs in built.items()}
    assert len(seen["heldout.jsonl"]) == 20 and not seen["heldout.jsonl"] & seen["pairs.jsonl"]
