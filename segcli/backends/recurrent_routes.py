"""Exact routes for recurrent layers whose transformers code path is wrong when a segment continues a state.

Each route is found by what a layer's code does, not by the family's name, so that a family that copies one of these
layers gets the route too, and each is installed on the loaded model's own modules (instance attributes and hooks):
transformers itself is not changed, and a model loaded by anyone else computes what it always did.

- `stateful_scan`: mamba-style mixers (mamba, falcon_mamba, jamba, zamba) call `mamba_selective_scan`, which always
  starts from a zero SSM state, for every segment longer than one token (transformers 5.25 calls it from
  `mamba_scan_forward`, which the forward calls); the route makes that call segcli's scan that starts from the
  layer's cached state (`segcli.ops.scan`).
- `clamped_step`: mamba2-style mixers whose chunk scan clamps dt to `time_step_limit` (zamba2, nemotron_h) skip the
  clamp in their one-token update (`mamba2_selective_state_update`); the route clamps dt before that update.
- `conv_context`: recurrent_gemma's recurrent block convolves a segment longer than one token with zeros on its left
  (and keeps a zero-padded conv state after a short one); the route convolves it with the block's conv state.

How a call is replaced (`replace_call`): where the layer has its own kernel slot for the function (transformers 5.25
with `kernels`: `use_kernelized_func` gives each layer instance private function modules that `kernelize` swaps),
segcli swaps that slot's forward, as `kernelize` does; on older releases the layer's forward is a copy whose global
names along the call path (`find_call`) mean segcli's function. A route that finds no call site installs nothing: the
load-time check (`recurrent.RecurrentBackend.check_continuation`) then refuses a model that streams differently.

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


def _plain(fn: Callable) -> Callable:
    """fn without its decorators (they rename deprecated arguments, attach accelerate hooks, set kernel context)."""
    return inspect.unwrap(fn)


def _plain_forward(cls: type) -> Callable:
    return _plain(cls.forward)


def _slot_function(obj: Any) -> Callable | None:
    """The function behind a kernel-hub function object (transformers >= 5.25 with `kernels`: a module-level function
    decorated with `use_kernel_forward_from_hub` becomes an nn.Module instance whose forward calls it)."""
    if not hasattr(obj, "kernel_layer_name"):
        return None
    for cell in type(obj).forward.__closure__ or ():
        if inspect.isfunction(cell.cell_contents):
            return cell.cell_contents
    return None


def _function_of(obj: Any) -> Callable | None:
    """The Python function a global name calls, whether plain, decorated or a kernel-hub function object."""
    fn = _slot_function(obj) or obj
    return _plain(fn) if inspect.isfunction(_plain(fn)) else None


def _names(code: types.CodeType) -> set[str]:
    out = set(code.co_names)
    for const in code.co_consts:  # nested functions and comprehensions
        if isinstance(const, types.CodeType):
            out |= _names(const)
    return out


@dataclass
class CallSite:
    """Where a layer's forward calls the module-level function `name`, directly or through other module-level
    functions of transformers (`path`, outermost first: 5.25 moved mamba's scan into `mamba_scan_forward`)."""

    name: str
    original: Callable  # the object the name holds (call it to run the model's own function)
    path: tuple[str, ...]  # the functions between the forward and the call
    slot: nn.Module | None  # the layer's own kernel slot for it (transformers >= 5.25), where it has one


def find_call(module: nn.Module, name: str, depth: int = 3) -> CallSite | None:
    """Where `module`'s forward reaches `name` (None: it never does)."""
    def walk(fn: Callable, path: tuple[str, ...], left: int) -> CallSite | None:
        names = _names(fn.__code__)
        if name in names and name in fn.__globals__:
            obj = fn.__globals__[name]
            slots = module.__dict__.get("_kernel_funcs") or {}
            return CallSite(name, obj, path, slots.get(getattr(obj, "kernel_layer_name", None)))
        if left:
            for n in sorted(names):
                inner = _function_of(fn.__globals__.get(n))
                if inner is not None and inner.__module__ == fn.__module__ and inner is not fn:
                    found = walk(inner, path + (n,), left - 1)
                    if found:
                        return found
        return None

    forward = getattr(type(module), "forward", None)
    if forward is None or forward is nn.Module.forward:
        return None
    return walk(_plain_forward(type(module)), (), depth)


def _rebound(fn: Callable, site: CallSite, new: Callable, path: tuple[str, ...]) -> Callable:
    """A copy of fn in which `site.name` (or, along `path`, the next function's name) means a rebound copy."""
    scope = dict(fn.__globals__)
    if path:
        scope[path[0]] = _rebound(_function_of(fn.__globals__[path[0]]), site, new, path[1:])
    else:
        scope[site.name] = new
    out = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out


def replace_call(module: nn.Module, site: CallSite, new: Callable) -> str:
    """Make `module`'s forward call `new` where it calls `site.name`; nothing else changes, and only this module.
    Where the layer has its own kernel slot for the function (transformers' `use_kernelized_func`), the slot's
    forward is replaced, as `kernels.kernelize` does; otherwise the forward is a copy whose global names (along the
    call path) mean `new`. Returns which of the two it did."""
    if site.slot is not None:  # kernels reads forward.__func__: a method, as kernelize installs it
        site.slot.forward = types.MethodType(lambda _slot, *args, **kwargs: new(*args, **kwargs), site.slot)
        return "kernel slot"
    module.forward = types.MethodType(_rebound(_plain_forward(type(module)), site, new, site.path), module)
    return "rebound"


def _original(site: CallSite) -> Callable:
    """What to call for the model's own function from inside a replacement (never the slot itself, which would
    call the replacement again)."""
    return _slot_function(site.original) or site.original


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


def install_stateful_scan(mixer: nn.Module, site: CallSite) -> str:
    scan = transformers_scan()
    how = replace_call(mixer, site, scan)
    forward = mixer.forward  # the class's (kernel slot replaced) or the rebound copy

    def stateful(*args, **kwargs):
        scan.start(_recurrent_state(_cache_argument(args, kwargs), mixer.layer_idx))
        try:
            return forward(*args, **kwargs)
        finally:
            scan.start(None)

    mixer.forward = stateful
    return how


def install_clamped_step(mixer: nn.Module, site: CallSite) -> str:
    update = _original(site)
    low, high = mixer.time_step_limit

    def clamped(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs):
        # the chunk scan's order: dt + bias, softplus, clamp to the limit
        if dt_bias is not None:
            dt = dt + dt_bias.to(dt.dtype)
        if dt_softplus:
            dt = F.softplus(dt)
        dt = torch.clamp(dt, min=low, max=high)
        return update(state, hidden_states, dt, A, B, C, D, dt_bias=None, dt_softplus=False, z=z, **kwargs)

    return replace_call(mixer, site, clamped)


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
        scan = find_call(m, "mamba_selective_scan") if hasattr(m, "layer_idx") else None
        step = find_call(m, "mamba2_selective_state_update")
        limit = tuple(getattr(m, "time_step_limit", (0.0, float("inf"))))
        if scan is not None:
            how = install_stateful_scan(m, scan)
            done.setdefault(("stateful_scan", cls), Route(
                "stateful_scan", cls, False,
                f"{cls}: segments longer than one token continue the cached SSM state through segcli's selective "
                f"scan (transformers' torch scan starts every call from zero; installed by {how})"))
        elif step is not None and limit != (0.0, float("inf")):
            how = install_clamped_step(m, step)
            done.setdefault(("clamped_step", cls), Route(
                "clamped_step", cls, False,
                f"{cls}: one-token steps clamp dt to time_step_limit as the chunk scan does (installed by {how})"))
        elif hasattr(m, "conv1d_state") and isinstance(getattr(m, "conv_1d", None), nn.Conv1d) and hasattr(m, "rg_lru"):
            install_conv_context(m)
            done.setdefault(("conv_context", cls), Route(
                "conv_context", cls, False,
                f"{cls}: segments longer than one token convolve with the cached conv state"))
    return list(done.values())
