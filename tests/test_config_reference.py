"""docs/config.md documents exactly the fields of ``fastdense.config.Config``, with their defaults.

The reference holds one markdown table per section with the columns ``key | type | default |
meaning``. Each row names a dotted key in backticks; the type cell is the dataclass annotation as
written; the default cell is one code span holding the default as JSON (``null``, ``true``,
strings in quotes, tuples as lists). A field added to the dataclass fails this test until it is
documented; a documented key that is no field, or a default that differs, fails it too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from fastdense.config import Config

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
HEADER = ["key", "type", "default", "meaning"]
NO_DEFAULT = "required"  # the default cell of a field without a default (none so far)


# ----------------------------------------------------------------------------- the dataclass


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _annotation(f: dataclasses.Field) -> str:
    """The annotation as written (config.py uses ``from __future__ import annotations``)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", repr(f.type))


def config_fields(cls: type = Config, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """``{dotted key: (annotation, default)}`` of every leaf field, sections recursed into."""
    out: dict[str, tuple[str, Any]] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = _field_default(f)
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            out.update(config_fields(type(default), prefix=f"{key}."))
        else:
            out[key] = (_annotation(f), default)
    return out


# ----------------------------------------------------------------------------- the document


def _cells(line: str) -> list[str]:
    """A table row's cells; ``\\|`` is a pipe inside a cell (GitHub markdown)."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", body)]


def _code(cell: str) -> str | None:
    """The text of a cell that is exactly one code span, else None."""
    m = re.fullmatch(r"`([^`]*)`", cell)
    return m.group(1) if m else None


def documented_rows(text: str) -> dict[str, dict[str, str]]:
    """``{key: {"type", "default", "line"}}`` from every ``key | type | default | meaning`` table."""
    rows: dict[str, dict[str, str]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and [c.lower() for c in _cells(lines[i])] == HEADER:
            i += 2  # the header and its |---| separator
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                cells = _cells(lines[i])
                where = f"docs/config.md line {i + 1}"
                assert len(cells) == 4, f"{where}: expected 4 cells (key | type | default | meaning), got {cells}"
                key = _code(cells[0])
                assert key, f"{where}: the key cell must be one `code span`, got {cells[0]!r}"
                assert key not in rows, f"{key}: documented twice ({rows.get(key, {}).get('line')} and {where})"
                rows[key] = {"type": cells[1], "default": cells[2], "line": where}
                i += 1
        else:
            i += 1
    return rows


# ----------------------------------------------------------------------------- normalisation


def normalise(value: Any) -> Any:
    """A default as JSON would hold it: tuples → lists, ``None`` → null, with its kind kept
    (``1`` and ``1.0`` differ: an ``int`` documented for a ``float`` field is an error)."""
    if isinstance(value, (list, tuple)):
        return ["list", [normalise(v) for v in value]]
    if isinstance(value, dict):
        return ["dict", {str(k): normalise(v) for k, v in value.items()}]
    if isinstance(value, float) and math.isnan(value):
        return ["float", "nan"]
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    raise TypeError(f"a default of type {type(value).__name__} has no JSON form: {value!r}")


def parse_default(key: str, cell: str, where: str) -> Any:
    text = _code(cell)
    assert text is not None, f"{key}: the default cell must be one `code span` (JSON), got {cell!r} ({where})"
    if text == NO_DEFAULT:
        return dataclasses.MISSING
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        pytest.fail(f"{key}: default {text!r} is not JSON ({err.msg}; {where})")


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, str]]:
    assert DOC.is_file(), f"{DOC} is missing"
    found = documented_rows(DOC.read_text(encoding="utf-8"))
    assert found, f"{DOC}: no table with the columns key | type | default | meaning"
    return found


def test_every_field_is_documented(rows):
    missing = [key for key in config_fields() if key not in rows]
    assert not missing, f"config keys missing from docs/config.md: {', '.join(missing)}"


def test_nothing_else_is_documented(rows):
    fields = config_fields()
    extra = [f"{key} ({row['line']})" for key, row in rows.items() if key not in fields]
    assert not extra, f"docs/config.md documents keys that are not fields of fastdense.config.Config: {extra}"


def test_each_section_has_its_own_table():
    """Rows sit under a heading naming their section (``## model`` holds only ``model.*``)."""
    section, problems = None, []
    for n, line in enumerate(DOC.read_text(encoding="utf-8").splitlines(), 1):
        heading = re.match(r"#{2,}\s+`?([\w.]+)`?\s*$", line)
        if heading:
            section = heading.group(1)
        elif line.lstrip().startswith("|"):
            key = _code(_cells(line)[0])
            if key and "." in key and key.rsplit(".", 1)[0] != section:
                problems.append(f"{key} (line {n}) under heading {section!r}")
    assert not problems, "rows under the wrong section heading: " + "; ".join(problems)


@pytest.mark.parametrize("key", sorted(config_fields()))
def test_default_and_type(rows, key):
    if key not in rows:
        pytest.fail(f"{key}: not documented in docs/config.md")
    annotation, default = config_fields()[key]
    row = rows[key]
    documented = parse_default(key, row["default"], row["line"])
    if default is dataclasses.MISSING or documented is dataclasses.MISSING:
        assert documented is default, f"{key}: the dataclass default is {default!r}, docs/config.md: {row['default']}"
        return
    assert normalise(documented) == normalise(default), (
        f"{key}: docs/config.md gives the default {row['default']} ({row['line']}), "
        f"the dataclass {json.dumps(default)} ({type(default).__name__})"
    )
    doc_type = _code(row["type"])
    assert doc_type == annotation, (
        f"{key}: docs/config.md gives the type {row['type']} ({row['line']}), the dataclass `{annotation}`"
    )


def test_normalise_tells_kinds_apart():
    """The comparison is strict where JSON is: int ≠ float, bool ≠ int, null ≠ empty list."""
    assert normalise(json.loads("[0.9, 0.999]")) == normalise((0.9, 0.999))
    assert normalise(json.loads("1e-4")) == normalise(1e-4)
    assert normalise(json.loads("1")) != normalise(1.0)
    assert normalise(json.loads("true")) != normalise(1)
    assert normalise(json.loads("null")) != normalise([])
