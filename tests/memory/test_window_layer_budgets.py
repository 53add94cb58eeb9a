"""`--layer-budget pyramid` for sink and compressive (PyramidKV's schedule sizes each layer's window, as fifo's);
xl, average and linear have no per-layer budget and refuse it in one line."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from segcli.cli import app
from segcli.memory.scored import layer_budgets

runner = CliRunner()


@pytest.mark.parametrize("policy,sizes", [("sink", dict(sink_tokens=2)),
                                          ("compressive", dict(compress_rate=3, compressed_size=5))])
@torch.no_grad()
def test_pyramid_sizes_each_layers_window(policy, sizes):
    model = tiny_model(seed=1, num_hidden_layers=4)
    budgets = layer_budgets(16, 4, "pyramid")
    assert budgets[0] > 16 > budgets[-1] and sum(budgets) == 64
    mem = model.new_memory(policy, memory_size=16, layer_budget="pyramid", **sizes)
    assert [s.window.size for s in mem.states] == budgets
    assert mem.policy.token_pass() is None  # one pass bound for every layer only when uniform
    uniform = model.new_memory(policy, memory_size=16, **sizes)
    ids = torch.randint(1, 8192, (1, 60), generator=torch.Generator().manual_seed(2))
    for s in range(0, 60, 4):
        mem = model(ids[:, s : s + 4], mem).memory
        uniform = model(ids[:, s : s + 4], uniform).memory
    extra = sizes.get("sink_tokens", 0) + sizes.get("compressed_size", 0)
    for stats, state, budget in zip(mem.stats(), mem.states, budgets):
        assert state.window.filled == min(budget, 60 - sizes.get("sink_tokens", 0))
        assert stats.capacity == budget + extra
    assert [s.capacity for s in uniform.stats()] == [16 + extra] * 4
    # a layer whose budget is n_c streams as the uniform memory does
    for i, budget in enumerate(budgets):
        if budget == 16:
            for a, b in zip(mem.states[i].window.view(), uniform.states[i].window.view()):
                assert torch.equal(a, b)


@pytest.mark.parametrize("policy", ["sink", "compressive"])
def test_pyramid_runs_and_its_memory_file_continues(tiny_model_dir, doc_path, tmp_path, policy):
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "-q", "--memory", policy, "--memory-size", "12",
              "--layer-budget", "pyramid", "-s", "8", "--format", "jsonl"]
    saved = str(tmp_path / "m.safetensors")
    res = runner.invoke(app, ["run", str(doc_path), *common, "--max-tokens", "48", "--save-memory", saved])
    assert res.exit_code == 0, res.output
    segs = [json.loads(x) for x in res.stdout.splitlines() if x.strip() and json.loads(x)["type"] == "segment"]
    assert len(segs) == 6 and segs[-1]["memory"]["evicted"] >= 0
    res = runner.invoke(app, ["run", str(doc_path), *common, "--max-tokens", "16", "--load-memory", saved])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("policy", ["xl", "average", "linear"])
def test_policies_without_a_layer_budget_refuse_pyramid_in_one_line(tiny_model_dir, doc_path, policy):
    res = runner.invoke(app, ["run", str(doc_path), "--model", str(tiny_model_dir), "--device", "cpu", "-q",
                              "--memory", policy, "--layer-budget", "pyramid", "--max-tokens", "20"])
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("segcli: error: --layer-budget does not apply to --memory " + policy)


@pytest.mark.parametrize("policy", ["fifo", "sink"])
@pytest.mark.parametrize("memory_size,layers", [(24, 30), (8, 7), (512, 30), (3, 2)])
def test_a_file_holding_the_first_layers_budget_is_accepted(policy, memory_size, layers):
    """The rounding of PyramidKV's schedule can give the first layer exactly 2 n_c (n_c 24 over 30 layers: 48); a
    memory file holding that budget is a valid one (it was refused as 'no layer's budget' on a 30-layer model)."""
    from segcli.memory import make_policy

    budgets = layer_budgets(memory_size, layers, "pyramid")
    assert sum(budgets) == memory_size * layers and max(budgets) <= 2 * memory_size
    pol = make_policy(policy, memory_size=memory_size, layer_budget="pyramid",
                      **({"sink_tokens": 2} if policy == "sink" else {}))
    for layer, budget in enumerate(budgets):
        state = pol.init_layer_state(layer, layers, 1, 2, 4, device=torch.device("cpu"), dtype=torch.float32)
        assert state.window.size == budget
        pol.check_state(state, batch=1, heads=2, head_dim=4, dtype=torch.float32, seen=0)
