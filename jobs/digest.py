"""Content digests both sides agree on: a file's sha256 (the manifest, `launcher artifacts`) and a model
folder's (the base model's identity in a version's manifest)."""
from __future__ import annotations

import hashlib
from pathlib import Path

MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja", ".tiktoken")


def hash_dir(path: str | Path, suffixes: tuple[str, ...] = MODEL_FILE_SUFFIXES) -> str:
    """sha256 over (relative name, content) of the model files in a folder, in name order."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name.endswith(suffixes)):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
