"""The FLOP model: what one segment of the model costs, for MFU and the bandwidth limit (docs/PERFORMANCE.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FlopModel:
    d_model: int
    n_layers: int
    n_matmul_params: int  # qkv, o, mlp, lm_head (embedding lookup excluded)
    bytes_per_param: int

    @classmethod
    def from_config(cls, c, bytes_per_param: int) -> "FlopModel":
        d, i, v, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        hd = d // c.num_attention_heads
        per_layer = d * d + 2 * d * kv * hd + d * d + 3 * d * i  # q, k+v, o, gate+up+down
        return cls(d, L, L * per_layer + d * v, bytes_per_param)

    @property
    def attn_per_pair(self) -> int:
        return 4 * self.d_model * self.n_layers  # q.k (2d) and p.v (2d) per layer, per (query, key) pair

    def segment(self, t: int, slots: int) -> float:
        """FLOPs of a segment of t tokens reading `slots` memory slots (causal inside the segment)."""
        return t * 2 * self.n_matmul_params + self.attn_per_pair * (t * slots + t * (t + 1) / 2)

    def window(self, w: int) -> float:
        """FLOPs of one forward over a fresh window of w tokens (no cache)."""
        return self.segment(w, 0)

    def per_token(self, t: int, slots: int) -> float:
        return self.segment(t, slots) / t

    def weight_bytes(self) -> int:
        return self.n_matmul_params * self.bytes_per_param

    def kv_memory_bytes(self, slots: int) -> int:
        """Bytes of a KV memory of `slots` pairs per layer, read once per token."""
        return 2 * self.n_layers * slots * self.d_model * self.bytes_per_param

    def formula(self) -> str:
        return (f"FLOPs/token = 2 x N_matmul ({self.n_matmul_params:,}: qkv, o, mlp, lm_head; embedding lookup excluded) "
                f"+ 4 x d_model x n_layers ({self.attn_per_pair:,}) x (memory slots + mean in-segment context (T+1)/2)")
