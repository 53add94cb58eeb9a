"""Linear (fast-weight) memory, Infini-attention style, in three forms of one operation.

State per head: mu (D_k, D_v) = sum_j phi(k_j)^T v_j and nu (D_k,) = sum_j phi(k_j),
phi = elu + 1. A token reads A_mem = phi(q) mu / (phi(q) nu) from the state *before*
its segment. The state is kept as a running mean (mu / n, nu / n, n tokens), which
leaves the read unchanged and keeps long streams well conditioned.

Forms (same signature, same defaults):
- `naive_linear_memory`: explicit linear attention over every earlier token (reference);
- `recurrent_linear_memory`: token-by-token state accumulation;
- `chunk_linear_memory`: every token reads the state before its segment, then one
  batched update. The model computes exactly this, in its two halves:
  `read_memory` inside the attention and `update_state` through the `linear`
  memory policy (segcli.memory.linear), which holds the state between segments.
- `token_linear_memory`: segment size 1 for T tokens at once: every token reads the state
  *before itself* (the earlier state plus every earlier token of the T, a masked quadratic
  form), then one batched update; what T one-token segments of `chunk_linear_memory` compute.
Each returns (A_mem for every token of the segment, final state).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6


def phi(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


@dataclass
class LinearState:
    mu: Tensor  # (B, H, Dk, Dv) mean of phi(k)^T v over n tokens
    nu: Tensor  # (B, H, Dk) mean of phi(k) over n tokens
    n: int  # tokens accumulated


def empty_state(b: int, h: int, dk: int, dv: int, device=None, dtype=torch.float32) -> LinearState:
    return LinearState(
        mu=torch.zeros(b, h, dk, dv, device=device, dtype=dtype),
        nu=torch.zeros(b, h, dk, device=device, dtype=dtype),
        n=0,
    )


def read_memory(q: Tensor, state: LinearState) -> Tensor:
    """q (B, H, T, Dk) raw queries -> A_mem (B, H, T, Dv); zeros when the state is empty."""
    if state.n == 0:
        return q.new_zeros(*q.shape[:-1], state.mu.shape[-1])
    fq = phi(q)
    num = fq @ state.mu  # (B, H, T, Dv)
    den = (fq * state.nu[..., None, :]).sum(-1, keepdim=True)  # (B, H, T, 1)
    return num / (den + EPS)


def update_state(state: LinearState, k: Tensor, v: Tensor) -> LinearState:
    """Add a segment's k (B, H, T, Dk), v (B, H, T, Dv) in one batched update (a state of a subclass keeps
    its type and its other fields)."""
    t = k.shape[-2]
    if t == 0:
        return state
    fk = phi(k)
    n_new = state.n + t
    w_old, w_seg = state.n / n_new, 1.0 / n_new
    mu = state.mu * w_old + (fk.transpose(-1, -2) @ v) * w_seg  # (B, H, Dk, Dv)
    nu = state.nu * w_old + fk.sum(-2) * w_seg  # (B, H, Dk)
    return replace(state, mu=mu, nu=nu, n=n_new)


def chunk_linear_memory(q, k, v, initial_state=None, output_final_state=True):
    """Segment-level form: every token reads the state before the segment; one update."""
    b, h, _, dk = k.shape
    state = initial_state or empty_state(b, h, dk, v.shape[-1], k.device, k.dtype)
    out = read_memory(q, state)
    return out, (update_state(state, k, v) if output_final_state else None)


def recurrent_linear_memory(q, k, v, initial_state=None, output_final_state=True):
    """Token-level accumulation of the state (reads still use the pre-segment state)."""
    b, h, t, dk = k.shape
    state = initial_state or empty_state(b, h, dk, v.shape[-1], k.device, k.dtype)
    out = read_memory(q, state)
    mu_sum, nu_sum, n = state.mu * state.n, state.nu * state.n, state.n
    for i in range(t):
        fk = phi(k[:, :, i])  # (B, H, Dk)
        mu_sum = mu_sum + fk[..., :, None] * v[:, :, i, None, :]
        nu_sum = nu_sum + fk
        n += 1
    final = LinearState(mu=mu_sum / max(n, 1), nu=nu_sum / max(n, 1), n=n) if output_final_state else None
    return out, final


def token_linear_memory(q, k, v, initial_state=None, output_final_state=True):
    """Token-level reads: token i reads the state after the i tokens before it (zeros while it is empty)."""
    b, h, t, dk = k.shape
    state = initial_state or empty_state(b, h, dk, v.shape[-1], k.device, k.dtype)
    fq, fk = phi(q), phi(k)  # (B, H, T, Dk)
    a = (fq @ fk.transpose(-1, -2)).tril(-1)  # (B, H, T, T): query i on the tokens j < i
    # the state token i reads is the mean over n_i = n + i tokens: the earlier state's weight n / n_i, 1 / n_i each
    # earlier token of the T (float32 weights: a half-precision count would round)
    n_i = torch.arange(state.n, state.n + t, device=q.device, dtype=torch.float32)[:, None]  # (T, 1)
    w_seg = (1.0 / n_i.clamp(min=1)).to(q.dtype)
    num = w_seg * (a @ v)  # (B, H, T, Dv)
    den = w_seg * a.sum(-1, keepdim=True)  # (B, H, T, 1)
    if state.n:
        w_old = (state.n / n_i).to(q.dtype)
        num = num + w_old * (fq @ state.mu)
        den = den + w_old * (fq * state.nu[..., None, :]).sum(-1, keepdim=True)
    out = (num / (den + EPS)).masked_fill(n_i == 0, 0.0)  # an empty state reads zeros
    return out, (update_state(state, k, v) if output_final_state else None)


def naive_linear_memory(q, k_past, v_past):
    """Explicit linear attention of q (B,H,T,Dk) over all earlier tokens k_past/v_past (B,H,N,D)."""
    if k_past.shape[-2] == 0:
        return q.new_zeros(*q.shape[:-1], v_past.shape[-1])
    a = phi(q) @ phi(k_past).transpose(-1, -2)  # (B, H, T, N)
    return (a @ v_past) / (a.sum(-1, keepdim=True) + EPS * k_past.shape[-2])
