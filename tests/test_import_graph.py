"""The import rule, checked on the installed package: library modules never import the CLI, the
benchmarks or the toy world; only the CLI, the benchmarks, the toy world itself and the presets
(which name the toy world in strings, resolved by :mod:`fastdense.data`) may.

Every module of every package of the distribution is read as source (nothing is imported but
``fastdense`` itself, to find where the packages live), and every ``import`` statement in it is
checked, function-local (lazy) ones included; relative imports are resolved.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest

from fastdense.config import read_config_file  # TOML on every Python we support

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

#: Packages whose modules are not library modules (they may import anything of fastdense).
OUTSIDE_LIBRARY = ("fastdense.cli", "fastdense.benchmarks", "fastdense.toy", "fastdense.presets", "fastdense.__main__")
#: What a library module must never import.
FORBIDDEN = ("fastdense.cli", "fastdense.benchmarks", "fastdense.toy")
#: (importing module, imported module) -> why it is allowed. Empty: no exceptions.
ALLOWED: dict[tuple[str, str], str] = {}


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def installed_modules() -> dict[str, Path]:
    """Module name -> source file, for every package the distribution declares, found where the
    installed package resolves it (``importlib.util.find_spec``)."""
    packages = read_config_file(PYPROJECT)["tool"]["setuptools"]["packages"]
    modules: dict[str, Path] = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, f"{package} is not installed as a package"
        for location in spec.submodule_search_locations:
            modules[package] = Path(location) / "__init__.py"
            for info in pkgutil.iter_modules([location]):
                if info.ispkg:
                    assert f"{package}.{info.name}" in packages, (
                        f"{package}.{info.name} is a package missing from pyproject's packages")
                elif (Path(location) / f"{info.name}.py").is_file():
                    modules[f"{package}.{info.name}"] = Path(location) / f"{info.name}.py"
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports anywhere in its source; ``from a import b`` yields ``a`` and
    ``a.b`` (b may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def violations(modules: dict[str, Path]) -> list[str]:
    found = []
    for module, path in sorted(modules.items()):
        if _within(module, OUTSIDE_LIBRARY):
            continue
        for name in sorted(imported_names(module, path)):
            if _within(name, FORBIDDEN) and (module, name) not in ALLOWED:
                found.append(f"{module} imports {name} ({path})")
    return found


def test_library_never_imports_cli_benchmarks_or_toy():
    modules = installed_modules()
    assert {"fastdense.training.trainer", "fastdense.data", "fastdense.rewards.registry", "fastdense.cli.main",
            "fastdense.kernels", "fastdense.toy.world"} <= set(modules)  # the walk reached every package
    assert violations(modules) == []


def test_benchmarks_and_the_toy_world_never_import_the_cli():
    """One way: the CLI imports benchmarks and the toy world, never the reverse (gpu_check once did)."""
    modules = installed_modules()
    found = [f"{module} imports {name}" for module, path in sorted(modules.items())
             if _within(module, ("fastdense.benchmarks", "fastdense.toy"))
             for name in sorted(imported_names(module, path)) if _within(name, ("fastdense.cli",))]
    assert found == []


def test_allow_list_entries_are_still_needed():
    modules = installed_modules()
    for module, name in ALLOWED:
        assert name in imported_names(module, modules[module]), f"ALLOWED entry {(module, name)} is stale: remove it"


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("import fastdense.toy\n", True),
        ("def f():\n    from fastdense.toy.world import HELDOUT_PROMPTS\n", True),  # lazy imports count
        ("from fastdense import cli\n", True),
        ("from ..benchmarks import timing\n", True),  # relative, from fastdense.training
        ("from . import toy\n", False),  # fastdense.training.toy: not the toy world
        ("from fastdense.toys import x\nimport fastdense.data\n", False),
        ("x = 'fastdense.toy:shipped_model_dir'\n", False),  # a string is not an import
    ],
)
def test_the_check_sees_what_it_should(tmp_path, source, bad):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert bool(violations({"fastdense.training.probe": path})) is bad
