"""The policies that evict by attention (tova, h2o, snapkv) on the attention layers of hybrids: the recurrent backend
switches the model to eager attention (the only one that returns probabilities) and segcli.hf's hooks hand each
attention module's probabilities to its policy layer, as for a transformer (tests/hf/test_hf_scored.py checks that
against the native model eviction for eviction). Here: a memory larger than the document is `full`, a small one holds
its budget and evicts, a file carries the scores (tests/recurrent/test_hybrid_memory_files.py), and a family whose
attention hands no probabilities on (zamba's shared block, zamba2's) is one line, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_recurrent_stream import REL, model_maker, run  # noqa: E402

from conftest import excerpt  # noqa: E402

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

HYBRIDS = ("jamba", "falcon_h1", "bamba", "qwen3_next", "lfm2", "granitemoehybrid", "nemotron_h")
SIZES = {"tova": [], "h2o": ["--recent-tokens", 3], "snapkv": ["--window", 2]}


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    return excerpt(tmp_path_factory, "python_docs.txt", 400, "scoreddoc")


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    return model_maker(tmp_path_factory)


@pytest.fixture(scope="module")
def full_run(hybrid_dir, doc):
    """name -> the family's records under `full` at n_s 8 (streamed once, compared with each scored policy)."""
    made: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in made:
            made[name] = run(hybrid_dir(name), doc, "--memory", "full", "-s", 8)
        return made[name]

    return get


def nll(records: list[dict]) -> torch.Tensor:
    return torch.tensor([r["nll"] for r in records if r["type"] == "segment"], dtype=torch.float64)


@pytest.mark.parametrize("policy", list(SIZES))
@pytest.mark.parametrize("name", HYBRIDS)
def test_scored_policies_on_hybrid_attention_layers(hybrid_dir, full_run, doc, name, policy):
    path = hybrid_dir(name)
    full = full_run(name)
    large = run(path, doc, "--memory", policy, "--memory-size", 4096, *SIZES[policy], "-s", 8)
    assert float((nll(large) - nll(full)).abs().max()) <= REL * float(nll(full).abs().max())  # eager vs sdpa rounding
    small = [r for r in run(path, doc, "--memory", policy, "--memory-size", 8, *SIZES[policy], "-s", 8)
             if r["type"] == "segment"]
    assert small[-1]["memory"]["slots"] == 8 and small[-1]["memory"]["capacity"] == 8
    assert any(r["memory"]["evicted"] for r in small)
    assert float((nll(small) - nll(full)).abs().max()) > 1e-3  # it forgot something


@pytest.mark.parametrize("name", ["zamba", "zamba2"])
def test_a_hybrid_whose_attention_hands_no_probabilities_is_refused(hybrid_dir, doc, name):
    from typer.testing import CliRunner

    from segcli.cli import app

    res = CliRunner().invoke(app, ["run", str(doc), "--model", str(hybrid_dir(name)), "-q", "--device", "cpu",
                                   "--memory", "tova", "--memory-size", 8])
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith(f"segcli: error: {name}: its attention modules return no attention probabilities")
