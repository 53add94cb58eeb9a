"""Exact routes for recurrent layers whose transformers code path is wrong when a segment continues a state.

Each route is found by what a layer's code does, not by the family's name, so that a family that copies one of these
layers gets the route too, and each is installed on the loaded model's own modules (instance attributes and hooks):
transformers itself is not changed, and a model loaded by anyone else computes what it always did.

- `stateful_scan`: mamba-style mixers (mamba, falcon_mamba, jamba, zamba) call `mamba_selective_scan`, which always
  starts from a zero SSM state, for every segment longer than one token; the route runs the mixer's own forward with
  that name bound to segcli's scan that starts from the layer's cached state (`segcli.ops.scan`).
- `clamped_step`: mamba2-style mixers whose chunk scan clamps dt to `time_step_limit` (zamba2, nemotron_h) skip the
  clamp in their one-token update (`mamba2_selective_state_update`); the route clamps dt before that update.
- `conv_context`: recurrent_gemma's recurrent block convolves a segment longer than one token with zeros on its left
  (and keeps a zero-padded conv state after a short one); the route convolves it with the block's conv state.

`install_routes(model)` installs every route the model needs and returns what it did, one line each.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.scan import transformers_scan


@dataclass
class Route:
    name: str  # stateful_scan, clamped_step, conv_context
    module: str  # the class of the layer it was installed on
    slower: bool  # whether it costs time against the model's own (wrong) path
    note: str  # what it does, for the user


def _plain_forward(cls: type) -> Callable:
    """cls.forward without its decorators (they rename deprecated arguments and attach accelerate hooks)."""
    return inspect.unwrap(cls.forward)


def uses_global(module: nn.Module, name: str) -> bool:
    """Whether the module's forward calls a module-level function `name`."""
    fn = _plain_forward(type(module))
    return name in fn.__code__.co_names and name in fn.__globals__


def rebind(module: nn.Module, **functions: Any) -> Callable:
    """A copy of the module's forward, bound to it, in which the global names in `functions` mean those objects
    (everything else, code and defaults, is the class's own). Installed as the instance's `forward`."""
    fn = _plain_forward(type(module))
    scope = dict(fn.__globals__)
    scope.update(functions)
    new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return types.MethodType(new, module)


def _cache_argument(args: tuple, kwargs: dict) -> Any:
    """The cache a mixer was called with (`cache` in transformers 5.24, `cache_params` in 5.17, or positional)."""
    for name in ("cache", "cache_params", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[1] if len(args) > 1 else None


def _recurrent_state(cache: Any, layer_idx: int) -> Tensor | None:
    layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
    if layer is None or not getattr(layer, "has_previous_state", {}).get(0):
        return None
    return layer.recurrent_states.get(0)


def install_stateful_scan(mixer: nn.Module) -> None:
    scan = transformers_scan()
    forward = rebind(mixer, mamba_selective_scan=scan)

    def stateful(*args, **kwargs):
        scan.start(_recurrent_state(_cache_argument(args, kwargs), mixer.layer_idx))
        try:
            return forward(*args, **kwargs)
        finally:
            scan.start(None)

    mixer.forward = stateful


def install_clamped_step(mixer: nn.Module) -> None:
    update = _plain_forward(type(mixer)).__globals__["mamba2_selective_state_update"]
    low, high = mixer.time_step_limit

    def clamped(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs):
        # the chunk scan's order: dt + bias, softplus, clamp to the limit
        if dt_bias is not None:
            dt = dt + dt_bias.to(dt.dtype)
        if dt_softplus:
            dt = F.softplus(dt)
        dt = torch.clamp(dt, min=low, max=high)
        return update(state, hidden_states, dt, A, B, C, D, dt_bias=None, dt_softplus=False, z=z, **kwargs)

    mixer.forward = rebind(mixer, mamba2_selective_state_update=clamped)


def install_conv_context(block: nn.Module) -> None:
    """recurrent_gemma: the block sets `conv1d_state` from the new inputs alone, then convolves them with zeros on
    their left. The route keeps the state from before the call, convolves [state; inputs] instead and stores the last
    width - 1 inputs of [state; inputs] as the new state."""
    conv: nn.Conv1d = block.conv_1d
    width = conv.kernel_size[0]
    held: dict[str, Tensor | None] = {"left": None}
    original = block.forward

    def with_context(module, inputs, output):
        left = held["left"]
        if left is None:
            return output
        x = torch.cat([left.to(inputs[0].dtype), inputs[0]], -1)  # (B, C, width - 1 + T)
        held["state"] = x[..., -(width - 1):]
        return F.conv1d(x, conv.weight, conv.bias, groups=conv.groups)  # (B, C, T): the block keeps [..., :T]

    conv.register_forward_hook(with_context)

    def forward(input_states, position_ids, *args, **kwargs):
        multi = input_states.shape[1] > 1
        held["left"] = block.conv1d_state if multi and block.conv1d_state is not None else None
        held["state"] = None
        try:
            out = original(input_states, position_ids, *args, **kwargs)
        finally:
            held["left"] = None
        if held["state"] is not None:
            block.conv1d_state = held["state"]
        return out

    block.forward = forward


def install_routes(model: nn.Module) -> list[Route]:
    """Install every route `model`'s layers need; one Route per kind of layer that got one."""
    done: dict[tuple[str, str], Route] = {}
    for m in model.modules():
        cls = type(m).__name__
        if not hasattr(type(m), "forward") or type(m).forward is nn.Module.forward:
            continue
        if uses_global(m, "mamba_selective_scan") and hasattr(m, "layer_idx"):
            install_stateful_scan(m)
            done.setdefault(("stateful_scan", cls), Route(
                "stateful_scan", cls, False,
                f"{cls}: segments longer than one token continue the cached SSM state through segcli's selective "
                "scan (transformers' torch scan starts every call from zero)"))
        elif uses_global(m, "mamba2_selective_state_update") and tuple(getattr(m, "time_step_limit", (0.0, float("inf")))) != (0.0, float("inf")):
            install_clamped_step(m)
            done.setdefault(("clamped_step", cls), Route(
                "clamped_step", cls, False,
                f"{cls}: one-token steps clamp dt to time_step_limit as the chunk scan does"))
        elif hasattr(m, "conv1d_state") and isinstance(getattr(m, "conv_1d", None), nn.Conv1d) and hasattr(m, "rg_lru"):
            install_conv_context(m)
            done.setdefault(("conv_context", cls), Route(
                "conv_context", cls, False,
                f"{cls}: segments longer than one token convolve with the cached conv state"))
    return list(done.values())
