"""JSON Lines records: `jsonl_line` is the text of `json.dumps(clean(record))`, with and without non-finite floats."""

from __future__ import annotations

import json

from segcli.cli.output import clean, jsonl_line


def test_jsonl_line_is_the_cleaned_record():
    records = [
        {"type": "segment", "nll": 3.25, "ppl": 25.79, "memory": {"slots": 4, "capacity": None, "mass": 0.5},
         "t": (1, 2), "text": "ü→"},
        {"type": "segment", "ppl": float("inf"), "memory": {"key_norm": float("nan"), "list": [1.0, float("-inf")]}},
        {"type": "summary", "loss_by_position": {"loss": [None, 2.0]}, "word_ppl": None},
    ]
    for r in records:
        line = jsonl_line(r)
        assert line == json.dumps(clean(r), ensure_ascii=False) + "\n"
        assert json.loads(line) == clean(r) | {k: list(v) for k, v in r.items() if isinstance(v, tuple)}
    assert json.loads(jsonl_line(records[1]))["memory"] == {"key_norm": None, "list": [1.0, None]}
