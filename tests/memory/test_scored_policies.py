"""tova, h2o, snapkv, keynorm (segcli/memory/scored.py and one file each): the equivalences of issue 22 on the
native model, what each keeps on hand-made attention, per-layer budgets, memory files and the option errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from reference import streamed
from segcli.cli import app
from segcli.config import RunConfig, explicit_keys
from segcli.errors import UsageError
from segcli.memory import POLICY_NAMES, REGISTRY, make_policy
from segcli.memory.scored import layer_budgets
from segcli.state import flatten_state, rebuild_state

SCORED = ("tova", "h2o", "snapkv", "keynorm")
N = 40
no_shift = lambda k, d: k  # noqa: E731


def stream(model, ids, n_s, policy, **sizes):
    return streamed(model, ids, policy, n_s, **sizes)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 8192, (1, N), generator=torch.Generator().manual_seed(1))


def test_registered_under_their_public_names():
    for name in SCORED:
        assert name in POLICY_NAMES and REGISTRY[name].name == name
        assert RunConfig(memory=name).validate().policy().name == name
    assert [REGISTRY[n].needs_attention for n in SCORED] == ["last", "all", "window", None]
    assert all(REGISTRY[n].needs_attention is None for n in POLICY_NAMES if n not in SCORED[:3])


# -- equivalences on the native model ----------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("n_s", [1, 8, 13])
@pytest.mark.parametrize("policy", SCORED)
def test_a_memory_larger_than_the_document_is_full(model, ids, policy, n_s):
    full = stream(model, ids, n_s, "full")[0]
    got, mem = stream(model, ids, n_s, policy, memory_size=N, window=4)
    assert (got - full).abs().max() <= 1e-5
    assert all(s.slots == N and s.evicted == 0 for s in mem.stats())


@torch.no_grad()
@pytest.mark.parametrize("n_s", [1, 8])
def test_h2o_with_only_recent_tokens_is_fifo(model, ids, n_s):
    fifo, fm = stream(model, ids, n_s, "fifo", memory_size=10)
    h2o, hm = stream(model, ids, n_s, "h2o", memory_size=10, recent_tokens=10)
    assert (h2o - fifo).abs().max() <= 1e-5
    assert [s.slots for s in hm.stats()] == [s.slots for s in fm.stats()] == [10, 10]


@torch.no_grad()
@pytest.mark.parametrize("n_s", [1, 8])
def test_snapkv_with_a_window_of_the_whole_memory_is_fifo(model, ids, n_s):
    fifo = stream(model, ids, n_s, "fifo", memory_size=10)[0]
    snap = stream(model, ids, n_s, "snapkv", memory_size=10, window=10)[0]
    assert (snap - fifo).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("budget", ["uniform", "pyramid"])
@pytest.mark.parametrize("policy", [*SCORED, "fifo"])
def test_slots_never_exceed_the_layer_budgets(policy, budget):
    model = tiny_model(seed=2, num_hidden_layers=4)
    ids = torch.randint(0, 8192, (1, 90), generator=torch.Generator().manual_seed(2))
    mem = model.new_memory(policy, memory_size=16, recent_tokens=4, window=3, layer_budget=budget)
    budgets = layer_budgets(16, 4, budget)
    for s in range(0, 90, 7):
        mem = model(ids[:, s : s + 7], mem).memory
        stats = mem.stats()
        assert [st.capacity for st in stats] == budgets
        assert all(st.slots <= b for st, b in zip(stats, budgets)) and sum(st.slots for st in stats) <= 16 * 4
        assert all(0 <= st.evicted <= 7 for st in stats)
    assert [st.slots for st in stats] == budgets  # full by now
    if policy == "fifo":
        assert mem.policy.sliding_window() == (16 if budget == "uniform" else None)  # a band only when uniform
    assert stats[0].mean_age >= 1 and stats[0].oldest_age <= 90


def test_pyramid_budgets_fall_linearly_and_keep_the_total():
    for n_c, layers in [(16, 4), (512, 6), (7, 3), (100, 32), (3, 2)]:
        b = layer_budgets(n_c, layers, "pyramid")
        assert sum(b) == n_c * layers and all(x >= 1 for x in b)
        assert b == sorted(b, reverse=True) and b[0] > b[-1]
    assert layer_budgets(16, 4, "uniform") == [16] * 4 and layer_budgets(16, 1, "pyramid") == [16]


# -- what each keeps, on hand-made attention ---------------------------------------------------------------------------

def pushed(policy, t=6, m0=6, b=1, h=2, d=4, seed=0):
    """A state with m0 pairs kept, then t more appended (pending): [memory; segment] of m0 + t pairs."""
    g = torch.Generator().manual_seed(seed)
    p = make_policy(policy, memory_size=m0, recent_tokens=2, window=2)
    st = p.init_state(b, h, d, device="cpu", dtype=torch.float32)
    st = p.update(st, torch.randn(b, h, m0, d, generator=g), torch.randn(b, h, m0, d, generator=g))
    k, v = torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)
    st, k_all, _, m = p.extend(st, k, v, k, no_shift)
    assert m == m0 and k_all.shape[2] == m0 + t
    return p, st, k_all


def test_tova_keeps_the_head_mean_top_shared_by_heads():
    p, st, _ = pushed("tova")
    attn = torch.tensor([[[9, 1, 8, 0, 0, 0, 7, 0, 0, 0, 0, 6], [0, 9, 0, 0, 0, 0, 7, 0, 0, 5, 0, 6]]]).float()
    st = p.observe(st, attn)
    # head means: 4.5 5 4 0 0 0 7 0 0 2.5 0 6 -> the 6 best, in position order
    assert st.pos[0, 0].tolist() == st.pos[0, 1].tolist() == [0, 1, 2, 6, 9, 11]
    assert st.evicted == 6 and st.pending == 0


def test_h2o_scores_accumulate_and_the_recent_pairs_stay():
    p, st, _ = pushed("h2o")
    attn = torch.arange(12.0).flip(0).expand(1, 2, 12).clone()  # older pairs got more
    attn[0, 1, 3] = 100
    st = p.observe(st, attn)
    assert st.pos[0, 0].tolist() == [0, 1, 2, 3, 10, 11] and st.pos[0, 1].tolist() == [0, 1, 2, 3, 10, 11]
    st2 = p.observe(p.extend(st, *(torch.zeros(1, 2, 1, 4),) * 3, no_shift)[0],
                    torch.tensor([[[0, 0, 0, 0, 50, 0, 1], [0, 0, 0, 0, 0, 0, 1]]]).float())
    assert st2.pos[0, 0].tolist() == [0, 1, 2, 10, 11, 12]  # 10's score 1 + 50 beats 3's 8: pos 3 dropped
    assert st2.score[0, 0, 3].item() == 51 and st2.pos[0, 1].tolist() == [0, 1, 2, 3, 11, 12]


def test_snapkv_pools_over_neighbouring_keys_and_keeps_the_window():
    p, st, _ = pushed("snapkv")
    attn = torch.zeros(1, 2, 12)
    attn[0, 0, 5] = 1  # one peak: pooling (kernel 5) spreads it over 3..7
    attn[0, 0, 0] = 0.5  # alone it would beat 3..7's pooled zeros
    attn[0, 1, [0, 9]] = 1
    st = p.observe(st, attn)
    # 4 of the prefix's 10 by pooled score (ties inside each pooled run), then the window's own 2
    assert set(st.pos[0, 0, :4].tolist()) <= {3, 4, 5, 6, 7} and st.pos[0, 0, 4:].tolist() == [10, 11]
    assert set(st.pos[0, 1, :4].tolist()) <= {0, 1, 2, 7, 8, 9} and st.pos[0, 1, 4:].tolist() == [10, 11]


def test_keynorm_keeps_the_smallest_keys_per_head():
    p, st, k_all = pushed("keynorm")
    # keynorm evicts in extend: nothing waits for attention
    assert st.pending == 0 and st.k.shape[2] == 6
    want = k_all.norm(dim=-1).topk(6, largest=False).indices.sort().values
    assert torch.equal(st.pos, want)


def test_without_attention_a_state_stays_bounded():
    p = make_policy("tova", memory_size=5)
    st = p.init_state(1, 1, 2, device="cpu", dtype=torch.float32)
    for _ in range(4):  # extend alone: the unscored segment is evicted (newest kept) at the next extend
        st = p.extend(st, *(torch.randn(1, 1, 3, 2),) * 3, no_shift)[0]
        assert st.k.shape[2] <= 5 + 3
    assert p.update(st, *(torch.randn(1, 1, 3, 2),) * 2).k.shape[2] == 5


# -- memory files ------------------------------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("policy", [*SCORED, "fifo"])
def test_states_round_trip_through_a_file_with_their_scores(model, ids, policy):
    sizes = dict(memory_size=9, recent_tokens=3, window=2, layer_budget="pyramid")
    whole = stream(model, ids, 8, policy, **sizes)[0]
    first, mem = stream(model, ids[:, :24], 8, policy, **sizes)
    tensors: dict = {}
    descs = [json.loads(json.dumps(flatten_state(s, f"layer{i}", tensors))) for i, s in enumerate(mem.states)]
    fresh = model.new_memory(policy, **sizes)
    states = []
    for desc, like in zip(descs, fresh.states):
        st = rebuild_state(desc, tensors, torch.device("cpu"), like, "state", set())
        mem.policy.check_state(st, batch=1, heads=2, head_dim=16, dtype=torch.float32, seen=24)
        states.append(st)
    if policy == "h2o":
        assert all(torch.equal(a.score, b.score) and a.score.sum() > 0 for a, b in zip(states, mem.states))
    mem.states = states
    rest = []
    for s in range(24, N, 8):
        o = model(ids[:, s : s + 8], mem)
        mem = o.memory
        rest.append(o.logits)
    assert torch.equal(torch.cat([first, *rest], 1), whole)


def test_a_damaged_state_is_refused():
    p = make_policy("h2o", memory_size=4, recent_tokens=1)
    st = p.update(p.init_state(1, 1, 2, device="cpu", dtype=torch.float32), torch.randn(1, 1, 6, 2), torch.randn(1, 1, 6, 2))
    bad = dict(st.__dict__, pos=st.pos.flip(-1))
    with pytest.raises(ValueError, match="positions are not increasing"):
        p.check_state(type(st)(**bad), batch=1, heads=1, head_dim=2, dtype=torch.float32, seen=6)
    with pytest.raises(ValueError, match="seen"):
        p.check_state(st, batch=1, heads=1, head_dim=2, dtype=torch.float32, seen=7)


# -- options -----------------------------------------------------------------------------------------------------------

def test_option_errors():
    with pytest.raises(UsageError, match=r"--recent-tokens must be an integer from 0 to --memory-size \(8\), got 9"):
        RunConfig(memory="h2o", memory_size=8, recent_tokens=9).validate()
    for w in (0, -3):
        with pytest.raises(UsageError, match="--window must be an integer from 1"):
            RunConfig(memory="snapkv", window=w).validate()
    with pytest.raises(UsageError, match="--layer-budget must be one of uniform, pyramid"):
        RunConfig(memory="tova", layer_budget="cone").validate()
    for memory, option in [("tova", "window"), ("tova", "recent_tokens"), ("snapkv", "recent_tokens"),
                           ("h2o", "window"), ("average", "layer_budget"), ("xl", "layer_budget"), ("sink", "window"),
                           ("keynorm", "window")]:
        with pytest.raises(UsageError, match=f"--{option.replace('_', '-')} does not apply to --memory {memory}"):
            RunConfig(memory=memory).check_options_apply(explicit_keys(RunConfig, None, {option: 1}))
    for name in SCORED:
        RunConfig(memory=name).check_options_apply(set(REGISTRY[name].parameters))
    assert make_policy("h2o", memory_size=10).recent_tokens == 5  # H2O's balanced default: half recent


def test_cli_errors_are_one_line(tiny_model_dir, doc_path):
    runner = CliRunner()
    base = ["run", str(doc_path), "--model", str(tiny_model_dir), "--device", "cpu", "-q", "--max-tokens", "20"]
    for extra, needle in [(["--memory", "h2o", "--memory-size", "8", "--recent-tokens", "9"], "--recent-tokens"),
                          (["--memory", "snapkv", "--window", "0"], "--window"),
                          (["--memory", "tova", "--window", "4"], "does not apply to --memory tova")]:
        res = runner.invoke(app, base + extra)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output


def test_cli_run_reports_evictions(tiny_model_dir, doc_path):
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(doc_path), "--model", str(tiny_model_dir), "--device", "cpu", "-q",
                              "--max-tokens", "60", "--memory", "h2o", "--memory-size", "16", "--recent-tokens", "4",
                              "-s", "8", "--layer-budget", "pyramid", "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    segs = [json.loads(x) for x in res.stdout.splitlines() if x.strip() and json.loads(x)["type"] == "segment"]
    assert segs[-1]["memory"]["policy"] == "h2o" and len(segs) == 8


@pytest.mark.parametrize("policy", ["tova", "h2o", "snapkv"])
def test_cli_save_then_load_equals_one_run(tiny_model_dir, tmp_path, policy):
    from conftest import SAMPLE

    text = (SAMPLE / "milton_areopagitica.txt").read_text(encoding="utf-8")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text[:1500])
    b.write_text(text[1500:3000])
    runner = CliRunner()
    extra = {"tova": [], "h2o": ["--recent-tokens", "5"], "snapkv": ["--window", "3"]}[policy]
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "-q", "--memory", policy, "--memory-size", "20",
              *extra, "-s", "16", "--max-tokens", "90", "--format", "jsonl"]

    def segs(*args):
        res = runner.invoke(app, ["run", *map(str, args), *common])
        assert res.exit_code == 0, res.output
        recs = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in recs
                if r["type"] == "segment" and r["document"] == str(b)]

    mem = tmp_path / "m.safetensors"
    together = segs(a, b)
    runner.invoke(app, ["run", str(a), *common, "--save-memory", str(mem)])
    assert together and together == segs(b, "--load-memory", mem)
    from safetensors import safe_open

    with safe_open(str(mem), "pt") as f:
        assert "layer0.score" in f.keys()
        meta = json.loads(f.metadata()["segcli"])
    assert meta["sizes"]["memory_size"] == 20 and meta["policy"] == policy


@torch.no_grad()
def test_fifo_reports_evictions_and_mean_age(model, ids):
    mem = model.new_memory("fifo", memory_size=10)
    got = []
    for s in range(0, 24, 8):
        mem = model(ids[:, s : s + 8], mem).memory
        st = mem.stats()[0]
        got.append((st.slots, st.evicted, st.mean_age))
    assert got == [(8, 0, 4.5), (10, 6, 5.5), (10, 8, 5.5)]


@torch.no_grad()
def test_sink_and_xl_report_evictions_and_mean_age(model, ids):
    got = {}
    for policy, sizes in [("sink", dict(sink_tokens=2, memory_size=6)), ("xl", {})]:
        mem, got[policy] = model.new_memory(policy, **sizes), []
        for s in range(0, 12, 4):
            mem = model(ids[:, s : s + 4], mem).memory
            st = mem.stats()[1]
            got[policy].append((st.slots, st.evicted, st.mean_age))
    assert got["sink"] == [(4, 0, 2.5), (8, 0, 4.5), (8, 4, 5.5)]  # sinks at their true distance, 0 and 1 back
    assert got["xl"] == [(4, 0, 2.5), (4, 4, 2.5), (4, 4, 2.5)]


def test_dropping_one_equals_keeping_the_top():
    from segcli.memory.scored import top_indices

    x = torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_indices(x, 8), x.topk(8, -1).indices.sort(-1).values)
    assert torch.equal(top_indices(x, 5, offset=2), x.topk(5, -1).indices.sort(-1).values + 2)
