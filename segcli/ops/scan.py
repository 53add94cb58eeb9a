"""The selective scan of Mamba (S6) with an initial state: the math of a mamba layer's recurrence, pure functions.

    y, h = recurrent_selective_scan(u, dt, A, B, C, D, z, initial_state=h0, output_final_state=True)
    y, h = chunk_selective_scan(u, dt, A, B, C, D, z, initial_state=h0, output_final_state=True, chunk_size=32)

Per channel d and state index n, with dt' = softplus(dt + dt_bias) where asked:

    h_t = exp(A dt'_t) * h_{t-1} + dt'_t B_t u_t        (B, D, N), h_0 = initial_state (zeros when None)
    y_t = C_t . h_t + D u_t,  then y_t * silu(z_t)

Shapes follow the mamba kernels' layout: u, dt, z (B, D, T); A (D, N); B, C (B, N, T); D (D,); states (B, D, N).
Both forms share one signature and one set of defaults (flash-linear-attention's rule); `recurrent_` steps token by
token exactly as transformers' torch path does (same operations in the same order, so a stream that starts from no
state reproduces it bit for bit), `chunk_` computes each chunk of tokens at once from cumulative log-decays.

transformers' torch `mamba_selective_scan` (mamba, falcon_mamba, jamba, zamba) always starts from a zero state,
so a segment that continues a cache forgets the previous ones; `transformers_scan(h0)` is the same call with h0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _discretize(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, dt_bias: Tensor | None, dt_softplus: bool):
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)[..., None]
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])  # (B, D, T, N)
    dBu = dt[:, :, :, None] * B.transpose(1, 2)[:, None, :, :].float() * u[:, :, :, None].float()  # (B, D, T, N)
    return dt, dA, dBu


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def recurrent_selective_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                             initial_state: Tensor | None = None, output_final_state: bool = False,
                             ) -> tuple[Tensor, Tensor | None]:
    """Token by token. Returns y (B, D, T) in u's dtype and, when asked, the state after the last token (B, D, N)."""
    b, d, t = u.shape
    _, dA, dBu = _discretize(u, dt, A, B, dt_bias, dt_softplus)
    Ct = C.transpose(1, 2)  # (B, T, N)
    h = torch.zeros(b, d, A.shape[-1], dtype=u.dtype, device=u.device) if initial_state is None else initial_state
    ys = []
    for i in range(t):
        h = dA[:, :, i] * h + dBu[:, :, i]  # (B, D, N)
        ys.append(torch.matmul(h.to(u.dtype), Ct[:, i, :].unsqueeze(-1))[:, :, 0])  # (B, D)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0)
    return _finish(y, u, D, z), (h if output_final_state else None)


def chunk_selective_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                         initial_state: Tensor | None = None, output_final_state: bool = False,
                         chunk_size: int = 32) -> tuple[Tensor, Tensor | None]:
    """chunk_size tokens at once: inside a chunk h_t = exp(L_t) h_start + sum_{s<=t} exp(L_t - L_s) dt_s B_s u_s with
    L the cumulative sum of A dt (float32). Same results as the recurrent form up to float rounding."""
    b, d, t = u.shape
    dt, _, dBu = _discretize(u, dt, A, B, dt_bias, dt_softplus)
    logA = A[None, :, None, :] * dt[:, :, :, None].float()  # (B, D, T, N), <= 0
    Ct = C.transpose(1, 2).float()  # (B, T, N)
    h = (torch.zeros(b, d, A.shape[-1], dtype=torch.float32, device=u.device) if initial_state is None
         else initial_state.float())
    ys = []
    for s in range(0, t, chunk_size):
        L = logA[:, :, s:s + chunk_size].cumsum(2)  # (B, D, c, N)
        c = L.shape[2]
        causal = torch.ones(c, c, dtype=torch.bool, device=u.device).tril()  # (t, s): s <= t
        w = torch.exp((L[:, :, :, None] - L[:, :, None, :]).masked_fill(~causal[None, None, :, :, None], -torch.inf))
        hs = torch.einsum("bdtsn,bdsn->bdtn", w, dBu[:, :, s:s + c]) + torch.exp(L) * h[:, :, None]  # (B, D, c, N)
        ys.append(torch.einsum("bdtn,btn->bdt", hs, Ct[:, s:s + c]))
        h = hs[:, :, -1]
    y = torch.cat(ys, -1).to(u.dtype) if ys else u.new_zeros(b, d, 0)
    return _finish(y, u, D, z), (h if output_final_state else None)


class transformers_scan:  # noqa: N801 - stands in for a function of transformers, so named like one
    """`mamba_selective_scan` of transformers' mamba models (same arguments), continuing from `initial_state`
    (set before each forward of the layer: its cached state, None at the start of a stream).

    zamba's mixer scans its heads one call each, in head order, and caches their states stacked (B, H, D, N):
    a state with one axis more than a call's needs is taken head by head, one per call."""

    def __init__(self) -> None:
        self.initial_state: Tensor | None = None
        self.calls = 0  # calls since initial_state was set

    def start(self, initial_state: Tensor | None) -> None:
        self.initial_state, self.calls = initial_state, 0

    def __call__(self, hidden_states: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                 z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                 return_last_state: bool = False, **kwargs):
        h0 = self.initial_state
        if h0 is not None and h0.dim() == hidden_states.dim() + 1:  # (B, H, D, N): this call's head
            h0 = h0[:, self.calls]
        self.calls += 1
        y, h = recurrent_selective_scan(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus,
                                        initial_state=h0, output_final_state=return_last_state)
        return (y, h) if return_last_state else y
