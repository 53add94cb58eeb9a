"""Scored policies on a model whose later layers read an earlier layer's keys and values (gemma3n_text's
shared_kv_states): what a cache layer's `update` returned must stay what it was until the forward ends.

At a token step the native model lets tova, h2o and snapkv close their buffers up in place once attention has
read them (`segcli.memory.scored.close_up`). On a Hugging Face model segcli evicts after the layer's attention,
from a forward hook, while gemma3n's shared layers still hold [memory; segment] of the layer that stored it: an
eviction in place there would hand them a memory with the dropped row gone and the newest one twice. The
reference is the same stream with `close_up` disabled (every eviction a copy, as before the in-place path).
"""

from __future__ import annotations

import pytest
import torch

from hf_families import model_of
from segcli.hf import cache_kwarg, make_cache

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

SIZES = {"tova": dict(memory_size=6), "h2o": dict(memory_size=6, recent_tokens=2),
         "snapkv": dict(memory_size=6, window=2)}


@pytest.fixture(scope="module")
def shared_kv_model():
    # every layer full attention: windowed layers refuse these policies; KV sharing stays (num_kv_shared_layers)
    model = model_of("gemma3n_text", "eager", layer_types=["full_attention"] * 4)
    assert getattr(model.config, "num_kv_shared_layers", 0) > 0
    return model


def token_logits(model, policy: str, ids: torch.Tensor) -> torch.Tensor:
    cache = make_cache(model, policy, **SIZES[policy])
    out = []
    with torch.inference_mode():
        for s in range(ids.shape[1]):
            out.append(model(input_ids=ids[:, s : s + 1], position_ids=torch.tensor([[s]]), use_cache=True,
                             **{cache_kwarg(model): cache}).logits.clone())
    return torch.cat(out, 1)  # (1, T, V)


@pytest.mark.parametrize("policy", list(SIZES))
def test_eviction_leaves_what_shared_layers_read(shared_kv_model, policy, monkeypatch):
    ids = torch.randint(0, shared_kv_model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    got = token_logits(shared_kv_model, policy, ids)
    import segcli.memory.scored as scored

    monkeypatch.setattr(scored, "close_up", lambda held, drop: False)  # every eviction a copy
    want = token_logits(shared_kv_model, policy, ids)
    assert (got - want).abs().max().item() == 0.0
