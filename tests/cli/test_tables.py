"""Issue 31, tables at 80 columns: run's and compare's terminal tables never cut a number ('3.3…'); columns are
dropped, lowest priority first, and named below the table; below a width the rows are shown one by one."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from segcli.cli import app
from segcli.cli.compare import render_compare_table
from segcli.cli.output import Col, SparkBins, fitted_table, fmt_bytes, fmt_num, print_fitted
from segcli.cli.run import render_run_table

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def records(*args) -> list[dict]:
    res = runner.invoke(app, [*map(str, args), "-f", "jsonl", "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return [json.loads(x) for x in res.stdout.splitlines() if x.strip()]


def render(fn, width: int) -> str:
    buf = io.StringIO()
    fn(Console(file=buf, width=width, force_terminal=True, color_system="truecolor"))
    return ANSI.sub("", buf.getvalue())


def assert_whole(text: str, width: int, numbers: list[str]) -> None:
    assert "…" not in text, text
    assert all(len(line) <= width for line in text.splitlines()), text
    for n in numbers:
        assert re.search(rf"(^|[\s│(]){re.escape(n)}($|[\s│)])", text, re.M), (n, text)


@pytest.fixture(scope="module")
def run_records(tiny_model_dir, doc_path):
    return records("run", doc_path, "--model", tiny_model_dir, "-s", 16, "--max-tokens", 120)


@pytest.fixture(scope="module")
def compare_records(tiny_model_dir, doc_path):
    return records("compare", doc_path, "--model", tiny_model_dir, "--segment-sizes", "8,32", "--memory", "fifo,sink",
                   "--reference", "full", "--max-tokens", 96)


@pytest.mark.parametrize("width", [80, 60, 40, 120])
def test_run_table_keeps_every_number_whole(run_records, width):
    spark = SparkBins()
    segs = [r for r in run_records if r["type"] == "segment"]
    for r in segs:
        spark.add(r["nll"], r["tokens"])
    text = render(lambda c: render_run_table(c, run_records, spark), width)
    (summary,) = [r for r in run_records if r["type"] == "summary"]
    assert_whole(text, width, [fmt_num(r["loss"]) for r in segs] + [fmt_num(r["bits_per_byte"]) for r in segs]
                 + [f"{fmt_num(summary['loss'])} ± {fmt_num(summary['loss_stderr'])}", fmt_num(summary["bits_per_byte"])])
    if width >= 80:
        assert all(f"{r['token_start']}–{r['token_end']}" in text for r in segs), text
        assert "tok/s" in text


@pytest.mark.parametrize("width", [80, 60, 40, 120, 180])
def test_compare_table_keeps_every_number_whole(compare_records, width):
    rows = [r for r in compare_records if r["type"] == "row"]
    text = render(lambda c: render_compare_table(c, compare_records), width)
    assert_whole(text, width, [fmt_num(r["loss"]) for r in rows] + [fmt_num(r["bits_per_byte"]) for r in rows]
                 + [f"{fmt_num(r['kl_div'])} ± {fmt_num(r['kl_div_stderr'])}" for r in rows])
    if width >= 80:
        assert "policy" in text and "bits/" in text  # headers whole (wrapped at '/', never 'pol…')
    if width >= 180:
        assert "not shown" not in text and all(fmt_bytes(r["memory_bytes"]) in text for r in rows), text


def test_columns_go_lowest_priority_first_and_are_named():
    cols = [Col("a"), Col("b", drop=2), Col("c", drop=1)]
    rows = [["1.2345", "22.2222", "333.3333"]]
    table, dropped = fitted_table("t", cols, rows, 30)
    assert table is not None and dropped == ["b"]
    text = render(lambda c: print_fitted(c, "t", cols, rows), 30)
    assert "333.3333" in text and "22.2222" not in text and "not shown at this width: b" in text


def test_too_narrow_for_the_essential_columns_shows_each_row_whole():
    cols = [Col("loss"), Col("bits/byte")]
    rows = [["3.2750", "1.9285"], ["12345.6789", "0.0001"]]
    table, _ = fitted_table("t", cols, rows, 12)
    assert table is None
    text = render(lambda c: print_fitted(c, "t", cols, rows), 20)
    assert "…" not in text and all(n in text for row in rows for n in row), text
