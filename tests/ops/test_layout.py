"""Column-major Linear weights: same values, same outputs, ties kept (segcli/ops/layout.py)."""

import torch
from torch import nn

from segcli.models.seglm import SegLMConfig, SegLMForCausalLM
from segcli.ops.layout import column_major, column_major_linears


def test_column_major_same_values_and_linear_output():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    c = column_major(w)
    assert c.shape == w.shape and torch.equal(c, w)
    assert c.t().is_contiguous() and not c.is_contiguous()
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(nn.functional.linear(x, c), nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_model_outputs_unchanged_and_tie_kept():
    torch.manual_seed(0)
    cfg = SegLMConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    model = SegLMForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 20))
    before = model(ids).logits
    n = column_major_linears(model)
    # qkv, o, gate_up, down per layer, and the lm_head shared with the embedding
    assert n == 4 * cfg.num_hidden_layers + 1
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(not m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    # token by token (the single-query path) still equals one forward over the whole sequence
    mem = model.new_memory("full")
    steps = []
    for i in range(ids.shape[1]):
        out = model(ids[:, i : i + 1], mem)
        mem = out.memory
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), before, rtol=1e-4, atol=1e-4)
