"""Issue 32, `segcli plot` reads safely: records streamed in bounded memory (a 500 MB file peaked at 4.5 GB), and
every record it draws checked for its fields and their types (a loss as a string, a null memory drew a policy
called "?" and a flat memory line, exit 0): one line naming the file, line and field, exit 2, no picture."""

from __future__ import annotations

import io
import json
import math
import tracemalloc

import numpy as np
import pytest
from typer.testing import CliRunner

from segcli import plot as plots
from segcli.cli import app

runner = CliRunner()

SEGMENT = {"type": "segment", "document": "d.txt", "segment": 0, "segment_size": 8, "token_start": 0, "token_end": 8,
           "tokens": 8, "bytes": 30, "nll": 20.0, "loss": 2.5, "ppl": 12.18, "seconds": 0.01, "tokens_per_s": 800.0,
           "memory": {"policy": "fifo", "slots": 8, "capacity": 16, "bytes": 100, "attn_mass_memory": 0.5}}


def seg(i: int, **changes) -> dict:
    """The i-th segment of 8 tokens."""
    return {**SEGMENT, "segment": i, "token_start": 8 * i, "token_end": 8 * (i + 1), **changes}


def write(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def one_line(res, needle: str, code: int = 2) -> None:
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == code and len(lines) == 1, res.output
    assert lines[0].startswith("segcli: error: ") and needle in lines[0], lines[0]


@pytest.fixture(autouse=True)
def _matplotlib():
    pytest.importorskip("matplotlib")


# -- records of the wrong shape: one line, exit 2, no picture -----------------------------------------------------------

@pytest.mark.parametrize("bad, needle", [
    ({"loss": "2.5"}, "r.jsonl:3: segment field 'loss' must be a number or null, got \"2.5\""),
    ({"memory": None}, "r.jsonl:3: segment field 'memory' must be an object, got null"),
    ({"memory": {**SEGMENT["memory"], "policy": None}}, "r.jsonl:3: segment memory field 'policy' must be a string, got null"),
    ({"memory": {k: v for k, v in SEGMENT["memory"].items() if k != "policy"}}, "r.jsonl:3: segment memory record has no 'policy'"),
    ({"memory": {**SEGMENT["memory"], "bytes": None}}, "r.jsonl:3: segment memory field 'bytes' must be an integer, got null"),
    ({"memory": {**SEGMENT["memory"], "bytes": -1}}, "r.jsonl:3: segment memory field 'bytes' must be at least 0"),
    ({"memory": {**SEGMENT["memory"], "attn_mass_memory": "high"}}, "segment memory field 'attn_mass_memory' must be a number"),
    ({"document": None}, "r.jsonl:3: segment field 'document' must be a string, got null"),
    ({"document": 7}, "r.jsonl:3: segment field 'document' must be a string, got 7"),
    ({"nll": True}, "r.jsonl:3: segment field 'nll' must be a number or null, got true"),
    ({"type": 5}, "r.jsonl:3: field 'type' must be a string, got 5"),
], ids=["loss-str", "memory-null", "policy-null", "no-policy", "bytes-null", "bytes-negative", "mass-str",
        "document-null", "document-int", "nll-bool", "type-int"])
def test_wrong_types_are_one_line_exit_2(tmp_path, bad, needle):
    results = tmp_path / "r.jsonl"
    write(results, [seg(0), seg(1), seg(2, **bad), seg(3)])
    one_line(runner.invoke(app, ["plot", str(results), "-o", str(tmp_path / "x.png")]), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]  # no picture, no temporary file


def test_row_and_probe_types(tmp_path):
    results = tmp_path / "r.jsonl"
    write(results, [{"type": "row", "policy": "fifo", "segment_size": 8, "loss": "low"}])
    one_line(runner.invoke(app, ["plot", str(results), "-o", str(tmp_path / "x.png")]),
             "r.jsonl:1: row field 'loss' must be a number or null, got \"low\"")
    probe = {"type": "probe", "task": "passkey", "length": 100, "depth": 50, "policy": "fifo", "segment_size": 8,
             "correct": True, "model": ["m"]}
    write(results, [probe])
    one_line(runner.invoke(app, ["plot", str(results), "-o", str(tmp_path / "x.png")]),
             "r.jsonl:1: probe field 'model' must be a string or null")
    assert not (tmp_path / "x.png").exists()


def test_bad_bytes_and_long_lines_name_the_line(tmp_path, monkeypatch):
    results = tmp_path / "r.jsonl"
    results.write_bytes(json.dumps(seg(0)).encode() + b"\n" + json.dumps(seg(1)).encode()[:-2] + b"\xff}\n")
    one_line(runner.invoke(app, ["plot", str(results), "-o", str(tmp_path / "x.png")]), "r.jsonl:2: not UTF-8 text")
    monkeypatch.setattr(plots, "MAX_LINE", 1000)
    write(results, [seg(0), seg(1, document="x" * 2000)])
    one_line(runner.invoke(app, ["plot", str(results), "-o", str(tmp_path / "x.png")]),
             "r.jsonl:2: a line longer than")
    assert not (tmp_path / "x.png").exists()


def test_grouped_json_is_read_whole_up_to_a_cap(tmp_path, monkeypatch):
    grouped = tmp_path / "g.json"
    grouped.write_text(json.dumps({"segments": [seg(0), seg(1)], "summary": {"type": "summary"}}, indent=1))
    res = runner.invoke(app, ["plot", str(grouped), "-o", str(tmp_path / "g.png"), "-q"])
    assert res.exit_code == 0, res.output
    grouped.write_text(json.dumps({"segments": [seg(0), seg(1, loss="x")]}, indent=1))
    one_line(runner.invoke(app, ["plot", str(grouped), "-o", str(tmp_path / "x.png")]),
             "g.json: segments[1]: segment field 'loss' must be a number")
    monkeypatch.setattr(plots, "MAX_JSON", 100)
    grouped.write_text(json.dumps({"segments": [seg(0), seg(1)]}, indent=1))
    one_line(runner.invoke(app, ["plot", str(grouped), "-o", str(tmp_path / "x.png")]),
             "g.json: a --format json file over")
    assert not (tmp_path / "x.png").exists()


def test_stdin_is_streamed_too(tmp_path):
    text = "".join(json.dumps(seg(i)) + "\n" for i in range(50))
    res = runner.invoke(app, ["plot", "-", "-o", str(tmp_path / "s.png"), "-q"], input=text)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["plot", "-", "-o", str(tmp_path / "t.png")], input=text + json.dumps(seg(50, tokens="8")))
    one_line(res, "<stdin>:51: segment field 'tokens' must be an integer")


# -- bounded memory -------------------------------------------------------------------------------------------------------

def big_file(path, n: int) -> None:
    """n segment records (~350 bytes each) of one run, then a summary."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps(seg(i, nll=16.0 + (i % 7), memory={**SEGMENT["memory"], "bytes": 100 + i % 5})) + "\n")
        f.write('{"type": "summary"}\n')


def peak_reading(path) -> tuple[int, plots.Results]:
    """Peak Python memory (bytes) while reading a results file the way `segcli plot` does."""
    results = plots.Results()
    tracemalloc.start()
    try:
        with open(path, "rb") as f:
            for r in plots.read_records(f, str(path)):
                results.add(r)
        return tracemalloc.get_traced_memory()[1], results
    finally:
        tracemalloc.stop()


def test_reading_does_not_grow_with_the_file(tmp_path):
    """4x the records, the same peak: the records are folded into bins as they are read, not kept (the old reader
    held every record: ~2 KB each, 30+ MB more for the larger file here)."""
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    big_file(small, 5_000)
    big_file(large, 20_000)
    peak_small, _ = peak_reading(small)
    peak_large, results = peak_reading(large)
    assert peak_large - peak_small < 1_000_000, (peak_small, peak_large)
    assert peak_large < 4_000_000, peak_large
    (s,) = results.series_list()
    assert len(s.counts) <= plots.MAX_BINS and s.segments == 20_000  # every segment counted, in bounded bins
    assert sum(s.tokens) == 8 * 20_000 and s.token_end[-1] == 8 * 20_000
    assert math.isclose(sum(s.nll_sum), sum(16.0 + (i % 7) for i in range(20_000)))
    assert max(s.memory_bytes) == 104 and min(s.memory_bytes) == 104  # each bin: the most held in it
    res = runner.invoke(app, ["plot", str(large), "-o", str(tmp_path / "big.png"), "-q"])
    assert res.exit_code == 0, res.output


def test_bins_equal_segments_until_full_then_merge():
    """Up to MAX_BINS segments a line is the segments themselves (the picture as before); beyond, neighbours merge
    pairwise, token-weighted, with the loss over a window the same wherever the window spans whole bins."""
    s = plots.Series(0, "d", "fifo", 8, 16)
    values = [(8 * (i + 1), 8, float(i % 5) * 8, 0.25 * (i % 3), 10 * i) for i in range(plots.MAX_BINS)]
    for v in values:
        s.add(*v)
    assert s.per_bin == 1 and s.token_end == [v[0] for v in values] and s.nll == [v[2] for v in values]
    loss = plots.rolling(s, s.nll_sum, s.nll_tokens, 64)  # 8 segments a window
    per_token = np.array([v[2] / 8 for v in values])
    expected = np.array([per_token[max(0, i - 7): i + 1].mean() for i in range(len(values))])
    assert np.allclose(loss, expected)
    s.add(8 * (plots.MAX_BINS + 1), 8, None, None, 5)  # one more: the bins halve
    assert s.per_bin == 2 and len(s.counts) == plots.MAX_BINS // 2 + 1 and s.segments == plots.MAX_BINS + 1
    assert s.token_end[:2] == [16, 32] and s.tokens[:2] == [16, 16] and s.nll_tokens[-1] == 0
    assert s.memory_bytes[:2] == [10, 30]
    merged = plots.rolling(s, s.nll_sum, s.nll_tokens, 64)
    assert np.allclose(merged[3:-1], expected[7::2])  # windows of whole bins: the same means
    assert not math.isnan(merged[-1])  # the last window still holds losses (the new segment's is null)


def test_many_series_are_counted_not_kept():
    results = plots.Results()
    for doc in range(40):
        for i in range(3):
            results.add(seg(i, document=f"doc{doc}.txt"))
    assert len(results.series) == plots.MAX_SERIES and results.n_series == 40
    fig = plots.figure(results)
    assert fig._suptitle.get_text().endswith(f"(first {plots.MAX_SERIES} of 40 series)")


def test_parse_records_and_read_records_agree():
    text = "".join(json.dumps(seg(i)) + "\n" for i in range(5))
    assert plots.parse_records(text, "t") == list(plots.read_records(io.BytesIO(text.encode()), "t")) == \
        [seg(i) for i in range(5)]
