"""Memory files of hybrids under bounded policies on their attention layers (segcli/state.py, body "recurrent" with
"attention"): the recurrent layers' own states and the segcli.hf policy states of the attention layers (a layer
with both, zamba2's and falcon_h1's, saves both) carried through a real file give B the numbers of `run A B`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
import test_inputs_and_errors as reliability  # noqa: E402
from test_inputs_and_errors import invoke, records, save_then_load  # noqa: E402
from test_recurrent_stream import model_maker  # noqa: E402

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

HYBRIDS = ("jamba", "zamba2", "falcon_h1")  # attention-only, hybrid (attention + mamba) and parallel layers
BOUNDED = ("fifo", "sink", "xl", "compressive", "average", "keynorm", "tova", "h2o")
# Every bounded policy on jamba; the two families whose layers hold both kinds of state, under policies of each kind
# of attention state (pairs, pooled slots, true positions, running means, scores). A policy's state is segcli.hf's
# whatever the family; what a family changes is which layers save which parts.
ROUND_TRIPS = ([("jamba", p) for p in BOUNDED] + [("zamba2", p) for p in ("fifo", "compressive", "keynorm")]
               + [("falcon_h1", p) for p in ("sink", "average", "h2o")])
SCORED_REFUSED = {"zamba2"}  # its attention hands no probabilities on (tests/recurrent/test_hybrid_scored.py)


@pytest.fixture(autouse=True)
def uniform_budget(monkeypatch):
    monkeypatch.setitem(reliability.SIZES, "layer_budget", "uniform")  # segcli.hf refuses per-layer budgets


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    return model_maker(tmp_path_factory)


def test_the_round_trips_cover_every_family_and_policy():
    assert {n for n, _ in ROUND_TRIPS} == set(HYBRIDS) and {p for _, p in ROUND_TRIPS} == set(BOUNDED)
    assert not [(n, p) for n, p in ROUND_TRIPS if p in ("tova", "h2o") and n in SCORED_REFUSED]


@pytest.mark.parametrize("name,policy", ROUND_TRIPS)
def test_hybrid_save_then_load_equals_one_run(hybrid_dir, two_docs, tmp_path, name, policy):
    meta = save_then_load(["--model", hybrid_dir(name), "--device", "cpu", "-q"], two_docs, tmp_path, policy)
    attention = [d for d in meta["attention"]["layers"] if d is not None]
    assert attention and all(d["seen"] == 90 for d in attention)
    saved = meta["recurrent"]["tensors"]  # the recurrent parts only: no attention keys beside the policy states
    assert saved and not any(t.endswith((".keys", ".values")) for t in saved)


def test_a_hybrid_file_without_its_attention_layers_is_refused(hybrid_dir, two_docs, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    a, b = two_docs
    common = ["--model", hybrid_dir("jamba"), "--device", "cpu", "-q", "--memory", "fifo", "--memory-size", 24,
              "-s", 16, "--max-tokens", 40]
    mem = tmp_path / "m.safetensors"
    records(invoke("run", a, *common, "--save-memory", mem))
    with safe_open(str(mem), "pt") as f:
        meta = json.loads(f.metadata()["segcli"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("attention")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"segcli": json.dumps(meta)})
    res = invoke("run", b, *common, "--load-memory", tmp_path / "bad.safetensors")
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "attention layer format None" in lines[0], res.output
    res = invoke("run", b, *[c if c != "fifo" else "sink" for c in common], "--load-memory", mem)
    assert res.exit_code == 2 and "saved with policy fifo" in res.output
