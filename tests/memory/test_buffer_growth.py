"""Window buffers grow with use (issue 21): the same numbers as buffers allocated at full capacity up front,
the same buffer whatever the pushes were, and a run's memory never holds room it does not use."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, tiny_model
from segcli.memory import make_policy
from segcli.memory.window import MIN_CAPACITY, Window

SIZES = dict(memory_size=100, sink_tokens=3, compress_rate=3, compressed_size=7)  # buffers of 64, 128, 200 slots
WINDOWED = ["fifo", "sink", "compressive", "full"]
N = 120


def preallocated(window: Window) -> Window:
    """The window as segcli allocated it before buffers grew: front + max(64, 2 x size) slots at once
    (64 for full), start at `front`. Pushes never shrink a buffer, so it keeps that size throughout."""
    b, h, _, d = window.k.shape
    cap = window.front + (MIN_CAPACITY if window.size is None else max(MIN_CAPACITY, 2 * window.size))
    z = torch.zeros(b, h, cap, d, dtype=window.k.dtype)
    n = torch.zeros(b, h, cap)
    return Window(z, z.clone(), n, n.clone(), window.size, window.front, window.front, window.front)


def stream(model, ids, policy, n_s, prealloc: bool, band: int | None = None):
    mem = model.new_memory(policy, 1, **SIZES)
    if prealloc:
        mem.states = [type(s)(**{**vars(s), "window": preallocated(s.window)}) for s in mem.states]
    logits, masses, stats = [], [], []
    for s in range(0, ids.shape[1], n_s):
        out = model(ids[:, s : s + n_s], mem, band=band)
        mem = out.memory
        logits.append(out.logits)
        masses.append(out.memory_mass)
        stats.append([(st.slots, st.key_norm, st.value_norm, st.oldest_age) for st in mem.stats()])
    return torch.cat(logits, 1), masses, stats, mem


@pytest.fixture(scope="module", params=[False, True], ids=["plain-keys", "smeared-keys"])
def model(request):
    return tiny_model(seed=2, smear_keys=request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 8192, (1, N), generator=torch.Generator().manual_seed(7))


@torch.inference_mode()
@pytest.mark.parametrize("n_s", [1, 7, 64], ids=lambda n: f"n_s{n}")
@pytest.mark.parametrize("policy", WINDOWED)
def test_growing_buffers_give_the_numbers_of_preallocated_ones(model, ids, policy, n_s):
    grown = stream(model, ids, policy, n_s, prealloc=False)
    fixed = stream(model, ids, policy, n_s, prealloc=True)
    assert torch.equal(grown[0], fixed[0])  # bitwise: the same values in the same kernels
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grown[1], fixed[1]))
    assert grown[2] == fixed[2]
    for a, b in zip(grown[3].states, fixed[3].states):
        assert all(torch.equal(x, y) for x, y in zip(a.window.view(), b.window.view()))
        assert a.window.capacity <= b.window.capacity


@torch.inference_mode()
@pytest.mark.parametrize("n_c,chunk", [(100, 100), (5, 30)])
def test_growing_buffers_give_the_band_passes_of_preallocated_ones(model, ids, n_c, chunk):
    sizes = {**SIZES, "memory_size": n_c}
    runs = []
    for prealloc in (False, True):
        mem = model.new_memory("fifo", 1, **sizes)
        if prealloc:
            mem.states = [type(s)(**{**vars(s), "window": preallocated(s.window)}) for s in mem.states]
        outs = []
        for s in range(0, N, chunk):
            out = model(ids[:, s : s + chunk], mem, band=n_c)
            mem = out.memory
            outs.append((out.logits, out.memory_mass))
        runs.append(outs)
    for (la, ma), (lb, mb) in zip(*runs):
        assert torch.equal(la, lb) and torch.equal(ma, mb)


def push_all(policy, lengths, seed=0, prefix_fn=None):
    """Stream random pairs through `policy` (inference, in place); the state and each step's stats."""
    g = torch.Generator().manual_seed(seed)
    state = policy.init_state(1, 2, 4, device="cpu", dtype=torch.float32)
    stats = []
    with torch.inference_mode():
        for t in lengths:
            k, v = torch.randn(1, 2, t, 4, generator=g), torch.randn(1, 2, t, 4, generator=g)
            state = policy.extend(state, k, v, k, lambda x, d: x)[0]
            stats.append(policy.stats(state))
    return state, stats


@pytest.mark.parametrize("policy", ["fifo", "sink", "compressive", "full"])
def test_the_buffer_depends_on_what_is_held_not_on_how_it_came(policy):
    p = make_policy(policy, **SIZES)
    one, _ = push_all(p, [1] * 250)
    chunks, _ = push_all(p, [30, 7, 1, 33, 40, 39, 100])  # 250 tokens, no segment longer than the window
    assert one.window.capacity == chunks.window.capacity
    assert one.window.filled == chunks.window.filled
    assert p.stats(one).bytes == p.stats(chunks).bytes


@pytest.mark.parametrize("before,t", [(0, 40), (0, 17), (5, 40), (33, 20), (100, 40), (300, 40)])
def test_stats_each_reports_the_bytes_single_steps_held(before, t):
    """A band pass pushes t tokens at once; stats_each must report, per token, what t one-token steps report."""
    p = make_policy("fifo", memory_size=40)
    at_once, _ = push_all(p, [1] * before, seed=1)
    one_by_one, _ = push_all(p, [1] * before, seed=1)  # the same history, its own buffers
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, 2, t, 4, generator=g), torch.randn(1, 2, t, 4, generator=g)
    with torch.inference_mode():
        steps = []
        for i in range(t):
            one_by_one = p.update(one_by_one, k[:, :, i : i + 1], v[:, :, i : i + 1])
            steps.append(p.stats(one_by_one))
        at_once = p.update(at_once, k, v)
        each = p.stats_each(at_once, min(before, 40), t)
    assert [s.bytes for s in each] == [s.bytes for s in steps]
    assert [(s.slots, s.oldest_age) for s in each] == [(s.slots, s.oldest_age) for s in steps]
    assert p.stats(at_once).bytes == steps[-1].bytes and at_once.window.capacity == one_by_one.window.capacity


@pytest.mark.parametrize("policy,sizes", [
    ("fifo", dict(memory_size=1 << 24)),
    ("sink", dict(memory_size=16, sink_tokens=1 << 24)),
    ("compressive", dict(memory_size=16, compress_rate=2, compressed_size=1 << 24)),
    ("full", {}),
], ids=["fifo-2^24", "sink-tokens-2^24", "compressed-size-2^24", "full"])
def test_a_huge_capacity_holds_only_what_a_short_stream_used(policy, sizes):
    p = make_policy(policy, **sizes)
    state, stats = push_all(p, [32] * 10)  # 320 tokens
    window_slot, pair = 2 * (2 * 4 * 4 + 8), 2 * 2 * 4 * 4  # 2 heads: key + value of 4 float32 (+ two norms)
    assert state.window.capacity <= 512  # the next power of two above 320 pairs
    for st in stats:
        assert st.bytes <= 512 * window_slot + 320 * pair  # and at most the 320 pairs as sinks or pooled slots


LIMITED_RUN = textwrap.dedent("""
    import resource, sys
    from segcli.cli import main

    def vm_size():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    limit = vm_size() + (1 << 30)  # the address space after the imports, plus 1 GiB: the model, text and memory
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.argv = ["segcli", "run", sys.argv[1], "--max-tokens", "300", "-q", "--format", "jsonl", "--device", "cpu",
                *sys.argv[2:]]
    main()
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmSize from /proc")
@pytest.mark.parametrize("options", [
    ["--memory", "fifo", "--memory-size", "100000"],
    ["--memory", "sink", "--memory-size", "64", "--sink-tokens", "16777216"],
    ["--memory", "compressive", "--memory-size", "64", "--compressed-size", "16777216"],
], ids=["memory-size-100000", "sink-tokens-2^24", "compressed-size-2^24"])
def test_a_huge_memory_size_on_a_short_run_fits_in_little_address_space(options, tmp_path):
    """Allocated at capacity, --memory-size 100000 took 2.5 GB on the bundled model; 2^24 sinks or
    compressed slots 32 GiB and more. Grown with use, a 300-token run fits in 1 GiB beyond the imports."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    p = subprocess.run([sys.executable, "-c", LIMITED_RUN, str(ROOT / "sample_docs" / "hamlet.txt"), *options],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = [line for line in p.stdout.splitlines() if '"summary"' in line]
    assert summary and '"tokens": 300' in summary[0]
