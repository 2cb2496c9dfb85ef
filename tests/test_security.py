"""Nothing a user gives is run as code unless the config names it: a scan of hpcprune/ and a live check.

The scan reads the syntax trees of every module: no unpickling (pickle/dill/cloudpickle/marshal/
shelve loads, numpy with allow_pickle), no `torch.load` without `weights_only=True`, no `yaml.load`
without a safe loader (SafeLoader, or a class of the module built only on safe loaders), no
eval/exec/compile. The live check starts the real CLI with a module on the path that leaves a trace
when imported, and shows that only a config naming it imports it.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from tests.helpers import CONFIGS, ROOT, run_cli

PACKAGE = ROOT / "hpcprune"
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
# The one name from those modules that reads nothing: the exception that says "refused".
HARMLESS = {"UnpicklingError"}
CODE_RUNNERS = {"eval", "exec", "compile", "__import__"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def dotted(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain, "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((item.value for item in call.keywords if item.arg == name), None)


def is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def safe_local_loaders(tree: ast.Module) -> set[str]:
    """Loader classes defined in the module whose every base is a safe loader (one that only adds checks)."""
    safe: set[str] = set()
    classes = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    grew = True
    while grew:  # a subclass of a safe local subclass is safe too
        grew = False
        for node in classes:
            bases = {dotted(base).split(".")[-1] for base in node.bases}
            if node.name not in safe and bases and bases <= SAFE_YAML_LOADERS | safe:
                safe.add(node.name)
                grew = True
    return safe


def findings(source: str, filename: str) -> list[str]:
    """Every unsafe construct in `source`, as "file:line: what"."""
    problems = []
    tree = ast.parse(source, filename)
    safe_loaders = SAFE_YAML_LOADERS | safe_local_loaders(tree)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            problems += [f"{where}: from {node.module} import {alias.name}" for alias in node.names if alias.name not in HARMLESS]
        elif isinstance(node, ast.Attribute) and dotted(node.value).split(".")[-1] in UNPICKLERS and node.attr not in HARMLESS:
            problems.append(f"{where}: {dotted(node)}")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in CODE_RUNNERS:
                problems.append(f"{where}: {name}()")
            if name.split(".")[-1] == "load" and name.split(".")[0] in {"torch", "th"} and not is_true(keyword(node, "weights_only")):
                problems.append(f"{where}: {name}() without weights_only=True")
            if name in {"yaml.load", "yaml.load_all"} and dotted(keyword(node, "Loader") or ast.Constant(None)).split(".")[-1] not in safe_loaders:
                problems.append(f"{where}: {name}() without a safe Loader")
            if name in {"yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"}:
                problems.append(f"{where}: {name}()")
            if name.split(".")[-1] in {"load", "loads"} and name.split(".")[0] in {"np", "numpy"} and is_true(keyword(node, "allow_pickle")):
                problems.append(f"{where}: {name}(allow_pickle=True)")
    return problems


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(open('x', 'rb'))",
    "from pickle import loads",
    "import dill\ndill.loads(b'')",
    "import torch\ntorch.load('x')",
    "import torch\ntorch.load('x', weights_only=False)",
    "import yaml\nyaml.load('a: 1', Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load('a: 1')",
    "import yaml\nclass Strict(yaml.Loader):\n    pass\nyaml.load('a: 1', Loader=Strict)",
    "import yaml\nclass Mixed(yaml.SafeLoader, yaml.UnsafeLoader):\n    pass\nyaml.load('a: 1', Loader=Mixed)",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "eval(text)",
    "exec(text)",
])
def test_the_scan_finds_each_unsafe_construct(snippet):
    assert findings(snippet, "snippet.py"), snippet


@pytest.mark.parametrize("snippet", [
    "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
    "import torch\ntorch.load('x', map_location='cpu', weights_only=True)",
    "import yaml\nyaml.safe_load('a: 1')\nyaml.load('a: 1', Loader=yaml.SafeLoader)",
    "import yaml\nclass Strict(yaml.SafeLoader):\n    pass\nclass Stricter(Strict):\n    pass\nyaml.load('a: 1', Loader=Stricter)",
    "model.eval()",
])
def test_the_scan_lets_safe_code_pass(snippet):
    assert findings(snippet, "snippet.py") == []


def test_hpcprune_never_unpickles_or_runs_user_text():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10
    problems = [problem for module in modules for problem in findings(module.read_text(), str(module.relative_to(ROOT)))]
    assert problems == []


MARKER_MODULE = '''
import os
from pathlib import Path

Path(os.environ["HPCPRUNE_TEST_MARKER"]).write_text("imported")

from torch import nn


def build(in_channels=1, num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))
'''


@pytest.fixture
def marker_module(tmp_path) -> tuple[dict, Path]:
    """A module `tracemodel` on PYTHONPATH that writes $HPCPRUNE_TEST_MARKER when imported."""
    (tmp_path / "tracemodel.py").write_text(MARKER_MODULE)
    marker = tmp_path / "imported"
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "HPCPRUNE_TEST_MARKER": str(marker)}, marker


def test_user_model_code_is_imported_only_when_the_config_names_it(marker_module, tmp_path):
    env, marker = marker_module
    reference = ("prune", "--config", str(CONFIGS / "oneshot_global.yaml"), "-q")
    without = run_cli(*reference, "--out", str(tmp_path / "builtin.h5"), env=env)
    assert without.returncode == 0, without.stderr
    assert not marker.exists()
    shown = run_cli("inspect", str(tmp_path / "builtin.h5"), env=env)
    assert shown.returncode == 0 and not marker.exists()

    named = run_cli(*reference, "--out", str(tmp_path / "user.h5"), "--set", "model.name=tracemodel:build", env=env)
    assert named.returncode == 0, named.stderr
    assert marker.read_text() == "imported"  # the same set-up does import it once the config names it
