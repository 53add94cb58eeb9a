"""Issue 31: text that looks like rich markup (`[memory; segment]`, a file named `[b]x[/b].txt`) is printed as it is,
on a terminal too."""

from __future__ import annotations

import io
import re

from rich.console import Console
from typer.testing import CliRunner

from segcli.cli import app
from segcli.cli.output import new_table
from segcli.cli.policies import policies_table, policy_records

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def on_terminal(renderable, width: int = 400) -> str:
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=width, color_system="truecolor").print(renderable)
    return ANSI.sub("", buf.getvalue())


def test_policies_table_keeps_brackets_on_a_terminal():
    text = on_terminal(policies_table(policy_records()))
    tova = next(r for r in policy_records() if r["name"] == "tova")
    assert "[memory; segment]" in tova["rule"]
    assert "pairs of [memory; segment] with the most" in text, text


def test_policies_command_keeps_brackets():
    res = runner.invoke(app, ["policies", "-f", "table"], env={"COLUMNS": "400"})
    assert res.exit_code == 0 and "pairs of [memory; segment] with the most" in res.stdout, res.stdout


def test_table_title_header_and_cells_are_text():
    table = new_table("[bold]title[/bold]", [("[red]head[/red]", "left")])
    table.add_row("[b]cell[/b]")
    text = on_terminal(table)
    assert "[bold]title[/bold]" in text and "[red]head[/red]" in text and "[b]cell[/b]" in text, text


def test_document_names_with_brackets_in_the_run_table(tiny_model_dir, tmp_path):
    a, b = tmp_path / "[b]a.txt", tmp_path / "[x]b.txt"
    a.write_text("The first document, short. " * 8)
    b.write_text("The second document, short too. " * 8)
    res = runner.invoke(app, ["run", str(a), str(b), "--model", tiny_model_dir, "--device", "cpu", "-q", "-s", "32",
                              "-f", "table"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    assert "[b]a.txt" in res.stdout and "[x]b.txt" in res.stdout, res.stdout
