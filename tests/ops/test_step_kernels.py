"""The native step's fused forms against the plain ones they replace: the same floats, not just close."""

import torch
import torch.nn.functional as F

from segcli.memory.window import Window
from segcli.models.seglm.network import embed
from segcli.ops.layout import column_major
from segcli.ops.rope import apply_rope, inv_frequencies, rope_cos_sin, rope_rolled, signed_sin


def test_rope_rolled_is_apply_rope_exactly():
    torch.manual_seed(0)
    cos, sin = rope_cos_sin(torch.arange(999_000, 999_128), inv_frequencies(64, 500000.0), torch.float32)
    x = torch.randn(1, 128, 3, 4, 64).permute(2, 0, 3, 1, 4)[:2]  # q and k as the model has them: a strided view
    got = rope_rolled(x, cos, signed_sin(sin))
    assert torch.equal(got, apply_rope(x, cos, sin))
    assert got.abs().max() > 1.0  # a real rotation of real values


def test_embed_of_a_column_major_weight_is_the_lookup():
    torch.manual_seed(0)
    w = torch.randn(300, 16)
    ids = torch.tensor([[5, 0, 299, 5], [7, 8, 9, 1]])
    want = F.embedding(ids, w)
    for weight in (w, column_major(w)):
        got = embed(weight, ids)
        assert got.shape == (2, 4, 16) and got.is_contiguous()
        assert torch.equal(got, want)
    assert torch.equal(want[0, 0], w[5])


def test_window_push_writes_the_norms_it_would_compute():
    torch.manual_seed(0)
    w = Window.empty(1, 2, 8, 4, "cpu", torch.float32)
    with torch.inference_mode():
        for t in (3, 4, 5):  # the last push evicts
            k, v = torch.randn(1, 2, t, 4), torch.randn(1, 2, t, 4)
            w.push(k, v)
            kn, vn = w.norms()
            assert torch.equal(kn[:, :, -t:], k.norm(dim=-1)) and torch.equal(vn[:, :, -t:], v.norm(dim=-1))
            assert torch.equal(w.view()[0][:, :, -t:], k)
    assert w.filled == 8
