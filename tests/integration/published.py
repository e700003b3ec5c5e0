"""What the end-to-end tests check of a published version, in one place."""
from __future__ import annotations

REQUIRED = ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/config.json",
            "tokenizer/tokenizer.json", "metadata.json", "data_report.json", "eval_report.json",
            "eval_report.md", "loss_curve.png", "manifest.json", "_COMPLETE")


def assert_complete_v1(store, run_prefix: str) -> set[str]:
    """v1 is `latest`, verifies against its manifest and marker, and holds every artifact; returns its keys."""
    from jobs.publish import verify_version

    assert store.get_bytes(f"{run_prefix}/latest").decode().strip() == "v1"
    assert verify_version(store, run_prefix, "v1") == [], "every file matches manifest.json and the marker"
    keys = {o.key[len(run_prefix) + 4:] for o in store.list(f"{run_prefix}/v1/")}
    for needed in REQUIRED:
        assert needed in keys, f"{needed} missing from the published version"
    return keys
