"""The floors of hpcprune/: contracts kept, no import cycle, short modules, names that say what they are.

    python -m pytest tests/test_layers.py
"""

from __future__ import annotations

import ast
import graphlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcprune import registry
from tests.helpers import ROOT

PACKAGE = ROOT / "hpcprune"
MAX_LINES = 400


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is not installed (pip install import-linter): the floors would go unchecked")
    return subprocess.run([lint, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_lint_imports_keeps_every_contract():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("module, upward", [
    ("prune/plan.py", "from hpcprune.run import pipeline"),  # a floor reaching up to the pipelines
    ("config/sections.py", "import torch"),  # config must validate names without torch
])
def test_an_upward_import_breaks_the_contracts(tmp_path, module, upward):
    """The contracts can fail: the same tree with one import added upward (inside a function, as
    late imports are written) is refused."""
    shutil.copytree(PACKAGE, tmp_path / "hpcprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "hpcprune" / module, "a") as file:
        file.write(f"\n\ndef _reaches_up():\n    {upward}\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout + done.stderr


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The hpcprune modules `path` imports anywhere in its body (function-level imports included)."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # A module's own package is imported before it anyway: not an edge of the graph.
            if name and name != "hpcprune" and name != this and not this.startswith(name + "."):
                found.add(name)
    return found


def test_no_import_cycle_among_hpcprune_modules():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in files}
    graph = {module_name(path): imported_modules(path, modules) for path in files}
    assert sum(len(targets) for targets in graph.values()) > 100  # the graph was really read
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")
    assert set(order) == modules


def test_no_module_is_long_or_named_like_the_standard_library():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"
        assert path.stem == "__init__" or path.stem == "__main__" or path.stem not in sys.stdlib_module_names, (
            f"{path.relative_to(ROOT)} shadows the standard library's {path.stem}")


def test_every_floor_says_what_it_holds_and_what_it_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "What lives here" in doc and "import" in doc, f"{init.relative_to(ROOT)} does not say it"


def test_the_registry_names_exactly_what_the_code_implements():
    from hpcprune.prune.calibrate import NEEDS
    from hpcprune.prune.channels import CHANNEL_CRITERIA, CHANNEL_RULES
    from hpcprune.prune.rules import RULES
    from hpcprune.prune.schedule import SCHEDULES
    from hpcprune.prune.scoring import CRITERIA
    from hpcprune.prune.sequential.methods import METHODS

    assert set(registry.WEIGHT_CRITERIA) == set(CRITERIA)
    assert set(registry.CHANNEL_CRITERIA) == set(CHANNEL_CRITERIA)
    assert set(registry.CALIBRATED_CRITERIA) == {name for name, needs in NEEDS.items() if needs}
    assert set(registry.WEIGHT_RULES) == set(RULES)
    assert set(registry.CHANNEL_RULES) == set(CHANNEL_RULES)
    assert set(registry.SCHEDULES) == set(SCHEDULES)
    assert set(registry.BLOCK_CRITERIA) == set(METHODS)
    assert set(registry.BLOCK_CALIBRATED) == {name for name, method in METHODS.items() if method.statistics}
    assert set(registry.CHANNEL_SCHEDULES) <= set(SCHEDULES)
    for module_and_class, _ in registry.FANOUT_BACKENDS.values():
        module, _, attribute = module_and_class.partition(":")
        assert (PACKAGE / Path(*module.split(".")[1:])).with_suffix(".py").is_file(), module
        assert f"class {attribute}(" in (PACKAGE / Path(*module.split(".")[1:])).with_suffix(".py").read_text()
