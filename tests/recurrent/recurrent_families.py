"""Tiny random recurrent and hybrid models, built from each family's own config class (no downloads).

`FAMILIES` (issue 18's list) and `EXTRA_FAMILIES` (other recurrent or hybrid families of transformers 5, tried the
same way) map a name to (model_type, config fields): hidden 32-64, 2-4 layers (a hybrid has at least one attention
and one recurrent layer), vocab 8,192 (the bundled tokenizer's). `build_config(name)` returns the config, or None
where the installed transformers lacks the family (the CI job on 5.17 skips those).
"""

from __future__ import annotations

V = 8192  # the bundled tokenizer's vocabulary
INIT = 0.25  # initializer_range: far from uniform logits, attention and gates, so that position and state bugs show
_ATT = dict(num_attention_heads=4, num_key_value_heads=2)

FAMILIES: dict[str, tuple[str, dict]] = {
    "mamba": ("mamba", dict(hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                            time_step_rank=8)),
    "mamba2": ("mamba2", dict(hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=2,
                              num_hidden_layers=2, expand=2, conv_kernel=4, chunk_size=16)),
    "falcon_mamba": ("falcon_mamba", dict(hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                                          time_step_rank=8)),
    "rwkv": ("rwkv", dict(hidden_size=64, attention_hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          context_length=1024)),
    "xlstm": ("xlstm", dict(hidden_size=64, embedding_dim=64, num_heads=4, num_blocks=2, num_hidden_layers=2,
                            qk_dim_factor=0.5, v_dim_factor=1.0, chunk_size=16, ffn_proj_factor=2.0,
                            ffn_round_up_to_multiple_of=16, mlstm_round_up_to_multiple_of=16)),
    "jamba": ("jamba", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATT, attn_layer_period=2,
                            attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                            num_experts_per_tok=1, mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2)),
    "zamba": ("zamba", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                            num_key_value_heads=4, attn_layer_period=2, attn_layer_offset=1, n_mamba_heads=2,
                            mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2)),
    "zamba2": ("zamba2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              n_mamba_heads=4, mamba_d_state=8, mamba_expand=2, chunk_size=16, adapter_rank=8,
                              layers_block_type=["mamba", "hybrid", "mamba"])),
    "bamba": ("bamba", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATT, attn_layer_indices=[1],
                            mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_expand=2, mamba_chunk_size=16)),
    "falcon_h1": ("falcon_h1", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATT,
                                    mamba_n_heads=8, mamba_d_head=16, mamba_d_ssm=128, mamba_d_state=8,
                                    mamba_expand=2, mamba_chunk_size=16)),
    "qwen3_next": ("qwen3_next", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATT, head_dim=16,
                                      linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                                      linear_num_value_heads=4, num_experts=2, num_experts_per_tok=1,
                                      moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                      layer_types=["linear_attention", "full_attention"])),
    "lfm2": ("lfm2", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATT,
                          layer_types=["conv", "full_attention"])),
    "recurrent_gemma": ("recurrent_gemma", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                lru_width=64, attention_window_size=64,
                                                block_types=["recurrent", "attention"])),
    "minimax": ("minimax", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATT, head_dim=16,
                                num_local_experts=2, num_experts_per_tok=1, block_size=16,
                                layer_types=["linear_attention", "full_attention"])),
    "granitemoehybrid": ("granitemoehybrid", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATT,
                                                  num_local_experts=2, num_experts_per_tok=1,
                                                  shared_intermediate_size=64, mamba_n_heads=8, mamba_d_head=16,
                                                  mamba_d_state=8, mamba_expand=2, mamba_chunk_size=16,
                                                  layer_types=["mamba", "attention"])),
    "kimi_linear": ("kimi_linear", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                        num_experts=2, num_experts_per_token=1, linear_head_dim=16,
                                        linear_num_heads=4, layer_types=["linear_attention", "full_attention"],
                                        mlp_layer_types=["dense", "dense"], pad_token_id=0, bos_token_id=0,
                                        eos_token_id=0)),
    "nemotron_h": ("nemotron_h", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, ssm_state_size=8, mamba_num_heads=8,
                                      mamba_head_dim=16, n_groups=2, expand=2, chunk_size=16,
                                      layers_block_type=["mamba", "attention", "mlp"])),
}

EXTRA_FAMILIES: dict[str, tuple[str, dict]] = {
    "qwen3_5_text": ("qwen3_5_text", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, **_ATT, head_dim=16,
                                          linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                                          linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])),
    "lfm2_moe": ("lfm2_moe", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                                  **_ATT, num_experts=2, num_experts_per_tok=1, num_dense_layers=1,
                                  layer_types=["conv", "full_attention"])),
    "lfm3": ("lfm3", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, **_ATT, head_dim=16,
                          sliding_window=16, pad_token_id=0, layer_types=["conv", "sliding_attention", "full_attention"])),
    "olmo_hybrid": ("olmo_hybrid", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, linear_num_key_heads=4, linear_num_value_heads=4,
                                        linear_key_head_dim=16, linear_value_head_dim=16, pad_token_id=0,
                                        layer_types=["linear_attention", "full_attention"])),
    "bailing_hybrid": ("bailing_hybrid", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                              qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, head_dim=8,
                                              num_experts=2, num_experts_per_token=1, num_expert_group=1,
                                              linear_head_dim=16, linear_num_heads=4, pad_token_id=0,
                                              layer_types=["linear_attention", "full_attention"])),
    "zaya": ("zaya", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          moe_intermediate_size=64, num_experts=2, num_experts_per_tok=1, router_hidden_size=16)),
    "lara_mini": ("lara_mini", dict(hidden_size=64, num_hidden_layers=3, **_ATT, head_dim=16, linear_key_head_dim=16,
                                    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=2,
                                    num_experts_per_tok=1, sliding_window=16,
                                    layer_types=["linear_attention", "sliding_attention", "full_attention"])),
}


def build_config(name: str):
    """The family's config, or None when this transformers does not know the model type."""
    from transformers import CONFIG_MAPPING

    model_type, fields = FAMILIES.get(name) or EXTRA_FAMILIES[name]
    if model_type not in CONFIG_MAPPING:
        return None
    cfg = CONFIG_MAPPING[model_type](vocab_size=V, **fields)
    if hasattr(cfg, "initializer_range"):
        cfg.initializer_range = INIT
    return cfg
