"""Spec text for the unit tests that write a spec as YAML (a helper module: no tests here)."""
from __future__ import annotations


def minimal_spec(name: str = "support-bot") -> str:
    """The fields every spec needs (name, base model, training data, output) and no other, in block style on six
    lines: a test appends what it is about, whose line numbers then start at 7."""
    return (f"name: {name}\n"
            "base_model:\n"
            "  uri: s3://models/smollm2/\n"
            "dataset:\n"
            "  train: s3://data/train.jsonl\n"
            "output: s3://runs/lora\n")
