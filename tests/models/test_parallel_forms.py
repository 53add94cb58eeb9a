"""Token passes (`model(ids, memory, band=policy.token_pass())`: T single-token segments in one pass) for xl,
sink, average, linear and compressive: the same logits, masses and memory as T token steps, and the DESIGN §1
equivalences against plain references written without the memory code (max abs diff <= 1e-4, float32)."""

import pytest
import torch

from conftest import tiny_model
from reference import _qkv, masked_forward, sink_forward, sliding_window, smeared
from segcli.ops.attention import reference_attention
from segcli.ops.linear_attention import naive_linear_memory
from segcli.ops.rope import apply_rope, inv_frequencies, rope_cos_sin
from segcli.state import flatten_state

TOL = 1e-4
N = 70
POLICIES = {  # id -> (policy, sizes, tokens per pass)
    "xl": ("xl", {}, 16),
    "sink": ("sink", dict(memory_size=9, sink_tokens=3), 9),
    "sink-long-window": ("sink", dict(memory_size=40, sink_tokens=4), 25),
    "average": ("average", {}, 23),
    "linear": ("linear", {}, 32),
    "compressive": ("compressive", dict(memory_size=6, compress_rate=3, compressed_size=4), 6),
    "compressive-rate2": ("compressive", dict(memory_size=11, compress_rate=2, compressed_size=20), 7),
}


@pytest.fixture(scope="module", params=[False, True], ids=["plain-keys", "smeared-keys"])
def model(request):
    m = tiny_model(seed=3, smear_keys=request.param)
    with torch.no_grad():
        for layer in m.model.layers:  # a gate that mixes both halves (0 at init: half and half anyway)
            layer.attn.memory_gate.copy_(torch.linspace(-1.0, 1.5, layer.attn.h))
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 8192, (1, N), generator=torch.Generator().manual_seed(5))


def passed(model, ids, policy, chunk, **sizes):
    """Logits (1, N, V), masses (L, N) and memory of token passes of `chunk` (sink: its filling sinks one by one)."""
    mem = model.new_memory(policy, 1, **sizes)
    logits, masses, s = [], [], 0
    while s < ids.shape[1]:
        serial = mem.policy.serial_tokens(mem.states[0])
        if serial:
            out = model(ids[:, s : s + 1], mem)
            n = 1
        else:
            out = model(ids[:, s : s + chunk], mem, band=mem.policy.token_pass())
            n = out.logits.shape[1]
        mem = out.memory
        logits.append(out.logits)
        masses.append(out.memory_mass.reshape(len(mem.states), -1) if out.memory_mass is not None
                      else torch.zeros(len(mem.states), n))
        s += n
    return torch.cat(logits, 1), torch.cat(masses, 1), mem


def token_steps(model, ids, policy, **sizes):
    mem = model.new_memory(policy, 1, **sizes)
    logits, masses = [], []
    for i in range(ids.shape[1]):
        out = model(ids[:, i : i + 1], mem)
        mem = out.memory
        logits.append(out.logits)
        none = torch.zeros(len(mem.states), 1)
        masses.append(none if out.memory_mass is None else out.memory_mass.reshape(-1, 1))
    return torch.cat(logits, 1), torch.cat(masses, 1), mem


def same_states(a, b, tol=1e-5):
    assert a.seen == b.seen
    for sa, sb in zip(a.states, b.states):
        ta, tb = {}, {}
        assert flatten_state(sa, "s", ta) == flatten_state(sb, "s", tb)  # every counter, every shape
        for name in ta:
            assert (ta[name] - tb[name]).abs().max() <= tol, name


@torch.no_grad()
@pytest.mark.parametrize("case", list(POLICIES))
def test_token_pass_equals_token_steps(model, ids, case):
    policy, sizes, chunk = POLICIES[case]
    fast, fast_mass, fast_mem = passed(model, ids, policy, chunk, **sizes)
    slow, slow_mass, slow_mem = token_steps(model, ids, policy, **sizes)
    assert (fast - slow).abs().max() <= 1e-5
    assert (fast_mass[:, 1:] - slow_mass[:, 1:]).abs().max() <= 1e-5
    same_states(fast_mem, slow_mem)
    each = model(ids[:, :5], fast_mem, band=fast_mem.policy.token_pass()).extras["stats_each"]
    assert len(each) == len(fast_mem.states) and all(len(e) == 5 for e in each)


def per_query_forward(model, ids, keys):
    """Logits where query i attends to keys(kr, v, i) -> (K, V) of its own, kr the rotated (smeared) keys of
    the whole sequence, queries rotated to their positions."""
    cfg = model.config
    x = model.model.embed_tokens(ids)
    n = ids.shape[1]
    cos, sin = rope_cos_sin(torch.arange(n), inv_frequencies(cfg.head_dim, cfg.rope_theta), x.dtype)
    for layer in model.model.layers:
        q, k, v = _qkv(layer, layer.attn_norm(x), cos, sin)
        qr, kr = apply_rope(q, cos, sin), smeared(layer, apply_rope(k, cos, sin))
        outs = []
        for i in range(n):
            ki, vi = keys(kr, v, i)
            outs.append(reference_attention(qr[:, :, i : i + 1], ki, vi, torch.ones(1, ki.shape[2], dtype=torch.bool)))
        a = torch.cat(outs, 2)
        x = x + layer.attn.o(a.transpose(1, 2).reshape(x.shape))
        x = x + layer.mlp(layer.mlp_norm(x))
    return model.lm_head(model.model.norm(x))


@torch.no_grad()
def test_xl_token_pass_is_a_window_of_two(model, ids):
    out, _, _ = passed(model, ids, "xl", 16)
    assert (out - masked_forward(model, ids, sliding_window(N, 2))).abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("n_sink,n_c,chunk", [(3, 9, 9), (4, 40, 25), (0, 8, 8)])
def test_sink_token_pass_is_streaming_llm(model, ids, n_sink, n_c, chunk):
    out, _, _ = passed(model, ids, "sink", chunk, memory_size=n_c, sink_tokens=n_sink)
    assert (out - sink_forward(model, ids, n_sink, n_c)).abs().max() <= TOL


@torch.no_grad()
def test_average_token_pass_reads_the_plain_mean_of_every_earlier_pair(model, ids):
    def keys(kr, v, i):  # [the mean of pairs 0 .. i-1; pair i]
        if i == 0:
            return kr[:, :, :1], v[:, :, :1]
        return (torch.cat([kr[:, :, :i].mean(2, keepdim=True), kr[:, :, i : i + 1]], 2),
                torch.cat([v[:, :, :i].mean(2, keepdim=True), v[:, :, i : i + 1]], 2))

    out, _, _ = passed(model, ids, "average", 23)
    assert (out - per_query_forward(model, ids, keys)).abs().max() <= TOL


@torch.no_grad()
def test_linear_token_pass_is_explicit_linear_attention_over_every_earlier_token(model, ids):
    """A_mem of token i = explicit linear attention (raw q, k) over tokens 0 .. i-1, mixed by the gate with its
    softmax over itself (its value)."""
    cfg = model.config
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        q, k, v = _qkv(layer, layer.attn_norm(x), None, None)
        g = torch.sigmoid(layer.attn.memory_gate).view(1, -1, 1, 1)
        rows = [v[:, :, :1]] + [g * naive_linear_memory(q[:, :, i : i + 1], k[:, :, :i], v[:, :, :i])
                                + (1 - g) * v[:, :, i : i + 1] for i in range(1, N)]
        a = torch.cat(rows, 2)
        x = x + layer.attn.o(a.transpose(1, 2).reshape(x.shape))
        x = x + layer.mlp(layer.mlp_norm(x))
    ref = model.lm_head(model.model.norm(x))
    out, _, _ = passed(model, ids, "linear", 32)
    assert (out - ref).abs().max() <= TOL
    assert cfg.head_dim and (out - token_steps(model, ids, "linear")[0]).abs().max() <= 1e-5


@torch.no_grad()
def test_compressive_token_pass_reads_the_pooled_groups_each_token_holds(model, ids):
    """Query i: the window (the n_c pairs before it), the pending pairs' mean, the newest groups of `rate`
    dropped pairs that fit the n_cm slots (one fewer while pairs wait), each pooled by its mean."""
    n_c, rate, n_cm = 6, 3, 4

    def keys(kr, v, i):
        lo = max(0, i - n_c)  # the window starts here; every pair before it has been dropped into compression
        groups, pending = divmod(lo, rate)
        kept = min(groups, n_cm - (pending > 0))
        ks, vs = [], []
        for g in range(groups - kept, groups):
            ks.append(kr[:, :, g * rate : (g + 1) * rate].mean(2, keepdim=True))
            vs.append(v[:, :, g * rate : (g + 1) * rate].mean(2, keepdim=True))
        if pending:
            ks.append(kr[:, :, groups * rate : lo].mean(2, keepdim=True))
            vs.append(v[:, :, groups * rate : lo].mean(2, keepdim=True))
        return torch.cat(ks + [kr[:, :, lo : i + 1]], 2), torch.cat(vs + [v[:, :, lo : i + 1]], 2)

    out, _, _ = passed(model, ids, "compressive", 6, memory_size=n_c, compress_rate=rate, compressed_size=n_cm)
    assert (out - per_query_forward(model, ids, keys)).abs().max() <= TOL


@torch.no_grad()
def test_a_band_that_is_not_the_policys_pass_bound_is_refused(model, ids):
    for policy, band in (("full", 16), ("tova", 16), ("sink", 16), ("xl", 1)):
        with pytest.raises(ValueError, match="no token pass"):
            model(ids[:, :4], model.new_memory(policy, 1), band=band)
