"""Unit tests see launcher settings from defaults only: no LAUNCHER_* variables, no user config file."""
import os

import pytest


@pytest.fixture(autouse=True)
def clean_launcher_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("LAUNCHER_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))
