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



def stepped_and_packed(model_dir, policy: str, packed_device: str):
    """Logits and masses of segments of many lengths stepped one by one on the CPU, and of the same segments packed
    several to a forward (`step_packed`, as many as `packs` takes) on `packed_device`."""
    from segcli.backends import load_backend
    from segcli.config import RunConfig

    lengths = [5, 1, 9, 3, 7, 2, 8] * 3
    ids = torch.randint(3, 200, (1, sum(lengths)), generator=torch.Generator().manual_seed(0))
    out = []
    for device, packed in (("cpu", False), (packed_device, True)):
        cfg = RunConfig(model=str(model_dir), memory=policy, memory_size=16, segment_size=9, device=device)
        backend = load_backend(cfg)
        memory, logits, masses, pos, i = backend.new_memory(cfg), [], [], 0, 0
        with torch.inference_mode():
            while i < len(lengths):
                take = [lengths[i]]
                i += 1
                while packed and i < len(lengths) and sum(take) + lengths[i] <= backend.packs(memory):
                    take.append(lengths[i])
                    i += 1
                part = ids[:, pos : pos + sum(take)].to(device)
                if packed:
                    lg, memory, mass, _ = backend.step_packed(part, memory, take)
                else:
                    lg, memory, one = backend.step(part, memory)
                    mass = [one]
                logits.append(lg.float().cpu())
                masses += mass
                pos += sum(take)
        out.append((torch.cat(logits, 1), masses))
    return out


@cuda
@pytest.mark.parametrize("policy", ["fifo", "full"])
def test_cuda_segment_passes_match_cpu_steps(policy, tiny_model_dir):
    """Segments of many lengths several to a forward on the GPU (`step_packed`) against the same segments stepped
    on the CPU: logits and masses."""
    (cpu, cpu_mass), (gpu, gpu_mass) = stepped_and_packed(tiny_model_dir, policy, "cuda")
    assert (gpu - cpu).abs().max() < 1e-3
    assert all(a is None and b is None or abs(a - b) < 1e-4 for a, b in zip(cpu_mass, gpu_mass))
