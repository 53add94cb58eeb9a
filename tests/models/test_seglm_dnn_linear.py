"""The native model's `linear`: oneDNN on a packed weight at inference, F.linear otherwise; the same product."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segcli.models.seglm import network as ms
from segcli.ops.layout import column_major_linears


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 128])
def test_linear_is_the_modules_product(rows):
    torch.manual_seed(0)
    mod = nn.Linear(64, 96, bias=False)
    x = torch.randn(1, rows, 64)
    want = F.linear(x.double(), mod.weight.double()).float()
    with torch.inference_mode():
        got = ms.linear(x, mod)
    assert got.shape == (1, rows, 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 1.0


def test_linear_repacks_when_the_weight_changes():
    torch.manual_seed(0)
    mod = nn.Linear(32, 16, bias=True)
    x = torch.randn(1, 16, 32)
    with torch.inference_mode():
        first = ms.linear(x, mod)
    with torch.no_grad():
        mod.weight.mul_(2.0)  # an optimizer step: in place, the same tensor
    with torch.inference_mode():
        torch.testing.assert_close(ms.linear(x, mod), mod(x), rtol=1e-5, atol=1e-5)
    column_major_linears(mod)  # a new weight tensor, same values
    with torch.inference_mode():
        torch.testing.assert_close(ms.linear(x, mod), mod(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, mod(x))


def test_linear_with_autograd_is_F_linear():
    mod = nn.Linear(8, 4, bias=False)
    x = torch.randn(2, 16, 8, requires_grad=True)
    y = ms.linear(x, mod)
    assert torch.equal(y, F.linear(x, mod.weight))
    y.sum().backward()
    assert mod.weight.grad is not None and x.grad is not None
