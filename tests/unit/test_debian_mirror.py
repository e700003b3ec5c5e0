"""The base image's Debian mirror comes from the machine's own apt configuration (hack/base-image.sh),
never from a URL written into the repository."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (a Debian machine)")]

REPO = Path(__file__).resolve().parents[2]


def _mirror(tmp_path: Path, sources: str, suite: str = "bookworm", env_mirror: str | None = None) -> str:
    parts = tmp_path / "sources.list.d"
    parts.mkdir(exist_ok=True)
    (parts / "test.sources").write_text(sources)
    (tmp_path / "lists").mkdir(exist_ok=True)
    conf = tmp_path / "apt.conf"
    conf.write_text(f'Dir::Etc::sourcelist "/dev/null";\nDir::Etc::sourceparts "{parts}";\n'
                    f'Dir::State::lists "{tmp_path / "lists"}";\n')
    fn = subprocess.run(["sed", "-n", "/^debian_mirror()/,/^}/p", str(REPO / "hack" / "base-image.sh")],
                        capture_output=True, text=True, check=True).stdout
    assert fn.strip(), "hack/base-image.sh has no debian_mirror function"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "APT_CONFIG": str(conf), "DEBIAN_SUITE": suite}
    if env_mirror:
        env["DEBIAN_MIRROR"] = env_mirror
    out = subprocess.run(["bash", "-c", fn + "\ndebian_mirror"], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


DEB822 = """Types: deb
URIs: http://security.mirror.internal.test/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://mirror.internal.test/debian/
Suites: bookworm bookworm-updates
Components: main contrib
"""


def test_the_mirror_of_the_suites_main_component_is_used(tmp_path):
    assert _mirror(tmp_path, DEB822) == "http://mirror.internal.test/debian"


def test_another_suite_on_the_machine_still_names_its_mirror(tmp_path):
    assert _mirror(tmp_path, DEB822, suite="trixie") == "http://mirror.internal.test/debian"


def test_debian_mirror_in_the_environment_wins(tmp_path):
    assert _mirror(tmp_path, DEB822, env_mirror="http://override.internal.test/debian") == \
        "http://override.internal.test/debian"


def test_no_debian_source_gives_nothing_so_the_script_says_how_to_set_one(tmp_path):
    only_security = DEB822.split("\n\n")[0] + "\n"
    assert _mirror(tmp_path, only_security) == ""
    script = (REPO / "hack" / "base-image.sh").read_text()
    assert "set DEBIAN_MIRROR to a Debian mirror URL" in script


def test_no_mirror_url_is_pinned_in_the_repository():
    assert "DEBIAN_MIRROR=" not in (REPO / "hack" / "versions.env").read_text()
