"""Declared dependencies (issue #10): every third-party module our code imports must come from a
distribution that pyproject.toml declares, and every module of the installed package must import.

The static test reads the *installed* metadata (``importlib.metadata.requires("fastdense")``):
after editing pyproject.toml, reinstall (``make setup`` does it when pyproject.toml changed).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

DIST = "fastdense"
REPO = Path(__file__).resolve().parents[1]
# Scanned beside the installed package: test code may use the `dev` extra as well as the core deps.
EXTRA_SOURCE_DIRS = (REPO / "tests", REPO / "benchmarks")
TEST_EXTRA = "dev"
# Must be among the installed packages found (so that a discovery bug cannot make the tests vacuous).
EXPECTED_PACKAGES = {"fastdense", "fastdense.kernels", "fastdense.cli", "fastdense.benchmarks"}

# Optional imports that no extra declares, on purpose, with the reason. Keep it short.
ALLOWED_UNDECLARED = {
    "click": "cli/main.py imports it only when `typer._click` is missing, i.e. for typer < 0.20, "
    "which depends on click itself",
}
# Guarded imports of a submodule of a declared package that need a distribution of their own.
SUBMODULE_NEEDS = {"torch.utils.tensorboard": "tensorboard"}
# Calls whose first argument, a string literal, names a module to import (fastdense's `_require`
# helper and `importlib.util.find_spec` report a missing module instead of raising ImportError).
DYNAMIC_IMPORTS = {"import_module": False, "__import__": False, "find_spec": True, "_require": True}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, set[str]]:
    """Normalised distribution name -> the groups declaring it: "" (core) and/or extra names."""
    groups: dict[str, set[str]] = {}
    for req in md.requires(DIST) or []:
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)
        extras = re.findall(r"""extra\s*==\s*["']([^"']+)["']""", req)
        groups.setdefault(_norm(name), set()).update(extras or [""])
    return groups


def installed_packages() -> dict[str, Path]:
    """Each package of the installed distribution -> its folder, found through the distribution's
    files: a regular install lists its ``__init__.py`` files; setuptools' editable install lists a
    finder module whose MAPPING gives each top-level package's folder."""
    found: dict[str, Path] = {}
    for file in md.distribution(DIST).files or ():
        if file.name.startswith("__editable__") and file.name.endswith("_finder.py"):
            finder = importlib.import_module(file.stem)
            found.update({name: Path(folder) for name, folder in finder.MAPPING.items()})
        elif file.name == "__init__.py" and file.parts[0] == DIST:
            found[".".join(file.parts[:-1])] = Path(file.locate()).resolve().parent
    if DIST not in found:  # another editable mode (a .pth naming the source folder)
        found[DIST] = Path(importlib.import_module(DIST).__file__).resolve().parent
    return found


def installed_modules() -> dict[str, Path]:
    """Every module of the installed distribution -> its source file (``__main__`` modules left out:
    importing one runs the program)."""
    modules: dict[str, Path] = {}
    for package, folder in installed_packages().items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if "__pycache__" in rel.parts or rel.name == "__main__":
                continue
            if not all((folder.joinpath(*rel.parts[:i]) / "__init__.py").is_file() for i in range(1, len(rel.parts))):
                continue  # not inside a package (e.g. a data folder)
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            modules[".".join((package, *parts))] = path.resolve()
    return modules


def _is_test_code(path: Path) -> bool:
    return path.is_relative_to(REPO / "tests") or path.name == "conftest.py" or path.name.startswith("test_")


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, (ast.Name, ast.Attribute)) and (getattr(t, "id", None) or t.attr) in IMPORT_ERRORS
               for t in types if t is not None)


def imports_of(path: Path) -> list[tuple[str, bool, dict[str, str]]]:
    """(dotted module, guarded, hints) for each absolute import in a file. Guarded: inside the
    ``try`` (or the ``except ImportError`` fallback) of a try/except ImportError, or a literal
    ``find_spec``/``_require`` call; hints: ``_require``'s ``package=`` and ``extra=``."""
    found: list[tuple[str, bool, dict[str, str]]] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, guarded, {}) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, guarded, {}))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name in DYNAMIC_IMPORTS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                hints = {k.arg: k.value.value for k in node.keywords
                         if k.arg in ("package", "extra") and isinstance(k.value, ast.Constant) and k.value.value}
                found.append((node.args[0].value, guarded or DYNAMIC_IMPORTS[name], hints))
        if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            optional = any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                visit(child, guarded or optional)
            for handler in node.handlers:
                visit(handler, guarded or _catches_import_error(handler))
            for child in node.orelse + node.finalbody:
                visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
    return found


def _sources() -> list[Path]:
    files = set(installed_modules().values())
    for folder in EXTRA_SOURCE_DIRS:
        files.update(p.resolve() for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(files)


def _where(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def test_installed_package_is_found():
    assert EXPECTED_PACKAGES <= set(installed_packages()), installed_packages()


def test_every_third_party_import_is_declared():
    declared = _declared()
    dists_of = md.packages_distributions()
    ours = {name for name, dists in dists_of.items() if DIST in dists} | {DIST}
    problems: list[str] = []
    for path in _sources():
        test_code = _is_test_code(path)
        allowed = {"", TEST_EXTRA} if test_code else {""}
        scope = "the core dependencies or the 'dev' extra" if test_code else "[project] dependencies"
        local = {p.stem for p in path.parent.glob("*.py")} if test_code else set()
        for module, guarded, hints in imports_of(path):
            top = module.split(".")[0]
            checks = []  # (what is imported, the distributions that may provide it)
            if guarded and module in SUBMODULE_NEEDS:
                checks.append((module, [SUBMODULE_NEEDS[module]]))
            if not (top in sys.stdlib_module_names or top in ours or top in local or top in ALLOWED_UNDECLARED):
                checks.append((top, dists_of.get(top) or []))
            for name, dists in checks:
                if not dists:
                    if not guarded:
                        problems.append(f"{_where(path)}: imports {name!r}, which no installed distribution provides "
                                        f"(declare its distribution in {scope} and reinstall)")
                        continue
                    dists = [hints.get("package", name)]  # not installed here: the name the code asks for
                names = " or ".join(map(repr, dists))
                groups = set().union(*(declared.get(_norm(d), set()) for d in dists))
                if "extra" in hints and hints["extra"] not in groups:
                    problems.append(f"{_where(path)}: says `pip install 'fastdense[{hints['extra']}]'` for {name!r}, "
                                    f"but the {hints['extra']!r} extra does not declare {names}")
                elif not (groups & allowed or (guarded and groups)):
                    where = "any extra (or in ALLOWED_UNDECLARED, with the reason)" if guarded else scope
                    problems.append(f"{_where(path)}: imports {name!r} ({'guarded, ' if guarded else ''}distribution "
                                    f"{names}), which pyproject.toml does not declare in {where}")
    assert not problems, "undeclared imports:\n" + "\n".join(sorted(set(problems)))


def test_allow_list_is_current():
    """Each allow-listed module is still imported somewhere (and only where guarded)."""
    imported = {(module.split(".")[0], guarded) for path in _sources() for module, guarded, _ in imports_of(path)}
    for name in ALLOWED_UNDECLARED:
        assert (name, True) in imported, f"{name!r} is no longer a guarded import: drop it from ALLOWED_UNDECLARED"
        assert (name, False) not in imported, f"{name!r} is imported unguarded somewhere: declare it instead"


def test_every_installed_module_imports(tmp_path):
    """In a fresh interpreter, outside the checkout (so nothing but the installed package is found)."""
    modules = sorted(installed_modules())
    assert EXPECTED_PACKAGES <= set(modules)
    report = tmp_path / "failed.json"
    script = textwrap.dedent("""
        import importlib, json, sys, traceback
        failed = {}
        for name in sys.argv[2:]:
            try:
                importlib.import_module(name)
            except BaseException:
                failed[name] = traceback.format_exc(limit=-4)
        with open(sys.argv[1], "w") as f:
            json.dump(failed, f)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", script, str(report), *modules], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and report.is_file(), proc.stdout[-2000:] + proc.stderr[-3000:]
    failed = json.loads(report.read_text())
    assert not failed, f"{len(failed)} of {len(modules)} modules fail to import:\n" + "\n".join(
        f"--- {name}\n{tb}" for name, tb in failed.items())
