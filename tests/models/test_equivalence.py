"""DESIGN §1 equivalences on a random-initialised native model, against plain references
(max abs diff <= 1e-4 in float32); each with plain keys and with smeared keys (the stage-3 recall models')."""

import pytest
import torch

from conftest import tiny_model
from reference import causal, masked_forward, sink_forward, sliding_window, smeared, streamed

TOL = 1e-4
N = 70


@pytest.fixture(scope="module", params=[False, True], ids=["plain-keys", "smeared-keys"])
def model(request):
    return tiny_model(seed=3, smear_keys=request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 8192, (1, N), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
@pytest.mark.parametrize("n_s", [1, 7, 64], ids=lambda n: f"n_s{n}")
def test_full_equals_one_causal_forward(model, ids, n_s):
    ref = masked_forward(model, ids, causal(N))
    out, mem = streamed(model, ids, "full", n_s)
    assert (out - ref).abs().max() <= TOL
    assert mem.seen == N


@torch.no_grad()
@pytest.mark.parametrize("n_c", [1, 5, 16])
def test_fifo_at_segment_size_1_equals_sliding_window(model, ids, n_c):
    ref = masked_forward(model, ids, sliding_window(N, n_c + 1))
    out, _ = streamed(model, ids, "fifo", 1, memory_size=n_c)
    assert (out - ref).abs().max() <= TOL
    # and the window really matters: the full causal forward differs
    assert (out - masked_forward(model, ids, causal(N))).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("n_c,chunk", [(5, 5), (16, 7), (16, 16), (4, 30)])
def test_fifo_banded_passes_equal_sliding_window_and_token_steps(model, ids, n_c, chunk):
    """`band`: T tokens in one pass as T single-token steps through fifo (what `segcli run -n 1` runs)."""
    ref = masked_forward(model, ids, sliding_window(N, n_c + 1))
    tok_out, tok_mem = streamed(model, ids, "fifo", 1, memory_size=n_c)
    mem = model.new_memory("fifo", 1, memory_size=n_c)
    outs, masses = [], []
    for s in range(0, N, chunk):
        out = model(ids[:, s : s + chunk], mem, band=n_c)
        mem = out.memory
        outs.append(out.logits)
        masses.append(out.memory_mass)  # (L, T)
    out = torch.cat(outs, 1)
    assert (out - ref).abs().max() <= TOL
    for a, b in zip(mem.states, tok_mem.states):  # the memory afterwards: the same last n_c pairs
        assert a.window.filled == b.window.filled == n_c
        for x, y in zip(a.window.view(), b.window.view()):
            assert (x - y).abs().max() <= TOL
    # per-token mass: the token loop's, step by step
    mass = torch.cat(masses, 1)  # (L, N)
    tok = model.new_memory("fifo", 1, memory_size=n_c)
    for i in range(N):
        step = model(ids[:, i : i + 1], tok)
        tok = step.memory
        if i:
            assert (step.memory_mass - mass[:, i]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="not a sliding window"):
        model(ids[:, :4], model.new_memory("full", 1), band=n_c)


@torch.no_grad()
@pytest.mark.parametrize("n_s", [4, 9])
def test_xl_equals_fifo_with_memory_size_equal_to_segment_size(model, ids, n_s):
    xl, _ = streamed(model, ids, "xl", n_s)
    fifo, _ = streamed(model, ids, "fifo", n_s, memory_size=n_s)
    assert (xl - fifo).abs().max() <= TOL


@torch.no_grad()
def test_sink_at_segment_size_1_equals_streamingllm_reference(model, ids):
    ref = sink_forward(model, ids[:, :40], n_sink=3, n_c=6)
    out, _ = streamed(model, ids[:, :40], "sink", 1, sink_tokens=3, memory_size=6)
    assert (out - ref).abs().max() <= TOL


@torch.no_grad()
def test_none_equals_each_segment_alone(model, ids):
    out, _ = streamed(model, ids, "none", 10)
    for s in range(0, N, 10):
        alone = masked_forward(model, ids[:, s : s + 10], causal(min(10, N - s)))
        # positions differ (absolute) but RoPE attention only sees distances
        assert (out[:, s : s + 10] - alone).abs().max() <= TOL


def layer0_qkv(model, ids):
    """Layer 0's raw q, k, v (B, H, N, D) from a plain forward (layer 0 sees only the embeddings)."""
    layer = model.model.layers[0]
    h = layer.attn_norm(model.model.embed_tokens(ids))
    return layer.attn.qkv(h).view(1, ids.shape[1], 3, layer.attn.h, layer.attn.d).permute(2, 0, 3, 1, 4)


@torch.no_grad()
def test_linear_memory_state_is_the_token_by_token_accumulation(model, ids):
    from segcli.ops.linear_attention import recurrent_linear_memory

    _, mem = streamed(model, ids, "linear", 16)
    q, k, v = layer0_qkv(model, ids)
    _, state = recurrent_linear_memory(q, k, v)
    got = mem.states[0]
    assert got.n == state.n == N
    assert (got.mu - state.mu).abs().max() <= TOL
    assert (got.nu - state.nu).abs().max() <= TOL


@torch.no_grad()
def test_average_memory_is_the_plain_mean_of_rotated_pairs(model, ids):
    from segcli.ops.rope import apply_rope, inv_frequencies, rope_cos_sin

    _, mem = streamed(model, ids, "average", 13)
    q, k, v = layer0_qkv(model, ids)
    cos, sin = rope_cos_sin(torch.arange(N), inv_frequencies(model.config.head_dim, model.config.rope_theta), k.dtype)
    kr = smeared(model.model.layers[0], apply_rope(k, cos, sin))
    assert (mem.states[0].k[:, :, 0] - kr.mean(2)).abs().max() <= TOL
    assert (mem.states[0].v[:, :, 0] - v.mean(2)).abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("policy", ["full", "none", "fifo", "xl", "sink", "average", "compressive", "linear"])
def test_every_policy_bounded_over_5000_tokens_in_the_model(policy):
    model = tiny_model(seed=1, num_hidden_layers=1)
    ids = torch.randint(1, 8192, (1, 5000), generator=torch.Generator().manual_seed(0))
    mem = model.new_memory(policy, memory_size=64, sink_tokens=4, compress_rate=4, compressed_size=16)
    seen_bytes = []
    for s in range(0, 5000, 100):
        mem = model(ids[:, s : s + 100], mem).memory
        st = mem.stats()[0]
        seen_bytes.append(st.bytes)
        if policy != "full":
            assert st.slots <= mem.policy.capacity(100)
    if policy == "full":
        assert mem.stats()[0].slots == 5000
    else:
        assert max(seen_bytes[25:]) <= max(seen_bytes[:25])
