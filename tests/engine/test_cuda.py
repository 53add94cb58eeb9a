"""GPU smoke tests: run only where CUDA exists (the suite never needs a GPU)."""

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from reference import streamed
from segcli.cli import app

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@torch.no_grad()
@pytest.mark.parametrize("policy", ["full", "fifo", "sink", "compressive", "linear"])
def test_cuda_float32_matches_cpu(policy):
    model = tiny_model(seed=2)
    ids = torch.randint(1, 8192, (1, 90), generator=torch.Generator().manual_seed(0))
    cpu, _ = streamed(model, ids, policy, 16, memory_size=20)
    gpu, _ = streamed(model.cuda(), ids.cuda(), policy, 16, memory_size=20)
    model.cpu()
    assert (gpu.cpu() - cpu).abs().max() < 1e-3


@cuda
def test_cli_device_cuda(doc_path):
    res = CliRunner().invoke(app, ["run", str(doc_path), "--device", "cuda", "-q", "--format", "jsonl", "--max-tokens", "300"])
    assert res.exit_code == 0, res.output
    assert '"device": "cuda' in res.stdout.splitlines()[-1]
