"""Keep the checkout's ``kernels/`` and ``cli/`` from shadowing real top-level packages.

Those two folders sit at the repository root and ship as ``fastdense.kernels`` and
``fastdense.cli`` (package-dir mapping in pyproject.toml). Python puts the current
directory first on ``sys.path`` for ``python -m ...``, ``python -c ...`` and a REPL or
notebook started in the checkout, and ``python -m pytest`` does the same. Then a bare
``import kernels``, which transformers and diffusers do for Hugging Face's ``kernels``
package, would load our folder and fail (``cannot import name 'CUDAProperties'``).

Rather than rely on every caller starting Python the right way, each folder's
``__init__`` checks the name it is imported under; imported as the bare top-level name
it calls :func:`reroute`, which takes the checkout root off ``sys.path`` and imports what
that name means everywhere else (or raises the ModuleNotFoundError Python would raise
without our folder). Only that one path entry is removed: ``fastdense`` itself still
resolves as before. Checked by tests/test_no_shadowing.py, in-process and from a
subprocess started in the repository root.
"""

from __future__ import annotations

import importlib
import os
import sys


def _same_dir(entry: str, root: str) -> bool:
    try:  # '' on sys.path means the current directory
        return os.path.samefile(entry or os.getcwd(), root)
    except OSError:
        return False


def reroute(name: str, init_file: str) -> None:
    """Called by ``<root>/<name>/__init__.py`` when imported as top-level ``name``: replace it in
    ``sys.modules`` by the installed package of that name."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    sys.path[:] = [entry for entry in sys.path if not _same_dir(entry, root)]
    for entry in [e for e in sys.path_importer_cache if isinstance(e, str) and _same_dir(e, root)]:
        del sys.path_importer_cache[entry]
    importlib.invalidate_caches()
    sys.modules.pop(name, None)
    try:
        real = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        raise ModuleNotFoundError(f"No module named {name!r}", name=name) from None
    # the import system hands back whatever sys.modules holds once this __init__ returns
    sys.modules[name] = real
