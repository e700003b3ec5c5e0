"""The layers hold at run time: importing the contract (every module of jobs/*.py, jobs/dataprep/ and jobs/spec/)
loads no trainer, torch, transformers, peft, kubernetes, typer or rich, and importing the launcher's CLI loads no torch.
lint-imports (pyproject.toml's [tool.importlinter]) checks the same from the source; this proves what a process
really loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
#: Every module of the contract: jobs/*.py but the entrypoint shim (python -m jobs starts the trainer), and the
#: packages jobs/dataprep/ (the data rules) and jobs/spec/ (the spec model; its __main__ prints the reference doc).
CONTRACT = sorted([f"jobs.{p.stem}" for p in (REPO / "jobs").glob("*.py") if p.stem not in ("__init__", "__main__")]
                  + [f"jobs.{pkg}" for pkg in ("dataprep", "spec")]
                  + [f"jobs.{pkg}.{p.stem}" for pkg in ("dataprep", "spec") for p in (REPO / "jobs" / pkg).glob("*.py")
                     if p.stem not in ("__init__", "__main__")])


def _loaded_after(imports: list[str], watch: set[str]) -> str:
    """What of ``watch`` (top-level packages) and of jobs.trainer a fresh process holds after ``imports``."""
    code = (f"import sys\nimport {', '.join(imports)}\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(watch)!r})), "
            "sorted(m for m in sys.modules if m.startswith('jobs.trainer')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_contract_loads_no_trainer_and_no_heavy_or_cli_package():
    assert {"jobs.spec", "jobs.errors", "jobs.storage", "jobs.publish", "jobs.progress", "jobs.dataprep",
            "jobs.cost", "jobs.serving", "jobs.digest"} <= set(CONTRACT)
    heavy = {"torch", "transformers", "peft", "kubernetes", "typer", "rich"}
    assert _loaded_after(CONTRACT, heavy) == "[] []"


def test_the_launcher_cli_loads_no_torch():
    assert _loaded_after(["launcher.cli"], {"torch", "transformers", "peft"}) == "[] []"
