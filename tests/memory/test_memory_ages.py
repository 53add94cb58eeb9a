"""`evicted` and `mean_age` of the summarising policies (compressive, average, linear) against a plain
bookkeeping of which token positions each slot holds."""

import pytest
import torch

from segcli.memory import make_policy


def push(policy, state, t, seen, g):
    k, v = torch.randn(1, 2, t, 4, generator=g), torch.randn(1, 2, t, 4, generator=g)
    return policy.update(state, k, v, k)


@pytest.mark.parametrize("n_s", [1, 3, 7], ids=lambda n: f"n_s{n}")
@pytest.mark.parametrize("rate,n_cm", [(1, 3), (3, 2), (4, 1)])
def test_compressive_ages_are_the_mean_ages_of_each_slots_tokens(n_s, rate, n_cm):
    p = make_policy("compressive", memory_size=5, compress_rate=rate, compressed_size=n_cm)
    g = torch.Generator().manual_seed(rate * 10 + n_s)
    state, seen = p.init_state(1, 2, 4, device="cpu", dtype=torch.float32), 0
    window_before = 0
    for _ in range(12):
        state = push(p, state, n_s, seen, g)
        seen += n_s
        # reference: the window holds the last min(5, seen) positions; the evicted ones queue in order,
        # pooled by `rate` from the first; the newest groups that fit stay, the rest wait in the pending slot
        filled = min(5, seen)
        evicted_total = seen - filled
        groups, pending = divmod(evicted_total, rate)
        kept = min(groups, n_cm - (pending > 0))
        ages = list(range(1, filled + 1))  # age of position x is seen - x
        older = filled
        if pending:
            ages.append(older + (pending + 1) / 2)
            older += pending
        for r in range(kept):
            ages.append(older + r * rate + (rate + 1) / 2)
        s = p.stats(state)
        assert s.slots == len(ages)
        assert s.mean_age == pytest.approx(sum(ages) / len(ages))
        assert s.evicted == (seen - filled) - (seen - n_s - window_before)  # the FIFO's drops this segment
        assert s.oldest_age == filled + pending + kept * rate
        window_before = min(5, seen)


@pytest.mark.parametrize("name", ["average", "linear"])
def test_averaging_policies_drop_nothing_and_age_as_the_mean_of_all_tokens(name):
    p = make_policy(name)
    g = torch.Generator().manual_seed(1)
    state = p.init_state(1, 2, 4, device="cpu", dtype=torch.float32)
    assert p.stats(state).mean_age == 0.0 and p.stats(state).evicted == 0
    seen = 0
    for t in (1, 4, 9):
        state = push(p, state, t, seen, g)
        seen += t
        s = p.stats(state)
        assert s.evicted == 0 and s.mean_age == (seen + 1) / 2 == sum(range(1, seen + 1)) / seen
