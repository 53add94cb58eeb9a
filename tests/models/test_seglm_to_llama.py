"""seglm -> LlamaForCausalLM: the converted model's logits are seglm's (minGPT's test against another
implementation), and what Llama cannot compute is refused, never converted silently."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from segcli.models.seglm_to_llama import NotConvertible, llama_state_dict, seglm_to_llama

ATOL = 1e-5


def nontrivial(seed: int = 0, **overrides):
    """A tiny seglm whose every weight matters: norm gains away from 1 (a swapped norm shows), MLP and
    embeddings larger than the 0.02 init (a swapped gate/up shows in the logits), RoPE base away from its
    default (a dropped rope_theta shows)."""
    model = tiny_model(seed, rope_theta=500000.0, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif ".mlp." in name:
                p.mul_(6.0)
            elif name.startswith(("model.embed_tokens", "lm_head")):
                p.mul_(10.0)
    return model


def seglm_logits(model, ids):
    with torch.no_grad():
        return model(ids, model.new_memory("full", ids.shape[0])).logits  # (B, T, V): one causal forward


def llama_logits(llama, ids):
    with torch.no_grad():
        return llama(input_ids=ids).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_equal_seglm(attn, tied):
    model = nontrivial(tie_word_embeddings=tied)
    llama = seglm_to_llama(model)
    llama.set_attn_implementation(attn)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    a, b = seglm_logits(model, ids), llama_logits(llama, ids)
    assert a.abs().max() > 1.0  # logits large enough for a wrong weight to show
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) == tied


# every policy but linear (whose read is the native model's own); small sizes so that 48 tokens evict
STREAMED = {"fifo": dict(memory_size=8), "sink": dict(memory_size=8, sink_tokens=2), "xl": {}, "average": {},
            "compressive": dict(memory_size=8, compress_rate=2, compressed_size=4), "none": {}}


@pytest.mark.parametrize("policy", STREAMED)
def test_streamed_through_segcli_cache_equals_seglm(policy):
    """Streamed in segments of 4 through segcli's transformers cache layers under a bounded policy, the
    converted model gives seglm's own streamed logits: the twin is the same model under the memory too."""
    from segcli.hf import cache_kwarg, make_cache

    model = nontrivial()
    llama = seglm_to_llama(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(7))
    memory, cache = model.new_memory(policy, 1, **STREAMED[policy]), make_cache(llama, policy, **STREAMED[policy])
    native, hf = [], []
    with torch.no_grad():
        for s in range(0, ids.shape[1], 4):
            x = ids[:, s : s + 4]  # (1, 4)
            out = model(x, memory)
            memory = out.memory
            native.append(out.logits)
            pos = torch.arange(s, s + 4)[None]
            hf.append(llama(input_ids=x, position_ids=pos, use_cache=True, **{cache_kwarg(llama): cache}).logits)
    torch.testing.assert_close(torch.cat(hf, 1), torch.cat(native, 1), atol=ATOL, rtol=0)


def test_untrained_features_convert():
    """Zero key shares and zero gates (their init) lose nothing: converted, and the logits still agree."""
    model = nontrivial(smear_keys=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.key_smear.zero_()
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(llama_logits(seglm_to_llama(model), ids), seglm_logits(model, ids), atol=ATOL, rtol=0)


def test_smeared_keys_refused():
    model = nontrivial(smear_keys=True)  # tiny_model gives nonzero shares
    with pytest.raises(NotConvertible, match=r"smear_keys.*drop=\('smear_keys',\)"):
        seglm_to_llama(model)
    llama = seglm_to_llama(model, drop=["smear_keys"])  # asked for: the same shapes, another model
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(5))
    assert (llama_logits(llama, ids) - seglm_logits(model, ids)).abs().max() > 1e-3


def test_trained_memory_gate_refused():
    model = nontrivial()
    with torch.no_grad():
        model.model.layers[1].attn.memory_gate.fill_(-0.2)
    with pytest.raises(NotConvertible, match="linear-memory gates"):
        seglm_to_llama(model)
    # dropped, the model is still seglm's under full memory (the gate is read only by the linear memory)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(6))
    llama = seglm_to_llama(model, drop=["memory_gate"])
    torch.testing.assert_close(llama_logits(llama, ids), seglm_logits(model, ids), atol=ATOL, rtol=0)


def test_both_features_named_in_one_error():
    model = nontrivial(smear_keys=True)
    with torch.no_grad():
        model.model.layers[0].attn.memory_gate.fill_(0.3)
    with pytest.raises(NotConvertible, match=r"drop=\('smear_keys', 'memory_gate'\)"):
        seglm_to_llama(model)
    seglm_to_llama(model, drop=("smear_keys", "memory_gate"))


def test_unknown_weight_refused():
    """A seglm weight the converter does not know (a newer feature) is refused, not left out."""
    model = nontrivial()
    model.model.layers[0].attn.register_parameter("query_gain", nn.Parameter(torch.ones(2)))
    with pytest.raises(NotConvertible, match=r"model\.layers\.0\.attn\.query_gain"):
        llama_state_dict(model)


def test_unknown_drop_name():
    with pytest.raises(ValueError, match="unknown feature"):
        seglm_to_llama(nontrivial(), drop=["smear"])
