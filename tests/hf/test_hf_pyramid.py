"""`--layer-budget pyramid` (PyramidKV's per-layer slot budgets) on Hugging Face models (issue 22).

transformers builds one mask per layer type from one layer's sizes; segcli sizes it by the layer that sees the most
slots and hands each attention module the mask's newest columns, its own [slots; segment]. That is exact where every
layer is full attention in the absolute frame (Llama, Qwen3, GPT-2, ...), under eager and SDPA: checked here against
one plain forward whose every layer is masked by hand to its own window. Windows, ALiBi and the linear memory are
refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import BUNDLED_TOKENIZER, SAMPLE
from hf_families import model_of, save_family
from segcli.cli import app
from segcli.errors import UsageError
from segcli.hf import cache_kwarg, make_cache
from segcli.memory import make_policy
from segcli.memory.scored import layer_budgets

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

runner = CliRunner()
POLICIES = ("fifo", "sink", "compressive", "tova", "h2o", "snapkv", "keynorm")
SCORED_BY_ATTENTION = ("tova", "h2o", "snapkv")


@pytest.fixture(scope="module")
def models():
    made: dict = {}

    def get(name: str, impl: str):
        if (name, impl) not in made:
            made[name, impl] = model_of(name, impl)
        return made[name, impl]

    return get


def ids_of(model, n: int) -> torch.Tensor:
    return torch.randint(0, model.config.get_text_config().vocab_size, (1, n),
                         generator=torch.Generator().manual_seed(3))


def stream(model, cache, ids: torch.Tensor, ns: int) -> tuple[torch.Tensor, list]:
    """Logits (1, N, V) of ids streamed at segment size ns, and every segment's per-layer stats."""
    out, stats = [], []
    with torch.no_grad():
        for s in range(0, ids.shape[1], ns):
            x = ids[:, s : s + ns]
            pos = torch.arange(s, s + x.shape[1])[None]
            out.append(model(input_ids=x, position_ids=pos, use_cache=True, **{cache_kwarg(model): cache}).logits)
            stats.append(cache.stats())
    return torch.cat(out, 1), stats


def windowed_reference(model, ids: torch.Tensor, ns: int, budgets: list[int]) -> torch.Tensor:
    """One plain forward, eager attention, in which layer l's additive mask is built here by hand: a query at q
    sees kv <= q that fifo with budget c_l at segment size ns keeps, kv >= (q // ns) ns - c_l (at ns = 1 a
    sliding window of c_l + 1)."""
    n = ids.shape[1]
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    used: list[int] = []

    def hook(module, args, kwargs):
        c = budgets[module.layer_idx]
        ok = (kv <= q) & (kv >= (q // ns) * ns - c)
        mask = torch.zeros(n, n).masked_fill(~ok, torch.finfo(torch.float32).min)[None, None]
        used.append(module.layer_idx)
        return args, {**kwargs, "attention_mask": mask}

    impl = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation("eager")
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=torch.arange(n)[None]).logits
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(impl)
    assert sorted(used) == list(range(len(budgets)))  # every layer got its own mask
    return logits


def sizes(policy: str, memory_size: int) -> dict:
    extra = {"sink": dict(sink_tokens=2), "compressive": dict(compress_rate=2, compressed_size=4),
             "h2o": dict(recent_tokens=max(1, memory_size // 4)), "snapkv": dict(window=2)}
    return dict(memory_size=memory_size, layer_budget="pyramid", **extra.get(policy, {}))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("policy", POLICIES)
def test_budgets_above_the_document_equal_one_plain_forward(models, policy, impl):
    """Every layer's budget (the smallest is n_c / 20) holds the whole document: pyramid = full = one forward."""
    if impl == "sdpa" and policy in SCORED_BY_ATTENTION:
        pytest.skip("evicts by attention probabilities: eager only (refused under SDPA)")
    model = models("llama", impl)
    n = 24
    ids = ids_of(model, n)
    with torch.no_grad():
        plain = model(input_ids=ids, position_ids=torch.arange(n)[None]).logits
    assert min(layer_budgets(20 * n, 3, "pyramid")) >= n
    for ns in (1, 5):
        streamed, _ = stream(model, make_cache(model, make_policy(policy, **sizes(policy, 20 * n))), ids, ns)
        torch.testing.assert_close(streamed, plain, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("ns", [1, 8])
def test_pyramid_fifo_equals_a_window_per_layer(models, family, impl, ns):
    model = models(family, impl)
    n, c = 40, 8
    budgets = layer_budgets(c, model.config.get_text_config().num_hidden_layers, "pyramid")
    assert budgets == [15, 8, 1]  # layers differ a lot, and the last is shorter than a segment
    ids = ids_of(model, n)
    streamed, _ = stream(model, make_cache(model, make_policy("fifo", memory_size=c, layer_budget="pyramid")), ids, ns)
    reference = windowed_reference(model, ids, ns, budgets)
    torch.testing.assert_close(streamed, reference, atol=1e-4, rtol=0)
    uniform, _ = stream(model, make_cache(model, "fifo", memory_size=c), ids, ns)
    assert (uniform - reference).abs().max() > 1e-2  # the per-layer windows matter: not the uniform stream


@pytest.mark.parametrize("policy", POLICIES)
def test_slots_never_above_each_layers_budget(models, policy):
    model = models("llama", "eager")
    c, layers = 8, 3
    budgets = layer_budgets(c, layers, "pyramid")
    assert sum(budgets) == c * layers and len(set(budgets)) == layers  # the uniform total, shared unevenly
    pol = make_policy(policy, **sizes(policy, c))
    extra = {"sink": pol.sink_tokens, "compressive": pol.compressed_size}.get(policy, 0)
    _, per_segment = stream(model, make_cache(model, pol), ids_of(model, 48), 4)
    for seen, stats in zip(range(4, 49, 4), per_segment):
        for budget, st in zip(budgets, stats):
            assert st.slots <= budget + extra, (seen, [s.slots for s in stats])
    last = per_segment[-1]
    if policy == "compressive":  # its FIFOs are full; the pooled slots come on top
        assert [st.slots - min(st.slots - b, extra) for st, b in zip(last, budgets)] == budgets
    else:  # full: every layer at its own budget, together the uniform total
        assert [st.slots for st in last] == [b + extra for b in budgets]
        assert sum(st.slots for st in last) == c * layers + extra * layers


def test_the_cli_runs_it_on_llama(tmp_path):
    path = save_family("llama", tmp_path / "llama", BUNDLED_TOKENIZER)
    doc = tmp_path / "doc.txt"
    doc.write_text((SAMPLE / "hamlet.txt").read_text(encoding="utf-8")[:1500], encoding="utf-8")
    res = runner.invoke(app, ["run", str(doc), "--model", str(path), "-q", "--memory", "fifo", "--memory-size", "32",
                              "--layer-budget", "pyramid", "-s", "16", "--max-tokens", "96", "--device", "cpu",
                              "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["tokens"] == 96


def refused(model, policy: str, *words: str) -> None:
    with pytest.raises(UsageError) as e:
        make_cache(model, make_policy(policy, **sizes(policy, 8)))
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{model.config.model_type}:"), text
    for w in ("--layer-budget pyramid", *words):
        assert w in text, text


@pytest.mark.parametrize("name,feature", [("mistral", "sliding-window layers"),
                                          ("gemma3_text", "sliding-window layers"),
                                          ("llama4_text", "chunked-window layers"),
                                          ("bloom", "ALiBi"), ("falcon-alibi", "ALiBi")])
def test_what_cannot_be_exact_is_refused_in_one_line(name, feature):
    model = model_of(name)
    refused(model, "fifo", feature, "--memory fifo")
    if name in ("mistral", "gemma3_text"):
        refused(model, "sink", feature, "--memory sink")
    make_cache(model, make_policy("fifo", memory_size=8))  # the uniform budget streams


def test_the_linear_memory_is_refused():
    refused(model_of("llama"), "linear", "--memory linear", "no slots")


def test_policies_without_per_layer_budgets_ignore_it(models):
    """full, none, xl and average hold the same slots in every layer whatever --layer-budget says (as natively)."""
    model = models("llama", "sdpa")
    n = 12
    ids = ids_of(model, n)
    with torch.no_grad():
        plain = model(input_ids=ids, position_ids=torch.arange(n)[None]).logits
    streamed, _ = stream(model, make_cache(model, make_policy("full", layer_budget="pyramid")), ids, 4)
    torch.testing.assert_close(streamed, plain, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_model_whose_masks_are_not_narrowed_is_caught(monkeypatch, impl):
    """The seven-token check has teeth: without the per-layer columns the model's forward does not reproduce the
    per-layer windows, and make_cache refuses in one line instead of streaming another model."""
    from segcli.hf import budgets

    monkeypatch.setattr(budgets, "_budget_hook", lambda module, args, kwargs: None)
    model = model_of("llama", impl)
    with pytest.raises(UsageError) as e:
        make_cache(model, make_policy("fifo", memory_size=8, layer_budget="pyramid"))
    text = str(e.value)
    assert "\n" not in text and text.startswith("llama:") and "--layer-budget pyramid --memory fifo" in text, text


@pytest.mark.parametrize("ns", [1, 4])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_matches_the_native_model_layer_by_layer(policy, ns):
    """Another implementation: the native seglm streams pyramid budgets through its own attention; the same weights
    as a Llama (`seglm_to_llama`) through segcli's cache layers give its logits, eviction for eviction, per layer."""
    from conftest import tiny_model
    from segcli.models.seglm_to_llama import seglm_to_llama

    model = tiny_model(0, rope_theta=500000.0, num_hidden_layers=3)
    llama = seglm_to_llama(model)
    impls = ["eager"] if policy in SCORED_BY_ATTENTION else ["eager", "sdpa"]
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    kw = sizes(policy, 8)
    native = []
    memory = model.new_memory(policy, 1, **kw)
    with torch.no_grad():
        for s in range(0, ids.shape[1], ns):
            out = model(ids[:, s : s + ns], memory)
            memory = out.memory
            native.append(out.logits)
    for impl in impls:
        llama.set_attn_implementation(impl)
        streamed, per_segment = stream(llama, make_cache(llama, policy, **kw), ids, ns)
        torch.testing.assert_close(streamed, torch.cat(native, 1), atol=1e-4, rtol=0)
        extra = {"sink": kw.get("sink_tokens", 0), "compressive": kw.get("compressed_size", 0)}.get(policy, 0)
        assert all(st.slots <= b + extra for st, b in zip(per_segment[-1], [15, 8, 1]))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_family("llama", tmp_path_factory.mktemp("llama-pyramid") / "model", BUNDLED_TOKENIZER)


@pytest.mark.parametrize("policy", POLICIES)
def test_save_then_load_equals_one_run(llama_dir, two_docs, tmp_path, monkeypatch, policy):
    """A memory file carries each layer's own budget: `run A --save-memory` then `run B --load-memory` gives B the
    numbers of `run A B` (tests/reliability's helper, its sizes with --layer-budget pyramid)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
    import test_inputs_and_errors as reliability

    monkeypatch.setitem(reliability.SIZES, "layer_budget", "pyramid")
    assert reliability.policy_args(policy)[-2:] == ["--layer-budget", "pyramid"]  # budgets 47, 24, 1 of 90 tokens
    meta = reliability.save_then_load(["--model", llama_dir, "--device", "cpu", "-q"], two_docs, tmp_path, policy)
    assert meta["policy"] == policy and len(meta["hf"]["layers"]) == 3
