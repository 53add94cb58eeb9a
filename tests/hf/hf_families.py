"""Tiny random models of many transformers families, built from each family's own config class (no downloads).

`FAMILIES` (the issue's list) and `EXTRA_FAMILIES` (others tried the same way) map a name to the config fields of
a small model: hidden 32-64, 2-4 layers, vocab 8,192 (the bundled tokenizer's), initializer_range 0.08 so that
attention is far from uniform (near-uniform random attention hides position bugs). `build_config(name)` returns the
config, or None when the installed transformers does not know the family (the CI job on 5.17 skips those).
"""

from __future__ import annotations

V = 8192  # the bundled tokenizer's vocabulary
INIT = 0.08
W = 16  # sliding windows of the sliding families: short enough that a 100-token text crosses them

_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", _LLAMA),
    "llama3-rope": ("llama", {**_LLAMA, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "mistral": ("mistral", {**_LLAMA, "sliding_window": W}),
    "qwen2-sliding": ("qwen2", {**_LLAMA, "use_sliding_window": True, "sliding_window": W, "max_window_layers": 1}),
    "qwen3": ("qwen3", {**_LLAMA, "head_dim": 16}),
    "gemma": ("gemma", {**_LLAMA, "head_dim": 16}),
    "gemma2": ("gemma2", {**_LLAMA, "head_dim": 16, "sliding_window": W, "query_pre_attn_scalar": 16,
                          "attn_logit_softcapping": 5.0, "final_logit_softcapping": 10.0}),
    "gemma3_text": ("gemma3_text", {**_LLAMA, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": W,
                                    "query_pre_attn_scalar": 16,
                                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                                                    "full_attention"]}),
    "gpt_oss": ("gpt_oss", {**_LLAMA, "num_hidden_layers": 2, "head_dim": 16, "sliding_window": W,
                            "num_local_experts": 4, "num_experts_per_tok": 2,
                            "layer_types": ["sliding_attention", "full_attention"]}),
    "phi": ("phi", {**{k: v for k, v in _LLAMA.items() if k != "num_key_value_heads"}, "partial_rotary_factor": 0.5}),
    "phi3": ("phi3", {**_LLAMA, "pad_token_id": 0}),
    "gpt_neox": ("gpt_neox", {**{k: v for k, v in _LLAMA.items() if k != "num_key_value_heads"}, "rotary_pct": 0.25}),
    "gptj": ("gptj", {"n_embd": 64, "n_layer": 3, "n_head": 4, "rotary_dim": 8, "n_positions": 512}),
    "bloom": ("bloom", {"hidden_size": 64, "n_layer": 3, "n_head": 4}),
    "falcon": ("falcon", {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                          "max_position_embeddings": 512}),
    "stablelm": ("stablelm", {**_LLAMA, "partial_rotary_factor": 0.25}),
    "cohere": ("cohere", {**_LLAMA, "logit_scale": 0.5}),
    "granite": ("granite", {**_LLAMA, "attention_multiplier": 0.2, "embedding_multiplier": 2.0,
                            "residual_multiplier": 0.5, "logits_scaling": 2.0}),
    "olmo2": ("olmo2", _LLAMA),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 1024}),
    "opt": ("opt", {"hidden_size": 64, "num_hidden_layers": 3, "ffn_dim": 128, "num_attention_heads": 4,
                    "max_position_embeddings": 1024, "word_embed_proj_dim": 64}),
}

EXTRA_FAMILIES: dict[str, tuple[str, dict]] = {
    "cohere2": ("cohere2", {**_LLAMA, "num_hidden_layers": 4, "sliding_window": W,
                            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                                            "full_attention"]}),
    "olmo3": ("olmo3", {**_LLAMA, "num_hidden_layers": 4, "sliding_window": W,
                        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                                        "full_attention"]}),
    "exaone4": ("exaone4", {**_LLAMA, "num_hidden_layers": 4, "sliding_window": W,
                            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                                            "full_attention"]}),
    "smollm3": ("smollm3", {**_LLAMA, "num_hidden_layers": 4, "no_rope_layer_interval": 2}),
    "llama4_text": ("llama4_text", {**_LLAMA, "num_hidden_layers": 4, "head_dim": 16, "attention_chunk_size": W,
                                    "num_local_experts": 2, "intermediate_size_mlp": 128, "interleave_moe_layer_step": 2,
                                    "no_rope_layers": [1, 1, 1, 0]}),
    "starcoder2": ("starcoder2", {**_LLAMA, "sliding_window": W}),
    "mixtral": ("mixtral", {**_LLAMA, "sliding_window": W, "num_local_experts": 2}),
    "ministral": ("ministral", {**_LLAMA, "head_dim": 16, "sliding_window": W,
                                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "mpt": ("mpt", {"d_model": 64, "n_layers": 3, "n_heads": 4, "max_seq_len": 1024}),
    "falcon-alibi": ("falcon", {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "alibi": True}),
    "falcon-new-arch": ("falcon", {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                                   "new_decoder_architecture": True, "num_kv_heads": 2}),
    "gpt_bigcode": ("gpt_bigcode", {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 1024}),
    "gpt_neo": ("gpt_neo", {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "window_size": W,
                            "attention_types": [[["global", "local"], 1]], "max_position_embeddings": 1024}),
    "codegen": ("codegen", {"n_embd": 64, "n_layer": 3, "n_head": 4, "rotary_dim": 8, "n_positions": 1024}),
    "glm": ("glm", {**_LLAMA, "head_dim": 16}),
    "helium": ("helium", {**_LLAMA, "head_dim": 16}),
    "persimmon": ("persimmon", {**{k: v for k, v in _LLAMA.items() if k != "num_key_value_heads"}}),
    "nemotron": ("nemotron", {**_LLAMA, "head_dim": 16}),
    "gemma3n_text": ("gemma3n_text", {**_LLAMA, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": W,
                                      "num_kv_shared_layers": 2, "layer_types": ["sliding_attention", "full_attention",
                                                                                 "sliding_attention", "full_attention"],
                                      "laurel_rank": 8, "altup_num_inputs": 2, "hidden_size_per_layer_input": 8,
                                      "vocab_size_per_layer_input": V, "intermediate_size": [128] * 4,
                                      "activation_sparsity_pattern": [0.0] * 4}),
    "qwen3_next": ("qwen3_next", {**_LLAMA, "num_hidden_layers": 4, "head_dim": 16}),
    "xglm": ("xglm", {"d_model": 64, "num_layers": 2, "attention_heads": 4, "ffn_dim": 128}),
    "biogpt": ("biogpt", {**{k: v for k, v in _LLAMA.items() if k != "num_key_value_heads"}}),
    "vaultgemma": ("vaultgemma", {**_LLAMA, "head_dim": 16, "sliding_window": W, "query_pre_attn_scalar": 16}),
}


# One family per code path of segcli.hf that transformers' API reaches (.ci/run runs the family matrix under an older
# transformers 5 on these only): plain and llama3 rotary, partial (phi) and interleaved (gptj) rotary, every layer
# sliding (mistral), alternating layer types with softcapping (gemma2) and two rotary sets (gemma3_text), attention
# sinks and experts (gpt_oss), key-values shared across layers (gemma3n_text), chunked and rotary-free layers
# (llama4_text), ALiBi (bloom), fused query-key-values (falcon), learned positions (gpt2, opt's offset ones).
API_FAMILIES = ("llama", "llama3-rope", "phi", "gptj", "mistral", "gemma2", "gemma3_text", "gpt_oss", "gemma3n_text",
                "llama4_text", "bloom", "falcon", "gpt2", "opt")


def build_config(name: str):
    """The family's config (vocab 8,192, initializer_range 0.08), or None when this transformers lacks the family."""
    from transformers import AutoConfig

    model_type, fields = {**FAMILIES, **EXTRA_FAMILIES}[name]
    try:
        cfg = AutoConfig.for_model(model_type, vocab_size=V, initializer_range=INIT, **fields)
    except (KeyError, ValueError):
        return None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the defaults point past a small vocabulary
        if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) >= V:
            setattr(cfg, name, 0)
    return cfg


def model_of(name: str, impl: str | None = None, **overrides):
    """The family's tiny model (seeded, eval), config fields overridden, under attention `impl` (None: the
    family's default); skips the test when this transformers lacks the family."""
    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    cfg = build_config(name)
    if cfg is None:
        pytest.skip(f"{name}: not in this transformers")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if impl is not None:
        model.set_attn_implementation(impl)
    return model


def save_family(name: str, path, tokenizer_file):
    """Build the family's tiny model (seeded) and save it with the bundled tokenizer; None when unknown here."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = build_config(name)
    if cfg is None:
        return None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    tok.save_pretrained(path)
    return path


RESULTS: list[dict] = []  # outcomes of the family tests this session, for scripts/family_table.py


def record(family: str, implementation: str, policy: str, outcome: str, why: str = "") -> None:
    """One outcome (exact / runs / refused) of a family under a policy and an attention implementation."""
    RESULTS.append({"family": family, "implementation": implementation, "policy": policy, "outcome": outcome,
                    "why": why})


def write_results() -> None:
    """With SEGCLI_FAMILY_RESULTS=FILE, every outcome so far to FILE (JSON), rewritten after each test module."""
    import json
    import os

    import transformers

    path = os.environ.get("SEGCLI_FAMILY_RESULTS")
    if path and RESULTS:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"transformers": transformers.__version__, "results": RESULTS}, f, indent=1)
