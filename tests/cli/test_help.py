"""Issue 31, help a person can use: every command's --help at 80 columns shows its defaults, flags as flags,
whole option names, no dangling references; --version; `--flag true` is one line that says so."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from segcli.cli import app

runner = CliRunner()
COMMANDS = ["run", "compare", "policies", "train", "generate", "plot", "probe", "check"]
NO_DEFAULT = {  # options whose absence is the default: nothing to show
    "--output", "--save-memory", "--load-memory", "--revision", "--config", "--reference", "--plot", "--title",
    "--log-jsonl", "--set",
}


def help_text(*args: str) -> str:
    res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0, res.output
    return res.stdout


def options_of(name: str):
    group = typer.main.get_command(app)
    cmd = group.commands[name]
    return cmd, [p for p in cmd.params if p.param_type_name == "option"]


@pytest.mark.parametrize("command", ["", *COMMANDS], ids=lambda c: c or "segcli")
def test_help_fits_80_columns_whole(command):
    text = help_text(*([command] if command else []))
    assert "<bool>" not in text and "…" not in text and "DESIGN" not in text, text
    assert all(len(line) <= 80 for line in text.splitlines()), [x for x in text.splitlines() if len(x) > 80]
    if command:  # every option name appears whole
        _, params = options_of(command)
        for p in params:
            for name in (*p.opts, *p.secondary_opts):
                assert re.search(rf"(^|[\s,/]){re.escape(name)}($|[\s,=])", text, re.M), (name, text)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_shows_its_default(command):
    cmd, params = options_of(command)
    ctx = cmd.make_context(command, [], resilient_parsing=True)
    for p in params:
        if p.is_flag or p.name == "help" or set(p.opts) & NO_DEFAULT:
            continue
        _, helptext = p.get_help_record(ctx)
        assert "[default:" in helptext or "(required" in helptext, (command, p.opts, helptext)


@pytest.mark.parametrize("option,default", [("--memory", "fifo"), ("--segment-size", "128"), ("--memory-size", "512"),
                                            ("--seed", "0"), ("--glob", "*.txt")])
def test_run_help_names_the_defaults(option, default):
    text = " ".join(help_text("run").split())  # rewrapped lines joined
    entry = text.split(f" {option} ", 1)[1]
    assert f"[default: {default}]" in entry.split(" --", 1)[0] or f"[default: {default}]" in entry[:300], entry[:300]


def test_plot_extra_is_named_right():
    assert "segcli[plot]" in help_text() and "segcli[plot]" in " ".join(help_text("plot").split())


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    line = res.stdout.strip()
    assert re.fullmatch(r"segcli \d+\.\d+\.\d+\S* \(torch \S+, transformers \S+, python \S+\)", line), line


@pytest.mark.parametrize("args,flag", [(["run", "--per-token", "true"], "--per-token"),
                                       (["run", "x.txt", "--fresh-memory-per-document", "false"],
                                        "--fresh-memory-per-document"),
                                       (["probe", "--generate", "yes"], "--generate")])
def test_a_flag_given_a_value_is_one_line(args, flag):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert f"{flag} is a flag and takes no value" in res.output and "no such file" not in res.output, res.output


def test_a_flag_before_a_document_named_true_is_still_a_flag(tmp_path, monkeypatch):
    """`true` that is a file is a document, as before."""
    from segcli.cli.command import flag_given_a_value

    cmd, _ = options_of("run")
    ctx = cmd.make_context("run", ["x"], resilient_parsing=True)
    monkeypatch.chdir(tmp_path)
    assert flag_given_a_value(cmd.get_params(ctx), ["--per-token", "true"])
    (tmp_path / "true").write_text("a document")
    assert flag_given_a_value(cmd.get_params(ctx), ["--per-token", "true"]) is None


def test_check_without_a_model_says_what_to_give():
    res = runner.invoke(app, ["check", "--max-tokens", "8"])
    assert res.exit_code == 2 and "needs --model" in res.stderr, res.output
