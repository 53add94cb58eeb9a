"""The policies that evict by attention (tova, h2o, snapkv) and by key norm (keynorm) on a Hugging Face model.

They need the attention probabilities of each segment, which only eager attention returns: segcli reads them
from the model's own attention modules and hands them to the policy (`observe`), as the native model does
with its own attention. The check is against another implementation (minGPT's test): the bundled seglm
architecture converted to Llama (`segcli.models.seglm_to_llama`) and streamed through segcli's cache layers
gives seglm's own streamed logits under each policy, eviction for eviction. Windowed models and per-layer
budgets: tests/hf/test_hf_pyramid.py; SDPA is refused by make_cache and switched from by the CLI.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from segcli.cli import app
from segcli.errors import UsageError
from segcli.hf import cache_kwarg, make_cache
from segcli.models.seglm_to_llama import seglm_to_llama

pytestmark = pytest.mark.transformers_api  # .ci/run runs this module again under an older transformers 5

SIZES = {"tova": dict(memory_size=8), "h2o": dict(memory_size=8, recent_tokens=3),
         "snapkv": dict(memory_size=8, window=2), "keynorm": dict(memory_size=8)}



@pytest.fixture(scope="module")
def twins():
    model = tiny_model(0, rope_theta=500000.0)
    llama = seglm_to_llama(model)
    llama.set_attn_implementation("eager")
    return model, llama


@pytest.mark.parametrize("ns", [1, 4])
@pytest.mark.parametrize("policy", list(SIZES))
def test_scored_policies_match_the_native_model(twins, policy, ns):
    model, llama = twins
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    memory, cache = model.new_memory(policy, 1, **SIZES[policy]), make_cache(llama, policy, **SIZES[policy])
    native, hf = [], []
    with torch.no_grad():
        for s in range(0, ids.shape[1], ns):
            x = ids[:, s : s + ns]
            out = model(x, memory)
            memory = out.memory
            native.append(out.logits)
            pos = torch.arange(s, s + ns)[None]
            hf.append(llama(input_ids=x, position_ids=pos, use_cache=True, **{cache_kwarg(llama): cache}).logits)
    torch.testing.assert_close(torch.cat(hf, 1), torch.cat(native, 1), atol=1e-4, rtol=0)
    assert all(st.slots <= SIZES[policy]["memory_size"] for st in cache.stats())  # evicted to the budget


def test_sdpa_is_refused_for_attention_scored_policies(twins):
    _, llama = twins
    llama.set_attn_implementation("sdpa")
    try:
        with pytest.raises(UsageError, match="only eager attention returns"):
            make_cache(llama, "tova", memory_size=8)
        make_cache(llama, "keynorm", memory_size=8)  # scores keys, not attention: any implementation
    finally:
        llama.set_attn_implementation("eager")


def test_the_cli_runs_them_under_eager(tmp_path, doc_path):
    """segcli loads an SDPA model and switches it to eager for tova: the run is the model's own attention."""
    from conftest import BUNDLED_TOKENIZER
    from transformers import PreTrainedTokenizerFast

    model = tiny_model(0, rope_theta=500000.0)
    seglm_to_llama(model).save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<|endoftext|>").save_pretrained(tmp_path)
    res = CliRunner().invoke(app, ["run", str(doc_path), "--model", str(tmp_path), "-q", "--memory", "tova",
                                   "--memory-size", "16", "--segment-size", "8", "--max-tokens", "64", "--device",
                                   "cpu", "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    import json

    segs = [json.loads(x) for x in res.stdout.splitlines() if '"segment"' in x]
    assert segs and all(s["memory"]["slots"] <= 16 for s in segs) and segs[-1]["memory"]["attn_mass_memory"] > 0
