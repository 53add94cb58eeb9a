"""Recurrent memory files (segcli/backends/recurrent_files.py): a stream's state saved after document A and loaded to
continue document B gives B the numbers it gets right after A in one stream, for every family, through a real
safetensors round trip; a state that this model could not have produced is one ValueError line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recurrent_families import FAMILIES  # noqa: E402
from test_recurrent_stream import save_model  # noqa: E402

from segcli.config import RunConfig  # noqa: E402

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

IDS = torch.randint(1, 8000, (1, 70), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from segcli.backends import load_backend

    made = {}

    def get(name: str):
        if name not in made:
            path = save_model(name, tmp_path_factory.mktemp(name) / "model")
            cfg = RunConfig(model=str(path), device="cpu", memory="full")
            made[name] = load_backend(cfg), cfg
        return made[name]

    return get


def stream(backend, memory, *cuts):
    out = []
    with torch.inference_mode():
        for a, b in zip(cuts, cuts[1:]):
            logits, memory, _ = backend.step(IDS[:, a:b], memory)
            out.append(logits)
    return torch.cat(out, 1), memory


def saved(backend, memory):
    from safetensors.torch import load, save

    from segcli.backends.recurrent_files import save_state

    tensors, body = save_state(backend, memory)
    return load(save(tensors)), body


@pytest.mark.parametrize("name", list(FAMILIES))
def test_save_then_load_continues_the_stream(backends, name):
    from segcli.backends.recurrent_files import load_state

    backend, cfg = backends(name)
    one, _ = stream(backend, backend.new_memory(cfg), 0, 20, 33, 70)  # A then B in one stream
    _, memory = stream(backend, backend.new_memory(cfg), 0, 20, 33)  # A, saved
    tensors, body = saved(backend, memory)
    loaded = load_state(backend, cfg, body, tensors)
    assert (loaded.seen, loaded.since_reset) == (33, 33)
    two, _ = stream(backend, loaded, 33, 70)  # B from the file
    torch.testing.assert_close(two, one[:, 33:], rtol=0, atol=1e-5)


def test_a_state_this_model_could_not_have_made_is_refused(backends):
    from segcli.backends.recurrent_files import load_state

    backend, cfg = backends("jamba")
    _, memory = stream(backend, backend.new_memory(cfg), 0, 9)
    tensors, body = saved(backend, memory)
    conv = next(k for k in tensors if k.endswith(".conv0"))
    keys = next(k for k in tensors if k.endswith(".keys"))

    def refused(match, body=body, **changed):
        t = {**tensors, **changed}
        with pytest.raises(ValueError, match=match):
            load_state(backend, cfg, body, t)

    refused(r"has shape \[", **{conv: tensors[conv][..., :2]})
    refused(r"is float64, expected float32", **{conv: tensors[conv].double()})
    refused(r"is missing", body={**body, "tensors": body["tensors"] + ["layer0.ghost"]})
    refused(r"saved from a mamba model", body={**body, "family": "mamba"})
    refused(r"seen is -1", body={**body, "seen": -1})
    bad = {k: v for k, v in tensors.items() if k != conv}
    with pytest.raises(ValueError, match="is missing"):
        load_state(backend, cfg, body, bad)
    longer = torch.cat([tensors[keys]] * 3, 2)  # a key-value cache may hold any number of pairs
    vals = keys.replace(".keys", ".values")
    assert load_state(backend, cfg, body, {**tensors, keys: longer, vals: torch.cat([tensors[vals]] * 3, 2)})
