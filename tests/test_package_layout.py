"""The project's packages depend in one direction: a package imports only packages of lower layers.

The layers, lowest first (``LAYERS``):

    config < distributed < model < data < engines < training < checkpoint
           < convert < inference < codeeval < planner < {train, evaluate, evaluate_code, generate} < testing

config is the schema, parsing and validation, and reads nothing but the YAML; the explicit step that opens a
config's tokenizer, data files and DeepSpeed JSON is in train.py (``resolve_run_inputs``). Above checkpoint the
order is the one the code has: convert reads checkpoints, inference decodes converted weights, codeeval completes
and scores code tasks with the decoder, the planner builds models on the meta device, the entry points (train.py,
evaluate.py, evaluate_code.py, generate.py: peers, none imports another) use any of those, and testing (helpers for
the tests) may use anything. Test-only code lives in tests/.

Two checks: every ``import`` of the package, at the top of a module or inside a function, read from the source
(``test_imports_go_down_the_layers``); and, in a fresh interpreter, importing every module of each layer in
order never loads a package of a higher layer (``test_importing_a_layer_loads_no_higher_layer``), which also
catches imports the source does not spell out. A package missing from ``LAYERS`` is an error.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "mtp_megatron")

LAYERS: List[Tuple[str, ...]] = [
    ("config",),
    ("distributed",),
    ("model",),
    ("data",),
    ("engines",),
    ("training",),
    ("checkpoint",),
    ("convert",),
    ("inference",),
    ("codeeval",),
    ("planner",),
    ("train", "evaluate", "evaluate_code", "generate"),
    ("testing",),
]
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}

def _present() -> List[str]:
    """The top-level packages and modules of mtp_megatron on disk (a folder without ``__init__.py`` counts: it is
    a namespace package)."""
    names = []
    for entry in sorted(os.listdir(PACKAGE)):
        path = os.path.join(PACKAGE, entry)
        if entry.endswith(".py") and entry != "__init__.py":
            names.append(entry[:-3])
        elif os.path.isdir(path) and any(f.endswith(".py") for f in os.listdir(path)):
            names.append(entry)
    return names


def _modules(name: str) -> List[str]:
    """The source files of top-level package or module ``name``, relative to the repository."""
    path = os.path.join(PACKAGE, name)
    if not os.path.isdir(path):
        return [os.path.relpath(f"{path}.py", REPO)]
    found = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        found += [os.path.relpath(os.path.join(folder, f), REPO) for f in sorted(files) if f.endswith(".py")]
    return found


def _imported_names(node: ast.AST, module: str) -> List[str]:
    """Dotted module names an import statement names (relative ones resolved against ``module``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            is_package = module.endswith("__init__")
            anchor = parts[: len(parts) - node.level + (1 if is_package else 0)]
            anchor = [p for p in anchor if p != "__init__"]
            base = ".".join(anchor + ([base] if base else []))
        if base == "mtp_megatron":  # from mtp_megatron import config, train
            return [f"mtp_megatron.{alias.name}" for alias in node.names]
        return [base]
    return []


def _package_imports(rel_path: str) -> List[Tuple[int, str, str]]:
    """(line, imported top-level package, imported module) for every mtp_megatron import in a file."""
    with open(os.path.join(REPO, rel_path)) as f:
        tree = ast.parse(f.read(), rel_path)
    module = rel_path[:-3].replace(os.sep, ".")
    found = []
    for node in ast.walk(tree):
        for name in _imported_names(node, module):
            parts = name.split(".")
            if parts[0] == "mtp_megatron" and len(parts) > 1:
                found.append((node.lineno, parts[1], name))
    return found


def _check(violations: Dict[str, List[str]]) -> None:
    if violations:
        pytest.fail("imports that go up the layers:\n" + "\n".join(f for found in violations.values() for f in found))


def test_every_package_has_a_layer():
    missing = [name for name in _present() if name not in LAYER]
    assert not missing, f"mtp_megatron/{missing}: add them to LAYERS in {os.path.relpath(__file__, REPO)}"


def test_imports_go_down_the_layers():
    violations: Dict[str, List[str]] = {}
    for name in _present():
        if name not in LAYER:
            continue  # test_every_package_has_a_layer says it
        for rel_path in _modules(name):
            for line, target, module in _package_imports(rel_path):
                if target == name or target not in LAYER or LAYER[target] < LAYER[name]:
                    continue  # within the package, a module (mtp_megatron.__init__), or a lower layer
                violations.setdefault(name, []).append(
                    f"{rel_path}:{line}: imports {module} (layer {target!r} is not below {name!r})")
    _check(violations)


# Run in a fresh interpreter: imports every module of each layer in order and reports, per package, the packages
# of its own or higher layers that importing its modules loaded (new in sys.modules; one loaded earlier is not
# counted again).
_IMPORT_IN_ORDER = r"""
import importlib, json, pkgutil, sys, warnings
warnings.simplefilter("ignore")
layers, present = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
level = {name: i for i, names in enumerate(layers) for name in names}


def loaded():
    return {m.split(".")[1] for m in list(sys.modules) if m.startswith("mtp_megatron.")}


loaded_above = {}
for names in layers:
    for name in names:
        if name not in present:
            continue
        before = loaded()
        package = importlib.import_module(f"mtp_megatron.{name}")
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), f"mtp_megatron.{name}."):
            importlib.import_module(info.name)
        above = sorted(p for p in loaded() - before if p in level and p != name and level[p] >= level[name])
        if above:
            loaded_above[name] = above
print(json.dumps(loaded_above))
"""


def test_importing_a_layer_loads_no_higher_layer():
    """Modules are imported, not run: megatron-core is imported (about 10 s on 2 cores), nothing is started."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_IN_ORDER, json.dumps(LAYERS), json.dumps(_present())],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    loaded_above = json.loads(result.stdout.strip().splitlines()[-1])
    _check({name: [f"importing mtp_megatron.{name} loads mtp_megatron.{', mtp_megatron.'.join(above)}"]
            for name, above in loaded_above.items()})
