"""Issue 31, rows streamed as work finishes, for `compare`: on a terminal each setting's row shows as soon as that
setting has run, drawn as the whole table would be (less the 'loss per segment' column, whose one scale needs every
setting: the sparklines come under the table), every number whole; Ctrl-C or SIGTERM leaves the rows shown. To a file
or a pipe, and in every other format, the output is byte for byte what the whole-table renderer writes.

A terminal here is either a fake one (a text buffer whose isatty() is true, the width from COLUMNS) for an in-process
run, or a real pseudo-terminal around a `segcli` process (the signals); see tests/cli/test_live_rows.py for `run`."""

from __future__ import annotations

import importlib
import io
import json
import re
import signal

import pytest
from rich.console import Console
from typer.testing import CliRunner

from segcli.cli import app
from segcli.cli import options as cli_options
from segcli.cli import output as cli_output
from segcli.cli.output import LiveTable, SparkBins, Writer, clean, fmt_num
from segcli.engine.compare import Comparison

from conftest import ROOT
from terminal import FakeTerminal, console, plain, stopped_on_a_terminal

compare_cli = importlib.import_module("segcli.cli.compare")  # the module (segcli.cli.compare is the command)
runner = CliRunner()


def spy_records(monkeypatch, screen: FakeTerminal | None = None):
    """Comparison.records, watched: the records as the writer keeps them (`got`), each setting's loss per segment as
    compare bins it (`spark`, by setting), and what `screen` showed when the command asked for the next record after
    each row (`seen`: the row has been written and shown by then)."""
    got: list[dict] = []
    spark: dict[tuple, SparkBins] = {}
    seen: list[str] = []
    records_of = Comparison.records

    def records(self, on_segment=lambda cfg, r: None, extra_config=None):
        def watched(cfg, r):
            spark.setdefault((cfg.model, cfg.memory, cfg.segment_size), SparkBins(32)).add(r.nll, r.tokens)
            on_segment(cfg, r)

        for rec in records_of(self, watched, extra_config):
            got.append(clean(rec))
            yield rec
            if rec["type"] == "row" and screen is not None:
                seen.append(screen.getvalue())

    monkeypatch.setattr(Comparison, "records", records)
    return got, spark, seen


def labelled(spark: dict[tuple, SparkBins]) -> list[tuple[str, SparkBins]]:
    """The sparklines as compare labels them (one model)."""
    return [(f"{memory} n_s={size}", bins) for (_, memory, size), bins in spark.items()]


# -- the table a row at a time, drawn as the whole table ----------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_records(tiny_model_dir, doc_path, tmp_path_factory):
    other = tmp_path_factory.mktemp("other") / "model"  # a second model: the model column
    other.symlink_to(tiny_model_dir, target_is_directory=True)
    res = runner.invoke(app, ["compare", str(doc_path), "--model", f"{tiny_model_dir},{other}", "--segment-sizes",
                              "8,32", "--memory", "fifo,sink", "--reference", "full", "--max-tokens", "96", "-f",
                              "jsonl", "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in res.stdout.splitlines()]


@pytest.mark.parametrize("width", [30, 80, 120, 200])
def test_live_rows_draw_what_the_whole_table_draws(reference_records, width):
    """Fitted to its own rows, compare's table shown a row at a time (then its divergence note) is the whole table
    without sparklines, byte for byte (styles too)."""
    rows = [r for r in reference_records if r["type"] == "row"]
    label = compare_cli.model_names(list(dict.fromkeys(r["model"] for r in rows)))
    assert len(label) == 2
    cells = [compare_cli.compare_cells(r, label, True, True) for r in rows]
    whole, live = console(width), console(width)
    compare_cli.render_compare_table(whole, reference_records)
    table = LiveTable(live, "compare", compare_cli.compare_cols(True, True, spark=False), cells)
    for c in cells:
        table.add(c)
    table.end()
    compare_cli.divergence_note(live, rows)
    assert live.file.getvalue() == whole.file.getvalue()


# -- compare on a terminal ----------------------------------------------------------------------------------------------

def terminal_compare(monkeypatch, args, width: int, progress: bool):
    """`segcli compare ARGS` in process with stdout a terminal `width` columns wide (and stderr the same one, for the
    progress bar, when `progress`). Returns the records, everything the terminal got, and what it had got after each
    row."""
    screen = FakeTerminal()
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setattr(cli_output, "stdout_stream", lambda has_output_option=True: screen)
    if progress:
        monkeypatch.setattr(cli_options, "err_console", Console(file=screen, force_terminal=True, width=width))
    got, _, seen = spy_records(monkeypatch, screen)
    res = runner.invoke(app, ["compare", *map(str, args), "--format", "table", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""  # everything went to the terminal
    return got, plain(screen.getvalue()), [plain(s) for s in seen]


def row_pattern(r: dict, reference: bool = False) -> str:
    """A row on the screen: its policy, n_s, then (columns may be left out between) its loss and bits/byte whole,
    and with a reference its KL ± se."""
    cells = [r["policy"], str(r["segment_size"]), fmt_num(r["loss"]), fmt_num(r["bits_per_byte"])]
    if reference:
        cells.append(f"{fmt_num(r['kl_div'])} ± {fmt_num(r['kl_div_stderr'])}")
    return ".*".join(rf"│ +{re.escape(c)} (?=│)" for c in cells)


@pytest.mark.parametrize("progress", [False, True], ids=["quiet stderr", "bar on the same terminal"])
@pytest.mark.parametrize("width", [80, 120])
def test_each_setting_shows_its_row_as_it_finishes(monkeypatch, tiny_model_dir, doc_path, width, progress):
    got, text, seen = terminal_compare(monkeypatch, [doc_path, "--model", tiny_model_dir, "--segment-sizes", "16,64",
                                                     "--memory", "fifo,sink", "--max-tokens", 128], width, progress)
    rows = [r for r in got if r["type"] == "row"]
    assert len(rows) == len(seen) == 4
    for i, early in enumerate(seen):  # after row i: rows 0..i on the screen, not the next one, no end yet
        assert "┃ policy ┃" in early and "└" not in early and "loss per segment" not in early, early
        for r in rows[: i + 1]:
            assert re.search(row_pattern(r), early), (i, r, early)
        if i + 1 < len(rows):
            assert not re.search(rf"│ +{rows[i + 1]['policy']} │ +{rows[i + 1]['segment_size']} │", early), early
    lines = [line for line in re.split(r"[\r\n]", text) if "│" in line or "┃" in line]
    assert all(len(line) <= width for line in lines), text
    assert "…" not in text and text.count("┃ policy ┃") == 1, text
    assert len([line for line in lines if re.match(r"│ +(fifo|sink) │", line)]) == 4, text  # each row once
    end = text.index("└")  # then the sparklines, one scale for every setting
    assert "loss per segment," in text[end:], text
    assert all(f"  {p} n_s={n} " in text[end:] for p in ("fifo", "sink") for n in (16, 64)), text


def test_reference_columns_fill_as_each_row_finishes(monkeypatch, tiny_model_dir, doc_path):
    """--reference streams beside each row: its KL ± se is whole in the row shown when that setting finishes, at 80
    columns; the note on it and on the left-out columns come at the end."""
    got, text, seen = terminal_compare(monkeypatch, [doc_path, "--model", tiny_model_dir, "--segment-sizes", "8,32",
                                                     "--memory", "fifo,sink", "--reference", "full", "--max-tokens",
                                                     96], 80, progress=True)
    rows = [r for r in got if r["type"] == "row"]
    assert re.search(row_pattern(rows[0], reference=True), seen[0]), seen[0]
    assert "KL(reference" not in seen[-1], seen[-1]
    for r in rows:
        assert re.search(row_pattern(r, reference=True), text), (r, text)
    end = text.index("└")
    assert end < text.index("not shown at this width:") < text.index("KL(reference ‖ row)"), text
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines()), text


# -- not a terminal: as before ----------------------------------------------------------------------------------------

def rendered(fmt: str, records: list[dict], sparks: list[tuple[str, SparkBins]], path) -> str:
    """What a Writer writes for `records` into a file, with the renderer that draws the whole table."""
    w = Writer(fmt, str(path))
    for r in records:
        w.write(r)
    w.close(True, render_table=lambda c, recs: compare_cli.render_compare_table(c, recs, sparks))
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("fmt", ["table", "jsonl", "csv", "json"])
@pytest.mark.parametrize("where", ["stdout", "file"])
def test_not_a_terminal_gets_what_the_renderer_writes(monkeypatch, tiny_model_dir, doc_path, tmp_path, where, fmt):
    """A pipe or a file (with a progress bar on a terminal beside it): byte for byte what the whole-table renderer
    (or the format's writer) writes from the same records."""
    monkeypatch.setattr(cli_options, "err_console", Console(file=io.StringIO(), force_terminal=True, width=80))
    got, spark, _ = spy_records(monkeypatch)
    out = tmp_path / f"t.{fmt}"
    res = runner.invoke(app, ["compare", str(doc_path), "--model", str(tiny_model_dir), "--segment-sizes", "16,32",
                              "--max-tokens", "64", "--format", fmt, "--device", "cpu",
                              *(["-o", str(out)] if where == "file" else [])])
    assert res.exit_code == 0, res.output
    written = out.read_text(encoding="utf-8") if where == "file" else res.stdout
    assert written == rendered(fmt, got, labelled(spark), tmp_path / "expected")
    if fmt == "table":
        assert "│ " in written and "loss per segment" in written


# -- a real terminal: a signal between settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_rows_shown_stay_when_stopped(tiny_model_dir, doc_path, sig):
    """`segcli compare` on an 80-column terminal with many settings to run: once the first row shows, a signal ends
    the run; that row stays, then the one interrupted line, exit 128 + n."""
    sizes = ",".join(["64"] + ["1"] * 40)  # after the first row, 40 settings to go: seconds at least
    first = re.compile(r"│ +fifo │ +64 │[^\n]*│\s*\n")
    text = stopped_on_a_terminal(["compare", str(doc_path), "--model", str(tiny_model_dir), "--segment-sizes", sizes,
                                  "--memory", "fifo", "--device", "cpu"], lambda t: first.search(t) is not None, sig,
                                 ROOT)
    assert first.search(text) and "┃ policy ┃" in text and "└" not in text and "loss per segment" not in text, text
    assert "…" not in text, text
