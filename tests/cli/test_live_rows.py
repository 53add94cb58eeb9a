"""Issue 31, rows streamed as segments finish: on a terminal `run` shows its table a row at a time (a corpus: a row per
document), drawn as the whole table would be, with every number whole; Ctrl-C or SIGTERM leaves the rows shown. To a
file or a pipe the whole table comes at the end, byte for byte as before.

A terminal here is either a fake one (a text buffer whose isatty() is true, the width from COLUMNS) for an in-process
run, or a real pseudo-terminal around a `segcli` process (the slow pipe and the signals)."""

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
from segcli.cli.output import Col, LiveTable, PipeConsole, SparkBins, clean, fmt_num, print_fitted
from segcli.engine.run import CorpusRun

from conftest import ROOT
from terminal import FakeTerminal, console, plain, stopped_on_a_terminal

run_cli = importlib.import_module("segcli.cli.run")  # the module (segcli.cli.run as an attribute is the command)
runner = CliRunner()


@pytest.fixture(scope="module")
def run_records(tiny_model_dir, doc_path):
    res = runner.invoke(app, ["run", str(doc_path), "--model", str(tiny_model_dir), "-s", "16", "--max-tokens", "120",
                              "-f", "jsonl", "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in res.stdout.splitlines()]


# -- the table a row at a time, drawn as the whole table ----------------------------------------------------------------

@pytest.mark.parametrize("width", [30, 80, 120])
def test_live_table_draws_what_the_whole_table_draws(run_records, width):
    """Fitted to its own rows, the table shown a row at a time is the whole table, byte for byte (styles too)."""
    rows = [run_cli.segment_row(r) for r in run_records if r["type"] == "segment"]
    whole, live = console(width), console(width)
    print_fitted(whole, "segments", run_cli.SEGMENT_COLS, rows)
    table = LiveTable(live, "segments", run_cli.SEGMENT_COLS, rows)
    for r in rows:
        table.add(r)
    table.end()
    assert live.file.getvalue() == whole.file.getvalue()


def test_a_cell_wider_than_expected_starts_a_wider_header():
    cols = [Col("seg"), Col("loss"), Col("tok/s", drop=1)]
    c = console(24)
    table = LiveTable(c, "segments", cols, [["9", "9.9999", "99"]])
    for row in (["0", "3.1234", "12"], ["1", "123.4567", "13"], ["2", "2.5000", "14"]):
        table.add(row)
    table.end()
    text = plain(c.file.getvalue())
    assert "…" not in text and all(len(line) <= 24 for line in text.splitlines()), text
    assert "123.4567" in text and text.count("┃ seg ┃") == 2 and text.count("segments") == 1, text
    second = text.split("┃ seg ┃")[2]  # the wider loss left no room for tok/s: named under the table
    assert "tok/s" not in second.split("\n")[0] and "not shown at this width:" in second and "tok/s" in second, text


# -- run on a terminal ------------------------------------------------------------------------------------------------

def terminal_run(monkeypatch, args, width: int, progress: bool, after_segment: int = 2):
    """`segcli run ARGS` in process with stdout a terminal `width` columns wide (and stderr the same one, for the
    progress bar, when `progress`). Returns the result, everything the terminal got, and what it had got when the run
    was about to compute the segment after segment number `after_segment`."""
    screen = FakeTerminal()
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setattr(cli_output, "stdout_stream", lambda has_output_option=True: screen)
    if progress:
        monkeypatch.setattr(cli_options, "err_console", Console(file=screen, force_terminal=True, width=width))
    seen: list[str] = []
    records_of = CorpusRun.records

    def records(self):
        n = 0
        for rec in records_of(self):
            yield rec  # the loop has written and shown this record when the run asks for the next one
            if rec["type"] == "segment":
                n += 1
                if n == after_segment:
                    seen.append(screen.getvalue())

    monkeypatch.setattr(CorpusRun, "records", records)
    res = runner.invoke(app, ["run", *map(str, args), "--format", "table", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return res, screen.getvalue(), seen[0]


@pytest.mark.parametrize("progress", [False, True], ids=["quiet stderr", "bar on the same terminal"])
@pytest.mark.parametrize("width", [80, 120])
def test_segment_rows_show_as_segments_finish(monkeypatch, tiny_model_dir, doc_path, width, progress):
    res, text, early = terminal_run(monkeypatch, [doc_path, "--model", tiny_model_dir, "-s", 16, "--max-tokens", 120],
                                    width, progress)
    early, text = plain(early), plain(text)
    assert "segments" in early and "┃ seg ┃" in early and "summary" not in early, early
    assert re.search(r"│ +0 │ +0–16 │", early) and re.search(r"│ +1 │ +16–32 │", early), early
    assert not re.search(r"│ +2 │", early), early
    lines = [line for line in re.split(r"[\r\n]", text) if "│" in line or "┃" in line]
    assert all(len(line) <= width for line in lines), text
    assert text.count("┃ seg ┃") == 1 and text.index("summary") > text.index("└"), text
    assert "…" not in text and "bits per byte" in text and res.stdout == ""
    rows = [line for line in lines if re.match(r"│ +\d+ │", line)]
    assert len(rows) == 8, text  # 120 tokens: 8 segments of 16, each shown once


def test_segment_numbers_are_whole_at_80_columns(monkeypatch, tiny_model_dir, doc_path):
    """The run's own records: every loss and bits/byte whole in its row, the token ranges too."""
    got: list[dict] = []
    real_write = cli_output.Writer.write
    monkeypatch.setattr(cli_output.Writer, "write", lambda self, rec: (got.append(clean(rec)), real_write(self, rec))[1])
    _, text, _ = terminal_run(monkeypatch, [doc_path, "--model", tiny_model_dir, "-s", 16, "--max-tokens", 120], 80,
                              progress=True)
    text = plain(text)
    for r in (r for r in got if r["type"] == "segment"):
        assert re.search(rf"│ +{r['segment']} │ +{r['token_start']}–{r['token_end']} │ +{re.escape(fmt_num(r['loss']))} │"
                         rf".*│ +{re.escape(fmt_num(r['bits_per_byte']))} │", text), (r, text)


def test_a_corpus_shows_a_row_per_document_as_it_finishes(monkeypatch, tiny_model_dir, two_docs):
    monkeypatch.chdir(two_docs[0].parent)  # short names: a long temporary path would wrap in its column
    a, b = two_docs[0].name, two_docs[1].name
    res, text, early = terminal_run(monkeypatch, [a, b, "--model", tiny_model_dir, "-s", 16, "--max-tokens", 48], 120,
                                    progress=True, after_segment=4)  # 3 segments each: the 4th is the second document's
    early, text = plain(early), plain(text)
    assert "documents" in early and re.search(rf"│ 0 │ {re.escape(str(a))} +│ +48 │", early), early
    assert str(b) not in early and "summary" not in early, early
    assert re.search(rf"│ 1 │ {re.escape(str(b))} +│ +48 │", text) and text.count("┃ # ┃") == 1, text
    assert "│ documents " in text and all(len(line) <= 120 for line in text.splitlines()), text


# -- not a terminal: as before ----------------------------------------------------------------------------------------

def whole_table(records: list[dict]) -> str:
    """What the renderer that draws the whole table writes for `records`, as Writer.close gives it a file or pipe."""
    spark = SparkBins()
    for r in records:
        if r["type"] == "segment":
            spark.add(r["nll"], r["tokens"])
    buf = io.StringIO()
    run_cli.render_run_table(PipeConsole(file=buf, width=200), records, spark)
    return buf.getvalue()


@pytest.mark.parametrize("where", ["stdout", "file"])
@pytest.mark.parametrize("docs", ["one", "corpus"])
def test_not_a_terminal_gets_the_whole_table_at_the_end(monkeypatch, tiny_model_dir, doc_path, two_docs, tmp_path,
                                                         where, docs):
    """A pipe or a file (with a progress bar on the terminal beside it): the whole table, as the renderer draws it
    from the same records."""
    monkeypatch.setattr(cli_options, "err_console", Console(file=io.StringIO(), force_terminal=True, width=80))
    got: list[dict] = []
    real_write = cli_output.Writer.write

    def write(self, rec):
        got.append(clean(rec))
        return real_write(self, rec)

    monkeypatch.setattr(cli_output.Writer, "write", write)
    out = tmp_path / "t.txt"
    inputs = [doc_path] if docs == "one" else list(two_docs)
    res = runner.invoke(app, ["run", *map(str, inputs), "--model", str(tiny_model_dir), "-s", "16", "--max-tokens", "64",
                              "--format", "table", "--device", "cpu", *(["-o", str(out)] if where == "file" else [])])
    assert res.exit_code == 0, res.output
    written = out.read_text(encoding="utf-8") if where == "file" else res.stdout
    assert written == whole_table(got)


# -- a real terminal: a slow pipe, then a signal ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_rows_from_a_slow_pipe_show_before_its_end_and_stay_when_stopped(tiny_model_dir, doc_path, sig):
    """`segcli run -` on an 80-column terminal, stdin a pipe still open: the rows of the text sent so far show
    (with the bar), then a signal ends the run: those rows stay, then the one interrupted line, exit 128 + n."""
    two_rows = lambda t: re.search(r"│ +1 │ +16–32 │", t) is not None  # noqa: E731
    text = stopped_on_a_terminal(["run", "-", "--model", str(tiny_model_dir), "-s", "16", "--device", "cpu"], two_rows,
                                 sig, ROOT, feed=doc_path.read_bytes()[:1500])
    assert re.search(r"│ +0 │ +0–16 │", text) and re.search(r"│ +1 │ +16–32 │", text) and "summary —" not in text, text
    assert "…" not in text, text
