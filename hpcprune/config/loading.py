"""A YAML file plus `--set a.b=c` overrides become one validated `RunConfig`.

    hpcprune prune --config configs/quickstart.yaml --set prune.sparsity=0.8

Validation is pydantic's: unknown keys, wrong types and out-of-range values are refused with a
one-line `UsageError` that names the file and the dotted key. YAML itself lets a later key silently
replace an earlier one of the same name; here a key or section given twice is refused, since one of
the two settings the user wrote would otherwise be ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hpcprune.config.schema import RunConfig
from hpcprune.errors import UsageError


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read `path` (None: all defaults), apply `key.sub=value` overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    tree = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        _apply_override(tree, override)
    return validate_tree(tree, source)


def load_config_text(text: str, source: str) -> RunConfig:
    """Validate a config held as YAML text (e.g. the copy stored in an archive)."""
    return validate_tree(_parse_yaml(text, source), source)


def validate_tree(tree: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise UsageError(f"{source}: {_first_problem(error)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read config {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"config {path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})") from None
    return _parse_yaml(text, str(path))


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping (the YAML is well formed; the config is ambiguous)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a mapping naming one key twice is an error instead of last-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader)
    except _DuplicateKey as error:
        raise UsageError(f"{source}: line {error.problem_mark.line + 1}: {error.problem}; keep one of them") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]  # e.g. a control character
        raise UsageError(f"{source}:{line} malformed YAML ({reason})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UsageError(f"{source}: the top level must be a mapping of sections, not {type(tree).__name__}")
    return tree


def _apply_override(tree: dict[str, Any], override: str) -> None:
    """`a.b.c=value` sets tree['a']['b']['c']; the value is parsed as YAML (1e-3, true, [a, b])."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {override!r}: expected key.path=value")
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise UsageError(f"--set {key}: value {raw!r} is not valid YAML") from None


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    key = ".".join(str(part) for part in problem["loc"]) or "<top level>"
    message = problem["msg"].removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    given = problem.get("input")
    shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
    return f"{key}: {message}{shown}"
