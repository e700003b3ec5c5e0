"""Property tests: whatever the input, spec validation raises SpecError (with problems) or returns a spec."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.errors import SpecError
from jobs.spec import load_spec_text, parse_spec

pytestmark = pytest.mark.unit

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20), st.binary(max_size=8))
json_like = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)), max_leaves=20)

FIELDS = {
    "name": st.one_of(st.from_regex(r"[a-z0-9][-a-z0-9]{0,45}", fullmatch=True), scalars),
    "base_model": st.one_of(st.fixed_dictionaries({"uri": st.one_of(st.text(max_size=30), scalars)}), json_like),
    "dataset": st.one_of(st.fixed_dictionaries({"train": st.text(max_size=30)}), json_like),
    "output": st.one_of(st.sampled_from(["s3://b/x", "s3://B/x", "s3://bk/../x", "out", "gs://x"]), scalars),
    "lora": st.dictionaries(st.sampled_from(["rank", "alpha", "dropout", "target_modules", "extra"]), json_like,
                            max_size=4),
    "training": st.dictionaries(st.sampled_from(["epochs", "learning_rate", "gradient_accumulation_steps",
                                                 "max_steps", "precision"]), json_like, max_size=4),
    "resources": st.dictionaries(st.sampled_from(["gpus", "cpu", "memory", "scratch", "retries", "hostNetwork"]),
                                 json_like, max_size=4),
    "quantization": json_like,
    "labels": st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=12), scalars), max_size=3),
}
spec_like = st.fixed_dictionaries({}, optional=FIELDS)


def _only_spec_error(fn, *args):
    try:
        fn(*args)
    except SpecError as err:
        assert err.problems, "a SpecError must list its problems"
        assert all(p.where and p.message for p in err.problems)
        str(err)  # renders


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like)
def test_parse_spec_on_any_value_only_raises_spec_error(data):
    _only_spec_error(parse_spec, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_like)
def test_parse_spec_on_spec_shaped_mappings_only_raises_spec_error(data):
    _only_spec_error(parse_spec, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_load_spec_text_on_any_text_only_raises_spec_error(text):
    _only_spec_error(load_spec_text, text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["name: x\n", "base_model:\n", "  uri: s3://m/x\n", "dataset: {train: s3://d/t}\n",
                                 "output: s3://o/p\n", "lora: {rank: 99}\n", "\t", "- a\n", ": :\n", "&a b\n",
                                 "*a\n", "'\n", "{\n", "resources: {gpus: -1}\n"]), max_size=10))
def test_load_spec_text_on_yaml_fragments_only_raises_spec_error(parts):
    _only_spec_error(load_spec_text, "".join(parts))
