"""Loading a spec: YAML text or a file (bounded: size, depth, aliases, duplicate keys), ``--set`` overrides,
validation, and every problem at once with its field path and YAML line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobs.errors import Problem, SpecError
from jobs.spec.base import FieldPath, _section_model
from jobs.spec.run import TrainingRunSpec
from jobs.spec.secret import _short, secret_kind

_FIXES = {
    "extra_forbidden": "remove it, or check its spelling against `launcher validate --explain`",
    "missing": "add it",
    "greater_than_equal": None,
    "less_than_equal": None,
}


#: A spec is a few hundred values; anything past this is a mistake or a YAML alias bomb.
MAX_SPEC_NODES = 20_000
MAX_SPEC_DEPTH = 64


def _yaml_lines(text: str) -> dict[FieldPath, int]:
    """Map field paths to 1-based line numbers in a YAML document.

    Each node is visited once (aliases are not followed twice) and the walk is bounded,
    so a 'billion laughs' document costs no more than its own size.
    """
    import yaml

    try:
        root = yaml.compose(text, Loader=_safe_loader_class())
    except (yaml.YAMLError, RecursionError):
        return {}
    out: dict[FieldPath, int] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, FieldPath]] = [(root, ())] if root is not None else []
    while stack and len(out) < MAX_SPEC_NODES:
        node, path = stack.pop()
        out.setdefault(path, node.start_mark.line + 1)
        if id(node) in seen or len(path) > MAX_SPEC_DEPTH:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k.start_mark.line)
                out.setdefault(path + (key,), k.start_mark.line + 1)
                stack.append((v, path + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                stack.append((v, path + (i,)))
    return out


def _deep_line(text: str) -> int:
    """The first line where flow brackets nest past MAX_SPEC_DEPTH (1 if none does)."""
    depth = 0
    for n, line in enumerate(text.splitlines(), 1):
        for ch in line:
            depth += ch in "[{"
            depth -= ch in "]}"
            if depth > MAX_SPEC_DEPTH:
                return n
    return 1


def _too_big(data: Any) -> str | None:
    """Why a parsed spec is too large or too deep to validate, or None. Bounded work."""
    budget = MAX_SPEC_NODES
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            return f"it expands to more than {MAX_SPEC_NODES:,} values (YAML aliases?)"
        if depth > MAX_SPEC_DEPTH:
            return f"it is nested more than {MAX_SPEC_DEPTH} levels deep"
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return None


def _did_you_mean(loc: tuple[str | int, ...]) -> str | None:
    """The field name closest to an unknown key, among the fields of the section it sits in."""
    import difflib

    if not loc:
        return None
    model: Any = TrainingRunSpec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _section_model(field.annotation)
        if model is None:
            return None
    names = list(getattr(model, "model_fields", {}))
    match = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return match[0] if match else None


def problems_from_validation(err: ValidationError, lines: dict[FieldPath, int] | None = None) -> list[Problem]:
    lines = lines or {}
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after", "literal")))
        # pydantic puts union branches in the location ("str", "list[...]"): drop them.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "bool"))))
        # a key of the user's (a label name) can be the secret: the line still says where it is
        where = ".".join("(a key hidden: it looks like a secret)" if secret_kind(str(p)) else str(p)
                         for p in loc) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        fix = _FIXES.get(e["type"])
        given = e.get("input")
        if e["type"] == "literal_error" and isinstance(given, bool):
            word = "on" if given else "off"
            fix = f"YAML reads a bare {word}/{'yes' if given else 'no'} as {str(given).lower()}: "
            fix += (f"quote it ({loc[-1]}: \"{word}\")" if f"'{word}'" in str((e.get("ctx") or {}).get("expected"))
                    else "write one of the values above")
        elif e["type"] == "string_type" and isinstance(given, (int, float)) and not isinstance(given, bool):
            fix = f"quote it: \"{given}\""
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
            guess = _did_you_mean(loc)
            if guess:
                fix = f"did you mean '{guess}'? Otherwise remove it (see `launcher validate --explain`)"
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        problems.append(Problem(where=where, message=msg, fix=fix, line=line))
    # The same location can fail in several union branches; keep the first.
    seen, unique = set(), []
    for p in problems:
        if p.where not in seen:
            seen.add(p.where)
            unique.append(p)
    return unique


def parse_spec(data: Any, *, source: str | None = None, lines: dict[FieldPath, int] | None = None) -> TrainingRunSpec:
    """Validate a parsed spec; raise :class:`SpecError` listing every problem."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError([Problem("(spec)", f"expected a mapping of fields, got {got}",
                                 "start from examples/spec.yaml")], source)
    try:
        return TrainingRunSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(problems_from_validation(err, lines), source) from None


def _safe_loader_class() -> Any:
    """PyYAML's SafeLoader on libyaml where PyYAML was built with it (the same documents, ~20x faster: a
    10 MB scalar took 11 s in the pure-Python scanner), else the pure-Python one."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _unique_key_loader() -> Any:
    """A SafeLoader that refuses duplicate keys: with plain YAML the last one silently wins."""
    import yaml

    UniqueKeyLoader: Any = type("UniqueKeyLoader", (_safe_loader_class(),), {})

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{_short(key)}' (first on line {first})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def load_spec_text(text: str, source: str | None = None, overrides: list[str] | None = None) -> TrainingRunSpec:
    """Parse and validate a YAML spec; ``overrides`` are ``key.path=value`` items (``--set``)."""
    import yaml

    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except (RecursionError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        # too deep: the pure-Python parser recurses out, libyaml stops at its own nesting bound
        if isinstance(err, RecursionError) or "nesting depth" in str(problem):
            line = line or _deep_line(text)
            raise SpecError([Problem(f"line {line}", "nested more deeply than the YAML parser can follow",
                                     "a spec is a few levels deep; check for runaway brackets", line=line)],
                            source) from None
        fix = "keep one of them" if "duplicate key" in str(problem) else "check indentation and quoting on that line"
        source_line = text.splitlines()[line - 1] if line and line <= len(text.splitlines()) else ""
        if "'\\t'" in str(problem) or "\t" in source_line[: len(source_line) - len(source_line.lstrip())]:
            problem, fix = "a tab character", "YAML indents with spaces only: replace the tab with spaces"
        raise SpecError([Problem(f"line {line}" if line else "(yaml)", f"not valid YAML: {problem}", fix)],
                        source) from None
    why = _too_big(data)
    if why:
        raise SpecError([Problem("(spec)", f"too large to be a spec: {why}",
                                 "write the values out; a spec needs no anchors or deep nesting")], source)
    if overrides:
        data = apply_overrides(data, overrides)
    lines = _yaml_lines(text)
    spec = parse_spec(data, source=source, lines=lines)
    spec._lines = lines
    return spec


#: A spec is a page of YAML; anything this large is another file named by mistake (or /dev/zero).
MAX_SPEC_BYTES = 16 * 2**20


def load_spec(path: str | Path, overrides: list[str] | None = None) -> TrainingRunSpec:
    import stat

    p = Path(path)
    try:
        st = p.stat()  # before opening: opening a FIFO would block until someone writes to it
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else \
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
            raise SpecError([Problem(str(p), f"is {kind}, not a spec file", "name the spec's YAML file")])
        with open(p, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError([Problem(str(p), f"is larger than {MAX_SPEC_BYTES // 2**20} MiB: not a spec",
                                     "name the spec's YAML file (a spec is a page of YAML)")])
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise SpecError([Problem(str(p), "file not found", "check the path")]) from None
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SpecError([Problem(f"line {line}", f"not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x})",
                                 "save the spec as UTF-8", line=line)], source=str(p)) from None
    except OSError as err:
        raise SpecError([Problem(str(p), f"cannot be read: {err.strerror}", "check permissions")]) from None
    return load_spec_text(text, source=str(p), overrides=overrides)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars) to a raw spec mapping."""
    import copy

    import yaml

    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(f"--set {_short(item)}", "expected key.path=value",
                                    "e.g. --set training.epochs=2"))
            continue
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            problems.append(Problem(f"--set {item}", "empty key", "e.g. --set training.epochs=2"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    if problems:
        raise SpecError(problems)
    return data
