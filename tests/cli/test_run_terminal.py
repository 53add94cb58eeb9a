"""What a person sees on stderr when `run` writes its records elsewhere (-o FILE, or a pipe) from a terminal: the
headline numbers and where they went, not only an unlabelled sparkline (issue 31)."""

from __future__ import annotations

import importlib
import io
import json

from rich.console import Console
from typer.testing import CliRunner

from segcli.cli import app

run_cli = importlib.import_module("segcli.cli.run")  # the module (segcli.cli.run as an attribute is the command)

runner = CliRunner()


def test_output_file_on_a_terminal_shows_the_headline_and_where_it_went(doc_path, tmp_path, monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(run_cli, "err_console", Console(file=screen, force_terminal=True, width=80, highlight=False))
    out = tmp_path / "r.jsonl"
    res = runner.invoke(app, ["run", str(doc_path), "--max-tokens", "300", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text().splitlines()[-1])
    text = screen.getvalue()
    assert f"bits/byte {summary['bits_per_byte']:.4f}" in text and f"{summary['tokens']:,} tokens" in text
    assert f"wrote {out}" in text and "…" not in text


def test_quiet_or_not_a_terminal_shows_nothing(doc_path, tmp_path):
    res = runner.invoke(app, ["run", str(doc_path), "--max-tokens", "100", "--device", "cpu",
                              "-o", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 0 and res.stderr == ""
