"""The native segment-recurrent model.

`network` is the model in torch (`SegLM`, what `segcli run` loads); `modeling_seglm` is the same model as
transformers' `SegLMForCausalLM` (training, save_pretrained / from_pretrained) and registers seglm with
`AutoConfig` and `AutoModelForCausalLM` when imported. This package imports neither transformers' model code nor
the Auto classes until `SegLMForCausalLM` is asked for (issue 29: they cost `segcli run` seconds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .configuration_seglm import SegLMConfig
from .network import SegLM, SegLMOutput, SegMemory

if TYPE_CHECKING:
    from .modeling_seglm import SegLMForCausalLM


def __getattr__(name: str):
    """`SegLMForCausalLM`, imported (and seglm registered with the Auto classes) when first asked for (PEP 562)."""
    if name == "SegLMForCausalLM":
        from .modeling_seglm import SegLMForCausalLM

        return SegLMForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SegLMConfig", "SegLM", "SegLMForCausalLM", "SegLMOutput", "SegMemory"]
