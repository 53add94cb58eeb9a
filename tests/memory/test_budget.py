"""segcli/memory/budget.py: the bytes a policy's memory can reach (against formulas written out here and
against what real streams hold), and the check that refuses settings that cannot fit (exit 2, one line)."""

from __future__ import annotations

import pytest
import torch

from segcli.errors import UsageError
from segcli.memory import POLICY_NAMES, make_policy
from segcli.memory.budget import MEMORY_CAP_BYTES, available_bytes, check_memory_budget, memory_bytes

BUNDLED = dict(layers=6, kv_heads=4, head_dim=64, itemsize=4)  # the bundled model in float32
WINDOW_SLOT = 4 * (2 * 64 * 4 + 8)  # 4 heads x (a float32 key and value of 64, and their two float32 norms)
PAIR = 4 * 2 * 64 * 4  # 4 heads x a float32 key and value of 64


@pytest.mark.parametrize("n_c", [24, 512, 100_000, 1 << 24])
def test_fifo_reaches_twice_its_buffer_of_twice_n_c_slots(n_c):
    # held: 2 n_c slots (room to slide before moving back); x2 while the buffer grows into it (old + new)
    want = 6 * 2 * max(64, 2 * n_c) * WINDOW_SLOT
    assert memory_bytes(make_policy("fifo", memory_size=n_c), segment_size=128 if n_c >= 128 else n_c, **BUNDLED) == want
    assert memory_bytes(make_policy("fifo", memory_size=1 << 24), segment_size=128, **BUNDLED) == 837_518_622_720


def test_sizes_of_the_other_policies():
    def reach(name, **kw):
        return memory_bytes(make_policy(name, **kw), segment_size=128, **BUNDLED)

    assert reach("none") == 0
    assert reach("full") is None  # grows with the document: no bound without its length
    assert reach("xl") == 6 * 2 * 128 * PAIR
    assert reach("average") == 6 * 2 * PAIR
    assert reach("linear") == 6 * 2 * 4 * (64 * 64 + 64) * 4
    assert reach("sink", memory_size=508, sink_tokens=4) == 6 * (2 * (4 + 1016) * WINDOW_SLOT + 2 * 4 * PAIR)
    n_c, n_cm, c = 256, 64, 4
    window = 2 * (n_cm + 2 * n_c) * WINDOW_SLOT
    assert reach("compressive", memory_size=n_c, compressed_size=n_cm, compress_rate=c) == \
        6 * (window + (3 * n_cm + 2 * (c + 128)) * PAIR)


def test_a_known_length_bounds_every_policy():
    """300 tokens: no memory holds more than 300 pairs, whatever its size."""
    huge = dict(memory_size=1 << 24, sink_tokens=1 << 24, compressed_size=1 << 24)
    for name in POLICY_NAMES:
        got = memory_bytes(make_policy(name, **huge), segment_size=128, tokens=300, **BUNDLED)
        assert got is not None and got <= 6 * 2 * 2 * 512 * WINDOW_SLOT + 6 * 8 * 300 * PAIR, name
    # full over 300 tokens: the power of two above them, twice
    assert memory_bytes(make_policy("full"), segment_size=128, tokens=300, **BUNDLED) == 6 * 2 * 512 * WINDOW_SLOT


@pytest.mark.parametrize("n_s", [1, 5, 33])
@pytest.mark.parametrize("name", POLICY_NAMES)
def test_no_stream_holds_more_than_the_bound(name, n_s):
    p = make_policy(name, memory_size=40, sink_tokens=3, compress_rate=3, compressed_size=6)
    h, d, tokens = 2, 8, 400
    bound = p.peak_bytes(h, d, 4, n_s, tokens)
    g = torch.Generator().manual_seed(n_s)
    state = p.init_state(1, h, d, device="cpu", dtype=torch.float32)
    held = 0
    with torch.inference_mode():
        for s in range(0, tokens, n_s):
            t = min(n_s, tokens - s)
            k, v = torch.randn(1, h, t, d, generator=g), torch.randn(1, h, t, d, generator=g)
            state = p.extend(state, k, v, k, lambda x, delta: x)[0] if p.kind == "kv" else p.update(state, k, v, k)
            held = max(held, p.stats(state).bytes)
    assert held <= bound
    if name == "fifo":  # tight: the buffer it grew into, and the one it grew from
        assert bound == 2 * held


def test_check_refuses_what_the_machine_cannot_hold_with_the_bytes_named():
    fifo = make_policy("fifo", memory_size=1 << 24)
    with pytest.raises(UsageError) as e:
        check_memory_budget(fifo, segment_size=128, available=16 << 30, **BUNDLED)
    assert e.value.exit_code == 2
    assert str(e.value) == ("--memory fifo --memory-size 16777216 at --segment-size 128: the memory can reach "
                            "780.0 GiB (837,518,622,720 bytes), more than the 16.0 GiB available on this machine; "
                            "give smaller --memory-size, --segment-size")
    # the same settings over a known 300 tokens hold 12.8 MB
    assert check_memory_budget(fifo, segment_size=128, tokens=300, available=16 << 30, **BUNDLED) == 12_779_520


def test_check_passes_what_fits_and_applies_the_cap_where_memory_is_plenty():
    fifo = make_policy("fifo", memory_size=512)
    assert check_memory_budget(fifo, segment_size=128, available=16 << 30, **BUNDLED) == 6 * 2 * 1024 * WINDOW_SLOT
    with pytest.raises(UsageError, match=r"more than segcli's cap of 1,024\.0 GiB"):
        check_memory_budget(make_policy("fifo", memory_size=1 << 24), segment_size=128, available=1 << 50,
                            layers=12, kv_heads=8, head_dim=128, itemsize=4)
    assert MEMORY_CAP_BYTES == 1 << 40
    assert check_memory_budget(make_policy("full"), segment_size=128, available=1, **BUNDLED) is None


def test_available_bytes_reads_memavailable(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12345678 kB\n")
    assert available_bytes(str(f)) == 12345678 * 1024
    f.write_text("MemTotal:       32000000 kB\n")
    assert available_bytes(str(f)) is None
    assert available_bytes(str(tmp_path / "missing")) is None
