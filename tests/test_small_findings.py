"""Issue #10 ("Smaller findings"): unreadable config files are one-line errors naming the file;
a prompt longer than the text encoder's window is reported once; ``bench sampler``'s own
prompts fit that window (no truncation messages)."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fastdense.cli.main import main
from fastdense.config import build_config, read_config_file
from fastdense.errors import FastdenseError

FASTDENSE = Path(sys.executable).parent / "fastdense"
TRUNCATION_NOISE = ("truncated because CLIP", "Token indices sequence length", "warning: prompt")
LONG = "a very long prompt about a red circle on a blue background"  # 46 tokens of the tiny tokenizer
LONGER = "another long prompt: a large green ring on a white background"  # 48
WARN_LONG = (f"warning: prompt {LONG!r} is 46 tokens; the text encoder reads the first 16 (model_max_length), "
             "the rest ('about a red circle on a blue background') is ignored")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FASTDENSE_DEBUG", None)  # the one-line form, not the traceback
    return env


def _cli(argv: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(FASTDENSE), *argv], cwd=cwd, capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def _run(argv, capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------------
# 1. config files that cannot be read or parsed


def test_binary_config_file_is_a_one_line_error_through_the_cli(tmp_path):
    rng = random.Random(0)
    (tmp_path / "garbage.yaml").write_bytes(bytes([0xA4]) + bytes(rng.randrange(256) for _ in range(299)))
    res = _cli(["train", "--dry-run", "--config", "garbage.yaml"], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert _lines(res.stderr) == [
        "error: config file 'garbage.yaml' cannot be read: not UTF-8 text (byte 0xa4 at position 0); "
        "allowed: a YAML, TOML or JSON config file (UTF-8 text)"
    ]


@pytest.mark.parametrize("name,content,reason", [
    ("syntax.yaml", "objective:\n  gamma: 0.9\n bad: [1\n",
     "does not parse as YAML: expected <block end>, but found '<block mapping start>' at line 3, column 2"),
    ("unclosed.yml", "objective: [unclosed\n", "does not parse as YAML:"),
    ("tab.yaml", "objective:\n\tgamma: 0.9\n", "does not parse as YAML: found character '\\t' that cannot start"),
    ("nul.yaml", "a\x00b: 1\n", "does not parse as YAML: unacceptable character #x0000 at position 1"),
    ("list.yaml", "- objective\n- sampling\n", "must hold a mapping of sections (objective, sampling, ...) "
     "at its top level, not a list"),
    ("scalar.yaml", "hello\n", "at its top level, not a string"),
    ("number.json", "3\n", "at its top level, not a number"),
    ("bad.toml", "[objective\ngamma = 0.9\n",
     "does not parse as TOML: Expected ']' at the end of a table declaration (at line 1, column 11)"),
    ("comma.json", '{"objective": {"gamma": 0.9,}}',  # YAML would take the trailing comma; JSON does not
     "does not parse as JSON: Expecting property name enclosed in double quotes at line 1, column 29"),
    ("latin1.toml", "[data]\nprompts = ['caf\xe9']\n".encode("latin-1"),
     "cannot be read: not UTF-8 text (byte 0xe9 at position 22)"),
])
def test_unreadable_config_files_are_one_line_errors(tmp_path, capsys, monkeypatch, name, content, reason):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    monkeypatch.delenv("FASTDENSE_DEBUG", raising=False)
    code, out, err = _run(["train", "--dry-run", "--config", str(path)], capsys)
    assert code == 2 and out == ""
    lines = _lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: config file {str(path)!r} ")
    assert reason in lines[0]


def test_config_file_read_failures_name_the_file(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("objective:\n  gamma: 0.5\n")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(FastdenseError) as info:
        read_config_file(path)
    assert str(info.value) == (f"config file {str(path)!r} cannot be read: Permission denied; "
                               "allowed: a YAML, TOML or JSON config file (UTF-8 text)")


def test_config_files_that_do_load(tmp_path):
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfobjective:\n  gamma: 0.8\n")  # a Windows editor's BOM
    assert build_config(config_file=tmp_path / "bom.yaml").objective.gamma == 0.8
    (tmp_path / "c.json").write_text(json.dumps({"optim": {"lr": 1e-05}, "objective": {"clip": float("inf")}}))
    cfg = build_config(config_file=tmp_path / "c.json")
    assert cfg.optim.lr == 1e-05 and cfg.objective.clip == float("inf")
    (tmp_path / "c.toml").write_text("[objective]\ngamma = 0.7\n")
    assert build_config(config_file=tmp_path / "c.toml").objective.gamma == 0.7
    for name, text in (("empty.json", ""), ("empty.toml", "\n"), ("comments.yaml", "# nothing yet\n")):
        (tmp_path / name).write_text(text)
        assert read_config_file(tmp_path / name) == {}
    # a run's own config.json (what --resume reads) round-trips
    cfg = build_config(preset="toy", overrides=["objective.gamma=0.85"])
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert build_config(config_file=tmp_path / "config.json") == cfg


# ---------------------------------------------------------------------------------------------------
# 2. prompts longer than the text encoder's window


@pytest.fixture(scope="module")
def tiny_parts(tiny_dir):
    from fastdense.models import load_pipeline_parts

    return load_pipeline_parts(tiny_dir)


def _truncation_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fastdense.models.prompts" and r.levelno == logging.WARNING]


def test_prompt_encoder_warns_once_per_long_prompt(tiny_parts, caplog):
    from fastdense.models.prompts import PromptEncoder

    tok = tiny_parts.tokenizer
    assert tok.model_max_length == 16
    assert len(tok(LONG, verbose=False).input_ids) == 46 and len(tok("a red cat").input_ids) == 6
    enc = PromptEncoder.from_parts(tiny_parts)
    with caplog.at_level(logging.WARNING, logger="fastdense"):
        enc.encode([LONG, "a red cat", LONG, LONGER])
        enc.encode([LONG, "the dog"])  # cached: not encoded again
        enc.clear()
        enc.encode([LONGER, "a red cat"])  # encoded again after clear(): still reported once only
        enc.unconditional()
    assert _truncation_warnings(caplog) == [
        WARN_LONG,
        f"warning: prompt {LONGER!r} is 48 tokens; the text encoder reads the first 16 (model_max_length), "
        "the rest ('t : a large green ring on a white background') is ignored",
    ]
    # exactly at the limit: no warning; an explicit max_length is named as such
    short = PromptEncoder.from_parts(tiny_parts, max_length=8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdense"):
        PromptEncoder.from_parts(tiny_parts).encode(["x" * 14])  # 16 tokens
        assert _truncation_warnings(caplog) == []
        short.encode(["a red cat", "the dog"])  # 6 and 4 tokens
        assert _truncation_warnings(caplog) == []
        short.encode(["a red cat, the dog"])
    (message,) = _truncation_warnings(caplog)
    assert message == ("warning: prompt 'a red cat, the dog' is 9 tokens; the text encoder reads the first 8 "
                       "(max_length), the rest ('dog') is ignored")


def test_sample_reports_a_long_prompt_once_on_stderr(tiny_dir, tmp_path):
    res = _cli(["sample", LONG, "a red cat", LONG, "--model", str(tiny_dir), "--num-images", "2", "--steps", "2",
                "--device", "cpu", "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = _lines(res.stderr)
    assert [line for line in lines if line.startswith("warning:")] == [WARN_LONG]  # one line, unwrapped
    assert lines[0] == WARN_LONG and lines[1].startswith("wrote 6 images")
    assert not any(noise in res.stderr for noise in TRUNCATION_NOISE[:2])


def test_sample_in_process_shows_the_warning_once(tiny_dir, tmp_path, capsys):
    code, _, err = _run(["sample", LONG, "--model", str(tiny_dir), "--steps", "2", "--device", "cpu",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [WARN_LONG]


# ---------------------------------------------------------------------------------------------------
# 3. bench sampler's own prompts


def test_bench_prompts_fit_the_window(tiny_parts):
    from fastdense.benchmarks.sampler import bench_prompts

    tok = tiny_parts.tokenizer
    prompts = bench_prompts(tok, 1001)
    assert len(set(prompts)) == 1001 and prompts[:2] == ["0 red circles", "1 red circles"]
    assert max(len(tok(p).input_ids) for p in prompts) <= tok.model_max_length


def test_bench_sampler_prints_no_truncation_message(tmp_path):
    res = _cli(["bench", "sampler", "--device", "cpu", "--no-compile", "--batch", "2", "--steps", "2",
                "--repeats", "1", "--json", str(tmp_path / "s.json")], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    both = res.stdout + res.stderr
    assert not [noise for noise in TRUNCATION_NOISE if noise in both], both
    assert {r["impl"] for r in json.loads((tmp_path / "s.json").read_text())} == {
        "fastdense", "fastdense_norecord", "diffusers"}
