"""The native seglm model as a transformers `LlamaForCausalLM`: same architecture, same weights.

    llama = seglm_to_llama(model)                  # refuses what Llama cannot compute
    llama = seglm_to_llama(model, drop=("smear_keys", "memory_gate"))   # same shapes and cost, another model

seglm is Llama's block (pre-norm RMSNorm, rotate-half RoPE, SwiGLU, tied embeddings) with fused
projections: `qkv` (3d, d) is q_proj, k_proj, v_proj stacked by rows, `gate_up` (2i, d) is gate_proj
and up_proj. Split, they give a Llama model whose logits equal seglm's in one causal forward, and
streamed through segcli's cache layers (`segcli.hf.make_cache`) under every memory policy but `linear`,
whose read is the native model's own (tests/models/test_seglm_to_llama.py).

Two seglm features have no Llama counterpart, and a model that uses them is refused unless the caller
names them in `drop` (the benchmark does: it times the architecture, not the losses):
- `smear_keys`: each key adds a learned share of the previous token's key (`segcli.ops.smear`); a
  nonzero share changes every attention score, under every policy.
- `memory_gate`: the per-head mix of the `linear` memory's read. It is read only under that policy,
  and segcli's HF path mixes with a fixed 0.5, which is the untrained gate (sigmoid(0)); a trained
  gate is information the Llama model would lose.
A feature at its neutral value (zero shares, zero gate) loses nothing and converts silently.
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from .seglm import SegLMConfig, SegLMForCausalLM

# seglm features Llama lacks: name -> what converting it anyway changes
FEATURES = {
    "smear_keys": "its keys add a learned share of the previous token's key (smear_keys); Llama's do not, "
                  "so every attention score differs",
    "memory_gate": "its linear-memory gates are trained; Llama has none (segcli's HF path mixes with a fixed 0.5), "
                   "so under --memory linear the two differ",
}


class NotConvertible(ValueError):
    """The seglm model uses a feature Llama cannot compute."""


def llama_config(c: SegLMConfig) -> LlamaConfig:
    """The LlamaConfig of seglm's architecture (multi-head attention: as many KV heads as heads)."""
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads, head_dim=c.head_dim, hidden_act="silu",
        rms_norm_eps=c.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=1 << 21,  # seglm has no position limit; default RoPE never reads this
        tie_word_embeddings=c.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )


def features_used(model: SegLMForCausalLM) -> list[str]:
    """The FEATURES this model uses (away from their neutral value), in FEATURES' order."""
    attns = [layer.attn for layer in model.model.layers]
    used = {
        "smear_keys": any(_nonzero(getattr(a, "key_smear", None)) for a in attns),
        "memory_gate": any(_nonzero(getattr(a, "memory_gate", None)) for a in attns),
    }
    return [name for name in FEATURES if used[name]]


def _nonzero(p: Tensor | None) -> bool:
    return p is not None and bool(p.detach().ne(0).any())


def llama_state_dict(model: SegLMForCausalLM, drop: Iterable[str] = ()) -> dict[str, Tensor]:
    """seglm's weights under Llama's names (fused qkv and gate_up split), on the CPU in their own dtype.

    Raises NotConvertible for a feature in use that `drop` does not name, and for any seglm weight
    this function does not know (a newer seglm feature), so nothing is ever converted silently."""
    drop = set(drop)
    if unknown := drop - FEATURES.keys():
        raise ValueError(f"drop: unknown feature(s) {', '.join(sorted(unknown))}; known: {', '.join(FEATURES)}")
    refused = [name for name in features_used(model) if name not in drop]
    if refused:
        reasons = "; ".join(FEATURES[name] for name in refused)
        raise NotConvertible(f"this seglm model cannot be a Llama model: {reasons}. "
                             f"Pass drop={tuple(refused)!r} to convert it anyway (same shapes, other outputs).")
    c = model.config
    d, i = c.hidden_size, c.intermediate_size
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd.pop("model.embed_tokens.weight"),
           "model.norm.weight": sd.pop("model.norm.weight")}
    head = sd.pop("lm_head.weight", None)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = head
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        qkv = sd.pop(p + "attn.qkv.weight")  # (3d, d): rows [q; k; v], heads contiguous inside each
        gate_up = sd.pop(p + "mlp.gate_up.weight")  # (2i, d): rows [gate; up]
        out.update({
            p + "input_layernorm.weight": sd.pop(p + "attn_norm.weight"),
            p + "self_attn.q_proj.weight": qkv[:d], p + "self_attn.k_proj.weight": qkv[d:2 * d],
            p + "self_attn.v_proj.weight": qkv[2 * d:], p + "self_attn.o_proj.weight": sd.pop(p + "attn.o.weight"),
            p + "post_attention_layernorm.weight": sd.pop(p + "mlp_norm.weight"),
            p + "mlp.gate_proj.weight": gate_up[:i], p + "mlp.up_proj.weight": gate_up[i:],
            p + "mlp.down_proj.weight": sd.pop(p + "mlp.down.weight"),
        })
        sd.pop(p + "attn.memory_gate", None)  # checked above: neutral or dropped
        sd.pop(p + "attn.key_smear", None)
    if sd:
        raise NotConvertible(f"seglm weights with no Llama counterpart known to this converter: "
                             f"{', '.join(sorted(sd))}")
    return {k: v.contiguous() for k, v in out.items()}


def seglm_to_llama(model: SegLMForCausalLM, drop: Iterable[str] = ()) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` (eval mode, on the CPU, seglm's parameter dtype) with seglm's weights.

    `drop`: FEATURES to leave out instead of refusing them (the result is then another model)."""
    sd = llama_state_dict(model, drop)
    llama = LlamaForCausalLM(llama_config(model.config))
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:  # the Llama layout changed under us: never half-convert
        raise NotConvertible(f"Llama's weights do not match: missing {sorted(set(missing) - tied)}, "
                             f"unexpected {sorted(unexpected)}")
    llama.tie_weights()
    return llama.to(next(model.parameters()).dtype).eval()
