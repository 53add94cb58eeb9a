"""`sink` re-rotates its sink keys with the model's own rotary rule: half-split (Llama), interleaved (GPT-J, Cohere),
partial (Phi, GPT-J's rotary_dim), one frequency set per layer type (Gemma 3).

In a one-layer model a key depends only on its token and its position, so a sink stream at n_s = 1 is exactly one
plain forward per token over [sink tokens; window tokens; the token] placed at the positions the stream gives them
(the sinks just before the window, as StreamingLLM moves them). A wrong rotation (half-split applied to GPT-J's
interleaved pairs, say) moves the sinks elsewhere and the logits differ.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_families import build_config
from segcli.hf import Rotary, cache_kwarg, make_cache, rotary_shifts

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

N_SINK, N_C, N = 2, 5, 24



def one_layer(name: str):
    cfg = build_config(name)
    if cfg is None:
        pytest.skip(f"{name}: not in this transformers")
    for field in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, field) and not isinstance(getattr(type(cfg), field, None), property):
            setattr(cfg, field, 1)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def sink_positions(i: int) -> list[int]:
    """Positions of [sinks; window] when token i is read at n_s = 1 under sink(N_SINK, N_C)."""
    window = list(range(max(N_SINK, i - N_C), i))
    start = window[0] if window else i
    return list(range(start - N_SINK, start)) + window if i > N_SINK else list(range(i))


@pytest.mark.parametrize("name,rule", [("llama", "half-split"), ("gptj", "interleaved"), ("cohere", "interleaved"),
                                       ("phi", "half-split"), ("codegen", "interleaved")])
def test_sink_stream_equals_the_model_with_its_sinks_moved(name, rule):
    model = one_layer(name)
    (shift,) = rotary_shifts(model)
    assert shift.describe().startswith(rule)
    ids = torch.randint(1, model.config.vocab_size, (1, N), generator=torch.Generator().manual_seed(3))
    cache = make_cache(model, "sink", sink_tokens=N_SINK, memory_size=N_C)
    with torch.no_grad():
        streamed = torch.cat([model(ids[:, i : i + 1], position_ids=torch.tensor([[i]]), use_cache=True,
                                    **{cache_kwarg(model): cache}).logits[0] for i in range(N)])
        moved = []
        for i in range(N):
            keep = (list(range(N_SINK)) + list(range(max(N_SINK, i - N_C), i))) if i > N_SINK else list(range(i))
            pos = sink_positions(i) + [i]
            moved.append(model(ids[:, keep + [i]], position_ids=torch.tensor([pos])).logits[0, -1:])
        moved = torch.cat(moved)
        kept = torch.cat([model(ids[:, :i + 1], position_ids=torch.arange(i + 1)[None]).logits[0, -1:]
                          for i in range(N)])
    assert (streamed - moved).abs().max() <= 1e-4
    assert (streamed - kept).abs().max() > 1e-2, "the window must have evicted something"


def test_a_wrong_pairing_would_move_the_sinks_elsewhere():
    """The check that picks the rule is sharp: GPT-J's keys shifted half-split miss the model's own shifted keys."""
    model = one_layer("gptj")
    (shift,) = rotary_shifts(model)
    wrong = Rotary(shift.inv, not shift.interleaved, shift.offset)
    k = torch.randn(1, 4, 3, 16, dtype=torch.float64)
    assert (shift(k, 5) - wrong(k, 5)).abs().max() > 1e-2


def test_per_layer_type_frequencies():
    """Gemma 3 rotates sliding layers with its local base frequency and full layers with the global one."""
    cfg = build_config("gemma3_text")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    rules = rotary_shifts(model)
    kinds = cfg.layer_types
    sliding = {float(r.inv[-1]) for r, t in zip(rules, kinds) if t == "sliding_attention"}
    full = {float(r.inv[-1]) for r, t in zip(rules, kinds) if t == "full_attention"}
    assert len(sliding) == len(full) == 1 and sliding != full


def test_nope_layers_are_not_rotated():
    """SmolLM3's NoPE layers carry no rotation: the rule found for them is none."""
    cfg = build_config("smollm3")
    if cfg is None:
        pytest.skip("smollm3: not in this transformers")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    rules = rotary_shifts(model)
    assert [r.inv is None for r in rules] == [not bool(x) for x in cfg.no_rope_layers]
