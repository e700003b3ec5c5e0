"""What the image tests share: the image names (from pyproject's version) and the Docker client."""
from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _version() -> str:
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError("no version in pyproject.toml")


VERSION = _version()
TRAINER = f"lora-jobs/trainer:{VERSION}"
LAUNCHER = f"lora-jobs/launcher:{VERSION}"
# The BuildKit-capable client (hack/build-images.sh says why).
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")
