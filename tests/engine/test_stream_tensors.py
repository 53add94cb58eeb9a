"""The runner's per-segment helpers against their plain forms: a window's tensors (`window_tensors`) and the norm
means' buffer kept per thread (`norm_means` then written in and out of inference mode, the same floats)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcli.backends.base import norm_means
from segcli.documents import Window
from segcli.engine.stream import window_tensors


@pytest.mark.parametrize("kind", ["list", "numpy"])
def test_window_tensors_equal_one_tensor_each(kind):
    ids, targets = [5, 7, 11, 13], [7, 11, 13, 17]
    as_kind = (lambda x: x) if kind == "list" else (lambda x: np.array(x, dtype=np.int64))
    w = Window(0, as_kind(ids), as_kind(targets), 0, np.array([1, 2, 3, 4]))
    x, y = window_tensors(w, torch.device("cpu"))
    assert x.shape == (1, 4) and y.shape == (4,)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x, torch.tensor(ids)[None]) and torch.equal(y, torch.tensor(targets))


def test_norm_means_in_and_out_of_inference_mode():
    torch.manual_seed(0)
    buffers = [torch.rand(1, 4, 96) * 5 for _ in range(6)]
    plain = [float(x[:, :, 10:70].mean()) for x in buffers]
    with torch.inference_mode():
        inside = norm_means(buffers, 10, 70)
        other = norm_means([b[:, :2].contiguous() for b in buffers], 3, 50)  # another shape: a new buffer
    outside = norm_means(buffers, 10, 70)
    assert inside == outside == plain
    assert other == [float(b[:, :2, 3:50].mean()) for b in buffers]
