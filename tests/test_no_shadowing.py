"""Our top-level ``kernels/`` and ``cli/`` folders must never stand in for the real ``kernels``
(Hugging Face's, which transformers and diffusers import) or ``cli`` packages, however Python is
started: the guard is ``fastdense/_shadow_guard.py``. Both tests fail without it."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUR_FOLDERS = (REPO / "kernels", REPO / "cli")
# what transformers, diffusers and peft import for their LoRA and hub-kernels integrations
INTEGRATIONS = (
    "transformers.integrations.hub_kernels",
    "transformers.integrations.peft",
    "diffusers.models.attention_dispatch",
    "diffusers.loaders.peft",
    "diffusers.loaders.lora_pipeline",
    "peft",
)
CHECK = """
import importlib, sys
for name in {integrations!r}:
    importlib.import_module(name)
import kernels  # what diffusers' attention dispatch imports when a hub kernel is asked for
assert hasattr(kernels, "get_kernel"), kernels
for name, module in sorted(sys.modules.items()):
    if name.split(".")[0] in ("kernels", "cli"):
        print(name, getattr(module, "__file__", None))
"""


def _ours(path: str | None) -> bool:
    return path is not None and any(Path(path).resolve().is_relative_to(folder) for folder in OUR_FOLDERS)


def test_checkout_layout_is_what_the_guard_protects():
    assert (REPO / "kernels" / "__init__.py").is_file() and (REPO / "cli" / "__init__.py").is_file()
    import fastdense.kernels

    assert Path(fastdense.kernels.__file__).parent.name == "kernels"


def test_in_process_integrations_get_the_real_kernels_package():
    """The pytest process, with the checkout root first on sys.path (as ``python -m pytest`` or a
    notebook in the checkout has it) and the integrations imported afresh."""
    fresh = [m for m in sys.modules if m.split(".")[0] == "kernels" or m in INTEGRATIONS[:1]]
    saved_modules = {name: sys.modules.pop(name) for name in fresh}
    saved_path = list(sys.path)
    try:
        sys.path.insert(0, str(REPO))
        importlib.invalidate_caches()
        for name in INTEGRATIONS:
            importlib.import_module(name)
        kernels = importlib.import_module("kernels")
        assert hasattr(kernels, "get_kernel")
        shadowed = {name: getattr(m, "__file__", None) for name, m in sys.modules.items()
                    if name.split(".")[0] in ("kernels", "cli") and _ours(getattr(m, "__file__", None))}
        assert not shadowed, f"the checkout's folders were imported as top-level modules: {shadowed}"
    finally:
        sys.path[:] = saved_path
        for name in [m for m in sys.modules if m.split(".")[0] == "kernels" or m in INTEGRATIONS[:1]]:
            del sys.modules[name]
        sys.modules.update(saved_modules)


def _run_in_checkout(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": "", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_python_c_in_the_checkout_root():
    proc = _run_in_checkout("-c", CHECK.format(integrations=INTEGRATIONS))
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert "kernels" in loaded
    assert not [name for name, path in loaded.items() if _ours(path)], loaded


def test_python_m_in_the_checkout_root(tmp_path):
    """``python -m pytest`` run in the checkout (the way the issue found it) and ``python -m fastdense``."""
    test_file = tmp_path / "test_user_check.py"
    test_file.write_text(textwrap.dedent("""
        import importlib, sys
        from pathlib import Path

        ROOT_ON_PATH = "" in sys.path or {repo!r} in sys.path  # as python -m puts it, before any import

        def test_kernels_is_real():
            assert ROOT_ON_PATH
            importlib.import_module("transformers.integrations.hub_kernels")
            import kernels
            assert Path(kernels.__file__).resolve().parent != Path({repo!r}) / "kernels"
    """).format(repo=str(REPO)))
    proc = _run_in_checkout("-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                            "-c", os.devnull, str(test_file))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    proc = _run_in_checkout("-m", "fastdense", "--help")
    assert proc.returncode == 0 and "train" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["kernels", "cli"])
def test_bare_import_never_returns_our_folder(name):
    proc = _run_in_checkout("-c", f"import {name}; print({name}.__file__)")
    if proc.returncode == 0:  # an installed package of that name
        assert not _ours(proc.stdout.strip()), proc.stdout
    else:  # none installed: exactly what Python says without our folder
        assert f"No module named '{name}'" in proc.stderr, proc.stderr[-2000:]
