"""Issue 32, every error is exactly one line: a value with a newline (from a YAML config) cannot forge a second
`segcli: error:` line, terminal control characters are shown escaped, not obeyed, and a huge value echoed back (a
1,000,000-character --model made a ~1 MB line) is cut in the middle to about 1,000 characters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.cli.common import MAX_MESSAGE, one_line

from conftest import ROOT

runner = CliRunner()


@pytest.mark.parametrize("raw, shown", [
    ("model a\nsegcli: error: forged", "model a\\nsegcli: error: forged"),
    ("a\rb\tc\x00d", "a\\rb\\tc\\x00d"),
    ("red \x1b[31mtext\x1b[0m", "red \\x1b[31mtext\\x1b[0m"),
    ("line\u2028separator\x85next\u202eright-to-left", "line\\u2028separator\\x85next\\u202eright-to-left"),
    ("plain: é, 中文, → …, emoji 🙂, a\\b", "plain: é, 中文, → …, emoji 🙂, a\\b"),  # printable text is left alone
], ids=["newline", "cr-tab-nul", "escape", "unicode-separators", "printable"])
def test_control_characters_are_escaped(raw, shown):
    assert one_line(raw) == shown
    assert len(one_line(raw).splitlines()) == 1


def test_long_message_cut_in_the_middle():
    message = "--model " + "x" * 1_000_000 + ": no such model directory; give a model folder or hub id"
    line = one_line(message)
    assert len(line) == MAX_MESSAGE and line.count("…") == 1
    head, tail = line.split("…")
    assert message.startswith(head) and message.endswith(tail)
    assert head.startswith("--model xxx") and tail.endswith("give a model folder or hub id")  # what, and how to fix
    short = "x" * MAX_MESSAGE
    assert one_line(short) == short  # up to the limit: whole


def stderr_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("It was a dark and stormy night; the rain fell in torrents. " * 4)
    return p


def test_huge_model_string_is_one_short_line(doc):
    res = runner.invoke(app, ["run", str(doc), "--model", "x" * 1_000_000, "-q"])
    lines = stderr_lines(res.stderr)
    assert res.exit_code == 2 and len(lines) == 1, res.stderr[:2000]  # a usage error, not open()'s "name too long"
    assert lines[0] == ("segcli: error: --model: a name of 1,000,000 characters is no model folder, GGUF file or hub "
                        "id (paths hold at most 4096 bytes, 255 per name); give a shorter one")


@pytest.mark.parametrize("name", ["d/" + "x" * 256, "/".join(["abc"] * 1100)])
def test_a_model_name_no_file_system_holds_is_a_usage_error(doc, name):
    res = runner.invoke(app, ["run", str(doc), "--model", name, "-q"])
    assert res.exit_code == 2 and "is no model folder, GGUF file or hub id" in res.stderr


def test_yaml_model_with_a_newline_cannot_forge_a_line(doc, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text('model: "nope\\nsegcli: error: all is well\\x1b[2J"\n')
    res = runner.invoke(app, ["run", str(doc), "--config", str(config), "-q"])
    lines = stderr_lines(res.stderr)
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("segcli: error: nope\\nsegcli: error: all is well\\x1b[2J"), lines
    assert "\x1b" not in res.stderr


def test_one_line_in_a_real_process(doc, tmp_path):
    """The same through a real stderr (a file, not a test runner's capture)."""
    config = tmp_path / "c.yaml"
    config.write_text('model: "nope\\rsegcli: error: forged\\nagain"\n')
    p = subprocess.run([sys.executable, "-m", "segcli", "run", str(doc), "--config", str(config), "-q"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and p.stdout == "", p.stderr
    assert p.stderr.count("\n") == 1 and "\r" not in p.stderr, repr(p.stderr)
    assert p.stderr.startswith("segcli: error: nope\\rsegcli: error: forged\\nagain"), repr(p.stderr)
