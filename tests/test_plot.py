"""Pictures (`segcli plot`, `compare --plot`) and the terminal sparkline."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from typer.testing import CliRunner

from segcli.cli import app
from segcli.cli.output import SparkBins, sparkline
from segcli.plot import parse_records, segment_series

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return width, height


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return ["--model", tiny_model_dir, "--device", "cpu", "-q", "--max-tokens", 200, "--format", "jsonl"]


@pytest.fixture(scope="module")
def two_runs(base, doc_path, tmp_path_factory):
    """Two runs' JSON Lines concatenated into one file, as a shell `>>` would."""
    out = tmp_path_factory.mktemp("plot") / "runs.jsonl"
    text = ""
    for policy in (["--memory", "fifo", "--memory-size", 48], ["--memory", "none"]):
        res = invoke("run", doc_path, *base, "-s", 16, *policy)
        assert res.exit_code == 0, res.output
        text += res.stdout
    out.write_text(text)
    return out


def test_plot_run_results_is_a_png(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "loss.png"
    res = invoke("plot", two_runs, "-o", target, "-q")
    assert res.exit_code == 0, res.output
    width, height = png_size(target)
    assert width >= 600 and height >= 400 and target.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # written atomically, nothing left beside it


def test_compare_plot_in_one_go(base, doc_path, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "compare.png"
    res = invoke("compare", doc_path, *base, "--segment-sizes", "8,64", "--memory", "fifo,none", "--plot", target)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.stdout.splitlines() if '"row"' in x]
    assert len(rows) == 4
    width, height = png_size(target)
    assert width > 0 and height > 0
    again = tmp_path / "again.svg"  # the same picture from the saved output
    (tmp_path / "c.jsonl").write_text(res.stdout)
    assert invoke("plot", tmp_path / "c.jsonl", "-o", again, "-q").exit_code == 0
    assert again.read_text().lstrip().startswith("<?xml")


def test_segments_grouped_per_run_with_distinct_labels(two_runs):
    series = segment_series(parse_records(two_runs.read_text(), "runs"))
    assert [s.label for s in series] == ["fifo n_s=16", "none n_s=16"]
    assert all(len(s.nll) == 13 and s.token_end[-1] == 200 for s in series)
    twice = two_runs.read_text().split("\n")
    fifo_only = "\n".join(twice[: len(twice) // 2]) + "\n"
    series = segment_series(parse_records(fifo_only + fifo_only, "twice"))
    assert [s.label for s in series] == ["fifo n_s=16 cap=48 (run 1)", "fifo n_s=16 cap=48 (run 2)"]


def test_plot_errors(two_runs, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "segment"}\nnot json\n')
    for args, needle in [
        ([bad, "-o", tmp_path / "x.png"], "bad.jsonl:2: not valid JSON"),
        ([two_runs, "-o", tmp_path / "x.gif"], ".png, .svg, .pdf"),
        ([two_runs, "-o", tmp_path / "no" / "x.png"], "does not exist"),
        ([tmp_path / "missing.jsonl", "-o", tmp_path / "x.png"], "no such file"),
    ]:
        res = invoke("plot", *args)
        assert res.exit_code == 2 and needle in res.output, res.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    res = invoke("plot", two_runs, "-o", tmp_path / "x.png")
    assert res.exit_code == 2 and "pip install 'segcli[plot]'" in res.output
    assert not (tmp_path / "x.png").exists()


def test_sparkline_and_bounded_bins():
    assert sparkline([1.0, 2.0, 3.0, None, 9.0]) == "▁▂▃ █"
    assert sparkline([]) == "" and sparkline([2.0, 2.0]) == "▁▁"
    bins = SparkBins(width=8)
    for i in range(1000):
        bins.add(float(i % 7), 2)
    assert 4 <= len(bins.values()) <= 8 and bins.segments == 1000  # bounded, every segment counted
    assert "1000 segments" in bins.caption()
    one = SparkBins(width=8)
    one.add(6.0, 3)
    one.add(3.0, 1)
    assert one.values() == [2.0, 3.0]  # token-weighted mean nll per token
