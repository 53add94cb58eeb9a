"""Issue 6 §7: random option values and random bytes never crash the CLI.

Every outcome is exit 0, 1 or 2 with no traceback; a successful JSON Lines run
prints only whole JSON lines ending in a summary.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from segcli.cli import app
from segcli.memory import POLICY_NAMES

runner = CliRunner()
_counter = itertools.count()

maybe_int = lambda lo, hi: st.one_of(st.none(), st.integers(lo, hi), st.sampled_from(["x", "1.5", "", "1e3"]))  # noqa: E731

documents = st.one_of(
    st.binary(max_size=300),  # anything: empty, NUL, invalid UTF-8
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),  # any valid UTF-8, surrogates excluded
    st.text(alphabet=" \n\tab.é€😀<|>", max_size=200).map(lambda t: t.encode("utf-8")),  # whitespace and specials
)

options = st.fixed_dictionaries({
    "--memory": st.one_of(st.none(), st.sampled_from([*POLICY_NAMES, "lru", ""])),
    "--segment-size": maybe_int(-3, 70),
    "--memory-size": maybe_int(-2, 80),
    "--sink-tokens": maybe_int(-2, 8),
    "--compress-rate": maybe_int(-1, 6),
    "--compressed-size": maybe_int(-1, 10),
    "--max-tokens": st.one_of(st.integers(-1, 48), st.just("many")),
    "--errors": st.one_of(st.none(), st.sampled_from(["strict", "replace", "ignore"])),
    "--format": st.one_of(st.none(), st.sampled_from(["jsonl", "json", "csv", "table", "xml"])),
    "--dtype": st.one_of(st.none(), st.sampled_from(["float32", "bfloat16", "int8"])),
    "--seed": maybe_int(-5, 5),
})


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents, opts=options, use_stdin=st.booleans(), per_token=st.booleans())
def test_cli_never_crashes(tiny_model_dir, fuzz_dir, doc, opts, use_stdin, per_token):
    args = ["run"]
    if use_stdin:
        args.append("-")
    else:
        path = fuzz_dir / f"doc{next(_counter)}.txt"
        path.write_bytes(doc)
        args.append(str(path))
    args += ["--model", str(tiny_model_dir), "--device", "cpu", "-q"]
    for k, v in opts.items():
        if v is not None:
            args += [k, str(v)]
    if per_token:
        args.append("--per-token")
    res = runner.invoke(app, args, input=doc if use_stdin else None)
    assert res.exit_code in (0, 1, 2), (args, res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
    assert "Traceback" not in res.output, (args, res.output)
    if res.exit_code != 0:
        assert res.stdout == "" or opts["--format"] in (None, "jsonl", "csv"), (args, res.stdout)
    elif opts["--format"] in (None, "jsonl"):
        recs = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
        assert recs and recs[-1]["type"] == "summary"
